"""Arithmetic: sums and differences, products (with the cross term of two live factors), means,
elementwise functions.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor

from ...jacobians import Jacobian, Reshape
from ..ops import OP_RULES, ElementwiseOp, LinearOp, Meta, Slot, product_cross_term, slot_value
from ._common import _dims_exclude_batch, _first_live_ndim, _keeps_batch, _reshape_jacobian, _shape, _with


def _identity_if_same(meta: Meta, slot: Slot, args: tuple) -> Optional[Jacobian]:
    """``add``/``sub`` of same-shape values: the identity for the first argument (and the second with alpha 1)."""
    alpha = meta.kwargs.get("alpha", 1)
    if _shape(slot_value(args, slot)) != _shape(meta.out):
        return None
    if slot == (0,) or (alpha == 1 and meta.target.startswith("aten.add")):
        return Reshape(_shape(meta.out))
    return None


# -- arithmetic linear in each live argument -----------------------------------------------------

OP_RULES.register("aten.add.Tensor", LinearOp(_keeps_batch, _identity_if_same, broadcasts=True,
                                              doc="sum (residual connections)"))
OP_RULES.register("aten.sub.Tensor", LinearOp(_keeps_batch, _identity_if_same, broadcasts=True, doc="difference"))
OP_RULES.register("aten.neg.default", LinearOp(_keeps_batch, doc="negation"))
OP_RULES.register("aten.mul.Tensor", LinearOp(_keeps_batch, bilinear=product_cross_term, broadcasts=True,
                                              doc="product (exact Hessian: with the cross term of two live factors)"))
OP_RULES.register("aten.mul.Scalar", LinearOp(_keeps_batch, doc="product with a number"))
OP_RULES.register("aten.add.Scalar", LinearOp(_keeps_batch, _reshape_jacobian, doc="shift by a number"))
OP_RULES.register("aten.div.Tensor", LinearOp(
    lambda m: _keeps_batch(m) or ("divides by a value that depends on the parameters" if (1,) in m.live else None),
    broadcasts=True, doc="division by a constant"))
OP_RULES.register("aten.mean.dim", LinearOp(
    _with(lambda m: _dims_exclude_batch(m.args[1] if len(m.args) > 1 else None, _first_live_ndim(m), "averages")),
    doc="mean over dims other than 0"))
OP_RULES.register("aten.sum.dim_IntList", LinearOp(
    _with(lambda m: _dims_exclude_batch(m.args[1] if len(m.args) > 1 else None, _first_live_ndim(m), "sums")),
    doc="sum over dims other than 0"))


# -- elementwise functions: derivatives by forward mode (one entry each) ---------------------------

for _name, _doc in (("aten.pow.Tensor_Scalar", "x ** p"), ("aten.rsqrt.default", "1 / sqrt(x)"),
                    ("aten.sqrt.default", "sqrt(x)"), ("aten.exp.default", "exp(x)"), ("aten.log.default", "log(x)"),
                    ("aten.sin.default", "sin(x)"), ("aten.cos.default", "cos(x)"),
                    ("aten.reciprocal.default", "1 / x"), ("aten.erf.default", "erf(x)")):
    OP_RULES.register(_name, ElementwiseOp(doc=f"elementwise {_doc}"))

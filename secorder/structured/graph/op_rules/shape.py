"""Shape operations (views, permutes, slices, ``cat``, splits) and folding the batch into the rows of a
matmul.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

from torch import Tensor

from ...jacobians import Jacobian, Reshape, Selection
from ..ops import OP_RULES, LinearOp, Meta, Slot, slot_value
from ._common import (_batch_out, _dims_exclude_batch, _first_live_ndim, _keeps_batch, _norm, _reshape_jacobian,
                      _shape, _with)


def _permute_jacobian(meta: Meta, slot: Slot, args: tuple) -> Jacobian:
    dims = [_norm(d, len(meta.out.shape)) for d in args[1]]
    inverse = [dims.index(i) for i in range(len(dims))]

    def adjoint(B: Tensor) -> Tensor:
        lead = B.dim() - len(dims)
        return B.permute(list(range(lead)) + [lead + i for i in inverse])

    return Selection(adjoint)


def _transpose_jacobian(meta: Meta, slot: Slot, args: tuple) -> Jacobian:
    n = len(meta.out.shape)
    a, b = _norm(args[1], n), _norm(args[2], n)
    return Selection(lambda B: B.transpose(B.dim() - n + a, B.dim() - n + b))


def _fold_of(meta: Meta) -> Optional[Tuple[int, ...]]:
    """A view ``[N, a, b, ..., d] -> [N a b..., d...]`` folding the batch into dim 0: the input shape, else None."""
    if (0,) in meta.folded or not meta.live:
        return None
    shp, out = _shape(slot_value(meta.args, meta.live[0])), _shape(meta.out)
    if not shp or shp[0] != meta.N or not out or out[0] == meta.N:
        return None
    for k in range(2, len(shp) + 1):
        if math.prod(shp[:k]) == out[0] and tuple(shp[k:]) == tuple(out[1:]):
            return shp
    return None


def _view_batch(meta: Meta) -> Optional[str]:
    if (0,) in meta.folded:  # unfolding: the batch comes back first
        out = _shape(meta.out)
        if not out or out[0] != meta.N:
            return f"keeps the batch folded into dimension 0 ({out}) for a further op"
        return None
    if _fold_of(meta) is not None:
        return None
    return _batch_out(meta)


def _view_jacobian(meta: Meta, slot: Slot, args: tuple) -> Jacobian:
    # the curvature at a folded value is kept with the batch first: a view is a reshape of those shapes
    return Reshape(meta.folded.get(slot) or _shape(slot_value(args, slot)))


for _name in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"):
    OP_RULES.register(_name, LinearOp(_view_batch, _view_jacobian, folds=_fold_of,
                                      doc="reshape keeping dim 0, or folding the batch into it for a matmul"))
for _name in ("aten.flatten.using_ints", "aten.unflatten.int"):
    OP_RULES.register(_name, LinearOp(_batch_out, _reshape_jacobian, doc="reshape keeping dim 0"))
for _name in ("aten.unsqueeze.default",):
    OP_RULES.register(_name, LinearOp(
        _with(lambda m: "inserts a dimension before the batch" if _norm(m.args[1], len(m.out.shape)) == 0 else None),
        _reshape_jacobian, doc="a new dimension after dim 0"))
for _name in ("aten.squeeze.dim", "aten.squeeze.dims"):
    OP_RULES.register(_name, LinearOp(
        _with(lambda m: _dims_exclude_batch(m.args[1], _first_live_ndim(m), "squeezes")),
        _reshape_jacobian, doc="squeeze, not dim 0"))
OP_RULES.register("aten.permute.default", LinearOp(
    _with(lambda m: "moves the batch dimension" if _norm(m.args[1][0], len(m.out.shape)) != 0 else None),
    _permute_jacobian, doc="permute keeping dim 0 first"))
OP_RULES.register("aten.transpose.int", LinearOp(
    _with(lambda m: "moves the batch dimension" if 0 in (_norm(m.args[1], len(m.out.shape)),
                                                          _norm(m.args[2], len(m.out.shape))) else None),
    _transpose_jacobian, doc="transpose of two dims other than 0"))
OP_RULES.register("aten.expand.default", LinearOp(
    _with(lambda m: None if _first_live_ndim(m) == len(m.out.shape) else "broadcasts over new leading dims"),
    broadcasts=True, doc="expand, keeping dim 0"))
OP_RULES.register("aten._to_copy.default", LinearOp(
    lambda m: _keeps_batch(m) or (None if m.out.is_floating_point() else "converts to a non-floating dtype"),
    doc="a copy, possibly to another floating dtype (.to())"))
for _name in ("aten.clone.default", "aten.alias.default", "aten.contiguous.default"):
    OP_RULES.register(_name, LinearOp(_keeps_batch, _reshape_jacobian, doc="a copy"))
OP_RULES.register("aten.slice.Tensor", LinearOp(
    _with(lambda m: "slices the batch dimension" if _norm(m.args[1] if len(m.args) > 1 else 0,
                                                           _first_live_ndim(m)) == 0 else None),
    doc="slice of a dim other than 0"))
OP_RULES.register("aten.select.int", LinearOp(
    _with(lambda m: "selects from the batch dimension" if _norm(m.args[1], _first_live_ndim(m)) == 0 else None),
    doc="select from a dim other than 0"))
OP_RULES.register("aten.cat.default", LinearOp(
    _with(lambda m: "concatenates along the batch dimension"
          if _norm(m.args[1] if len(m.args) > 1 else 0, len(m.out.shape)) == 0 else None),
    doc="concatenate along a dim other than 0"))


# -- several outputs of one input (each output node is bound on its own: see sweep._SPLITS) ----------


def _split_batch(meta: Meta) -> Optional[str]:
    dim = meta.args[2] if len(meta.args) > 2 else meta.kwargs.get("dim", 0)
    if (0,) in meta.folded:
        return "splits a value whose batch is folded into dimension 0"
    return _batch_out(meta) or ("splits the batch dimension" if _norm(dim, _first_live_ndim(meta)) == 0 else None)


for _name in ("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default"):
    OP_RULES.register(_name, LinearOp(_split_batch, doc="one output of a split along a dim other than 0"))
OP_RULES.register("aten.unbind.int", LinearOp(
    lambda m: _batch_out(m) or ("unbinds the batch dimension" if _norm(m.args[1] if len(m.args) > 1 else 0,
                                                                         _first_live_ndim(m)) == 0 else None),
    doc="one output of unbind along a dim other than 0"))

"""The one mechanism behind the GGN and both Fishers: ``J^T H_out J``.

Each of these curvatures is the pull-back of an operator ``H_out`` on the model
output through the model's Jacobian ``J``: the loss Hessian for the GGN
(Schraudolph 2002), sampled label-gradient outer products for the Monte-Carlo
Fisher, per-sample gradient outer products for the empirical Fisher. A curvature
module supplies ``H_out`` (a function of the model output at the primal point);
this module supplies the rest:

* ``J v`` without forward mode: the pull-back ``u -> J^T u`` is linear in ``u``,
  so the VJP of the pull-back is ``J`` (the "double-VJP" trick). Forward-mode
  rules are missing for some ops (``mkldnn_rnn_layer``: float32 ``nn.LSTM`` on CPU)
  and wrong for others; this path needs reverse mode only, and costs about what a
  ``jvp`` costs.
* One forward pass per call (per leaf for the diagonal blocks), reused by every
  chunk of probes, so randomness in the model (training-mode dropout) is drawn once
  and never inside the probe ``vmap``.

Its exact diagonal (:class:`~secorder.operators.factor_diagonal.FactorDiagonal`)
takes ``N K`` VJPs with the per-sample factor of ``H_out``
(:mod:`secorder.operators.output_factor`) instead of one product per parameter:
a curvature module that knows the factor passes ``factor=``; an output operator
that is itself an :class:`~secorder.operators.output_factor.OutputFactor` (the
Fishers' sampled or per-sample gradients) is its own factor.

The output operator is built once, from the output of the first linearisation, so
the Monte-Carlo Fisher's labels are drawn when the operator is made, before any
probe. Dynamo cannot yet trace a VJP of a VJP, so the transforms run these operators
eagerly under ``torch.compile`` (:func:`secorder.transforms._core.eager_under_compile`).
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch import Tensor
from torch.func import vjp

from .. import tree
from .base import LeafOperator
from ._linearize import LastLinearization, over_probes, restrict
from .factor_diagonal import FactorDiagonal
from .output_factor import OutputFactor

__all__ = ["gauss_newton_operator"]

OutputOperator = Callable[[Any], Any]


def gauss_newton_operator(
    problem: Any, output_operator: Callable[[Any], OutputOperator], *, psd: bool,
    factor: Optional[Callable[[Any], Optional[OutputFactor]]] = None,
) -> LeafOperator:
    """``J^T H_out J`` for the call's model, with ``H_out = output_operator(out)``.

    Args:
        problem: the call (:class:`secorder.problem.Problem`, split into model and loss).
        output_operator: maps the model output at the primal point to the linear map
            ``u -> H_out u`` on one output tangent (it is ``vmap``-ed over probes).
        psd: whether the result is known to be positive semi-definite.
        factor: maps the model output to the per-sample factor of ``H_out`` (or
            ``None``), built at the first diagonal; default: the output operator
            itself when it is an ``OutputFactor``, else no factor (one-hot columns).

    Returns:
        The :class:`~secorder.operators.base.LeafOperator`.
    """
    leaves = list(problem.leaves)

    def make(key: Any):
        fn, primal = restrict(problem.output_of_leaves, leaves, key)
        out, pullback = vjp(fn, primal)
        built: List[Callable] = []

        def transpose() -> Callable:
            """``v -> (J v,)``, the VJP of the pull-back: built at the first product (a diagonal never needs it)."""
            if not built:
                zeros = tree.tree_map(torch.zeros_like, out)
                built.append(vjp(lambda u: pullback(u)[0], zeros)[1])
            return built[0]

        return out, pullback, transpose

    lin = LastLinearization(make, leaves)
    h_out = output_operator(lin(None)[0])

    def product(key: Any) -> Callable[[Any], Any]:
        _, pullback, transpose = lin(key)
        jvp_of = transpose()  # outside the probe vmap
        return lambda v: pullback(h_out(jvp_of(v)[0]))[0]

    def matvec(V: List[Tensor]) -> List[Tensor]:
        return over_probes(product(None), list(V))

    def block_matvec(index: int, V: Tensor) -> Tensor:
        return over_probes(product(index), V)

    def output_factor() -> Optional[OutputFactor]:
        if factor is not None:
            return factor(lin(None)[0])
        return h_out if isinstance(h_out, OutputFactor) else None

    def linearization():
        out, pullback, _ = lin(None)
        return out, pullback

    diagonal = FactorDiagonal(problem, output_factor, linearization)
    return LeafOperator(templates=leaves, matvec=matvec, block_matvec=block_matvec, psd=psd, diagonal=diagonal,
                        probe_bytes=lin.probe_bytes)

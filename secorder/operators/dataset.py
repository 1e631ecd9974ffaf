"""The curvature of a data-set loss: per-batch operators summed over the batches (and ranks).

For ``F = so.dataset_loss(f, data)``, :func:`build` is what
:func:`secorder.operators.make_operator` returns: a
:class:`~secorder.operators.base.LeafOperator` whose batched matvec makes one pass
over the data, building the curvature operator of each batch (its own
:class:`~secorder.problem.Problem` for ``f(params, inputs, targets)``, any
registered curvature) and applying it to the whole probe block at once, so a
batch is visited once per block of probes and the memory is that of one batch
times the block. The batch results are weighted and summed, then summed over
the ranks with one all-reduce (:meth:`secorder.dataset.DatasetLoss.reduce`).
Estimators see an ordinary operator.

Example:
    >>> import torch, secorder as so
    >>> from secorder.problem import Problem
    >>> f = lambda w, x, y: ((x @ w - y) ** 2).mean()
    >>> x, y = torch.randn(5, 2), torch.randn(5)
    >>> F = so.dataset_loss(f, [(x[:3], y[:3]), (x[3:], y[3:])])
    >>> op = build("hessian", Problem(F, 0, False, (torch.zeros(2),)))
    >>> torch.allclose(op.matvec([torch.eye(2)])[0], 2 * x.T @ x / 5)
    True
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import Tensor

from ..dataset import Batch, DatasetLoss, check_call_arguments
from ..problem import Problem
from .base import LeafOperator

__all__ = ["build", "call_generator", "PSD_CURVATURES"]

#: Curvatures whose per-batch operators are positive semi-definite whatever the loss
#: (a sum of them with non-negative weights is too); the GGN is when its loss is convex.
PSD_CURVATURES = ("fisher", "empirical_fisher")


def _check_call(problem: Problem) -> None:
    if problem.has_aux:
        raise ValueError("has_aux=True: a data-set loss returns the loss alone, without auxiliary output")
    check_call_arguments(problem.args, problem.kwargs)


def _psd(curvature: str, f: Any) -> bool:
    if curvature in PSD_CURVATURES:
        return True
    if curvature == "ggn" and hasattr(f, "loss_fn"):
        from .ggn import _convex

        return _convex(f.loss_fn)
    return False


def build(curvature: str, problem: Problem, *, mc_samples: int = 1,
          generator: Optional[torch.Generator] = None) -> LeafOperator:
    """The ``curvature`` of a data-set loss ``problem.f`` at ``problem.args[0]``, summed over the batches.

    Args:
        curvature: a registered curvature name.
        problem: the call of ``F`` (``F(params)``).
        mc_samples: the Monte-Carlo Fisher's label draws per sample.
        generator: the call's generator (the Fisher's labels come from one seed drawn from it).

    Returns:
        The operator; each ``matvec``/``block_matvec`` is one pass over the data.
    """
    from . import check_curvature, make_operator

    F: DatasetLoss = problem.f
    _check_call(problem)
    entry = check_curvature(curvature)
    params = problem.args[0]
    templates = list(problem.leaves)
    device = templates[0].device
    call = F.prepare(params, f"curvature={curvature!r}", offsets=entry.sampled)
    labels = F.label_generators(generator, device)[0] if entry.sampled else None
    argnums = 0 if isinstance(problem.argnums, int) else (0,)

    def operator_of(batch: Batch) -> LeafOperator:
        p = Problem(F.f, argnums, False, (params, batch.inputs, batch.targets))
        return make_operator(curvature, p, mc_samples=mc_samples,
                             generator=labels(batch) if labels is not None else None)

    def matvec(V: List[Tensor]) -> List[Tensor]:
        V = list(V)
        what = f"{curvature} products, {V[0].shape[0]} probe(s)"
        return F.reduce(V, lambda b: operator_of(b).matvec(V), what, call=call)

    def block_matvec(index: int, V: Tensor) -> Tensor:
        what = f"{curvature} block {index}, {V.shape[0]} column(s)"
        return F.reduce([V], lambda b: [operator_of(b).block_matvec(index, V)], what, call=call)[0]

    psd = _psd(curvature, F.f) if entry.needs_split else False
    diagonal = _BatchDiagonals(F, templates, operator_of, curvature) if entry.needs_split else None
    return LeafOperator(templates=templates, matvec=matvec, block_matvec=block_matvec, psd=psd, diagonal=diagonal)


class _Declined(Exception):
    """A batch's operator has no exact diagonal of its own (the one-hot columns run instead)."""


class _BatchDiagonals:
    """The exact diagonal as the weighted sum of the batches' own diagonals (one pass), or ``None``.

    ``route`` collects the batches' routes (:class:`secorder.operators.factor_diagonal.FactorDiagonal`).
    """

    def __init__(self, F: DatasetLoss, templates: List[Tensor], operator_of: Any, curvature: str):
        self.F, self.templates, self.operator_of, self.curvature = F, templates, operator_of, curvature
        self.route: Optional[str] = None

    def __call__(self, chunk_size: Optional[int] = None) -> Optional[List[Tensor]]:
        routes: List[str] = []

        def contribute(batch: Batch) -> List[Tensor]:
            op = self.operator_of(batch)
            own = op.diagonal(chunk_size) if op.diagonal is not None else None
            route = getattr(op.diagonal, "route", None)
            if route is not None and route not in routes:
                routes.append(route)
            if own is None:
                raise _Declined(route or "no exact diagonal of its own")
            return list(own)

        try:
            result = self.F.reduce(self.templates, contribute, f"{self.curvature} exact diagonal",
                                   decline=(_Declined,))
        except _Declined as err:
            self.route = f"a batch declined ({err})"
            return None
        self.route = "per batch: " + " | ".join(routes) if routes else None
        return result


def call_generator(f: Any, generator: Optional[torch.Generator], device: torch.device) -> Optional[torch.Generator]:
    """The call's generator for ``f``: unchanged, except for a data-set loss with a process group.

    There it is made identical on every rank (a given generator takes rank 0's
    state; without one, a seed drawn on rank 0 and broadcast), so that every rank
    draws the same probes.

    Example:
        >>> call_generator(lambda x: x, None, torch.device("cpu")) is None
        True
    """
    if not isinstance(f, DatasetLoss):
        return generator
    return f.shared_generator(generator, device)

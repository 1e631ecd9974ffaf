"""Exact diagonal and trace from one-hot block matvecs, chunked.

The diagonal entry ``H[j, j]`` of leaf ``i`` is ``(H_ii e_j)[j]``. A one-hot column
of leaf ``i`` only needs the diagonal block ``H_ii``, so columns are evaluated
leaf by leaf through ``block_matvec``, ``chunk_size`` columns per batched call:
extra memory is about ``chunk_size`` times the leaf size (times whatever the
matvec itself keeps per probe), never the ``n x n`` Hessian. The trace sums each
chunk's diagonal as it goes and keeps no diagonal around.

Before the columns run, the first chunk is timed and the whole estimated: above a
threshold (one minute by default) a :class:`secorder.SlowPathWarning` says so and
names the alternatives, and a progress bar can follow the columns
(:mod:`secorder.slow_path`).

An operator with its own exact ``diagonal`` (see :class:`~secorder.operators.LeafOperator`)
is asked for it instead, and the results report ``num_matvecs = 0``; an own diagonal
that returns ``None`` declines (no factor for this call), and the one-hot columns run.
"""

from __future__ import annotations

import math
from typing import Iterator, List, Optional

import torch
from torch import Tensor

from ..operators import LeafOperator
from ..slow_path import ColumnMonitor
from ..results import STOP_NUM_SAMPLES, DiagonalEstimate, TraceEstimate
from . import registry

__all__ = ["exact_diagonal", "exact_trace", "exact_trace_by_leaf", "exact_trace_estimate",
           "exact_diagonal_estimate", "auto_chunk_size"]

# One-hot columns per batched block matvec: the probe batch holds at most about
# _AUTO_CHUNK_ENTRIES entries (16 MiB in float32), so large leaves stay bounded,
# and at most _MAX_AUTO_CHUNK columns, because every probe also carries batched
# copies of the model's intermediate activations, which the entry count cannot
# see; at least _MIN_AUTO_CHUNK so that the batched kernels stay efficient.
_AUTO_CHUNK_ENTRIES = 2**22
_MIN_AUTO_CHUNK = 32
_MAX_AUTO_CHUNK = 160


def auto_chunk_size(leaf_size: int) -> int:
    """Columns per batched matvec for a leaf of ``leaf_size`` entries.

    Example:
        >>> auto_chunk_size(10), auto_chunk_size(1280), auto_chunk_size(25088), auto_chunk_size(10**6)
        (10, 160, 160, 32)
    """
    by_entries = _AUTO_CHUNK_ENTRIES // max(leaf_size, 1)
    return max(1, min(leaf_size, _MAX_AUTO_CHUNK, max(_MIN_AUTO_CHUNK, by_entries)))


def _one_hot_rows(start: int, stop: int, template: Tensor) -> Tensor:
    """Rows ``start..stop-1`` of the identity on ``template``'s entries, shaped ``(k, *template.shape)``."""
    k, n = stop - start, template.numel()
    rows = torch.zeros(k, n, dtype=template.dtype, device=template.device)
    rows.view(-1)[torch.arange(k, device=template.device) * (n + 1) + start] = 1
    return rows.reshape((k,) + tuple(template.shape))


def _diagonal_chunks(op: LeafOperator, index: int, chunk_size: Optional[int],
                     monitor: Optional[ColumnMonitor] = None) -> Iterator[Tensor]:
    """Yield the diagonal of leaf ``index``'s block, ``chunk_size`` entries at a time."""
    template = op.templates[index]
    n = template.numel()
    step = chunk_size if chunk_size is not None else auto_chunk_size(n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        out = op.block_matvec(index, _one_hot_rows(start, stop, template))
        yield out.reshape(stop - start, n)[:, start:stop].diagonal()
        if monitor is not None:
            monitor.done(stop - start)


def _monitor(op: LeafOperator, what: str) -> ColumnMonitor:
    return ColumnMonitor(op.dim, what, op.templates[0].device if len(op.templates) else torch.device("cpu"))


def _own_diagonal(op: LeafOperator, chunk_size: Optional[int]) -> Optional[List[Tensor]]:
    """The operator's own exact diagonal, or ``None`` when it has none or declines."""
    if op.diagonal is None:
        return None
    own = op.diagonal(chunk_size)
    return None if own is None else list(own)


def exact_diagonal(op: LeafOperator, chunk_size: Optional[int] = None) -> List[Tensor]:
    """The exact diagonal of ``op``, one tensor per leaf, shaped like the leaf.

    Example:
        >>> import torch
        >>> from secorder.operators import hessian_operator
        >>> op = hessian_operator(lambda xs: (xs[0] ** 2 * xs[1]).sum(),
        ...                       [torch.tensor([1., 2.]), torch.tensor([3., 4.])])
        >>> exact_diagonal(op, chunk_size=1)
        [tensor([6., 8.]), tensor([0., 0.])]
    """
    return _exact_diagonal(op, chunk_size)[0]


def _exact_diagonal(op: LeafOperator, chunk_size: Optional[int]) -> tuple:
    """``(diagonal, products taken)``."""
    own = _own_diagonal(op, chunk_size)
    if own is not None:
        return own, 0
    out = []
    with _monitor(op, "diagonal") as monitor:
        for i, t in enumerate(op.templates):
            if t.numel() == 0:
                out.append(torch.zeros_like(t))
                continue
            out.append(torch.cat(list(_diagonal_chunks(op, i, chunk_size, monitor))).reshape(t.shape))
    return out, op.dim


def exact_trace(op: LeafOperator, chunk_size: Optional[int] = None) -> Tensor:
    """The exact trace of ``op`` as a 0-dim tensor, summed chunk by chunk.

    Example:
        >>> import torch
        >>> from secorder.operators import hessian_operator
        >>> op = hessian_operator(lambda xs: (xs[0] ** 4).sum() / 12, [torch.tensor([1., 2.])])
        >>> exact_trace(op)
        tensor(5.)
    """
    return _exact_trace_by_leaf(op, chunk_size)[0].sum()


def exact_trace_by_leaf(op: LeafOperator, chunk_size: Optional[int] = None) -> Tensor:
    """The trace of each leaf's diagonal block, as a 1-dim tensor (one entry per leaf).

    Example:
        >>> import torch
        >>> from secorder.operators import hessian_operator
        >>> op = hessian_operator(lambda xs: (xs[0] ** 2).sum() + 3 * (xs[1] ** 2).sum(),
        ...                       [torch.ones(2), torch.ones(1)])
        >>> exact_trace_by_leaf(op)
        tensor([4., 6.])
    """
    return _exact_trace_by_leaf(op, chunk_size)[0]


def _exact_trace_by_leaf(op: LeafOperator, chunk_size: Optional[int]) -> tuple:
    """``(per-leaf traces, products taken)``."""
    own = _own_diagonal(op, chunk_size)
    if own is not None:
        return torch.stack([d.sum() for d in own]), 0
    per_leaf = []
    with _monitor(op, "trace") as monitor:
        for i, t in enumerate(op.templates):
            total = torch.zeros((), dtype=t.dtype, device=t.device)
            for part in _diagonal_chunks(op, i, chunk_size, monitor):
                total = total + part.sum()
            per_leaf.append(total)
    return torch.stack(per_leaf), op.dim


def exact_trace_estimate(op: LeafOperator, chunk_size: Optional[int] = None) -> TraceEstimate:
    """The exact trace as a :class:`~secorder.results.TraceEstimate`: zero error, ``dof = inf``.

    Example:
        >>> import torch
        >>> op = LeafOperator([torch.zeros(2)], None, lambda i, V: 3 * V)
        >>> est = exact_trace_estimate(op)
        >>> est.value, est.stderr, int(est.num_matvecs), est.interval()
        (tensor(6.), tensor(0.), 2, (tensor(6.), tensor(6.)))
    """
    per_leaf, matvecs = _exact_trace_by_leaf(op, chunk_size)
    zero = torch.zeros_like(per_leaf)
    device = per_leaf.device
    return TraceEstimate(
        per_leaf.sum(), zero.sum(), torch.tensor(matvecs, device=device), per_leaf, zero,
        torch.tensor(STOP_NUM_SAMPLES, device=device), torch.tensor(math.inf, dtype=per_leaf.dtype, device=device),
    )


def exact_diagonal_estimate(op: LeafOperator, chunk_size: Optional[int] = None) -> DiagonalEstimate:
    """The exact diagonal as a :class:`~secorder.results.DiagonalEstimate`: zero error, ``dof = inf``.

    Example:
        >>> import torch
        >>> op = LeafOperator([torch.zeros(2)], None, lambda i, V: 3 * V)
        >>> exact_diagonal_estimate(op).value
        [tensor([3., 3.])]
    """
    value, matvecs = _exact_diagonal(op, chunk_size)
    device = value[0].device
    return DiagonalEstimate(
        value, [torch.zeros_like(v) for v in value], torch.tensor(matvecs, device=device),
        torch.tensor(STOP_NUM_SAMPLES, device=device), torch.tensor(math.inf, dtype=value[0].dtype, device=device),
    )


registry.register(registry.Estimator(
    name="exact", quantity="trace", fn=exact_trace_estimate,
    error_bar="none (exact up to rounding)", citation="",
    summary="one-hot block products, chunk_size columns at a time (or the structured engine)",
))
registry.register(registry.Estimator(
    name="exact", quantity="diagonal", fn=exact_diagonal_estimate,
    error_bar="none (exact up to rounding)", citation="",
    summary="one-hot block products, chunk_size columns at a time (or the structured engine)",
))

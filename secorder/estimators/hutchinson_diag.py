"""Hutchinson-type estimator of the diagonal (Bekas, Kokiopoulou and Saad 2007).

For probes ``v`` with ``E[v v^T] = I``, ``v * (A v)`` (entrywise) is an unbiased
sample of ``diag(A)``: ``E[v_j (A v)_j] = sum_k A_jk E[v_j v_k] = A_jj``. The
estimate is the mean of ``N`` samples and each entry's standard error is its
sample standard deviation over ``sqrt(N)``. With Rademacher probes this is the
estimator of Bekas et al. (their normalisation by ``sum v * v`` is 1 entrywise);
for other distributions we keep the plain mean, which stays unbiased.

Memory is bounded by the chunk: running means and sums of squared deviations
are merged chunk by chunk (Chan, Golub and LeVeque's pairwise update), so no
``n x num_samples`` matrix is ever held.

Reference:
    Bekas, C., Kokiopoulou, E., & Saad, Y. (2007). An estimator for the diagonal of
    a matrix. Applied Numerical Mathematics 57(11-12).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ..operators import LeafOperator
from ..results import DiagonalEstimate
from . import _common, registry
from .probes import Sampler

__all__ = ["hutchinson_diagonal"]

_State = Optional[Tuple[int, List[Tensor], List[Tensor]]]  # count, means, sums of squared deviations


def _merge(state: _State, samples: List[Tensor]) -> _State:
    k = samples[0].shape[0]
    means = [s.mean(dim=0) for s in samples]
    m2 = [((s - m) ** 2).sum(dim=0) for s, m in zip(samples, means)]
    if state is None:
        return k, means, m2
    n, old_means, old_m2 = state
    total = n + k
    deltas = [m - o for m, o in zip(means, old_means)]
    new_means = [o + d * (k / total) for o, d in zip(old_means, deltas)]
    new_m2 = [a + b + d * d * (n * k / total) for a, b, d in zip(old_m2, m2, deltas)]
    return total, new_means, new_m2


def _stderr(state: Tuple[int, List[Tensor], List[Tensor]]) -> List[Tensor]:
    n, means, m2 = state
    if n < 2:
        return [torch.full_like(m, math.nan) for m in means]
    return [(s / (n - 1)).sqrt() / math.sqrt(n) for s in m2]


def hutchinson_diagonal(
    op: LeafOperator,
    num_samples: int = 100,
    *,
    distribution: str = "rademacher",
    generator: Optional[torch.Generator] = None,
    sampler: Optional[Sampler] = None,
    density: float = 0.1,
    chunk_size: Optional[int] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    max_matvecs: Optional[int] = None,
) -> DiagonalEstimate:
    """Estimate ``diag(op)`` (one tensor per leaf) with entrywise standard errors.

    Options as in :func:`secorder.estimators.hutchinson.hutchinson_trace`; the
    adaptive tolerance is on the worst entry: sampling stops once
    ``max stderr <= max(atol, rtol * max |value|)``.

    Example:
        >>> import torch
        >>> from secorder.operators import LeafOperator
        >>> A = torch.tensor([[2., 0.], [0., 5.]])
        >>> op = LeafOperator([torch.zeros(2)], lambda V: [V[0] @ A], None)
        >>> est = hutchinson_diagonal(op, 4, generator=torch.Generator().manual_seed(0))
        >>> est.value, est.stderr, est.num_matvecs
        ([tensor([2., 5.])], [tensor([0., 0.])], tensor(4))
    """
    registry.check_num_samples(registry.get("hutchinson", "diagonal"), num_samples)
    adaptive = _common.check_tolerances(rtol, atol, max_matvecs)
    draw_probes = _common.resolve_sampler(op, sampler, distribution, generator, density)
    chunk = _common.probe_chunk(op, chunk_size)
    op = _common.bounded_operator(op, chunk_size)

    def step(state: _State, k: int) -> _State:
        V = draw_probes(k)
        return _merge(state, [v * hv for v, hv in zip(V, op.matvec(V))])

    def error(state) -> Tuple[Tensor, Tensor]:
        worst = torch.stack([s.max() for s in _stderr(state)]).max()
        scale = torch.stack([m.abs().max() for m in state[1]]).max()
        return worst, scale

    state, drawn, stop = _common.sample_loop(step, None, num_samples, chunk, adaptive, rtol, atol, max_matvecs, error)
    device = op.templates[0].device
    means = [m.reshape(t.shape).to(t.dtype) for m, t in zip(state[1], op.templates)]
    errs = [e.reshape(t.shape).to(t.dtype) for e, t in zip(_stderr(state), op.templates)]
    return DiagonalEstimate(
        value=means,
        stderr=errs,
        num_matvecs=torch.tensor(drawn, dtype=torch.int64, device=device),
        stop=torch.tensor(stop, dtype=torch.int64, device=device),
        dof=torch.tensor(float(drawn - 1), dtype=_common.dtype_of(op), device=device),
    )


registry.register(registry.Estimator(
    name="hutchinson", quantity="diagonal", fn=hutchinson_diagonal, default_samples=100, min_samples=1,
    adaptive=True,
    error_bar="entrywise sample standard error; Student t with num_samples - 1 dof",
    citation="Bekas, Kokiopoulou and Saad 2007",
    summary="mean of v * (A v) over random probes",
))

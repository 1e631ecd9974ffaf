"""Hutchinson's trace estimator with a sample-variance error bar and a per-leaf breakdown.

For probes ``v`` with ``E[v v^T] = I``, ``v^T A v`` is an unbiased sample of
``tr(A)``; the estimate is the mean of ``N`` such samples and its standard error
is the sample standard deviation over ``sqrt(N)``. Restricting the inner product
to one leaf's entries, ``v_L^T (A v)_L``, is an unbiased sample of the trace of
that leaf's diagonal block, so the per-leaf traces come from the same probes at
no extra matvec.

References:
    Girard, D. A. (1989). A fast "Monte-Carlo cross-validation" procedure for large
    least squares problems with noisy data. Numerische Mathematik 56.
    Hutchinson, M. F. (1989). A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines. Communications in Statistics, Simulation
    and Computation 18(3).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..operators import LeafOperator
from ..results import TraceEstimate
from . import _common, registry
from .probes import Sampler

__all__ = ["hutchinson_trace"]


def hutchinson_trace(
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
) -> TraceEstimate:
    """Hutchinson's estimate of ``tr(op)``, with standard error, matvec count and per-leaf traces.

    Args:
        op: the symmetric operator.
        num_samples: number of probes (one matvec each). With a tolerance, the number
            drawn before the first check.
        distribution: ``"rademacher"`` (default), ``"normal"``, ``"sphere"`` or
            ``"sparse"`` (see :mod:`secorder.estimators.probes`); ``density`` is the
            fraction of non-zeros of ``"sparse"`` probes.
        generator: source of randomness (``None``: the global RNG).
        sampler: ``k -> probe batch``, replaces ``distribution``/``generator``.
        chunk_size: probes per vmapped matvec (``None``: automatic, and an operator
            that knows its intermediates' size has each chunk split to bound them);
            memory is bounded by the chunk, never by ``num_samples``.
        rtol, atol: adaptive stopping: after ``num_samples`` probes, draw chunks of
            ``chunk_size`` until ``stderr <= max(atol, rtol * |value|)`` or
            ``max_matvecs`` probes are spent (``stop`` says which). Reads the error
            back to the host once per chunk, so it does not run under ``vmap``.
        max_matvecs: the matvec budget, required with a tolerance.

    Example:
        >>> import torch
        >>> from secorder.operators import LeafOperator
        >>> A = torch.diag(torch.tensor([1., 2., 3., 4.]))
        >>> op = LeafOperator([torch.zeros(2), torch.zeros(2)],
        ...                   lambda V: [(torch.cat(V, 1) @ A)[:, :2], (torch.cat(V, 1) @ A)[:, 2:]],
        ...                   None)
        >>> est = hutchinson_trace(op, 8, generator=torch.Generator().manual_seed(0))
        >>> est.value, est.stderr, est.per_leaf   # diagonal A: Rademacher probes are exact
        (tensor(10.), tensor(0.), tensor([3., 7.]))
    """
    registry.check_num_samples(registry.get("hutchinson", "trace"), num_samples)
    adaptive = _common.check_tolerances(rtol, atol, max_matvecs)
    draw_probes = _common.resolve_sampler(op, sampler, distribution, generator, density)
    chunk = _common.probe_chunk(op, chunk_size)
    op = _common.bounded_operator(op, chunk_size)
    dtype = _common.dtype_of(op)

    def step(samples: Optional[torch.Tensor], k: int) -> torch.Tensor:
        V = draw_probes(k)
        new = _common.leaf_products(V, op.matvec(V), dtype)
        return new if samples is None else torch.cat([samples, new], dim=-1)

    def error(samples: torch.Tensor):
        totals = samples.sum(dim=0)
        return _common.std_error(totals), totals.mean().abs()

    samples, drawn, stop = _common.sample_loop(step, None, num_samples, chunk, adaptive, rtol, atol, max_matvecs, error)
    return TraceEstimate.from_samples(samples, num_matvecs=drawn, stop=stop)


registry.register(registry.Estimator(
    name="hutchinson", quantity="trace", fn=hutchinson_trace, default_samples=100, min_samples=1, adaptive=True,
    error_bar="sample standard error of the probes' v^T A v; Student t with num_samples - 1 dof",
    citation="Girard 1989; Hutchinson 1989",
    summary="mean of v^T A v over random probes; any symmetric operator",
))

"""Hutch++: Hutchinson's estimator with a low-rank deflation (Meyer, Musco, Musco, Woodruff 2021).

With ``num_samples = 3 s + extra`` matvecs: sketch ``Y = A S`` with ``s`` random
probes, take an orthonormal basis ``Q`` of its range (``P = Q Q^T``), spend ``s``
more matvecs on ``Z = A Q``, and the remaining ``r = num_samples - 2 s`` on
Hutchinson's estimator of the deflated part:

    tr(A) = tr(Q^T A Q) + tr((I - P) A (I - P)),
    tr((I - P) A (I - P)) ~ mean_j  g_j^T (I - P) A (I - P) g_j.

The first term is exact given ``Q``; the error bar is the sample standard error
of the second (so it is conditional on the sketch, which is what the estimate's
error is). A spectrum concentrated in its top ``s`` eigenvalues leaves little to
estimate.

Per-leaf traces use the symmetric split
``A = PAP + PA(I-P) + (I-P)AP + (I-P)A(I-P)``: the block diagonal of the first
three terms is known exactly from ``Q`` and ``Z`` (per leaf ``L``, with
``H = Q^T Z``: ``2 tr(Q_L^T Z_L) - tr(H Q_L^T Q_L)``), the last is sampled with the
same probes (``u = (I-P) g``: ``sum_L u * (I-P) A u``). The leaf sums add up to the
estimator above.

Reference:
    Meyer, R. A., Musco, C., Musco, C., & Woodruff, D. P. (2021). Hutch++: Optimal
    stochastic trace estimation. Symposium on Simplicity in Algorithms (SOSA).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..operators import LeafOperator
from ..results import TraceEstimate
from . import _common, registry
from .probes import Sampler

__all__ = ["hutchpp_trace"]


def hutchpp_trace(
    op: LeafOperator,
    num_samples: int = 99,
    *,
    distribution: str = "normal",
    generator: Optional[torch.Generator] = None,
    sampler: Optional[Sampler] = None,
    density: float = 0.1,
    chunk_size: Optional[int] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    max_matvecs: Optional[int] = None,
) -> TraceEstimate:
    """Hutch++ estimate of ``tr(op)``, with standard error, matvec count and per-leaf traces.

    ``num_samples`` is the number of matvecs (at least 3): ``num_samples // 3`` for
    the sketch, as many for ``A Q``, the rest (at least a third) for the deflated
    Hutchinson part. With ``rtol``/``atol`` the deflated part keeps drawing chunks
    until its standard error meets the tolerance or ``max_matvecs`` (all matvecs,
    sketch included) are spent. Other options as in
    :func:`secorder.estimators.hutchinson.hutchinson_trace`, except that the probes
    are normal by default: with Rademacher (or sphere) probes on an operator close to
    a multiple of the identity the deflated terms ``g^T (I - P) A (I - P) g`` vary only
    through ``|P g|^2``, a skewed (for Rademacher, discrete) quantity whose sample
    spread over a few probes is too small, and the 95% interval covered 0.72 on
    ``2 I`` (``n = 10``, 4-5 matvecs); normal probes add the near-Gaussian chi-square
    spread of ``|g|^2`` and covered 0.91-0.97 at every budget measured
    (``benchmarks/coverage_intervals.py``).

    Example:
        >>> import torch
        >>> from secorder.operators import LeafOperator
        >>> B = torch.randn(10, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> A = B @ B.T                                    # rank 2
        >>> op = LeafOperator([torch.zeros(10, dtype=torch.float64)], lambda V: [V[0] @ A], None)
        >>> est = hutchpp_trace(op, 9, generator=torch.Generator().manual_seed(1))
        >>> torch.allclose(est.value, A.trace()), bool(est.stderr < 1e-10), int(est.num_matvecs)
        (True, True, 9)
    """
    registry.check_num_samples(registry.get("hutch++", "trace"), num_samples)
    adaptive = _common.check_tolerances(rtol, atol, max_matvecs)
    if adaptive and max_matvecs < num_samples:
        raise ValueError(f"max_matvecs={max_matvecs} is below the initial num_samples={num_samples}")
    draw_probes = _common.resolve_sampler(op, sampler, distribution, generator, density)
    chunk = _common.probe_chunk(op, chunk_size)
    op = _common.bounded_operator(op, chunk_size)
    dtype = _common.dtype_of(op)
    sizes = op.sizes

    sketch = min(num_samples // 3, op.dim)
    S = _common.to_matrix(draw_probes(sketch), dtype)
    Q = torch.linalg.qr(_common.apply_matrix(op, S, chunk)).Q
    Z = _common.apply_matrix(op, Q, chunk)
    H = Q.T @ Z
    exact_part = 2 * _common.leaf_row_sums(Q * Z, sizes).sum(dim=1) - _common.leaf_row_sums(Q * (Q @ H), sizes).sum(dim=1)
    spent = sketch + Q.shape[1]

    def deflate(M: torch.Tensor) -> torch.Tensor:
        return M - Q @ (Q.T @ M)

    def step(samples: Optional[torch.Tensor], k: int) -> torch.Tensor:
        U = deflate(_common.to_matrix(draw_probes(k), dtype))
        new = _common.leaf_row_sums(U * deflate(_common.apply_matrix(op, U, chunk)), sizes)
        return new if samples is None else torch.cat([samples, new], dim=-1)

    def error(samples: torch.Tensor):
        totals = samples.sum(dim=0)
        return _common.std_error(totals), (totals.mean() + exact_part.sum()).abs()

    budget = None if max_matvecs is None else max_matvecs - spent
    samples, drawn, stop = _common.sample_loop(
        step, None, num_samples - 2 * sketch, chunk, adaptive, rtol, atol, budget, error
    )
    est = TraceEstimate.from_samples(samples, offset=exact_part, num_matvecs=spent + drawn, stop=stop)
    if sketch == op.dim:
        est = _rounding_error_bar(est, Q, Z, H, sizes)
    return est


def _rounding_error_bar(est: TraceEstimate, Q: torch.Tensor, Z: torch.Tensor, H: torch.Tensor, sizes) -> TraceEstimate:
    """The error bar of a sketch that spans the whole space (``num_samples >= 3 n``): rounding, not sampling.

    ``Q`` is then a basis of everything, the deflated samples are rounding noise
    (their spread, near 0, is no error bar: the interval missed the exact trace by
    rounding in about half the runs on ``2 I``), and the trace is the exact part. Its
    error is bounded by the summation bound ``n eps sum |terms|`` of the exact
    part's sums, per leaf, which replaces a smaller sample spread.
    """
    eps = torch.finfo(Z.dtype).eps
    terms = 2 * _common.leaf_row_sums((Q * Z).abs(), sizes).sum(dim=1) + _common.leaf_row_sums(
        (Q * (Q @ H)).abs(), sizes).sum(dim=1)
    bound = Q.shape[0] * eps * terms
    return est._replace(stderr=torch.maximum(est.stderr, bound.sum()),
                        per_leaf_stderr=torch.maximum(est.per_leaf_stderr, bound))


registry.register(registry.Estimator(
    name="hutch++", quantity="trace", fn=hutchpp_trace, default_samples=99, min_samples=3, adaptive=True,
    default_distribution="normal",
    error_bar="sample standard error of the deflated Hutchinson part (given the sketch); Student t with "
              "r - 1 dof for its r = num_samples - 2 (num_samples // 3) probes (infinite interval when r = 1)",
    citation="Meyer, Musco, Musco and Woodruff 2021",
    summary="exact trace of a low-rank sketch plus Hutchinson on the rest; a third each",
))

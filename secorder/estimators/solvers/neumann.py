"""The truncated Neumann series (LiSSA's recursion), batched over right-hand sides.

``A^-1 = (1/s) sum_i (I - A/s)^i`` for a symmetric ``A`` whose eigenvalues lie in
``(0, 2s)``. Its partial sums are Richardson's iteration with step ``1/s``:
``x_{j+1} = x_j + r_j / s``, ``r_{j+1} = r_j - A r_j / s``, one batched matvec per
iteration and the residual for free. This is the recursion of LiSSA (Agarwal,
Bullins and Hazan 2017) with the full curvature in every step (over
:func:`secorder.dataset_loss`, one pass over the data per iteration), as Koh and
Liang (2017) use it for influence functions: their ``scale`` is ``s`` and their
``damping`` is the ``damping`` of :func:`secorder.solve` (``A = C + damping I``).

``scale``: the series converges when ``s > lambda_max / 2``, and its error falls
like ``max(|1 - lambda_min / s|, |1 - lambda_max / s|)^j``: at best (``s`` midway
between the extreme eigenvalues) like ``((kappa - 1) / (kappa + 1))^j``, against
CG's ``((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^j``. ``scale=None`` (default)
estimates ``lambda_max`` by 20 Lanczos steps from a random start (drawn with the
solve's ``seed``/``generator``; counted in ``num_matvecs``) and takes ``s = 1.1
lambda_max``, a safe margin over an estimate from below (rate about
``1 - 1 / (1.1 kappa)``).

Divergence (a ``scale`` too small, or an operator with a negative eigenvalue) makes
the residual grow: at ten times the smallest residual seen the solve raises
:class:`~secorder.estimators.solvers._common.DivergenceError` instead of returning
a meaningless ``x``.

References:
    Agarwal, N., Bullins, B., Hazan, E. (2017). Second-order stochastic optimization
    for machine learning in linear time. JMLR 18(116).
    Koh, P. W., Liang, P. (2017). Understanding black-box predictions via influence
    functions. ICML.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor

from ..lanczos import Krylov
from ._common import DivergenceError, col_norm, host_all, host_any, safe_div
from .registry import Iterate, Solver, register

__all__ = ["neumann", "estimate_scale", "SCALE_STEPS", "SCALE_MARGIN"]

#: Lanczos steps of the default scale estimate, and the margin above its largest Ritz value.
SCALE_STEPS = 20
SCALE_MARGIN = 1.1
#: The residual may grow to this many times the smallest seen before the series counts as diverging.
DIVERGENCE_FACTOR = 10.0


def estimate_scale(matvec: Callable[[Tensor], Tensor], like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """``SCALE_MARGIN`` times the largest Ritz value of ``min(SCALE_STEPS, n)`` Lanczos steps, a 0-dim tensor.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1., 6., dtype=torch.float64))
        >>> g = torch.Generator().manual_seed(0)
        >>> round(float(estimate_scale(lambda X: X @ A, torch.zeros(1, 5, dtype=torch.float64), g)), 10)
        5.5
    """
    n = like.shape[1]
    steps = min(SCALE_STEPS, n)
    start = torch.randn(1, n, generator=generator, dtype=like.dtype, device=like.device)
    spare = torch.randn(1, n, generator=generator, dtype=like.dtype, device=like.device)
    krylov = Krylov(matvec, start, steps, spare)
    krylov.extend(steps)
    theta = torch.linalg.eigvalsh(krylov.projected())[0, -1]
    return SCALE_MARGIN * theta


def neumann(
    matvec: Callable[[Tensor], Tensor],
    B: Tensor,
    *,
    tol: float,
    max_iterations: int,
    precondition: Optional[Callable[[Tensor], Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callable[[int, Tensor], None]] = None,
    scale: Optional[float] = None,
) -> Iterate:
    """Solve ``A X = B`` (rows) by the truncated Neumann series ``(1/s) sum_i (I - A/s)^i b``.

    Args:
        matvec: ``A`` on ``(k, n)`` matrices, symmetric with eigenvalues in ``(0, 2 scale)``.
        B: ``(k, n)`` right-hand sides.
        tol: stop a column when ``||r|| / ||b|| <= tol``.
        max_iterations: the budget of batched matvecs (the number of series terms).
        precondition: not supported (``None``).
        generator: draws the start of the scale estimate (``scale=None``).
        callback: ``callback(iteration, relative_residuals)`` after every iteration.
        scale: ``s``; ``None`` estimates it (see the module docstring).

    Returns:
        An :class:`~secorder.estimators.solvers.registry.Iterate`.

    Raises:
        DivergenceError: the residual grew tenfold over its smallest value.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2., 0.5], [0.5, 1.]], dtype=torch.float64)
        >>> out = neumann(lambda X: X @ A, torch.tensor([[1., 1.]], dtype=torch.float64), tol=1e-10,
        ...               max_iterations=200, scale=2.5)
        >>> torch.allclose(out.x, torch.linalg.solve(A, torch.ones(2, dtype=torch.float64))[None])
        True
    """
    if precondition is not None:
        raise ValueError("method='neumann' takes no preconditioner; use method='cg' or 'minres' with one")
    s = estimate_scale(matvec, B, generator) if scale is None else torch.as_tensor(scale, dtype=B.dtype,
                                                                                      device=B.device)
    if scale is None and not host_all(s > 0):
        raise ValueError(
            f"method='neumann': the largest eigenvalue of the operator is estimated at {float(s) / SCALE_MARGIN:.3g} "
            "<= 0, so the Neumann series cannot converge; add damping, or use method='minres'")
    bnorm = col_norm(B)
    X = torch.zeros_like(B)
    R = B.clone()
    residual = safe_div(bnorm, bnorm)
    best = residual
    done = residual <= tol
    iterations = torch.zeros(B.shape[0], dtype=torch.int64, device=B.device)
    for j in range(max_iterations):
        if host_all(done):
            break
        active = ~done
        AR = matvec(torch.where(active[:, None], R, torch.zeros_like(R)))
        X = torch.where(active[:, None], X + R / s, X)
        R = torch.where(active[:, None], R - AR / s, R)
        residual = torch.where(active, safe_div(col_norm(R), bnorm), residual)
        iterations = iterations + active.to(iterations.dtype)
        diverging = active & ~(residual <= DIVERGENCE_FACTOR * best)  # also catches nan/inf
        if host_any(diverging):
            column = int(torch.nonzero(diverging)[0, 0])
            raise DivergenceError(
                f"method='neumann' diverged: the relative residual of right-hand side {column} grew to "
                f"{float(residual[column]):.3g} at iteration {j + 1} (smallest {float(best[column]):.3g}) with "
                f"scale={float(s):.4g}; the series converges only when every eigenvalue of the damped curvature lies "
                "in (0, 2 scale): pass a larger scale, add damping (an indefinite curvature such as the Hessian), "
                "or use method='cg' / 'minres'")
        best = torch.minimum(best, residual)
        if callback is not None:
            callback(j + 1, residual)
        done = done | (residual <= tol)
    return Iterate(X, iterations)


def _check(options: Dict[str, Any]) -> None:
    scale = options["scale"]
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float > 0 or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite float > 0 or None, got {scale}")


register(Solver(
    name="neumann",
    fn=neumann,
    options={"scale": None},
    check=_check,
    default_iterations=lambda n: 10 * n,
    operators="symmetric with eigenvalues in (0, 2 scale): damped PSD curvatures",
    psd_only=True,
    converges="when every eigenvalue lies in (0, 2 scale); error falls like (1 - lambda_min / scale)^j",
    cost="one batched matvec, O(k n) vector work; scale=None adds 20 Lanczos matvecs",
    citation="Agarwal, Bullins and Hazan (2017), LiSSA; Koh and Liang (2017)",
    summary="truncated Neumann series (LiSSA's recursion) with its scale",
))

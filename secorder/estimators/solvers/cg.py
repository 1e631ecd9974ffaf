"""Conjugate gradients, batched over right-hand sides, with negative-curvature detection.

Hestenes and Stiefel's method for a symmetric positive definite ``A`` (a damped
GGN, Fisher or empirical Fisher; any PSD curvature with ``damping > 0``), with an
optional symmetric positive definite preconditioner ``M`` (preconditioned CG,
Golub and Van Loan 2013, algorithm 11.5.1). All ``k`` right-hand sides advance
together, one batched matvec per iteration; each has its own step sizes, and a
column is frozen once its residual ``||r|| / ||b||`` reaches ``tol``.

Indefinite operators. CG needs ``p^T A p > 0`` along every search direction ``p``.
A direction with ``p^T A p / p^T p <= 100 eps max_j |p_j^T A p_j / p_j^T p_j|``
(negative curvature, or curvature indistinguishable from zero at the working
precision) means the operator is indefinite or singular along the Krylov space;
the step would be meaningless, so CG raises
:class:`~secorder.estimators.solvers._common.IndefiniteOperatorError` (suggesting
``method="minres"`` or damping) instead of returning a wrong ``x``.

Convergence: in at most ``n`` iterations in exact arithmetic; the error in the
``A``-norm falls at least like ``2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^j`` for
condition number ``kappa`` (of ``M^-1 A`` when preconditioned).

References:
    Hestenes, M. R., Stiefel, E. (1952). Methods of conjugate gradients for solving
    linear systems. J. Res. Nat. Bur. Standards 49(6).
    Golub, G. H., Van Loan, C. F. (2013). Matrix Computations, 4th ed., section 11.3-11.5.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ._common import IndefiniteOperatorError, col_norm, dot, host_all, host_any, safe_div
from .registry import Iterate, Solver, register

__all__ = ["conjugate_gradients"]

#: Curvature along a search direction at most this many machine epsilons of the
#: largest seen (relative) is treated as zero or negative.
CURVATURE_FACTOR = 100.0


def conjugate_gradients(
    matvec: Callable[[Tensor], Tensor],
    B: Tensor,
    *,
    tol: float,
    max_iterations: int,
    precondition: Optional[Callable[[Tensor], Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callable[[int, Tensor], None]] = None,
) -> Iterate:
    """Solve ``A X = B`` (rows) by (preconditioned) conjugate gradients.

    Args:
        matvec: ``A`` on ``(k, n)`` matrices, symmetric positive definite.
        B: ``(k, n)`` right-hand sides.
        tol: stop a column when ``||r|| / ||b|| <= tol``.
        max_iterations: the budget of batched matvecs.
        precondition: ``M^-1`` on ``(k, n)``, symmetric positive definite.
        generator: unused (CG draws nothing).
        callback: ``callback(iteration, relative_residuals)`` after every iteration.

    Returns:
        An :class:`~secorder.estimators.solvers.registry.Iterate`.

    Raises:
        IndefiniteOperatorError: a search direction of negative or zero curvature.

    Example:
        >>> import torch
        >>> A = torch.tensor([[4., 1.], [1., 3.]], dtype=torch.float64)
        >>> out = conjugate_gradients(lambda X: X @ A, torch.eye(2, dtype=torch.float64), tol=1e-12, max_iterations=5)
        >>> torch.allclose(out.x, torch.linalg.inv(A)), out.iterations
        (True, tensor([2, 2]))
        >>> conjugate_gradients(lambda X: X @ torch.diag(torch.tensor([1., -1.])), torch.tensor([[1., 2.]]),
        ...                     tol=1e-6, max_iterations=5)
        Traceback (most recent call last):
        ...
        secorder.estimators.solvers._common.IndefiniteOperatorError: conjugate gradients met negative curvature along a search direction (p^T A p / p^T p = -0.6 at iteration 1 of right-hand side 0, largest seen 0.6): the operator (curvature plus damping) is not positive definite; use method='minres' for a symmetric indefinite curvature such as the Hessian, or add damping larger than its most negative eigenvalue
    """
    precondition = precondition if precondition is not None else (lambda R: R)
    eps = torch.finfo(B.dtype).eps
    bnorm = col_norm(B)
    X = torch.zeros_like(B)
    R = B.clone()
    Z = precondition(R)
    P = Z
    rz = dot(R, Z)
    residual = safe_div(bnorm, bnorm)  # 1, or 0 for a zero right-hand side
    done = residual <= tol
    iterations = torch.zeros(B.shape[0], dtype=torch.int64, device=B.device)
    scale = torch.zeros_like(bnorm)  # the largest |p^T A p| / p^T p seen, per column
    for j in range(max_iterations):
        if host_all(done):
            break
        active = ~done
        AP = matvec(torch.where(active[:, None], P, torch.zeros_like(P)))
        pAp, pp = dot(P, AP), dot(P, P)
        curvature = safe_div(pAp, pp)
        scale = torch.maximum(scale, curvature.abs())
        bad = active & (pp > 0) & (curvature <= CURVATURE_FACTOR * eps * scale)
        alpha = safe_div(rz, pAp, active & ~bad)
        X = torch.addcmul(X, alpha[:, None], P)
        R = torch.addcmul(R, alpha[:, None], AP, value=-1)
        residual = torch.where(active, safe_div(col_norm(R), bnorm), residual)
        iterations = iterations + active.to(iterations.dtype)
        if host_any(bad):
            raise _indefinite(bad, curvature, scale, iterations)
        if callback is not None:
            callback(j + 1, residual)
        done = done | (residual <= tol)
        Z = precondition(R)
        rz_new = dot(R, Z)
        beta = safe_div(rz_new, rz, active)
        P = torch.where(active[:, None], torch.addcmul(Z, beta[:, None], P), P)
        rz = torch.where(active, rz_new, rz)
    return Iterate(X, iterations)


def _indefinite(bad: Tensor, curvature: Tensor, scale: Tensor, iterations: Tensor) -> IndefiniteOperatorError:
    column = int(torch.nonzero(bad)[0, 0])
    q, s = float(curvature[column]), float(scale[column])
    kind = "negative" if q < 0 else "zero (at the working precision)"
    return IndefiniteOperatorError(
        f"conjugate gradients met {kind} curvature along a search direction (p^T A p / p^T p = {q:.3g} at "
        f"iteration {int(iterations[column])} of right-hand side {column}, largest seen {s:.3g}): the operator "
        "(curvature plus damping) is not positive definite; use method='minres' for a symmetric indefinite "
        "curvature such as the Hessian, or add damping larger than its most negative eigenvalue"
    )


register(Solver(
    name="cg",
    fn=conjugate_gradients,
    default_iterations=lambda n: 10 * n,
    operators="symmetric positive definite: PSD curvatures (GGN, Fishers) with damping > 0, or positive definite ones",
    psd_only=True,
    converges="at most n iterations in exact arithmetic; error falls like ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^j",
    cost="one batched matvec, one preconditioner application, O(k n) vector work",
    citation="Hestenes and Stiefel (1952)",
    summary="conjugate gradients; raises on negative curvature along a search direction",
))

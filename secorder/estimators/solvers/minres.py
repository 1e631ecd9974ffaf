"""MINRES for symmetric (possibly indefinite or singular) operators, batched over right-hand sides.

Paige and Saunders' minimum-residual method: at iteration ``j`` the iterate
minimises ``||b - A x||`` over the Krylov space ``K_j(A, b)``, through the Lanczos
recurrence and Givens rotations of its tridiagonal matrix (short recurrences,
eight vectors per right-hand side). It needs only symmetry, so it solves with
the Hessian itself, not only damped PSD curvatures. With a symmetric positive
definite preconditioner ``M`` it runs on ``M^-1 A`` in the ``M``-inner product, and
the residual it tracks (and stops on) is ``||r||_{M^-1} / ||b||_{M^-1}``; the
:class:`~secorder.estimators.solvers.registry.SolveResult` reports the
Euclidean one.

Singular systems. Started from ``x = 0`` the Krylov space of a symmetric ``A``
lies in ``range(A)``, so for a consistent right-hand side (``b`` in the range)
MINRES converges to the solution in the range: the minimum-norm solution
``pinv(A) b`` (Choi, Paige and Saunders 2011, section 2; their MINRES-QLP is
needed for the minimum-norm least-squares solution of *inconsistent* systems,
where plain MINRES returns a least-squares solution that is not of minimum norm).
An inconsistent right-hand side (a component outside the range: no exact
solution) is detected by Paige and Saunders' second test, ``||A r|| <= tol ||A||
||r||``: the column stops there with its least-squares residual, which
:func:`~secorder.estimators.solvers.registry.run` reports as not converged,
rather than iterating on while ``x`` grows along near-null directions. (That test
needs ``tol`` above the precision the recurrence attains, about ``1e-9`` in
float64 on network Hessians; below it the iteration runs to ``max_iterations``,
``x`` drifts along the near-null directions and the reported residual shows it.)

Convergence: at most ``n`` iterations in exact arithmetic; the residual falls
like ``((kappa - 1) / (kappa + 1))^(j/2)`` for an indefinite ``A`` with condition
number ``kappa`` (twice as many iterations as CG on a definite system of the same
``kappa``; the same as CG's rate in the ``A``-norm when ``A`` is definite).

References:
    Paige, C. C., Saunders, M. A. (1975). Solution of sparse indefinite systems of
    linear equations. SIAM J. Numer. Anal. 12(4).
    Choi, S.-C. T., Paige, C. C., Saunders, M. A. (2011). MINRES-QLP: a Krylov
    subspace method for indefinite or singular symmetric systems. SIAM J. Sci.
    Comput. 33(4).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ._common import dot, host_all, safe_div
from .registry import Iterate, Solver, register

__all__ = ["minres"]


def minres(
    matvec: Callable[[Tensor], Tensor],
    B: Tensor,
    *,
    tol: float,
    max_iterations: int,
    precondition: Optional[Callable[[Tensor], Tensor]] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callable[[int, Tensor], None]] = None,
) -> Iterate:
    """Solve ``A X = B`` (rows) by MINRES; ``A`` symmetric, possibly indefinite or singular.

    Args:
        matvec: ``A`` on ``(k, n)`` matrices, symmetric.
        B: ``(k, n)`` right-hand sides.
        tol: stop a column when its relative residual (in the ``M^-1``-norm when
            preconditioned) is at most ``tol``.
        max_iterations: the budget of batched matvecs.
        precondition: ``M^-1`` on ``(k, n)``, symmetric positive definite.
        generator: unused.
        callback: ``callback(iteration, relative_residuals)`` after every iteration.

    Returns:
        An :class:`~secorder.estimators.solvers.registry.Iterate`.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.tensor([2., -1., 0.], dtype=torch.float64))   # indefinite and singular
        >>> b = torch.tensor([[2., 3., 0.]], dtype=torch.float64)               # in the range of A
        >>> minres(lambda X: X @ A, b, tol=1e-12, max_iterations=10).x.round(decimals=12)   # pinv(A) b
        tensor([[ 1., -3.,  0.]], dtype=torch.float64)
    """
    precondition = precondition if precondition is not None else (lambda R: R)
    k = B.shape[0]
    tiny = torch.finfo(B.dtype).tiny
    X = torch.zeros_like(B)
    r1 = B.clone()
    y = precondition(r1)
    beta1 = dot(r1, y).clamp_min(0).sqrt()
    zeros = torch.zeros_like(beta1)
    oldb, beta, dbar, epsln, phibar = zeros, beta1, zeros, zeros, beta1
    cs, sn = -torch.ones_like(beta1), zeros
    w = torch.zeros_like(B)
    w2 = torch.zeros_like(B)
    r2 = r1
    residual = safe_div(beta1, beta1)  # 1, or 0 for a zero right-hand side
    done = residual <= tol
    iterations = torch.zeros(k, dtype=torch.int64, device=B.device)
    tnorm2 = zeros  # ||T_j||_F^2, the estimate of ||A||^2
    for j in range(max_iterations):
        if host_all(done):
            break
        active = ~done
        v = safe_div(torch.ones_like(beta), beta, active)[:, None] * y
        y = matvec(v)
        if j > 0:
            y = torch.addcmul(y, safe_div(beta, oldb)[:, None], r1, value=-1)
        alfa = dot(v, y)
        y = torch.addcmul(y, safe_div(alfa, beta)[:, None], r2, value=-1)
        r1, r2 = r2, y
        y = precondition(r2)
        oldb = beta
        beta = dot(r2, y).clamp_min(0).sqrt()
        # Apply the previous rotation, then make the one that annihilates beta.
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        tnorm2 = tnorm2 + alfa ** 2 + oldb ** 2 + beta ** 2
        # ||A r|| / (||A|| ||r||) = root / ||A||: small when x solves the least-squares problem
        # (v outside the range of a singular A, no exact solution): that column stops.
        least_squares = active & (torch.hypot(gbar, dbar) <= tol * tnorm2.sqrt())
        gamma = torch.hypot(gbar, beta).clamp_min(tiny)
        cs, sn = gbar / gamma, beta / gamma
        phi = cs * phibar
        phibar = sn * phibar
        w1, w2 = w2, w
        w = (v - oldeps[:, None] * w1 - delta[:, None] * w2) / gamma[:, None]
        X = torch.addcmul(X, torch.where(active, phi, zeros)[:, None], w)
        residual = torch.where(active, safe_div(phibar, beta1), residual)
        iterations = iterations + active.to(iterations.dtype)
        if callback is not None:
            callback(j + 1, residual)
        done = done | (residual <= tol) | least_squares
    return Iterate(X, iterations)


register(Solver(
    name="minres",
    fn=minres,
    default_iterations=lambda n: 5 * n,
    operators="symmetric, possibly indefinite or singular (the Hessian); minimum-norm solution of consistent "
              "singular systems",
    psd_only=False,
    converges="at most n iterations in exact arithmetic; residual falls like ((kappa - 1) / (kappa + 1))^(j/2) "
              "when indefinite",
    cost="one batched matvec, one preconditioner application, O(k n) vector work (8 vectors per right-hand side)",
    citation="Paige and Saunders (1975); Choi, Paige and Saunders (2011) on singular systems",
    summary="minimum residual; for symmetric indefinite curvatures such as the Hessian",
))

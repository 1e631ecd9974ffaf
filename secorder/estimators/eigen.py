"""Extreme eigenpairs of a symmetric operator: Lanczos, thick-restarted.

:func:`lanczos_eigenpairs` returns the ``k`` largest, smallest or largest-magnitude
eigenvalues (and optionally unit, mutually orthogonal eigenvectors) of a
:class:`~secorder.operators.LeafOperator`, from one Krylov space of a random start
vector (:class:`secorder.estimators.lanczos.Krylov`), kept semi-orthogonal by
partial reorthogonalisation (Simon 1984) or, with ``reorthogonalize="full"``,
orthogonal to working precision (:mod:`secorder.estimators.reorthogonalization`).
For the largest (or largest-magnitude) eigenvalues of an operator that gives a
``top_hint`` (a Hessian: its gradient, which lies mostly in the top eigenspace; Gur-Ari,
Roberts and Dyer 2018), the start vector is the random one plus the hint, both
normalised: the random half keeps every eigenvector in the start with probability
one and the stopping test is unchanged, while the Krylov space reaches the top
eigenvectors sooner (on the benchmark's 784-256-256-10 MLP at ``tol=5e-3``, 19
products on each of five seeds, where a random start needs 24 to 43).

Two modes:

* ``num_iterations=m`` without ``tol``: exactly ``m`` Lanczos steps (``m`` matvecs), the Ritz
  pairs of that Krylov space; no convergence test, so with ``reorthogonalize="full"``
  no host synchronisation, and the whole computation composes with ``torch.func.vmap``
  (where ``"partial"``, which decides on the host once per step, runs as ``"full"``).
* ``num_iterations=None`` or ``tol`` given (adaptive): steps until every wanted Ritz pair has
  a residual ``||H u - theta u|| <= tol * ||H||`` (``||H||`` estimated by the
  largest Ritz value in magnitude), checked after every step (one host
  synchronisation per step), at most ``num_iterations`` steps when both are given
  (then a ``RuntimeWarning`` says when ``tol`` was not reached). The basis holds at most ``basis_size`` vectors; when
  it is full, a thick restart (Wu and Simon 2000) keeps the wanted end of the
  Ritz pairs and continues.

The guarantee. A Ritz pair ``(theta, u)`` with residual ``r = ||H u - theta u||``
(read off the recurrence, ``|beta_m y_m|``, exact up to the basis' loss of
orthogonality, ``sqrt(eps)`` with partial reorthogonalisation) has an eigenvalue
within ``r`` of ``theta`` (Krylov-Bogoliubov; Parlett 1998, theorem 4.5.1): the
adaptive mode stops at the first step where every wanted ``r <= tol * ||H||``, so
every returned value is within ``tol * ||H||`` of an eigenvalue, and its
eigenvector's angle to the eigenspace at most ``r / gap`` (Davis-Kahan). The
eigenvalue is closer still, within ``r^2 / gap``, once the rest of the spectrum is
``gap`` away (Kato-Temple; Parlett 1998, theorem 11.7.1): :attr:`Eigenpairs.error_bounds`
reports ``min(r, r^2 / gap)`` with ``gap`` estimated from the other Ritz values
(:func:`error_bounds`). That estimate is not a guarantee (an eigenvalue the Krylov
space has not resolved yet, such as one 1% above a Ritz value, escapes it), so it
is reported, never used to stop. Consequently a separated top eigenvalue comes out
to about ``tol^2 ||H|| / gap``, far more accurate than ``tol`` promises; ask for
the accuracy the guarantee needs (``tol = 1e-2`` for eigenvalues within
``1e-2 ||H||``), not for the accuracy the eigenvalue should have.

Limits: a single start vector sees each eigenvalue once, so an exactly repeated
eigenvalue is found with its multiplicity only when a Krylov breakdown (an
invariant subspace, see :mod:`secorder.estimators.lanczos`) restarts the run in
the orthogonal complement; that is what happens for matrices with few distinct
eigenvalues, and rounding brings further copies in slowly otherwise. Memory:
``(basis_size + 1) x n`` (adaptive) or ``(num_iterations + 1) x n`` (fixed)
entries for the basis.

References:
    Lanczos, C. (1950). J. Res. Nat. Bur. Standards 45.
    Parlett, B. N. (1998). The Symmetric Eigenvalue Problem. SIAM.
    Simon, H. D. (1984). The Lanczos algorithm with partial reorthogonalization.
    Math. Comp. 42(165).
    Gur-Ari, G., Roberts, D. A., Dyer, E. (2018). Gradient descent happens in a tiny
    subspace. arXiv:1812.04754.
    Wu, K., Simon, H. (2000). Thick-restart Lanczos method for large symmetric
    eigenvalue problems. SIAM J. Matrix Anal. Appl. 22(2).
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..results import CarriesEngine

from ..operators import LeafOperator
from .lanczos import FlatOperator, Krylov, ritz_pairs
from .reorthogonalization import DEFAULT as DEFAULT_REORTHOGONALIZE, check_reorthogonalize

__all__ = ["Eigenpairs", "lanczos_eigenpairs", "error_bounds", "WHICH", "DEFAULT_TOL", "check_which",
           "check_eigen_options"]

WHICH = ("largest", "smallest", "magnitude")
DEFAULT_TOL = 1e-4
# Default basis of the adaptive mode and default matvec budget.
_MIN_BASIS = 30
_BUDGET_PER_BASIS = 50
_MIN_BUDGET = 2000


class _Eigenpairs(NamedTuple):
    """Extreme eigenpairs found by :func:`lanczos_eigenpairs`.

    Fields:
        eigenvalues: ``(k,)``, sorted as ``which`` says (``"largest"``: descending,
            ``"smallest"``: ascending, ``"magnitude"``: descending absolute value).
        eigenvectors: a list of leaf tensors, each ``(k, *leaf.shape)`` (``None``
            unless asked for); unit norm and mutually orthogonal over all leaves.
        residuals: ``(k,)``, the residual norms ``||H u - lambda u||`` of the Ritz pairs
            (from the recurrence: ``|beta_m y_m|``).
        num_matvecs: 0-dim ``int64``.
        invariant: 0-dim bool: a Krylov breakdown happened, i.e. an invariant subspace
            was found (to working precision; in the adaptive mode also to ``tol``): its
            Ritz values are eigenvalues, and the run went on in its complement.
        converged: 0-dim bool: every residual is at most ``tol`` (with a fixed
            ``num_iterations``: :data:`DEFAULT_TOL`) times the estimated norm of the operator.
        error_bounds: ``(k,)``, :func:`error_bounds` of the returned values: an estimate
            of their error, ``min(r, r^2 / gap)`` (see the module docstring).

    Example:
        >>> import torch
        >>> from secorder.operators import LeafOperator
        >>> A = torch.diag(torch.tensor([5., 3., 1., -2.], dtype=torch.float64))
        >>> op = LeafOperator([torch.zeros(4, dtype=torch.float64)], lambda V: [V[0] @ A], None)
        >>> res = lanczos_eigenpairs(op, 2, "magnitude", generator=torch.Generator().manual_seed(0))
        >>> res.eigenvalues.round(decimals=12), bool(res.converged)
        (tensor([5., 3.], dtype=torch.float64), True)
    """

    eigenvalues: Tensor
    eigenvectors: Any
    residuals: Tensor
    num_matvecs: Tensor
    invariant: Tensor
    converged: Tensor
    error_bounds: Optional[Tensor] = None


class Eigenpairs(CarriesEngine, _Eigenpairs):
    __doc__ = _Eigenpairs.__doc__


def check_which(which: Any) -> str:
    """``which`` must be one of :data:`WHICH`.

    Example:
        >>> check_which("top")
        Traceback (most recent call last):
        ...
        ValueError: unknown which='top'; valid values are 'largest', 'smallest', 'magnitude'
    """
    if not isinstance(which, str):
        raise TypeError(f"which must be a str, got {type(which).__name__}")
    if which not in WHICH:
        raise ValueError(f"unknown which={which!r}; valid values are {', '.join(map(repr, WHICH))}")
    return which


def _check_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def check_eigen_options(
    k: Any, which: Any, num_iterations: Any, tol: Any, n: Optional[int] = None
) -> None:
    """Validate the options of :func:`lanczos_eigenpairs` (the sizes too when ``n`` is given).

    Example:
        >>> check_eigen_options(3, "largest", 2, None)
        Traceback (most recent call last):
        ...
        ValueError: num_iterations must be at least k=3 (the Krylov space must hold k Ritz vectors), got 2
    """
    _check_int(k, "k")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    check_which(which)
    if num_iterations is not None:
        _check_int(num_iterations, "num_iterations")
        if num_iterations < k:
            raise ValueError(
                f"num_iterations must be at least k={k} (the Krylov space must hold k Ritz vectors), "
                f"got {num_iterations}"
            )
    if tol is not None:
        if isinstance(tol, bool) or not isinstance(tol, (int, float)):
            raise TypeError(f"tol must be a positive float, got {type(tol).__name__}")
        if not tol > 0:
            raise ValueError(f"tol must be a positive float, got {tol}")
    if n is not None:
        if k > n:
            raise ValueError(f"k={k} is larger than the dimension of the operator ({n})")
        if num_iterations is not None and tol is None and num_iterations > n:
            raise ValueError(
                f"num_iterations={num_iterations} is larger than the dimension of the operator ({n}); "
                f"at most {n} Lanczos steps span the whole space"
            )


def _select(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices (``(p, k)``) of the wanted Ritz values, in output order; ``theta`` ascending."""
    j = theta.shape[-1]
    if which == "largest":
        return torch.arange(j - 1, j - k - 1, -1, device=theta.device).expand(theta.shape[0], k)
    if which == "smallest":
        return torch.arange(k, device=theta.device).expand(theta.shape[0], k)
    return torch.argsort(theta.abs(), dim=-1, descending=True, stable=True)[:, :k]


def _ritz(K: Krylov) -> Tuple[Tensor, Tensor]:
    return ritz_pairs(K.projected())


def _residuals(K: Krylov, Y: Tensor, idx: Tensor) -> Tensor:
    return (K.next_beta[:, None] * torch.gather(Y[:, -1, :], 1, idx)).abs()


def error_bounds(theta: Tensor, residuals: Tensor) -> Tensor:
    """Eigenvalue error bounds ``min(r, r^2 / gap)`` of all Ritz values (Parlett 1998, ch. 11).

    ``theta`` and ``residuals`` are ``(p, j)``; the gap of value ``i`` is estimated as
    ``min_{l != i} |theta_i - theta_l| - r_l`` (the other Ritz values, less their
    residuals); where it does not exceed ``r_i`` the bound is ``r_i``.

    Example:
        >>> import torch
        >>> error_bounds(torch.tensor([[1., 2.]]), torch.tensor([[0.1, 0.01]]))
        tensor([[0.0101, 0.0001]])
    """
    j = theta.shape[-1]
    if j < 2:
        return residuals
    dist = (theta[:, :, None] - theta[:, None, :]).abs() - residuals[:, None, :]
    eye = torch.eye(j, dtype=torch.bool, device=theta.device)
    gap = torch.where(eye, torch.full_like(dist, float("inf")), dist).amin(dim=-1)
    quad = residuals**2 / torch.clamp(gap, min=torch.finfo(theta.dtype).tiny)
    return torch.where(gap > residuals, torch.minimum(quad, residuals), residuals)


def _bounds(K: Krylov, theta: Tensor, Y: Tensor, idx: Tensor) -> Tensor:
    """The :func:`error_bounds` of the wanted Ritz values."""
    everything = (K.next_beta[:, None] * Y[:, -1, :]).abs()
    return torch.gather(error_bounds(theta, everything), 1, idx)


def _norm_estimate(theta: Tensor) -> Tensor:
    return theta.abs().amax(dim=-1)


def lanczos_eigenpairs(
    op: LeafOperator,
    k: int = 1,
    which: str = "largest",
    *,
    num_iterations: Optional[int] = None,
    tol: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    return_eigenvectors: bool = False,
    basis_size: Optional[int] = None,
    max_matvecs: Optional[int] = None,
    reorthogonalize: str = DEFAULT_REORTHOGONALIZE,
) -> Eigenpairs:
    """The ``k`` extreme eigenpairs of the symmetric ``op`` (see the module docstring).

    Args:
        op: the symmetric operator.
        k: how many eigenvalues, ``1 <= k <= n``.
        which: ``"largest"`` (algebraic), ``"smallest"`` (algebraic) or ``"magnitude"``.
        num_iterations: without ``tol``, a fixed number of Lanczos steps
            (``k <= num_iterations <= n``); with ``tol``, the most steps (matvecs) the
            adaptive run may take, as SciPy's ``eigsh(maxiter=, tol=)`` and PyHessian's
            ``eigenvalues(maxIter=, tol=)`` take both; ``None``: adaptive, to ``tol``.
        tol: the relative residual the adaptive mode reaches (default
            :data:`DEFAULT_TOL`), so every returned value is within ``tol * ||H||`` of
            an eigenvalue (see the module docstring); given, the run is adaptive.
        generator: source of the random start vector (``None``: the global RNG).
        return_eigenvectors: also compute the eigenvectors (a ``k x n`` product with the basis;
            from a semi-orthogonal basis, orthonormalised by one Cholesky QR pass).
        basis_size: adaptive mode: the most vectors held before a thick restart
            (default ``max(2 k + 10, 30)``, at most ``n``).
        max_matvecs: adaptive mode: the matvec budget (default
            ``max(2000, 50 * basis_size)``); if the tolerance is not met within it, a
            ``RuntimeWarning`` says so and ``converged`` is false.
        reorthogonalize: ``"partial"`` (default, Simon 1984) or ``"full"``; see
            :mod:`secorder.estimators.reorthogonalization`.

    Returns:
        An :class:`Eigenpairs`.

    Example:
        >>> import torch
        >>> from secorder.operators import LeafOperator
        >>> A = torch.diag(torch.arange(1., 101.))
        >>> op = LeafOperator([torch.zeros(100)], lambda V: [V[0] @ A], None)
        >>> g = torch.Generator().manual_seed(0)
        >>> lanczos_eigenpairs(op, 3, num_iterations=60, generator=g).eigenvalues
        tensor([100.0000,  99.0000,  98.0000])
    """
    flat = FlatOperator(op)
    n = flat.dim
    check_eigen_options(k, which, num_iterations, tol, n)
    check_reorthogonalize(reorthogonalize)
    dtype, device = flat.dtype, flat.device
    start = flat.space.local(flat.randn(1, generator))
    spare = flat.randn(1, generator)
    if which != "smallest" and op.top_hint is not None:
        start = _hinted_start(flat, start, op.top_hint())
    if num_iterations is not None and tol is None:
        K = Krylov(flat, start, num_iterations, spare, space=flat.space, reorthogonalize=reorthogonalize)
        K.extend(num_iterations)
        theta, Y = _ritz(K)
        idx = _select(theta, k, which)
        residuals = _residuals(K, Y, idx)
        bounds = _bounds(K, theta, Y, idx)
        converged = (residuals <= DEFAULT_TOL * _norm_estimate(theta)[:, None]).all()
        invariant = (K.num_steps >= 0).any()
    else:
        tol = DEFAULT_TOL if tol is None else float(tol)
        if num_iterations is not None:  # a cap on the adaptive run
            max_matvecs = num_iterations if max_matvecs is None else min(_check_int(max_matvecs, "max_matvecs"),
                                                                        num_iterations)
        K, theta, Y, idx, residuals, converged, invariant = _adaptive(
            flat, start, spare, k, which, tol, basis_size, max_matvecs,
            "num_iterations" if num_iterations is not None else "max_matvecs", reorthogonalize
        )
        bounds = _bounds(K, theta, Y, idx)
    out_dtype = op.templates[0].dtype
    for t in op.templates[1:]:
        out_dtype = torch.promote_types(out_dtype, t.dtype)
    values = torch.gather(theta, 1, idx)[0]
    vectors = None
    if return_eigenvectors:
        Ysel = torch.gather(Y, 2, idx[:, None, :].expand(-1, Y.shape[1], -1))  # (1, j, k)
        U = torch.bmm(Ysel.transpose(1, 2), K.basis)[0]  # (k, n)
        if reorthogonalize != "full":
            U = _orthonormal_rows(U, flat.space)
        vectors = flat.to_leaves(U)
    return Eigenpairs(
        eigenvalues=values.to(out_dtype),
        eigenvectors=vectors,
        residuals=residuals[0].to(out_dtype),
        num_matvecs=torch.tensor(flat.num_matvecs, dtype=torch.int64, device=device),
        invariant=torch.as_tensor(invariant, device=device),
        converged=converged,
        error_bounds=bounds[0].to(out_dtype),
    )


def _hinted_start(flat: FlatOperator, start: Tensor, hint: Any) -> Tensor:
    """The random ``start`` (``(1, n)``) plus the operator's hint, both normalised.

    The hint (for a Hessian, the gradient) has large components along the top
    eigenvectors, so the Krylov space reaches them in fewer steps (on the README's MLP,
    19 matvecs instead of 24 to 43 for the top eigenvalue at ``tol=5e-3``); the random
    half keeps every eigenvector in the start vector with probability one, so nothing
    the random start finds is lost, and the stopping test (the residuals) is the same.
    A hint that is zero or not finite (at a critical point, or a loss that is not
    finite) leaves the random start alone, without a host synchronisation.
    """
    h = flat.to_flat([t.unsqueeze(0) for t in hint])
    h_norm, s_norm = flat.space.norm(h), flat.space.norm(start)
    usable = torch.isfinite(h_norm) & (h_norm > 0)
    tiny = torch.finfo(start.dtype).tiny
    mixed = start / torch.clamp(s_norm, min=tiny)[:, None] + torch.nan_to_num(h) / torch.clamp(
        torch.nan_to_num(h_norm, nan=1.0, posinf=1.0), min=tiny)[:, None]
    return torch.where(usable[:, None], mixed, start)


def _orthonormal_rows(U: Tensor, space: Any) -> Tensor:
    """Rows of ``U`` (``(k, n)``, orthonormal to ``O(sqrt(eps))``) made orthonormal: ``L^{-1} U``, ``L L^T = U U^T``.

    The Ritz vectors of a semi-orthogonal basis are orthogonal to about ``sqrt(eps)``
    (Simon 1984); one Cholesky QR pass, which keeps the order (the first vector only
    rescaled), brings them to working precision and moves them by as much.
    """
    G = space.sum(U @ U.T)
    L, info = torch.linalg.cholesky_ex(G)
    ok = info == 0  # else not positive definite to working precision: leave them as they are (no host sync)
    L = torch.where(ok, L, torch.eye(L.shape[0], dtype=L.dtype, device=L.device))
    return torch.where(ok, torch.linalg.solve_triangular(L, U, upper=False), U)


def _better(values: Tensor, than: Tensor, margin: Tensor, which: str) -> Tensor:
    """Whether any of ``values`` is more wanted than ``than`` by more than ``margin``."""
    if which == "largest":
        return (values > than + margin).any()
    if which == "smallest":
        return (values < than - margin).any()
    return (values.abs() > than.abs() + margin).any()


def _extreme(theta: Tensor, which: str) -> int:
    """Index of the most wanted of the ascending Ritz values ``theta`` (1-dim)."""
    if which == "largest":
        return theta.shape[0] - 1
    if which == "smallest":
        return 0
    return int(theta.abs().argmax())


def _adaptive(flat, start, spare, k, which, tol, basis_size, max_matvecs, budget_name="max_matvecs",
              reorthogonalize="full"):
    """Thick-restarted Lanczos to ``tol`` (one run, host-side stopping decisions).

    Breakdowns: with random start vectors, a run breaks down (almost surely) only
    once it has found every distinct eigenvalue of the space it explores, so what
    it has not seen are further copies of the values of the block that just broke
    down. The run then goes on in the complement (see :class:`Krylov`) and stops
    only when (a) the wanted Ritz pairs have converged, and (b) the block it is
    running in (the *tail*, after the latest breakdown) has converged its own most
    wanted Ritz value, or, right after a breakdown, no value of the block that
    broke down beats the k-th wanted value (so hidden copies cannot enter).
    """
    n = flat.dim
    if basis_size is None:
        basis_size = max(2 * k + 10, _MIN_BASIS)
    else:
        _check_int(basis_size, "basis_size")
        if basis_size <= k:
            raise ValueError(f"basis_size must be larger than k={k}, got {basis_size}")
    basis_size = min(basis_size, n)
    if max_matvecs is None:
        max_matvecs = max(_MIN_BUDGET, _BUDGET_PER_BASIS * basis_size)
    else:
        _check_int(max_matvecs, "max_matvecs")
        if max_matvecs < k:
            raise ValueError(f"max_matvecs must be at least k={k}, got {max_matvecs}")
    K = Krylov(flat, start, basis_size, spare, host_checks=True, space=flat.space, reorthogonalize=reorthogonalize)
    keep = min(basis_size - 1, k + max(1, (basis_size - k) // 2))
    tail = 0  # first basis index of the block the run is in
    broken_values: Optional[Tensor] = None  # eigenvalues of the block that broke down last
    invariant = False
    while True:
        K.extend(1)
        theta, Y = _ritz(K)
        if not bool(torch.isfinite(theta).all()):  # a loss or curvature that is not finite: nan out
            if K.j < k:
                continue
            nan = torch.full_like(theta[:, :k], float("nan"))
            return K, theta, Y, _select(theta, k, which), nan, torch.tensor(False, device=theta.device), invariant
        bound = tol * _norm_estimate(theta)[:, None]
        boundary = bool(K.last_broke[0]) or bool(K.next_beta[0] <= bound[0, 0])
        if boundary:
            # The block since the last breakdown spans an invariant subspace (to
            # working precision, or to the tolerance): every Ritz pair in it has
            # converged, but copies of its eigenvalues may hide in the complement.
            invariant = True
            broken_values = torch.linalg.eigvalsh(K.projected()[0, tail:, tail:])
            tail = K.j
        if K.j < k:
            continue
        idx = _select(theta, k, which)
        residuals = _residuals(K, Y, idx)
        converged = bool((residuals <= bound).all())
        if converged and broken_values is not None:
            if tail < K.j:
                tt, ty = torch.linalg.eigh(K.projected()[0, tail:, tail:])
                e = _extreme(tt, which)
                converged = bool((K.next_beta[0] * ty[-1, e]).abs() <= bound[0, 0])
            else:
                kth = torch.gather(theta, 1, idx)[0, -1]
                converged = not bool(_better(broken_values, kth, bound[0, 0], which))
        if converged or K.j == n:
            return K, theta, Y, idx, residuals, torch.tensor(True, device=theta.device), invariant
        if flat.num_matvecs >= max_matvecs:
            warnings.warn(
                f"Lanczos did not reach tol={tol} within {budget_name}={max_matvecs} matvecs (largest relative "
                f"residual {float(residuals.max() / _norm_estimate(theta).clamp(min=1e-300).max()):.3g}); pass "
                f"a larger {budget_name} or basis_size, a looser tol, or num_iterations alone for a fixed budget",
                RuntimeWarning,
                stacklevel=3,
            )
            return K, theta, Y, idx, residuals, torch.tensor(False, device=theta.device), invariant
        if K.j == K.capacity:
            kept = _select(theta, keep, which)
            Ykeep = torch.gather(Y, 2, kept[:, None, :].expand(-1, Y.shape[1], -1))
            K.restart(Ykeep, torch.gather(theta, 1, kept))
            # After a breakdown the residual direction starts a fresh block; otherwise
            # the kept Ritz vectors mix the blocks and the whole basis is the tail.
            tail = K.j if boundary else 0

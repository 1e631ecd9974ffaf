"""The solver registry: every ``method=`` of :func:`secorder.solve` declares itself once here.

A :class:`Solver` says what a method is: its name, the function that runs it, its
own options with their defaults and validation, the operators it is meant for,
its default iteration budget, its cost and when it converges, and its citation.
Each solver module registers itself when it is imported
(:mod:`secorder.estimators.solvers` imports them all); :func:`secorder.solve`
validates with :func:`check_options` and runs a method with :func:`run`, and the
docs' method table is :func:`table`. A new solver is one module with one
:func:`register` call.

A solver sees a batched matvec on ``(k, n)`` matrices (rows are right-hand
sides; the caller folds the damping in), the right-hand sides ``B``, the
tolerance and iteration budget, an optional preconditioner (``Z = M^-1 R`` on
``(k, n)``, symmetric positive definite), a generator and a per-iteration
callback. It returns an :class:`Iterate`; :func:`run` then spends one more matvec
on the true residual ``||b - A x|| / ||b||`` of every column, so ``converged`` in
the :class:`SolveResult` is never a claim of the recurrence alone (in float32 the
recursively updated residual of a long solve can fall below ``tol`` while the
true one stalls above it).

Example:
    >>> import torch
    >>> names()
    ('cg', 'minres', 'neumann')
    >>> A = torch.tensor([[4., 1.], [1., 3.]], dtype=torch.float64)
    >>> solver, options = check_options("cg", {})
    >>> out = run(solver, lambda X: X @ A, torch.tensor([[1., 2.]], dtype=torch.float64), tol=1e-10,
    ...           max_iterations=10, options=options)
    >>> out.x, out.iterations, bool(out.converged)
    (tensor([[0.0909, 0.6364]], dtype=torch.float64), tensor([2]), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ...registry import Registry
from ._common import col_norm, safe_div

__all__ = ["Solver", "Iterate", "SolveResult", "SOLVERS", "register", "get", "names", "check_options",
           "check_tol", "check_max_iterations", "run", "table"]

Matvec = Callable[[Tensor], Tensor]


class Iterate(NamedTuple):
    """What a solver function returns: the solutions ``x`` ``(k, n)``, the iterations per column ``(k,)``."""

    x: Tensor
    iterations: Tensor


class SolveResult(NamedTuple):
    """A finished solve of ``k`` right-hand sides.

    Fields:
        x: ``(k, n)`` solutions.
        iterations: ``(k,)`` iterations each column took (``int64``).
        residual: ``(k,)`` true relative residuals ``||b - A x|| / ||b||`` (0 for ``b = 0``).
        converged: ``(k,)`` whether ``residual <= tol``.
        num_matvecs: matvecs of the whole batch (iterations of the longest column,
            set-up products such as ``neumann``'s scale estimate, and the final
            residual check), a 0-dim ``int64`` tensor.
    """

    x: Tensor
    iterations: Tensor
    residual: Tensor
    converged: Tensor
    num_matvecs: Tensor


@dataclass(frozen=True)
class Solver:
    """One ``method=`` of :func:`secorder.solve`.

    Fields:
        name: the ``method=`` value.
        fn: ``fn(matvec, B, *, tol, max_iterations, precondition, generator, callback, **options) -> Iterate``
            (``matvec`` counts its own products; ``callback(iteration, residual)`` after every iteration).
        options: the method's own keyword options and their defaults.
        check: validates the method's options (a dict with every option), raising
            ``TypeError``/``ValueError`` naming the option.
        default_iterations: the default ``max_iterations`` for a system of dimension ``n``.
        operators: the operators it is meant for (docs).
        psd_only: refuses operators that are not positive definite (detected while solving).
        converges: when it converges (docs).
        cost: its cost per iteration (docs).
        citation: the source.
        summary: one line for the docs.
    """

    name: str
    fn: Callable[..., Iterate]
    options: Mapping[str, Any] = field(default_factory=dict)
    check: Optional[Callable[[Dict[str, Any]], None]] = None
    default_iterations: Callable[[int], int] = lambda n: 10 * n
    operators: str = ""
    psd_only: bool = False
    converges: str = ""
    cost: str = ""
    citation: str = ""
    summary: str = ""


SOLVERS: Registry = Registry("method")


def register(solver: Solver) -> Solver:
    """Add ``solver`` under its name (which must be new); returns it."""
    return SOLVERS.register(solver.name, solver)


def names() -> Tuple[str, ...]:
    """The registered ``method=`` values, in registration order."""
    return tuple(SOLVERS.names())


def get(method: Any) -> Solver:
    """The solver ``method``, or a ``ValueError`` listing the valid ones.

    Example:
        >>> get("gmres")
        Traceback (most recent call last):
        ...
        ValueError: unknown method 'gmres'; valid methods are 'cg', 'minres', 'neumann'
    """
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, one of {', '.join(map(repr, names()))}; got {type(method).__name__}")
    return SOLVERS.get(method)


def check_tol(tol: Any) -> float:
    """``tol`` must be a finite float ``> 0`` (a relative residual).

    Example:
        >>> check_tol(0)
        Traceback (most recent call last):
        ...
        ValueError: tol must be a finite float > 0 (the relative residual to reach), got 0
    """
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"tol must be a float > 0, got {type(tol).__name__}")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite float > 0 (the relative residual to reach), got {tol}")
    return float(tol)


def check_max_iterations(max_iterations: Any) -> Optional[int]:
    """``max_iterations`` must be ``None`` or an int ``>= 1``.

    Example:
        >>> check_max_iterations(0)
        Traceback (most recent call last):
        ...
        ValueError: max_iterations must be an int >= 1 or None, got 0
    """
    if max_iterations is None:
        return None
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int):
        raise TypeError(f"max_iterations must be an int >= 1 or None, got {type(max_iterations).__name__}")
    if max_iterations < 1:
        raise ValueError(f"max_iterations must be an int >= 1 or None, got {max_iterations}")
    return max_iterations


def check_options(method: Any, options: Mapping[str, Any]) -> Tuple[Solver, Dict[str, Any]]:
    """The solver ``method`` and its options (defaults filled in), or a clear error.

    Example:
        >>> check_options("cg", {"scale": 2.0})
        Traceback (most recent call last):
        ...
        TypeError: method='cg' takes no option 'scale' (its options: none; 'neumann' takes scale)
    """
    solver = get(method)
    unknown = [k for k in options if k not in solver.options]
    if unknown:
        owners = [f"{s.name!r} takes {', '.join(o for o in unknown if o in s.options)}"
                  for s in (get(n) for n in names()) if any(o in s.options for o in unknown)]
        own = ", ".join(solver.options) or "none"
        raise TypeError(
            f"method={solver.name!r} takes no option {', '.join(map(repr, unknown))} (its options: {own}"
            + (f"; {'; '.join(owners)}" if owners else "") + ")"
        )
    full = dict(solver.options)
    full.update(options)
    if solver.check is not None:
        solver.check(full)
    return solver, full


class _Counted:
    """A matvec that counts its batched calls."""

    def __init__(self, matvec: Matvec):
        self.matvec = matvec
        self.calls = 0

    def __call__(self, X: Tensor) -> Tensor:
        self.calls += 1
        return self.matvec(X)


def run(
    solver: Solver,
    matvec: Matvec,
    B: Tensor,
    *,
    tol: float,
    max_iterations: Optional[int],
    options: Mapping[str, Any],
    precondition: Optional[Matvec] = None,
    generator: Optional[torch.Generator] = None,
    callback: Optional[Callable[[int, Tensor], None]] = None,
) -> SolveResult:
    """Solve ``A X = B`` row by row with ``solver``, then check the true residuals (one more matvec).

    Args:
        solver: a registered :class:`Solver` (from :func:`check_options`).
        matvec: ``A`` on ``(k, n)`` matrices (rows are vectors), symmetric.
        B: ``(k, n)`` right-hand sides.
        tol: the relative residual to reach.
        max_iterations: the budget (``None``: the solver's default for ``n``).
        options: the solver's options (from :func:`check_options`).
        precondition: ``M^-1`` on ``(k, n)`` matrices, symmetric positive definite.
        generator: for solvers that draw (``neumann``'s scale estimate).
        callback: ``callback(iteration, residual)`` after every iteration.

    Returns:
        A :class:`SolveResult`.
    """
    n = B.shape[1]
    budget = max_iterations if max_iterations is not None else max(1, solver.default_iterations(n))
    counted = _Counted(matvec)
    it = solver.fn(counted, B, tol=tol, max_iterations=budget, precondition=precondition, generator=generator,
                   callback=callback, **options)
    residual = safe_div(col_norm(B - counted(it.x)), col_norm(B))
    converged = residual <= tol
    num = torch.tensor(counted.calls, dtype=torch.int64, device=B.device)
    return SolveResult(it.x, it.iterations, residual, converged, num)


def table() -> List[Dict[str, Any]]:
    """One row per method (name, options, operators, convergence, cost, citation) for the docs.

    Example:
        >>> [row["method"] for row in table()]
        ['cg', 'minres', 'neumann']
    """
    return [dict(method=s.name, summary=s.summary, options=dict(s.options), operators=s.operators,
                 psd_only=s.psd_only, converges=s.converges, cost=s.cost, citation=s.citation)
            for s in (get(n) for n in names())]

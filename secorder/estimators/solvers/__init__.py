"""Linear solvers over a batched matvec: ``cg``, ``minres``, ``neumann``.

Estimators-layer linear algebra: a solver sees a matvec on ``(k, n)`` matrices,
the right-hand sides and its options; never a model or autograd.
:func:`secorder.solve` builds the curvature operator and calls
:func:`~secorder.estimators.solvers.registry.run`. One module per method, each
registering itself in :mod:`~secorder.estimators.solvers.registry` when
imported (all are imported here).
"""

from . import registry
from ._common import ConvergenceWarning, DivergenceError, IndefiniteOperatorError
from .cg import conjugate_gradients
from .minres import minres
from .neumann import neumann
from .registry import SolveResult, Solver, check_options, get, names, run, table

__all__ = ["registry", "conjugate_gradients", "minres", "neumann", "SolveResult", "Solver", "check_options", "get",
           "names", "run", "table", "ConvergenceWarning", "IndefiniteOperatorError", "DivergenceError"]

"""Old import path of :func:`secorder.trace_estimate` and :func:`secorder.hessian_diag_estimate`.

They live in :mod:`secorder.transforms` now; this module only re-exports them.
"""

from .transforms import hessian_diag_estimate, trace_estimate

__all__ = ["trace_estimate", "hessian_diag_estimate"]

"""The transform layer: functions of ``f`` that return functions of ``f``'s arguments.

* :mod:`~secorder.transforms.products`: ``hvp``, ``ggn_vp``, ``fisher_vp``,
  ``empirical_fisher_vp``;
* :mod:`~secorder.transforms.quantities`: ``trace``, ``trace_estimate``,
  ``diagonal``, ``diagonal_estimate`` for ``curvature="hessian" | "ggn" | "fisher"
  | "empirical_fisher"`` and every registered ``method``;
* :mod:`~secorder.transforms.aliases`: ``hessian_diag``, ``hessian_diag_estimate``,
  ``ggn_diag``, ``ggn_trace``;
* :mod:`~secorder.transforms.engine`: the choice between the structured engine and
  the generic operator path;
* ``_core``: the one private core they share (validation, the call's problem,
  generator, operator and estimator).

The differentiated argument(s) are chosen with ``argnums`` (an int or a tuple, as
in ``torch.func.grad``) and may be any pytree of floating-point tensors; keyword
arguments of a call are passed through to ``f``. The returned functions compose
with ``torch.func.vmap``, ``torch.func.grad`` and ``torch.compile``.
"""

from .aliases import ggn_diag, ggn_trace, hessian_diag, hessian_diag_estimate
from .products import empirical_fisher_vp, fisher_vp, ggn_vp, hvp
from .quantities import diagonal, diagonal_estimate, trace, trace_estimate

__all__ = [
    "hvp",
    "ggn_vp",
    "fisher_vp",
    "empirical_fisher_vp",
    "trace",
    "trace_estimate",
    "diagonal",
    "diagonal_estimate",
    "hessian_diag",
    "hessian_diag_estimate",
    "ggn_diag",
    "ggn_trace",
]

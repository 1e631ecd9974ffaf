"""Legacy API of ``torch_secorder`` 0.0.1, reproduced on secorder's engine.

Code written against torch-secorder 0.0.1 keeps working unchanged: every
module (``core``, ``approximations``, ``analysis``) and top-level name of
0.0.1, with its closures over leaf tensors, ``strict`` / ``create_graph``
flags and lists of tensors in ``params`` order. Underneath, the closure's Hessian is a
batched autograd-engine operator (:mod:`torch_secorder.autograd_operator`) handed to
secorder's estimators, so the closure runs once and the diagonal costs a few
batched backward passes instead of one per parameter entry.

Example:
    >>> import torch
    >>> import torch_secorder
    >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> torch_secorder.hessian_trace(lambda: x.pow(2).sum(), [x])
    tensor(4.)
"""

import secorder as _secorder


def _check_not_shadowed(package) -> None:
    """A folder named ``secorder`` without ``__init__.py`` (a clone, run from its parent) imports as an empty
    namespace package ahead of an editable install; say which folder instead of failing later on a missing name."""
    if getattr(package, "__file__", None) is None:
        folders = ", ".join(str(p) for p in getattr(package, "__path__", [])) or "?"
        raise ImportError(
            f"the folder {folders} shadows the secorder package: Python imported it as an empty namespace package "
            "from the current directory ahead of the installed one (a clone named 'secorder' run from its parent "
            "directory). Run from another directory, rename the clone's folder, or reinstall with "
            "pip install -e . --config-settings editable_mode=compat (see the installation page of the docs)")


_check_not_shadowed(_secorder)

from .analysis import (
    compute_loss_surface_1d,
    compute_loss_surface_2d,
    estimate_eigenvalues,
    lanczos_iteration,
    power_iteration,
)
from .approximations import (
    empirical_fisher_diagonal,
    empirical_fisher_trace,
    gauss_newton_matrix_approximation,
    generalized_fisher_diagonal,
    generalized_fisher_trace,
)
from .core import (
    approximate_hvp,
    batch_jvp,
    batch_vjp,
    exact_hvp,
    flatten_params,
    full_jacobian,
    gauss_newton_product,
    get_layer_curvature_stats,
    get_param_shapes,
    get_params_by_module_type,
    get_params_by_name_pattern,
    hessian_diagonal,
    hessian_trace,
    jvp,
    model_hessian_diagonal,
    model_hessian_trace,
    model_hvp,
    model_jvp,
    model_vjp,
    per_layer_fisher_diagonal,
    per_layer_hessian_diagonal,
    unflatten_params,
    vjp,
)
from .errors import LegacyTypeError, LegacyValueError

__version__ = "0.1.0"

__all__ = [
    # Core HVP
    "exact_hvp",
    "approximate_hvp",
    "model_hvp",
    "gauss_newton_product",
    # Core GVP
    "jvp",
    "vjp",
    "model_jvp",
    "model_vjp",
    "batch_jvp",
    "batch_vjp",
    "full_jacobian",
    # Core Hessian
    "hessian_diagonal",
    "model_hessian_diagonal",
    "hessian_trace",
    "model_hessian_trace",
    # Core utils
    "flatten_params",
    "unflatten_params",
    "get_param_shapes",
    "get_params_by_module_type",
    "get_params_by_name_pattern",
    # Core per-layer
    "per_layer_hessian_diagonal",
    "per_layer_fisher_diagonal",
    "get_layer_curvature_stats",
    # Approximations
    "empirical_fisher_diagonal",
    "generalized_fisher_diagonal",
    "empirical_fisher_trace",
    "generalized_fisher_trace",
    "gauss_newton_matrix_approximation",
    # Analysis
    "compute_loss_surface_1d",
    "compute_loss_surface_2d",
    "power_iteration",
    "lanczos_iteration",
    "estimate_eigenvalues",
    # Errors of this package
    "LegacyValueError",
    "LegacyTypeError",
]

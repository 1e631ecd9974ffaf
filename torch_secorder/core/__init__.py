"""Core second-order operations (legacy ``torch_secorder.core``), on secorder's engine.

Re-exports the legacy names of 0.0.1's ``torch_secorder.core``. As in
torch-secorder 0.0.1, ``hessian_trace`` here is the exact trace of
:mod:`torch_secorder.core.hessian_trace`; the Hutchinson estimate is
:func:`torch_secorder.core.hvp.hessian_trace`.

Example:
    >>> import torch
    >>> from torch_secorder.core import hessian_trace
    >>> x = torch.tensor([1., 2.], requires_grad=True)
    >>> hessian_trace(lambda: (x ** 3).sum(), [x])
    tensor(18.)
"""

from .gvp import batch_jvp, batch_vjp, full_jacobian, jvp, model_jvp, model_vjp, vjp
from .hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from .hessian_trace import hessian_trace, model_hessian_trace
from .hvp import approximate_hvp, exact_hvp, gauss_newton_product, model_hvp
from .per_layer_curvature import get_layer_curvature_stats, per_layer_fisher_diagonal, per_layer_hessian_diagonal
from .utils import (
    flatten_params,
    get_param_shapes,
    get_params_by_module_type,
    get_params_by_name_pattern,
    unflatten_params,
)

__all__ = [
    # HVP
    "exact_hvp",
    "approximate_hvp",
    "model_hvp",
    "gauss_newton_product",
    # GVP
    "jvp",
    "vjp",
    "model_jvp",
    "model_vjp",
    "batch_jvp",
    "batch_vjp",
    "full_jacobian",
    # Hessian diagonal
    "hessian_diagonal",
    "model_hessian_diagonal",
    # Hessian trace
    "hessian_trace",
    "model_hessian_trace",
    # Utils
    "flatten_params",
    "unflatten_params",
    "get_param_shapes",
    "get_params_by_module_type",
    "get_params_by_name_pattern",
    # Per-layer curvature
    "per_layer_hessian_diagonal",
    "per_layer_fisher_diagonal",
    "get_layer_curvature_stats",
]

"""Core second-order operations (legacy ``torch_secorder.core``), on secorder's engine.

Re-exports the legacy names. As in torch-secorder 0.0.1, ``hessian_trace`` here
is the exact trace of :mod:`torch_secorder.core.hessian_trace`; the Hutchinson
estimate is :func:`torch_secorder.core.hvp.hessian_trace`.

Example:
    >>> import torch
    >>> from torch_secorder.core import hessian_trace
    >>> x = torch.tensor([1., 2.], requires_grad=True)
    >>> hessian_trace(lambda: (x ** 3).sum(), [x])
    tensor(18.)
"""

from .hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from .hessian_trace import hessian_trace, model_hessian_trace
from .hvp import approximate_hvp, exact_hvp, gauss_newton_product, model_hvp

__all__ = [
    "exact_hvp",
    "approximate_hvp",
    "model_hvp",
    "gauss_newton_product",
    "hessian_diagonal",
    "model_hessian_diagonal",
    "hessian_trace",
    "model_hessian_trace",
]

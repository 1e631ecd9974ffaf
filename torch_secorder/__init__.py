"""Legacy closure-based API of ``torch_secorder``, reproduced on secorder's engine.

Code written against torch-secorder 0.0.1's core functions keeps working
unchanged: closures over leaf tensors, ``strict`` / ``create_graph`` flags,
lists of tensors in ``params`` order. Underneath, the closure's Hessian is a
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

from .core import (
    approximate_hvp,
    exact_hvp,
    gauss_newton_product,
    hessian_diagonal,
    hessian_trace,
    model_hessian_diagonal,
    model_hessian_trace,
    model_hvp,
)
from .errors import LegacyTypeError, LegacyValueError

__version__ = "0.1.0"

__all__ = [
    "exact_hvp",
    "approximate_hvp",
    "model_hvp",
    "gauss_newton_product",
    "hessian_diagonal",
    "model_hessian_diagonal",
    "hessian_trace",
    "model_hessian_trace",
    "LegacyValueError",
    "LegacyTypeError",
]

"""secorder: second-order autodiff for PyTorch, as composable ``torch.func`` transforms.

Example:
    >>> import torch, secorder as so
    >>> f = lambda x: (x ** 4).sum() / 12
    >>> x = torch.tensor([1., 2.])
    >>> so.trace(f)(x), so.hessian_diag(f)(x), so.hvp(f)(x, torch.ones(2))
    (tensor(5.), tensor([1., 4.]), tensor([1., 4.]))
"""

from . import tree
from .modules import FunctionalLoss, functional_loss, params_dict
from .transforms import hessian_diag, hvp, trace
from .estimates import hessian_diag_estimate, trace_estimate
from .results import DiagonalEstimate, TraceEstimate
from .structured import Residual
from .structured.ggn import ggn_diag, ggn_trace

__version__ = "0.1.0"

__all__ = [
    "hvp",
    "hessian_diag",
    "trace",
    "trace_estimate",
    "hessian_diag_estimate",
    "TraceEstimate",
    "DiagonalEstimate",
    "ggn_diag",
    "ggn_trace",
    "Residual",
    "functional_loss",
    "params_dict",
    "FunctionalLoss",
    "tree",
]

"""secorder: second-order autodiff for PyTorch, as composable ``torch.func`` transforms.

Example:
    >>> import torch, secorder as so
    >>> f = lambda x: (x ** 4).sum() / 12
    >>> x = torch.tensor([1., 2.])
    >>> so.trace(f)(x), so.hessian_diag(f)(x), so.hvp(f)(x, torch.ones(2))
    (tensor(5.), tensor([1., 4.]), tensor([1., 4.]))
"""

from . import _torch_warnings, composites, slow_path, tree
from .slow_path import SlowPathWarning
from .composites import differentiable_ops
from .modules import FunctionalLoss, functional_loss, params_dict
from .dataset import DatasetLoss, dataset_loss
from .transforms import (diagonal, diagonal_estimate, empirical_fisher_vp, fisher_vp, ggn_diag, ggn_trace, ggn_vp,
                         hessian_diag, hessian_diag_estimate, hvp, trace, trace_estimate)
from .results import DiagonalEstimate, TraceEstimate
from .forward_laplacian import laplacian
from .structured import Parallel, PositionalEmbedding, Residual, SelfAttention, Transpose
from .transforms.spectra import eigenvalues, spectral_density
from .density import SpectralDensity
from .transforms.linear_operator import CurvatureOperator, linear_operator
from .transforms.solve import SolveInfo, solve
from .kronecker import KroneckerCurvature, ekfac, kfac, kfac_curvature
from .explain import Explanation, explain

_torch_warnings.load_jvp_decompositions()  # PyTorch's own jit.script deprecation, not the user's business

__version__ = "0.1.0"

__all__ = [
    "hvp",
    "ggn_vp",
    "fisher_vp",
    "empirical_fisher_vp",
    "trace",
    "trace_estimate",
    "laplacian",
    "diagonal",
    "diagonal_estimate",
    "hessian_diag",
    "hessian_diag_estimate",
    "TraceEstimate",
    "DiagonalEstimate",
    "ggn_diag",
    "ggn_trace",
    "Residual",
    "Parallel",
    "SelfAttention",
    "PositionalEmbedding",
    "Transpose",
    "functional_loss",
    "params_dict",
    "FunctionalLoss",
    "dataset_loss",
    "DatasetLoss",
    "tree",
    "composites",
    "slow_path",
    "SlowPathWarning",
    "differentiable_ops",
    "eigenvalues",
    "spectral_density",
    "SpectralDensity",
    "solve",
    "SolveInfo",
    "linear_operator",
    "CurvatureOperator",
    "kfac",
    "ekfac",
    "KroneckerCurvature",
    "kfac_curvature",
    "explain",
    "Explanation",
]

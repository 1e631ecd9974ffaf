"""0.0.1's curvature approximations (legacy ``torch_secorder.approximations``): squared-gradient "Fisher"
diagonals and traces, and the Gauss-Newton diagonal ``diag(J^T J)``.

Example:
    >>> import torch
    >>> from torch_secorder.approximations import empirical_fisher_trace
    >>> model = torch.nn.Linear(2, 1)
    >>> bool(empirical_fisher_trace(model, torch.nn.functional.mse_loss, torch.ones(3, 2), torch.ones(3, 1)) >= 0)
    True
"""

from .fisher_diagonal import empirical_fisher_diagonal, generalized_fisher_diagonal
from .fisher_trace import empirical_fisher_trace, generalized_fisher_trace
from .gauss_newton import gauss_newton_matrix_approximation

__all__ = [
    "empirical_fisher_diagonal",
    "generalized_fisher_diagonal",
    "empirical_fisher_trace",
    "generalized_fisher_trace",
    "gauss_newton_matrix_approximation",
]

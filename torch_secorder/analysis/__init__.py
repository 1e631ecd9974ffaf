"""Curvature analysis (legacy ``torch_secorder.analysis``): eigenvalues and loss landscapes.

Example:
    >>> import torch
    >>> from torch_secorder.analysis import power_iteration
    >>> A = torch.tensor([[2.0, 0.0], [0.0, -3.0]])
    >>> power_iteration(lambda v: A @ v, dim=2)[0].round(decimals=4)   # the largest in magnitude
    tensor([-3.])
"""

from .eigensolvers import estimate_eigenvalues, lanczos_iteration, power_iteration
from .landscape import compute_loss_surface_1d, compute_loss_surface_2d, create_random_direction

__all__ = [
    "compute_loss_surface_1d",
    "compute_loss_surface_2d",
    "create_random_direction",
    "power_iteration",
    "lanczos_iteration",
    "estimate_eigenvalues",
]

"""Curvature analysis (legacy ``torch_secorder.analysis``): loss landscapes.

Example:
    >>> import torch
    >>> from torch_secorder.analysis import create_random_direction
    >>> len(create_random_direction(torch.nn.Linear(3, 2)))
    2
"""

from .landscape import compute_loss_surface_1d, compute_loss_surface_2d, create_random_direction

__all__ = [
    "compute_loss_surface_1d",
    "compute_loss_surface_2d",
    "create_random_direction",
]

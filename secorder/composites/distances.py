"""Pairwise distances without a double backward: ``cdist`` and ``pdist`` from differences and powers.

``torch.cdist`` (prototype networks, kernel methods, metric learning) and
``F.pdist`` have no derivative of their backward and no forward-mode rule. The
composites compute the ``p``-norms of the differences directly, with PyTorch's
convention at a zero distance (every derivative zero there, where the norm has
none). Their cost is the ``[..., P, R, M]`` tensor of differences, which
PyTorch's kernel avoids: ``P R M`` numbers per call (and per probe when products
are batched).

Example:
    >>> import torch
    >>> a, b = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 5, 3, dtype=torch.float64)
    >>> torch.allclose(cdist(a, b), torch.cdist(a, b)), torch.allclose(cdist(a, b, p=1.0), torch.cdist(a, b, p=1.0))
    (True, True)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import register

__all__ = ["cdist", "pdist"]


def p_norm(d: Tensor, p: float, dim: int = -1) -> Tensor:
    """``||d||_p`` over ``dim``, every derivative zero where the norm is zero (PyTorch's ``cdist`` convention)."""
    if p == 0:
        return (d != 0).sum(dim).to(d.dtype)
    if p == math.inf:
        return d.abs().amax(dim)
    if p == 1:
        return d.abs().sum(dim)
    s = (d * d).sum(dim) if p == 2 else (d.abs() ** p).sum(dim)
    positive = s > 0
    safe = torch.where(positive, s, torch.ones_like(s))
    root = safe.sqrt() if p == 2 else safe ** (1.0 / p)
    return torch.where(positive, root, torch.zeros_like(s))


def _cdist_applies(x1: Tensor, x2: Tensor, p: float = 2.0, compute_mode: str = "") -> bool:
    return isinstance(x1, Tensor) and isinstance(x2, Tensor) and x1.dim() >= 2 and x2.dim() >= 2 and p >= 0


@register(torch.cdist, applies=_cdist_applies,
          why="no double backward and no forward-mode rule (the derivative for '_cdist_backward' is not implemented)")
def cdist(x1: Tensor, x2: Tensor, p: float = 2.0, compute_mode: str = "use_mm_for_euclid_dist_if_necessary") -> Tensor:
    """``torch.cdist`` as norms of differences (same arguments, same result)."""
    return p_norm(x1.unsqueeze(-2) - x2.unsqueeze(-3), float(p))


def _pdist_applies(input: Tensor, p: float = 2.0) -> bool:
    return isinstance(input, Tensor) and input.dim() == 2 and p >= 0


@register(F.pdist, applies=_pdist_applies,
          why="no double backward and no forward-mode rule (the derivative for '_pdist_backward' is not implemented)")
def pdist(input: Tensor, p: float = 2.0) -> Tensor:
    """``F.pdist``: the distances of the pairs ``i < j`` of rows, in row-major order."""
    i, j = torch.triu_indices(input.shape[0], input.shape[0], 1, device=input.device)
    return p_norm(input[i] - input[j], float(p))

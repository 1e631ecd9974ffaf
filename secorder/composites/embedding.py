"""``embedding`` with ``padding_idx`` as a gather whose padding rows are constants.

PyTorch's ``embedding`` backward leaves the ``padding_idx`` row of the weight
without gradient (the padding vector is a constant), but its forward-mode rule
ignores ``padding_idx``: a forward-over-reverse Hessian-vector product then
differs from the Hessian, and is not even symmetric, wherever the padding token
occurs. The composite gathers the rows and detaches those at padding positions,
so reverse and forward mode agree with the backward's definition.

Example:
    >>> import torch, torch.nn.functional as F
    >>> w = torch.randn(5, 3, dtype=torch.float64)
    >>> idx = torch.tensor([[0, 2], [4, 0]])
    >>> torch.equal(embedding(idx, w, padding_idx=0), F.embedding(idx, w, padding_idx=0))
    True
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import register

__all__ = ["embedding"]


def _applies(input: Tensor, weight: Tensor, padding_idx: Optional[int] = None, max_norm: Optional[float] = None,
             norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> bool:
    # max_norm renormalises the weight in place and scale_grad_by_freq changes the backward on purpose:
    # both stay PyTorch's. So do out-of-range padding indices (PyTorch raises).
    if padding_idx is None or max_norm is not None or scale_grad_by_freq or sparse:
        return False
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not isinstance(input, Tensor):
        return False
    return -weight.shape[0] <= padding_idx < weight.shape[0]


@register(
    F.embedding, applies=_applies,
    why="the forward-mode rule ignores padding_idx (forward-over-reverse products are wrong there)",
)
def embedding(input: Tensor, weight: Tensor, padding_idx: Optional[int] = None, max_norm: Optional[float] = None,
              norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """``F.embedding`` with ``padding_idx`` (no ``max_norm``), padding rows constant in every mode."""
    if padding_idx < 0:
        padding_idx += weight.shape[0]
    rows = weight[input]
    return torch.where((input == padding_idx).unsqueeze(-1), rows.detach(), rows)

"""Losses without a double backward: ``multi_margin_loss`` as a composition of ``gather`` and ``clamp``.

``F.multi_margin_loss`` (``nn.MultiMarginLoss``, the multi-class hinge loss) has
no derivative of its backward. Per sample ``n`` with target ``y``:
``sum_{i != y} w_y max(0, margin - x_y + x_i)^p / C``, then the reduction.

Example:
    >>> import torch, torch.nn.functional as F
    >>> x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1])
    >>> torch.allclose(multi_margin_loss(x, y, p=2, margin=0.5), F.multi_margin_loss(x, y, p=2, margin=0.5))
    True
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import register

__all__ = ["multi_margin_loss"]


def _applies(input: Tensor, target: Tensor, p: int = 1, margin: float = 1.0, weight: Optional[Tensor] = None,
             size_average: Optional[bool] = None, reduce: Optional[bool] = None, reduction: str = "mean") -> bool:
    if size_average is not None or reduce is not None or p not in (1, 2) or reduction not in ("mean", "sum", "none"):
        return False
    if not isinstance(input, Tensor) or not isinstance(target, Tensor) or input.dim() not in (1, 2):
        return False
    n = input.shape[0] if input.dim() == 2 else 1
    return target.numel() == n and (weight is None or (weight.dim() == 1 and weight.numel() == input.shape[-1]))


@register(F.multi_margin_loss, applies=_applies,
          why="no double backward (derivative for aten::multi_margin_loss_backward is not implemented)")
def multi_margin_loss(input: Tensor, target: Tensor, p: int = 1, margin: float = 1.0, weight: Optional[Tensor] = None,
                      size_average: Optional[bool] = None, reduce: Optional[bool] = None,
                      reduction: str = "mean") -> Tensor:
    """``F.multi_margin_loss`` as a composite (same arguments, same result)."""
    x = input if input.dim() == 2 else input.unsqueeze(0)
    t = target.reshape(-1).long()
    classes = x.shape[1]
    z = (margin - x.gather(1, t.unsqueeze(1)) + x).clamp_min(0.0)
    if p == 2:
        z = z * z
    z = z.masked_fill(F.one_hot(t, classes).bool(), 0.0)
    if weight is not None:
        z = z * weight.to(z.dtype)[t].unsqueeze(1)
    per_sample = z.sum(1) / classes
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample if input.dim() == 2 else per_sample[0]

"""Pooling: ``nn.MaxPool2d`` (a selection) and average pooling (a linear map).

Max pooling picks one input position per output entry, so its Jacobian is a
:class:`~secorder.structured.jacobians.Gather` of the argmax indices: the
curvature columns stay at the pooled resolution until something needs them at
full size (an elementwise activation before the pool scales the short columns;
a convolution before it reads its weight diagonal by gathering its unfolded
input). ``nn.AvgPool2d`` and ``nn.AdaptiveAvgPool2d`` are linear; their
Jacobian's transpose is the ``torch.func.vjp`` of the module, mapped over the
columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Tuple

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp

from ..errors import Unsupported
from ..jacobians import Columns, Gather, Jacobian
from ..registry import register_rule
from ..rule import Rule

__all__ = ["MaxPoolRule", "MaxPoolState", "AvgPoolRule", "AvgPoolState"]


@dataclass
class MaxPoolState:
    index: Tensor  # [N, C, Q] into the flattened input positions
    in_shape: Tuple[int, ...]


@register_rule(nn.MaxPool2d)
class MaxPoolRule(Rule[MaxPoolState]):
    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if module.return_indices:
            raise Unsupported("has return_indices=True")

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, MaxPoolState]:
        m = self.module
        if x.dim() != 4:
            raise Unsupported(f"on an unbatched input of shape {tuple(x.shape)}")
        z, idx = F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
        N, C = z.shape[:2]
        return z, MaxPoolState(idx.reshape(N, C, -1), tuple(x.shape))

    def jacobian(self, state: MaxPoolState) -> Jacobian:
        return Gather(state.index, state.in_shape)


@dataclass
class AvgPoolState:
    pullback: Callable[[Tensor], Tuple[Tensor, ...]]


class AvgPoolRule(Rule[AvgPoolState]):
    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, AvgPoolState]:
        if x.dim() != 4:
            raise Unsupported(f"on an unbatched input of shape {tuple(x.shape)}")
        z, pullback = vjp(self.module, x)
        return z, AvgPoolState(pullback)

    def jacobian(self, state: AvgPoolState) -> Jacobian:
        return Columns.from_vjp(state.pullback)


register_rule(nn.AvgPool2d, AvgPoolRule)
register_rule(nn.AdaptiveAvgPool2d, AvgPoolRule)

"""Pooling in 1, 2 and 3 dimensions: max pooling (a selection) and average pooling (a linear map).

Max pooling (``nn.MaxPool1d/2d/3d``, ``nn.AdaptiveMaxPool1d/2d/3d``) picks one
input position per output entry, so its Jacobian is a
:class:`~secorder.structured.jacobians.Gather` of the argmax indices: the
curvature columns stay at the pooled resolution until something needs them at
full size (an elementwise activation before the pool scales the short columns;
a convolution before it reads its weight diagonal by gathering its unfolded
input). Average pooling (``nn.AvgPool1d/2d/3d``, ``nn.AdaptiveAvgPool1d/2d/3d``,
every option: stride, padding, ``ceil_mode``, ``count_include_pad``,
``divisor_override``) is linear; its Jacobian's transpose is the
``torch.func.vjp`` of the module, mapped over the columns.
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


# module type: (spatial dims, (module, x) -> (output, flat argmax indices))
_MAX_POOLS = {
    nn.MaxPool1d: (1, lambda m, x: F.max_pool1d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)),
    nn.MaxPool2d: (2, lambda m, x: F.max_pool2d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)),
    nn.MaxPool3d: (3, lambda m, x: F.max_pool3d(x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, True)),
    nn.AdaptiveMaxPool1d: (1, lambda m, x: F.adaptive_max_pool1d(x, m.output_size, True)),
    nn.AdaptiveMaxPool2d: (2, lambda m, x: F.adaptive_max_pool2d(x, m.output_size, True)),
    nn.AdaptiveMaxPool3d: (3, lambda m, x: F.adaptive_max_pool3d(x, m.output_size, True)),
}
_AVG_POOL_DIMS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
                  nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}


def _check_batched(x: Tensor, dims: int) -> None:
    if x.dim() != dims + 2:
        raise Unsupported(f"on an input of shape {tuple(x.shape)} (only batched [N, C, *spatial])")


class MaxPoolRule(Rule[MaxPoolState]):
    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if module.return_indices:
            raise Unsupported("has return_indices=True")
        self.dims, self.pool = _MAX_POOLS[type(module)]

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, MaxPoolState]:
        _check_batched(x, self.dims)
        z, idx = self.pool(self.module, x)
        N, C = z.shape[:2]
        return z, MaxPoolState(idx.reshape(N, C, idx.shape[2:].numel()), tuple(x.shape))

    def jacobian(self, state: MaxPoolState) -> Jacobian:
        return Gather(state.index, state.in_shape)


@dataclass
class AvgPoolState:
    pullback: Callable[[Tensor], Tuple[Tensor, ...]]


class AvgPoolRule(Rule[AvgPoolState]):
    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, AvgPoolState]:
        _check_batched(x, _AVG_POOL_DIMS[type(self.module)])
        z, pullback = vjp(self.module, x)
        return z, AvgPoolState(pullback)

    def jacobian(self, state: AvgPoolState) -> Jacobian:
        return Columns.from_vjp(state.pullback)


for _t in _MAX_POOLS:
    register_rule(_t, MaxPoolRule)
for _t in _AVG_POOL_DIMS:
    register_rule(_t, AvgPoolRule)

"""Per-sample reshapes: ``nn.Flatten`` (not of the batch dimension), ``nn.Identity``, ``nn.Dropout`` in eval mode."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Tuple

import torch
from torch import Tensor, nn

from ..errors import Unsupported
from ..jacobians import Jacobian, Reshape
from ..registry import register_rule
from ..rule import Rule

__all__ = ["ReshapeRule", "ReshapeState"]


@dataclass
class ReshapeState:
    in_shape: Tuple[int, ...]


class ReshapeRule(Rule[ReshapeState]):
    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if isinstance(module, nn.Dropout) and module.training and module.p > 0:
            raise Unsupported("is in training mode (call model.eval())")

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, ReshapeState]:
        m = self.module
        if isinstance(m, nn.Flatten):
            start = m.start_dim % x.dim() if x.dim() else 0
            if start == 0:
                raise Unsupported("flattens the batch dimension")
            z = torch.flatten(x, m.start_dim, m.end_dim)
        else:
            z = x
        return z, ReshapeState(tuple(x.shape))

    def jacobian(self, state: ReshapeState) -> Jacobian:
        return Reshape(state.in_shape)


for _t in (nn.Flatten, nn.Identity, nn.Dropout):
    register_rule(_t, ReshapeRule)

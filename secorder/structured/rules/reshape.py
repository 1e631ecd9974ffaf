"""Per-sample reshapes: ``nn.Flatten``, ``nn.Identity``, ``nn.Dropout`` in eval mode.

``nn.Flatten(0, k)`` flattens the batch with the dims ``1..k``, which become
samples of the output: the per-sample curvature there is, at the input, block
diagonal over those dims (:class:`~secorder.structured.tokens.FlattenBatch`;
a token-level loss after ``nn.Flatten(0, 1)`` stays per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Tuple

import torch
from torch import Tensor, nn

from ..errors import Unsupported
from ..jacobians import Jacobian, Reshape
from ..registry import register_rule
from ..rule import Rule
from ..tokens import FlattenBatch

__all__ = ["ReshapeRule", "ReshapeState"]


@dataclass
class ReshapeState:
    in_shape: Tuple[int, ...]
    batch_end: int = 0  # Flatten(0, k): the last input dim flattened into the batch


class ReshapeRule(Rule[ReshapeState]):
    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if isinstance(module, nn.Dropout) and module.training and module.p > 0:
            raise Unsupported("is in training mode (call model.eval())")

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, ReshapeState]:
        m = self.module
        if isinstance(m, nn.Flatten):
            start = m.start_dim % x.dim() if x.dim() else 0
            z = torch.flatten(x, m.start_dim, m.end_dim)
            if x.dim() and start == 0:
                return z, ReshapeState(tuple(x.shape), m.end_dim % x.dim())
        else:
            z = x
        return z, ReshapeState(tuple(x.shape))

    def jacobian(self, state: ReshapeState) -> Jacobian:
        if state.batch_end:
            return FlattenBatch(state.in_shape, state.batch_end)
        return Reshape(state.in_shape)


for _t in (nn.Flatten, nn.Identity, nn.Dropout):
    register_rule(_t, ReshapeRule)

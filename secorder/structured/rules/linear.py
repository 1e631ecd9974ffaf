"""``nn.Linear`` on ``[N, in]`` inputs: ``z = x W^T + b``.

The Jacobian with respect to the input is the sample-independent ``W``
(:class:`~secorder.structured.jacobians.Dense`); the weight diagonal is
``diag(H_z)^T (x * x)``, one matmul (Dangel, Kunstner, Hennig 2020, App. A).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature import Curvature
from ..errors import Unsupported
from ..jacobians import Dense, Jacobian
from ..registry import register_rule
from ..rule import Rule

__all__ = ["LinearRule", "LinearState"]


@dataclass
class LinearState:
    x: Tensor
    weight: Tensor


@register_rule(nn.Linear)
class LinearRule(Rule[LinearState]):
    parameters = ("weight", "bias")

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, LinearState]:
        if x.dim() != 2:
            raise Unsupported(f"on an input of shape {tuple(x.shape)} (only [N, in])")
        W = tensors["weight"]
        return F.linear(x, W, tensors.get("bias")), LinearState(x, W)

    def jacobian(self, state: LinearState) -> Jacobian:
        return Dense(state.weight)

    def parameter_diagonal(self, state: LinearState, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        h = curv.diagonal()  # [N, out]
        out = {}
        if "weight" in wanted:
            out["weight"] = h.transpose(0, 1) @ (state.x * state.x)
        if "bias" in wanted:
            out["bias"] = h.sum(0)
        return out

    def parameter_trace(self, state: LinearState, curv: Curvature, wanted: FrozenSet[str]) -> Tensor:
        h = curv.diagonal()
        parts = []
        if "weight" in wanted:
            parts.append(h.sum(1) @ (state.x * state.x).sum(1))
        if "bias" in wanted:
            parts.append(h.sum())
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

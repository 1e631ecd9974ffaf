"""``nn.Linear`` on ``[N, in]`` inputs, and on ``[N, *pos, in]`` (tokens): ``z = x W^T + b``.

The Jacobian with respect to the input is the sample-independent ``W``
(:class:`~secorder.structured.jacobians.Dense`); the weight diagonal is
``diag(H_z)^T (x * x)``, one matmul (Dangel, Kunstner, Hennig 2020, App. A).
On ``[N, *pos, in]`` the layer acts on each position alone
(:class:`~secorder.structured.tokens.PerPosition`), and the weight diagonal is
the channel-block quadratic form of the input over the positions, read in the
channels-first layout (:func:`~secorder.structured.tokens.channels_first`): the
same matmul for a tokenwise curvature, one per column for explicit columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature import Curvature
from ..errors import Unsupported
from ..jacobians import Dense, Jacobian
from ..registry import register_rule
from ..rule import Rule
from ..tokens import PerPosition, channels_first

__all__ = ["LinearRule", "LinearState"]


@dataclass
class LinearState:
    x: Tensor
    weight: Tensor


@register_rule(nn.Linear)
class LinearRule(Rule[LinearState]):
    parameters = ("weight", "bias")

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, LinearState]:
        if x.dim() < 2:
            raise Unsupported(f"on an input of shape {tuple(x.shape)} (only [N, *, in])")
        W = tensors["weight"]
        return F.linear(x, W, tensors.get("bias")), LinearState(x, W)

    def jacobian(self, state: LinearState) -> Jacobian:
        if state.x.dim() > 2:
            x = state.x
            return PerPosition(Dense(state.weight), x.shape, x.shape[:-1] + state.weight.shape[:1], x.dim() - 2)
        return Dense(state.weight)

    def parameter_diagonal(self, state: LinearState, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        if state.x.dim() > 2:
            return self._positions_diagonal(state, curv, wanted)
        h = curv.diagonal()  # [N, out]
        out = {}
        if "weight" in wanted:
            out["weight"] = h.transpose(0, 1) @ (state.x * state.x)
        if "bias" in wanted:
            out["bias"] = h.sum(0)
        return out

    def _positions_diagonal(self, state: LinearState, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        x = state.x
        N, P = x.shape[0], math.prod(x.shape[1:-1])
        cf = channels_first(curv, x.shape[:-1] + state.weight.shape[:1], 1)  # [N, out, *pos]
        out = {}
        if "weight" in wanted:
            out["weight"] = cf.quadratic(x.reshape(N, P, x.shape[-1]).transpose(1, 2).unsqueeze(1))
        if "bias" in wanted:
            out["bias"] = cf.quadratic(x.new_ones((1, 1, 1, P)))[:, 0]
        return out

    def parameter_trace(self, state: LinearState, curv: Curvature, wanted: FrozenSet[str]) -> Tensor:
        if state.x.dim() > 2:
            return super().parameter_trace(state, curv, wanted)
        h = curv.diagonal()
        parts = []
        if "weight" in wanted:
            parts.append(h.sum(1) @ (state.x * state.x).sum(1))
        if "bias" in wanted:
            parts.append(h.sum())
        return parts[0] if len(parts) == 1 else parts[0] + parts[1]

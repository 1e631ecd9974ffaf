"""``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` / ``nn.BatchNorm3d`` in eval mode, with running statistics.

``z = gamma * (x - mean) / sqrt(var + eps) + beta``: an elementwise Jacobian
``gamma / sqrt(var + eps)`` per channel; ``gamma``'s diagonal is the
channel-block quadratic form of the normalised input ``xhat``, ``beta``'s that
of the all-ones vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping, Tuple

import torch
from torch import Tensor, nn

from ..curvature import Curvature
from ..errors import Unsupported
from ..jacobians import Elementwise, Jacobian
from ..registry import register_rule
from ..rule import Rule

__all__ = ["BatchNormRule", "BatchNormState"]


@dataclass
class BatchNormState:
    scale: Tensor  # gamma / sqrt(var + eps), shaped to broadcast against x
    xhat: Tensor
    shape: Tuple[int, ...]


class BatchNormRule(Rule[BatchNormState]):
    parameters = ("weight", "bias")

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if module.training or module.running_mean is None:
            raise Unsupported("must be in eval mode with running statistics")

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, BatchNormState]:
        m = self.module
        if x.dim() < 2:
            raise Unsupported(f"on an input of shape {tuple(x.shape)}")
        try:
            m._check_input_dim(x)  # the layout the module itself accepts
        except ValueError as err:
            raise Unsupported(str(err)) from None
        if "running_mean" not in tensors or "running_var" not in tensors:
            raise Unsupported("has no running statistics in the given buffers")
        shape = (-1,) + (1,) * (x.dim() - 2)
        inv = torch.rsqrt(tensors["running_var"] + m.eps).reshape(shape)
        xhat = (x - tensors["running_mean"].reshape(shape)) * inv
        gamma, beta = tensors.get("weight"), tensors.get("bias")
        z = xhat * gamma.reshape(shape) if gamma is not None else xhat
        z = z + beta.reshape(shape) if beta is not None else z
        scale = inv * gamma.reshape(shape) if gamma is not None else inv
        return z, BatchNormState(scale, xhat, tuple(x.shape))

    def jacobian(self, state: BatchNormState) -> Jacobian:
        return Elementwise(state.scale, state.shape)

    def parameter_diagonal(self, state: BatchNormState, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        N, C = state.shape[:2]
        out = {}
        if "weight" in wanted:
            out["weight"] = curv.quadratic(state.xhat.reshape(N, C, 1, state.xhat.shape[2:].numel()))[:, 0]
        if "bias" in wanted:
            S = state.xhat.shape[2:].numel()
            out["bias"] = curv.quadratic(state.xhat.new_ones((1, 1, 1, S)))[:, 0]
        return out


register_rule(nn.BatchNorm1d, BatchNormRule)
register_rule(nn.BatchNorm2d, BatchNormRule)
register_rule(nn.BatchNorm3d, BatchNormRule)

"""``nn.Conv1d`` / ``nn.Conv2d`` with ``groups=1`` and zero padding.

The input Jacobian's transpose is the convolution's input gradient
(``torch.nn.grad.conv*d_input``, all columns folded into one batch). The weight
diagonal is ``sum_{k, n} w_kn (B_kn X_n^T)**2`` with the unfolded input ``X``
(as in BackPACK, Dangel, Kunstner, Hennig 2020, App. A): the channel-block
quadratic form :meth:`~secorder.structured.curvature.Curvature.quadratic` of
the unfolded input, the same for every output channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature import Curvature
from ..errors import Unsupported
from ..jacobians import Columns, Jacobian
from ..registry import register_rule
from ..rule import Rule

__all__ = ["ConvRule", "ConvState"]


@dataclass
class ConvState:
    x: Tensor
    weight: Tensor
    out_shape: Tuple[int, ...]


class ConvRule(Rule[ConvState]):
    parameters = ("weight", "bias")

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        m = module
        if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str) and m.padding != "valid":
            raise Unsupported("has groups != 1 or non-zero padding (only groups=1 and zero padding given as ints)")
        self.two_d = isinstance(m, nn.Conv2d)
        self.padding = (0,) * len(m.kernel_size) if isinstance(m.padding, str) else m.padding

    def _geometry(self):
        m = self.module
        if self.two_d:
            return m.kernel_size, m.stride, self.padding, m.dilation
        return (1,) + m.kernel_size, (1,) + m.stride, (0,) + self.padding, (1,) + m.dilation

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, ConvState]:
        m = self.module
        if x.dim() != (4 if self.two_d else 3):
            raise Unsupported(f"on an unbatched input of shape {tuple(x.shape)}")
        W = tensors["weight"]
        conv = F.conv2d if self.two_d else F.conv1d
        z = conv(x, W, tensors.get("bias"), m.stride, self.padding, m.dilation)
        return z, ConvState(x, W, tuple(z.shape))

    def jacobian(self, state: ConvState) -> Jacobian:
        m, x = self.module, state.x
        grad_in = torch.nn.grad.conv2d_input if self.two_d else torch.nn.grad.conv1d_input

        def t_columns(B: Tensor) -> Tensor:
            K, N = B.shape[:2]
            fold = B.reshape((K * N,) + tuple(B.shape[2:]))
            out = grad_in((K * N,) + tuple(x.shape[1:]), state.weight, fold, m.stride, self.padding, m.dilation, 1)
            return out.reshape((K, N) + tuple(x.shape[1:]))

        return Columns(t_columns)

    def _unfold(self, x: Tensor) -> Tensor:
        k, s, p, d = self._geometry()
        x4 = x if self.two_d else x.unsqueeze(2)
        return F.unfold(x4, k, dilation=d, padding=p, stride=s)  # [N, Cin * prod(k), P]

    def parameter_diagonal(self, state: ConvState, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        out = {}
        P = 1
        for s in state.out_shape[2:]:
            P *= s
        if "weight" in wanted:
            X = self._unfold(state.x)  # [N, J, P]: the same test vectors for every output channel
            out["weight"] = curv.quadratic(X.unsqueeze(1)).reshape(state.weight.shape)
        if "bias" in wanted:
            ones = state.x.new_ones((1, 1, 1, P))
            out["bias"] = curv.quadratic(ones)[:, 0]
        return out


register_rule(nn.Conv1d, ConvRule)
register_rule(nn.Conv2d, ConvRule)

""":class:`~secorder.structured.transformer.Transpose`: a permutation of a sample's dims.

The Jacobian is the permutation (:class:`~secorder.structured.tokens.Permute`):
every term kind is permuted, and a tokenwise term keeps its rows when the
positions stay in order (``Transpose(1, 2)`` from ``[N, T, vocab]`` to
``[N, vocab, T]`` logits keeps a token-level cross-entropy per token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Tuple

from torch import Tensor

from ..errors import Unsupported
from ..jacobians import Jacobian
from ..registry import register_rule
from ..rule import Rule
from ..tokens import Permute
from ..transformer import Transpose

__all__ = ["TransposeRule", "TransposeState"]


@dataclass
class TransposeState:
    perm: Tuple[int, ...]
    shape: Tuple[int, ...]


@register_rule(Transpose)
class TransposeRule(Rule[TransposeState]):
    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, TransposeState]:
        nd = x.dim()
        m = self.module
        if not (-nd <= m.dim0 < nd and -nd <= m.dim1 < nd) or m.dim0 % nd == 0 or m.dim1 % nd == 0:
            raise Unsupported(f"swaps dims ({m.dim0}, {m.dim1}) of an input of shape {tuple(x.shape)} "
                              f"(the batch dim must stay first)")
        perm = list(range(nd))
        a, b = m.dim0 % nd, m.dim1 % nd
        perm[a], perm[b] = perm[b], perm[a]
        return x.transpose(a, b), TransposeState(tuple(perm), tuple(x.shape))

    def jacobian(self, state: TransposeState) -> Jacobian:
        return Permute(state.perm, state.shape)

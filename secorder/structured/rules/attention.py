"""The attention core :class:`~secorder.structured.transformer.ScaledDotProductAttention`, the one module that mixes tokens.

Per head, ``S = q k^T / sqrt(dh)`` (future masked when causal), ``A = softmax(S)``
row-wise and ``o = A v``. The transposed Jacobian of a column ``G`` (the cotangent
of ``o``), in closed form and batched over the columns:
``dv = A^T G``, ``dS = A * (G v^T - rowsum(A * G v^T))``, ``dq = dS k / sqrt(dh)``,
``dk = dS^T q / sqrt(dh)`` (Vaswani et al., "Attention is all you need",
NeurIPS 2017, for the function).

Cost. Behind this module the token-level curvature, ``C`` columns per token while
it was :class:`~secorder.structured.tokens.Tokenwise`, becomes ``C x T`` explicit
columns per sequence, each supported on one token before the pull-back and on up
to all ``T`` tokens after it: the rank of a sequence's generalized Gauss-Newton
matrix is up to ``C x T``, and an exact diagonal needs every one of those
directions. Every module before the last attention layer therefore costs about
``C x T`` (vector-Jacobian products of one sequence) per sequence, where one
gradient costs one; the modules after it cost ``C`` per token. With
``factor_chunk_size`` the loss's ``C`` columns per token go back a chunk at a
time, bounding the memory to ``chunk x T`` columns per sequence.

The exact Hessian adds this module's residual, the Hessian of ``sum g . o`` with
respect to one head's queries, keys and values (``g = dL/do``): a dense symmetric
``3 T dh x 3 T dh`` block per head and sequence, computed with
``torch.func.hessian`` and factored by its eigendecomposition into ``3 T dh``
signed columns per head, which are then pulled back through everything before the
attention. That is ``N (3 T d)^2`` entries of explicit columns: above
:data:`MAX_RESIDUAL_ENTRIES` (change it to allow more) the engine declines the exact
Hessian and says so (the generalized Gauss-Newton diagonal stays structured at any
size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import torch
from torch import Tensor
from torch.func import hessian, vmap

from ..curvature import Factor, Term
from ..errors import Unsupported
from ..jacobians import Jacobian
from ..registry import register_rule
from ..rule import Rule
from ..transformer import ScaledDotProductAttention, attention

__all__ = ["AttentionRule", "AttentionState", "AttentionJacobian", "MAX_RESIDUAL_ENTRIES"]

#: The largest number of entries (``N (3 T d)^2``) of the exact Hessian's attention residual columns.
MAX_RESIDUAL_ENTRIES = 2 ** 26


@dataclass
class AttentionState:
    q: Tensor  # [N, h, T, dh]
    k: Tensor
    v: Tensor
    a: Tensor  # [N, h, T, T]
    shape: Tuple[int, ...]  # the input's, [N, T, 3 d]


class AttentionJacobian(Jacobian):
    """The Jacobian of multi-head attention with respect to its packed ``[N, T, 3 d]`` input."""

    def __init__(self, state: AttentionState):
        self.s = state

    def t_columns(self, B: Tensor) -> Tensor:
        s = self.s
        K = B.shape[0]
        N, h, T, dh = s.q.shape
        scale = 1.0 / math.sqrt(dh)
        G = B.reshape(K, N, T, h, dh).transpose(2, 3)  # [K, N, h, T, dh]
        dv = s.a.transpose(-1, -2) @ G
        dA = G @ s.v.transpose(-1, -2)
        dS = s.a * (dA - (dA * s.a).sum(-1, keepdim=True))
        dq = (dS @ s.k) * scale
        dk = (dS.transpose(-1, -2) @ s.q) * scale
        out = torch.stack([dq, dk, dv], 2)  # [K, N, 3, h, T, dh]
        return out.permute(0, 1, 4, 2, 3, 5).reshape((K,) + s.shape)


def _head_output_dot(qkv: Tensor, g: Tensor, causal: bool) -> Tensor:
    """``sum g . o`` for one head: ``qkv`` is ``[3, T, dh]``, ``g`` ``[T, dh]``."""
    q, k, v = qkv.unbind(0)
    s = (q @ k.transpose(0, 1)) * (1.0 / math.sqrt(q.shape[-1]))
    if causal:
        T = q.shape[0]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return ((torch.softmax(s, -1) @ v) * g).sum()


@register_rule(ScaledDotProductAttention)
class AttentionRule(Rule[AttentionState]):
    has_residual = True

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, AttentionState]:
        h = self.module.num_heads
        if x.dim() != 3 or x.shape[2] % (3 * h):
            raise Unsupported(f"on an input of shape {tuple(x.shape)} (expected [N, T, 3 * d], d divisible by {h})")
        out, (q, k, v, a) = attention(x, h, self.module.causal)
        return out, AttentionState(q, k, v, a, tuple(x.shape))

    def jacobian(self, state: AttentionState) -> Jacobian:
        return AttentionJacobian(state)

    def residual(self, state: AttentionState, grad_out: Tensor) -> Optional[Term]:
        N, h, T, dh = state.q.shape
        M = 3 * T * dh
        entries = N * (h * M) * (T * 3 * h * dh)
        if entries > MAX_RESIDUAL_ENTRIES:
            raise Unsupported(
                f"the exact Hessian's attention residual would need {h * M} explicit columns per sequence "
                f"(N (3 T d)^2 = {entries} entries, above secorder.structured.rules.attention.MAX_RESIDUAL_ENTRIES="
                f"{MAX_RESIDUAL_ENTRIES}); the GGN diagonal is structured at any size"
            )
        qkv = torch.stack([state.q, state.k, state.v], 2)  # [N, h, 3, T, dh]
        g = grad_out.reshape(N, T, h, dh).transpose(1, 2)  # [N, h, T, dh]
        hess = vmap(vmap(hessian(_head_output_dot), in_dims=(0, 0, None)), in_dims=(0, 0, None))
        H = hess(qkv, g, self.module.causal).reshape(N, h, M, M)
        H = (H + H.transpose(-1, -2)) / 2
        lam, U = torch.linalg.eigh(H)  # [N, h, M], [N, h, M, M] (columns)
        cols = U * lam.abs().sqrt().unsqueeze(-2)
        # Column (head, m) of sample n lives in its head's q|k|v slots of every position.
        cols = cols.reshape(N, h, 3, T, dh, M).permute(1, 5, 0, 3, 2, 4)  # [h, M, N, T, 3, dh]
        place = torch.eye(h, dtype=cols.dtype, device=cols.device).reshape(h, 1, 1, 1, 1, h, 1)
        B = (cols.unsqueeze(5) * place).reshape((h * M,) + state.shape)  # [h, M, N, T, 3, h, dh]
        w = torch.sign(lam).permute(1, 2, 0).reshape(h * M, N)
        return Factor(B, w)

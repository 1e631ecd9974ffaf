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
``torch.func.hessian`` and written as ``6 T dh`` signed columns per head
(:func:`symmetric_columns`: exact and differentiable, unlike an eigendecomposition,
whose derivative is undefined at the repeated eigenvalues a causal mask brings),
which are then pulled back through everything before the attention. That is ``2 N (3 T d)^2`` entries of explicit columns: above
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
from ..tokens import Tokenwise
from ..transformer import ScaledDotProductAttention, attention

__all__ = ["AttentionRule", "AttentionState", "AttentionJacobian", "MAX_RESIDUAL_ENTRIES", "symmetric_columns"]

#: The largest number of entries (``2 N (3 T d)^2``) of the exact Hessian's attention residual columns.
MAX_RESIDUAL_ENTRIES = 2 ** 26


def symmetric_columns(M: Tensor) -> Tuple[Tensor, Tensor]:
    """Signed columns of symmetric matrices: ``M = sum_k w_k b_k b_k^T`` exactly, ``2 m`` columns for ``m x m``.

    With ``c_k = M e_k`` (column ``k``) and any ``s_k > 0``,
    ``e_k c_k^T + c_k e_k^T = ((s_k e_k + c_k / (2 s_k))(...)^T - (s_k e_k - c_k / (2 s_k))(...)^T)``,
    and half the sum of those over ``k`` is ``M``. ``s_k = sqrt(|c_k| / 2)`` balances
    the two parts (no cancellation between scales); being arbitrary, it carries no
    derivative. ``M`` is ``[..., m, m]``; returns ``B`` ``[..., m, 2 m]`` (columns last)
    and ``w`` ``[2 m]``.

    Example:
        >>> M = torch.tensor([[2., 1.], [1., -3.]])
        >>> B, w = symmetric_columns(M)
        >>> torch.allclose((B * w) @ B.T, M)
        True
    """
    m = M.shape[-1]
    n = M.detach().norm(dim=-2, keepdim=True)  # [..., 1, m]: |c_k|
    s = torch.where(n > 0, (n / 2).sqrt(), torch.ones_like(n))
    eye = torch.eye(m, dtype=M.dtype, device=M.device)
    a, b = eye * s, M / (2 * s)
    B = torch.cat([a + b, a - b], -1)
    w = torch.cat([M.new_full((m,), 0.5), M.new_full((m,), -0.5)])
    return B, w


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

    def pull_tokenwise(self, t: Tokenwise) -> Term:
        """Columns on one token each (the token-level curvature): the same result, ``T`` times cheaper.

        Column ``(k, t)`` is ``g`` at token ``t`` only, so ``dS`` is its row ``t``
        alone: ``dq`` sits at token ``t``, ``dk[s] = dS[t, s] q_t`` and
        ``dv[s] = A[t, s] g`` are outer products. The pulled columns come in the order
        of :meth:`Tokenwise.as_factor` (column ``k * T + t``).
        """
        s = self.s
        N, h, T, dh = s.q.shape
        if t.index is not None or t.pos != (1,) or t.shape != (N, T, h * dh):
            return self.pull_factor(t.as_factor())
        f = t.inner.as_factor()
        K = f.B.shape[0]
        scale = 1.0 / math.sqrt(dh)
        g = f.B.reshape(K, N, T, h, dh).transpose(2, 3)  # [K, N, h, T (column token), dh]
        a = s.a.unsqueeze(-1)  # [N, h, T, T, 1]
        dv = a * g.unsqueeze(-2)  # [K, N, h, t, s, dh]
        dA = g @ s.v.transpose(-1, -2)  # [K, N, h, t, s]: g_t . v_s
        dS = s.a * (dA - (dA * s.a).sum(-1, keepdim=True))
        dk = (dS * scale).unsqueeze(-1) * s.q.unsqueeze(-2)  # [K, N, h, t, s, dh]: dS[t, s] q_t
        dq_t = (dS @ s.k) * scale  # [K, N, h, t, dh], at token s = t only
        eye = torch.eye(T, dtype=dq_t.dtype, device=dq_t.device).unsqueeze(-1)  # [t, s, 1]
        dq = dq_t.unsqueeze(-2) * eye
        out = torch.stack([dq, dk, dv], 4)  # [K, N, h, t, 3, s, dh]
        B = out.permute(0, 3, 1, 5, 4, 2, 6).reshape((K * T,) + s.shape)  # [K, t, N, s, 3, h, dh]
        w = None if f.w is None else f.w.reshape(K, N, T).transpose(1, 2).reshape(K * T, N)
        return Factor(B, w)


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
        entries = 2 * N * (h * M) * (T * 3 * h * dh)
        if entries > MAX_RESIDUAL_ENTRIES:
            raise Unsupported(
                f"the exact Hessian's attention residual would need {2 * h * M} explicit columns per sequence "
                f"(2 N (3 T d)^2 = {entries} entries, above secorder.structured.rules.attention.MAX_RESIDUAL_ENTRIES="
                f"{MAX_RESIDUAL_ENTRIES}); the GGN diagonal is structured at any size"
            )
        qkv = torch.stack([state.q, state.k, state.v], 2)  # [N, h, 3, T, dh]
        g = grad_out.reshape(N, T, h, dh).transpose(1, 2)  # [N, h, T, dh]
        hess = vmap(vmap(hessian(_head_output_dot), in_dims=(0, 0, None)), in_dims=(0, 0, None))
        H = hess(qkv, g, self.module.causal).reshape(N, h, M, M)
        cols, w = symmetric_columns((H + H.transpose(-1, -2)) / 2)  # [N, h, M, 2M], [2M]
        # Column (head, k) of sample n lives in its head's q|k|v slots of every position.
        cols = cols.reshape(N, h, 3, T, dh, 2 * M).permute(1, 5, 0, 3, 2, 4)  # [h, 2M, N, T, 3, dh]
        place = torch.eye(h, dtype=cols.dtype, device=cols.device).reshape(h, 1, 1, 1, 1, h, 1)
        B = (cols.unsqueeze(5) * place).reshape((2 * h * M,) + state.shape)  # [h, 2M, N, T, 3, h, dh]
        return Factor(B, w.repeat(h).unsqueeze(1).expand(2 * h * M, N))

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
``3 T dh x 3 T dh`` block per head and sequence, in closed form
(:func:`attention_hessian`), written as ``6 T dh`` signed columns per head
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

from ..curvature import Factor, Term
from ..errors import Unsupported
from ..jacobians import Jacobian
from ..registry import register_rule
from ..rule import Rule
from ..tokens import Tokenwise
from ..transformer import ScaledDotProductAttention, attention

__all__ = ["AttentionRule", "AttentionState", "AttentionJacobian", "MAX_RESIDUAL_ENTRIES", "symmetric_columns",
           "attention_hessian"]

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
        if t.index is not None or t.pos != (1,) or t.shape != (N, T, h * dh) or t.summed:
            # (summed: one column per sequence, the Monte-Carlo Fisher's sampled tokens added up)
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


def _tr(X: Tensor) -> Tensor:
    """Block transpose of ``[..., T, T', e, e']`` blocks: ``(X^T)[a, b] = X[b, a]^T``."""
    return X.permute(*range(X.dim() - 4), -3, -4, -1, -2)


def attention_hessian(q: Tensor, k: Tensor, v: Tensor, a: Tensor, g: Tensor) -> Tensor:
    """The Hessian of ``sum_t g_t . o_t`` with respect to one head's ``(q, k, v)``, in closed form.

    ``q, k, v, g``: ``[..., T, e]``; ``a``: the attention weights ``[..., T, T]`` (zero where
    masked). Returns ``[..., 3, T, e, 3, T, e]``. With ``s = 1 / sqrt(e)``,
    ``c_tu = g_t . v_u``, ``E = a * (c - rowsum(a * c))`` (the gradient with respect to the
    scores), ``kb_t = sum_u a_tu k_u`` and ``eh_t = sum_u E_tu k_u``, the score Hessian of row
    ``t`` is ``diag(E_t) - a_t E_t^T - E_t a_t^T`` and the blocks are
    ``qq[t, t] = s^2 (sum_u E_tu k_u k_u^T - kb_t eh_t^T - eh_t kb_t^T)``,
    ``qk[t, u] = s^2 (E_tu (k_u - kb_t) - a_tu eh_t) q_t^T + s E_tu I``,
    ``qv[t, u] = s a_tu (k_u - kb_t) g_t^T``,
    ``kk[u, w] = s^2 (delta_uw sum_t E_tu q_t q_t^T - sum_t (a_tu E_tw + E_tu a_tw) q_t q_t^T)``,
    ``kv[u, w] = s (delta_uw sum_t a_tw q_t g_t^T - sum_t a_tw a_tu q_t g_t^T)`` and ``vv = 0``.

    Example:
        >>> from secorder.structured.transformer import attention
        >>> qkv, g = torch.randn(1, 3, 6, dtype=torch.float64), torch.randn(1, 3, 2, dtype=torch.float64)
        >>> _, (q, k, v, a) = attention(qkv, 1, causal=True)
        >>> H = attention_hessian(q[0, 0], k[0, 0], v[0, 0], a[0, 0], g[0]).reshape(18, 18)
        >>> phi = lambda u: (attention(u.reshape(3, 3, 2).transpose(0, 1).reshape(1, 3, 6), 1, True)[0] * g).sum()
        >>> ref = torch.func.hessian(phi)(torch.stack([q, k, v], 2)[0, 0].reshape(18))
        >>> torch.allclose(H, ref)
        True
    """
    T, e = q.shape[-2:]
    sc = 1.0 / math.sqrt(e)
    eye_t = torch.eye(T, dtype=q.dtype, device=q.device)
    eye_e = torch.eye(e, dtype=q.dtype, device=q.device)
    c = g @ v.transpose(-1, -2)
    E = a * (c - (a * c).sum(-1, keepdim=True))
    kb, eh = a @ k, E @ k  # [..., T, e]
    qq_t = sc * sc * (torch.einsum("...tu,...ud,...uf->...tdf", E, k, k)
                      - kb.unsqueeze(-1) * eh.unsqueeze(-2) - eh.unsqueeze(-1) * kb.unsqueeze(-2))
    qq = qq_t.unsqueeze(-3) * eye_t[:, :, None, None]  # [..., t, t', e, e']
    dk = k.unsqueeze(-3) - kb.unsqueeze(-2)  # [..., t, u, e]: k_u - kb_t
    qk = (sc * sc) * (E.unsqueeze(-1) * dk - a.unsqueeze(-1) * eh.unsqueeze(-2)).unsqueeze(-1) \
        * q[..., :, None, None, :] + sc * E[..., None, None] * eye_e
    qv = sc * (a.unsqueeze(-1) * dk).unsqueeze(-1) * g[..., :, None, None, :]
    qqT = q.unsqueeze(-1) * q.unsqueeze(-2)  # [..., t, e, e]
    qgT = q.unsqueeze(-1) * g.unsqueeze(-2)
    diag_k = torch.einsum("...tu,...tdf->...udf", E, qqT)
    P = torch.einsum("...tu,...tw,...tdf->...uwdf", a, E, qqT)  # sum_t a_tu E_tw q_t q_t^T
    kk = sc * sc * (diag_k.unsqueeze(-3) * eye_t[:, :, None, None] - P - P.transpose(-3, -4))
    diag_kv = torch.einsum("...tw,...tdf->...wdf", a, qgT)
    kv = sc * (diag_kv.unsqueeze(-3) * eye_t[:, :, None, None]
               - torch.einsum("...tw,...tu,...tdf->...uwdf", a, a, qgT))
    zero = torch.zeros_like(qq)
    rows = [torch.stack([qq, qk, qv], -5), torch.stack([_tr(qk), kk, kv], -5),
            torch.stack([_tr(qv), _tr(kv), zero], -5)]
    H = torch.stack(rows, -6)  # [..., 3 (row part), 3 (column part), t, t', e, e']
    return H.permute(*range(H.dim() - 6), -6, -4, -2, -5, -3, -1)


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
        g = grad_out.reshape(N, T, h, dh).transpose(1, 2)  # [N, h, T, dh]
        H = attention_hessian(state.q, state.k, state.v, state.a, g).reshape(N, h, M, M)
        cols, w = symmetric_columns((H + H.transpose(-1, -2)) / 2)  # [N, h, M, 2M], [2M]
        # Column (head, k) of sample n lives in its head's q|k|v slots of every position.
        cols = cols.reshape(N, h, 3, T, dh, 2 * M).permute(1, 5, 0, 3, 2, 4)  # [h, 2M, N, T, 3, dh]
        place = torch.eye(h, dtype=cols.dtype, device=cols.device).reshape(h, 1, 1, 1, 1, h, 1)
        B = (cols.unsqueeze(5) * place).reshape((2 * h * M,) + state.shape)  # [h, 2M, N, T, 3, h, dh]
        return Factor(B, w.repeat(h).unsqueeze(1).expand(2 * h * M, N))

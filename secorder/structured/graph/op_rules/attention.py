"""Attention, softmax and matmul; attention's exact Hessian residual from the module rule's closed form."""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.func import vjp

from ...errors import Unsupported
from ...jacobians import Jacobian
from ..ops import OP_RULES, Bound, LinearOp, Meta, OpRule, Slot, _op_of, slot_value
from ._common import _batch_out, _first_live_ndim, _norm, _shape, _with


def _attention_batch(m: Meta) -> Optional[str]:
    reason = _batch_out(m)
    if reason:
        return reason
    for s in m.live:
        if len(_shape(slot_value(m.args, s))) < 3:
            return f"argument {s[0]} has no head or position dimension after the batch"
    return None


class Attention(OpRule):
    """``aten.scaled_dot_product_attention(q, k, v, mask, dropout, causal, scale)``: per-sample attention.

    The Jacobians are the op's ``vjp`` with respect to each live argument. The
    exact Hessian's residual is the module rule's math
    (:func:`~secorder.structured.rules.attention.attention_hessian`, the closed-form
    Hessian of ``sum g . o`` over one head's ``(q, k, v)``, written as signed
    columns by :func:`~secorder.structured.rules.attention.symmetric_columns`),
    split over the live arguments: the sweep pulls each part back along its
    argument and adds them where they meet (the projections' common input). It
    declines (with the reason) for dropout, a custom scale, grouped key/value
    heads, queries and keys of different lengths, and above
    :data:`~secorder.structured.rules.attention.MAX_RESIDUAL_ENTRIES`.
    """

    doc = "attention (its vjp per query, key, value; the exact Hessian's residual in closed form)"

    def bind(self, meta: Meta) -> Bound:
        reason = _attention_batch(meta)
        if reason:
            raise Unsupported(reason)
        a = list(meta.args) + [None] * (7 - len(meta.args))
        kw = meta.kwargs
        dropout = kw.get("dropout_p", a[4] or 0.0)
        if dropout:
            raise Unsupported(f"has dropout_p={dropout} (random)")
        if (3,) in meta.live:
            raise Unsupported("its mask depends on the parameters")
        return _BoundAttention(meta, _attention_residual_reason(meta))


def _attention_residual_reason(meta: Meta) -> Optional[str]:
    from ...rules.attention import MAX_RESIDUAL_ENTRIES

    q, k, v = meta.args[:3]
    kw = meta.kwargs
    if kw.get("enable_gqa", False) or q.shape[1] != k.shape[1] or k.shape[1] != v.shape[1]:
        return "has grouped key/value heads (no residual rule)"
    if q.dim() != 4 or q.shape[2] != k.shape[2] or q.shape[3] != v.shape[3]:
        return f"on queries {tuple(q.shape)} and keys {tuple(k.shape)} (the residual rule takes self-attention)"
    scale = kw.get("scale", meta.args[6] if len(meta.args) > 6 else None)
    if scale is not None and abs(scale - q.shape[3] ** -0.5) > 1e-12:
        return f"has scale={scale} (the residual rule takes 1/sqrt(head size))"
    N, H, T, e = q.shape
    M = 3 * T * e
    entries = 2 * N * (H * M) * (T * 3 * H * e)
    if entries > MAX_RESIDUAL_ENTRIES:
        return (f"the exact Hessian's attention residual would need {2 * H * M} explicit columns per sequence "
                f"({entries} entries, above secorder.structured.rules.attention.MAX_RESIDUAL_ENTRIES="
                f"{MAX_RESIDUAL_ENTRIES}); the GGN diagonal is structured at any size")
    return None


class _BoundAttention(Bound):
    has_residual = True

    def __init__(self, meta: Meta, residual_reason: Optional[str]):
        self.live, self.residual_reason = meta.live, residual_reason
        self.target = _op_of(meta.target)

    def forward(self, args: tuple, kwargs: Dict[str, Any]) -> Tuple[Tensor, Any]:
        live = self.live

        def fn(*xs: Tensor) -> Tensor:
            a = list(args)
            for s, x in zip(live, xs):
                a[s[0]] = x
            return self.target(*a, **kwargs)

        out, pullback = vjp(fn, *[args[s[0]] for s in live])
        return out, (pullback, args, kwargs)

    def jacobians(self, state: Any) -> Dict[Slot, Jacobian]:
        from ...jacobians import Columns

        return {s: Columns.from_vjp((lambda i: lambda b: (state[0](b)[i],))(i)) for i, s in enumerate(self.live)}

    def joint_residual(self, state: Any, grad_out: Tensor) -> Dict[Slot, Any]:
        from ...curvature import Factor
        from ...rules.attention import attention_hessian, symmetric_columns

        _, args, kwargs = state
        a = list(args) + [None] * (7 - len(args))
        q, k, v = a[:3]
        mask = kwargs.get("attn_mask", a[3])
        causal = kwargs.get("is_causal", a[5] or False)
        N, H, T, e = q.shape
        s = (q @ k.transpose(-1, -2)) * (e ** -0.5)
        if causal:
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        att = torch.softmax(s, dim=-1)
        M = 3 * T * e
        Hm = attention_hessian(q, k, v, att, grad_out).reshape(N, H, M, M)
        cols, w = symmetric_columns((Hm + Hm.transpose(-1, -2)) / 2)  # [N, H, M, 2M], [2M]
        cols = cols.reshape(N, H, 3, T, e, 2 * M)
        place = torch.eye(H, dtype=cols.dtype, device=cols.device).reshape(H, 1, 1, H, 1, 1)
        W = w.repeat(H).unsqueeze(1).expand(2 * H * M, N)
        out = {}
        for part, slot in enumerate(((0,), (1,), (2,))):
            if slot in self.live:
                c = cols[:, :, part].permute(1, 4, 0, 2, 3)  # [H, 2M, N, T, e]
                out[slot] = Factor((c.unsqueeze(3) * place).reshape(2 * H * M, N, H, T, e), W)
        return out


OP_RULES.register("aten.scaled_dot_product_attention.default", Attention())
OP_RULES.register("aten._softmax.default", LinearOp(
    _with(lambda m: "normalises over the batch dimension" if _norm(m.args[1], _first_live_ndim(m)) == 0 else None),
    nonlinear=True, doc="softmax over a dim other than 0 (GGN and Fishers)"))
OP_RULES.register("aten.matmul.default", LinearOp(
    _with(lambda m: None if all(len(_shape(slot_value(m.args, s))) >= 3 for s in m.live)
          else "multiplies a matrix whose rows are the samples"),
    bilinear=True, doc="batched matmul (exact Hessian: one live factor)"))

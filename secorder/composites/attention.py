"""Scaled dot-product attention through PyTorch's math kernel.

``torch.nn.functional.scaled_dot_product_attention`` dispatches to fused kernels
(flash, memory-efficient, the fused CPU kernel) whose backward is itself not
differentiable and which have no forward-mode rule. The math kernel
(``aten._scaled_dot_product_attention_math``) is a composite of ``matmul``,
``softmax`` and friends, with the same semantics (masks, ``is_causal``, ``scale``,
``enable_gqa``, dropout), so every derivative of every order exists. Its cost is
that of unfused attention: the ``(..., L, S)`` attention weights are
materialised, once per evaluation and in the saved graph (``N * heads * L * S``
numbers per attention call, per probe when products are batched).

Example:
    >>> import torch, torch.nn.functional as F
    >>> q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    >>> torch.allclose(sdpa(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True))
    True
"""

from __future__ import annotations

import inspect
from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import register

__all__ = ["sdpa", "multi_head_attention_forward"]


@register(
    F.scaled_dot_product_attention,
    why="the fused kernels have no double backward and no forward-mode rule; the math kernel runs instead",
)
def sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
    """``F.scaled_dot_product_attention`` by the math kernel (same arguments, same result).

    A boolean mask (``True``: attend) becomes the additive float mask that
    PyTorch's dispatcher gives the math kernel (``-inf`` where ``False``). A
    query that may attend to nothing (a fully masked row) gets zeros, as
    PyTorch's kernels give, but computed from a finite row: the math kernel's
    own handling of such rows has ``nan`` third derivatives in reverse mode.
    """
    if attn_mask is None:
        return _math(query, key, value, None, dropout_p, is_causal, scale, enable_gqa)
    if attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            attn_mask.logical_not(), float("-inf"))
    dead = (attn_mask == float("-inf")).all(-1, keepdim=True)
    out = _math(query, key, value, attn_mask.masked_fill(dead, 0.0), dropout_p, is_causal, scale, enable_gqa)
    return out.masked_fill(dead, 0.0)


def _math(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
          is_causal: bool, scale: Optional[float], enable_gqa: bool) -> Tensor:
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, None, scale=scale, enable_gqa=enable_gqa
    )[0]


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def _mha_without_weights(*args: Any, **kwargs: Any) -> bool:
    try:
        bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    except TypeError:
        return False  # PyTorch raises its own error
    return not bound.arguments.get("need_weights", True)


@register(
    F.multi_head_attention_forward, applies=_mha_without_weights,
    why="with need_weights=False it calls the fused attention from inside PyTorch, out of the composites' reach; "
        "the explicit path (need_weights=True) runs and the weights are dropped",
)
def multi_head_attention_forward(*args: Any, **kwargs: Any) -> Tuple[Tensor, None]:
    """``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) with ``need_weights=False``, unfused.

    PyTorch runs the body of a function it dispatches to a ``TorchFunctionMode``
    with the mode switched off, so the fused attention inside it would not be
    replaced; its ``need_weights=True`` branch computes the same output with
    ``bmm`` and ``softmax``.

    Example:
        >>> import torch
        >>> m = torch.nn.MultiheadAttention(4, 2, batch_first=True).double().eval()
        >>> x = torch.randn(2, 3, 4, dtype=torch.float64)
        >>> from secorder.composites import differentiable_ops
        >>> with differentiable_ops():
        ...     out, weights = m(x, x, x, need_weights=False)
        >>> torch.allclose(out, m(x, x, x, need_weights=False)[0]), weights
        (True, None)
    """
    bound = _MHA_SIGNATURE.bind(*args, **kwargs)
    bound.arguments["need_weights"] = True
    out, _ = F.multi_head_attention_forward(*bound.args, **bound.kwargs)
    return out, None

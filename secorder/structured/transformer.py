"""Modules to write a transformer with, so that the structured engine takes it.

Write the model as an ``nn.Sequential`` of these and of ``nn.Embedding``,
``nn.LayerNorm``, ``nn.Linear``, ``nn.GELU``, ``nn.Dropout`` and
:class:`~secorder.structured.blocks.Residual` blocks; end it in
``nn.Flatten(0, 1)`` before ``nn.CrossEntropyLoss`` on flattened targets, or in
``Transpose(1, 2)`` for ``nn.CrossEntropyLoss`` on ``[batch, vocab, tokens]``
logits. A pre-LN language model:

    >>> import torch, secorder as so
    >>> from torch import nn
    >>> d, heads, vocab, T = 8, 2, 5, 4
    >>> block = lambda: nn.Sequential(
    ...     so.Residual(nn.Sequential(nn.LayerNorm(d), so.SelfAttention(d, heads, causal=True))),
    ...     so.Residual(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))))
    >>> model = nn.Sequential(nn.Embedding(vocab, d), so.PositionalEmbedding(T, d), block(), block(),
    ...                       nn.LayerNorm(d), nn.Linear(d, vocab), nn.Flatten(0, 1))
    >>> f = so.functional_loss(model, nn.CrossEntropyLoss())
    >>> tokens = torch.randint(0, vocab, (3, T))
    >>> fn = so.ggn_diag(f)
    >>> d_ggn = fn(so.params_dict(model), tokens, tokens.roll(-1, 1).flatten())
    >>> fn.last_engine, d_ggn["2.0.body.1.in_proj.weight"].shape
    ('structured', torch.Size([24, 8]))

:class:`SelfAttention` is an ``nn.Sequential`` of an input projection
(``nn.Linear(d, 3 d)``), the parameter-free :class:`ScaledDotProductAttention` and
an output projection, so its parameters are those of two linear layers
(``in_proj.weight`` stacks the query, key and value weights, as
``nn.MultiheadAttention``'s ``in_proj_weight`` does).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Tuple

import torch
from torch import Tensor, nn

__all__ = ["ScaledDotProductAttention", "SelfAttention", "PositionalEmbedding", "Transpose", "attention"]


def attention(qkv: Tensor, num_heads: int, causal: bool) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Multi-head scaled dot-product attention of packed ``[..., T, 3 d]`` queries, keys and values.

    Returns the output ``[..., T, d]`` and ``(q, k, v, a)``, each ``[..., heads, T, d / heads]``
    (``a``, the attention weights, ``[..., heads, T, T]``).

    Example:
        >>> out, (q, k, v, a) = attention(torch.randn(2, 5, 12), 2, causal=True)
        >>> out.shape, a.shape, bool(a[0, 0, 0, 1:].abs().sum() == 0)
        (torch.Size([2, 5, 4]), torch.Size([2, 2, 5, 5]), True)
    """
    *lead, T, D3 = qkv.shape
    d = D3 // 3
    dh = d // num_heads
    parts = qkv.reshape(tuple(lead) + (T, 3, num_heads, dh)).movedim(-4, -2)  # [..., 3, heads, T, dh]
    q, k, v = parts.unbind(-4)
    s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(dh))
    if causal:
        future = torch.ones(T, T, dtype=torch.bool, device=qkv.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    a = torch.softmax(s, dim=-1)
    o = a @ v  # [..., heads, T, dh]
    return o.movedim(-3, -2).reshape(tuple(lead) + (T, d)), (q, k, v, a)


class ScaledDotProductAttention(nn.Module):
    """The parameter-free core of multi-head self-attention: ``[N, T, 3 d]`` packed q|k|v to ``[N, T, d]``.

    Each of the query, key and value parts holds ``num_heads`` heads of
    ``d / num_heads`` features; head ``h`` computes
    ``softmax(q_h k_h^T / sqrt(d / num_heads) + mask) v_h``, with the future
    masked out when ``causal``.

    Args:
        num_heads: the number of heads.
        causal: mask out attention to later positions.

    Example:
        >>> ScaledDotProductAttention(2, causal=True)(torch.randn(3, 4, 12)).shape
        torch.Size([3, 4, 4])
    """

    def __init__(self, num_heads: int, *, causal: bool = False) -> None:
        super().__init__()
        if isinstance(num_heads, bool) or not isinstance(num_heads, int):
            raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
        if num_heads < 1:
            raise ValueError(f"num_heads must be positive, got {num_heads}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.num_heads, self.causal = num_heads, causal

    def forward(self, qkv: Tensor) -> Tensor:
        if qkv.dim() < 2 or qkv.shape[-1] % (3 * self.num_heads):
            raise ValueError(f"qkv must be [..., T, 3 * d] with d divisible by num_heads={self.num_heads}, "
                             f"got shape {tuple(qkv.shape)}")
        return attention(qkv, self.num_heads, self.causal)[0]

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, causal={self.causal}"


class SelfAttention(nn.Sequential):
    """Multi-head self-attention as a model the structured engine takes: ``[N, T, d]`` to ``[N, T, d]``.

    ``in_proj`` (``nn.Linear(d, 3 d)``: queries, keys and values, each
    ``num_heads`` heads of ``d / num_heads``), ``attend``
    (:class:`ScaledDotProductAttention`) and ``out_proj`` (``nn.Linear(d, d)``),
    in this order. The same function as ``nn.MultiheadAttention(d, num_heads,
    batch_first=True)`` called as ``mha(x, x, x)[0]`` when its ``in_proj_weight``/
    ``in_proj_bias``/``out_proj`` are copied over (and ``causal`` corresponds to a
    causal ``attn_mask``).

    Args:
        embed_dim: ``d``, the model width (divisible by ``num_heads``).
        num_heads: the number of heads.
        causal: each position attends to itself and earlier positions only.
        bias: give both projections a bias.

    Example:
        >>> attn = SelfAttention(8, 2, causal=True)
        >>> attn(torch.randn(3, 5, 8)).shape, attn.in_proj.weight.shape
        (torch.Size([3, 5, 8]), torch.Size([24, 8]))
    """

    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool = False, bias: bool = True) -> None:
        for name, v in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name} must be positive, got {v}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads}")
        super().__init__(OrderedDict([
            ("in_proj", nn.Linear(embed_dim, 3 * embed_dim, bias=bias)),
            ("attend", ScaledDotProductAttention(num_heads, causal=causal)),
            ("out_proj", nn.Linear(embed_dim, embed_dim, bias=bias)),
        ]))


class PositionalEmbedding(nn.Module):
    """A learned positional embedding added to ``[N, T, d]`` inputs: ``x + weight[:T]``.

    Args:
        num_positions: the longest sequence (``T <= num_positions``).
        embedding_dim: ``d``.

    Example:
        >>> pe = PositionalEmbedding(6, 4)
        >>> pe(torch.zeros(2, 3, 4)).shape, pe.weight.shape
        (torch.Size([2, 3, 4]), torch.Size([6, 4]))
    """

    def __init__(self, num_positions: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_positions, embedding_dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        T = x.shape[-2]
        if T > self.weight.shape[0]:
            raise ValueError(f"x has {T} positions (shape {tuple(x.shape)}), more than "
                             f"num_positions={self.weight.shape[0]}")
        return x + self.weight[:T]


class Transpose(nn.Module):
    """``x.transpose(dim0, dim1)`` as a module (dims counted with the batch, neither of them 0).

    ``Transpose(1, 2)`` turns ``[N, T, vocab]`` logits into the ``[N, vocab, T]``
    that ``nn.CrossEntropyLoss`` takes with ``[N, T]`` targets.

    Example:
        >>> Transpose(1, 2)(torch.zeros(2, 3, 5)).shape
        torch.Size([2, 5, 3])
    """

    def __init__(self, dim0: int, dim1: int) -> None:
        super().__init__()
        for name, v in (("dim0", dim0), ("dim1", dim1)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
            if v == 0:
                raise ValueError(f"{name} must not be the batch dimension 0")
        self.dim0, self.dim1 = dim0, dim1

    def forward(self, x: Tensor) -> Tensor:
        return x.transpose(self.dim0, self.dim1)

    def extra_repr(self) -> str:
        return f"dim0={self.dim0}, dim1={self.dim1}"

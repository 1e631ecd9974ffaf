"""``embedding`` with ``padding_idx`` as a gather whose padding rows are constants; ``embedding_bag`` as a gather.

PyTorch's ``embedding`` backward leaves the ``padding_idx`` row of the weight
without gradient (the padding vector is a constant), but its forward-mode rule
ignores ``padding_idx``: a forward-over-reverse Hessian-vector product then
differs from the Hessian, and is not even symmetric, wherever the padding token
occurs. The composite gathers the rows and detaches those at padding positions,
so reverse and forward mode agree with the backward's definition.

``embedding_bag`` (DLRM, fastText) has no double backward and no forward-mode
rule at all; the composite gathers the rows and sums, averages or maximises
them per bag with ``index_add`` and ``scatter_reduce``.

Example:
    >>> import torch, torch.nn.functional as F
    >>> w = torch.randn(5, 3, dtype=torch.float64)
    >>> idx = torch.tensor([[0, 2], [4, 0]])
    >>> torch.equal(embedding(idx, w, padding_idx=0), F.embedding(idx, w, padding_idx=0))
    True
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import register

__all__ = ["embedding", "embedding_bag"]


def _applies(input: Tensor, weight: Tensor, padding_idx: Optional[int] = None, max_norm: Optional[float] = None,
             norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> bool:
    if max_norm is not None:  # refused under torch.func (see embedding); in plain autograd PyTorch's, in place
        return torch._C._functorch.peek_interpreter_stack() is not None
    # scale_grad_by_freq changes the backward on purpose: it stays PyTorch's. So do out-of-range padding
    # indices (PyTorch raises).
    if padding_idx is None or scale_grad_by_freq or sparse:
        return False
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not isinstance(input, Tensor):
        return False
    return -weight.shape[0] <= padding_idx < weight.shape[0]


@register(
    F.embedding, applies=_applies,
    why="the forward-mode rule ignores padding_idx (forward-over-reverse products are wrong there); "
        "max_norm renormalises the weight in place, which torch.func cannot differentiate: a clear error",
)
def embedding(input: Tensor, weight: Tensor, padding_idx: Optional[int] = None, max_norm: Optional[float] = None,
              norm_type: float = 2.0, scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """``F.embedding`` with ``padding_idx`` (no ``max_norm``), padding rows constant in every mode.

    With ``max_norm`` under a ``torch.func`` transform: a ``ValueError`` naming the
    embedding and the cause. The forward pass renormalises the rows it looks up *in
    place*, a side effect on the weight that a transform of ``f`` cannot
    differentiate (its reverse mode refuses it, its forward mode silently changed
    the user's weight and differentiated the renormalised one).
    """
    if max_norm is not None:
        raise ValueError(
            f"an nn.Embedding({weight.shape[0]}, {weight.shape[1] if weight.dim() > 1 else ''}, max_norm={max_norm}) "
            "(F.embedding with max_norm) renormalises the rows it looks up in place, in every forward pass: f "
            "changes its own weight, which secorder's transforms cannot differentiate (and must not do to your "
            "parameters). Build the embedding without max_norm for the curvature computation (the rows of a "
            "trained model already satisfy it; or renormalise between steps: with torch.no_grad(): "
            "emb.weight.renorm_(2, 0, max_norm))")
    if padding_idx < 0:
        padding_idx += weight.shape[0]
    rows = weight[input]
    return torch.where((input == padding_idx).unsqueeze(-1), rows.detach(), rows)


def _bag_applies(input: Tensor, weight: Tensor, offsets: Optional[Tensor] = None, max_norm: Optional[float] = None,
                 norm_type: float = 2, scale_grad_by_freq: bool = False, mode: str = "mean", sparse: bool = False,
                 per_sample_weights: Optional[Tensor] = None, include_last_offset: bool = False,
                 padding_idx: Optional[int] = None) -> bool:
    if max_norm is not None:  # refused under torch.func, as for embedding
        return torch._C._functorch.peek_interpreter_stack() is not None
    if scale_grad_by_freq or sparse or mode not in ("sum", "mean", "max"):
        return False
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor) or weight.dim() != 2:
        return False
    if input.dim() == 2:
        return offsets is None and (per_sample_weights is None or per_sample_weights.shape == input.shape)
    if input.dim() != 1 or not isinstance(offsets, Tensor) or offsets.dim() != 1:
        return False
    if per_sample_weights is not None and (mode != "sum" or per_sample_weights.shape != input.shape):
        return False  # PyTorch raises its own error
    return padding_idx is None or -weight.shape[0] <= padding_idx < weight.shape[0]


@register(
    F.embedding_bag, applies=_bag_applies,
    why="no double backward and no forward-mode rule (derivative for _embedding_bag_backward is not implemented)",
)
def embedding_bag(input: Tensor, weight: Tensor, offsets: Optional[Tensor] = None, max_norm: Optional[float] = None,
                  norm_type: float = 2, scale_grad_by_freq: bool = False, mode: str = "mean", sparse: bool = False,
                  per_sample_weights: Optional[Tensor] = None, include_last_offset: bool = False,
                  padding_idx: Optional[int] = None) -> Tensor:
    """``F.embedding_bag`` as a gather and a per-bag ``index_add`` (sum, mean) or ``scatter_reduce`` (max).

    Bags come from ``offsets`` (1-dim ``input``) or are the rows of a 2-dim
    ``input``; ``padding_idx`` entries neither contribute nor count; empty bags
    give zeros, as PyTorch's kernel gives.
    """
    if max_norm is not None:
        embedding(input, weight, max_norm=max_norm)  # raises the max_norm error
    if input.dim() == 2:
        bags = input.shape[0]
        flat = input.reshape(-1)
        bag = torch.arange(bags, device=input.device).repeat_interleave(input.shape[1])
        psw = None if per_sample_weights is None else per_sample_weights.reshape(-1)
    else:
        flat, psw = input, per_sample_weights
        bags = offsets.numel() - (1 if include_last_offset else 0)
        starts = offsets[:bags]
        positions = torch.arange(flat.numel(), device=input.device)
        bag = torch.bucketize(positions, starts.to(positions.dtype), right=True) - 1
        if include_last_offset:  # entries at or past the last offset belong to no bag
            inside = positions < offsets[bags]
            flat, bag = flat[inside], bag[inside]
            psw = None if psw is None else psw[inside]
    rows = weight[flat]
    if psw is not None:
        rows = rows * psw.unsqueeze(-1).to(rows.dtype)
    keep = None
    if padding_idx is not None:
        keep = flat != (padding_idx + weight.shape[0] if padding_idx < 0 else padding_idx)
    out_shape = (bags, weight.shape[1])
    if mode == "max":
        if keep is not None:
            rows = rows.masked_fill(~keep.unsqueeze(-1), float("-inf"))
        base = torch.full(out_shape, float("-inf"), dtype=rows.dtype, device=rows.device)
        out = base.scatter_reduce(0, bag.unsqueeze(-1).expand_as(rows), rows, "amax", include_self=True)
        return out.masked_fill(out == float("-inf"), 0.0)  # empty bags
    if keep is not None:
        rows = rows * keep.unsqueeze(-1).to(rows.dtype)
    total = torch.zeros(out_shape, dtype=rows.dtype, device=rows.device).index_add(0, bag, rows)
    if mode == "sum":
        return total
    ones = torch.ones(flat.shape, dtype=rows.dtype, device=rows.device) if keep is None else keep.to(rows.dtype)
    counts = torch.zeros(bags, dtype=rows.dtype, device=rows.device).index_add(0, bag, ones)
    return total / counts.clamp_min(1).unsqueeze(-1)

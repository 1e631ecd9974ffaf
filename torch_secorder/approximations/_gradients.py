"""The squared gradient behind 0.0.1's "Fisher" functions: one backward pass, zeros for unused parameters."""

from __future__ import annotations

import warnings
from typing import List, Sequence

import torch
from torch import Tensor

from .._fused import HINT, has_fused_attention
from ..autograd_operator import attach_zero_grad
from ..core import _common


def squared_gradient(
    loss: Tensor, params: Sequence[Tensor], *, create_graph: bool = False, retain_graph: bool = False
) -> List[Tensor]:
    """``g * g`` for the gradient ``g`` of ``loss`` with respect to each of ``params``.

    Every parameter must require grad (PyTorch's ``RuntimeError`` otherwise, as
    in 0.0.1); one the loss does not use gets zeros. With ``create_graph`` the
    squares are differentiable with respect to the parameters; with
    ``retain_graph`` the loss's graph survives (outputs the caller computed).

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, -2.0], requires_grad=True)
        >>> squared_gradient((w ** 2).sum(), [w])          # (2 w)^2
        [tensor([ 4., 16.])]
    """
    params = list(params)
    _common.require_grad(params)
    if create_graph and has_fused_attention(loss):
        warnings.warn(f"create_graph=True: the squared gradient will be differentiated again, but {HINT}",
                      UserWarning, stacklevel=3)
    with torch.enable_grad():
        grads = torch.autograd.grad(
            loss, params, create_graph=create_graph, retain_graph=retain_graph or create_graph, allow_unused=True
        )
        squares = [torch.zeros_like(p) if g is None else g * g for g, p in zip(grads, params)]
        if create_graph:
            squares = [s if s.requires_grad else attach_zero_grad(s, params) for s in squares]
    return squares


def total(values: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """The sum of all entries of ``values`` as a 0-dim tensor in the parameters' promoted dtype."""
    out = _common.zero_scalar(list(params))
    for v in values:
        out = out + v.sum().to(out.dtype)
    return out

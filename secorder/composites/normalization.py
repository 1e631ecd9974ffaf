"""Layer, batch and instance normalisation as composites of means and ``rsqrt``.

PyTorch's double-backward formulas for ``native_layer_norm`` and
``native_batch_norm`` (which ``instance_norm`` also runs) are correct as second
derivatives, but are not themselves differentiated correctly: third derivatives
(the gradient of a Hessian-trace penalty, the gradient of a PINN loss through an
exact Laplacian) come out wrong, by as much as the values themselves, and the
double backward writes in place, which ``torch.func.vmap`` refuses. The
composites below compute the same values from ``mean``, subtraction and ``rsqrt``,
whose derivatives of every order are right. Inputs in half precision are
normalised in ``float32`` and cast back, as PyTorch's kernels do.

Calls these composites would not compute exactly as PyTorch does (shapes that do
not match, a single value per channel in training) are left to PyTorch, which
raises its own error.

Example:
    >>> import torch, torch.nn.functional as F
    >>> x = torch.randn(4, 3, 5, dtype=torch.float64)
    >>> torch.allclose(layer_norm(x, (5,)), F.layer_norm(x, (5,)))
    True
    >>> torch.allclose(batch_norm(x, None, None, training=True), F.batch_norm(x, None, None, training=True))
    True
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import register

__all__ = ["layer_norm", "batch_norm", "instance_norm"]

_LOW = (torch.float16, torch.bfloat16)


def _shape(normalized_shape: Union[int, Sequence[int], torch.Size]) -> Tuple[int, ...]:
    return (int(normalized_shape),) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)


def _standardise(x: Tensor, dims: Tuple[int, ...], eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` (biased variance), with the mean and variance."""
    work = x.float() if x.dtype in _LOW else x
    mean = work.mean(dims, keepdim=True)
    centred = work - mean
    var = (centred * centred).mean(dims, keepdim=True)
    return (centred * torch.rsqrt(var + eps)).to(x.dtype), mean, var


def _layer_norm_applies(input: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> bool:
    try:
        shape = _shape(normalized_shape)
    except (TypeError, ValueError):
        return False
    k = len(shape)
    return (
        isinstance(input, Tensor) and 0 < k <= input.dim() and tuple(input.shape[input.dim() - k:]) == shape
        and all(p is None or (isinstance(p, Tensor) and tuple(p.shape) == shape) for p in (weight, bias))
    )


@register(
    F.layer_norm, torch.layer_norm, applies=_layer_norm_applies,
    why="third derivatives are wrong and the double backward writes in place (vmap refuses it)",
)
def layer_norm(input: Tensor, normalized_shape: Union[int, Sequence[int]], weight: Optional[Tensor] = None,
               bias: Optional[Tensor] = None, eps: float = 1e-5, *_: object) -> Tensor:
    """``F.layer_norm`` as a composite (same arguments, same result)."""
    k = len(_shape(normalized_shape))
    out, _, _ = _standardise(input, tuple(range(-k, 0)), eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


def _channel_view(p: Tensor, dim: int) -> Tensor:
    return p.reshape((1, -1) + (1,) * (dim - 2))


def _batch_norm_applies(input: Tensor, running_mean=None, running_var=None, weight=None, bias=None,
                        training: bool = False, momentum: float = 0.1, eps: float = 1e-5) -> bool:
    if not training or not isinstance(input, Tensor) or input.dim() < 2:
        return False
    per_channel = input.numel() // max(input.shape[1], 1)
    channels = input.shape[1]
    sized = all(p is None or (isinstance(p, Tensor) and p.shape == (channels,))
                for p in (running_mean, running_var, weight, bias))
    return per_channel > 1 and sized and (running_mean is None) == (running_var is None)


@register(
    F.batch_norm, applies=_batch_norm_applies,
    why="training mode: third derivatives are wrong and the double backward writes in place",
)
def batch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Training-mode ``F.batch_norm`` as a composite, running statistics updated as PyTorch updates them."""
    dims = (0,) + tuple(range(2, input.dim()))
    out, mean, var = _standardise(input, dims, eps)
    if running_mean is not None:
        n = input.numel() // input.shape[1]
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.detach().reshape(-1).to(running_mean.dtype), alpha=momentum)
            unbiased = var.detach().reshape(-1) * (n / (n - 1))
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    if weight is not None:
        out = out * _channel_view(weight, input.dim())
    if bias is not None:
        out = out + _channel_view(bias, input.dim())
    return out


def _instance_norm_applies(input: Tensor, running_mean=None, running_var=None, weight=None, bias=None,
                           use_input_stats: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> bool:
    if not use_input_stats or running_mean is not None or running_var is not None:
        return False
    if not isinstance(input, Tensor) or input.dim() < 3 or input.numel() // max(input.shape[0] * input.shape[1], 1) <= 1:
        return False
    return all(p is None or (isinstance(p, Tensor) and p.shape == (input.shape[1],)) for p in (weight, bias))


@register(
    F.instance_norm, applies=_instance_norm_applies,
    why="runs batch_norm: third derivatives are wrong and the double backward writes in place",
)
def instance_norm(input: Tensor, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                  weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``F.instance_norm`` with input statistics and no running statistics, as a composite."""
    out, _, _ = _standardise(input, tuple(range(2, input.dim())), eps)
    if weight is not None:
        out = out * _channel_view(weight, input.dim())
    if bias is not None:
        out = out + _channel_view(bias, input.dim())
    return out

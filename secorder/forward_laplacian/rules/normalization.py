"""Normalization and dropout layers, as compositions of covered operations.

``layer_norm`` is ``(x - mean) / sqrt(var + eps) * weight + bias`` over the
normalized dimensions; ``batch_norm`` in evaluation mode is an affine map per
channel with the running statistics. ``dropout`` with ``training=False`` (or
``p = 0``) is the identity. Batch normalization in training mode (it updates
the running statistics in place) and active dropout (random masks) are left
uncovered: the exact fallback runs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import register
from ..jet import map_args
from .common import check_not_inplace, is_jet, primal, traced, uncovered


def _arg(args, kwargs, position, name, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def _check_with_pytorch(func, args, kwargs):
    """Run ``func`` on the values (cheap next to the jets): an invalid call raises PyTorch's own error."""
    func(*map_args(primal, args), **map_args(primal, kwargs))


@register(F.layer_norm)
def _layer_norm(func, args, kwargs):
    _check_with_pytorch(func, args, kwargs)
    x = traced(args[0])
    shape = _arg(args, kwargs, 1, "normalized_shape")
    weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    eps = _arg(args, kwargs, 4, "eps", 1e-5)
    dims = tuple(range(-len(tuple(shape)), 0))
    centred = x - x.mean(dims, keepdim=True)
    y = centred * torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * traced(weight)
    if bias is not None:
        y = y + traced(bias)
    return y


@register(F.batch_norm)
def _batch_norm(func, args, kwargs):
    x = args[0]
    mean, var = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
    weight, bias = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
    training = _arg(args, kwargs, 5, "training", False)
    eps = _arg(args, kwargs, 7, "eps", 1e-5)
    if training or mean is None or var is None or is_jet(mean) or is_jet(var):
        raise uncovered(func, "training mode (batch statistics, running-statistics updates)")
    _check_with_pytorch(func, args, kwargs)
    t = traced(x)
    channels = (1, -1) + (1,) * (t.dim() - 2) if t.dim() > 1 else (-1,)
    y = (t - mean.reshape(channels)) * torch.rsqrt(var.reshape(channels) + eps)
    if weight is not None:
        y = y * traced(weight).reshape(channels)
    if bias is not None:
        y = y + traced(bias).reshape(channels)
    return y


@register(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout)
def _dropout(func, args, kwargs):
    p = _arg(args, kwargs, 1, "p", 0.5)
    training = _arg(args, kwargs, 2, "training", True)
    check_not_inplace(func, args, kwargs, 3)
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
        func(primal(args[0]), p, False)  # PyTorch's own error for the probability
        raise uncovered(func, f"p={p!r}")
    if training and p > 0:
        raise uncovered(func, "training=True with p > 0 (a random mask)")
    return args[0]

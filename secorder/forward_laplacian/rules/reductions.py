"""Reductions: sums and means, norms, ``logsumexp``/``softmax``, maxima and minima.

Sums and means are linear: the Jacobian is reduced over the same dimensions,
shifted past the leading direction dimension. Norms, ``logsumexp``, ``softmax``
and ``log_softmax`` are compositions of covered operations (``||x||_2 =
sqrt(sum x^2)``; ``logsumexp(x) = log(sum(exp(x - c))) + c`` with ``c`` the
maximum taken as a constant, exact because the identity holds for every ``c``).
A maximum or minimum is a weighted sum of the entries with constant weights:
one-hot at the returned index for ``max(x, dim)``, split evenly among ties for
``amax`` and full reductions -- the choices PyTorch's backward makes.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

from ..jet import make_jet
from ..registry import register
from .common import constant, is_jet, linear, shift_dim, traced, uncovered


def _arg(args, kwargs, position, name, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def _all_dims(dim) -> bool:
    return dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0)


def _reduced_jac(func, args, kwargs, value):
    """Jacobian of ``sum``/``mean``/``nansum``-like reductions: the same reduction over shifted dimensions."""
    x = args[0]
    dim = _arg(args, kwargs, 1, "dim")
    keepdim = _arg(args, kwargs, 2, "keepdim", False)
    options = {k: v for k, v in kwargs.items() if k not in ("dim", "keepdim", "input")}
    if _all_dims(dim):
        dims = tuple(range(1, x.jac.dim()))
        if not dims:
            return x.jac
    else:
        dims = shift_dim(dim if isinstance(dim, (tuple, list)) else (dim,))
    return func(x.jac, dims, keepdim, **options)


register(torch.sum, torch.Tensor.sum, torch.mean, torch.Tensor.mean)(linear(_reduced_jac))


def _cumsum_jac(func, args, kwargs, value):
    dim = _arg(args, kwargs, 1, "dim")
    options = {k: v for k, v in kwargs.items() if k not in ("dim", "input")}
    return func(args[0].jac, shift_dim(dim), **options)


register(torch.cumsum, torch.Tensor.cumsum)(linear(_cumsum_jac))
register(torch.trace, torch.Tensor.trace)(linear())


# --- compositions ------------------------------------------------------------------------------------


def _stable_shift(value, dim):
    """The maximum over ``dim`` (kept), as a constant, with infinite maxima replaced by 0."""
    m = torch.amax(value, dim=dim, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


@register(torch.logsumexp, torch.Tensor.logsumexp, torch.special.logsumexp)
def _logsumexp(func, args, kwargs):
    x, dim = args[0], _arg(args, kwargs, 1, "dim")
    keepdim = _arg(args, kwargs, 2, "keepdim", False)
    m = _stable_shift(x.value, dim)
    out = torch.log(torch.sum(torch.exp(traced(x) - m), dim=dim, keepdim=True)) + m
    return out if keepdim else out.squeeze(dim)


def _softmax_args(func, args, kwargs):
    x = args[0]
    dim = _arg(args, kwargs, 1, "dim")
    dtype = kwargs.get("dtype")
    if dim is None:
        raise uncovered(func, "dim=None (the implicit dimension choice is deprecated); pass dim")
    t = traced(x)
    if dtype is not None:
        t = t.to(dtype)
        m = _stable_shift(x.value.to(dtype), dim)
    else:
        m = _stable_shift(x.value, dim)
    return t - m, dim


@register(torch.softmax, torch.Tensor.softmax, F.softmax, torch.special.softmax)
def _softmax(func, args, kwargs):
    shifted, dim = _softmax_args(func, args, kwargs)
    e = torch.exp(shifted)
    return e / e.sum(dim=dim, keepdim=True)


@register(torch.log_softmax, torch.Tensor.log_softmax, F.log_softmax, torch.special.log_softmax)
def _log_softmax(func, args, kwargs):
    shifted, dim = _softmax_args(func, args, kwargs)
    return shifted - torch.log(torch.exp(shifted).sum(dim=dim, keepdim=True))


def _vector_norm(func, t, ord, dim, keepdim):
    """The ``ord``-norm of the traced tensor ``t`` over ``dim`` (all entries for ``None``)."""
    if isinstance(ord, str) or not isinstance(ord, numbers.Number):
        raise uncovered(func, f"ord={ord!r}")
    if ord == 2:
        return torch.sqrt(torch.sum(t * t, dim=dim, keepdim=keepdim))
    if ord == math.inf:
        return torch.amax(torch.abs(t), dim=() if dim is None else dim, keepdim=keepdim)
    if ord == -math.inf:
        return torch.amin(torch.abs(t), dim=() if dim is None else dim, keepdim=keepdim)
    if ord == 1:
        return torch.sum(torch.abs(t), dim=dim, keepdim=keepdim)
    if ord == 0:
        raise uncovered(func, "ord=0 (a count, not differentiable)")
    return torch.sum(torch.abs(t) ** ord, dim=dim, keepdim=keepdim) ** (1.0 / ord)


def _cast(t, dtype):
    return t if dtype is None else t.to(dtype)


@register(torch.linalg.vector_norm)
def _linalg_vector_norm(func, args, kwargs):
    x = args[0]
    ord = _arg(args, kwargs, 1, "ord", 2)
    dim = _arg(args, kwargs, 2, "dim")
    keepdim = _arg(args, kwargs, 3, "keepdim", False)
    return _vector_norm(func, _cast(traced(x), kwargs.get("dtype")), ord, dim, keepdim)


@register(torch.linalg.norm)
def _linalg_norm(func, args, kwargs):
    x = args[0]
    ord = _arg(args, kwargs, 1, "ord")
    dim = _arg(args, kwargs, 2, "dim")
    keepdim = _arg(args, kwargs, 3, "keepdim", False)
    t = _cast(traced(x), kwargs.get("dtype"))
    matrix = (isinstance(dim, (tuple, list)) and len(dim) == 2) or (dim is None and ord is not None and x.value.dim() == 2)
    if ord is None or (matrix and ord == "fro"):
        return _vector_norm(func, t, 2, dim, keepdim)
    if matrix:
        raise uncovered(func, f"the matrix norm ord={ord!r}")
    return _vector_norm(func, t, ord, dim, keepdim)


@register(torch.norm, torch.functional.norm, torch.Tensor.norm)
def _norm(func, args, kwargs):
    x = args[0]
    p = _arg(args, kwargs, 1, "p", "fro")
    dim = _arg(args, kwargs, 2, "dim")
    keepdim = _arg(args, kwargs, 3, "keepdim", False)
    t = _cast(traced(x), kwargs.get("dtype"))
    if p == "fro" or p is None:
        return _vector_norm(func, t, 2, dim, keepdim)
    return _vector_norm(func, t, p, dim, keepdim)


# --- maxima and minima -------------------------------------------------------------------------------


def _weighted(x, weights, dim, keepdim, value):
    """The jet of a selection ``value = sum(weights * x, dim)`` with constant ``weights``."""
    if _all_dims(dim):
        jac_dims = tuple(range(1, x.jac.dim()))
        lap_dims = tuple(range(x.lap.dim()))
    else:
        dims = dim if isinstance(dim, (tuple, list)) else (dim,)
        jac_dims, lap_dims = shift_dim(tuple(dims)), tuple(dims)
    jac = (x.jac * weights).sum(jac_dims, keepdim=keepdim) if jac_dims else x.jac * weights
    lap = (x.lap * weights).sum(lap_dims, keepdim=keepdim) if lap_dims else x.lap * weights
    return make_jet(value, jac, lap, x.trace)


def _evenly(x, value_kept, dim, keepdim, value):
    ties = (x.value == value_kept).to(x.value.dtype)
    weights = ties / (ties.sum() if _all_dims(dim) else ties.sum(dim=dim, keepdim=True))
    return _weighted(x, weights, dim, keepdim, value)


def _extremum(greatest: bool):
    elementwise = torch.maximum if greatest else torch.minimum

    def rule(func, args, kwargs):
        x = args[0]
        other = _arg(args, kwargs, 1, "dim")
        if isinstance(other, torch.Tensor) or is_jet(other):  # torch.max(a, b) is the elementwise maximum
            return elementwise(traced(x), traced(other))
        if not is_jet(x):
            return constant(func, args, kwargs)
        if other is None:  # a full reduction: ties share the derivative evenly, as in PyTorch
            value = func(x.value)
            return _evenly(x, value, None, False, value)
        keepdim = _arg(args, kwargs, 2, "keepdim", False)
        result = func(x.value, other, keepdim)
        values, indices = result
        kept = indices if keepdim else indices.unsqueeze(other)
        weights = torch.zeros_like(x.value).scatter(other, kept, 1.0)
        return type(result)((_weighted(x, weights, other, keepdim, values), indices))

    return rule


register(torch.max, torch.Tensor.max)(_extremum(True))
register(torch.min, torch.Tensor.min)(_extremum(False))


def _amax_like(select):
    def rule(func, args, kwargs):
        x = args[0]
        dim = _arg(args, kwargs, 1, "dim", ())
        keepdim = _arg(args, kwargs, 2, "keepdim", False)
        value = func(x.value, dim, keepdim)
        kept = select(x.value, dim, True)
        return _evenly(x, kept, dim, keepdim, value)

    return rule


register(torch.amax, torch.Tensor.amax)(_amax_like(torch.amax))
register(torch.amin, torch.Tensor.amin)(_amax_like(torch.amin))

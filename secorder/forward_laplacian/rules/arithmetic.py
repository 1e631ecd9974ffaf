"""Sums, differences, products, quotients and powers of tensors and numbers, with broadcasting.

The product rule is where the forward Laplacian differs from a Jacobian pass:
for ``y = a * b``, ``L_y = L_a b + a L_b + 2 sum_i J_a,i J_b,i``; for a quotient
``q = a / b`` (from ``q b = a``), ``J_q = (J_a - q J_b) / b`` and
``L_q = (L_a - q L_b - 2 sum_i J_q,i J_b,i) / b``. Jacobians are aligned to the
result's number of dimensions first (:func:`~.common.align`) so that the
directions never broadcast against a constant's dimensions.
"""

from __future__ import annotations

import functools
import math
import numbers

import torch
from torch import Tensor

from ..jet import Jet, lazy, make_jet
from ..registry import register
from .common import align, constant, is_jet, primal, sum_sq, traced, uncovered


def _scaled(jet_or_const, coefficient):
    """A term ``coefficient * jet`` of a linear combination, ``None`` for a constant."""
    return (jet_or_const, coefficient) if isinstance(jet_or_const, Jet) else None


def _times(t: Tensor, coefficient) -> Tensor:
    if isinstance(coefficient, numbers.Number) and coefficient == 1:
        return t
    return t * coefficient


def _combine(value: Tensor, terms, trace) -> Jet:
    """The jet of a linear combination whose value is ``value``; ``terms`` are ``_scaled`` results."""
    terms = [t for t in terms if t is not None]
    nd = value.dim()
    lap = functools.reduce(torch.add, [_times(jet.lap, c) for jet, c in terms])

    def jacobian() -> Tensor:
        return functools.reduce(torch.add, [_times(align(jet.jac, nd), c) for jet, c in terms])

    return make_jet(value, lazy(jacobian, *[c for _, c in terms]), lap, trace)


def _alpha(args, kwargs):
    return kwargs.get("alpha", args[2] if len(args) > 2 else 1)


@register(torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)
def _add(func, args, kwargs):
    a, b, alpha = args[0], args[1], _alpha(args, kwargs)
    value = func(primal(a), primal(b), *args[2:], **kwargs)
    trace = (a if is_jet(a) else b).trace
    return _combine(value, [_scaled(a, 1), _scaled(b, alpha)], trace)


@register(torch.sub, torch.subtract, torch.Tensor.sub, torch.Tensor.subtract, torch.Tensor.__sub__)
def _sub(func, args, kwargs):
    a, b, alpha = args[0], args[1], _alpha(args, kwargs)
    value = func(primal(a), primal(b), *args[2:], **kwargs)
    trace = (a if is_jet(a) else b).trace
    return _combine(value, [_scaled(a, 1), _scaled(b, -alpha)], trace)


@register(torch.rsub, torch.Tensor.__rsub__)
def _rsub(func, args, kwargs):
    # rsub(x, other, alpha) = other - alpha * x
    a, b, alpha = args[0], args[1], _alpha(args, kwargs)
    value = func(primal(a), primal(b), *args[2:], **kwargs)
    trace = (a if is_jet(a) else b).trace
    return _combine(value, [_scaled(a, -alpha), _scaled(b, 1)], trace)


@register(torch.neg, torch.negative, torch.Tensor.neg, torch.Tensor.negative, torch.Tensor.__neg__)
def _neg(func, args, kwargs):
    x = args[0]
    return Jet(func(x.value), lazy(lambda: -x.jac), -x.lap, x.trace)


@register(torch.positive, torch.Tensor.positive, torch.Tensor.__pos__)
def _positive(func, args, kwargs):
    return args[0]


@register(torch.mul, torch.multiply, torch.Tensor.mul, torch.Tensor.multiply, torch.Tensor.__mul__,
          torch.Tensor.__rmul__)
def _mul(func, args, kwargs):
    a, b = args[0], args[1]
    va, vb = primal(a), primal(b)
    value = func(va, vb)
    nd = value.dim()
    if is_jet(a) and is_jet(b):
        ja, jb = align(a.jac, nd), align(b.jac, nd)
        jac = ja * vb + va * jb
        lap = a.lap * vb + va * b.lap + 2 * (ja * jb).sum(0)
        return make_jet(value, jac, lap, a.trace)
    jet, other = (a, vb) if is_jet(a) else (b, va)
    return make_jet(value, lazy(lambda: align(jet.jac, nd) * other, other), jet.lap * other, jet.trace)


def _quotient(value: Tensor, a, b: Jet) -> Jet:
    """``q = a / b`` with ``b`` traced (``a`` a jet or a constant)."""
    nd = value.dim()
    jb = align(b.jac, nd)
    ja = align(a.jac, nd) if is_jet(a) else 0
    la = a.lap if is_jet(a) else 0
    jq = (ja - value * jb) / b.value
    lq = (la - value * b.lap - 2 * (jq * jb).sum(0)) / b.value
    return make_jet(value, jq, lq, b.trace)


@register(torch.div, torch.divide, torch.true_divide, torch.Tensor.div, torch.Tensor.divide,
          torch.Tensor.true_divide, torch.Tensor.__truediv__, torch.Tensor.__div__)
def _div(func, args, kwargs):
    a, b = args[0], args[1]
    if kwargs.get("rounding_mode", args[2] if len(args) > 2 else None) is not None:
        return constant(func, args, kwargs)  # piecewise constant: zero derivatives
    value = func(primal(a), primal(b), **kwargs)
    if is_jet(b):
        return _quotient(value, a, b)
    return make_jet(value, lazy(lambda: align(a.jac, value.dim()) / b, b), a.lap / b, a.trace)


@register(torch.Tensor.__rtruediv__, torch.Tensor.__rdiv__)
def _rdiv(func, args, kwargs):
    x, other = args[0], args[1]  # other / x
    value = func(x.value, primal(other))
    return _quotient(value, other, x)


def _power_derivatives(x: Tensor, y: Tensor, e):
    """First and second derivative of ``x ** e`` with respect to ``x`` (``e`` constant)."""
    if isinstance(e, numbers.Number):
        if e == 2:
            return 2 * x, torch.full_like(x, 2.0)
        if e == 1:
            return torch.ones_like(x), None
        if e == 0:
            return torch.zeros_like(x), None
        d1 = e * x ** (e - 1)
        return d1, e * (e - 1) * x ** (e - 2)
    degenerate = e * (e - 1) == 0  # x ** (e - 2) would be inf at x = 0 with a zero coefficient
    safe = torch.where(degenerate, torch.ones_like(x), x)
    d1 = e * x ** (e - 1)
    d2 = torch.where(degenerate, torch.zeros_like(x), e * (e - 1) * safe ** (e - 2))
    return d1, d2


def _power(value: Tensor, base, exponent):
    """The jet of ``base ** exponent`` (either or both traced) with value ``value``."""
    if is_jet(base) and is_jet(exponent):
        return _pow_both_traced(base, exponent)
    nd = value.dim()
    if is_jet(base):
        d1, d2 = _power_derivatives(base.value, value, exponent)
        jac = align(base.jac, nd) * d1
        lap = base.lap * d1
        if d2 is not None:
            lap = lap + d2 * sum_sq(align(base.jac, nd))
        return make_jet(value, jac, lap, base.trace)
    log_base = math.log(base) if isinstance(base, numbers.Number) else torch.log(base)
    d1 = value * log_base
    d2 = d1 * log_base
    jac = align(exponent.jac, nd) * d1
    lap = exponent.lap * d1 + d2 * sum_sq(align(exponent.jac, nd))
    return make_jet(value, jac, lap, exponent.trace)


def _pow_both_traced(base: Jet, exponent: Jet):
    """``base ** exponent`` with both traced, as ``exp(exponent * log(base))`` (positive bases)."""
    return torch.exp(traced(exponent) * torch.log(traced(base)))


@register(torch.pow, torch.Tensor.pow, torch.Tensor.__pow__)
def _pow(func, args, kwargs):
    base, exponent = args[0], kwargs.get("exponent", args[1] if len(args) > 1 else None)
    return _power(func(primal(base), primal(exponent)), base, exponent)


@register(torch.Tensor.__rpow__)
def _rpow(func, args, kwargs):
    exponent, base = args[0], args[1]  # base ** exponent
    return _power(func(exponent.value, primal(base)), base, exponent)


@register(torch.where, torch.Tensor.where)
def _where(func, args, kwargs):
    if func is torch.Tensor.where:  # x.where(condition, y) = torch.where(condition, x, y)
        args = (args[1], args[0]) + tuple(args[2:])
    if len(args) + len(kwargs) < 3:
        raise uncovered(torch.where, "the one-argument form")
    cond = args[0]
    a = args[1] if len(args) > 1 else kwargs["input"]
    b = args[2] if len(args) > 2 else kwargs["other"]
    if is_jet(cond):
        raise uncovered(torch.where, "a traced condition")
    value = torch.where(cond, primal(a), primal(b))
    nd = value.dim()
    ja = align(a.jac, nd) if is_jet(a) else 0.0
    jb = align(b.jac, nd) if is_jet(b) else 0.0
    la = a.lap if is_jet(a) else 0.0
    lb = b.lap if is_jet(b) else 0.0
    trace = (a if is_jet(a) else b).trace
    if not isinstance(ja, Tensor):
        ja = torch.zeros((), dtype=value.dtype, device=value.device)
    if not isinstance(jb, Tensor):
        jb = torch.zeros((), dtype=value.dtype, device=value.device)
    return make_jet(value, torch.where(cond, ja, jb), torch.where(cond, la, lb), trace)


def _selecting(greater: bool):
    """``maximum``/``minimum``: PyTorch's backward splits ties evenly, so the rule uses the same
    constant weights ``w`` (1, 0 or 1/2) in ``y = w a + (1 - w) b``."""

    def rule(func, args, kwargs):
        a, b = args[0], args[1]
        va, vb = primal(a), primal(b)
        value = func(va, vb)
        w = ((va > vb) if greater else (va < vb)).to(value.dtype) + 0.5 * (va == vb).to(value.dtype)
        trace = (a if is_jet(a) else b).trace
        return _combine(value, [_scaled(a, w), _scaled(b, 1 - w)], trace)

    return rule


register(torch.maximum, torch.Tensor.maximum)(_selecting(True))
register(torch.minimum, torch.Tensor.minimum)(_selecting(False))


@register(torch.addcmul, torch.Tensor.addcmul, torch.addcdiv, torch.Tensor.addcdiv)
def _add_product(func, args, kwargs):
    """``addcmul(a, t1, t2, value=v) = a + v t1 t2`` (``addcdiv``: ``a + v t1 / t2``), through the rules above."""
    a, t1, t2 = (traced(x) for x in args[:3])
    value = kwargs.get("value", args[3] if len(args) > 3 else 1)
    product = t1 * t2 if func in (torch.addcmul, torch.Tensor.addcmul) else t1 / t2
    return a + value * product

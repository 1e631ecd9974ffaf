"""Entrywise nonlinear functions: each rule is its first and second derivative.

``derivatives(x, y, *options)`` gets the input ``x`` and the output ``y`` (so
that ``tanh`` can reuse ``y``) and returns ``(phi'(x), phi''(x))``; ``None`` for
a second derivative that is zero almost everywhere (the piecewise-linear
functions). Where PyTorch's own backward picks a one-sided derivative at a kink
(``relu`` at 0, ``clamp`` at its bounds, ``abs`` at 0, a ``softplus`` past its
threshold), the rule picks the same, so that the forward Laplacian agrees with
``torch.func.hessian`` there too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..registry import register
from .common import elementwise

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)


def _aliases(name: str) -> tuple:
    """``torch.<name>``, ``torch.Tensor.<name>`` and ``torch.special.<name>`` where they exist."""
    return (getattr(torch, name, None), getattr(torch.Tensor, name, None), getattr(torch.special, name, None))


def _rule(*funcs, inplace=None):
    def decorate(derivatives):
        register(*funcs)(elementwise(derivatives, inplace=inplace))
        return derivatives

    return decorate


# --- smooth functions of one variable -------------------------------------------------------------


@_rule(*_aliases("tanh"), F.tanh)
def _tanh(x, y):
    d1 = 1 - y * y
    return d1, -2 * y * d1


@_rule(*_aliases("sigmoid"), torch.special.expit, F.sigmoid)
def _sigmoid(x, y):
    d1 = y * (1 - y)
    return d1, d1 * (1 - 2 * y)


@_rule(*_aliases("sin"))
def _sin(x, y):
    return torch.cos(x), -y


@_rule(*_aliases("cos"))
def _cos(x, y):
    return -torch.sin(x), -y


@_rule(*_aliases("tan"))
def _tan(x, y):
    d1 = 1 + y * y
    return d1, 2 * y * d1


@_rule(*_aliases("sinh"))
def _sinh(x, y):
    return torch.cosh(x), y


@_rule(*_aliases("cosh"))
def _cosh(x, y):
    return torch.sinh(x), y


@_rule(*_aliases("atan"), torch.arctan, torch.Tensor.arctan)
def _atan(x, y):
    d1 = 1 / (1 + x * x)
    return d1, -2 * x * d1 * d1


@_rule(*_aliases("asinh"), torch.arcsinh, torch.Tensor.arcsinh)
def _asinh(x, y):
    d1 = torch.rsqrt(1 + x * x)
    return d1, -x * d1 * d1 * d1


@_rule(*_aliases("exp"))
def _exp(x, y):
    return y, y


@_rule(*_aliases("expm1"))
def _expm1(x, y):
    d = y + 1
    return d, d


@_rule(*_aliases("exp2"))
def _exp2(x, y):
    d1 = y * math.log(2.0)
    return d1, d1 * math.log(2.0)


@_rule(*_aliases("log"))
def _log(x, y):
    d1 = 1 / x
    return d1, -d1 * d1


@_rule(*_aliases("log2"))
def _log2(x, y):
    d1 = 1 / (x * math.log(2.0))
    return d1, -d1 / x


@_rule(*_aliases("log10"))
def _log10(x, y):
    d1 = 1 / (x * math.log(10.0))
    return d1, -d1 / x


@_rule(*_aliases("log1p"))
def _log1p(x, y):
    d1 = 1 / (1 + x)
    return d1, -d1 * d1


@_rule(*_aliases("sqrt"))
def _sqrt(x, y):
    d1 = 0.5 / y
    return d1, -0.5 * d1 / x


@_rule(*_aliases("rsqrt"))
def _rsqrt(x, y):
    y3 = y * y * y
    return -0.5 * y3, 0.75 * y3 * y * y


@_rule(*_aliases("reciprocal"))
def _reciprocal(x, y):
    y2 = y * y
    return -y2, 2 * y2 * y


@_rule(*_aliases("square"))
def _square(x, y):
    return 2 * x, torch.full_like(x, 2.0)


@_rule(*_aliases("erf"))
def _erf(x, y):
    d1 = (2 / math.sqrt(math.pi)) * torch.exp(-x * x)
    return d1, -2 * x * d1


@_rule(*_aliases("erfc"))
def _erfc(x, y):
    d1 = -(2 / math.sqrt(math.pi)) * torch.exp(-x * x)
    return d1, -2 * x * d1


@_rule(F.logsigmoid)
def _logsigmoid(x, y):
    s = torch.sigmoid(x)
    return 1 - s, -s * (1 - s)


@_rule(F.softplus)
def _softplus(x, y, beta=1.0, threshold=20.0):
    s = torch.sigmoid(beta * x)
    linear = beta * x > threshold
    return torch.where(linear, 1.0, s), torch.where(linear, 0.0, beta * s * (1 - s))


@_rule(F.silu, inplace=1)
def _silu(x, y):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s)), s * (1 - s) * (2 + x * (1 - 2 * s))


@_rule(F.gelu)
def _gelu(x, y, approximate="none"):
    if approximate == "tanh":
        u = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        du = _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
        d2u = _SQRT_2_OVER_PI * 6 * 0.044715 * x
        t = torch.tanh(u)
        sech2 = 1 - t * t
        return 0.5 * (1 + t) + 0.5 * x * sech2 * du, sech2 * (du + 0.5 * x * (d2u - 2 * t * du * du))
    pdf = _INV_SQRT_2PI * torch.exp(-0.5 * x * x)
    cdf = 0.5 * (1 + torch.erf(x * _INV_SQRT_2))
    return cdf + x * pdf, pdf * (2 - x * x)


@_rule(F.mish, inplace=1)
def _mish(x, y):
    s = torch.sigmoid(x)
    t = torch.tanh(F.softplus(x))
    sech2 = 1 - t * t
    return t + x * s * sech2, 2 * s * sech2 + x * sech2 * (s * (1 - s) - 2 * t * s * s)


@_rule(F.softsign)
def _softsign(x, y):
    a = 1 / (1 + x.abs())
    return a * a, -2 * torch.sign(x) * a * a * a


@_rule(F.tanhshrink)
def _tanhshrink(x, y):
    t = torch.tanh(x)
    return t * t, 2 * t * (1 - t * t)


@_rule(F.elu, inplace=2)
def _elu(x, y, alpha=1.0):
    neg = alpha * torch.exp(x)
    return torch.where(x > 0, 1.0, neg), torch.where(x > 0, 0.0, neg)


@_rule(F.celu, inplace=2)
def _celu(x, y, alpha=1.0):
    e = torch.exp(x / alpha)
    return torch.where(x > 0, 1.0, e), torch.where(x > 0, 0.0, e / alpha)


@_rule(F.selu, inplace=1)
def _selu(x, y):
    alpha, scale = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946
    neg = scale * alpha * torch.exp(x)
    return torch.where(x > 0, scale, neg), torch.where(x > 0, 0.0, neg)


# --- piecewise linear (second derivative zero almost everywhere) ------------------------------------


@_rule(F.relu, inplace=1)
def _relu_functional(x, y):
    return (x > 0).to(x.dtype), None


@_rule(torch.relu, torch.Tensor.relu)
def _relu(x, y):
    return (x > 0).to(x.dtype), None


@_rule(F.leaky_relu, inplace=2)
def _leaky_relu(x, y, negative_slope=0.01):
    return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, negative_slope)), None


@_rule(F.hardtanh, inplace=3)
def _hardtanh(x, y, min_val=-1.0, max_val=1.0):
    return ((x > min_val) & (x < max_val)).to(x.dtype), None


@_rule(F.relu6, inplace=1)
def _relu6(x, y):
    return ((x > 0) & (x < 6)).to(x.dtype), None


@_rule(*_aliases("abs"), torch.absolute, torch.Tensor.absolute, torch.Tensor.__abs__)
def _abs(x, y):
    return torch.sign(x), None


@_rule(torch.clamp, torch.Tensor.clamp, torch.clip, torch.Tensor.clip)
def _clamp(x, y, min=None, max=None):
    inside = torch.ones_like(x, dtype=torch.bool)
    if min is not None:
        inside = inside & (x >= min)
    if max is not None:
        inside = inside & (x <= max)
    return inside.to(x.dtype), None

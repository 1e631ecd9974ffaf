"""Elementwise activations: ``a = phi(x)``, a diagonal Jacobian ``diag(phi'(x))``.

Each sample's residual Hessian term is ``diag(phi''(x) * dL/da)`` (Dangel,
Harmeling, Hennig 2020, Sec. 3.2). ReLU and LeakyReLU are piecewise linear:
``phi'' = 0`` away from the kink (and in autograd at it), so they have no
residual and their Hessian and GGN diagonals coincide.

The derivatives are closed forms of the functions PyTorch evaluates (with the
same branch conventions at kinks and thresholds as PyTorch's backward
formulas). A new elementwise activation is one subclass of
:class:`ActivationRule` implementing :meth:`~ActivationRule.derivatives`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature import Diagonal, Term
from ..jacobians import Elementwise, Jacobian
from ..registry import register_rule
from ..rule import Rule

__all__ = ["ActivationRule", "ActivationState"]


@dataclass
class ActivationState:
    x: Tensor
    a: Tensor
    d1: Tensor


class ActivationRule(Rule[ActivationState]):
    """Base rule of an elementwise activation: subclasses give ``phi``, ``phi'`` and ``phi''``.

    Set ``has_residual = False`` on piecewise-linear activations.
    """

    has_residual = True

    def derivatives(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """``(phi(x), phi'(x))``."""
        raise NotImplementedError

    def second_derivative(self, state: ActivationState) -> Tensor:
        """``phi''(x)`` (``state`` holds ``x``, ``phi(x)`` and ``phi'(x)``)."""
        raise NotImplementedError

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, ActivationState]:
        a, d1 = self.derivatives(x)
        return a, ActivationState(x, a, d1)

    def jacobian(self, state: ActivationState) -> Jacobian:
        return Elementwise(state.d1, tuple(state.x.shape))

    def residual(self, state: ActivationState, grad_out: Tensor) -> Optional[Term]:
        return Diagonal(self.second_derivative(state) * grad_out)


@register_rule(nn.ReLU)
class ReLURule(ActivationRule):
    has_residual = False

    def derivatives(self, x):
        return torch.relu(x), (x > 0).to(x.dtype)


@register_rule(nn.LeakyReLU)
class LeakyReLURule(ActivationRule):
    has_residual = False

    def derivatives(self, x):
        slope = self.module.negative_slope
        return F.leaky_relu(x, slope), torch.where(x > 0, torch.ones_like(x), torch.full_like(x, slope))


@register_rule(nn.Tanh)
class TanhRule(ActivationRule):
    def derivatives(self, x):
        a = torch.tanh(x)
        return a, 1 - a * a

    def second_derivative(self, state):
        return -2 * state.a * state.d1


@register_rule(nn.Sigmoid)
class SigmoidRule(ActivationRule):
    def derivatives(self, x):
        a = torch.sigmoid(x)
        return a, a * (1 - a)

    def second_derivative(self, state):
        return state.d1 * (1 - 2 * state.a)


@register_rule(nn.ELU)
class ELURule(ActivationRule):
    # PyTorch's elu_backward takes the exponential branch for x <= 0.
    def derivatives(self, x):
        alpha = self.module.alpha
        pos = x > 0
        e = alpha * torch.exp(torch.where(pos, torch.zeros_like(x), x))
        return F.elu(x, alpha), torch.where(pos, torch.ones_like(x), e)

    def second_derivative(self, state):
        return torch.where(state.x > 0, torch.zeros_like(state.x), state.d1)


@register_rule(nn.SiLU)
class SiLURule(ActivationRule):
    def derivatives(self, x):
        s = torch.sigmoid(x)
        return x * s, s * (1 + x * (1 - s))

    def second_derivative(self, state):
        s = torch.sigmoid(state.x)
        return s * (1 - s) * (2 + state.x * (1 - 2 * s))


@register_rule(nn.Softplus)
class SoftplusRule(ActivationRule):
    # Linear (derivative 1) where beta * x > threshold, as F.softplus and its backward.
    def derivatives(self, x):
        m = self.module
        s = torch.sigmoid(m.beta * x)
        linear = m.beta * x > m.threshold
        return F.softplus(x, m.beta, m.threshold), torch.where(linear, torch.ones_like(x), s)

    def second_derivative(self, state):
        m = self.module
        s = torch.sigmoid(m.beta * state.x)
        return torch.where(m.beta * state.x > m.threshold, torch.zeros_like(s), m.beta * s * (1 - s))


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_KAPPA = 0.044715


@register_rule(nn.GELU)
class GELURule(ActivationRule):
    """Exact GELU ``x Phi(x)`` or its tanh approximation, as ``module.approximate`` says."""

    def derivatives(self, x):
        a = F.gelu(x, approximate=self.module.approximate)
        if self.module.approximate == "tanh":
            t, du = self._tanh_parts(x)
            return a, 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
        return a, cdf + x * pdf

    def second_derivative(self, state):
        x = state.x
        if self.module.approximate == "tanh":
            t, du = self._tanh_parts(x)
            sech2 = 1 - t * t
            ddu = _SQRT_2_OVER_PI * 6 * _KAPPA * x
            return sech2 * du + 0.5 * x * (-2 * t * sech2 * du * du + sech2 * ddu)
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return pdf * (2 - x * x)

    @staticmethod
    def _tanh_parts(x):
        u = _SQRT_2_OVER_PI * (x + _KAPPA * x * x * x)
        return torch.tanh(u), _SQRT_2_OVER_PI * (1 + 3 * _KAPPA * x * x)

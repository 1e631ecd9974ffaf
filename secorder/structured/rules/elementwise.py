"""More elementwise activations: closed forms, derived derivatives, and ``nn.PReLU``.

The activations are :class:`~secorder.structured.rules.activations.ActivationRule`
subclasses (a diagonal Jacobian ``diag(phi'(x))`` and, for the exact Hessian,
the residual ``diag(phi''(x) * dL/da)``):

* closed forms for ``nn.LogSigmoid`` and ``nn.SELU``, with the branch
  conventions of PyTorch's backward formulas;
* :class:`DerivedActivationRule` for any other elementwise module without
  parameters: ``phi'`` and ``phi''`` come from forward-mode differentiation of
  the module itself (``torch.func.jvp`` with an all-ones tangent, which for an
  elementwise function is its derivative; twice for the second derivative), so
  they follow PyTorch's own derivative formulas, kinks included. Registering a
  new elementwise activation is one line,
  ``register_rule(MyActivation, DerivedActivationRule)`` (set ``has_residual =
  False`` in a subclass for a piecewise-linear one, which skips the residual);
  it is registered here for ``Softsign``, ``Mish``, ``Hardswish``,
  ``Tanhshrink``, ``CELU`` (whose PyTorch derivative rounds ``1 / alpha`` to
  single precision: a closed form would differ from autograd) and, piecewise
  linear, ``Hardtanh``, ``ReLU6``, ``Hardsigmoid``, ``Hardshrink``,
  ``Softshrink``, ``Threshold``;
* ``nn.PReLU``: ``z = x`` where ``x > 0`` else ``a x`` with a learnable slope
  ``a`` (one, or one per channel of dimension 1); piecewise linear in ``x``
  (no residual), linear in ``a``, whose diagonal is the channel-block
  quadratic form of ``min(x, 0)``.

Example:
    >>> import torch, secorder as so
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Mish(), torch.nn.Linear(4, 2))
    >>> f = so.functional_loss(model, torch.nn.MSELoss())
    >>> fn = so.hessian_diag(f)
    >>> d = fn(so.params_dict(model), torch.randn(5, 3), torch.randn(5, 2))
    >>> fn.last_engine
    'structured'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import jvp

from ..curvature import Curvature
from ..errors import Unsupported
from ..jacobians import Elementwise, Jacobian
from ..registry import register_rule
from ..rule import Rule
from .activations import ActivationRule

__all__ = ["LogSigmoidRule", "SELURule", "DerivedActivationRule", "PiecewiseLinearDerivedRule",
           "PReLURule", "PReLUState"]

# SELU's constants (Klambauer et al. 2017), as in PyTorch.
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


@register_rule(nn.LogSigmoid)
class LogSigmoidRule(ActivationRule):
    def derivatives(self, x):
        return F.logsigmoid(x), torch.sigmoid(-x)

    def second_derivative(self, state):
        return -state.d1 * (1 - state.d1)


@register_rule(nn.SELU)
class SELURule(ActivationRule):
    # PyTorch's elu_backward takes the exponential branch for x <= 0.
    def derivatives(self, x):
        e = (_SELU_SCALE * _SELU_ALPHA) * torch.exp(torch.clamp(x, max=0.0))
        return F.selu(x), torch.where(x > 0, torch.full_like(x, _SELU_SCALE), e)

    def second_derivative(self, state):
        return torch.where(state.x > 0, torch.zeros_like(state.x), state.d1)


class DerivedActivationRule(ActivationRule):
    """Any elementwise module without parameters, its derivatives by forward-mode AD of the module.

    The module must be elementwise (each output entry a function of the same
    input entry only); that is what registering it asserts.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        if any(True for _ in module.parameters()):
            raise Unsupported("has parameters (a derived elementwise rule takes parameter-free modules)")

    def _phi(self, t: Tensor) -> Tensor:
        # An in-place module would overwrite the input the state keeps.
        return self.module(t.clone() if getattr(self.module, "inplace", False) else t)

    def _d1(self, t: Tensor) -> Tensor:
        return jvp(self._phi, (t,), (torch.ones_like(t),))[1]

    def derivatives(self, x):
        return jvp(self._phi, (x,), (torch.ones_like(x),))

    def second_derivative(self, state):
        return jvp(self._d1, (state.x,), (torch.ones_like(state.x),))[1]


class PiecewiseLinearDerivedRule(DerivedActivationRule):
    """:class:`DerivedActivationRule` for a piecewise-linear activation (``phi'' = 0``: no residual)."""

    has_residual = False


for _t in (nn.Softsign, nn.Mish, nn.Hardswish, nn.Tanhshrink, nn.CELU):
    register_rule(_t, DerivedActivationRule)
for _t in (nn.Hardtanh, nn.ReLU6, nn.Hardsigmoid, nn.Hardshrink, nn.Softshrink, nn.Threshold):
    register_rule(_t, PiecewiseLinearDerivedRule)


@dataclass
class PReLUState:
    x: Tensor
    slope: Tensor  # the slope, shaped to broadcast against x


@register_rule(nn.PReLU)
class PReLURule(Rule[PReLUState]):
    parameters = ("weight",)

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, PReLUState]:
        a = tensors["weight"]
        if x.dim() < 2:
            raise Unsupported(f"on an input of shape {tuple(x.shape)} (only batched [N, C, ...])")
        if a.numel() != 1 and a.numel() != x.shape[1]:
            raise Unsupported(f"has {a.numel()} slopes for an input of shape {tuple(x.shape)}")
        slope = a.reshape((1, -1) + (1,) * (x.dim() - 2))
        return F.prelu(x, a), PReLUState(x, slope)

    def jacobian(self, state: PReLUState) -> Jacobian:
        x = state.x
        return Elementwise(torch.where(x > 0, torch.ones_like(x), state.slope.expand_as(x)), tuple(x.shape))

    def parameter_diagonal(self, state: PReLUState, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        x = state.x
        dz = torch.where(x > 0, torch.zeros_like(x), x)  # dz/da, per entry of a's channel
        N, C = x.shape[0], state.slope.numel()
        return {"weight": curv.quadratic(dz.reshape(N, C, 1, x.shape[1:].numel() // C))[:, 0]}


"""A complete user rule, as a template: ``ScaledTanh``, ``z = scale * tanh(x)`` with a learnable scalar.

To teach the structured engine a module type of your own:

1. Write a state dataclass with what the backward pass needs from the forward.
2. Subclass :class:`~secorder.structured.Rule` and implement

   * ``__init__(module)``: check the configuration, raise
     :class:`~secorder.structured.Unsupported` with a reason otherwise;
   * ``forward(x, tensors)``: the output and the state (``tensors`` holds the
     values of this call for the module's own parameters and buffers);
   * ``jacobian(state)``: the output's Jacobian with respect to the input, as a
     :mod:`~secorder.structured.jacobians` class (``Elementwise``, ``Dense``,
     ``Reshape``, ``Gather``, or ``Columns`` for anything else);
   * ``residual(state, grad_out)`` when the module is nonlinear in its input
     (set ``has_residual = True``): the term ``sum_i (dL/dz_i) d^2 z_i/dx^2``
     at the input, here a :class:`~secorder.structured.curvature.Diagonal`;
   * ``parameter_diagonal(state, curv, wanted)`` for the parameters listed in
     ``parameters``: from the output curvature ``curv``, through
     ``curv.diagonal()`` or ``curv.quadratic(X)`` (``X`` the output's derivative
     with respect to each parameter, laid out as channels and positions).

3. Register it: ``register_rule(ScaledTanh, ScaledTanhRule)`` (or decorate the
   class with ``@register_rule(ScaledTanh)``).
4. Test it with the settings list of ``tests/test_structured_rules.py``: its
   Jacobian products against ``vmap(vjp(forward))`` and its parameter diagonal
   against ``J^T H J`` for every kind of curvature term.

Example:
    >>> import torch, secorder as so
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), ScaledTanh(), torch.nn.Linear(4, 2))
    >>> f = so.functional_loss(model, torch.nn.CrossEntropyLoss())
    >>> params, x, y = so.params_dict(model), torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    >>> fn = so.hessian_diag(f)
    >>> d = fn(params, x, y)
    >>> fn.last_engine, d["1.scale"].shape
    ('structured', torch.Size([]))
    >>> generic = so.hessian_diag(f, engine="generic")(params, x, y)
    >>> all(torch.allclose(d[k], generic[k], atol=1e-6) for k in d)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, FrozenSet, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from ..curvature import Curvature, Diagonal, Term
from ..jacobians import Elementwise, Jacobian
from ..registry import register_rule
from ..rule import Rule

__all__ = ["ScaledTanh", "ScaledTanhRule", "ScaledTanhState"]


class ScaledTanh(nn.Module):
    """``scale * tanh(x)`` with a learnable scalar ``scale`` (initially 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * torch.tanh(x)


@dataclass
class ScaledTanhState:
    t: Tensor  # tanh(x)
    scale: Tensor


class ScaledTanhRule(Rule[ScaledTanhState]):
    parameters = ("scale",)
    has_residual = True  # nonlinear in x

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, ScaledTanhState]:
        t = torch.tanh(x)
        return tensors["scale"] * t, ScaledTanhState(t, tensors["scale"])

    def jacobian(self, state: ScaledTanhState) -> Jacobian:
        # dz/dx = scale * (1 - t^2), elementwise
        return Elementwise(state.scale * (1 - state.t * state.t), tuple(state.t.shape))

    def residual(self, state: ScaledTanhState, grad_out: Tensor) -> Optional[Term]:
        # d^2 z/dx^2 = -2 scale t (1 - t^2), elementwise: a diagonal term weighted by dL/dz
        return Diagonal(-2 * state.scale * state.t * (1 - state.t * state.t) * grad_out)

    def parameter_diagonal(self, state: ScaledTanhState, curv: Curvature,
                           wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        # dz/dscale = tanh(x): one channel whose positions are all the features, one test vector.
        N = state.t.shape[0]
        return {"scale": curv.quadratic(state.t.reshape(N, 1, 1, state.t.shape[1:].numel())).reshape(())}


register_rule(ScaledTanh, ScaledTanhRule)

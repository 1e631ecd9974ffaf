"""``so.Residual(body)``: the skip connection ``z = x + body(x)``, a block rule.

The curvature at the block input is ``(I + J)^T H_z (I + J)`` plus the
residual terms raised inside the body, with ``J`` the body's Jacobian: the
output curvature, as explicit columns ``B``, goes through the body to give
``J^T B``, and the skip path adds ``B`` column by column; the gradient is
``g + J^T g``. BackPACK's ``DiagHessian`` refuses such blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor, nn

from ..blocks import Residual
from ..columns import add_columns, column_form
from ..curvature import Curvature
from ..errors import Unsupported
from ..registry import register_rule
from ..rule import BlockRule, Sweep

__all__ = ["ResidualRule", "ResidualState"]


@dataclass
class ResidualState:
    body: List[Any]  # the body's per-step states


@register_rule(Residual)
class ResidualRule(BlockRule[ResidualState]):
    @classmethod
    def bodies(cls, module: nn.Module) -> Dict[str, nn.Module]:
        return {"body": module.body}

    def forward(self, x: Tensor, sweep: "Sweep") -> Tuple[Tensor, ResidualState]:
        fx, states = sweep.run(self.plans["body"], x)
        if fx.shape != x.shape:
            raise Unsupported(f"changes the shape {tuple(x.shape)} to {tuple(fx.shape)} (the body of a residual block must keep it)")
        return x + fx, ResidualState(states)

    def backward(self, state: ResidualState, curv: Curvature, grad_out: Optional[Tensor], sweep: "Sweep",
                 need_input: bool, need_grad_input: bool) -> Tuple[Optional[Curvature], Optional[Tensor]]:
        body = self.plans["body"]
        if not need_input:
            sweep.pull(body, state.body, curv, grad_out, False, False)
            return None, None
        columns = [column_form(t) for t in curv.terms]  # per token while tokenwise
        pulled, body_g = sweep.pull(body, state.body, Curvature(list(columns)), grad_out, True, need_grad_input)
        # Term i of the pulled curvature comes from column set i (Curvature.pulled keeps the order;
        # the body's residual terms come after): add the skip path to each.
        k = len(columns)
        skip = [add_columns(b, c) for b, c in zip(pulled.terms[:k], columns)]
        g = grad_out + body_g if need_grad_input else None
        return Curvature(skip + pulled.terms[k:]), g

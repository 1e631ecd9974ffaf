"""The backpropagation driver: one forward pass, then the curvature pulled back module by module.

Starting from the factored loss-output Hessian
(:mod:`secorder.structured.losses`), each module's rule reads its
parameters' diagonal off the curvature at its output, then pulls the curvature
back to its input; activations add their residual diagonal
``phi''(x) * dL/da`` when ``kind="hessian"`` (left out for ``kind="ggn"``, which
gives the exact generalized Gauss-Newton diagonal; Dangel, Kunstner, Hennig
2020). The sweep stops at the first module with a requested parameter, and the
loss gradient is pulled back only as far as the last activation with a residual.

A residual block ``z = x + F(x)`` has input curvature
``(I + J_F)^T H_z (I + J_F)`` plus the residual terms raised inside ``F``: the
output curvature, as explicit columns ``B``, goes through the body to give
``J_F^T B`` and the skip path adds ``B`` column by column; the gradient is
``g + J_F^T g``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import Tensor

from .curvature import Curvature, Factor
from .errors import Unsupported
from .losses import LossSpec, output_curvature
from .rules import ActivationPool, Conv
from .walker import Plan, ResidualRule

__all__ = ["run"]


def run(
    plan: Plan,
    spec: LossSpec,
    values: Mapping[str, Tensor],
    inputs: Any,
    targets: Any,
    wanted: Set[str],
    trace: bool,
) -> Any:
    """``{qualified name: diagonal}`` for the ``wanted`` parameters, or their trace (a 0-dim tensor).

    ``values`` maps every qualified parameter/buffer name of the plan to the
    tensor to use (requested parameters and constants alike).

    Example:
        >>> import torch
        >>> from secorder.structured import walker, losses
        >>> model = torch.nn.Linear(2, 1)
        >>> p = walker.plan(model, hessian=True)
        >>> vals = {"weight": torch.tensor([[1., 2.]]), "bias": torch.tensor([0.])}
        >>> x, y = torch.tensor([[1., 1.]]), torch.tensor([[0.]])
        >>> run(p, losses.loss_spec(torch.nn.MSELoss()), vals, x, y, {"weight", "bias"}, trace=False)
        {'weight': tensor([[2., 2.]]), 'bias': tensor([2.])}
    """
    if not isinstance(inputs, Tensor):
        raise Unsupported(f"inputs must be a single tensor, got {type(inputs).__name__}")
    sweep = _Sweep(values, wanted, trace)
    out, ctxs = sweep.forward(plan, inputs)
    curv, g = output_curvature(spec, out, targets)
    sweep.backward(plan, ctxs, curv, g, need_input=False, need_g_input=False)
    if trace:
        return sweep.total if sweep.total is not None else torch.zeros((), dtype=out.dtype, device=out.device)
    return sweep.diags


class _Sweep:
    def __init__(self, values: Mapping[str, Tensor], wanted: Set[str], trace: bool):
        self.values, self.wanted, self.trace = values, wanted, trace
        self.diags: Dict[str, Tensor] = {}
        self.total: Optional[Tensor] = None

    def forward(self, plan: Plan, x: Tensor) -> Tuple[Tensor, List[Any]]:
        ctxs = []
        for rule, names in zip(plan.rules, plan.names):
            if isinstance(rule, ResidualRule):
                fx, inner = self.forward(rule.plan, x)
                if fx.shape != x.shape:
                    raise Unsupported(f"residual block {rule.name!r} changes the shape {tuple(x.shape)} "
                                      f"to {tuple(fx.shape)}")
                z, ctx = x + fx, {"inner": inner, "out": x.shape}
            else:
                z, ctx = rule.forward(x, {loc: self.values[q] for loc, q in names.items() if q in self.values})
            ctxs.append(ctx)
            x = z
        return x, ctxs

    def _local_wanted(self, rule: Any, names: Dict[str, str]) -> Set[str]:
        return {loc for loc, q in names.items() if q in self.wanted and loc in rule.param_names}

    def _wants(self, rule: Any, names: Dict[str, str]) -> bool:
        if isinstance(rule, ResidualRule):
            return any(self._wants(r, n) for r, n in zip(rule.plan.rules, rule.plan.names))
        return bool(self._local_wanted(rule, names))

    def _record(self, rule: Any, names: Dict[str, str], curv: Curvature, ctx: Any) -> None:
        local = self._local_wanted(rule, names)
        if not local:
            return
        if self.trace:
            t = rule.param_trace(curv, ctx, local)
            self.total = t if self.total is None else self.total + t
        else:
            for loc, d in rule.param_diag(curv, ctx, local).items():
                self.diags[names[loc]] = d

    def backward(self, plan: Plan, ctxs: List[Any], curv: Curvature, g: Optional[Tensor],
                 need_input: bool, need_g_input: bool) -> Tuple[Optional[Curvature], Optional[Tensor]]:
        """Pull ``curv`` (and ``g``) back through ``plan``, recording the wanted parameter diagonals.

        With ``need_input`` the curvature at the plan's input is returned (and
        the gradient there with ``need_g_input``); otherwise the sweep stops at
        the first module with a wanted parameter.
        """
        rules, names = plan.rules, plan.names
        n = len(rules)
        active = [i for i in range(n) if self._wants(rules[i], names[i])]
        if not need_input and not active:
            return None, None
        first = 0 if need_input else active[0]
        runs = [i > first or need_input for i in range(n)]
        # A block's body always runs its own sweep, so it uses g whenever it holds a residual.
        uses_g = [(runs[i] or isinstance(rules[i], ResidualRule)) and rules[i].has_residual for i in range(n)]
        # need_in[i]: the gradient at the input of module i is needed.
        need_in, acc = [False] * n, need_g_input
        for i in range(first, n):
            need_in[i] = acc
            acc = acc or uses_g[i]
        for i in range(n - 1, first - 1, -1):
            rule, ctx = rules[i], ctxs[i]
            if isinstance(rule, ResidualRule):
                curv, g = self._block(rule, ctx, curv, g, runs[i], need_in[i] and runs[i])
                continue
            self._record(rule, names[i], curv, ctx)
            if not runs[i]:
                break
            res = rule.residual(g, ctx) if rule.has_residual else None
            if (i - 1 == first and not runs[first] and isinstance(rule, ActivationPool)
                    and isinstance(rules[first], Conv) and not curv.shared and curv.diag is None
                    and curv.pooled is None):
                curv = rule.backward_pooled(curv, ctx)  # only the convolution's diagonal reads it
            else:
                curv = rule.backward(curv, ctx)
            if res is not None:
                curv.add_diag(res)
            g = rule.backward_grad(g, ctx) if need_in[i] else None
        return curv, g

    def _block(self, rule: ResidualRule, ctx: Any, curv: Curvature, g: Optional[Tensor],
               need_input: bool, need_g_input: bool) -> Tuple[Optional[Curvature], Optional[Tensor]]:
        if not need_input:
            self.backward(rule.plan, ctx["inner"], curv, g, False, False)
            return None, None
        columns = curv.all_factors(ctx["out"])
        body, body_g = self.backward(rule.plan, ctx["inner"], Curvature(factors=columns), g, True, need_g_input)
        k = len(columns)
        # The body's rules keep the incoming factors first and in order: add the skip path to them.
        factors = [Factor(b.B + c.B, c.w) for b, c in zip(body.factors[:k], columns)] + body.factors[k:]
        out = Curvature(factors=factors, diag=body.diag, shared=body.shared)
        return out, (g + body_g if need_g_input else None)

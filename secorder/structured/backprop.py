"""The backpropagation driver: one forward pass, then the curvature pulled back module by module.

Starting from the factored loss-output Hessian
(:mod:`secorder.structured.losses`), each module's rule reads its
parameters' diagonal off the curvature at its output, then pulls the curvature
back to its input; activations add their residual diagonal
``phi''(x) * dL/da`` when ``kind="hessian"`` (left out for ``kind="ggn"``, which
gives the exact generalized Gauss-Newton diagonal; Dangel, Kunstner, Hennig
2020). The sweep stops at the first module with a requested parameter, and the
loss gradient is pulled back only as far as the last activation with a residual.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Set

import torch
from torch import Tensor

from .errors import Unsupported
from .losses import LossSpec, output_curvature
from .walker import Plan

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
    rules = plan.rules
    local_wanted = [{loc for loc, q in names.items() if q in wanted and loc in rule.param_names}
                    for rule, names in zip(rules, plan.names)]
    active = [i for i, w in enumerate(local_wanted) if w]
    x, ctxs = inputs, []
    for rule, names in zip(rules, plan.names):
        x, ctx = rule.forward(x, {loc: values[q] for loc, q in names.items() if q in values})
        ctxs.append(ctx)
    curv, g = output_curvature(spec, x, targets)
    diags: Dict[str, Tensor] = {}
    total: Optional[Tensor] = None
    if not active:
        return diags if not trace else torch.zeros((), dtype=x.dtype, device=x.device)
    first = active[0]
    # g is needed at the output of module i when a residual lies in first+1..i.
    need_g = [False] * len(rules)
    seen = False
    for i in range(first + 1, len(rules)):
        seen = seen or rules[i].has_residual
        need_g[i] = seen
    for i in range(len(rules) - 1, first - 1, -1):
        rule, ctx = rules[i], ctxs[i]
        if local_wanted[i]:
            if trace:
                t = rule.param_trace(curv, ctx, local_wanted[i])
                total = t if total is None else total + t
            else:
                for loc, d in rule.param_diag(curv, ctx, local_wanted[i]).items():
                    diags[plan.names[i][loc]] = d
        if i == first:
            break
        res = rule.residual(g, ctx) if rule.has_residual else None
        curv = rule.backward(curv, ctx)
        if res is not None:
            curv.add_diag(res)
        if need_g[i - 1]:
            g = rule.backward_grad(g, ctx)
    return total if trace else diags

"""The backpropagation driver: one forward pass, then the curvature pulled back step by step.

Starting from the factored loss-output Hessian
(:mod:`secorder.structured.losses`), each step's rule reads its parameters'
diagonal off the curvature at its output, then the curvature is pulled back
through the rule's Jacobian; rules of modules nonlinear in their input add
their residual term when ``residuals`` is on (the exact Hessian; without them
the sweep gives the exact generalized Gauss-Newton diagonal, Dangel, Kunstner,
Hennig 2020). The sweep stops at the first module with a requested parameter,
and the loss gradient is pulled back only as far as the last module with a
residual. Block rules (:class:`~secorder.structured.rule.BlockRule`) run their
sub-plans through :meth:`Sweep.run` and :meth:`Sweep.pull` themselves.

The loss factor's columns can be pulled back a chunk at a time: the sweep is
linear in them, so the parameter diagonals of the chunks add up; the loss's
other terms and the residuals ride along with the first chunk only.

Everything is a tensor function of the parameters and inputs (no in-place
updates, hooks, ``torch.autograd.grad`` or host synchronisation), so the
result can be differentiated, ``vmap``-ed and compiled.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import Tensor

from .curvature import Curvature
from .errors import Unsupported, located
from .losses import LossSpec, OutputCurvature, output_curvature, sampled_curvature
from .walker import Plan, Step

__all__ = ["Sweep", "run", "pull_loss_curvature", "FACTOR_CHUNK_ENTRIES"]

#: The default bound on one chunk of loss-factor columns: columns x samples x the widest
#: step output they are formed at, in tensor entries (64 MiB of float32).
FACTOR_CHUNK_ENTRIES = 2 ** 24


class Sweep:
    """One call's forward and backward passes, and the parameter diagonals (or trace) they record.

    Args:
        values: every qualified parameter/buffer name of the plan mapped to the
            tensor to use (requested parameters and constants alike).
        wanted: the qualified names whose diagonal is requested.
        trace: accumulate the sum of the diagonals instead of the diagonals.
        residuals: add the residual terms of nonlinear modules (exact Hessian).
    """

    def __init__(self, values: Mapping[str, Tensor], wanted: Set[str], trace: bool, residuals: bool):
        self.values, self.wanted, self.trace, self.residuals = values, wanted, trace, residuals
        self.diags: Dict[str, Tensor] = {}
        self.total: Optional[Tensor] = None
        self.widths: List[int] = []  # per-sample sizes of the step outputs, in order of completion

    # -- forward -----------------------------------------------------------------------------
    def run(self, plan: Plan, x: Tensor) -> Tuple[Tensor, List[Any]]:
        """The plan's output for input ``x`` and the per-step states."""
        states = []
        for step in plan.steps:
            try:
                if step.is_block:
                    x, state = step.rule.forward(x, self)
                else:
                    tensors = {loc: self.values[q] for loc, q in step.tensors.items() if q in self.values}
                    x, state = step.rule.forward(x, tensors)
            except Unsupported as err:
                raise located(err, step.name, step.rule.module) from None
            states.append(state)
            self.widths.append(math.prod(x.shape[1:]))
        return x, states

    # -- backward ----------------------------------------------------------------------------
    def _local_wanted(self, step: Step) -> frozenset:
        return frozenset(loc for loc, q in step.parameter_names.items() if q in self.wanted)

    def wants(self, step: Step) -> bool:
        """Whether ``step`` (or anything inside a block) has a requested parameter."""
        if step.is_block:
            return any(self.wants(s) for body in step.rule.plans.values() for s in body.steps)
        return bool(self._local_wanted(step))

    def uses_gradient(self, step: Step) -> bool:
        """Whether ``step`` (or anything inside a block) adds a residual, which reads ``dL/dz``."""
        if not self.residuals:
            return False
        if step.is_block:
            return any(self.uses_gradient(s) for body in step.rule.plans.values() for s in body.steps)
        return step.rule.has_residual

    def _record(self, step: Step, state: Any, curv: Curvature) -> None:
        local = self._local_wanted(step)
        if not local:
            return
        if self.trace:
            t = step.rule.parameter_trace(state, curv, local)
            self.total = t if self.total is None else self.total + t
            return
        for loc, d in step.rule.parameter_diagonal(state, curv, local).items():
            q = step.tensors[loc]
            self.diags[q] = d if q not in self.diags else self.diags[q] + d

    def pull(self, plan: Plan, states: List[Any], curv: Curvature, g: Optional[Tensor],
             need_input: bool, need_grad_input: bool) -> Tuple[Optional[Curvature], Optional[Tensor]]:
        """Pull ``curv`` (and the gradient ``g``) back through ``plan``, recording the wanted diagonals.

        With ``need_input`` the curvature at the plan's input is returned (and
        the gradient there with ``need_grad_input``); otherwise the sweep stops
        at the first step with a wanted parameter and returns ``(None, None)``.
        """
        steps = plan.steps
        n = len(steps)
        active = [i for i in range(n) if self.wants(steps[i])]
        if not need_input and not active:
            return None, None
        first = 0 if need_input else active[0]
        runs = [i > first or need_input for i in range(n)]
        # A block's bodies always run their own sweep, so a block uses g whenever it holds a residual.
        uses_g = [(runs[i] or steps[i].is_block) and self.uses_gradient(steps[i]) for i in range(n)]
        # need_in[i]: the gradient at the input of step i is needed (by an earlier step or the caller).
        need_in, acc = [False] * n, need_grad_input
        for i in range(first, n):
            need_in[i] = acc
            acc = acc or uses_g[i]
        for i in range(n - 1, first - 1, -1):
            step, state = steps[i], states[i]
            if step.is_block:
                curv, g = step.rule.backward(state, curv, g, self, runs[i], need_in[i] and runs[i])
                continue
            self._record(step, state, curv)
            if not runs[i]:
                break
            rule = step.rule
            jac = rule.jacobian(state)
            residual = rule.residual(state, g) if self.residuals and rule.has_residual else None
            curv = curv.pulled(jac).plus(residual)
            g = jac.t_vector(g) if need_in[i] else None
        return curv, g

    def result(self, like: Tensor) -> Any:
        if self.trace:
            return self.total if self.total is not None else torch.zeros((), dtype=like.dtype, device=like.device)
        return self.diags


def pull_loss_curvature(sweep: Sweep, plan: Plan, states: List[Any], oc: OutputCurvature,
                        chunk: Optional[int]) -> None:
    """Pull the loss-output curvature ``oc`` back through ``plan``, its factor columns ``chunk`` at a time.

    The first pass carries the loss's other terms and the residuals (and the
    gradient); the later passes only their columns.
    """
    K = oc.columns
    step = K if chunk is None or K == 0 else max(1, min(chunk, K))
    starts = list(range(0, K, step)) if K else [0]
    residuals = sweep.residuals
    try:
        for j, start in enumerate(starts):
            terms = list(oc.terms) if j == 0 else []
            if K:
                terms.append(oc.factor(start, min(start + step, K)))
            sweep.residuals = residuals and j == 0
            sweep.pull(plan, states, Curvature(terms), oc.grad if j == 0 else None, False, False)
    finally:
        sweep.residuals = residuals


def run(
    plan: Plan,
    spec: LossSpec,
    values: Mapping[str, Tensor],
    inputs: Any,
    targets: Any,
    wanted: Set[str],
    trace: bool,
    *,
    kind: str = "hessian",
    factor_chunk_size: Optional[int] = None,
    loss_fn: Optional[Callable[[Tensor, Any], Tensor]] = None,
    mc_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    check_only: bool = False,
) -> Any:
    """``{qualified name: diagonal}`` for the ``wanted`` parameters, or their trace (a 0-dim tensor).

    ``values`` maps every qualified parameter/buffer name of the plan to the
    tensor to use (requested parameters and constants alike); ``kind`` is
    ``"hessian"``, ``"ggn"``, ``"fisher"`` (``mc_samples`` labels per sample
    from ``generator``, drawn after the forward pass) or ``"empirical_fisher"``.
    Only the Hessian has residual terms. ``loss_fn``, when given, is evaluated on the
    model output (its value is not used): whatever it raises for these
    targets (a wrong dtype, a shape it refuses), the engine raises too.
    ``check_only`` stops after the forward pass and the loss's checks (no label
    drawn, no curvature) and returns ``None``.
    ``factor_chunk_size`` bounds the loss-factor columns pulled back at once
    (``None``: as many as keep ``columns x N x widest output`` (the model
    output only where the loss factor is formed there) under
    :data:`FACTOR_CHUNK_ENTRIES`).

    Example:
        >>> import torch
        >>> from secorder.structured import walker, losses
        >>> model = torch.nn.Linear(2, 1)
        >>> vals = {"weight": torch.tensor([[1., 2.]]), "bias": torch.tensor([0.])}
        >>> x, y = torch.tensor([[1., 1.]]), torch.tensor([[0.]])
        >>> run(walker.plan(model), losses.loss_spec(torch.nn.MSELoss()), vals, x, y, {"weight", "bias"}, trace=False)
        {'weight': tensor([[2., 2.]]), 'bias': tensor([2.])}
    """
    if not isinstance(inputs, Tensor):
        raise Unsupported(f"the module walker calls model(inputs) on one input tensor, got inputs of type "
                          f"{type(inputs).__name__}")
    sweep = Sweep(values, wanted, trace, residuals=kind == "hessian")
    out, states = sweep.run(plan, inputs)
    if loss_fn is not None:
        with torch.no_grad():  # for its errors only
            loss_fn(out, targets)
    if check_only:  # the loss curvature's checks, without drawing the Fisher's labels
        if kind in ("fisher", "empirical_fisher"):
            sampled_curvature(spec, out, targets, "empirical_fisher")
        else:
            output_curvature(spec, out, targets)
        return None
    if kind in ("fisher", "empirical_fisher"):
        oc = sampled_curvature(spec, out, targets, kind, mc_samples, generator)
    else:
        oc = output_curvature(spec, out, targets)
    chunk = factor_chunk_size
    if chunk is None:
        # The widest tensor a chunk's columns are formed at: any step output, but the model
        # output (completed last) only when the factor is explicit there.
        widths = sweep.widths[:-1] if oc.implicit else sweep.widths
        widest = max(widths, default=1)
        chunk = max(1, FACTOR_CHUNK_ENTRIES // max(1, out.shape[0] * oc.positions * widest))
    pull_loss_curvature(sweep, plan, states, oc, chunk)
    return sweep.result(out)

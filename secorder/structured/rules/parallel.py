"""``so.Parallel(*branches, merge="sum" | "concat")``: branches on the same input, a block rule.

With branch Jacobians ``J_i`` the block's Jacobian is ``sum_i J_i`` (sum) or
``[J_1; J_2; ...]`` (concatenation), so the curvature at the input is
``(sum_i J_i)^T H (sum_i J_i)`` resp. ``(sum_i J_i^T P_i) H (sum_i P_i^T J_i)`` (``P_i``
the slice of branch ``i``) plus the residual terms raised inside the branches:
the curvature's columns (:func:`~secorder.structured.columns.column_form`, per
token when they are tokenwise) go through every branch (their slice of them, for
a concatenation) and add up column by column
(:func:`~secorder.structured.columns.add_columns`); the gradient is
``sum_i J_i^T g_i``. When nothing before the block needs its input curvature,
every branch is pulled on its own (sum: the whole curvature; concatenation: its
diagonal block, :func:`~secorder.structured.columns.narrow`).

Other branching modules (BackPACK's ``Parallel``/``SumModule``, say) reuse the
rule by subclassing it and overriding :meth:`ParallelRule.bodies`,
:meth:`ParallelRule.merge` and :meth:`ParallelRule.concat_dim`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..blocks import Parallel
from ..columns import add_columns, column_form, narrow
from ..curvature import Curvature
from ..errors import Unsupported
from ..registry import register_rule
from ..rule import BlockRule, Sweep

__all__ = ["ParallelRule", "ParallelState"]


@dataclass
class ParallelState:
    branches: List[List[Any]]  # each branch's per-step states
    dim: int  # the concatenation dim, made non-negative (sum: 0, unused)
    sizes: List[int]  # each branch's extent along dim (sum: unused)


@register_rule(Parallel)
class ParallelRule(BlockRule[ParallelState]):
    @classmethod
    def bodies(cls, module: nn.Module) -> Dict[str, nn.Module]:
        return dict(module.named_children())

    def merge(self) -> str:
        """``"sum"`` or ``"concat"``."""
        return self.module.merge

    def concat_dim(self) -> int:
        """The concatenation dimension (counted with the batch)."""
        return self.module.dim

    def forward(self, x: Tensor, sweep: "Sweep") -> Tuple[Tensor, ParallelState]:
        outs, states = [], []
        for plan in self.plans.values():
            y, st = sweep.run(plan, x)
            outs.append(y)
            states.append(st)
        shapes = [tuple(o.shape) for o in outs]
        if self.merge() == "sum":
            if len(set(shapes)) != 1:
                raise Unsupported(f"sums branch outputs of different shapes {shapes}")
            out = outs[0]
            for o in outs[1:]:
                out = out + o
            return out, ParallelState(states, 0, [])
        nd = len(shapes[0])
        dim = self.concat_dim() % nd if nd else 0
        if dim == 0 or any(len(s) != nd or s[:dim] + s[dim + 1:] != shapes[0][:dim] + shapes[0][dim + 1:]
                           for s in shapes):
            raise Unsupported(f"concatenates branch outputs of shapes {shapes} along dim {self.concat_dim()}")
        return torch.cat(outs, dim), ParallelState(states, dim, [s[dim] for s in shapes])

    def _parts(self, state: ParallelState, terms: list, g: Optional[Tensor]) -> List[Tuple[list, Optional[Tensor]]]:
        """Each branch's share of ``terms`` and of the gradient ``g``."""
        if self.merge() == "sum":
            return [(list(terms), g)] * len(state.branches)
        parts, start = [], 0
        for size in state.sizes:
            gi = None if g is None else g.narrow(state.dim, start, size)
            parts.append(([narrow(t, state.dim, start, size) for t in terms], gi))
            start += size
        return parts

    def backward(self, state: ParallelState, curv: Curvature, grad_out: Optional[Tensor], sweep: "Sweep",
                 need_input: bool, need_grad_input: bool) -> Tuple[Optional[Curvature], Optional[Tensor]]:
        plans = list(self.plans.values())
        if not need_input:
            for plan, st, (terms, g) in zip(plans, state.branches, self._parts(state, curv.terms, grad_out)):
                sweep.pull(plan, st, Curvature(terms), g, False, False)
            return None, None
        columns = [column_form(t) for t in curv.terms]
        k = len(columns)
        pulled, grads = [], []
        for plan, st, (terms, g) in zip(plans, state.branches, self._parts(state, columns, grad_out)):
            c, gi = sweep.pull(plan, st, Curvature(terms), g, True, need_grad_input)
            pulled.append(c.terms)
            grads.append(gi)
        summed = []
        for j in range(k):
            acc = pulled[0][j]
            for p in pulled[1:]:
                acc = add_columns(acc, p[j])
            summed.append(acc)
        residuals = [t for p in pulled for t in p[k:]]
        g_in = None
        if need_grad_input:
            g_in = grads[0]
            for gi in grads[1:]:
                g_in = g_in + gi
        return Curvature(summed + residuals), g_in

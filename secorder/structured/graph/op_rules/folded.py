"""``addmm`` on the rows of a folded batch (Hugging Face's ``Conv1D``): ``nn.Linear``'s rule."""

from __future__ import annotations

from typing import Any, Callable, Dict, FrozenSet, Tuple

import torch
from torch import Tensor, nn
from torch.func import vjp

from ...curvature import Curvature
from ...errors import Unsupported
from ...jacobians import Jacobian
from ..ops import OP_RULES, Bound, Meta, OpRule, Slot
from ...rules.linear import LinearRule
from ._common import _meta, _shape


# -- addmm on a folded batch (Hugging Face's Conv1D: x.view(-1, d) @ W + b) ----------------------


class FoldedAddmm(OpRule):
    """``aten.addmm(bias, x, W)`` with ``x`` the rows of a folded batch (or ``[N, d]``): ``nn.Linear``'s rule.

    ``x`` is ``[N r, d]``, the view of a ``[N, ..., d]`` value; the op is a linear
    layer with weight ``W^T`` on that value, so :class:`~secorder.structured.rules.linear.LinearRule`
    runs on it, the curvature stays with the batch first, and the weight's
    diagonal is the transpose of the rule's.
    """

    doc = "x @ W + b on rows of the batch (HF Conv1D): nn.Linear's rule"

    def parameter_positions(self) -> FrozenSet[int]:
        return frozenset((0, 2))

    def bind(self, meta: Meta) -> Bound:
        if meta.live != ((1,),):
            raise Unsupported("only its second argument (the rows) may depend on the parameters as a value")
        if meta.kwargs.get("beta", 1) != 1 or meta.kwargs.get("alpha", 1) != 1:
            raise Unsupported("has alpha or beta other than 1")
        x, W = meta.args[1], meta.args[2]
        unf = meta.folded.get((1,)) or _shape(x)
        if not unf or unf[0] != meta.N or unf[-1] != W.shape[0]:
            raise Unsupported(f"on rows of shape {_shape(x)} that are not the batch's")
        bias = meta.args[0]
        if bias is not None and tuple(bias.shape) not in ((W.shape[1],),):
            raise Unsupported(f"with a bias of shape {tuple(bias.shape)}")
        with torch._C._DisableFuncTorch():
            stand_in = _meta(nn.Linear, W.shape[0], W.shape[1], bias=bias is not None)
        return _BoundAddmm(LinearRule(stand_in), meta, tuple(unf))


class _BoundAddmm(Bound):
    def __init__(self, rule: Any, meta: Meta, unf: Tuple[int, ...]):
        self.rule, self.unf = rule, unf
        self.parameter_slots = {s: q for s, q in meta.params.items() if s[0] in (0, 2)}
        self.out_unfolded = tuple(unf[:-1]) + (int(meta.args[2].shape[1]),) if (1,) in meta.folded else None

    def forward(self, args: tuple, kwargs: Dict[str, Any]) -> Tuple[Tensor, Any]:
        b, x, W = args[:3]
        xu = x.reshape(self.unf)
        tensors = {"weight": W.transpose(0, 1)} if b is None else {"weight": W.transpose(0, 1), "bias": b}
        z, state = self.rule.forward(xu, tensors)
        return z.reshape(x.shape[0], W.shape[1]), (state, args)

    def jacobians(self, state: Any) -> Dict[Slot, Jacobian]:
        return {(1,): self.rule.jacobian(state[0])}

    def _local(self, wanted: FrozenSet[str]) -> Dict[str, str]:
        return {("bias" if s[0] == 0 else "weight"): q for s, q in self.parameter_slots.items() if q in wanted}

    def parameter_diagonal(self, state: Any, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        names = self._local(wanted)
        got = self.rule.parameter_diagonal(state[0], curv, frozenset(names)) if names else {}
        return {names[k]: (v.transpose(0, 1) if k == "weight" else v) for k, v in got.items()}

    def parameter_pullbacks(self, state: Any, wanted: FrozenSet[str]) -> Dict[str, Callable[[Tensor], Any]]:
        b, x, W = state[1][:3]
        shape = tuple(self.unf[:-1]) + (W.shape[1],)
        out = {}
        for local, q in self._local(wanted).items():
            if local == "weight":
                out[q] = vjp(lambda t: torch.addmm(b, x, t).reshape(shape), W)[1]
            else:
                out[q] = vjp(lambda t: torch.addmm(t, x, W).reshape(shape), b)[1]
        return out


OP_RULES.register("aten.addmm.default", FoldedAddmm())

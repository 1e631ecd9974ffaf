"""Training-mode batch norm: batch statistics couple the samples (see
:mod:`secorder.structured.graph.batchwise`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, FrozenSet, Optional, Tuple

import torch
from torch import Tensor
from torch.func import vjp

from ...curvature import Curvature
from ...errors import Unsupported
from ...jacobians import Jacobian
from ..batchwise import BatchJacobian
from ..ops import OP_RULES, Bound, Meta, OpRule, Slot, _op_of
from ...rules.batchnorm import BatchNormRule, BatchNormState
from .layers import _batch_norm_eval


# -- training-mode batch norm: batch statistics couple the samples ------------------------------


class BatchStatisticsNorm(OpRule):
    """``aten._native_batch_norm_legit.no_stats``: batch norm on the batch's own statistics (training mode).

    The output of each sample depends on every sample's input, so the input
    Jacobian is the op's whole-batch ``vjp`` (:class:`~.batchwise.BatchJacobian`)
    and the curvature before it is kept across samples (:mod:`.batchwise`). The
    weight and bias act per sample given the normalised input ``xhat``: their
    diagonal is the eval-mode rule's (:class:`~secorder.structured.rules.batchnorm.BatchNormRule`)
    with the batch's ``xhat``. The exact Hessian's residual of the batch statistics
    has no rule: the exact Hessian declines. The running statistics are not read
    or written (the model is traced with ``track_running_stats`` off, as
    :class:`secorder.FunctionalLoss` calls it).
    """

    doc = "training-mode batch norm (batch statistics; GGN and Fishers)"

    def parameter_positions(self) -> FrozenSet[int]:
        return frozenset((1, 2))

    def bind(self, meta: Meta) -> "_BoundBatchStats":
        for slot in meta.live:
            if slot != (0,):
                raise Unsupported(f"its argument {slot[0]} depends on the parameters")
        x = meta.args[0]
        if x.dim() < 2 or x.shape[0] != meta.N:
            raise Unsupported(f"on an input of shape {tuple(x.shape)}")
        with torch._C._DisableFuncTorch():
            stand_in = _batch_norm_eval(Meta(meta.target, (x, meta.args[1], meta.args[2], x, x, 0.0, meta.args[5]),
                                             {}, (), {}, None, meta.N))
        return _BoundBatchStats(BatchNormRule(stand_in), meta)


class _BoundBatchStats(Bound):
    coupled = True
    main_output = 0

    def __init__(self, rule: Any, meta: Meta):
        self.rule, self.target = rule, _op_of(meta.target)
        self.parameter_slots = {s: q for s, q in meta.params.items() if s[0] in (1, 2)}
        self.live = (0,) in meta.live

    def _z(self, x: Tensor, w: Optional[Tensor], b: Optional[Tensor], args: tuple) -> Tensor:
        return self.target(x, w, b, *args[3:])[0]

    def forward(self, args: tuple, kwargs: Dict[str, Any]) -> Tuple[Tensor, Any]:
        x, w, b = args[:3]
        z, pullback = vjp(lambda t: self._z(t, w, b, args), x)
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        xhat = (x - mean) * torch.rsqrt(var + args[5])
        return z, (pullback, BatchNormState(xhat, xhat, tuple(x.shape)), args)

    def jacobians(self, state: Any) -> Dict[Slot, Jacobian]:
        return {(0,): BatchJacobian(state[0])} if self.live else {}

    def _local(self, wanted: FrozenSet[str]) -> Dict[str, str]:
        return {("weight" if s[0] == 1 else "bias"): q for s, q in self.parameter_slots.items() if q in wanted}

    def parameter_diagonal(self, state: Any, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        names = self._local(wanted)
        got = self.rule.parameter_diagonal(state[1], curv, frozenset(names)) if names else {}
        return {names[k]: v for k, v in got.items()}

    def parameter_pullbacks(self, state: Any, wanted: FrozenSet[str]) -> Dict[str, Callable[[Tensor], Any]]:
        args = state[2]
        x, w, b = args[:3]
        out = {}
        for local, q in self._local(wanted).items():
            if local == "weight":
                out[q] = vjp(lambda t: self._z(x, t, b, args), w)[1]
            else:
                out[q] = vjp(lambda t: self._z(x, w, t, args), b)[1]
        return out


OP_RULES.register("aten._native_batch_norm_legit.no_stats", BatchStatisticsNorm())

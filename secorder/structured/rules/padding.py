"""Padding modules in 1, 2 and 3 dimensions: ``nn.ZeroPad*d``, ``nn.ConstantPad*d``, ``nn.ReflectionPad*d``,
``nn.ReplicationPad*d``, ``nn.CircularPad*d``.

A constant padding (negative amounts crop) copies each input entry to at most
one output entry: its Jacobian is a
:class:`~secorder.structured.jacobians.Selection` whose transpose is the
opposite padding (a crop where the module pads, zeros where it crops), so
diagonal curvature terms stay diagonal. Reflection, replication and circular
padding copy border entries several times; their Jacobian's transpose is the
``torch.func.vjp`` of the padding, mapped over the columns. A rule for another
padding module overrides :meth:`PadRule.spec`.

Example:
    >>> import torch, secorder as so
    >>> model = torch.nn.Sequential(torch.nn.Conv1d(1, 2, 2), torch.nn.ZeroPad1d((1, 2)), torch.nn.Flatten(),
    ...                             torch.nn.Linear(12, 2))
    >>> f = so.functional_loss(model, torch.nn.MSELoss())
    >>> fn = so.hessian_diag(f)
    >>> d = fn(so.params_dict(model), torch.randn(3, 1, 4), torch.randn(3, 2))
    >>> fn.last_engine
    'structured'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Tuple

import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vjp

from ..errors import Unsupported
from ..jacobians import Columns, Jacobian, Selection
from ..registry import register_rule
from ..rule import Rule

__all__ = ["PadRule", "PadState"]

_MODES = {
    "constant": (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d),
    "reflect": (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d),
    "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
    "circular": (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d),
}


@dataclass
class PadState:
    jacobian: Jacobian


class PadRule(Rule[PadState]):
    def spec(self) -> Tuple[Tuple[int, ...], str, float]:
        """``(pad, mode, value)`` as ``torch.nn.functional.pad`` takes them."""
        m = self.module
        mode = next(k for k, types in _MODES.items() if type(m) in types)
        return tuple(m.padding), mode, float(getattr(m, "value", 0.0))

    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, PadState]:
        pads, mode, value = self.spec()
        if x.dim() <= len(pads) // 2:
            raise Unsupported(f"pads {len(pads) // 2} dims of an input of shape {tuple(x.shape)}, "
                              f"the batch dimension included")
        if mode == "constant":
            back = [-p for p in pads]
            return F.pad(x, pads, value=value), PadState(Selection(lambda t: F.pad(t, back)))
        z, pullback = vjp(lambda t: F.pad(t, pads, mode=mode), x)
        return z, PadState(Columns.from_vjp(pullback))

    def jacobian(self, state: PadState) -> Jacobian:
        return state.jacobian


for _types in _MODES.values():
    for _t in _types:
        register_rule(_t, PadRule)

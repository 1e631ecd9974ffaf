"""Rules for BackPACK's custom modules (``backpack.custom_module``), for models built for BackPACK.

Imported, and its rules registered, the first time the engine looks up a
module type defined in the ``backpack`` package (so that ``secorder`` never
imports BackPACK itself; see :func:`secorder.structured.registry.register_lazy`):

* ``Pad(pad, mode, value)``: :class:`~secorder.structured.rules.padding.PadRule`
  with BackPACK's arguments;
* ``Slicing(slice_info)``: basic slicing by integers and slices, the batch
  dimension kept whole; a :class:`~secorder.structured.jacobians.Selection`
  whose transpose scatters back into zeros (``torch.select_scatter`` and
  ``torch.slice_scatter``, out of place);
* ``Permute(*dims)``: a permutation of a sample's dimensions
  (:class:`~secorder.structured.tokens.Permute`);
* ``ScaleModule(weight)``: ``z = weight * x``, an elementwise Jacobian;
* ``Parallel(*branches)`` with the default ``SumModule`` merge: the summed
  branches of :class:`~secorder.structured.rules.parallel.ParallelRule`
  (BackPACK keeps them in ``parallel.branch``).

Example:
    >>> import torch, secorder as so
    >>> from backpack.custom_module.slicing import Slicing
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), Slicing((slice(None), slice(1, 3))), torch.nn.Linear(2, 1))
    >>> f = so.functional_loss(model, torch.nn.MSELoss())
    >>> fn = so.hessian_diag(f)
    >>> d = fn(so.params_dict(model), torch.randn(5, 3), torch.randn(5, 1))
    >>> fn.last_engine
    'structured'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Tuple

import torch
from backpack.custom_module.branching import Parallel, SumModule
from backpack.custom_module.pad import Pad
from backpack.custom_module.permute import Permute
from backpack.custom_module.scale_module import ScaleModule
from backpack.custom_module.slicing import Slicing
from torch import Tensor, nn

from ..errors import Unsupported
from ..jacobians import Elementwise, Jacobian, Selection
from ..registry import register_rule
from ..rule import Rule
from ..tokens import Permute as PermuteJacobian
from .padding import PadRule
from .parallel import ParallelRule

__all__ = ["BackpackPadRule", "SlicingRule", "PermuteRule", "ScaleModuleRule", "BackpackParallelRule",
           "slicing_adjoint"]


@register_rule(Pad)
class BackpackPadRule(PadRule):
    def spec(self) -> Tuple[Tuple[int, ...], str, float]:
        m = self.module
        return tuple(m.pad), m.mode, float(m.value)


def slicing_adjoint(index: object, shape: Tuple[int, ...]) -> Tuple[Callable[[Tensor], Tensor], Tuple[int, ...]]:
    """The transpose of ``x[index]`` on a sample's dims, and the sliced shape.

    ``shape`` is the input's shape with the batch; ``index`` an int, a slice or a
    tuple of them whose first entry keeps the batch whole. Returns a function
    mapping ``[..., *out_feat]`` to ``[..., *in_feat]`` and the output shape.

    Example:
        >>> back, out = slicing_adjoint((slice(None), 1, slice(0, 3, 2)), (2, 3, 4))
        >>> out, back(torch.ones(2, 2))[0]
        ((2, 2), tensor([[0., 0., 0., 0.],
                [1., 0., 1., 0.],
                [0., 0., 0., 0.]]))
    """
    entries = index if isinstance(index, tuple) else (index,)
    if not entries or entries[0] != slice(None):
        raise Unsupported(f"slices the batch dimension ({index!r})")
    if len(entries) > len(shape):
        raise Unsupported(f"indexes {len(entries)} dims of an input of shape {tuple(shape)}")
    feat: List[int] = list(shape[1:])
    ops = []  # (select?, dim among the current features, arguments, feature shape before)
    d = 0
    for e in entries[1:]:
        size = feat[d]
        before = tuple(feat)
        if isinstance(e, int) and not isinstance(e, bool):
            if not -size <= e < size:
                raise Unsupported(f"index {e} out of range for a dim of size {size}")
            ops.append((True, d, (e % size,), before))
            feat.pop(d)
        elif isinstance(e, slice):
            start, stop, step = e.indices(size)
            if step <= 0:
                raise Unsupported(f"slice {e!r} has a non-positive step")
            ops.append((False, d, (start, stop, step), before))
            feat[d] = len(range(start, stop, step))
            d += 1
        else:
            raise Unsupported(f"indexes with {type(e).__name__} (only ints and slices)")
    out_feat = tuple(feat)

    def adjoint(t: Tensor) -> Tensor:
        lead = t.dim() - len(out_feat)
        for select, dim, args, before in reversed(ops):
            base = t.new_zeros(tuple(t.shape[:lead]) + before)
            if select:
                t = torch.select_scatter(base, t, lead + dim, *args)
            else:
                t = torch.slice_scatter(base, t, lead + dim, *args)
        return t

    return adjoint, (shape[0],) + out_feat


@dataclass
class SelectionState:
    jacobian: Jacobian


@register_rule(Slicing)
class SlicingRule(Rule[SelectionState]):
    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, SelectionState]:
        back, _ = slicing_adjoint(self.module.slice_info, tuple(x.shape))
        return x[self.module.slice_info], SelectionState(Selection(back))

    def jacobian(self, state: SelectionState) -> Jacobian:
        return state.jacobian


@register_rule(Permute)
class PermuteRule(Rule[SelectionState]):
    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, SelectionState]:
        m, nd = self.module, x.dim()
        if m.init_transpose:  # Permute(a, b, init_transpose=True) swaps two dims
            perm = list(range(nd))
            perm[m.dims[0]], perm[m.dims[1]] = perm[m.dims[1]], perm[m.dims[0]]
        else:
            perm = [int(p) % nd for p in m.dims] if nd else []
        if sorted(perm) != list(range(nd)) or perm[0] != 0:
            raise Unsupported(f"permutes an input of shape {tuple(x.shape)} by {tuple(m.dims)} (the batch must stay first)")
        return x.permute(perm), SelectionState(PermuteJacobian(perm, tuple(x.shape)))

    def jacobian(self, state: SelectionState) -> Jacobian:
        return state.jacobian


@dataclass
class ScaleState:
    scale: Tensor
    shape: Tuple[int, ...]


@register_rule(ScaleModule)
class ScaleModuleRule(Rule[ScaleState]):
    def forward(self, x: Tensor, tensors: Mapping[str, Tensor]) -> Tuple[Tensor, ScaleState]:
        return x * self.module.weight, ScaleState(x.new_tensor(float(self.module.weight)), tuple(x.shape))

    def jacobian(self, state: ScaleState) -> Jacobian:
        return Elementwise(state.scale, state.shape)


@register_rule(Parallel)
class BackpackParallelRule(ParallelRule):
    def __init__(self, module: nn.Module, plans) -> None:
        if type(module.merge) is not SumModule:
            raise Unsupported(f"merges its branches with {type(module.merge).__name__} (only SumModule)")
        super().__init__(module, plans)

    @classmethod
    def bodies(cls, module: nn.Module) -> Dict[str, nn.Module]:
        return {f"branch.{k}": m for k, m in module.branch.named_children()}

    def merge(self) -> str:
        return "sum"

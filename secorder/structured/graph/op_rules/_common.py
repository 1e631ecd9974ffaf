"""Helpers shared by the built-in op rules: shapes, the batch checks, the reshape Jacobian, stand-in
modules.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor, nn

from ...jacobians import Jacobian, Reshape
from ..ops import Meta, Slot, slot_value


def _shape(x: Any) -> tuple:
    return tuple(x.shape) if isinstance(x, Tensor) else ()


def _live_shapes(meta: Meta) -> list:
    return [_shape(slot_value(meta.args, s)) for s in meta.live]


def _keeps_batch(meta: Meta) -> Optional[str]:
    """Every live argument and the output have the batch as dimension 0, and as many dims as the output."""
    out = _shape(meta.out)
    for s, shp in zip(meta.live, _live_shapes(meta)):
        if not shp or shp[0] != meta.N:
            return f"argument {s[0]} of shape {shp} has no batch dimension {meta.N} first"
        if len(shp) != len(out):
            return f"broadcasts argument {s[0]} of shape {shp} to {out}"
    if not out or out[0] != meta.N:
        return f"gives shape {out}, without the batch dimension {meta.N} first"
    return None


def _norm(d: int, n: int) -> int:
    return d + n if d < 0 else d


def _dims_exclude_batch(dims: Any, ndim: int, what: str) -> Optional[str]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return f"{what} over every dimension, the batch included"
    dims = [dims] if isinstance(dims, int) else list(dims)
    if any(_norm(d, ndim) == 0 for d in dims):
        return f"{what} over the batch dimension"
    return None


def _first_live_ndim(meta: Meta) -> int:
    return len(_live_shapes(meta)[0])


def _batch_out(meta: Meta) -> Optional[str]:
    """Only the output and the live inputs' leading size are checked (reshapes keep samples apart then)."""
    out = _shape(meta.out)
    for s, shp in zip(meta.live, _live_shapes(meta)):
        if not shp or shp[0] != meta.N:
            return f"argument {s[0]} of shape {shp} has no batch dimension {meta.N} first"
    if not out or out[0] != meta.N:
        return f"gives shape {out}, without the batch dimension {meta.N} first"
    return None


def _with(extra):
    def check(meta: Meta) -> Optional[str]:
        return _batch_out(meta) or extra(meta)
    return check


def _reshape_jacobian(meta: Meta, slot: Slot, args: tuple) -> Jacobian:
    return Reshape(_shape(slot_value(args, slot)))








def _meta(cls: type, *args: Any, **kwargs: Any) -> nn.Module:
    """A stand-in module on the meta device, without initialising its parameters (no random ops: vmap-safe)."""
    return nn.utils.skip_init(cls, *args, device="meta", **kwargs)

"""The per-thread switch: a ``TorchFunctionMode`` that sends registered operations to their composites."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

from . import forward_mode
from .registry import COMPOSITES

__all__ = ["differentiable_ops", "active"]

_state = threading.local()


class _CompositeMode(TorchFunctionMode):
    """Intercepts every torch call of this thread; a registered one runs its composite.

    PyTorch pops the mode while ``__torch_function__`` runs, so the composites'
    own torch calls are not intercepted again.
    """

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        entry = COMPOSITES.lookup(func)
        if entry is not None and (entry.applies is None or entry.applies(*args, **kwargs)):
            return entry.impl(*args, **kwargs)
        forward_mode.check(func, args, kwargs)
        return func(*args, **kwargs)


def active() -> bool:
    """Whether :func:`differentiable_ops` is active in this thread.

    Example:
        >>> from secorder.composites import active, differentiable_ops
        >>> with differentiable_ops():
        ...     inside = active()
        >>> inside, active()
        (True, False)
    """
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def differentiable_ops() -> Iterator[None]:
    """Within the block, in this thread only, registered operations run as their composites.

    Re-entrant (a nested block is a no-op). Not applied while ``torch.compile``
    traces (Dynamo sees PyTorch's operations; compiled graphs decompose attention
    and normalisation themselves).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from secorder.composites import differentiable_ops
        >>> q = torch.randn(1, 1, 2, 3, dtype=torch.float64, requires_grad=True)
        >>> with differentiable_ops():
        ...     out = F.scaled_dot_product_attention(q, q, q)
        ...     (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        ...     (gg,) = torch.autograd.grad(g.sum(), q)          # double backward works
        >>> gg.shape
        torch.Size([1, 1, 2, 3])
    """
    if active() or torch.compiler.is_compiling():
        yield
        return
    _state.depth = 1
    try:
        with _CompositeMode():
            yield
    finally:
        _state.depth = 0

"""The size of the largest tensor that a computation allocates, measured as it runs.

A batched matvec is a ``vmap`` of a linear map whose intermediates have the shapes
of the tensors that the linearisation's build (the forward, and backward, pass at
the primal point) allocated, times the probes of the chunk. :func:`largest_output`
runs the build under a ``TorchDispatchMode`` that sees every ATen op's new outputs
(views and in-place results allocate nothing and are not counted)
(below autograd and ``torch.func``'s transforms, so under an outer ``vmap`` it sees
the physical batched tensors) and keeps the largest size in bytes; the estimators
bound their default probe chunk by it (:func:`secorder.estimators._common.probe_chunk`).
Under ``torch.compile`` nothing is measured (Dynamo would trace the mode).

The mode costs Python work per op (on a 20-64-5 MLP it made ``so.ggn_vp`` 60%
slower), so a build is measured only inside :class:`measuring`, which the
transforms enter for the stochastic estimators, the only readers.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["largest_output", "measuring", "wanted"]

_STATE = threading.local()


class measuring:
    """Within this context (this thread), linearisations measure their largest tensor when built.

    Example:
        >>> with measuring():
        ...     wanted()
        True
        >>> wanted()
        False
    """

    def __enter__(self) -> None:
        self._previous = getattr(_STATE, "on", False)
        _STATE.on = True

    def __exit__(self, *exc: Any) -> None:
        _STATE.on = self._previous


def wanted() -> bool:
    """Whether a build should be measured now: inside :class:`measuring`, outside ``torch.compile``.

    Example:
        >>> wanted()   # outside measuring()
        False
    """
    return bool(getattr(_STATE, "on", False)) and not torch.compiler.is_compiling()


class _Largest(TorchDispatchMode):
    """Run every op unchanged; keep the byte size of the largest tensor output."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place op allocates nothing
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


def largest_output(fn: Callable[[], Any]) -> Tuple[Any, Optional[int]]:
    """``fn()`` and the bytes of the largest tensor an op made while it ran (``None``: not measured).

    Example:
        >>> import torch
        >>> x = torch.ones(4, 8)
        >>> largest_output(lambda: (x @ x.T).sum())   # the 4 x 4 product: 64 bytes
        (tensor(128.), 64)
    """
    if torch.compiler.is_compiling():
        return fn(), None
    mode = _Largest()
    with mode:
        value = fn()
    return value, mode.nbytes or None

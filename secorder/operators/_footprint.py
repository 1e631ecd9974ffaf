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

Tensors shaped like a differentiated leaf (a gradient, a weight's transpose made
contiguous) are not counted: the products and probes have those shapes, and the
probe block is bounded for them by the dimension (``probe_chunk``); what that bound
cannot see is the activations. Counting them cut a 784-32-10 MLP's 300-probe batch
(30 MB of weight gradients, 8 KB of activations per probe) in two and made it 1.5x
slower: its batched products are matrix products that gain from a large batch.

The mode costs Python work per op (on a 20-64-5 MLP it made ``so.ggn_vp`` 60%
slower), so a build is measured only inside :class:`measuring`, which the
transforms enter for the stochastic estimators, the only readers.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional, Sequence, Tuple

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
    """Run every op unchanged; keep the byte size of the largest tensor output not shaped like ``skip``."""

    def __init__(self, skip: Sequence[Tuple[int, ...]]) -> None:
        super().__init__()
        self.nbytes = 0
        self.skip = set(skip)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place op allocates nothing
        for t in tree_leaves(out):
            # exact shapes only: a Linear layer's activation is a bias's shape behind a batch dim
            if isinstance(t, torch.Tensor) and tuple(t.shape) not in self.skip:
                self.nbytes = max(self.nbytes, t.numel() * t.element_size())
        return out


def largest_output(fn: Callable[[], Any], skip: Sequence[Tuple[int, ...]] = ()) -> Tuple[Any, Optional[int]]:
    """``fn()`` and the bytes of the largest tensor an op made while it ran (``None``: not measured).

    Tensors of a shape in ``skip`` are not counted (an activation that happens to have a
    leaf's shape is missed with them, which errs towards larger batches, as before).

    Example:
        >>> import torch
        >>> x = torch.ones(4, 8)
        >>> largest_output(lambda: (x @ x.T).sum())   # the 4 x 4 product: 64 bytes
        (tensor(128.), 64)
        >>> largest_output(lambda: (x @ x.T).sum(), skip=[(4, 4)])   # then the sum's 4 bytes
        (tensor(128.), 4)
    """
    if torch.compiler.is_compiling():
        return fn(), None
    mode = _Largest(skip)
    with mode:
        value = fn()
    return value, mode.nbytes or None

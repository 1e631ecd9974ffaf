"""Model state that a legacy call must leave as it found it, restored on exit and after an exception.

The legacy functions that run a model's forward themselves are analysis
calls: they must not train the model. A training-mode ``BatchNorm`` forward
updates its running statistics, a per-layer function flips ``requires_grad``
flags, a landscape scan moves the parameters; torch-secorder 0.0.1 left some of
these changed, and all of them after an exception. :func:`preserved_state`
records what can change and puts it back, always.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
from torch import Tensor, nn

__all__ = ["preserved_state"]


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s train/eval flags, parameter and buffer objects, buffer values, ``requires_grad`` and ``.grad``.

    Buffers are copied back in place (their tensors stay the same objects);
    a buffer or parameter attribute that was replaced is put back. Parameter
    values are not copied (the legacy functions never write them; the ones
    that move parameters restore them themselves).

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(2).train()
        >>> with preserved_state(bn):
        ...     _ = bn(torch.randn(4, 2))
        ...     _ = bn.weight.requires_grad_(False)
        >>> bn.running_mean, int(bn.num_batches_tracked), bn.weight.requires_grad
        (tensor([0., 0.]), 0, True)
    """
    modules = list(model.modules())
    training = [(m, m.training) for m in modules]
    param_slots = [(m, dict(m._parameters)) for m in modules]
    buffer_slots = [(m, dict(m._buffers)) for m in modules]
    params = list(model.parameters())
    flags = [(p, p.requires_grad, p.grad) for p in params]
    buffer_values: List[Tuple[Tensor, Tensor]] = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for m, slots in param_slots:
            m._parameters.update(slots)
        for m, slots in buffer_slots:
            m._buffers.update(slots)
        with torch.no_grad():
            for b, value in buffer_values:
                if b.shape == value.shape:
                    b.copy_(value)
                else:  # resized in place
                    b.set_(value)
        for p, requires_grad, grad in flags:
            if p.requires_grad != requires_grad:
                p.requires_grad_(requires_grad)
            if p.grad is not grad:
                p.grad = grad
        for m, mode in training:
            m.training = mode

"""Loss graphs that go through a fused attention kernel: PyTorch's error, explained.

The legacy functions call a closure, or take tensors the caller computed, and
differentiate the result twice on the autograd engine. A closure runs with
:func:`secorder.differentiable_ops` (attention on a kernel with every
derivative), but a loss or output built before the call (``loss =
model(**batch).loss`` and then ``lambda: loss``) already holds PyTorch's fused
scaled-dot-product-attention kernel, whose backward has no derivative. The
second backward pass then stops with ``derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``;
:func:`explain_fused_attention` re-raises it with what to do, the original as
its cause. :func:`has_fused_attention` finds such a kernel in a graph, for the
functions whose result the caller differentiates later (``create_graph=True``).

Example:
    >>> import torch
    >>> kernel = "aten::_scaled_dot_product_flash_attention_for_cpu_backward"
    >>> with explain_fused_attention():
    ...     raise RuntimeError(f"derivative for {kernel} is not implemented")
    Traceback (most recent call last):
    ...
    RuntimeError: derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented; ...
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

from torch import Tensor

__all__ = ["HINT", "explain_fused_attention", "has_fused_attention"]

_FUSED = re.compile(r"scaled_?dot_?product|flash_?attention|efficient_?attention|cudnn_?attention", re.IGNORECASE)

HINT = (
    "the graph goes through a fused scaled-dot-product-attention kernel (PyTorch's default for "
    "F.scaled_dot_product_attention and the transformers that call it), which has no double backward and no "
    "forward-mode rule: compute the loss inside the closure you pass (the legacy functions run it with "
    "secorder.differentiable_ops()), or build it inside `with secorder.differentiable_ops():`, which runs "
    "attention on a kernel that can be differentiated twice"
)


def _missing_rule(err: BaseException) -> bool:
    text = str(err)
    return bool(_FUSED.search(text)) and ("not implemented" in text or "forward AD" in text
                                          or "does not support" in text)


@contextlib.contextmanager
def explain_fused_attention() -> Iterator[None]:
    """Within the block, PyTorch's missing-derivative error of a fused attention kernel gets the hint above.

    The error stays a ``RuntimeError`` whose message starts with PyTorch's own;
    every other error passes unchanged.
    """
    try:
        yield
    except RuntimeError as err:
        if not _missing_rule(err) or HINT in str(err):
            raise
        raise RuntimeError(f"{err}; {HINT}") from err


def has_fused_attention(t: Tensor) -> bool:
    """Whether the autograd graph of ``t`` holds a fused attention kernel's backward.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> q = torch.randn(1, 1, 2, 3, requires_grad=True)
        >>> has_fused_attention(F.scaled_dot_product_attention(q, q, q)), has_fused_attention(q * 2)
        (True, False)
    """
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if _FUSED.search(type(node).__name__) or _FUSED.search(node.name()):
            return True
        stack.extend(nxt for nxt, _ in node.next_functions)
    return False

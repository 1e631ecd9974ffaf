"""One forward pass that records every K-FAC layer call, whatever the model's wiring.

The model runs under a :class:`~torch.overrides.TorchFunctionMode` (thread-local,
nothing is attached to the user's modules): every call of a function that
:data:`~secorder.kronecker.layers.RULES` knows (``F.linear``, ``F.conv*d``,
``F.embedding``) whose weight or bias *is* one of the differentiated leaves is
recorded with its input, and its output's gradient edge is kept so that a
backward pass can read the gradient there, even if a later in-place operation
(``ReLU(inplace=True)``) overwrites the output. The weight enters the call as a
fresh leaf that nothing differentiates, so the backward pass computes no weight
gradients.

Every other use of a differentiated leaf (a ``LayerNorm`` weight, a weight
transposed by hand, an unsupported layer) is recorded too, so that K-FAC can
refuse, naming them, instead of silently ignoring part of the curvature.
Reading a leaf's metadata (shape, dtype, ...) is not a use.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    >>> leaves = [p.detach() for p in model.parameters()]
    >>> params = dict(zip([n for n, _ in model.named_parameters()], leaves))
    >>> with Recorder(leaves, grad=False) as rec:
    ...     out = torch.func.functional_call(model, params, (torch.randn(2, 3),))
    >>> [(c.rule.name, c.weight, c.bias) for c in rec.calls], rec.other
    ([('Linear', 0, 1)], {2: {'layer_norm'}, 3: {'layer_norm'}})
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Set

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

from .layers import RULES, Call

__all__ = ["Recorder"]

_METADATA_ATTRIBUTES = frozenset({
    "shape", "dtype", "device", "requires_grad", "is_cuda", "ndim", "layout", "is_leaf", "is_sparse",
    "is_quantized", "is_meta", "names", "grad_fn", "_version", "output_nr", "is_mkldnn", "is_nested",
    "itemsize", "nbytes", "is_cpu", "is_xpu", "is_mps",
})
_METADATA_METHODS = frozenset({
    "size", "dim", "numel", "is_floating_point", "is_complex", "stride", "is_contiguous", "element_size",
    "data_ptr", "get_device", "__len__", "__hash__", "__format__", "__repr__", "nelement", "ndimension",
    "storage_offset", "is_inference",
})


def _name(func: Any) -> str:
    name = getattr(func, "__name__", None) or repr(func)
    if name == "__get__":
        owner = getattr(func, "__self__", None)
        return getattr(owner, "__name__", "attribute")
    return name


def _is_metadata(func: Any) -> bool:
    if getattr(func, "__name__", None) == "__get__":
        return _name(func) in _METADATA_ATTRIBUTES
    return _name(func) in _METADATA_METHODS


def _tensors(value: Any, depth: int = 0):
    if isinstance(value, Tensor):
        yield value
    elif depth < 3 and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v, depth + 1)


class Recorder(TorchFunctionMode):
    """Record the K-FAC layer calls on ``leaves`` (module docstring).

    Args:
        leaves: the differentiated tensors, recognised by identity.
        grad: whether a backward pass follows (outputs then carry gradient edges).

    Attributes:
        calls: the recorded :class:`~secorder.kronecker.layers.Call` s, in call order.
        other: leaf index -> names of the other functions that used it.
        unsupported: leaf index -> why its layer call is not a K-FAC layer.
        convolutions: whether the model called any convolution.
    """

    def __init__(self, leaves: Sequence[Tensor], *, grad: bool):
        super().__init__()
        self.ids: Dict[int, int] = {id(t): i for i, t in enumerate(leaves)}
        self.grad = grad
        self.calls: List[Call] = []
        self.other: Dict[int, Set[str]] = {}
        self.unsupported: Dict[int, str] = {}
        self.convolutions = False  # any convolution in the model (its batched backward is slow: collect.py)

    def _index(self, t: Any) -> Any:
        return self.ids.get(id(t)) if isinstance(t, Tensor) else None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not self.convolutions and _name(func).startswith("conv"):
            self.convolutions = True
        rule = RULES.lookup(func) if not isinstance(func, type) else None
        if rule is not None:
            bound = rule.bind(args, kwargs)
            w, b = self._index(bound.get("weight")), self._index(bound.get("bias"))
            if w is not None or b is not None:
                reason = rule.unsupported(bound)
                if reason is None:
                    return self._record(func, rule, bound, w, b)
                for i in (w, b):
                    if i is not None:
                        self.unsupported[i] = reason
                return func(*args, **kwargs)
        if self.ids and not _is_metadata(func):
            for t in _tensors((args, kwargs)):
                i = self.ids.get(id(t))
                if i is not None:
                    self.other.setdefault(i, set()).add(_name(func))
        return func(*args, **kwargs)

    def _record(self, func: Any, rule: Any, bound: Dict[str, Any], w: Any, b: Any) -> Tensor:
        weight, bias = bound["weight"], bound.get("bias")
        # A fresh leaf that no one differentiates: the output gets a grad_fn (so its gradient edge
        # exists even for the first layer) and no weight gradient is ever computed.
        weight_in = weight.detach().requires_grad_() if self.grad and weight.is_floating_point() else weight.detach()
        bias_in = bias.detach() if isinstance(bias, Tensor) else bias
        y = rule.call(func, bound, weight_in, bias_in)
        edge = get_gradient_edge(y) if self.grad and y.requires_grad else None
        x = bound["input"]
        self.calls.append(Call(rule, w, b, x.detach() if isinstance(x, Tensor) else x, rule.options(bound),
                               tuple(weight.shape), weight.dtype, edge))
        return y

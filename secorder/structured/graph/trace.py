"""Tracing a model into an ATen graph for the graph walker, cached per model and input structure.

The tracer is ``torch.export.export(model, args, kwargs, strict=False)``
followed by ``run_decompositions({})``. Why this one:

* ``torch.fx.symbolic_trace`` fails on the models people train (Hugging Face
  ResNet, ViT, BERT, GPT-2: control flow on shapes, iteration over proxies);
  non-strict export runs the model's Python as Python, with fake tensors, so
  shape-dependent control flow simply takes the branch of the example's shapes.
* Strict export (TorchDynamo) refuses more Python than the non-strict mode and
  costs more.
* ``run_decompositions({})`` with an empty table decomposes nothing a rule
  knows (``linear``, ``conv2d``, ``relu`` stay whole) but makes the graph
  functional: the training IR keeps in-place updates (``add_`` in Hugging Face's
  residual blocks), whose later readers would see the updated value.

The graph depends on the shapes, dtypes and devices of the inputs, on the
structure of ``inputs`` (and the non-tensor values in it), on which modules the
model holds and their ``training`` flags, and on the shapes of its parameters
and buffers; not on the values of any tensor. :func:`traced` keys its cache on
exactly those, so a new input shape re-traces (a stale graph is never reused)
and the same shapes reuse the graph. A failed export is cached too, with the
exporter's reason, so a model that cannot be traced costs one attempt.

Example:
    >>> import torch
    >>> g = traced(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()), torch.ones(4, 2))
    >>> [str(n.target) for n in g.graph.nodes if n.op == "call_function"]
    ['aten.linear.default', 'aten.relu.default']
    >>> traced(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU()), torch.ones(4, 2)) is not g  # another model
    True
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor, nn

from ...model_call import model_arguments
from ..errors import Unsupported

__all__ = ["Traced", "traced", "where", "cache_size"]


@dataclass
class Traced:
    """One exported graph: its nodes, what each placeholder stands for, and the output structure.

    ``placeholders`` maps each placeholder node name to ``("parameter" | "buffer", fqn)``,
    ``("constant", tensor)`` or ``("input", position among the flattened user inputs)``.
    """

    graph: torch.fx.Graph
    placeholders: Dict[str, Tuple[str, Any]]
    out_spec: Any
    seconds: float


_CACHE: "weakref.WeakKeyDictionary[nn.Module, Dict[Any, Any]]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_MAX_PER_MODEL = 16  # input structures kept per model (oldest dropped first)


def _leaf_key(x: Any) -> Any:
    if isinstance(x, Tensor):
        return ("T", tuple(x.shape), x.dtype, str(x.device))
    try:
        hash(x)
        return ("V", type(x).__name__, x)
    except TypeError:
        return ("V", type(x).__name__, repr(x))


def _key(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    leaves, spec = pytree.tree_flatten((args, kwargs))
    modules = tuple((name, id(m), m.training) for name, m in model.named_modules())
    named = list(model.named_parameters()) + list(model.named_buffers())
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in named)
    return (str(spec), tuple(_leaf_key(x) for x in leaves), modules, tensors)


def _plain(x: Any) -> Any:
    """A tensor the exporter can take: the tensor itself, or zeros of its shape inside ``torch.func`` transforms."""
    if isinstance(x, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x):
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    return x


class _Wrapped(nn.Module):
    """``model`` as exported: called through ``functional_call`` with ``state`` (training-mode batch norms'
    running statistics set to ``None``: batch statistics, no update, the module's attributes untouched)
    and/or followed by a callable ``output=``, exported with the model (the graph's one output is then what
    the loss takes). Every name gets the prefix ``model.``, taken off again."""

    def __init__(self, model: nn.Module, state: Dict[str, Any], output: Optional[Callable[[Any], Any]]):
        super().__init__()
        self.model, self._state, self.output = model, state, output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = torch.func.functional_call(self.model, self._state, args, kwargs) if self._state else \
            self.model(*args, **kwargs)
        return out if self.output is None else self.output(out)


_PREFIX = "model."


def _export(model: nn.Module, args: tuple, kwargs: dict, output: Optional[Callable[[Any], Any]] = None) -> Traced:
    import time

    from ...modules import _batch_statistics, _module_lock

    args, kwargs = pytree.tree_map(_plain, (args, kwargs))
    # Training-mode batch norms trace with their running statistics set to None through functional_call's
    # state (aten._native_batch_norm_legit.no_stats); the wrapper's prefix is taken off below.
    none_state = _batch_statistics(model, {})
    wrapped = bool(none_state) or output is not None
    target = _Wrapped(model, none_state, output) if wrapped else model
    start = time.perf_counter()
    try:
        # Outside any torch.func level (inside vmap the exporter would see batched dispatch and decompose
        # linear into t/addmm); the example tensors are plain (see _plain).
        with _module_lock(model), torch.no_grad(), torch._C._DisableFuncTorch():
            ep = torch.export.export(target, tuple(args), dict(kwargs), strict=False)
            ep = ep.run_decompositions({})
    except Exception as err:  # the exporter's reason, whatever it raises
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise Unsupported(f"torch.export could not trace the model: {type(err).__name__}: {first}") from None
    seconds = time.perf_counter() - start
    if wrapped:  # name modules as the user's model names them, not as the wrapper does
        for node in ep.graph.nodes:
            stack = node.meta.get("nn_module_stack")
            if stack:
                node.meta["nn_module_stack"] = {
                    k: ((path[len(_PREFIX):] if path.startswith(_PREFIX) else path), cls)
                    for k, (path, cls) in stack.items() if path}
    kinds = {}
    user = 0
    from torch.export.graph_signature import InputKind

    for spec in ep.graph_signature.input_specs:
        name = spec.arg.name
        fqn = spec.target
        if wrapped and isinstance(fqn, str) and fqn.startswith(_PREFIX):
            fqn = fqn[len(_PREFIX):]
        if spec.kind == InputKind.PARAMETER:
            kinds[name] = ("parameter", fqn)
        elif spec.kind == InputKind.BUFFER:
            kinds[name] = ("buffer", fqn)
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            kinds[name] = ("constant", ep.constants[spec.target])
        elif spec.kind == InputKind.USER_INPUT:
            kinds[name] = ("input", user)
            user += 1
        else:
            raise Unsupported(f"the exported graph has an input of kind {spec.kind.name}")
    from torch.export.graph_signature import OutputKind

    if any(s.kind != OutputKind.USER_OUTPUT for s in ep.graph_signature.output_specs):
        raise Unsupported("the exported graph mutates a buffer or input")
    return Traced(ep.graph, kinds, ep.call_spec.out_spec, seconds)


def traced(model: nn.Module, inputs: Any, output: Optional[Callable[[Any], Any]] = None) -> Traced:
    """The exported graph of ``model`` called on ``inputs`` (passed as :func:`~secorder.model_call.model_arguments` says).

    With a callable ``output`` (the ``output=`` of :func:`secorder.functional_loss`),
    the graph is that of ``output(model(...))``; it is cached per callable too.

    Cached per model (weakly) and per input structure, shapes, dtypes, devices,
    module set, training flags and tensor shapes (see the module docstring);
    raises :class:`~secorder.structured.errors.Unsupported` with the exporter's
    reason when the model cannot be exported (also cached), and when a new trace
    would be needed while ``torch.compile`` is tracing.

    Example:
        >>> net = torch.nn.Linear(2, 3)
        >>> traced(net, torch.ones(4, 2)) is traced(net, torch.zeros(4, 2)), cache_size(net)
        (True, 1)
        >>> _ = traced(net, torch.ones(5, 2)); cache_size(net)  # a new shape: a new trace
        2
    """
    args, kwargs = model_arguments(inputs)
    key = (_key(model, args, kwargs), None if output is None else id(output))
    if torch.compiler.is_compiling():  # Dynamo cannot enter a lock; it only reads the cache
        per_model = _CACHE.get(model)
        entry = None if per_model is None else per_model.get(key)
    else:
        with _LOCK:
            per_model = _CACHE.get(model)
            entry = None if per_model is None else per_model.get(key)
    # an output callable is keyed by id: the entry holds a weak reference proving it is the same object
    hit = entry[0] if entry is not None and (output is None or entry[1]() is output) else None
    if hit is not None:
        if isinstance(hit, Unsupported):
            raise Unsupported(str(hit))
        return hit
    if torch.compiler.is_compiling():
        raise Unsupported("the graph walker cannot export the model while torch.compile traces; "
                          "call the transform once outside torch.compile with these input shapes first")
    try:
        result: Any = _export(model, args, kwargs, output)
    except Unsupported as err:
        result = err
    try:
        ref = (lambda: None) if output is None else weakref.ref(output)
    except TypeError:  # not weakly referenceable: never reused from the cache
        ref = lambda: _NEVER  # noqa: E731
    with _LOCK:
        per_model = _CACHE.setdefault(model, {})
        if len(per_model) >= _MAX_PER_MODEL:
            per_model.pop(next(iter(per_model)))
        per_model[key] = (result, ref)
    if isinstance(result, Unsupported):
        raise Unsupported(str(result))
    return result


_NEVER = object()


def cache_size(model: nn.Module) -> int:
    """How many input structures of ``model`` are cached (traced or failed).

    Example:
        >>> cache_size(torch.nn.Linear(1, 1))
        0
    """
    with _LOCK:
        return len(_CACHE.get(model, {}))


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def where(node: torch.fx.Node) -> str:
    """Where in the model's source ``node`` comes from: the innermost module and the last source line.

    Read from the metadata export keeps (``nn_module_stack``, ``stack_trace``);
    empty when there is none.

    Example:
        >>> g = traced(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.ones(1, 2)).graph
        >>> where([n for n in g.nodes if n.op == "call_function"][0]).split(",")[0]
        " in module '0' (Linear)"
    """
    parts: List[str] = []
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path, cls = list(stack.values())[-1]
        cls_name = cls.rsplit(".", 1)[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        parts.append(f"in module {path or '<root>'!r} ({cls_name})")
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    if frames:
        file, line, func, code = frames[-1]
        parts.append(f"at {file.rsplit('/', 1)[-1]}:{line} ({code.strip()})")
    return (" " + ", ".join(parts)) if parts else ""


def flatten_inputs(inputs: Any) -> List[Any]:
    """The leaves of ``inputs`` in the order the exported graph's user inputs take them.

    Example:
        >>> flatten_inputs({"a": 1, "b": 2})
        [1, 2]
    """
    args, kwargs = model_arguments(inputs)
    return pytree.tree_flatten((args, kwargs))[0]


def output_values(t: Traced, flat: List[Any]) -> Any:
    """The model's return value rebuilt from the graph's flat outputs.

    Example:
        >>> t = traced(torch.nn.Linear(2, 1), torch.ones(1, 2))
        >>> output_values(t, [torch.zeros(1)])
        tensor([0.])
    """
    return pytree.tree_unflatten(list(flat), t.out_spec)

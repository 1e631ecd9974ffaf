"""One call's view of ``f``: what the operators differentiate, and how ``f`` is evaluated.

A transformed function ``so.trace(f)(*args, **kwargs)`` makes one :class:`Problem`
per call. It holds

* the differentiated leaves: ``args[argnums]`` flattened (:mod:`secorder.tree`),
* ``f`` as a function of them (``loss_of_leaves``), its auxiliary output with
  ``has_aux=True``, keyword arguments passed through to ``f`` as ``torch.func.grad``
  passes them,
* when ``f`` is a :class:`~secorder.modules.FunctionalLoss`, the split into model
  output and loss (``output_of_leaves``, ``loss_of_output``) that the GGN and the
  Fishers need.

Every evaluation of ``f`` (or of its model) goes through one place, which makes three
promises:

* **derivatives of every order**: operations whose higher-order rules PyTorch
  lacks or gets wrong (fused attention, the third derivative of layer norm, ...)
  run as composites with correct ones, in this thread only
  (:func:`secorder.composites.differentiable_ops`);
* **one draw of randomness per call**: the first evaluation runs on the global RNG
  as a plain call of ``f`` would (and advances it as such a call does) and records
  the random numbers it drew; every later evaluation of the same call (a chunk of
  probes, a leaf's block, the auxiliary output) gets those recorded numbers back
  (:class:`_RandomTape`), so a training-mode ``Dropout`` draws one mask per call
  whatever ``chunk_size`` is. No generator is rewound: other threads drawing from
  the global RNG meanwhile never see a draw repeated. (A model entirely in eval
  mode, on the CPU, is expected to draw nothing and skips the recording, which
  costs a Python call per operation; if it draws anyway, the later evaluations
  draw from a private generator started where the global RNG stood before the
  first one: :class:`_PrivateReplay`);
* **in-place updates of captured tensors are explained**: ``torch.func`` refuses a
  function that updates a tensor it did not receive (the running statistics of a
  training-mode ``BatchNorm`` inside a hand-written ``f``); the error then says to
  call ``model.eval()`` or to build ``f`` with :func:`secorder.functional_loss`
  (which uses the batch statistics and leaves the running ones alone).

Operators take a ``Problem``; they never import the transform layer.

Example:
    >>> import torch
    >>> p = Problem(lambda x, y: (x * y).sum() ** 2, 0, False, (torch.ones(2), torch.tensor([1., 2.])))
    >>> p.leaves, p.loss_of_leaves([torch.tensor([1., 1.])])
    ([tensor([1., 1.])], tensor(9.))
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from . import _checks, tree
from .composites import differentiable_ops
from .modules import FunctionalLoss

__all__ = ["Problem", "split_message"]

_MUTATION_HINT = (
    "f updates a tensor in place that the transform did not pass to it (for example the running statistics "
    "of a BatchNorm layer in training mode): call model.eval(), or build f with "
    "so.functional_loss(model, loss_fn), which uses the batch statistics without updating the running ones"
)


def _written(func: Any, args: tuple, kwargs: dict) -> List[Tensor]:
    """The tensors an operation writes into (``self`` of ``bernoulli_``, ``out=``), in schema order."""
    found = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            value = args[i] if i < len(args) else kwargs.get(a.name)
            if isinstance(value, Tensor):
                found.append(value)
    return found


class _RandomTape(TorchDispatchMode):
    """The random numbers of ``f``'s first evaluation, recorded, and replayed in every later one.

    Every ATen operation tagged ``nondeterministic_seeded`` (``bernoulli_``, ``rand``,
    ``native_dropout``, ``normal``, ...) is seen below autograd and ``torch.func``, on
    plain tensors. The first evaluation runs them as a plain call of ``f`` would (on
    the global RNG, or the generator ``f`` passes) and keeps a copy of what they
    produced; later evaluations of the same call get the ``k``-th recorded result for
    their ``k``-th random operation instead of drawing. No generator is read, set or
    rewound, so other threads' draws are untouched. An evaluation that asks for more
    random numbers than the first one drew, or for other shapes, draws them afresh.
    """

    def __init__(self) -> None:
        super().__init__()
        self.tape: List[Any] = []
        self.recording = True
        self.position = 0

    def replay(self) -> "_RandomTape":
        self.recording = False
        self.position = 0
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return func(*args, **kwargs)
        written = _written(func, args, kwargs) if func._schema.is_mutable else None
        key = (func, _signature((args, kwargs)))
        if not self.recording:
            kept = self.tape[self.position] if self.position < len(self.tape) else None
            if kept is None or kept[0] != key:
                return func(*args, **kwargs)  # not what the first evaluation drew: a fresh draw
            self.position += 1
            if written is None:
                return tree.tree_map(_clone, kept[1])
            for k, w in zip(kept[1], written):
                w.copy_(k)
            return written[0] if len(written) == 1 else tuple(written)
        out = func(*args, **kwargs)
        self.tape.append((key, [w.clone() for w in written] if written is not None else tree.tree_map(_clone, out)))
        return out


class _PrivateReplay(TorchDispatchMode):
    """Later evaluations of an ``f`` expected to draw nothing that drew anyway: its CPU draws from a private copy.

    For a model entirely in eval mode (on the CPU) the first evaluation runs without
    :class:`_RandomTape` (which costs a Python call per operation); the global RNG's
    state is read before it. If that state moved, the later evaluations run their
    random operations on a private generator started from the state read, so they
    draw what the first evaluation drew (unless another thread drew from the global
    RNG during it). The global RNG is only read.
    """

    def __init__(self, cpu_state: Tensor) -> None:
        super().__init__()
        self.cpu_state = cpu_state
        self.tape = [None]  # non-empty: there is something to replay
        self.generator: Optional[torch.Generator] = None

    def replay(self) -> "_PrivateReplay":
        self.generator = torch.Generator()
        self.generator.set_state(self.cpu_state)
        return self

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags and kwargs.get("generator") is None and all(
                t.device.type == "cpu" for t in tree.leaves((args, kwargs)) if isinstance(t, Tensor)):
            seeded = _with_generator(func)
            if seeded is not None:
                return seeded(*args, **{**kwargs, "generator": self.generator})
        return func(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def _with_generator(func: Any) -> Any:
    """``func`` itself if it takes a ``generator``, else its overload that also does (``rand`` -> ``rand.generator``)."""
    names = [a.name for a in func._schema.arguments]
    if "generator" in names:
        return func
    for overload in func.overloadpacket.overloads():
        candidate = getattr(func.overloadpacket, overload)
        others = [a.name for a in candidate._schema.arguments if a.name != "generator"]
        if others == names and len(others) < len(candidate._schema.arguments):
            return candidate
    return None


def _quiet(f: Any, values: Any) -> bool:
    """Whether ``f`` is expected to draw no random numbers: a model entirely in eval mode, on the CPU."""
    return (isinstance(f, FunctionalLoss) and isinstance(f.model, nn.Module)
            and not any(m.training for m in f.model.modules())
            and not any(isinstance(t, Tensor) and t.device.type != "cpu" for t in tree.leaves(values)))


def _clone(x: Any) -> Any:
    return x.clone() if isinstance(x, Tensor) else x


def _signature(x: Any) -> Any:
    """What a random operation's arguments look like: tensors by shape, dtype and device, the rest as they are."""
    if isinstance(x, Tensor):
        return ("tensor", tuple(x.shape), x.dtype, x.device)
    if isinstance(x, (list, tuple)):
        return tuple(_signature(v) for v in x)
    if isinstance(x, dict):
        return tuple((k, _signature(v)) for k, v in sorted(x.items()))
    return x if isinstance(x, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                               torch.memory_format)) else id(x)


def _is_mutation_error(err: RuntimeError) -> bool:
    text = str(err)
    return ("mutate a captured Tensor" in text) or ("vmap: inplace arithmetic" in text)


def split_message(curvature: str, f: Any, *, call: bool = False) -> str:
    """Why ``curvature`` cannot run on a hand-written ``f``, and how to build one that it can run on.

    Example:
        >>> split_message("fisher", lambda p: p)[:59]
        "curvature='fisher' needs the split of f into model and loss"
    """
    return (
        f"curvature={curvature!r} needs the split of f into model and loss: build f with "
        "so.functional_loss(model, loss_fn, output=None), where model is an nn.Module or a function "
        "model(params, inputs) -> outputs (output='logits' or a callable picks the output tensor from what the "
        "model returns, such as a Hugging Face ModelOutput)"
        + (", and call it as f(params, inputs, targets)" if call else "")
        + f"; got f of type {type(f).__name__}"
    )


class Problem:
    """One call's view of ``f`` (see the module docstring).

    Args:
        f: the user's function, returning a scalar (or ``(scalar, aux)``).
        argnums: which positional arguments are differentiated.
        has_aux: whether ``f`` returns ``(loss, aux)``.
        args: the call's positional arguments.
        kwargs: the call's keyword arguments, passed to ``f`` unchanged.
    """

    def __init__(
        self,
        f: Callable[..., Any],
        argnums: _checks.Argnums,
        has_aux: bool,
        args: tuple,
        kwargs: Optional[Dict[str, Any]] = None,
    ):
        self.f = f
        self.argnums = argnums
        self.has_aux = has_aux
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.resolved = _checks.normalize_argnums(argnums, len(self.args))
        self.primals = _checks.select(self.args, argnums, self.resolved)
        _checks.check_differentiable(self.primals, argnums)
        self.leaves, self.spec = tree.flatten(self.primals)
        self._tape: Optional[TorchDispatchMode] = None  # _RandomTape or _PrivateReplay, after the first evaluation

    # -- evaluating f ------------------------------------------------------------------

    def evaluate(self, thunk: Callable[[], Any]) -> Any:
        """Run ``thunk`` (which calls user code) with the call's one draw of randomness.

        Operations whose higher-order rules PyTorch lacks or gets wrong (fused
        attention, layer norm's third derivative, ...) run as differentiable
        composites in this thread meanwhile (:mod:`secorder.composites`).
        """
        try:
            if torch.compiler.is_compiling():
                return thunk()  # torch.compile: no RNG state to capture in a traced graph
            with differentiable_ops():
                if self._tape is None:
                    if _quiet(self.f, (self.args, self.kwargs)):  # no Python call per operation
                        before = torch.get_rng_state()
                        out = thunk()
                        moved = not torch.equal(before, torch.get_rng_state())
                        self._tape = _PrivateReplay(before) if moved else _RandomTape().replay()
                        return out
                    tape = _RandomTape()
                    with tape:
                        out = thunk()
                    self._tape = tape.replay()
                    return out
                if not self._tape.tape:  # f drew no random numbers: nothing to replay
                    return thunk()
                with self._tape.replay():
                    return thunk()
        except RuntimeError as err:
            if _is_mutation_error(err):
                raise RuntimeError(f"{_MUTATION_HINT} ({err})") from err
            raise

    def args_with(self, primals: Any) -> Tuple[Any, ...]:
        """The call's positional arguments with ``args[argnums]`` replaced by ``primals``."""
        return _checks.replace(self.args, self.argnums, self.resolved, primals)

    def call(self, primals: Any) -> Any:
        """``f`` at ``primals`` (the call's other arguments unchanged)."""
        return self.evaluate(lambda: self.f(*self.args_with(primals), **self.kwargs))

    def loss(self, primals: Any) -> Tensor:
        return _checks.check_scalar(self.call(primals), self.has_aux)

    def loss_and_aux(self, primals: Any) -> Tuple[Tensor, Any]:
        out = self.call(primals)
        return _checks.check_scalar(out, True), out[1]

    def loss_of_leaves(self, leaves: List[Tensor]) -> Tensor:
        return self.loss(tree.unflatten(self.spec, leaves))

    def aux(self) -> Any:
        """``f``'s auxiliary output at the primal point (one more evaluation of ``f``)."""
        return self.call(self.primals)[1]

    def result(self, value: Any) -> Any:
        """``value``, paired with the auxiliary output when ``has_aux=True``."""
        return (value, self.aux()) if self.has_aux else value

    # -- the model/loss split ----------------------------------------------------------

    def require_split(self, curvature: str) -> None:
        """Raise unless ``f`` splits into model output and loss for ``curvature``.

        Example:
            >>> import torch
            >>> Problem(lambda x: x.sum(), 0, False, (torch.ones(1),)).require_split("ggn")
            Traceback (most recent call last):
            ...
            TypeError: curvature='ggn' needs the split of f into model and loss: build f with so.functional_loss(model, loss_fn, output=None), where model is an nn.Module or a function model(params, inputs) -> outputs (output='logits' or a callable picks the output tensor from what the model returns, such as a Hugging Face ModelOutput), and call it as f(params, inputs, targets); got f of type function
        """
        if not isinstance(self.f, FunctionalLoss):
            raise TypeError(split_message(curvature, self.f, call=True))
        if not 3 <= len(self.args) + len(self.kwargs) <= 4 or len(self.args) < 3:
            raise TypeError(
                f"curvature={curvature!r}: f takes (params, inputs, targets[, buffers]), "
                f"got {len(self.args)} positional argument(s)"
            )
        bad = [i for i in self.resolved if i >= 2]
        if bad:
            raise ValueError(
                f"curvature={curvature!r} with argnums={self.argnums!r}: the targets and buffers "
                "(arguments 2 and 3) enter the loss directly; differentiate params (0) and/or inputs (1)"
            )

    @property
    def targets(self) -> Any:
        return self.args[2]

    @property
    def loss_fn(self) -> Callable[..., Any]:
        return self.f.loss_fn

    def _buffers(self, args: Tuple[Any, ...]) -> Any:
        return args[3] if len(args) > 3 else self.kwargs.get("buffers")

    def output_of_leaves(self, leaves: List[Tensor]) -> Tensor:
        """The model output with the differentiated arguments set to ``leaves``."""
        args = self.args_with(tree.unflatten(self.spec, leaves))
        return self.evaluate(lambda: self.f.output(args[0], args[1], self._buffers(args)))

    def loss_of_output(self, out: Tensor) -> Tensor:
        """The loss of a model output ``out`` against the call's targets (a scalar)."""
        value = self.evaluate(lambda: self.f.loss_fn(out, self.targets))
        return _checks.check_scalar(value, self.has_aux)

"""The forward-Laplacian carrier: a tensor that holds (value, Jacobian, Laplacian).

A :class:`JetTensor` stands in for a tensor inside the user's function. It carries
a :class:`Jet`: the value ``v``, the derivatives ``J`` of ``v`` along the ``k``
seed directions of the input (shape ``(k, *v.shape)``, directions first) and the
partial Laplacian ``L`` (shape ``v.shape``: the sum over the seed directions of
the second derivatives of ``v``). Every torch operation on a ``JetTensor`` is
intercepted with ``__torch_function__`` and handed to the propagation rule
registered for it (:mod:`secorder.forward_laplacian.registry`), which computes the new
triple with ordinary tensor operations. Interception happens above PyTorch's
dispatcher, so ``torch.func.vmap``, ``torch.func.grad`` and autograd see (and
transform) the rules' arithmetic like any other code.

Nothing may reach the dispatcher with a ``JetTensor`` inside (it has no storage):
an operation that escapes interception (``torch.func`` transforms inside ``f``,
in-place writes into a constant, ...) ends in ``__torch_dispatch__``, which
raises :class:`UncoveredOperation` like an operation without a rule. Either way
the pass that owns the tensor is marked, so that the caller falls back to the
exact path even when ``f`` swallows the exception.

Nested forward passes (a Laplacian of a function that computes a Laplacian) are
told apart by their depth, as functorch tells its levels apart: an operation is
interpreted for the deepest pass among its arguments, and jets of outer passes
are constants to it (their own operations then re-enter the interpreter).

Example:
    >>> import torch
    >>> trace = ForwardPass()
    >>> x = JetTensor(Jet(torch.tensor([1., 2.]), torch.eye(2), torch.zeros(2), trace))
    >>> y = (x * x).sum()          # ||x||^2: gradient 2x, Laplacian 2 * 2
    >>> y.jet.value, y.jet.jac, y.jet.lap
    (tensor(5.), tensor([2., 4.]), tensor(4.))
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor
from torch._C import _functorch

from .registry import lookup, op_name

__all__ = ["Jet", "JetTensor", "ForwardPass", "UncoveredOperation", "interpret", "make_jet", "lazy",
           "map_args", "arg_leaves", "stored_numel"]


class UncoveredOperation(NotImplementedError):
    """An operation on a traced tensor that the forward Laplacian has no rule for.

    ``op`` names the operation (for example ``'torch.Tensor.prod'``).
    """

    def __init__(self, op: str, detail: str = ""):
        self.op = op
        super().__init__(f"the forward Laplacian does not cover {op}{': ' + detail if detail else ''}")


class ForwardPass:
    """One forward-Laplacian evaluation of ``f``: its depth among nested passes, and
    the first operation it could not interpret (``None`` while all went well)."""

    _local = threading.local()

    def __init__(self) -> None:
        self.depth = getattr(ForwardPass._local, "depth", 0) + 1
        self.uncovered: Optional[UncoveredOperation] = None
        self.widest = 0  # bytes stored per direction by the largest traced value (a Jacobian's size hint)

    def note(self, value: Tensor) -> None:
        """Record the storage of a traced value: its Jacobian stores about that much per direction."""
        size = stored_numel(value) * value.element_size()
        if size > self.widest:
            self.widest = size

    def __enter__(self) -> "ForwardPass":
        ForwardPass._local.depth = self.depth
        return self

    def __exit__(self, *exc: Any) -> None:
        ForwardPass._local.depth = self.depth - 1

    def fail(self, err: UncoveredOperation) -> UncoveredOperation:
        if self.uncovered is None:
            self.uncovered = err
        return err


class Jet:
    """What the rules see of a traced tensor: value, Jacobian (directions first),
    Laplacian, and the forward pass that owns it.

    The Jacobian may be given as a zero-argument function (see :func:`lazy`):
    it is computed when a rule first reads ``jac``, and never if none does --
    the Jacobian of ``f``'s output, and of every operation that only leads to
    it through linear maps, is not needed for the Laplacian.
    """

    __slots__ = ("value", "lap", "trace", "_jac")

    def __init__(self, value: Tensor, jac: Any, lap: Tensor, trace: "ForwardPass"):
        self.value, self.lap, self.trace, self._jac = value, lap, trace, jac

    @property
    def jac(self) -> Tensor:
        if callable(self._jac):
            self._jac = _broadcast_jac(self._jac(), self.value)
        return self._jac


def _broadcast_jac(jac: Tensor, value: Tensor) -> Tensor:
    shape = value.shape
    if jac.shape[1:] != shape:
        jac = jac.reshape(jac.shape[:1] + (1,) * (len(shape) - jac.dim() + 1) + jac.shape[1:])
        jac = jac.expand(jac.shape[:1] + shape)
    if jac.dtype != value.dtype:
        jac = jac.to(value.dtype)
    return jac


def make_jet(value: Tensor, jac: Any, lap: Tensor, trace: "ForwardPass") -> Jet:
    """A :class:`Jet` whose Jacobian and Laplacian are broadcast (as views) to the value's shape.

    Rules may return derivatives that broadcast against the value (a constant
    added to a smaller traced tensor, say); the invariant ``jac.shape == (k,
    *value.shape)``, ``lap.shape == value.shape`` keeps later reductions exact.
    ``jac`` may be a function computing it (:func:`lazy`).
    """
    if not callable(jac):
        jac = _broadcast_jac(jac, value)
    if lap.shape != value.shape:
        lap = lap.expand(value.shape)
    if lap.dtype != value.dtype:
        lap = lap.to(value.dtype)
    return Jet(value, jac, lap, trace)


def lazy(compute: Callable[[], Tensor], *constants: Any) -> Callable[[], Tensor]:
    """``compute`` deferred until the Jacobian is read (see :class:`Jet`).

    ``constants`` are the user's tensors that ``compute`` reads besides jets
    (weights, coefficients): if ``f`` modifies one in place before the
    Jacobian is computed, the deferred result would not be the one ``f``'s
    value saw, so reading it raises :class:`UncoveredOperation` instead.
    """
    versions = []
    for c in constants:
        if isinstance(c, Tensor) and not isinstance(c, JetTensor):
            try:
                versions.append((c, c._version))
            except (RuntimeError, AttributeError):  # no version counter here (a functorch wrapper)
                return _Computed(compute())

    def run() -> Tensor:
        for c, version in versions:
            if c._version != version:
                raise UncoveredOperation("an in-place change", "a tensor used by f was modified after being used")
        return compute()

    return run


class _Computed:
    """An already computed Jacobian behind the deferred interface."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    def __call__(self) -> Tensor:
        return self.tensor


def stored_numel(t: Tensor) -> int:
    """Entries of ``t`` as stored: under ``vmap`` a tensor's shape is one batch element's."""
    try:
        while _functorch.is_functorch_wrapped_tensor(t):
            t = _functorch.get_unwrapped(t)
    except (AttributeError, RuntimeError):  # a performance hint only
        pass
    return t.numel()


def map_args(fn: Callable[[Any], Any], obj: Any) -> Any:
    """Apply ``fn`` to every leaf of a torch call's arguments or results.

    Tuples, lists (``torch.cat``'s tensors, ``torch.Size``, namedtuples and
    ``torch.return_types``) and dicts (keyword arguments) are walked; jets and
    tensors are leaves. Operation arguments are not user pytrees, so this small
    walker, not :mod:`secorder.tree`, handles them.
    """
    if isinstance(obj, (Jet, Tensor)):
        return fn(obj)
    if isinstance(obj, (list, tuple)):
        items = [map_args(fn, o) for o in obj]
        if type(obj) in (list, tuple):
            return type(obj)(items)
        if hasattr(obj, "_fields"):
            return type(obj)(*items)
        return type(obj)(items)
    if isinstance(obj, dict):
        return {k: map_args(fn, v) for k, v in obj.items()}
    return fn(obj)


def arg_leaves(obj: Any):
    """The leaves :func:`map_args` would visit, in order."""
    if isinstance(obj, (Jet, Tensor)):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from arg_leaves(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from arg_leaves(o)
    else:
        yield obj


class JetTensor(Tensor):
    """A tensor-shaped stand-in that carries a :class:`Jet` through ``f`` (see the module docstring)."""

    jet: Jet

    @staticmethod
    def __new__(cls, jet: Jet) -> "JetTensor":
        value = jet.value
        out = Tensor._make_wrapper_subclass(cls, value.shape, dtype=value.dtype, device=value.device)
        out.jet = jet
        if not isinstance(value, JetTensor):
            jet.trace.note(value)
        return out

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return interpret(func, args, kwargs or {})

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        err = UncoveredOperation(str(func), "it reached the dispatcher with a traced tensor (for example a "
                                 "torch.func transform or an in-place write inside f)")
        for leaf in arg_leaves((args, kwargs)):
            if isinstance(leaf, JetTensor):
                leaf.jet.trace.fail(err)
        raise err


def _deepest(args: tuple, kwargs: dict) -> Optional[ForwardPass]:
    top = None
    for leaf in arg_leaves((args, kwargs)):
        if isinstance(leaf, JetTensor):
            trace = leaf.jet.trace
            if top is None or trace.depth > top.depth:
                top = trace
    return top


def interpret(func: Callable, args: tuple, kwargs: Dict[str, Any]) -> Any:
    """Run ``func`` on arguments that contain ``JetTensor`` s through its registered rule."""
    trace = _deepest(args, kwargs)
    if trace is None:  # a JetTensor hidden where the walker does not look (a custom container)
        raise UncoveredOperation(op_name(func), "a traced tensor inside an unsupported container")
    rule = lookup(func)
    if rule is None:
        raise trace.fail(UncoveredOperation(op_name(func)))
    if kwargs.get("out") is not None:
        raise trace.fail(UncoveredOperation(op_name(func), "out= (writes into an existing tensor)"))
    if not torch.is_grad_enabled():
        # f runs with gradients on (forward_laplacian turns them on): this is torch.no_grad() inside f, or the
        # forward of a custom autograd.Function, whose backward is the user's definition of its derivative.
        # Either way PyTorch's autograd, not the forward pass, says what the derivatives are.
        raise trace.fail(UncoveredOperation(
            op_name(func), "it runs with gradients off (torch.no_grad() inside f, or the forward of a custom "
            "autograd.Function, whose backward defines its derivatives)"))

    def lower(leaf: Any) -> Any:
        return leaf.jet if isinstance(leaf, JetTensor) and leaf.jet.trace is trace else leaf

    try:
        out = rule(func, map_args(lower, args), map_args(lower, kwargs))
    except UncoveredOperation as err:
        raise trace.fail(err)
    except Exception as err:
        _primal_call(func, args, kwargs, trace)  # an invalid call: PyTorch's own error, as eager PyTorch raises it
        raise trace.fail(UncoveredOperation(op_name(func), f"its rule failed ({type(err).__name__}: {err})")) from err
    return map_args(lambda o: JetTensor(o) if isinstance(o, Jet) else o, out)


def _primal_call(func: Callable, args: tuple, kwargs: Dict[str, Any], trace: ForwardPass) -> Any:
    """``func`` on the values of ``trace``'s jets (raises what eager PyTorch raises for the call)."""
    def value(leaf: Any) -> Any:
        return leaf.jet.value if isinstance(leaf, JetTensor) and leaf.jet.trace is trace else leaf

    return func(*map_args(value, args), **map_args(value, kwargs))

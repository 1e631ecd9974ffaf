"""The rule of one ATen operation, and the registry ``OP_RULES`` ``{"aten.<op>.<overload>": rule}``.

A graph node is *live* when it depends on a differentiated parameter; every
other node is a constant, evaluated as it is. A live node's rule is asked, once
per plan, to :meth:`OpRule.bind` the node (check its arguments' shapes and
options, raise :class:`~secorder.structured.errors.Unsupported` with a reason
otherwise), which gives a :class:`Bound` rule. In the sweep:

1. ``out, state = bound.forward(values)``: ``values`` are the node's arguments
   with every node replaced by its value;
2. ``bound.jacobians(state)``: one :class:`~secorder.structured.jacobians.Jacobian`
   per live argument slot (the output's per-sample Jacobian with respect to it);
3. ``bound.residual(state, g)`` (exact Hessian, ops nonlinear in one live
   input): ``sum_i g_i d^2 z_i / dx^2`` as a curvature term at that input;
4. ``bound.parameter_diagonal(state, curv, wanted)`` / ``parameter_trace``:
   the diagonal of the parameters in the op's parameter slots.

Two kinds of rules cover the built-in operations, and show how to add one:

* :class:`ModuleOp`: the op is what a module computes (``aten.linear`` is
  ``nn.Linear``, ``aten.conv2d`` is ``nn.Conv2d``, ``aten.relu`` is
  ``nn.ReLU``...). The rule builds a stand-in module on the ``meta`` device (no
  memory) from the op's arguments and runs the module rule registered for its
  type (:func:`secorder.structured.rule_for`): the Jacobian, residual and
  parameter math of each layer lives in one place, the module rule.
* :class:`LinearOp`: an op linear in each live argument with no parameters
  (shape operations, ``add``, ``cat``, ``mean``...): its Jacobians are the op's
  own ``vjp`` mapped over the columns, or a cheaper structured Jacobian where the
  rule gives one; ``batch`` checks that the op keeps the samples apart
  (dimension 0 untouched).

Registering a rule for an op is one entry: ``OP_RULES.register("aten.foo.default",
LinearOp(...))``; ``tests/test_structured_graph_ops.py`` then needs a setting for
it (a test fails for a registered op without one).

Example:
    >>> import secorder.structured.graph  # registers the built-in rules
    >>> type(OP_RULES.get("aten.linear.default")).__name__, type(OP_RULES.get("aten.add.Tensor")).__name__
    ('ModuleOp', 'LinearOp')
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.func import vjp

from ...registry import Registry
from ..curvature import Curvature, Term
from ..errors import Unsupported
from ..jacobians import Columns, Jacobian
from ..registry import rule_for

__all__ = ["OP_RULES", "OpRule", "Bound", "ModuleOp", "LinearOp", "Slot", "Meta"]

#: ``{"aten.<op>.<overload>": OpRule}``: the graph walker's rules, one entry per ATen operation.
OP_RULES: Registry = Registry("graph op rule")

#: An argument slot: ``(position,)`` for ``args[position]``, ``(position, i)`` for ``args[position][i]``.
Slot = Tuple[int, ...]


@dataclass
class Meta:
    """What a rule may read of a node when it binds it: the arguments' example values and the batch size.

    ``args`` holds the node's arguments with every tensor node replaced by its
    example value (a fake tensor with the traced shape and dtype), ``live`` the
    slots holding values that depend on a differentiated parameter, ``params``
    the slots holding parameters or buffers (by qualified name), ``out`` the
    example output and ``N`` the batch size (dimension 0 of every live value).
    ``folded`` maps the live slots whose value has the batch folded into its
    first dimension (``[N * r, ...]``, a view such as GPT-2's ``x.view(-1, d)``) to
    the value's shape with the batch first (the curvature there is kept in that
    shape); ``call`` is the function evaluated (the ATen op, or a function of it
    such as one output of ``split``).
    """

    target: str
    args: tuple
    kwargs: Dict[str, Any]
    live: Tuple[Slot, ...]
    params: Dict[Slot, str]
    out: Any
    N: int
    folded: Dict[Slot, Tuple[int, ...]] = field(default_factory=dict)
    call: Optional[Callable[..., Any]] = None


def slot_value(args: Sequence[Any], slot: Slot) -> Any:
    v = args[slot[0]]
    return v if len(slot) == 1 else v[slot[1]]


class Bound:
    """One node's rule, checked against the node (see the module docstring)."""

    has_residual: bool = False
    parameter_slots: Dict[Slot, str] = {}

    def forward(self, args: tuple, kwargs: Dict[str, Any]) -> Tuple[Tensor, Any]:
        raise NotImplementedError

    def jacobians(self, state: Any) -> Dict[Slot, Jacobian]:
        raise NotImplementedError

    def residual(self, state: Any, grad_out: Tensor) -> Optional[Term]:
        return None

    def parameter_diagonal(self, state: Any, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        return {}

    def parameter_trace(self, state: Any, curv: Curvature, wanted: FrozenSet[str]) -> Tensor:
        parts = [d.sum() for d in self.parameter_diagonal(state, curv, wanted).values()]
        out = parts[0]
        for p in parts[1:]:
            out = out + p
        return out


class OpRule:
    """How the graph walker differentiates one ATen operation: :meth:`bind` a node to a :class:`Bound`."""

    #: one line for the docs' table of covered operations
    doc: str = ""

    def parameter_positions(self) -> FrozenSet[int]:
        """The argument positions that hold the op's own tensors (weights), not activations."""
        return frozenset()

    def bind(self, meta: Meta) -> Bound:
        raise NotImplementedError


# -- module-backed operations ------------------------------------------------------------------


@dataclass
class ModuleOp(OpRule):
    """An op computed as a module computes it: a stand-in module on ``meta`` and the module rule of its type.

    Args:
        build: ``build(meta) -> nn.Module``, the stand-in (on ``device="meta"``);
            raise :class:`Unsupported` for options it does not take.
        tensors: ``{argument position: the module's tensor name}`` (``weight``,
            ``bias``, ``running_mean``...): those arguments go to the module rule as
            its tensors; they may not be live activations.
        output: for an op returning a tuple, the position of its main output
            (the others may not be used by live nodes).
        doc: the docs' one-line description.
    """

    build: Callable[[Meta], nn.Module]
    tensors: Dict[int, str] = field(default_factory=dict)
    output: Optional[int] = None
    doc: str = ""
    input: int = 0

    def parameter_positions(self) -> FrozenSet[int]:
        return frozenset(self.tensors)

    def bind(self, meta: Meta) -> Bound:
        for slot in meta.live:
            if slot != (self.input,):
                raise Unsupported(f"its argument {slot[0]} depends on the parameters (only the input, "
                                  f"argument {self.input}, may: the others are the module's tensors)")
        with torch._C._DisableFuncTorch():  # the stand-in's own initialisation: no vmap/grad levels
            module = self.build(meta)
        cls = rule_for(type(module))
        if cls is None:
            raise Unsupported(f"has no module rule for its stand-in {type(module).__name__}")
        return _BoundModule(cls(module), self, meta)


@dataclass
class _ModuleState:
    inner: Any  # the module rule's state
    x: Tensor
    tensors: Dict[str, Tensor]


class _BoundModule(Bound):
    def __init__(self, rule: Any, op: ModuleOp, meta: Meta):
        self.rule, self.op = rule, op
        self.has_residual = bool(getattr(rule, "has_residual", False))
        self.parameter_slots = {s: q for s, q in meta.params.items() if s[0] in op.tensors
                                and op.tensors[s[0]] in rule.parameters}
        self.live = (op.input,) in meta.live

    def forward(self, args: tuple, kwargs: Dict[str, Any]) -> Tuple[Tensor, Any]:
        tensors = {name: args[pos] for pos, name in self.op.tensors.items()
                   if pos < len(args) and isinstance(args[pos], Tensor)}
        x = args[self.op.input]
        z, state = self.rule.forward(x, tensors)
        return z, _ModuleState(state, x, tensors)

    def jacobians(self, state: Any) -> Dict[Slot, Jacobian]:
        return {(self.op.input,): self.rule.jacobian(state.inner)} if self.live else {}

    def residual(self, state: Any, grad_out: Tensor) -> Optional[Term]:
        return self.rule.residual(state.inner, grad_out)

    def parameter_pullbacks(self, state: Any, wanted: FrozenSet[str]) -> Dict[str, Callable[[Tensor], Any]]:
        """``{qualified name: the whole-batch vjp of the output with respect to that parameter}``."""
        out = {}
        for s, q in self.parameter_slots.items():
            if q not in wanted:
                continue
            local = self.op.tensors[s[0]]

            def fn(theta: Tensor, local: str = local) -> Tensor:
                return self.rule.forward(state.x, {**state.tensors, local: theta})[0]

            out[q] = vjp(fn, state.tensors[local])[1]
        return out

    def _local(self, wanted: FrozenSet[str]) -> Tuple[FrozenSet[str], Dict[str, str]]:
        names = {self.op.tensors[s[0]]: q for s, q in self.parameter_slots.items() if q in wanted}
        return frozenset(names), names

    def parameter_diagonal(self, state: Any, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        local, names = self._local(wanted)
        if not local:
            return {}
        return {names[k]: v for k, v in self.rule.parameter_diagonal(state.inner, curv, local).items()}

    def parameter_trace(self, state: Any, curv: Curvature, wanted: FrozenSet[str]) -> Tensor:
        local, _ = self._local(wanted)
        return self.rule.parameter_trace(state.inner, curv, local)


# -- parameter-free linear operations ----------------------------------------------------------


@dataclass
class LinearOp(OpRule):
    """An op without parameters whose Jacobians are its ``vjp`` (reshapes, sums, ``cat``, attention...).

    Args:
        batch: ``batch(meta) -> None`` or the reason the op mixes samples (reads
            or moves dimension 0 of a live value); the op must act on each sample
            alone for the curvature to stay per sample.
        jacobian: optional ``jacobian(meta, slot, values) -> Jacobian`` cheaper
            than the op's ``vjp`` (a reshape, an identity); ``None`` to use the vjp.
        bilinear: the op is linear in each live argument separately but not
            jointly (``mul`` of two live values): when two live arguments share
            parameters, the exact Hessian needs the cross term between them:
            ``bilinear`` is then ``cross(args, g) -> {slot: Term}`` giving it as
            columns split over the arguments (one set of columns, see
            :func:`product_cross_term`), or ``True`` when there is no such rule
            (the exact Hessian declines).
        doc: the docs' one-line description.
        broadcasts: an elementwise op (or ``expand``): a value shared by all
            samples (a parameter such as a position embedding, of leading size 1)
            may be broadcast into the batch by it.
        nonlinear: the op is not linear in its live arguments (attention,
            softmax): the GGN and the Fishers run, the exact Hessian declines (no
            residual rule).
        folds: ``folds(meta)``: the output's shape with the batch first when the
            op folds the batch into its first dimension (a view ``[N, T, d] ->
            [N T, d]``), else ``None``.
    """

    batch: Callable[[Meta], Optional[str]]
    jacobian: Optional[Callable[[Meta, Slot, tuple], Optional[Jacobian]]] = None
    bilinear: Any = False
    doc: str = ""
    broadcasts: bool = False
    nonlinear: bool = False
    folds: Optional[Callable[[Meta], Optional[Tuple[int, ...]]]] = None

    def bind(self, meta: Meta) -> Bound:
        reason = self.batch(meta)
        if reason:
            raise Unsupported(reason)
        return _BoundLinear(self, meta)


def _replace(args: tuple, slots: Sequence[Slot], values: Sequence[Any]) -> tuple:
    out = [list(a) if isinstance(a, (list, tuple)) else a for a in args]
    for s, v in zip(slots, values):
        if len(s) == 1:
            out[s[0]] = v
        else:
            out[s[0]][s[1]] = v
    return tuple(out)


@dataclass
class _LinearState:
    pullback: Callable[..., Any]
    args: tuple


class _BoundLinear(Bound):
    def __init__(self, op: LinearOp, meta: Meta):
        self.op, self.meta = op, meta
        self.target = meta.call if meta.call is not None else _op_of(meta.target)
        self.live = meta.live
        self.out_unfolded = op.folds(meta) if op.folds is not None else None
        self.bilinear_live = bool(op.bilinear) and len(meta.live) > 1
        self.cross_rule = op.bilinear if callable(op.bilinear) else None
        self.cross = False  # set by the plan when the live arguments share parameters (exact Hessian)

    @property
    def has_residual(self) -> bool:  # type: ignore[override]
        return self.cross

    def joint_residual(self, state: "_LinearState", grad_out: Tensor) -> Dict[Slot, Term]:
        """The exact Hessian's cross term between the live arguments, as columns split over them."""
        return self.cross_rule(self.live, state.args, grad_out)

    def forward(self, args: tuple, kwargs: Dict[str, Any]) -> Tuple[Tensor, Any]:
        live = self.live
        fn = lambda *xs: self.target(*_replace(args, live, xs), **kwargs)  # noqa: E731
        out, pullback = vjp(fn, *[slot_value(args, s) for s in live])
        return out, _LinearState(pullback, args)

    def jacobians(self, state: _LinearState) -> Dict[Slot, Jacobian]:
        out = {}
        for i, s in enumerate(self.live):
            jac = self.op.jacobian(self.meta, s, state.args) if self.op.jacobian is not None else None
            out[s] = jac if jac is not None else Columns.from_vjp(_nth(state.pullback, i))
        return out


def _nth(pullback: Callable[..., Any], i: int) -> Callable[[Tensor], Tuple[Tensor]]:
    return lambda b: (pullback(b)[i],)


def _op_of(name: str) -> Callable[..., Any]:
    """``"aten.add.Tensor"`` to ``torch.ops.aten.add.Tensor``."""
    ns, op, overload = name.split(".")
    return getattr(getattr(getattr(torch.ops, ns), op), overload)


# -- elementwise functions of one live argument ---------------------------------------------------


@dataclass
class ElementwiseOp(OpRule):
    """``z = phi(x)`` entry by entry (``exp``, ``rsqrt``, ``pow`` by a number...), any other argument constant.

    The Jacobian is ``diag(phi'(x))`` and the exact Hessian's residual
    ``diag(g * phi''(x))``, both by forward-mode derivatives of the op itself
    along the all-ones direction (exact for an elementwise function), so one
    entry needs no formulas. Ops with a closed form in a module rule (``relu``,
    ``tanh``, ``gelu``...) are :class:`ModuleOp` entries instead.
    """

    doc: str = ""

    def bind(self, meta: Meta) -> Bound:
        if meta.live != ((0,),):
            raise Unsupported("is elementwise in its first argument only; another argument depends on the parameters")
        x = meta.args[0]
        if not isinstance(meta.out, Tensor) or tuple(meta.out.shape) != tuple(x.shape):
            raise Unsupported(f"maps shape {tuple(x.shape)} to {tuple(getattr(meta.out, 'shape', ()))}")
        if not x.shape or x.shape[0] != meta.N:
            raise Unsupported(f"on a value of shape {tuple(x.shape)} without the batch first")
        return _BoundElementwise(_op_of(meta.target))


@dataclass
class _ElementwiseState:
    x: Tensor
    d1: Tensor
    rest: tuple
    kwargs: Dict[str, Any]


class _BoundElementwise(Bound):
    has_residual = True

    def __init__(self, target: Callable[..., Any]):
        self.target = target

    def _phi(self, rest: tuple, kwargs: Dict[str, Any]) -> Callable[[Tensor], Tensor]:
        return lambda t: self.target(t, *rest, **kwargs)

    def forward(self, args: tuple, kwargs: Dict[str, Any]) -> Tuple[Tensor, Any]:
        x, rest = args[0], tuple(args[1:])
        z, d1 = torch.func.jvp(self._phi(rest, kwargs), (x,), (torch.ones_like(x),))
        return z, _ElementwiseState(x, d1, rest, kwargs)

    def jacobians(self, state: Any) -> Dict[Slot, Jacobian]:
        from ..jacobians import Elementwise

        return {(0,): Elementwise(state.d1, tuple(state.x.shape))}

    def residual(self, state: Any, grad_out: Tensor) -> Optional[Term]:
        from ..curvature import Diagonal

        phi, ones = self._phi(state.rest, state.kwargs), torch.ones_like(state.x)
        d2 = torch.func.jvp(lambda t: torch.func.jvp(phi, (t,), (ones,))[1], (state.x,), (ones,))[1]
        return Diagonal(grad_out * d2)


def product_cross_term(live: Sequence[Slot], args: tuple, g: Tensor) -> Dict[Slot, Term]:
    """The cross term of ``z = a * b`` (broadcast, both depending on the parameters) in the exact Hessian.

    ``sum_i g_i d^2 z_i / (da db)`` couples entry ``alpha(i)`` of ``a`` with entry
    ``beta(i)`` of ``b`` (the entries broadcast to output ``i``). With
    ``u_i = e_alpha(i) + e_beta(i)`` and ``v_i = e_alpha(i) - e_beta(i)`` over the pair
    ``(a, b)``, the symmetric matrix is ``sum_i (g_i / 2)(u_i u_i^T - v_i v_i^T)``:
    ``2 F`` signed columns per sample (``F`` output entries), which the sweep pulls
    back along both arguments and adds where they meet.

    Example:
        >>> import torch
        >>> a, b, g = torch.ones(1, 2), torch.ones(1, 2), torch.tensor([[3., 5.]])
        >>> t = product_cross_term([(0,), (1,)], (a, b), g)
        >>> B = torch.cat([t[(0,)].B, t[(1,)].B], -1)[:, 0]  # the columns over (a, b)
        >>> ((B * t[(0,)].w[:, :1]).T @ B)[:2, 2:]  # the block d2 / (da db)
        tensor([[3., 0.],
                [0., 5.]])
    """
    from ..curvature import Factor

    (sa, sb) = live
    N, out = g.shape[0], tuple(g.shape[1:])
    F = math.prod(out)
    E = torch.eye(F, dtype=g.dtype, device=g.device).reshape((F, 1) + out).expand((F, N) + out)

    def to(shape: Tuple[int, ...]) -> Tensor:
        dims = tuple(2 + j for j in range(len(out)) if shape[1 + j] == 1 and out[j] != 1)
        return E.sum(dims, keepdim=True) if dims else E

    Ea, Eb = to(tuple(slot_value(args, sa).shape)), to(tuple(slot_value(args, sb).shape))
    w = g.reshape(N, F).transpose(0, 1) / 2
    W = torch.cat([w, -w])
    return {sa: Factor(torch.cat([Ea, Ea]), W), sb: Factor(torch.cat([Eb, -Eb]), W)}

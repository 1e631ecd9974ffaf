"""The graph walker's sweep: forward through the traced nodes, then the curvature pulled back node by node.

The module walker (:mod:`secorder.structured.backprop`) pulls one curvature
back through a chain of modules. On a graph a value can be used several times
(every skip connection), so the curvature at a value is the sum, over its
uses, of what each use pulls back, *including the cross terms* between uses.
The sweep keeps every curvature term under the identity of the place it was
created (a term of the loss, or the residual of one node) and adds, at a value
used several times, the pull-backs of the same term column by column
(:func:`~secorder.structured.columns.add_columns`): with ``H = sum_k w_k b_k b_k^T``
the curvature at ``x`` is ``sum_k w_k (sum_u J_u^T b_k)(sum_u J_u^T b_k)^T``,
cross terms included. A term is turned into explicit columns
(:func:`~secorder.structured.columns.column_form`) where it is sent into more
than one argument of a node, so that the copies that meet again share their
columns; along a chain it keeps its cheap kind (diagonal, shared rows, gathered
columns). This generalises :class:`~secorder.structured.rules.residual.ResidualRule`
(one fan-out, one join) to any graph.

A node is *live* when it depends on a differentiated parameter; only live
nodes get rules, everything else (the data, masks, position ids) is evaluated
as a constant. The backward pass stops at values no differentiated parameter
feeds. The loss gradient is pulled back with the curvature for the exact
Hessian's residual terms.

Everything is a pure tensor computation (the graph's constants are evaluated by
their ATen ops), so the sweep runs under ``torch.func`` transforms; under
``torch.compile`` it runs once a graph is cached for the input shapes.
"""

from __future__ import annotations

import math
import operator
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.utils._pytree as pytree
from torch import Tensor, fx

from ..columns import add_columns, column_form
from ..curvature import Curvature, Factor, Term
from ..errors import Unsupported
from ..losses import LossSpec, output_curvature, sampled_curvature
from . import op_rules as _builtin  # noqa: F401 (registers the built-in op rules)
from .batchwise import Batchwise, add_batchwise, batch_parameter_diagonal
from .ops import OP_RULES, Bound, Meta, ModuleOp, Slot, _replace, slot_value
from .trace import Traced, flatten_inputs, where

__all__ = ["GraphPlan", "plan", "run", "FACTOR_CHUNK_ENTRIES"]

FACTOR_CHUNK_ENTRIES = 2 ** 24


@dataclass
class GraphPlan:
    """The live nodes of a traced graph for a set of differentiated parameters, with their bound rules.

    A live value is *batched* (dimension 0 is the batch, samples independent) or
    *shared* by all samples (a parameter used as a value, a position embedding
    of leading size 1: its rules run with a batch of one). A shared value enters
    the batch through a *broadcast* argument of an elementwise op; the curvature
    pulled back there is summed over the samples (:func:`to_shared`).
    """

    traced: Traced
    order: List[fx.Node]  # every call_function node, in graph order
    live: Set[fx.Node]
    rules: Dict[fx.Node, Bound]
    slots: Dict[fx.Node, List[Tuple[Slot, fx.Node]]]  # live activation slots: (slot, the node there)
    alias: Dict[fx.Node, fx.Node]  # getitem of a live multi-output op's main output: its op node
    output: fx.Node
    N: int
    broadcast: Dict[fx.Node, Dict[Slot, Tuple[Tuple[int, ...], Tuple[int, ...]]]]  # slot: (aligned shape, out)
    values: Dict[fx.Node, str]  # wanted parameters used as values: their diagonal is read at the placeholder
    batch_of: Dict[fx.Node, int]  # live node: N (batched) or 1 (shared)
    unfolded: Dict[fx.Node, Tuple[int, ...]]  # live nodes holding a folded batch: their shape with the batch first
    synthetic: Dict[fx.Node, Tuple[fx.Node, tuple, Dict[str, Any]]]  # an output of split: (input, args, kwargs)
    aliases: Dict[str, str]  # another name of a tensor held twice (tied weights): the name params uses
    program: Optional["Program"] = None  # the same, as the sweep runs it


class _Ref:
    """A reference to the value of step ``i`` inside an argument template."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i


@dataclass
class _Step:
    """One node of the graph as the sweep runs it: plain Python and integers, no ``torch.fx`` objects.

    (Dynamo does not trace ``torch.fx`` graphs; the sweep over steps it does.)
    """

    i: int
    name: str
    kind: str  # "placeholder", "const", "live", "alias", "split_item"
    target: Any = None
    args: Any = None
    kwargs: Any = None
    rule: Optional[Bound] = None
    source: Any = None  # placeholder: (kind, what); alias: the step index; split_item: (x index, rest, kwargs)
    slots: List[Tuple[Slot, int]] = field(default_factory=list)
    broadcast: Dict[Slot, Tuple[Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)
    batch: Optional[int] = None  # the leading size the output must have (None: folded, unchecked)
    where: str = ""


@dataclass
class Program:
    """The plan as a list of steps (see :class:`_Step`), the output's index and the parameters used as values."""

    steps: List[_Step]
    output: int
    values: List[Tuple[int, str, Tuple[int, ...]]]
    widest: int  # the widest per-sample size of a live value other than the output (factor chunk bound)


def _template(args: Any, index: Dict[fx.Node, int]) -> Any:
    return fx.node.map_arg(args, lambda a: _Ref(index[a]))


def _fill_template(t: Any, vals: List[Any]) -> Any:
    if isinstance(t, _Ref):
        return vals[t.i]
    if isinstance(t, tuple):
        return tuple(_fill_template(a, vals) for a in t)
    if isinstance(t, list):
        return [_fill_template(a, vals) for a in t]
    if isinstance(t, dict):
        return {k: _fill_template(v, vals) for k, v in t.items()}
    return t


def _program(traced: Traced, order: List[fx.Node], live: Set[fx.Node], rules: Dict[fx.Node, Bound],
             slots: Dict[fx.Node, List[Tuple[Slot, fx.Node]]], alias: Dict[fx.Node, fx.Node], output: fx.Node,
             broadcast: Dict[fx.Node, Any], values: Dict[fx.Node, str], batch_of: Dict[fx.Node, int],
             unfolded: Dict[fx.Node, Any], synthetic: Dict[fx.Node, Any], aliases: Dict[str, str]) -> Program:
    index: Dict[fx.Node, int] = {}
    steps: List[_Step] = []
    for n in traced.graph.nodes:
        if n.op == "placeholder":
            kind, what = traced.placeholders[n.name]
            if kind in ("parameter", "buffer"):
                what = aliases.get(what, what)
            index[n] = len(steps)
            steps.append(_Step(len(steps), n.name, "placeholder", source=(kind, what)))
    for n in order:
        i = len(steps)
        index[n] = i
        if n in alias:
            steps.append(_Step(i, n.name, "alias", source=index[alias[n]]))
        elif n in synthetic:
            x, rest, kw = synthetic[n]
            steps.append(_Step(i, n.name, "split_item", rule=rules[n], source=(index[x], tuple(rest), dict(kw)),
                               slots=[(s, index[a]) for s, a in slots[n]], batch=batch_of[n], where=where(n)))
        elif n in live:
            steps.append(_Step(i, n.name, "live", n.target, _template(n.args, index), _template(n.kwargs, index),
                               rules[n], slots=[(s, index[a]) for s, a in slots[n]],
                               broadcast=dict(broadcast.get(n, {})),
                               batch=None if n in unfolded else batch_of[n], where=f"{n.target}{where(n)}"))
        else:
            steps.append(_Step(i, n.name, "const", n.target, _template(n.args, index), _template(n.kwargs, index)))
    widths = [math.prod(_shape(n)[1:]) for n in order if n in rules and n is not output and _shape(n)]
    return Program(steps, index[output], [(index[a], q, _shape(a)) for a, q in values.items()],
                   max(widths, default=1))


def _slots(args: tuple) -> List[Tuple[Slot, Any]]:
    out = []
    for i, a in enumerate(args):
        if isinstance(a, (list, tuple)):
            out.extend(((i, j), b) for j, b in enumerate(a))
        else:
            out.append(((i,), a))
    return out


def _example(a: Any) -> Any:
    return a.meta.get("val") if isinstance(a, fx.Node) else a


_PLANS: "weakref.WeakKeyDictionary[Any, Dict[Any, GraphPlan]]" = weakref.WeakKeyDictionary()
_PLAN_LOCK = threading.Lock()


def plan(traced: Traced, wanted: Set[str], output_index: int, residuals: bool,
         aliases: Optional[Dict[str, str]] = None) -> GraphPlan:
    """Decide which nodes are live and bind their rules; :class:`Unsupported` names the op and source line.

    ``aliases`` maps the other names of a tensor the model holds under several
    names (tied weights) to the name ``params`` uses.

    Example:
        >>> from secorder.structured.graph.trace import traced
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU())
        >>> p = plan(traced(net, torch.ones(4, 2)), {"0.weight"}, 0, residuals=True)
        >>> [st.kind for st in p.program.steps], p.N
        (['placeholder', 'placeholder', 'placeholder', 'live', 'live'], 4)
    """
    from ..rules import attention as _attention

    aliases = dict(aliases or {})
    # the residual bound is read when the rules are bound: a changed bound binds them again
    bound_entries = _attention.MAX_RESIDUAL_ENTRIES if residuals else None
    key = (frozenset(wanted), output_index, residuals, frozenset(aliases.items()), bound_entries)
    if torch.compiler.is_compiling():  # Dynamo cannot enter a lock; it only reads the cache
        hit = _PLANS.get(traced.graph, {}).get(key)
    else:
        with _PLAN_LOCK:
            hit = _PLANS.get(traced.graph, {}).get(key)
    if hit is not None:
        return hit
    p = _plan(traced, wanted, output_index, residuals, aliases)
    with _PLAN_LOCK:
        _PLANS.setdefault(traced.graph, {})[key] = p
    return p


def _random(n: fx.Node) -> bool:
    """Whether ``n`` draws random numbers (attention is tagged so for its dropout, which is 0 here or declined)."""
    if torch.Tag.nondeterministic_seeded not in getattr(n.target, "tags", ()):
        return False
    if n.target is torch.ops.aten.scaled_dot_product_attention.default:
        p = n.kwargs.get("dropout_p", n.args[4] if len(n.args) > 4 else 0.0)
        return bool(p)
    return True


#: Ops returning several outputs of one input: each output (a getitem node) gets the op's rule on its own.
_SPLITS = (torch.ops.aten.split.Tensor, torch.ops.aten.split_with_sizes.default, torch.ops.aten.chunk.default,
           torch.ops.aten.unbind.int)

#: Ops that only check their argument's metadata and return nothing: evaluated, never differentiated.
_CHECKS = (torch.ops.aten._assert_tensor_metadata.default,)


def _aligned(shape: Tuple[int, ...], out: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
    """``shape`` with leading ones up to ``len(out)``, if it broadcasts to ``out`` with size 1 at dim 0."""
    if len(shape) > len(out):
        return None
    a = (1,) * (len(out) - len(shape)) + tuple(shape)
    if a[0] != 1 or any(x not in (1, o) for x, o in zip(a, out)):
        return None
    return a


def _plan(traced: Traced, wanted: Set[str], output_index: int, residuals: bool,
          aliases: Dict[str, str]) -> GraphPlan:
    graph = traced.graph
    out_node = [n for n in graph.nodes if n.op == "output"][0]
    outputs = pytree.tree_flatten(out_node.args[0])[0]
    target = outputs[output_index]
    if not isinstance(target, fx.Node):
        raise Unsupported("the selected model output is not computed by the graph")
    val = target.meta.get("val")
    if not isinstance(val, Tensor) or val.dim() == 0:
        raise Unsupported("the selected model output is not a batched tensor")
    N = int(val.shape[0])
    param_of: Dict[fx.Node, str] = {}
    live: Set[fx.Node] = set()
    data: Set[fx.Node] = set()  # nodes computed from the user inputs
    batch_of: Dict[fx.Node, int] = {}
    ancestors: Dict[fx.Node, frozenset] = {}  # live node: the wanted parameters upstream
    for n in graph.nodes:
        if n.op == "placeholder":
            kind, what = traced.placeholders[n.name]
            if kind in ("parameter", "buffer"):
                what = aliases.get(what, what)
                param_of[n] = what
                if kind == "parameter" and what in wanted:
                    live.add(n)
                    batch_of[n] = 1
                    ancestors[n] = frozenset([what])
            elif kind == "input":
                data.add(n)
    for name in wanted:
        uses = sum(len(n.users) for n, q in param_of.items() if q == name)
        if uses > 1:
            raise Unsupported(f"the parameter {name!r} is used by {uses} operations (a tied or reused weight: "
                              f"its diagonal would need the cross terms between the uses)")
    order, rules, slots, alias, broadcast, values = [], {}, {}, {}, {}, {}
    unfolded: Dict[fx.Node, Tuple[int, ...]] = {}
    splits: Dict[fx.Node, fx.Node] = {}
    synthetic: Dict[fx.Node, Tuple[fx.Node, tuple, Dict[str, Any]]] = {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        order.append(n)
        arg_slots = _slots(n.args)
        if any(isinstance(a, fx.Node) and a in data for _, a in arg_slots):
            data.add(n)
        if _random(n):  # dropout in training mode, a random draw
            raise Unsupported(f"the graph has a random operation, {n.target}{where(n)} (its draw would not be "
                              f"the one f makes)")
        if n.target is operator.getitem and n.args[0] in splits:
            src, idx = n.args
            x = splits[src]
            rest, kw = tuple(src.args[1:]), dict(src.kwargs)
            name = str(src.target)
            rule = OP_RULES.lookup(name)
            ex = n.meta.get("val")
            meta = Meta(name, (_example(x),) + rest, kw, ((0,),), {}, ex, batch_of[x],
                        {(0,): unfolded[x]} if x in unfolded else {},
                        (lambda t, *a, _i=idx, _f=src.target, **k: _f(t, *a, **k)[_i]))
            try:
                bound = rule.bind(meta)
            except Unsupported as err:
                raise Unsupported(f"ATen operation {name}{where(src)} {err}") from None
            live.add(n)
            rules[n], slots[n], synthetic[n] = bound, [((0,), x)], (x, rest, kw)
            batch_of[n], ancestors[n] = batch_of[x], ancestors[x]
            continue
        if n.target is operator.getitem:
            src, idx = n.args
            if src in live:
                main = getattr(rules.get(src), "main_output", None)
                if idx != main:
                    if n.users:
                        raise Unsupported(f"output {idx} of {src.target} is used{where(n)}")
                    continue
                live.add(n)
                alias[n] = src
                batch_of[n], ancestors[n] = batch_of[src], ancestors[src]
            continue
        live_slots = [(s, a) for s, a in arg_slots if isinstance(a, fx.Node) and a in live]
        if not live_slots or (n.target in _CHECKS and not n.users):
            continue  # a constant, or a check of a tensor's metadata (its value is not used)
        live.add(n)
        name = str(n.target)
        rule = OP_RULES.lookup(name)
        if rule is None:
            raise Unsupported(f"the graph walker has no rule for the ATen operation {name}{where(n)}")
        if n.target in _SPLITS:  # each output is bound on its own (its getitem node), from the input
            (s0, x0), = live_slots if len(live_slots) == 1 else [(None, None)]
            if x0 is None or s0 != (0,):
                raise Unsupported(f"ATen operation {name}{where(n)} splits more than its first argument")
            splits[n] = x0
            live.discard(n)  # evaluated as a value; its outputs are the live nodes
            continue
        ancestors[n] = frozenset().union(*(ancestors[a] for _, a in live_slots))
        weights = rule.parameter_positions()
        params = {s: param_of[a] for s, a in arg_slots if isinstance(a, fx.Node) and a in param_of
                  and s[0] in weights}
        acts = [(s, a) for s, a in live_slots if s[0] not in weights]
        out_val = n.meta.get("val")
        out_val = out_val[getattr(rule, "output", None) or 0] if isinstance(out_val, (tuple, list)) else out_val
        out_shape = tuple(out_val.shape) if isinstance(out_val, Tensor) else ()
        try:
            batched = [a for _, a in acts if batch_of[a] != 1 or (N == 1 and a not in param_of)]
            # batched: a batched input, or an output with the batch first from shared values and constants
            # (an embedding of per-sample token ids, a shared value expanded over the batch)
            if batched or out_shape[:1] == (N,):
                nb = N
            else:
                nb = 1
            if N == 1:
                nb = 1
            shared_in = [(s, a) for s, a in acts if nb != 1 and batch_of[a] == 1]
            example = list(pytree.tree_map(_example, list(n.args)))
            if shared_in or (N == 1 and any(a in param_of for _, a in acts)):
                # shared values broadcast into the batch (or a batch of one: every parameter value is "broadcast")
                if not getattr(rule, "broadcasts", False):
                    s0, a0 = (shared_in or [(s, a) for s, a in acts if a in param_of])[0]
                    raise Unsupported(f"takes {_name(a0, param_of)} of shape {_shape(a0)}, shared by all samples, "
                                      f"as argument {s0[0]} (only elementwise ops and expand may broadcast it)")
                bslots = {}
                for s, a in (shared_in or [(s, a) for s, a in acts if a in param_of]):
                    A = _aligned(_shape(a), out_shape)
                    if A is None:
                        raise Unsupported(f"broadcasts {_name(a, param_of)} of shape {_shape(a)} to {out_shape}")
                    bslots[s] = (A, out_shape)
                    ex = _example(a)
                    expanded = ex.reshape(A).expand(out_shape)
                    if len(s) == 1:
                        example[s[0]] = expanded
                    else:
                        example[s[0]] = list(example[s[0]])
                        example[s[0]][s[1]] = expanded
                broadcast[n] = bslots
            meta = Meta(name, tuple(example), dict(n.kwargs), tuple(s for s, _ in acts),
                        dict(params), out_val, nb, {s: unfolded[a] for s, a in acts if a in unfolded})
            bound = rule.bind(meta)
            if getattr(bound, "out_unfolded", None):
                unfolded[n] = tuple(bound.out_unfolded)
            if nb == 1 and N != 1 and out_shape[:1] not in ((1,),):
                raise Unsupported(f"gives shape {out_shape} from values shared by all samples (leading size 1 "
                                  f"expected)")
            if residuals and getattr(bound, "coupled", False):
                raise Unsupported("couples the samples (batch statistics): the exact Hessian's residual across "
                                  "samples has no rule (the GGN and the Fishers run)")
            if residuals and getattr(bound, "residual_reason", None):
                raise Unsupported(bound.residual_reason)
            if residuals and getattr(rule, "nonlinear", False):
                raise Unsupported("is nonlinear in its inputs and has no residual rule for the exact Hessian "
                                  "(the GGN and the Fishers run)")
            if residuals and getattr(bound, "bilinear_live", False):
                sets = [ancestors[a] for _, a in acts]
                if any(sets[i] & sets[j] for i in range(len(sets)) for j in range(i + 1, len(sets))):
                    if bound.cross_rule is None or len(acts) != 2 or n in broadcast:
                        raise Unsupported("multiplies two values that depend on the same parameters (the exact "
                                          "Hessian's cross term between them has no rule)")
                    bound.cross = True  # the cross term joins the residuals (product_cross_term)
        except Unsupported as err:
            raise Unsupported(f"ATen operation {name}{where(n)} {err}") from None
        if isinstance(rule, ModuleOp) and rule.output is not None:
            bound.main_output = rule.output
        rules[n] = bound
        slots[n] = list(acts)
        batch_of[n] = nb
        for _, a in acts:
            if a in param_of:
                values[a] = param_of[a]
    if target not in live:
        raise Unsupported("the model output does not depend on the differentiated parameters")
    if target in unfolded:
        raise Unsupported("the model output keeps the batch folded into its first dimension")
    if batch_of.get(target) != N and N != 1:
        raise Unsupported("the model output does not carry the batch")
    program = _program(traced, order, live, rules, slots, alias, target, broadcast, values, batch_of, unfolded,
                       synthetic, aliases)
    return GraphPlan(traced, order, live, rules, slots, alias, target, N, broadcast, values, batch_of, unfolded,
                     synthetic, aliases, program)


def _shape(a: fx.Node) -> Tuple[int, ...]:
    v = a.meta.get("val")
    return tuple(v.shape) if isinstance(v, Tensor) else ()


def _name(a: fx.Node, param_of: Dict[fx.Node, str]) -> str:
    return f"the parameter {param_of[a]!r}" if a in param_of else f"the value {a.name!r}"


def to_shared(term: Term, A: Tuple[int, ...], out: Tuple[int, ...]) -> Term:
    """A per-sample term at a broadcast copy ``[N, *out[1:]]`` as a term at the shared value ``[1, *A[1:]]``.

    The copy of sample ``n`` is the shared value expanded over the dims where
    ``A`` is 1; the shared value's curvature is the sum over samples of the
    per-sample blocks pulled through that expansion: each sample's columns
    summed over the expanded dims become columns of the one shared "sample"
    (``K N`` of them, in the order ``(k, n)``).

    Example:
        >>> from secorder.structured.curvature import Factor
        >>> t = to_shared(Factor(torch.ones(1, 2, 3, 4)), (1, 1, 4), (2, 3, 4))  # [1, 1, 4] broadcast over 3
        >>> t.B.shape, t.B[0, 0, 0].tolist()
        (torch.Size([2, 1, 1, 4]), [3.0, 3.0, 3.0, 3.0])
    """
    if isinstance(term, Batchwise):  # whole-batch columns: the sum over samples is part of the pull-back
        B = term.B.sum(1, keepdim=True)
        dims = tuple(2 + i for i in range(len(A) - 1) if A[i + 1] == 1 and out[i + 1] != 1)
        return Factor(B.sum(dims, keepdim=True) if dims else B,
                      None if term.w is None else term.w.reshape(-1, 1))
    f = column_form(term).as_factor()
    B = f.B
    dims = tuple(2 + i for i in range(len(A) - 1) if A[i + 1] == 1 and out[i + 1] != 1)
    if dims:
        B = B.sum(dims, keepdim=True)
    K, N = B.shape[:2]
    w = None if f.w is None else f.w.reshape(K * N, 1)
    return Factor(B.reshape((K * N, 1) + tuple(B.shape[2:])), w)


def _grad_shared(g: Tensor, A: Tuple[int, ...]) -> Tensor:
    dims = tuple(i for i in range(len(A)) if A[i] == 1 and g.shape[i] != 1)
    return g.sum(dims, keepdim=True) if dims else g


def forward(p: GraphPlan, values: Dict[str, Tensor], inputs: Any) -> Tuple[Tensor, List[Any]]:
    """The model output and each live step's state."""
    prog = p.program
    flat = flatten_inputs(inputs)
    vals: List[Any] = [None] * len(prog.steps)
    states: List[Any] = [None] * len(prog.steps)
    for st in prog.steps:
        if st.kind == "placeholder":
            kind, what = st.source
            if kind in ("parameter", "buffer"):
                if what not in values:
                    raise Unsupported(f"no value for the model tensor {what!r}")
                vals[st.i] = values[what]
            elif kind == "constant":
                vals[st.i] = what
            else:
                vals[st.i] = flat[what]
        elif st.kind == "alias":
            vals[st.i] = vals[st.source]
        elif st.kind == "const":
            vals[st.i] = st.target(*_fill_template(st.args, vals), **_fill_template(st.kwargs, vals))
        elif st.kind == "split_item":  # one output of a split, from the split's input
            x, rest, kw = st.source
            vals[st.i], states[st.i] = st.rule.forward((vals[x],) + rest, kw)
        else:
            args, kwargs = _fill_template(st.args, vals), _fill_template(st.kwargs, vals)
            for s, (A, O) in st.broadcast.items():  # a shared value, one copy per sample
                args = _replace(args, [s], [slot_value(args, s).reshape(A).expand(O)])
            try:
                out, state = st.rule.forward(args, kwargs)
            except Unsupported as err:
                raise Unsupported(f"ATen operation {st.where} {err}") from None
            if st.batch is not None and out.shape[:1] != (st.batch,):
                raise Unsupported(f"ATen operation {st.where} gives shape {tuple(out.shape)} at run time")
            vals[st.i], states[st.i] = out, state
    return vals[prog.output], states


class _Backward:
    def __init__(self, p: GraphPlan, states: List[Any], wanted: Set[str], trace: bool):
        self.prog, self.states, self.wanted, self.trace = p.program, states, frozenset(wanted), trace
        self.diags: Dict[str, Tensor] = {}
        self.total: Optional[Tensor] = None
        # steps some differentiated parameter feeds through live slots: the curvature is needed there
        self.feeds: Set[int] = {i for i, q, _ in self.prog.values if q in self.wanted}
        for st in self.prog.steps:
            if st.kind == "alias":
                if st.source in self.feeds:
                    self.feeds.add(st.i)
            elif st.rule is not None and (any(q in self.wanted for q in st.rule.parameter_slots.values())
                                          or any(a in self.feeds for _, a in st.slots)):
                self.feeds.add(st.i)

    def _record(self, st: _Step, terms: List[Term]) -> None:
        bound = st.rule
        if not any(q in self.wanted for q in bound.parameter_slots.values()):
            return
        state = self.states[st.i]
        per_sample = [t for t in terms if not isinstance(t, Batchwise)]
        across = [t for t in terms if isinstance(t, Batchwise)]
        if per_sample:
            if self.trace:
                self._add_total(bound.parameter_trace(state, Curvature(per_sample), self.wanted))
            else:
                for q, d in bound.parameter_diagonal(state, Curvature(per_sample), self.wanted).items():
                    self._add_diag(q, d)
        if across:  # columns across samples: one whole-batch parameter vjp per column (batchwise.py)
            for q, pullback in bound.parameter_pullbacks(state, self.wanted).items():
                for t in across:
                    d = batch_parameter_diagonal(pullback, t)
                    if self.trace:
                        self._add_total(d.sum())
                    else:
                        self._add_diag(q, d)

    def _add_total(self, t: Tensor) -> None:
        self.total = t if self.total is None else self.total + t

    def _add_diag(self, q: str, d: Tensor) -> None:
        self.diags[q] = d if q not in self.diags else self.diags[q] + d

    def pull(self, terms: List[Term], g: Optional[Tensor], residuals: bool) -> None:
        prog = self.prog
        acc: Dict[int, Dict[Any, Term]] = {prog.output: {("loss", i): t for i, t in enumerate(terms)}}
        grads: Dict[int, Tensor] = {prog.output: g} if g is not None and residuals else {}
        for st in reversed(prog.steps):
            if st.i not in self.feeds or st.kind == "placeholder":  # parameters used as values: read below
                continue
            here, gn = acc.pop(st.i, None), grads.pop(st.i, None)
            if st.kind == "alias":
                src = st.source
                for tid, t in (here or {}).items():
                    _add(acc.setdefault(src, {}), tid, t)
                if gn is not None:
                    grads[src] = gn if src not in grads else grads[src] + gn
                continue
            if not here and gn is None:
                continue
            bound, state = st.rule, self.states[st.i]
            if here:
                self._record(st, list(here.values()))
            targets = [(s, a) for s, a in st.slots if a in self.feeds]
            if not targets:
                continue
            jacs = bound.jacobians(state)
            split = len(targets) > 1
            shared = st.broadcast
            for tid, t in (here or {}).items():
                if split and not isinstance(t, Batchwise):
                    t = column_form(t)
                for s, a in targets:
                    pt = t.pulled(jacs[s])
                    _add(acc.setdefault(a, {}), tid, pt if s not in shared else to_shared(pt, *shared[s]))
            if gn is not None:
                if bound.has_residual and hasattr(bound, "joint_residual"):  # columns split over the arguments
                    parts = bound.joint_residual(state, gn)
                    for s, a in targets:
                        if s in parts:
                            _add(acc.setdefault(a, {}), ("residual", st.i), parts[s])
                elif bound.has_residual:
                    r = bound.residual(state, gn)
                    if r is not None:
                        (s, a), = targets
                        _add(acc.setdefault(a, {}), ("residual", st.i), r)
                for s, a in targets:
                    ga = jacs[s].t_vector(gn)
                    ga = ga if s not in shared else _grad_shared(ga, shared[s][0])
                    grads[a] = ga if a not in grads else grads[a] + ga
        for a, q, shape in prog.values:  # parameters used as values: the curvature there is theirs
            here = acc.pop(a, None)
            if not here or q not in self.wanted:
                continue
            d = Curvature(list(here.values())).diagonal()
            if self.trace:
                self._add_total(d.sum())
            else:
                self._add_diag(q, d.reshape(shape))


def _add(bucket: Dict[Any, Term], tid: Any, t: Term) -> None:
    if tid not in bucket:
        bucket[tid] = t
    elif isinstance(t, Batchwise) or isinstance(bucket[tid], Batchwise):
        bucket[tid] = add_batchwise(bucket[tid], t)
    else:
        bucket[tid] = add_columns(bucket[tid], t)


def run(
    p: GraphPlan,
    spec: LossSpec,
    values: Dict[str, Tensor],
    inputs: Any,
    targets: Any,
    wanted: Set[str],
    trace: bool,
    *,
    kind: str = "hessian",
    factor_chunk_size: Optional[int] = None,
    loss_fn: Optional[Callable[[Tensor, Any], Tensor]] = None,
    mc_samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Any:
    """``{qualified name: diagonal}`` of the ``wanted`` parameters, or their trace, on the graph plan ``p``.

    The arguments are those of :func:`secorder.structured.backprop.run`.

    Example:
        >>> from secorder.structured.graph.trace import traced
        >>> from secorder.structured.losses import loss_spec
        >>> net = torch.nn.Linear(2, 1)
        >>> vals = {"weight": torch.tensor([[1., 2.]]), "bias": torch.tensor([0.])}
        >>> x, y = torch.tensor([[1., 1.]]), torch.tensor([[0.]])
        >>> p = plan(traced(net, x), {"weight", "bias"}, 0, residuals=False)
        >>> run(p, loss_spec(torch.nn.MSELoss()), vals, x, y, {"weight", "bias"}, trace=True, kind="ggn")
        tensor(6.)
    """
    out, states = forward(p, values, inputs)
    if loss_fn is not None:
        with torch.no_grad():  # for its errors only
            loss_fn(out, targets)
    if kind in ("fisher", "empirical_fisher"):
        oc = sampled_curvature(spec, out, targets, kind, mc_samples, generator)
    else:
        oc = output_curvature(spec, out, targets)
    K = oc.columns
    chunk = factor_chunk_size
    if chunk is None:
        widest = p.program.widest
        chunk = max(1, FACTOR_CHUNK_ENTRIES // max(1, out.shape[0] * oc.positions * widest))
    step = K if K == 0 else max(1, min(chunk, K))
    starts = list(range(0, K, step)) if K else [0]
    back = _Backward(p, states, wanted, trace)
    residuals = kind == "hessian"
    for j, start in enumerate(starts):
        terms = list(oc.terms) if j == 0 else []
        if K:
            terms.append(oc.factor(start, min(start + step, K)))
        back.pull(terms, oc.grad if j == 0 else None, residuals and j == 0)
    if trace:
        return back.total if back.total is not None else torch.zeros((), dtype=out.dtype, device=out.device)
    return back.diags

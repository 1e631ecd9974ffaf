"""Building blocks shared by the rule modules.

The kinds of rules, each written once:

* :func:`elementwise` -- ``y = phi(x)`` entry by entry: ``J' = phi'(x) J``,
  ``L' = phi'(x) L + phi''(x) sum_i J_i^2``; a rule is the pair ``(phi', phi'')``.
* :func:`linear` -- ``func`` is linear in its traced arguments jointly (a view, a
  concatenation, a sum, a matmul with a constant, ...): value and Laplacian go
  through ``func`` itself, the Jacobian through ``func`` batched over the
  directions (``vmap``, or a faster explicit form the rule passes in).
* :func:`multilinear` -- ``func`` is linear in each of several traced arguments
  (products): the product rule, with the cross term
  ``2 sum_{p<q} sum_i B(.., J_p_i, .., J_q_i, ..)``.
* :func:`constant` -- ``func``'s result does not depend on the input's values
  differentiably (shapes, comparisons, ``detach``): evaluated on the values.

Rules that are compositions of covered operations (``a / b = a * (1 / b)``,
``logsumexp``, norms) call torch on :func:`traced` arguments and let the
interpreter do the rest.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.func import vmap

from ..jet import Jet, JetTensor, UncoveredOperation, arg_leaves, lazy, make_jet, map_args, stored_numel
from ..registry import op_name

__all__ = [
    "is_jet", "primal", "traced", "find_trace", "has_jet", "sum_sq", "align", "shift_dim", "zeros_like_const",
    "elementwise", "linear", "linear_parts", "multilinear", "constant", "uncovered", "check_not_inplace",
    "over_directions",
]


def is_jet(a: Any) -> bool:
    return isinstance(a, Jet)


def primal(a: Any) -> Any:
    """The value of a jet, anything else unchanged."""
    return a.value if isinstance(a, Jet) else a


def traced(a: Any) -> Any:
    """A jet as a tensor that torch operations can be called on (they re-enter the interpreter)."""
    return JetTensor(a) if isinstance(a, Jet) else a


def has_jet(tree: Any) -> bool:
    return any(isinstance(leaf, Jet) for leaf in arg_leaves(tree))


def find_trace(tree: Any):
    for leaf in arg_leaves(tree):
        if isinstance(leaf, Jet):
            return leaf.trace
    raise AssertionError("a rule was called without a traced argument")


def uncovered(func: Callable, detail: str = "") -> UncoveredOperation:
    return UncoveredOperation(op_name(func), detail)


def check_not_inplace(func: Callable, args: tuple, kwargs: dict, position: Optional[int]) -> None:
    """Raise for ``inplace=True`` (keyword, or positional at ``position``): aliasing is not tracked."""
    flag = kwargs.get("inplace", False)
    if position is not None and len(args) > position:
        flag = args[position]
    if flag:
        raise uncovered(func, "inplace=True")


# Squares of the Jacobian are summed over blocks of directions whose squares take about this many
# entries (2 MiB of float32): on CPUs the block stays in cache, and the allocator reuses its memory
# instead of mapping fresh pages for a temporary as large as the Jacobian (3-4x faster there).
_BLOCK_ENTRIES = 1 << 19


def _block(jac: Tensor) -> int:
    """Directions per block of :func:`sum_sq`."""
    k = jac.shape[0]
    if k <= 1 or jac.device.type != "cpu":
        return k
    return max(1, _BLOCK_ENTRIES * k // max(stored_numel(jac), 1))


def _blocked_sum_sq(jac: Tensor) -> Tensor:
    k = jac.shape[0]
    block = _block(jac)
    if block >= k:
        return (jac * jac).sum(0)
    parts = jac.split(block)
    total = (parts[0] * parts[0]).sum(0)
    for part in parts[1:]:
        total = total + (part * part).sum(0)
    return total


class _SumOfSquares(torch.autograd.Function):
    """``sum_i J_i^2`` with its derivatives written out: ``2 J g`` in one pass backward (autograd of the
    blocked sum would multiply, add and concatenate block by block), ``2 sum_i J_i dJ_i`` forward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(jac: Tensor) -> Tensor:
        return _blocked_sum_sq(jac)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (jac,) = ctx.saved_tensors
        return jac * (2 * grad)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:
        (jac,) = ctx.saved_tensors
        return 2 * (jac * tangent).sum(0)


def sum_sq(jac: Tensor) -> Tensor:
    """``sum_i J_i^2`` over the directions (dimension 0), in cache-sized blocks of directions on CPUs."""
    if isinstance(jac, JetTensor) or _block(jac) >= jac.shape[0]:  # one block: plain autograd does as well
        return (jac * jac).sum(0)
    return _SumOfSquares.apply(jac)


def align(jac: Tensor, ndim: int) -> Tensor:
    """``jac`` with singleton dimensions after the directions, so that it has ``ndim + 1`` dimensions
    and broadcasts like its value against a result of ``ndim`` dimensions."""
    missing = ndim + 1 - jac.dim()
    if missing <= 0:
        return jac
    return jac.reshape(jac.shape[:1] + (1,) * missing + jac.shape[1:])


def shift_dim(dim: Any) -> Any:
    """A dimension (or a sequence of them) of a value, as a dimension of its Jacobian."""
    if isinstance(dim, (tuple, list)):
        return type(dim)(shift_dim(d) for d in dim)
    return dim + 1 if dim >= 0 else dim


def zeros_like_const(c: Any) -> Any:
    """A zero standing in for an additive constant (a floating tensor or a number)."""
    if isinstance(c, Tensor):
        return torch.zeros((), dtype=c.dtype, device=c.device).expand(c.shape)
    if isinstance(c, (float, int)) and not isinstance(c, bool):
        return 0
    return c


def over_directions(call: Callable, args: Sequence[Any], batched: Iterable[int]) -> Any:
    """``call(*args)`` for every direction: the arguments at positions ``batched`` carry the
    directions in their leading dimension (``vmap`` over it)."""
    batched = set(batched)
    in_dims = tuple(0 if i in batched else None for i in range(len(args)))
    return vmap(call, in_dims=in_dims)(*args)


def _pack(value: Any, jac: Any, lap: Any, trace) -> Any:
    """Zip the value, Jacobian and Laplacian results of ``func`` into jets (floating tensors only)."""
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex():
            return make_jet(value, jac, lap, trace)
        return value
    if isinstance(value, (tuple, list)):
        parts = [_pack(v, j, l, trace) for v, j, l in zip(value, jac, lap)]
        return type(value)(*parts) if hasattr(value, "_fields") else type(value)(parts)
    return value


def constant(func: Callable, args: tuple, kwargs: dict) -> Any:
    """Rule for results without a derivative to carry: evaluate on the values."""
    return func(*map_args(primal, args), **map_args(primal, kwargs))


def linear_parts(func: Callable, args: tuple, kwargs: dict, zero_constants: bool) -> Tuple[Any, Any]:
    """Value and Laplacian of a jointly linear ``func``: ``func`` on the values, and on the
    Laplacians (with floating constants zeroed when they are additive)."""
    value = func(*map_args(primal, args), **map_args(primal, kwargs))

    def lap_of(a: Any) -> Any:
        if isinstance(a, Jet):
            return a.lap
        if zero_constants and isinstance(a, Tensor) and a.is_floating_point():
            return zeros_like_const(a)
        return a

    lap = func(*map_args(lap_of, args), **map_args(lap_of, kwargs))
    return value, lap


def _vmapped_jac(func: Callable, args: tuple, kwargs: dict, zero_constants: bool) -> Any:
    jets = [leaf for leaf in arg_leaves((args, kwargs)) if isinstance(leaf, Jet)]

    def fixed(a: Any) -> Any:
        if zero_constants and not isinstance(a, Jet) and isinstance(a, Tensor) and a.is_floating_point():
            return zeros_like_const(a)
        return a

    args, kwargs = map_args(fixed, args), map_args(fixed, kwargs)

    def call(*jacs: Tensor) -> Any:
        it = iter(jacs)
        swap = lambda a: next(it) if isinstance(a, Jet) else a  # noqa: E731 (same order as arg_leaves)
        return func(*map_args(swap, args), **map_args(swap, kwargs))

    return over_directions(call, [j.jac for j in jets], range(len(jets)))


def linear(jac_fn: Optional[Callable] = None, zero_constants: bool = True) -> Callable:
    """Rule builder for a ``func`` linear in its traced arguments jointly.

    ``jac_fn(func, args, kwargs, value)`` computes the Jacobian explicitly (for
    speed); without it ``func`` is ``vmap``-ed over the directions. With
    ``zero_constants``, floating tensors that are not traced are additive
    constants (concatenated pieces, ``torch.where`` branches) and count as zero
    in the derivatives; otherwise they are coefficients.
    """

    def rule(func: Callable, args: tuple, kwargs: dict) -> Any:
        trace = find_trace((args, kwargs))
        value, lap = linear_parts(func, args, kwargs, zero_constants)

        def jacobian() -> Any:
            if jac_fn is not None:
                return jac_fn(func, args, kwargs, value)
            return _vmapped_jac(func, args, kwargs, zero_constants)

        if isinstance(value, Tensor):  # a single result: its Jacobian waits until it is read
            constants = [a for a in arg_leaves((args, kwargs)) if isinstance(a, Tensor)]
            return _pack(value, lazy(jacobian, *constants), lap, trace)
        return _pack(value, jacobian(), lap, trace)

    return rule


def elementwise(derivatives: Callable, inplace: Optional[int] = None) -> Callable:
    """Rule builder for an entrywise ``y = func(x, *options)``.

    ``derivatives(x, y, *options, **kwoptions)`` returns ``(phi'(x), phi''(x))``
    on the values (``phi''`` may be ``None`` where it is zero, as for
    piecewise-linear functions). ``inplace`` is the position of an ``inplace``
    flag, if ``func`` has one.
    """

    def rule(func: Callable, args: tuple, kwargs: dict) -> Any:
        x, options = args[0], args[1:]
        if not isinstance(x, Jet) or has_jet((options, kwargs)):
            raise uncovered(func, "only the input may depend on the differentiated argument")
        check_not_inplace(func, args, kwargs, inplace)
        y = func(x.value, *options, **kwargs)
        kw = {k: v for k, v in kwargs.items() if k != "inplace"}
        opts = options if inplace is None else options[: inplace - 1]
        d1, d2 = derivatives(x.value, y, *opts, **kw)
        lap = x.lap * d1
        if d2 is not None:
            lap = torch.addcmul(lap, d2, sum_sq(x.jac))
        return make_jet(y, lazy(lambda: x.jac * d1), lap, x.trace)

    return rule


def multilinear(call: Callable, operands: Sequence[Any], batched: Optional[Callable] = None,
                value: Optional[Tensor] = None) -> Jet:
    """The jet of ``call(*operands)`` for a ``call`` linear in each operand separately.

    ``batched(operands, positions)`` may compute ``call`` with the operands at
    ``positions`` carrying directions in their leading dimension, or return
    ``None`` for a case it does not handle; the default is ``vmap``. ``value``
    is the result on the values where the caller has it already (with an
    additive bias, say: the derivatives ignore it).
    """
    values = [primal(o) for o in operands]
    positions = [p for p, o in enumerate(operands) if isinstance(o, Jet)]
    trace = operands[positions[0]].trace

    def with_at(replace: dict) -> list:
        return [replace.get(i, v) for i, v in enumerate(values)]

    def directional(replace: dict) -> Tensor:
        args = with_at(replace)
        if batched is not None:
            out = batched(args, tuple(replace))
            if out is not None:
                return out
        return over_directions(call, args, replace)

    if value is None:
        value = call(*values)

    def jacobian() -> Tensor:
        parts = [directional({p: operands[p].jac}) for p in positions]
        return functools.reduce(torch.add, parts)

    lap = functools.reduce(torch.add, [call(*with_at({p: operands[p].lap})) for p in positions])
    for a, p in enumerate(positions):
        for q in positions[a + 1:]:
            lap = lap + 2 * directional({p: operands[p].jac, q: operands[q].jac}).sum(0)
    constants = [v for i, v in enumerate(values) if i not in positions]
    return make_jet(value, lazy(jacobian, *constants), lap, trace)

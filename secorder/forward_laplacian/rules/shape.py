"""Views, reshapes, indexing, concatenation and conversions: linear maps that move entries.

Each is linear in its traced tensors, so value and Laplacian go through the
operation itself and the Jacobian through the same operation with its
dimensions shifted past the leading direction dimension (negative dimensions
need no shift). Operations without such an explicit form here (advanced
indexing, ``repeat``, ``diagonal``, non-constant padding, ...) are ``vmap``-ed
over the directions, which is exact for any linear operation and slower only by
``vmap``'s overhead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..jet import Jet, lazy, make_jet
from ..registry import register
from .common import constant, is_jet, linear, linear_parts, shift_dim, uncovered


def _arg(args, kwargs, position, name, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else default


def _k(x: Jet) -> int:
    return x.jac.shape[0]


# --- same entries, new shape -------------------------------------------------------------------------


def _reshaped_jac(func, args, kwargs, value):
    x = args[0]
    return x.jac.reshape((_k(x),) + tuple(value.shape))


@register(torch.reshape, torch.Tensor.reshape, torch.Tensor.view, torch.Tensor.view_as, torch.Tensor.reshape_as,
          torch.flatten, torch.Tensor.flatten, torch.unflatten, torch.Tensor.unflatten, torch.ravel,
          torch.Tensor.ravel, torch.squeeze, torch.Tensor.squeeze, torch.unsqueeze, torch.Tensor.unsqueeze,
          torch.atleast_1d, torch.atleast_2d, torch.atleast_3d)
def _reshape(func, args, kwargs):
    if func is torch.Tensor.view and len(args) == 2 and isinstance(args[1], torch.dtype):
        raise uncovered(func, "a dtype view (reinterpreting bits)")
    if func in (torch.atleast_1d, torch.atleast_2d, torch.atleast_3d) and (len(args) != 1 or not is_jet(args[0])):
        raise uncovered(func, "several tensors")
    return linear(_reshaped_jac)(func, args, kwargs)


def _broadcast_jac(func, args, kwargs, value):
    return args[0].jac  # make_jet broadcasts it to the value's shape (a view)


register(torch.Tensor.expand, torch.Tensor.expand_as, torch.broadcast_to, torch.Tensor.broadcast_to)(
    linear(_broadcast_jac))


def _identity_jac(func, args, kwargs, value):
    return args[0].jac


register(torch.clone, torch.Tensor.clone, torch.Tensor.contiguous)(linear(_identity_jac))


# --- permutations of dimensions ----------------------------------------------------------------------


def _permute_jac(func, args, kwargs, value):
    x = args[0]
    dims = _arg(args, kwargs, 1, "dims")
    if isinstance(dims, int):
        dims = args[1:]
    nd = x.value.dim()
    return x.jac.permute((0,) + tuple(d % nd + 1 for d in dims))


def _transpose_jac(func, args, kwargs, value):
    x = args[0]
    d0 = _arg(args, kwargs, 1, "dim0")
    d1 = _arg(args, kwargs, 2, "dim1")
    return x.jac.transpose(shift_dim(d0), shift_dim(d1))


def _t_jac(func, args, kwargs, value):
    x = args[0]
    return x.jac if x.value.dim() < 2 else x.jac.transpose(-2, -1)


def _reverse_jac(func, args, kwargs, value):
    x = args[0]
    return x.jac.permute((0,) + tuple(range(x.jac.dim() - 1, 0, -1)))


def _mT_jac(func, args, kwargs, value):
    return args[0].jac.transpose(-2, -1)


def _movedim_jac(func, args, kwargs, value):
    x = args[0]
    src = _arg(args, kwargs, 1, "source")
    dst = _arg(args, kwargs, 2, "destination")
    return x.jac.movedim(shift_dim(src), shift_dim(dst))


register(torch.permute, torch.Tensor.permute)(linear(_permute_jac))
register(torch.transpose, torch.Tensor.transpose, torch.swapaxes, torch.Tensor.swapaxes, torch.swapdims,
         torch.Tensor.swapdims)(linear(_transpose_jac))
register(torch.t, torch.Tensor.t)(linear(_t_jac))
register(torch.Tensor.T.__get__, torch.Tensor.mT.__get__, torch.Tensor.mH.__get__, torch.Tensor.H.__get__)(
    lambda func, args, kwargs: linear(_reverse_jac if func is torch.Tensor.T.__get__ else _mT_jac)(func, args, kwargs))
register(torch.movedim, torch.Tensor.movedim, torch.moveaxis, torch.Tensor.moveaxis)(linear(_movedim_jac))


# --- selecting entries -------------------------------------------------------------------------------


def _basic_index(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, slice) or (isinstance(p, int) and not isinstance(p, bool))
               for p in parts)


def _getitem_jac(func, args, kwargs, value):
    x, index = args[0], args[1]
    parts = index if isinstance(index, tuple) else (index,)
    return x.jac[(slice(None),) + parts]


@register(torch.Tensor.__getitem__)
def _getitem(func, args, kwargs):
    if is_jet(args[1]) or not _basic_index(args[1]):
        return linear()(func, args, kwargs)  # advanced indexing: vmap over the directions
    return linear(_getitem_jac)(func, args, kwargs)


def _select_jac(func, args, kwargs, value):
    x = args[0]
    dim = _arg(args, kwargs, 1, "dim")
    rest = tuple(args[2:])
    options = {k: v for k, v in kwargs.items() if k not in ("dim", "input")}
    return getattr(torch.Tensor, func.__name__)(x.jac, shift_dim(dim), *rest, **options)


register(torch.select, torch.Tensor.select, torch.narrow, torch.Tensor.narrow, torch.index_select,
         torch.Tensor.index_select)(linear(_select_jac))


def _gather_jac(func, args, kwargs, value):
    x = args[0]
    dim = _arg(args, kwargs, 1, "dim")
    index = _arg(args, kwargs, 2, "index")
    return x.jac.gather(shift_dim(dim), index.expand((_k(x),) + tuple(index.shape)))


register(torch.gather, torch.Tensor.gather)(linear(_gather_jac))


def _pieces_jac(func, args, kwargs, value):
    """``split``/``chunk``/``unbind``/``tensor_split``: the same cut along the shifted dimension."""
    x = args[0]
    if func in (torch.unbind, torch.Tensor.unbind):
        return x.jac.unbind(shift_dim(_arg(args, kwargs, 1, "dim", 0)))
    how = args[1] if len(args) > 1 else kwargs.get("split_size_or_sections", kwargs.get("split_size",
                                                    kwargs.get("chunks", kwargs.get("sections", kwargs.get("indices")))))
    dim = _arg(args, kwargs, 2, "dim", 0)
    method = {torch.split: "split", torch.Tensor.split: "split", torch.chunk: "chunk", torch.Tensor.chunk: "chunk",
              torch.tensor_split: "tensor_split", torch.Tensor.tensor_split: "tensor_split"}[func]
    return tuple(getattr(x.jac, method)(how, shift_dim(dim)))


register(torch.split, torch.Tensor.split, torch.chunk, torch.Tensor.chunk, torch.unbind, torch.Tensor.unbind,
         torch.tensor_split, torch.Tensor.tensor_split)(linear(_pieces_jac))


def _flip_jac(func, args, kwargs, value):
    x = args[0]
    dims = _arg(args, kwargs, 1, "dims")
    if isinstance(dims, int):
        dims = args[1:]
    return x.jac.flip(shift_dim(tuple(dims)))


register(torch.flip, torch.Tensor.flip)(linear(_flip_jac))


def _roll(func, args, kwargs):
    dims = _arg(args, kwargs, 2, "dims")
    if dims is None:
        return linear()(func, args, kwargs)
    shifts = _arg(args, kwargs, 1, "shifts")
    return linear(lambda f, a, k, v: a[0].jac.roll(shifts, shift_dim(dims)))(func, args, kwargs)


register(torch.roll, torch.Tensor.roll)(_roll)

# Less common linear maps: vmap over the directions.
register(torch.diagonal, torch.Tensor.diagonal, torch.diag, torch.Tensor.diag, torch.diag_embed,
         torch.Tensor.diag_embed, torch.tril, torch.Tensor.tril, torch.triu, torch.Tensor.triu,
         torch.Tensor.repeat, torch.tile, torch.Tensor.tile, torch.take_along_dim, torch.Tensor.take_along_dim,
         torch.hstack, torch.vstack, torch.dstack, torch.column_stack)(linear())


# --- joining tensors ---------------------------------------------------------------------------------


def _join_jac(func, args, kwargs, value):
    tensors = _arg(args, kwargs, 0, "tensors")
    dim = _arg(args, kwargs, 1, "dim", 0)
    k = next(t.jac.shape[0] for t in tensors if is_jet(t))
    pieces = []
    for t in tensors:
        if is_jet(t):
            pieces.append(t.jac)
        else:
            pieces.append(torch.zeros((), dtype=value.dtype, device=value.device).expand((k,) + tuple(t.shape)))
    return func(pieces, shift_dim(dim))


register(torch.cat, torch.concat, torch.concatenate, torch.stack)(linear(_join_jac))


# --- padding and masking -----------------------------------------------------------------------------


@register(F.pad)
def _pad(func, args, kwargs):
    x = args[0]
    pad = _arg(args, kwargs, 1, "pad")
    mode = _arg(args, kwargs, 2, "mode", "constant")
    if is_jet(_arg(args, kwargs, 3, "value")):
        raise uncovered(func, "a traced padding value")
    if mode != "constant":
        return linear()(func, args, kwargs)
    value = F.pad(x.value, pad, mode, _arg(args, kwargs, 3, "value"))
    return make_jet(value, F.pad(x.jac, pad), F.pad(x.lap, pad), x.trace)


@register(torch.masked_fill, torch.Tensor.masked_fill)
def _masked_fill(func, args, kwargs):
    x, mask = args[0], _arg(args, kwargs, 1, "mask")
    fill = _arg(args, kwargs, 2, "value")
    if is_jet(fill) or is_jet(mask) or not is_jet(x):
        raise uncovered(func, "a traced fill value")
    value = func(x.value, mask, fill)
    return make_jet(value, x.jac.masked_fill(mask, 0.0), x.lap.masked_fill(mask, 0.0), x.trace)


# --- conversions -------------------------------------------------------------------------------------


@register(torch.Tensor.to, torch.Tensor.type_as, torch.Tensor.float, torch.Tensor.double, torch.Tensor.half,
          torch.Tensor.bfloat16, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.type)
def _convert(func, args, kwargs):
    x, rest = args[0], args[1:]
    if not is_jet(x) or any(is_jet(r) for r in rest):
        return constant(func, args, kwargs)
    value = func(x.value, *rest, **kwargs)
    if isinstance(value, torch.Tensor) and value.is_complex():
        # the value stays differentiable, but the rules are written for real tensors (|z| is not analytic)
        raise uncovered(func, f"a conversion to {value.dtype} (complex values)")
    if not (isinstance(value, torch.Tensor) and value.is_floating_point()):
        return value  # cast to an integer or boolean type: no derivative
    return make_jet(value, func(x.jac, *rest, **kwargs), func(x.lap, *rest, **kwargs), x.trace)


# --- unique: a selection of the input's entries ------------------------------------------------------


@register(torch.unique, torch.Tensor.unique)
def _unique(func, args, kwargs):
    """``unique`` (flattened, sorted) picks one entry per distinct value: a gather of the first occurrences.

    Its derivatives are those of the gather wherever the entries are distinct (PyTorch's autograd has no
    rule for it, so the exact path raises); with ``dim`` it is left uncovered.
    """
    x = args[0]
    names = ("sorted", "return_inverse", "return_counts", "dim")
    options = dict(zip(names, args[1:]))
    options.update({k: v for k, v in kwargs.items() if k in names})
    if not is_jet(x) or options.get("dim") is not None or set(kwargs) - set(names):
        raise uncovered(func, "unique of a traced tensor along a dim")
    flat = x.value.reshape(-1)
    values, inverse, counts = torch.unique(flat, sorted=True, return_inverse=True, return_counts=True)
    positions = torch.arange(flat.numel(), device=flat.device)
    first = torch.full(values.shape, flat.numel(), dtype=positions.dtype, device=flat.device)
    first = first.scatter_reduce(0, inverse, positions, "amin")
    k = x.jac.shape[0]
    jet = make_jet(values, lazy(lambda: x.jac.reshape(k, -1)[:, first]), x.lap.reshape(-1)[first], x.trace)
    out = [jet]
    if options.get("return_inverse"):
        out.append(inverse.reshape(x.value.shape))
    if options.get("return_counts"):
        out.append(counts)
    return out[0] if len(out) == 1 else tuple(out)

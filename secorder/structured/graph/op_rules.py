"""The built-in ATen operation rules of the graph walker: one registry entry per operation.

Module-like operations map onto the module rules (one place per piece of
math: :mod:`secorder.structured.rules`); shape and other parameter-free linear
operations use their own ``vjp`` as the Jacobian, or a structured one where it
keeps a diagonal curvature term cheap (reshapes, same-shape ``add``). Each
``batch`` check refuses an op that would mix the samples of a live value
(anything reading or moving dimension 0).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, FrozenSet, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.func import vjp

from ..curvature import Curvature
from ..errors import Unsupported
from ..jacobians import Jacobian, Reshape, Selection
from ..rules.batchnorm import BatchNormRule, BatchNormState
from ..rules.linear import LinearRule
from .batchwise import BatchJacobian
from .ops import OP_RULES, Bound, ElementwiseOp, product_cross_term, LinearOp, Meta, ModuleOp, OpRule, Slot, _op_of, slot_value

__all__: list = []


def _shape(x: Any) -> tuple:
    return tuple(x.shape) if isinstance(x, Tensor) else ()


def _live_shapes(meta: Meta) -> list:
    return [_shape(slot_value(meta.args, s)) for s in meta.live]


def _keeps_batch(meta: Meta) -> Optional[str]:
    """Every live argument and the output have the batch as dimension 0, and as many dims as the output."""
    out = _shape(meta.out)
    for s, shp in zip(meta.live, _live_shapes(meta)):
        if not shp or shp[0] != meta.N:
            return f"argument {s[0]} of shape {shp} has no batch dimension {meta.N} first"
        if len(shp) != len(out):
            return f"broadcasts argument {s[0]} of shape {shp} to {out}"
    if not out or out[0] != meta.N:
        return f"gives shape {out}, without the batch dimension {meta.N} first"
    return None


def _norm(d: int, n: int) -> int:
    return d + n if d < 0 else d


def _dims_exclude_batch(dims: Any, ndim: int, what: str) -> Optional[str]:
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return f"{what} over every dimension, the batch included"
    dims = [dims] if isinstance(dims, int) else list(dims)
    if any(_norm(d, ndim) == 0 for d in dims):
        return f"{what} over the batch dimension"
    return None


def _first_live_ndim(meta: Meta) -> int:
    return len(_live_shapes(meta)[0])


def _batch_out(meta: Meta) -> Optional[str]:
    """Only the output and the live inputs' leading size are checked (reshapes keep samples apart then)."""
    out = _shape(meta.out)
    for s, shp in zip(meta.live, _live_shapes(meta)):
        if not shp or shp[0] != meta.N:
            return f"argument {s[0]} of shape {shp} has no batch dimension {meta.N} first"
    if not out or out[0] != meta.N:
        return f"gives shape {out}, without the batch dimension {meta.N} first"
    return None


def _with(extra):
    def check(meta: Meta) -> Optional[str]:
        return _batch_out(meta) or extra(meta)
    return check


def _reshape_jacobian(meta: Meta, slot: Slot, args: tuple) -> Jacobian:
    return Reshape(_shape(slot_value(args, slot)))


def _identity_if_same(meta: Meta, slot: Slot, args: tuple) -> Optional[Jacobian]:
    """``add``/``sub`` of same-shape values: the identity for the first argument (and the second with alpha 1)."""
    alpha = meta.kwargs.get("alpha", 1)
    if _shape(slot_value(args, slot)) != _shape(meta.out):
        return None
    if slot == (0,) or (alpha == 1 and meta.target.startswith("aten.add")):
        return Reshape(_shape(meta.out))
    return None


def _permute_jacobian(meta: Meta, slot: Slot, args: tuple) -> Jacobian:
    dims = [_norm(d, len(meta.out.shape)) for d in args[1]]
    inverse = [dims.index(i) for i in range(len(dims))]

    def adjoint(B: Tensor) -> Tensor:
        lead = B.dim() - len(dims)
        return B.permute(list(range(lead)) + [lead + i for i in inverse])

    return Selection(adjoint)


def _transpose_jacobian(meta: Meta, slot: Slot, args: tuple) -> Jacobian:
    n = len(meta.out.shape)
    a, b = _norm(args[1], n), _norm(args[2], n)
    return Selection(lambda B: B.transpose(B.dim() - n + a, B.dim() - n + b))


# -- shape operations -------------------------------------------------------------------------

def _fold_of(meta: Meta) -> Optional[Tuple[int, ...]]:
    """A view ``[N, a, b, ..., d] -> [N a b..., d...]`` folding the batch into dim 0: the input shape, else None."""
    if (0,) in meta.folded or not meta.live:
        return None
    shp, out = _shape(slot_value(meta.args, meta.live[0])), _shape(meta.out)
    if not shp or shp[0] != meta.N or not out or out[0] == meta.N:
        return None
    for k in range(2, len(shp) + 1):
        if math.prod(shp[:k]) == out[0] and tuple(shp[k:]) == tuple(out[1:]):
            return shp
    return None


def _view_batch(meta: Meta) -> Optional[str]:
    if (0,) in meta.folded:  # unfolding: the batch comes back first
        out = _shape(meta.out)
        if not out or out[0] != meta.N:
            return f"keeps the batch folded into dimension 0 ({out}) for a further op"
        return None
    if _fold_of(meta) is not None:
        return None
    return _batch_out(meta)


def _view_jacobian(meta: Meta, slot: Slot, args: tuple) -> Jacobian:
    # the curvature at a folded value is kept with the batch first: a view is a reshape of those shapes
    return Reshape(meta.folded.get(slot) or _shape(slot_value(args, slot)))


for _name in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"):
    OP_RULES.register(_name, LinearOp(_view_batch, _view_jacobian, folds=_fold_of,
                                      doc="reshape keeping dim 0, or folding the batch into it for a matmul"))
for _name in ("aten.flatten.using_ints", "aten.unflatten.int"):
    OP_RULES.register(_name, LinearOp(_batch_out, _reshape_jacobian, doc="reshape keeping dim 0"))
for _name in ("aten.unsqueeze.default",):
    OP_RULES.register(_name, LinearOp(
        _with(lambda m: "inserts a dimension before the batch" if _norm(m.args[1], len(m.out.shape)) == 0 else None),
        _reshape_jacobian, doc="a new dimension after dim 0"))
for _name in ("aten.squeeze.dim", "aten.squeeze.dims"):
    OP_RULES.register(_name, LinearOp(
        _with(lambda m: _dims_exclude_batch(m.args[1], _first_live_ndim(m), "squeezes")),
        _reshape_jacobian, doc="squeeze, not dim 0"))
OP_RULES.register("aten.permute.default", LinearOp(
    _with(lambda m: "moves the batch dimension" if _norm(m.args[1][0], len(m.out.shape)) != 0 else None),
    _permute_jacobian, doc="permute keeping dim 0 first"))
OP_RULES.register("aten.transpose.int", LinearOp(
    _with(lambda m: "moves the batch dimension" if 0 in (_norm(m.args[1], len(m.out.shape)),
                                                          _norm(m.args[2], len(m.out.shape))) else None),
    _transpose_jacobian, doc="transpose of two dims other than 0"))
OP_RULES.register("aten.expand.default", LinearOp(
    _with(lambda m: None if _first_live_ndim(m) == len(m.out.shape) else "broadcasts over new leading dims"),
    broadcasts=True, doc="expand, keeping dim 0"))
OP_RULES.register("aten._to_copy.default", LinearOp(
    lambda m: _keeps_batch(m) or (None if m.out.is_floating_point() else "converts to a non-floating dtype"),
    doc="a copy, possibly to another floating dtype (.to())"))
for _name in ("aten.clone.default", "aten.alias.default", "aten.contiguous.default"):
    OP_RULES.register(_name, LinearOp(_keeps_batch, _reshape_jacobian, doc="a copy"))
OP_RULES.register("aten.slice.Tensor", LinearOp(
    _with(lambda m: "slices the batch dimension" if _norm(m.args[1] if len(m.args) > 1 else 0,
                                                           _first_live_ndim(m)) == 0 else None),
    doc="slice of a dim other than 0"))
OP_RULES.register("aten.select.int", LinearOp(
    _with(lambda m: "selects from the batch dimension" if _norm(m.args[1], _first_live_ndim(m)) == 0 else None),
    doc="select from a dim other than 0"))
OP_RULES.register("aten.cat.default", LinearOp(
    _with(lambda m: "concatenates along the batch dimension"
          if _norm(m.args[1] if len(m.args) > 1 else 0, len(m.out.shape)) == 0 else None),
    doc="concatenate along a dim other than 0"))

# -- arithmetic linear in each live argument -----------------------------------------------------

OP_RULES.register("aten.add.Tensor", LinearOp(_keeps_batch, _identity_if_same, broadcasts=True, doc="sum (residual connections)"))
OP_RULES.register("aten.sub.Tensor", LinearOp(_keeps_batch, _identity_if_same, broadcasts=True, doc="difference"))
OP_RULES.register("aten.neg.default", LinearOp(_keeps_batch, doc="negation"))
OP_RULES.register("aten.mul.Tensor", LinearOp(_keeps_batch, bilinear=product_cross_term, broadcasts=True,
                                              doc="product (exact Hessian: with the cross term of two live factors)"))
OP_RULES.register("aten.mul.Scalar", LinearOp(_keeps_batch, doc="product with a number"))
OP_RULES.register("aten.add.Scalar", LinearOp(_keeps_batch, _reshape_jacobian, doc="shift by a number"))
OP_RULES.register("aten.div.Tensor", LinearOp(
    lambda m: _keeps_batch(m) or ("divides by a value that depends on the parameters" if (1,) in m.live else None),
    broadcasts=True, doc="division by a constant"))
OP_RULES.register("aten.mean.dim", LinearOp(
    _with(lambda m: _dims_exclude_batch(m.args[1] if len(m.args) > 1 else None, _first_live_ndim(m), "averages")),
    doc="mean over dims other than 0"))
OP_RULES.register("aten.sum.dim_IntList", LinearOp(
    _with(lambda m: _dims_exclude_batch(m.args[1] if len(m.args) > 1 else None, _first_live_ndim(m), "sums")),
    doc="sum over dims other than 0"))

# -- module-like operations: stand-in modules on the meta device, the module rules' math ---------


def _meta(cls: type, *args: Any, **kwargs: Any) -> nn.Module:
    """A stand-in module on the meta device, without initialising its parameters (no random ops: vmap-safe)."""
    return nn.utils.skip_init(cls, *args, device="meta", **kwargs)


def _linear(m: Meta) -> nn.Module:
    W = m.args[1]
    bias = len(m.args) > 2 and m.args[2] is not None
    return _meta(nn.Linear, W.shape[1], W.shape[0], bias=bias)


_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _conv(d: int):
    def build(m: Meta) -> nn.Module:
        a = list(m.args) + [None] * (7 - len(m.args))
        W = a[1]
        stride, padding, dilation, groups = (a[3] or 1), (a[4] if a[4] is not None else 0), (a[5] or 1), (a[6] or 1)
        if isinstance(padding, str):
            raise Unsupported(f"padding={padding!r}")
        return _meta(_CONVS[d], W.shape[1] * groups, W.shape[0], tuple(W.shape[2:]), stride=stride, padding=padding,
                     dilation=dilation, groups=groups, bias=a[2] is not None)
    return build


def _batch_norm_eval(m: Meta) -> nn.Module:
    x = m.args[0]
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(x.dim())
    if cls is None:
        raise Unsupported(f"on an input of shape {tuple(x.shape)}")
    if m.args[3] is None or m.args[4] is None:
        raise Unsupported("has no running statistics")
    eps = m.args[6]
    return _meta(cls, x.shape[1], eps=eps, affine=m.args[1] is not None).eval()


_MAXPOOLS = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


def _max_pool(d: int):
    def build(m: Meta) -> nn.Module:
        a = list(m.args) + [None] * (6 - len(m.args))
        stride = a[2] if a[2] else None
        return _MAXPOOLS[d](a[1], stride, a[3] if a[3] is not None else 0, a[4] if a[4] is not None else 1,
                            ceil_mode=bool(a[5]))
    return build


_AVGPOOLS = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
_ADAPTIVE_AVG = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}


def _avg_pool(d: int):
    def build(m: Meta) -> nn.Module:
        a = list(m.args) + [None] * (7 - len(m.args))
        kw = dict(stride=a[2] if a[2] else None, padding=a[3] if a[3] is not None else 0,
                  ceil_mode=bool(a[4]), count_include_pad=True if a[5] is None else bool(a[5]))
        if d > 1:
            kw["divisor_override"] = a[6]
        elif a[6] is not None:
            raise Unsupported("divisor_override on a 1d pool")
        return _AVGPOOLS[d](a[1], **kw)
    return build


def _adaptive_avg(d: int):
    return lambda m: _ADAPTIVE_AVG[d](m.args[1])


def _gelu(m: Meta) -> nn.Module:
    return nn.GELU(approximate=m.kwargs.get("approximate", m.args[1] if len(m.args) > 1 else "none"))


_PARAMS = {1: "weight", 2: "bias"}
OP_RULES.register("aten.linear.default", ModuleOp(_linear, _PARAMS, doc="nn.Linear's rule"))
for _d in (1, 2, 3):
    OP_RULES.register(f"aten.conv{_d}d.default", ModuleOp(_conv(_d), _PARAMS, doc=f"nn.Conv{_d}d's rule"))
    OP_RULES.register(f"aten.max_pool{_d}d.default", ModuleOp(_max_pool(_d), doc=f"nn.MaxPool{_d}d's rule"))
    OP_RULES.register(f"aten.avg_pool{_d}d.default", ModuleOp(_avg_pool(_d), doc=f"nn.AvgPool{_d}d's rule"))
    OP_RULES.register(f"aten.adaptive_avg_pool{_d}d.default", ModuleOp(_adaptive_avg(_d),
                                                                        doc=f"nn.AdaptiveAvgPool{_d}d's rule"))
OP_RULES.register("aten._native_batch_norm_legit_no_training.default", ModuleOp(
    _batch_norm_eval, {1: "weight", 2: "bias", 3: "running_mean", 4: "running_var"}, output=0,
    doc="eval-mode nn.BatchNorm's rule"))
OP_RULES.register("aten.relu.default", ModuleOp(lambda m: nn.ReLU(), doc="nn.ReLU's rule"))
OP_RULES.register("aten.tanh.default", ModuleOp(lambda m: nn.Tanh(), doc="nn.Tanh's rule"))
OP_RULES.register("aten.sigmoid.default", ModuleOp(lambda m: nn.Sigmoid(), doc="nn.Sigmoid's rule"))
OP_RULES.register("aten.silu.default", ModuleOp(lambda m: nn.SiLU(), doc="nn.SiLU's rule"))
OP_RULES.register("aten.gelu.default", ModuleOp(_gelu, doc="nn.GELU's rule"))


# -- training-mode batch norm: batch statistics couple the samples ------------------------------


class BatchStatisticsNorm(OpRule):
    """``aten._native_batch_norm_legit.no_stats``: batch norm on the batch's own statistics (training mode).

    The output of each sample depends on every sample's input, so the input
    Jacobian is the op's whole-batch ``vjp`` (:class:`~.batchwise.BatchJacobian`)
    and the curvature before it is kept across samples (:mod:`.batchwise`). The
    weight and bias act per sample given the normalised input ``xhat``: their
    diagonal is the eval-mode rule's (:class:`~secorder.structured.rules.batchnorm.BatchNormRule`)
    with the batch's ``xhat``. The exact Hessian's residual of the batch statistics
    has no rule: the exact Hessian declines. The running statistics are not read
    or written (the model is traced with ``track_running_stats`` off, as
    :class:`secorder.FunctionalLoss` calls it).
    """

    doc = "training-mode batch norm (batch statistics; GGN and Fishers)"

    def parameter_positions(self) -> FrozenSet[int]:
        return frozenset((1, 2))

    def bind(self, meta: Meta) -> "_BoundBatchStats":
        for slot in meta.live:
            if slot != (0,):
                raise Unsupported(f"its argument {slot[0]} depends on the parameters")
        x = meta.args[0]
        if x.dim() < 2 or x.shape[0] != meta.N:
            raise Unsupported(f"on an input of shape {tuple(x.shape)}")
        with torch._C._DisableFuncTorch():
            stand_in = _batch_norm_eval(Meta(meta.target, (x, meta.args[1], meta.args[2], x, x, 0.0, meta.args[5]),
                                             {}, (), {}, None, meta.N))
        return _BoundBatchStats(BatchNormRule(stand_in), meta)


class _BoundBatchStats(Bound):
    coupled = True
    main_output = 0

    def __init__(self, rule: Any, meta: Meta):
        self.rule, self.target = rule, _op_of(meta.target)
        self.parameter_slots = {s: q for s, q in meta.params.items() if s[0] in (1, 2)}
        self.live = (0,) in meta.live

    def _z(self, x: Tensor, w: Optional[Tensor], b: Optional[Tensor], args: tuple) -> Tensor:
        return self.target(x, w, b, *args[3:])[0]

    def forward(self, args: tuple, kwargs: Dict[str, Any]) -> Tuple[Tensor, Any]:
        x, w, b = args[:3]
        z, pullback = vjp(lambda t: self._z(t, w, b, args), x)
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dims, keepdim=True)
        xhat = (x - mean) * torch.rsqrt(var + args[5])
        return z, (pullback, BatchNormState(xhat, xhat, tuple(x.shape)), args)

    def jacobians(self, state: Any) -> Dict[Slot, Jacobian]:
        return {(0,): BatchJacobian(state[0])} if self.live else {}

    def _local(self, wanted: FrozenSet[str]) -> Dict[str, str]:
        return {("weight" if s[0] == 1 else "bias"): q for s, q in self.parameter_slots.items() if q in wanted}

    def parameter_diagonal(self, state: Any, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        names = self._local(wanted)
        got = self.rule.parameter_diagonal(state[1], curv, frozenset(names)) if names else {}
        return {names[k]: v for k, v in got.items()}

    def parameter_pullbacks(self, state: Any, wanted: FrozenSet[str]) -> Dict[str, Callable[[Tensor], Any]]:
        args = state[2]
        x, w, b = args[:3]
        out = {}
        for local, q in self._local(wanted).items():
            if local == "weight":
                out[q] = vjp(lambda t: self._z(x, t, b, args), w)[1]
            else:
                out[q] = vjp(lambda t: self._z(x, w, t, args), b)[1]
        return out


OP_RULES.register("aten._native_batch_norm_legit.no_stats", BatchStatisticsNorm())


# -- transformer operations ---------------------------------------------------------------------


def _layer_norm(m: Meta) -> nn.Module:
    a = list(m.args) + [None] * (5 - len(m.args))
    eps = a[4] if a[4] is not None else 1e-5
    affine = a[2] is not None
    ln = _meta(nn.LayerNorm, tuple(a[1]), eps=eps, elementwise_affine=affine, bias=a[3] is not None)
    return ln


def _embedding(m: Meta) -> nn.Module:
    a = list(m.args) + [None] * (5 - len(m.args))
    W = a[0]
    padding_idx = a[2] if a[2] is not None and a[2] >= 0 else None
    if a[3]:
        raise Unsupported("has scale_grad_by_freq=True")
    if a[4]:
        raise Unsupported("is sparse")
    return _meta(nn.Embedding, W.shape[0], W.shape[1], padding_idx=padding_idx)


OP_RULES.register("aten.layer_norm.default", ModuleOp(_layer_norm, {2: "weight", 3: "bias"},
                                                      doc="nn.LayerNorm's rule"))
OP_RULES.register("aten.embedding.default", ModuleOp(_embedding, {0: "weight"}, input=1,
                                                     doc="nn.Embedding's rule (token ids first)"))


def _attention_batch(m: Meta) -> Optional[str]:
    reason = _batch_out(m)
    if reason:
        return reason
    for s in m.live:
        if len(_shape(slot_value(m.args, s))) < 3:
            return f"argument {s[0]} has no head or position dimension after the batch"
    return None


class Attention(OpRule):
    """``aten.scaled_dot_product_attention(q, k, v, mask, dropout, causal, scale)``: per-sample attention.

    The Jacobians are the op's ``vjp`` with respect to each live argument. The
    exact Hessian's residual is the module rule's math
    (:func:`~secorder.structured.rules.attention.attention_hessian`, the closed-form
    Hessian of ``sum g . o`` over one head's ``(q, k, v)``, written as signed
    columns by :func:`~secorder.structured.rules.attention.symmetric_columns`),
    split over the live arguments: the sweep pulls each part back along its
    argument and adds them where they meet (the projections' common input). It
    declines (with the reason) for dropout, a custom scale, grouped key/value
    heads, queries and keys of different lengths, and above
    :data:`~secorder.structured.rules.attention.MAX_RESIDUAL_ENTRIES`.
    """

    doc = "attention (its vjp per query, key, value; the exact Hessian's residual in closed form)"

    def bind(self, meta: Meta) -> Bound:
        reason = _attention_batch(meta)
        if reason:
            raise Unsupported(reason)
        a = list(meta.args) + [None] * (7 - len(meta.args))
        kw = meta.kwargs
        dropout = kw.get("dropout_p", a[4] or 0.0)
        if dropout:
            raise Unsupported(f"has dropout_p={dropout} (random)")
        if (3,) in meta.live:
            raise Unsupported("its mask depends on the parameters")
        return _BoundAttention(meta, _attention_residual_reason(meta))


def _attention_residual_reason(meta: Meta) -> Optional[str]:
    from ..rules.attention import MAX_RESIDUAL_ENTRIES

    q, k, v = meta.args[:3]
    kw = meta.kwargs
    if kw.get("enable_gqa", False) or q.shape[1] != k.shape[1] or k.shape[1] != v.shape[1]:
        return "has grouped key/value heads (no residual rule)"
    if q.dim() != 4 or q.shape[2] != k.shape[2] or q.shape[3] != v.shape[3]:
        return f"on queries {tuple(q.shape)} and keys {tuple(k.shape)} (the residual rule takes self-attention)"
    scale = kw.get("scale", meta.args[6] if len(meta.args) > 6 else None)
    if scale is not None and abs(scale - q.shape[3] ** -0.5) > 1e-12:
        return f"has scale={scale} (the residual rule takes 1/sqrt(head size))"
    N, H, T, e = q.shape
    M = 3 * T * e
    entries = 2 * N * (H * M) * (T * 3 * H * e)
    if entries > MAX_RESIDUAL_ENTRIES:
        return (f"the exact Hessian's attention residual would need {2 * H * M} explicit columns per sequence "
                f"({entries} entries, above secorder.structured.rules.attention.MAX_RESIDUAL_ENTRIES="
                f"{MAX_RESIDUAL_ENTRIES}); the GGN diagonal is structured at any size")
    return None


class _BoundAttention(Bound):
    has_residual = True

    def __init__(self, meta: Meta, residual_reason: Optional[str]):
        self.live, self.residual_reason = meta.live, residual_reason
        self.target = _op_of(meta.target)

    def forward(self, args: tuple, kwargs: Dict[str, Any]) -> Tuple[Tensor, Any]:
        live = self.live

        def fn(*xs: Tensor) -> Tensor:
            a = list(args)
            for s, x in zip(live, xs):
                a[s[0]] = x
            return self.target(*a, **kwargs)

        out, pullback = vjp(fn, *[args[s[0]] for s in live])
        return out, (pullback, args, kwargs)

    def jacobians(self, state: Any) -> Dict[Slot, Jacobian]:
        from ..jacobians import Columns

        return {s: Columns.from_vjp((lambda i: lambda b: (state[0](b)[i],))(i)) for i, s in enumerate(self.live)}

    def joint_residual(self, state: Any, grad_out: Tensor) -> Dict[Slot, Any]:
        from ..curvature import Factor
        from ..rules.attention import attention_hessian, symmetric_columns

        _, args, kwargs = state
        a = list(args) + [None] * (7 - len(args))
        q, k, v = a[:3]
        mask = kwargs.get("attn_mask", a[3])
        causal = kwargs.get("is_causal", a[5] or False)
        N, H, T, e = q.shape
        s = (q @ k.transpose(-1, -2)) * (e ** -0.5)
        if causal:
            s = s.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
        att = torch.softmax(s, dim=-1)
        M = 3 * T * e
        Hm = attention_hessian(q, k, v, att, grad_out).reshape(N, H, M, M)
        cols, w = symmetric_columns((Hm + Hm.transpose(-1, -2)) / 2)  # [N, H, M, 2M], [2M]
        cols = cols.reshape(N, H, 3, T, e, 2 * M)
        place = torch.eye(H, dtype=cols.dtype, device=cols.device).reshape(H, 1, 1, H, 1, 1)
        W = w.repeat(H).unsqueeze(1).expand(2 * H * M, N)
        out = {}
        for part, slot in enumerate(((0,), (1,), (2,))):
            if slot in self.live:
                c = cols[:, :, part].permute(1, 4, 0, 2, 3)  # [H, 2M, N, T, e]
                out[slot] = Factor((c.unsqueeze(3) * place).reshape(2 * H * M, N, H, T, e), W)
        return out


OP_RULES.register("aten.scaled_dot_product_attention.default", Attention())
OP_RULES.register("aten._softmax.default", LinearOp(
    _with(lambda m: "normalises over the batch dimension" if _norm(m.args[1], _first_live_ndim(m)) == 0 else None),
    nonlinear=True, doc="softmax over a dim other than 0 (GGN and Fishers)"))
OP_RULES.register("aten.matmul.default", LinearOp(
    _with(lambda m: None if all(len(_shape(slot_value(m.args, s))) >= 3 for s in m.live)
          else "multiplies a matrix whose rows are the samples"),
    bilinear=True, doc="batched matmul (exact Hessian: one live factor)"))


# -- elementwise functions: derivatives by forward mode (one entry each) ---------------------------

for _name, _doc in (("aten.pow.Tensor_Scalar", "x ** p"), ("aten.rsqrt.default", "1 / sqrt(x)"),
                    ("aten.sqrt.default", "sqrt(x)"), ("aten.exp.default", "exp(x)"), ("aten.log.default", "log(x)"),
                    ("aten.sin.default", "sin(x)"), ("aten.cos.default", "cos(x)"),
                    ("aten.reciprocal.default", "1 / x"), ("aten.erf.default", "erf(x)")):
    OP_RULES.register(_name, ElementwiseOp(doc=f"elementwise {_doc}"))


# -- addmm on a folded batch (Hugging Face's Conv1D: x.view(-1, d) @ W + b) ----------------------


class FoldedAddmm(OpRule):
    """``aten.addmm(bias, x, W)`` with ``x`` the rows of a folded batch (or ``[N, d]``): ``nn.Linear``'s rule.

    ``x`` is ``[N r, d]``, the view of a ``[N, ..., d]`` value; the op is a linear
    layer with weight ``W^T`` on that value, so :class:`~secorder.structured.rules.linear.LinearRule`
    runs on it, the curvature stays with the batch first, and the weight's
    diagonal is the transpose of the rule's.
    """

    doc = "x @ W + b on rows of the batch (HF Conv1D): nn.Linear's rule"

    def parameter_positions(self) -> FrozenSet[int]:
        return frozenset((0, 2))

    def bind(self, meta: Meta) -> Bound:
        if meta.live != ((1,),):
            raise Unsupported("only its second argument (the rows) may depend on the parameters as a value")
        if meta.kwargs.get("beta", 1) != 1 or meta.kwargs.get("alpha", 1) != 1:
            raise Unsupported("has alpha or beta other than 1")
        x, W = meta.args[1], meta.args[2]
        unf = meta.folded.get((1,)) or _shape(x)
        if not unf or unf[0] != meta.N or unf[-1] != W.shape[0]:
            raise Unsupported(f"on rows of shape {_shape(x)} that are not the batch's")
        bias = meta.args[0]
        if bias is not None and tuple(bias.shape) not in ((W.shape[1],),):
            raise Unsupported(f"with a bias of shape {tuple(bias.shape)}")
        with torch._C._DisableFuncTorch():
            stand_in = _meta(nn.Linear, W.shape[0], W.shape[1], bias=bias is not None)
        return _BoundAddmm(LinearRule(stand_in), meta, tuple(unf))


class _BoundAddmm(Bound):
    def __init__(self, rule: Any, meta: Meta, unf: Tuple[int, ...]):
        self.rule, self.unf = rule, unf
        self.parameter_slots = {s: q for s, q in meta.params.items() if s[0] in (0, 2)}
        self.out_unfolded = tuple(unf[:-1]) + (int(meta.args[2].shape[1]),) if (1,) in meta.folded else None

    def forward(self, args: tuple, kwargs: Dict[str, Any]) -> Tuple[Tensor, Any]:
        b, x, W = args[:3]
        xu = x.reshape(self.unf)
        tensors = {"weight": W.transpose(0, 1)} if b is None else {"weight": W.transpose(0, 1), "bias": b}
        z, state = self.rule.forward(xu, tensors)
        return z.reshape(x.shape[0], W.shape[1]), (state, args)

    def jacobians(self, state: Any) -> Dict[Slot, Jacobian]:
        return {(1,): self.rule.jacobian(state[0])}

    def _local(self, wanted: FrozenSet[str]) -> Dict[str, str]:
        return {("bias" if s[0] == 0 else "weight"): q for s, q in self.parameter_slots.items() if q in wanted}

    def parameter_diagonal(self, state: Any, curv: Curvature, wanted: FrozenSet[str]) -> Dict[str, Tensor]:
        names = self._local(wanted)
        got = self.rule.parameter_diagonal(state[0], curv, frozenset(names)) if names else {}
        return {names[k]: (v.transpose(0, 1) if k == "weight" else v) for k, v in got.items()}

    def parameter_pullbacks(self, state: Any, wanted: FrozenSet[str]) -> Dict[str, Callable[[Tensor], Any]]:
        b, x, W = state[1][:3]
        shape = tuple(self.unf[:-1]) + (W.shape[1],)
        out = {}
        for local, q in self._local(wanted).items():
            if local == "weight":
                out[q] = vjp(lambda t: torch.addmm(b, x, t).reshape(shape), W)[1]
            else:
                out[q] = vjp(lambda t: torch.addmm(t, x, W).reshape(shape), b)[1]
        return out


OP_RULES.register("aten.addmm.default", FoldedAddmm())


# -- several outputs of one input (each output node is bound on its own: see sweep._SPLITS) ----------


def _split_batch(meta: Meta) -> Optional[str]:
    dim = meta.args[2] if len(meta.args) > 2 else meta.kwargs.get("dim", 0)
    if (0,) in meta.folded:
        return "splits a value whose batch is folded into dimension 0"
    return _batch_out(meta) or ("splits the batch dimension" if _norm(dim, _first_live_ndim(meta)) == 0 else None)


for _name in ("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default"):
    OP_RULES.register(_name, LinearOp(_split_batch, doc="one output of a split along a dim other than 0"))
OP_RULES.register("aten.unbind.int", LinearOp(
    lambda m: _batch_out(m) or ("unbinds the batch dimension" if _norm(m.args[1] if len(m.args) > 1 else 0,
                                                                         _first_live_ndim(m)) == 0 else None),
    doc="one output of unbind along a dim other than 0"))

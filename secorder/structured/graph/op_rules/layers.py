"""Module-like operations (``linear``, ``conv``, pooling, eval-mode batch norm, activations,
``layer_norm``, ``embedding``): stand-in modules on the meta device and the module rules' math.
"""

from __future__ import annotations

import math

from torch import nn

from ...errors import Unsupported
from ..ops import OP_RULES, Meta, ModuleOp
from ._common import _meta


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

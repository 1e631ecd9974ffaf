"""Loss recognition and the closed-form per-sample quantities of the supported losses.

The GGN needs only the loss as a callable (its output Hessian comes from autograd).
The Monte-Carlo Fisher and the empirical Fisher need more: the loss's predictive
distribution and its per-sample gradients, which exist in closed form for the three
losses recognised here (the ones curvlinops and BackPACK support):

* cross-entropy (``nn.CrossEntropyLoss``, ``F.cross_entropy``): logits ``f`` of shape
  ``[N, C, *d]``, class-index targets ``[N, *d]`` (``ignore_index`` honoured) or
  probability targets shaped like ``f``; predictive distribution ``softmax(f)``
  over dim 1;
* mean squared error (``nn.MSELoss``, ``F.mse_loss``): ``l = |f - y|^2``, the
  negative log-likelihood of ``N(f, I/2)`` up to a constant;
* binary cross-entropy with logits (``nn.BCEWithLogitsLoss``,
  ``F.binary_cross_entropy_with_logits``): ``Bernoulli(sigmoid(f))`` entrywise;

each with ``reduction="mean"`` or ``"sum"``, as a module, the function, or a
``functools.partial`` of the function with ``reduction`` (and, for cross-entropy,
``ignore_index``).

Every supported loss is a sum of per-sample terms, ``L = (1/c) sum_n l_n(f_n)``
(:func:`reduction_factor` gives ``c``). With ``g_n = dl_n/df_n`` and ``J_n`` the
Jacobian of ``f_n`` with respect to the parameters, the conventions are those of
curvlinops 3.0.1 (``EFLinearOperator``, ``FisherMCLinearOperator``):

* empirical Fisher ``(1/c) sum_n J_n^T g_n g_n^T J_n``
  (:func:`per_sample_output_gradients`),
* Monte-Carlo Fisher ``(1/(M c)) sum_n sum_m J_n^T g_nm g_nm^T J_n`` with
  ``g_nm`` the would-be gradient for a label drawn from the model's predictive
  distribution (:func:`sample_output_gradients`); its expectation is the GGN.

A sample ``n`` is an entry of the leading (batch) dimension; for outputs of two
dimensions this is curvlinops' convention, which for more dimensions flattens the
extra ones into the batch (so the empirical Fisher of such outputs differs).

Example:
    >>> import torch
    >>> spec = loss_spec(torch.nn.MSELoss())
    >>> out, y = torch.tensor([[1., 2.], [0., 0.]]), torch.zeros(2, 2)
    >>> spec, reduction_factor(spec, out, y)
    (LossSpec(kind='mse', reduction='mean', ignore_index=-100), tensor(4.))
    >>> per_sample_output_gradients(spec, out, y)
    tensor([[2., 4.],
            [0., 0.]])
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sample_keys import SampleKeys

__all__ = [
    "LossSpec",
    "UnsupportedLoss",
    "SUPPORTED_LOSSES",
    "loss_spec",
    "reduction_factor",
    "per_sample_output_gradients",
    "sample_output_gradients",
]

SUPPORTED_LOSSES = (
    "cross-entropy (nn.CrossEntropyLoss, F.cross_entropy), mean squared error (nn.MSELoss, F.mse_loss) "
    "and binary cross-entropy with logits (nn.BCEWithLogitsLoss, F.binary_cross_entropy_with_logits), "
    "with reduction 'mean' or 'sum'"
)


class UnsupportedLoss(ValueError):
    """The loss, or its targets, is not one whose closed forms are known here.

    The structured engine turns it into its own ``Unsupported`` (and falls back);
    the Fisher operators let it through, because they have no other way.

    Example:
        >>> loss_spec(lambda out, y: (out - y).abs().sum())
        Traceback (most recent call last):
        ...
        secorder.losses.UnsupportedLoss: loss <lambda> is not recognised; supported are cross-entropy (nn.CrossEntropyLoss, F.cross_entropy), mean squared error (nn.MSELoss, F.mse_loss) and binary cross-entropy with logits (nn.BCEWithLogitsLoss, F.binary_cross_entropy_with_logits), with reduction 'mean' or 'sum'
    """


@dataclass(frozen=True)
class LossSpec:
    """Which loss (``"ce"``, ``"mse"`` or ``"bce"``), its reduction and (cross-entropy) the ignored class."""

    kind: str
    reduction: str
    ignore_index: int = -100


_FUNCTIONS = ((F.cross_entropy, "ce"), (F.mse_loss, "mse"), (F.binary_cross_entropy_with_logits, "bce"))
_ALLOWED_KEYWORDS = {"ce": {"reduction", "ignore_index"}, "mse": {"reduction"}, "bce": {"reduction"}}


def _function_kind(fn: Any) -> Optional[str]:
    # Identity, not ``in``/``==``: a loss callable need not be hashable or comparable
    # (a dataclass instance with eq=True has __hash__ = None).
    for known, kind in _FUNCTIONS:
        if fn is known:
            return kind
    return None


def _name(loss_fn: Any) -> str:
    return getattr(loss_fn, "__name__", None) or type(loss_fn).__name__


def _module_spec(loss_fn: nn.Module) -> LossSpec:
    overridden = [a for a in ("forward", "__call__") if a in vars(loss_fn)]
    if overridden:
        raise UnsupportedLoss(f"loss {type(loss_fn).__name__} has an instance-level {overridden[0]}")
    if loss_fn._forward_hooks or loss_fn._forward_pre_hooks:
        raise UnsupportedLoss(f"loss {type(loss_fn).__name__} has forward hooks")
    t = type(loss_fn)
    if t is nn.CrossEntropyLoss:
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0.0:
            raise UnsupportedLoss("CrossEntropyLoss with class weights or label smoothing is not supported")
        return LossSpec("ce", loss_fn.reduction, loss_fn.ignore_index)
    if t is nn.MSELoss:
        return LossSpec("mse", loss_fn.reduction)
    if t is nn.BCEWithLogitsLoss:
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise UnsupportedLoss("BCEWithLogitsLoss with weight or pos_weight is not supported")
        return LossSpec("bce", loss_fn.reduction)
    raise UnsupportedLoss(f"loss {t.__name__} is not recognised; supported are {SUPPORTED_LOSSES}")


def loss_spec(loss_fn: Callable[..., Any]) -> LossSpec:
    """Recognise ``loss_fn`` or raise :class:`UnsupportedLoss` (never anything else).

    Args:
        loss_fn: the loss callable ``loss_fn(outputs, targets)``, any object.

    Returns:
        The :class:`LossSpec` of a supported loss.

    Example:
        >>> import functools, torch
        >>> loss_spec(torch.nn.CrossEntropyLoss(reduction="sum"))
        LossSpec(kind='ce', reduction='sum', ignore_index=-100)
        >>> loss_spec(functools.partial(torch.nn.functional.mse_loss, reduction="sum"))
        LossSpec(kind='mse', reduction='sum', ignore_index=-100)
    """
    if isinstance(loss_fn, nn.Module):
        spec = _module_spec(loss_fn)
    elif isinstance(loss_fn, functools.partial) and _function_kind(loss_fn.func) is not None:
        kind = _function_kind(loss_fn.func)
        if loss_fn.args or not set(loss_fn.keywords) <= _ALLOWED_KEYWORDS[kind]:
            raise UnsupportedLoss(
                f"loss {loss_fn!r}: only the keywords {sorted(_ALLOWED_KEYWORDS[kind])} are supported"
            )
        spec = LossSpec(kind, loss_fn.keywords.get("reduction", "mean"), loss_fn.keywords.get("ignore_index", -100))
    elif _function_kind(loss_fn) is not None:
        spec = LossSpec(_function_kind(loss_fn), "mean")
    else:
        raise UnsupportedLoss(f"loss {_name(loss_fn)} is not recognised; supported are {SUPPORTED_LOSSES}")
    if spec.reduction not in ("mean", "sum"):
        raise UnsupportedLoss(f"loss reduction {spec.reduction!r} is not supported (use 'mean' or 'sum')")
    return spec


def _check(spec: LossSpec, out: Tensor, target: Any) -> None:
    if not isinstance(target, Tensor):
        raise UnsupportedLoss(f"targets must be a tensor, got {type(target).__name__}")
    if out.dim() == 0:
        raise UnsupportedLoss("the model output has no batch dimension (shape ())")
    if spec.kind == "ce":
        if out.dim() < 2:
            raise UnsupportedLoss(f"cross-entropy needs logits of shape [N, C, ...], got shape {tuple(out.shape)}")
        if _class_targets(target):
            expected = (out.shape[0],) + tuple(out.shape[2:])
            if tuple(target.shape) != expected:
                raise UnsupportedLoss(
                    f"class-index targets of shape {tuple(target.shape)} for logits of shape "
                    f"{tuple(out.shape)}; expected {expected}"
                )
        elif not (target.is_floating_point() and target.shape == out.shape):
            raise UnsupportedLoss(
                f"cross-entropy targets of shape {tuple(target.shape)} and dtype {target.dtype}: expected int64 "
                f"class indices or probabilities shaped like the logits {tuple(out.shape)}"
            )
        return
    if target.shape != out.shape:
        raise UnsupportedLoss(
            f"targets of shape {tuple(target.shape)} do not match the output shape {tuple(out.shape)}"
        )
    if spec.kind == "bce" and not target.is_floating_point():
        raise UnsupportedLoss(f"binary cross-entropy needs floating-point targets, got dtype {target.dtype}")


def _class_targets(target: Tensor) -> bool:
    return target.dtype in (torch.long, torch.uint8)


def _class_last(x: Tensor) -> Tensor:
    """``[N, C, *d] -> [N, *d, C]`` (cross-entropy's class dim moved last)."""
    return x.movedim(1, -1)


def reduction_factor(spec: LossSpec, out: Tensor, target: Tensor) -> Tensor:
    """``c`` such that the loss is ``(1/c) sum_n l_n``, as a 0-dim tensor of ``out``'s dtype.

    ``1`` for ``reduction="sum"``; for ``"mean"``, the number of non-ignored
    class-index targets (cross-entropy), the number of target positions
    (cross-entropy with probability targets) or ``out.numel()`` (MSE, BCE). A mean
    over no terms gives ``c = 1``, so that the (empty) sums it divides stay 0.

    Args:
        spec: the recognised loss.
        out: the model output ``f``, ``[N, *feat]``.
        target: the targets, as the loss takes them.

    Returns:
        ``c``, on ``out``'s device (no host sync).

    Example:
        >>> import torch
        >>> spec = LossSpec("ce", "mean")
        >>> reduction_factor(spec, torch.zeros(3, 4), torch.tensor([0, -100, 2]))
        tensor(2.)
    """
    _check(spec, out, target)
    if spec.reduction == "sum":
        return torch.ones((), dtype=out.dtype, device=out.device)
    if spec.kind == "ce" and _class_targets(target):
        count = (target != spec.ignore_index).sum()
    elif spec.kind == "ce":
        count = torch.tensor(out.numel() // max(out.shape[1], 1), device=out.device)
    else:
        count = torch.tensor(out.numel(), device=out.device)
    return count.to(out.dtype).clamp_min(1)


def _ce_keep(spec: LossSpec, out: Tensor, target: Tensor) -> Optional[Tensor]:
    """``[N, *d]`` float mask of the non-ignored class-index targets (``None`` for probabilities)."""
    if not _class_targets(target):
        return None
    return (target != spec.ignore_index).to(out.dtype)


def per_sample_output_gradients(spec: LossSpec, out: Tensor, target: Tensor) -> Tensor:
    """The unreduced per-sample output gradients ``g_n = dl_n/df_n``, shaped like ``out``.

    Cross-entropy ``softmax(f) - onehot(y)`` (zero for ignored targets; for
    probability targets ``softmax(f) sum_c y_c - y``), MSE ``2 (f - y)``, BCE
    ``sigmoid(f) - y``. They equal ``c`` times the gradient of the reduced loss with
    respect to ``out``.

    Args:
        spec: the recognised loss.
        out: the model output ``f``, ``[N, *feat]``.
        target: the targets.

    Returns:
        ``g``, shaped and typed like ``out``.

    Example:
        >>> import torch
        >>> spec = LossSpec("ce", "sum")
        >>> per_sample_output_gradients(spec, torch.zeros(2, 2), torch.tensor([1, -100]))
        tensor([[ 0.5000, -0.5000],
                [ 0.0000,  0.0000]])
    """
    _check(spec, out, target)
    if spec.kind == "mse":
        return 2 * (out - target.to(out.dtype))
    if spec.kind == "bce":
        return torch.sigmoid(out) - target.to(out.dtype)
    p = torch.softmax(out, dim=1)
    keep = _ce_keep(spec, out, target)
    if keep is None:
        y = target.to(out.dtype)
        return p * y.sum(dim=1, keepdim=True) - y
    C = out.shape[1]
    onehot = F.one_hot(torch.where(keep > 0, target, 0).long(), C).to(out.dtype).movedim(-1, 1)
    return torch.where(keep.unsqueeze(1) > 0, p - onehot, torch.zeros_like(p))


def sample_output_gradients(
    spec: LossSpec,
    out: Tensor,
    target: Tensor,
    mc_samples: int = 1,
    generator: Union[torch.Generator, SampleKeys, None] = None,
) -> Tensor:
    """Would-be output gradients for labels drawn from the model's predictive distribution.

    ``mc_samples`` draws per sample: cross-entropy ``softmax(f) - onehot(y~)`` with
    ``y~ ~ Categorical(softmax(f))`` (zero for ignored targets), MSE ``2 e`` with
    ``e ~ N(0, I/2)``, BCE ``sigmoid(f) - b`` with ``b ~ Bernoulli(sigmoid(f))``.
    ``E[g g^T]`` is the per-sample Hessian of ``l_n``, so
    ``(1/(M c)) sum_nm J_n^T g_nm g_nm^T J_n`` is an unbiased estimate of the GGN.
    The draws are made as curvlinops 3.0.1 makes them (``multinomial`` of the
    probabilities, ``normal``, ``bernoulli``), so the same generator state gives the
    same labels. The targets only matter through ``ignore_index`` (cross-entropy).

    Args:
        spec: the recognised loss.
        out: the model output ``f``, ``[N, *feat]``. The labels are drawn from
            ``out.detach()`` and then held fixed: gradients flow through ``out`` as
            for a loss with those labels (``2 (f - y~)``, ``softmax(f) - onehot(y~)``,
            ``sigmoid(f) - b``).
        target: the targets.
        mc_samples: ``M``, draws per sample (an int >= 1).
        generator: the source of randomness (``None``: the global RNG), or
            :class:`secorder.sample_keys.SampleKeys`: each sample's draws from its own
            keyed stream (by inverse transform, Box-Muller and comparison; the
            data-set Fisher's labels, which then do not depend on batching or order).

    Returns:
        ``[M, *out.shape]``, typed like ``out``.

    Example:
        >>> import torch
        >>> g = sample_output_gradients(LossSpec("ce", "mean"), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long),
        ...                             mc_samples=2, generator=torch.Generator().manual_seed(0))
        >>> g.shape, bool((g.sum(dim=-1).abs() < 1e-6).all())   # p - onehot sums to 0
        (torch.Size([2, 4, 3]), True)
    """
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int):
        raise TypeError(f"mc_samples must be an int, got {type(mc_samples).__name__}")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be at least 1, got {mc_samples}")
    _check(spec, out, target)
    if isinstance(generator, SampleKeys):
        return _keyed_output_gradients(spec, out, target, mc_samples, generator)
    f = out.detach()
    M = mc_samples
    if spec.kind == "mse":
        mean = torch.zeros((M,) + tuple(f.shape), dtype=f.dtype, device=f.device)
        std = torch.as_tensor(math.sqrt(0.5), device=f.device)
        # 2 (f - y~) with y~ = f - e held fixed: the value is 2 e, the derivative that of 2 f.
        return 2 * torch.normal(mean, std, generator=generator) + 2 * (out - f)
    if spec.kind == "bce":
        p = torch.sigmoid(f)
        draws = p.unsqueeze(0).expand((M,) + tuple(p.shape)).bernoulli(generator=generator)
        return torch.sigmoid(out).unsqueeze(0) - draws
    C = f.shape[1]
    p = _class_last(torch.softmax(f, dim=1))  # [N, *d, C]
    rows = p.reshape(-1, C)
    labels = rows.multinomial(num_samples=M, replacement=True, generator=generator).T  # [M, rows]
    onehot = F.one_hot(labels, num_classes=C).to(f.dtype).reshape((M,) + tuple(p.shape)).movedim(-1, 2)
    g = torch.softmax(out, dim=1).unsqueeze(0) - onehot  # [M, N, C, *d]
    keep = _ce_keep(spec, f, target)
    return g if keep is None else torch.where(keep.unsqueeze(1) > 0, g, torch.zeros_like(g))


def _keyed_output_gradients(spec: LossSpec, out: Tensor, target: Tensor, M: int, keys: SampleKeys) -> Tensor:
    """:func:`sample_output_gradients` with each sample's draws from its keyed stream (same distributions)."""
    f = out.detach()
    n = f.shape[0]
    per_row = f[0].numel() if n else 0
    if spec.kind == "mse":
        e = keys.normals(n, per_row, M, f.dtype).reshape((M,) + tuple(f.shape)) * math.sqrt(0.5)
        return 2 * e + 2 * (out - f)
    if spec.kind == "bce":
        p = torch.sigmoid(f)
        draws = (keys.uniforms(n, per_row, M, f.dtype).reshape((M,) + tuple(f.shape)) < p).to(f.dtype)
        return torch.sigmoid(out).unsqueeze(0) - draws
    C = f.shape[1]
    p = _class_last(torch.softmax(f, dim=1))  # [N, *d, C]
    positions = per_row // C if C else 0
    u = keys.uniforms(n, positions, M, f.dtype).reshape(M, -1)  # [M, rows]
    cdf = p.reshape(-1, C).cumsum(-1)  # [rows, C]
    labels = (cdf.unsqueeze(0) <= u.unsqueeze(-1)).sum(-1).clamp_max(C - 1)  # inverse transform
    onehot = F.one_hot(labels, num_classes=C).to(f.dtype).reshape((M,) + tuple(p.shape)).movedim(-1, 2)
    g = torch.softmax(out, dim=1).unsqueeze(0) - onehot
    keep = _ce_keep(spec, f, target)
    return g if keep is None else torch.where(keep.unsqueeze(1) > 0, g, torch.zeros_like(g))

"""Closed-form factorisations of a loss's Hessian with respect to the network output.

For each supported loss (recognised by :func:`secorder.losses.loss_spec`),
:func:`output_curvature` returns the per-sample Hessian of the (reduced) loss
with respect to the model output ``f`` of shape ``[N, *feat]``, together with
the gradient ``dL/df`` (needed by the activations' residual terms), as an
:class:`OutputCurvature`:

* Softmax cross-entropy, logits ``f_n`` of ``C`` classes, ``p = softmax(f_n)``
  (logits ``[N, C, *d]``, say ``[N, vocab, tokens]``: per position, as
  :class:`~secorder.structured.tokens.Tokenwise` terms):
  ``H_n = diag(p) - p p^T = A A^T`` with ``A = diag(sqrt p) - p sqrt(p)^T``
  (``C`` factor columns; Dangel, Harmeling, Hennig 2020, Sec. 3 and App. A.2;
  Dangel, Kunstner, Hennig 2020, App. A.2). For probability targets ``y`` the
  Hessian is ``(sum_c y_c) (diag(p) - p p^T)``. ``reduction="mean"`` divides
  by the number of non-ignored samples. The columns are built on demand, a
  chunk at a time (:meth:`OutputCurvature.factor`), so that the memory of a
  sweep is bounded for any ``C``.
* Mean squared error: ``H_n = 2 c I`` with ``c = 1/numel(f)`` for ``"mean"``
  and ``c = 1`` for ``"sum"`` (a diagonal term, no columns).
* Sigmoid binary cross-entropy with logits: ``H_n = c diag(s (1 - s))`` with
  ``s = sigmoid(f_n)`` (diagonal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch
from torch import Tensor

from ..losses import LossSpec, UnsupportedLoss, per_sample_output_gradients, reduction_factor
from ..losses import sample_output_gradients
from ..losses import loss_spec as _recognise
from .curvature import Curvature, Diagonal, Factor, SampledFactor, SoftmaxFactor, Term
from .errors import Unsupported

__all__ = ["LossSpec", "loss_spec", "OutputCurvature", "output_curvature", "sampled_curvature"]


def loss_spec(loss_fn: Callable[..., Any]) -> LossSpec:
    """Recognise ``loss_fn`` (see :func:`secorder.losses.loss_spec`) or raise :class:`Unsupported`.

    Example:
        >>> import torch
        >>> loss_spec(torch.nn.CrossEntropyLoss(reduction="sum"))
        LossSpec(kind='ce', reduction='sum', ignore_index=-100)
    """
    try:
        return _recognise(loss_fn)
    except UnsupportedLoss as err:
        raise Unsupported(str(err)) from None


@dataclass
class OutputCurvature:
    """The loss Hessian with respect to the model output, per sample, and the gradient ``dL/dout``.

    ``terms`` are kept whole (diagonals); the ``columns`` factor columns come
    from :meth:`factor` a range at a time.
    """

    grad: Optional[Tensor]  # None where no residual needs it (the Fisher kinds)
    terms: List[Term] = field(default_factory=list)
    columns: int = 0
    make_factor: Optional[Callable[[int, int], Term]] = None
    positions: int = 1  # per-position factor columns: each is this many per-sample columns once explicit
    implicit: bool = False  # the factor is never formed at the output (chunks are sized by the layers before it)

    def factor(self, start: int, stop: int) -> Term:
        """Factor columns ``start:stop``."""
        return self.make_factor(start, stop)

    def whole(self) -> Curvature:
        """Every term, all columns at once."""
        return Curvature(list(self.terms) + ([self.factor(0, self.columns)] if self.columns else []))


def _recognised(fn, *args):
    try:
        return fn(*args)
    except UnsupportedLoss as err:
        raise Unsupported(str(err)) from None


def output_curvature(spec: LossSpec, out: Tensor, target: Tensor) -> OutputCurvature:
    """The per-sample Hessian of the loss w.r.t. ``out`` (factored) and the gradient ``dL/dout``.

    The reduction follows :func:`secorder.losses.reduction_factor`: a mean
    over no terms (an empty batch, every cross-entropy target ignored) gives
    zero curvature and gradient, as ``torch.func.grad``/``hessian`` of the loss do
    (the loss's value itself is NaN then).

    Example:
        >>> import torch
        >>> oc = output_curvature(LossSpec("mse", "sum"), torch.zeros(2, 3), torch.ones(2, 3))
        >>> oc.whole().diagonal(), oc.grad
        (tensor([[2., 2., 2.],
                [2., 2., 2.]]), tensor([[-2., -2., -2.],
                [-2., -2., -2.]]))
    """
    if not isinstance(target, Tensor):
        raise Unsupported(f"targets must be a tensor, got {type(target).__name__}")
    if out.dim() == 0:
        raise Unsupported("the model output has no batch dimension")
    if spec.kind == "ce" and out.dim() > 2:
        return _per_position(spec, out, target)
    if spec.kind == "ce" and out.dim() != 2:
        raise Unsupported(f"cross-entropy on outputs of shape {tuple(out.shape)}: only [N, C, *d] logits are supported")
    c = _recognised(reduction_factor, spec, out, target)  # 0-dim, >= 1
    if spec.kind == "ce":
        return _cross_entropy(spec, out, target, c)
    grad = _recognised(per_sample_output_gradients, spec, out, target) / c
    if spec.kind == "mse":
        return OutputCurvature(grad, [Diagonal((2.0 / c).expand(out.shape))])
    if spec.kind == "bce":
        s = torch.sigmoid(out)
        return OutputCurvature(grad, [Diagonal(s * (1 - s) / c)])


def sampled_curvature(spec: LossSpec, out: Tensor, target: Tensor, kind: str, mc_samples: int = 1,
                      generator: Optional[torch.Generator] = None) -> OutputCurvature:
    """The Fisher kinds' output curvature: ``(1/(K c)) sum_k g_nk g_nk^T`` per sample, as factor columns.

    ``kind="fisher"``: ``g_nk`` for ``K = mc_samples`` labels drawn from the
    model's predictive distribution by
    :func:`secorder.losses.sample_output_gradients` (the function, and so the
    generator calls, of the generic Monte-Carlo Fisher operator: the same
    generator state gives the same matrix on both paths).
    ``kind="empirical_fisher"``: ``K = 1``, ``g_n`` the per-sample gradient
    (:func:`secorder.losses.per_sample_output_gradients`). ``c`` is
    :func:`secorder.losses.reduction_factor`. No gradient rides along: these
    curvatures have no residual terms.

    Example:
        >>> import torch
        >>> oc = sampled_curvature(LossSpec("mse", "sum"), torch.zeros(2, 1), torch.ones(2, 1), "empirical_fisher")
        >>> oc.whole().diagonal()
        tensor([[4.],
                [4.]])
    """
    if not isinstance(target, Tensor):
        raise Unsupported(f"targets must be a tensor, got {type(target).__name__}")
    if out.dim() == 0:
        raise Unsupported("the model output has no batch dimension")
    c = _recognised(reduction_factor, spec, out, target)
    if kind == "empirical_fisher":
        G = _recognised(per_sample_output_gradients, spec, out, target).unsqueeze(0)
        scale = c.rsqrt()
    else:
        G = _recognised(sample_output_gradients, spec, out, target, mc_samples, generator)
        scale = (c * mc_samples).rsqrt()
    kind_of = Factor if kind == "empirical_fisher" else SampledFactor  # sampled: zero-mean columns
    return OutputCurvature(None, [], G.shape[0], lambda start, stop: kind_of(G[start:stop] * scale))


def _per_position(spec: LossSpec, out: Tensor, target: Tensor) -> OutputCurvature:
    """Cross-entropy on ``[N, C, *d]`` logits (``[N, vocab, tokens]``): one ``[N, C]`` problem over the positions.

    Each position is a sample of the ``[N * P, C]`` rows (classes last), the
    reduction is over all of them (as ``nn.CrossEntropyLoss`` does), and the terms
    are :class:`~secorder.structured.tokens.Tokenwise` at the logits: ``C`` columns
    per position instead of ``C * P`` per sample.
    """
    from .tokens import Tokenwise, from_rows, to_rows  # tokens imports the curvature kinds

    pos = tuple(range(2, out.dim()))
    shape = tuple(out.shape)
    if target.is_floating_point():
        if tuple(target.shape) != shape:
            raise Unsupported(f"probability targets of shape {tuple(target.shape)} for logits of shape {shape}")
        rows_target = to_rows(target, 0, shape, pos)
    else:
        if tuple(target.shape) != shape[:1] + shape[2:]:
            raise Unsupported(f"class-index targets of shape {tuple(target.shape)} for logits of shape {shape} "
                              f"(expected {shape[:1] + shape[2:]})")
        rows_target = target.reshape(-1)
    oc = output_curvature(spec, to_rows(out, 0, shape, pos), rows_target)
    inner = oc.make_factor
    return OutputCurvature(from_rows(oc.grad, 0, shape, pos), [Tokenwise(t, shape, pos) for t in oc.terms],
                           oc.columns, lambda start, stop: Tokenwise(inner(start, stop), shape, pos),
                           math.prod(shape[2:]), oc.implicit)


def _cross_entropy(spec: LossSpec, out: Tensor, target: Tensor, c: Tensor) -> OutputCurvature:
    N, C = out.shape
    logp = torch.log_softmax(out, dim=1)
    p = logp.exp()
    root = (0.5 * logp).exp()  # sqrt(p), with a derivative that stays finite where p underflows
    signed = target.is_floating_point()
    if signed:
        # Probability targets: H_n = (sum_c y_c) (diag(p) - p p^T), a weight of any sign.
        y = target.to(out.dtype)
        weight = y.sum(1) / c
        grad = (p * y.sum(1, keepdim=True) - y) / c
        scale = root
    else:
        # Class indices: sample weights 0 (ignored) or 1/c (constants), folded into the columns.
        # (The one-hot by comparison: F.one_hot checks the class range with a host sync.)
        keep = target != spec.ignore_index
        weight = keep.to(out.dtype) / c
        onehot = target.unsqueeze(1) == torch.arange(C, device=target.device)
        grad = (p - onehot.to(out.dtype)) * weight.unsqueeze(1)
        scale = root * weight.sqrt().unsqueeze(1)
    scale = scale.transpose(0, 1)  # [C, N]

    def factor(start: int, stop: int) -> SoftmaxFactor:
        w = weight.unsqueeze(0).expand(stop - start, N) if signed else None
        return SoftmaxFactor(scale[start:stop], p, start, w)

    return OutputCurvature(grad, [], C, factor, implicit=True)

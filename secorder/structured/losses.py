"""Closed-form factorisations of a loss's Hessian with respect to the network output.

For each supported loss (recognised by :func:`secorder.losses.loss_spec`),
:func:`output_curvature` returns the per-sample Hessian of the (reduced) loss
with respect to the model output ``f`` of shape ``[N, *feat]``, together with
the gradient ``dL/df`` (needed by the activations' residual terms), as an
:class:`OutputCurvature`:

* Softmax cross-entropy, logits ``f_n`` of ``C`` classes, ``p = softmax(f_n)``:
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

from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional

import torch
from torch import Tensor

from ..losses import LossSpec, UnsupportedLoss
from ..losses import loss_spec as _recognise
from .curvature import Curvature, Diagonal, Factor, Term
from .errors import Unsupported

__all__ = ["LossSpec", "loss_spec", "OutputCurvature", "output_curvature"]


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

    grad: Tensor
    terms: List[Term] = field(default_factory=list)
    columns: int = 0
    make_factor: Optional[Callable[[int, int], Factor]] = None

    def factor(self, start: int, stop: int) -> Factor:
        """Factor columns ``start:stop``."""
        return self.make_factor(start, stop)

    def whole(self) -> Curvature:
        """Every term, all columns at once."""
        return Curvature(list(self.terms) + ([self.factor(0, self.columns)] if self.columns else []))


def output_curvature(spec: LossSpec, out: Tensor, target: Tensor) -> OutputCurvature:
    """The per-sample Hessian of the loss w.r.t. ``out`` (factored) and the gradient ``dL/dout``.

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
    if spec.kind == "ce":
        return _cross_entropy(spec, out, target)
    if target.shape != out.shape:
        raise Unsupported(f"targets of shape {tuple(target.shape)} do not match the output shape {tuple(out.shape)}")
    scale = 1.0 / out.numel() if spec.reduction == "mean" else 1.0
    if spec.kind == "mse":
        return OutputCurvature((2.0 * scale) * (out - target.to(out.dtype)), [Diagonal(torch.full_like(out, 2.0 * scale))])
    s = torch.sigmoid(out)
    return OutputCurvature(scale * (s - target.to(out.dtype)), [Diagonal(scale * s * (1 - s))])


def _cross_entropy(spec: LossSpec, out: Tensor, target: Tensor) -> OutputCurvature:
    if out.dim() != 2:
        raise Unsupported(f"cross-entropy on outputs of shape {tuple(out.shape)}: only [N, C] logits are supported")
    N, C = out.shape
    p = torch.softmax(out, dim=1)
    if target.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        if target.shape != (N,):
            raise Unsupported(f"class-index targets of shape {tuple(target.shape)}; expected ({N},)")
        keep = target != spec.ignore_index
        weight = keep.to(out.dtype)
        denom = weight.sum() if spec.reduction == "mean" else None
        classes = torch.arange(C, device=out.device)
        onehot = (torch.where(keep, target, 0).long()[:, None] == classes).to(out.dtype)
        grad_per_sample = (p - onehot) * weight[:, None]
    elif target.is_floating_point() and target.shape == out.shape:
        weight = target.to(out.dtype).sum(1)
        denom = torch.tensor(float(N), dtype=out.dtype, device=out.device) if spec.reduction == "mean" else None
        grad_per_sample = p * weight[:, None] - target.to(out.dtype)
    else:
        raise Unsupported(f"cross-entropy targets of shape {tuple(target.shape)} and dtype {target.dtype}")
    if denom is not None:
        weight = weight / denom
        grad_per_sample = grad_per_sample / denom
    # Column c of sample n: sqrt(p_c) (e_c - p), built as [K, N, C] (contiguous, column first).
    # Class-index targets have sample weights w_n >= 0 (0, 1 or 1/N), folded in as sqrt(w_n);
    # probability targets may carry any sign, so theirs stay an explicit weight.
    signed = target.is_floating_point()
    scale = (p.sqrt() if signed else (p * weight[:, None]).sqrt()).transpose(0, 1)  # [C, N]

    def factor(start: int, stop: int) -> Factor:
        eye = torch.eye(C, dtype=out.dtype, device=out.device)[start:stop]
        B = (scale[start:stop, :, None] * (eye[:, None, :] - p[None, :, :])).contiguous()
        w = weight[None, :].expand(stop - start, N) if signed else None
        return Factor(B, w)

    return OutputCurvature(grad_per_sample, [], C, factor)

"""The loss side of K-FAC: the output vectors each ``fisher_type`` backpropagates.

K-FAC's output-gradient factor is ``G = (1/(c w)) sum_k sum_rows g_k g_k^T`` where
``g_k`` is the gradient at a layer's output when the output vector ``u_k`` of the
model is backpropagated, ``c`` the loss's reduction factor
(:func:`secorder.losses.reduction_factor`; 1 for ``reduction="sum"``) and ``w``
the number of Monte-Carlo draws (1 otherwise; 1/2 for MSE's type-2 columns, which
are the unit vectors: ``2 I = (1/w) sum_c e_c e_c^T`` without rounding a square root). The vectors ``u_k`` are per-term
("raw", as for a sum over the loss terms):

* ``"type-2"``: the ``C`` columns of a square root of the loss Hessian with respect
  to the output, per row, all rows at once (curvlinops' convention): cross-entropy
  ``sqrt(p_c) (e_c - p)`` (``diag(p) - p p^T = S S^T``), MSE ``e_c`` (with ``w = 1/2``), BCE
  ``sqrt(s_c (1 - s_c)) e_c``; ``C`` is the class dimension (dim 1) for
  cross-entropy, the last dimension otherwise (Martens and Grosse 2015, Sec. 5;
  Dangel, Kunstner, Hennig 2020, App. A.2);
* ``"mc"``: ``mc_samples`` would-be gradients for labels drawn from the model's
  predictive distribution (:func:`secorder.losses.sample_output_gradients`);
* ``"empirical"``: the per-sample gradients (:func:`secorder.losses.per_sample_output_gradients`);
* ``"forward-only"``: none (``G`` is the identity; Benzing 2022).

Ignored cross-entropy targets contribute nothing; probability targets scale the
Hessian by their sum.

Example:
    >>> import torch
    >>> from secorder.losses import LossSpec
    >>> out, y = torch.tensor([[0.3, -0.2, 1.0]]), torch.tensor([2])
    >>> factor = output_factor("type-2", LossSpec("ce", "sum"), out, y)
    >>> S = factor.columns(0, factor.count)[:, 0].T          # [C, C]
    >>> p = out.softmax(1)[0]
    >>> torch.allclose(S @ S.T, torch.diag(p) - torch.outer(p, p), atol=1e-6)
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..losses import LossSpec, per_sample_output_gradients, reduction_factor, sample_output_gradients

__all__ = ["FISHER_TYPES", "OutputFactor", "output_factor"]

FISHER_TYPES = ("type-2", "mc", "empirical", "forward-only")


@dataclass
class OutputFactor:
    """``count`` output vectors, made ``columns(start, stop)`` a chunk at a time, and the scale of ``G``.

    Fields:
        count: the number of vectors ``K``.
        make: ``make(start, stop) -> [stop - start, *out.shape]``.
        c: the reduction factor (a 0-dim tensor).
        weight: ``w`` (``mc_samples`` for ``"mc"``, 1/2 for MSE's type-2 columns, else 1).
    """

    count: int
    make: Callable[[int, int], Tensor]
    c: Tensor
    weight: float = 1

    def columns(self, start: int, stop: int) -> Tensor:
        return self.make(start, stop)


def _class_dim(spec: LossSpec, out: Tensor) -> int:
    if spec.kind == "ce":
        return 1
    return out.dim() - 1


def _onehot(cols: Tensor, C: int, dim: int, ndim: int, dtype: torch.dtype) -> Tensor:
    """``[k, 1.., C at dim, 1..]``: one-hot rows for the columns ``cols``, broadcastable to ``[k, *out.shape]``."""
    e = F.one_hot(cols, C).to(dtype)  # [k, C]
    shape = [cols.numel()] + [1] * ndim
    shape[1 + dim] = C
    return e.reshape(shape)


def _type2(spec: LossSpec, out: Tensor, targets: Any) -> OutputFactor:
    f = out.detach()
    dim = _class_dim(spec, f)
    C = f.shape[dim] if f.dim() >= 1 else 1
    ndim = f.dim()
    if spec.kind == "mse":
        def make(start: int, stop: int) -> Tensor:
            cols = torch.arange(start, stop, device=f.device)
            e = _onehot(cols, C, dim, ndim, f.dtype) if ndim else torch.ones(stop - start, dtype=f.dtype,
                                                                               device=f.device)
            return e.expand((stop - start,) + tuple(f.shape))
    elif spec.kind == "bce":
        root = (torch.sigmoid(f) * torch.sigmoid(-f)).sqrt()

        def make(start: int, stop: int) -> Tensor:
            cols = torch.arange(start, stop, device=f.device)
            e = _onehot(cols, C, dim, ndim, f.dtype) if ndim else torch.ones(stop - start, dtype=f.dtype,
                                                                               device=f.device)
            return e * root.unsqueeze(0)
    else:
        p = torch.softmax(f, dim=1)
        if targets.dtype in (torch.long, torch.uint8):
            scale = (targets != spec.ignore_index).to(f.dtype)
        else:
            scale = targets.to(f.dtype).sum(1).clamp_min(0).sqrt()

        def make(start: int, stop: int) -> Tensor:
            cols = torch.arange(start, stop, device=f.device)
            root = p.index_select(1, cols).sqrt().movedim(1, 0).unsqueeze(2)  # [k, N, 1, *d]
            e = _onehot(cols, C, 1, ndim, f.dtype)
            return root * (e - p.unsqueeze(0)) * scale.unsqueeze(0).unsqueeze(2)
    c = reduction_factor(spec, f, targets) if spec.reduction == "mean" else _one(f)
    return OutputFactor(C, make, c, 0.5 if spec.kind == "mse" else 1)


def _one(f: Tensor) -> Tensor:
    return torch.ones((), dtype=f.dtype, device=f.device)


def _fixed(G: Tensor, c: Tensor, weight: int = 1) -> OutputFactor:
    return OutputFactor(G.shape[0], lambda start, stop: G[start:stop], c, weight)


def output_factor(fisher_type: str, spec: LossSpec, out: Tensor, targets: Any, mc_samples: int = 1,
                  generator: Optional[torch.Generator] = None) -> OutputFactor:
    """The output vectors of ``fisher_type`` at the model output ``out`` (module docstring).

    Args:
        fisher_type: ``"type-2"``, ``"mc"`` or ``"empirical"``.
        spec: the recognised loss.
        out: the model output.
        targets: the targets.
        mc_samples: draws per sample (``"mc"``).
        generator: the draws' source (``"mc"``; ``None``: the global RNG).

    Returns:
        The :class:`OutputFactor`.
    """
    f = out.detach()
    unbatch = spec.kind == "ce" and f.dim() == 1 and isinstance(targets, Tensor) and targets.dim() == 0
    if unbatch:  # one unbatched sample of logits [C]
        inner = output_factor(fisher_type, spec, f[None], targets[None], mc_samples, generator)
        return OutputFactor(inner.count, lambda a, b: inner.columns(a, b)[:, 0], inner.c, inner.weight)
    if fisher_type == "type-2":
        return _type2(spec, f, targets)
    c = reduction_factor(spec, f, targets) if spec.reduction == "mean" else _one(f)
    if fisher_type == "mc":
        return _fixed(sample_output_gradients(spec, f, targets, mc_samples, generator), c, mc_samples)
    if fisher_type == "empirical":
        return _fixed(per_sample_output_gradients(spec, f, targets)[None], c)
    raise ValueError(f"fisher_type={fisher_type!r} backpropagates no output vectors")

"""How many terms a loss's mean divides by: the weight :func:`secorder.dataset_loss` gives a batch.

PyTorch's ``reduction="mean"`` does not always divide by the batch size. It divides

* cross-entropy and NLL with class-index targets by the number of targets that
  are not ``ignore_index``, and with class weights by the sum of those targets'
  weights (``label_smoothing`` changes neither); with probability targets by the
  number of samples times positions;
* elementwise losses (MSE, L1, Huber, BCE, ...) by the number of elements;
* ``KLDivLoss(reduction="batchmean")`` by the batch size, and the margin losses
  that average per sample by the number of samples.

A data-set loss equals one big batch only if each batch's mean is weighted with
exactly that count, so the count is looked up per loss type, never guessed.
:data:`TERM_COUNTS` maps a loss module type or loss function to a
:class:`TermRule` (how to read the loss's options, how to count the terms of
given targets); adding a loss is one entry. A loss module with an instance-level
``forward``/``__call__`` or forward hooks, a subclass, or a ``functools.partial``
with positional arguments is not looked up: it may compute something else.

Example:
    >>> import torch
    >>> count = term_counter(torch.nn.CrossEntropyLoss(weight=torch.tensor([1., 2., 0.5])))
    >>> count(torch.tensor([0, 1, 1, -100]))            # 1 + 2 + 2, the ignored target not at all
    Terms(count=tensor(5.), scale=tensor(5.))
    >>> term_counter(lambda out, y: (out - y).abs().mean()) is None   # unknown: not guessed
    True
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .registry import Registry

__all__ = ["Terms", "TermRule", "TERM_COUNTS", "register", "term_counter"]


class Terms(NamedTuple):
    """The terms of one batch's loss.

    Fields:
        count: how many terms (a sum of class weights for weighted cross-entropy):
            the batch's share of the data set's mean (an int or a 0-dim tensor).
        scale: what the loss's value is multiplied by to give the batch's sum of
            terms: ``count`` for a mean, 1 for a sum.
    """

    count: Any
    scale: Any


@dataclass(frozen=True)
class TermRule:
    """How one loss type counts its terms.

    Fields:
        count: ``count(options, targets) -> number`` for ``reduction="mean"``
            (``options``: the loss's keyword options, such as ``weight`` and
            ``ignore_index``).
        reductions: the reductions the rule knows, each mapped to ``"mean"``
            (the value is divided by ``count``), ``"sum"`` or ``"samples"`` (divided
            by the leading dimension of the targets: ``KLDivLoss``'s ``"batchmean"``).
    """

    count: Callable[[Dict[str, Any], Tensor], Any]
    reductions: Dict[str, str]


TERM_COUNTS: Registry = Registry("loss term count")

_MEAN_OR_SUM = {"mean": "mean", "sum": "sum"}


def register(*losses: Any, reductions: Optional[Dict[str, str]] = None,
             replace: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: make ``count(options, targets)`` the term count of each loss type or function in ``losses``.

    Example:
        >>> import torch
        >>> @register(torch.nn.L1Loss, replace=True)
        ... def elementwise(options, targets):
        ...     return targets.numel()
        >>> term_counter(torch.nn.L1Loss())(torch.zeros(3, 2))
        Terms(count=6, scale=6)
    """

    def decorate(count: Callable) -> Callable:
        rule = TermRule(count, dict(reductions or _MEAN_OR_SUM))
        for loss in losses:
            TERM_COUNTS.register(loss, rule, replace=replace)
        return count

    return decorate


def _samples(targets: Tensor) -> int:
    return targets.shape[0] if targets.dim() > 0 else 1


@register(nn.CrossEntropyLoss, F.cross_entropy, nn.NLLLoss, F.nll_loss)
def class_targets(options: Dict[str, Any], targets: Tensor) -> Any:
    """Class-index targets: the non-ignored ones, each counting its class weight; probability targets: the samples
    times positions (what PyTorch's weighted, smoothed or plain mean divides by)."""
    if targets.is_floating_point():
        return targets.numel() // targets.shape[1] if targets.dim() >= 2 else 1
    keep = targets != options.get("ignore_index", -100)
    weight = options.get("weight")
    if weight is None:
        return keep.sum()
    safe = torch.where(keep, targets, torch.zeros_like(targets)).long()
    return torch.where(keep, weight[safe], torch.zeros((), dtype=weight.dtype, device=weight.device)).sum()


@register(nn.MSELoss, F.mse_loss, nn.L1Loss, F.l1_loss, nn.SmoothL1Loss, F.smooth_l1_loss, nn.HuberLoss,
          F.huber_loss, nn.BCELoss, F.binary_cross_entropy, nn.BCEWithLogitsLoss,
          F.binary_cross_entropy_with_logits, nn.SoftMarginLoss, F.soft_margin_loss, nn.HingeEmbeddingLoss,
          F.hinge_embedding_loss, nn.PoissonNLLLoss, F.poisson_nll_loss)
def elements(options: Dict[str, Any], targets: Tensor) -> int:
    """Elementwise losses: every element is a term (element weights rescale terms, they do not count)."""
    return targets.numel()


@register(nn.KLDivLoss, F.kl_div, reductions={"mean": "mean", "sum": "sum", "batchmean": "samples"})
def kl_elements(options: Dict[str, Any], targets: Tensor) -> int:
    """KL divergence: ``"mean"`` over every element, ``"batchmean"`` over the samples."""
    return targets.numel()


@register(nn.MultiMarginLoss, F.multi_margin_loss, nn.MultiLabelSoftMarginLoss, F.multilabel_soft_margin_loss,
          nn.MultiLabelMarginLoss, F.multilabel_margin_loss)
def per_sample(options: Dict[str, Any], targets: Tensor) -> int:
    """Margin losses that reduce each sample first: the samples."""
    return _samples(targets)


def _module_options(loss: nn.Module) -> Optional[Dict[str, Any]]:
    if any(a in vars(loss) for a in ("forward", "__call__")) or loss._forward_hooks or loss._forward_pre_hooks:
        return None
    options = {k: v for k, v in vars(loss).items() if not k.startswith("_")}
    options.update(loss._buffers)  # class weights are buffers
    return options


def _function_options(fn: Callable, keywords: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    options = {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}
    if not set(keywords) <= set(options):
        return None
    options.update(keywords)
    if options.get("size_average") is not None or options.get("reduce") is not None:
        return None  # the deprecated reduction arguments
    return options


def _rule_and_options(loss: Any):
    if isinstance(loss, nn.Module):
        rule = TERM_COUNTS.lookup(type(loss))
        return (rule, _module_options(loss)) if rule is not None else (None, None)
    if isinstance(loss, functools.partial):
        if loss.args:
            return None, None
        rule = TERM_COUNTS.lookup(loss.func) if _hashable(loss.func) else None
        return (rule, _function_options(loss.func, dict(loss.keywords))) if rule is not None else (None, None)
    rule = TERM_COUNTS.lookup(loss) if _hashable(loss) else None
    return (rule, _function_options(loss, {})) if rule is not None else (None, None)


def _hashable(x: Any) -> bool:
    try:
        hash(x)
    except TypeError:
        return False
    return True


def term_counter(loss: Any) -> Optional[Callable[[Tensor], Terms]]:
    """For a loss whose mean's denominator is known, ``count(targets) -> Terms``; ``None`` for any other loss.

    Args:
        loss: the loss callable ``loss(outputs, targets)`` (a module, a function, a
            ``functools.partial`` of a function with keyword arguments).

    Returns:
        A function of a batch's targets (its ``reduction`` attribute: ``"mean"``,
        ``"sum"`` or ``"samples"``, what the loss's value is divided by), or ``None``.

    Example:
        >>> import functools, torch
        >>> count = term_counter(functools.partial(torch.nn.functional.cross_entropy, reduction="sum"))
        >>> count(torch.tensor([2, -100, 1]))       # two terms; the value is their sum already
        Terms(count=tensor(2), scale=1)
    """
    rule, options = _rule_and_options(loss)
    if rule is None or options is None:
        return None
    kind = rule.reductions.get(options.get("reduction", "mean"))
    if kind is None:
        return None

    def count(targets: Tensor) -> Terms:
        if kind == "samples":
            n = _samples(targets)
            return Terms(n, n)
        n = rule.count(options, targets)
        return Terms(n, n if kind == "mean" else 1)

    count.reduction = kind  # "mean", "sum" or "samples"
    return count

"""0.0.1's "Fisher" diagonals (legacy ``torch_secorder.approximations.fisher_diagonal``).

Both functions return, as torch-secorder 0.0.1 did, the entrywise square of
one gradient, not the diagonal of a Fisher matrix:

* :func:`empirical_fisher_diagonal`: ``g * g`` for the gradient ``g`` of the
  mini-batch loss ``loss_fn(model(inputs), targets)``. The empirical Fisher is
  the sum of per-example outer products ``sum_n g_n g_n^T``; its diagonal is
  ``so.diagonal(f, curvature="empirical_fisher")``.
* :func:`generalized_fisher_diagonal`: ``g * g`` for the gradient of the
  summed negative log-likelihood of the *observed* labels under a softmax.
  The Fisher takes labels drawn from the model's own predictive distribution:
  ``so.diagonal(f, curvature="fisher")`` (Monte Carlo) or, for the softmax
  cross-entropy, exactly ``so.diagonal(f, curvature="ggn")``.

The migration page shows these calls side by side.
"""

from __future__ import annotations

from typing import Any, Callable, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import _common
from ..errors import LegacyTypeError
from ._gradients import squared_gradient

__all__ = ["empirical_fisher_diagonal", "generalized_fisher_diagonal"]


@_common.owns_forward
def empirical_fisher_diagonal(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
) -> List[Tensor]:
    """0.0.1's empirical Fisher diagonal: the squared gradient of the mini-batch loss, per parameter.

    One forward and one backward pass over ``list(model.parameters())`` (all
    must require grad, as in 0.0.1); grad is enabled inside and the model's
    state is left as it was. Unlike 0.0.1 the result carries no graph (0.0.1
    always built the gradient's graph, at the cost of a second-order
    backward); for a differentiable squared gradient use
    :func:`torch_secorder.core.per_layer_curvature.per_layer_fisher_diagonal`
    with ``create_graph=True`` or ``torch.func.grad``.

    Args:
        model: the model.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar loss.
        inputs: the model's input.
        targets: the loss's targets.

    Returns:
        A list of tensors shaped like the parameters.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_(), model.bias.zero_()
        >>> x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0]])
        >>> empirical_fisher_diagonal(model, torch.nn.functional.mse_loss, x, y)   # g = -2 y [x, 1]
        [tensor([[ 4., 16.]]), tensor([4.])]
    """
    closure = _common.model_closure(model, loss_fn, inputs, targets)
    params = _common.check_params(list(model.parameters()), "model.parameters()")
    _common.require_grad(params)
    loss = _common.call_loss(closure, "loss_fn", params=params)
    return squared_gradient(loss, params)


def nll_of_observed_labels(outputs: Any, targets: Any, loss_type: Any, what: str) -> Tensor:
    """``-sum_n log softmax(outputs_n)[targets_n]``, the only case 0.0.1 implemented (else ``NotImplementedError``)."""
    if not isinstance(loss_type, str):
        raise LegacyTypeError(f"loss_type must be a str, got {type(loss_type).__name__}")
    if loss_type.lower() != "nll":
        raise NotImplementedError(f"Loss type '{loss_type}' not supported for {what} (only 'nll').")
    if not isinstance(outputs, Tensor) or not isinstance(targets, Tensor):
        raise LegacyTypeError("outputs and targets must be tensors (logits of shape (N, C) and labels of shape (N,))")
    if outputs.ndim != 2 or targets.ndim != 1:
        raise NotImplementedError(
            f"{what} is implemented for logits of shape (N, C) and class labels of shape (N,); got outputs of "
            f"shape {tuple(outputs.shape)} and targets of shape {tuple(targets.shape)}."
        )
    with torch.enable_grad():
        return F.nll_loss(F.log_softmax(outputs, dim=-1), targets, reduction="sum")


def generalized_fisher_diagonal(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str = "nll",
    create_graph: bool = False,
) -> List[Tensor]:
    """0.0.1's generalized Fisher diagonal: the squared gradient of the summed NLL of the observed labels.

    ``outputs`` are logits ``(N, C)`` computed by the caller from ``model``
    (with grad enabled: a graph back to the parameters is needed, and its
    absence raises instead of giving zeros), ``targets`` class labels
    ``(N,)``. The gradient is taken with respect to
    ``list(model.parameters())`` (all must require grad); parameters the
    outputs do not depend on get zeros. The graph of ``outputs`` is kept, so
    ``outputs`` can be reused.

    Args:
        model: the model that computed ``outputs``.
        outputs: logits, shape ``(N, C)``.
        targets: class labels, shape ``(N,)``.
        loss_type: ``"nll"``, the only type (``NotImplementedError`` otherwise).
        create_graph: if True the result is differentiable with respect to the
            parameters.

    Returns:
        A list of tensors shaped like the parameters.

    Raises:
        NotImplementedError: for another ``loss_type`` or other shapes, as in 0.0.1.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> generalized_fisher_diagonal(model, model(x), torch.tensor([0]))   # g = (p - e_y) x^T, p = 1/2
        [tensor([[0.2500, 1.0000],
                [0.2500, 1.0000]])]
    """
    _common.check_model(model)
    loss = nll_of_observed_labels(outputs, targets, loss_type, "Generalized Fisher Diagonal")
    params = _common.check_params(list(model.parameters()), "model.parameters()")
    _common.require_grad(params)
    _common.check_graph(loss, params, "model")
    return squared_gradient(loss, params, create_graph=create_graph, retain_graph=True)

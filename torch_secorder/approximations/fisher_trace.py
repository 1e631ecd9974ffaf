"""0.0.1's "Fisher" traces (legacy ``torch_secorder.approximations.fisher_trace``).

The sums of the diagonals of :mod:`torch_secorder.approximations.fisher_diagonal`,
``sum(g * g) = ||g||^2`` of one gradient, computed exactly (0.0.1's docs call
them Hutchinson estimates but its code summed the squares too; ``num_samples``
is checked and otherwise ignored). The traces of the empirical and the true
Fisher are ``so.trace(f, curvature="empirical_fisher")`` and
``so.trace(f, curvature="fisher")`` (see the migration page).
"""

from __future__ import annotations

import numbers
from typing import Any, Callable

from torch import Tensor, nn

from ..core import _common
from ..errors import LegacyTypeError, LegacyValueError
from ._gradients import squared_gradient, total
from .fisher_diagonal import nll_of_observed_labels

__all__ = ["empirical_fisher_trace", "generalized_fisher_trace"]


def _check_num_samples(num_samples: Any) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise LegacyTypeError(f"num_samples must be a positive int, got {type(num_samples).__name__}")
    if num_samples < 1:
        raise LegacyValueError("num_samples must be at least 1 for Hutchinson's method.")


@_common.owns_forward
def empirical_fisher_trace(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    num_samples: int = 1,
) -> Tensor:
    """0.0.1's empirical Fisher trace: ``||g||^2`` for the gradient ``g`` of the mini-batch loss.

    Args:
        model: the model (all parameters must require grad).
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar loss.
        inputs: the model's input.
        targets: the loss's targets.
        num_samples: checked (a positive int, ``ValueError`` otherwise as in
            0.0.1) and ignored: the sum is exact.

    Returns:
        A 0-dim tensor in the parameters' dtype (0.0.1: always float32) and on
        their device.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_(), model.bias.zero_()
        >>> x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0]])
        >>> empirical_fisher_trace(model, torch.nn.functional.mse_loss, x, y)   # 4 + 16 + 4
        tensor(24.)
    """
    _check_num_samples(num_samples)
    closure = _common.model_closure(model, loss_fn, inputs, targets)
    params = _common.check_params(list(model.parameters()), "model.parameters()")
    _common.require_grad(params)
    loss = _common.call_loss(closure, "loss_fn", params=params)
    return total(squared_gradient(loss, params), params)


def generalized_fisher_trace(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str = "nll",
    num_samples: int = 1,
    create_graph: bool = False,
) -> Tensor:
    """0.0.1's generalized Fisher trace: ``||g||^2`` for the gradient of the summed NLL of the observed labels.

    Same arguments and checks as
    :func:`torch_secorder.approximations.fisher_diagonal.generalized_fisher_diagonal`,
    plus ``num_samples`` (checked first, a positive int, and ignored).

    Returns:
        A 0-dim tensor in the parameters' dtype and on their device,
        differentiable with respect to them when ``create_graph`` is True.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 2, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.zero_()
        >>> x = torch.tensor([[1.0, 2.0]])
        >>> generalized_fisher_trace(model, model(x), torch.tensor([0]))      # 2 (0.25 + 1)
        tensor(2.5000)
    """
    _check_num_samples(num_samples)
    _common.check_model(model)
    loss = nll_of_observed_labels(outputs, targets, loss_type, "Generalized Fisher Trace")
    params = _common.check_params(list(model.parameters()), "model.parameters()")
    _common.require_grad(params)
    _common.check_graph(loss, params, "model")
    return total(squared_gradient(loss, params, create_graph=create_graph, retain_graph=True), params)

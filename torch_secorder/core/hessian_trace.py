"""Exact Hessian trace of a closure's loss (legacy ``torch_secorder.core.hessian_trace``).

The trace is the sum of the exact diagonal (see
:mod:`torch_secorder.core.hessian_diagonal`), accumulated chunk by chunk by
:func:`secorder.estimators.exact.exact_trace`, so the diagonal is never held
whole. For a stochastic (Hutchinson) estimate use
:func:`torch_secorder.core.hvp.hessian_trace`.
"""

from __future__ import annotations

from typing import Any, Callable, List

from torch import Tensor, nn

from ..autograd_operator import attach_zero_grad
from secorder.estimators.exact import exact_trace

from . import _common
from ._structured import structured_trace

__all__ = ["hessian_trace", "model_hessian_trace"]


def hessian_trace(
    func: Callable[[], Tensor],
    params: List[Tensor],
    num_samples: int = 1,
    create_graph: bool = False,
    strict: bool = False,
) -> Tensor:
    """The exact trace of the Hessian of ``func()`` with respect to ``params``, as a 0-dim tensor.

    Args:
        func: closure returning a scalar loss. Called exactly once (never if no
            parameter requires grad and ``strict`` is False).
        params: list of tensors to differentiate with respect to.
        num_samples: accepted for compatibility and ignored (the trace is
            exact); it must still be a positive int.
        create_graph: if True the trace is differentiable with respect to
            ``params``; if False it carries no graph.
        strict: if True a parameter that does not require grad, or that the
            loss does not use, raises PyTorch's ``RuntimeError``; if False it
            contributes zero.

    Returns:
        A 0-dim tensor in the parameters' dtype, on their device.

    Example:
        >>> import torch
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> hessian_trace(lambda: x.pow(2).sum(), [x], num_samples=1000)
        tensor(4.)
    """
    _common.check_callable(func)
    params = _common.check_params(params)
    _common.check_num_samples(num_samples)
    active = _common.check_strict(params, strict)
    if not active:
        return _common.zero_scalar(params)
    op = _common.closure_operator(func, params, active, create_graph, strict)
    trace = exact_trace(op).to(_common.zero_scalar(params).dtype)
    if create_graph:
        trace = attach_zero_grad(trace, [params[i] for i in active])
    return trace


@_common.owns_forward
def model_hessian_trace(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    num_samples: int = 1,
    create_graph: bool = False,
    strict: bool = False,
) -> Tensor:
    """The exact Hessian trace of ``loss_fn(model(inputs), targets)`` over ``list(model.parameters())``.

    Same semantics as :func:`hessian_trace` (``num_samples`` is ignored). When
    the model and loss qualify for secorder's structured engine and
    ``create_graph`` is False, the trace comes from it (one forward and one
    structured backward pass); otherwise the model's forward runs once and the
    generic closure path computes it.

    Example:
        >>> import torch
        >>> lin = torch.nn.Linear(2, 1)
        >>> x, y = torch.tensor([[1., 2.]]), torch.tensor([[0.]])
        >>> model_hessian_trace(lin, torch.nn.functional.mse_loss, x, y)   # 2 (1 + 4) + 2
        tensor(12.)
    """
    closure = _common.model_closure(model, loss_fn, inputs, targets)
    params = _common.check_params(list(model.parameters()), "model.parameters()")
    _common.check_num_samples(num_samples)
    active = _common.check_strict(params, strict)
    if active and not create_graph:
        trace = structured_trace(model, loss_fn, inputs, targets, [params[i] for i in active])
        if trace is not None:
            return trace.to(_common.zero_scalar(params).dtype)
    return hessian_trace(closure, params, num_samples=num_samples, create_graph=create_graph, strict=strict)

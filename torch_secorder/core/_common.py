"""Argument handling shared by the legacy functions: validation and the closure's Hessian operator.

No algorithm lives here: the operator comes from
:func:`torch_secorder.autograd_operator.autograd_hessian_operator` and the estimators
from :mod:`secorder.estimators`. This module only checks arguments, applies the
legacy ``strict`` rule and puts results back in ``params`` order.
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar

import torch
from torch import Tensor, nn

from secorder.composites import differentiable_ops
from secorder.operators import LeafOperator

from .._state import preserved_state
from ..autograd_operator import attach_zero_grad, autograd_hessian_operator
from ..errors import LegacyTypeError, LegacyValueError

# PyTorch's own messages, kept for callers that match on them.
NO_REQUIRES_GRAD = "One of the differentiated Tensors does not require grad"
NOT_SCALAR = "grad can be implicitly created only for scalar outputs"
NO_GRAPH = "element 0 of tensors does not require grad and does not have a grad_fn"

_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def check_params(params: Any, name: str = "params") -> List[Tensor]:
    """``params`` as a non-empty list of tensors (a bare tensor counts as a list of one)."""
    if isinstance(params, Tensor):
        return [params]
    try:
        out = list(params)
    except TypeError:
        raise LegacyTypeError(
            f"{name} must be a list of tensors, got {type(params).__name__}"
        ) from None
    if not out:
        raise LegacyValueError(
            f"{name} is empty: pass at least one tensor to differentiate with respect to "
            "(PyTorch: `inputs` argument to `grad()` cannot be empty.)"
        )
    for i, p in enumerate(out):
        if not isinstance(p, Tensor):
            raise LegacyTypeError(f"{name}[{i}] must be a tensor, got {type(p).__name__}")
    return out


def check_callable(func: Any, name: str = "func") -> None:
    if not callable(func):
        raise LegacyTypeError(f"{name} must be a callable returning a scalar loss, got {type(func).__name__}")


def check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise LegacyTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(model):
        raise LegacyTypeError("model must be callable")


def check_num_samples(num_samples: Any) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise LegacyTypeError(f"num_samples must be a positive int, got {type(num_samples).__name__}")
    if num_samples < 1:
        raise LegacyValueError(f"num_samples must be a positive int (>= 1), got {num_samples}")
    return int(num_samples)


def check_vectors(v: Any, params: Sequence[Tensor], name: str = "v") -> Tuple[List[Tensor], bool]:
    """``v`` as a list matching ``params`` leaf by leaf, and whether it was a bare tensor."""
    single = isinstance(v, Tensor)
    if single:
        vs = [v]
    elif isinstance(v, (list, tuple)):
        vs = list(v)
    else:
        raise LegacyTypeError(f"{name} must be a tensor or a list of tensors like params, got {type(v).__name__}")
    if len(vs) != len(params):
        what = "a single tensor" if single else f"{len(vs)} tensor(s)"
        raise LegacyValueError(
            f"{name} must have one tensor per parameter: got {what} for {len(params)} parameter(s)"
        )
    for i, (u, p) in enumerate(zip(vs, params)):
        if not isinstance(u, Tensor):
            raise LegacyTypeError(f"{name}[{i}] must be a tensor, got {type(u).__name__}")
        if u.shape != p.shape:
            raise LegacyValueError(
                f"{name}[{i}] has shape {tuple(u.shape)}, expected {tuple(p.shape)} like params[{i}]"
            )
    return vs, single


def call_loss(func: Callable[[], Any], name: str = "func", params: Sequence[Tensor] = ()) -> Tensor:
    """Call the closure once and check that it returned a one-element tensor (made 0-dim).

    With ``params``, also check that the loss has an autograd graph whenever one
    of them requires grad (see :func:`check_graph`). The closure runs with
    :func:`secorder.differentiable_ops` (fused attention and friends as
    composites that can be differentiated twice), in this thread only.
    """
    with differentiable_ops():
        loss = func()
    if not isinstance(loss, Tensor):
        raise LegacyTypeError(f"{name} must return a scalar tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise LegacyValueError(
            f"{name} must return a scalar tensor (one element), got a tensor of shape "
            f"{tuple(loss.shape)}; reduce it, e.g. with .sum() or .mean() (PyTorch: {NOT_SCALAR})"
        )
    check_graph(loss, params, name)
    with torch.enable_grad():  # keep the graph of a loss made under enable_grad() inside a no_grad() caller
        return loss.reshape(())


def call_output(func: Callable[[], Any], params: Sequence[Tensor], name: str = "func") -> Tensor:
    """Call ``func`` once (with :func:`secorder.differentiable_ops`); its output must be a tensor with a graph."""
    with differentiable_ops():
        out = func()
    if not isinstance(out, Tensor):
        raise LegacyTypeError(f"{name} must return a tensor, got {type(out).__name__}")
    check_graph(out, params, name)
    return out


def check_graph(loss: Tensor, params: Sequence[Tensor], name: str = "func") -> None:
    """Raise PyTorch's ``RuntimeError`` when ``loss`` has no graph but a parameter requires grad.

    A loss without a graph cannot be told apart from a loss that does not
    depend on the parameters: both would read as zero curvature. Under
    ``torch.no_grad()`` that zero is wrong, so the legacy functions raise what
    ``torch.autograd.grad`` raises, with the reason in the message, instead of
    returning zeros. (A loss that has a graph but does not reach some
    parameter is the "unused parameter" case: zeros, or an error under
    ``strict``.)
    """
    if loss.requires_grad or not any(p.requires_grad for p in params):
        return
    if torch.is_inference_mode_enabled():
        why = "it was computed under torch.inference_mode(); compute it outside inference mode"
    elif not torch.is_grad_enabled():
        why = (
            "grad mode is off (the call is inside torch.no_grad()); call it with grad enabled, "
            "e.g. inside torch.enable_grad()"
        )
    else:
        why = (
            "it does not depend on any of the parameters (computed under torch.no_grad(), "
            "detached, or a constant)"
        )
    what = "a loss" if loss.numel() == 1 else "an output"
    raise RuntimeError(f"{name}() returned {what} with no autograd graph: {why} (PyTorch: {NO_GRAPH})")


def owns_forward(fn: _Fn) -> _Fn:
    """For legacy functions that run the model's forward themselves: grad on inside, model state restored.

    Their answer must not depend on the caller's grad mode (nor on which
    engine runs: the structured engine needs no graph, the closure path
    does), and an analysis call must not change the model: train/eval flags,
    buffers (training-mode BatchNorm statistics), ``requires_grad`` and
    ``.grad`` are restored on return and after an exception
    (:func:`torch_secorder._state.preserved_state`). The model is the first
    argument (or ``model=``). Inference mode cannot be lifted for tensors
    created in it, so it raises a clear ``RuntimeError`` instead.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{fn.__name__} differentiates the model's loss, which torch.inference_mode() forbids: "
                "call it outside inference mode (torch.no_grad() is fine)"
            )
        model = args[0] if args else kwargs.get("model")
        state = preserved_state(model) if isinstance(model, nn.Module) else contextlib.nullcontext()
        with torch.enable_grad(), state:
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def require_grad(params: Sequence[Tensor]) -> None:
    """PyTorch's ``RuntimeError`` unless every parameter requires grad (functions without a ``strict`` flag)."""
    if not all(p.requires_grad for p in params):
        raise RuntimeError(NO_REQUIRES_GRAD)


def check_strict(params: Sequence[Tensor], strict: bool) -> List[int]:
    """Indices of the parameters to differentiate; under ``strict`` all of them must require grad."""
    if strict and not all(p.requires_grad for p in params):
        raise RuntimeError(NO_REQUIRES_GRAD)
    return [i for i, p in enumerate(params) if p.requires_grad]


def closure_operator(
    func: Callable[[], Any], params: Sequence[Tensor], active: Sequence[int], create_graph: bool, strict: bool
) -> LeafOperator:
    """The Hessian of ``func()`` over ``params[active]``: calls ``func`` exactly once.

    Under ``strict`` a parameter that the loss does not use raises PyTorch's own
    ``RuntimeError``; otherwise its block is zero.
    """
    leaves = [params[i] for i in active]
    loss = call_loss(func, params=leaves)
    return autograd_hessian_operator(
        loss, leaves, create_graph=create_graph, allow_unused=not strict
    )


def scatter(params: Sequence[Tensor], active: Sequence[int], values: Sequence[Tensor], create_graph: bool) -> List[Tensor]:
    """Results of the active parameters in place, zeros of the parameter's shape for the others.

    With ``create_graph`` every result of a parameter that requires grad is
    connected to it (zero derivative where the value does not depend on it).
    """
    out: List[Optional[Tensor]] = [None] * len(params)
    for i, value in zip(active, values):
        out[i] = value
    res = []
    for p, value in zip(params, out):
        if value is None:
            value = torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
        if create_graph and p.requires_grad and not value.requires_grad:
            value = attach_zero_grad(value, [p])
        res.append(value)
    return res


def zero_scalar(params: Sequence[Tensor]) -> Tensor:
    """A 0-dim zero in the promoted dtype of ``params``, on the first parameter's device."""
    dtype = params[0].dtype
    for p in params[1:]:
        dtype = torch.promote_types(dtype, p.dtype)
    return torch.zeros((), dtype=dtype, device=params[0].device)


def model_closure(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], inputs: Any, targets: Any) -> Callable[[], Tensor]:
    """``lambda: loss_fn(model(inputs), targets)``, the closure of the ``model_*`` functions."""
    check_model(model)
    check_callable(loss_fn, "loss_fn")

    def closure() -> Tensor:
        return loss_fn(model(inputs), targets)

    return closure

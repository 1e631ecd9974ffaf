"""Entry points: run the engine on a ``FunctionalLoss`` call or on a live model.

:func:`functional_call_diag` is what ``so.hessian_diag`` / ``so.trace`` /
``so.ggn_diag`` / ``so.ggn_trace`` call; :func:`model_diagonal` and
:func:`model_trace` serve the legacy ``torch_secorder`` shim.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from . import backprop, losses, walker
from .errors import Unsupported

__all__ = ["functional_call_diag", "model_diagonal", "model_trace", "check_not_transformed"]

logger = logging.getLogger("secorder.structured")

_KINDS = ("hessian", "ggn")


def _check_kind(kind: str) -> None:
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")


def check_not_transformed(tensors: Sequence[Any]) -> None:
    """Raise :class:`Unsupported` under ``torch.compile`` or for functorch-wrapped tensors.

    Inside ``vmap``/``grad``/``jvp`` the differentiated or batched tensors are
    functorch wrappers; the structured engine then defers to the generic path,
    which composes with those transforms.
    """
    if torch.compiler.is_compiling():
        raise Unsupported("called under torch.compile")
    for t in tensors:
        if isinstance(t, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(t):
            raise Unsupported("called under a torch.func transform (vmap/grad/jvp) on these arguments")


def functional_call_diag(f: Any, args: tuple, kind: str, trace: bool) -> Any:
    """Run the engine for ``f(params, inputs, targets[, buffers])`` with ``f`` a ``FunctionalLoss``.

    Returns a dict shaped like ``params`` (the diagonal) or a 0-dim tensor (the
    trace); raises :class:`Unsupported` when the call does not qualify.

    Example:
        >>> import torch, secorder as so
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1))
        >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
        >>> params = {k: torch.ones_like(v) for k, v in so.params_dict(model).items()}
        >>> functional_call_diag(f, (params, torch.ones(1, 2), torch.zeros(1, 1)), "hessian", trace=False)
        {'0.weight': tensor([[2., 2.]]), '0.bias': tensor([2.])}
    """
    _check_kind(kind)
    if len(args) not in (3, 4):
        raise Unsupported(f"expected f(params, inputs, targets[, buffers]), got {len(args)} arguments")
    params, inputs, targets = args[:3]
    buffers = args[3] if len(args) == 4 else None
    if not isinstance(params, dict) or not all(isinstance(v, Tensor) for v in params.values()):
        raise Unsupported("params must be a dict of tensors")
    if buffers is not None and not isinstance(buffers, dict):
        raise Unsupported("buffers must be a dict of tensors")
    check_not_transformed(list(params.values()) + [inputs, targets] + list((buffers or {}).values()))
    spec = losses.loss_spec(f.loss_fn)
    plan = walker.plan(f.model)
    model = f.model
    values: Dict[str, Tensor] = {n: t.detach() for n, t in model.named_parameters()}
    values.update({n: t for n, t in model.named_buffers()} if buffers is None else buffers)
    own = set(plan.parameter_names)
    for name, v in params.items():
        if name not in own:
            raise Unsupported(f"params has a name the engine does not know: {name!r}")
        if v.shape != values[name].shape:
            raise Unsupported(f"params[{name!r}] has shape {tuple(v.shape)}, the model's has {tuple(values[name].shape)}")
    values.update(params)
    out = backprop.run(plan, spec, values, inputs, targets, set(params), trace, kind=kind)
    if trace:
        return out
    return {name: out[name] if name in out else torch.zeros_like(v) for name, v in params.items()}


def _live(model: nn.Module, loss_fn: Any, inputs: Any, targets: Any, kind: str, params, trace: bool):
    _check_kind(kind)
    named = list(model.named_parameters())
    if params is None:
        chosen = [n for n, _ in named]
    else:
        by_id = {id(p): n for n, p in named}
        missing = [i for i, p in enumerate(params) if id(p) not in by_id]
        if missing:
            raise ValueError(f"params[{missing[0]}] is not a parameter of the model")
        chosen = [by_id[id(p)] for p in params]
    try:
        spec = losses.loss_spec(loss_fn)
        plan = walker.plan(model)
        values = {n: t.detach() for n, t in model.named_parameters()}
        values.update({n: t.detach() for n, t in model.named_buffers()})
        with torch.no_grad():
            out = backprop.run(plan, spec, values, inputs, targets, set(chosen), trace, kind=kind)
    except Unsupported as err:
        logger.debug("structured engine declined: %s", err)
        return None
    logger.debug("structured engine ran (%s, %s)", kind, "trace" if trace else "diagonal")
    if trace:
        return out
    dict_named = dict(named)
    return [out[n] if n in out else torch.zeros_like(dict_named[n]) for n in chosen]


def model_diagonal(
    model: nn.Module,
    loss_fn: Any,
    inputs: Any,
    targets: Any,
    *,
    kind: str = "hessian",
    params: Optional[Sequence[Tensor]] = None,
) -> Optional[List[Tensor]]:
    """Exact Hessian (``kind="hessian"``) or GGN (``kind="ggn"``) diagonal of ``loss_fn(model(inputs), targets)``.

    One tensor per parameter in ``params`` (default: ``model.parameters()``,
    trainable or not), shaped, typed and placed like it; ``None`` when the model
    or loss does not qualify for the structured engine.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(1.0), model.bias.fill_(0.0)
        >>> model_diagonal(model, torch.nn.MSELoss(reduction="sum"), torch.ones(1, 2), torch.zeros(1, 1))
        [tensor([[2., 2.]]), tensor([2.])]
        >>> model_diagonal(torch.nn.LSTM(2, 2), torch.nn.MSELoss(), torch.ones(1, 2), torch.zeros(1, 1)) is None
        True
    """
    return _live(model, loss_fn, inputs, targets, kind, params, trace=False)


def model_trace(
    model: nn.Module,
    loss_fn: Any,
    inputs: Any,
    targets: Any,
    *,
    kind: str = "hessian",
    params: Optional[Sequence[Tensor]] = None,
) -> Optional[Tensor]:
    """The sum of :func:`model_diagonal` over ``params`` (a 0-dim tensor), or ``None``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> model_trace(model, torch.nn.MSELoss(reduction="sum"), torch.ones(1, 2), torch.zeros(1, 1))
        tensor(6.)
    """
    return _live(model, loss_fn, inputs, targets, kind, params, trace=True)

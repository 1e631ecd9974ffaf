"""The engine's entry points: on a ``FunctionalLoss`` call, or on a live model.

:func:`functional_call_diag` is what the transforms call (``so.hessian_diag``,
``so.trace``, ``so.ggn_diag``, ``so.diagonal(curvature=...)``, ...);
:func:`model_diagonal` and :func:`model_trace` serve the legacy
``torch_secorder`` shim.

The engine is a pure tensor computation of the parameters, inputs and
targets, so it runs inside ``torch.func`` transforms and ``torch.compile``:

* ``vmap`` over per-example inputs (``in_dims=(None, 0, 0)`` with a batch
  dimension of one per example) computes every example's diagonal in one
  batched sweep. The result holds ``N x n`` numbers for ``n`` parameters (what
  BackPACK's ``BatchDiag*`` extensions return); the sweep's intermediates are
  those of one unbatched sweep over the ``N`` examples (about ``C`` factor
  columns per example through each layer, ``C`` the number of classes), times
  the parameter-sized per-example results of each layer.
* ``vmap`` over stacked parameters (an ensemble, ``in_dims=(0, None, None)``)
  runs one sweep per ensemble member, batched.
* ``grad``/``jacrev``/``vjp`` differentiate through the sweep (third
  derivatives for the exact Hessian's diagonal) at the cost of one reverse pass
  over it, a small multiple of one gradient.
* ``torch.compile`` traces it without a graph break.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .. import wrappers
from ..modules import FunctionalLoss
from . import backprop, graph, losses, walker
from .errors import Unsupported

__all__ = ["functional_call_diag", "model_diagonal", "model_trace", "KINDS"]

logger = logging.getLogger("secorder.structured")

KINDS = ("hessian", "ggn", "fisher", "empirical_fisher")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def _check_chunk(factor_chunk_size: Optional[int]) -> None:
    if factor_chunk_size is None:
        return
    if isinstance(factor_chunk_size, bool) or not isinstance(factor_chunk_size, int):
        raise TypeError(f"factor_chunk_size must be an int or None, got {type(factor_chunk_size).__name__}")
    if factor_chunk_size < 1:
        raise ValueError(f"factor_chunk_size must be at least 1, got {factor_chunk_size}")


def _check_loss_module(loss_fn: Any) -> None:
    if isinstance(loss_fn, nn.Module):
        walker.check_plain(loss_fn, "the loss")


def functional_call_diag(
    f: Any,
    args: tuple,
    kind: str,
    trace: bool,
    *,
    mc_samples: int = 1,
    generator: Optional[torch.Generator] = None,
    factor_chunk_size: Optional[int] = None,
    check_only: bool = False,
) -> Any:
    """Run the engine for ``f(params, inputs, targets[, buffers])`` with ``f`` a ``FunctionalLoss``.

    Args:
        f: a :class:`secorder.FunctionalLoss` whose model is an ``nn.Module``.
        args: ``(params, inputs, targets[, buffers])`` as ``f`` takes them.
        kind: the curvature, one of :data:`KINDS`: ``"hessian"`` (with the
            residual terms of nonlinear modules), ``"ggn"``, ``"fisher"``
            (``mc_samples`` sampled factor columns per sample instead of the
            ``C`` of the GGN; curvlinops' ``FisherMCLinearOperator``
            convention) or ``"empirical_fisher"`` (the per-sample gradient as
            the one factor column: for a linear layer the diagonal is one
            matmul of squares).
        trace: return the trace instead of the diagonal.
        mc_samples: Monte-Carlo labels per sample (``kind="fisher"``), an int >= 1.
        generator: the source of the Fisher's labels (``None``: the global RNG).
            They are drawn after the forward pass, by
            :func:`secorder.losses.sample_output_gradients`, exactly as the
            generic operator draws them: the same generator state gives the
            same matrix on both paths.
        factor_chunk_size: loss-factor columns pulled back at a time (a bound
            on the sweep's memory: each column is one tensor of the size of a
            layer's activations); ``None`` picks the largest chunk that keeps
            a chunk's columns at any layer under 2**24 entries.
        check_only: run the checks and the forward pass only (every place the
            engine can decline) and return ``None``: what :func:`secorder.explain`
            runs. No curvature is computed and no label is drawn.

    Returns:
        A dict shaped like ``params`` (the diagonal) or a 0-dim tensor (the
        trace); ``None`` with ``check_only``.

    Raises:
        Unsupported: the call does not qualify (the transforms then fall back).

    Example:
        >>> import torch, secorder as so
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1))
        >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
        >>> params = {k: torch.ones_like(v) for k, v in so.params_dict(model).items()}
        >>> functional_call_diag(f, (params, torch.ones(1, 2), torch.zeros(1, 1)), "hessian", trace=False)
        {'0.weight': tensor([[2., 2.]]), '0.bias': tensor([2.])}
    """
    _check_kind(kind)
    _check_chunk(factor_chunk_size)
    if not isinstance(f, FunctionalLoss) or type(f).__call__ is not FunctionalLoss.__call__:
        raise Unsupported("f is not a secorder.FunctionalLoss (or its class overrides __call__)")
    if not isinstance(f.model, nn.Module):
        raise Unsupported("the model is a function, not an nn.Module")
    if len(args) not in (3, 4):
        raise Unsupported(f"expected f(params, inputs, targets[, buffers]), got {len(args)} arguments")
    params, inputs, targets = args[:3]
    buffers = args[3] if len(args) == 4 else None
    if not isinstance(params, dict) or not all(isinstance(v, Tensor) for v in params.values()):
        raise Unsupported("params must be a dict of tensors")
    if buffers is not None and not isinstance(buffers, dict):
        raise Unsupported("buffers must be a dict of tensors")
    spec = losses.loss_spec(f.loss_fn)
    _check_loss_module(f.loss_fn)
    # DDP and FSDP2 models: the plain modules they wrap (names without DDP's 'module.' prefix)
    original = list(params)
    model, params = wrappers.plain_view(f.model, dict(params))
    back = dict(zip(params, original))
    shapes = {n: t.shape for n, t in model.named_parameters()}
    values: Dict[str, Tensor] = {n: t.detach() for n, t in model.named_parameters() if n not in params}
    values.update({n: t for n, t in model.named_buffers()} if buffers is None else buffers)
    for name, v in params.items():
        if name not in shapes:
            raise Unsupported(f"params has a name the engine does not know: {name!r}")
        if v.shape != shapes[name]:
            raise Unsupported(f"params[{name!r}] has shape {tuple(v.shape)}, the model's has {tuple(shapes[name])}")
    values.update(params)
    try:
        plan = _module_plan(model, f.output_field, inputs)
    except Unsupported as declined:
        # The module walk declines: the graph walker traces the call (secorder.structured.graph).
        try:
            out = graph.functional_call_diag(model, f.output_field, spec, values, inputs, targets, set(params),
                                             trace, kind=kind, factor_chunk_size=factor_chunk_size,
                                             loss_fn=f.loss_fn, mc_samples=mc_samples, generator=generator,
                                             check_only=check_only)
        except Unsupported as err:
            raise Unsupported(f"{declined}; the graph walker: {err}") from None
    else:
        out = backprop.run(plan, spec, values, inputs, targets, set(params), trace, kind=kind,
                           factor_chunk_size=factor_chunk_size, loss_fn=f.loss_fn, mc_samples=mc_samples,
                           generator=generator, check_only=check_only)
    if trace or check_only:
        return out
    return {back[name]: out[name] if name in out else torch.zeros_like(v) for name, v in params.items()}


def _module_plan(model: nn.Module, output_field: Any, inputs: Any) -> walker.Plan:
    """The module walker's plan, or :class:`Unsupported` when the module walk declines this call."""
    if output_field is not None:
        # The module walker follows the model's own output tensor; a selection from its return value
        # (a field of a ModelOutput, a callable) is not part of its plan.
        raise Unsupported(f"output={output_field!r} selects the loss's input from the model's return value; "
                          "the module walker takes a model that returns its output tensor (output=None)")
    plan = walker.plan(model)
    if not isinstance(inputs, Tensor):
        raise Unsupported(f"the module walker calls model(inputs) on one input tensor, got inputs of type "
                          f"{type(inputs).__name__}")
    return plan


def _live(model: nn.Module, loss_fn: Any, inputs: Any, targets: Any, kind: str, params, trace: bool,
          factor_chunk_size: Optional[int], mc_samples: int, generator: Optional[torch.Generator]):
    _check_kind(kind)
    _check_chunk(factor_chunk_size)
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
        _check_loss_module(loss_fn)
        plan = walker.plan(model)
        values = {n: t.detach() for n, t in model.named_parameters()}
        values.update({n: t.detach() for n, t in model.named_buffers()})
        with torch.no_grad():
            out = backprop.run(plan, spec, values, inputs, targets, set(chosen), trace, kind=kind,
                               factor_chunk_size=factor_chunk_size, loss_fn=loss_fn, mc_samples=mc_samples,
                               generator=generator)
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
    factor_chunk_size: Optional[int] = None,
    mc_samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Optional[List[Tensor]]:
    """The Hessian, GGN, Monte-Carlo Fisher or empirical Fisher diagonal of ``loss_fn(model(inputs), targets)``.

    Args:
        model: the model, used as it is (its parameters and buffers).
        loss_fn: the loss, called as ``loss_fn(outputs, targets)``.
        inputs: the model's input tensor.
        targets: the targets.
        kind: the curvature, one of :data:`KINDS`.
        params: the parameters to return diagonals for (default: all of
            ``model.parameters()``, trainable or not).
        factor_chunk_size: see :func:`functional_call_diag`.
        mc_samples: Monte-Carlo labels per sample (``kind="fisher"``).
        generator: the source of the Fisher's labels (``None``: the global RNG).

    Returns:
        One tensor per parameter in ``params``, shaped, typed and placed like
        it; ``None`` when the model or loss does not qualify for the
        structured engine.

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
    return _live(model, loss_fn, inputs, targets, kind, params, False, factor_chunk_size, mc_samples, generator)


def model_trace(
    model: nn.Module,
    loss_fn: Any,
    inputs: Any,
    targets: Any,
    *,
    kind: str = "hessian",
    params: Optional[Sequence[Tensor]] = None,
    factor_chunk_size: Optional[int] = None,
    mc_samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Optional[Tensor]:
    """The sum of :func:`model_diagonal` over ``params`` (a 0-dim tensor), or ``None``.

    Args:
        model: the model.
        loss_fn: the loss.
        inputs: the model's input tensor.
        targets: the targets.
        kind: the curvature, one of :data:`KINDS`.
        params: the parameters to sum over (default: all).
        factor_chunk_size: see :func:`functional_call_diag`.
        mc_samples: Monte-Carlo labels per sample (``kind="fisher"``).
        generator: the source of the Fisher's labels.

    Returns:
        The trace, or ``None`` when the model or loss does not qualify.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1)
        >>> model_trace(model, torch.nn.MSELoss(reduction="sum"), torch.ones(1, 2), torch.zeros(1, 1))
        tensor(6.)
    """
    return _live(model, loss_fn, inputs, targets, kind, params, True, factor_chunk_size, mc_samples, generator)

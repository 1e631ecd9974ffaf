"""How the transforms choose between the structured engine and the generic operator path.

``engine="auto"`` (default) runs the structured engine for an exact diagonal or
trace when ``f`` is a :class:`secorder.modules.FunctionalLoss`, the differentiated
argument is its ``params`` dict (``argnums=0``), ``has_aux=False``, no keyword
argument other than ``buffers`` is passed, the model, its layers, the loss and the
curvature are supported (also inside ``torch.func`` transforms and
``torch.compile``: the engine is pure tensor code, see
:mod:`secorder.structured.dispatch`); otherwise the generic path runs (a
curvature operator and the exact or stochastic estimator). ``engine="structured"`` raises
:class:`~secorder.structured.errors.Unsupported` (a ``ValueError``) naming the
reason instead of falling back; ``engine="generic"`` always takes the generic path.
The path taken is logged at DEBUG level on the ``secorder.structured`` logger and
kept in the transformed function's per-thread debug view, ``last_engine``
(``"structured"`` or ``"generic"``) with ``last_fallback_reason``
(:mod:`secorder.transformed`); :func:`route` gives the same answer without
computing (what :func:`secorder.explain` reports).

The engine's entry point is
``secorder.structured.functional_call_diag(f, args, kind, trace, *, mc_samples=1, generator=None)``
with ``kind`` a curvature name; it returns the diagonal (a dict shaped like
``params``) or the trace, or raises ``Unsupported``. For a data-set loss
(:func:`secorder.dataset_loss`) of a ``FunctionalLoss``, the same checks apply to
its per-batch loss and :func:`secorder.structured.dataset.functional_call_diag`
runs the engine on every batch in one pass.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

from ..dataset import is_dataset_loss
from ..modules import FunctionalLoss
from ..structured import dataset as _dataset
from ..structured import dispatch as _dispatch
from ..structured.errors import Unsupported
from ..transformed import Route
from ..transformed import record as _record

__all__ = ["ENGINES", "check_engine", "attempt", "route", "record", "logger"]

ENGINES = ("auto", "structured", "generic")

logger = logging.getLogger("secorder.structured")


def check_engine(engine: Any) -> None:
    """Validate the ``engine`` keyword when a transform is created.

    Example:
        >>> check_engine("auto")
        >>> check_engine("fast")
        Traceback (most recent call last):
        ...
        ValueError: unknown engine 'fast'; valid engines are 'auto', 'structured', 'generic'
        >>> check_engine(None)
        Traceback (most recent call last):
        ...
        TypeError: engine must be a str ('auto', 'structured' or 'generic'), got NoneType
    """
    if not isinstance(engine, str):
        raise TypeError(f"engine must be a str ('auto', 'structured' or 'generic'), got {type(engine).__name__}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid engines are {', '.join(map(repr, ENGINES))}")


def record(fn: Callable, engine: str, reason: Optional[str], what: str) -> None:
    """Keep the path taken in ``fn``'s per-thread debug view and log it.

    Not while ``torch.compile`` traces the call: Dynamo cannot trace the write
    without a graph break, which would stop ``fullgraph=True``. A compiled call
    leaves the view as the last eager call in that thread set it; the path itself is
    the same as in eager mode.
    """
    if torch.compiler.is_compiling():
        return
    _record(fn, Route(engine, reason))
    if reason is None:
        logger.debug("%s: structured engine", what)
    else:
        logger.debug("%s: generic path (%s)", what, reason)


def _call(f: Any, args: tuple, kind: str, trace: bool, mc_samples: int, generator: Optional[torch.Generator],
          check_only: bool = False):
    if kind not in _dispatch.KINDS:
        raise Unsupported(f"the structured engine does not compute curvature={kind!r}")
    if is_dataset_loss(f):  # every batch through the engine, weighted and summed (one pass)
        return _dataset.functional_call_diag(f, args, kind, trace, mc_samples=mc_samples, generator=generator,
                                             check_only=check_only)
    return _dispatch.functional_call_diag(f, args, kind, trace, mc_samples=mc_samples, generator=generator,
                                          check_only=check_only)


def _engine_args(f: Any, argnums: Any, has_aux: bool, args: tuple, kwargs: Dict[str, Any]) -> tuple:
    """The engine's ``(params, inputs, targets[, buffers])``, or ``Unsupported`` naming why the call does not qualify."""
    per_batch = f.f if is_dataset_loss(f) else f
    if not isinstance(per_batch, FunctionalLoss):
        raise Unsupported("f is not a secorder.FunctionalLoss (see so.functional_loss)")
    if not isinstance(per_batch.model, nn.Module):
        raise Unsupported("the model is a function, not an nn.Module")
    if isinstance(argnums, bool) or argnums not in (0, -len(args)):
        raise Unsupported(f"argnums={argnums!r}: the structured engine differentiates params (argnums=0) only")
    if has_aux:
        raise Unsupported("has_aux=True")
    extra = set(kwargs) - {"buffers"}
    if extra:
        raise Unsupported(f"keyword argument(s) {sorted(extra)} besides buffers")
    if kwargs:
        if len(args) != 3:
            raise Unsupported("buffers given both positionally and by keyword")
        args = tuple(args) + (kwargs["buffers"],)
    return args


def route(
    f: Any,
    argnums: Any,
    has_aux: bool,
    args: tuple,
    kwargs: Dict[str, Any],
    engine: str,
    kind: str,
    trace: bool,
    *,
    mc_samples: int = 1,
) -> Route:
    """The route :func:`attempt` takes for this call, found by the engine's checks and forward pass only.

    No curvature is computed and no random number is drawn. ``engine="structured"``
    on a call the engine declines raises, as the call would.

    Example:
        >>> import torch, secorder as so
        >>> f = so.functional_loss(torch.nn.Linear(2, 1), torch.nn.MSELoss())
        >>> p = so.params_dict(f.model)
        >>> route(f, 0, False, (p, torch.ones(3, 2), torch.ones(3, 1)), {}, "auto", "ggn", False)
        Route(engine='structured', reason=None, method=None)
        >>> route(f, 0, True, (p, torch.ones(3, 2), torch.ones(3, 1)), {}, "auto", "ggn", False)
        Route(engine='generic', reason='has_aux=True', method=None)
    """
    if engine == "generic":
        return Route("generic", "engine='generic' was requested")
    try:
        _call(f, _engine_args(f, argnums, has_aux, args, kwargs), kind, trace, mc_samples, None, check_only=True)
    except Unsupported as err:
        if engine == "structured":
            raise Unsupported(f"engine='structured' cannot run: {err}") from None
        return Route("generic", str(err))
    return Route("structured", None)


def attempt(
    fn: Callable,
    f: Any,
    argnums: Any,
    has_aux: bool,
    args: tuple,
    kwargs: Dict[str, Any],
    engine: str,
    kind: str,
    trace: bool,
    what: str,
    *,
    mc_samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> Optional[Any]:
    """The structured result, or ``None`` when the generic path must run (recorded in ``fn``'s debug view).

    Example:
        >>> import torch
        >>> attempt(None, lambda x: x.sum(), 0, False, (torch.ones(2),), {}, "auto", "hessian", False, "trace")
    """
    if engine == "generic":
        record(fn, "generic", "engine='generic' was requested", what)
        return None
    try:
        result = _call(f, _engine_args(f, argnums, has_aux, args, kwargs), kind, trace, mc_samples, generator)
    except Unsupported as err:
        if engine == "structured":
            raise Unsupported(f"engine='structured' cannot run: {err}") from None
        record(fn, "generic", str(err), what)
        return None
    record(fn, "structured", None, what)
    return result

"""How the transforms choose between the structured engine and the generic one-hot path.

``engine="auto"`` (default) runs the structured engine when ``f`` is a
:class:`secorder.modules.FunctionalLoss`, the differentiated argument is its
``params`` dict (``argnums=0``), ``has_aux=False``, every module and the loss are
supported, and no ``torch.func`` transform or ``torch.compile`` wraps the
arguments; otherwise the generic path runs. ``engine="structured"`` raises
:class:`~secorder.structured.errors.Unsupported` (a ``ValueError``) naming the
reason instead of falling back; ``engine="generic"`` always takes the generic
path. The path taken is logged at DEBUG level on the ``secorder.structured``
logger and stored on the transformed function as ``last_engine``
(``"structured"`` or ``"generic"``) with ``last_fallback_reason``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from .dispatch import functional_call_diag, logger
from .errors import Unsupported

__all__ = ["ENGINES", "check_engine", "attempt", "record"]

ENGINES = ("auto", "structured", "generic")


def check_engine(engine: Any) -> None:
    """Validate the ``engine`` keyword when a transform is created.

    Example:
        >>> check_engine("auto")
        >>> check_engine("fast")
        Traceback (most recent call last):
        ...
        ValueError: unknown engine 'fast'; valid engines are 'auto', 'structured', 'generic'
    """
    if not isinstance(engine, str):
        raise TypeError(f"engine must be a str, got {type(engine).__name__}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid engines are {', '.join(map(repr, ENGINES))}")


def record(fn: Callable, engine: str, reason: Optional[str], what: str) -> None:
    """Store the path taken on ``fn`` and log it."""
    fn.last_engine = engine
    fn.last_fallback_reason = reason
    if reason is None:
        logger.debug("%s: structured engine", what)
    else:
        logger.debug("%s: generic path (%s)", what, reason)


def attempt(fn: Callable, f: Any, argnums: Any, has_aux: bool, args: tuple, engine: str, kind: str,
            trace: bool, what: str) -> Optional[Any]:
    """The structured result, or ``None`` when the generic path must run (recorded on ``fn``).

    Example:
        >>> import torch, secorder as so
        >>> fn = lambda: None
        >>> attempt(fn, lambda x: x.sum(), 0, False, (torch.ones(2),), "auto", "hessian", False, "trace")
        >>> fn.last_engine, fn.last_fallback_reason
        ('generic', 'f is not a secorder.FunctionalLoss (see so.functional_loss)')
    """
    from ..modules import FunctionalLoss

    if engine == "generic":
        record(fn, "generic", "engine='generic' was requested", what)
        return None
    try:
        if not isinstance(f, FunctionalLoss):
            raise Unsupported("f is not a secorder.FunctionalLoss (see so.functional_loss)")
        if isinstance(argnums, bool) or argnums not in (0, -len(args)):
            raise Unsupported(f"argnums={argnums!r}: the structured engine differentiates params (argnums=0) only")
        if has_aux:
            raise Unsupported("has_aux=True")
        result = functional_call_diag(f, args, kind, trace)
    except Unsupported as err:
        if engine == "structured":
            raise Unsupported(f"engine='structured' cannot run: {err}") from None
        record(fn, "generic", str(err), what)
        return None
    record(fn, "structured", None, what)
    return result

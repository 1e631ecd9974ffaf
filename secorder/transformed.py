"""The function a transform returns: honest name, signature and docs, a per-thread debug view.

Every secorder transform (``so.hvp(f)``, ``so.trace(f)``, ``so.laplacian(f)``, ...)
returns a :class:`Transformed`. It does not pretend to be ``f``:

* nothing of ``f`` is copied onto it (no ``functools.wraps``: no ``__wrapped__``,
  none of ``f``'s attributes), so ``so.hvp(so.trace(g))`` does not inherit what
  ``so.trace(g)`` holds;
* ``__name__`` and ``__qualname__`` are ``"transform(f's name)"`` and the first line
  of ``__doc__`` says which transform of which function it is;
* :func:`inspect.signature` gives the parameters it really takes (``f``'s, plus the
  tangent ``v`` for a product), or a plain ``(*args, **kwargs)`` where that cannot be
  said exactly.

The route a call took (``last_engine``, ``last_fallback_reason``, ``last_method``) is
a debug view, kept per thread: a call in one thread never changes what another
thread reads, and the three values are written together. Calls inside
``torch.compile`` do not update it (an attribute write cannot be traced without a
graph break); the route is the same as in eager mode. To know the route without
computing, use :func:`secorder.explain`.

Example:
    >>> import inspect, torch, secorder as so
    >>> def loss(x, *, scale=1.0):
    ...     return scale * (x ** 3).sum()
    >>> h = so.hvp(loss)
    >>> h.__name__, inspect.signature(h)
    ('hvp(loss)', <Signature (x, v, /, *, scale=1.0)>)
    >>> h.__doc__.splitlines()[0]
    'hvp(loss): the secorder.hvp transform of loss.'
    >>> t = so.trace(loss)
    >>> t.last_engine is None, hasattr(so.hvp(t), "last_engine")
    (True, True)
    >>> _ = t(torch.ones(2)); t.last_engine, so.hvp(t).last_engine
    ('generic', None)
"""

from __future__ import annotations

import inspect
import threading
import types
from typing import Any, Callable, NamedTuple, Optional

__all__ = ["Transformed", "Route", "describe", "signature_of", "record", "is_transformed"]


class Route(NamedTuple):
    """The route of one call: the engine (or method) taken and why the fast one was not."""

    engine: Optional[str] = None
    reason: Optional[str] = None
    method: Optional[str] = None


_NO_ROUTE = Route()


def describe(f: Any) -> str:
    """How a function is named in a transform's name: its ``__qualname__``/``__name__``, else its type's name.

    Example:
        >>> describe(len), describe(lambda x: x), describe(3)
        ('len', '<lambda>', 'int')
    """
    name = getattr(f, "__qualname__", None) or getattr(f, "__name__", None)
    return name if isinstance(name, str) else type(f).__name__


def _plain_signature() -> inspect.Signature:
    P = inspect.Parameter
    return inspect.Signature([P("args", P.VAR_POSITIONAL), P("kwargs", P.VAR_KEYWORD)])


def signature_of(f: Any, *, tangent: Optional[str] = None, keywords: bool = True) -> inspect.Signature:
    """The signature of a transform of ``f``: ``f``'s parameters (positional ones positional-only), no return type.

    Args:
        f: the transformed function.
        tangent: the name of a trailing positional argument the transform adds (``"v"``).
        keywords: whether the transform passes keyword arguments on to ``f``.

    Returns:
        That signature, or ``(*args, **kwargs)`` where it cannot be stated exactly
        (``f`` has no signature, takes ``*args``, or a defaulted positional argument
        would come before ``tangent``).

    Example:
        >>> signature_of(lambda x, y: 0, tangent="v")
        <Signature (x, y, v, /)>
        >>> signature_of(lambda *xs: 0)
        <Signature (*args, **kwargs)>
    """
    P = inspect.Parameter
    try:
        sig = inspect.signature(f)
    except (TypeError, ValueError):
        return _plain_signature()
    positional, keyword_only, var_keyword = [], [], []
    for p in sig.parameters.values():
        if p.kind is P.VAR_POSITIONAL:
            return _plain_signature()
        if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
            # Arguments reach f positionally (the transform splits them off *args).
            positional.append(p.replace(kind=P.POSITIONAL_ONLY, annotation=P.empty))
        elif p.kind is P.KEYWORD_ONLY:
            keyword_only.append(p.replace(annotation=P.empty))
        else:
            var_keyword.append(p.replace(annotation=P.empty))
    if tangent is not None:
        if any(p.default is not P.empty for p in positional):
            return _plain_signature()
        if tangent in {p.name for p in positional + keyword_only}:
            return _plain_signature()
        positional.append(P(tangent, P.POSITIONAL_ONLY))
    if not keywords:
        if any(p.default is P.empty for p in keyword_only):
            return _plain_signature()
        keyword_only, var_keyword = [], []
    return inspect.Signature(positional + keyword_only + var_keyword)


class Transformed:
    """A function made by a secorder transform (see the module docstring).

    Args:
        impl: what a call runs, ``impl(*args, **kwargs)``.
        f: the transformed function (named in ``__name__``; not otherwise exposed).
        transform: the transform's public name (``"hvp"``).
        signature: the call's signature (:func:`signature_of`).
        explain: ``explain(args, kwargs) -> Explanation`` (:func:`secorder.explain`),
            or ``None`` where the route has no choice to explain.
    """

    def __init__(self, impl: Callable[..., Any], f: Any, transform: str, signature: inspect.Signature,
                 explain: Optional[Callable[[tuple, dict], Any]] = None):
        self._impl = impl
        self._explain = explain
        self._transform = transform
        self._debug = threading.local()
        name = f"{transform}({describe(f)})"
        self.__name__ = name
        self.__qualname__ = name
        self.__module__ = "secorder"
        self.__signature__ = signature
        self.__doc__ = (
            f"{name}: the secorder.{transform} transform of {describe(f)}.\n\n"
            f"Call it with {describe(f)}'s arguments{' and the tangent v' if 'v' in signature.parameters else ''}; "
            f"see secorder.{transform} for what it returns."
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._impl(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<secorder transform {self.__name__}>"

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        """As a class attribute it binds like a function does (``instance`` becomes the first argument)."""
        return self if instance is None else types.MethodType(self, instance)

    # -- the per-thread debug view ------------------------------------------------------------

    def _route(self) -> Route:
        return getattr(self._debug, "route", _NO_ROUTE)

    @property
    def last_engine(self) -> Optional[str]:
        """This thread's last eager call: ``"structured"`` or ``"generic"`` (``None`` before any call)."""
        return self._route().engine

    @property
    def last_fallback_reason(self) -> Optional[str]:
        """This thread's last eager call: why the fast route did not run (``None`` if it did)."""
        return self._route().reason

    @property
    def last_method(self) -> Optional[str]:
        """This thread's last eager call of ``so.laplacian``: the method that ran (``None`` elsewhere)."""
        return self._route().method


def is_transformed(fn: Any) -> bool:
    """Whether ``fn`` was returned by a secorder transform.

    Example:
        >>> import secorder as so
        >>> is_transformed(so.hvp(lambda x: x.sum())), is_transformed(len)
        (True, False)
    """
    return isinstance(fn, Transformed)


def record(fn: Any, route: Route) -> None:
    """Store ``route`` as this thread's debug view of ``fn`` (one write; nothing while compiling).

    ``fn`` that is not a :class:`Transformed` (a plain function in a test, say) is left alone.
    """
    import torch  # local: this module is imported by everything and needs torch only here

    if isinstance(fn, Transformed) and not torch.compiler.is_compiling():
        fn._debug.route = route

"""The table of composites: ``{torch callable: Composite}``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

from ..registry import Registry

__all__ = ["Composite", "register", "lookup", "covered", "COMPOSITES"]


@dataclass(frozen=True)
class Composite:
    """A differentiable stand-in for one PyTorch callable.

    Fields:
        impl: called with the arguments of the replaced callable; returns what it returns.
        applies: ``applies(*args, **kwargs) -> bool``, whether ``impl`` is used for
            this call (``None``: always); otherwise PyTorch's own callable runs.
        why: one line for the docs: what is wrong with PyTorch's rule.
    """

    impl: Callable[..., Any]
    applies: Optional[Callable[..., bool]]
    why: str


COMPOSITES: Registry = Registry("composite")


def register(*funcs: Optional[Callable], why: str, applies: Optional[Callable[..., bool]] = None,
             replace: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: make the decorated function the composite of each callable in ``funcs``.

    A callable often has aliases (``torch.nn.functional.layer_norm`` and
    ``torch.layer_norm``); list each one that user code may call. ``None`` entries
    are skipped (an alias missing from an older PyTorch).

    Args:
        funcs: the PyTorch callables to replace.
        why: what is wrong with PyTorch's rule (shown in the docs).
        applies: ``applies(*args, **kwargs) -> bool``; when given, the composite
            runs only for calls where it returns ``True``.
        replace: replace an existing composite (otherwise ``ValueError``).

    Example:
        >>> import torch
        >>> from secorder import composites
        >>> @composites.register(torch.special.expit, why="(an example)", replace=True)
        ... def expit(x):
        ...     return 1 / (1 + torch.exp(-x))
        >>> composites.lookup(torch.special.expit).impl is expit
        True
    """
    if not isinstance(why, str) or not why:
        raise TypeError("why must be a non-empty str")

    def decorate(impl: Callable) -> Callable:
        entry = Composite(impl, applies, why)
        for func in funcs:
            if func is not None:
                COMPOSITES.register(func, entry, replace=replace)
        return impl

    return decorate


def lookup(func: Callable) -> Optional[Composite]:
    """The composite registered for ``func``, or ``None``.

    Example:
        >>> import torch
        >>> lookup(torch.nn.functional.layer_norm) is not None, lookup(torch.tanh)
        (True, None)
    """
    return COMPOSITES.lookup(func)


def covered() -> List[str]:
    """The qualified names of the replaced callables, sorted (for the docs and tests).

    Example:
        >>> "torch.nn.functional.scaled_dot_product_attention" in covered()
        True
    """
    return sorted({_name(f) for f in COMPOSITES.names()})


def _name(func: Callable) -> str:
    module = getattr(func, "__module__", None) or "torch"
    if module in ("torch._C._nn", "torch._C._VariableFunctions"):
        module = "torch.nn.functional" if module == "torch._C._nn" else "torch"
    return f"{module}.{getattr(func, '__name__', repr(func))}"

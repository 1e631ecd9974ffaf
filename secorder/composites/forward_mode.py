"""Operations whose forward-mode derivatives PyTorch gets wrong: ``so.hvp`` takes reverse-over-reverse there.

``so.hvp`` is forward-over-reverse (``jvp`` of ``grad``), the fastest Hessian-vector
product, and the gradient of a penalty built on it differentiates that forward
pass in reverse mode. For the operations below the forward-mode rule, or its
reverse-mode derivative, is wrong or breaks (:mod:`benchmarks.audit_derivatives`
finds them), while reverse-over-reverse is right:

* ``scatter_reduce(..., "prod")``: the forward-mode rule is wrong (``so.hvp`` was
  off by as much as the product itself);
* ``prod`` and ``cumprod`` with zero entries, ``det``, ``slogdet``, ``logdet``,
  ``linalg.solve``, ``eigh`` / ``eigvalsh``: the reverse-mode derivative of the
  forward-mode rule is wrong or ``nan`` (the gradient of an ``so.hvp`` penalty);
* the norms (``norm``, ``linalg.vector_norm``, ``linalg.matrix_norm``,
  ``linalg.norm``, ``normalize``, ``std``, ``dist``, ``cosine_similarity``,
  ``pairwise_distance``, ``triplet_margin_loss``) and ``glu``: that derivative
  raises (an in-place update, a missing formula).

While :func:`secorder.differentiable_ops` is active and a forward-mode transform
(``torch.func.jvp``) is running, calling one of them raises
:class:`ForwardModeUnsafe`; ``so.hvp`` catches it and computes the product
reverse-over-reverse instead, so every product and every gradient of one is
right. Under a forward-mode transform of the user's own around a secorder
transform the error says to use reverse mode. Adding an operation is one
:func:`register` call.

Example:
    >>> import torch, secorder as so
    >>> idx = torch.tensor([0, 0, 1])
    >>> f = lambda x: torch.ones(2, dtype=x.dtype).scatter_reduce(0, idx, x, "prod").pow(2).sum()
    >>> x, v = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    >>> so.hvp(f)(x, v)                                   # the Hessian's first column: (8, 8, 0)
    tensor([8., 8., 0.], dtype=torch.float64)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch._C._functorch import TransformType

from ..registry import Registry

__all__ = ["ForwardModeUnsafe", "register", "lookup", "check", "UNSAFE"]


class ForwardModeUnsafe(RuntimeError):
    """``f`` calls an operation whose forward-mode derivatives are wrong, under a forward-mode transform.

    ``so.hvp`` catches it (and takes reverse-over-reverse); anywhere else it tells
    the user to use reverse mode.
    """


@dataclass(frozen=True)
class UnsafeEntry:
    """Why an operation's forward mode is unsafe, and for which calls (``applies``: ``None``, all)."""

    why: str
    applies: Optional[Callable[..., bool]] = None


UNSAFE: Registry = Registry("forward-mode-unsafe operation")


def register(*funcs: Optional[Callable], why: str, applies: Optional[Callable[..., bool]] = None,
             replace: bool = False) -> None:
    """Mark each callable in ``funcs`` (``None`` skipped) as unsafe in forward mode.

    Example:
        >>> register(torch.special.expit, why="(an example)", replace=True)
        >>> lookup(torch.special.expit).why
        '(an example)'
        >>> _ = UNSAFE._entries.pop(torch.special.expit)  # (this example removes it again)
    """
    if not isinstance(why, str) or not why:
        raise TypeError("why must be a non-empty str")
    entry = UnsafeEntry(why, applies)
    for func in funcs:
        if func is not None:
            UNSAFE.register(func, entry, replace=replace)


def lookup(func: Callable) -> Optional[UnsafeEntry]:
    """The entry of ``func``, or ``None``."""
    return UNSAFE.lookup(func)


def _forward_mode_active() -> bool:
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Jvp for i in retrieve_all_functorch_interpreters())


def check(func: Callable, args: tuple, kwargs: dict) -> None:
    """Raise :class:`ForwardModeUnsafe` if ``func`` is marked and a forward-mode transform is running."""
    entry = UNSAFE.lookup(func)
    if entry is None or not _forward_mode_active():
        return
    if entry.applies is not None and not entry.applies(*args, **kwargs):
        return
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    raise ForwardModeUnsafe(
        f"{name}: {entry.why}. so.hvp computes the product reverse-over-reverse instead; under a forward-mode "
        "transform of your own (torch.func.jvp, jacfwd) around a secorder transform, use reverse mode (vjp, jacrev)")


def _reduces_by_product(*args: Any, **kwargs: Any) -> bool:
    reduce = kwargs.get("reduce", args[4] if len(args) > 4 else None)  # (input, dim, index, src, reduce)
    return reduce == "prod"


register(torch.scatter_reduce, torch.Tensor.scatter_reduce, applies=_reduces_by_product,
         why="PyTorch's forward-mode rule of scatter_reduce with reduce='prod' is wrong")
register(torch.prod, torch.Tensor.prod, torch.cumprod, torch.Tensor.cumprod,
         why="the reverse-mode derivative of PyTorch's forward-mode rule is nan where an entry is zero")
register(torch.det, torch.Tensor.det, torch.linalg.det, torch.slogdet, torch.Tensor.slogdet, torch.linalg.slogdet,
         torch.logdet, torch.Tensor.logdet, torch.linalg.solve, torch.linalg.eigh, torch.linalg.eigvalsh,
         why="the reverse-mode derivative of PyTorch's forward-mode rule is wrong (or nan)")
register(torch.norm, torch.Tensor.norm, torch.linalg.norm, torch.linalg.vector_norm, torch.linalg.matrix_norm,
         F.normalize, torch.std, torch.Tensor.std, torch.std_mean, torch.dist, torch.Tensor.dist,
         F.cosine_similarity, F.pairwise_distance, F.triplet_margin_loss, F.glu,
         why="the reverse-mode derivative of PyTorch's forward-mode rule raises (an in-place update or a missing "
             "formula)")

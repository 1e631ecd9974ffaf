"""The propagation rules of the forward Laplacian, one per torch callable.

A rule is a function ``rule(func, args, kwargs)`` called with the arguments of
``func`` in which every traced tensor has been replaced by its
:class:`~secorder.forward_laplacian.jet.Jet` ``(value, jac, lap, trace)``. It
returns ``func``'s result with a ``Jet`` (or a traced tensor computed with other
torch operations) wherever the result depends on the input, plain values
elsewhere, and raises :class:`~secorder.forward_laplacian.jet.UncoveredOperation`
for a case it does not handle. Rules live in :mod:`secorder.forward_laplacian.rules`,
one module per family of operations; :func:`register` adds one for the aliases a
callable has (``torch.tanh`` and ``torch.Tensor.tanh`` are different objects);
replacing a registered rule takes ``replace=True``. The table is a
:class:`secorder.registry.Registry`, :data:`RULES`.

Example: a rule for ``torch.special.expit`` (the logistic function, covered
already) written with the entrywise builder, which only needs the first two
derivatives ``(phi'(x), phi''(x))`` given the input ``x`` and output ``y``:

    >>> import torch, secorder as so
    >>> from secorder.forward_laplacian import registry, rules
    >>> def d_expit(x, y):
    ...     return y * (1 - y), y * (1 - y) * (1 - 2 * y)
    >>> previous = registry.lookup(torch.special.expit)
    >>> _ = registry.register(torch.special.expit, replace=True)(rules.elementwise(d_expit))
    >>> x = torch.tensor([0.5, -1.0], dtype=torch.float64)
    >>> lap = so.laplacian(lambda x: torch.special.expit(x).sum(), method="forward")(x)
    >>> torch.allclose(lap, torch.trace(torch.func.hessian(lambda x: torch.sigmoid(x).sum())(x)))
    True
    >>> _ = registry.register(torch.special.expit, replace=True)(previous)  # (restores the shipped rule)
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch

from ..registry import Registry

__all__ = ["Rule", "RULES", "register", "lookup", "covered", "op_name"]

Rule = Callable[[Callable, tuple, Dict[str, Any]], Any]

RULES: Registry = Registry("forward-Laplacian rule")


def register(*funcs: Optional[Callable], replace: bool = False) -> Callable[[Rule], Rule]:
    """Decorator: make ``rule`` the propagation rule of each callable in ``funcs``.

    ``None`` entries are skipped (aliases missing from an older torch). A callable
    that has another rule already raises ``ValueError`` unless ``replace=True``.
    """

    def decorate(rule: Rule) -> Rule:
        for func in funcs:
            if func is not None and RULES.view().get(func) is not rule:  # one callable may be listed twice
                RULES.register(func, rule, replace=replace)
        return rule

    return decorate


def op_name(func: Callable) -> str:
    """A readable name for a torch callable, as in ``torch.overrides.resolve_name``.

    Example:
        >>> op_name(torch.sin), op_name(torch.Tensor.add)
        ('torch.sin', 'torch.Tensor.add')
    """
    name = torch.overrides.resolve_name(func)
    if name:
        return name
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def lookup(func: Callable) -> Optional[Rule]:
    """The rule registered for ``func``, or ``None``."""
    return RULES.lookup(func)


def covered() -> List[str]:
    """The names of the covered callables, sorted (for documentation and tests)."""
    return sorted({op_name(f) for f in RULES.names()})

"""The registry of module rules: ``{module type: rule class}``, open to users.

The walker looks a module's exact type up here (a subclass of a supported
module may change its forward, so it needs its own registration). The
built-in rules register themselves when :mod:`secorder.structured.rules` is
imported; users add theirs with :func:`register_rule`. Rules for another
package's modules can wait until a module type of that package is first looked
up (:func:`register_lazy`), so that the package is never imported for nothing;
if that module fails to import, the lookup raises
:class:`~secorder.registry.LazyEntryError` naming it (a broken rules module is
never silently ignored). The table is a :class:`secorder.registry.Registry`,
:data:`RULES`.
"""

from __future__ import annotations

import sys
from typing import Callable, Mapping, Optional, Type, TypeVar, Union

from torch import nn

from ..registry import Registry
from .rule import BlockRule, Rule

__all__ = ["register_rule", "rule_for", "registered_rules", "register_lazy", "RULES"]

AnyRule = Union[Type[Rule], Type[BlockRule]]
R = TypeVar("R", bound=AnyRule)

RULES: Registry = Registry("structured rule")


def register_rule(module_type: type, rule: Optional[R] = None, *, replace: bool = False) -> Union[R, Callable[[R], R]]:
    """Teach the structured engine a module type: ``register_rule(MyModule, MyRule)``.

    Also usable as a class decorator, ``@register_rule(MyModule)`` above
    ``class MyRule(Rule): ...``. The rule applies to modules whose type is
    exactly ``module_type``. See :class:`secorder.structured.Rule` for what a
    rule implements and :mod:`secorder.structured.rules.example` for a complete
    one.

    Args:
        module_type: an ``nn.Module`` subclass.
        rule: a subclass of :class:`~secorder.structured.Rule` (leaf modules) or
            :class:`~secorder.structured.BlockRule` (modules made of sub-models);
            omit it to get a decorator.
        replace: allow replacing the rule already registered for ``module_type``
            (otherwise that raises ``ValueError``).

    Returns:
        ``rule`` (or, without it, a decorator that registers and returns its class).

    Example:
        >>> import torch
        >>> from secorder.structured import Rule, register_rule, rule_for
        >>> class Double(torch.nn.Module):
        ...     def forward(self, x):
        ...         return 2 * x
        >>> @register_rule(Double)
        ... class DoubleRule(Rule):
        ...     ...
        >>> rule_for(Double) is DoubleRule
        True
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(replace, bool):
        raise TypeError(f"replace must be a bool, got {type(replace).__name__}")

    def add(cls: R) -> R:
        if not isinstance(cls, type) or not issubclass(cls, (Rule, BlockRule)):
            raise TypeError(f"rule must be a subclass of secorder.structured.Rule or BlockRule, got {cls!r}")
        current = RULES.view().get(module_type)
        if current is not None and current is not cls and not replace:
            raise ValueError(
                f"{module_type.__name__} already has the rule {getattr(current, '__name__', current)}; "
                f"pass replace=True to replace it"
            )
        RULES.register(module_type, cls, replace=True)
        return cls

    return add if rule is None else add(rule)


def rule_for(module_type: type) -> Optional[AnyRule]:
    """The rule class registered for exactly ``module_type``, or ``None``.

    Example:
        >>> import torch
        >>> rule_for(torch.nn.Linear).__name__, rule_for(torch.nn.GroupNorm)
        ('LinearRule', None)
    """
    return RULES.lookup(module_type)


def register_lazy(package: str, rules_module: str) -> None:
    """Import ``rules_module`` (which registers rules) when a module type of ``package`` is first looked up.

    If ``package`` is imported already, ``rules_module`` is imported at once. An
    import that fails raises :class:`~secorder.registry.LazyEntryError` naming
    ``rules_module`` (then, or at the first lookup of one of the package's types).

    Args:
        package: a top-level package name, such as ``"backpack"``.
        rules_module: the fully qualified name of the module to import.

    Example:
        >>> register_lazy("backpack", "secorder.structured.rules.backpack")  # done by secorder.structured.rules
    """
    if not isinstance(package, str) or not isinstance(rules_module, str):
        raise TypeError(f"package and rules_module must be str, got {type(package).__name__}, {type(rules_module).__name__}")
    RULES.add_loader(package, rules_module)
    if package in sys.modules:  # already imported: register now (an import while torch.compile traces would break)
        RULES.load(package)


def registered_rules() -> Mapping[type, AnyRule]:
    """A read-only view of the registry.

    Example:
        >>> import torch
        >>> torch.nn.Conv2d in registered_rules()
        True
    """
    return RULES.view()

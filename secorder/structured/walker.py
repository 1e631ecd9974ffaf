"""The model walker: does a model qualify for the structured engine, and with which rules.

A model qualifies when it is a module with a registered rule
(:mod:`secorder.structured.registry`) or a (nested) ``nn.Sequential`` of them,
with no hooks, no parameter used twice and no parameter outside the modules
that own it. A block module (a registered :class:`~secorder.structured.rule.BlockRule`,
such as :class:`~secorder.structured.blocks.Residual`) has each of its
sub-models walked into a plan of its own. Anything else raises
:class:`~secorder.structured.errors.Unsupported` naming the first offending
module; the transforms then fall back to the generic one-hot path.

Everything that depends on the model's structure is decided here, once per
call: which rule runs each module and with which tensors. The driver
(:mod:`secorder.structured.backprop`) only runs the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Set, Union

from torch import nn
from torch.nn.modules import module as _module_impl

from .errors import Unsupported, located
from .registry import rule_for
from .rule import BlockRule, Rule

__all__ = ["Plan", "Step", "plan", "check_plain", "overridden"]


@dataclass
class Step:
    """One module of a plan: its qualified name, its rule and ``{local name: qualified name}`` of its tensors."""

    name: str
    rule: Union[Rule, BlockRule]
    tensors: Dict[str, str] = field(default_factory=dict)

    @property
    def is_block(self) -> bool:
        return isinstance(self.rule, BlockRule)

    @property
    def parameter_names(self) -> Dict[str, str]:
        """``{local: qualified}`` of the parameters whose diagonal the rule computes (leaf steps)."""
        if self.is_block:
            return {}
        return {loc: q for loc, q in self.tensors.items() if loc in self.rule.parameters}


@dataclass
class Plan:
    """The steps of a model in forward order.

    Example:
        >>> import torch
        >>> p = plan(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh()))
        >>> [type(s.rule).__name__ for s in p.steps], p.parameter_names
        (['LinearRule', 'TanhRule'], ['0.weight', '0.bias'])
    """

    steps: List[Step]

    @property
    def parameter_names(self) -> List[str]:
        out: List[str] = []
        for step in self.steps:
            if step.is_block:
                for body in step.rule.plans.values():
                    out.extend(body.parameter_names)
            else:
                out.extend(step.parameter_names.values())
        return out


def plan(model: nn.Module) -> Plan:
    """The plan for ``model``, or :class:`Unsupported` naming the first module that does not qualify."""
    if (_module_impl._global_forward_hooks or _module_impl._global_forward_pre_hooks
            or _module_impl._global_backward_hooks or _module_impl._global_backward_pre_hooks):
        raise Unsupported("global module hooks are registered")
    return _plan(model, "", set())


def _display(prefix: str) -> str:
    return prefix[:-1] if prefix else "<root>"


def overridden(module: nn.Module) -> List[str]:
    """Instance attributes that shadow behaviour of ``module``'s class (``m.forward = ...``, ``m.__call__ = ...``).

    A rule is chosen by ``type(module)``; anything in the instance's ``__dict__``
    that replaces a method or other callable of the class may change what the
    module computes, so the module no longer qualifies.

    Example:
        >>> import torch
        >>> m = torch.nn.Linear(2, 2)
        >>> overridden(m)
        []
        >>> m.forward = torch.sin
        >>> overridden(m)
        ['forward']
    """
    cls = type(module)
    out = []
    for name, value in vars(module).items():
        attr = getattr(cls, name, None)
        if attr is not None and (callable(attr) or isinstance(attr, property)):
            out.append(name)
        elif name in ("forward", "__call__"):
            out.append(name)
    return out


def check_plain(module: nn.Module, what: str) -> None:
    """Refuse a module whose behaviour is changed by hooks or instance-level overrides."""
    if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
            or getattr(module, "_backward_pre_hooks", None)):
        raise Unsupported(f"{what} ({type(module).__name__}) has hooks")
    shadow = overridden(module)
    if shadow:
        raise Unsupported(f"{what} ({type(module).__name__}) has an instance-level {shadow[0]!r}")


def _check_plain(module: nn.Module, prefix: str) -> None:
    check_plain(module, f"module {_display(prefix)!r}")


def _leaves(module: nn.Module, prefix: str) -> List[tuple]:
    """``(prefix, module)`` of every non-container module, in forward order."""
    _check_plain(module, prefix)
    if isinstance(module, nn.Sequential) and rule_for(type(module)) is None:
        if type(module).forward is not nn.Sequential.forward:
            raise Unsupported(f"module {_display(prefix)!r} ({type(module).__name__}) overrides Sequential.forward")
        if list(module._parameters) or list(module._buffers):
            raise Unsupported(f"module {_display(prefix)!r} has its own parameters or buffers")
        out = []
        for name, child in module._modules.items():
            if child is not None:
                out.extend(_leaves(child, f"{prefix}{name}."))
        return out
    return [(prefix, module)]


def _plan(model: nn.Module, prefix: str, seen: Set[int]) -> Plan:
    steps = []
    for prefix, module in _leaves(model, prefix):
        name = _display(prefix)
        cls = rule_for(type(module))
        if cls is None:
            raise Unsupported(f"module {name!r} ({type(module).__name__}) is not supported by the structured engine")
        if issubclass(cls, BlockRule):
            steps.append(Step(name, _block(cls, module, prefix, name, seen)))
            continue
        try:
            rule = cls(module)
        except Unsupported as err:
            raise located(err, name, module) from None
        local = {}
        for n, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if p is None:
                continue
            if id(p) in seen:
                raise Unsupported(f"module {name!r} ({type(module).__name__}) shares a tensor with another module")
            seen.add(id(p))
            local[n] = prefix + n
        extra = {n for n, _ in module.named_parameters(recurse=False)} - set(rule.parameters)
        if extra or any(True for _ in module.children()):
            raise Unsupported(f"module {name!r} ({type(module).__name__}) has unexpected parameters or children")
        steps.append(Step(name, rule, local))
    if not steps:
        raise Unsupported(f"module {_display(prefix)!r} has no modules")
    return Plan(steps)


def _block(cls: type, module: nn.Module, prefix: str, name: str, seen: Set[int]) -> BlockRule:
    if module._parameters or module._buffers:
        raise Unsupported(f"module {name!r} ({type(module).__name__}) has its own parameters or buffers")
    bodies = cls.bodies(module)
    # Bodies may be nested (dotted paths); a sub-module outside every body (a container on the
    # way to one, a merge the rule computes itself) must not hold parameters or buffers.
    inside = {id(m) for body in bodies.values() for m in body.modules()}
    for key, body in bodies.items():
        try:
            found = module.get_submodule(key)
        except AttributeError:
            found = None
        if found is not body:
            raise Unsupported(f"module {name!r} ({type(module).__name__}) has no sub-module {key!r} for its rule")
    for sub_name, sub in module.named_modules(remove_duplicate=False):
        if sub is module or id(sub) in inside:
            continue
        _check_plain(sub, f"{prefix}{sub_name}.")
        if any(t is not None for t in list(sub._parameters.values()) + list(sub._buffers.values())):
            raise Unsupported(f"module {name!r} ({type(module).__name__}) has children its rule does not plan")
    plans = {key: _plan(body, f"{prefix}{key}.", seen) for key, body in bodies.items()}
    try:
        return cls(module, plans)
    except Unsupported as err:
        raise located(err, name, module) from None

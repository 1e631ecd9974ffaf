"""The model walker: does a model qualify for the structured engine, and with which rules.

A model qualifies when it is a supported leaf module or a (nested)
``nn.Sequential`` of them (and of :class:`~secorder.structured.blocks.Residual` blocks), with no forward hooks, no parameter used twice and
no parameter outside the leaf modules. Anything else raises
:class:`~secorder.structured.errors.Unsupported` naming the first offending
module; the transforms then fall back to the generic one-hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

from torch import nn
from torch.nn.modules import module as _module_impl

from .blocks import Residual
from .errors import Unsupported
from .rules import Rule, fuse, make_rule

__all__ = ["Plan", "ResidualRule", "plan"]


@dataclass
class Plan:
    """The rules in forward order and, for each, ``{local name: qualified name}`` of its tensors."""

    rules: List[Rule]
    names: List[Dict[str, str]]

    @property
    def parameter_names(self) -> List[str]:
        out = []
        for rule, names in zip(self.rules, self.names):
            if isinstance(rule, ResidualRule):
                out.extend(rule.plan.parameter_names)
            else:
                out.extend(q for local, q in names.items() if local in rule.param_names)
        return out


def _leaves(module: nn.Module, prefix: str) -> List[Tuple[str, nn.Module]]:
    if module._forward_hooks or module._forward_pre_hooks or getattr(module, "_backward_hooks", None):
        raise Unsupported(f"module {prefix or '<root>'!r} ({type(module).__name__}) has hooks")
    if isinstance(module, nn.Sequential):
        if type(module).forward is not nn.Sequential.forward:
            raise Unsupported(f"module {prefix or '<root>'!r} ({type(module).__name__}) overrides Sequential.forward")
        if list(module._parameters) or list(module._buffers):
            raise Unsupported(f"module {prefix or '<root>'!r} has its own parameters or buffers")
        out = []
        for name, child in module._modules.items():
            if child is None:
                continue
            out.extend(_leaves(child, f"{prefix}{name}."))
        return out
    return [(prefix, module)]


class ResidualRule:
    """A :class:`~secorder.structured.blocks.Residual` block: its body's plan; the driver does the rest."""

    param_names: Tuple[str, ...] = ()

    def __init__(self, name: str, body: Plan):
        self.name = name
        self.plan = body

    @property
    def has_residual(self) -> bool:
        return any(r.has_residual for r in self.plan.rules)


def plan(model: nn.Module, hessian: bool) -> Plan:
    """Rules for ``model`` or :class:`Unsupported`.

    Example:
        >>> import torch
        >>> p = plan(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh()), hessian=True)
        >>> [type(r).__name__ for r in p.rules], p.parameter_names
        (['Linear', 'Activation'], ['0.weight', '0.bias'])
    """
    if _module_impl._global_forward_hooks or _module_impl._global_forward_pre_hooks:
        raise Unsupported("global module forward hooks are registered")
    return _plan(model, "", hessian, set())


def _plan(model: nn.Module, prefix: str, hessian: bool, seen: set) -> Plan:
    rules, names = [], []
    for prefix, module in _leaves(model, prefix):
        name = prefix[:-1] if prefix else "<root>"
        if type(module) is Residual:
            if module._parameters or module._buffers:
                raise Unsupported(f"module {name!r} (Residual) has its own parameters or buffers")
            rules.append(ResidualRule(name, _plan(module.body, prefix + "body.", hessian, seen)))
            names.append({})
            continue
        rule = make_rule(name, module, hessian)
        local = {}
        for n, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if p is None:
                continue
            if id(p) in seen:
                raise Unsupported(f"module {name!r} ({type(module).__name__}) shares a tensor with another module")
            seen.add(id(p))
            local[n] = prefix + n
        extra = {n for n, _ in module.named_parameters(recurse=False)} - set(rule.param_names)
        if extra or any(True for _ in module.children()):
            raise Unsupported(f"module {name!r} ({type(module).__name__}) has unexpected parameters or children")
        rules.append(rule)
        names.append(local)
    if not rules:
        raise Unsupported(f"module {prefix or '<root>'!r} has no modules")
    fused_rules, fused_names = [], []
    for rule, local in zip(rules, names):
        merged = fuse(fused_rules[-1:] + [rule]) if fused_rules else [rule]
        if fused_rules and len(merged) == 1:  # activation + max pool: neither has tensors
            fused_rules[-1] = merged[0]
        else:
            fused_rules.append(rule)
            fused_names.append(local)
    return Plan(fused_rules, fused_names)

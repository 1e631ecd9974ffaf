"""Distributed wrappers seen through: what :func:`torch.func.functional_call` runs for a DDP or FSDP2 model.

A model wrapped in ``DistributedDataParallel`` or sharded with FSDP2
(``torch.distributed.fsdp.fully_shard``) runs collectives and swaps parameters in
its forward: DDP may broadcast buffers on every call, and FSDP2's forward hooks
all-gather the shards and put their own unsharded parameters into the modules,
which would replace the tensors that ``functional_call`` passes (every derivative
would then be zero). Neither belongs in a pure function of the parameters: the
sums over ranks are secorder's (:mod:`secorder.distributed`), and the gathering of
sharded parameters too (:mod:`secorder.shards`). So :func:`plain_view` gives the
module to call and the names to call it with:

* ``DistributedDataParallel``: its ``module``, with the ``module.`` prefix of the
  parameter names that ``model.named_parameters()`` shows taken off;
* a model with FSDP2 modules: a *twin*, a shallow copy of the module tree in which
  every FSDP2 module is an instance of its original class without FSDP2's forward
  hooks (the user's own hooks stay), sharing everything else (submodule
  attributes, buffers) with the model. Parameters that the call does not pass (frozen
  ones) are taken gathered from :func:`active_twins` (the sharded layer gathers them
  once per call); a twin made outside such a call refuses sharded constants.

The user's modules are never modified.

Example:
    >>> import torch
    >>> model = torch.nn.Linear(2, 1)
    >>> plain_view(model, {"weight": torch.ones(1, 2)})[0] is model
    True
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections import OrderedDict
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = ["plain_view", "is_ddp", "is_fsdp", "is_dtensor", "twin", "active_twins", "original_class", "DDP_PREFIX"]

DDP_PREFIX = "module."

#: Twins made for the current call, by ``id`` of the FSDP2 model (set by the sharded layer).
_TWINS: contextvars.ContextVar[Dict[int, nn.Module]] = contextvars.ContextVar("secorder_twins", default={})


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (a sharded or replicated tensor).

    Example:
        >>> is_dtensor(torch.ones(1))
        False
    """
    module = sys.modules.get("torch.distributed.tensor")  # never imported: nothing can be a DTensor
    return module is not None and isinstance(t, module.DTensor)


def is_ddp(model: Any) -> bool:
    """Whether ``model`` is wrapped in ``torch.nn.parallel.DistributedDataParallel``.

    Example:
        >>> is_ddp(torch.nn.Linear(1, 1))
        False
    """
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _fsdp_module_type() -> Optional[type]:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def is_fsdp(model: Any) -> bool:
    """Whether ``model`` or one of its submodules is sharded with FSDP2 (``fully_shard``).

    Example:
        >>> is_fsdp(torch.nn.Sequential(torch.nn.Linear(1, 1)))
        False
    """
    kind = _fsdp_module_type()
    return kind is not None and isinstance(model, nn.Module) and any(isinstance(m, kind) for m in model.modules())


def _check_not_fsdp1(model: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - builds without torch.distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise TypeError(
            "model is wrapped in FullyShardedDataParallel (FSDP1, flat parameters), which secorder does not read; "
            "shard it with FSDP2, torch.distributed.fsdp.fully_shard, whose parameters are DTensors")


def _is_fsdp_hook(hook: Any) -> bool:
    """Whether a forward (pre-)hook was registered by FSDP2 (its state's bound methods, possibly wrapped)."""
    for candidate in (hook, getattr(hook, "__wrapped__", None)):
        owner = getattr(candidate, "__self__", None)
        where = type(owner).__module__ if owner is not None else getattr(candidate, "__module__", "") or ""
        if where.startswith(("torch.distributed.fsdp", "torch.distributed._composable")):
            return True
    return False


def original_class(module: nn.Module) -> type:
    """The class of ``module`` before ``fully_shard`` made it ``FSDP<Class>``.

    Example:
        >>> original_class(torch.nn.Linear(1, 1)).__name__
        'Linear'
    """
    kind = _fsdp_module_type()
    cls = type(module)
    if kind is None or not issubclass(cls, kind):
        return cls
    for base in cls.__mro__[1:]:
        if issubclass(base, nn.Module) and not issubclass(base, kind):
            return base
    return nn.Module  # pragma: no cover - FSDPModule always wraps an nn.Module class


_HOOK_TABLES = (("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"),
                ("_forward_hooks", "_forward_hooks_with_kwargs"))


def twin(model: nn.Module, constants: Optional[Mapping[int, Tensor]] = None) -> nn.Module:
    """A hook-free copy of the module tree of an FSDP2 ``model`` (see the module docstring).

    Args:
        model: the model (its FSDP2 modules become instances of their original classes).
        constants: replacements of sharded parameters by full tensors, by ``id`` of the
            model's ``DTensor`` parameter; a sharded parameter without one raises when
            the twin's forward would read it (a ``DTensor`` among plain tensors).

    Returns:
        The twin's root module. Nothing of ``model`` is modified.
    """
    constants = dict(constants or {})
    memo: Dict[int, nn.Module] = {}
    kind = _fsdp_module_type()

    def copy(module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        if kind is None or not any(isinstance(m, kind) for m in module.modules()):
            memo[id(module)] = module  # nothing sharded below: the module itself
            return module
        new = object.__new__(original_class(module))
        state = dict(module.__dict__)
        for table, with_kwargs in _HOOK_TABLES:
            kept = OrderedDict((k, h) for k, h in getattr(module, table).items() if not _is_fsdp_hook(h))
            state[table] = kept
            state[with_kwargs] = {k: v for k, v in getattr(module, with_kwargs).items() if k in kept}
        state["_forward_hooks_always_called"] = {
            k: v for k, v in module._forward_hooks_always_called.items() if k in state["_forward_hooks"]}
        state["_parameters"] = {
            name: (constants.get(id(p), p) if p is not None else None) for name, p in module._parameters.items()}
        state["_modules"] = {name: (copy(c) if c is not None else None) for name, c in module._modules.items()}
        new.__dict__.update(state)
        memo[id(module)] = new
        return new

    return copy(model)


#: Whether this thread is inside a call on gathered parameters (an FSDP2 forward there is an error).
_GATHERED: contextvars.ContextVar[bool] = contextvars.ContextVar("secorder_gathered", default=False)


def _refuse_fsdp_forward(module: nn.Module, args: Any) -> None:
    kind = _fsdp_module_type()
    if _GATHERED.get() and kind is not None and isinstance(module, kind):
        raise RuntimeError(
            f"f called the forward of an FSDP2 module ({type(module).__name__}) during a call on sharded parameters: "
            "FSDP2's forward puts its own gathered parameters into the module, so the derivatives with respect to "
            "params would be wrong; build f with so.functional_loss(model, loss_fn), which calls the model's plain "
            "modules with the gathered parameters")


@contextlib.contextmanager
def active_twins(twins: Mapping[int, nn.Module], guard: bool = False) -> Iterator[None]:
    """Within the block, :func:`plain_view` uses ``twins`` (by ``id`` of the FSDP2 model) for this thread.

    With ``guard`` (``f`` is not a :class:`secorder.FunctionalLoss` of a module, so
    what it calls is unknown), an FSDP2 module's own forward called in the block on
    this thread (``f`` calling the sharded model directly) raises instead of
    computing with FSDP2's parameters; the check is a global module pre-hook that
    looks at this thread's context only.
    """
    merged = dict(_TWINS.get())
    merged.update(twins)
    token = _TWINS.set(merged)
    inside = _GATHERED.set(True)
    handle = nn.modules.module.register_module_forward_pre_hook(_refuse_fsdp_forward) if guard else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()
        _GATHERED.reset(inside)
        _TWINS.reset(token)


def _stale_ddp(model: nn.Module, names: Any) -> None:
    inner = {n for n, _ in model.named_parameters()}
    missing = [n for n in names if n not in inner]
    if missing and all(DDP_PREFIX + n in inner for n in missing):
        raise ValueError(
            f"params has names without the {DDP_PREFIX!r} prefix ({missing[0]!r}, ...) but the model is wrapped in "
            "DistributedDataParallel: params were taken before the model was wrapped; take them again with "
            "so.params_dict(model) from the wrapped model (its names start with 'module.')")


def plain_view(model: nn.Module, state: Dict[str, Any]) -> Tuple[nn.Module, Dict[str, Any]]:
    """The module that ``functional_call`` should run for ``model``, and ``state`` renamed for it.

    Args:
        model: the user's model (plain, DDP-wrapped or with FSDP2 modules).
        state: the names and tensors of the call (parameters and buffers, named as
            in ``model.named_parameters()``).

    Returns:
        ``(module, state)``.

    Raises:
        ValueError: stale parameters: names of the unwrapped model for a DDP model, or
            plain tensors for sharded parameters outside a sharded call (``params``
            taken before the model was wrapped or sharded).
    """
    if is_ddp(model):
        _stale_ddp(model, state)
        n = len(DDP_PREFIX)
        inner = {k[n:] if k.startswith(DDP_PREFIX) else k: v for k, v in state.items()}
        return plain_view(model.module, inner)
    if not isinstance(model, nn.Module):
        return model, state
    _check_not_fsdp1(model)
    if not is_fsdp(model):
        return model, state
    made = _TWINS.get().get(id(model))
    if made is not None:
        return made, state
    sharded = {n: p for n, p in model.named_parameters() if is_dtensor(p)}
    passed = [n for n, t in state.items() if is_dtensor(t)]
    if passed:
        raise TypeError(
            f"params[{passed[0]!r}] is a DTensor (a shard): f of a sharded model cannot be called on shards "
            "directly; make F = so.dataset_loss(f, data, process_group=...) and call F or a secorder transform, "
            "which gather the shards once per call")
    plain = [n for n in sharded if n in state]
    if plain:
        raise ValueError(
            f"params[{plain[0]!r}] is a plain tensor of shape {tuple(state[plain[0]].shape)}, but the model's "
            "parameter is sharded (a DTensor, FSDP2): params were taken before fully_shard (stale parameters); "
            "take them again with so.params_dict(model) after sharding, and call the secorder transforms, which "
            "gather the shards")
    return twin(model), state

"""From ``nn.Module`` to a pure loss function of a parameter dict."""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Dict, Iterator, Optional

import torch

from torch import Tensor, nn
from torch.func import functional_call

from . import wrappers

__all__ = ["functional_loss", "params_dict", "FunctionalLoss"]


def params_dict(model: nn.Module, *, trainable_only: bool = True) -> Dict[str, Tensor]:
    """A detached ``{name: tensor}`` dict of ``model``'s parameters.

    The tensors share storage with the model (no copy) but carry no autograd
    history, ready to be the differentiated argument of a transform. With
    ``trainable_only=True`` (default) frozen parameters (``requires_grad=False``)
    are left out: :func:`functional_loss` then takes them from the model, so they
    stay constants.

    Example:
        >>> import torch, secorder as so
        >>> params = so.params_dict(torch.nn.Linear(3, 2))
        >>> {k: tuple(v.shape) for k, v in params.items()}
        {'weight': (2, 3), 'bias': (2,)}
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return {
        name: p.detach()
        for name, p in model.named_parameters()
        if p.requires_grad or not trainable_only
    }


_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)


@contextlib.contextmanager
def _batch_statistics(model: nn.Module) -> Iterator[None]:
    """Training-mode batch norms use the batch statistics and leave the running ones alone.

    Inside ``torch.func`` transforms the in-place update of the running statistics
    is refused ("mutate a captured Tensor"); a pure loss function must not have it
    anyway. ``track_running_stats`` is switched off for the duration of the call,
    which is exactly that: batch statistics, no update.
    """
    switched = [m for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.training and m.track_running_stats]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _exclusive(model: nn.Module) -> Iterator[None]:
    """One ``functional_call`` of ``model`` at a time.

    ``functional_call`` swaps the given tensors into the module for the duration of
    the call, so two threads calling it on one module would each run with the
    other's parameters (a silent wrong answer). The swap and the forward pass hold
    a per-module lock; the backward passes (which read the graph, not the module)
    do not. Not while ``torch.compile`` traces (it traces no lock; a compiled call
    runs the graph, not the module).
    """
    if torch.compiler.is_compiling():
        yield
        return
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
    with lock:
        yield


class FunctionalLoss:
    """``f(params, inputs, targets) = loss_fn(model(inputs; params), targets)``.

    Made by :func:`functional_loss`. Keeps ``model`` and ``loss_fn`` as
    attributes so that structure-aware engines can inspect them, and
    :meth:`output` gives the model output alone (the GGN and the Fishers need it).

    Example:
        >>> import torch, secorder as so
        >>> f = so.FunctionalLoss(torch.nn.Linear(2, 1), torch.nn.functional.mse_loss)
        >>> params = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
        >>> f(params, torch.ones(3, 2), torch.zeros(3, 1))
        tensor(4.)
        >>> type(f.model).__name__
        'Linear'
    """

    def __init__(self, model: Any, loss_fn: Callable[[Tensor, Tensor], Tensor]):
        if not isinstance(model, nn.Module) and not callable(model):
            raise TypeError(
                f"model must be a torch.nn.Module or a function model(params, inputs) -> outputs, "
                f"got {type(model).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn

    def output(self, params: Any, inputs: Any, buffers: Optional[Dict[str, Tensor]] = None) -> Any:
        """The model output ``model(inputs; params)`` (buffers as in :func:`functional_loss`).

        Example:
            >>> import torch, secorder as so
            >>> f = so.functional_loss(lambda p, x: x @ p["w"], torch.nn.functional.mse_loss)
            >>> f.output({"w": torch.ones(2, 1)}, torch.ones(3, 2))
            tensor([[2.],
                    [2.],
                    [2.]])
        """
        if not isinstance(self.model, nn.Module):
            if buffers is not None:
                raise TypeError("buffers only apply to an nn.Module model; a model function takes (params, inputs)")
            return self.model(params, inputs)
        if not isinstance(params, dict):
            raise TypeError(
                f"params must be a dict of name -> tensor (see secorder.params_dict), got {type(params).__name__}"
            )
        unknown = set(params) - {n for n, _ in self.model.named_parameters()}
        if unknown:
            if wrappers.is_ddp(self.model):
                wrappers.plain_view(self.model, params)  # names of the unwrapped model: a clear error
            raise ValueError(f"params has names that are not parameters of the model: {sorted(unknown)}")
        state = dict(self.model.named_buffers()) if buffers is None else dict(buffers)
        state.update(params)
        # DDP and FSDP2 run collectives and swap parameters in their forward: call the plain modules
        module, state = wrappers.plain_view(self.model, state)
        with _exclusive(module), _batch_statistics(module):
            return functional_call(module, state, (inputs,))

    def __call__(self, params: Any, inputs: Any, targets: Any, buffers: Optional[Dict[str, Tensor]] = None) -> Any:
        return self.loss_fn(self.output(params, inputs, buffers), targets)

    def __repr__(self) -> str:
        model = type(self.model).__name__ if isinstance(self.model, nn.Module) else getattr(
            self.model, "__name__", type(self.model).__name__)
        return f"functional_loss({model}, {getattr(self.loss_fn, '__name__', self.loss_fn)!r})"


def functional_loss(model: Any, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> FunctionalLoss:
    """Turn ``model`` and ``loss_fn`` into a pure ``f(params, inputs, targets)``.

    Args:
        model: an ``nn.Module``, or a function ``model(params, inputs) -> outputs``
            for models written as functions (``params`` then is any pytree).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.

    Returns:
        A :class:`FunctionalLoss` ``f(params, inputs, targets[, buffers])``. Being
        split into model and loss, it also serves ``curvature="ggn"``, ``"fisher"``
        and ``"empirical_fisher"``.

    For an ``nn.Module``, ``params`` is a dict like :func:`params_dict` returns;
    parameters it leaves out are taken from the model as constants. Buffers
    (BatchNorm running statistics) are read from the model at each call, or from the
    optional ``buffers`` argument, so a model in ``eval()`` mode computes exactly
    what ``loss_fn(model(inputs), targets)`` computes. A BatchNorm layer in training
    mode uses the batch statistics, as ``model(inputs)`` does, but its running
    statistics are not updated: ``f`` is a pure function. (The batch statistics
    couple the examples, so the curvature is that of the whole batch; the structured
    engine declines such models.)

    Example:
        >>> import torch, secorder as so
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Linear(3, 1)
        >>> f = so.functional_loss(model, torch.nn.functional.mse_loss)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> params = so.params_dict(model)
        >>> torch.allclose(f(params, x, y), torch.nn.functional.mse_loss(model(x), y))
        True
        >>> so.trace(f)(params, x, y) > 0
        tensor(True)
        >>> g = so.functional_loss(lambda p, x: x @ p, torch.nn.functional.mse_loss)
        >>> so.trace(g, curvature="ggn")(torch.zeros(3, 1), x, y)   # 2/8 sum |x_n|^2
        tensor(3.8076)
    """
    return FunctionalLoss(model, loss_fn)

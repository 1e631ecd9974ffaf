"""From ``nn.Module`` to a pure loss function of a parameter dict."""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call

from . import wrappers
from .model_call import Output, check_output, model_arguments, select_output

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


_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def _batch_statistics(module: nn.Module, state: Dict[str, Any]) -> Dict[str, Any]:
    """``state`` with the running statistics of training-mode batch norms set to ``None`` for the call.

    A training-mode batch norm without running statistics normalises with the batch
    statistics and updates nothing: what a pure loss function needs (inside
    ``torch.func`` transforms an in-place update of the running statistics is
    refused anyway, "mutate a captured Tensor"). They reach the module only through
    ``functional_call``'s state, so the module's own attributes are never changed,
    not even for the duration of the call (another thread may be running the model).
    """
    for name, m in module.named_modules(remove_duplicate=False):
        if isinstance(m, _BATCH_NORMS) and m.training and m.track_running_stats:
            for buffer in _RUNNING:
                state[f"{name}.{buffer}" if name else buffer] = None
    return state


_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def _module_lock(model: nn.Module) -> threading.RLock:
    """One re-entrant lock per module: ``functional_call`` swaps the module's tensors for the call's.

    ``torch.func.functional_call`` puts the call's parameters and buffers on the
    module while it runs, so two
    threads calling the same module at once would compute with each other's
    tensors: silently wrong gradients. Calls of one module are serialised; the
    graphs they build hold their own tensors, so products and backward passes
    still run in parallel. (Not while ``torch.compile`` traces: Dynamo cannot
    enter a lock, and a compiled graph takes the tensors as inputs.)
    """
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


class FunctionalLoss:
    """``f(params, inputs, targets) = loss_fn(model(inputs; params), targets)``.

    Made by :func:`functional_loss`. Keeps ``model``, ``loss_fn`` and
    ``output_field`` (the ``output=`` argument) as attributes so that
    structure-aware engines can inspect them. :meth:`call_model` is the one place
    the model is called (every engine calls it, or
    :func:`secorder.model_call.model_arguments` to export the model);
    :meth:`output` gives the model output that ``loss_fn`` takes (the GGN and the
    Fishers need it).

    Example:
        >>> import torch, secorder as so
        >>> f = so.FunctionalLoss(torch.nn.Linear(2, 1), torch.nn.functional.mse_loss)
        >>> params = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
        >>> f(params, torch.ones(3, 2), torch.zeros(3, 1))
        tensor(4.)
        >>> type(f.model).__name__
        'Linear'
    """

    def __init__(self, model: Any, loss_fn: Callable[[Tensor, Tensor], Tensor], output: Output = None):
        if not isinstance(model, nn.Module) and not callable(model):
            raise TypeError(
                f"model must be a torch.nn.Module or a function model(params, inputs) -> outputs, "
                f"got {type(model).__name__}"
            )
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        check_output(output)
        self.model = model
        self.loss_fn = loss_fn
        self.output_field = output

    def call_model(self, params: Any, inputs: Any, buffers: Optional[Dict[str, Tensor]] = None) -> Any:
        """What the model returns for ``inputs`` at ``params``, before ``output=`` selects from it.

        The one place where the model is called: an ``nn.Module`` through
        ``torch.func.functional_call`` with the inputs in their form
        (:func:`secorder.model_call.model_arguments`: a dict as keyword
        arguments, a tuple as positional ones, anything else as the one
        argument), a model function as ``model(params, inputs)``.

        Example:
            >>> import torch, secorder as so
            >>> class Two(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.lin = torch.nn.Linear(2, 1)
            ...     def forward(self, x, scale=1.0):
            ...         return {"logits": self.lin(x) * scale}
            >>> f = so.functional_loss(Two(), torch.nn.functional.mse_loss)
            >>> params = {"lin.weight": torch.ones(1, 2), "lin.bias": torch.zeros(1)}
            >>> f.call_model(params, {"x": torch.ones(1, 2), "scale": 3.0})
            {'logits': tensor([[6.]])}
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
        args, kwargs = model_arguments(inputs)
        # DDP and FSDP2 run collectives and swap parameters in their forward: call the plain modules
        module, state = wrappers.plain_view(self.model, state)
        state = _batch_statistics(module, state)
        if torch.compiler.is_compiling():  # a compiled graph takes the tensors as inputs: nothing is swapped
            return functional_call(module, state, args, kwargs)
        with _module_lock(module):
            return functional_call(module, state, args, kwargs)

    def select_output(self, returned: Any) -> Any:
        """The part of the model's return value that ``loss_fn`` sees (``output=``, :mod:`secorder.model_call`).

        Example:
            >>> import torch, secorder as so
            >>> f = so.functional_loss(torch.nn.Identity(), torch.nn.functional.mse_loss, output="hidden")
            >>> f.select_output({"hidden": torch.ones(1)})
            tensor([1.])
        """
        return select_output(returned, self.output_field)

    def output(self, params: Any, inputs: Any, buffers: Optional[Dict[str, Tensor]] = None) -> Any:
        """The model output ``loss_fn`` takes: :meth:`select_output` of :meth:`call_model`.

        Example:
            >>> import torch, secorder as so
            >>> f = so.functional_loss(lambda p, x: x @ p["w"], torch.nn.functional.mse_loss)
            >>> f.output({"w": torch.ones(2, 1)}, torch.ones(3, 2))
            tensor([[2.],
                    [2.],
                    [2.]])
        """
        return self.select_output(self.call_model(params, inputs, buffers))

    def __call__(self, params: Any, inputs: Any, targets: Any, buffers: Optional[Dict[str, Tensor]] = None) -> Any:
        return self.loss_fn(self.output(params, inputs, buffers), targets)

    def __repr__(self) -> str:
        model = type(self.model).__name__ if isinstance(self.model, nn.Module) else getattr(
            self.model, "__name__", type(self.model).__name__)
        extra = "" if self.output_field is None else f", output={self.output_field!r}"
        return f"functional_loss({model}, {getattr(self.loss_fn, '__name__', self.loss_fn)!r}{extra})"


def functional_loss(model: Any, loss_fn: Callable[[Tensor, Tensor], Tensor], output: Output = None) -> FunctionalLoss:
    """Turn ``model`` and ``loss_fn`` into a pure ``f(params, inputs, targets)``.

    Args:
        model: an ``nn.Module``, or a function ``model(params, inputs) -> outputs``
            for models written as functions (``params`` then is any pytree).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        output: what ``loss_fn`` sees of the model's return value. ``None``
            (default): a tensor as it is; from a mapping, such as a Hugging Face
            ``ModelOutput``, its ``logits`` entry (an error lists the fields when
            there is none); any other return value unchanged. A string: that
            field of a mapping (or attribute of a named tuple or dataclass). A
            callable: ``output(returned)``, for example
            ``lambda out: out.logits.transpose(1, 2)``. A named or computed
            output must be a tensor.

    Returns:
        A :class:`FunctionalLoss` ``f(params, inputs, targets[, buffers])``. Being
        split into model and loss, it also serves ``curvature="ggn"``, ``"fisher"``
        and ``"empirical_fisher"``.

    **How the model is called.** For an ``nn.Module``, ``inputs`` that are a dict
    are passed as keyword arguments, ``model(**inputs)`` (a Hugging Face batch:
    ``{"input_ids": ..., "attention_mask": ...}``); a tuple as positional arguments,
    ``model(*inputs)``; anything else (a tensor) as the one argument. A model
    function is called as ``model(params, inputs)`` whatever ``inputs`` is. Flags
    that change what a model returns (``use_cache``, ``output_hidden_states``,
    ``return_dict``) are the model's and yours: pass them with the inputs or set them
    in the model's config; an error names ``use_cache`` when a key/value cache is
    what reaches the loss.

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

        A model called with a dict of inputs and returning a mapping, as Hugging
        Face models do (``output=None`` takes its ``logits``):

        >>> class Classifier(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(3, 2)
        ...     def forward(self, pixel_values, mask=None):
        ...         return {"logits": self.lin(pixel_values), "hidden": pixel_values}
        >>> clf = Classifier()
        >>> h = so.functional_loss(clf, torch.nn.functional.cross_entropy)
        >>> batch, labels = {"pixel_values": x}, torch.randint(0, 2, (8,))
        >>> torch.allclose(h(so.params_dict(clf), batch, labels),
        ...                torch.nn.functional.cross_entropy(clf(**batch)["logits"], labels))
        True
        >>> so.ggn_diag(h)(so.params_dict(clf), batch, labels)["lin.bias"].shape
        torch.Size([2])
    """
    return FunctionalLoss(model, loss_fn, output)

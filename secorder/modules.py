"""From ``nn.Module`` to a pure loss function of a parameter dict."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from torch import Tensor, nn
from torch.func import functional_call

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


class FunctionalLoss:
    """``f(params, inputs, targets) = loss_fn(model(inputs; params), targets)``.

    Made by :func:`functional_loss`. Keeps ``model`` and ``loss_fn`` as
    attributes so that structure-aware engines can inspect them.

    Example:
        >>> import torch, secorder as so
        >>> f = so.FunctionalLoss(torch.nn.Linear(2, 1), torch.nn.functional.mse_loss)
        >>> params = {"weight": torch.ones(1, 2), "bias": torch.zeros(1)}
        >>> f(params, torch.ones(3, 2), torch.zeros(3, 1))
        tensor(4.)
        >>> type(f.model).__name__
        'Linear'
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor]):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self.loss_fn = loss_fn

    def __call__(
        self,
        params: Dict[str, Tensor],
        inputs: Any,
        targets: Any,
        buffers: Optional[Dict[str, Tensor]] = None,
    ) -> Tensor:
        if not isinstance(params, dict):
            raise TypeError(
                f"params must be a dict of name -> tensor (see secorder.params_dict), got {type(params).__name__}"
            )
        unknown = set(params) - {n for n, _ in self.model.named_parameters()}
        if unknown:
            raise ValueError(f"params has names that are not parameters of the model: {sorted(unknown)}")
        state = dict(self.model.named_buffers()) if buffers is None else dict(buffers)
        state.update(params)
        outputs = functional_call(self.model, state, (inputs,))
        return self.loss_fn(outputs, targets)

    def __repr__(self) -> str:
        return f"functional_loss({type(self.model).__name__}, {getattr(self.loss_fn, '__name__', self.loss_fn)!r})"


def functional_loss(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> FunctionalLoss:
    """Turn ``model`` and ``loss_fn`` into a pure ``f(params, inputs, targets)``.

    ``params`` is a dict like :func:`params_dict` returns; parameters it leaves
    out are taken from the model as constants. Buffers (BatchNorm running
    statistics) are read from the model at each call, or from the optional
    ``buffers`` argument, so a model in ``eval()`` mode computes exactly what
    ``loss_fn(model(inputs), targets)`` computes. Put BatchNorm models in
    ``eval()`` mode before taking curvature: in training mode the batch
    statistics make the loss couple the examples and the running statistics are
    updated in place, which ``vmap`` refuses.

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
    """
    return FunctionalLoss(model, loss_fn)

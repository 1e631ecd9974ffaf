"""Per-layer Hessian and (empirical) Fisher diagonals (legacy ``torch_secorder.core.per_layer_curvature``).

A layer is a submodule of one of ``layer_types`` (default ``nn.Linear`` and
``nn.Conv2d``), selected by :func:`torch_secorder.core.utils.get_params_by_module_type`;
its block of the diagonal is the diagonal restricted to its parameters,
flattened and concatenated in ``module.parameters()`` order. The diagonal
of a block is the same whether or not the other parameters are held fixed,
so every selected parameter is computed in one call: the Hessian diagonal by
the structured engine (:mod:`secorder.structured`) when the model and loss
qualify and ``create_graph`` is False, else by the closure path of
:func:`torch_secorder.core.hessian_diagonal.hessian_diagonal`; the
"Fisher" diagonal, as in 0.0.1, is the square of the mini-batch gradient,
one forward and one backward pass. 0.0.1 ran a separate computation per
layer, one double backward per parameter entry.

As in 0.0.1 the selected parameters are differentiated whether or not they
require grad; every ``requires_grad`` flag, buffer and train/eval flag is
restored afterwards, also after an exception (0.0.1 left the flags changed
when the loss raised).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..errors import LegacyTypeError, LegacyValueError
from . import _common
from ._structured import structured_diagonal
from .hessian_diagonal import hessian_diagonal
from .utils import get_params_by_module_type

__all__ = ["per_layer_hessian_diagonal", "per_layer_fisher_diagonal", "get_layer_curvature_stats"]

DEFAULT_LAYER_TYPES = (nn.Linear, nn.Conv2d)


def _layers(model: nn.Module, layer_types: Optional[Sequence[type]]) -> Dict[str, List[Tensor]]:
    _common.check_model(model)
    return get_params_by_module_type(model, list(DEFAULT_LAYER_TYPES) if layer_types is None else layer_types)


def _unique(layers: Dict[str, List[Tensor]]) -> List[Tensor]:
    seen, out = set(), []
    for params in layers.values():
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def _differentiate_only(model: nn.Module, chosen: List[Tensor]) -> None:
    # As 0.0.1 did: the chosen parameters require grad, the others do not (a smaller
    # graph). The caller's flags come back with the model state (owns_forward).
    ids = {id(p) for p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)


def _per_layer(layers: Dict[str, List[Tensor]], chosen: List[Tensor], values: List[Tensor]) -> Dict[str, Tensor]:
    by_id = {id(p): v for p, v in zip(chosen, values)}
    out = {}
    for name, params in layers.items():
        parts = [by_id[id(p)].reshape(-1) for p in params]
        out[name] = torch.cat(parts) if parts else torch.zeros(0)
    return out


@_common.owns_forward
def per_layer_hessian_diagonal(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    layer_types: Optional[List[type]] = None,
    create_graph: bool = False,
) -> Dict[str, Tensor]:
    """The exact Hessian diagonal of ``loss_fn(model(inputs), targets)``, one flat block per layer.

    Args:
        model: the model.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar loss.
        inputs: the model's input.
        targets: the loss's targets.
        layer_types: module classes that count as layers (default
            ``[nn.Linear, nn.Conv2d]``).
        create_graph: if True the diagonals are differentiable with respect to
            the parameters (the generic path runs).

    Returns:
        A dict from layer name (``model.named_modules()``) to a 1-D tensor:
        the diagonal entries of all the layer's parameters, flattened and
        concatenated. Empty if no module matches.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1))
        >>> x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0]])
        >>> per_layer_hessian_diagonal(model, torch.nn.functional.mse_loss, x, y)   # 2 x^2 and 2
        {'0': tensor([2., 8., 2.])}
    """
    layers = _layers(model, layer_types)
    _common.check_callable(loss_fn, "loss_fn")
    chosen = _unique(layers)
    if not chosen:
        return {name: torch.zeros(0) for name in layers}
    diag = None
    if not create_graph:
        diag = structured_diagonal(model, loss_fn, inputs, targets, chosen)
    if diag is None:
        _differentiate_only(model, chosen)
        closure = _common.model_closure(model, loss_fn, inputs, targets)
        diag = hessian_diagonal(closure, chosen, create_graph=create_graph)
    return _per_layer(layers, chosen, diag)


@_common.owns_forward
def per_layer_fisher_diagonal(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    inputs: Any,
    targets: Any,
    layer_types: Optional[List[type]] = None,
    create_graph: bool = False,
) -> Dict[str, Tensor]:
    """0.0.1's per-layer "Fisher" diagonal: the squared mini-batch gradient, one flat block per layer.

    This is ``g * g`` for the gradient ``g`` of the mean loss over the batch,
    not the diagonal of a Fisher matrix (a sum of per-example outer
    products): see the migration page for the secorder call that gives the
    empirical or the true Fisher diagonal. One forward and one backward pass.

    Args:
        model: the model.
        loss_fn: ``loss_fn(model(inputs), targets)`` returns a scalar loss.
        inputs: the model's input.
        targets: the loss's targets.
        layer_types: module classes that count as layers (default
            ``[nn.Linear, nn.Conv2d]``).
        create_graph: if True the result is differentiable with respect to the
            parameters.

    Returns:
        A dict from layer name to a 1-D tensor of squared gradient entries.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 1))
        >>> x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0]])
        >>> with torch.no_grad():
        ...     _ = model[0].weight.zero_(), model[0].bias.zero_()
        >>> per_layer_fisher_diagonal(model, torch.nn.functional.mse_loss, x, y)   # g = -2 y [x, 1]
        {'0': tensor([ 4., 16.,  4.])}
    """
    layers = _layers(model, layer_types)
    _common.check_callable(loss_fn, "loss_fn")
    chosen = _unique(layers)
    if not chosen:
        return {name: torch.zeros(0) for name in layers}
    _differentiate_only(model, chosen)
    loss = _common.call_loss(_common.model_closure(model, loss_fn, inputs, targets), "loss_fn", params=chosen)
    grads = torch.autograd.grad(loss, chosen, create_graph=create_graph, allow_unused=True)
    squares = [torch.zeros_like(p) if g is None else g * g for g, p in zip(grads, chosen)]
    return _per_layer(layers, chosen, squares)


def get_layer_curvature_stats(layer_curvatures: Dict[str, Tensor]) -> Dict[str, Dict[str, float]]:
    """Mean, standard deviation (unbiased, as ``Tensor.std``), max and min of each layer's curvature.

    Args:
        layer_curvatures: a dict from layer name to a tensor (any shape), e.g.
            from :func:`per_layer_hessian_diagonal`.

    Returns:
        A dict from layer name to ``{"mean", "std", "max", "min"}`` Python
        floats (the documented return type; one host transfer per layer).

    Example:
        >>> import torch
        >>> get_layer_curvature_stats({"fc": torch.tensor([1.0, 2.0, 3.0])})
        {'fc': {'mean': 2.0, 'std': 1.0, 'max': 3.0, 'min': 1.0}}
    """
    if not isinstance(layer_curvatures, dict):
        raise LegacyTypeError(
            f"layer_curvatures must be a dict of name -> tensor, got {type(layer_curvatures).__name__}"
        )
    stats = {}
    for name, c in layer_curvatures.items():
        if not isinstance(c, Tensor):
            raise LegacyTypeError(f"layer_curvatures[{name!r}] must be a tensor, got {type(c).__name__}")
        if c.numel() == 0:
            raise LegacyValueError(f"layer_curvatures[{name!r}] is empty: no statistics of zero entries")
        c = c.detach()
        if not c.is_floating_point():
            c = c.double()
        mean, std, cmax, cmin = torch.stack([c.mean(), c.std(), c.max(), c.min()]).tolist()
        stats[name] = {"mean": mean, "std": std, "max": cmax, "min": cmin}
    return stats

"""The one call site of the structured exact engine (:mod:`secorder.structured`) for the ``model_*`` functions.

The structured engine computes the exact Hessian diagonal of supported
models and losses by curvature backpropagation, far faster than the generic
closure path. It answers ``None`` when a model does not qualify; the legacy
functions then take the generic closure path. Its results carry no graph, so
calls with ``create_graph=True`` always take the generic path.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from torch import Tensor, nn

from secorder.structured import model_diagonal, model_trace


def structured_diagonal(
    model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any, params: List[Tensor]
) -> Optional[List[Tensor]]:
    """Exact Hessian diagonal of ``params`` from the structured engine, or ``None`` if it does not apply."""
    return model_diagonal(model, loss_fn, inputs, targets, kind="hessian", params=params)


def structured_trace(
    model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any, params: List[Tensor]
) -> Optional[Tensor]:
    """Exact Hessian trace over ``params`` from the structured engine, or ``None`` if it does not apply."""
    return model_trace(model, loss_fn, inputs, targets, kind="hessian", params=params)

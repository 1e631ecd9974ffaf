"""The one call site of the structured exact engine (``secorder.structured``) for the ``model_*`` functions.

The structured engine computes the exact Hessian diagonal of supported
models and losses layer by layer, far faster than the generic closure path.
It answers ``None`` when a model does not qualify; the legacy functions then
take the generic closure path. Its results carry no graph, so calls with
``create_graph=True`` always take the generic path.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from torch import Tensor, nn


def _engine() -> Any:
    # Imported lazily: the structured engine is optional for the shim.
    try:
        from secorder import structured
    except ImportError:  # pragma: no cover - engine not installed
        return None
    if not hasattr(structured, "model_diagonal") or not hasattr(structured, "model_trace"):
        return None  # pragma: no cover - engine without the shim's entry points
    return structured


def structured_diagonal(
    model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any, params: List[Tensor]
) -> Optional[List[Tensor]]:
    """Exact Hessian diagonal of ``params`` from the structured engine, or ``None`` if it does not apply."""
    engine = _engine()
    if engine is None:
        return None
    return engine.model_diagonal(model, loss_fn, inputs, targets, kind="hessian", params=params)


def structured_trace(
    model: nn.Module, loss_fn: Callable, inputs: Any, targets: Any, params: List[Tensor]
) -> Optional[Tensor]:
    """Exact Hessian trace over ``params`` from the structured engine, or ``None`` if it does not apply."""
    engine = _engine()
    if engine is None:
        return None
    return engine.model_trace(model, loss_fn, inputs, targets, kind="hessian", params=params)

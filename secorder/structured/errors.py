"""The one exception of the structured engine: the model, loss or input does not qualify."""

from __future__ import annotations

from typing import Any, Optional

__all__ = ["Unsupported", "located"]


class Unsupported(ValueError):
    """Raised when the structured engine cannot handle a model, loss or input.

    The transforms catch it and fall back to the generic one-hot path (or
    re-raise it, naming the offending module, when ``engine="structured"`` was
    forced). ``module`` is the qualified name of the offending module, once known.

    Example:
        >>> str(Unsupported("module 'body.0' (LSTM) is not supported"))
        "module 'body.0' (LSTM) is not supported"
    """

    module: Optional[str] = None


def located(err: Unsupported, name: str, module: Any) -> Unsupported:
    """``err`` with the module named in front (once: an error already located keeps its module).

    Example:
        >>> import torch
        >>> str(located(Unsupported("is in training mode"), "3", torch.nn.Dropout()))
        "module '3' (Dropout) is in training mode"
    """
    if err.module is not None:
        return err
    out = Unsupported(f"module {name!r} ({type(module).__name__}) {err}")
    out.module = name
    return out

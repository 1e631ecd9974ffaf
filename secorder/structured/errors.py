"""The one exception of the structured engine: the model, loss or input does not qualify."""

from __future__ import annotations

__all__ = ["Unsupported"]


class Unsupported(ValueError):
    """Raised when the structured engine cannot handle a model, loss or input.

    The transforms catch it and fall back to the generic one-hot path (or
    re-raise it, naming the offending module, when ``engine="structured"`` was
    forced).

    Example:
        >>> str(Unsupported("module 'body.0' (LSTM) is not supported"))
        "module 'body.0' (LSTM) is not supported"
    """

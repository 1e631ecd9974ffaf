"""Errors of the legacy API: clear messages, and still ``RuntimeError`` for old ``except`` clauses.

torch-secorder 0.0.1 let PyTorch's autograd errors through, and those are
``RuntimeError``. Code written against it catches ``RuntimeError``, so bad
input here raises classes that derive from ``RuntimeError`` *and* from the
exception a new caller expects (``ValueError`` for bad values, ``TypeError`` for
bad types).

Example:
    >>> from torch_secorder.errors import LegacyValueError
    >>> issubclass(LegacyValueError, RuntimeError), issubclass(LegacyValueError, ValueError)
    (True, True)
"""

__all__ = ["LegacyValueError", "LegacyTypeError"]


class LegacyValueError(RuntimeError, ValueError):
    """A bad argument value (empty ``params``, non-scalar loss, ``v`` of the wrong shape, ...)."""


class LegacyTypeError(RuntimeError, TypeError):
    """An argument of the wrong type (``params`` not tensors, ``func`` not callable, ...)."""

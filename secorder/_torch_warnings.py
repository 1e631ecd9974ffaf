"""PyTorch's own deprecation noise that secorder's use of forward mode would print, filtered where it arises.

The first forward-mode product of a process (``torch.func.jvp``, ``torch.autograd.forward_ad``)
makes PyTorch load its forward-mode decompositions, which it compiles with
``torch.jit.script``; recent PyTorch versions then warn that ``torch.jit.script`` is
deprecated (a ``DeprecationWarning`` or a ``FutureWarning``, depending on the version).
That warning is about PyTorch's internals, not about anything the user wrote, so
secorder loads the decompositions itself, once, with exactly that warning ignored.
Every other warning, and that one raised from the user's own code, still shows.
"""

from __future__ import annotations

import os
import warnings

__all__ = ["load_jvp_decompositions", "JIT_SCRIPT_MESSAGE"]

#: The message (a regular expression) of the one warning filtered here.
JIT_SCRIPT_MESSAGE = r"`torch\.jit\.script.*` is deprecated"


def load_jvp_decompositions() -> None:
    """Load PyTorch's forward-mode decompositions now, without its ``torch.jit.script`` deprecation warning.

    PyTorch loads them at the first dual tensor under the same condition checked
    here (``PYTORCH_JIT`` not disabled, Python not run with ``-O``); a PyTorch
    without that module is left alone.

    Example:
        >>> load_jvp_decompositions()   # idempotent: the module is imported once
    """
    if os.environ.get("PYTORCH_JIT", "1") != "1" or not __debug__:
        return
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", message=JIT_SCRIPT_MESSAGE, category=category)
        try:
            from torch._decomp import decompositions_for_jvp  # noqa: F401
        except ImportError:  # pragma: no cover - another PyTorch layout: nothing to quiet
            pass

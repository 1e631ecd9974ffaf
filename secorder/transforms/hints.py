"""Hints for the common per-example mistakes under ``torch.func.vmap``, added to PyTorch's own error.

Two mistakes cost new users the most time when they map a transform over examples:

* **The batch dimension.** Under ``vmap`` every call of ``f`` sees one example
  *without* its batch dimension. A model written for batches (``x.flatten(1)``,
  ``x.view(x.shape[0], -1)``, a layer that wants ``(N, C, H, W)``) then fails deep
  inside PyTorch, e.g. "mat1 and mat2 shapes cannot be multiplied". The fix is to map
  over ``x[:, None]`` (and ``y[:, None]``), so that each call gets a batch of one.
* **Randomness.** The Monte-Carlo Fisher draws labels and the stochastic methods draw
  probes; ``vmap`` refuses random operations unless told how they vary over the
  batch: ``vmap(..., randomness="different")`` (independent draws per example) or
  ``"same"``.

:func:`per_example_hints` wraps a transformed function: a ``RuntimeError`` of either
kind raised while the caller's ``vmap`` is active is raised again, as the same type,
with the hint appended and the original error chained (``raise ... from``). Errors
raised outside ``vmap``, or of any other kind, pass through untouched.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

__all__ = ["per_example_hints", "hint_for", "under_vmap", "BATCH_HINT", "RANDOMNESS_HINT"]

BATCH_HINT = (
    "secorder hint: under torch.func.vmap each call of f sees one example without its batch dimension; a model "
    "written for batches needs one: map over x[:, None] (and y[:, None]) so that each call gets a batch of one")
RANDOMNESS_HINT = (
    "secorder hint: this transform draws random numbers (the Fisher's sampled labels, or random probes); pass "
    "randomness='different' to torch.func.vmap (independent draws per example) or randomness='same'")

#: Fragments of PyTorch's messages for an input of the wrong rank or shape.
_SHAPE_MESSAGES = (
    "shapes cannot be multiplied",
    "(unbatched) or",  # "Expected 3D (unbatched) or 4D (batched) input to conv2d"
    "Expected input batch_size",
    "is invalid for input of size",
)
_RANDOM_MESSAGE = "called random operation while in randomness error mode"


def under_vmap() -> bool:
    """Whether a ``torch.func.vmap`` is active around the caller.

    Example:
        >>> import torch
        >>> under_vmap(), bool(torch.func.vmap(lambda x: torch.tensor(under_vmap()))(torch.ones(2)).all())
        (False, True)
    """
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def hint_for(exc: BaseException) -> Optional[str]:
    """The hint for ``exc`` (raised under ``vmap``), or ``None`` when it is not one of the mistakes above.

    Example:
        >>> hint_for(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x4 and 8x3)")) == BATCH_HINT
        True
        >>> hint_for(RuntimeError("out of memory")) is None
        True
    """
    if not isinstance(exc, RuntimeError):
        return None
    text = str(exc)
    if "secorder hint:" in text:  # already hinted by an inner transform
        return None
    if _RANDOM_MESSAGE in text:
        return RANDOMNESS_HINT
    if any(fragment in text for fragment in _SHAPE_MESSAGES):
        return BATCH_HINT
    return None


def _hinted(exc: RuntimeError, hint: str) -> RuntimeError:
    message = f"{exc}\n{hint}"
    try:
        new = type(exc)(message)
    except Exception:  # an exception type with another constructor
        new = RuntimeError(message)
    return new if str(new) == message else RuntimeError(message)


def per_example_hints(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` whose per-example mistakes under ``vmap`` get a hint (see the module docstring).

    Example:
        >>> import torch, secorder as so
        >>> f = lambda x: (torch.randn(()) * x ** 2).sum()   # a random f
        >>> try:
        ...     torch.func.vmap(per_example_hints(lambda x: f(x)))(torch.ones(2, 3))
        ... except RuntimeError as err:
        ...     print(str(err).splitlines()[-1][:47])
        secorder hint: this transform draws random numb
    """

    @functools.wraps(fn)
    def hinted(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            hint = hint_for(exc)
            if hint is None or not under_vmap():
                raise
            raise _hinted(exc, hint) from exc

    return hinted

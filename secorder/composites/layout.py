"""Channels-last inputs: max pooling and group norm on a contiguous copy.

The double backward of ``max_pool2d``, ``max_pool3d`` and ``adaptive_max_pool2d``
asks its input whether it is contiguous in the channels-last format, which
``vmap`` has not implemented ("NYI: querying is_contiguous inside of vmap for
memory_format other than torch.contiguous_format"): every batched product
(Hutchinson, Lanczos, exact diagonals, ``ggn_vp``) of a CNN fed channels-last
images stopped there. The forward-mode rule of ``group_norm`` reshapes with
``view``, which a channels-last input refuses ("view size is not compatible with
input tensor's size and stride"), so ``so.hvp`` stopped there. The composites
make the input contiguous first (a copy of the activation; the values, and
every derivative, are the same).

Example:
    >>> import torch, torch.nn.functional as F
    >>> x = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    >>> torch.equal(F.max_pool2d(x, 2), contiguous_input(F.max_pool2d)(x, 2))
    True
"""

from __future__ import annotations

from typing import Any, Callable

import torch.nn.functional as F
from torch import Tensor

from .registry import register

__all__ = ["contiguous_input", "CONTIGUOUS_ONLY"]

#: The functions whose rules fail on non-contiguous (channels-last) inputs under transforms.
CONTIGUOUS_ONLY = (F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                   F.adaptive_max_pool3d, F.group_norm)


def _input(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("input")


def _not_contiguous(*args: Any, **kwargs: Any) -> bool:
    x = _input(args, kwargs)
    return isinstance(x, Tensor) and not x.is_contiguous()


def contiguous_input(func: Callable) -> Callable:
    """``func`` called with its first argument (``input``) made contiguous."""

    def impl(*args: Any, **kwargs: Any) -> Any:
        if args:
            return func(args[0].contiguous(), *args[1:], **kwargs)
        return func(**{**kwargs, "input": kwargs["input"].contiguous()})

    impl.__name__ = getattr(func, "__name__", "pool")
    return impl


for _func in CONTIGUOUS_ONLY:
    register(_func, applies=_not_contiguous,
             why="channels-last inputs: " + (
                 "the forward-mode rule reshapes with view, which they refuse" if _func is F.group_norm else
                 "the double backward queries the memory format, which vmap has not implemented")
             + "; the input is made contiguous")(contiguous_input(_func))

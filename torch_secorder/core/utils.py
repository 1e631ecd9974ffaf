"""Parameter helpers (legacy ``torch_secorder.core.utils``): flatten, unflatten, select by module type or name.

Flattening goes through :func:`secorder.tree.ravel`, the one place in
secorder that concatenates leaves. The selection helpers read the module
tree; they compute nothing.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Sequence, Tuple, Type, Union

import torch
from torch import Tensor, nn

from secorder import tree

from ..errors import LegacyTypeError, LegacyValueError
from . import _common

__all__ = [
    "flatten_params",
    "unflatten_params",
    "get_param_shapes",
    "get_params_by_module_type",
    "get_params_by_name_pattern",
]


def flatten_params(params: Iterable[Tensor]) -> Tensor:
    """Concatenate the tensors in ``params`` into one 1-D tensor, in order.

    The result keeps the autograd graph (it is differentiable with respect
    to the tensors when they require grad). Non-contiguous tensors are fine
    (0.0.1 used ``view`` and failed on them).

    Args:
        params: an iterable of tensors (a list, ``model.parameters()``, ...).

    Returns:
        A 1-D tensor with ``sum(p.numel())`` entries.

    Example:
        >>> import torch
        >>> flatten_params([torch.ones(2, 3), torch.zeros(2)])
        tensor([1., 1., 1., 1., 1., 1., 0., 0.])
    """
    params = _common.check_params(params)
    return tree.ravel(params)[0]


def unflatten_params(flat_params: Tensor, param_shapes: Sequence[Union[torch.Size, Sequence[int]]]) -> List[Tensor]:
    """Split a 1-D tensor back into tensors of the given shapes (views of ``flat_params``).

    Args:
        flat_params: a 1-D tensor, e.g. from :func:`flatten_params`.
        param_shapes: the shapes, e.g. from :func:`get_param_shapes`
            (``torch.Size`` or any sequence of ints).

    Returns:
        A list of tensors with the given shapes.

    Raises:
        LegacyValueError: when ``flat_params`` is not 1-D or its length is not
            the total size of the shapes (0.0.1 silently ignored extra entries).

    Example:
        >>> import torch
        >>> [t.shape for t in unflatten_params(torch.arange(8.), [torch.Size([2, 3]), (2,)])]
        [torch.Size([2, 3]), torch.Size([2])]
    """
    if not isinstance(flat_params, Tensor):
        raise LegacyTypeError(f"flat_params must be a 1-D tensor, got {type(flat_params).__name__}")
    try:
        shapes = [torch.Size(s) for s in param_shapes]
    except TypeError:
        raise LegacyTypeError("param_shapes must be a list of shapes (torch.Size or tuples of ints)") from None
    templates = [torch.empty(s, device="meta") for s in shapes]
    _, unravel = tree.ravel(templates)
    total = sum(t.numel() for t in templates)
    if flat_params.shape != (total,):
        raise LegacyValueError(
            f"flat_params has shape {tuple(flat_params.shape)}, but param_shapes need a 1-D tensor of {total} entries"
        )
    return list(unravel(flat_params))


def get_param_shapes(params: Iterable[Tensor]) -> List[torch.Size]:
    """The shape of each tensor in ``params``, in order.

    Example:
        >>> import torch
        >>> get_param_shapes([torch.ones(2, 3), torch.ones(5)])
        [torch.Size([2, 3]), torch.Size([5])]
    """
    return [p.shape for p in params]


def _module_types(module_type: Union[type, List[type], Tuple[type, ...]]) -> Tuple[Type[nn.Module], ...]:
    types = tuple(module_type) if isinstance(module_type, (list, tuple)) else (module_type,)
    for t in types:
        if not isinstance(t, type):
            raise LegacyTypeError(f"module_type must be a type or a list/tuple of types, got {t!r}")
    return types


def get_params_by_module_type(
    model: nn.Module, module_type: Union[type, List[type], Tuple[type, ...]]
) -> Dict[str, List[Tensor]]:
    """The parameters of every submodule of the given type(s), by module name.

    As in 0.0.1, each matching module contributes all its parameters,
    including those of its own submodules, and the model itself is listed
    under the name ``""`` when it matches.

    Args:
        model: the model to inspect.
        module_type: a module class, or a list / tuple of classes.

    Returns:
        A dict from module name (as in ``model.named_modules()``) to the list
        of that module's parameters.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> {k: len(v) for k, v in get_params_by_module_type(model, nn.Linear).items()}
        {'0': 2, '2': 2}
    """
    _common.check_model(model)
    types = _module_types(module_type)
    return {name: list(module.parameters()) for name, module in model.named_modules() if isinstance(module, types)}


def get_params_by_name_pattern(model: nn.Module, pattern: str) -> List[Tensor]:
    """The parameters whose names (``model.named_parameters()``) match the regular expression ``pattern``.

    ``re.search`` semantics: the pattern may match anywhere in the name.

    Example:
        >>> import torch.nn as nn
        >>> model = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
        >>> [p.shape for p in get_params_by_name_pattern(model, r"weight")]
        [torch.Size([2, 3]), torch.Size([1, 2])]
    """
    _common.check_model(model)
    if not isinstance(pattern, (str, re.Pattern)):
        raise LegacyTypeError(f"pattern must be a regular expression string, got {type(pattern).__name__}")
    regex = re.compile(pattern)
    return [p for name, p in model.named_parameters() if regex.search(name)]

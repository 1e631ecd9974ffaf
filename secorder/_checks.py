"""Argument validation shared by the transforms: clear errors, never wrong answers."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

from torch import Tensor

from . import tree

Argnums = Union[int, Tuple[int, ...]]


def check_argnums(argnums: Any) -> None:
    """Type-check ``argnums`` when the transform is created (range is checked per call)."""
    if isinstance(argnums, bool) or not isinstance(argnums, (int, tuple)):
        raise TypeError(f"argnums must be an int or a tuple of ints, got {type(argnums).__name__}")
    if isinstance(argnums, tuple):
        if not argnums:
            raise ValueError("argnums must not be an empty tuple")
        for a in argnums:
            if isinstance(a, bool) or not isinstance(a, int):
                raise TypeError(
                    f"argnums must be an int or a tuple of ints, got a tuple containing {type(a).__name__}"
                )
        if len(set(argnums)) != len(argnums):
            raise ValueError(f"argnums must not repeat an argument, got {argnums}")


def normalize_argnums(argnums: Argnums, num_args: int) -> Tuple[int, ...]:
    """Resolve negative indices and check the range against the call's arguments."""
    as_tuple = argnums if isinstance(argnums, tuple) else (argnums,)
    out = []
    for a in as_tuple:
        if not -num_args <= a < num_args:
            raise ValueError(
                f"argnums={argnums} is out of range for a function called with {num_args} "
                f"positional argument(s)"
            )
        out.append(a % num_args)
    return tuple(out)


def check_chunk_size(chunk_size: Optional[int]) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")


def check_differentiable(primals: Any, argnums: Argnums) -> None:
    """Every leaf of the differentiated argument must be a floating-point tensor."""
    leaves = tree.leaves(primals)
    names = tree.paths(primals)
    if not leaves:
        raise ValueError(f"the argument(s) at argnums={argnums} contain no tensors to differentiate")
    for name, leaf in zip(names, leaves):
        where = f"argument at argnums={argnums}, leaf {name}" if name else f"argument at argnums={argnums}"
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{where} must be a tensor, got {type(leaf).__name__}")
        if not leaf.is_floating_point():
            raise TypeError(
                f"{where} has dtype {leaf.dtype}; only floating-point tensors can be "
                "differentiated (cast integer or bool inputs with .float())"
            )


def check_scalar(value: Any, has_aux: bool) -> Tensor:
    """``f``'s (loss) output must be a 0-dim floating tensor; name its shape otherwise."""
    if has_aux:
        if not (isinstance(value, tuple) and len(value) == 2):
            raise TypeError(
                "has_aux=True requires f to return a (loss, aux) tuple, got "
                f"{type(value).__name__}"
            )
        value = value[0]
    if not isinstance(value, Tensor):
        raise TypeError(f"f must return a scalar tensor, got {type(value).__name__}")
    if value.dim() != 0:
        raise ValueError(
            f"f must return a scalar (0-dim) tensor, got a tensor of shape {tuple(value.shape)}; "
            "reduce it (for example with .sum() or .mean()) or use vmap for per-example values"
        )
    return value


def select(args: Sequence[Any], argnums: Argnums, resolved: Tuple[int, ...]) -> Any:
    """The differentiated part of ``args``: one pytree for an int, a tuple for a tuple."""
    if isinstance(argnums, tuple):
        return tuple(args[i] for i in resolved)
    return args[resolved[0]]


def replace(args: Sequence[Any], argnums: Argnums, resolved: Tuple[int, ...], value: Any) -> Tuple[Any, ...]:
    """``args`` with the differentiated part replaced by ``value`` (inverse of :func:`select`)."""
    new = list(args)
    parts = value if isinstance(argnums, tuple) else (value,)
    for i, part in zip(resolved, parts):
        new[i] = part
    return tuple(new)

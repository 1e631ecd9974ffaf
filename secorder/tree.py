"""Pytree algebra on optree: the one place in secorder that flattens a pytree.

Parameters, tangents and diagonals are pytrees of tensors: dicts (a model's
``named_parameters``), lists, tuples, namedtuples and nested mixes of them.
Everything else in the package goes through the helpers below, so the rules for
what counts as a leaf live in one module.

Example:
    >>> import torch
    >>> from secorder import tree
    >>> a = {"w": torch.ones(2, 3), "b": [torch.zeros(3)]}
    >>> tree.size(a)
    9
    >>> float(tree.vdot(a, tree.scale(a, 2.0)))
    12.0
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence, Tuple

import optree
import torch
from torch import Tensor

from .wrappers import is_dtensor

PyTree = Any
TreeSpec = optree.PyTreeSpec

__all__ = [
    "PyTree",
    "TreeSpec",
    "flatten",
    "unflatten",
    "leaves",
    "structure",
    "paths",
    "tree_map",
    "vdot",
    "norm",
    "scale",
    "add",
    "sub",
    "axpy",
    "zeros_like",
    "random_like",
    "ravel",
    "size",
    "sizes",
    "check_like",
    "register_node",
]

_NAMESPACE = ""


def flatten(tree: PyTree) -> Tuple[List[Any], TreeSpec]:
    """Split ``tree`` into its list of leaves and a spec to rebuild it.

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> leaves, spec = tree.flatten({"b": torch.zeros(1), "a": torch.ones(2)})
        >>> [l.shape for l in leaves]
        [torch.Size([2]), torch.Size([1])]
    """
    return optree.tree_flatten(tree, namespace=_NAMESPACE)


def unflatten(spec: TreeSpec, leaves: Sequence[Any]) -> PyTree:
    """Rebuild a pytree from ``spec`` and a list of leaves (inverse of :func:`flatten`).

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> leaves, spec = tree.flatten((torch.ones(2), [torch.zeros(1)]))
        >>> tree.unflatten(spec, leaves)[1][0]
        tensor([0.])
    """
    return optree.tree_unflatten(spec, list(leaves))


def leaves(tree: PyTree) -> List[Any]:
    """The leaves of ``tree`` in flattening order.

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> len(tree.leaves({"a": torch.ones(2), "b": (torch.ones(1), torch.ones(3))}))
        3
    """
    return optree.tree_leaves(tree, namespace=_NAMESPACE)


def structure(tree: PyTree) -> TreeSpec:
    """The tree structure (spec) of ``tree`` without its leaves.

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> tree.structure([torch.ones(1), torch.ones(2)]).num_leaves
        2
    """
    return optree.tree_structure(tree, namespace=_NAMESPACE)


def paths(tree: PyTree) -> List[str]:
    """Readable names of the leaves, such as ``"['fc.weight']"`` or ``"[0][1]"``.

    Used to name a leaf in error messages and per-leaf reports; a bare tensor
    (the root itself) gets the empty string.

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> tree.paths({"w": torch.ones(1), "b": [torch.ones(1)]})
        ["['b'][0]", "['w']"]
    """
    raw = optree.tree_paths(tree, namespace=_NAMESPACE)
    return ["".join(f"[{k!r}]" for k in p) for p in raw]


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Apply ``fn`` leafwise to ``tree`` (and matching ``rest`` trees).

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> tree.tree_map(lambda x, y: x + y, [torch.ones(1)], [torch.ones(1)])
        [tensor([2.])]
    """
    return optree.tree_map(fn, tree, *rest, namespace=_NAMESPACE)


def vdot(a: PyTree, b: PyTree) -> Tensor:
    """Inner product ``sum_i <a_i, b_i>`` over all leaves, as a 0-dim tensor.

    Sharded leaves (``DTensor`` shards, as the transforms return for FSDP2 parameters)
    count once over the whole mesh: the local partial sums of every leaf are
    all-reduced together (:func:`secorder.shards.vdot`), so the result is a plain
    tensor, equal on every rank. Mixing a sharded and a plain leaf in one pair is a
    ``TypeError``.

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> float(tree.vdot([torch.tensor([1., 2.])], [torch.tensor([3., 4.])]))
        11.0
    """
    la, lb = leaves(a), leaves(b)
    if not la:
        raise ValueError("vdot of empty pytrees is undefined (no leaves)")
    if any(is_dtensor(t) for t in la + lb):
        from . import shards

        return shards.vdot(paths(a), la, lb)
    return torch.stack([(x * y).sum() for x, y in zip(la, lb)]).sum()


def norm(a: PyTree) -> Tensor:
    """The Euclidean norm over all leaves, ``sqrt(vdot(a, a))`` (sharded leaves summed over their mesh).

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> float(tree.norm({"a": torch.tensor([3.]), "b": torch.tensor([4.])}))
        5.0
    """
    return vdot(a, a).sqrt()


def scale(tree: PyTree, alpha: Any) -> PyTree:
    """Multiply every leaf by ``alpha`` (a number or broadcastable tensor).

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> tree.scale({"a": torch.ones(2)}, 3.0)
        {'a': tensor([3., 3.])}
    """
    return tree_map(lambda x: x * alpha, tree)


def add(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a + b``.

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> tree.add([torch.ones(1)], [torch.ones(1)])
        [tensor([2.])]
    """
    return tree_map(torch.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """Leafwise ``a - b``.

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> tree.sub([torch.ones(1)], [torch.ones(1)])
        [tensor([0.])]
    """
    return tree_map(torch.sub, a, b)


def axpy(alpha: Any, x: PyTree, y: PyTree) -> PyTree:
    """Leafwise ``alpha * x + y``.

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> tree.axpy(2.0, [torch.ones(1)], [torch.ones(1)])
        [tensor([3.])]
    """
    return tree_map(lambda xi, yi: alpha * xi + yi, x, y)


def zeros_like(tree: PyTree) -> PyTree:
    """A pytree of zeros shaped, typed and placed like ``tree``.

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> tree.zeros_like((torch.ones(2),))
        (tensor([0., 0.]),)
    """
    return tree_map(torch.zeros_like, tree)


_DISTRIBUTIONS = ("rademacher", "normal")


def random_like(
    tree: PyTree,
    distribution: str = "rademacher",
    *,
    generator: Optional[torch.Generator] = None,
    batch_shape: Tuple[int, ...] = (),
) -> PyTree:
    """Random tensors shaped like ``tree`` with ``batch_shape`` leading dims.

    ``distribution`` is ``"rademacher"`` (entries +-1 with equal probability) or
    ``"normal"`` (standard normal). Dtype and device follow each leaf.

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> g = torch.Generator().manual_seed(0)
        >>> r = tree.random_like({"w": torch.zeros(2, 3)}, generator=g, batch_shape=(4,))
        >>> r["w"].shape, bool(r["w"].abs().eq(1).all())
        (torch.Size([4, 2, 3]), True)
    """
    if distribution not in _DISTRIBUTIONS:
        raise ValueError(
            f"unknown distribution {distribution!r}; valid ones are {', '.join(_DISTRIBUTIONS)}"
        )

    def draw(x: Tensor) -> Tensor:
        shape = tuple(batch_shape) + tuple(x.shape)
        if distribution == "normal":
            return torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device)
        bits = torch.randint(0, 2, shape, generator=generator, device=x.device)
        return (2 * bits - 1).to(x.dtype)

    return tree_map(draw, tree)


def ravel(tree: PyTree) -> Tuple[Tensor, Callable[[Tensor], PyTree]]:
    """Concatenate all leaves into one flat vector; return it and its inverse.

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> flat, unravel = tree.ravel({"a": torch.ones(2, 2), "b": torch.zeros(1)})
        >>> flat.shape, unravel(flat)["a"].shape
        (torch.Size([5]), torch.Size([2, 2]))
    """
    leaf_list, spec = flatten(tree)
    shapes = [x.shape for x in leaf_list]
    counts = [x.numel() for x in leaf_list]
    flat = torch.cat([x.reshape(-1) for x in leaf_list]) if leaf_list else torch.zeros(0)

    def unravel(vec: Tensor) -> PyTree:
        if vec.shape != (sum(counts),):
            raise ValueError(f"expected a flat vector of shape ({sum(counts)},), got {tuple(vec.shape)}")
        parts = torch.split(vec, counts)
        return unflatten(spec, [p.reshape(s) for p, s in zip(parts, shapes)])

    return flat, unravel


def size(tree: PyTree) -> int:
    """Total number of scalar entries over all leaves.

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> tree.size([torch.ones(2, 3), torch.ones(4)])
        10
    """
    return sum(sizes(tree))


def sizes(tree: PyTree) -> List[int]:
    """Number of entries of each leaf, in flattening order.

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> tree.sizes([torch.ones(2, 3), torch.ones(4)])
        [6, 4]
    """
    return [x.numel() for x in leaves(tree)]


def check_like(value: PyTree, reference: PyTree, name: str) -> None:
    """Raise ``ValueError`` unless ``value`` has the structure and leaf shapes of ``reference``.

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> tree.check_like([torch.ones(2)], [torch.zeros(3)], "v")
        Traceback (most recent call last):
        ...
        ValueError: v[0] has shape (2,), expected (3,) like the differentiated argument
    """
    got_spec, ref_spec = structure(value), structure(reference)
    if got_spec != ref_spec:
        raise ValueError(
            f"{name} must have the same pytree structure as the differentiated argument: "
            f"expected {ref_spec}, got {got_spec}"
        )
    for path, v, r in zip(paths(value), leaves(value), leaves(reference)):
        if not isinstance(v, Tensor):
            raise TypeError(f"{name}{path} must be a tensor, got {type(v).__name__}")
        if v.shape != r.shape:
            raise ValueError(
                f"{name}{path} has shape {tuple(v.shape)}, expected {tuple(r.shape)} "
                "like the differentiated argument"
            )


def register_node(cls: type, flatten_fn: Callable[[Any], Tuple[List[Any], Any]],
                  unflatten_fn: Callable[[Any, List[Any]], Any], name: str) -> type:
    """Register ``cls`` as a pytree node, for secorder's trees and ``torch.utils._pytree`` (``vmap``).

    ``flatten_fn(obj) -> (children, aux)`` and ``unflatten_fn(aux, children) -> obj``;
    ``aux`` is static (hashable is not required). ``name`` is the serialised type
    name (``module.Class``).

    Example:
        >>> import torch
        >>> from secorder import tree
        >>> class Pair:
        ...     def __init__(self, a, b, tag):
        ...         self.a, self.b, self.tag = a, b, tag
        >>> _ = tree.register_node(Pair, lambda p: ([p.a, p.b], p.tag), lambda tag, ch: Pair(*ch, tag),
        ...                        "doctest.Pair")
        >>> doubled = tree.tree_map(lambda t: 2 * t, Pair(torch.ones(1), torch.zeros(1), "x"))
        >>> doubled.a, doubled.tag
        (tensor([2.]), 'x')
    """
    import torch.utils._pytree as torch_pytree

    optree.register_pytree_node(
        cls, lambda obj: tuple(flatten_fn(obj)), lambda aux, children: unflatten_fn(aux, list(children)),
        namespace=getattr(optree.registry, "__GLOBAL_NAMESPACE"),
    )
    torch_pytree.register_pytree_node(
        cls, lambda obj: (lambda out: (list(out[0]), out[1]))(flatten_fn(obj)),
        lambda children, aux: unflatten_fn(aux, list(children)), serialized_type_name=name,
    )
    return cls

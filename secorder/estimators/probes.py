"""Random probe vectors for the stochastic estimators, and where their randomness comes from.

A probe batch is a list of tensors, one per leaf, each with a leading probe
dimension: ``[(k, *leaf.shape) for leaf in templates]``. Every distribution
below has ``E[v v^T] = I`` over the concatenated leaves, which is all that
Hutchinson-type estimators need to be unbiased:

* ``"rademacher"``: i.i.d. entries ``+-1`` (the lowest-variance choice for the
  trace, Hutchinson 1989),
* ``"normal"``: i.i.d. standard normal entries (Girard 1989),
* ``"sphere"``: uniform on the sphere of radius ``sqrt(n)`` in the full
  ``n``-dimensional space (a normal vector normalised over all leaves jointly),
* ``"sparse"``: each entry is zero with probability ``1 - density`` and
  ``+-1/sqrt(density)`` otherwise (the legacy ``sparse=True`` probes).

A *sampler* is any callable ``sampler(k) -> probe batch``; every estimator
accepts one in place of ``distribution``/``generator``.

Randomness: with ``generator=None`` the global RNG is used, so successive calls
draw fresh probes and ``torch.func.vmap(..., randomness="different")`` gives each
batch element its own probes. An explicit ``torch.Generator`` (or a ``seed``, see
:func:`make_generator`) makes the draw reproducible bit for bit on a device; in
torch 2.13 it also works under ``vmap`` with ``randomness="same"`` or
``"different"``.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["DISTRIBUTIONS", "Sampler", "draw_probes", "make_sampler", "make_generator", "check_distribution",
           "check_seed"]

DISTRIBUTIONS = ("rademacher", "normal", "sphere", "sparse")

Sampler = Callable[[int], List[Tensor]]


def check_distribution(distribution: str, density: float = 0.1) -> None:
    """Raise a clear error for an unknown ``distribution`` or a bad ``density``.

    Example:
        >>> check_distribution("uniform")
        Traceback (most recent call last):
        ...
        ValueError: unknown distribution 'uniform'; valid ones are 'rademacher', 'normal', 'sphere', 'sparse'
    """
    if not isinstance(distribution, str):
        raise TypeError(f"distribution must be a str, got {type(distribution).__name__}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown distribution {distribution!r}; valid ones are {', '.join(map(repr, DISTRIBUTIONS))}"
        )
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float in (0, 1], got {type(density).__name__}")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")


def make_generator(
    seed: Optional[int], generator: Optional[torch.Generator], device: torch.device
) -> Optional[torch.Generator]:
    """The generator for one call: a fresh one seeded with ``seed``, ``generator`` itself, or None.

    ``seed`` gives the same probes on every call; ``generator`` is used and
    advanced (reproducible from its initial state); neither means the global RNG.

    Example:
        >>> import torch
        >>> g = make_generator(0, None, torch.device("cpu"))
        >>> torch.randn(2, generator=g).equal(torch.randn(2, generator=make_generator(0, None, "cpu")))
        True
    """
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator
    if seed is None:
        return None
    check_seed(seed)
    if torch.device(device).type == "meta":
        return None  # meta tensors carry no data: there is nothing to draw reproducibly
    return torch.Generator(device=device).manual_seed(seed)


# The range torch.Generator.manual_seed accepts.
_SEED_MIN, _SEED_MAX = -(2**63), 2**64 - 1


def check_seed(seed: object) -> None:
    """``seed`` must be an int that ``torch.Generator.manual_seed`` accepts.

    Example:
        >>> check_seed(2**64)
        Traceback (most recent call last):
        ...
        ValueError: seed must be in [-2**63, 2**64 - 1] (what torch.Generator.manual_seed accepts), got 18446744073709551616
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not _SEED_MIN <= seed <= _SEED_MAX:
        raise ValueError(
            f"seed must be in [-2**63, 2**64 - 1] (what torch.Generator.manual_seed accepts), got {seed}"
        )


def _rademacher(shape, generator, like: Tensor) -> Tensor:
    bits = torch.randint(0, 2, shape, generator=generator, device=like.device, dtype=torch.int8)
    return (2 * bits - 1).to(like.dtype)


def draw_probes(
    templates: Sequence[Tensor],
    num: int,
    distribution: str = "rademacher",
    *,
    generator: Optional[torch.Generator] = None,
    density: float = 0.1,
) -> List[Tensor]:
    """``num`` probes shaped like ``templates`` (leading probe dim), with ``E[v v^T] = I``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> V = draw_probes([torch.zeros(2, 3), torch.zeros(4)], 5, "sphere", generator=g)
        >>> [v.shape for v in V]
        [torch.Size([5, 2, 3]), torch.Size([5, 4])]
        >>> torch.allclose(sum(v.flatten(1).pow(2).sum(1) for v in V), torch.full((5,), 10.))
        True
    """
    check_distribution(distribution, density)
    shapes = [(num,) + tuple(t.shape) for t in templates]
    if distribution == "rademacher":
        return [_rademacher(s, generator, t) for s, t in zip(shapes, templates)]
    if distribution == "sparse":
        out = []
        for s, t in zip(shapes, templates):
            keep = torch.rand(s, generator=generator, device=t.device) < density
            out.append(_rademacher(s, generator, t) * keep.to(t.dtype) / math.sqrt(density))
        return out
    normals = [torch.randn(s, generator=generator, device=t.device, dtype=t.dtype) for s, t in zip(shapes, templates)]
    if distribution == "normal":
        return normals
    n = sum(t.numel() for t in templates)
    sq = sum(v.reshape(num, -1).pow(2).sum(dim=1) for v in normals)
    factor = math.sqrt(n) / sq.sqrt()
    return [v * factor.reshape((num,) + (1,) * (v.dim() - 1)) for v in normals]


def make_sampler(
    templates: Sequence[Tensor],
    distribution: str = "rademacher",
    *,
    generator: Optional[torch.Generator] = None,
    density: float = 0.1,
) -> Sampler:
    """A sampler ``k -> probes`` over ``templates`` (see :func:`draw_probes`).

    Example:
        >>> import torch
        >>> sampler = make_sampler([torch.zeros(3)], "sparse", density=0.5,
        ...                        generator=torch.Generator().manual_seed(0))
        >>> sampler(2)[0].abs().unique().tolist()  # entries are 0 or 1/sqrt(0.5)
        [0.0, 1.4142135381698608]
    """
    check_distribution(distribution, density)
    templates = list(templates)
    return lambda k: draw_probes(templates, k, distribution, generator=generator, density=density)

"""K-FAC and EK-FAC as curvatures of the operator layer: ``curvature="kfac"`` / ``"ekfac"`` everywhere.

:func:`build` computes ``K`` for the call (:mod:`secorder.kronecker.compute`; a
data-set loss directly, its factors summed over the batches and ranks) and wraps
it as a :class:`~secorder.operators.base.LeafOperator`: the batched products are
``K``'s, and ``diagonal`` tells the exact estimators the diagonal from the
factors, so ``so.trace(f, curvature="kfac")`` and ``so.diagonal`` cost no
products. The registered names use ``fisher_type="type-2"`` and
``kfac_approx="expand"``; :func:`kfac_curvature` configures other options.

Example:
    >>> import torch, secorder as so
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    >>> f = so.functional_loss(model, torch.nn.CrossEntropyLoss())
    >>> params, x, y = so.params_dict(model), torch.randn(8, 3), torch.randint(0, 2, (8,))
    >>> torch.allclose(so.trace(f, curvature="kfac")(params, x, y), so.kfac(f)(params, x, y).trace())
    True
    >>> curvature = so.kfac_curvature("ekfac", fisher_type="empirical", kfac_approx="reduce")
    >>> so.trace_estimate(f, curvature=curvature, method="hutchinson", num_samples=4, seed=0)(params, x, y).value > 0
    tensor(True)
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from .. import tree
from ..operators import Curvature, LeafOperator
from .compute import compute
from .transform import check_f, check_options

__all__ = ["build", "kfac_curvature"]


def build(problem: Any, *, method: str = "kfac", fisher_type: str = "type-2", kfac_approx: str = "expand",
          chunk_size: Optional[int] = None, other: str = "error", mc_samples: int = 1,
          generator: Optional[torch.Generator] = None) -> LeafOperator:
    """The K-FAC (``method="kfac"``) or EK-FAC operator of the call ``problem`` (module docstring)."""
    if isinstance(problem.argnums, bool) or problem.argnums != 0:
        raise ValueError(f"curvature={method!r} is a curvature of the layers' parameters, the first argument of "
                         f"f: argnums must be 0, got {problem.argnums!r}")
    check_f(problem.f, 0)
    mc_samples = mc_samples if fisher_type == "mc" else 1  # make_operator's contract: others ignore it
    opts = check_options(fisher_type, kfac_approx, mc_samples, None, None, chunk_size, ekfac=method == "ekfac",
                         other=other)
    info = dict(method=method, fisher_type=fisher_type, kfac_approx=kfac_approx, mc_samples=mc_samples)
    K = compute(problem.f, problem.args, problem.kwargs, opts, ekfac=method == "ekfac", generator=generator,
                info=info)
    return LeafOperator(templates=list(problem.leaves), matvec=K.matvec_leaves, block_matvec=K.block_matvec,
                        psd=True, diagonal=lambda chunk_size=None: tree.leaves(K.diagonal()))


def kfac_curvature(method: str = "kfac", *, fisher_type: str = "type-2", kfac_approx: str = "expand",
                   chunk_size: Optional[int] = None, other: str = "error") -> Curvature:
    """A configured K-FAC or EK-FAC curvature, for ``curvature=`` of every transform.

    ``curvature="kfac"`` and ``"ekfac"`` are these with the defaults. With
    ``fisher_type="mc"`` the curvature is random: the transforms' ``mc_samples``,
    ``seed`` and ``generator`` then draw its labels.

    Args:
        method: ``"kfac"`` or ``"ekfac"``.
        fisher_type: as in :func:`secorder.kfac`.
        kfac_approx: as in :func:`secorder.kfac`.
        chunk_size: output columns per backward pass, as in :func:`secorder.kfac`.
        other: as in :func:`secorder.kfac`.

    Returns:
        A :class:`secorder.operators.Curvature`.

    Example:
        >>> import torch, secorder as so
        >>> model = torch.nn.Linear(3, 2)
        >>> f = so.functional_loss(model, torch.nn.CrossEntropyLoss())
        >>> params, x, y = so.params_dict(model), torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> mc = so.kfac_curvature(fisher_type="mc")
        >>> d = so.diagonal(f, curvature=mc, mc_samples=100, seed=0)(params, x, y)
        >>> {k: tuple(v.shape) for k, v in d.items()}
        {'weight': (2, 3), 'bias': (2,)}
    """
    if method not in ("kfac", "ekfac"):
        raise ValueError(f"unknown method {method!r}; valid are 'kfac', 'ekfac'")
    check_options(fisher_type, kfac_approx, 1, None, None, chunk_size, ekfac=method == "ekfac", other=other)
    summary = f"{method.upper().replace('EK', 'EK-').replace('KFAC', 'K-FAC')} ({fisher_type}, {kfac_approx})"
    return Curvature(method, functools.partial(build, method=method, fisher_type=fisher_type, kfac_approx=kfac_approx,
                                               chunk_size=chunk_size, other=other),
                     needs_split=True, sampled=fisher_type == "mc", summary=summary, own_datasets=True,
                     own_diagonal=True)

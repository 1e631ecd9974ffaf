"""Curvature operators: one module per curvature, one registry, one entry point.

:func:`make_operator` is the one place that turns a call into an operator; the
transforms, the spectra and the data-set layer call it. Its contract:

``make_operator(curvature, problem, *, mc_samples=1, generator=None) -> LeafOperator``

* ``curvature``: a registered name, :func:`names` lists them: ``"hessian"``,
  ``"ggn"``, ``"fisher"`` (Monte-Carlo), ``"empirical_fisher"``, ``"kfac"``,
  ``"ekfac"``; or a configured :class:`Curvature` (``so.kfac_curvature(...)``).
* ``problem``: a :class:`secorder.problem.Problem` (one call of ``f``: the
  differentiated leaves, ``f`` of them, and for the last three curvatures the
  model/loss split of a :class:`secorder.FunctionalLoss`; a ``TypeError`` saying
  how to build one otherwise).
* ``mc_samples``/``generator``: the Monte-Carlo Fisher's label draws per sample,
  and their source (``None``: the global RNG); the labels are drawn here, when the
  operator is made, so a caller that also draws probes from the same generator
  draws the labels first. Other curvatures ignore both.
* The result's ``templates`` are the problem's leaves (same order, shapes, dtypes,
  devices); ``matvec`` and ``block_matvec`` are batched over a leading probe dim,
  compose with ``vmap``/``grad`` around the caller, and reuse one linearisation
  (forward/backward pass at the primal point) for all the call's products;
  ``psd`` says whether the operator is known to be positive semi-definite.
* A data-set loss (:func:`secorder.dataset_loss`) gets the operator of
  :mod:`secorder.operators.dataset`: every product is one pass over its data.
* Errors: ``ValueError`` for an unknown curvature (listing the valid ones) and
  for a loss without known predictive distribution (Fishers; naming the
  supported losses); ``TypeError``/``ValueError`` for ``mc_samples`` that is not
  an int >= 1.

Adding a curvature is one module with a ``build(problem, *, mc_samples, generator)``
and one :func:`register` call below.

Example:
    >>> import torch, secorder as so
    >>> from secorder.problem import Problem
    >>> model = torch.nn.Linear(2, 1, bias=False)
    >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
    >>> problem = Problem(f, 0, False, ({"weight": torch.ones(1, 2)}, torch.tensor([[1., 2.]]), torch.zeros(1, 1)))
    >>> op = make_operator("ggn", problem)
    >>> op.matvec([torch.eye(2).reshape(2, 1, 2)])[0], op.psd
    (tensor([[[2., 4.]],
    <BLANKLINE>
            [[4., 8.]]]), True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch

from . import dataset, empirical_fisher, fisher, ggn, hessian
from .base import LeafOperator
from .hessian import hessian_operator
from ..dataset import is_dataset_loss
from ..registry import Registry

__all__ = ["LeafOperator", "hessian_operator", "Curvature", "register", "names", "get", "make_operator",
           "check_curvature", "check_mc_samples", "CURVATURES"]


@dataclass(frozen=True)
class Curvature:
    """A registered curvature: its name, builder and what it needs.

    Fields:
        name: the ``curvature=`` value.
        build: ``build(problem, *, mc_samples, generator) -> LeafOperator``.
        needs_split: whether ``f`` must be a :class:`secorder.FunctionalLoss`.
        sampled: whether the operator itself is random (draws with ``generator``).
        summary: one line for the docs.
        own_datasets: ``build`` takes a data-set loss itself (its factors are sums
            over the batches, not a sum of per-batch operators: K-FAC).
        own_diagonal: the operator gives its exact diagonal without products
            (``LeafOperator.diagonal``; what :func:`secorder.explain` counts).
    """

    name: str
    build: Callable[..., LeafOperator]
    needs_split: bool
    sampled: bool
    summary: str
    own_datasets: bool = False
    own_diagonal: bool = False


CURVATURES: Registry = Registry("curvature")


def register(curvature: Curvature, *, replace: bool = False) -> None:
    """Add ``curvature`` to the registry (its name must be new, unless ``replace=True``).

    Example:
        >>> register(get("hessian"))
        Traceback (most recent call last):
        ...
        ValueError: curvature 'hessian' is already registered; pass replace=True to replace it
    """
    if not isinstance(curvature, Curvature):
        raise TypeError(f"curvature must be a secorder.operators.Curvature, got {type(curvature).__name__}")
    CURVATURES.register(curvature.name, curvature, replace=replace)


def names() -> Tuple[str, ...]:
    """The registered curvature names, in registration order.

    Example:
        >>> names()
        ('hessian', 'ggn', 'fisher', 'empirical_fisher', 'kfac', 'ekfac')
    """
    return tuple(CURVATURES.names())


def check_curvature(curvature: Any) -> Curvature:
    """The registered :class:`Curvature` named ``curvature``, or a clear error.

    Example:
        >>> check_curvature("gauss-newton")
        Traceback (most recent call last):
        ...
        ValueError: unknown curvature 'gauss-newton'; valid curvatures are 'hessian', 'ggn', 'fisher', 'empirical_fisher', 'kfac', 'ekfac'
    """
    if isinstance(curvature, Curvature):  # a configured curvature, such as so.kfac_curvature(...)
        return curvature
    if not isinstance(curvature, str):
        raise TypeError(f"curvature must be a str, got {type(curvature).__name__}")
    return CURVATURES.get(curvature)


get = check_curvature


def check_mc_samples(mc_samples: Any) -> int:
    """``mc_samples`` must be an int >= 1.

    Example:
        >>> check_mc_samples(0)
        Traceback (most recent call last):
        ...
        ValueError: mc_samples must be an int >= 1, got 0
    """
    if isinstance(mc_samples, bool) or not isinstance(mc_samples, int):
        raise TypeError(f"mc_samples must be an int >= 1, got {type(mc_samples).__name__}")
    if mc_samples < 1:
        raise ValueError(f"mc_samples must be an int >= 1, got {mc_samples}")
    return mc_samples


def make_operator(
    curvature: str,
    problem: Any,
    *,
    mc_samples: int = 1,
    generator: Optional[torch.Generator] = None,
) -> LeafOperator:
    """The ``curvature`` of the call ``problem`` as a :class:`LeafOperator` (contract in the module docstring).

    Args:
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"`` or ``"empirical_fisher"``.
        problem: the call's :class:`secorder.problem.Problem`.
        mc_samples: label draws per sample (``"fisher"`` only), an int >= 1.
        generator: the source of the labels (``"fisher"`` only); ``None`` for the global RNG.

    Returns:
        The operator on the problem's leaves.
    """
    entry = check_curvature(curvature)
    check_mc_samples(mc_samples)
    if is_dataset_loss(getattr(problem, "f", None)) and not entry.own_datasets:
        # per-batch operators summed over the data (and ranks)
        # by name when registered: the ranks' handshake compares the call's text (an entry's repr holds addresses)
        key = entry.name if CURVATURES.lookup(entry.name) is entry else entry
        return dataset.build(key, problem, mc_samples=mc_samples, generator=generator)
    return entry.build(problem, mc_samples=mc_samples, generator=generator)


register(Curvature("hessian", hessian.build, needs_split=False, sampled=False,
                   summary="the Hessian of f"))
register(Curvature("ggn", ggn.build, needs_split=True, sampled=False,
                   summary="the generalised Gauss-Newton J^T H_L J (any loss_fn)"))
register(Curvature("fisher", fisher.build, needs_split=True, sampled=True,
                   summary="the Monte-Carlo Fisher: labels drawn from the model (mc_samples per sample)"))
register(Curvature("empirical_fisher", empirical_fisher.build, needs_split=True, sampled=False,
                   summary="the empirical Fisher: per-sample gradient outer products"))


def _kronecker(name: str) -> Callable[..., LeafOperator]:
    def build(problem: Any, *, mc_samples: int = 1, generator: Optional[torch.Generator] = None) -> LeafOperator:
        from ..kronecker.operator import build as kronecker_build  # the transform layer's package: imported late

        return kronecker_build(problem, method=name, mc_samples=mc_samples, generator=generator)

    return build


register(Curvature("kfac", _kronecker("kfac"), needs_split=True, sampled=False, own_datasets=True,
                   summary="K-FAC (type-2, expand; so.kfac_curvature for other options): Kronecker factors per layer"))
register(Curvature("ekfac", _kronecker("ekfac"), needs_split=True, sampled=False, own_datasets=True,
                   summary="EK-FAC (type-2, expand): K-FAC's eigenbasis with per-sample corrected eigenvalues"))

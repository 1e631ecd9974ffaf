"""``so.kfac`` and ``so.ekfac``: Kronecker-factored curvature as transforms.

Both take ``f`` (a :class:`secorder.FunctionalLoss`, or a data-set loss of one) and
options, validate them once, and return ``fn(*args) -> K``, a
:class:`~secorder.kronecker.result.KroneckerCurvature` of the curvature of ``f``
with respect to ``params = args[0]`` (:mod:`secorder.kronecker.compute`).
Conventions, names and scaling are curvlinops 3.0.1's ``KFACLinearOperator`` /
``EKFACLinearOperator`` (weight and bias as separate blocks, a mean loss scaled
by the number of its terms), so numbers can be checked against it directly.

References:
    Martens, J., Grosse, R. (2015). Optimizing neural networks with Kronecker-factored
    approximate curvature. ICML.
    George, T., Laurent, C., Bouthillier, X., Ballas, N., Vincent, P. (2018). Fast
    approximate natural gradient descent in a Kronecker-factored eigenbasis. NeurIPS.
    Eschenhagen, R., Immer, A., Turner, R. E., Schneider, F., Hennig, P. (2023).
    Kronecker-factored approximate curvature for modern neural network architectures. NeurIPS.
    Benzing, F. (2022). Gradient descent on neurons and its link to approximate
    second-order optimization. ICML (``fisher_type="forward-only"``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .. import _checks
from ..dataset import is_dataset_loss
from ..estimators.probes import make_generator
from ..estimators.registry import check_random_source
from ..modules import FunctionalLoss
from ..operators import check_mc_samples
from ..transformed import Transformed, signature_of
from .collect import Options
from .columns import FISHER_TYPES
from .compute import compute
from .result import KroneckerCurvature

__all__ = ["kfac", "ekfac", "KFAC_APPROX", "FISHER_TYPES", "EKFAC_FISHER_TYPES", "check_f", "check_options"]

KFAC_APPROX = ("expand", "reduce")
EKFAC_FISHER_TYPES = ("type-2", "mc", "empirical")


def _choice(value: Any, valid: tuple, name: str, what: str = "") -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {', '.join(map(repr, valid))}; got {type(value).__name__}")
    if value not in valid:
        raise ValueError(f"unknown {name} {value!r}{what}; valid are {', '.join(map(repr, valid))}")
    return value


def check_f(f: Any, argnums: Any) -> None:
    """``f`` must be a :class:`secorder.FunctionalLoss` (or a data-set loss of one) and ``argnums`` 0."""
    if not callable(f):
        raise TypeError(f"f must be callable, got {type(f).__name__}")
    per_batch = f.f if is_dataset_loss(f) else f
    if not isinstance(per_batch, FunctionalLoss):
        raise TypeError(
            "K-FAC needs the split of f into model and loss: build f with so.functional_loss(model, loss_fn) "
            "(an nn.Module or a function model(params, inputs) that calls F.linear / F.conv*d / F.embedding), "
            f"optionally inside so.dataset_loss; got f of type {type(f).__name__}")
    if isinstance(argnums, bool) or argnums != 0:
        raise ValueError(f"K-FAC is a curvature of the layers' parameters, the first argument of f: argnums must "
                         f"be 0, got {argnums!r}")


OTHER = ("error", "diagonal")


def check_options(fisher_type: Any, kfac_approx: Any, mc_samples: Any, seed: Any, generator: Any, chunk_size: Any,
                  *, ekfac: bool, other: Any = "error") -> Options:
    """Validate the options of :func:`kfac` / :func:`ekfac` (at creation); return the collection options.

    Example:
        >>> check_options("fisher", "expand", 1, None, None, None, ekfac=False)
        Traceback (most recent call last):
        ...
        ValueError: unknown fisher_type 'fisher'; valid are 'type-2', 'mc', 'empirical', 'forward-only'
    """
    valid = EKFAC_FISHER_TYPES if ekfac else FISHER_TYPES
    _choice(fisher_type, valid, "fisher_type", " for EK-FAC (its corrections need gradients)"
            if ekfac and fisher_type == "forward-only" else "")
    _choice(kfac_approx, KFAC_APPROX, "kfac_approx")
    check_mc_samples(mc_samples)
    if mc_samples != 1 and fisher_type != "mc":
        raise ValueError(f"mc_samples applies to fisher_type='mc' only, got mc_samples={mc_samples} with "
                         f"fisher_type={fisher_type!r}")
    check_random_source(seed, generator)
    if (seed is not None or generator is not None) and fisher_type != "mc":
        raise ValueError(f"seed and generator apply to fisher_type='mc' only (the labels it draws); "
                         f"fisher_type={fisher_type!r} draws nothing")
    _checks.check_chunk_size(chunk_size)
    _choice(other, OTHER, "other")
    if other == "diagonal" and fisher_type == "forward-only":
        raise ValueError("other='diagonal' takes the exact diagonal of the curvature that fisher_type approximates; "
                         "fisher_type='forward-only' approximates none: leave the other parameters out of params")
    return Options(fisher_type, kfac_approx, mc_samples, chunk_size, other)


def _transform(f: Any, argnums: Any, fisher_type: Any, kfac_approx: Any, mc_samples: Any, seed: Any,
               generator: Any, chunk_size: Any, other: Any, ekfac: bool) -> Callable[..., KroneckerCurvature]:
    check_f(f, argnums)
    opts = check_options(fisher_type, kfac_approx, mc_samples, seed, generator, chunk_size, ekfac=ekfac, other=other)
    info = dict(method="ekfac" if ekfac else "kfac", fisher_type=fisher_type, kfac_approx=kfac_approx,
                mc_samples=mc_samples)
    if other != "error":
        info["other"] = other

    @torch.compiler.disable
    def run(args: tuple, kwargs: dict) -> KroneckerCurvature:
        if not args:
            raise TypeError("the transformed function takes f's arguments: (params, inputs, targets[, buffers]), "
                            "or (params) for a data-set loss")
        device = next((t.device for t in _leaves(args[0])), torch.device("cpu"))
        gen = make_generator(seed, generator, device) if fisher_type == "mc" else None
        return compute(f, args, kwargs, opts, ekfac=ekfac, generator=gen, info=info)

    def fn(*args: Any, **kwargs: Any) -> KroneckerCurvature:
        return run(args, kwargs)

    return Transformed(fn, f, info["method"], signature_of(f))


def _leaves(params: Any):
    from .. import tree

    return [t for t in tree.leaves(params) if isinstance(t, torch.Tensor)]


def kfac(
    f: Callable[..., Any],
    argnums: int = 0,
    *,
    fisher_type: str = "type-2",
    kfac_approx: str = "expand",
    mc_samples: int = 1,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    other: str = "error",
) -> Callable[..., KroneckerCurvature]:
    """K-FAC transform: ``kfac(f)(params, inputs, targets)`` is the Kronecker-factored curvature ``K``.

    Per layer that calls ``F.linear`` (``Linear`` on inputs of any shape),
    ``F.conv1d/2d/3d`` or ``F.embedding`` with a weight or bias in ``params``, the
    input-covariance factor ``A`` and the output-gradient factor ``G``, from one
    forward pass and one batched backward pass (per chunk of ``chunk_size`` output
    columns), whatever the model's wiring around those layers. Every parameter in
    ``params`` must belong to such a layer (a ``ValueError`` lists the others:
    leave them out of ``params`` and they are constants), unless
    ``other="diagonal"``.

    Args:
        f: ``so.functional_loss(model, loss_fn)`` (an ``nn.Module`` or a function
            ``model(params, inputs)``), or ``so.dataset_loss`` of one: the factors
            are then sums over its batches (and ranks), equal to one big batch's.
        argnums: must be 0 (``params``).
        fisher_type: ``"type-2"`` (default: the loss Hessian's ``C`` square-root
            columns, the GGN's K-FAC), ``"mc"`` (``mc_samples`` labels drawn from the
            model per sample), ``"empirical"`` (the gradients) or ``"forward-only"``
            (``G = I``; any loss).
        kfac_approx: ``"expand"`` (default) or ``"reduce"``: how weight sharing over
            sequence positions and convolution patches enters (Eschenhagen et al. 2023).
        mc_samples: label draws per sample (``fisher_type="mc"`` only).
        seed: seeds the labels' generator on every call (``"mc"`` only).
        generator: a ``torch.Generator`` for the labels instead (``"mc"`` only).
        chunk_size: output columns per batched backward pass (memory bound; ``None``:
            as many as fit a fixed activation budget), and one-hot columns per
            product for ``other="diagonal"``.
        other: ``"error"`` (default): parameters used outside K-FAC layers (a
            ``LayerNorm``'s) are refused, listed; ``"diagonal"``: they get the exact
            diagonal of the curvature that ``fisher_type`` approximates (the GGN for
            ``"type-2"``, the Monte-Carlo Fisher for ``"mc"``, the empirical Fisher for
            ``"empirical"``; one-hot products, as many as they have entries), each a
            layer of kind ``"diagonal (ggn)"`` etc. in ``K.layers``.

    Returns:
        A function of ``f``'s arguments returning a
        :class:`~secorder.KroneckerCurvature` (printable: layers, fisher_type,
        kfac_approx; its ``info`` says how it was computed).

    Example:
        >>> import torch, secorder as so
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),
        ...                             torch.nn.Linear(8, 3))
        >>> f = so.functional_loss(model, torch.nn.CrossEntropyLoss())
        >>> params, x, y = so.params_dict(model), torch.randn(4, 1, 4, 4), torch.randint(0, 3, (4,))
        >>> K = so.kfac(f, fisher_type="empirical")(params, x, y)
        >>> K
        KroneckerCurvature(kfac, 2 layers (1 Conv2d, 1 Linear), 47 parameters, fisher_type='empirical', kfac_approx='expand')
        >>> [tuple(layer.A.shape) + tuple(layer.G.shape) for layer in K.layers]
        [(9, 9, 2, 2), (8, 8, 3, 3)]
    """
    return _transform(f, argnums, fisher_type, kfac_approx, mc_samples, seed, generator, chunk_size, other, False)


def ekfac(
    f: Callable[..., Any],
    argnums: int = 0,
    *,
    fisher_type: str = "type-2",
    kfac_approx: str = "expand",
    mc_samples: int = 1,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    other: str = "error",
) -> Callable[..., KroneckerCurvature]:
    """EK-FAC transform: K-FAC's eigenbasis with the eigenvalues refitted to the per-sample gradients.

    The K-FAC factors as in :func:`kfac`, their eigenvectors ``Q_A``, ``Q_G``, and a
    second pass for the corrected eigenvalues ``S = (1/(c w)) sum_n (Q_G^T g_n a_n^T
    Q_A)^2`` (George et al. 2018): the exact diagonal of the curvature in the
    Kronecker eigenbasis, per parameter block (the per-sample gradient
    ``g_n a_n^T`` summed over shared positions; with ``"type-2"`` per square-root
    column, with ``"mc"`` per draw). ``K`` then holds ``A``, ``G``, ``Q_A``, ``Q_G`` and
    ``S`` per layer. Every layer must see one row per sample; ``"type-2"`` needs one
    loss row per sample (outputs ``[N, C]``), while ``"mc"`` and ``"empirical"`` also
    take per-position losses (a sample's gradient sums its positions, as for
    sequence-level influence functions).

    Args:
        f: as in :func:`kfac`.
        argnums: must be 0.
        fisher_type: ``"type-2"`` (default), ``"mc"`` or ``"empirical"``.
        kfac_approx: as in :func:`kfac` (the eigenbasis only; the corrections use
            the per-sample gradients either way).
        mc_samples: as in :func:`kfac`.
        seed: as in :func:`kfac` (both passes draw the same labels).
        generator: as in :func:`kfac`.
        chunk_size: as in :func:`kfac`.
        other: as in :func:`kfac` (the diagonal is then its own exact eigenvalues).

    Returns:
        A function of ``f``'s arguments returning a :class:`~secorder.KroneckerCurvature`.

    Example:
        >>> import torch, secorder as so
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> f = so.functional_loss(model, torch.nn.CrossEntropyLoss())
        >>> params, x, y = so.params_dict(model), torch.randn(16, 3), torch.randint(0, 2, (16,))
        >>> K = so.ekfac(f)(params, x, y)
        >>> ggn = so.diagonal(f, curvature="ggn")(params, x, y)
        >>> torch.allclose(K.trace(), sum(d.sum() for d in ggn.values()))   # exact in its eigenbasis
        True
    """
    return _transform(f, argnums, fisher_type, kfac_approx, mc_samples, seed, generator, chunk_size, other, True)

"""``so.laplacian``: the Laplacian of a scalar function of its inputs, in one forward pass.

Physics-informed networks put ``Delta u(x)`` in their loss, score matching and
variational Monte Carlo the trace of an input Hessian; they train on it with
``grad`` over the parameters and ``vmap`` over collocation points. The forward
Laplacian (:mod:`secorder.forward_laplacian.forward`) computes it in one pass
at roughly the cost of propagating the input Jacobian, instead of one
Hessian-vector product per input dimension (``method="exact"``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

from .. import _checks
from ..transformed import Route, Transformed, record, signature_of
from .forward import forward_laplacian
from .jet import UncoveredOperation

__all__ = ["laplacian"]

logger = logging.getLogger("secorder.laplacian")

OWN_METHODS = ("auto", "forward")


def _package():
    import secorder  # the public transforms; imported when a transform is built (no import cycle)

    return secorder


def _trace_transform(f: Callable[..., Any], argnums: Any, has_aux: bool, chunk_size: Optional[int], method: str,
                     options: dict) -> Callable[..., Any]:
    """``so.trace(f, ...)`` for the methods it provides (``"exact"``, the stochastic ones)."""
    so = _package()
    try:
        so.trace(lambda *a: None, method=method)
    except ValueError as err:
        raise ValueError(
            f"unknown method {method!r} for laplacian; valid methods are 'auto' (the default: 'forward' with "
            f"a fallback to 'exact'), 'forward', and the methods of so.trace ({err})"
        ) from None
    return so.trace(f, argnums, has_aux=has_aux, chunk_size=chunk_size, method=method, **options)


def laplacian(
    f: Callable[..., Any],
    argnums: _checks.Argnums = 0,
    *,
    method: str = "auto",
    has_aux: bool = False,
    chunk_size: Optional[int] = None,
    num_samples: Optional[int] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    distribution: Optional[str] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    max_matvecs: Optional[int] = None,
) -> Callable[..., Any]:
    """Laplacian transform: ``laplacian(f)(*args)`` is the trace of the Hessian of ``f`` w.r.t. ``args[argnums]``.

    ``f`` returns a scalar; ``args[argnums]`` is a tensor or a pytree of
    floating-point tensors (a tuple ``argnums`` differentiates several
    arguments jointly), and the result is a 0-dim tensor. Per-point Laplacians
    come from ``torch.func.vmap``; the result is differentiable, so
    ``torch.func.grad`` of a loss that contains it w.r.t. parameters is the
    physics-informed training step; ``torch.compile`` runs it too.

    Methods:

    * ``"forward"``: the forward Laplacian (Li et al. 2023, as in JAX's folx;
      collapsed Taylor mode, Dangel et al. 2024): value, Jacobian w.r.t. the
      ``d`` input entries and Laplacian pushed through ``f`` together, one pass
      at about the cost of the Jacobian. It covers the operations listed in
      :mod:`secorder.forward_laplacian.rules` and raises
      :class:`~secorder.forward_laplacian.jet.UncoveredOperation` naming any
      other operation ``f`` applies to the input.
    * ``"auto"`` (default): ``"forward"``, falling back to ``"exact"`` for the
      whole call on an uncovered operation (logged at DEBUG level on the
      ``secorder.laplacian`` logger; ``last_method`` and
      ``last_fallback_reason`` on the returned function, a per-thread debug
      view, say which ran; :func:`secorder.explain` says which would run, by
      running the forward Laplacian: an operation is covered or not only once
      it is seen with its arguments).
      ``f`` runs again for the fallback.
    * ``"exact"``: :func:`secorder.trace` -- one Hessian-vector product per
      input entry; any ``f`` that ``torch.func`` differentiates twice.
    * a stochastic trace method of :func:`secorder.trace` (``"hutchinson"``,
      ``"hutch++"``, ``"xtrace"``, ...) with its options ``num_samples``,
      ``seed``, ``generator``, ``distribution``, ``rtol``, ``atol``,
      ``max_matvecs``: an estimate from random input directions, for inputs
      of high dimension.

    Args:
        f: the function; returns a scalar tensor (or ``(scalar, aux)`` with
            ``has_aux=True``).
        argnums: which positional argument(s) to differentiate (int or tuple).
        method: ``"auto"``, ``"forward"``, ``"exact"`` or a stochastic method.
        has_aux: ``f`` returns ``(scalar, aux)``; the transformed function then
            returns ``(laplacian, aux)``.
        chunk_size: input directions per pass (``"forward"``) or per batched
            Hessian-vector product (``"exact"``, stochastic probes). Memory
            scales with it. ``None``: all at once, except that on CPUs the
            forward Laplacian splits them after a first call so that each
            Jacobian stays below 24 MiB (see
            :mod:`secorder.forward_laplacian.forward`).
        num_samples, seed, generator, distribution, rtol, atol, max_matvecs:
            options of the stochastic methods, as in :func:`secorder.trace`
            (``None``: its default; given with another method, a ``ValueError``).

    Returns:
        A function of ``f``'s arguments returning the Laplacian, a 0-dim tensor
        of ``f``'s output dtype (and ``aux`` with ``has_aux=True``).

    Raises:
        ValueError: ``f`` returns a non-scalar (the message names its shape),
            ``argnums`` is out of range, ``method`` is unknown, or stochastic
            options come with a deterministic method.
        TypeError: a differentiated input is not a floating-point tensor.

    Example:
        >>> import torch, secorder as so
        >>> u = lambda x: torch.sin(x).sum() + (x ** 2).sum()     # Laplacian: 2 d - sum sin(x)
        >>> x = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
        >>> so.laplacian(u)(x)
        tensor(5.4527, dtype=torch.float64)
        >>> torch.allclose(so.laplacian(u)(x), 2 * 3 - torch.sin(x).sum())
        True
        >>> points = torch.randn(100, 3, dtype=torch.float64)
        >>> torch.func.vmap(so.laplacian(u))(points).shape       # one Laplacian per point
        torch.Size([100])
    """
    _checks.check_argnums(argnums)
    _checks.check_chunk_size(chunk_size)
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, got {type(method).__name__}")
    if not isinstance(has_aux, bool):
        raise TypeError(f"has_aux must be a bool, got {type(has_aux).__name__}")
    given = dict(num_samples=num_samples, seed=seed, generator=generator, distribution=distribution, rtol=rtol,
                 atol=atol, max_matvecs=max_matvecs)
    options = {k: v for k, v in given.items() if v is not None}  # None: so.trace's default (the method's own)
    if method in OWN_METHODS:
        if options:
            raise ValueError(
                f"{', '.join(options)} only apply to the stochastic methods; method={method!r} takes none of them"
            )
        fallback = _trace_transform(f, argnums, has_aux, chunk_size, "exact", {}) if method == "auto" else None
    else:
        fallback = _trace_transform(f, argnums, has_aux, chunk_size, method, options)

    sizes: dict = {}  # storage per direction seen, per input signature (the CPU default's pass size)

    def laplacian_fn(*args: Any) -> Any:
        if method not in OWN_METHODS:
            _record(fn, method, None)
            return fallback(*args)
        try:
            lap, aux = forward_laplacian(f, args, argnums, has_aux, chunk_size, sizes)
        except UncoveredOperation as err:
            if method == "forward":
                raise
            _record(fn, "exact", str(err))
            return fallback(*args)
        _record(fn, "forward", None)
        return (lap, aux) if has_aux else lap

    def explain(args: tuple, kwargs: dict) -> Any:
        from ..explain import Explanation

        if kwargs:
            raise TypeError(f"the laplacian function takes f's positional arguments only, got {sorted(kwargs)}")
        if method not in OWN_METHODS:
            return so_explain(fallback)(*args)._replace(transform=fn.__name__, engine=method)
        try:
            forward_laplacian(f, args, argnums, has_aux, chunk_size, {})
        except UncoveredOperation as err:
            if method == "forward":
                raise
            exact = so_explain(fallback)(*args)
            return Explanation(fn.__name__, "exact", str(err), exact.products, 0)
        return Explanation(fn.__name__, "forward", None, 0, 1)

    fn = Transformed(laplacian_fn, f, "laplacian", signature_of(f, keywords=False), explain)
    return fn


def so_explain(fn: Any) -> Any:
    from ..explain import explain

    return explain(fn)


def _record(fn: Callable, method: str, reason: Optional[str]) -> None:
    record(fn, Route(None, reason, method))
    if reason is not None:
        logger.debug("laplacian: %s; method='exact' runs for this call instead", reason)

"""The named shortcuts: ``hessian_diag``, ``hessian_diag_estimate``, ``ggn_diag``, ``ggn_trace``.

Each is the general transform with ``curvature`` fixed; every other option is passed
through unchanged (see :func:`secorder.diagonal` and :func:`secorder.trace`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from .. import _checks
from .quantities import diagonal, diagonal_estimate, trace

__all__ = ["hessian_diag", "hessian_diag_estimate", "ggn_diag", "ggn_trace"]


def _fixed(name: str, curvature: str, general: str, options: Dict[str, Any]) -> Dict[str, Any]:
    """``options`` without a ``curvature`` (the shortcut fixes it): a clear ``TypeError`` naming the general one."""
    if "curvature" in options:
        raise TypeError(
            f"so.{name} fixes curvature={curvature!r}; got curvature={options['curvature']!r}. For another "
            f"curvature use so.{general}(f, curvature={options['curvature']!r}, ...)")
    return options


def hessian_diag(f: Callable[..., Any], argnums: _checks.Argnums = 0, **options: Any) -> Callable[..., Any]:
    """Hessian diagonal transform: ``diagonal(f, argnums, curvature="hessian", **options)``.

    Args:
        f: a function returning a scalar tensor.
        argnums: which positional argument(s) to differentiate.
        **options: the keyword options of :func:`secorder.diagonal` (``method``,
            ``has_aux``, ``chunk_size``, ``engine``, ``num_samples``, ``seed``, ...).

    Returns:
        A function returning the Hessian diagonal, shaped like ``args[argnums]``.

    Example:
        >>> import torch, secorder as so
        >>> so.hessian_diag(lambda x: (x ** 3).sum())(torch.tensor([1., 2.]))
        tensor([ 6., 12.])
    """
    return diagonal(f, argnums, curvature="hessian", **_fixed("hessian_diag", "hessian", "diagonal", options))


def hessian_diag_estimate(f: Callable[..., Any], argnums: _checks.Argnums = 0, **options: Any) -> Callable[..., Any]:
    """Hessian diagonal estimate: ``diagonal_estimate(f, argnums, curvature="hessian", **options)``.

    Args:
        f: a function returning a scalar tensor.
        argnums: which positional argument(s) to differentiate.
        **options: the keyword options of :func:`secorder.diagonal_estimate`.

    Returns:
        A function returning a :class:`~secorder.results.DiagonalEstimate`.

    Example:
        >>> import torch, secorder as so
        >>> est = so.hessian_diag_estimate(lambda x: (x ** 4).sum() / 12, num_samples=4, seed=0)(torch.tensor([1., 2.]))
        >>> est.value, est.stderr
        (tensor([1., 4.]), tensor([0., 0.]))
    """
    options = _fixed("hessian_diag_estimate", "hessian", "diagonal_estimate", options)
    return diagonal_estimate(f, argnums, curvature="hessian", **options)


def ggn_diag(f: Callable[..., Any], argnums: _checks.Argnums = 0, **options: Any) -> Callable[..., Any]:
    """GGN diagonal transform: ``diagonal(f, argnums, curvature="ggn", **options)``.

    Args:
        f: made by :func:`secorder.functional_loss`.
        argnums: the model's parameters (0, default) and/or inputs (1).
        **options: the keyword options of :func:`secorder.diagonal`.

    Returns:
        A function of ``(params, inputs, targets)`` returning the GGN diagonal.

    Example:
        >>> import torch, secorder as so
        >>> model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> f = so.functional_loss(model, torch.nn.functional.cross_entropy)
        >>> params, x, y = so.params_dict(model), torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
        >>> d = so.ggn_diag(f)(params, x, y)
        >>> sorted(d) == sorted(params), all(bool((v >= 0).all()) for v in d.values())
        (True, True)
    """
    return diagonal(f, argnums, curvature="ggn", **_fixed("ggn_diag", "ggn", "diagonal", options))


def ggn_trace(f: Callable[..., Any], argnums: _checks.Argnums = 0, **options: Any) -> Callable[..., Any]:
    """GGN trace transform: ``trace(f, argnums, curvature="ggn", **options)``.

    Args:
        f: made by :func:`secorder.functional_loss`.
        argnums: the model's parameters (0, default) and/or inputs (1).
        **options: the keyword options of :func:`secorder.trace`.

    Returns:
        A function of ``(params, inputs, targets)`` returning the GGN trace.

    Example:
        >>> import torch, secorder as so
        >>> model = torch.nn.Linear(2, 1)
        >>> f = so.functional_loss(model, torch.nn.MSELoss(reduction="sum"))
        >>> so.ggn_trace(f)(so.params_dict(model), torch.ones(1, 2), torch.zeros(1, 1))
        tensor(6.)
    """
    return trace(f, argnums, curvature="ggn", **_fixed("ggn_trace", "ggn", "trace", options))

"""The result of stochastic Lanczos quadrature: a spectral density you can evaluate, integrate and plot.

The spectral density of a symmetric ``n x n`` matrix ``H`` with eigenvalues
``lambda_1..lambda_n`` is ``phi(t) = (1/n) sum_i delta(t - lambda_i)``. For a unit
probe ``v``, ``v^T g(H) v = sum_i (v^T u_i)^2 g(lambda_i)``, and ``m`` Lanczos steps
from ``v`` give the ``m``-node Gauss quadrature of that sum: nodes ``theta_j``
(the Ritz values) and weights ``tau_j`` (the squared first components of the
Ritz vectors of the tridiagonal matrix), exact for polynomials ``g`` of degree up to
``2m - 1`` (Golub and Meurant 1994). With random probes, ``E[(v^T u_i)^2] = 1/n``,
so the average over probes of ``sum_j tau_j delta(t - theta_j)`` is an unbiased
estimate of ``phi`` in that sense (Lin, Saad, Yang 2016; Ubaru, Chen, Saad 2017),
the estimator behind the Hessian spectra of Ghorbani, Krishnan, Xiao (2019) and
Papyan (2020).

:class:`SpectralDensity` holds those nodes and weights per probe (a ``NamedTuple``
of tensors, so a pytree that ``torch.func.vmap`` can return) and evaluates from
them:

* :meth:`~SpectralDensity.moment`: ``integral t^p phi(t) dt``, an unbiased estimate
  of ``tr(H^p) / n`` for ``p <= 2 m - 1`` (with Rademacher probes, ``p = 1`` is
  Hutchinson's estimate of the normalised trace); :meth:`~SpectralDensity.trace`
  is ``n`` times the first moment;
* :meth:`~SpectralDensity.density`: the density smoothed by a Gaussian kernel of
  width ``sigma`` on a grid (each node a Gaussian bump of its weight);
* :meth:`~SpectralDensity.plot`: that curve with matplotlib (the ``plot`` extra).

Default width: the span of all nodes divided by ``3 (m - 1)``, about the spacing
of ``m`` quadrature nodes spread over the spectrum, which is the width Papyan
(2020, appendix D.2) uses (``2 / ((m - 1) sqrt(8 log 3))`` on the spectrum
rescaled to ``[-1, 1]``). Pass ``sigma`` for a sharper or smoother curve.

References:
    Golub, G. H., Meurant, G. (1994). Matrices, moments and quadrature. Numerical
    Analysis 1993, Pitman Research Notes in Mathematics 303.
    Lin, L., Saad, Y., Yang, C. (2016). Approximating spectral densities of large
    matrices. SIAM Review 58(1).
    Ubaru, S., Chen, J., Saad, Y. (2017). Fast estimation of tr(f(A)) via stochastic
    Lanczos quadrature. SIAM J. Matrix Anal. Appl. 38(4).
    Ghorbani, B., Krishnan, S., Xiao, Y. (2019). An investigation into neural net
    optimization via Hessian eigenvalue density. ICML.
    Papyan, V. (2020). Traces of class/cross-class structure pervade deep learning
    spectra. JMLR 21.

Example:
    >>> import torch
    >>> d = SpectralDensity(nodes=torch.tensor([[1., 3.]]), weights=torch.tensor([[0.5, 0.5]]),
    ...                     dim=torch.tensor(4), num_matvecs=torch.tensor(2), num_steps=torch.tensor([2]))
    >>> d.moment(1), d.moment(2), d.trace()
    (tensor(2.), tensor(5.), tensor(8.))
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor

from .results import CarriesEngine

__all__ = ["SpectralDensity"]

_MARGIN = 0.05
_KERNEL_REACH = 3.0


def _checked_sigma_tensor(sigma: Tensor, nodes: Tensor) -> Tensor:
    """A tensor ``sigma`` validated as a float is: real, and every entry positive and finite.

    The values are checked where they can be read (a plain tensor, one host sync for a
    user-given argument); under ``torch.func`` transforms and ``torch.compile`` they cannot
    be, and a non-positive or non-finite entry gives ``nan`` densities instead of numbers.
    """
    if sigma.dtype == torch.bool or sigma.is_complex():
        raise TypeError(f"sigma must be a positive float or a real tensor, got a tensor of dtype {sigma.dtype}")
    s = sigma.to(dtype=nodes.dtype, device=nodes.device)
    if torch.compiler.is_compiling() or torch._C._functorch.is_functorch_wrapped_tensor(sigma):
        return torch.where((s > 0) & torch.isfinite(s), s, torch.full_like(s, math.nan))
    bad = ~((s > 0) & torch.isfinite(s))
    if bool(bad.any()):
        raise ValueError(f"sigma must be positive and finite, got a tensor of shape {tuple(sigma.shape)} with "
                         f"entries {s[bad].flatten()[:4].tolist()}")
    return s


class _SpectralDensity(NamedTuple):
    """Stochastic Lanczos quadrature nodes and weights of a symmetric matrix, per probe.

    Fields:
        nodes: ``(num_probes, m)``: the Ritz values of each probe's Lanczos run.
        weights: ``(num_probes, m)``: their quadrature weights; each row sums to 1.
        dim: 0-dim ``int64``: ``n``, the size of the matrix.
        num_matvecs: 0-dim ``int64``: matrix-vector products spent.
        num_steps: ``(num_probes,)`` ``int64``: the Krylov dimension each run reached
            before a breakdown, ``m`` when there was none. Smaller than ``m`` means
            that run found an invariant subspace: its quadrature is exact (its
            remaining nodes have weight zero).

    Under ``torch.func.vmap`` every field gains the leading batch dimensions, and
    :meth:`moment`, :meth:`trace` and :meth:`density` keep them.

    Example:
        >>> import torch
        >>> d = SpectralDensity(torch.tensor([[0., 2.]]), torch.tensor([[0.5, 0.5]]),
        ...                     torch.tensor(2), torch.tensor(2), torch.tensor([2]))
        >>> grid = torch.linspace(-1., 3., 5)
        >>> d.density(grid, sigma=0.5).round(decimals=4)
        tensor([0.0540, 0.3991, 0.1080, 0.3991, 0.0540])
    """

    nodes: Tensor
    weights: Tensor
    dim: Tensor
    num_matvecs: Tensor
    num_steps: Tensor

    def __repr__(self) -> str:
        """One line: size, probes, nodes per probe, the support of the nodes, the trace estimate, products spent.

        Example:
            >>> import torch
            >>> SpectralDensity(torch.tensor([[1., 3.]]), torch.tensor([[0.5, 0.5]]), torch.tensor(4),
            ...                 torch.tensor(2), torch.tensor([2]))
            SpectralDensity(dim=4, probes=1, nodes=2, support=[1, 3], trace=8, matvecs=2)
        """
        nodes = self.nodes
        batch = tuple(nodes.shape[:-2])
        head = f"SpectralDensity(batch={batch}, " if batch else "SpectralDensity("
        shape = (f"probes={nodes.shape[-2]}, nodes={nodes.shape[-1]}" if nodes.dim() >= 2
                 else f"nodes={tuple(nodes.shape)}")
        try:
            if batch or nodes.numel() == 0 or torch._C._functorch.is_functorch_wrapped_tensor(nodes):
                raise ValueError("no single summary")
            lo, hi, tr = float(nodes.min()), float(nodes.max()), float(self.trace())
            return (f"{head}dim={int(self.dim)}, {shape}, support=[{lo:.4g}, {hi:.4g}], trace={tr:.4g}, "
                    f"matvecs={int(self.num_matvecs)})")
        except Exception:  # a batched, traced or symbolic result: shapes only
            return f"{head}{shape}, dtype={nodes.dtype}, device={nodes.device})"

    __str__ = __repr__

    def moment(self, order: int) -> Tensor:
        """``integral t^order phi(t) dt``: an estimate of ``tr(H^order) / n`` (exact in expectation
        for ``order <= 2 m - 1``).

        Example:
            >>> import torch
            >>> d = SpectralDensity(torch.tensor([[-1., 1.]]), torch.tensor([[0.25, 0.75]]),
            ...                     torch.tensor(4), torch.tensor(2), torch.tensor([2]))
            >>> d.moment(0), d.moment(1), d.moment(3)
            (tensor(1.), tensor(0.5000), tensor(0.5000))
        """
        if isinstance(order, bool) or not isinstance(order, int):
            raise TypeError(f"order must be an int, got {type(order).__name__}")
        if order < 0:
            raise ValueError(f"order must be non-negative, got {order}")
        return (self.weights * self.nodes**order).sum(dim=-1).mean(dim=-1)

    def trace(self) -> Tensor:
        """``n`` times the first moment: the estimate of ``tr(H)``.

        Example:
            >>> import torch
            >>> SpectralDensity(torch.tensor([[2.]]), torch.tensor([[1.]]), torch.tensor(10),
            ...                 torch.tensor(1), torch.tensor([1])).trace()
            tensor(20.)
        """
        return self.dim.to(self.nodes.dtype) * self.moment(1)

    def default_sigma(self) -> Tensor:
        """The default kernel width: the span of the nodes over ``3 (m - 1)`` (see the module docstring).

        Falls back to ``1e-3`` times the largest node magnitude (or ``1e-3``) when all
        nodes coincide.

        Example:
            >>> import torch
            >>> d = SpectralDensity(torch.tensor([[0., 3., 6.]]), torch.ones(1, 3) / 3,
            ...                     torch.tensor(3), torch.tensor(3), torch.tensor([3]))
            >>> d.default_sigma()
            tensor(1.)
        """
        flat = self.nodes.flatten(-2)
        span = flat.amax(dim=-1) - flat.amin(dim=-1)
        m = self.nodes.shape[-1]
        sigma = span / (3.0 * max(m - 1, 1))
        fallback = torch.clamp(1e-3 * flat.abs().amax(dim=-1), min=1e-3)
        return torch.where(sigma > 0, sigma, fallback)

    def _sigma(self, sigma: Optional[float]) -> Tensor:
        if sigma is None:
            return self.default_sigma()
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float, Tensor)):
            raise TypeError(f"sigma must be a positive float, got {type(sigma).__name__}")
        if isinstance(sigma, Tensor):
            return _checked_sigma_tensor(sigma, self.nodes)
        if not 0 < sigma < math.inf:
            raise ValueError(f"sigma must be positive and finite, got {sigma}")
        return torch.as_tensor(sigma, dtype=self.nodes.dtype, device=self.nodes.device)

    def grid(self, num_points: int = 1000, *, sigma: Optional[float] = None) -> Tensor:
        """``num_points`` equally spaced points covering every node, a 5% margin and three kernel widths.

        Example:
            >>> import torch
            >>> d = SpectralDensity(torch.tensor([[0., 10.]]), torch.tensor([[0.5, 0.5]]),
            ...                     torch.tensor(2), torch.tensor(2), torch.tensor([2]))
            >>> d.grid(3, sigma=1.0)
            tensor([-3.5000,  5.0000, 13.5000])
        """
        if isinstance(num_points, bool) or not isinstance(num_points, int):
            raise TypeError(f"num_points must be an int, got {type(num_points).__name__}")
        if num_points < 2:
            raise ValueError(f"num_points must be at least 2, got {num_points}")
        if self.nodes.dim() != 2:
            raise ValueError(
                f"grid needs the nodes of one density, shaped (num_probes, m), got {tuple(self.nodes.shape)}"
            )
        s = self._sigma(sigma)
        lo, hi = self.nodes.min(), self.nodes.max()
        pad = _MARGIN * (hi - lo) + _KERNEL_REACH * s
        return torch.linspace(0.0, 1.0, num_points, dtype=self.nodes.dtype, device=self.nodes.device) * (
            hi - lo + 2 * pad
        ) + (lo - pad)

    def density(self, grid: Tensor, *, sigma: Optional[float] = None) -> Tensor:
        """The density smoothed by a Gaussian of width ``sigma``, at the points ``grid``.

        ``sum_j tau_j N(t; theta_j, sigma^2)`` averaged over probes: it integrates to 1.

        Args:
            grid: a 1-dim tensor of points.
            sigma: the kernel's standard deviation (default :meth:`default_sigma`).

        Returns:
            A tensor shaped like ``grid`` (with any leading batch dimensions of the nodes).

        Example:
            >>> import torch
            >>> d = SpectralDensity(torch.tensor([[1.]]), torch.tensor([[1.]]), torch.tensor(1),
            ...                     torch.tensor(1), torch.tensor([1]))
            >>> t = torch.linspace(-9., 11., 2001)
            >>> float(torch.trapezoid(d.density(t, sigma=1.0), t))   # integrates to 1
            1.0
        """
        if not isinstance(grid, Tensor) or grid.dim() != 1:
            raise TypeError("grid must be a 1-dim tensor of points")
        s = self._sigma(sigma)
        s = s[..., None, None, None] if s.dim() else s
        z = (grid.to(self.nodes.dtype) - self.nodes[..., None]) / s  # (..., p, m, g)
        bumps = torch.exp(-0.5 * z**2) / (s * math.sqrt(2 * math.pi))
        return (self.weights[..., None] * bumps).sum(dim=-2).mean(dim=-2)

    def plot(
        self,
        ax: Any = None,
        *,
        sigma: Optional[float] = None,
        num_points: int = 1000,
        log: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Plot the smoothed density with matplotlib (the ``plot`` extra) and return the axes.

        Args:
            ax: a matplotlib ``Axes`` (default: a new figure's).
            sigma: the kernel width (default :meth:`default_sigma`).
            num_points: resolution of the curve.
            log: a logarithmic density axis down to a millionth of the peak (the
                usual view of Hessian spectra: a bulk near zero and a few outliers).
            **kwargs: passed to ``ax.plot``.

        Example:
            >>> import torch
            >>> d = SpectralDensity(torch.tensor([[0., 2.]]), torch.tensor([[0.5, 0.5]]),
            ...                     torch.tensor(2), torch.tensor(2), torch.tensor([2]))
            >>> ax = d.plot()                                   # doctest: +SKIP
            >>> ax.figure.savefig("spectrum.png")               # doctest: +SKIP
        """
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "SpectralDensity.plot needs matplotlib: pip install matplotlib "
                "(from a checkout: pip install -e \".[plot]\")"
            ) from exc
        if self.nodes.dim() != 2:
            raise ValueError(
                f"plot draws one density, nodes shaped (num_probes, m); got {tuple(self.nodes.shape)} "
                "(index a batched result first)"
            )
        grid = self.grid(num_points, sigma=sigma)
        values = self.density(grid, sigma=sigma)
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(6, 4))
        ax.plot(grid.detach().cpu().numpy(), values.detach().cpu().numpy(), **kwargs)
        if log:
            # Six decades below the peak: enough for outliers of weight 1/n next to the bulk.
            # Several densities on one axes share the lowest floor.
            peak = float(values.max())
            floor = min(peak * 1e-6, getattr(ax, "_secorder_density_floor", peak))
            top = max(peak * 3, getattr(ax, "_secorder_density_top", peak))
            ax._secorder_density_floor, ax._secorder_density_top = floor, top
            ax.set_yscale("log")
            ax.set_ylim(floor, top)
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        return ax


class SpectralDensity(CarriesEngine, _SpectralDensity):
    __doc__ = _SpectralDensity.__doc__

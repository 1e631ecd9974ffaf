"""``so.linear_operator``: a curvature at one point as a symmetric linear operator on flat vectors.

``so.linear_operator(f, curvature=...)(*args)`` builds the curvature operator of
that call once (:func:`secorder.operators.make_operator`: one linearisation, the
Fisher's labels drawn once) and wraps it in a :class:`CurvatureOperator`: the
``(n, n)`` matrix ``C + damping I`` acting on flat vectors in the order of
:func:`secorder.tree.ravel` (the leaves of ``args[argnums]`` in flattening order,
each flattened row-major). Every product goes through the operator's batched
matvec: ``op @ T`` for ``T`` of shape ``(n, k)`` is one batched product of ``k``
probes, and ``op.to_dense()`` takes the identity's columns ``chunk_size`` at a time.
``op.to_scipy()`` is the same operator for SciPy (``eigsh``, ``cg``, ``lsmr``, ...);
SciPy is imported only there. It is also the transform layer's shared view of a
curvature for :func:`secorder.solve`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor

from .. import _checks, tree
from ..estimators._common import probe_chunk
from ..estimators.lanczos import FlatOperator
from ..estimators.probes import make_generator
from ..estimators.registry import check_random_source
from ..operators import LeafOperator, make_operator
from ..operators import sharded as _sharded
from ..operators.dataset import call_generator
from ..problem import Problem
from ..transformed import Transformed, signature_of
from ._core import check_common

__all__ = ["linear_operator", "CurvatureOperator", "check_damping", "curvature_operator"]


def check_damping(damping: Any) -> float:
    """``damping`` must be a finite real number ``>= 0``.

    Example:
        >>> check_damping(-1e-3)
        Traceback (most recent call last):
        ...
        ValueError: damping must be a finite float >= 0, got -0.001
    """
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(f"damping must be a float >= 0, got {type(damping).__name__}")
    if not (math.isfinite(damping) and damping >= 0):
        raise ValueError(f"damping must be a finite float >= 0, got {damping}")
    return float(damping)


def curvature_operator(problem: Problem, curvature: str, mc_samples: int, seed: Optional[int],
                       generator: Optional[torch.Generator]) -> Tuple[LeafOperator, Optional[torch.Generator]]:
    """The call's curvature operator and generator (the Monte-Carlo Fisher draws its labels from it first).

    Sharded (FSDP2) parameters are refused with a clear error.
    """
    if _sharded.layout_of(problem.f, problem.primals) is not None:
        raise NotImplementedError(
            "so.linear_operator and so.solve do not take sharded (FSDP2 DTensor) parameters yet; use so.hvp / "
            "so.eigenvalues, or gather the parameters (full_tensor()) on every rank")
    device = problem.leaves[0].device
    gen = call_generator(problem.f, make_generator(seed, generator, device), device)
    return make_operator(curvature, problem, mc_samples=mc_samples, generator=gen), gen


class CurvatureOperator:
    """``C + damping I`` at one point, a symmetric ``(n, n)`` operator on flat vectors.

    Made by :func:`linear_operator`. Flat vectors follow :func:`secorder.tree.ravel`
    of the differentiated argument; :meth:`ravel` / :meth:`unravel` convert.

    Attributes:
        shape: ``(n, n)``.
        dtype: the working dtype (the leaves' promoted dtype, at least float32).
        device: the leaves' device.
        damping: the damping added to the curvature.
        psd: whether the curvature is known to be positive semi-definite.
        num_matvecs: products computed so far (one per column).
    """

    def __init__(self, op: LeafOperator, spec: Any, *, damping: float = 0.0, chunk_size: Optional[int] = None):
        self._leaf_op = op
        self._flat = FlatOperator(op)
        self._spec = spec
        n = self._flat.dim
        self.shape: Tuple[int, int] = (n, n)
        self.dtype: torch.dtype = self._flat.dtype
        self.device: torch.device = self._flat.device
        self.damping = damping
        self.psd = op.psd
        self.chunk_size = chunk_size

    # -- products ---------------------------------------------------------------------------

    @property
    def num_matvecs(self) -> int:
        return self._flat.num_matvecs

    def rows(self, X: Tensor) -> Tensor:
        """``X (C + damping I)`` for a ``(k, n)`` matrix ``X`` of row vectors: one batched product.

        Example:
            >>> import torch, secorder as so
            >>> f = lambda x: (torch.tensor([1., 2.]) * x ** 2).sum()
            >>> so.linear_operator(f)(torch.zeros(2)).rows(torch.eye(2))
            tensor([[2., 0.],
                    [0., 4.]])
        """
        out = self._flat(X)
        return out + self.damping * X if self.damping else out

    def _check_operand(self, t: Any, name: str) -> None:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a tensor of shape ({self.shape[0]},) or ({self.shape[0]}, k), "
                            f"got {type(t).__name__}")
        if t.dim() not in (1, 2) or t.shape[0] != self.shape[0]:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; the operator is {self.shape}: pass ({self.shape[0]},) "
                             f"or ({self.shape[0]}, k)")
        if t.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {t.dtype}, the operator {self.dtype}: cast it with .to({self.dtype})")
        if t.device != self.device:
            raise ValueError(f"{name} is on {t.device}, the operator on {self.device}")

    def __matmul__(self, t: Tensor) -> Tensor:
        """``(C + damping I) t`` for ``t`` of shape ``(n,)`` or ``(n, k)`` (one batched product of ``k`` probes).

        Example:
            >>> import torch, secorder as so
            >>> op = so.linear_operator(lambda x: (x ** 2).sum(), damping=1.0)(torch.zeros(3))
            >>> op @ torch.ones(3), (op @ torch.eye(3)).diagonal()
            (tensor([3., 3., 3.]), tensor([3., 3., 3.]))
        """
        self._check_operand(t, "t")
        if t.dim() == 1:
            return self.rows(t[None])[0]
        if t.shape[1] == 0:
            return t.clone()
        return self.rows(t.T).T

    def __rmatmul__(self, t: Tensor) -> Tensor:
        """``t (C + damping I)`` for a row vector ``(n,)`` or rows ``(k, n)`` (the operator is symmetric)."""
        if isinstance(t, Tensor) and t.dim() == 2:
            self._check_operand(t.T, "t.T")
            return self.rows(t)
        return self @ t

    matmat = __matmul__

    @property
    def T(self) -> "CurvatureOperator":
        """The transpose: the operator itself (it is symmetric)."""
        return self

    # -- dense and SciPy views ------------------------------------------------------------

    def to_dense(self, chunk_size: Optional[int] = None) -> Tensor:
        """The ``(n, n)`` matrix, ``chunk_size`` columns per batched product (for small models and tests).

        Args:
            chunk_size: columns per product (default: the operator's ``chunk_size``, else
                as many as keep a probe block under 2^24 entries, at most 512).

        Example:
            >>> import torch, secorder as so
            >>> so.linear_operator(lambda x: (x[0] * x[1]) ** 2)(torch.ones(2)).to_dense(chunk_size=1)
            tensor([[2., 4.],
                    [4., 2.]])
        """
        _checks.check_chunk_size(chunk_size)
        chunk = probe_chunk(self._leaf_op, chunk_size if chunk_size is not None else self.chunk_size)
        n = self.shape[0]
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        if n == 0:
            return eye
        return torch.cat([self.rows(eye[i:i + chunk]) for i in range(0, n, chunk)])

    def to_scipy(self) -> Any:
        """The operator as a ``scipy.sparse.linalg.LinearOperator`` (float32 or float64; SciPy imported here).

        Products run without building autograd graphs and move data to the host
        (NumPy) and back for every call SciPy makes.

        Example:
            >>> import torch, secorder as so
            >>> from scipy.sparse.linalg import eigsh
            >>> f = lambda x: (torch.arange(1., 5., dtype=torch.float64) * x ** 2).sum() / 2
            >>> A = so.linear_operator(f)(torch.zeros(4, dtype=torch.float64)).to_scipy()
            >>> A.shape, sorted(eigsh(A, k=2, return_eigenvectors=False).round(8).tolist())
            ((4, 4), [3.0, 4.0])
        """
        try:
            import numpy as np
            from scipy.sparse.linalg import LinearOperator
        except ImportError as err:  # pragma: no cover - scipy is a test dependency
            raise ImportError("CurvatureOperator.to_scipy() needs SciPy: pip install scipy") from err
        numpy_dtypes = {torch.float32: np.float32, torch.float64: np.float64}
        if self.dtype not in numpy_dtypes:
            raise TypeError(f"to_scipy() supports float32 and float64 operators, not {self.dtype}")
        n = self.shape[0]

        def matmat(M: Any) -> Any:
            T = torch.as_tensor(np.asarray(M), device=self.device).to(self.dtype).reshape(n, -1)
            with torch.no_grad():
                out = self @ T
            return out.detach().cpu().numpy()

        def matvec(v: Any) -> Any:
            return matmat(np.asarray(v).reshape(n, 1)).reshape(-1)

        return LinearOperator((n, n), matvec=matvec, rmatvec=matvec, matmat=matmat, rmatmat=matmat,
                              dtype=numpy_dtypes[self.dtype])

    # -- flat vectors and pytrees ---------------------------------------------------------

    def ravel(self, value: Any) -> Tensor:
        """A pytree shaped like the differentiated argument as a flat ``(n,)`` vector (``so.tree.ravel`` order)."""
        leaves = tree.leaves(value)
        return self._flat.to_flat([leaf[None] for leaf in leaves])[0]

    def unravel(self, vec: Tensor) -> Any:
        """A flat ``(n,)`` vector as a pytree shaped like the differentiated argument."""
        self._check_operand(vec, "vec")
        if vec.dim() != 1:
            raise ValueError(f"vec must have shape ({self.shape[0]},), got {tuple(vec.shape)}")
        return tree.unflatten(self._spec, [leaf[0] for leaf in self._flat.to_leaves(vec[None])])

    def __repr__(self) -> str:
        damped = f", damping={self.damping:g}" if self.damping else ""
        return f"CurvatureOperator(shape={self.shape}, dtype={self.dtype}, device={self.device}{damped})"


def linear_operator(
    f: Callable[..., Any],
    argnums: _checks.Argnums = 0,
    *,
    curvature: str = "hessian",
    damping: float = 0.0,
    has_aux: bool = False,
    mc_samples: int = 1,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
) -> Callable[..., Any]:
    """A curvature as a linear operator: ``linear_operator(f)(*args)`` is a :class:`CurvatureOperator`.

    The operator is ``C + damping I`` for the curvature ``C`` of ``f`` at ``args`` with
    respect to ``args[argnums]``, on flat vectors in the order of
    :func:`secorder.tree.ravel`; it is built once per call (one linearisation of
    ``f`` shared by all its products) and is symmetric (``op.T is op``).

    Args:
        f: a function returning a scalar (``(scalar, aux)`` with ``has_aux``); for
            curvatures other than ``"hessian"``, built with :func:`secorder.functional_loss`
            (or a :func:`secorder.dataset_loss` of one: every product is then a pass over the data).
        argnums: which positional argument(s) to differentiate (int or tuple).
        curvature: ``"hessian"``, ``"ggn"``, ``"fisher"``, ``"empirical_fisher"`` or
            another registered curvature.
        damping: added to the diagonal, a finite float ``>= 0``.
        has_aux: ``f`` returns ``(loss, aux)``; the function returns ``(op, aux)``.
        mc_samples: ``"fisher"`` only: label draws per sample.
        seed: seeds the Fisher's labels.
        generator: a ``torch.Generator`` to draw them from instead.
        chunk_size: columns per batched product in :meth:`CurvatureOperator.to_dense`.

    Returns:
        ``fn(*args, **kwargs) -> CurvatureOperator``.

    Example:
        >>> import torch, secorder as so
        >>> model = torch.nn.Linear(3, 2)
        >>> f = so.functional_loss(model, torch.nn.CrossEntropyLoss())
        >>> params, x, y = so.params_dict(model), torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
        >>> op = so.linear_operator(f, curvature="ggn")(params, x, y)
        >>> op.shape, op.dtype
        ((8, 8), torch.float32)
        >>> G = op.to_dense()
        >>> flat, unravel = so.tree.ravel(params)
        >>> v = torch.randn(8)
        >>> torch.allclose(op @ v, so.tree.ravel(so.ggn_vp(f)(params, x, y, unravel(v)))[0], atol=1e-6)
        True
        >>> torch.allclose(G, G.T, atol=1e-6), torch.allclose(G @ v, op @ v, atol=1e-5)
        (True, True)
    """
    check_common(f, argnums, has_aux, curvature, mc_samples)
    check_random_source(seed, generator)
    damping = check_damping(damping)
    _checks.check_chunk_size(chunk_size)

    def linear_operator_fn(*args: Any, **kwargs: Any) -> Any:
        problem = Problem(f, argnums, has_aux, args, kwargs)
        op, _ = curvature_operator(problem, curvature, mc_samples, seed, generator)
        return problem.result(CurvatureOperator(op, problem.spec, damping=damping, chunk_size=chunk_size))

    return Transformed(linear_operator_fn, f, "linear_operator", signature_of(f))

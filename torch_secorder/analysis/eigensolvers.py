"""Extreme eigenvalues of a matvec or of a model's Hessian (legacy ``torch_secorder.analysis.eigensolvers``).

All three functions run secorder's Lanczos with full reorthogonalisation and
thick restarts (:func:`secorder.estimators.eigen.lanczos_eigenpairs`) on a
:class:`~secorder.operators.LeafOperator`: the user's matvec for
:func:`power_iteration` and :func:`lanczos`, the closure's Hessian on the
autograd engine (:func:`torch_secorder.autograd_operator.autograd_hessian_operator`:
one forward and one backward pass with a graph, then one backward pass per
product) for :func:`model_eigenvalues`. No eigensolver lives here.

What changed from torch-secorder 0.0.1, deliberately:

* 0.0.1's Lanczos did not reorthogonalise: after a few dozen steps its Ritz
  values repeat (top-3 of a 784-32-10 network came back as three copies of the
  top eigenvalue), and after a breakdown it added a spurious zero Ritz value.
  Here the basis is fully reorthogonalised and a breakdown continues in the
  orthogonal complement.
* ``num_iterations`` is the most matrix-vector products spent (0.0.1: the most
  iterations; its power iteration spent two products per iteration), and the
  Krylov basis holds up to that many vectors (as 0.0.1's did). ``tol`` is a
  tolerance on the eigenvalues: the run stops as soon as every returned pair
  has a residual ``||A u - theta u|| <= sqrt(tol) * ||A||`` (``||A||``
  estimated by the largest Ritz value in magnitude), which puts each returned
  ``theta`` within ``sqrt(tol) * ||A||`` of an eigenvalue, and within
  ``tol * ||A||^2 / gap`` once it is separated by ``gap`` from the rest of the
  spectrum (Parlett, "The Symmetric Eigenvalue Problem", 1998, ch. 11). 0.0.1's
  ``tol`` was an absolute threshold on the change of its power-iteration
  Rayleigh quotients, or on the Lanczos ``beta`` (never reached in practice: it
  ran all its iterations). A run that does not reach ``tol`` within the budget
  warns (``RuntimeWarning``) and returns its best estimate.
* ``power_iteration`` returns the eigenpairs that (block) power iteration
  converges to, the ``num_vectors`` eigenvalues of largest magnitude in
  decreasing magnitude, computed by Lanczos (far fewer products for the same
  accuracy); ``lanczos`` the algebraically largest, in decreasing order.
* dtype and device: the model's parameters' for :func:`model_eigenvalues`;
  for the matvec functions ``device`` (default: PyTorch's default device, not
  CUDA whenever it is available) and the keyword-only ``dtype`` (default:
  PyTorch's default dtype; 0.0.1 hard-coded float32).
* The random start vector comes from ``generator`` (keyword-only) or, by
  default, PyTorch's global generator.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from secorder.estimators.eigen import lanczos_eigenpairs
from secorder.operators import LeafOperator

from ..autograd_operator import autograd_hessian_operator
from ..core import _common
from ..errors import LegacyTypeError, LegacyValueError

__all__ = ["power_iteration", "lanczos", "model_eigenvalues", "estimate_eigenvalues", "lanczos_iteration"]

Matvec = Callable[[Tensor], Tensor]


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise LegacyTypeError(f"{name} must be a positive int, got {type(value).__name__}")
    if value < 1:
        raise LegacyValueError(f"{name} must be a positive int, got {value}")
    return int(value)


def _check_tol(tol: Any) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise LegacyTypeError(f"tol must be a positive number, got {type(tol).__name__}")
    if not tol > 0:
        raise LegacyValueError(f"tol must be a positive number, got {tol}")
    return float(tol)


def _check_generator(generator: Any) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise LegacyTypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _solve(op: LeafOperator, k: int, which: str, num_iterations: int, tol: float,
           generator: Optional[torch.Generator], name: str):
    """Lanczos to ``tol`` within ``num_iterations`` products; the budget warning in the legacy vocabulary."""
    n = op.dim
    if k > n:
        raise LegacyValueError(f"{name}={k} is larger than the dimension of the matrix ({n})")
    if num_iterations < k:
        raise LegacyValueError(
            f"num_iterations={num_iterations} must be at least {name}={k}: each eigenpair needs a Krylov vector"
        )
    # The eigenvalue error is quadratic in the residual: a residual of sqrt(tol) ||A|| puts
    # each Ritz value within tol ||A||^2 / gap of an eigenvalue (Parlett 1998, ch. 11).
    residual_tol = math.sqrt(tol)
    # A basis as large as the budget (0.0.1 held num_iterations vectors too): no restarts.
    basis = min(num_iterations, n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = lanczos_eigenpairs(op, k, which, tol=residual_tol, generator=generator, return_eigenvectors=True,
                                 max_matvecs=num_iterations, basis_size=basis if basis > k else None,
                                 reorthogonalize="full")  # as documented here
    for w in caught:
        if issubclass(w.category, RuntimeWarning) and "did not reach" in str(w.message):
            warnings.warn(
                f"Lanczos did not reach tol={tol} (residuals <= sqrt(tol) ||A||) within num_iterations={num_iterations} "
                f"matrix-vector products (largest residual {float(res.residuals.max()):.3g}); the eigenvalues are its "
                "best estimate: pass a larger num_iterations or a looser tol",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return res


def _matvec_operator(matvec: Matvec, dim: int, dtype: Optional[torch.dtype], device: Any, two_d: bool) -> LeafOperator:
    """The user's matvec as a one-leaf operator on ``(dim,)`` vectors; products in the working dtype and device."""
    if not callable(matvec):
        raise LegacyTypeError(f"matrix_vector_product must be callable, got {type(matvec).__name__}")
    dim = _check_positive_int(dim, "dim")
    if dtype is None:
        dtype = torch.get_default_dtype()
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LegacyTypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = torch.get_default_device() if device is None else torch.device(device)
    template = torch.zeros(dim, dtype=dtype, device=device)

    def checked(out: Any, shape: Tuple[int, ...]) -> Tensor:
        if not isinstance(out, Tensor):
            raise LegacyTypeError(f"matrix_vector_product must return a tensor, got {type(out).__name__}")
        if tuple(out.shape) != shape:
            raise LegacyValueError(
                f"matrix_vector_product returned shape {tuple(out.shape)} for an input of shape {shape}; "
                "it must return a tensor shaped like its input"
            )
        return out.to(dtype=dtype, device=device)

    def apply(V: Tensor) -> Tensor:  # (p, dim) -> (p, dim)
        V = V.to(dtype=dtype, device=device)
        try:
            if two_d:  # 0.0.1's power iteration called it on (dim, num_vectors) blocks
                return checked(matvec(V.T.contiguous()), (dim, V.shape[0])).T
            return torch.stack([checked(matvec(v), (dim,)) for v in V])
        except RuntimeError as err:
            if isinstance(err, (LegacyValueError, LegacyTypeError)) or not any(
                s in str(err) for s in ("dtype", "device", "Expected all tensors")
            ):
                raise
            raise RuntimeError(
                f"matrix_vector_product failed on a {dtype} vector on {device}: {err}. Pass the dtype= and device= "
                "of the matrix (the vectors are made with them)"
            ) from err

    return LeafOperator(templates=[template], matvec=lambda V: [apply(V[0])], block_matvec=lambda i, V: apply(V))


def power_iteration(
    matrix_vector_product: Matvec,
    dim: int,
    num_iterations: int = 100,
    num_vectors: int = 1,
    tol: float = 1e-6,
    device: Optional[torch.device] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """The ``num_vectors`` dominant (largest-magnitude) eigenpairs of a symmetric matrix given by its product.

    Args:
        matrix_vector_product: ``A @ V`` for a block ``V`` of shape
            ``(dim, p)`` (as 0.0.1's power iteration called it).
        dim: the size of ``A``.
        num_iterations: the most products with single vectors to spend.
        num_vectors: how many eigenpairs.
        tol: eigenvalue tolerance: stop when every pair's residual is at most ``sqrt(tol) * ||A||``.
        device: where the vectors live (default: PyTorch's default device).
        dtype: keyword-only, the vectors' dtype (default: PyTorch's default dtype).
        generator: keyword-only, source of the random start vector.

    Returns:
        ``(eigenvalues, eigenvectors)``: ``(num_vectors,)`` in decreasing
        magnitude and ``(dim, num_vectors)`` with unit, orthogonal columns.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> values, vectors = power_iteration(lambda v: A @ v, dim=2, num_vectors=2)
        >>> values                                   # (5 +- sqrt(5)) / 2
        tensor([3.6180, 1.3820])
        >>> bool(torch.allclose(A @ vectors, vectors * values, atol=1e-5))
        True
    """
    num_iterations = _check_positive_int(num_iterations, "num_iterations")
    num_vectors = _check_positive_int(num_vectors, "num_vectors")
    tol = _check_tol(tol)
    _check_generator(generator)
    op = _matvec_operator(matrix_vector_product, dim, dtype, device, two_d=True)
    res = _solve(op, num_vectors, "magnitude", num_iterations, tol, generator, "num_vectors")
    return res.eigenvalues, res.eigenvectors[0].T


def lanczos(
    matrix_vector_product: Matvec,
    dim: int,
    num_iterations: int = 100,
    num_vectors: int = 1,
    tol: float = 1e-6,
    device: Optional[torch.device] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, Tensor]:
    """The ``num_vectors`` largest eigenpairs of a symmetric matrix given by its product with a vector.

    Exported at the top level as ``lanczos_iteration``, as in 0.0.1.

    Args:
        matrix_vector_product: ``A @ v`` for a vector ``v`` of shape ``(dim,)``.
        dim: the size of ``A``.
        num_iterations: the most products to spend (Lanczos steps).
        num_vectors: how many eigenpairs.
        tol: eigenvalue tolerance: stop when every pair's residual is at most ``sqrt(tol) * ||A||``.
        device: where the vectors live (default: PyTorch's default device).
        dtype: keyword-only, the vectors' dtype (default: PyTorch's default dtype).
        generator: keyword-only, source of the random start vector.

    Returns:
        ``(eigenvalues, eigenvectors)``: ``(num_vectors,)`` in decreasing order
        and ``(dim, num_vectors)`` with unit, orthogonal columns.

    Example:
        >>> import torch
        >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
        >>> values, vectors = lanczos(lambda v: A @ v, dim=100, num_vectors=3, tol=1e-12, dtype=torch.float64)
        >>> values.round(decimals=6), vectors.shape
        (tensor([100.,  99.,  98.], dtype=torch.float64), torch.Size([100, 3]))
    """
    num_iterations = _check_positive_int(num_iterations, "num_iterations")
    num_vectors = _check_positive_int(num_vectors, "num_vectors")
    tol = _check_tol(tol)
    _check_generator(generator)
    op = _matvec_operator(matrix_vector_product, dim, dtype, device, two_d=False)
    res = _solve(op, num_vectors, "largest", num_iterations, tol, generator, "num_vectors")
    return res.eigenvalues, res.eigenvectors[0].T


@_common.owns_forward
def model_eigenvalues(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor],
    data: Any,
    target: Any,
    num_eigenvalues: int = 1,
    method: str = "lanczos",
    num_iterations: int = 100,
    tol: float = 1e-6,
    device: Optional[torch.device] = None,
    *,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, List[List[Tensor]]]:
    """Extreme eigenvalues and eigenvectors of the Hessian of ``loss_fn(model, data, target)``.

    The Hessian is taken with respect to ``list(model.parameters())`` (all of
    them must require grad, as in 0.0.1). ``loss_fn`` runs once, with grad
    enabled whatever the caller's grad mode; each Lanczos step is one backward
    pass through its gradient (0.0.1 reran the forward and both backward
    passes for every product). The model's state is left as it was.

    Args:
        model: the model.
        loss_fn: ``loss_fn(model, data, target)`` returns a scalar loss.
        data: the model's input.
        target: the targets.
        num_eigenvalues: how many eigenpairs.
        method: ``"lanczos"`` (the algebraically largest, decreasing) or
            ``"power_iteration"`` (the largest in magnitude, decreasing magnitude).
        num_iterations: the most Hessian-vector products to spend.
        tol: eigenvalue tolerance: stop when every pair's residual is at most ``sqrt(tol) * ||H||``.
        device: where to put the results (default: the parameters' device,
            where the computation runs).
        generator: keyword-only, source of the random start vector.

    Returns:
        ``(eigenvalues, eigenvectors)``: a ``(num_eigenvalues,)`` tensor in the
        parameters' dtype, and one list per eigenvalue of tensors shaped like
        the parameters (unit norm over all of them, mutually orthogonal).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> data, target = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1)
        >>> loss_fn = lambda m, d, t: torch.nn.functional.mse_loss(m(d), t)   # Hessian diag(1, 4)
        >>> values, vectors = model_eigenvalues(model, loss_fn, data, target, num_eigenvalues=2)
        >>> values.round(decimals=4), [tuple(v.shape) for v in vectors[0]]
        (tensor([4., 1.]), [(1, 2)])
    """
    _common.check_model(model)
    _common.check_callable(loss_fn, "loss_fn")
    if not isinstance(method, str) or method.lower() not in ("lanczos", "power_iteration"):
        raise LegacyValueError(f"Unknown method: {method!r} (valid: 'lanczos', 'power_iteration')")
    which = "largest" if method.lower() == "lanczos" else "magnitude"
    num_eigenvalues = _check_positive_int(num_eigenvalues, "num_eigenvalues")
    num_iterations = _check_positive_int(num_iterations, "num_iterations")
    tol = _check_tol(tol)
    _check_generator(generator)
    params = _common.check_params(list(model.parameters()), "model.parameters()")
    _common.require_grad(params)
    loss = _common.call_loss(lambda: loss_fn(model, data, target), "loss_fn", params=params)
    op = autograd_hessian_operator(loss, params)
    res = _solve(op, num_eigenvalues, which, num_iterations, tol, generator, "num_eigenvalues")
    values, leaves = res.eigenvalues, res.eigenvectors
    if device is not None:
        values, leaves = values.to(device), [t.to(device) for t in leaves]
    vectors = [[t[j] for t in leaves] for j in range(num_eigenvalues)]
    return values, vectors


estimate_eigenvalues = model_eigenvalues
lanczos_iteration = lanczos

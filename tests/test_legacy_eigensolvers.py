"""Legacy ``torch_secorder.analysis.eigensolvers`` against ``torch.linalg.eigvalsh``, and 0.0.1's failures fixed."""

import inspect
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_secorder
from torch_secorder import LegacyTypeError, LegacyValueError
from torch_secorder.analysis.eigensolvers import lanczos, model_eigenvalues, power_iteration
from tests.test_legacy_support import model_hessian, tanh_mlp

F64 = torch.float64


def _symmetric(n, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    values = torch.linspace(-3.0, 5.0, n, dtype=dtype) + 0.1 * torch.randn(n, generator=g, dtype=dtype)
    return Q @ torch.diag(values) @ Q.T, values


def test_documented_examples_verbatim():
    # docs/api/analysis/eigensolvers.rst and tests/unit/test_eigensolvers.py of torch-secorder 0.0.1.
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])

    def matrix_vector_product(v):
        return A @ v

    true_eigenvalues, _ = torch.sort(torch.linalg.eigvals(A).real, descending=True)
    eigenvalues, eigenvectors = power_iteration(matrix_vector_product, dim=2, num_iterations=100, num_vectors=2, tol=1e-6)
    assert torch.allclose(eigenvalues, true_eigenvalues, atol=1e-3)
    assert torch.allclose(torch.norm(eigenvectors, dim=0), torch.ones(2), atol=1e-6)
    eigenvalues, eigenvectors = lanczos(matrix_vector_product, dim=2, num_iterations=1000, num_vectors=2, tol=1e-2)
    assert torch.allclose(eigenvalues, true_eigenvalues, atol=1e-2)
    assert torch.abs(eigenvectors.T @ eigenvectors - torch.eye(2)).sum() < 1e-3
    power, _ = power_iteration(matrix_vector_product, dim=2, num_iterations=1000, num_vectors=2, tol=1e-2)
    assert torch.allclose(power, eigenvalues, atol=1e-2)
    values, vectors = power_iteration(matrix_vector_product, dim=2, num_iterations=100, num_vectors=2, tol=1e-6,
                                      device=torch.device("cpu"))
    assert values.device == vectors.device == torch.device("cpu")

    model = nn.Linear(2, 1)
    data, target = torch.randn(10, 2), torch.randn(10, 1)

    def loss_fn(model, data, target):
        return nn.functional.mse_loss(model(data), target)

    for method in ["power_iteration", "lanczos"]:
        eigenvalues, eigenvectors = model_eigenvalues(model, loss_fn, data, target, num_eigenvalues=1, method=method,
                                                      num_iterations=100, tol=1e-6)
        assert eigenvalues.shape == (1,)
        assert len(eigenvectors) == 1 and isinstance(eigenvectors[0], list)
        for param, eigenvector in zip(model.parameters(), eigenvectors[0]):
            assert param.shape == eigenvector.shape
    with pytest.raises(ValueError):
        model_eigenvalues(model, loss_fn, data, target, method="invalid_method")
    assert torch_secorder.lanczos_iteration is lanczos and torch_secorder.estimate_eigenvalues is model_eigenvalues


def test_lanczos_and_power_match_eigvalsh_float64():
    A, values = _symmetric(60, seed=0)
    exact = torch.linalg.eigvalsh(A)
    got, U = lanczos(lambda v: A @ v, 60, num_vectors=4, tol=1e-20, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, exact.flip(0)[:4], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(A @ U, U * got, rtol=0, atol=1e-6)
    torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=F64), rtol=0, atol=1e-10)
    got, U = power_iteration(lambda V: A @ V, 60, num_vectors=3, tol=1e-20, dtype=F64,
                             generator=torch.Generator().manual_seed(2))
    by_magnitude = exact[exact.abs().argsort(descending=True)][:3]
    torch.testing.assert_close(got, by_magnitude, rtol=1e-9, atol=1e-9)
    assert got.dtype == U.dtype == F64


def test_no_ghost_copies_where_0_0_1_repeated_the_top_eigenvalue():
    # Without reorthogonalisation 0.0.1's 100 Lanczos steps on a 400-dim spectrum with a
    # dominant top eigenvalue return copies of it for the top 3.
    n = 400
    values = torch.cat([torch.tensor([100.0, 50.0, 49.0]), torch.linspace(0.0, 10.0, n - 3)]).double()
    got, _ = lanczos(lambda v: values * v, n, num_vectors=3, dtype=F64, generator=torch.Generator().manual_seed(0))
    # default tol=1e-6: within tol ||A||^2 / gap = 1e-6 * 100^2 / 1 of each eigenvalue
    torch.testing.assert_close(got, torch.tensor([100.0, 50.0, 49.0], dtype=F64), rtol=0, atol=1e-2)


@pytest.mark.parametrize("tol", [1e-4, 1e-6, 1e-8])
def test_tol_bounds_the_eigenvalue_error(tol):
    # Residual <= sqrt(tol) ||A|| (||A|| estimated by the largest Ritz value, here the top
    # eigenvalue): each Ritz value within sqrt(tol) ||A|| of an eigenvalue, and within
    # tol ||A||^2 / gap of its own (gap: to the rest of the spectrum).
    A, _ = _symmetric(120, seed=5)
    exact = torch.linalg.eigvalsh(A).flip(0)
    norm = exact.abs().max()
    got, U = lanczos(lambda v: A @ v, 120, num_vectors=3, tol=tol, dtype=F64, generator=torch.Generator().manual_seed(6))
    residuals = torch.linalg.vector_norm(A @ U - U * got, dim=0)
    assert torch.all(residuals <= 1.01 * tol ** 0.5 * norm)
    gaps = torch.stack([(exact[i] - torch.cat([exact[:i], exact[i + 1:]])).abs().min() for i in range(3)])
    assert torch.all((got - exact[:3]).abs() <= tol * norm ** 2 / gaps)


def test_breakdown_gives_no_spurious_zero():
    # 0.0.1 appended a zero Ritz value after a breakdown: the "largest" eigenvalue of a
    # negative definite 2x2 matrix came back as 0.
    A = -torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=F64)
    got, _ = lanczos(lambda v: A @ v, 2, num_iterations=1000, num_vectors=1, tol=1e-2, dtype=F64)
    torch.testing.assert_close(got, torch.linalg.eigvalsh(A)[-1:], rtol=1e-10, atol=1e-10)
    got, _ = lanczos(lambda v: A @ v, 2, num_vectors=2, dtype=F64)
    torch.testing.assert_close(got, torch.linalg.eigvalsh(A).flip(0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["lanczos", "power_iteration"])
def test_model_eigenvalues_match_dense_hessian(method):
    torch.manual_seed(0)
    model = tanh_mlp((3, 4, 2), F64)
    x, y = torch.randn(8, 3, dtype=F64), torch.randint(0, 2, (8,))
    H, params = model_hessian(model, F.cross_entropy, x, y)
    exact = torch.linalg.eigvalsh(H)
    ref = exact.flip(0)[:3] if method == "lanczos" else exact[exact.abs().argsort(descending=True)][:3]
    loss_fn = lambda m, d, t: F.cross_entropy(m(d), t)
    values, vectors = model_eigenvalues(model, loss_fn, x, y, num_eigenvalues=3, method=method, tol=1e-20,
                                        generator=torch.Generator().manual_seed(3))
    assert values.dtype == F64 and len(vectors) == 3
    torch.testing.assert_close(values, ref, rtol=1e-8, atol=1e-10)
    U = torch.stack([torch.cat([t.reshape(-1) for t in vec]) for vec in vectors], dim=1)
    torch.testing.assert_close(U.T @ U, torch.eye(3, dtype=F64), rtol=0, atol=1e-8)
    torch.testing.assert_close(H @ U, U * values, rtol=0, atol=1e-6)
    for vec in vectors:
        assert [t.shape for t in vec] == [p.shape for p in params]


def test_model_eigenvalues_state_grad_mode_seed_and_errors():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().train()
    x, y = torch.randn(6, 3, dtype=F64), torch.randint(0, 2, (6,))
    loss_fn = lambda m, d, t: F.cross_entropy(m(d), t)
    state = {k: t.clone() for k, t in model.state_dict().items()}
    a, _ = model_eigenvalues(model, loss_fn, x, y, num_eigenvalues=2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        b, _ = model_eigenvalues(model, loss_fn, x, y, num_eigenvalues=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    torch.manual_seed(5)
    c, _ = model_eigenvalues(model, loss_fn, x, y, num_eigenvalues=2)
    torch.manual_seed(5)
    d, _ = model_eigenvalues(model, loss_fn, x, y, num_eigenvalues=2)
    assert torch.equal(c, d)
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items()) and model.training
    with pytest.raises(LegacyValueError, match="num_iterations=2 must be at least num_eigenvalues=3"):
        model_eigenvalues(model, loss_fn, x, y, num_eigenvalues=3, num_iterations=2)
    with pytest.raises(LegacyValueError, match="num_eigenvalues=100 is larger than the dimension"):
        model_eigenvalues(model, loss_fn, x, y, num_eigenvalues=100)
    model[0].weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="does not require grad"):
        model_eigenvalues(model, loss_fn, x, y)


def test_dtype_device_defaults_and_matvec_errors():
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=F64)
    with pytest.raises(RuntimeError, match="Pass the dtype= and device= of the matrix"):
        lanczos(lambda v: A @ v, 2)                           # float32 vectors, float64 matrix
    values, vectors = lanczos(lambda v: A @ v, 2, dtype=F64)
    assert values.dtype == vectors.dtype == F64 and values.device.type == "cpu"
    values, _ = lanczos(lambda v: (A @ v.double()).float(), 2)     # default dtype
    assert values.dtype == torch.float32
    with pytest.raises(LegacyValueError, match=r"returned shape \(3,\) for an input of shape \(2,\)"):
        lanczos(lambda v: torch.ones(3), 2)
    with pytest.raises(LegacyValueError, match="num_vectors=3 is larger than the dimension"):
        power_iteration(lambda V: V, 2, num_vectors=3)
    with pytest.raises(LegacyTypeError):
        lanczos(A, 2)
    with pytest.raises(LegacyValueError, match="tol"):
        lanczos(lambda v: A @ v, 2, tol=0.0, dtype=F64)


def test_budget_warning_in_the_legacy_vocabulary():
    A, _ = _symmetric(200, seed=4)
    with pytest.warns(RuntimeWarning, match="within num_iterations=5 .*pass a larger num_iterations"):
        values, _ = lanczos(lambda v: A @ v, 200, num_iterations=5, num_vectors=1, tol=1e-12, dtype=F64)
    assert values.shape == (1,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lanczos(lambda v: A @ v, 200, num_vectors=1, tol=1e-6, dtype=F64)


def test_signatures_and_defaults():
    P = inspect.Parameter
    for fn in (power_iteration, lanczos):
        params = list(inspect.signature(fn).parameters.values())
        assert [(p.name, p.default) for p in params if p.kind is not P.KEYWORD_ONLY] == [
            ("matrix_vector_product", P.empty), ("dim", P.empty), ("num_iterations", 100), ("num_vectors", 1),
            ("tol", 1e-6), ("device", None)]
    params = list(inspect.signature(model_eigenvalues).parameters.values())
    assert [(p.name, p.default) for p in params if p.kind is not P.KEYWORD_ONLY] == [
        ("model", P.empty), ("loss_fn", P.empty), ("data", P.empty), ("target", P.empty), ("num_eigenvalues", 1),
        ("method", "lanczos"), ("num_iterations", 100), ("tol", 1e-6), ("device", None)]

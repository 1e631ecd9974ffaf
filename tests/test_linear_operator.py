"""so.linear_operator: products, dense matrix and SciPy view against float64 references."""

import pytest
import torch
import torch.nn.functional as F

import secorder as so
from secorder import tree
from tests.test_solve import DT, dense_curvature, mlp_problem


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "empirical_fisher"])
def test_dense_and_products_match_reference(curvature):
    model, f, params, x, y = mlp_problem()
    C = dense_curvature(curvature, model, f, params, x, y)
    n = C.shape[0]
    op = so.linear_operator(f, curvature=curvature, damping=0.5)(params, x, y)
    A = C + 0.5 * torch.eye(n, dtype=DT)
    assert op.shape == (n, n) and op.dtype == DT and op.device == torch.device("cpu") and op.T is op
    torch.testing.assert_close(op.to_dense(chunk_size=7), A, rtol=1e-10, atol=1e-12)
    v, V = torch.randn(n, dtype=DT), torch.randn(n, 3, dtype=DT)
    torch.testing.assert_close(op @ v, A @ v, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op @ V, A @ V, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(V.T @ op, V.T @ A, rtol=1e-10, atol=1e-12)
    assert (op @ torch.zeros(n, 0, dtype=DT)).shape == (n, 0)


def test_flat_order_is_tree_ravel_and_round_trip():
    model, f, params, x, y = mlp_problem()
    op = so.linear_operator(f, curvature="ggn")(params, x, y)
    v = tree.tree_map(torch.randn_like, params)
    flat, unravel = tree.ravel(v)
    assert torch.equal(op.ravel(v), flat)
    back = op.unravel(flat)
    assert all(torch.equal(a, b) for a, b in zip(tree.leaves(back), tree.leaves(v)))
    torch.testing.assert_close(op @ flat, tree.ravel(so.ggn_vp(f)(params, x, y, v))[0], rtol=1e-10, atol=1e-12)


def test_to_scipy_eigsh_equals_eigenvalues_and_cg_equals_solve():
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    model, f, params, x, y = mlp_problem(n=10)
    op = so.linear_operator(f, curvature="ggn")(params, x, y)
    A = op.to_scipy()
    assert A.shape == op.shape and A.dtype == "float64"
    top = sorted(scipy_linalg.eigsh(A, k=3, which="LA", return_eigenvectors=False).tolist(), reverse=True)
    ours = so.eigenvalues(f, k=3, curvature="ggn", seed=0, tol=1e-10)(params, x, y)
    torch.testing.assert_close(torch.tensor(top, dtype=DT), ours, rtol=1e-8, atol=1e-10)
    damped = so.linear_operator(f, curvature="ggn", damping=0.1)(params, x, y).to_scipy()
    v = torch.randn(op.shape[0], dtype=DT)
    sol, status = scipy_linalg.cg(damped, v.numpy(), rtol=1e-12, atol=0.0)
    ours = so.solve(f, curvature="ggn", damping=0.1, tol=1e-12)(params, x, y, op.unravel(v))
    assert status == 0
    torch.testing.assert_close(torch.from_numpy(sol), op.ravel(ours), rtol=1e-8, atol=1e-10)


def test_float32_to_scipy_and_grad_mode_off():
    scipy_linalg = pytest.importorskip("scipy.sparse.linalg")
    model = torch.nn.Linear(3, 2)
    f = so.functional_loss(model, torch.nn.MSELoss())
    params, x, y = so.params_dict(model), torch.randn(5, 3), torch.randn(5, 2)
    with torch.no_grad():
        op = so.linear_operator(f, curvature="ggn")(params, x, y)
        G = op.to_dense()
    assert op.dtype == torch.float32 and G.dtype == torch.float32
    A = op.to_scipy()
    assert A.dtype == "float32"
    top = scipy_linalg.eigsh(A, k=1, return_eigenvectors=False)
    assert abs(float(top[0]) - float(torch.linalg.eigvalsh(G.double())[-1])) < 1e-4 * float(G.abs().max())


def test_dataset_loss_operator_equals_one_batch():
    model, f, params, x, y = mlp_problem(n=8)
    F_ = so.dataset_loss(f, [(x[:5], y[:5]), (x[5:], y[5:])])
    one = so.linear_operator(f, curvature="ggn")(params, x, y).to_dense()
    data = so.linear_operator(F_, curvature="ggn")(params).to_dense()
    torch.testing.assert_close(data, one, rtol=1e-10, atol=1e-12)


def test_one_line_dense_hessian_of_a_pytree_with_has_aux():
    f = lambda p: ((p["a"] ** 2).sum() * p["b"].sum(), p["b"])  # noqa: E731
    p = {"a": torch.tensor([1.0, 2.0], dtype=DT), "b": torch.tensor([3.0], dtype=DT)}
    op, aux = so.linear_operator(f, has_aux=True)(p)
    H = torch.func.hessian(lambda z: (z[:2] ** 2).sum() * z[2])(torch.tensor([1.0, 2.0, 3.0], dtype=DT))
    torch.testing.assert_close(op.to_dense(), H)
    assert torch.equal(aux, p["b"])


def test_bad_input():
    model, f, params, x, y = mlp_problem()
    op = so.linear_operator(f)(params, x, y)
    n = op.shape[0]
    with pytest.raises(ValueError, match=rf"t has shape \(5,\); the operator is \({n}, {n}\)"):
        op @ torch.zeros(5, dtype=DT)
    with pytest.raises(TypeError, match="t has dtype torch.float32, the operator torch.float64"):
        op @ torch.zeros(n)
    with pytest.raises(TypeError, match="must be a tensor"):
        op @ [0.0] * n
    with pytest.raises(ValueError, match="damping"):
        so.linear_operator(f, damping=-1.0)
    with pytest.raises(ValueError, match="valid curvatures"):
        so.linear_operator(f, curvature="gauss-newton")
    with pytest.raises(ValueError, match="chunk_size"):
        op.to_dense(chunk_size=0)
    assert "CurvatureOperator(shape=" in repr(op)

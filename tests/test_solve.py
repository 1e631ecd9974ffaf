"""so.solve and the solvers (cg, minres, neumann) against dense float64 solves and pinv."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import secorder as so
from secorder import tree
from secorder.estimators import solvers
from secorder.estimators.solvers import ConvergenceWarning, DivergenceError, IndefiniteOperatorError
from tests.reference import dense_hessian, tanh_mlp

DT = torch.float64


# -- the solvers on dense matrices ---------------------------------------------------------------

def spd(n, cond, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return Q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=DT)) @ Q.T, g


def run(method, A, B, tol=1e-10, max_iterations=None, precondition=None, **options):
    solver, options = solvers.check_options(method, options)
    return solvers.run(solver, lambda X: X @ A, B, tol=tol, max_iterations=max_iterations, options=options,
                       precondition=precondition, generator=torch.Generator().manual_seed(0))


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 3), seed=st.integers(0, 2**16), method=st.sampled_from(["cg", "minres"]))
def test_krylov_solvers_match_dense_solve(n, k, seed, method):
    A, g = spd(n, 100.0, seed)
    B = torch.randn(k, n, generator=g, dtype=DT)
    out = run(method, A, B)
    torch.testing.assert_close(out.x, torch.linalg.solve(A, B.T).T, rtol=1e-8, atol=1e-10)
    assert bool(out.converged.all()) and float(out.residual.max()) <= 1e-10
    assert int(out.iterations.max()) <= 2 * n  # exact arithmetic: n; a little slack for rounding


@settings(max_examples=6, deadline=None)
@given(n=st.integers(2, 10), seed=st.integers(0, 2**16))
def test_minres_indefinite_and_singular_is_pinv(n, seed):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    eig = torch.linspace(-2, 3, n, dtype=DT)
    eig[0] = 0.0  # singular
    A = Q @ torch.diag(eig) @ Q.T
    B = (torch.randn(2, n, generator=g, dtype=DT) @ A)  # consistent: in the range
    out = run("minres", A, B, tol=1e-12)
    torch.testing.assert_close(out.x, B @ torch.linalg.pinv(A), rtol=1e-7, atol=1e-9)


def test_batched_columns_are_their_own_solves_and_zero_rhs():
    A, g = spd(8, 1e3, 1)
    B = torch.randn(3, 8, generator=g, dtype=DT)
    B[1] = 0.0
    B[2] = A[0]  # converges in few iterations: frozen afterwards
    for method in ("cg", "minres"):
        out = run(method, A, B)
        torch.testing.assert_close(out.x[1], torch.zeros(8, dtype=DT))
        assert int(out.iterations[1]) == 0 and float(out.residual[1]) == 0.0
        for i in (0, 2):
            alone = run(method, A, B[i:i + 1])
            torch.testing.assert_close(out.x[i], alone.x[0], rtol=1e-12, atol=1e-13)
            assert int(out.iterations[i]) == int(alone.iterations[0])


def test_preconditioned_solvers_agree_and_help():
    g = torch.Generator().manual_seed(3)
    scales = torch.logspace(0, 4, 20, dtype=DT)
    A0, _ = spd(20, 10.0, 3)
    A = scales.sqrt()[:, None] * A0 * scales.sqrt()[None]  # badly scaled
    B = torch.randn(2, 20, generator=g, dtype=DT)
    jacobi = lambda R: R / torch.diagonal(A)  # noqa: E731
    ref = torch.linalg.solve(A, B.T).T
    for method in ("cg", "minres"):
        plain, pre = run(method, A, B), run(method, A, B, precondition=jacobi)
        torch.testing.assert_close(pre.x, ref, rtol=1e-7, atol=1e-9)
        assert int(pre.iterations.max()) < int(plain.iterations.max())


def test_neumann_with_scale_and_estimated_scale():
    A, g = spd(6, 10.0, 5)
    B = torch.randn(2, 6, generator=g, dtype=DT)
    ref = torch.linalg.solve(A, B.T).T
    for scale in (None, 8.0):
        out = run("neumann", A, B, tol=1e-10, max_iterations=2000, scale=scale)
        torch.testing.assert_close(out.x, ref, rtol=1e-8, atol=1e-9)
    with pytest.raises(DivergenceError, match="larger scale"):
        run("neumann", A, B, scale=2.0)  # lambda_max = 10 > 2 * scale
    with pytest.raises(DivergenceError, match="damping"):
        run("neumann", A - 2 * torch.eye(6, dtype=DT), B, scale=20.0, max_iterations=500)


def test_cg_detects_negative_curvature():
    A = torch.diag(torch.tensor([3.0, 1.0, -0.5], dtype=DT))
    with pytest.raises(IndefiniteOperatorError, match="minres.*damping"):
        run("cg", A, torch.ones(1, 3, dtype=DT))


def test_solver_options_are_validated():
    with pytest.raises(ValueError, match="valid methods are 'cg', 'minres', 'neumann'"):
        solvers.check_options("gmres", {})
    with pytest.raises(TypeError, match="'neumann' takes scale"):
        solvers.check_options("cg", {"scale": 1.0})
    with pytest.raises(ValueError, match="scale"):
        solvers.check_options("neumann", {"scale": -1.0})
    assert [row["method"] for row in solvers.table()] == ["cg", "minres", "neumann"]


# -- so.solve on models ------------------------------------------------------------------------

def mlp_problem(n=6, sizes=(3, 4, 3), seed=0):
    torch.manual_seed(seed)
    model = tanh_mlp(sizes)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sizes[0], generator=g, dtype=DT)
    y = torch.randint(0, sizes[-1], (n,), generator=g)
    return model, so.functional_loss(model, F.cross_entropy), so.params_dict(model), x, y


def dense_curvature(curvature, model, f, params, x, y):
    flat, unravel = tree.ravel(params)
    if curvature == "hessian":
        return dense_hessian(f, (params, x, y))[0]
    if curvature == "ggn":
        out = lambda p: functional_call(model, unravel(p), (x,)).reshape(-1)  # noqa: E731
        J = torch.func.jacrev(out)(flat)
        H = torch.func.hessian(lambda z: F.cross_entropy(z.reshape(x.shape[0], -1), y))(out(flat).detach())
        return J.T @ H @ J
    if curvature == "empirical_fisher":
        per = lambda p, xi, yi: F.cross_entropy(functional_call(model, unravel(p), (xi[None],)), yi[None])  # noqa
        G = torch.func.vmap(torch.func.grad(per), in_dims=(None, 0, 0))(flat, x, y)
        return G.T @ G / x.shape[0]
    raise AssertionError(curvature)


CASES = [("hessian", "minres", 0.0), ("hessian", "cg", 1.0), ("ggn", "cg", 1e-3), ("ggn", "minres", 1e-2),
         ("empirical_fisher", "cg", 1e-2), ("ggn", "neumann", 0.1)]


@pytest.mark.parametrize("curvature,method,damping", CASES)
def test_solve_matches_dense(curvature, method, damping):
    model, f, params, x, y = mlp_problem()
    C = dense_curvature(curvature, model, f, params, x, y)
    n = C.shape[0]
    flat, unravel = tree.ravel(params)
    V = torch.randn(3, n, dtype=DT)
    if curvature == "hessian" and damping == 1.0:
        damping = float(-torch.linalg.eigvalsh(C)[0]) + 1.0  # positive definite for cg
    A = C + damping * torch.eye(n, dtype=DT)
    if damping == 0.0:  # the Hessian is singular (softmax's shift invariance): right-hand sides in its range
        V = V @ A @ torch.linalg.pinv(A)
    ref = V @ torch.linalg.pinv(A)
    kwargs = dict(max_iterations=20000) if method == "neumann" else {}
    fn = so.solve(f, curvature=curvature, damping=damping, method=method, tol=1e-11, return_info=True, **kwargs)
    x1, info = fn(params, x, y, unravel(V[0]))
    torch.testing.assert_close(tree.ravel(x1)[0], ref[0], rtol=1e-7, atol=1e-8)
    assert bool(info.converged) and info.iterations.shape == () and float(info.residual) <= 1e-11
    batch = tree.unflatten(tree.structure(params), [t.reshape((3,) + s.shape) for t, s in zip(
        torch.split(V, tree.sizes(params), dim=1), tree.leaves(params))])
    xb, info_b = fn(params, x, y, batch)
    flat_b = torch.cat([leaf.reshape(3, -1) for leaf in tree.leaves(xb)], dim=1)
    torch.testing.assert_close(flat_b, ref, rtol=1e-7, atol=1e-8)
    assert info_b.iterations.shape == (3,) and bool(info_b.converged.all())


def test_fisher_solve_matches_its_operator():
    model, f, params, x, y = mlp_problem()
    op = so.linear_operator(f, curvature="fisher", seed=3)(params, x, y)
    A = op.to_dense() + 0.1 * torch.eye(op.shape[0], dtype=DT)
    v = torch.randn(op.shape[0], dtype=DT)
    got = so.solve(f, curvature="fisher", damping=0.1, seed=3, tol=1e-12)(params, x, y, op.unravel(v))
    torch.testing.assert_close(op.ravel(got), torch.linalg.solve(A, v), rtol=1e-8, atol=1e-9)


def test_minres_inconsistent_right_hand_side_warns_least_squares():
    model, f, params, x, y = mlp_problem()
    H = dense_curvature("hessian", model, f, params, x, y)
    v = torch.randn(H.shape[0], dtype=DT)  # not in the range of the singular Hessian
    with pytest.warns(ConvergenceWarning, match="outside the range"):
        got, info = so.solve(f, method="minres", tol=1e-6, return_info=True)(params, x, y, tree.ravel(params)[1](v))
    g = tree.ravel(got)[0]
    assert not bool(info.converged) and bool(torch.isfinite(g).all())
    lsq = torch.linalg.pinv(H) @ v  # the residual is the least-squares one, x is in range + bounded
    torch.testing.assert_close(torch.linalg.vector_norm(v - H @ g), torch.linalg.vector_norm(v - H @ lsq), rtol=1e-5,
                               atol=1e-8)


def test_minres_minimum_norm_on_singular_ggn():
    model, f, params, x, y = mlp_problem(n=2)  # N C = 6 < n: the GGN is singular
    G = dense_curvature("ggn", model, f, params, x, y)
    flat, unravel = tree.ravel(params)
    v = G @ torch.randn(G.shape[0], dtype=DT)  # consistent
    got = so.solve(f, curvature="ggn", method="minres", tol=1e-12)(params, x, y, unravel(v))
    torch.testing.assert_close(tree.ravel(got)[0], torch.linalg.pinv(G) @ v, rtol=1e-6, atol=1e-8)


def test_dataset_loss_equals_one_batch():
    model, f, params, x, y = mlp_problem(n=8)
    F_ = so.dataset_loss(f, [(x[:3], y[:3]), (x[3:], y[3:])])
    v = tree.tree_map(torch.randn_like, params)
    one = so.solve(f, curvature="ggn", damping=1e-2, tol=1e-12)(params, x, y, v)
    data = so.solve(F_, curvature="ggn", damping=1e-2, tol=1e-12)(params, v)
    for a, b in zip(tree.leaves(one), tree.leaves(data)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_vmap_over_right_hand_sides_equals_batch():
    model, f, params, x, y = mlp_problem()
    V = tree.tree_map(lambda t: torch.randn((4,) + t.shape, dtype=DT), params)
    fn = so.solve(f, curvature="ggn", damping=1e-2, tol=1e-10)
    batched = fn(params, x, y, V)
    vmapped = torch.func.vmap(fn, in_dims=(None, None, None, 0))(params, x, y, V)
    for a, b in zip(tree.leaves(batched), tree.leaves(vmapped)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_diagonal_preconditioner_same_solution():
    model, f, params, x, y = mlp_problem()
    v = tree.tree_map(torch.randn_like, params)
    for curvature, method in (("ggn", "cg"), ("hessian", "minres")):
        plain = so.solve(f, curvature=curvature, damping=0.5, method=method, tol=1e-11)(params, x, y, v)
        pre = so.solve(f, curvature=curvature, damping=0.5, method=method, tol=1e-11,
                       preconditioner="diagonal")(params, x, y, v)
        for a, b in zip(tree.leaves(plain), tree.leaves(pre)):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_zero_and_empty_right_hand_sides():
    model, f, params, x, y = mlp_problem()
    fn = so.solve(f, curvature="ggn", damping=1e-2, return_info=True)
    out, info = fn(params, x, y, tree.tree_map(torch.zeros_like, params))
    assert float(tree.norm(out)) == 0.0 and bool(info.converged) and int(info.iterations) == 0
    empty = tree.tree_map(lambda t: torch.zeros((0,) + t.shape, dtype=t.dtype), params)
    out, info = fn(params, x, y, empty)
    assert all(o.shape == e.shape for o, e in zip(tree.leaves(out), tree.leaves(empty)))
    assert info.iterations.shape == (0,) and int(info.num_matvecs) == 0


def test_argnums_tuple_has_aux_and_grad_mode_off():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=DT)

    def f(a, b, scale):
        z = torch.cat([a, b])
        return scale * z @ A @ z / 2, z.sum()

    a, b = torch.ones(1, dtype=DT), torch.ones(1, dtype=DT)
    v = (torch.tensor([1.0], dtype=DT), torch.tensor([2.0], dtype=DT))
    with torch.no_grad():
        (xa, xb), aux = so.solve(f, (0, 1), has_aux=True, tol=1e-12)(a, b, 2.0, v)
    torch.testing.assert_close(torch.cat([xa, xb]), torch.linalg.solve(2 * A, torch.tensor([1.0, 2.0], dtype=DT)))
    assert float(aux) == 2.0


def test_bad_input():
    model, f, params, x, y = mlp_problem()
    v = tree.tree_map(torch.randn_like, params)
    with pytest.raises(ValueError, match="pytree structure"):
        so.solve(f)(params, x, y, [t for t in v.values()])
    bad = dict(v)
    bad["0.weight"] = torch.zeros(2, 2, dtype=DT)
    with pytest.raises(ValueError, match=r"v\['0.weight'\] has shape \(2, 2\)"):
        so.solve(f)(params, x, y, bad)
    for damping in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping must be a finite float >= 0"):
            so.solve(f, damping=damping)
    with pytest.raises(TypeError, match="damping"):
        so.solve(f, damping="1e-3")
    with pytest.raises(ValueError, match="valid methods are 'cg', 'minres', 'neumann'"):
        so.solve(f, method="gmres")
    with pytest.raises(ValueError, match="valid preconditioners are 'diagonal'"):
        so.solve(f, preconditioner="ilu")
    with pytest.raises(ValueError, match="not 'neumann'"):
        so.solve(f, method="neumann", preconditioner="diagonal")
    with pytest.raises(ValueError, match="tol"):
        so.solve(f, tol=0.0)
    with pytest.raises(TypeError, match="split of f into model and loss"):
        so.solve(lambda p: p.sum(), curvature="ggn")
    with pytest.raises(TypeError, match="real floating-point"):
        so.solve(f)(params, x, y, tree.tree_map(lambda t: t.to(torch.int64), v))


def test_cg_on_indefinite_hessian_raises_not_a_wrong_answer():
    model, f, params, x, y = mlp_problem()
    H = dense_hessian(f, (params, x, y))[0]
    assert float(torch.linalg.eigvalsh(H)[0]) < -1e-3  # the Hessian of this MLP is indefinite
    flat, unravel = tree.ravel(params)
    lowest = torch.linalg.eigh(H)[1][:, 0]
    with pytest.raises(IndefiniteOperatorError, match="minres"):
        so.solve(f, tol=1e-10)(params, x, y, unravel(lowest))


def test_non_convergence_warns_with_residual_and_info():
    model, f, params, x, y = mlp_problem()
    v = tree.tree_map(torch.randn_like, params)
    with pytest.warns(ConvergenceWarning, match=r"relative residual .* after 2 iterations"):
        _, info = so.solve(f, curvature="ggn", damping=1e-3, max_iterations=2, return_info=True)(params, x, y, v)
    assert not bool(info.converged) and int(info.iterations) == 2 and float(info.residual) > 1e-6
    assert int(info.num_matvecs) == 3  # two iterations and the residual check
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        so.solve(f, curvature="ggn", damping=1e-3, tol=1e-8)(params, x, y, v)


@pytest.mark.skipif(not hasattr(so, "kfac"), reason="so.kfac (issue 22) not in this build")
def test_kfac_preconditioner_same_solution():
    model, f, params, x, y = mlp_problem(n=20)
    v = tree.tree_map(torch.randn_like, params)
    for curvature, method in (("ggn", "cg"), ("empirical_fisher", "cg"), ("hessian", "minres")):
        plain = so.solve(f, curvature=curvature, damping=1e-2, method=method, tol=1e-11)(params, x, y, v)
        pre = so.solve(f, curvature=curvature, damping=1e-2, method=method, tol=1e-11,
                       preconditioner="kfac")(params, x, y, v)
        for a, b in zip(tree.leaves(plain), tree.leaves(pre)):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)


def test_kfac_preconditioner_without_kfac_is_a_clear_error():
    if hasattr(so, "kfac"):
        pytest.skip("this build has so.kfac")
    model, f, params, x, y = mlp_problem()
    v = tree.tree_map(torch.randn_like, params)
    with pytest.raises(ValueError, match="so.kfac"):
        so.solve(f, curvature="ggn", damping=1e-2, preconditioner="kfac")(params, x, y, v)


def test_gpt2_ggn_solve_matches_its_dense_operator():
    """A Hugging Face model (a small random GPT-2 from the test zoo): cg on the damped GGN and minres on the Hessian."""
    from tests import zoo

    zoo.require_transformers()
    case = zoo.build("gpt2", batch=1)
    params = so.params_dict(case.model)
    params = {k: v for k, v in params.items() if "ln_f" in k or k.endswith("c_proj.bias")}  # few entries: dense is cheap
    f = case.f
    for curvature, method in (("ggn", "cg"), ("hessian", "minres")):
        op = so.linear_operator(f, curvature=curvature, damping=0.1)(params, case.inputs, case.targets)
        v = torch.randn(op.shape[0], dtype=DT)
        x, info = so.solve(f, curvature=curvature, damping=0.1, method=method, tol=1e-10,
                           return_info=True)(params, case.inputs, case.targets, op.unravel(v))
        assert bool(info.converged)
        torch.testing.assert_close(op.ravel(x), torch.linalg.solve(op.to_dense(), v), rtol=1e-7, atol=1e-9)


def test_kfac_curvature_solve_equals_its_exact_damped_inverse():
    model, f, params, x, y = mlp_problem(n=10)
    v = tree.tree_map(torch.randn_like, params)
    got = so.solve(f, curvature="kfac", damping=1e-2, tol=1e-12)(params, x, y, v)
    ref = so.kfac(f)(params, x, y).solve(v, 1e-2)
    for a, b in zip(tree.leaves(got), tree.leaves(ref)):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)

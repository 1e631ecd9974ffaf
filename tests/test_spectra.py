"""so.eigenvalues and so.spectral_density on small float64 models against dense references."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

import secorder as so
from secorder import tree
from secorder.estimators.probes import make_generator
from secorder.operators import make_operator
from secorder.problem import Problem
from tests.reference import dense_hessian, tanh_mlp

DT = torch.float64


def problem_data(n=12, sizes=(4, 6, 3), seed=0):
    torch.manual_seed(seed)
    model = tanh_mlp(sizes)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, sizes[0], generator=g, dtype=DT)
    y = torch.randint(0, sizes[-1], (n,), generator=g)
    return model, so.functional_loss(model, F.cross_entropy), so.params_dict(model), x, y


def dense_ggn(model, params, x, y):
    flat, unravel = tree.ravel(params)
    out = lambda p: functional_call(model, unravel(p), (x,)).reshape(-1)
    J = torch.func.jacrev(out)(flat)  # (N*C, n)
    logits = out(flat).detach()
    H_L = torch.func.hessian(lambda z: F.cross_entropy(z.reshape(x.shape[0], -1), y))(logits)
    return J.T @ H_L @ J


def dense_of_operator(op):
    """The matrix of a LeafOperator, column by column (for the sampled curvatures)."""
    n = sum(t.numel() for t in op.templates)
    eye = torch.eye(n, dtype=DT)
    cols = op.matvec([e.reshape((n,) + tuple(t.shape)) for e, t in
                      zip(torch.split(eye, [t.numel() for t in op.templates], dim=1), op.templates)])
    return torch.cat([c.reshape(n, -1) for c in cols], dim=1)


def expected(M, k, which):
    ref = torch.linalg.eigvalsh(M)
    if which == "largest":
        return ref.flip(0)[:k]
    if which == "smallest":
        return ref[:k]
    return ref[torch.argsort(ref.abs(), descending=True, stable=True)][:k]


def rel_err(a, b):
    return float(((a - b).abs() / b.abs().max()).max())


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_hessian_eigenvalues_match_eigvalsh(which):
    model, f, params, x, y = problem_data()
    H, _ = dense_hessian(f, (params, x, y))
    for k in (1, 10):
        got = so.eigenvalues(f, k=k, which=which, tol=1e-11, seed=k)(params, x, y)
        assert got.shape == (k,) and got.dtype == DT
        assert rel_err(got, expected(H, k, which)) < 1e-8, (which, k)


@pytest.mark.parametrize("curvature", ["ggn", "fisher", "empirical_fisher"])
def test_every_curvature(curvature):
    model, f, params, x, y = problem_data()
    if curvature == "ggn":
        M = dense_ggn(model, params, x, y)
    else:  # the same operator the transform builds, from the same seed (the Fisher's labels)
        problem = Problem(f, 0, False, (params, x, y))
        M = dense_of_operator(make_operator(curvature, problem, generator=make_generator(3, None, "cpu")))
    assert torch.allclose(M, M.T, atol=1e-12)
    for which in ("largest", "smallest"):
        got = so.eigenvalues(f, k=5, which=which, curvature=curvature, tol=1e-11, seed=3)(params, x, y)
        assert torch.allclose(got, expected(M, 5, which), rtol=1e-8, atol=1e-10 * float(M.norm(2))), which
    d = so.spectral_density(f, curvature=curvature, num_probes=4, num_iterations=30, seed=3)(params, x, y)
    assert d.nodes.shape == (4, 30)
    # a PSD matrix: nodes with weight are non-negative; the GGN of cross-entropy has rank <= N (C - 1) = 24 < 30
    assert float(d.nodes.min()) > -1e-8 * float(M.norm(2))
    assert bool((d.num_steps < 30).all())


def test_eigenvectors_are_a_pytree_of_orthonormal_eigenvectors():
    model, f, params, x, y = problem_data()
    H, unravel = dense_hessian(f, (params, x, y))
    values, vectors = so.eigenvalues(f, k=3, which="magnitude", tol=1e-11, seed=0,
                                     return_eigenvectors=True)(params, x, y)
    assert tree.structure(vectors) == tree.structure(params)
    for name, v in vectors.items():
        assert v.shape == (3,) + params[name].shape
    U = torch.stack([tree.ravel({n: v[i] for n, v in vectors.items()})[0] for i in range(3)])
    assert torch.allclose(U @ U.T, torch.eye(3, dtype=DT), atol=1e-10)
    assert torch.allclose(U @ H, values[:, None] * U, atol=1e-8 * float(H.norm(2)))


def test_per_leaf_eigenvalues_are_the_dense_blocks():
    model, f, params, x, y = problem_data()
    H, _ = dense_hessian(f, (params, x, y))
    got = so.eigenvalues(f, k=4, which="magnitude", per_leaf=True, tol=1e-11, seed=0)(params, x, y)
    assert tree.structure(got) == tree.structure(params)
    start = 0
    for name, p in sorted(params.items()):  # optree flattens dicts in key order: the raveled Hessian's order
        n = p.numel()
        block = H[start : start + n, start : start + n]
        start += n
        k = min(4, n)  # the output bias has 3 entries: all of its eigenvalues
        assert got[name].shape == (k,)
        assert rel_err(got[name], expected(block, k, "magnitude")) < 1e-8, name
    values, vectors = so.eigenvalues(f, k=2, per_leaf=True, num_iterations=3, seed=0,
                                     return_eigenvectors=True)(params, x, y)
    assert vectors["0.weight"].shape == (2, 6, 4) and values["2.bias"].shape == (2,)


def test_spectral_density_moments_match_trace_and_trace_of_square():
    model, f, params, x, y = problem_data()
    H, _ = dense_hessian(f, (params, x, y))
    n = H.shape[0]
    exact = so.trace(f)(params, x, y)
    assert torch.allclose(exact, torch.trace(H))
    for num_probes in (8, 32):
        d = so.spectral_density(f, num_probes=num_probes, num_iterations=12, seed=1)(params, x, y)
        assert d.nodes.shape == (num_probes, 12) and int(d.dim) == n
        assert int(d.num_matvecs) == 12 * num_probes
        for order, M in ((1, H), (2, H @ H)):
            # Rademacher Hutchinson: Var(v^T M v) = 2 (||M||_F^2 - sum_i M_ii^2); 4 standard errors
            sd = math.sqrt(2 * (float((M**2).sum()) - float((torch.diagonal(M) ** 2).sum()))) / n
            bound = 4 * sd / math.sqrt(num_probes)
            assert abs(float(d.moment(order)) - float(torch.trace(M)) / n) <= bound, (order, num_probes)
        assert abs(float(d.trace()) - float(exact)) <= 4 * n * math.sqrt(
            2 * (float((H**2).sum()) - float((torch.diagonal(H) ** 2).sum()))) / n / math.sqrt(num_probes)


def test_per_leaf_densities_integrate_the_blocks():
    model, f, params, x, y = problem_data()
    H, _ = dense_hessian(f, (params, x, y))
    out = so.spectral_density(f, per_leaf=True, num_probes=3, seed=0)(params, x, y)
    start = 0
    for name, p in sorted(params.items()):
        n = p.numel()
        block = H[start : start + n, start : start + n]
        start += n
        d = out[name]
        assert isinstance(d, so.SpectralDensity) and int(d.dim) == n
        assert d.nodes.shape == (3, min(100, n))
        # num_iterations = n (<= 100 here): each run's nodes are all eigenvalues of the block
        assert torch.allclose(d.nodes, torch.linalg.eigvalsh(block).expand(3, n), rtol=1e-8, atol=1e-12)
        assert torch.allclose(d.weights.sum(1), torch.ones(3, dtype=DT))


def test_vmap_per_example_top_eigenvalue_with_fixed_iterations():
    model, f, params, x, y = problem_data(n=5)
    n = sum(p.numel() for p in params.values())
    top = so.eigenvalues(f, k=2, num_iterations=n, seed=0)
    batched = vmap(top, in_dims=(None, 0, 0), randomness="same")(params, x[:, None], y[:, None])
    assert batched.shape == (5, 2)
    for i in range(5):
        H, _ = dense_hessian(f, (params, x[i : i + 1], y[i : i + 1]))
        assert torch.allclose(batched[i], expected(H, 2, "largest"), rtol=1e-8, atol=1e-10)
    dens = vmap(so.spectral_density(f, num_probes=2, num_iterations=5, seed=0), in_dims=(None, 0, 0),
                randomness="different")(params, x[:, None], y[:, None])
    assert dens.nodes.shape == (5, 2, 5) and dens.moment(1).shape == (5,)


def test_adaptive_mode_under_vmap_says_to_fix_the_iterations():
    model, f, params, x, y = problem_data(n=3)
    with pytest.raises(RuntimeError, match="pass num_iterations"):
        vmap(so.eigenvalues(f, seed=0), in_dims=(None, 0, 0), randomness="same")(params, x[:, None], y[:, None])


def test_seeds_generators_aux_argnums_and_dtype():
    model, f, params, x, y = problem_data()
    a = so.eigenvalues(f, k=2, num_iterations=20, seed=4)(params, x, y)
    b = so.eigenvalues(f, k=2, num_iterations=20, seed=4)(params, x, y)
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(4)
    d1 = so.spectral_density(f, num_probes=2, num_iterations=5, generator=g)(params, x, y)
    d2 = so.spectral_density(f, num_probes=2, num_iterations=5, generator=g)(params, x, y)
    assert not torch.equal(d1.nodes, d2.nodes)  # the generator advanced
    d3 = so.spectral_density(f, num_probes=2, num_iterations=5, seed=4)(params, x, y)
    assert torch.equal(d1.nodes, d3.nodes)

    def g_aux(p, xx, yy):
        return f(p, xx, yy), {"n": xx.shape[0]}

    values, aux = so.eigenvalues(g_aux, has_aux=True, tol=1e-10, seed=0)(params, x, y)
    assert aux == {"n": 12} and torch.allclose(values, so.eigenvalues(f, tol=1e-10, seed=0)(params, x, y))

    # argnums: the inputs' Hessian, and a tuple
    Hx, _ = dense_hessian(f, (params, x, y), argnums=1)
    got = so.eigenvalues(f, argnums=1, k=3, tol=1e-11, seed=0)(params, x, y)
    assert rel_err(got, expected(Hx, 3, "largest")) < 1e-8
    both = so.eigenvalues(f, argnums=(0, 1), k=1, seed=0, return_eigenvectors=True)(params, x, y)
    assert isinstance(both[1], tuple) and both[1][1].shape == (1,) + x.shape

    model32 = tanh_mlp((4, 6, 3), dtype=torch.float32)
    f32 = so.functional_loss(model32, F.cross_entropy)
    top32 = so.eigenvalues(f32, seed=0)(so.params_dict(model32), x.float(), y)
    assert top32.dtype == torch.float32


def test_quadratic_with_keyword_arguments():
    A = torch.diag(torch.tensor([5.0, 3.0, 1.0, -2.0], dtype=DT))
    f = lambda v, *, scale: 0.5 * scale * v @ A @ v
    got = so.eigenvalues(f, k=4, num_iterations=4, seed=0)(torch.zeros(4, dtype=DT), scale=2.0)
    assert torch.allclose(got, torch.tensor([10.0, 6.0, 2.0, -4.0], dtype=DT), atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(k=0), ValueError, "k must be at least 1"),
        (dict(k=2.0), TypeError, "k must be an int"),
        (dict(k=3, num_iterations=2), ValueError, "num_iterations must be at least k=3"),
        (dict(which="top"), ValueError, "unknown which='top'"),
        (dict(curvature="gauss-newton"), ValueError, "unknown curvature 'gauss-newton'"),
        (dict(seed=0, generator=torch.Generator()), ValueError, "either seed or generator"),
        (dict(per_leaf=1), TypeError, "per_leaf must be a bool"),
    ],
)
def test_bad_options_fail_at_creation(kwargs, error, match):
    with pytest.raises(error, match=match):
        so.eigenvalues(lambda x: (x**2).sum(), **kwargs)


def test_bad_sizes_and_curvature_needs_fail_clearly():
    x = torch.zeros(5, dtype=DT)
    f = lambda v: (v**2).sum()
    with pytest.raises(ValueError, match="k=6 is larger than the dimension of the operator \\(5\\)"):
        so.eigenvalues(f, k=6)(x)
    with pytest.raises(ValueError, match="num_iterations=6 is larger than the dimension"):
        so.eigenvalues(f, num_iterations=6)(x)
    with pytest.raises(ValueError, match="num_iterations=6 is larger than the dimension"):
        so.spectral_density(f, num_iterations=6)(x)
    with pytest.raises(ValueError, match="num_probes must be at least 1"):
        so.spectral_density(f, num_probes=0)
    with pytest.raises(TypeError, match="so.functional_loss"):
        so.eigenvalues(f, curvature="ggn")
    with pytest.raises(ValueError, match="k=6 is larger than every leaf"):
        so.eigenvalues(lambda p: (p["a"] ** 2).sum() + (p["b"] ** 2).sum(), k=6, per_leaf=True)(
            {"a": torch.zeros(5), "b": torch.zeros(2)})


def test_identity_breaks_down_immediately_and_is_exact():
    f = lambda v: 0.5 * (v**2).sum()
    x = torch.zeros(50, dtype=DT)
    assert torch.allclose(so.eigenvalues(f, k=3, seed=0)(x), torch.ones(3, dtype=DT))
    d = so.spectral_density(f, num_probes=3, num_iterations=10, seed=0)(x)
    assert torch.equal(d.num_steps, torch.ones(3, dtype=torch.int64))
    assert torch.allclose(d.moment(1), torch.tensor(1.0, dtype=DT)) and torch.allclose(d.moment(2), torch.tensor(1.0, dtype=DT))


def test_non_finite_curvature_gives_nan_not_an_eigh_failure():
    f = lambda v: (v**3).sum() * float("nan")
    x = torch.randn(5, dtype=DT)
    assert torch.isnan(so.eigenvalues(f, k=2, seed=0)(x)).all()  # adaptive: stops at once
    assert torch.isnan(so.eigenvalues(f, k=2, num_iterations=3, seed=0)(x)).all()
    assert torch.isnan(so.spectral_density(f, num_probes=2, num_iterations=3, seed=0)(x).nodes).all()


def test_grad_mode_off_empty_leaves_and_a_zero_hessian():
    x = torch.randn(5, dtype=DT)
    with torch.no_grad():
        got = so.eigenvalues(lambda v: (v**3).sum(), k=2, seed=0)(x)
    assert torch.allclose(got, torch.sort(6 * x, descending=True).values[:2])
    params = {"a": x, "b": torch.zeros(0, dtype=DT)}
    f = lambda p: (p["a"] ** 3).sum()
    values, vectors = so.eigenvalues(f, per_leaf=True, seed=0, return_eigenvectors=True)(params)
    assert values["b"].shape == (0,) and vectors["b"].shape == (0, 0) and vectors["a"].shape == (1, 5)
    d = so.spectral_density(f, per_leaf=True, num_probes=2, seed=0)(params)
    assert d["b"].nodes.shape == (2, 0) and float(d["b"].moment(1)) == 0.0
    assert torch.allclose(d["a"].trace(), (6 * x).sum())  # diagonal Hessian, Rademacher probes: exact
    assert torch.equal(so.eigenvalues(lambda v: 2 * v.sum(), k=3, seed=0)(x), torch.zeros(3, dtype=DT))


# --------------------------------------------------------------------------- the gradient as a start hint

def _quadratic_with_close_top(n=400, dtype=torch.float64):
    """f(x) = 1/2 x^T A x with eigenvalues 1 and 1 - 1e-3 k (a tight cluster at the top):
    a random start needs many Lanczos steps to resolve the top one."""
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))
    evals = torch.cat([torch.tensor([1.0], dtype=dtype), 1 - 1e-3 * torch.arange(1, n, dtype=dtype)])
    A = (Q * evals) @ Q.T
    return A, Q[:, 0], (lambda xs: 0.5 * xs[0] @ A @ xs[0])


def _eigen(op, **kwargs):
    from secorder.estimators.eigen import lanczos_eigenpairs

    return lanczos_eigenpairs(op, generator=torch.Generator().manual_seed(0), **kwargs)


def test_the_gradient_start_reaches_the_top_eigenvalue_in_fewer_products():
    import dataclasses

    from secorder.operators.hessian import hessian_operator

    A, top, f = _quadratic_with_close_top()
    noise = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(1), dtype=A.dtype)
    x = top + 1e-3 * noise  # the gradient A x is almost the top eigenvector
    op = hessian_operator(f, [x])
    assert op.top_hint is not None
    hinted = _eigen(op, k=1, tol=1e-3)
    plain = _eigen(dataclasses.replace(op, top_hint=None), k=1, tol=1e-3)
    for res in (hinted, plain):  # the guarantee is the same: within tol ||A|| of an eigenvalue
        assert abs(float(res.eigenvalues[0]) - 1.0) <= 1e-3
        assert float(res.residuals[0]) <= 1e-3
    assert int(hinted.num_matvecs) < int(plain.num_matvecs) // 2, (hinted.num_matvecs, plain.num_matvecs)


@pytest.mark.parametrize("case", ["zero gradient", "smallest", "nan gradient"])
def test_the_start_is_the_random_one_where_the_hint_cannot_help(case):
    import dataclasses

    from secorder.operators.hessian import hessian_operator

    A, top, f = _quadratic_with_close_top(60)
    x = top if case == "smallest" else torch.zeros_like(top)
    op = hessian_operator(f, [x])
    which = "smallest" if case == "smallest" else "largest"
    if case == "nan gradient":
        op = dataclasses.replace(op, top_hint=lambda: [torch.full_like(x, float("nan"))])
    hinted = _eigen(op, k=2, which=which, num_iterations=20)
    plain = _eigen(dataclasses.replace(op, top_hint=None), k=2, which=which, num_iterations=20)
    assert torch.equal(hinted.eigenvalues, plain.eigenvalues)
    assert int(hinted.num_matvecs) == int(plain.num_matvecs) == 20

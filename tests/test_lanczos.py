"""Lanczos eigenpairs and stochastic Lanczos quadrature against dense float64 references.

Everything here is pure linear algebra over a LeafOperator built from an explicit
matrix; the transforms (``so.eigenvalues``, ``so.spectral_density``) are tested in
``test_spectra.py``.
"""

import math
import warnings

import pytest
import torch

from secorder.estimators.eigen import lanczos_eigenpairs
from secorder.estimators.lanczos import FlatOperator, Krylov, block_operator
from secorder.estimators.probes import draw_probes
from secorder.estimators.slq import stochastic_lanczos_quadrature
from secorder.operators import LeafOperator

DT = torch.float64


def dense_operator(A, shapes=None):
    """``A`` as a LeafOperator over leaves of the given shapes (default one vector)."""
    n = A.shape[0]
    shapes = shapes or [(n,)]
    sizes = [math.prod(s) for s in shapes]
    assert sum(sizes) == n
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]

    def matvec(V):
        k = V[0].shape[0]
        X = torch.cat([v.reshape(k, -1) for v in V], 1) @ A
        return [x.reshape((k,) + tuple(s)) for x, s in zip(torch.split(X, sizes, 1), shapes)]

    def block_matvec(i, Vi):
        k = Vi.shape[0]
        o, s = offsets[i], sizes[i]
        return (Vi.reshape(k, -1) @ A[o : o + s, o : o + s]).reshape(Vi.shape)

    return LeafOperator([torch.zeros(s, dtype=A.dtype) for s in shapes], matvec, block_matvec)


def symmetric(evals, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(evals)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return (Q * torch.as_tensor(evals, dtype=DT)) @ Q.T


def expected(A, k, which):
    ref = torch.linalg.eigvalsh(A)
    if which == "largest":
        return ref.flip(0)[:k]
    if which == "smallest":
        return ref[:k]
    return ref[torch.argsort(ref.abs(), descending=True, stable=True)][:k]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def spectra():
    g = torch.Generator().manual_seed(3)
    return {
        # a few outliers over a bulk near zero, like a network's Hessian
        "outliers": torch.cat([torch.tensor([50.0, 20.0, 19.8, -4.0]), torch.rand(76, generator=g, dtype=DT) * 0.2 - 0.1]),
        # Wigner-like: no gap at either end
        "semicircle": torch.linalg.eigvalsh(
            (lambda M: (M + M.T) / math.sqrt(2 * 80))(torch.randn(80, 80, generator=g, dtype=DT))
        ),
        # top eigenvalues 1% apart
        "close": torch.cat([torch.tensor([10.0, 9.9, 9.8, 9.7]), torch.rand(76, generator=g, dtype=DT) * 5]),
    }


@pytest.mark.parametrize("name", ["outliers", "semicircle", "close"])
@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_adaptive_eigenvalues_match_eigvalsh(name, which):
    A = symmetric(spectra()[name])
    op = dense_operator(A, [(30,), (A.shape[0] - 30,)])
    for k in (1, 10):
        res = lanczos_eigenpairs(op, k, which, tol=1e-11, generator=gen(k))
        want = expected(A, k, which)
        assert res.eigenvalues.dtype == DT and res.eigenvalues.shape == (k,)
        rel = ((res.eigenvalues - want).abs() / want.abs().clamp(min=1e-3)).max()
        assert rel < 1e-8, (name, which, k, res.eigenvalues, want)
        assert bool(res.converged)


def test_thick_restart_with_a_small_basis_converges():
    A = symmetric(spectra()["semicircle"])
    res = lanczos_eigenpairs(dense_operator(A), 5, "largest", tol=1e-10, basis_size=12, generator=gen())
    assert torch.allclose(res.eigenvalues, expected(A, 5, "largest"), rtol=1e-8, atol=0)
    assert int(res.num_matvecs) > 12  # it did restart


@pytest.mark.parametrize("reorth", ["full", "partial"])
@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_eigenvectors_are_orthonormal_eigenvectors(which, reorth):
    A = symmetric(spectra()["outliers"])
    shapes = [(4, 10), (40,)]
    res = lanczos_eigenpairs(dense_operator(A, shapes), 6, which, tol=1e-11, generator=gen(),
                             return_eigenvectors=True, reorthogonalize=reorth)
    assert [tuple(u.shape) for u in res.eigenvectors] == [(6, 4, 10), (6, 40)]
    U = torch.cat([u.reshape(6, -1) for u in res.eigenvectors], 1)
    assert torch.allclose(U @ U.T, torch.eye(6, dtype=DT), atol=1e-12)
    residual = (U @ A - res.eigenvalues[:, None] * U).norm(dim=1)
    assert (residual <= 1e-9 * A.norm(2)).all()
    # The reported residuals come from the recurrence. With an orthonormal basis they
    # are the residuals of the returned vectors to rounding; a semi-orthogonal basis
    # (partial reorthogonalisation, |q_i^T q_k| <= sqrt(eps)) gives Ritz vectors that are
    # accurate to about sqrt(eps), and their residuals to sqrt(eps) ||A|| (Simon 1984).
    atol = 1e-9 if reorth == "full" else math.sqrt(torch.finfo(DT).eps) * float(A.norm(2))
    assert torch.allclose(res.residuals, residual, atol=atol)


def test_diag_with_negative_eigenvalues_the_old_package_got_wrong():
    # torch-secorder 0.0.1 (no reorthogonalisation) returns [5, 5, 4.998, 3] here.
    A = torch.diag(torch.tensor([5.0, 3.0, 1.0, -2.0], dtype=DT))
    for which, want in [("largest", [5, 3, 1, -2]), ("smallest", [-2, 1, 3, 5]), ("magnitude", [5, 3, -2, 1])]:
        for mode in ({"num_iterations": 4}, {"tol": 1e-12}):
            res = lanczos_eigenpairs(dense_operator(A), 4, which, generator=gen(), **mode)
            assert torch.allclose(res.eigenvalues, torch.tensor(want, dtype=DT), atol=1e-12), (which, mode)


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_repeated_eigenvalues_come_with_their_multiplicity(which):
    evals = torch.tensor([5.0, 5.0, 5.0, 3.0, 1.0, -2.0, -2.0, 0.5, 0.5, 0.5, 0.5, 0.25], dtype=DT)
    for A in (torch.diag(evals), symmetric(evals, seed=1)):
        for mode in ({"num_iterations": 12}, {"tol": 1e-12}):
            for k in (1, 3, 6, 12):
                res = lanczos_eigenpairs(dense_operator(A), k, which, generator=gen(k), **mode)
                assert torch.allclose(res.eigenvalues, expected(A, k, which), atol=1e-10), (which, mode, k)
            assert bool(res.invariant)  # a breakdown was found and reported, not raised


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_low_rank_operator_breaks_down_and_finds_the_hidden_zeros(which):
    evals = torch.cat([torch.tensor([3.0, -2.0, 1.0]), torch.zeros(57)]).to(DT)
    A = symmetric(evals, seed=2)
    for k in (1, 3, 5, 8):
        res = lanczos_eigenpairs(dense_operator(A), k, which, tol=1e-10, generator=gen(k))
        assert torch.allclose(res.eigenvalues, expected(A, k, which), atol=1e-10), (which, k, res.eigenvalues)
        assert bool(res.invariant) and bool(res.converged)


def test_fixed_iterations_give_the_ritz_values_and_no_sync_decisions():
    A = symmetric(spectra()["outliers"])
    res = lanczos_eigenpairs(dense_operator(A), 3, num_iterations=40, generator=gen())
    assert int(res.num_matvecs) == 40
    assert torch.allclose(res.eigenvalues, expected(A, 3, "largest"), rtol=1e-10)
    full = lanczos_eigenpairs(dense_operator(A), 10, "smallest", num_iterations=A.shape[0], generator=gen())
    assert torch.allclose(full.eigenvalues, expected(A, 10, "smallest"), atol=1e-12)


def test_budget_exhausted_warns_and_says_not_converged():
    A = symmetric(spectra()["semicircle"])
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        res = lanczos_eigenpairs(dense_operator(A), 3, "smallest", tol=1e-14, basis_size=8, max_matvecs=20,
                                 generator=gen())
    assert not bool(res.converged)
    assert int(res.num_matvecs) == 20


def test_seeds_reproduce_and_dtype_follows_the_operator():
    A = symmetric(spectra()["close"]).float()
    op = dense_operator(A)
    a = lanczos_eigenpairs(op, 4, generator=gen(5))
    b = lanczos_eigenpairs(op, 4, generator=gen(5))
    assert a.eigenvalues.dtype == torch.float32
    assert torch.equal(a.eigenvalues, b.eigenvalues)
    want = expected(A.double(), 4, "largest").float()
    assert torch.allclose(a.eigenvalues, want, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(k=0), ValueError, "k must be at least 1"),
        (dict(k=101), ValueError, "k=101 is larger than the dimension"),
        (dict(k=1.0), TypeError, "k must be an int"),
        (dict(k=3, num_iterations=2), ValueError, "num_iterations must be at least k=3"),
        (dict(num_iterations=101), ValueError, "num_iterations=101 is larger than the dimension"),
        (dict(which="top"), ValueError, "unknown which='top'"),
        (dict(tol=0.0), ValueError, "tol must be a positive float"),
        (dict(basis_size=1), ValueError, "basis_size must be larger than k=1"),
    ],
)
def test_bad_options(kwargs, error, match):
    op = dense_operator(torch.eye(100, dtype=DT))
    with pytest.raises(error, match=match):
        lanczos_eigenpairs(op, **kwargs)


def test_krylov_basis_stays_orthonormal_where_plain_lanczos_does_not():
    A = symmetric(spectra()["outliers"])
    g = gen()
    K = Krylov(lambda X: X @ A, torch.randn(3, 80, generator=g, dtype=DT), 50,
               torch.randn(3, 80, generator=g, dtype=DT))
    K.extend(50)
    Q = K.basis
    assert torch.allclose(Q @ Q.transpose(1, 2), torch.eye(50, dtype=DT).expand(3, 50, 50), atol=1e-12)
    # H Q = Q T + beta q e^T
    T = K.projected()
    lhs = Q @ A
    rhs = T @ Q
    rhs[:, -1] += K.next_beta[:, None] * K.next_vector
    assert torch.allclose(lhs, rhs, atol=1e-10)


# --------------------------------------------------------------------------- SLQ


@pytest.mark.parametrize("reorth", ["partial", "full"])
def test_slq_quadrature_is_exact_for_low_degree_polynomials_per_probe(reorth):
    # Gauss quadrature with m nodes integrates degree <= 2m - 1 exactly: per probe,
    # sum_j tau_j theta_j^p = v^T A^p v / v^T v.
    A = symmetric(spectra()["outliers"])
    m, p = 6, 5
    d = stochastic_lanczos_quadrature(dense_operator(A, [(30,), (50,)]), p, m, generator=gen(7),
                                      reorthogonalize=reorth)
    V = torch.cat([v.reshape(p, -1) for v in draw_probes([torch.zeros(30, dtype=DT), torch.zeros(50, dtype=DT)],
                                                          p, generator=gen(7))], 1)
    V = V / V.norm(dim=1, keepdim=True)
    assert d.nodes.shape == (p, m) and d.weights.shape == (p, m)
    assert torch.allclose(d.weights.sum(1), torch.ones(p, dtype=DT))
    Ap = torch.eye(80, dtype=DT)
    for order in range(2 * m):
        quad = (d.weights * d.nodes**order).sum(1)
        exact = ((V @ Ap) * V).sum(1)
        assert torch.allclose(quad, exact, rtol=1e-9, atol=1e-9 * 50**order), order
        Ap = Ap @ A
    assert int(d.num_matvecs) == p * m and int(d.dim) == 80


def _hutchinson_sd(M, n):
    """Standard deviation of one Rademacher sample of v^T M v / n."""
    return math.sqrt(2 * (float((M**2).sum()) - float((torch.diagonal(M) ** 2).sum()))) / n


@pytest.mark.parametrize("reorth", ["partial", "full"])
@pytest.mark.parametrize("num_probes", [10, 40])
def test_slq_moments_estimate_normalised_traces_within_the_hutchinson_bound(num_probes, reorth):
    A = symmetric(spectra()["close"])
    n = A.shape[0]
    d = stochastic_lanczos_quadrature(dense_operator(A), num_probes, 20, generator=gen(11), reorthogonalize=reorth)
    for order, M in ((1, A), (2, A @ A)):
        bound = 4 * _hutchinson_sd(M, n) / math.sqrt(num_probes)  # 4 standard errors
        assert abs(float(d.moment(order)) - float(torch.trace(M)) / n) <= bound, (order, num_probes)
    assert torch.allclose(d.trace(), n * d.moment(1))


@pytest.mark.parametrize("reorth", ["partial", "full"])
def test_slq_on_a_diagonal_matrix_is_exact_and_reports_the_breakdown(reorth):
    evals = torch.tensor([5.0, 5.0, 3.0, 1.0, -2.0, -2.0], dtype=DT)
    d = stochastic_lanczos_quadrature(dense_operator(torch.diag(evals)), 4, 6, generator=gen(), reorthogonalize=reorth)
    assert torch.equal(d.num_steps, torch.full((4,), 4))  # four distinct eigenvalues
    for order in range(4):
        assert torch.allclose(d.moment(order), (evals**order).mean(), atol=1e-12)
    # nodes found after the breakdown carry no weight
    assert torch.isfinite(d.nodes).all() and (d.weights >= -1e-15).all()


def test_slq_chunks_do_not_change_the_result_and_seeds_reproduce():
    A = symmetric(spectra()["semicircle"])
    op = dense_operator(A)
    whole = stochastic_lanczos_quadrature(op, 7, 15, generator=gen(2))
    chunked = stochastic_lanczos_quadrature(op, 7, 15, generator=gen(2), chunk_size=3)
    assert torch.allclose(whole.nodes, chunked.nodes, atol=1e-12)
    assert torch.allclose(whole.weights, chunked.weights, atol=1e-12)
    again = stochastic_lanczos_quadrature(op, 7, 15, generator=gen(2))
    assert torch.equal(whole.nodes, again.nodes)


def test_slq_density_integrates_to_one_and_peaks_at_the_eigenvalues():
    evals = torch.tensor([-1.0] * 30 + [2.0] * 10, dtype=DT)
    d = stochastic_lanczos_quadrature(dense_operator(torch.diag(evals)), 5, 10, generator=gen())
    grid = torch.linspace(-3.0, 4.0, 7001, dtype=DT)
    rho = d.density(grid, sigma=0.1)
    covered = d.grid(100, sigma=0.1)
    assert covered[0] < -1.0 - 0.3 and covered[-1] > 2.0 + 0.3  # three widths beyond the nodes
    assert abs(float(torch.trapezoid(rho, grid)) - 1.0) < 1e-6
    near = lambda t: rho[(grid - t).abs().argmin()]
    assert torch.allclose(near(-1.0), torch.tensor(0.75 / (0.1 * math.sqrt(2 * math.pi)), dtype=DT), rtol=1e-6)
    assert torch.allclose(near(2.0), torch.tensor(0.25 / (0.1 * math.sqrt(2 * math.pi)), dtype=DT), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_probes=0), ValueError, "num_probes must be at least 1"),
        (dict(num_iterations=0), ValueError, "num_iterations must be at least 1"),
        (dict(num_iterations=51), ValueError, "num_iterations=51 is larger than the dimension"),
        (dict(chunk_size=0), ValueError, "chunk_size must be at least 1"),
        (dict(num_probes=2.5), TypeError, "num_probes must be an int"),
        (dict(distribution="uniform"), ValueError, "unknown distribution"),
    ],
)
def test_slq_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        stochastic_lanczos_quadrature(dense_operator(torch.eye(50, dtype=DT)), **kwargs)


def test_block_operator_gives_the_dense_blocks_eigenvalues():
    A = symmetric(spectra()["outliers"])
    op = dense_operator(A, [(30,), (50,)])
    for i, (lo, hi) in enumerate([(0, 30), (30, 80)]):
        res = lanczos_eigenpairs(block_operator(op, i), 3, "magnitude", tol=1e-11, generator=gen())
        assert torch.allclose(res.eigenvalues, expected(A[lo:hi, lo:hi], 3, "magnitude"), rtol=1e-8)


def test_flat_operator_round_trips_leaves():
    op = dense_operator(torch.eye(7, dtype=DT), [(2, 2), (3,)])
    flat = FlatOperator(op)
    X = torch.arange(14, dtype=DT).reshape(2, 7)
    assert torch.equal(flat.to_flat(flat.to_leaves(X)), X)
    assert torch.equal(flat(X), X) and flat.num_matvecs == 2


# --------------------------------------------------------------------------- property test

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 24),
    data=st.data(),
    seed=st.integers(0, 2**16),
    which=st.sampled_from(["largest", "smallest", "magnitude"]),
    repeats=st.booleans(),
    reorth=st.sampled_from(["partial", "full"]),
)
def test_any_size_split_and_spectrum_matches_eigvalsh(n, data, seed, which, repeats, reorth):
    g = torch.Generator().manual_seed(seed)
    evals = torch.randn(n, generator=g, dtype=DT)
    if repeats:  # a few distinct values, repeated: breakdowns on every path
        evals = torch.round(evals)
    A = symmetric(evals, seed=seed)
    cut = data.draw(st.integers(0, n))
    shapes = [s for s in [(cut,), (n - cut,)] if s[0] > 0]
    op = dense_operator(A, shapes)
    k = data.draw(st.integers(1, n))
    want = expected(A, k, which)
    ref = torch.linalg.eigvalsh(A)

    def check(got, atol):
        if which == "magnitude":  # -2 and 2 tie: compare magnitudes, and each value is an eigenvalue
            assert torch.allclose(got.abs(), want.abs(), atol=atol), (got, want)
            assert ((got[:, None] - ref[None]).abs().min(dim=1).values <= atol).all(), (got, ref)
        else:
            assert torch.allclose(got, want, atol=atol), (got, want)

    fixed = lanczos_eigenpairs(op, k, which, num_iterations=n, generator=gen(seed), reorthogonalize=reorth)
    check(fixed.eigenvalues, 1e-9)
    values = lanczos_eigenpairs(op, k, which, tol=1e-10, generator=gen(seed), reorthogonalize=reorth)
    check(values.eigenvalues, 1e-9 * max(1.0, float(ref.abs().max())))
    adaptive = lanczos_eigenpairs(op, k, which, tol=1e-10, generator=gen(seed), return_eigenvectors=True,
                                  reorthogonalize=reorth)
    check(adaptive.eigenvalues, 1e-8)
    U = torch.cat([u.reshape(k, -1) for u in adaptive.eigenvectors], 1)
    assert torch.allclose(U @ U.T, torch.eye(k, dtype=DT), atol=1e-8)
    assert torch.allclose(U @ A, adaptive.eigenvalues[:, None] * U, atol=1e-7)


# --------------------------------------------------------------------------- partial reorthogonalisation

from secorder.estimators.eigen import error_bounds  # noqa: E402
from secorder.estimators.reorthogonalization import STRATEGIES  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["outliers", "semicircle", "close"])
def test_partial_keeps_the_basis_semi_orthogonal_and_reads_less_of_it(name, dtype):
    # Simon (1984): |q_i^T q_k| <= sqrt(eps) is what partial reorthogonalisation keeps.
    evals = spectra()[name]
    A = symmetric(torch.cat([evals, evals * 0.5, evals * 0.25]), seed=4).to(dtype)  # n = 240
    g = gen(9)
    start, spare = torch.randn(3, 240, generator=g, dtype=dtype), torch.randn(3, 240, generator=g, dtype=dtype)
    runs = {}
    for mode in ("partial", "full"):
        K = Krylov(lambda X: X @ A, start, 100, spare, reorthogonalize=mode, host_checks=True)
        K.extend(100)
        Q = K.basis.double()
        loss = float((Q @ Q.transpose(1, 2) - torch.eye(100, dtype=DT)).abs().max())
        runs[mode] = (K, loss)
    eps = torch.finfo(dtype).eps
    assert runs["partial"][1] <= math.sqrt(eps), runs["partial"][1]
    assert runs["full"][1] <= 100 * eps
    assert runs["partial"][0].strategy.num_vectors_read < runs["full"][0].strategy.num_vectors_read
    # the same Krylov space, hence the same Ritz values, to O(eps ||A||)
    ritz = {m: torch.linalg.eigvalsh(K.projected().double()) for m, (K, _) in runs.items()}
    scale = float(torch.linalg.matrix_norm(A.double(), ord=2))
    tol = (1e-3 if dtype == torch.float32 else 1e-10) * scale
    assert torch.allclose(ritz["partial"][:, -5:], ritz["full"][:, -5:], atol=tol, rtol=0)


def test_partial_returns_no_ghost_copies_of_converged_eigenvalues():
    # Plain Lanczos returns spurious copies of converged outliers after enough steps; a
    # semi-orthogonal basis does not (Simon 1984). 150 steps on 4 outliers over a bulk.
    evals = torch.cat([torch.tensor([50.0, 20.0, 19.8, 10.0]), torch.linspace(-0.1, 0.1, 296)]).to(DT)
    A = symmetric(evals, seed=5)
    for dtype, atol in ((torch.float32, 1e-3), (DT, 1e-9)):
        res = lanczos_eigenpairs(dense_operator(A.to(dtype)), 6, num_iterations=150, generator=gen(1),
                                 reorthogonalize="partial")
        got = res.eigenvalues.double()
        assert torch.allclose(got[:4], evals[:4], atol=atol)
        assert (got[4:] <= evals[4:].max() + atol).all()  # the next ones from the bulk, not a second 50 or 20


@pytest.mark.parametrize("name", ["outliers", "semicircle", "close"])
@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-7])
@pytest.mark.parametrize("reorth", ["partial", "full"])
def test_adaptive_tolerance_is_the_stated_residual_and_eigenvalue_bound(name, which, tol, reorth):
    # The guarantee: residuals <= tol ||H|| (||H|| estimated by the largest Ritz value),
    # hence every value within tol ||H|| of an eigenvalue; the default is 1e-4.
    A = symmetric(spectra()[name])
    norm = float(torch.linalg.matrix_norm(A, ord=2))
    for k in (1, 5):
        kwargs = {} if tol == 1e-4 else {"tol": tol}
        res = lanczos_eigenpairs(dense_operator(A), k, which, generator=gen(k), reorthogonalize=reorth,
                                 return_eigenvectors=True, **kwargs)
        # within tol ||H|| of an eigenvalue (which one the adaptive run may still have
        # wrong at a loose tol: the test above pins them at a tight one)
        err = (res.eigenvalues[:, None] - torch.linalg.eigvalsh(A)[None]).abs().amin(dim=1)
        U = torch.cat([u.reshape(k, -1) for u in res.eigenvectors], 1)
        residual = (U @ A - res.eigenvalues[:, None] * U).norm(dim=1)
        assert bool(res.converged)
        assert (residual <= tol * norm * (1 + 1e-6)).all(), (residual / norm, tol)
        assert (err <= tol * norm).all(), (err / norm, tol)


def test_error_bounds_estimate_the_error_of_separated_values():
    # Kato-Temple: an isolated value is far more accurate than its residual.
    A = symmetric(spectra()["outliers"])
    res = lanczos_eigenpairs(dense_operator(A), 2, tol=1e-3, generator=gen())
    err = (res.eigenvalues - expected(A, 2, "largest")).abs()
    assert (err <= res.error_bounds * (1 + 1e-6) + 1e-13).all()
    assert (res.error_bounds < res.residuals).all()


def test_error_bounds_use_the_gap_to_the_other_ritz_values():
    theta = torch.tensor([[0.0, 1.0, 1.05]], dtype=DT)
    r = torch.tensor([[1e-3, 1e-4, 1e-2]], dtype=DT)
    # gaps: 1.0 - 1e-4 for 0.0; 0.05 - 1e-2 for 1.0; 0.05 - 1e-4 for 1.05 (larger than its residual)
    want = torch.tensor([[1e-6 / (1 - 1e-4), 1e-8 / 0.04, 1e-4 / (0.05 - 1e-4)]], dtype=DT)
    assert torch.allclose(error_bounds(theta, r), want)
    # a gap no larger than the residual: the residual itself
    assert torch.allclose(error_bounds(torch.tensor([[0.0, 0.01]]), torch.tensor([[0.1, 0.0]]))[0, 0],
                          torch.tensor(0.1))


def test_reorthogonalize_option_is_validated_and_registered():
    assert STRATEGIES.names() == ("full", "partial")
    op = dense_operator(torch.eye(10, dtype=DT))
    with pytest.raises(ValueError, match="unknown reorthogonalize='selective'"):
        lanczos_eigenpairs(op, reorthogonalize="selective")
    with pytest.raises(TypeError, match="reorthogonalize must be a str"):
        stochastic_lanczos_quadrature(op, 2, 3, reorthogonalize=None)


def test_partial_falls_back_to_full_under_vmap():
    A = symmetric(spectra()["outliers"])

    def top(scale):
        op = LeafOperator([torch.zeros(80, dtype=DT)], lambda V: [scale * (V[0] @ A)], None)
        return lanczos_eigenpairs(op, 2, num_iterations=40, generator=gen(), reorthogonalize="partial").eigenvalues

    batched = torch.func.vmap(top, randomness="same")(torch.tensor([1.0, 2.0], dtype=DT))
    assert torch.allclose(batched, torch.stack([top(torch.tensor(1.0, dtype=DT)),
                                                top(torch.tensor(2.0, dtype=DT))]), atol=1e-10)

"""Statistical and exactness tests of the stochastic estimators over dense LeafOperators.

Bounds come from the estimators' variances: for a probe with i.i.d. entries of
unit variance and fourth moment ``mu4``, ``Var(v^T A v) = (mu4 - 3) sum A_ii^2 + 2 |A|_F^2``
(``mu4 = 1`` Rademacher, 3 normal, ``1/density`` sparse), and the Rademacher
diagonal sample ``v_j (A v)_j`` has variance ``sum_{k != j} A_jk^2``. Every check
allows 5 standard deviations, so a correct estimator fails with probability
below 1e-6 per check at the fixed seeds used here.
"""

import math

import pytest
import torch

from secorder.estimators import (
    draw_probes,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
    xdiag,
    xnystrace,
    xtrace,
)
from secorder.operators import LeafOperator
from secorder.results import STOP_BUDGET, STOP_NUM_SAMPLES, STOP_TOLERANCE

SHAPES = [(7,), (3, 4), (5,)]
N = sum(math.prod(s) for s in SHAPES)
DT = torch.float64


def dense_op(A, shapes=SHAPES, log=None):
    """A LeafOperator applying the symmetric matrix ``A`` to leaves of ``shapes``."""
    templates = [torch.zeros(s, dtype=A.dtype) for s in shapes]
    sizes = [t.numel() for t in templates]

    def matvec(V):
        k = V[0].shape[0]
        if log is not None:
            log.append(k)
        flat = torch.cat([v.reshape(k, -1) for v in V], dim=1) @ A
        return [p.reshape((k,) + s) for p, s in zip(torch.split(flat, sizes, dim=1), shapes)]

    return LeafOperator(templates=templates, matvec=matvec, block_matvec=None)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def sym(seed, n=N):
    B = torch.randn(n, n, generator=gen(seed), dtype=DT)
    return (B + B.T) / 2 + torch.diag(torch.linspace(-1, 3, n, dtype=DT))


def low_rank_psd(seed, rank, n=N):
    B = torch.randn(n, rank, generator=gen(seed), dtype=DT)
    return B @ B.T


def decaying_psd(seed, n=N):
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=DT))
    return Q @ torch.diag(1.0 / torch.arange(1, n + 1, dtype=DT) ** 1.5) @ Q.T


def quad_var(A, mu4):
    return float((mu4 - 3) * (A.diagonal() ** 2).sum() + 2 * (A ** 2).sum())


def leaf_blocks():
    out, start = [], 0
    for s in SHAPES:
        n = math.prod(s)
        out.append(slice(start, start + n))
        start += n
    return out


# -- probes -------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["rademacher", "normal", "sphere", "sparse"])
def test_probes_are_isotropic(distribution):
    V = draw_probes([torch.zeros(s, dtype=DT) for s in SHAPES], 20000, distribution, generator=gen(0), density=0.3)
    M = torch.cat([v.reshape(20000, -1) for v in V], dim=1)
    second = M.T @ M / 20000
    # entries of the empirical second moment have std <= sqrt(mu4 / k) (mu4 <= 1/0.3)
    assert (second - torch.eye(N, dtype=DT)).abs().max() < 5 * math.sqrt((1 / 0.3) / 20000)
    if distribution == "sphere":
        assert torch.allclose(M.pow(2).sum(1), torch.full((20000,), float(N), dtype=DT))
    if distribution == "rademacher":
        assert bool(M.abs().eq(1).all())


def test_sparse_probes_have_the_requested_density():
    V = draw_probes([torch.zeros(1000)], 50, "sparse", generator=gen(1), density=0.1)[0]
    frac = float((V != 0).double().mean())
    assert abs(frac - 0.1) < 5 * math.sqrt(0.1 * 0.9 / 50000)
    assert torch.allclose(V[V != 0].abs(), torch.full_like(V[V != 0], 1 / math.sqrt(0.1)))


# -- Hutchinson trace -----------------------------------------------------------------------


@pytest.mark.parametrize("distribution,mu4", [("rademacher", 1.0), ("normal", 3.0), ("sparse", 10.0)])
def test_hutchinson_trace_unbiased_with_calibrated_stderr(distribution, mu4):
    A = sym(0)
    k = 4000
    est = hutchinson_trace(dense_op(A), k, distribution=distribution, generator=gen(1), chunk_size=500)
    sigma = math.sqrt(quad_var(A, mu4) / k)
    assert abs(float(est.value - A.trace())) < 5 * sigma
    # sample stderr estimates sigma; its relative error is O(sqrt(kurtosis / k))
    assert 0.85 < float(est.stderr) / sigma < 1.15
    assert int(est.num_matvecs) == k and int(est.stop) == STOP_NUM_SAMPLES


def test_hutchinson_trace_sphere_unbiased():
    A = sym(2)
    k = 4000
    est = hutchinson_trace(dense_op(A), k, distribution="sphere", generator=gen(3))
    # sphere probes have no more variance than normal ones (2 |A|_F^2 bounds it)
    assert abs(float(est.value - A.trace())) < 5 * math.sqrt(quad_var(A, 3.0) / k)


def test_hutchinson_per_leaf_traces_unbiased_and_sum_to_total():
    A = sym(4)
    k = 4000
    est = hutchinson_trace(dense_op(A), k, generator=gen(5))
    assert torch.allclose(est.per_leaf.sum(), est.value)
    for i, block in enumerate(leaf_blocks()):
        P = torch.zeros(N, dtype=DT)
        P[block] = 1
        B = (P[:, None] * A + A * P[None, :]) / 2  # v_L^T (A v)_L = v^T B v
        sigma = math.sqrt(quad_var(B, 1.0) / k)
        assert abs(float(est.per_leaf[i] - A.diagonal()[block].sum())) < 5 * sigma
        assert 0.85 < float(est.per_leaf_stderr[i]) / sigma < 1.15


def test_hutchinson_is_exact_on_diagonal_operators_with_rademacher():
    A = torch.diag(torch.arange(1.0, N + 1, dtype=DT))
    est = hutchinson_trace(dense_op(A), 3, generator=gen(0))
    assert float(est.value) == float(A.trace()) and float(est.stderr) == 0.0


def test_single_sample_stderr_is_nan():
    est = hutchinson_trace(dense_op(sym(0)), 1, generator=gen(0))
    assert math.isnan(float(est.stderr))


def test_probes_go_through_the_matvec_chunk_by_chunk():
    log = []
    est = hutchinson_trace(dense_op(sym(0), log=log), 23, chunk_size=5, generator=gen(0))
    assert log == [5, 5, 5, 5, 3] and int(est.num_matvecs) == 23


def test_same_generator_state_reproduces_bit_for_bit():
    A = sym(0)
    a = hutchinson_trace(dense_op(A), 50, generator=gen(7), chunk_size=8)
    b = hutchinson_trace(dense_op(A), 50, generator=gen(7), chunk_size=8)
    c = hutchinson_trace(dense_op(A), 50, generator=gen(8), chunk_size=8)
    assert torch.equal(a.value, b.value) and torch.equal(a.per_leaf, b.per_leaf)
    assert not torch.equal(a.value, c.value)


def test_custom_sampler_is_used():
    A = sym(0)
    calls = []

    def sampler(k):
        calls.append(k)
        return [torch.ones((k,) + s, dtype=DT) for s in SHAPES]

    est = hutchinson_trace(dense_op(A), 6, sampler=sampler, chunk_size=4)
    assert calls == [4, 2]
    assert torch.allclose(est.value, A.sum())  # 1^T A 1


# -- adaptive stopping ----------------------------------------------------------------------


def test_adaptive_stops_at_the_tolerance():
    A = sym(0)
    est = hutchinson_trace(dense_op(A), 10, generator=gen(0), chunk_size=10, rtol=0.05, max_matvecs=100000)
    assert int(est.stop) == STOP_TOLERANCE and est.stop_reason == "tolerance"
    assert float(est.stderr) <= 0.05 * abs(float(est.value))
    # stopped at the first chunk that met it: one chunk fewer did not
    k = int(est.num_matvecs)
    fewer = hutchinson_trace(dense_op(A), k - 10, generator=gen(0), chunk_size=10)
    assert float(fewer.stderr) > 0.05 * abs(float(fewer.value))


def test_adaptive_reports_the_budget_when_the_tolerance_is_out_of_reach():
    est = hutchinson_trace(dense_op(sym(0)), 10, generator=gen(0), chunk_size=7, atol=1e-9, max_matvecs=40)
    assert int(est.stop) == STOP_BUDGET and est.stop_reason == "budget" and int(est.num_matvecs) == 40


def test_adaptive_diagonal_and_hutchpp():
    A = sym(1)
    d = hutchinson_diagonal(dense_op(A), 10, generator=gen(0), chunk_size=20, atol=0.2, max_matvecs=5000)
    assert d.stop_reason == "tolerance"
    assert max(float(s.max()) for s in d.stderr) <= 0.2
    h = hutchpp_trace(dense_op(decaying_psd(0)), 9, generator=gen(0), chunk_size=4, rtol=1e-2, max_matvecs=5000)
    assert h.stop_reason == "tolerance" and float(h.stderr) <= 1e-2 * float(h.value)


# -- Hutchinson diagonal (Bekas et al.) -----------------------------------------------------


def test_hutchinson_diagonal_unbiased_with_calibrated_stderr():
    A = sym(3)
    k = 4000
    est = hutchinson_diagonal(dense_op(A), k, generator=gen(2), chunk_size=300)
    value = torch.cat([v.reshape(-1) for v in est.value])
    err = torch.cat([v.reshape(-1) for v in est.stderr])
    sigma = ((A ** 2).sum(1) - A.diagonal() ** 2).sqrt() / math.sqrt(k)
    assert bool(((value - A.diagonal()).abs() < 5 * sigma).all())
    assert bool(((err / sigma - 1).abs() < 0.15).all())
    assert [v.shape for v in est.value] == [torch.Size(s) for s in SHAPES]


def test_chunked_diagonal_statistics_match_one_chunk():
    """Chunk-by-chunk merging of means and variances equals the one-batch statistics."""
    A = sym(3)
    probes = draw_probes([torch.zeros(s, dtype=DT) for s in SHAPES], 64, generator=gen(2))

    def replay():
        at = [0]

        def sampler(k):
            out = [v[at[0] : at[0] + k] for v in probes]
            at[0] += k
            return out

        return sampler

    one = hutchinson_diagonal(dense_op(A), 64, sampler=replay(), chunk_size=64)
    many = hutchinson_diagonal(dense_op(A), 64, sampler=replay(), chunk_size=7)
    for a, b, sa, sb in zip(one.value, many.value, one.stderr, many.stderr):
        assert torch.allclose(a, b) and torch.allclose(sa, sb)


# -- Hutch++, XTrace, XNysTrace, XDiag --------------------------------------------------------


@pytest.mark.parametrize(
    "estimator,budget,tol", [(hutchpp_trace, 15, 1e-8), (xtrace, 12, 1e-8), (xnystrace, 6, 1e-8)]
)
def test_low_rank_psd_is_near_exact_above_the_rank(estimator, budget, tol):
    A = low_rank_psd(0, rank=4)
    est = estimator(dense_op(A), budget, generator=gen(1))
    assert abs(float(est.value - A.trace())) < tol * float(A.trace())
    for i, block in enumerate(leaf_blocks()):
        assert abs(float(est.per_leaf[i] - A.diagonal()[block].sum())) < tol * float(A.trace())
    assert int(est.num_matvecs) == budget


def test_xdiag_low_rank_near_exact():
    A = low_rank_psd(0, rank=4)
    est = xdiag(dense_op(A), 12, generator=gen(1))
    value = torch.cat([v.reshape(-1) for v in est.value])
    assert torch.allclose(value, A.diagonal(), atol=1e-8 * float(A.diagonal().abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize(
    "estimator,budget,matrix",
    [(hutchpp_trace, 9, sym), (xtrace, 10, sym), (xnystrace, 6, decaying_psd)],
)
def test_variance_reduced_estimators_are_unbiased(estimator, budget, matrix):
    A = matrix(5)
    R = 200
    runs = [estimator(dense_op(A), budget, generator=gen(100 + r)) for r in range(R)]
    vals = torch.stack([e.value for e in runs])
    assert abs(float(vals.mean() - A.trace())) < 5 * float(vals.std()) / math.sqrt(R)
    per_leaf = torch.stack([e.per_leaf for e in runs])
    for i, block in enumerate(leaf_blocks()):
        sd = float(per_leaf[:, i].std()) / math.sqrt(R)
        assert abs(float(per_leaf[:, i].mean() - A.diagonal()[block].sum())) < 5 * sd + 1e-12


@pytest.mark.slow
def test_xdiag_unbiased():
    A = sym(6)
    R = 150
    vals = torch.stack([torch.cat([v.reshape(-1) for v in xdiag(dense_op(A), 10, generator=gen(r)).value]) for r in range(R)])
    sd = vals.std(0) / math.sqrt(R)
    assert bool(((vals.mean(0) - A.diagonal()).abs() < 5 * sd).all())


@pytest.mark.slow
def test_hutchpp_beats_hutchinson_on_a_decaying_spectrum():
    A = decaying_psd(0)
    R = 100
    err_h = torch.stack([hutchinson_trace(dense_op(A), 12, generator=gen(r)).value for r in range(R)]) - A.trace()
    err_pp = torch.stack([hutchpp_trace(dense_op(A), 12, generator=gen(r)).value for r in range(R)]) - A.trace()
    err_x = torch.stack([xtrace(dense_op(A), 12, generator=gen(r)).value for r in range(R)]) - A.trace()
    assert float(err_pp.abs().median()) < float(err_h.abs().median())
    assert float(err_x.abs().median()) < float(err_h.abs().median())


# -- error-bar coverage ----------------------------------------------------------------------


def big_op(seed, n=200, power=1.0):
    """A 200-dim PSD operator with spectrum k^-power on two leaves (150 + 50 entries)."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=DT))
    A = Q @ torch.diag(1.0 / torch.arange(1, n + 1, dtype=DT) ** power) @ Q.T
    return A, dense_op(A, shapes=[(150,), (50,)])


@pytest.mark.slow
@pytest.mark.parametrize(
    "estimator,budget,lowest",
    [(hutchinson_trace, 40, 0.90), (hutchpp_trace, 60, 0.90), (xtrace, 40, 0.90), (xnystrace, 40, 0.90)],
)
def test_95_percent_intervals_cover_at_about_the_nominal_rate(estimator, budget, lowest):
    """Over 200 seeds the 95% interval should contain the truth about 95% of the time.

    The binomial standard deviation of the coverage is 0.015; 0.90 allows more than
    3 of those. (XTrace/XNysTrace report jackknife errors, which are conservative:
    their coverage may reach 1.0.)
    """
    A, op = big_op(7)
    R = 200
    hits = 0
    for r in range(R):
        lo, hi = estimator(op, budget, generator=gen(1000 + r)).interval(0.95)
        hits += int(lo <= A.trace() <= hi)
    assert lowest <= hits / R <= 1.0


@pytest.mark.parametrize("estimator,per_run", [(xtrace, 2), (xnystrace, 1)])
def test_jackknife_stderr_matches_brute_force_reruns(estimator, per_run):
    """stderr = sqrt((m-1)/m sum_i (T_(i) - mean)^2) with T_(i) the estimator rerun without omega_i."""
    A, op = big_op(3, n=200)
    m = 6
    probes = draw_probes([torch.zeros(150, dtype=DT), torch.zeros(50, dtype=DT)], m, generator=gen(4))
    full = estimator(op, per_run * m, sampler=lambda k: [p[:k] for p in probes])
    reruns = []
    for i in range(m):
        keep = [j for j in range(m) if j != i]
        rest = [p[keep] for p in probes]
        reruns.append(estimator(op, per_run * (m - 1), sampler=lambda k: [p[:k] for p in rest]).value)
    T = torch.stack(reruns)
    want = ((m - 1) / m * ((T - T.mean()) ** 2).sum()).sqrt()
    assert torch.allclose(full.stderr, want, rtol=1e-6)


def test_exact_estimators_use_an_operators_own_diagonal():
    """LeafOperator.diagonal (a cheaper exact diagonal) replaces the one-hot columns in every exact quantity."""
    from secorder.estimators import exact
    from secorder.operators import LeafOperator

    A = torch.tensor([[2.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 4.0]], dtype=torch.float64)
    calls = []

    def own(chunk_size):
        calls.append(chunk_size)
        return [A.diagonal()[:2].clone(), A.diagonal()[2:].clone()]

    def block(i, V):
        raise AssertionError("one-hot columns must not run when the operator has its own diagonal")

    op = LeafOperator([torch.zeros(2, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)], None, block,
                      diagonal=own)
    d = exact.exact_diagonal_estimate(op, chunk_size=7)
    t = exact.exact_trace_estimate(op)
    assert torch.equal(torch.cat(d.value), A.diagonal()) and int(d.num_matvecs) == 0
    assert torch.equal(t.value, A.trace()) and torch.equal(t.per_leaf, torch.stack([A.diagonal()[:2].sum(), A[2, 2]]))
    assert int(t.num_matvecs) == 0 and calls == [7, None]
    plain = LeafOperator(op.templates, None, lambda i, V: V.reshape(V.shape[0], -1) @ (A[:2, :2] if i == 0 else A[2:, 2:]))
    assert torch.equal(torch.cat(exact.exact_diagonal(plain)), A.diagonal())
    assert int(exact.exact_trace_estimate(plain).num_matvecs) == 3

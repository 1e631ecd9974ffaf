"""Issue 9 item 5: every stochastic method's 95% interval covers at its smallest budget.

For each method at the smallest budget that gives a finite interval (Hutchinson 2,
Hutch++ 4: at 3 its deflated part has one probe and the interval is infinite;
XTrace 6, XNysTrace 2, XDiag 6), with the method's default test vectors, on four
float64 operators that stress the error bars differently: the Hessian of a tanh MLP
(XNysTrace, PSD only, gets the MLP's GGN), ``2 I`` (``n = 10``), a near-identity PSD
matrix and a random indefinite one (XNysTrace must refuse it). The operators and
seeds are those of ``benchmarks/coverage_intervals.py``, which prints the full
table (every budget, every test-vector distribution).

The bound. With ``R`` independent seeds the observed coverage is a binomial
proportion with standard deviation ``sqrt(p (1 - p) / R)``. The issue asks for a true
coverage of at least 0.90 for a nominal 95% interval. With ``R = 100`` (to keep the
file under 20 s) a method that meets the nominal level (``p = 0.95``, sd 0.022) falls
below ``0.87`` with probability about ``1e-4`` (3.7 sd), and one at the issue's floor
(``p = 0.90``, sd 0.030) with probability 0.16; the failures this guards against
(0.00-0.84 with Rademacher test vectors on ``2 I`` or a near-identity matrix before
the fix) lie 1-30 sd below it. So the threshold is ``0.90 - 0.03``: 0.03 is one
binomial standard deviation at the floor. For the diagonals the statistic is the
mean over entries of the entrywise coverage, whose per-seed terms are positively
correlated, so its spread is at most that of one entry: the same bound applies.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder as so
from secorder import tree
from secorder.estimators import hutchinson_diagonal, hutchinson_trace, hutchpp_trace, xdiag, xnystrace, xtrace
from secorder.operators import LeafOperator

D = torch.float64
SEEDS = 100
THRESHOLD = 0.90 - 0.03  # see the module docstring


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    x, y = torch.randn(20, 4, dtype=D), torch.randint(0, 3, (20,))
    f = so.functional_loss(model, F.cross_entropy)
    flat, unravel = tree.ravel(so.params_dict(model))
    H = torch.func.hessian(lambda t: f(unravel(t), x, y))(flat)
    J = torch.func.jacrev(lambda t: torch.func.functional_call(model, unravel(t), (x,)).flatten())(flat)
    out = model(x).detach().flatten()
    H_out = torch.func.hessian(lambda o: F.cross_entropy(o.view(20, 3), y))(out)
    return H, J.T @ H_out @ J  # the GGN J^T H_L J


def _near_identity(n=40):
    B = torch.randn(n, n, generator=torch.Generator().manual_seed(11), dtype=D)
    return torch.eye(n, dtype=D) + 0.05 * B @ B.T / n


def _indefinite(n=40):
    B = torch.randn(n, n, generator=torch.Generator().manual_seed(12), dtype=D)
    return (B + B.T) / 2 + 2 * torch.eye(n, dtype=D)


@pytest.fixture(scope="module")
def matrices():
    H, G = _mlp()
    return {"mlp": H, "mlp-ggn": G, "2I": 2 * torch.eye(10, dtype=D), "near-I": _near_identity(),
            "indef": _indefinite()}


def _op(A, psd=False):
    return LeafOperator([torch.zeros(A.shape[0], dtype=D)], lambda V: [V[0] @ A], None, psd=psd)


def _gen(r):
    return torch.Generator().manual_seed(r)


TRACE_CASES = [(hutchinson_trace, 2), (hutchpp_trace, 4), (xtrace, 6)]


@pytest.mark.parametrize("operator", ["mlp", "2I", "near-I", "indef"])
@pytest.mark.parametrize("estimator,budget", TRACE_CASES, ids=["hutchinson", "hutch++", "xtrace"])
def test_trace_intervals_cover_at_the_minimum_budget(matrices, estimator, budget, operator):
    A = matrices[operator]
    op, truth = _op(A), A.trace()
    hits = sum(int(lo <= truth <= hi) for lo, hi in
               (estimator(op, budget, generator=_gen(r)).interval(0.95) for r in range(SEEDS)))
    assert hits / SEEDS >= THRESHOLD, f"coverage {hits / SEEDS:.3f}"


@pytest.mark.parametrize("operator", ["mlp-ggn", "2I", "near-I"])
def test_xnystrace_intervals_cover_at_the_minimum_budget(matrices, operator):
    A = matrices[operator]
    op, truth = _op(A, psd=True), A.trace()
    hits = sum(int(lo <= truth <= hi) for lo, hi in
               (xnystrace(op, 2, generator=_gen(r)).interval(0.95) for r in range(SEEDS)))
    assert hits / SEEDS >= THRESHOLD, f"coverage {hits / SEEDS:.3f}"


def test_xnystrace_refuses_the_indefinite_matrix(matrices):
    with pytest.raises(ValueError, match="positive semi-definite"):
        xnystrace(_op(matrices["indef"]), 30, generator=_gen(0))


def test_the_deflating_methods_draw_normal_test_vectors_by_default(matrices):
    """The mechanism: Rademacher test vectors on ``2 I`` under-cover (measured 0.70-0.72 and 0.00).

    With Rademacher vectors the residual terms of a multiple of the identity vary only
    through the few directions the low-rank basis removes, a discrete distribution
    whose spread over a few test vectors is often 0; normal test vectors add the
    chi-square spread of ``|omega|^2``. This test fails if the default goes back.
    """
    A = matrices["2I"]
    op, truth = _op(A, psd=True), A.trace()
    for estimator, budget in ((hutchpp_trace, 4), (xtrace, 6), (xnystrace, 2)):
        cover = {}
        for dist in ("rademacher", None):
            kw = {} if dist is None else dict(distribution=dist)
            cover[dist] = sum(int(lo <= truth <= hi) for lo, hi in
                              (estimator(op, budget, generator=_gen(r), **kw).interval(0.95) for r in range(SEEDS)))
        assert cover["rademacher"] / SEEDS < 0.80 and cover[None] / SEEDS >= THRESHOLD, (estimator.__name__, cover)
    # the transforms use the same default (the registry's), not the estimator functions' own
    f = lambda x: (x ** 2).sum()  # noqa: E731  Hessian 2 I
    x = torch.zeros(10, dtype=D)
    for method, budget in (("hutch++", 4), ("xtrace", 6), ("xnystrace", 2)):
        fn = {"hutch++": hutchpp_trace, "xtrace": xtrace, "xnystrace": xnystrace}[method]
        est = so.trace_estimate(f, method=method, num_samples=budget, seed=3)(x)
        want = fn(op, budget, generator=_gen(3))
        torch.testing.assert_close(est.value, want.value, rtol=1e-12, atol=1e-12)


def _diagonal_coverage(estimator, A, budget):
    op, truth = _op(A), A.diagonal()
    total = 0.0
    for r in range(SEEDS):
        lo, hi = estimator(op, budget, generator=_gen(r)).interval(0.95)
        total += float(((lo[0] <= truth) & (truth <= hi[0])).double().mean())
    return total / SEEDS


@pytest.mark.parametrize("operator", ["mlp", "2I", "near-I", "indef"])
def test_hutchinson_diagonal_intervals_cover_at_the_minimum_budget(matrices, operator):
    assert _diagonal_coverage(hutchinson_diagonal, matrices[operator], 2) >= THRESHOLD


@pytest.mark.parametrize("operator", ["mlp", "2I", "near-I", "indef"])
def test_xdiag_intervals_cover_at_the_minimum_budget(matrices, operator):
    """The jackknife error bar (measured 0.95-0.97 over 200 seeds; the leave-one-out spread it
    replaced covered 0.77 on ``2 I`` and 0.83 on the near-identity matrix, failing this test)."""
    assert _diagonal_coverage(xdiag, matrices[operator], 6) >= THRESHOLD


def test_xdiag_intervals_cover_at_the_largest_budget(matrices):
    """At ``num_samples = n`` (the largest XDiag takes) on ``2 I``: measured 0.96 (200 seeds).

    Beyond it the interval under-covered (0.86 at ``num_samples = 18``, 0.75 at 20 with
    ``n = 10``), which is why XDiag refuses ``num_samples > n``; the exact diagonal costs
    ``n`` matvecs there anyway.
    """
    assert _diagonal_coverage(xdiag, matrices["2I"], 10) >= THRESHOLD
    with pytest.raises(ValueError, match="num_samples <= the dimension 10"):
        xdiag(_op(matrices["2I"]), 12, generator=_gen(0))


def _leaf_op(A, sizes, psd=False):
    def matvec(V):
        return list(torch.split(torch.cat(V, dim=1) @ A, list(sizes), dim=1))

    return LeafOperator([torch.zeros(s, dtype=D) for s in sizes], matvec, None, psd=psd)


PER_LEAF_CASES = [(xtrace, 6, op) for op in ("mlp", "2I", "near-I", "indef")] + [
    (xnystrace, 2, op) for op in ("mlp-ggn", "2I", "near-I")]


@pytest.mark.parametrize("estimator,budget,operator", PER_LEAF_CASES,
                         ids=[f"{e.__name__}-{o}" for e, _, o in PER_LEAF_CASES])
def test_per_leaf_intervals_cover_at_the_minimum_budget(matrices, estimator, budget, operator):
    """Per-leaf traces (the MLP split into its four parameters, the others into blocks of
    4, 3 and the rest): the mean over leaves of the per-leaf intervals' coverage, same
    bound as above. The leave-one-out spread used before covered 0.86 for XTrace on ``2 I``
    at 6 and 0.57-0.85 at larger budgets (``--per-leaf`` in the benchmark)."""
    A = matrices[operator]
    sizes = (24, 6, 18, 3) if A.shape[0] == 51 else (4, 3, A.shape[0] - 7)
    op = _leaf_op(A, sizes, psd=estimator is xnystrace)
    truth = torch.stack([d.sum() for d in torch.split(A.diagonal(), list(sizes))])
    total = 0.0
    for r in range(SEEDS):
        lo, hi = estimator(op, budget, generator=_gen(r)).per_leaf_interval(0.95)
        total += float(((lo <= truth) & (truth <= hi)).double().mean())
    assert total / SEEDS >= THRESHOLD, f"coverage {total / SEEDS:.3f}"


def test_hutchpp_sketch_spanning_the_whole_space_has_a_rounding_error_bar(matrices):
    """At ``num_samples >= 3 n`` the sketch is a basis of everything: the estimate is the
    exact trace up to rounding, and the deflated samples' spread (rounding noise, near 0)
    made a zero-width interval that missed the exact trace in half the runs on ``2 I``
    (0.51 at 40 matvecs). The error bar is the exact part's summation bound instead:
    every interval, total and per leaf, holds the exact value, and stays at rounding size."""
    A = matrices["2I"]
    sizes = (4, 3, A.shape[0] - 7)
    op = _leaf_op(A, sizes)
    truth = torch.stack([d.sum() for d in torch.split(A.diagonal(), list(sizes))])
    for r in range(20):
        est = hutchpp_trace(op, 3 * A.shape[0] + r % 4, generator=_gen(r))
        lo, hi = est.interval(0.95)
        assert lo <= A.trace() <= hi
        lo, hi = est.per_leaf_interval(0.95)
        assert bool(((lo <= truth) & (truth <= hi)).all())
        assert 0 < float(est.stderr) < 1e-12

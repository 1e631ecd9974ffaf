"""The jackknife error bars of XTrace, XNysTrace and XDiag against their definition.

The jackknife standard error of an estimator built from ``m`` test vectors is
``sqrt((m-1)/m sum_i (T_(i) - mean_i T_(i))^2)``, with ``T_(i)`` the same estimator run
on the test vectors other than ``omega_i``. The estimators form every ``T_(i)`` from
the sketch in closed form (no matvec); here each ``T_(i)`` is computed by rerunning
the estimator on the ``m - 1`` remaining test vectors (a sampler that returns fixed
columns), in float64, so any slip in the closed forms shows as a mismatch far above
rounding.
"""

import math

import pytest
import torch

from secorder.estimators import xdiag, xnystrace, xtrace
from secorder.operators import LeafOperator

D = torch.float64
SIZES = (5, 7, 9)  # three leaves, n = 21


def _op(A, sizes=SIZES, psd=False):
    def matvec(V):
        return list(torch.split(torch.cat(V, dim=1) @ A, list(sizes), dim=1))

    return LeafOperator([torch.zeros(s, dtype=D) for s in sizes], matvec, None, psd=psd)


def _fixed(cols, sizes=SIZES):
    """A sampler that returns the columns of ``cols`` as probes, whatever ``k`` is asked."""
    return lambda k: list(torch.split(cols.T.clone(), list(sizes), dim=1))


def _matrices():
    g = torch.Generator().manual_seed(0)
    n = sum(SIZES)
    B = torch.randn(n, n, generator=g, dtype=D)
    return {"indefinite": (B + B.T) / 2 + torch.eye(n, dtype=D),
            "psd": B @ B.T / n + 0.1 * torch.eye(n, dtype=D),
            "near-I": torch.eye(n, dtype=D) + 0.05 * B @ B.T / n}, g


def _jackknife(T):
    m = T.shape[-1]
    return ((m - 1) / m * ((T - T.mean(dim=-1, keepdim=True)) ** 2).sum(dim=-1)).sqrt()


@pytest.mark.parametrize("m", [4, 6])
@pytest.mark.parametrize("name", ["indefinite", "near-I"])
def test_xdiag_stderr_is_the_jackknife_over_test_vectors(name, m):
    mats, g = _matrices()
    A = mats[name]
    Om = torch.randn(A.shape[0], m, generator=g, dtype=D)
    est = xdiag(_op(A), 2 * m, sampler=_fixed(Om))
    reps = [torch.cat(xdiag(_op(A), 2 * (m - 1), sampler=_fixed(Om[:, [j for j in range(m) if j != i]])).value)
            for i in range(m)]
    want = _jackknife(torch.stack(reps, dim=1))
    torch.testing.assert_close(torch.cat(est.stderr), want, rtol=1e-9, atol=1e-12)
    assert float(est.dof) == m - 1


@pytest.mark.parametrize("m", [4, 6])
def test_xtrace_stderr_and_per_leaf_stderr_are_the_jackknife(m):
    mats, g = _matrices()
    A = mats["indefinite"]
    Om = torch.randn(A.shape[0], m, generator=g, dtype=D)
    est = xtrace(_op(A), 2 * m, sampler=_fixed(Om))
    reps = [xtrace(_op(A), 2 * (m - 1), sampler=_fixed(Om[:, [j for j in range(m) if j != i]])) for i in range(m)]
    torch.testing.assert_close(est.stderr, _jackknife(torch.stack([r.value for r in reps])), rtol=1e-9, atol=1e-12)
    per_leaf = torch.stack([r.per_leaf for r in reps], dim=1)  # (leaves, m)
    torch.testing.assert_close(est.per_leaf_stderr, _jackknife(per_leaf), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("m", [3, 6])
def test_xnystrace_stderr_and_per_leaf_stderr_are_the_jackknife(m):
    mats, g = _matrices()
    A = mats["psd"]
    Om = torch.randn(A.shape[0], m, generator=g, dtype=D)
    op = _op(A, psd=True)
    est = xnystrace(op, m, sampler=_fixed(Om))
    reps = [xnystrace(op, m - 1, sampler=_fixed(Om[:, [j for j in range(m) if j != i]])) for i in range(m)]
    # the Nystrom shift nu depends on the sketch's norm, so the reruns carry a slightly
    # different (rounding-sized) shift: compare at the level of that shift
    torch.testing.assert_close(est.stderr, _jackknife(torch.stack([r.value for r in reps])), rtol=1e-7, atol=1e-10)
    per_leaf = torch.stack([r.per_leaf for r in reps], dim=1)
    torch.testing.assert_close(est.per_leaf_stderr, _jackknife(per_leaf), rtol=1e-7, atol=1e-10)


def test_a_sketch_of_rank_m_minus_one_gives_an_infinite_error_bar_not_nan():
    """Rank-``m - 1`` sketches make two leave-out directions parallel: the error bar is
    unknown, reported as ``inf`` (the interval is the whole line), never ``nan`` or a
    finite guess; the estimate stays exact."""
    B = torch.randn(12, 2, generator=torch.Generator().manual_seed(0), dtype=D)
    A = B @ B.T  # rank 2, m = 3
    op = _op(A, sizes=(12,))
    d = xdiag(op, 6, generator=torch.Generator().manual_seed(0))
    t = xtrace(op, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(d.value[0], A.diagonal())
    torch.testing.assert_close(t.value, A.trace())
    assert bool((d.stderr[0] == math.inf).all()) and float(t.stderr) == math.inf
    lo, hi = d.interval(0.95)
    assert bool((lo[0] == -math.inf).all() and (hi[0] == math.inf).all())

"""The stochastic methods through the transforms: values, randomness, vmap, grad, errors."""

import math

import pytest
import torch
from torch.func import grad, vmap

import secorder as so
from secorder.estimators import draw_probes, make_generator

DT = torch.float64


def problem(seed=0, n=12):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=DT)
    A = (B + B.T) / 2

    def f(p, A):
        x = torch.cat([p["w"].reshape(-1), p["b"]])
        return 0.5 * x @ A @ x + (x ** 4).sum() / 12

    p = {"w": torch.randn(2, 4, generator=g, dtype=DT), "b": torch.randn(n - 8, generator=g, dtype=DT)}
    return f, p, A


def hessian(f, p, A):
    x = torch.cat([p["w"].reshape(-1), p["b"]])
    return A + torch.diag(x ** 2)


def test_stochastic_trace_is_a_plain_tensor_close_to_exact():
    f, p, A = problem()
    H = hessian(f, p, A)
    k = 3000
    sigma = math.sqrt(2 * float((H ** 2).sum() - (H.diagonal() ** 2).sum()) / k)
    # hutch++ and xtrace only reduce the variance: Hutchinson's 5-sigma bound holds for them
    for method, num in [("hutchinson", k), ("hutch++", 3 * k), ("xtrace", 20)]:
        t = so.trace(f, method=method, num_samples=num, seed=0)(p, A)
        assert isinstance(t, torch.Tensor) and t.shape == ()
        assert abs(float(t - H.trace())) < 5 * sigma, method
    assert torch.allclose(so.trace(f)(p, A), H.trace())


def test_stochastic_diag_is_a_pytree_close_to_exact():
    f, p, A = problem()
    H = hessian(f, p, A)
    k = 3000
    sigma = ((H ** 2).sum(1) - H.diagonal() ** 2).sqrt() / math.sqrt(k)
    for method in ["hutchinson", "xdiag"]:
        d = so.hessian_diag(f, method=method, num_samples=k if method == "hutchinson" else 10, seed=1)(p, A)
        assert d["w"].shape == (2, 4) and d["b"].shape == (4,)
        flat = torch.cat([d["w"].reshape(-1), d["b"]])
        if method == "hutchinson":
            assert bool(((flat - H.diagonal()).abs() < 5 * sigma).all())
        else:  # 5 test vectors on a 12-dim operator: only check it is finite and unbiased-shaped
            assert bool(torch.isfinite(flat).all())


def test_estimate_companions_carry_error_bars_and_per_leaf_traces():
    f, p, A = problem()
    H = hessian(f, p, A)
    est = so.trace_estimate(f, num_samples=2000, seed=0)(p, A)
    assert isinstance(est, so.TraceEstimate) and int(est.num_matvecs) == 2000
    assert set(est.per_leaf) == {"w", "b"} and est.per_leaf["w"].shape == ()
    assert torch.allclose(est.per_leaf["w"] + est.per_leaf["b"], est.value)
    assert abs(float(est.per_leaf["w"] - H.diagonal()[:8].sum())) < 5 * float(est.per_leaf_stderr["w"])
    lo, hi = est.interval(0.95)
    # Student t with num_samples - 1 = 1999 degrees of freedom (issue 9, item 5)
    assert float(hi - lo) == pytest.approx(2 * 1.961151 * float(est.stderr), rel=1e-5)
    ex = so.trace_estimate(f, method="exact")(p, A)
    assert torch.allclose(ex.value, H.trace()) and float(ex.stderr) == 0 and int(ex.num_matvecs) == 12
    d = so.hessian_diag_estimate(f, num_samples=50, seed=0)(p, A)
    assert isinstance(d, so.DiagonalEstimate) and d.stderr["w"].shape == (2, 4)
    (e2, aux) = so.trace_estimate(lambda p, A: (f(p, A), 7), has_aux=True, num_samples=5, seed=0)(p, A)
    assert aux == 7 and torch.equal(e2.value, so.trace_estimate(f, num_samples=5, seed=0)(p, A).value)


def test_adaptive_through_the_transform():
    f, p, A = problem()
    est = so.trace_estimate(f, num_samples=20, seed=0, rtol=0.05, max_matvecs=50000, chunk_size=20)(p, A)
    assert est.stop_reason == "tolerance" and float(est.stderr) <= 0.05 * abs(float(est.value))
    est = so.trace_estimate(f, num_samples=20, seed=0, atol=1e-12, max_matvecs=60, chunk_size=20)(p, A)
    assert est.stop_reason == "budget" and int(est.num_matvecs) == 60


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace", "xnystrace"])
def test_seed_reproduces_bit_for_bit_and_no_seed_draws_fresh_probes(method):
    f, p, A = problem()
    A = A @ A.T if method == "xnystrace" else A  # PSD for the Nystrom method
    n = 6
    a = so.trace(f, method=method, num_samples=n, seed=3)(p, A)
    b = so.trace(f, method=method, num_samples=n, seed=3)(p, A)
    assert torch.equal(a, b)
    fresh = so.trace(f, method=method, num_samples=n)
    assert not torch.equal(fresh(p, A), fresh(p, A))
    g = torch.Generator().manual_seed(3)
    with_gen = so.trace(f, method=method, num_samples=n, generator=g)
    first, second = with_gen(p, A), with_gen(p, A)
    assert torch.equal(first, a) and not torch.equal(first, second)  # the generator advances


def test_vmap_randomness_different_gives_each_element_its_own_probes():
    f, p, A = problem()
    batch = {k: v.expand((4,) + v.shape).clone() for k, v in p.items()}
    t = so.trace(f, method="hutchinson", num_samples=5)
    diff = vmap(t, in_dims=(0, None), randomness="different")(batch, A)
    same = vmap(t, in_dims=(0, None), randomness="same")(batch, A)
    assert diff.shape == (4,) and len(set(diff.tolist())) == 4
    assert len(set(same.tolist())) == 1
    # with a seed: reproducible across calls, still distinct per element
    ts = so.trace(f, method="hutchinson", num_samples=5, seed=0)
    d1 = vmap(ts, in_dims=(0, None), randomness="different")(batch, A)
    d2 = vmap(ts, in_dims=(0, None), randomness="different")(batch, A)
    assert torch.equal(d1, d2) and len(set(d1.tolist())) == 4
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(t, in_dims=(0, None))(batch, A)
    est = vmap(so.trace_estimate(f, num_samples=5), in_dims=(0, None), randomness="different")(batch, A)
    assert est.value.shape == (4,) and est.per_leaf["w"].shape == (4,)


def test_vmapped_estimates_match_unbatched_ones_on_each_element():
    f, p, A = problem()
    batch = {k: torch.randn((3,) + v.shape, dtype=DT) for k, v in p.items()}
    out = vmap(so.trace(f, method="xtrace", num_samples=8), in_dims=(0, None), randomness="same")(batch, A)
    torch.manual_seed(123)
    out = vmap(so.trace(f, method="xtrace", num_samples=8), in_dims=(0, None), randomness="same")(batch, A)
    for i in range(3):
        torch.manual_seed(123)
        single = so.trace(f, method="xtrace", num_samples=8)({k: v[i] for k, v in batch.items()}, A)
        assert torch.allclose(out[i], single)


def test_grad_of_the_estimate_is_the_estimate_of_the_grad():
    f, p, A = problem()
    k = 7
    got = grad(so.trace(f, method="hutchinson", num_samples=k, seed=5))(p, A)
    # same probes, drawn explicitly: d/dx mean_j v_j^T H(x) v_j = mean_j d/dx sum_i x_i^2 v_ji^2
    leaves = [p["b"], p["w"]]  # flattening order of the dict: sorted keys
    V = draw_probes(leaves, k, generator=make_generator(5, None, torch.device("cpu")))
    vb, vw = V
    x = {"w": p["w"], "b": p["b"]}
    want = {"w": 2 * x["w"] * (vw ** 2).mean(0), "b": 2 * x["b"] * (vb ** 2).mean(0)}
    assert torch.allclose(got["w"], want["w"]) and torch.allclose(got["b"], want["b"])
    # and it is unbiased for the gradient of the exact trace (2 x for Rademacher)
    exact = grad(so.trace(f))(p, A)
    assert torch.allclose(exact["w"], 2 * p["w"]) and torch.allclose(got["w"], exact["w"])


# -- bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(method="hutchinson", num_samples=0), ValueError, "num_samples must be at least 1"),
        (dict(method="hutchinson", num_samples=2.5), TypeError, "num_samples must be an int"),
        (dict(method="hutch++", num_samples=2), ValueError, "at least 3"),
        (dict(method="xtrace", num_samples=99), ValueError, "even num_samples.*98 or 100"),
        (dict(method="xtrace", num_samples=4), ValueError, "at least 6"),
        (dict(method="lanczos"), ValueError, "valid methods are 'exact', 'hutchinson', 'hutch\\+\\+', 'xtrace'"),
        (dict(method="hutchinson", distribution="uniform"), ValueError, "valid ones are 'rademacher', 'normal'"),
        (dict(method="hutchinson", rtol=0.1), ValueError, "needs a matvec budget"),
        (dict(method="hutchinson", atol=-1.0, max_matvecs=10), ValueError, "atol must be a non-negative"),
        (dict(method="hutchinson", max_matvecs=10), ValueError, "pass rtol and/or atol"),
        (dict(method="hutchinson", seed=0, generator=torch.Generator()), ValueError, "either seed or generator"),
        (dict(method="hutchinson", seed="0"), TypeError, "seed must be an int"),
        (dict(method="exact", num_samples=10), ValueError, "num_samples only apply to the stochastic"),
        (dict(method="xtrace", rtol=0.1, max_matvecs=100), ValueError, "adaptive stopping"),
    ],
)
def test_bad_trace_options_raise_when_the_transform_is_created(kwargs, error, match):
    f, _, _ = problem()
    with pytest.raises(error, match=match):
        so.trace(f, **kwargs)


def test_bad_diag_options():
    f, _, _ = problem()
    with pytest.raises(ValueError, match="valid methods are 'exact', 'hutchinson', 'xdiag'"):
        so.hessian_diag(f, method="xtrace")
    with pytest.raises(ValueError, match="even num_samples"):
        so.hessian_diag(f, method="xdiag", num_samples=7)
    with pytest.raises(ValueError, match="valid methods"):
        so.trace_estimate(f, method="nope")


def test_xtrace_budget_above_the_dimension_is_refused():
    f, p, A = problem()
    with pytest.raises(ValueError, match="num_samples/2 <= the dimension 12"):
        so.trace(f, method="xtrace", num_samples=30, seed=0)(p, A)

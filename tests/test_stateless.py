"""Stateless transforms (issue 24): honest wrapping, a per-thread debug view, ``so.explain``, results that
carry their engine, and one transformed function shared by threads giving the sequential answers bit for bit."""

from __future__ import annotations

import inspect
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

import secorder as so
from secorder import tree

DT = torch.float64


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def _data(i: int, n: int = 5):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(n, 3, dtype=DT, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loss(x, *, scale=1.0):
    return scale * (x ** 3).sum()


# ---- honest wrapping --------------------------------------------------------------------------------

TRANSFORMS = {
    "hvp": lambda f: so.hvp(f),
    "ggn_vp": lambda f: so.ggn_vp(f),
    "fisher_vp": lambda f: so.fisher_vp(f, seed=0),
    "empirical_fisher_vp": lambda f: so.empirical_fisher_vp(f),
    "trace": lambda f: so.trace(f),
    "trace_estimate": lambda f: so.trace_estimate(f, method="hutchinson", seed=0),
    "diagonal": lambda f: so.diagonal(f),
    "diagonal_estimate": lambda f: so.diagonal_estimate(f, method="hutchinson", seed=0),
    "eigenvalues": lambda f: so.eigenvalues(f, seed=0),
    "spectral_density": lambda f: so.spectral_density(f, seed=0),
    "linear_operator": lambda f: so.linear_operator(f),
    "solve": lambda f: so.solve(f, damping=1.0),
    "kfac": lambda f: so.kfac(f),
    "ekfac": lambda f: so.ekfac(f),
}
TANGENT = {"hvp", "ggn_vp", "fisher_vp", "empirical_fisher_vp", "solve"}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_no_transform_copies_f_attributes_and_each_names_itself(name):
    f = so.functional_loss(_model(), nn.CrossEntropyLoss())
    f.marker = "mine"  # an attribute of f that functools.wraps would have copied
    fn = TRANSFORMS[name](f)
    assert not hasattr(fn, "__wrapped__") and not hasattr(fn, "marker") and not hasattr(fn, "model")
    assert fn.__name__ == fn.__qualname__ == f"{name}(FunctionalLoss)"
    assert fn.__doc__.splitlines()[0] == f"{name}(FunctionalLoss): the secorder.{name} transform of FunctionalLoss."
    params = [p.name for p in inspect.signature(fn).parameters.values()]
    # FunctionalLoss takes (params, inputs, targets, buffers=None): a defaulted argument before v.
    assert params == (["args", "kwargs"] if name in TANGENT else ["params", "inputs", "targets", "buffers"])


def test_signatures_are_f_s_plus_the_tangent_or_plain():
    def g(x, y):
        return (x * y).sum()

    assert str(inspect.signature(so.hvp(g))) == "(x, y, v, /)"
    assert str(inspect.signature(so.hvp(_loss))) == "(x, v, /, *, scale=1.0)"
    assert str(inspect.signature(so.trace(_loss))) == "(x, /, *, scale=1.0)"
    assert str(inspect.signature(so.laplacian(_loss))) == "(x, /)"  # laplacian passes no keywords to f
    assert str(inspect.signature(so.hvp(lambda *xs: xs[0].sum()))) == "(*args, **kwargs)"
    assert str(inspect.signature(so.hvp(lambda x, v: (x * v).sum()))) == "(*args, **kwargs)"  # v taken
    assert str(inspect.signature(so.laplacian(lambda x, *, k: x.sum()))) == "(*args, **kwargs)"
    # the signature binds what the function takes
    inspect.signature(so.hvp(g)).bind(torch.ones(2), torch.ones(2), torch.ones(2))
    with pytest.raises(TypeError):
        inspect.signature(so.hvp(g)).bind(torch.ones(2), torch.ones(2))


def test_a_transform_as_a_class_attribute_binds_like_a_function():
    class Holder:
        tr = so.trace(lambda self, x: (x ** 3).sum(), argnums=1)

    x = torch.tensor([1.0, 2.0], dtype=DT)
    assert torch.equal(Holder().tr(x), so.trace(lambda s, z: (z ** 3).sum(), argnums=1)(None, x))
    assert Holder.tr.__name__.endswith("Holder.<lambda>)")  # unbound through the class: the transform itself


def test_a_nested_transform_inherits_nothing():
    tr = so.trace(_loss)
    tr(torch.ones(2))
    assert tr.last_engine == "generic"
    h = so.hvp(tr)
    assert h.__name__ == "hvp(trace(_loss))"
    assert h.last_engine is None and h.last_fallback_reason is None and h.last_method is None
    assert not hasattr(h, "__wrapped__")


# ---- the debug view is per thread ----------------------------------------------------------------------

def _u(x, uncovered):
    # so.laplacian's route depends on the call: lgamma has no forward-Laplacian rule (exact fallback)
    return (torch.lgamma(x + 3.0) if uncovered else torch.sin(x)).sum()


def test_debug_view_is_per_thread_and_written_whole():
    lap = so.laplacian(_u)
    x = torch.linspace(0.1, 0.9, 4, dtype=DT)
    barrier = threading.Barrier(8)
    bad = []

    def work(i: int):
        uncovered = bool(i % 2)
        barrier.wait()
        for _ in range(10):
            lap(x, uncovered)
            method, reason = lap.last_method, lap.last_fallback_reason
            if uncovered and not (method == "exact" and "lgamma" in reason):
                bad.append((i, method, reason))
            if not uncovered and not (method == "forward" and reason is None):
                bad.append((i, method, reason))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(work, range(8)))
    assert not bad, bad[:3]
    assert lap.last_method is None  # this thread made no call


# ---- so.explain --------------------------------------------------------------------------------------

def test_explain_equals_the_engine_taken_structured_and_declining():
    structured = _model()
    declining = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(1, 4), nn.Linear(4, 3)).to(DT)
    x, y = _data(0)
    for model in (structured, declining):
        f = so.functional_loss(model, nn.CrossEntropyLoss())
        p = so.params_dict(model)
        n = sum(t.numel() for t in p.values())
        for curvature in ("hessian", "ggn", "fisher", "empirical_fisher"):
            for transform in (so.diagonal, so.trace, so.diagonal_estimate, so.trace_estimate):
                for method in ("exact", "hutchinson"):
                    if method != "exact" and transform in (so.diagonal, so.trace):
                        continue
                    seed = {"seed": 0} if curvature == "fisher" or method != "exact" else {}
                    fn = transform(f, curvature=curvature, method=method, **seed)
                    e = so.explain(fn)(p, x, y)
                    out = fn(p, x, y)
                    assert e.engine == fn.last_engine, (model, curvature)
                    # the generic exact GGN/Fisher diagonal adds the route of its loss-factor VJPs at the call
                    if e.reason is None or method != "exact" or curvature == "hessian":
                        assert e.reason == fn.last_fallback_reason, (model, curvature)
                    else:
                        assert fn.last_fallback_reason == f"{e.reason}; exact diagonal: {fn.last_fallback_reason.split('; exact diagonal: ')[1]}"
                        assert "loss-factor VJPs" in fn.last_fallback_reason
                    assert e.sweeps == (1 if e.engine == "structured" else 0)
                    if method == "exact":
                        assert e.products == (0 if e.engine == "structured" or curvature != "hessian" else n)
                    if transform in (so.diagonal_estimate, so.trace_estimate):
                        assert out.engine == e.engine and e.products == int(out.num_matvecs)
    assert so.explain(so.diagonal(so.functional_loss(declining, nn.CrossEntropyLoss())))(
        so.params_dict(declining), x, y).reason.find("GroupNorm") >= 0


def test_explain_over_a_dataset_loss_and_stochastic_methods():
    model = _model()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    F = so.dataset_loss(f, [_data(i) for i in range(3)])
    p = so.params_dict(model)
    fn = so.trace(F, curvature="ggn")
    e = so.explain(fn)(p)
    fn(p)
    assert (e.engine, e.products, e.sweeps) == (fn.last_engine, 0, 3) == ("structured", 0, 3)
    est = so.trace_estimate(f, method="hutchinson", num_samples=7, seed=0)
    e = so.explain(est)(p, *_data(0))
    assert (e.engine, e.products, e.sweeps) == ("generic", 7, 0) and "hutchinson" in e.reason
    assert est(p, *_data(0)).engine == "generic"
    adaptive = so.trace_estimate(f, method="hutchinson", rtol=0.1, max_matvecs=50, seed=0)
    assert so.explain(adaptive)(p, *_data(0)).products is None


def test_explain_laplacian_and_single_route_transforms():
    x = torch.linspace(0.1, 0.9, 4, dtype=DT)
    lap = so.laplacian(_u)
    assert so.explain(lap)(x, False)[1:] == ("forward", None, 0, 1)
    e = so.explain(lap)(x, True)
    lap(x, True)
    assert (e.engine, e.reason, e.products) == (lap.last_method, lap.last_fallback_reason, 4)
    assert so.explain(so.laplacian(_u, method="hutchinson", num_samples=6, seed=0))(x, True)[1:4] == (
        "hutchinson", "method='hutchinson' runs on the curvature operator", 6)
    assert so.explain(so.hvp(_loss))(x, x)[1:] == ("generic", None, 1, 0)
    assert so.explain(so.hvp(_loss))(x, x * 1j).products == 2  # a complex tangent: two real products


def test_explain_rejects_what_is_not_a_transform_and_passes_engine_structured_errors():
    with pytest.raises(TypeError, match="secorder transform"):
        so.explain(lambda x: x)
    with pytest.raises(TypeError, match="secorder transform"):
        so.explain(so.functional_loss(_model(), nn.CrossEntropyLoss()))
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(1, 4), nn.Linear(4, 3)).to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="GroupNorm"):
        so.explain(so.diagonal(f, engine="structured"))(so.params_dict(model), *_data(0))


def test_results_carry_their_engine():
    model = _model()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    p, (x, y) = so.params_dict(model), _data(0)
    assert so.trace_estimate(f, curvature="ggn", method="exact")(p, x, y).engine == "structured"
    assert so.trace_estimate(f, curvature="ggn", method="exact", engine="generic")(p, x, y).engine == "generic"
    assert so.diagonal_estimate(f, method="hutchinson", seed=0)(p, x, y).engine == "generic"
    assert so.spectral_density(f, num_probes=2, num_iterations=3, seed=0)(p, x, y).engine == "generic"
    assert so.kfac(f)(p, x, y).engine == "kronecker"
    est = so.trace_estimate(f, method="exact")(p, x, y)
    assert est._replace(value=est.value + 1).engine == "structured"  # _replace keeps it


# ---- threads: one transformed function, different inputs, sequential answers bit for bit ----------------

def _run_threads(fn, inputs, rounds=2):
    barrier = threading.Barrier(len(inputs))

    def work(i):
        barrier.wait()
        return [fn(*inputs[i]) for _ in range(rounds)]

    with ThreadPoolExecutor(len(inputs)) as pool:
        return list(pool.map(work, range(len(inputs))))


def _same(a, b):
    la, lb = tree.leaves(a), tree.leaves(b)
    return len(la) == len(lb) and all(torch.equal(s, t) for s, t in zip(la, lb))


CASES = [
    ("hessian", "exact"), ("ggn", "exact"), ("fisher", "exact"), ("empirical_fisher", "exact"),
    ("kfac", "exact"), ("ekfac", "exact"), ("hessian", "hutchinson"), ("ggn", "xdiag"), ("fisher", "hutchinson"),
]


@pytest.mark.parametrize("curvature,method", CASES)
@pytest.mark.parametrize("engine,train", [("auto", True), ("generic", True), ("generic", False)])
def test_eight_threads_share_one_transform_bit_for_bit(curvature, method, engine, train):
    model = _model().train(train)  # a model in eval mode is not recorded (secorder.problem._quiet)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    p = so.params_dict(model)
    random = method != "exact" or curvature == "fisher"
    options = dict(curvature=curvature, method=method, engine=engine, **({"seed": 3} if random else {}))
    if method != "exact":
        options["num_samples"] = 6
    fn = so.diagonal(f, **options)
    inputs = [(p,) + _data(i) for i in range(8)]
    sequential = [fn(*a) for a in inputs]
    for i, outs in enumerate(_run_threads(fn, inputs)):
        assert all(_same(o, sequential[i]) for o in outs), (curvature, method, i)


@pytest.mark.parametrize("curvature,method", [("ggn", "exact"), ("fisher", "exact"), ("hessian", "hutchinson")])
def test_eight_threads_share_one_dataset_loss_transform_bit_for_bit(curvature, method):
    model = _model()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    F = so.dataset_loss(f, [_data(i) for i in range(3)])
    options = dict(curvature=curvature, method=method)
    if curvature == "fisher" or method != "exact":
        options["seed"] = 5
    fn = so.trace(F, **options)
    torch.manual_seed(1)
    inputs = [({k: v + 0.1 * i for k, v in so.params_dict(model).items()},) for i in range(8)]
    sequential = [fn(*a) for a in inputs]
    for i, outs in enumerate(_run_threads(fn, inputs)):
        assert all(_same(o, sequential[i]) for o in outs), (curvature, method, i)


# ---- no mutation of the user's objects, even temporarily ---------------------------------------------

def test_training_batchnorm_attributes_never_change_during_calls():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(DT).train()
    bn = model[1]
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    p, (x, y) = so.params_dict(model), _data(0)
    mean, var, count = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    seen, stop = set(), threading.Event()

    def poll():
        while not stop.is_set():
            seen.add((bn.track_running_stats, bn.training, bn.momentum))

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        for _ in range(5):
            so.hessian_diag(f)(p, x, y)
            so.diagonal(f, curvature="ggn")(p, x, y)
    finally:
        stop.set()
        poller.join()
    assert seen == {(True, True, bn.momentum)}
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert torch.equal(bn.num_batches_tracked, count)
    # and the batch statistics are what the curvature uses: f equals a plain training-mode call's loss
    plain = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Tanh(),
                          nn.Linear(4, 3)).to(DT).train()
    plain.load_state_dict(model.state_dict(), strict=False)
    torch.testing.assert_close(f(p, x, y), nn.CrossEntropyLoss()(plain(x), y), rtol=0, atol=0)


def test_a_thread_drawing_random_numbers_never_sees_a_repeated_draw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(DT).train()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    p, (x, y) = so.params_dict(model), _data(0)
    F = so.dataset_loss(f, [_data(i) for i in range(2)])
    draws, stop = [], threading.Event()

    def draw():
        while not stop.is_set():
            draws.append(int(torch.randint(0, 2 ** 62, ())))

    drawer = threading.Thread(target=draw)
    drawer.start()
    try:
        for _ in range(5):
            so.diagonal(f, chunk_size=3, engine="generic")(p, x, y)
            so.trace(f, curvature="fisher", chunk_size=5)(p, x, y)
            so.diagonal(F, curvature="fisher")(p)  # the structured engine declines Dropout: labels drawn twice
            so.hvp(f)(p, x, y, p)
    finally:
        stop.set()
        drawer.join()
    assert len(draws) > 100 and len(set(draws)) == len(draws)


def _one_draw_per_call(model, seed):
    """The generic diagonal of a random model: one column per matvec equals all columns at once, and the
    global RNG advances as by one plain call of ``f``. Returns ``(p, x, y, that diagonal)``."""
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    p, (x, y) = so.params_dict(model), _data(0)
    torch.manual_seed(seed)
    one = so.diagonal(f, chunk_size=1, engine="generic")(p, x, y)
    after = torch.rand(2)
    torch.manual_seed(seed)
    every = so.diagonal(f, chunk_size=None, engine="generic")(p, x, y)
    assert all(torch.equal(one[k], every[k]) for k in one)
    torch.manual_seed(seed)
    f(p, x, y)
    assert torch.equal(torch.rand(2), after)  # the global RNG advanced as by one plain call of f
    return p, x, y, one


def test_dropout_one_mask_per_call_replayed_from_the_first_evaluation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).to(DT).train()
    _one_draw_per_call(model, 4)


def test_dataset_fisher_labels_the_same_on_both_paths_without_rewinding():
    model = _model()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    F = so.dataset_loss(f, [_data(i) for i in range(2)])
    p = so.params_dict(model)
    torch.manual_seed(9)
    a = so.diagonal(F, curvature="fisher")(p)
    after = torch.rand(2)
    torch.manual_seed(9)
    b = so.diagonal(F, curvature="fisher", engine="generic")(p)
    assert torch.equal(torch.rand(2), after)  # both paths advance the global RNG alike
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)


# ---- the AD mode is chosen by what failed, not by an error's wording ----------------------------------

def test_hvp_raises_a_user_error_mentioning_forward_ad_without_retrying():
    calls = []

    def f(x):
        calls.append(1)
        raise RuntimeError("forward AD: a message of the user's own")

    with pytest.raises(RuntimeError, match="a message of the user's own"):
        so.hvp(f)(torch.ones(2), torch.ones(2))
    assert len(calls) == 1  # not retried in reverse mode


def test_hvp_takes_reverse_mode_where_a_torch_operation_fails_in_forward_mode():
    class NoJvp(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x ** 3

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return 3 * x ** 2 * g

    x, v = torch.tensor([1.0, 2.0], dtype=DT), torch.tensor([1.0, -1.0], dtype=DT)
    # mse_loss's forward-mode rule mutates a ZeroTensor (pytorch/pytorch#112013)
    w = torch.tensor([[1.0, 2.0]], dtype=DT)
    g = lambda z: torch.nn.functional.mse_loss(torch.nn.functional.linear(z, w), torch.zeros(1, dtype=DT))
    torch.testing.assert_close(so.hvp(g)(x, v), torch.func.hessian(g)(x) @ v)
    h = lambda z: torch.sin(NoJvp.apply(z)).sum()  # a custom Function without jvp
    torch.testing.assert_close(so.hvp(h)(x, v), torch.func.hessian(lambda z: torch.sin(z ** 3).sum())(x) @ v)


class _Noise(nn.Module):
    def forward(self, x):  # random in eval mode too
        return x + 0.1 * torch.randn_like(x)


def test_an_eval_mode_model_that_draws_anyway_draws_once_per_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _Noise(), nn.Tanh(), nn.Linear(4, 3)).to(DT).eval()
    p, x, y, one = _one_draw_per_call(model, 5)
    # and it is the Hessian diagonal of f with that call's noise
    torch.manual_seed(5)
    noise = 0.1 * torch.randn(x.shape[0], 4, dtype=DT)
    plain = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)

    def g(q):
        h = torch.tanh(torch.nn.functional.linear(x, q["0.weight"], q["0.bias"]) + noise)
        return nn.CrossEntropyLoss()(torch.nn.functional.linear(h, q["3.weight"], q["3.bias"]), y)

    ref = so.diagonal(g)(p)
    for k in one:
        torch.testing.assert_close(one[k], ref[k], rtol=1e-10, atol=1e-12)
    del plain

"""so.dataset_loss on one process: every transform equals the one-big-batch call (float64), weights, passes, errors.

The multi-process tests are in ``tests/test_dataset_distributed.py``.
"""

import io
import sys
import warnings

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

import secorder as so
from secorder.operators import make_operator
from secorder.problem import Problem
from secorder.sample_keys import SampleKeys

DT = torch.float64


def diagonal_of(op):
    """The exact diagonal of a LeafOperator by one-hot columns (a test helper)."""
    out = []
    for i, t in enumerate(op.templates):
        eye = torch.eye(t.numel(), dtype=t.dtype).reshape((t.numel(),) + tuple(t.shape))
        out.append(torch.einsum("k...,k...->k", op.block_matvec(i, eye), eye).reshape(t.shape))
    return out
BOUNDS = [0, 8, 16, 21, 23]  # batches of 8, 8, 5 and 2: an uneven last batch


def split(x, y, bounds=BOUNDS):
    pick = (lambda t, s: {k: v[s] for k, v in t.items()}) if isinstance(x, dict) else (lambda t, s: t[s])
    return [(pick(x, slice(a, b)), y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def mlp(out=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, out)).to(DT)


def classification(loss=None, seed=0):
    model = mlp(seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(23, 4, dtype=DT, generator=g)
    y = torch.randint(0, 3, (23,), generator=g)
    return model, so.functional_loss(model, loss or nn.CrossEntropyLoss()), x, y


def regression():
    model = mlp(out=2)
    g = torch.Generator().manual_seed(5)
    return model, so.functional_loss(model, nn.MSELoss()), torch.randn(23, 4, dtype=DT, generator=g), \
        torch.randn(23, 2, dtype=DT, generator=g)


def close(a, b, rtol=1e-10, atol=1e-12):
    la, lb = so.tree.leaves(a), so.tree.leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol)


class Counting:
    """A re-iterable list of batches that counts its passes."""

    def __init__(self, batches):
        self.batches, self.passes = list(batches), 0

    def __iter__(self):
        self.passes += 1
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


# ---------------------------------------------------------------------------
# every quantity and curvature equals the one-big-batch call


TRACE_METHODS = [("hutchinson", 9), ("hutch++", 9), ("xtrace", 8), ("xnystrace", 8)]
DIAG_METHODS = [("hutchinson", 7), ("xdiag", 8)]


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "empirical_fisher"])
@pytest.mark.parametrize("problem", ["ce", "mse"])
def test_every_quantity_equals_one_big_batch(curvature, problem):
    model, f, x, y = classification() if problem == "ce" else regression()
    p = so.params_dict(model)
    F = so.dataset_loss(f, split(x, y))
    close(F(p), f(p, x, y))
    for engine in ("auto", "generic"):
        close(so.diagonal(F, curvature=curvature, engine=engine)(p), so.diagonal(f, curvature=curvature)(p, x, y))
        close(so.trace(F, curvature=curvature, engine=engine)(p), so.trace(f, curvature=curvature)(p, x, y))
    full = so.trace_estimate(F, curvature=curvature, method="exact")(p)
    close(full.per_leaf, so.trace_estimate(f, curvature=curvature, method="exact")(p, x, y).per_leaf)
    for method, n in TRACE_METHODS:
        if method == "xnystrace" and curvature == "hessian":
            continue  # PSD operators only
        a = so.trace_estimate(F, curvature=curvature, method=method, num_samples=n, seed=3, chunk_size=4)(p)
        b = so.trace_estimate(f, curvature=curvature, method=method, num_samples=n, seed=3, chunk_size=4)(p, x, y)
        close((a.value, a.stderr, a.per_leaf), (b.value, b.stderr, b.per_leaf))
    for method, n in DIAG_METHODS:
        a = so.diagonal_estimate(F, curvature=curvature, method=method, num_samples=n, seed=4)(p)
        b = so.diagonal_estimate(f, curvature=curvature, method=method, num_samples=n, seed=4)(p, x, y)
        close((a.value, a.stderr), (b.value, b.stderr))
    v = {k: torch.randn_like(t) for k, t in p.items()}
    product = {"hessian": so.hvp, "ggn": so.ggn_vp, "empirical_fisher": so.empirical_fisher_vp}[curvature]
    close(product(F)(p, v), product(f)(p, x, y, v))
    close(so.eigenvalues(F, k=3, curvature=curvature, seed=0)(p),
          so.eigenvalues(f, k=3, curvature=curvature, seed=0)(p, x, y), rtol=1e-7, atol=1e-9)
    a = so.spectral_density(F, curvature=curvature, num_probes=2, num_iterations=5, seed=0)(p)
    b = so.spectral_density(f, curvature=curvature, num_probes=2, num_iterations=5, seed=0)(p, x, y)
    close((a.nodes, a.weights), (b.nodes, b.weights), rtol=1e-7, atol=1e-9)


def test_products_with_argnums_tuple_and_complex_tangents():
    model, f, x, y = classification()
    p = so.params_dict(model)
    F = so.dataset_loss(f, split(x, y))
    v = {k: torch.randn_like(t) + 1j * torch.randn_like(t) for k, t in p.items()}
    close(so.hvp(F)(p, v), so.hvp(f)(p, x, y, v))
    w = {k: torch.randn_like(t) for k, t in p.items()}
    close(so.ggn_vp(F, argnums=(0,))(p, (w,)), so.ggn_vp(f, argnums=(0,))(p, x, y, (w,)))
    close(so.diagonal(F, argnums=(0,), engine="generic")(p), so.diagonal(f, argnums=(0,))(p, x, y))


def test_sum_reduction_equals_one_big_batch_of_summed_losses():
    model, f, x, y = classification()
    f_sum = so.functional_loss(model, nn.CrossEntropyLoss(reduction="sum"))
    p = so.params_dict(model)
    for per_batch in (f, f_sum):  # whatever f's own reduction, F's is reduction=
        F = so.dataset_loss(per_batch, split(x, y), reduction="sum")
        close(F(p), f_sum(p, x, y))
        close(so.diagonal(F)(p), so.diagonal(f_sum)(p, x, y))
        close(so.trace(F, curvature="ggn", engine="generic")(p), so.trace(f_sum, curvature="ggn")(p, x, y))
    F = so.dataset_loss(f_sum, split(x, y))  # a sum loss per batch, the mean over the data set
    close(so.diagonal(F, curvature="ggn")(p), so.diagonal(f, curvature="ggn")(p, x, y))
    G = so.dataset_loss(f, split(x, y), num_data=100)
    close(G(p), f_sum(p, x, y) / 100)
    close(so.diagonal(G)(p), {k: d / 100 for k, d in so.diagonal(f_sum)(p, x, y).items()})


def test_dict_inputs():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

        def forward(self, u, v):  # a dict of inputs is passed as keyword arguments: model(**inputs)
            return self.a(u) + torch.tanh(self.b(v))

    torch.manual_seed(0)
    model = TwoInputs().to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    x = {"u": torch.randn(23, 4, dtype=DT), "v": torch.randn(23, 2, dtype=DT)}
    y = torch.randint(0, 3, (23,))
    p = so.params_dict(model)
    F = so.dataset_loss(f, split(x, y))
    close(F(p), f(p, x, y))
    for curvature in ("hessian", "ggn"):
        close(so.diagonal(F, curvature=curvature)(p), so.diagonal(f, curvature=curvature)(p, x, y))
    a = so.trace_estimate(F, method="hutchinson", num_samples=6, seed=0)(p)
    close(a.value, so.trace_estimate(f, method="hutchinson", num_samples=6, seed=0)(p, x, y).value)


def test_ignored_targets_weigh_nothing():
    """Cross-entropy with ignore_index: a batch weighs its non-ignored targets, so F is the mean over all of them
    (PyTorch's one-big-batch mean); a batch of ignored targets only (PyTorch's mean is nan there) adds nothing."""
    model, f, x, y = classification()
    y = y.clone()
    y[[0, 1, 2, 9, 10]] = -100
    y[16:21] = -100  # the third batch: every target ignored
    p = so.params_dict(model)
    F = so.dataset_loss(f, split(x, y))
    assert torch.isnan(f(p, x[16:21], y[16:21]))
    close(F(p), f(p, x, y))
    value, grad = F.value_and_grad(p)
    close((value, grad), (f(p, x, y), torch.func.grad(f)(p, x, y)))
    for curvature in ("hessian", "ggn", "empirical_fisher"):
        for engine in ("auto", "generic"):
            close(so.diagonal(F, curvature=curvature, engine=engine)(p),
                  so.diagonal(f, curvature=curvature)(p, x, y))


def test_tokens_and_other_losses_weigh_their_terms():
    """[N, C, T] logits weigh samples x positions; MSE every element; an unrecognised f its samples (a mean)."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv1d(3, 4, 1), nn.Tanh()).to(DT)
    f = so.functional_loss(conv, nn.CrossEntropyLoss(ignore_index=2))
    x, y = torch.randn(23, 3, 5, dtype=DT), torch.randint(0, 4, (23, 5))
    p = so.params_dict(conv)
    F = so.dataset_loss(f, split(x, y))
    close(F(p), f(p, x, y))
    close(so.diagonal(F, curvature="ggn")(p), so.diagonal(f, curvature="ggn")(p, x, y))

    g = lambda w, x, y: ((x @ w - y) ** 2).mean() + (w ** 4).sum() / 7  # not a recognised loss: a batch mean
    x, y, w = torch.randn(23, 3, dtype=DT), torch.randn(23, dtype=DT), torch.randn(3, dtype=DT)
    G = so.dataset_loss(g, split(x, y))
    close(G(w), g(w, x, y))
    close(so.diagonal(G)(w), so.diagonal(g)(w, x, y))
    close(so.hvp(G)(w, torch.ones(3, dtype=DT)), so.hvp(g)(w, x, y, torch.ones(3, dtype=DT)))
    smooth = so.functional_loss(mlp(out=2), Fn.smooth_l1_loss)  # a FunctionalLoss with an unrecognised loss
    xs, ys = torch.randn(23, 4, dtype=DT), torch.randn(23, 2, dtype=DT)
    ps = so.params_dict(smooth.model)
    close(so.diagonal(so.dataset_loss(smooth, split(xs, ys)), curvature="ggn")(ps),
          so.diagonal(smooth, curvature="ggn")(ps, xs, ys))


def test_fisher_labels_per_sample_from_one_seed():
    """The MC Fisher's labels of each sample are keyed by (one seed from the call's generator, the sample's
    content): both engines and every product see the same labels, and the result is the weighted sum of the
    batches' Fishers with those labels, whatever the batching."""
    model, f, x, y = classification()
    p = so.params_dict(model)
    batches = split(x, y)
    F = so.dataset_loss(f, batches)
    seed = int(torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(7)))
    expected = None
    for xb, yb in batches:
        problem = Problem(f, 0, False, (p, xb, yb))
        op = make_operator("fisher", problem, generator=SampleKeys.of(xb, seed))
        d = so.tree.unflatten(problem.spec, diagonal_of(op))
        d = {k: v * len(yb) / len(y) for k, v in d.items()}
        expected = d if expected is None else {k: expected[k] + d[k] for k in d}
    for engine in ("auto", "generic"):
        close(so.diagonal(F, curvature="fisher", seed=7, engine=engine)(p), expected)
    one_batch = so.dataset_loss(f, [(x, y)])  # the same labels in one big batch
    close(so.diagonal(one_batch, curvature="fisher", seed=7)(p), expected)
    v = {k: torch.randn_like(t) for k, t in p.items()}
    w = {k: torch.randn_like(t) for k, t in p.items()}
    fv, fw = so.fisher_vp(F, seed=7)(p, v), so.fisher_vp(F, seed=7)(p, w)
    close(so.tree.vdot(w, fv), so.tree.vdot(v, fw))  # the same matrix in both passes: symmetric
    exact = so.trace(F, curvature="fisher", seed=7)(p)
    close(exact, sum(d.sum() for d in expected.values()))
    gen = torch.Generator().manual_seed(7)
    so.diagonal(F, curvature="fisher", generator=gen)(p)  # the structured engine declines nothing here
    gen2 = torch.Generator().manual_seed(7)
    so.diagonal(F, curvature="fisher", generator=gen2, engine="generic")(p)
    assert torch.equal(gen.get_state(), gen2.get_state())  # both paths draw the same from the generator


def test_fisher_declined_by_the_engine_gives_the_generic_labels():
    """A model the structured engine declines: the fallback draws the same labels as engine='generic'."""

    class Cumulative(nn.Module):  # no module rule, and no graph-walker rule for aten.cumsum
        def forward(self, x):
            return x.cumsum(-1)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), Cumulative()).to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    x, y = torch.randn(23, 4, dtype=DT), torch.randint(0, 3, (23,))
    p = so.params_dict(model)
    F = so.dataset_loss(f, split(x, y))
    fn = so.diagonal(F, curvature="fisher", seed=1)
    close(fn(p), so.diagonal(F, curvature="fisher", seed=1, engine="generic")(p))
    assert fn.last_engine == "generic" and "Cumulative" in fn.last_fallback_reason


# ---------------------------------------------------------------------------
# passes over the data


def test_passes_per_call():
    """A batch is visited once per block of probes; the structured engine and products take one pass."""
    model, f, x, y = classification()
    p = so.params_dict(model)
    data = Counting(split(x, y))
    F = so.dataset_loss(f, data)

    def passes(fn):
        before = data.passes
        fn()
        return data.passes - before

    assert passes(lambda: F(p)) == 1
    assert passes(lambda: F.value_and_grad(p)) == 1
    assert passes(lambda: so.hvp(F)(p, p)) == 1
    assert passes(lambda: so.fisher_vp(F, seed=0)(p, p)) == 1
    assert passes(lambda: so.diagonal(F)(p)) == 1  # structured engine
    assert passes(lambda: so.trace(F, curvature="ggn")(p)) == 1
    assert passes(lambda: so.trace_estimate(F, method="hutchinson", num_samples=12, chunk_size=4, seed=0)(p)) == 3
    assert passes(lambda: so.trace_estimate(F, method="hutchinson", num_samples=12, seed=0)(p)) == 1
    assert passes(lambda: so.trace_estimate(F, method="hutch++", num_samples=12, seed=0)(p)) == 3
    assert passes(lambda: so.trace_estimate(F, method="xtrace", num_samples=12, seed=0)(p)) == 2
    assert passes(lambda: so.trace_estimate(F, curvature="ggn", method="xnystrace", num_samples=12, seed=0)(p)) == 1
    assert passes(lambda: so.diagonal_estimate(F, method="hutchinson", num_samples=12, seed=0)(p)) == 1
    assert passes(lambda: so.diagonal_estimate(F, method="xdiag", num_samples=12, seed=0)(p)) == 2
    # generic exact: one pass per chunk of one-hot columns per leaf (sizes 24, 6, 18, 3)
    assert passes(lambda: so.diagonal(F, engine="generic", chunk_size=10)(p)) == 3 + 1 + 2 + 1
    assert passes(lambda: so.eigenvalues(F, num_iterations=5, seed=0)(p)) == 5
    assert passes(lambda: so.spectral_density(F, num_probes=4, num_iterations=3, chunk_size=2, seed=0)(p)) == 6
    checked = so.dataset_loss(f, data, check_deterministic=True)
    assert passes(lambda: so.diagonal(checked)(p)) == 3  # two passes on first use
    assert passes(lambda: so.diagonal(checked)(p)) == 1


_MEMORY_SCRIPT = r"""
import json, sys, warnings
import torch
from torch import nn
import secorder as so


def rss(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field)) * 1024


def growth(fn):
    before = rss("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    fn()
    return max(rss("VmHWM") - before, 0)


torch.set_num_threads(1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(1, 1024), nn.Tanh(), nn.Linear(1024, 2))  # wide activations, few flops
f = so.functional_loss(model, nn.CrossEntropyLoss())
p = so.params_dict(model)
batches = [(torch.randn(32, 1), torch.randint(0, 2, (32,))) for _ in range(40)]


def work(n, leaky=False):
    F = so.dataset_loss(f, batches[:n])
    g = (lambda q: F(q)) if leaky else F  # a plain function: torch.func keeps every batch's graph
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        so.trace_estimate(g, method="hutchinson", num_samples=2, chunk_size=2, seed=0)(p)


work(1)  # warm-up
few, many = growth(lambda: work(4)), growth(lambda: work(40))
leaky = growth(lambda: work(40, leaky=True))
print(json.dumps(dict(few=few, many=many, leaky=leaky)))
"""


def test_memory_is_bounded_by_one_batch():
    """The peak with 40 batches is within a small factor of the peak with 4 (each batch's graph is freed);
    differentiating F as a plain function, which keeps every batch's graph, fails the same bound.

    Measured in a fresh interpreter: late in a long test run the allocator reuses freed pages, and the
    resident-set growth of this process no longer shows what one call allocates.
    """
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("no /proc/self/clear_refs to reset the peak resident set")
    import json
    import os
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    bound = 2 * m["few"] + 4 * 2**20  # one batch's graph is about 0.4 MB here
    assert m["many"] <= bound, m
    assert m["leaky"] > bound, m  # the measurement does see a graph per batch


# ---------------------------------------------------------------------------
# progress, determinism, warnings


def test_progress_bar_over_batches(monkeypatch):
    model, f, x, y = classification()
    p = so.params_dict(model)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    so.dataset_loss(f, split(x, y), progress=True)(p)
    # not a terminal: plain lines, no carriage returns (issue 28, item 8)
    assert "secorder: loss: done, 1 step(s), 4 batch(es)" in err.getvalue() and "\r" not in err.getvalue()
    err.truncate(0)
    so.dataset_loss(f, split(x, y))(p)  # default: only on a terminal
    so.dataset_loss(f, split(x, y), progress=False)(p)
    assert err.getvalue().strip("\x00") == ""


class Noisy:
    """Batches with fresh noise on every pass, as random augmentation gives."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter([(x + 0.1 * torch.randn_like(x), y) for x, y in self.batches])


def test_check_deterministic_names_the_likely_causes():
    model, f, x, y = classification()
    p = so.params_dict(model)
    F = so.dataset_loss(f, split(x, y), check_deterministic=True)
    close(so.diagonal(F)(p), so.diagonal(f)(p, x, y))  # a deterministic data set passes
    with pytest.raises(ValueError, match="two passes over the data gave different results.*augmentation"):
        so.trace(so.dataset_loss(f, Noisy(split(x, y)), check_deterministic=True))(p)
    dropout = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)).to(DT).train()
    g = so.functional_loss(dropout, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="training mode"):
        so.dataset_loss(g, split(x, y), check_deterministic=True)(so.params_dict(dropout))


def test_differentiating_F_as_a_plain_function_warns():
    model, f, x, y = classification()
    p = so.params_dict(model)
    F = so.dataset_loss(f, split(x, y))
    with pytest.warns(UserWarning, match="keeps every batch's graph"):
        g = torch.func.grad(F)(p)
    close(g, torch.func.grad(f)(p, x, y))  # still right, only memory-hungry
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        so.trace(F)(p)


def test_grad_of_the_trace_over_the_data_set():
    """A curvature penalty over the data set: grad of so.trace(F) equals grad of the one-big-batch trace."""
    model, f, x, y = regression()
    p = so.params_dict(model)
    F = so.dataset_loss(f, split(x, y))
    close(torch.func.grad(so.trace(F, curvature="ggn", engine="generic"))(p),
          torch.func.grad(lambda q: so.trace(f, curvature="ggn", engine="generic")(q, x, y))(p))


# ---------------------------------------------------------------------------
# bad input: clear errors


@pytest.mark.parametrize("data,kwargs,error,match", [
    ([], {}, ValueError, "data is empty"),
    ((b for b in [1]), {}, TypeError, "exhausted after one pass"),
    (iter([1]), {}, TypeError, "exhausted after one pass"),
    ((torch.ones(2, 1), torch.ones(2)), {}, TypeError, "looks like one batch"),
    (torch.ones(3), {}, TypeError, "iterable of"),
    (3, {}, TypeError, "iterable of"),
    ([(1, 2)], {"reduction": "median"}, ValueError, "reduction must be 'mean' or 'sum'"),
    ([(1, 2)], {"reduction": None}, TypeError, "reduction must be"),
    ([(1, 2)], {"num_data": 0}, ValueError, "num_data must be at least 1"),
    ([(1, 2)], {"num_data": 2.5}, TypeError, "num_data must be an int"),
    ([(1, 2)], {"num_data": 5, "reduction": "sum"}, ValueError, "does not apply to reduction='sum'"),
    ([(1, 2)], {"progress": "yes"}, TypeError, "progress must be"),
    ([(1, 2)], {"check_deterministic": 1}, TypeError, "check_deterministic must be a bool"),
    ([(1, 2)], {"process_group": "world"}, TypeError, "ProcessGroup"),
])
def test_bad_arguments(data, kwargs, error, match):
    with pytest.raises(error, match=match):
        so.dataset_loss(lambda p, x, y: p.sum(), data, **kwargs)


def test_bad_batches_name_the_batch():
    model, f, x, y = classification()
    p = so.params_dict(model)
    cases = [
        ([(x, y), (x[:3], y[:4])], ValueError, r"batch 1 has targets of shape \(4,\) but inputs of shape \(3, 4\)"),
        ([(x, y), (x[:0], y[:0])], ValueError, "batch 1 has no samples"),
        ([(x, y, y)], TypeError, "batch 0 is a tuple of length 3"),
        ([{"x": x, "y": y}], TypeError, "batch 0 is a dict"),
        ([(x, "labels")], TypeError, "batch 0 has targets of type str"),
    ]
    for data, error, match in cases:
        F = so.dataset_loss(f, data)
        for call in (lambda: F(p), lambda: so.diagonal(F)(p), lambda: so.hvp(F)(p, p)):
            with pytest.raises(error, match=match):
                call()


def test_misuse_of_F():
    model, f, x, y = classification()
    p = so.params_dict(model)
    F = so.dataset_loss(f, split(x, y))
    with pytest.raises(TypeError, match="already a data-set loss"):
        so.dataset_loss(F, split(x, y))
    plain = so.dataset_loss(lambda q, a, b: f(q, a, b), split(x, y))
    with pytest.raises(TypeError, match="curvature='ggn' needs the split of f into model and loss"):
        so.diagonal(plain, curvature="ggn")
    with pytest.raises(ValueError, match="has_aux=True"):
        so.trace(F, has_aux=True, engine="generic")(p)
    with pytest.raises(TypeError, match="takes the parameters alone"):
        so.trace(F, engine="generic")(p, buffers={})
    bad = so.dataset_loss(lambda q, a, b: f(q, a, b).expand(2), split(x, y))
    with pytest.raises(TypeError, match="f must return a scalar tensor; on batch 0"):
        bad(p)


class Spent:
    """__iter__ returns the same iterator every time: one pass, then nothing."""

    def __init__(self, batches):
        self.it = iter(batches)

    def __iter__(self):
        return self.it


def test_data_that_gives_no_second_pass():
    model, f, x, y = classification()
    p = so.params_dict(model)
    F = so.dataset_loss(f, Spent(split(x, y)))
    F(p)
    with pytest.raises(ValueError, match="though an earlier pass gave 4: it must be iterable again"):
        F(p)
    G = so.dataset_loss(f, Spent(split(x, y)))
    with pytest.raises(ValueError, match="gave 0 batches in this pass and 4 before"):
        so.trace_estimate(G, method="hutchinson", num_samples=4, chunk_size=2, seed=0)(p)

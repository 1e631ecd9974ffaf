"""The structured engine inside torch.func transforms and torch.compile, and the live-model entry points.

Under ``vmap`` (per-example inputs, stacked parameters), ``grad``, ``jacrev`` and
``torch.compile`` the transforms stay on the structured engine: the tests prove
it (``engine="structured"`` raises if the engine declines; a spy counts the
sweeps) and compare against loops of unbatched calls and float64 references.
Any batching-rule fallback warning is an error here.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, jacrev, vjp, vmap

import secorder as so
from secorder import tree
from secorder.structured import backprop, functional_call_diag, model_diagonal, model_trace
from tests.reference import reference_diag, reference_trace

pytestmark = pytest.mark.filterwarnings("error::UserWarning")  # batching-rule fallbacks among them

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def mlp(act=nn.Tanh, sizes=(3, 4, 3)):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(DT)


def cnn():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(), nn.MaxPool2d(2),
                          nn.Conv2d(2, 2, 2), nn.Sigmoid(), nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(2, 3)).to(DT).eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def residual():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), so.Residual(nn.Sequential(nn.Linear(4, 4), nn.ELU())),
                         nn.Linear(4, 3)).to(DT)


def targets(kind, n, generator=None):
    if kind == "class":
        return torch.randint(0, 3, (n,))
    if kind == "prob":
        return torch.softmax(torch.randn(n, 3, dtype=DT), 1)
    return torch.randn(n, 3, dtype=DT)


LOSSES = [
    (nn.CrossEntropyLoss(), "class"),
    (nn.CrossEntropyLoss(reduction="sum"), "class"),
    (nn.CrossEntropyLoss(ignore_index=1), "class"),
    (nn.CrossEntropyLoss(), "prob"),
    (nn.MSELoss(), "real"),
    (nn.MSELoss(reduction="sum"), "real"),
    (nn.BCEWithLogitsLoss(), "prob"),
    (functools.partial(F.binary_cross_entropy_with_logits, reduction="sum"), "prob"),
]

TRANSFORMS = {
    "hessian_diag": lambda f: so.hessian_diag(f, engine="structured"),
    "trace": lambda f: so.trace(f, engine="structured"),
    "ggn_diag": lambda f: so.ggn_diag(f, engine="structured"),
    "ggn_trace": lambda f: so.ggn_trace(f, engine="structured"),
}


class SweepCounter:
    """Counts runs of the structured engine's driver (one per engine call) while active."""

    def __init__(self, monkeypatch):
        self.calls = 0
        original = backprop.run

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(backprop, "run", counting)


def close(actual, expected, **tol):
    for a, e in zip(tree.leaves(actual), tree.leaves(expected)):
        torch.testing.assert_close(a, e, **(tol or TOL))


def per_example(fn, params, x, y):
    """``vmap`` over examples as the docs show it: a leading batch dimension of one per example."""
    return vmap(fn, in_dims=(None, 0, 0))(params, x.unsqueeze(1), y.unsqueeze(1))


def loop(fn, params, x, y):
    outs = [fn(params, x[i:i + 1], y[i:i + 1]) for i in range(x.shape[0])]
    return tree.tree_map(lambda *v: torch.stack(v), *outs) if isinstance(outs[0], dict) else torch.stack(outs)


# ---- vmap over examples --------------------------------------------------------------------------

@pytest.mark.parametrize("loss_fn,target", LOSSES, ids=lambda v: repr(v)[:36])
def test_vmap_per_example_every_loss_matches_a_loop(loss_fn, target, monkeypatch):
    torch.manual_seed(0)
    model = mlp()
    f = so.functional_loss(model, loss_fn)
    params, x, y = so.params_dict(model), torch.randn(4, 3, dtype=DT), targets(target, 4)
    for name, make in TRANSFORMS.items():
        counter = SweepCounter(monkeypatch)
        fn = make(f)
        out = per_example(fn, params, x, y)
        assert fn.last_engine == "structured" and counter.calls == 1, name  # one sweep for the whole batch
        close(out, loop(make(f), params, x, y))


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.ELU, nn.SiLU, nn.GELU, nn.Softplus])
def test_vmap_per_example_each_activation_against_float64_references(act):
    torch.manual_seed(1)
    model = mlp(act, (3, 4, 4, 3))
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randn(3, 3, dtype=DT), targets("class", 3)
    d = per_example(so.hessian_diag(f, engine="structured"), params, x, y)
    t = per_example(so.trace(f, engine="structured"), params, x, y)
    for i in range(3):
        ref = reference_diag(f, (params, x[i:i + 1], y[i:i + 1]))
        close({k: v[i] for k, v in d.items()}, ref)
        torch.testing.assert_close(t[i], sum(v.sum() for v in ref.values()), **TOL)


@pytest.mark.parametrize("build,shape", [(cnn, (1, 5, 5)), (residual, (3,))], ids=["cnn", "residual"])
def test_vmap_per_example_cnn_and_residual(build, shape):
    torch.manual_seed(2)
    model = build()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randn((3,) + shape, dtype=DT), targets("class", 3)
    for name, make in TRANSFORMS.items():
        close(per_example(make(f), params, x, y), loop(make(f), params, x, y))
    d = per_example(so.hessian_diag(f, engine="structured"), params, x, y)
    close({k: v[1] for k, v in d.items()}, reference_diag(f, (params, x[1:2], y[1:2])))


def test_vmap_over_stacked_parameters_ensemble(monkeypatch):
    torch.manual_seed(3)
    model = cnn()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randn(3, 1, 5, 5, dtype=DT), targets("class", 3)
    stacked = {k: torch.stack([v, 0.5 * v, -v]) for k, v in params.items()}
    for name, make in TRANSFORMS.items():
        counter = SweepCounter(monkeypatch)
        out = vmap(make(f), in_dims=(0, None, None))(stacked, x, y)
        assert counter.calls == 1
        expected = [make(f)({k: v[i] for k, v in stacked.items()}, x, y) for i in range(3)]
        for i in range(3):
            close(tree.tree_map(lambda v: v[i], out), expected[i])


# ---- grad / jacrev through the sweep -------------------------------------------------------------

@pytest.mark.parametrize("build,shape", [(mlp, (3,)), (cnn, (1, 5, 5)), (residual, (3,))],
                         ids=["mlp", "cnn", "residual"])
def test_grad_of_trace_penalty_matches_autograd_and_float64_third_derivatives(build, shape, monkeypatch):
    torch.manual_seed(4)
    model = build()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randn((4,) + shape, dtype=DT), targets("class", 4)
    counter = SweepCounter(monkeypatch)
    trace = so.trace(f, engine="structured")
    g = grad(lambda p: f(p, x, y) + 0.1 * trace(p, x, y))(params)
    assert counter.calls == 1
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    auto = torch.autograd.grad(f(leaves, x, y) + 0.1 * trace(leaves, x, y), list(leaves.values()))
    ref = grad(lambda p: f(p, x, y) + 0.1 * reference_trace(f, (p, x, y)))(params)
    close(g, ref, rtol=1e-9, atol=1e-12)
    close(dict(zip(leaves, auto)), ref, rtol=1e-9, atol=1e-12)


def test_jacrev_of_diagonal_matches_float64_third_derivatives():
    torch.manual_seed(5)
    model = mlp(nn.Sigmoid)
    for loss_fn, kind in [(nn.CrossEntropyLoss(), "class"), (nn.MSELoss(), "real")]:
        f = so.functional_loss(model, loss_fn)
        params, x, y = so.params_dict(model), torch.randn(4, 3, dtype=DT), targets(kind, 4)
        J = jacrev(lambda p: so.hessian_diag(f, engine="structured")(p, x, y))(params)
        R = jacrev(lambda p: reference_diag(f, (p, x, y)))(params)
        close(J, R, rtol=1e-9, atol=1e-12)
        G = jacrev(lambda p: so.ggn_trace(f, engine="structured")(p, x, y))(params)
        Gr = jacrev(lambda p: so.ggn_trace(f, engine="generic")(p, x, y))(params)
        close(G, Gr, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("loss_fn,target", LOSSES, ids=lambda v: repr(v)[:36])
def test_grad_of_penalties_every_loss_matches_float64_third_derivatives(loss_fn, target, monkeypatch):
    torch.manual_seed(8)
    model = mlp()
    f = so.functional_loss(model, loss_fn)
    params, x, y = so.params_dict(model), torch.randn(4, 3, dtype=DT), targets(target, 4)
    trace, ggn_trace = so.trace(f, engine="structured"), so.ggn_trace(f, engine="structured")
    counter = SweepCounter(monkeypatch)
    g = grad(lambda p: f(p, x, y) + 0.1 * trace(p, x, y))(params)
    gg = grad(lambda p: ggn_trace(p, x, y))(params)
    assert counter.calls == 2  # one structured sweep per differentiated call
    close(g, grad(lambda p: f(p, x, y) + 0.1 * reference_trace(f, (p, x, y)))(params), rtol=1e-9, atol=1e-12)
    close(gg, grad(lambda p: so.ggn_trace(f, engine="generic")(p, x, y))(params), rtol=1e-9, atol=1e-12)


def test_vjp_of_hessian_and_ggn_diagonals_matches_the_generic_path(monkeypatch):
    torch.manual_seed(9)
    model = residual()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randn(4, 3, dtype=DT), targets("class", 4)
    for curvature in ("hessian", "ggn"):
        counter = SweepCounter(monkeypatch)
        out, pull = vjp(lambda p: so.diagonal(f, curvature=curvature, engine="structured")(p, x, y), params)
        cotangent = {k: torch.randn_like(v) for k, v in out.items()}
        (got,) = pull(cotangent)
        assert counter.calls == 1, curvature
        ref_out, ref_pull = vjp(lambda p: so.diagonal(f, curvature=curvature, engine="generic")(p, x, y), params)
        close(out, ref_out)
        close(got, ref_pull(cotangent)[0], rtol=1e-9, atol=1e-12)


def test_vmap_of_grad_per_example_gradients_of_a_penalty(monkeypatch):
    torch.manual_seed(6)
    model = residual()
    f = so.functional_loss(model, nn.MSELoss())
    params, x, y = so.params_dict(model), torch.randn(3, 3, dtype=DT), targets("real", 3)
    trace = so.trace(f, engine="structured")

    def penalised(p, xi, yi):
        return f(p, xi, yi) + 0.1 * trace(p, xi, yi)

    counter = SweepCounter(monkeypatch)
    out = vmap(grad(penalised), in_dims=(None, 0, 0))(params, x.unsqueeze(1), y.unsqueeze(1))
    assert counter.calls == 1
    for i in range(3):
        ref = grad(lambda p: f(p, x[i:i + 1], y[i:i + 1]) + 0.1 * reference_trace(f, (p, x[i:i + 1], y[i:i + 1])))(
            params)
        close({k: v[i] for k, v in out.items()}, ref, rtol=1e-9, atol=1e-12)


# ---- torch.compile -------------------------------------------------------------------------------

@pytest.mark.slow
def test_compile_traces_the_engine_without_a_graph_break(monkeypatch):
    # backend="eager": Dynamo's tracing (where a graph break would show) without code generation;
    # fullgraph=True fails on any graph break, and functional_call_diag has no generic path to fall to.
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(),
                          so.Residual(nn.Sequential(nn.Linear(8, 8), nn.Softplus())), nn.Linear(8, 3)).to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randn(3, 1, 5, 5, dtype=DT), targets("class", 3)
    counter = SweepCounter(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(lambda p, x, y: functional_call_diag(f, (p, x, y), "hessian", False),
                             backend="eager", fullgraph=True)
    d = compiled(params, x, y)
    assert counter.calls == 1  # traced once through the structured sweep
    close(d, reference_diag(f, (params, x, y)))
    # The public transform too: recording last_engine is skipped while tracing (an attribute
    # write on a function would break the graph), so fullgraph=True holds for so.hessian_diag.
    torch._dynamo.reset()
    d = torch.compile(so.hessian_diag(f), backend="eager", fullgraph=True)(params, x, y)
    assert counter.calls == 2
    close(d, reference_diag(f, (params, x, y)))


# ---- what still falls back says so ---------------------------------------------------------------

def test_fallback_inside_vmap_and_grad_records_the_reason(caplog):
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(1, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randn(2, 3, dtype=DT), targets("class", 2)
    fn = so.trace(f)
    with caplog.at_level("DEBUG", logger="secorder.structured"):
        out = per_example(fn, params, x, y)
    assert fn.last_engine == "generic" and "GroupNorm" in fn.last_fallback_reason
    assert "GroupNorm" in caplog.text
    torch.testing.assert_close(out[1], reference_trace(f, (params, x[1:2], y[1:2])), **TOL)
    grad(fn)(params, x, y)
    assert fn.last_engine == "generic" and "GroupNorm" in fn.last_fallback_reason


# ---- live-model entry points (the legacy shim's) ------------------------------------------------

def problem(act=nn.Tanh):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 2)).to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    x, y = torch.randn(5, 3, dtype=DT), torch.tensor([0, 1, 1, 0, 1])
    return model, f, so.params_dict(model), x, y


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_model_diagonal_order_frozen_and_dtype(kind):
    model, f, params, x, y = problem()
    model[2].bias.requires_grad_(False)
    plist = list(model.parameters())
    d = model_diagonal(model, nn.CrossEntropyLoss(), x, y, kind=kind)
    full = {k: v.detach() for k, v in model.named_parameters()}
    ref = (reference_diag(f, (full, x, y)) if kind == "hessian"
           else so.ggn_diag(f, engine="generic")(full, x, y))
    assert len(d) == len(plist)
    for p, dp, name in zip(plist, d, full):
        assert dp.shape == p.shape and dp.dtype == p.dtype and dp.device == p.device
        assert not dp.requires_grad
        torch.testing.assert_close(dp, ref[name], **TOL)
    sub = model_diagonal(model, nn.CrossEntropyLoss(), x, y, kind=kind, params=[plist[2], plist[0]])
    torch.testing.assert_close(sub[0], ref["2.weight"], **TOL)
    torch.testing.assert_close(sub[1], ref["0.weight"], **TOL)
    t = model_trace(model, nn.CrossEntropyLoss(), x, y, kind=kind, params=[plist[2], plist[0]])
    torch.testing.assert_close(t, ref["2.weight"].sum() + ref["0.weight"].sum(), **TOL)


def test_model_entry_points_decline_and_validate():
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(1, 4))
    x, y = torch.randn(2, 3), torch.randn(2, 4)
    assert model_diagonal(model, nn.MSELoss(), x, y) is None
    assert model_trace(model, nn.MSELoss(), x, y) is None
    assert model_trace(nn.Linear(3, 4), nn.L1Loss(), x, y) is None
    with pytest.raises(ValueError, match="kind"):
        model_diagonal(nn.Linear(3, 4), nn.MSELoss(), x, y, kind="laplacian")
    with pytest.raises(ValueError, match="params"):
        model_diagonal(nn.Linear(3, 4), nn.MSELoss(), x, y, params=[torch.zeros(4, 3)])


def test_float32_results_follow_param_dtype():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 2))
    f = so.functional_loss(model, nn.MSELoss())
    params = so.params_dict(model)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    d = so.hessian_diag(f)(params, x, y)
    ref = so.hessian_diag(f, engine="generic")(params, x, y)
    for k in params:
        assert d[k].dtype == torch.float32
        torch.testing.assert_close(d[k], ref[k], rtol=1e-4, atol=1e-6)
    assert tree.structure(d) == tree.structure(params)

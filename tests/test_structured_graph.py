"""The graph walker (secorder.structured.graph): models the module walk declines, on their traced graphs.

Every result is compared with ``engine="generic"`` in float64 (the Monte-Carlo
Fisher with the same generator state on both paths).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder as so
from secorder.structured.graph import trace as graph_trace

DT = torch.float64
KINDS = ("ggn", "fisher", "empirical_fisher", "hessian")


class Functional(nn.Module):
    """Functional calls: conv, relu, a mean over space, torch.cat, a residual add, linear."""

    def __init__(self, act=F.relu):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 4)
        self.act = act

    def forward(self, x):
        h = F.relu(self.conv(x)).mean(dim=(2, 3))
        h = torch.cat([h, self.act(h)], dim=1)
        h = self.a(h) + h
        return F.linear(self.act(h), self.b.weight, self.b.bias)


class MLP(nn.Module):
    """An MLP with functional calls and two skips around smooth activations (residual terms at fan-out)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        h = h + F.gelu(self.l2(h))
        h = h + torch.sigmoid(h) * 0.5
        return self.l3(F.silu(h))


def _transform(kind, f, engine="auto", trace=False):
    kw = {"generator": torch.Generator().manual_seed(5)} if kind == "fisher" else {}
    if kind == "hessian":
        return so.trace(f, engine=engine) if trace else so.hessian_diag(f, engine=engine)
    make = so.trace if trace else so.diagonal
    return make(f, curvature=kind, engine=engine, **kw)


def _both(kind, f, args, trace=False):
    fn = _transform(kind, f, trace=trace)
    got = fn(*args)
    want = _transform(kind, f, "generic", trace=trace)(*args)
    return fn, got, want


def _close(got, want, tol=1e-10):
    if isinstance(want, dict):
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=tol, atol=tol, msg=k)
    else:
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _problem(model, x_shape, classes, n=5, seed=0):
    torch.manual_seed(seed)
    model = model.to(DT)
    x = torch.randn((n,) + x_shape, dtype=DT)
    y = torch.randint(0, classes, (n,))
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    return f, (so.params_dict(model), x, y)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("trace", [False, True], ids=["diag", "trace"])
def test_functional_module_runs_structured_and_agrees(kind, trace):
    f, args = _problem(Functional(torch.tanh), (2, 4, 4), 4)
    fn, got, want = _both(kind, f, args, trace)
    assert fn.last_engine == "structured", fn.last_fallback_reason
    _close(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_mlp_with_skips_exact_hessian_cross_terms(kind):
    f, args = _problem(MLP(), (3,), 3, n=4, seed=1)
    fn, got, want = _both(kind, f, args)
    assert fn.last_engine == "structured", fn.last_fallback_reason
    _close(got, want)


class SwiGLU(nn.Module):
    """RMS normalisation with a learnt scale, then a gated MLP: products of values sharing parameters."""

    def __init__(self):
        super().__init__()
        self.g, self.u, self.d = nn.Linear(3, 5), nn.Linear(3, 5), nn.Linear(5, 3)
        self.w = nn.Parameter(torch.randn(3))

    def forward(self, x):
        x = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6) * self.w
        h = self.g(x)
        return self.d(h * torch.sigmoid(h) * self.u(x))


@pytest.mark.parametrize("kind", KINDS)
def test_products_of_values_sharing_parameters_exact_hessian_cross_terms(kind):
    f, args = _problem(SwiGLU(), (3,), 3, n=4, seed=3)
    fn, got, want = _both(kind, f, args)
    assert fn.last_engine == "structured", fn.last_fallback_reason
    _close(got, want)


def test_a_value_used_twice_by_one_op_and_mse():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            h = torch.tanh(self.l(x))
            return h + h * 2.0 + torch.cat([h[:, :1], h[:, 1:]], dim=1)

    torch.manual_seed(0)
    model = Twice().to(DT)
    f = so.functional_loss(model, nn.MSELoss())
    args = (so.params_dict(model), torch.randn(4, 3, dtype=DT), torch.randn(4, 3, dtype=DT))
    fn = so.hessian_diag(f)
    got = fn(*args)
    assert fn.last_engine == "structured", fn.last_fallback_reason
    _close(got, so.hessian_diag(f, engine="generic")(*args))


@pytest.fixture(scope="module")
def zoo():
    from tests import zoo as z

    z.require_transformers()
    return z


@pytest.mark.parametrize("kind", KINDS)
def test_hf_resnet_runs_structured_and_agrees(zoo, kind):
    case = zoo.build("resnet", batch=3)
    fn, got, want = _both(kind, case.f, (case.params(), case.inputs, case.targets))
    assert fn.last_engine == "structured", fn.last_fallback_reason
    _close(got, want)


def test_hf_resnet_trace_and_some_parameters(zoo):
    case = zoo.build("resnet", batch=2, seed=1)
    params = {k: v for k, v in case.params().items() if "stages.1" in k or "classifier" in k}
    fn = so.trace(case.f)
    got = fn(params, case.inputs, case.targets)
    assert fn.last_engine == "structured", fn.last_fallback_reason
    _close(got, so.trace(case.f, engine="generic")(params, case.inputs, case.targets))


# -- declines ------------------------------------------------------------------------------------


def test_an_op_without_a_rule_names_the_aten_op_and_the_source_line():
    class Sorted(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            return torch.cumsum(self.l(x), dim=1)  # no rule for cumsum

    f, args = _problem(Sorted(), (3,), 3)
    fn = so.diagonal(f, curvature="ggn")
    got = fn(*args)
    assert fn.last_engine == "generic"
    reason = fn.last_fallback_reason
    assert "aten.cumsum.default" in reason and "test_structured_graph.py" in reason and "cumsum" in reason
    _close(got, so.diagonal(f, curvature="ggn", engine="generic")(*args))


def test_export_failure_gives_the_exporters_reason():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            h = self.l(x)
            if h.sum() > 0:  # data-dependent control flow: export cannot trace it
                return h
            return -h

    f, args = _problem(DataDependent(), (3,), 3)
    fn = so.diagonal(f, curvature="ggn")
    fn(*args)
    assert fn.last_engine == "generic"
    assert "torch.export could not trace the model" in fn.last_fallback_reason
    with pytest.raises(ValueError, match="torch.export could not trace"):
        so.diagonal(f, curvature="ggn", engine="structured")(*args)


def test_a_hessian_through_a_matmul_of_two_live_values_declines_with_a_reason():
    class Gram(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 4)

        def forward(self, x):
            h = self.l(x).reshape(-1, 2, 2)
            return torch.matmul(h, h).flatten(1)[:, :3]

    f, args = _problem(Gram(), (3,), 3)
    fn = so.hessian_diag(f)
    got = fn(*args)
    assert fn.last_engine == "generic" and "aten.matmul.default" in fn.last_fallback_reason
    _close(got, so.hessian_diag(f, engine="generic")(*args))
    g = so.diagonal(f, curvature="ggn")  # the GGN needs no cross term
    _close(g(*args), so.diagonal(f, curvature="ggn", engine="generic")(*args))
    assert g.last_engine == "structured", g.last_fallback_reason


def test_mixing_samples_declines():
    class BatchMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            h = self.l(x)
            return h - h.mean(dim=0, keepdim=True)

    f, args = _problem(BatchMean(), (3,), 3)
    fn = so.diagonal(f, curvature="ggn")
    got = fn(*args)
    assert fn.last_engine == "generic" and "batch dimension" in fn.last_fallback_reason
    _close(got, so.diagonal(f, curvature="ggn", engine="generic")(*args))


def test_new_shapes_retrace_never_a_stale_graph():
    torch.manual_seed(0)
    model = Functional(torch.tanh).to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    p = so.params_dict(model)
    fn = so.hessian_diag(f)
    for n, side in ((4, 4), (3, 4), (3, 6), (4, 4)):
        x, y = torch.randn(n, 2, side, side, dtype=DT), torch.randint(0, 4, (n,))
        got = fn(p, x, y)
        assert fn.last_engine == "structured", fn.last_fallback_reason
        _close(got, so.hessian_diag(f, engine="generic")(p, x, y))
    assert graph_trace.cache_size(model) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_training_mode_batch_norm_batch_statistics_buffers_untouched(zoo, kind):
    case = zoo.build("resnet", batch=3, train=True)
    before = {k: v.clone() for k, v in case.model.named_buffers()}
    fn, got, want = _both(kind, case.f, (case.params(), case.inputs, case.targets))
    if kind == "hessian":  # the batch statistics' residual across samples has no rule
        assert fn.last_engine == "generic" and "couples the samples" in fn.last_fallback_reason
    else:
        assert fn.last_engine == "structured", fn.last_fallback_reason
    _close(got, want)
    for k, v in case.model.named_buffers():
        assert torch.equal(v, before[k]), k


# -- composition -----------------------------------------------------------------------------------


def test_under_vmap_per_example_diagonals():
    f, (p, x, y) = _problem(Functional(torch.tanh), (2, 4, 4), 4, n=3)
    fn = so.diagonal(f, curvature="ggn")
    fn(p, x, y)  # traced for the batch once; per-example calls trace [1, ...]
    per = torch.func.vmap(lambda xi, yi: fn(p, xi[None], yi[None]))(x, y)
    assert fn.last_engine == "structured", fn.last_fallback_reason
    for i in range(3):
        want = so.diagonal(f, curvature="ggn", engine="generic")(p, x[i:i + 1], y[i:i + 1])
        _close({k: v[i] for k, v in per.items()}, want)


def test_under_grad_differentiates_the_trace():
    f, (p, x, y) = _problem(MLP(), (3,), 3, n=4, seed=2)
    g = torch.func.grad(lambda q: so.trace(f)(q, x, y))(p)
    want = torch.func.grad(lambda q: so.trace(f, engine="generic")(q, x, y))(p)
    _close(g, want, tol=1e-9)


def test_dataset_loss():
    f, (p, x, y) = _problem(Functional(torch.tanh), (2, 4, 4), 4, n=6)
    data = [(x[:3], y[:3]), (x[3:], y[3:])]
    F_ = so.dataset_loss(f, data)
    fn = so.diagonal(F_, curvature="ggn")
    got = fn(p)
    assert fn.last_engine == "structured", fn.last_fallback_reason
    _close(got, so.diagonal(F_, curvature="ggn", engine="generic")(p))


def test_under_torch_compile_fullgraph_once_traced(monkeypatch):
    from secorder.structured.graph import sweep

    f, (p, x, y) = _problem(Functional(torch.tanh), (2, 4, 4), 4, n=3)
    want = so.hessian_diag(f, engine="generic")(p, x, y)
    so.hessian_diag(f)(p, x, y)  # traced for these shapes (export does not run under Dynamo)
    calls = []
    real = sweep.forward
    monkeypatch.setattr(sweep, "forward", lambda *a: calls.append(1) or real(*a))
    torch._dynamo.reset()
    # Known limit (closing note of issue 21): Dynamo guards the graph cache's WeakKeyDictionary by the
    # position of its keys, so a garbage collection of another cached model while Dynamo compiles can raise
    # IndexError in guard creation. Late in a full test run that happened; collect first, none during it.
    import gc

    gc.collect()
    gc.disable()
    try:
        got = torch.compile(so.hessian_diag(f), backend="eager", fullgraph=True)(p, x, y)
    finally:
        gc.enable()
    assert calls  # Dynamo traced the graph walker's sweep, without a graph break
    _close(got, want)


def test_under_torch_compile_a_new_shape_takes_the_generic_path():
    f, (p, x, y) = _problem(Functional(torch.tanh), (2, 4, 4), 4, n=3)
    x2, y2 = x[:2], y[:2]  # never traced eagerly
    want = so.diagonal(f, curvature="ggn", engine="generic")(p, x2, y2)
    torch._dynamo.reset()
    got = torch.compile(so.diagonal(f, curvature="ggn"), backend="eager")(p, x2, y2)  # the generic path breaks
    _close(got, want)


# -- transformers and ConvNeXt ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit", "bert", "convnext"])
@pytest.mark.parametrize("kind", ["ggn", "fisher", "empirical_fisher"])
def test_hf_models_ggn_and_fishers_structured(zoo, name, kind):
    case = zoo.build(name, batch=3)
    fn, got, want = _both(kind, case.f, (case.params(), case.inputs, case.targets))
    assert fn.last_engine == "structured", fn.last_fallback_reason
    _close(got, want)


def test_convnext_exact_hessian_layer_norm_residuals_and_layer_scale(zoo):
    case = zoo.build("convnext", batch=3)
    for trace in (False, True):
        fn, got, want = _both("hessian", case.f, (case.params(), case.inputs, case.targets), trace)
        assert fn.last_engine == "structured", fn.last_fallback_reason
        _close(got, want)


@pytest.mark.parametrize("name", ["vit", "bert"])
def test_transformers_exact_hessian_attention_residual(zoo, name):
    case = zoo.build(name, batch=2)
    for trace in (False, True):
        fn, got, want = _both("hessian", case.f, (case.params(), case.inputs, case.targets), trace)
        assert fn.last_engine == "structured", fn.last_fallback_reason
        _close(got, want)


def test_attention_above_the_residual_bound_declines_with_a_reason(zoo, monkeypatch):
    from secorder.structured.rules import attention

    monkeypatch.setattr(attention, "MAX_RESIDUAL_ENTRIES", 100)
    case = zoo.build("vit", batch=2)
    fn = so.hessian_diag(case.f)
    got = fn(case.params(), case.inputs, case.targets)
    assert fn.last_engine == "generic"
    reason = fn.last_fallback_reason
    assert "scaled_dot_product_attention" in reason and "MAX_RESIDUAL_ENTRIES" in reason
    _close(got, so.hessian_diag(case.f, engine="generic")(case.params(), case.inputs, case.targets))
    g = so.diagonal(case.f, curvature="ggn")
    g(case.params(), case.inputs, case.targets)
    assert g.last_engine == "structured", g.last_fallback_reason


def test_gpt2_tied_embeddings_decline_naming_the_parameter(zoo):
    case = zoo.build("gpt2", batch=2)
    fn = so.diagonal(case.f, curvature="ggn")
    got = fn(case.params(), case.inputs, case.targets)
    assert fn.last_engine == "generic" and "'transformer.wte.weight' is used by 2 operations" in fn.last_fallback_reason
    _close(got, so.diagonal(case.f, curvature="ggn", engine="generic")(case.params(), case.inputs, case.targets))


@pytest.mark.parametrize("kind", KINDS)
def test_gpt2_untied_folded_conv1d_split_and_output_callable(zoo, kind):
    import transformers

    cfg = zoo._text_config(transformers, "gpt2")
    cfg.tie_word_embeddings = False
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).to(DT).eval()
    ids = torch.randint(0, zoo.VOCAB, (2, zoo.TOKENS), generator=torch.Generator().manual_seed(1))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    f = so.functional_loss(model, nn.CrossEntropyLoss(), output=zoo.lm_logits)
    fn, got, want = _both(kind, f, (so.params_dict(model), {"input_ids": ids}, targets))
    assert fn.last_engine == "structured", fn.last_fallback_reason
    _close(got, want)


def test_llama_ggn_structured(zoo):
    case = zoo.build("llama", batch=2)
    fn, got, want = _both("ggn", case.f, (case.params(), case.inputs, case.targets))
    assert fn.last_engine == "structured", fn.last_fallback_reason
    _close(got, want, tol=case.rtol)


def test_a_changed_attention_bound_is_seen_by_a_cached_graph(zoo, monkeypatch):
    from secorder.structured.rules import attention

    case = zoo.build("vit", batch=2)
    fn = so.hessian_diag(case.f)
    fn(case.params(), case.inputs, case.targets)
    assert fn.last_engine == "structured", fn.last_fallback_reason
    monkeypatch.setattr(attention, "MAX_RESIDUAL_ENTRIES", 100)
    fn(case.params(), case.inputs, case.targets)
    assert fn.last_engine == "generic" and "MAX_RESIDUAL_ENTRIES" in fn.last_fallback_reason


def test_a_random_operation_declines_even_on_constants():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(3, 3)

        def forward(self, x):
            return self.l(F.dropout(x, 0.5, training=True))  # dropout on the data, not on a live value

    f, args = _problem(Noisy(), (3,), 3)
    fn = so.diagonal(f, curvature="ggn")
    fn(*args)
    assert fn.last_engine == "generic" and "random operation" in fn.last_fallback_reason

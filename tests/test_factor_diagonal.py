"""Exact GGN / Monte-Carlo Fisher / empirical Fisher diagonals from per-sample loss-factor VJPs (issue 20, item 3).

Every route of :mod:`secorder.operators.factor_diagonal` (per-sample under
``vmap``, per-sample in a loop, the full-batch VJP) must equal, in float64,

* the generic one-hot diagonal of the same operator (``diagonal=None``: one
  product per parameter; for the Monte-Carlo Fisher, the same labels), and
* a dense reference ``J^T H_out J`` built with plain ``torch.func`` (Jacobian of
  the output, autograd Hessian of the loss with respect to the output).

Models are drawn by hypothesis (MLPs and CNNs with layers the structured engine
declines, so the generic path runs) and taken from the Hugging Face zoo.
"""

import functools

import pytest
import torch
from torch import nn

import secorder as so
from secorder.estimators import exact
from secorder.operators import make_operator
from secorder.operators.base import LeafOperator
from secorder.problem import Problem

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

D = torch.float64
CURVATURES = ("ggn", "fisher", "empirical_fisher")


def _flat(tree):
    return so.tree.ravel(tree)[0]


def _close(actual, expected, rtol=1e-10):
    actual, expected = _flat(actual).detach(), _flat(expected).detach()
    scale = expected.abs().max().clamp_min(1e-300)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale + 1e-13, f"max error {float(err):.3g} for a scale of {float(scale):.3g}"


def _operator(curvature, f, params, x, y, seed=3):
    g = torch.Generator().manual_seed(seed) if curvature == "fisher" else None
    return make_operator(curvature, Problem(f, 0, False, (params, x, y)), generator=g)


def _one_hot(op):
    """The same operator without its own diagonal: one product per parameter."""
    return exact.exact_diagonal(LeafOperator(op.templates, op.matvec, op.block_matvec, op.psd, None))


def _dense_ggn(f, params, x, y):
    """``J^T H_out J`` of ``f = loss(model(x))``, dense, with plain torch.func."""
    flat, unravel = so.tree.ravel(params)
    out_fn = lambda p: f.output(unravel(p), x)
    out = out_fn(flat)
    J = torch.func.jacrev(out_fn)(flat).reshape(out.numel(), -1)
    H = torch.func.hessian(lambda o: f.loss_fn(o.reshape(out.shape), y))(out.flatten())
    return torch.einsum("mp,mk,kp->p", J, H, J)


def _dense_empirical_fisher(f, params, x, y, per_sample_loss, c):
    flat, unravel = so.tree.ravel(params)
    G = torch.stack([torch.func.grad(lambda p, n=n: per_sample_loss(f.output(unravel(p), x[n:n + 1]), y[n:n + 1]))(flat)
                     for n in range(x.shape[0])])
    return (G ** 2).sum(0) / c


# -- models and losses drawn by hypothesis ------------------------------------------------------------


@st.composite
def problems(draw):
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))
    kind = draw(st.sampled_from(["mlp", "cnn"]))
    out_dim = draw(st.integers(1, 4))
    if kind == "mlp":
        width = draw(st.integers(2, 5))
        layers = [nn.Linear(3, width), nn.GroupNorm(1, width), nn.Tanh(), nn.Linear(width, out_dim)]
        x = torch.randn(draw(st.integers(1, 4)), 3, dtype=D)
    else:
        ch = draw(st.integers(1, 3))
        layers = [nn.Conv2d(1, ch, 3, padding=draw(st.integers(0, 1))), nn.GroupNorm(1, ch), nn.ELU(),
                  nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * ch, out_dim)]
        x = torch.randn(draw(st.integers(1, 3)), 1, 5, 5, dtype=D)
    model = nn.Sequential(*layers).to(D)
    N = x.shape[0]
    loss = draw(st.sampled_from(["ce", "mse", "bce", "custom"]))
    reduction = draw(st.sampled_from(["mean", "sum"]))
    if loss == "ce":
        C = max(out_dim, 2)
        model[-1] = nn.Linear(model[-1].in_features, C).to(D)
        y = torch.randint(0, C, (N,))
        loss_fn = nn.CrossEntropyLoss(reduction=reduction)
    elif loss == "mse":
        y = torch.randn(N, out_dim, dtype=D)
        loss_fn = nn.MSELoss(reduction=reduction)
    elif loss == "bce":
        y = torch.rand(N, out_dim, dtype=D)
        loss_fn = nn.BCEWithLogitsLoss(reduction=reduction)
    else:  # not recognised: the GGN factors H_out by autograd; an indefinite per-sample Hessian
        y = torch.randn(N, out_dim, dtype=D)
        loss_fn = lambda o, t: (torch.sin(o - t) * o).sum()
    return model, loss, loss_fn, x, y


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(problems(), st.sampled_from(CURVATURES), st.sampled_from([None, 1, 3]))
def test_factor_diagonal_equals_one_hot_columns(drawn, curvature, chunk_size):
    model, loss, loss_fn, x, y = drawn
    hypothesis.assume(loss != "custom" or curvature == "ggn")
    f = so.functional_loss(model, loss_fn)
    params = so.params_dict(model)
    op = _operator(curvature, f, params, x, y)
    got = op.diagonal(chunk_size)
    assert got is not None and "per-sample (vmap)" in op.diagonal.route
    _close(got, _one_hot(op))
    if curvature == "ggn":
        _close(got, _dense_ggn(f, params, x, y))


@pytest.mark.parametrize("curvature", CURVATURES)
def test_transforms_use_the_factor_route_and_say_so(curvature):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randn(5, 3, dtype=D), torch.randint(0, 3, (5,))
    seed = {"seed": 3} if curvature == "fisher" else {}
    diag_fn = so.diagonal(f, curvature=curvature, **seed)
    d = diag_fn(params, x, y)
    assert diag_fn.last_engine == "generic" and "GroupNorm" in diag_fn.last_fallback_reason
    assert "per-sample (vmap) loss-factor VJPs" in diag_fn.last_fallback_reason
    _close(d, _one_hot(_operator(curvature, f, params, x, y)))
    est = so.trace_estimate(f, curvature=curvature, method="exact", **seed)(params, x, y)
    _close(est.value, sum(t.sum() for t in d.values()))
    assert int(est.num_matvecs) == 0
    if curvature == "ggn":
        _close(d, _dense_ggn(f, params, x, y))
    if curvature == "empirical_fisher":
        per_sample = functools.partial(nn.functional.cross_entropy, reduction="sum")
        _close(d, _dense_empirical_fisher(f, params, x, y, per_sample, 5.0))


def test_same_seed_same_fisher_diagonal_and_labels_of_the_products():
    """The MC Fisher's diagonal uses the labels its products use (one draw per call, from the seed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.Tanh(), nn.Linear(4, 5)).to(D)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randn(6, 3, dtype=D), torch.randint(0, 5, (6,))
    a = so.diagonal(f, curvature="fisher", seed=7)(params, x, y)
    b = so.diagonal(f, curvature="fisher", seed=7)(params, x, y)
    c = so.diagonal(f, curvature="fisher", seed=8)(params, x, y)
    _close(a, b, rtol=0)
    assert not torch.allclose(_flat(a), _flat(c))
    _close(a, _one_hot(_operator("fisher", f, params, x, y, seed=7)))


def test_training_mode_batch_norm_takes_the_full_batch_route():
    """Samples coupled by batch statistics: per-sample VJPs would be wrong; the call's full-batch VJP is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).to(D).train()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randn(5, 3, dtype=D), torch.randint(0, 3, (5,))
    op = _operator("ggn", f, params, x, y)
    got = op.diagonal(2)
    assert "full-batch" in op.diagonal.route and "BatchNorm1d" in op.diagonal.route
    _close(got, _dense_ggn(f, params, x, y))
    for curvature in ("fisher", "empirical_fisher"):
        op = _operator(curvature, f, params, x, y)
        _close(op.diagonal(None), _one_hot(op))


def test_training_mode_dropout_is_drawn_once():
    """vmap refuses the random op; a loop would draw other masks: the full-batch route keeps the call's one draw."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).to(D).train()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randn(4, 3, dtype=D), torch.randint(0, 3, (4,))
    torch.manual_seed(1)
    op = _operator("ggn", f, params, x, y)
    got = op.diagonal(None)
    assert "full-batch" in op.diagonal.route and "randomness" in op.diagonal.route
    _close(got, _one_hot(op))


def test_a_loss_that_couples_samples_uses_whole_output_columns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(D)
    f = so.functional_loss(model, lambda o, t: (o.sum(0) ** 2).sum() + (o - t).pow(4).sum())
    params, x, y = so.params_dict(model), torch.randn(3, 3, dtype=D), torch.randn(3, 2, dtype=D)
    op = _operator("ggn", f, params, x, y)
    got = op.diagonal(None)
    assert "couples samples" in op.diagonal.route and "full-batch" in op.diagonal.route
    _close(got, _dense_ggn(f, params, x, y))
    _close(got, _one_hot(op))


def test_a_model_function_is_checked_and_differentiated_inputs_take_the_full_batch():
    torch.manual_seed(0)
    W = torch.randn(3, 4, dtype=D)
    model = lambda p, x: torch.tanh(x @ p["w"]) @ p["v"]
    params = {"w": W, "v": torch.randn(4, 2, dtype=D)}
    f = so.functional_loss(model, nn.MSELoss())
    x, y = torch.randn(5, 3, dtype=D), torch.randn(5, 2, dtype=D)
    op = _operator("ggn", f, params, x, y)
    _close(op.diagonal(None), _dense_ggn(f, params, x, y))
    assert "per-sample (vmap)" in op.diagonal.route
    # a model function that mixes samples: its per-sample outputs differ, so the full batch runs
    mixing = lambda p, x: (x - x.mean(0)) @ p["w"] @ p["v"]
    g = so.functional_loss(mixing, nn.MSELoss())
    op = _operator("ggn", g, params, x, y)
    _close(op.diagonal(None), _dense_ggn(g, params, x, y))
    assert "full-batch" in op.diagonal.route and "differ" in op.diagonal.route
    # params and inputs differentiated: the full batch, the same as the one-hot columns
    op = make_operator("empirical_fisher", Problem(f, (0, 1), False, (params, x, y)))
    _close(op.diagonal(None), _one_hot(op))
    assert "full-batch" in op.diagonal.route


def test_dataset_loss_sums_the_batches_factor_diagonals():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.ReLU(), nn.Flatten(), nn.Linear(18, 3)).to(D)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    x, y = torch.randn(7, 1, 5, 5, dtype=D), torch.randint(0, 3, (7,))
    params = so.params_dict(model)
    F = so.dataset_loss(f, [(x[:3], y[:3]), (x[3:], y[3:])])
    for curvature in ("ggn", "empirical_fisher"):
        fn = so.diagonal(F, curvature=curvature)
        got = fn(params)
        assert "per batch: per-sample (vmap)" in fn.last_fallback_reason
        whole = so.diagonal(f, curvature=curvature)(params, x, y)  # a mean over all 7 samples either way
        _close(got, whole)
    op = make_operator("fisher", Problem(F, 0, False, (params,)), generator=torch.Generator().manual_seed(2))
    _close(op.diagonal(None), _one_hot(op))


def test_custom_loss_beyond_the_dense_bound_keeps_the_one_hot_columns(monkeypatch):
    from secorder.operators import output_factor

    monkeypatch.setattr(output_factor, "MAX_DENSE_OUTPUT", 2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).to(D)
    f = so.functional_loss(model, lambda o, t: (o - t).pow(4).sum())
    params, x, y = so.params_dict(model), torch.randn(3, 3, dtype=D), torch.randn(3, 2, dtype=D)
    fn = so.trace_estimate(f, curvature="ggn", method="exact")
    est = fn(params, x, y)
    assert "one-hot columns" in fn.last_fallback_reason and int(est.num_matvecs) == 8
    _close(est.value, _dense_ggn(f, params, x, y).sum())


# -- the Hugging Face zoo --------------------------------------------------------------------------------


def test_zoo_bert_is_refused_by_vmap_and_loops_over_samples():
    from tests import zoo

    case = zoo.build("bert", batch=3)
    params = case.params()
    op = _operator("ggn", case.f, params, case.inputs, case.targets)
    got = op.diagonal(None)
    assert "per-sample (loop)" in op.diagonal.route
    _close(got, _dense_ggn(case.f, params, case.inputs, case.targets), rtol=1e-8)


@pytest.mark.parametrize("name", ["gpt2", "vit", "resnet", "convnext"])
def test_zoo_factor_diagonals_equal_dense_references(name):
    from tests import zoo

    case = zoo.build(name, batch=2)
    params = case.params()
    op = _operator("ggn", case.f, params, case.inputs, case.targets)
    got = op.diagonal(3 if name == "gpt2" else None)  # GPT-2: C T = 44 columns per sequence, 3 at a time
    assert "per-sample" in op.diagonal.route
    _close(got, _dense_ggn(case.f, params, case.inputs, case.targets), rtol=max(case.rtol, 1e-8))
    for curvature in ("fisher", "empirical_fisher"):
        op = _operator(curvature, case.f, params, case.inputs, case.targets)
        _close(op.diagonal(7), _one_hot(op), rtol=max(case.rtol, 1e-8))


def test_zoo_resnet_in_training_mode_takes_the_full_batch():
    from tests import zoo

    case = zoo.build("resnet", batch=3, train=True)
    params = case.params()
    op = _operator("ggn", case.f, params, case.inputs, case.targets)
    got = op.diagonal(None)
    assert "full-batch" in op.diagonal.route
    _close(got, _dense_ggn(case.f, params, case.inputs, case.targets), rtol=1e-8)


def test_composes_with_grad_and_vmap():
    """The gradient of an exact GGN trace (a curvature penalty) and per-example diagonals under vmap."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(2, 4), nn.Tanh(), nn.Linear(4, 3)).to(D)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randn(5, 3, dtype=D), torch.randint(0, 3, (5,))
    tr = so.trace(f, curvature="ggn")
    got = torch.func.grad(tr)(params, x, y)
    assert "loss-factor" in tr.last_fallback_reason
    flat, unravel = so.tree.ravel(params)
    expected = torch.func.grad(lambda p: _dense_ggn(f, unravel(p), x, y).sum())(flat)
    _close(got, expected)
    per_example = torch.func.vmap(so.diagonal(f, curvature="ggn"), in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    for i in range(5):
        _close({k: v[i] for k, v in per_example.items()}, _dense_ggn(f, params, x[i:i + 1], y[i:i + 1]))


def test_zoo_bert_in_training_mode_keeps_one_dropout_draw():
    """vmap refuses BERT (in-place writes); a loop would redraw its dropout masks: the full batch runs instead."""
    from tests import zoo

    case = zoo.build("bert", batch=2, train=True)
    params = case.params()
    torch.manual_seed(4)
    op = _operator("empirical_fisher", case.f, params, case.inputs, case.targets)
    got = op.diagonal(None)
    assert "full-batch" in op.diagonal.route and "Dropout" in op.diagonal.route
    _close(got, _one_hot(op), rtol=1e-8)


def _target_cases():
    torch.manual_seed(1)
    soft = torch.softmax(torch.randn(4, 3, dtype=D), dim=1)
    ignored = torch.tensor([0, -100, 2, 1])
    tokens = torch.randint(0, 3, (4, 5))
    tokens[0, 1] = -100
    return {
        "probability targets": (nn.CrossEntropyLoss(), soft, lambda h: h),
        "ignored targets": (nn.CrossEntropyLoss(), ignored, lambda h: h),
        "per-position logits [N, C, T]": (nn.CrossEntropyLoss(reduction="sum"), tokens,
                                          lambda h: h.unsqueeze(-1).expand(-1, -1, 5) * torch.arange(1., 6, dtype=D)),
        "MSE on [N, 3, 2] outputs": (nn.MSELoss(), torch.randn(4, 3, 2, dtype=D),
                                     lambda h: h.unsqueeze(-1) * torch.tensor([1., -2.], dtype=D)),
    }


@pytest.mark.parametrize("case", list(_target_cases()))
@pytest.mark.parametrize("curvature", CURVATURES)
def test_targets_and_output_shapes(case, curvature):
    loss_fn, y, head = _target_cases()[case]
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 3)).to(D)
    model = lambda p, x: head(torch.func.functional_call(net, p, (x,)))
    f = so.functional_loss(model, loss_fn)
    params, x = so.params_dict(net), torch.randn(4, 2, dtype=D)
    op = _operator(curvature, f, params, x, y)
    got = op.diagonal(2)
    assert "per-sample (vmap)" in op.diagonal.route
    _close(got, _one_hot(op))
    if curvature == "ggn":
        _close(got, _dense_ggn(f, params, x, y))


def test_one_unbatched_sample_takes_the_full_batch():
    """Cross-entropy on one sample's logits ``[C]`` and a 0-dim target: a batch of one, no batch dimension."""
    torch.manual_seed(0)
    model = lambda p, x: torch.tanh(x @ p["w"]) @ p["v"]
    params = {"w": torch.randn(3, 4, dtype=D), "v": torch.randn(4, 5, dtype=D)}
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    x, y = torch.randn(3, dtype=D), torch.tensor(2)
    for curvature in CURVATURES:
        op = _operator(curvature, f, params, x, y)
        got = op.diagonal(None)
        assert "full-batch" in op.diagonal.route and "no batch dimension" in op.diagonal.route
        _close(got, _one_hot(op))


class _Centred(nn.Module):
    """Samples interact in the model's own code (centred over the batch): no layer type gives it away."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        h = torch.tanh(self.lin(x))
        return h - h.mean(0)


def test_a_module_that_mixes_samples_is_caught_by_its_outputs():
    torch.manual_seed(0)
    model = _Centred().to(D)
    f = so.functional_loss(model, nn.MSELoss())
    params, x, y = so.params_dict(model), torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    for curvature in CURVATURES:
        op = _operator(curvature, f, params, x, y)
        got = op.diagonal(None)
        assert "full-batch" in op.diagonal.route and "samples interact" in op.diagonal.route
        _close(got, _one_hot(op))
    _close(_operator("ggn", f, params, x, y).diagonal(None), _dense_ggn(f, params, x, y))

"""Structured engine under torch.func transforms, plain autograd, and the live-model entry points."""

import pytest
import torch
from torch import nn

import secorder as so
from secorder import tree
from secorder.structured import model_diagonal, model_trace
from tests.reference import reference_diag, reference_trace

DT = torch.float64


def problem(act=nn.Tanh):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 2)).to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    x, y = torch.randn(5, 3, dtype=DT), torch.tensor([0, 1, 1, 0, 1])
    return model, f, so.params_dict(model), x, y


def test_vmap_over_params_falls_back_and_is_exact():
    _, f, params, x, y = problem()
    batch = {k: torch.stack([v, 0.5 * v]) for k, v in params.items()}
    fn = so.trace(f)
    out = torch.func.vmap(fn, in_dims=(0, None, None))(batch, x, y)
    assert fn.last_engine == "generic" and "transform" in fn.last_fallback_reason
    one = so.trace(f)
    expected = torch.stack([one({k: v[i] for k, v in batch.items()}, x, y) for i in range(2)])
    assert one.last_engine == "structured"
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


def test_vmap_over_inputs_falls_back_and_is_exact():
    _, f, params, x, y = problem()
    xs = torch.stack([x, 2 * x])
    fn = so.hessian_diag(f)
    out = torch.func.vmap(fn, in_dims=(None, 0, None))(params, xs, y)
    assert fn.last_engine == "generic"
    for i in range(2):
        ref = reference_diag(f, (params, xs[i], y))
        for k in params:
            torch.testing.assert_close(out[k][i], ref[k], rtol=1e-10, atol=1e-12)


def test_grad_of_trace_falls_back_and_matches_autograd_through_the_engine():
    _, f, params, x, y = problem()
    fn = so.trace(f)
    g_func = torch.func.grad(fn)(params, x, y)
    assert fn.last_engine == "generic"
    # Plain autograd through the structured engine (no functorch wrappers: it runs).
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    t = fn(leaves, x, y)
    assert fn.last_engine == "structured"
    g_auto = dict(zip(leaves, torch.autograd.grad(t, list(leaves.values()))))
    g_ref = torch.func.grad(lambda p: reference_trace(f, (p, x, y)))(params)
    for k in params:
        torch.testing.assert_close(g_func[k], g_ref[k], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(g_auto[k], g_ref[k], rtol=1e-9, atol=1e-12)


def test_ggn_diag_under_vmap_uses_generic_ggn():
    _, f, params, x, y = problem()
    xs = torch.stack([x, -x])
    fn = so.ggn_diag(f)
    out = torch.func.vmap(fn, in_dims=(None, 0, None))(params, xs, y)
    assert fn.last_engine == "generic"
    for i in range(2):
        expected = so.ggn_diag(f)(params, xs[i], y)
        for k in params:
            torch.testing.assert_close(out[k][i], expected[k], rtol=1e-10, atol=1e-12)


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
        torch.testing.assert_close(dp, ref[name], rtol=1e-10, atol=1e-12)
    sub = model_diagonal(model, nn.CrossEntropyLoss(), x, y, kind=kind, params=[plist[2], plist[0]])
    torch.testing.assert_close(sub[0], ref["2.weight"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sub[1], ref["0.weight"], rtol=1e-10, atol=1e-12)
    t = model_trace(model, nn.CrossEntropyLoss(), x, y, kind=kind, params=[plist[2], plist[0]])
    torch.testing.assert_close(t, ref["2.weight"].sum() + ref["0.weight"].sum(), rtol=1e-10, atol=1e-12)


def test_model_entry_points_decline_and_validate():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    x, y = torch.randn(2, 3), torch.randn(2, 4)
    assert model_diagonal(model, nn.MSELoss(), x, y) is None
    assert model_trace(model, nn.MSELoss(), x, y) is None
    assert model_trace(nn.Linear(3, 4), nn.L1Loss(), x, y) is None
    with pytest.raises(ValueError, match="kind"):
        model_diagonal(nn.Linear(3, 4), nn.MSELoss(), x, y, kind="fisher")
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

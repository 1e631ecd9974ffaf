"""Grad mode and the legacy API (issue 9, item 1): never zeros for "no graph".

Closure functions receive a loss computed by the caller; under
``torch.no_grad()`` it has no graph, and reading that as "every parameter is
unused" gave zero curvature. They now raise PyTorch's ``RuntimeError`` with the
reason. Functions that run the model's forward themselves (``model_*``) enable
grad inside, so the answer does not depend on the caller's grad mode, nor on
which engine (structured or closure) runs.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_secorder as ts
from torch_secorder.core import hvp as hvp_module
from tests.test_legacy_support import CountingClosure, model_hessian, split_like

F64 = torch.float64


def _closure_path_model():
    # RMSNorm: the structured engine declines, the closure path runs.
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.RMSNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(F64)


def _structured_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(F64)


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 4, dtype=F64, generator=g), torch.randint(0, 3, (6,), generator=g)


def _closure_calls(model, x, y):
    params = list(model.parameters())
    v = [torch.ones_like(p) for p in params]
    f = lambda: F.cross_entropy(model(x), y)
    return {
        "hessian_trace": lambda: ts.hessian_trace(f, params),
        "hessian_diagonal": lambda: ts.hessian_diagonal(f, params),
        "hessian_diagonal_strict": lambda: ts.hessian_diagonal(f, params, strict=True),
        "exact_hvp": lambda: ts.exact_hvp(f, params, v),
        "approximate_hvp": lambda: ts.approximate_hvp(f, params, v),
        "hvp.hessian_trace": lambda: hvp_module.hessian_trace(f, params, num_samples=2),
    }


@pytest.mark.parametrize("name", list(_closure_calls(nn.Linear(1, 1), None, None)))
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "detached"])
def test_closure_functions_raise_for_a_loss_without_graph(name, mode):
    model = _closure_path_model()
    x, y = _data()
    call = _closure_calls(model, x, y)[name]
    if mode == "detached":
        params = list(model.parameters())
        f = lambda: F.cross_entropy(model(x), y).detach()
        call = {
            "hessian_trace": lambda: ts.hessian_trace(f, params),
            "hessian_diagonal": lambda: ts.hessian_diagonal(f, params),
            "hessian_diagonal_strict": lambda: ts.hessian_diagonal(f, params, strict=True),
            "exact_hvp": lambda: ts.exact_hvp(f, params, [torch.ones_like(p) for p in params]),
            "approximate_hvp": lambda: ts.approximate_hvp(f, params, [torch.ones_like(p) for p in params]),
            "hvp.hessian_trace": lambda: hvp_module.hessian_trace(f, params, num_samples=2),
        }[name]
        match, ctx = "does not depend on any of the parameters", torch.enable_grad()
    elif mode == "no_grad":
        match, ctx = r"grad mode is off.*torch\.no_grad\(\)", torch.no_grad()
    else:
        match, ctx = "inference_mode", torch.inference_mode()
    with ctx, pytest.raises(RuntimeError, match=match) as info:
        call()
    assert "element 0 of tensors does not require grad and does not have a grad_fn" in str(info.value)


def test_closure_grad_mode_on_inside_the_closure_is_fine():
    # A closure that enables grad itself computes the curvature even when called under no_grad.
    model = _closure_path_model()
    x, y = _data()
    params = list(model.parameters())

    def f():
        with torch.enable_grad():
            return F.cross_entropy(model(x), y)

    ref = ts.hessian_trace(f, params)
    with torch.no_grad():
        torch.testing.assert_close(ts.hessian_trace(f, params), ref, rtol=0, atol=0)


def test_unused_parameter_still_zero_and_no_param_requiring_grad_still_zero():
    # Distinct cases from "no graph": an unused parameter gets zeros (strict=False), and
    # with no parameter requiring grad the closure is never called and the result is zero.
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    unused = torch.ones(2, requires_grad=True)
    dx, du = ts.hessian_diagonal(lambda: (x ** 3).sum(), [x, unused])
    torch.testing.assert_close(dx, torch.tensor([6.0, 12.0]))
    assert torch.equal(du, torch.zeros(2))
    c = torch.ones(3)
    f = CountingClosure(lambda: (c ** 2).sum())
    with torch.no_grad():
        assert torch.equal(ts.hessian_trace(f, [c]), torch.tensor(0.0))
    assert f.calls == 0


def _model_calls(model, x, y):
    v = [torch.ones_like(p) for p in model.parameters()]
    return {
        "model_hessian_trace": lambda: ts.model_hessian_trace(model, F.cross_entropy, x, y),
        "model_hessian_diagonal": lambda: ts.model_hessian_diagonal(model, F.cross_entropy, x, y),
        "model_hessian_diagonal_strict": lambda: ts.model_hessian_diagonal(model, F.cross_entropy, x, y, strict=True),
        "model_hvp": lambda: ts.model_hvp(model, F.cross_entropy, x, y, v),
        "gauss_newton_product": lambda: ts.gauss_newton_product(model, F.cross_entropy, x, y, v),
    }


def _flat(value):
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)
    return torch.cat([t.reshape(-1) for t in value])


@pytest.mark.parametrize("name", list(_model_calls(nn.Linear(1, 1), None, None)))
@pytest.mark.parametrize("make_model", [_closure_path_model, _structured_model], ids=["closure_path", "structured"])
def test_model_functions_answer_the_same_under_no_grad(name, make_model):
    model = make_model()
    x, y = _data()
    call = _model_calls(model, x, y)[name]
    ref = _flat(call())
    assert ref.abs().sum() > 0
    with torch.no_grad():
        got = _flat(call())
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("make_model", [_closure_path_model, _structured_model], ids=["closure_path", "structured"])
def test_model_functions_under_no_grad_match_dense_hessian(make_model):
    model = make_model()
    x, y = _data()
    H, params = model_hessian(model, F.cross_entropy, x, y)
    with torch.no_grad():
        tr = ts.model_hessian_trace(model, F.cross_entropy, x, y)
        diag = ts.model_hessian_diagonal(model, F.cross_entropy, x, y)
    torch.testing.assert_close(tr, torch.trace(H), rtol=1e-10, atol=1e-12)
    for d, r in zip(diag, split_like(torch.diagonal(H), params)):
        torch.testing.assert_close(d, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(_model_calls(nn.Linear(1, 1), None, None)))
def test_model_functions_raise_clearly_under_inference_mode(name):
    model = _structured_model()
    x, y = _data()
    call = _model_calls(model, x, y)[name]
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        call()

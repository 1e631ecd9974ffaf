"""Legacy ``torch_secorder.approximations``: 0.0.1's squared-gradient "Fisher" quantities and ``diag(J^T J)``,
against float64 references, and the secorder calls that give the quantities their names promise."""

import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jacrev, vmap, grad

import secorder as so
from torch_secorder import LegacyValueError
from torch_secorder.approximations import (
    empirical_fisher_diagonal,
    empirical_fisher_trace,
    gauss_newton_matrix_approximation,
    generalized_fisher_diagonal,
    generalized_fisher_trace,
)
from tests.test_legacy_support import tanh_mlp

F64 = torch.float64


class SimpleModel(nn.Module):
    def __init__(self, out=1):
        super().__init__()
        self.linear = nn.Linear(10, out)

    def forward(self, x):
        return self.linear(x)


def _gradient(model, loss):
    return torch.autograd.grad(loss, list(model.parameters()))


def test_documented_examples_verbatim():
    # docs/api/approximations/*.rst and tests/unit/test_fisher_*.py, test_gauss_newton.py of torch-secorder 0.0.1.
    model = SimpleModel(2)
    inputs, targets = torch.randn(5, 10), torch.randint(0, 2, (5,))
    efim = empirical_fisher_diagonal(model, nn.CrossEntropyLoss(), inputs, targets)
    assert isinstance(efim, list) and len(efim) == 2
    for d, g in zip(efim, _gradient(model, nn.CrossEntropyLoss()(model(inputs), targets))):
        assert d.shape == g.shape and torch.allclose(d, g.pow(2))
    outputs = model(inputs)
    gfim = generalized_fisher_diagonal(model, outputs, targets, loss_type="nll")
    nll = -F.nll_loss(F.log_softmax(outputs, dim=-1), targets, reduction="sum")
    grads = torch.autograd.grad(nll, model.parameters(), retain_graph=True)
    assert len(gfim) == 2 and all(torch.allclose(d, g.pow(2), atol=1e-5) for d, g in zip(gfim, grads))
    trace = generalized_fisher_trace(model, outputs, targets, loss_type="nll")
    assert torch.isclose(trace, sum(g.pow(2).sum() for g in grads), atol=1e-5)

    model = SimpleModel(1)
    inputs, targets = torch.randn(5, 10), torch.randn(5, 1)
    efim_trace = empirical_fisher_trace(model, nn.MSELoss(), inputs, targets)
    assert isinstance(efim_trace, torch.Tensor) and efim_trace.ndim == 0
    grads = _gradient(model, nn.MSELoss()(model(inputs), targets))
    assert torch.allclose(efim_trace, sum(g.pow(2).sum() for g in grads))
    assert torch.allclose(empirical_fisher_trace(model, nn.MSELoss(), inputs, targets, num_samples=100), efim_trace)
    gnm = gauss_newton_matrix_approximation(model, nn.MSELoss(), inputs, targets)
    assert gnm[0].shape == model.linear.weight.shape and gnm[1].shape == model.linear.bias.shape
    expected_w, expected_b = torch.zeros_like(model.linear.weight), torch.zeros_like(model.linear.bias)
    outputs = model(inputs)
    for i in range(outputs.numel()):
        gw, gb = torch.autograd.grad(outputs.view(-1)[i], model.parameters(), retain_graph=True)
        expected_w += gw.pow(2)
        expected_b += gb.pow(2)
    assert torch.allclose(gnm[0], expected_w, atol=1e-5) and torch.allclose(gnm[1], expected_b, atol=1e-5)
    graph = gauss_newton_matrix_approximation(model, nn.MSELoss(), inputs, targets, create_graph=True)
    assert graph[0].grad_fn is not None and graph[1].grad_fn is not None

    cls = SimpleModel(3)
    with pytest.raises(NotImplementedError):
        generalized_fisher_diagonal(cls, cls(torch.randn(10, 10)), torch.randint(0, 3, (10,)), loss_type="unsupported")
    with pytest.raises(NotImplementedError):
        generalized_fisher_diagonal(cls, torch.randn(10, requires_grad=True), torch.randint(0, 3, (10,)))
    with pytest.raises(ValueError):
        generalized_fisher_trace(cls, torch.randn(10, 5, requires_grad=True), torch.randint(0, 5, (10,)), num_samples=0)
    with pytest.raises(NotImplementedError):
        generalized_fisher_trace(cls, torch.randn(10, 5, requires_grad=True), torch.randint(0, 5, (10,)),
                                 loss_type="unsupported")
    with pytest.raises(ValueError, match="Gauss-Newton Matrix approximation is typically used with MSE-based loss functions"):
        gauss_newton_matrix_approximation(SimpleModel(1), nn.L1Loss(), torch.randn(2, 10), torch.randn(2, 1))


def _problem(seed=0):
    torch.manual_seed(seed)
    model = tanh_mlp((4, 5, 3), F64)
    return model, torch.randn(7, 4, dtype=F64), torch.randint(0, 3, (7,))


def test_fisher_functions_are_squared_gradients_float64_and_follow_dtype():
    model, x, y = _problem()
    g = _gradient(model, F.cross_entropy(model(x), y))
    diag = empirical_fisher_diagonal(model, F.cross_entropy, x, y)
    for d, r in zip(diag, g):
        assert d.dtype == F64 and not d.requires_grad
        torch.testing.assert_close(d, r ** 2, rtol=1e-13, atol=1e-15)
    tr = empirical_fisher_trace(model, F.cross_entropy, x, y)
    assert tr.dtype == F64                                    # 0.0.1: always float32
    torch.testing.assert_close(tr, sum((r ** 2).sum() for r in g), rtol=1e-13, atol=1e-15)
    out = model(x)
    g = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), list(model.parameters()), retain_graph=True)
    for d, r in zip(generalized_fisher_diagonal(model, out, y), g):
        torch.testing.assert_close(d, r ** 2, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(generalized_fisher_trace(model, out, y), sum((r ** 2).sum() for r in g), rtol=1e-13, atol=1e-15)


def test_generalized_fisher_create_graph_and_no_graph_outputs():
    model, x, y = _problem(1)
    params = list(model.parameters())
    out = model(x)
    assert all(d.requires_grad for d in generalized_fisher_diagonal(model, out, y, create_graph=True))
    tr = generalized_fisher_trace(model, out, y, create_graph=True)
    # d/dtheta ||g||^2 = 2 H g, with g the gradient of the summed NLL.
    g = torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), params, create_graph=True)
    Hg = torch.autograd.grad(g, params, grad_outputs=[t.detach() for t in g])
    for a, b in zip(torch.autograd.grad(tr, params), Hg):
        torch.testing.assert_close(a, 2 * b, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        detached = model(x)
    with pytest.raises(RuntimeError, match="no autograd graph"):
        generalized_fisher_diagonal(model, detached, y)


def test_fisher_unused_zero_frozen_raises_no_grad_same_answer():
    net, x, y = _problem(2)

    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.extra = net, nn.Linear(2, 2).double()    # extra: not used by forward, zeros

        def forward(self, inp):
            return self.net(inp)

    model = WithUnused()
    d = empirical_fisher_diagonal(model, F.cross_entropy, x, y)
    assert len(d) == 6 and torch.equal(d[4], torch.zeros(2, 2, dtype=F64))
    with torch.no_grad():
        d2 = empirical_fisher_diagonal(model, F.cross_entropy, x, y)
    assert all(torch.equal(a, b) for a, b in zip(d, d2))
    net[0].bias.requires_grad_(False)
    with pytest.raises(RuntimeError, match="does not require grad"):
        empirical_fisher_diagonal(model, F.cross_entropy, x, y)


def _explicit_jtj_diag(model, x, params_names):
    values = {k: p.detach() for k, p in model.named_parameters()}
    jac = jacrev(lambda v: functional_call(model, {**values, **v}, (x,)).reshape(-1))({k: values[k] for k in params_names})
    return [(jac[k] ** 2).sum(0) for k in params_names]


@pytest.mark.parametrize("norm", [False, True], ids=["structured", "generic"])
def test_gauss_newton_is_diag_jtj(norm):
    torch.manual_seed(3)
    layers = [nn.Linear(4, 5)] + ([nn.RMSNorm(5)] if norm else []) + [nn.Tanh(), nn.Linear(5, 3)]
    model = nn.Sequential(*layers).double()
    x, y = torch.randn(6, 4, dtype=F64), torch.randn(6, 3, dtype=F64)
    model[0].bias.requires_grad_(False)                 # excluded, as in 0.0.1
    names = [k for k, p in model.named_parameters() if p.requires_grad]
    ref = _explicit_jtj_diag(model, x, names)
    for loss_fn in (nn.MSELoss(), F.mse_loss):
        got = gauss_newton_matrix_approximation(model, loss_fn, x, y)
        assert len(got) == len(names)
        for a, r in zip(got, ref):
            assert a.dtype == F64 and not a.requires_grad
            torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-13)
    got = gauss_newton_matrix_approximation(model, nn.MSELoss(), x, y, create_graph=True)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a.detach(), r, rtol=1e-11, atol=1e-13)
    # The derivative of sum(diag) with respect to the first weight, against central differences of the
    # explicit diag(J^T J): independent of torch.func's third derivatives (grad of jacrev through an affine
    # LayerNorm, differentiated with respect to its weight, is wrong in torch 2.13).
    first = names[0]
    w0 = dict(model.named_parameters())[first]
    (g,) = torch.autograd.grad(sum(a.sum() for a in got), [w0])
    h, fd = 1e-5, torch.zeros_like(w0)
    for i in range(w0.numel()):
        for sign in (1.0, -1.0):
            with torch.no_grad():
                w0.view(-1)[i] += sign * h
            fd.view(-1)[i] += sign * sum(r.sum() for r in _explicit_jtj_diag(model, x, names)) / (2 * h)
            with torch.no_grad():
                w0.view(-1)[i] -= sign * h
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-7)
    with pytest.raises(LegacyValueError, match="broadcast the output"):
        gauss_newton_matrix_approximation(model, nn.MSELoss(), x, y[:, :1].reshape(6, 1, 1))


def test_migration_calls_give_the_named_quantities():
    # What the legacy names promise, and the secorder call that gives it (docs/migration/approximations.rst).
    model, x, y = _problem(4)
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    names = list(params)

    def per_sample_grads():
        def one(p, xi, yi):
            return grad(lambda q: F.cross_entropy(functional_call(model, q, (xi[None],)), yi[None]))(p)

        return vmap(one, in_dims=(None, 0, 0))(params, x, y)

    ps = per_sample_grads()
    n = x.shape[0]
    ef = so.diagonal(f, curvature="empirical_fisher")(params, x, y)
    legacy = empirical_fisher_diagonal(model, F.cross_entropy, x, y)
    for k, leg in zip(names, legacy):
        # the empirical Fisher of the mean loss: (1/N) sum_n g_n^2 of the per-sample mean-loss gradients ...
        torch.testing.assert_close(ef[k], (ps[k] ** 2).sum(0) / n, rtol=1e-10, atol=1e-13)
        # ... which the legacy squared mini-batch gradient is not
        assert not torch.allclose(ef[k], leg)
    ggn = so.diagonal(f, curvature="ggn")(params, x, y)            # = the Fisher for softmax cross-entropy
    fmse = so.functional_loss(model, nn.MSELoss())
    ymse = torch.randn(n, 3, dtype=F64)
    ggn_mse = so.diagonal(fmse, curvature="ggn")(params, x, ymse)
    legacy_gn = gauss_newton_matrix_approximation(model, nn.MSELoss(), x, ymse)
    for k, leg in zip(names, legacy_gn):
        torch.testing.assert_close(ggn_mse[k], 2.0 / (n * 3) * leg, rtol=1e-10, atol=1e-13)
    assert all(torch.all(ggn[k] >= 0) for k in names)


def test_signatures_and_defaults():
    P = inspect.Parameter
    expected = {
        empirical_fisher_diagonal: [("model", P.empty), ("loss_fn", P.empty), ("inputs", P.empty), ("targets", P.empty)],
        generalized_fisher_diagonal: [("model", P.empty), ("outputs", P.empty), ("targets", P.empty),
                                      ("loss_type", "nll"), ("create_graph", False)],
        empirical_fisher_trace: [("model", P.empty), ("loss_fn", P.empty), ("inputs", P.empty), ("targets", P.empty),
                                 ("num_samples", 1)],
        generalized_fisher_trace: [("model", P.empty), ("outputs", P.empty), ("targets", P.empty),
                                   ("loss_type", "nll"), ("num_samples", 1), ("create_graph", False)],
        gauss_newton_matrix_approximation: [("model", P.empty), ("loss_fn", P.empty), ("inputs", P.empty),
                                            ("targets", P.empty), ("create_graph", False)],
    }
    for fn, params in expected.items():
        assert [(p.name, p.default) for p in inspect.signature(fn).parameters.values()] == params, fn.__name__

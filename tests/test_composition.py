"""vmap, grad and torch.compile compose with the transforms."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

import secorder as so
from secorder import tree
from tests.reference import assert_tree_close, reference_diag, tanh_mlp

D = torch.float64


def per_example_setup():
    model = tanh_mlp((4, 6, 3))
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    x, y = torch.randn(5, 4, dtype=D), torch.randint(0, 3, (5,))

    def loss_one(p, xi, yi):
        return f(p, xi[None], yi[None])

    return loss_one, params, x, y


def test_vmap_per_example_trace_and_diag_equal_loop():
    loss_one, params, x, y = per_example_setup()
    traces = vmap(so.trace(loss_one), in_dims=(None, 0, 0))(params, x, y)
    diags = vmap(so.hessian_diag(loss_one, chunk_size=5), in_dims=(None, 0, 0))(params, x, y)
    assert traces.shape == (5,)
    for i in range(5):
        torch.testing.assert_close(traces[i], so.trace(loss_one)(params, x[i], y[i]))
        expected = reference_diag(loss_one, (params, x[i], y[i]))
        assert_tree_close(tree.tree_map(lambda d: d[i], diags), expected)


def test_vmap_hvp_per_example():
    loss_one, params, x, y = per_example_setup()
    v = tree.random_like(params, "normal")
    hv = vmap(so.hvp(loss_one), in_dims=(None, 0, 0, None))(params, x, y, v)
    for i in range(5):
        assert_tree_close(tree.tree_map(lambda h: h[i], hv), so.hvp(loss_one)(params, x[i], y[i], v))


def test_grad_of_trace_matches_finite_differences_and_reference():
    def f(w, x):
        return torch.tanh(x @ w).pow(2).sum() + (w ** 4).sum() * 0.1

    w = torch.randn(3, 2, dtype=D)
    x = torch.randn(5, 3, dtype=D)
    g = grad(so.trace(f))(w, x)
    # Reference: grad of the trace of the dense Hessian (third derivatives via torch.func).
    ref = grad(lambda w_: torch.trace(torch.func.hessian(lambda u: f(u.reshape(3, 2), x))(w_.reshape(-1))))(w)
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
    # And central finite differences of the trace itself.
    eps = 1e-5
    tr = so.trace(f)
    fd = torch.zeros_like(w)
    for idx in range(w.numel()):
        e = torch.zeros(w.numel(), dtype=D)
        e[idx] = eps
        e = e.reshape(w.shape)
        fd.view(-1)[idx] = (tr(w + e, x) - tr(w - e, x)) / (2 * eps)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-7)


def test_grad_of_trace_for_mlp_penalty():
    model = tanh_mlp((3, 5, 2))
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    x, y = torch.randn(6, 3, dtype=D), torch.randint(0, 2, (6,))

    def penalised(p):
        return f(p, x, y) + 0.01 * so.trace(f)(p, x, y)

    g = grad(penalised)(params)

    def reference_penalised(p):
        flat, unravel = tree.ravel(p)
        H = torch.func.hessian(lambda u: f(unravel(u), x, y))(flat)
        return f(p, x, y) + 0.01 * torch.trace(H)

    assert_tree_close(g, grad(reference_penalised)(params), rtol=1e-9, atol=1e-11)


@pytest.mark.slow
def test_torch_compile_agrees():
    def f(x):
        return (torch.sin(x) * x ** 2).sum()

    x = torch.randn(7, dtype=torch.float64)
    eager = so.trace(f)(x), so.hessian_diag(f)(x), so.hvp(f)(x, torch.ones(7, dtype=D))
    compiled = (
        torch.compile(so.trace(f))(x),
        torch.compile(so.hessian_diag(f))(x),
        torch.compile(so.hvp(f))(x, torch.ones(7, dtype=D)),
    )
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-10, atol=1e-12)

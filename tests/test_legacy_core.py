"""Legacy ``torch_secorder.core.hessian_trace`` / ``hessian_diagonal``: values, flags, semantics."""

import contextlib
import inspect
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_secorder
import torch_secorder.core
from torch_secorder.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from torch_secorder.core.hessian_trace import hessian_trace, model_hessian_trace
from tests.test_legacy_support import (
    CountingClosure,
    model_hessian,
    model_loss_of_values,
    split_like,
    tanh_mlp,
)

F64 = torch.float64


# --------------------------------------------------------------------------- the page's examples


PAGE_EXAMPLE_TRACE = """
import torch
from torch_secorder.core.hessian_trace import hessian_trace
x = torch.tensor([1.0, 2.0], requires_grad=True)
def quadratic():
    return x.pow(2).sum()
# Estimate the trace with 1000 samples
trace = hessian_trace(quadratic, [x], num_samples=1000)
print(trace) # Should be close to 4.0 (trace of 2I)
"""

PAGE_EXAMPLE_MODEL = """
import torch
import torch.nn as nn
from torch_secorder.core.hessian_trace import model_hessian_trace
# Create a simple neural network
model = nn.Linear(10, 1)
x = torch.randn(5, 10)
y = torch.randn(5, 1)
# Estimate the trace of the Hessian for the MSE loss
trace = model_hessian_trace(model, nn.functional.mse_loss, x, y)
print(f"Estimated Hessian Trace: {trace}")
"""


def _run_page_example(source):
    namespace, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "<reference page>", "exec"), namespace)
    return namespace, out.getvalue()


def test_page_example_hessian_trace_verbatim():
    ns, printed = _run_page_example(PAGE_EXAMPLE_TRACE)
    trace = ns["trace"]
    assert isinstance(trace, torch.Tensor) and trace.dim() == 0 and trace.dtype == torch.float32
    assert trace.item() == 4.0
    assert printed.strip() == "tensor(4.)"


def test_page_example_model_hessian_trace_verbatim():
    ns, printed = _run_page_example(PAGE_EXAMPLE_MODEL)
    trace, x = ns["trace"], ns["x"]
    assert printed.startswith("Estimated Hessian Trace: ")
    # MSE of a linear model: H = (2 / N) [x 1]^T [x 1], trace = (2 / N) (sum x^2 + N).
    expected = 2.0 / 5 * ((x.double() ** 2).sum() + 5)
    assert trace.dtype == torch.float32 and trace.dim() == 0 and not trace.requires_grad
    torch.testing.assert_close(trace.double(), expected, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- quadratics


def test_quadratic_known_hessian_two_params():
    # f = 1/2 a^T A a + a^T B b + 1/2 b^T C b: Hessian blocks A (sym), B, C (sym).
    g = torch.Generator().manual_seed(1)
    A = torch.randn(4, 4, generator=g, dtype=F64)
    A = A + A.T
    C = torch.randn(3, 3, generator=g, dtype=F64)
    C = C + C.T
    B = torch.randn(4, 3, generator=g, dtype=F64)
    a = torch.randn(4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=F64, requires_grad=True)
    f = lambda: 0.5 * a @ A @ a + a @ B @ b + 0.5 * b @ C @ b
    da, db = hessian_diagonal(f, [a, b])
    torch.testing.assert_close(da, torch.diagonal(A), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(db, torch.diagonal(C), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hessian_trace(f, [a, b]), torch.trace(A) + torch.trace(C), rtol=1e-12, atol=1e-12)


def test_quadratic_matrix_parameter_shape_and_v():
    W = torch.randn(3, 5, dtype=F64, requires_grad=True)
    S = torch.rand(3, 5, dtype=F64) + 0.5
    f = lambda: (S * W ** 2).sum()            # Hessian diag(2 S)
    (d,) = hessian_diagonal(f, [W])
    assert d.shape == (3, 5)
    torch.testing.assert_close(d, 2 * S)
    v = torch.randn(3, 5, dtype=F64)
    (dv,) = hessian_diagonal(f, [W], v=[v])
    torch.testing.assert_close(dv, 2 * S * v)
    (dv_single,) = hessian_diagonal(f, [W], v=v)  # a bare tensor for a single parameter
    torch.testing.assert_close(dv_single, 2 * S * v)


# --------------------------------------------------------------------------- models vs float64 Hessian


def _linear(dtype=F64):
    torch.manual_seed(3)
    return nn.Linear(5, 3).to(dtype)


def _sequential(dtype=F64):
    torch.manual_seed(4)
    return tanh_mlp((4, 6, 3), dtype)


def _data(model, loss):
    n_in = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    x = torch.randn(7, n_in, dtype=F64)
    n_out = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    y = torch.randn(7, n_out, dtype=F64) if loss is F.mse_loss else torch.randint(0, n_out, (7,))
    return x, y


MODELS = {"linear": _linear, "sequential": _sequential}
LOSSES = {"mse": F.mse_loss, "cross_entropy": F.cross_entropy}


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("loss_name", LOSSES)
def test_models_against_float64_hessian(model_name, loss_name):
    model, loss_fn = MODELS[model_name](), LOSSES[loss_name]
    x, y = _data(model, loss_fn)
    H, params = model_hessian(model, loss_fn, x, y)
    ref_diag = split_like(torch.diagonal(H), params)
    closure = lambda: loss_fn(model(x), y)

    diag = hessian_diagonal(closure, params)
    mdiag = model_hessian_diagonal(model, loss_fn, x, y)
    for d, md, r, p in zip(diag, mdiag, ref_diag, params):
        assert d.shape == p.shape and d.dtype == p.dtype and not d.requires_grad
        torch.testing.assert_close(d, r, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(md, r, rtol=1e-10, atol=1e-12)
    for tr in (hessian_trace(closure, params), model_hessian_trace(model, loss_fn, x, y)):
        assert tr.dim() == 0 and tr.dtype == F64 and not tr.requires_grad
        torch.testing.assert_close(tr, torch.trace(H), rtol=1e-10, atol=1e-12)


def test_float32_model_results_are_float32_and_close():
    model = _sequential(torch.float32)
    x, y = torch.randn(7, 4), torch.randint(0, 3, (7,))
    diag = model_hessian_diagonal(model, F.cross_entropy, x, y)
    tr = model_hessian_trace(model, F.cross_entropy, x, y)
    model64 = _sequential(F64)
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    H, params = model_hessian(model64, F.cross_entropy, x.double(), y)
    for d, r in zip(diag, split_like(torch.diagonal(H), params)):
        assert d.dtype == torch.float32
        torch.testing.assert_close(d.double(), r, rtol=1e-4, atol=1e-6)
    assert tr.dtype == torch.float32
    torch.testing.assert_close(tr.double(), torch.trace(H), rtol=1e-4, atol=1e-5)


def test_order_follows_params_not_model():
    model = _sequential()
    x, y = _data(model, F.mse_loss)
    params = list(model.parameters())
    shuffled = [params[2], params[0], params[3], params[1]]
    closure = lambda: F.mse_loss(model(x), y)
    forward = hessian_diagonal(closure, params)
    backward = hessian_diagonal(closure, shuffled)
    for i, j in enumerate([2, 0, 3, 1]):
        torch.testing.assert_close(backward[i], forward[j], rtol=0, atol=0)


def test_params_may_be_a_generator():
    model = _linear()
    x, y = _data(model, F.mse_loss)
    closure = lambda: F.mse_loss(model(x), y)
    a = hessian_diagonal(closure, model.parameters())
    b = hessian_diagonal(closure, list(model.parameters()))
    assert len(a) == 2 and all(torch.equal(u, w) for u, w in zip(a, b))


def test_device_and_dtype_follow_params(device):
    x = torch.tensor([1.0, 2.0], dtype=F64, device=device, requires_grad=True)
    (d,) = hessian_diagonal(lambda: (x ** 3).sum(), [x])
    tr = hessian_trace(lambda: (x ** 3).sum(), [x])
    assert d.device == x.device and d.dtype == F64 and tr.device == x.device and tr.dtype == F64
    torch.testing.assert_close(d.cpu(), torch.tensor([6.0, 12.0], dtype=F64))


# --------------------------------------------------------------------------- strict


def test_strict_true_raises_on_param_without_grad():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    c = torch.tensor([3.0])
    f = CountingClosure(lambda: (x ** 2).sum() * c.sum())
    for fn in (hessian_diagonal, hessian_trace):
        with pytest.raises(RuntimeError, match="One of the differentiated Tensors does not require grad"):
            fn(f, [x, c], strict=True)


def test_strict_false_gives_zeros_for_param_without_grad_and_computes_others():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    c = torch.tensor([[3.0, 4.0]])
    f = lambda: (x ** 3).sum() * c.sum()
    dx, dc = hessian_diagonal(f, [x, c])
    torch.testing.assert_close(dx, 6 * x.detach() * 7)
    assert dc.shape == c.shape and torch.equal(dc, torch.zeros_like(c))
    torch.testing.assert_close(hessian_trace(f, [x, c]), (6 * x.detach() * 7).sum())


def test_unused_param_zero_unless_strict():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    unused = torch.ones(2, 2, requires_grad=True)
    f = lambda: (x ** 3).sum()
    dx, du = hessian_diagonal(f, [x, unused])
    torch.testing.assert_close(dx, 6 * x.detach())
    assert torch.equal(du, torch.zeros(2, 2))
    torch.testing.assert_close(hessian_trace(f, [x, unused]), torch.tensor(18.0))
    with pytest.raises(RuntimeError, match="appears to not have been used in the graph"):
        hessian_diagonal(f, [x, unused], strict=True)
    with pytest.raises(RuntimeError, match="appears to not have been used in the graph"):
        hessian_trace(f, [x, unused], strict=True)


def test_linear_term_gives_zero_block():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    b = torch.tensor([3.0], requires_grad=True)
    f = lambda: (x ** 2).sum() + 5 * b.sum()
    dx, db = hessian_diagonal(f, [x, b], strict=True)
    torch.testing.assert_close(dx, torch.full((2,), 2.0))
    assert torch.equal(db, torch.zeros(1))


def test_no_param_requires_grad_gives_zeros_without_calling_func():
    c = torch.ones(3)
    f = CountingClosure(lambda: (c ** 2).sum())
    assert [torch.equal(d, torch.zeros(3)) for d in hessian_diagonal(f, [c])] == [True]
    tr = hessian_trace(f, [c])
    assert tr.dim() == 0 and tr.item() == 0.0
    assert f.calls == 0


def test_model_frozen_layer_strict_and_not():
    model = _sequential()
    model[0].weight.requires_grad_(False)
    x, y = _data(model, F.cross_entropy)
    H, params = model_hessian(model, F.cross_entropy, x, y)
    ref = split_like(torch.diagonal(H), params)
    diag = model_hessian_diagonal(model, F.cross_entropy, x, y)
    assert torch.equal(diag[0], torch.zeros_like(params[0]))
    for d, r in zip(diag[1:], ref[1:]):
        torch.testing.assert_close(d, r, rtol=1e-10, atol=1e-12)
    tr = model_hessian_trace(model, F.cross_entropy, x, y)
    torch.testing.assert_close(tr, sum(r.sum() for r in ref[1:]), rtol=1e-10, atol=1e-12)
    with pytest.raises(RuntimeError, match="does not require grad"):
        model_hessian_diagonal(model, F.cross_entropy, x, y, strict=True)
    with pytest.raises(RuntimeError, match="does not require grad"):
        model_hessian_trace(model, F.cross_entropy, x, y, strict=True)


# --------------------------------------------------------------------------- create_graph


def test_create_graph_trace_is_differentiable():
    # f = sum(x^4) / 12 + sum(x^2 y): tr H_x = sum(x^2) + 2 sum(y), H_y = 0.
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    y = torch.tensor([0.3, 0.7, -1.1], dtype=F64, requires_grad=True)
    f = lambda: (x ** 4).sum() / 12 + (x ** 2 * y).sum()
    tr = hessian_trace(f, [x, y], create_graph=True)
    assert tr.requires_grad
    torch.testing.assert_close(tr, (x ** 2).sum() + 2 * y.sum())
    gx, gy = torch.autograd.grad(tr, [x, y])
    torch.testing.assert_close(gx, 2 * x.detach())
    torch.testing.assert_close(gy, torch.full((3,), 2.0, dtype=F64))


def test_create_graph_false_carries_no_graph():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    f = lambda: (x ** 4).sum()
    assert not hessian_trace(f, [x]).requires_grad
    assert not any(d.requires_grad for d in hessian_diagonal(f, [x]))


def test_create_graph_constant_hessian_still_differentiable():
    # x * x: the second derivative is a constant, no graph back to x of its own.
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    tr = hessian_trace(lambda: (x * x).sum(), [x], create_graph=True)
    assert tr.item() == 4.0
    (g,) = torch.autograd.grad(tr, x)
    assert torch.equal(g, torch.zeros(2))
    (d,) = hessian_diagonal(lambda: (x * x).sum(), [x], create_graph=True)
    (g,) = torch.autograd.grad(d.sum(), x)
    assert torch.equal(g, torch.zeros(2))


def test_create_graph_diagonal_gradient():
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    (d,) = hessian_diagonal(lambda: (x ** 3).sum(), [x], create_graph=True)   # 6 x
    (g,) = torch.autograd.grad((d * torch.tensor([1.0, 10.0], dtype=F64)).sum(), x)
    torch.testing.assert_close(g, torch.tensor([6.0, 60.0], dtype=F64))


def test_create_graph_model_trace_gradient_matches_third_derivative():
    model = _sequential()
    x, y = _data(model, F.cross_entropy)
    params = list(model.parameters())
    tr = model_hessian_trace(model, F.cross_entropy, x, y, create_graph=True)
    grads = torch.autograd.grad(tr, params)
    fn = model_loss_of_values(model, F.cross_entropy, x, y)

    def trace_of_flat(flat):
        return torch.trace(torch.func.hessian(lambda u: fn(split_like(u, params)))(flat))

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    ref = split_like(torch.func.grad(trace_of_flat)(flat), params)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-10)
    diag = model_hessian_diagonal(model, F.cross_entropy, x, y, create_graph=True)
    assert all(d.requires_grad for d in diag)
    torch.testing.assert_close(sum(d.sum() for d in diag), tr)


# --------------------------------------------------------------------------- closure calls


def test_closure_called_once():
    model = _sequential()
    x, y = _data(model, F.mse_loss)
    f = CountingClosure(lambda: F.mse_loss(model(x), y))
    hessian_diagonal(f, list(model.parameters()))
    assert f.calls == 1
    hessian_trace(f, list(model.parameters()), create_graph=True)
    assert f.calls == 2


def test_model_functions_run_forward_once_on_generic_path():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _sequential()
            self.calls = 0

        def forward(self, inp):
            self.calls += 1
            return self.inner(inp)

    model = Counting()
    x, y = _data(model.inner, F.mse_loss)
    model_hessian_diagonal(model, F.mse_loss, x, y, create_graph=True)
    assert model.calls == 1
    model_hessian_trace(model, F.mse_loss, x, y, create_graph=True)
    assert model.calls == 2


# --------------------------------------------------------------------------- API surface


def test_signatures_and_defaults():
    P = inspect.Parameter
    expected = {
        hessian_trace: [("func", P.empty), ("params", P.empty), ("num_samples", 1), ("create_graph", False), ("strict", False)],
        model_hessian_trace: [("model", P.empty), ("loss_fn", P.empty), ("inputs", P.empty), ("targets", P.empty),
                              ("num_samples", 1), ("create_graph", False), ("strict", False)],
        hessian_diagonal: [("func", P.empty), ("params", P.empty), ("v", None), ("create_graph", False), ("strict", False)],
        model_hessian_diagonal: [("model", P.empty), ("loss_fn", P.empty), ("inputs", P.empty), ("targets", P.empty),
                                 ("create_graph", False), ("strict", False)],
    }
    for fn, params in expected.items():
        sig = inspect.signature(fn)
        assert [(p.name, p.default) for p in sig.parameters.values()] == params, fn.__name__
        assert all(p.kind is P.POSITIONAL_OR_KEYWORD for p in sig.parameters.values())


def test_reexports():
    from torch_secorder.core import hvp as hvp_module

    for name in ["exact_hvp", "approximate_hvp", "model_hvp", "gauss_newton_product", "hessian_diagonal",
                 "model_hessian_diagonal", "hessian_trace", "model_hessian_trace"]:
        assert getattr(torch_secorder, name) is getattr(torch_secorder.core, name), name
        assert name in torch_secorder.__all__ and name in torch_secorder.core.__all__
    # As in 0.0.1, the package-level hessian_trace is the exact one, not the Hutchinson one.
    assert torch_secorder.hessian_trace is hessian_trace
    assert torch_secorder.hessian_trace is not hvp_module.hessian_trace
    assert torch_secorder.exact_hvp is hvp_module.exact_hvp


# --------------------------------------------------------------------------- structured engine vs generic path


def test_model_functions_take_structured_engine_for_plain_sequential(monkeypatch):
    import sys

    # As in 0.0.1, the package attribute of that name is the function; the module is in sys.modules.
    diag_module = sys.modules["torch_secorder.core.hessian_diagonal"]
    trace_module = sys.modules["torch_secorder.core.hessian_trace"]

    def generic_path_not_expected(*args, **kwargs):
        raise AssertionError("generic closure path taken")

    model = _sequential()
    x, y = _data(model, F.cross_entropy)
    H, params = model_hessian(model, F.cross_entropy, x, y)
    monkeypatch.setattr(diag_module, "hessian_diagonal", generic_path_not_expected)
    monkeypatch.setattr(trace_module, "hessian_trace", generic_path_not_expected)
    diag = model_hessian_diagonal(model, F.cross_entropy, x, y)
    tr = model_hessian_trace(model, F.cross_entropy, x, y)
    for d, r, p in zip(diag, split_like(torch.diagonal(H), params), params):
        assert d.shape == p.shape and d.dtype == p.dtype and not d.requires_grad
        torch.testing.assert_close(d, r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(tr, torch.trace(H), rtol=1e-10, atol=1e-12)


def test_model_functions_fall_back_for_unsupported_models():
    class Residual(nn.Module):       # not a plain feed-forward stack: generic path
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, inp):
            return self.b(torch.tanh(self.a(inp)) + inp)

    torch.manual_seed(8)
    model = Residual().double()
    x, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    H, params = model_hessian(model, F.cross_entropy, x, y)
    for d, r in zip(model_hessian_diagonal(model, F.cross_entropy, x, y), split_like(torch.diagonal(H), params)):
        torch.testing.assert_close(d, r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(model_hessian_trace(model, F.cross_entropy, x, y), torch.trace(H), rtol=1e-10, atol=1e-12)

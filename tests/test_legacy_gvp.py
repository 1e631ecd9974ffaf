"""Legacy ``torch_secorder.core.gvp``: JVPs, VJPs, batches and full Jacobians against explicit float64 Jacobians."""

import inspect

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from torch_secorder import LegacyTypeError, LegacyValueError
from torch_secorder.core.gvp import batch_jvp, batch_vjp, full_jacobian, jvp, model_jvp, model_vjp, vjp
from tests.test_legacy_support import CountingClosure, tanh_mlp

F64 = torch.float64


def _model_and_jacobian(seed=0, sizes=(3, 4, 2), n=5):
    """A tanh MLP, its input, and the explicit Jacobian of the flattened output, one (m, n_p) block per parameter."""
    torch.manual_seed(seed)
    model = tanh_mlp(sizes, F64)
    x = torch.randn(n, sizes[0], dtype=F64)
    names = [k for k, _ in model.named_parameters()]
    values = {k: p.detach() for k, p in model.named_parameters()}
    jac = jacrev(lambda v: functional_call(model, v, (x,)).reshape(-1))(values)
    m = n * sizes[-1]
    return model, x, [jac[k].reshape(m, -1) for k in names]


def _cat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


# --------------------------------------------------------------------------- 0.0.1's documented examples


def test_documented_examples_verbatim():
    # docs/api/core/gvp.rst and tests/unit/test_gvp.py of torch-secorder 0.0.1.
    def func():
        return torch.stack([x[0] ** 2, 3 * x[1] ** 2])

    x = torch.tensor([1.0, 2.0], requires_grad=True)
    v = torch.tensor([0.5, -1.0])
    torch.testing.assert_close(jvp(func, [x], v), torch.tensor([2 * 1.0 * 0.5, 6 * 2.0 * -1.0]))
    torch.testing.assert_close(vjp(func, [x], v), torch.tensor([2 * 1.0 * 0.5, 6 * 2.0 * -1.0]))
    vs = torch.stack([torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    expected = torch.tensor([[2.0, 0.0], [0.0, 12.0]])
    torch.testing.assert_close(batch_jvp(func, [x], vs), expected)
    result = batch_vjp(func, [x], vs)
    assert isinstance(result, list) and len(result) == 1
    torch.testing.assert_close(result[0], expected)
    jac = full_jacobian(func, [x])
    assert isinstance(jac, list)
    torch.testing.assert_close(jac[0], expected)

    # scalar outputs
    def scalar():
        return x[0] ** 2 + 3 * x[1] ** 2

    torch.testing.assert_close(jvp(scalar, [x], v), torch.tensor(2 * 0.5 - 12.0))
    torch.testing.assert_close(vjp(scalar, [x], torch.tensor(2.0)), torch.tensor([4.0, 24.0]))

    model = nn.Linear(10, 1)
    xin = torch.randn(1, 10)
    assert model_jvp(model, xin, [torch.randn_like(p) for p in model.parameters()]).shape == model(xin).shape
    out = model_vjp(model, xin, torch.randn(1, 1))
    assert isinstance(out, list) and [o.shape for o in out] == [p.shape for p in model.parameters()]


# --------------------------------------------------------------------------- float64 references


def test_jvp_vjp_model_variants_match_explicit_jacobian():
    model, x, J = _model_and_jacobian()
    params = list(model.parameters())
    v = [torch.randn_like(p) for p in params]
    out_shape = model(x).shape
    ref_jv = sum(j @ u.reshape(-1) for j, u in zip(J, v)).reshape(out_shape)
    f = CountingClosure(lambda: model(x))
    torch.testing.assert_close(jvp(f, params, v), ref_jv, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(model_jvp(model, x, v), ref_jv, rtol=1e-12, atol=1e-13)
    w = torch.randn(out_shape, dtype=F64)
    ref_vj = [(w.reshape(-1) @ j).reshape(p.shape) for j, p in zip(J, params)]
    for got in (vjp(f, params, w), vjp(f, params, w.reshape(-1)), model_vjp(model, x, w)):
        assert isinstance(got, list) and len(got) == len(params)
        for a, r in zip(got, ref_vj):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-13)
    assert f.calls == 3


def test_batches_and_full_jacobian_match_explicit_jacobian_and_call_func_once():
    model, x, J = _model_and_jacobian(seed=1)
    params = list(model.parameters())
    B = 3
    vs = [torch.randn((B,) + p.shape, dtype=F64) for p in params]
    out_shape = model(x).shape
    ref = torch.stack([sum(j @ u[b].reshape(-1) for j, u in zip(J, vs)).reshape(out_shape) for b in range(B)])
    f = CountingClosure(lambda: model(x))
    got = batch_jvp(f, params, vs)
    assert f.calls == 1 and got.shape == (B,) + out_shape
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-13)
    ws = torch.randn((B,) + out_shape, dtype=F64)
    got = batch_vjp(f, params, ws)
    assert f.calls == 2
    for g, j, p in zip(got, J, params):
        assert g.shape == (B,) + p.shape
        torch.testing.assert_close(g.reshape(B, -1), ws.reshape(B, -1) @ j, rtol=1e-12, atol=1e-13)
    for chunk in (None, 1, 4, 100):
        jac = full_jacobian(f, params, chunk_size=chunk)
        for a, r in zip(jac, J):
            assert a.shape == r.shape
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-13)
    assert f.calls == 6


def test_batch_size_one_and_zero():
    model, x, J = _model_and_jacobian(seed=2)
    params = list(model.parameters())
    vs = [torch.randn((1,) + p.shape, dtype=F64) for p in params]
    ref = sum(j @ u[0].reshape(-1) for j, u in zip(J, vs))
    torch.testing.assert_close(batch_jvp(lambda: model(x), params, vs)[0].reshape(-1), ref, rtol=1e-12, atol=1e-13)
    empty = batch_jvp(lambda: model(x), params, [torch.zeros((0,) + p.shape, dtype=F64) for p in params])
    assert empty.shape == (0,) + model(x).shape
    empty = batch_vjp(lambda: model(x), params, torch.zeros((0,) + model(x).shape, dtype=F64))
    assert [e.shape for e in empty] == [(0,) + p.shape for p in params]


@pytest.mark.parametrize("fn", ["jvp", "vjp", "batch_jvp", "batch_vjp", "full_jacobian"])
def test_create_graph_gives_the_derivative_of_the_product(fn):
    # f(x) = x^3 elementwise (J = diag(3 x^2)); with create_graph the products' derivatives are second derivatives.
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    f = lambda: x ** 3
    u = torch.tensor([0.3, 1.1, -0.7], dtype=F64)
    value = {
        "jvp": lambda cg: jvp(f, [x], u, create_graph=cg),
        "vjp": lambda cg: vjp(f, [x], u, create_graph=cg),
        "batch_jvp": lambda cg: batch_jvp(f, [x], u[None], create_graph=cg)[0],
        "batch_vjp": lambda cg: batch_vjp(f, [x], u[None], create_graph=cg)[0][0],
        "full_jacobian": lambda cg: full_jacobian(f, [x], create_graph=cg)[0] @ u,
    }[fn]
    plain = value(False)
    assert not plain.requires_grad
    out = value(True)
    torch.testing.assert_close(out, 3 * x.detach() ** 2 * u)
    (g,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(g, 6 * x.detach() * u)


def test_unused_parameter_gets_zeros_and_create_graph_still_differentiable():
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    unused = torch.ones(3, dtype=F64, requires_grad=True)
    f = lambda: x ** 2
    assert torch.equal(jvp(f, [x, unused], [torch.zeros(2, dtype=F64), torch.ones(3, dtype=F64)]), torch.zeros(2, dtype=F64))
    gx, gu = vjp(f, [x, unused], torch.ones(2, dtype=F64))
    assert torch.equal(gu, torch.zeros(3, dtype=F64))
    jx, ju = full_jacobian(f, [x, unused])
    assert ju.shape == (2, 3) and torch.equal(ju, torch.zeros(2, 3, dtype=F64))
    jx, ju = full_jacobian(f, [x, unused], create_graph=True)
    assert torch.autograd.grad(ju.sum(), unused)[0].abs().sum() == 0


def test_dtype_follows_output_and_params(device):
    x = torch.tensor([1.0, 2.0], dtype=F64, device=device, requires_grad=True)
    f = lambda: torch.stack([x[0] ** 2, 3 * x[1] ** 2])
    for out in (jvp(f, [x], torch.ones(2, dtype=F64, device=device)), vjp(f, [x], torch.ones(2, dtype=F64, device=device)),
                full_jacobian(f, [x])[0]):
        assert out.dtype == F64 and out.device == x.device


# --------------------------------------------------------------------------- errors


def test_param_without_grad_raises_pytorchs_error():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    c = torch.ones(2)
    for call in (lambda: jvp(lambda: x * c, [x, c], [torch.ones(2), torch.ones(2)]),
                 lambda: vjp(lambda: x * c, [x, c], torch.ones(2)),
                 lambda: full_jacobian(lambda: x * c, [x, c])):
        with pytest.raises(RuntimeError, match="One of the differentiated Tensors does not require grad"):
            call()


def test_bad_vectors_raise_named_errors():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    y = torch.tensor([3.0], requires_grad=True)
    f = lambda: x * y
    with pytest.raises(LegacyValueError, match="one tensor per parameter"):
        jvp(f, [x, y], torch.ones(2))        # 0.0.1 silently used the first parameter only
    with pytest.raises(LegacyValueError, match=r"v\[1\] has shape \(2,\), expected \(1,\)"):
        jvp(f, [x, y], [torch.ones(2), torch.ones(2)])
    with pytest.raises(LegacyValueError, match="v has shape .*3 entries.*func\\(\\) returned shape \\(2,\\)"):
        vjp(f, [x, y], torch.ones(3))
    with pytest.raises(LegacyTypeError, match="v must be a tensor"):
        vjp(f, [x, y], [1.0, 2.0])
    with pytest.raises(LegacyValueError, match=r"vs\[1\] has shape"):
        batch_jvp(f, [x, y], [torch.ones(4, 2), torch.ones(3, 1)])
    with pytest.raises(LegacyValueError, match="vs has shape"):
        batch_vjp(f, [x, y], torch.ones(4, 3))
    with pytest.raises(LegacyValueError, match="chunk_size"):
        full_jacobian(f, [x, y], chunk_size=0)
    with pytest.raises(LegacyTypeError, match="func must return a tensor, got tuple"):
        jvp(lambda: (x, y), [x, y], [torch.ones(2), torch.ones(1)])
    with pytest.raises(LegacyTypeError, match="model must be a torch.nn.Module"):
        model_jvp(lambda t: t, torch.ones(1), [torch.ones(1)])


def test_output_without_graph_raises():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match="grad mode is off"):
        jvp(lambda: x ** 2, [x], torch.ones(2))
    with pytest.raises(RuntimeError, match="does not depend on any of the parameters"):
        full_jacobian(lambda: (x ** 2).detach(), [x])


def test_model_functions_grad_mode_and_state():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().train()
    x = torch.randn(5, 3, dtype=F64)
    v = [torch.randn_like(p) for p in model.parameters()]
    w = torch.randn(5, 2, dtype=F64)
    state = {k: t.clone() for k, t in model.state_dict().items()}
    ref_j, ref_v = model_jvp(model, x, v), model_vjp(model, x, w)
    with torch.no_grad():
        torch.testing.assert_close(model_jvp(model, x, v), ref_j, rtol=0, atol=0)
        for a, b in zip(model_vjp(model, x, w), ref_v):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items()) and model.training


def test_signatures_and_defaults():
    P = inspect.Parameter
    expected = {
        jvp: [("func", P.empty), ("params", P.empty), ("v", P.empty), ("create_graph", False)],
        vjp: [("func", P.empty), ("params", P.empty), ("v", P.empty), ("create_graph", False)],
        model_jvp: [("model", P.empty), ("x", P.empty), ("v", P.empty), ("create_graph", False)],
        model_vjp: [("model", P.empty), ("x", P.empty), ("v", P.empty), ("create_graph", False)],
        batch_jvp: [("func", P.empty), ("params", P.empty), ("vs", P.empty), ("create_graph", False)],
        batch_vjp: [("func", P.empty), ("params", P.empty), ("vs", P.empty), ("create_graph", False)],
        full_jacobian: [("func", P.empty), ("params", P.empty), ("create_graph", False), ("chunk_size", None)],
    }
    for fn, params in expected.items():
        sig = inspect.signature(fn)
        assert [(p.name, p.default) for p in sig.parameters.values()] == params, fn.__name__
    assert inspect.signature(full_jacobian).parameters["chunk_size"].kind is P.KEYWORD_ONLY

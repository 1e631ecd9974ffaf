"""so.laplacian: the forward Laplacian against float64 torch.func.hessian traces and closed forms,
its composition with vmap/grad/compile, the exact fallback, and bad input."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, hessian, vmap

import secorder as so
from secorder.forward_laplacian import UncoveredOperation, registry

D = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def reference(f, args, argnums=0):
    """trace of torch.func.hessian of f w.r.t. args[argnums] (a tensor), float64."""

    def g(x):
        new = list(args)
        new[argnums] = x
        return f(*new)

    x = args[argnums]
    return torch.trace(hessian(g)(x).reshape(x.numel(), x.numel()))


def forward(f, *args, **kw):
    return so.laplacian(f, method="forward", **kw)(*args)


# --- every covered activation, in random MLPs ---------------------------------------------------------

ACTIVATIONS = {
    "tanh": nn.Tanh(), "sigmoid": nn.Sigmoid(), "softplus": nn.Softplus(), "softplus_beta": nn.Softplus(2.0, 1.0),
    "silu": nn.SiLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU("tanh"), "elu": nn.ELU(0.5), "celu": nn.CELU(0.5),
    "selu": nn.SELU(), "mish": nn.Mish(), "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.1), "relu6": nn.ReLU6(),
    "hardtanh": nn.Hardtanh(-0.5, 0.5), "softsign": nn.Softsign(), "tanhshrink": nn.Tanhshrink(),
    "logsigmoid": nn.LogSigmoid(), "sin": torch.sin, "cos": torch.cos, "exp": lambda h: torch.exp(0.3 * h),
    "log": lambda h: torch.log(1 + h * h), "atan": torch.atan, "erf": torch.erf, "sqrt": lambda h: (h * h + 1).sqrt(),
    "square": torch.square, "abs_cubed": lambda h: h.abs() ** 3, "clamp": lambda h: h.clamp(-0.3, 0.4),
}


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h)


def mlp(act, sizes=(3, 6, 5, 1)):
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act if isinstance(act, nn.Module) else _Lambda(act))
    return nn.Sequential(*layers).to(D)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_mlp_of_every_activation_matches_hessian_trace(name):
    model = mlp(ACTIVATIONS[name])
    u = lambda x: model(x).squeeze(-1)  # noqa: E731
    x = torch.randn(3, dtype=D)
    torch.testing.assert_close(forward(u, x), reference(u, (x,)), **TOL)
    xs = torch.randn(4, 3, dtype=D)  # a batch inside f (sum of per-point outputs)
    torch.testing.assert_close(forward(lambda z: model(z).sum(), xs), reference(lambda z: model(z).sum(), (xs,)),
                               **TOL)


def test_normalization_and_dropout_layers_in_eval_mode():
    model = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 5),
                          nn.BatchNorm1d(5), nn.SiLU(), nn.Linear(5, 1)).to(D)
    with torch.no_grad():
        model[5].running_mean.uniform_(-1, 1)
        model[5].running_var.uniform_(0.5, 2)
        model[1].weight.uniform_(0.5, 2)
    model.eval()
    xs = torch.randn(4, 3, dtype=D)
    f = lambda z: model(z).sum()  # noqa: E731
    fn = so.laplacian(f)
    torch.testing.assert_close(fn(xs), reference(f, (xs,)), **TOL)
    assert fn.last_method == "forward"
    model.train()  # active dropout (a random mask): the exact path runs
    model[5].eval()  # (a BatchNorm in training mode updates its statistics: no transform may run it)
    fn(xs)
    assert fn.last_method == "exact" and "dropout" in fn.last_fallback_reason


# --- products, quotients, powers, norms, concatenation, indexing ------------------------------------

A = torch.randn(4, 4, dtype=D, generator=torch.Generator().manual_seed(1))
B = torch.randn(3, 4, dtype=D, generator=torch.Generator().manual_seed(2))
C = torch.randn(4, dtype=D, generator=torch.Generator().manual_seed(3))

FUNCTIONS = {
    "product": lambda x: x[0] * x[1] * x[2] + (x * x.flip(0)).sum(),
    "quotient": lambda x: (x[0] / (1 + x[1] ** 2)) + (x / x.sum()).sum() + (2 / (x + 3)).sum() + (x.sum() / x).sum(),
    "powers": lambda x: (x ** 3).sum() + (x.abs() ** 2.5).sum() + (2 ** x).sum() + torch.pow(x.abs() + 1, x).sum()
    + torch.pow(x.abs() + 1, torch.arange(4, dtype=D)).sum() + x.pow(2).sum(),
    "quadratic_form": lambda x: x @ A @ x + torch.einsum("i,ij,j->", x, A, x),
    "matmuls": lambda x: (B @ x).tanh().sum() + (x @ B.T).sin().sum() + (x.reshape(2, 2) @ x.reshape(2, 2)).sum()
    + torch.outer(x, C).sin().sum() + torch.dot(x, x) * torch.dot(C, x) + torch.mv(A, x).exp().sum(),
    "linear_traced_weight": lambda x: F.linear(B, x.reshape(1, 4)).sin().sum() + F.linear(x, B, C[:3]).tanh().sum(),
    "norms": lambda x: x.norm() + torch.linalg.vector_norm(x, 3) + torch.linalg.norm(x) ** 3 + torch.norm(x, dim=0)
    + torch.linalg.vector_norm(x, float("inf")) + x.norm(p=1),
    "softmax_family": lambda x: torch.logsumexp(x, 0) + F.softmax(x, -1)[0] + F.log_softmax(x, 0)[1]
    + torch.softmax(x.reshape(2, 2), 1).sin().sum(),
    "concatenation": lambda x: torch.cat([x, C, x ** 2]).sin().sum() + torch.stack([x, C], 1).cos().sum(),
    "indexing": lambda x: (x[1:3] * x[0]).sum() + x[[0, 2]].pow(3).sum() + x[x > 0].exp().sum() + x[..., None][2, 0] ** 3
    + x.gather(0, torch.tensor([3, 1, 1])).pow(2).sum() + x.index_select(0, torch.tensor([0, 2])).cos().sum(),
    "shapes": lambda x: (x.reshape(2, 2).T.tanh().sum(1) ** 2).sum() + x.view(2, 2, 1).permute(2, 0, 1).sin().sum()
    + x.unsqueeze(0).mT.exp().mean() + x.expand(3, 4).sin().sum() + torch.flatten(x.reshape(2, 2).t()).pow(3).sum(),
    "pieces": lambda x: sum((p ** 3).sum() for p in x.split(2)) + sum(p.sin() for p in x.unbind()) + x.chunk(2)[1].exp().sum(),
    "selections": lambda x: x.max() ** 2 + x.amax() + x.max(dim=0).values ** 3 + torch.maximum(x, C).pow(2).sum()
    + torch.where(x > 0, x ** 2, x.sin()).sum() + x.clamp(-0.5, 0.5).pow(2).sum(),
    "misc": lambda x: x.cumsum(0).sin().sum() + F.pad(x, (1, 2)).exp().sum() + x.roll(1, 0).mul(x).sum()
    + torch.diag(x).exp().sum() + (1 - x).exp().sum() + torch.sub(x, C, alpha=2).pow(2).sum() - x.neg().sin().sum(),
    "fused": lambda x: torch.addcmul(x, x, C, value=0.5).sin().sum() + torch.addcdiv(C, x, x + 3).pow(2).sum()
    + torch.addcmul(C, x, x).exp().sum(),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_functions_of_inputs_match_hessian_trace(name):
    f = FUNCTIONS[name]
    for seed in range(2):
        x = torch.randn(4, dtype=D, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(forward(f, x), reference(f, (x,)), **TOL)


def test_pytree_inputs_and_tuple_argnums():
    def f(p, y, w):
        return (torch.tanh(p["a"] @ w) * p["b"][0]).sum() + (p["b"] ** 3).sum() * y.sin().sum()

    p = {"a": torch.randn(2, 3, dtype=D), "b": torch.randn(4, dtype=D)}
    y, w = torch.randn(3, dtype=D), torch.randn(3, 5, dtype=D)
    flat = torch.cat([p["a"].reshape(-1), p["b"]])

    def g(v):
        return f({"a": v[:6].reshape(2, 3), "b": v[6:]}, y, w)

    torch.testing.assert_close(forward(f, p, y, w), reference(g, (flat,)), **TOL)

    def h(v):  # p and y jointly
        return f({"a": v[:6].reshape(2, 3), "b": v[6:10]}, v[10:], w)

    both = torch.cat([flat, y])
    got = so.laplacian(f, argnums=(0, 1), method="forward")(p, y, w)
    torch.testing.assert_close(got, reference(h, (both,)), **TOL)
    torch.testing.assert_close(so.laplacian(f, argnums=(0, 1), method="exact")(p, y, w), got, **TOL)


# --- closed forms ------------------------------------------------------------------------------------


def test_closed_forms():
    x = torch.randn(7, dtype=D)
    d, r = x.numel(), x.norm()
    torch.testing.assert_close(forward(lambda z: torch.sin(z).sum(), x), -torch.sin(x).sum(), **TOL)
    torch.testing.assert_close(forward(lambda z: (z ** 2).sum(), x), torch.tensor(2.0 * d, dtype=D), **TOL)
    torch.testing.assert_close(forward(lambda z: z.norm() ** 3, x), 3 * (d + 1) * r, **TOL)  # f(r) = r^3
    torch.testing.assert_close(forward(lambda z: torch.exp(-(z * z).sum()), x),
                               (4 * r ** 2 - 2 * d) * torch.exp(-r ** 2), **TOL)
    # the fundamental solution of the Laplace equation in 3-D is harmonic away from 0
    torch.testing.assert_close(forward(lambda z: 1 / z.norm(), x[:3]), torch.tensor(0.0, dtype=D), rtol=0, atol=1e-12)


def test_constant_function_and_empty_input():
    x = torch.randn(3, dtype=D)
    assert forward(lambda z: torch.tensor(2.0, dtype=D), x) == 0
    assert forward(lambda z, c: (c ** 2).sum() + z.sum(), torch.zeros(0, dtype=D), x) == 0


# --- composition -------------------------------------------------------------------------------------


def _pinn(sizes=(2, 16, 16, 1)):
    model = mlp(nn.Tanh(), sizes)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def u(p, x):
        return functional_call(model, p, (x,)).squeeze(-1)

    return u, params


def test_vmap_over_points_equals_a_loop():
    u, params = _pinn()
    points = torch.randn(9, 2, dtype=D)
    lap = so.laplacian(u, argnums=1)
    batched = vmap(lap, in_dims=(None, 0))(params, points)
    loop = torch.stack([lap(params, p) for p in points])
    torch.testing.assert_close(batched, loop, **TOL)
    torch.testing.assert_close(batched, torch.stack([reference(u, (params, p), 1) for p in points]), **TOL)
    assert lap.last_method == "forward"


def test_grad_of_laplacian_loss_matches_float64_reference():
    u, params = _pinn()
    points = torch.randn(6, 2, dtype=D)
    source = torch.sin(points).sum(-1)

    def loss(lap_fn):
        return lambda p: ((vmap(lap_fn, in_dims=(None, 0))(p, points) + source) ** 2).mean()

    ours = grad(loss(so.laplacian(u, argnums=1)))(params)
    ref = grad(loss(lambda p, x: torch.trace(hessian(u, argnums=1)(p, x))))(params)
    for k in ref:
        torch.testing.assert_close(ours[k], ref[k], **TOL)
    # plain autograd too
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss(so.laplacian(u, argnums=1))(leaves).backward()
    for k in ref:
        got = leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(ref[k])
        torch.testing.assert_close(got, ref[k], **TOL)


def test_second_derivatives_in_the_parameters_of_a_laplacian_loss():
    """jvp-of-grad and hessian w.r.t. the weights go through the rules' derivatives (sum of squares included)."""
    w = torch.randn(3, 4, dtype=D)
    xs = torch.randn(2, 4, dtype=D)
    u = lambda z, w: torch.tanh(w @ z).pow(2).sum() + torch.sin(w @ z).sum()  # noqa: E731

    def loss(w, lap_fn):
        return (vmap(lap_fn, in_dims=(0, None))(xs, w) ** 2).sum()

    ours = so.laplacian(u)
    ref = lambda z, w: torch.trace(hessian(u)(z, w))  # noqa: E731
    v = torch.randn_like(w)
    torch.testing.assert_close(torch.func.jvp(grad(lambda w: loss(w, ours)), (w,), (v,))[1],
                               torch.func.jvp(grad(lambda w: loss(w, ref)), (w,), (v,))[1], **TOL)
    torch.testing.assert_close(hessian(lambda w: loss(w, ours))(w), hessian(lambda w: loss(w, ref))(w), **TOL)


def test_float32_and_chunks():
    u, params = _pinn((5, 8, 1))
    p32 = {k: v.float() for k, v in params.items()}
    x = torch.randn(5)
    out = so.laplacian(u, argnums=1)(p32, x)
    assert out.dtype == torch.float32 and out.shape == ()
    torch.testing.assert_close(out.double(), reference(u, (params, x.double()), 1), rtol=1e-4, atol=1e-5)
    for chunk in (1, 2, 5, 7):
        torch.testing.assert_close(so.laplacian(u, argnums=1, chunk_size=chunk)(params, x.double()),
                                   reference(u, (params, x.double()), 1), **TOL)


def test_default_passes_split_after_the_first_call(monkeypatch):
    from secorder.forward_laplacian import forward as forward_module

    u, params = _pinn((6, 8, 1))
    points = torch.randn(5, 6, dtype=D)
    lap = vmap(so.laplacian(u, argnums=1), in_dims=(None, 0))
    first = lap(params, points)
    calls = []
    original = forward_module._seeds
    monkeypatch.setattr(forward_module, "_seeds", lambda *a: calls.append(a[2] - a[1]) or original(*a))
    monkeypatch.setattr(forward_module, "CPU_JACOBIAN_BYTES", 1)  # every direction its own pass
    torch.testing.assert_close(lap(params, points), first, **TOL)
    assert calls == [1] * 6
    torch.testing.assert_close(first, torch.stack([reference(u, (params, p), 1) for p in points]), **TOL)


def test_has_aux_returns_plain_aux():
    def f(x):
        h = torch.tanh(x)
        return (h ** 2).sum(), {"h": h, "n": 3}

    x = torch.randn(4, dtype=D)
    lap, aux = so.laplacian(f, has_aux=True)(x)
    assert type(aux["h"]) is torch.Tensor and aux["n"] == 3
    torch.testing.assert_close(aux["h"], torch.tanh(x))
    torch.testing.assert_close(lap, reference(lambda z: f(z)[0], (x,)), **TOL)
    lap_exact, _ = so.laplacian(f, has_aux=True, method="exact")(x)
    torch.testing.assert_close(lap_exact, lap, **TOL)


def test_nested_laplacian_is_the_bilaplacian():
    u = lambda x: torch.sin(x[0]) * x[1] ** 4 + torch.exp(x[0] * x[1])  # noqa: E731
    x = torch.randn(2, dtype=D)
    got = so.laplacian(so.laplacian(u, method="forward"), method="forward")(x)
    ref = reference(lambda z: reference(u, (z,)), (x,))
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.slow
def test_torch_compile_agrees():
    u, params = _pinn((3, 8, 1))
    points = torch.randn(4, 3, dtype=D)
    fn = vmap(so.laplacian(u, argnums=1), in_dims=(None, 0))
    torch.testing.assert_close(torch.compile(fn)(params, points), fn(params, points), **TOL)


def test_grad_mode_off_and_inference_mode():
    """The forward Laplacian needs no autograd: under no_grad/inference_mode it (and the fallback) still runs."""
    u = lambda z: torch.tanh(z).pow(3).sum() + (z[0] * z[1]).exp()  # noqa: E731
    x = torch.randn(3, dtype=D)
    ref = reference(u, (x,))
    fallback = so.laplacian(_uncovered)
    fallback_ref = reference(_uncovered, (x,))
    with torch.no_grad():
        fn = so.laplacian(u)
        torch.testing.assert_close(fn(x), ref, **TOL)
        assert fn.last_method == "forward"
        torch.testing.assert_close(fallback(x), fallback_ref, **TOL)
        assert fallback.last_method == "exact"
    with torch.inference_mode():
        torch.testing.assert_close(so.laplacian(u)(x.clone()), ref, **TOL)


def test_float32_batch_of_points_under_vmap():
    u, params = _pinn((4, 16, 16, 1))
    points = torch.randn(64, 4, dtype=D)
    ref = torch.stack([reference(u, (params, p), 1) for p in points])
    p32 = {k: v.float() for k, v in params.items()}
    lap = vmap(so.laplacian(u, argnums=1), in_dims=(None, 0))
    for _ in range(2):  # the second call splits the directions (CPU default), with the same result
        out = lap(p32, points.float())
        assert out.dtype == torch.float32 and out.shape == (64,)
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


def test_autograd_through_the_input_and_module_parameters():
    """backward() of the Laplacian reaches the input (third derivatives) and an nn.Module's own parameters."""
    torch.manual_seed(0)
    model = mlp(nn.Tanh(), (3, 6, 1))
    f = lambda z: model(z).squeeze(-1)  # noqa: E731
    x = torch.randn(3, dtype=D)
    grads = {}
    for method in ("forward", "exact"):
        model.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        so.laplacian(f, method=method)(xr).backward()
        grads[method] = [xr.grad] + [p.grad for p in model.parameters()]
    torch.testing.assert_close(grads["forward"][0], grad(lambda z: reference(f, (z,)))(x), **TOL)
    for ours, exact in zip(grads["forward"], grads["exact"]):
        if exact is None:  # the output bias does not change the Laplacian
            assert ours is None or torch.all(ours == 0)
        else:
            torch.testing.assert_close(ours, exact, **TOL)


# --- methods and the fallback ------------------------------------------------------------------------


def test_exact_and_stochastic_methods():
    u, params = _pinn((3, 6, 1))
    x = torch.randn(3, dtype=D)
    ref = reference(u, (params, x), 1)
    torch.testing.assert_close(so.laplacian(u, argnums=1, method="exact")(params, x), ref, **TOL)
    g = lambda z: torch.sin(z).sum()  # noqa: E731  (diagonal Hessian: Rademacher probes are exact)
    est = so.laplacian(g, method="hutchinson", num_samples=4, seed=0)(x)
    torch.testing.assert_close(est, -torch.sin(x).sum(), **TOL)
    again = so.laplacian(g, method="hutchinson", num_samples=4, seed=0)(x)
    assert torch.equal(est, again)


def test_stochastic_options_reach_so_trace():
    g = lambda z: (torch.tanh(z) ** 2).sum() + z[0] * z[1] * z[2]  # noqa: E731  (off-diagonal Hessian terms)
    x = torch.randn(6, dtype=D)
    for method, distribution in (("hutchinson", "normal"), ("hutch++", "rademacher")):
        opts = dict(method=method, num_samples=6, seed=3, distribution=distribution)
        assert torch.equal(so.laplacian(g, **opts)(x), so.trace(g, **opts)(x))
    with pytest.raises(ValueError, match="distribution"):
        so.laplacian(g, distribution="rademacher")  # a stochastic option with the forward Laplacian


def _uncovered(x):
    return torch.lgamma(x.exp()).sum() + x.sin().sum()


def test_fallback_is_taken_exact_and_logged(caplog):
    assert registry.lookup(torch.lgamma) is None, "pick another uncovered operation for this test"
    x = torch.randn(4, dtype=D)
    fn = so.laplacian(_uncovered)
    with caplog.at_level(logging.DEBUG, logger="secorder.laplacian"):
        got = fn(x)
    torch.testing.assert_close(got, reference(_uncovered, (x,)), **TOL)
    assert fn.last_method == "exact" and "torch.lgamma" in fn.last_fallback_reason
    assert any("torch.lgamma" in r.getMessage() for r in caplog.records)
    batched = vmap(fn)(torch.randn(3, 4, dtype=D))  # the fallback composes too
    assert batched.shape == (3,)
    with pytest.raises(UncoveredOperation, match="torch.lgamma"):
        so.laplacian(_uncovered, method="forward")(x)


def test_fallback_when_f_swallows_the_error_or_escapes_interception():
    def swallowing(x):
        try:
            return torch.lgamma(x).sum()
        except NotImplementedError:
            return x.sum()  # would be a wrong Laplacian (0)

    x = torch.rand(3, dtype=D) + 1
    fn = so.laplacian(swallowing)
    torch.testing.assert_close(fn(x), torch.special.polygamma(1, x).sum(), **TOL)
    assert fn.last_method == "exact"

    def inner_vmap(x):  # a torch.func transform inside f: the jet would reach the dispatcher
        return vmap(lambda r: torch.sin(r) * r)(x).sum()

    fn = so.laplacian(inner_vmap)
    torch.testing.assert_close(fn(x), reference(inner_vmap, (x,)), **TOL)
    assert fn.last_method == "exact"

    def autograd_inside(x):  # x reports requires_grad, as under torch.func; autograd.grad leaves the pass
        g = torch.autograd.grad((x ** 3).sum(), x, create_graph=True)[0] if x.requires_grad else x
        return (g ** 2).sum()

    fn = so.laplacian(autograd_inside)
    torch.testing.assert_close(fn(x), reference(autograd_inside, (x,)), **TOL)
    assert fn.last_method == "exact"

    def inplace(x):
        h = x * 2
        h.add_(1)
        return (h * h).sum()

    fn = so.laplacian(inplace)
    torch.testing.assert_close(fn(x), torch.tensor(8.0 * 3, dtype=D), **TOL)
    assert fn.last_method == "exact"
    with pytest.raises(UncoveredOperation, match="add_"):
        so.laplacian(inplace, method="forward")(x)


# --- bad input ---------------------------------------------------------------------------------------


def test_bad_input():
    x = torch.randn(3, dtype=D)
    for method in ("auto", "forward", "exact"):
        with pytest.raises(ValueError, match=r"shape \(3,\)"):
            so.laplacian(lambda z: z ** 2, method=method)(x)
        with pytest.raises(TypeError, match="torch.int64"):
            so.laplacian(lambda z: z.sum(), method=method)(torch.arange(3))
        with pytest.raises(ValueError, match="out of range"):
            so.laplacian(lambda z: z.sum(), argnums=2, method=method)(x)
    with pytest.raises(ValueError, match="unknown method 'newton'"):
        so.laplacian(lambda z: z.sum(), method="newton")
    with pytest.raises(ValueError, match="num_samples"):
        so.laplacian(lambda z: z.sum(), num_samples=10)
    with pytest.raises(TypeError, match="argnums"):
        so.laplacian(lambda z: z.sum(), argnums=1.0)
    with pytest.raises(ValueError, match="chunk_size"):
        so.laplacian(lambda z: z.sum(), chunk_size=0)
    with pytest.raises(TypeError, match="has_aux=True requires"):
        so.laplacian(lambda z: z.sum(), has_aux=True)(x)


# --- fast paths against the generic ones -------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _matmul_shapes(draw):
    n, m, p = (draw(st.integers(1, 3)) for _ in range(3))
    a_nd, b_nd = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    batch_a, batch_b = draw(st.sampled_from([(1, 2), (2, 1), (2, 2), (1, 1)]))
    a = {1: (m,), 2: (n, m), 3: (batch_a, n, m)}[a_nd]
    b = {1: (m,), 2: (m, p), 3: (batch_b, m, p)}[b_nd]
    return a, b


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_matmul_of_every_shape_and_traced_operand(data):
    a_shape, b_shape = _matmul_shapes(data.draw)
    traced = data.draw(st.sampled_from(["a", "b", "both"]))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 100)))
    a0, b0 = torch.randn(a_shape, dtype=D, generator=g), torch.randn(b_shape, dtype=D, generator=g)
    na = a0.numel()

    def f(x):
        a = x[:na].reshape(a_shape) if traced in ("a", "both") else a0
        b = x[-b0.numel():].reshape(b_shape) if traced in ("b", "both") else b0
        return torch.sin(a @ b).sum() + torch.matmul(a, b).pow(2).sum()

    x = torch.cat([a0.reshape(-1) if traced in ("a", "both") else a0.new_zeros(0),
                   b0.reshape(-1) if traced in ("b", "both") else b0.new_zeros(0)])
    torch.testing.assert_close(forward(f, x), reference(f, (x,)), **TOL)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 6), st.integers(1, 3), st.sampled_from(sorted(ACTIVATIONS)), st.integers(0, 50))
def test_random_mlps_blocked_squares_and_chunks(width, depth, act, seed):
    from secorder.forward_laplacian.rules import common

    torch.manual_seed(seed)
    model = mlp(ACTIVATIONS[act], (4,) + (width,) * depth + (1,))
    f = lambda z: model(z).sum()  # noqa: E731
    xs = torch.randn(3, 4, dtype=D)
    ref = reference(f, (xs,))
    old = common._BLOCK_ENTRIES
    common._BLOCK_ENTRIES = 1  # every direction its own block: the blocked sum of squares runs
    try:
        torch.testing.assert_close(forward(f, xs), ref, **TOL)
    finally:
        common._BLOCK_ENTRIES = old
    torch.testing.assert_close(forward(f, xs, chunk_size=5), ref, **TOL)
    torch.testing.assert_close(so.laplacian(f, method="exact")(xs), ref, **TOL)


def test_basic_and_advanced_indexing_agree():
    x = torch.randn(3, 4, dtype=D)
    basic = lambda z: (z[1:, ::2] ** 3).sum() + z[..., 1].sin().sum() + z[None, 2, :].exp().sum()  # noqa: E731
    advanced = lambda z: (z[torch.tensor([1, 2])][:, torch.tensor([0, 2])] ** 3).sum() \
        + z[:, torch.tensor([1])].sin().sum() + z[torch.tensor([2])].exp().sum()  # noqa: E731
    torch.testing.assert_close(forward(basic, x), reference(basic, (x,)), **TOL)
    torch.testing.assert_close(forward(advanced, x), reference(basic, (x,)), **TOL)

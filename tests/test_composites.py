"""secorder.composites: differentiable stand-ins for operations whose higher-order rules PyTorch lacks or gets wrong.

Every registered composite has a setting below (a test fails otherwise). For each:
the composite equals PyTorch's operation (value and gradient), and its third
derivative (the derivative of a Hessian-vector product along a direction) equals
central differences of its Hessian-vector products, which PyTorch's own rules
fail for layer norm and training-mode batch/instance norm.
"""

import threading

import pytest
import torch
import torch.nn.functional as F

import secorder as so
from secorder import composites
from secorder.composites.registry import COMPOSITES, _name

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _sdpa_setting(g):
    q = torch.randn(2, 3, 4, 5, dtype=DT, generator=g)
    k = torch.randn(2, 3, 6, 5, dtype=DT, generator=g)
    v = torch.randn(2, 3, 6, 5, dtype=DT, generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    mask[1] = False  # a fully masked row
    variants = [
        lambda q: F.scaled_dot_product_attention(q, k, v),
        lambda q: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        lambda q: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.randn(4, 6, dtype=DT, generator=_gen(1))),
        lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True, scale=0.3),
        lambda q: F.scaled_dot_product_attention(q, k[:, :1], v[:, :1], enable_gqa=True),
    ]
    return q, variants


def _layer_norm_setting(g):
    x = torch.randn(3, 4, 5, dtype=DT, generator=g)
    w, b = torch.randn(4, 5, dtype=DT, generator=g), torch.randn(4, 5, dtype=DT, generator=g)
    return x, [lambda x: F.layer_norm(x, (5,)), lambda x: F.layer_norm(x, (4, 5), w, b, eps=1e-3),
               lambda x: torch.layer_norm(x, [5])]


def _batch_norm_setting(g):
    x = torch.randn(4, 3, 5, dtype=DT, generator=g)
    w, b = torch.randn(3, dtype=DT, generator=g), torch.randn(3, dtype=DT, generator=g)
    return x, [lambda x: F.batch_norm(x, None, None, training=True),
               lambda x: F.batch_norm(x.flatten(1), None, None, w.repeat(5), b.repeat(5), training=True, eps=1e-2),
               lambda x: F.batch_norm(x, None, None, w, b, training=True)]


def _instance_norm_setting(g):
    x = torch.randn(2, 3, 5, dtype=DT, generator=g)
    w, b = torch.randn(3, dtype=DT, generator=g), torch.randn(3, dtype=DT, generator=g)
    return x, [lambda x: F.instance_norm(x), lambda x: F.instance_norm(x, weight=w, bias=b, eps=1e-3)]


def _embedding_setting(g):
    w = torch.randn(6, 4, dtype=DT, generator=g)
    idx = torch.tensor([[0, 3, 0, 5], [2, 0, 1, 0]])
    return w, [lambda w: F.embedding(idx, w, padding_idx=0), lambda w: F.embedding(idx, w, padding_idx=-6)]


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)


def _hardsigmoid_setting(g):
    return torch.randn(3, 5, dtype=DT, generator=g) * 3, [F.hardsigmoid, lambda x: torch.nn.Hardsigmoid()(x)]


def _rrelu_setting(g):
    return torch.randn(3, 5, dtype=DT, generator=g), [F.rrelu, lambda x: F.rrelu(x, 0.1, 0.2, training=False)]


def _pool_setting(func, dims, size=2):
    def setting(g):
        if dims == 1:  # a non-contiguous 3-d input (transposed)
            x = torch.randn(2, 6, 3, dtype=DT, generator=g).transpose(1, 2)
        else:
            x = _cl(torch.randn((2, 3) + (4,) * dims, dtype=DT, generator=g))
        return x, [lambda x: func(x, size), lambda x: func(x.contiguous(), size)]

    return setting


def _group_norm_setting(g):
    x = _cl(torch.randn(2, 4, 3, 3, dtype=DT, generator=g))
    w, b = torch.randn(4, dtype=DT, generator=g), torch.randn(4, dtype=DT, generator=g)
    module = torch.nn.GroupNorm(2, 4).to(DT)
    return x, [lambda x: F.group_norm(x, 2, w, b), module]


def _embedding_bag_setting(g):
    w = torch.randn(6, 3, dtype=DT, generator=g)
    bags = torch.tensor([0, 2, 4, 1, 4, 3, 0, 5])
    offsets = torch.tensor([0, 3, 3, 5])  # an empty bag
    psw = torch.randn(8, dtype=DT, generator=g)
    return w, [lambda w: F.embedding_bag(bags, w, offsets, mode="sum"),
               lambda w: F.embedding_bag(bags, w, offsets, mode="mean", padding_idx=0),
               lambda w: F.embedding_bag(bags, w, offsets, mode="max"),
               lambda w: F.embedding_bag(bags, w, offsets, mode="sum", per_sample_weights=psw),
               lambda w: F.embedding_bag(bags, w, torch.tensor([0, 3, 5, 8]), include_last_offset=True),
               lambda w: F.embedding_bag(bags.reshape(2, 4), w, mode="max", padding_idx=4)]


def _multi_margin_setting(g):
    x, y = torch.randn(4, 3, dtype=DT, generator=g), torch.tensor([0, 2, 1, 1])
    w = torch.rand(3, dtype=DT, generator=g) + 0.5
    return x, [lambda x: F.multi_margin_loss(x, y), lambda x: F.multi_margin_loss(x, y, p=2, margin=0.7, weight=w),
               lambda x: F.multi_margin_loss(x, y, reduction="none"), lambda x: F.multi_margin_loss(x[0], y[:1])]


def _cdist_setting(g):
    x, y = torch.randn(2, 4, 3, dtype=DT, generator=g), torch.randn(2, 5, 3, dtype=DT, generator=g)
    return x, [lambda x: torch.cdist(x, y), lambda x: torch.cdist(x, y, p=1.0), lambda x: torch.cdist(x, y, p=3.0)]


def _pdist_setting(g):
    return torch.randn(5, 3, dtype=DT, generator=g), [F.pdist, lambda x: F.pdist(x, p=1.5)]


def _det_setting(g):
    a = torch.randn(2, 3, 3, dtype=DT, generator=g) + 2 * torch.eye(3, dtype=DT)
    return a, [torch.linalg.det, lambda a: a[0].det(), lambda a: torch.det(a.flip(-1))]


def _mha_setting(g):
    torch.manual_seed(0)
    m = torch.nn.MultiheadAttention(4, 2, batch_first=True).double()
    x = torch.randn(2, 3, 4, dtype=DT, generator=g)
    mask = torch.tensor([[False, False, True], [False, False, False]])
    causal = torch.nn.Transformer.generate_square_subsequent_mask(3, dtype=DT)
    layer = torch.nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True).to(DT).eval()
    return x, [lambda x: m(x, x, x, need_weights=False)[0],
               lambda x: m(x, x.flip(1), x, key_padding_mask=mask, need_weights=False)[0],
               lambda x: m(x, x, x, need_weights=False, attn_mask=causal, is_causal=True)[0],
               layer]


SETTINGS = {
    F.multi_head_attention_forward: _mha_setting,
    F.scaled_dot_product_attention: _sdpa_setting,
    F.layer_norm: _layer_norm_setting,
    torch.layer_norm: _layer_norm_setting,
    F.batch_norm: _batch_norm_setting,
    F.instance_norm: _instance_norm_setting,
    F.embedding: _embedding_setting,
    F.hardsigmoid: _hardsigmoid_setting,
    F.rrelu: _rrelu_setting,
    F.max_pool1d: _pool_setting(F.max_pool1d, 1),
    F.max_pool2d: _pool_setting(F.max_pool2d, 2),
    F.max_pool3d: _pool_setting(F.max_pool3d, 3),
    F.adaptive_max_pool1d: _pool_setting(F.adaptive_max_pool1d, 1),
    F.adaptive_max_pool2d: _pool_setting(F.adaptive_max_pool2d, 2, 3),
    F.adaptive_max_pool3d: _pool_setting(F.adaptive_max_pool3d, 3),
    F.group_norm: _group_norm_setting,
    F.embedding_bag: _embedding_bag_setting,
    F.multi_margin_loss: _multi_margin_setting,
    torch.cdist: _cdist_setting,
    F.pdist: _pdist_setting,
    torch.linalg.det: _det_setting,
    torch.det: _det_setting,
    torch.Tensor.det: _det_setting,
}


def test_every_registered_composite_has_a_setting():
    missing = [_name(f) for f in COMPOSITES.names() if f not in SETTINGS]
    assert not missing, f"composites without a test setting in tests/test_composites.py: {missing}"


def _cases():
    for func, setting in SETTINGS.items():
        x, variants = setting(_gen(0))
        for i, op in enumerate(variants):
            yield pytest.param(x, op, id=f"{_name(func)}-{i}")


def _weights(out):
    return torch.randn(out.shape, dtype=DT, generator=_gen(7))


@pytest.mark.parametrize("x, op", list(_cases()))
def test_composite_equals_pytorch_value_and_gradient(x, op):
    w = _weights(op(x))
    loss = lambda x: (op(x) * w).sum()
    with composites.differentiable_ops():
        value, grad = op(x), torch.func.grad(loss)(x)
    assert torch.allclose(value, op(x), atol=1e-12, equal_nan=True)
    assert torch.allclose(grad, torch.func.grad(loss)(x), atol=1e-11)


@pytest.mark.parametrize("x, op", list(_cases()))
def test_composite_third_derivative_matches_finite_differences(x, op):
    """d/dt [H(x + t u) v] at t=0 by forward-over-reverse-over-reverse vs central differences of H v."""
    w = _weights(op(x))
    loss = lambda x: ((op(x) * w).sum()) ** 2 + (op(x) ** 3 * w).sum()  # nonlinear in the output
    u = torch.randn(x.shape, dtype=DT, generator=_gen(3))
    v = torch.randn(x.shape, dtype=DT, generator=_gen(4))
    with composites.differentiable_ops():
        hv = lambda x: torch.func.jvp(torch.func.grad(loss), (x,), (v,))[1]
        forward = True
        try:
            ad = torch.func.jvp(hv, (x,), (u,))[1]
        except composites.ForwardModeUnsafe:  # a composite whose forward mode stays unsafe (so.hvp: reverse mode)
            forward = False
            hv = lambda x: torch.func.vjp(torch.func.grad(loss), x)[1](v)[0]
            ad = torch.func.vjp(hv, x)[1](u)[0]
        ad_rev = torch.func.vjp(hv, x)[1](u)[0]  # reverse mode: u^T d(Hv)/dx, the same contraction transposed
        eps = 1e-4
        fd = (hv(x + eps * u) - hv(x - eps * u)) / (2 * eps)
    scale = fd.abs().max().clamp_min(1.0)
    assert (ad - fd).abs().max() <= 1e-6 * scale
    # symmetry of the third-derivative tensor: <d(Hv)/dx u, z> == <d(Hv)/dx z, u> contracted both ways
    z = torch.randn(x.shape, dtype=DT, generator=_gen(5))
    with composites.differentiable_ops():
        lhs = ((torch.func.jvp(hv, (x,), (z,))[1] if forward else torch.func.vjp(hv, x)[1](z)[0]) * u).sum()
    assert torch.allclose(lhs, (ad_rev * z).sum(), rtol=1e-8, atol=1e-10)


def test_pytorch_third_derivative_of_layer_norm_is_wrong_without_the_composite():
    """The reason this package exists (if PyTorch fixes it, this fails and the composite can go)."""
    x, (op, *_rest) = _layer_norm_setting(_gen(0))
    w = _weights(op(x))
    loss = lambda x: ((op(x) * w) ** 3).sum()
    third = lambda: torch.func.jacrev(torch.func.jacrev(torch.func.grad(loss)))(x)
    native = third()
    with composites.differentiable_ops():
        fixed = third()
    assert (native - fixed).abs().max() > 1e-3


def test_inactive_outside_and_in_other_threads():
    q = torch.randn(1, 2, 3, 4, dtype=DT)
    f = lambda q: F.scaled_dot_product_attention(q, q, q).pow(2).sum()
    with pytest.raises(RuntimeError, match="scaled_dot_product"):
        torch.func.hessian(f)(q)  # PyTorch's fused kernel: no forward-mode rule
    seen = {}

    def other():
        seen["active"] = composites.active()
        try:
            torch.func.hessian(f)(q)
            seen["error"] = None
        except RuntimeError as err:
            seen["error"] = str(err)

    def g(q):
        t = threading.Thread(target=other)
        t.start()
        t.join()  # the other thread runs while this thread evaluates f under the composites
        return f(q)

    h = so.hvp(g)(q, torch.ones_like(q))
    assert seen["active"] is False and seen["error"] and "scaled_dot_product" in seen["error"]
    assert not composites.active()
    with composites.differentiable_ops():
        ref = torch.func.jvp(torch.func.grad(f), (q,), (torch.ones_like(q),))[1]
    assert torch.allclose(h, ref)


def _attention_model():
    torch.manual_seed(0)

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(4, 12)
            self.norm = torch.nn.LayerNorm(4)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, 2, 2)).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)
            return self.head(x + a).mean(1)

    return Attn().double()


def test_transforms_run_through_fused_attention_and_layer_norm():
    model = _attention_model()
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    x, y = torch.randn(3, 5, 4, dtype=DT), torch.tensor([0, 2, 1])
    flat, unravel = so.tree.ravel(params)
    with composites.differentiable_ops():
        dense = torch.func.hessian(lambda p: f(unravel(p), x, y))(flat)
    assert torch.allclose(so.trace(f, engine="generic")(params, x, y), dense.trace(), rtol=1e-10)
    diag = so.tree.ravel(so.hessian_diag(f, engine="generic")(params, x, y))[0]
    assert torch.allclose(diag, dense.diagonal(), rtol=1e-9, atol=1e-12)
    v = torch.randn(flat.shape, dtype=DT)
    hv = so.tree.ravel(so.hvp(f)(params, x, y, unravel(v)))[0]
    assert torch.allclose(hv, dense @ v, rtol=1e-9, atol=1e-12)
    top = so.eigenvalues(f, k=2, seed=0)(params, x, y)  # the two largest (algebraic)
    assert torch.allclose(top, torch.linalg.eigvalsh(dense).flip(0)[:2], rtol=1e-6)


def test_gradient_of_trace_penalty_through_layer_norm_matches_finite_differences():
    """Issue 25 item 6: the generic path's penalty gradient was 16% off through LayerNorm."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2)).double()
    f = so.functional_loss(model, torch.nn.CrossEntropyLoss(label_smoothing=0.1))  # generic path
    params = so.params_dict(model)
    x, y = torch.randn(5, 3, dtype=DT), torch.tensor([0, 1, 1, 0, 1])
    tr = so.trace(f, engine="generic")
    grad = so.tree.ravel(torch.func.grad(lambda p: tr(p, x, y))(params))[0]
    flat, unravel = so.tree.ravel(params)
    d = torch.randn(flat.shape, dtype=DT, generator=_gen(2))
    eps = 1e-5
    fd = (tr(unravel(flat + eps * d), x, y) - tr(unravel(flat - eps * d), x, y)) / (2 * eps)
    assert torch.allclose((grad * d).sum(), fd, rtol=1e-6)


def test_embedding_padding_hvp_is_the_symmetric_hessian():
    """Issue 25 item 1: forward-over-reverse ignored padding_idx (0.575 off, asymmetric)."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Embedding(6, 3, padding_idx=0), torch.nn.Flatten(),
                                torch.nn.Linear(9, 2)).double()
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    x, y = torch.tensor([[0, 1, 2], [3, 0, 0], [5, 4, 0]]), torch.tensor([0, 1, 1])
    flat, unravel = so.tree.ravel(params)
    # reference: reverse-over-reverse of PyTorch's own embedding (its backward honours padding_idx)
    dense = torch.func.jacrev(torch.func.grad(lambda p: f(unravel(p), x, y)))(flat)
    assert torch.allclose(dense, dense.T, atol=1e-12)
    cols = torch.stack([so.tree.ravel(so.hvp(f)(params, x, y, unravel(e)))[0] for e in torch.eye(flat.numel(), dtype=DT)])
    assert torch.allclose(cols, dense, atol=1e-12)


def test_vmap_of_generic_path_through_layer_norm():
    """Issue 25 item 12: LayerNorm's double backward wrote in place, which vmap refused."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)).double()
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    x, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 1, 0])
    tr = so.trace(f, engine="generic")
    per = torch.func.vmap(tr, in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    ref = torch.stack([tr(params, x[i:i + 1], y[i:i + 1]) for i in range(4)])
    assert torch.allclose(per, ref, rtol=1e-10)


def test_calls_pytorch_rejects_still_raise_pytorchs_error():
    x = torch.randn(2, 3, dtype=DT)
    with composites.differentiable_ops():
        with pytest.raises(RuntimeError):
            F.layer_norm(x, (4,))
        with pytest.raises(RuntimeError):
            F.layer_norm(x, (3,), torch.ones(1, dtype=DT))
        with pytest.raises(ValueError):
            F.batch_norm(torch.randn(1, 3, dtype=DT), None, None, training=True)  # one value per channel
        with pytest.raises((IndexError, RuntimeError)):
            F.embedding(torch.tensor([7]), torch.randn(5, 2), padding_idx=0)


def test_batch_norm_composite_updates_running_statistics_like_pytorch():
    x = torch.randn(6, 3, 2, dtype=DT)
    rm, rv = torch.zeros(3, dtype=DT), torch.ones(3, dtype=DT)
    rm2, rv2 = rm.clone(), rv.clone()
    with composites.differentiable_ops():
        out = F.batch_norm(x, rm, rv, training=True, momentum=0.3)
    ref = F.batch_norm(x, rm2, rv2, training=True, momentum=0.3)
    assert torch.allclose(out, ref) and torch.allclose(rm, rm2) and torch.allclose(rv, rv2)


def test_covered_names_the_replaced_callables():
    names = composites.covered()
    assert "torch.nn.functional.scaled_dot_product_attention" in names
    assert "torch.nn.functional.layer_norm" in names and "torch.layer_norm" in names


def test_cdist_and_pdist_composites_keep_pytorchs_zero_distance_convention():
    """At a zero distance the norm has no derivative; PyTorch's kernels give zero there, and so do the composites."""
    x = torch.randn(4, 3, dtype=DT, generator=_gen(0))
    x[2] = x[0]
    for op in (lambda x: torch.cdist(x, x[:2].detach()), F.pdist, lambda x: F.pdist(x, 3.0)):
        loss = lambda x: (op(x) * torch.linspace(-1, 1, op(x).numel(), dtype=DT).reshape(op(x).shape)).sum()
        with composites.differentiable_ops():
            value, grad = op(x), torch.func.grad(loss)(x)
            hess = torch.func.jacrev(torch.func.grad(loss))(x)
        assert torch.allclose(value, op(x)) and torch.allclose(grad, torch.func.grad(loss)(x))
        assert torch.isfinite(hess).all()


def test_forward_mode_unsafe_operations_give_reverse_over_reverse_products():
    """so.hvp is forward-over-reverse; where PyTorch's forward-mode rule is wrong (scatter_reduce 'prod') or its
    reverse-mode derivative is (prod with zeros, det, solve, the norms), the product and the gradient of a penalty
    built on it must still be right: so.hvp takes reverse-over-reverse there."""
    from secorder.composites.forward_mode import ForwardModeUnsafe

    g = _gen(1)
    x = torch.randn(3, 4, dtype=DT, generator=g)
    x[1, 2] = 0.0
    sq = torch.randn(4, 4, dtype=DT, generator=g) + 4 * torch.eye(4, dtype=DT)
    idx = torch.tensor([[0, 0, 1, 1], [2, 2, 2, 0], [1, 0, 1, 0]])
    rhs = torch.randn(4, 2, dtype=DT, generator=g)
    cases = [
        (x, lambda x: torch.ones(3, 3, dtype=DT).scatter_reduce(1, idx, x, "prod")),
        (x, lambda x: x.prod(1)), (x, lambda x: torch.cumprod(x, 1)),
        (sq, torch.linalg.det), (sq, lambda a: torch.linalg.slogdet(a)[1]),
        (sq, lambda a: torch.linalg.solve(a, rhs)),
        (x, lambda x: torch.linalg.vector_norm(x, dim=1)), (x, lambda x: F.normalize(x, dim=1)),
        (x, lambda x: x.std(1)), (x, lambda x: F.glu(x, 1)),
    ]
    for point, op in cases:
        w = torch.linspace(-1, 1, op(point).numel(), dtype=DT).reshape(op(point).shape)
        f = lambda p: (w * op(p) + 0.3 * op(p) ** 2).sum()
        v = torch.randn(point.shape, dtype=DT, generator=_gen(2))
        u = torch.randn(point.shape, dtype=DT, generator=_gen(3))
        hv = so.hvp(f)(point, v)
        dense = torch.func.jacrev(torch.func.grad(f))(point).reshape(point.numel(), point.numel())
        assert torch.allclose(hv.flatten(), dense @ v.flatten(), rtol=1e-9, atol=1e-10)
        # the gradient of a penalty built on so.hvp, against central differences of the penalty
        penalty = lambda p: (so.hvp(f)(p, v) * u).sum()
        gpen = torch.func.grad(penalty)(point)
        e = 1e-5
        fd = (penalty(point + e * u) - penalty(point - e * u)) / (2 * e)
        assert torch.allclose((gpen * u).sum(), fd, rtol=1e-6, atol=1e-8)
    # under a user's own forward-mode transform the error names the operation and says what to do
    f = lambda p: torch.linalg.vector_norm(p) ** 3
    with pytest.raises(ForwardModeUnsafe, match="linalg_vector_norm.*use reverse mode"):
        torch.func.jvp(so.trace(f), (x,), (x,))

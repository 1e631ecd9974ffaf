"""Every registered ATen operation rule of the graph walker, against autograd in float64.

``SETTINGS`` holds one example per operation (arguments, which slots are live
activations, which are parameters); a registered operation without a setting
fails :func:`test_every_registered_op_has_a_setting`. For each setting:

* the rule's forward equals the ATen operation;
* each live slot's Jacobian, on random columns, equals ``vmap(vjp)`` of the op;
* the residual term (ops nonlinear in their input) equals the per-sample blocks
  of the float64 Hessian of ``<g, op(x)>`` (and that Hessian has no block
  between samples: the op keeps the samples apart);
* the parameter diagonal, for a random factored curvature at the output,
  equals ``sum_{n,k} (d<b_kn, z_n>/d theta)**2`` by per-sample autograd.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import vjp, vmap

from secorder.structured.curvature import Curvature, Factor
from secorder.structured.graph.batchwise import Batchwise, batch_parameter_diagonal, to_batchwise
from secorder.structured.graph.ops import OP_RULES, Meta, _op_of, slot_value

DT = torch.float64
N = 3


def r(*shape):
    return torch.randn(*shape, dtype=DT)


def pos(*shape):
    return torch.rand(*shape, dtype=DT) + 0.5


# name: (args builder, kwargs, live slots, {param slot: local name})
SETTINGS = {
    "aten.view.default": (lambda: (r(N, 2, 3), [N, 6]), {}, [(0,)], {}),
    "aten.reshape.default": (lambda: (r(N, 2, 3), [N, 3, 2]), {}, [(0,)], {}),
    "aten._unsafe_view.default": (lambda: (r(N, 2, 3), [N, 6]), {}, [(0,)], {}),
    "aten.flatten.using_ints": (lambda: (r(N, 2, 3, 2), 1, -1), {}, [(0,)], {}),
    "aten.unflatten.int": (lambda: (r(N, 6), 1, [2, 3]), {}, [(0,)], {}),
    "aten.unsqueeze.default": (lambda: (r(N, 3), 1), {}, [(0,)], {}),
    "aten.squeeze.dim": (lambda: (r(N, 1, 3), 1), {}, [(0,)], {}),
    "aten.squeeze.dims": (lambda: (r(N, 1, 3, 1), [1, 3]), {}, [(0,)], {}),
    "aten.permute.default": (lambda: (r(N, 2, 3, 4), [0, 3, 1, 2]), {}, [(0,)], {}),
    "aten.transpose.int": (lambda: (r(N, 2, 3, 4), 1, 3), {}, [(0,)], {}),
    "aten.expand.default": (lambda: (r(N, 1, 3), [N, 4, 3]), {}, [(0,)], {}),
    "aten.clone.default": (lambda: (r(N, 3),), {}, [(0,)], {}),
    "aten._to_copy.default": (lambda: (r(N, 3),), {"dtype": DT}, [(0,)], {}),
    "aten.alias.default": (lambda: (r(N, 3),), {}, [(0,)], {}),
    "aten.contiguous.default": (lambda: (r(N, 3),), {}, [(0,)], {}),
    "aten.slice.Tensor": (lambda: (r(N, 6), 1, 1, 5, 2), {}, [(0,)], {}),
    "aten.select.int": (lambda: (r(N, 4, 3), 1, 2), {}, [(0,)], {}),
    "aten.cat.default": (lambda: ([r(N, 2), r(N, 3), r(N, 1)], 1), {}, [(0, 0), (0, 2)], {}),
    "aten.add.Tensor": (lambda: (r(N, 3), r(N, 3)), {"alpha": 2.0}, [(0,), (1,)], {}),
    "aten.sub.Tensor": (lambda: (r(N, 3), r(N, 3)), {}, [(0,), (1,)], {}),
    "aten.neg.default": (lambda: (r(N, 3),), {}, [(0,)], {}),
    "aten.mul.Tensor": (lambda: (r(N, 3), r(N, 3)), {}, [(0,), (1,)], {}),
    "aten.mul.Scalar": (lambda: (r(N, 3), 1.5), {}, [(0,)], {}),
    "aten.add.Scalar": (lambda: (r(N, 3), 1.5), {}, [(0,)], {}),
    "aten.div.Tensor": (lambda: (r(N, 3), pos(3)), {}, [(0,)], {}),
    "aten.mean.dim": (lambda: (r(N, 2, 3, 3), [2, 3], True), {}, [(0,)], {}),
    "aten.sum.dim_IntList": (lambda: (r(N, 2, 3), [-1]), {}, [(0,)], {}),
    "aten.linear.default": (lambda: (r(N, 4), r(3, 4), r(3)), {}, [(0,)], {(1,): "weight", (2,): "bias"}),
    "aten.conv1d.default": (lambda: (r(N, 2, 6), r(4, 1, 3), r(4), [2], [1], [1], 2), {}, [(0,)],
                            {(1,): "weight", (2,): "bias"}),
    "aten.conv2d.default": (lambda: (r(N, 2, 5, 5), r(3, 2, 3, 3), r(3), [1, 1], [1, 1]), {}, [(0,)],
                            {(1,): "weight", (2,): "bias"}),
    "aten.conv3d.default": (lambda: (r(N, 1, 3, 3, 3), r(2, 1, 2, 2, 2), None), {}, [(0,)], {(1,): "weight"}),
    "aten.max_pool1d.default": (lambda: (r(N, 2, 6), [2]), {}, [(0,)], {}),
    "aten.max_pool2d.default": (lambda: (r(N, 2, 5, 5), [3, 3], [2, 2], [1, 1]), {}, [(0,)], {}),
    "aten.max_pool3d.default": (lambda: (r(N, 1, 4, 4, 4), [2, 2, 2]), {}, [(0,)], {}),
    "aten.avg_pool1d.default": (lambda: (r(N, 2, 6), [2]), {}, [(0,)], {}),
    "aten.avg_pool2d.default": (lambda: (r(N, 2, 4, 4), [2, 2], [1, 1]), {}, [(0,)], {}),
    "aten.avg_pool3d.default": (lambda: (r(N, 1, 4, 4, 4), [2, 2, 2]), {}, [(0,)], {}),
    "aten.adaptive_avg_pool1d.default": (lambda: (r(N, 2, 6), [2]), {}, [(0,)], {}),
    "aten.adaptive_avg_pool2d.default": (lambda: (r(N, 2, 5, 5), [1, 1]), {}, [(0,)], {}),
    "aten.adaptive_avg_pool3d.default": (lambda: (r(N, 1, 4, 4, 4), [2, 1, 2]), {}, [(0,)], {}),
    "aten._native_batch_norm_legit_no_training.default": (
        lambda: (r(N, 3, 2, 2), r(3), r(3), r(3), pos(3), 0.1, 1e-5), {}, [(0,)], {(1,): "weight", (2,): "bias"}),
    "aten._native_batch_norm_legit.no_stats": (
        lambda: (r(N, 3, 2, 2), r(3), r(3), True, 0.1, 1e-5), {}, [(0,)], {(1,): "weight", (2,): "bias"}),
    "aten.layer_norm.default": (lambda: (r(N, 2, 4), [4], r(4), r(4), 1e-5), {}, [(0,)],
                                {(2,): "weight", (3,): "bias"}),
    "aten.embedding.default": (lambda: (r(5, 3), torch.tensor([[0, 2, 2], [4, 1, 0], [3, 3, 3]])), {}, [],
                               {(0,): "weight"}),
    "aten.scaled_dot_product_attention.default": (lambda: (r(N, 2, 3, 4), r(N, 2, 3, 4), r(N, 2, 3, 4)),
                                                  {"is_causal": True}, [(0,), (1,), (2,)], {}),
    "aten._softmax.default": (lambda: (r(N, 2, 3), -1, False), {}, [(0,)], {}),
    "aten.matmul.default": (lambda: (r(N, 2, 3), r(N, 3, 4)), {}, [(0,), (1,)], {}),
    "aten.pow.Tensor_Scalar": (lambda: (pos(N, 3), 3), {}, [(0,)], {}),
    "aten.rsqrt.default": (lambda: (pos(N, 3),), {}, [(0,)], {}),
    "aten.sqrt.default": (lambda: (pos(N, 3),), {}, [(0,)], {}),
    "aten.exp.default": (lambda: (r(N, 3),), {}, [(0,)], {}),
    "aten.log.default": (lambda: (pos(N, 3),), {}, [(0,)], {}),
    "aten.sin.default": (lambda: (r(N, 3),), {}, [(0,)], {}),
    "aten.cos.default": (lambda: (r(N, 3),), {}, [(0,)], {}),
    "aten.reciprocal.default": (lambda: (pos(N, 3),), {}, [(0,)], {}),
    "aten.erf.default": (lambda: (r(N, 3),), {}, [(0,)], {}),
    "aten.addmm.default": (lambda: (r(3), r(N, 4), r(4, 3)), {}, [(1,)], {(0,): "bias", (2,): "weight"}),
    "aten.split.Tensor": (lambda: (r(N, 5, 2), 2, 1), {}, [(0,)], {}),
    "aten.split_with_sizes.default": (lambda: (r(N, 5), [2, 3], 1), {}, [(0,)], {}),
    "aten.chunk.default": (lambda: (r(N, 4, 3), 2, -1), {}, [(0,)], {}),
    "aten.unbind.int": (lambda: (r(N, 2, 3), 1), {}, [(0,)], {}),
    "aten.relu.default": (lambda: (r(N, 3, 2),), {}, [(0,)], {}),
    "aten.tanh.default": (lambda: (r(N, 3, 2),), {}, [(0,)], {}),
    "aten.sigmoid.default": (lambda: (r(N, 3, 2),), {}, [(0,)], {}),
    "aten.silu.default": (lambda: (r(N, 3, 2),), {}, [(0,)], {}),
    "aten.gelu.default": (lambda: (r(N, 3, 2),), {"approximate": "tanh"}, [(0,)], {}),
}


def test_every_registered_op_has_a_setting():
    missing = [n for n in OP_RULES.names() if n not in SETTINGS]
    assert not missing, f"registered graph op rules without a test setting: {missing}"
    unknown = [n for n in SETTINGS if OP_RULES.lookup(n) is None]
    assert not unknown, f"settings for ops that have no rule: {unknown}"


def _main(out):
    return out[0] if isinstance(out, tuple) else out


def _replace(args, slot, value):
    out = [list(a) if isinstance(a, list) else a for a in args]
    if len(slot) == 1:
        out[slot[0]] = value
    else:
        out[slot[0]][slot[1]] = value
    return tuple(out)


#: ops with several outputs: each output is bound on its own (the graph walker binds the getitem nodes)
MULTI = ("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default", "aten.unbind.int")


def _bound(name):
    torch.manual_seed(sum(map(ord, name)))
    build, kwargs, live, params = SETTINGS[name]
    args = build()
    op = _op_of(name)
    call = None
    if name in MULTI:  # the last output (not the first: a slot other than the first is checked)
        call = lambda *a, **k: op(*a, **k)[-1]  # noqa: E731
    target = call or op
    out = _main(target(*args, **kwargs))
    meta = Meta(name, args, dict(kwargs), tuple(live), {s: f"p.{loc}" for s, loc in params.items()}, out, N,
                call=call)
    return OP_RULES.get(name).bind(meta), args, kwargs, live, params, target, out


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_forward_and_jacobians(name):
    bound, args, kwargs, live, params, target, out = _bound(name)
    z, state = bound.forward(args, kwargs)
    torch.testing.assert_close(z, out, rtol=1e-12, atol=1e-12)
    jacs = bound.jacobians(state)
    B = torch.randn((4,) + tuple(out.shape), dtype=DT)
    for s in live:
        x = slot_value(args, s)
        _, pull = vjp(lambda t: _main(target(*_replace(args, s, t), **kwargs)), x)
        want = vmap(lambda b: pull(b)[0])(B)
        torch.testing.assert_close(jacs[s].t_columns(B), want, rtol=1e-10, atol=1e-12, msg=str(s))
        torch.testing.assert_close(jacs[s].t_vector(B[0]), want[0], rtol=1e-10, atol=1e-12)


def _dense(term, shape):
    """Per-sample dense blocks ``[N, F, F]`` of a curvature term at a tensor of shape ``shape``."""
    f = term.as_factor()
    F_ = math.prod(shape[1:])
    B = f.B.reshape(f.B.shape[0], shape[0], F_)
    w = torch.ones(B.shape[:2], dtype=DT) if f.w is None else f.w
    return torch.einsum("kn,kni,knj->nij", w, B, B)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_residual_is_the_second_derivative(name):
    bound, args, kwargs, live, params, target, out = _bound(name)
    if not live:  # integer inputs (embedding): nothing before it is differentiated
        return
    x = slot_value(args, live[0])
    g = torch.randn_like(out)

    def inner(t):
        return (_main(target(*_replace(args, live[0], t), **kwargs)) * g).sum()

    if getattr(OP_RULES.get(name), "nonlinear", False):
        # no residual rule (the exact Hessian declines); the op must still keep the samples apart
        J = torch.autograd.functional.jacobian(lambda t: _main(target(*_replace(args, live[0], t), **kwargs)), x)
        J = J.reshape(x.shape[0], out[0].numel(), x.shape[0], x[0].numel())
        for n in range(x.shape[0]):
            J[n, :, n] = 0
        assert torch.count_nonzero(J) == 0
        return
    if hasattr(bound, "joint_residual"):  # checked jointly over the live arguments below
        return
    H = torch.autograd.functional.hessian(inner, x).reshape(x.shape[0], x[0].numel(), x.shape[0], x[0].numel())
    blocks = torch.stack([H[n, :, n] for n in range(x.shape[0])])
    off = H.clone()
    for n in range(x.shape[0]):
        off[n, :, n] = 0
    if getattr(bound, "coupled", False):  # batch statistics: says so, and the exact Hessian declines
        assert torch.count_nonzero(off) > 0
        return
    assert torch.count_nonzero(off) == 0  # the op keeps the samples apart
    z, state = bound.forward(args, kwargs)
    res = bound.residual(state, g) if bound.has_residual else None
    if res is None:
        torch.testing.assert_close(blocks, torch.zeros_like(blocks), atol=1e-10, rtol=0)
    else:
        assert len(live) == 1
        torch.testing.assert_close(_dense(res, tuple(x.shape)), blocks, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", sorted(n for n in SETTINGS if SETTINGS[n][3]))
def test_parameter_diagonal(name):
    bound, args, kwargs, live, params, target, out = _bound(name)
    z, state = bound.forward(args, kwargs)
    K = 3
    B = torch.randn((K,) + tuple(out.shape), dtype=DT)
    w = torch.rand(K, N, dtype=DT)
    wanted = frozenset(f"p.{loc}" for loc in params.values())
    got = bound.parameter_diagonal(state, Curvature([Factor(B, w)]), wanted)
    across = Batchwise(to_batchwise(Factor(B, w)).B, to_batchwise(Factor(B, w)).w)
    pullbacks = bound.parameter_pullbacks(state, wanted)
    for s, loc in params.items():
        theta = args[s[0]]
        # whole-batch vjp of the column e_n (x) B[k, n]: per sample for per-sample ops, exact for coupling ones
        _, pull = vjp(lambda t: _main(target(*_replace(args, s, t), **kwargs)), theta)
        want = torch.zeros_like(theta)
        for n in range(N):
            for k in range(K):
                col = torch.zeros_like(out)
                col[n] = B[k, n]
                want += w[k, n] * pull(col)[0] ** 2
        torch.testing.assert_close(got[f"p.{loc}"], want, rtol=1e-10, atol=1e-12, msg=loc)
        tr = bound.parameter_trace(state, Curvature([Factor(B, w)]), frozenset([f"p.{loc}"]))
        torch.testing.assert_close(tr, want.sum(), rtol=1e-10, atol=1e-12)
        # the same curvature as whole-batch columns: the path taken after a coupling op
        torch.testing.assert_close(batch_parameter_diagonal(pullbacks[f"p.{loc}"], across), want,
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(n for n in SETTINGS if callable(getattr(OP_RULES.get(n), "bilinear", None))))
@pytest.mark.parametrize("broadcast", [False, True])
def test_joint_residual_of_two_live_arguments(name, broadcast):
    """The cross term between two live arguments (columns split over them) against the joint float64 Hessian."""
    torch.manual_seed(3)
    a, b = r(N, 2, 3), (r(N, 1, 3) if broadcast else r(N, 2, 3))
    target = _op_of(name)
    out = target(a, b)
    meta = Meta(name, (a, b), {}, ((0,), (1,)), {}, out, N)
    bound = OP_RULES.get(name).bind(meta)
    bound.cross = True
    z, state = bound.forward((a, b), {})
    g = torch.randn_like(z)
    parts = bound.joint_residual(state, g)
    fa, fb = parts[(0,)], parts[(1,)]
    Fa, Fb = a[0].numel(), b[0].numel()
    B = torch.cat([fa.B.reshape(fa.B.shape[0], N, Fa), fb.B.reshape(fb.B.shape[0], N, Fb)], -1)
    got = torch.einsum("kn,kni,knj->nij", fa.w, B, B)

    def inner(ab):
        return (target(ab[:, :Fa].reshape(a.shape), ab[:, Fa:].reshape(b.shape)) * g).sum()

    H = torch.autograd.functional.hessian(inner, torch.cat([a.reshape(N, Fa), b.reshape(N, Fb)], 1))
    want = torch.stack([H[n, :, n] for n in range(N)])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _composite_attention(q, k, v, is_causal=False):
    """Attention written out (PyTorch's CPU kernel has no double backward): the float64 reference."""
    T, e = q.shape[-2], q.shape[-1]
    s = (q @ k.transpose(-1, -2)) * e ** -0.5
    if is_causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("causal", [False, True])
def test_attention_joint_residual_against_the_float64_hessian(causal):
    name = "aten.scaled_dot_product_attention.default"
    torch.manual_seed(4)
    q, k, v = r(N, 2, 3, 2), r(N, 2, 3, 2), r(N, 2, 3, 2)
    kwargs = {"is_causal": causal}
    out = _op_of(name)(q, k, v, **kwargs)
    torch.testing.assert_close(out, _composite_attention(q, k, v, causal))
    bound = OP_RULES.get(name).bind(Meta(name, (q, k, v), kwargs, ((0,), (1,), (2,)), {}, out, N))
    assert bound.residual_reason is None
    z, state = bound.forward((q, k, v), kwargs)
    g = torch.randn_like(z)
    parts = bound.joint_residual(state, g)
    F_ = q[0].numel()
    B = torch.cat([parts[(i,)].B.reshape(parts[(i,)].B.shape[0], N, F_) for i in range(3)], -1)
    got = torch.einsum("kn,kni,knj->nij", parts[(0,)].w, B, B)

    def inner(qkv):
        a, b, c = (qkv[:, i * F_:(i + 1) * F_].reshape(q.shape) for i in range(3))
        return (_composite_attention(a, b, c, causal) * g).sum()

    H = torch.autograd.functional.hessian(inner, torch.cat([t.reshape(N, F_) for t in (q, k, v)], 1))
    want = torch.stack([H[n, :, n] for n in range(N)])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)

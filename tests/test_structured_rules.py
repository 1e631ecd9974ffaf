"""Every structured-engine rule from a settings list, on random inputs, in float64.

For each rule: its Jacobian products against ``vmap(vjp(forward))``; the pull-back
of every kind of curvature term (factor, diagonal, shared, gathered) against
``J_n^T H_n J_n`` with ``J_n`` from ``jacrev``; its residual against the second
derivative of ``<g, forward(x)>``; its parameter diagonal and trace against
``diag(sum_n J_n^T H_n J_n)`` with the parameter Jacobian from ``jacrev``. The
term kinds themselves are checked against dense definitions first.

A new rule is tested by adding a line to ``SETTINGS``.
"""

import functools
import math

import pytest
import torch
from torch import nn
from torch.func import jacrev, vjp, vmap

from secorder.structured import registry, rules  # noqa: F401 (built-in rules registered)
from secorder.structured.curvature import Curvature, Diagonal, Factor, Gathered, Shared, SoftmaxFactor
from secorder.structured.rules.example import ScaledTanh

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def _bn(cls, c):
    m = cls(c).to(DT).eval()
    with torch.no_grad():
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
        m.weight.normal_()
        m.bias.normal_()
    return m


# (id, module factory, input shape)
SETTINGS = [
    ("linear", lambda: nn.Linear(4, 3), (3, 4)),
    ("linear-nobias", lambda: nn.Linear(4, 3, bias=False), (3, 4)),
    ("conv1d", lambda: nn.Conv1d(2, 3, 3, dilation=2, padding=1), (2, 2, 7)),
    ("conv2d", lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 2, 5, 5)),
    ("conv2d-valid-nobias", lambda: nn.Conv2d(1, 2, 2, padding="valid", bias=False), (2, 1, 4, 4)),
    ("batchnorm1d", lambda: _bn(nn.BatchNorm1d, 3), (4, 3)),
    ("batchnorm1d-3d", lambda: _bn(nn.BatchNorm1d, 3), (2, 3, 4)),
    ("batchnorm2d", lambda: _bn(nn.BatchNorm2d, 2), (2, 2, 3, 3)),
    ("relu", nn.ReLU, (3, 2, 5)),
    ("leakyrelu", lambda: nn.LeakyReLU(0.2), (3, 5)),
    ("tanh", nn.Tanh, (3, 2, 2, 2)),
    ("sigmoid", nn.Sigmoid, (3, 5)),
    ("elu", lambda: nn.ELU(0.7), (3, 5)),
    ("silu", nn.SiLU, (3, 5)),
    ("gelu", nn.GELU, (3, 5)),
    ("gelu-tanh", lambda: nn.GELU(approximate="tanh"), (3, 5)),
    ("softplus", lambda: nn.Softplus(beta=2.0, threshold=1.0), (3, 5)),
    ("maxpool2d", lambda: nn.MaxPool2d(2), (2, 2, 4, 4)),
    ("maxpool2d-overlap", lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 2, 5, 5)),
    ("avgpool2d", lambda: nn.AvgPool2d(2), (2, 2, 4, 4)),
    ("adaptiveavgpool2d", lambda: nn.AdaptiveAvgPool2d(2), (2, 2, 5, 5)),
    ("flatten", nn.Flatten, (2, 2, 3)),
    ("identity", nn.Identity, (2, 3)),
    ("dropout-eval", lambda: nn.Dropout(0.5).eval(), (2, 3)),
    ("example-scaledtanh", ScaledTanh, (3, 4)),
]


def make(setting):
    _, factory, shape = setting
    torch.manual_seed(sum(map(ord, setting[0])))
    module = factory().to(DT)
    rule = registry.rule_for(type(module))(module)
    tensors = {n: t.detach() for n, t in list(module.named_parameters()) + list(module.named_buffers())}
    x = torch.randn(shape, dtype=DT)
    if isinstance(module, nn.Softplus):
        x = 2 * x  # both sides of the threshold
    return module, rule, tensors, x


def output(rule, tensors, x):
    return rule.forward(x, tensors)[0]


def per_sample_jacobian(fn, x):
    """``[N, F_out, F_in]``: the diagonal blocks of the batch Jacobian of ``fn`` at ``x``."""
    z = fn(x)
    N = x.shape[0]
    J = jacrev(fn)(x).reshape(N, z[0].numel(), N, x[0].numel())
    return torch.stack([J[n, :, n, :] for n in range(N)])


# ---- random curvature terms of every kind, and their dense per-sample matrices -----------------

def random_terms(shape, K=3):
    """One term of each kind (two for factor/shared: unweighted/weighted) at a tensor of ``shape``."""
    N, feat = shape[0], tuple(shape[1:])
    C = feat[0]
    pos = feat[1:]
    P = math.prod(pos)
    Q = 3
    terms = {
        "factor": Factor(torch.randn((K, N) + feat, dtype=DT)),
        "factor-signed": Factor(torch.randn((K, N) + feat, dtype=DT), torch.randn(K, N, dtype=DT)),
        "diag": Diagonal(torch.randn((N,) + feat, dtype=DT)),
        "shared": Shared(torch.randn((K,) + feat, dtype=DT), torch.randn(N, K, dtype=DT)),
        "shared-scaled": Shared(torch.randn((K,) + feat, dtype=DT), torch.randn(N, K, dtype=DT),
                                torch.randn((N,) + feat, dtype=DT)),
        "gathered": Gathered(Factor(torch.randn(K, N, C, Q, dtype=DT), torch.randn(K, N, dtype=DT)),
                             torch.randint(0, P, (N, C, Q)), tuple(shape)),
    }
    if len(shape) == 2:  # the softmax cross-entropy factor lives on [N, C] logits
        p = torch.softmax(torch.randn(N, C, dtype=DT), 1)
        start = min(1, C - 1)
        Kc = C - start
        terms["softmax"] = SoftmaxFactor(torch.rand(Kc, N, dtype=DT), p, start)
        terms["softmax-signed"] = SoftmaxFactor(torch.rand(Kc, N, dtype=DT), p, start, torch.randn(Kc, N, dtype=DT))
    return terms


def dense(term, shape):
    """``[N, F, F]`` from the definitions (independent of ``as_factor``)."""
    N, F = shape[0], math.prod(shape[1:])
    if isinstance(term, Factor):
        B = term.B.reshape(term.B.shape[0], N, F)
        w = torch.ones(B.shape[:2], dtype=DT) if term.w is None else term.w
        return torch.einsum("kn,knf,kng->nfg", w, B, B)
    if isinstance(term, Diagonal):
        return torch.diag_embed(term.d.reshape(N, F))
    if isinstance(term, SoftmaxFactor):
        K = term.a.shape[0]
        E = torch.eye(F, dtype=DT)[term.start:term.start + K]
        B = term.a[:, :, None] * (E[:, None, :] - term.p[None])
        return dense(Factor(B, term.w), shape)
    if isinstance(term, Shared):
        K = term.B.shape[0]
        B = term.B.reshape(K, F)
        s = torch.ones(N, F, dtype=DT) if term.s is None else term.s.reshape(N, F)
        inner = torch.einsum("kf,nk,kg->nfg", B, term.r, B)
        return s[:, :, None] * inner * s[:, None, :]
    if isinstance(term, Gathered):
        K, _, C, Q = term.factor.B.shape[0], *term.index.shape
        P = F // C
        # Selection matrix per sample: column (c, q) -> position (c, index[n, c, q]).
        S = torch.zeros(N, F, C * Q, dtype=DT)
        for n in range(N):
            for c in range(C):
                for q in range(Q):
                    S[n, c * P + term.index[n, c, q], c * Q + q] += 1
        inner = dense(Factor(term.factor.B.reshape(K, N, C * Q), term.factor.w), (N, C * Q))
        return S @ inner @ S.transpose(1, 2)
    raise TypeError(type(term))


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5), (2, 2, 3, 3)], ids=str)
def test_term_kinds_against_their_definitions(shape):
    torch.manual_seed(0)
    N, F = shape[0], math.prod(shape[1:])
    for name, term in random_terms(shape).items():
        H = dense(term, shape)
        torch.testing.assert_close(dense(term.as_factor(), shape), H, **TOL, msg=name)
        torch.testing.assert_close(term.diagonal().reshape(N, F), torch.diagonal(H, dim1=1, dim2=2), **TOL, msg=name)
        C = shape[1]
        S = F // C
        Hb = H.reshape(N, C, S, C, S)
        blocks = torch.stack([Hb[:, c, :, c, :] for c in range(C)], 1)  # [N, C, S, S]
        for X in (torch.randn(N, 1, 2, S, dtype=DT), torch.randn(N, C, 2, S, dtype=DT),
                  torch.randn(N, C, 1, S, dtype=DT), torch.randn(1, 1, 1, S, dtype=DT)):
            Xe = X.expand(N, C, X.shape[2], S)
            expected = torch.einsum("ncjs,ncst,ncjt->cj", Xe, blocks, Xe)
            torch.testing.assert_close(term.quadratic(X), expected, **TOL, msg=name)
    curv = Curvature(list(random_terms(shape).values()))
    total = sum(dense(t, shape) for t in curv.terms)
    torch.testing.assert_close(curv.diagonal().reshape(N, F), torch.diagonal(total, dim1=1, dim2=2), **TOL)


ids = [s[0] for s in SETTINGS]


@pytest.mark.parametrize("setting", SETTINGS, ids=ids)
def test_jacobian_products_match_vjp(setting):
    _, rule, tensors, x = make(setting)
    z, state = rule.forward(x, tensors)
    torch.testing.assert_close(z, rule.module(x), **TOL)
    jac = rule.jacobian(state)
    _, pullback = vjp(functools.partial(output, rule, tensors), x)
    B = torch.randn((4,) + tuple(z.shape), dtype=DT)
    torch.testing.assert_close(jac.t_columns(B), vmap(lambda b: pullback(b)[0])(B), **TOL)
    torch.testing.assert_close(jac.t_vector(B[0]), pullback(B[0])[0], **TOL)


@pytest.mark.parametrize("setting", SETTINGS, ids=ids)
def test_every_term_kind_pulls_back_as_jt_h_j(setting):
    _, rule, tensors, x = make(setting)
    z, state = rule.forward(x, tensors)
    jac = rule.jacobian(state)
    J = per_sample_jacobian(functools.partial(output, rule, tensors), x)
    for name, term in random_terms(tuple(z.shape)).items():
        pulled = term.pulled(jac)
        expected = J.transpose(1, 2) @ dense(term, z.shape) @ J
        torch.testing.assert_close(dense(pulled, x.shape), expected, **TOL, msg=name)


@pytest.mark.parametrize("setting", SETTINGS, ids=ids)
def test_residual_is_the_second_derivative_weighted_by_the_gradient(setting):
    _, rule, tensors, x = make(setting)
    z, state = rule.forward(x, tensors)
    g = torch.randn_like(z)
    N, F = x.shape[0], x[0].numel()

    def weighted(xn, gn):
        return (output(rule, tensors, xn.unsqueeze(0))[0] * gn).sum()

    expected = vmap(torch.func.hessian(weighted))(x, g).reshape(N, F, F)
    if not rule.has_residual:
        torch.testing.assert_close(expected, torch.zeros_like(expected), **TOL)
        return
    term = rule.residual(state, g)
    torch.testing.assert_close(dense(term, x.shape), expected, **TOL)


@pytest.mark.parametrize("setting", [s for s in SETTINGS if registry.rule_for(type(s[1]())).parameters], ids=str)
def test_parameter_diagonal_is_diag_of_jt_h_j(setting):
    _, rule, tensors, x = make(setting)
    z, state = rule.forward(x, tensors)
    N, F = z.shape[0], z[0].numel()
    names = [n for n in rule.parameters if n in tensors]
    for name, term in random_terms(tuple(z.shape)).items():
        curv = Curvature([term])
        H = dense(term, z.shape)
        got = rule.parameter_diagonal(state, curv, frozenset(names))
        assert sorted(got) == sorted(names)
        for p in names:
            def out_of(v, p=p):
                return output(rule, {**tensors, p: v}, x)

            Jp = jacrev(out_of)(tensors[p]).reshape(N, F, -1)
            expected = torch.einsum("nfp,nfg,ngp->p", Jp, H, Jp).reshape(tensors[p].shape)
            torch.testing.assert_close(got[p], expected, **TOL, msg=f"{name} {p}")
        total = sum(v.sum() for v in got.values())
        torch.testing.assert_close(rule.parameter_trace(state, curv, frozenset(names)), total, **TOL)


def test_registry_is_open_and_guarded():
    class Twice(nn.Module):
        def forward(self, x):
            return 2 * x

    from secorder.structured import Rule, register_rule
    from secorder.structured.jacobians import Elementwise

    @register_rule(Twice)
    class TwiceRule(Rule):
        def forward(self, x, tensors):
            return 2 * x, x.shape

        def jacobian(self, shape):
            return Elementwise(torch.full(shape, 2.0, dtype=DT), shape)

    assert registry.rule_for(Twice) is TwiceRule
    with pytest.raises(ValueError, match="already has the rule"):
        register_rule(Twice, type("Other", (Rule,), {}))
    with pytest.raises(TypeError, match="module_type"):
        register_rule(int, TwiceRule)
    with pytest.raises(TypeError, match="subclass"):
        register_rule(Twice, object, replace=True)
    import secorder as so

    model = nn.Sequential(nn.Linear(3, 2), Twice()).to(DT)
    f = so.functional_loss(model, nn.MSELoss())
    fn = so.hessian_diag(f)
    x, y = torch.randn(4, 3, dtype=DT), torch.randn(4, 2, dtype=DT)
    d = fn(so.params_dict(model), x, y)
    assert fn.last_engine == "structured"
    ref = so.hessian_diag(f, engine="generic")(so.params_dict(model), x, y)
    for k in d:
        torch.testing.assert_close(d[k], ref[k], **TOL)

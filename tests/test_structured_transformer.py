"""Structured engine on transformer blocks and branches: rules from a settings list, then whole models.

Per rule (float64, random inputs): Jacobian products against ``vmap(vjp)``; the
pull-back of every curvature term kind, tokenwise ones included, against
``J_n^T H_n J_n``; the residual against the second derivative of ``<g, forward(x)>``;
the parameter diagonal against ``diag(sum_n J_n^T H_n J_n)`` for every term kind.
The tokenwise term and the column algebra against their dense definitions. Whole
models (every new module alone and in combination, a two-block transformer
language model with both ways of writing a token-level cross-entropy) against
float64 ``torch.func.hessian``, the GGN ``J^T H J`` and the generic path.
"""

import functools
import math

import pytest
import torch
from torch import nn
from torch.func import jacrev, vjp, vmap

import secorder as so
from secorder.structured import registry
from secorder.structured.columns import add_columns, column_form, narrow
from secorder.structured.curvature import Curvature, Diagonal, Factor
from secorder.structured.rules import attention as attention_rules
from secorder.structured.tokens import FlattenBatch, Tokenwise, channels_first
from secorder.structured.transformer import (PositionalEmbedding, ScaledDotProductAttention, SelfAttention,
                                             Transpose)
from tests.reference import reference_diag
from tests.test_structured_rules import dense, per_sample_jacobian, random_terms

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


# ---- the tokenwise term kind against its definition -----------------------------------------------

def _flat_positions(shape, pos):
    """For each entry of the rows layout (positions, then features), its flat index in the tensor layout."""
    A = torch.arange(math.prod(shape[1:])).reshape(shape[1:])
    feat = [d for d in range(1, len(shape)) if d not in pos]
    return A.permute([p - 1 for p in pos] + [f - 1 for f in feat]).reshape(-1)


def dense_any(term, shape):
    """``[N, F, F]`` per-sample matrices of any term kind, tokenwise ones from their definition."""
    if not isinstance(term, Tokenwise):
        return dense(term, shape)
    N, P = shape[0], term.positions
    feat = tuple(shape[d] for d in range(1, len(shape)) if d not in term.pos)
    F = math.prod(feat)
    R = N * P if term.index is None else term.index.shape[0]
    Q = R // N
    inner = dense_any(term.inner, (R,) + feat)
    target = torch.arange(P).expand(N, P) if term.index is None else term.index.reshape(N, Q)
    M = torch.zeros(N, P, F, P, F, dtype=DT)
    for n in range(N):
        for q in range(Q):
            p = target[n, q]
            M[n, p, :, p, :] += inner[n * Q + q]
    flat = _flat_positions(tuple(shape), term.pos)
    out = torch.zeros(N, P * F, P * F, dtype=DT)
    out[:, flat[:, None], flat[None, :]] = M.reshape(N, P * F, P * F)
    return out


def tokenwise_terms(shape, K=2):
    """Tokenwise terms at ``shape`` (positions: dims 1..-2; also every other single dim and with an index)."""
    shape = tuple(shape)
    nd = len(shape)
    out = {}
    layouts = [tuple(range(1, nd - 1))] + [(d,) for d in range(1, nd - 1) if (d,) != tuple(range(1, nd - 1))]
    layouts += [(nd - 1,)] if nd > 2 else []  # the features before the positions
    for pos in layouts:
        P = math.prod(shape[p] for p in pos)
        feat = tuple(shape[d] for d in range(1, nd) if d not in pos)
        rows = (shape[0] * P,) + feat
        for name, inner in random_terms(rows, K).items():
            out[f"tokenwise{pos}-{name}"] = Tokenwise(inner, shape, pos)
        if pos == layouts[0]:
            Q = P + 1
            idx = torch.randint(0, P, (shape[0] * Q,))
            out[f"tokenwise{pos}-index"] = Tokenwise(Factor(torch.randn((K, shape[0] * Q) + feat, dtype=DT),
                                                            torch.randn(K, shape[0] * Q, dtype=DT)), shape, pos, idx)
    return out


def all_terms(shape):
    return {**random_terms(tuple(shape)), **tokenwise_terms(shape)}


@pytest.mark.parametrize("shape", [(2, 3, 4), (2, 2, 3, 2), (3, 4)], ids=str)
def test_tokenwise_term_against_its_definition(shape):
    torch.manual_seed(0)
    N, F = shape[0], math.prod(shape[1:])
    for name, term in tokenwise_terms(shape).items():
        H = dense_any(term, shape)
        torch.testing.assert_close(dense(term.as_factor(), shape), H, **TOL, msg=name)
        torch.testing.assert_close(term.diagonal().reshape(N, F), torch.diagonal(H, dim1=1, dim2=2), **TOL, msg=name)
        C = shape[1]
        S = F // C
        Hb = H.reshape(N, C, S, C, S)
        blocks = torch.stack([Hb[:, c, :, c, :] for c in range(C)], 1)
        for X in (torch.randn(N, 1, 2, S, dtype=DT), torch.randn(N, C, 1, S, dtype=DT)):
            Xe = X.expand(N, C, X.shape[2], S)
            expected = torch.einsum("ncjs,ncst,ncjt->cj", Xe, blocks, Xe)
            torch.testing.assert_close(term.quadratic(X), expected, **TOL, msg=name)
        # column algebra: the column form is the same matrix; adding a pull-back to itself doubles it
        cf = column_form(term)
        torch.testing.assert_close(dense_any(cf, shape), H, **TOL, msg=name)
        torch.testing.assert_close(dense_any(add_columns(cf, cf), shape), 4 * H, **TOL, msg=name)
        for dim in range(1, len(shape)):
            sl = slice(1, shape[dim])
            sub = narrow(term, dim, 1, shape[dim] - 1)
            sub_shape = list(shape)
            sub_shape[dim] -= 1
            idx = torch.arange(F).reshape(shape[1:])[(slice(None),) * (dim - 1) + (sl,)].reshape(-1)
            torch.testing.assert_close(dense_any(sub, sub_shape), H[:, idx[:, None], idx[None, :]], **TOL,
                                       msg=f"{name} narrow {dim}")


def test_channels_first_is_a_permutation_of_every_term():
    torch.manual_seed(1)
    shape = (2, 3, 4)
    perm_idx = torch.arange(12).reshape(3, 4).t().reshape(-1)  # channels-first entry -> channels-last entry
    for name, term in all_terms(shape).items():
        cf = channels_first(Curvature([term]), shape, 1)
        H = dense_any(term, shape)
        got = sum(dense_any(t, (2, 4, 3)) for t in cf.terms)
        torch.testing.assert_close(got, H[:, perm_idx[:, None], perm_idx[None, :]], **TOL, msg=name)


def test_flatten_batch_makes_any_term_per_position():
    torch.manual_seed(2)
    shape = (2, 3, 4)
    jac = FlattenBatch(shape, 1)
    rows = (6, 4)
    for name, term in {**random_terms(rows), **tokenwise_terms(rows)}.items():
        Hrows = dense_any(term, rows)  # [6, 4, 4]
        expected = torch.zeros(2, 12, 12, dtype=DT)
        for n in range(2):
            for t in range(3):
                expected[n, 4 * t:4 * t + 4, 4 * t:4 * t + 4] = Hrows[3 * n + t]
        torch.testing.assert_close(dense_any(term.pulled(jac), shape), expected, **TOL, msg=name)


# ---- rules from a settings list ----------------------------------------------------------------------

def _ln(shape, affine=True):
    m = nn.LayerNorm(shape, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            m.weight.normal_()
            m.bias.normal_()
    return m


# (id, module factory, input shape)
SETTINGS = [
    ("linear-3d", lambda: nn.Linear(4, 3), (2, 3, 4)),
    ("linear-4d-nobias", lambda: nn.Linear(4, 3, bias=False), (2, 2, 3, 4)),
    ("layernorm-3d", lambda: _ln(4), (2, 3, 4)),
    ("layernorm-2d", lambda: _ln(4), (3, 4)),
    ("layernorm-two-dims", lambda: _ln((2, 3)), (2, 2, 2, 3)),
    ("layernorm-noaffine", lambda: _ln(4, affine=False), (2, 3, 4)),
    ("gelu-3d", nn.GELU, (2, 3, 4)),
    ("dropout-eval-3d", lambda: nn.Dropout(0.3).eval(), (2, 3, 4)),
    ("attention", lambda: ScaledDotProductAttention(2), (2, 3, 12)),
    ("attention-causal", lambda: ScaledDotProductAttention(2, causal=True), (2, 4, 6)),
    ("transpose", lambda: Transpose(1, 2), (2, 3, 4)),
    ("transpose-negative", lambda: Transpose(-1, 1), (2, 2, 3, 2)),
    ("positional-embedding", lambda: PositionalEmbedding(5, 4), (2, 3, 4)),
]
ids = [s[0] for s in SETTINGS]


def make(setting):
    name, factory, shape = setting
    torch.manual_seed(sum(map(ord, name)))
    module = factory().to(DT)
    rule = registry.rule_for(type(module))(module)
    tensors = {n: t.detach() for n, t in list(module.named_parameters()) + list(module.named_buffers())}
    return module, rule, tensors, torch.randn(shape, dtype=DT)


def output(rule, tensors, x):
    return rule.forward(x, tensors)[0]


@pytest.mark.parametrize("setting", SETTINGS, ids=ids)
def test_jacobian_products_match_vjp(setting):
    module, rule, tensors, x = make(setting)
    z, state = rule.forward(x, tensors)
    torch.testing.assert_close(z, module(x), **TOL)
    jac = rule.jacobian(state)
    _, pullback = vjp(functools.partial(output, rule, tensors), x)
    B = torch.randn((3,) + tuple(z.shape), dtype=DT)
    torch.testing.assert_close(jac.t_columns(B), vmap(lambda b: pullback(b)[0])(B), **TOL)
    torch.testing.assert_close(jac.t_vector(B[0]), pullback(B[0])[0], **TOL)


@pytest.mark.parametrize("setting", SETTINGS, ids=ids)
def test_every_term_kind_pulls_back_as_jt_h_j(setting):
    _, rule, tensors, x = make(setting)
    z, state = rule.forward(x, tensors)
    jac = rule.jacobian(state)
    J = per_sample_jacobian(functools.partial(output, rule, tensors), x)
    for name, term in all_terms(tuple(z.shape)).items():
        expected = J.transpose(1, 2) @ dense_any(term, z.shape) @ J
        torch.testing.assert_close(dense_any(term.pulled(jac), x.shape), expected, **TOL, msg=name)


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
    torch.testing.assert_close(dense_any(rule.residual(state, g), x.shape), expected, **TOL)


def _parameter_settings():
    return [s for s in SETTINGS if registry.rule_for(type(s[1]())).parameters and list(s[1]().parameters())]


@pytest.mark.parametrize("setting", _parameter_settings(), ids=lambda s: s[0])
def test_parameter_diagonal_is_diag_of_jt_h_j(setting):
    _, rule, tensors, x = make(setting)
    check_parameter_diagonal(rule, tensors, x)


def check_parameter_diagonal(rule, tensors, x):
    z, state = rule.forward(x, tensors)
    N, F = z.shape[0], z[0].numel()
    names = [n for n in rule.parameters if n in tensors]
    for name, term in all_terms(tuple(z.shape)).items():
        curv = Curvature([term])
        H = dense_any(term, z.shape)
        got = rule.parameter_diagonal(state, curv, frozenset(names))
        assert sorted(got) == sorted(names)
        for p in names:
            Jp = jacrev(lambda v, p=p: output(rule, {**tensors, p: v}, x))(tensors[p]).reshape(N, F, -1)
            expected = torch.einsum("nfp,nfg,ngp->p", Jp, H, Jp).reshape(tensors[p].shape)
            torch.testing.assert_close(got[p], expected, **TOL, msg=f"{name} {p}")
        total = sum(v.sum() for v in got.values())
        torch.testing.assert_close(rule.parameter_trace(state, curv, frozenset(names)), total, **TOL)


@pytest.mark.parametrize("padding_idx", [None, 1])
def test_embedding_parameter_diagonal_with_repeated_tokens(padding_idx):
    torch.manual_seed(3)
    module = nn.Embedding(6, 3, padding_idx=padding_idx).to(DT)
    rule = registry.rule_for(nn.Embedding)(module)
    tensors = {"weight": module.weight.detach()}
    x = torch.tensor([[0, 2, 0, 1], [3, 3, 3, 1]])  # repeats within a sequence, row 4 and 5 unused
    z, _ = rule.forward(x, tensors)
    torch.testing.assert_close(z, module(x), **TOL)
    check_parameter_diagonal(rule, tensors, x) if padding_idx is None else None
    if padding_idx is not None:  # the padding row's diagonal is zero, as its gradient
        z, state = rule.forward(x, tensors)
        d = rule.parameter_diagonal(state, Curvature([Diagonal(torch.ones_like(z))]), frozenset({"weight"}))
        assert bool((d["weight"][1] == 0).all()) and bool((d["weight"][0] > 0).all())


def test_embedding_declines_what_autograd_does_not_differentiate():
    from secorder.structured.errors import Unsupported

    for m in (nn.Embedding(4, 2, max_norm=1.0), nn.Embedding(4, 2, scale_grad_by_freq=True)):
        with pytest.raises(Unsupported):
            registry.rule_for(nn.Embedding)(m)
    rule = registry.rule_for(nn.Embedding)(nn.Embedding(4, 2))
    with pytest.raises(Unsupported, match="integer"):
        rule.forward(torch.zeros(2, 3), {"weight": torch.zeros(4, 2)})
    _, state = rule.forward(torch.zeros(2, 3, dtype=torch.long), {"weight": torch.zeros(4, 2)})
    with pytest.raises(Unsupported, match="first"):
        rule.jacobian(state)


def test_self_attention_is_multihead_attention():
    torch.manual_seed(4)
    d, h, T = 8, 2, 5
    mha = nn.MultiheadAttention(d, h, batch_first=True).to(DT)
    ours = SelfAttention(d, h, causal=True).to(DT)
    with torch.no_grad():
        ours.in_proj.weight.copy_(mha.in_proj_weight)
        ours.in_proj.bias.copy_(mha.in_proj_bias)
        ours.out_proj.weight.copy_(mha.out_proj.weight)
        ours.out_proj.bias.copy_(mha.out_proj.bias)
    x = torch.randn(3, T, d, dtype=DT)
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    torch.testing.assert_close(ours(x), mha(x, x, x, attn_mask=mask, need_weights=False)[0], **TOL)
    with pytest.raises(ValueError, match="divisible"):
        SelfAttention(6, 4)
    with pytest.raises(TypeError, match="causal"):
        ScaledDotProductAttention(2, causal=1)


# ---- whole models against float64 torch.func.hessian, the GGN J^T H J and the generic path ---------

from tests.test_structured import check, reference_ggn_diag, rel_err  # noqa: E402


def _randomise(model, std=0.5):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
    return model


def test_token_mlp_stays_per_token_and_is_exact():
    torch.manual_seed(10)
    d, V = 4, 5
    model = _randomise(nn.Sequential(nn.Linear(3, d), nn.LayerNorm(d), nn.GELU(), nn.Dropout(0.2),
                                     so.Residual(nn.Sequential(nn.Linear(d, d), nn.Tanh())),
                                     nn.Linear(d, V), nn.Flatten(0, 1)))
    x, y = torch.randn(2, 3, 3, dtype=DT), torch.randint(0, V, (6,))
    check(model, nn.CrossEntropyLoss(), x, y)


@pytest.mark.parametrize("merge", ["sum", "concat"])
def test_parallel_branches(merge):
    torch.manual_seed(11)
    width = 8 if merge == "concat" else 4
    mlp = nn.Sequential(nn.Linear(3, 4), so.Parallel(nn.Sequential(nn.Linear(4, 4), nn.Tanh()),
                                                     nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 4)),
                                                     merge=merge),
                        nn.Sigmoid(), nn.Linear(width, 3))
    check(mlp, nn.CrossEntropyLoss(), torch.randn(5, 3, dtype=DT), torch.randint(0, 3, (5,)))
    tokens = nn.Sequential(nn.Linear(3, 4), so.Parallel(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)), nn.GELU(),
                                                        merge=merge, dim=-1),
                           nn.Linear(width, 3), nn.Flatten(0, 1))
    check(tokens, nn.CrossEntropyLoss(reduction="sum"), torch.randn(2, 3, 3, dtype=DT), torch.randint(0, 3, (6,)))


def test_parallel_checks_its_arguments():
    with pytest.raises(ValueError, match="merge"):
        so.Parallel(nn.Identity(), merge="max")
    with pytest.raises(TypeError, match="branches"):
        so.Parallel(lambda x: x)
    with pytest.raises(ValueError, match="dim"):
        so.Parallel(nn.Identity(), merge="concat", dim=0)
    model = nn.Sequential(so.Parallel(nn.Linear(3, 2), nn.Linear(3, 4))).to(DT)  # sums different shapes
    f = so.functional_loss(model, nn.MSELoss())
    with pytest.raises(ValueError, match="different shapes"):
        so.trace(f, engine="structured")(so.params_dict(model), torch.randn(2, 3, dtype=DT), torch.randn(2, 2, dtype=DT))


def test_self_attention_with_a_sequence_output_mse():
    torch.manual_seed(12)
    model = _randomise(nn.Sequential(nn.Linear(3, 4), so.Residual(SelfAttention(4, 2)), nn.Tanh(),
                                     SelfAttention(4, 1, causal=True, bias=False)))
    check(model, nn.MSELoss(), torch.randn(2, 3, 3, dtype=DT), torch.randn(2, 3, 4, dtype=DT))


def language_model(V=5, d=4, heads=2, T=3, blocks=2, end=None):
    def block():
        return nn.Sequential(
            so.Residual(nn.Sequential(nn.LayerNorm(d), SelfAttention(d, heads, causal=True))),
            so.Residual(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.1),
                                      nn.Linear(2 * d, d))))

    layers = [nn.Embedding(V, d), so.PositionalEmbedding(T + 1, d)] + [block() for _ in range(blocks)]
    layers += [nn.LayerNorm(d), nn.Linear(d, V), end if end is not None else nn.Flatten(0, 1)]
    return _randomise(nn.Sequential(*layers)).to(DT).eval()


def test_two_block_language_model_flattened_logits():
    torch.manual_seed(13)
    model = language_model()
    x = torch.tensor([[1, 3, 1], [4, 4, 0]])  # repeated tokens within a sequence
    y = torch.tensor([3, 1, 2, 4, 0, -100])  # the last token ignored
    check(model, nn.CrossEntropyLoss(), x, y)


@pytest.mark.parametrize("module,reason", [(nn.RNN(3, 3), "recurrent"), (nn.LSTM(3, 3), "recurrent"),
                                           (nn.GRU(3, 3), "recurrent"),
                                           (nn.MultiheadAttention(4, 2), "so.SelfAttention")])
def test_declined_modules_say_why(module, reason):
    from secorder.structured import walker
    from secorder.structured.errors import Unsupported

    with pytest.raises(Unsupported, match=reason) as err:
        walker.plan(nn.Sequential(nn.Linear(3, 3), module))
    assert err.value.module == "1"


def test_two_block_language_model_logits_by_vocab_and_token():
    # nn.CrossEntropyLoss on [N, vocab, T] logits with [N, T] targets; probability targets too
    torch.manual_seed(14)
    model = language_model(end=Transpose(1, 2))
    x = torch.tensor([[2, 0, 2], [1, 3, 3]])
    check(model, nn.CrossEntropyLoss(ignore_index=0), x, torch.tensor([[1, 0, 4], [2, 2, 3]]))
    probs = torch.softmax(torch.randn(2, 5, 3, dtype=DT), 1)
    check(model, nn.CrossEntropyLoss(reduction="sum"), x, probs, ggn=True)


def test_token_level_curvature_stays_per_token_until_attention(monkeypatch):
    # Per-token layers pull C columns per token; only attention makes per-sequence columns.
    calls = []
    original = Tokenwise.as_factor
    monkeypatch.setattr(Tokenwise, "as_factor", lambda self: calls.append(self.shape) or original(self))
    torch.manual_seed(15)
    d, V = 4, 5
    per_token = nn.Sequential(nn.Embedding(V, d), so.PositionalEmbedding(3, d), nn.LayerNorm(d),
                              so.Residual(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.1),
                                                        nn.Linear(2 * d, d))),
                              nn.LayerNorm(d), nn.Linear(d, V)).to(DT).eval()
    x = torch.randint(0, V, (2, 3))
    for end, y in ((nn.Flatten(0, 1), torch.randint(0, V, (6,))), (Transpose(1, 2), torch.randint(0, V, (2, 3)))):
        model = nn.Sequential(*per_token, end)
        f = so.functional_loss(model, nn.CrossEntropyLoss())
        params = so.params_dict(model)
        for transform in (so.ggn_diag, so.hessian_diag):
            fn = transform(f, engine="structured")
            d_ = fn(params, x, y)
            assert calls == [], calls
            ref = (reference_ggn_diag(f, params, x, y) if transform is so.ggn_diag
                   else reference_diag(f, (params, x, y)))
            assert rel_err(d_, ref) < 1e-10
    with_attention = nn.Sequential(*per_token[:3], so.Residual(SelfAttention(d, 2, causal=True)), *per_token[3:],
                                   nn.Flatten(0, 1)).to(DT)
    f = so.functional_loss(with_attention, nn.CrossEntropyLoss())
    so.ggn_diag(f, engine="structured")(so.params_dict(with_attention), x, torch.randint(0, V, (6,)))
    assert calls  # the attention block made per-sequence columns


def test_language_model_hessian_above_the_residual_bound_falls_back_and_says_why(monkeypatch):
    torch.manual_seed(16)
    model = language_model(blocks=1)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randint(0, 5, (2, 3)), torch.randint(0, 5, (6,))
    monkeypatch.setattr(attention_rules, "MAX_RESIDUAL_ENTRIES", 100)
    fn = so.hessian_diag(f)
    d = fn(params, x, y)
    assert fn.last_engine == "generic" and "MAX_RESIDUAL_ENTRIES" in fn.last_fallback_reason
    assert rel_err(d, reference_diag(f, (params, x, y))) < 1e-10
    g_fn = so.ggn_diag(f)
    g_fn(params, x, y)
    assert g_fn.last_engine == "structured"


def test_training_mode_dropout_and_embedding_options_fall_back_naming_the_module():
    model = language_model(blocks=1).train()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randint(0, 5, (2, 3)), torch.randint(0, 5, (6,))
    with pytest.raises(ValueError, match=r"'2\.1\.body\.3' \(Dropout\).*eval"):
        so.ggn_diag(f, engine="structured")(params, x, y)
    model = language_model(blocks=1)
    model[0].max_norm = 1.0
    with pytest.raises(ValueError, match=r"'0' \(Embedding\).*max_norm"):
        so.ggn_diag(so.functional_loss(model, nn.CrossEntropyLoss()), engine="structured")(params, x, y)


def test_live_model_entry_point_on_a_language_model():
    from secorder.structured import model_diagonal

    torch.manual_seed(17)
    model = language_model()
    x, y = torch.randint(0, 5, (2, 3)), torch.randint(0, 5, (6,))
    got = model_diagonal(model, nn.CrossEntropyLoss(), x, y, kind="ggn")
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    ref = reference_ggn_diag(f, so.params_dict(model), x, y)
    for g, r in zip(got, ref.values()):
        torch.testing.assert_close(g, r, **TOL)


# ---- inside torch.func transforms and torch.compile --------------------------------------------------

def test_attention_model_under_vmap_and_grad():
    from tests.reference import reference_trace

    torch.manual_seed(18)
    d, V = 4, 5
    # no LayerNorm here: torch.func's third derivatives through layer_norm disagree with finite differences
    model = _randomise(nn.Sequential(nn.Embedding(V, d), so.PositionalEmbedding(3, d),
                                     so.Residual(SelfAttention(d, 2, causal=True)),
                                     so.Residual(nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))),
                                     nn.Linear(d, V), nn.Flatten(0, 1))).to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params, x, y = so.params_dict(model), torch.randint(0, V, (2, 3)), torch.randint(0, V, (6,))
    trace = so.trace(f, engine="structured")
    g = torch.func.grad(lambda p: trace(p, x, y))(params)
    ref = torch.func.grad(lambda p: reference_trace(f, (p, x, y)))(params)
    for k in params:
        torch.testing.assert_close(g[k], ref[k], rtol=1e-9, atol=1e-12)
    stacked = {k: torch.stack([v, 0.5 * v]) for k, v in params.items()}
    for make in (so.trace, so.ggn_trace):
        fn = make(f, engine="structured")
        out = vmap(fn, in_dims=(0, None, None))(stacked, x, y)
        torch.testing.assert_close(out, torch.stack([fn({k: v[i] for k, v in stacked.items()}, x, y)
                                                     for i in range(2)]), **TOL)
    # torch.compile(functional_call_diag, fullgraph=True) traces these rules too (no graph break; checked
    # by hand: a minute of Dynamo tracing, too slow for the suite; tests/test_structured_compose.py covers it).


def test_empty_batch_gives_zero_curvature_on_the_structured_path():
    model = language_model()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    for transform in (so.ggn_diag, so.hessian_diag):
        fn = transform(f, engine="structured")
        d = fn(so.params_dict(model), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        assert all(v.shape == p.shape and bool((v == 0).all()) for v, p in zip(d.values(), model.parameters()))


@pytest.mark.parametrize("curvature", ["fisher", "empirical_fisher"])
def test_fisher_kinds_on_a_language_model_match_the_generic_path(curvature):
    torch.manual_seed(19)
    for end, y in ((None, torch.randint(0, 5, (6,))), (Transpose(1, 2), torch.randint(0, 5, (2, 3)))):
        model = language_model(blocks=1, end=end)
        f = so.functional_loss(model, nn.CrossEntropyLoss())
        params, x = so.params_dict(model), torch.randint(0, 5, (2, 3))
        options = dict(curvature=curvature, seed=3, mc_samples=2) if curvature == "fisher" else dict(curvature=curvature)
        fn = so.diagonal(f, **options)
        d = fn(params, x, y)
        assert fn.last_engine == "structured"
        if curvature == "fisher" and end is None:
            # Flattened logits: the structured engine sums a sequence's sampled token gradients
            # into one column, which is what the generic Fisher of [N, vocab, T] logits does
            # (its samples are sequences): the same labels, the same estimate.
            seq = language_model(blocks=1, end=Transpose(1, 2))
            seq.load_state_dict(model.state_dict())
            g = so.functional_loss(seq, nn.CrossEntropyLoss())
            ref = so.diagonal(g, engine="generic", **options)(params, x, y.reshape(2, 3))
        else:
            ref = so.diagonal(f, engine="generic", **options)(params, x, y)
        assert rel_err(d, ref) < 1e-10


def _flat_lm(T=4, V=6, blocks=2):
    torch.manual_seed(23)
    model = language_model(V=V, T=T, blocks=blocks)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    x = torch.randint(0, V, (3, T))
    y = torch.randint(0, V, (3 * T,))
    y[-1] = -100  # an ignored token
    return model, f, so.params_dict(model), x, y


def test_summed_token_fisher_costs_a_few_columns_per_sequence(monkeypatch):
    # Through the attention layers: one column per sequence and label draw, not one per token.
    from secorder.structured.rules.attention import AttentionJacobian

    seen = []
    original = AttentionJacobian.pull_factor

    def counting(self, t):
        seen.append(t.B.shape[0])
        return original(self, t)

    monkeypatch.setattr(AttentionJacobian, "pull_factor", counting)
    model, f, params, x, y = _flat_lm()
    so.diagonal(f, curvature="fisher", seed=0, mc_samples=2, engine="structured")(params, x, y)
    assert seen and max(seen) == 2, seen  # mc_samples columns, whatever T (4) and the vocabulary (6)


def test_summed_token_fisher_is_unbiased_for_the_ggn_diagonal():
    # E over the labels = the GGN diagonal (the Fisher of cross-entropy); the tolerance is
    # 4 standard errors of the mean, from the sample variance of the seeds.
    model, f, params, x, y = _flat_lm()
    ggn = so.ggn_diag(f, engine="generic")(params, x, y)
    seeds = 300
    draws = [so.diagonal(f, curvature="fisher", seed=s, engine="structured")(params, x, y) for s in range(seeds)]
    scale = max(float(v.abs().max()) for v in ggn.values())
    for k in ggn:
        stack = torch.stack([d[k] for d in draws])
        mean, se = stack.mean(0), stack.std(0) / math.sqrt(seeds)
        # (entries whose curvature is zero, such as the key bias of attention, are rounding on both sides)
        assert bool(((mean - ggn[k]).abs() <= 4.5 * se + 1e-12 * scale).all()), \
            (k, float(((mean - ggn[k]).abs() / se.clamp(min=1e-300)).max()))

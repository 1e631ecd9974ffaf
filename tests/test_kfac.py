"""K-FAC and EK-FAC (so.kfac, so.ekfac, curvature="kfac"/"ekfac").

References: curvlinops 3.0.1's KFACLinearOperator / EKFACLinearOperator /
KFACInverseLinearOperator (dense, float64) for every fisher_type and kfac_approx it
has; the GGN (so.trace / so.diagonal, themselves tested against torch.func) for what
K-FAC is exact for; dense linear algebra for every method of K.
"""

import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
import torch.nn.functional as F

import secorder as so
from secorder import tree
from secorder.kronecker.blocks import EigenBlock, KronBlock
from secorder.kronecker.layers import RULES, Call

curvlinops = pytest.importorskip("curvlinops")

D = torch.float64
TOL = dict(rtol=1e-9, atol=1e-12)


def seeded(seed):
    torch.manual_seed(seed)
    return seed


def model_order(K, params):
    """K's dense matrix (ravel order: sorted keys) in the model's parameter order (curvlinops' order)."""
    names = list(params)
    sizes = {k: params[k].numel() for k in names}
    offsets, o = {}, 0
    for k in sorted(names):
        offsets[k] = o
        o += sizes[k]
    idx = torch.cat([torch.arange(offsets[k], offsets[k] + sizes[k]) for k in names])
    return K.to_dense()[idx][:, idx]


def curvlinops_dense(model, loss, x, y, fisher_type, approx, ekfac=False, **kw):
    cls = curvlinops.EKFACLinearOperator if ekfac else curvlinops.KFACLinearOperator
    params = list(model.parameters())
    op = cls(model, loss, params, [(x, y)], fisher_type=fisher_type, kfac_approx=approx, check_deterministic=False,
             **kw)
    return op @ torch.eye(sum(p.numel() for p in params), dtype=D)


def mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)


def cnn():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.ReLU(), nn.MaxPool2d(1),
                         nn.Conv2d(3, 2, 2), nn.Flatten(), nn.Linear(8, 4)).to(D)


def tokens():
    """Linear layers on (N, T, D) token inputs, per-token outputs (N, T, C)."""
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).to(D)


class Pool(nn.Module):
    def forward(self, x):
        return x.mean(1)


class ClassesFirst(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)  # [N, T, C] -> [N, C, T], cross-entropy's layout


def tokens_ce():
    """Per-token classification: (N, T, D) inputs, (N, C, T) logits."""
    return nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3), ClassesFirst()).to(D)


def tokens_pooled():
    """Linear layers on (N, T, D) token inputs, pooled to (N, C) outputs (EK-FAC's per-sample gradients)."""
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), Pool(), nn.Linear(6, 3)).to(D)


def data(name, n=None):
    g = torch.Generator().manual_seed(7)
    if name == "mlp-ce":
        n = n or 12
        return mlp, nn.CrossEntropyLoss(), torch.randn(n, 5, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)
    if name == "mlp-mse":
        n = n or 12
        return mlp, nn.MSELoss(), torch.randn(n, 5, generator=g, dtype=D), torch.randn(n, 3, generator=g, dtype=D)
    if name == "mlp-mse-sum":
        n = n or 12
        return (mlp, nn.MSELoss(reduction="sum"), torch.randn(n, 5, generator=g, dtype=D),
                torch.randn(n, 3, generator=g, dtype=D))
    if name == "mlp-bce":
        n = n or 12
        return (mlp, nn.BCEWithLogitsLoss(), torch.randn(n, 5, generator=g, dtype=D),
                torch.randint(0, 2, (n, 3), generator=g).to(D))
    if name == "cnn-ce":
        n = n or 40  # more samples than reduce's input factor has rows: a unique eigenbasis for EK-FAC
        return cnn, nn.CrossEntropyLoss(), torch.randn(n, 2, 6, 6, generator=g, dtype=D), torch.randint(0, 4, (n,), generator=g)
    if name == "tokens-mse":
        n = n or 6
        return (tokens, nn.MSELoss(), torch.randn(n, 4, 5, generator=g, dtype=D),
                torch.randn(n, 4, 3, generator=g, dtype=D))
    if name == "tokens-ce":
        n = n or 6
        return (tokens_ce, nn.CrossEntropyLoss(), torch.randn(n, 4, 5, generator=g, dtype=D),
                torch.randint(0, 3, (n, 4), generator=g))
    if name == "tokens-pooled-ce":
        n = n or 12
        return (tokens_pooled, nn.CrossEntropyLoss(), torch.randn(n, 4, 5, generator=g, dtype=D),
                torch.randint(0, 3, (n,), generator=g))
    raise KeyError(name)


KFAC_CASES = [(c, ft, ap) for c in ("mlp-ce", "mlp-mse", "mlp-mse-sum", "mlp-bce", "cnn-ce", "tokens-mse", "tokens-ce")
              for ft in ("type-2", "empirical", "forward-only") for ap in ("expand", "reduce")]
EKFAC_CASES = [(c, ft, ap) for c in ("mlp-ce", "mlp-mse", "cnn-ce", "tokens-pooled-ce")
               for ft in ("type-2", "empirical") for ap in ("expand", "reduce")]


@pytest.mark.parametrize("case,fisher_type,approx", KFAC_CASES)
def test_kfac_equals_curvlinops(case, fisher_type, approx):
    seeded(0)
    make, loss, x, y = data(case)
    model = make()
    params = so.params_dict(model)
    K = so.kfac(so.functional_loss(model, loss), fisher_type=fisher_type, kfac_approx=approx)(params, x, y)
    want = curvlinops_dense(model, loss, x, y, fisher_type, approx)
    torch.testing.assert_close(model_order(K, params), want, **TOL)


@pytest.mark.parametrize("case,fisher_type,approx", EKFAC_CASES)
def test_ekfac_equals_curvlinops(case, fisher_type, approx):
    seeded(0)
    make, loss, x, y = data(case)
    model = make()
    params = so.params_dict(model)
    K = so.ekfac(so.functional_loss(model, loss), fisher_type=fisher_type, kfac_approx=approx)(params, x, y)
    want = curvlinops_dense(model, loss, x, y, fisher_type, approx, ekfac=True)
    torch.testing.assert_close(model_order(K, params), want, **TOL)


def test_factors_equal_curvlinops_factors():
    """Not only the products: A and G themselves, in curvlinops' scaling (1/N for A, 1/(N C) for a mean)."""
    seeded(1)
    make, loss, x, y = data("tokens-mse")
    model = make()
    K = so.kfac(so.functional_loss(model, loss), fisher_type="empirical")(so.params_dict(model), x, y)
    op = curvlinops.KFACLinearOperator(model, loss, list(model.parameters()), [(x, y)], fisher_type="empirical",
                                       check_deterministic=False)
    op.compute_kronecker_factors()
    for layer, name in zip(K.layers, ("0", "2")):
        torch.testing.assert_close(layer.A, op._input_covariances[name], **TOL)
        torch.testing.assert_close(layer.G, op._gradient_covariances[name], **TOL)
    assert [layer.info.kind for layer in K.layers] == ["Linear", "Linear"]
    assert [layer.info.name for layer in K.layers] == ["0", "2"]


def test_mc_fisher_is_type2_in_expectation():
    """E[K_mc] = K_type-2 (rows do not mix in an MLP); bound: 5 standard errors of 40 seeded draws."""
    seeded(2)
    make, loss, x, y = data("mlp-ce", n=6)
    model = make()
    params, f = so.params_dict(model), so.functional_loss(model, loss)
    want = so.kfac(f)(params, x, y)
    draws = torch.stack([so.kfac(f, fisher_type="mc", mc_samples=3, seed=s)(params, x, y).to_dense()
                         for s in range(40)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert bool(((mean - want.to_dense()).abs() <= 5 * se + 1e-12).all())
    # the same seed gives the same labels; mc_samples averages the draws
    a = so.kfac(f, fisher_type="mc", seed=3)(params, x, y).to_dense()
    torch.testing.assert_close(a, so.kfac(f, fisher_type="mc", seed=3)(params, x, y).to_dense(), rtol=0, atol=0)
    g = torch.Generator().manual_seed(3)
    b = so.kfac(f, fisher_type="mc", generator=g)(params, x, y).to_dense()
    assert not torch.equal(b, so.kfac(f, fisher_type="mc", generator=g)(params, x, y).to_dense())


def test_ekfac_mc_trace_is_the_ggn_trace_in_expectation():
    """EK-FAC's trace is the summed squared per-sample gradients: the GGN's trace in expectation (5 standard errors)."""
    seeded(3)
    make, loss, x, y = data("mlp-ce", n=6)
    model = make()
    params, f = so.params_dict(model), so.functional_loss(model, loss)
    traces = torch.stack([so.ekfac(f, fisher_type="mc", seed=s)(params, x, y).trace() for s in range(40)])
    ggn = so.trace(f, curvature="ggn")(params, x, y)
    assert abs(float(traces.mean() - ggn)) <= 5 * float(traces.std() / math.sqrt(40))
    # type-2 EK-FAC is exact in its own eigenbasis: the GGN's trace and block-diagonal traces exactly
    torch.testing.assert_close(so.ekfac(f)(params, x, y).trace(), ggn, **TOL)


# -- every method of K against the dense matrix -----------------------------------------------


def embedding_model():
    return nn.Sequential(nn.Embedding(7, 4, padding_idx=0), nn.Tanh(), Pool(), nn.Linear(4, 3)).to(D)


def method_cases():
    seeded(4)
    make, loss, x, y = data("mlp-mse", n=10)
    model = make()
    f = so.functional_loss(model, loss)
    yield "kfac-mlp", so.kfac(f)(so.params_dict(model), x, y), so.params_dict(model)
    yield "ekfac-mlp", so.ekfac(f, fisher_type="empirical")(so.params_dict(model), x, y), so.params_dict(model)
    yield "forward-only", so.kfac(f, fisher_type="forward-only", kfac_approx="reduce")(
        so.params_dict(model), x, y), so.params_dict(model)
    emb = embedding_model()
    g = torch.Generator().manual_seed(0)
    idx, yc = torch.randint(0, 7, (9, 5), generator=g), torch.randint(0, 3, (9,), generator=g)
    fe = so.functional_loss(emb, nn.CrossEntropyLoss())
    yield "kfac-embedding", so.kfac(fe)(so.params_dict(emb), idx, yc), so.params_dict(emb)
    yield "ekfac-embedding", so.ekfac(fe)(so.params_dict(emb), idx, yc), so.params_dict(emb)


@pytest.mark.parametrize("name", ["kfac-mlp", "ekfac-mlp", "forward-only", "kfac-embedding", "ekfac-embedding"])
def test_every_method_against_the_dense_matrix(name):
    K, params = next((k, p) for n, k, p in method_cases() if n == name)
    M = K.to_dense()
    n = M.shape[0]
    assert torch.allclose(M, M.T, **TOL)
    flat, unravel = tree.ravel(params)
    v = torch.randn(n, dtype=D, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(tree.ravel(K.mv(unravel(v)))[0], M @ v, **TOL)
    torch.testing.assert_close(tree.ravel(K.diagonal())[0], M.diagonal(), **TOL)
    torch.testing.assert_close(K.trace(), M.trace(), **TOL)
    evals = torch.linalg.eigvalsh(M)
    torch.testing.assert_close(K.eigenvalues(), evals.flip(0).clamp_min(0), rtol=1e-8, atol=1e-10)
    for damping in (1e-2, 0.5):
        Md = M + damping * torch.eye(n, dtype=D)
        torch.testing.assert_close(tree.ravel(K.solve(unravel(v), damping))[0], torch.linalg.solve(Md, v),
                                   rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(K.logdet(damping), torch.linalg.slogdet(Md)[1], rtol=1e-9, atol=1e-9)
        inv = K.inverse(damping)
        assert inv.method == "inverse" and inv.damping == damping
        torch.testing.assert_close(inv.to_dense(), torch.linalg.inv(Md), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(tree.ravel(inv.mv(unravel(v)))[0], torch.linalg.solve(Md, v), rtol=1e-8,
                                   atol=1e-10)
        torch.testing.assert_close(tree.ravel(inv.diagonal())[0], torch.linalg.inv(Md).diagonal(), rtol=1e-8,
                                   atol=1e-10)
        torch.testing.assert_close(inv.trace(), torch.linalg.inv(Md).trace(), rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(inv.logdet(), -torch.linalg.slogdet(Md)[1], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(inv.inverse(0.0).to_dense(), Md, rtol=1e-8, atol=1e-10)  # back again


def test_inverse_equals_curvlinops_exact_damping():
    """K.solve(v, damping) == KFACInverseLinearOperator(use_exact_damping=True) @ v (the benchmark's check too)."""
    seeded(5)
    make, loss, x, y = data("cnn-ce", n=8)
    model = make()
    params = so.params_dict(model)
    K = so.kfac(so.functional_loss(model, loss))(params, x, y)
    op = curvlinops.KFACLinearOperator(model, loss, list(model.parameters()), [(x, y)], fisher_type="type-2",
                                       check_deterministic=False)
    inv = curvlinops.KFACInverseLinearOperator(op, damping=1e-3, use_exact_damping=True)
    V = [torch.randn_like(p) for p in model.parameters()]
    want = inv @ V
    got = K.solve(dict(zip(params, V)), 1e-3)
    for w, name in zip(want, params):
        torch.testing.assert_close(got[name], w, rtol=1e-8, atol=1e-10)


# -- the fast (Kronecker) paths against the generic (eigen) path and the dense matrix ---------


def _factor(kind, n, g):
    if kind == "none":
        return None
    if kind == "diag":
        return torch.rand(n, generator=g, dtype=D)
    B = torch.randn(n, n + 1, generator=g, dtype=D)
    return B @ B.T


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), cols=st.integers(1, 4), left=st.sampled_from(["dense", "diag"]),
       right=st.sampled_from(["dense", "diag", "none"]), seed=st.integers(0, 2**16), damping=st.floats(1e-3, 2.0))
def test_kron_block_fast_paths_equal_the_eigen_path(rows, cols, left, right, seed, damping):
    g = torch.Generator().manual_seed(seed)
    L, R = _factor(left, rows, g), _factor(right, cols, g)
    cols = 1 if R is None else cols
    block = KronBlock(L, R)
    eig = block.eigen()
    dense = block.dense()
    V = torch.randn(3, rows, cols, generator=g, dtype=D)
    torch.testing.assert_close(block.apply(V), eig.apply(V), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(block.apply(V).reshape(3, -1), V.reshape(3, -1) @ dense, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(block.diagonal(), eig.diagonal(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(block.trace(), eig.trace(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(eig.dense(), dense, rtol=1e-9, atol=1e-10)
    inv = block.inverse(damping).dense()
    torch.testing.assert_close(inv, torch.linalg.inv(dense + damping * torch.eye(rows * cols, dtype=D)),
                               rtol=1e-7, atol=1e-9)
    assert isinstance(block.inverse(damping), EigenBlock)


# -- layers ----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=30, deadline=None)
@given(d=st.integers(1, 3), k=st.integers(1, 3), stride=st.integers(1, 2), dilation=st.integers(1, 2),
       padding=st.sampled_from([0, 1, 2, "same", "valid"]), seed=st.integers(0, 2**16))
def test_conv_patches_reproduce_the_convolution(d, k, stride, dilation, padding, seed):
    """Patches times the flattened weight is the convolution's output, for 1-, 2- and 3-d convolutions."""
    if padding == "same" and stride != 1:
        return  # PyTorch refuses padding="same" with strides
    g = torch.Generator().manual_seed(seed)
    size = (k - 1) * dilation + 1 + 2
    x = torch.randn((2, 3) + (size,) * d, generator=g, dtype=D)
    w = torch.randn((4, 3) + (k,) * d, generator=g, dtype=D)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[d]
    y = conv(x, w, None, stride, padding, dilation)
    rule = RULES.get(conv)
    call = Call(rule, 0, None, x, rule.options(dict(input=x, weight=w, bias=None, stride=stride, padding=padding,
                                                    dilation=dilation, groups=1)), tuple(w.shape), D)
    P = rule.features(call)
    torch.testing.assert_close(P @ w.reshape(4, -1).T, y.flatten(2).transpose(1, 2), rtol=1e-10, atol=1e-10)
    # reduce: the mean patch, on a strided view
    A_reduce, rows = rule.input_factor(call, "reduce")
    mean = P.mean(1)
    torch.testing.assert_close(A_reduce, mean.T @ mean, rtol=1e-10, atol=1e-10)
    assert rows == 2


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_conv1d_and_conv3d_equal_the_conv2d_they_embed(approx):
    """A Conv1d (kernel k) and a Conv3d (kernel (k1, k2, 1) on depth 1) are Conv2d's: same K-FAC as curvlinops'."""
    seeded(6)
    x = torch.randn(6, 2, 7, dtype=D)
    y = torch.randint(0, 3, (6,))
    c1 = nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).to(D)
    c2 = nn.Sequential(nn.Conv2d(2, 3, (1, 3), stride=(1, 2), padding=(0, 1)), nn.Tanh(), nn.Flatten(),
                       nn.Linear(12, 3)).to(D)
    c3 = nn.Sequential(nn.Conv3d(2, 3, (1, 3, 1), stride=(1, 2, 1), padding=(0, 1, 0)), nn.Tanh(), nn.Flatten(),
                       nn.Linear(12, 3)).to(D)
    with torch.no_grad():
        c2[0].weight.copy_(c1[0].weight.unsqueeze(2))
        c3[0].weight.copy_(c1[0].weight.unsqueeze(2).unsqueeze(-1))
        for m in (c2, c3):
            m[0].bias.copy_(c1[0].bias)
            m[3].load_state_dict(c1[3].state_dict())
    loss = nn.CrossEntropyLoss()
    want = curvlinops_dense(c2, loss, x.unsqueeze(2), y, "type-2", approx)
    for model, inputs in ((c1, x), (c3, x.unsqueeze(2).unsqueeze(-1))):
        params = so.params_dict(model)
        K = so.kfac(so.functional_loss(model, loss), kfac_approx=approx)(params, inputs, y)
        torch.testing.assert_close(model_order(K, params), want, **TOL)
        assert K.layers[0].info.kind == type(model[0]).__name__


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_embedding_is_the_one_hot_linear(approx, method):
    """An Embedding's block is the one-hot Linear's (transposed layout), padding_idx rows count nothing."""
    seeded(8)
    emb = embedding_model()
    lin = nn.Sequential(nn.Linear(7, 4, bias=False), nn.Tanh(), Pool(), nn.Linear(4, 3)).to(D)
    with torch.no_grad():
        lin[0].weight.copy_(emb[0].weight.T)
        lin[0].weight[:, 0] = 0  # the padding row's embedding is zero and receives no gradient
        emb[0].weight[0] = 0
        lin[3].load_state_dict(emb[3].state_dict())
    idx, y = torch.randint(0, 7, (30, 5)), torch.randint(0, 3, (30,))
    onehot = F.one_hot(idx, 7).to(D) * (idx != 0).unsqueeze(-1).to(D)
    loss = nn.CrossEntropyLoss()
    transform = getattr(so, method)
    Ke = transform(so.functional_loss(emb, loss), kfac_approx=approx)(so.params_dict(emb), idx, y)
    Kl = transform(so.functional_loss(lin, loss), kfac_approx=approx)(so.params_dict(lin), onehot, y)
    # the Embedding weight [V, D] is the Linear weight [D, V] transposed: permute the Linear's block
    perm = torch.arange(28).reshape(4, 7).T.reshape(-1)
    lin_block = Kl.to_dense()[:28, :28][perm][:, perm]  # '0.weight' is first in ravel order for both
    keep = torch.ones(28, dtype=torch.bool)
    keep[:4] = False  # row 0 (padding): no gradient, zero curvature in both
    torch.testing.assert_close(Ke.to_dense()[:28, :28][keep][:, keep], lin_block[keep][:, keep], **TOL)
    assert float(Ke.to_dense()[:4].abs().max()) == 0.0
    torch.testing.assert_close(Ke.to_dense()[28:, 28:], Kl.to_dense()[28:, 28:], **TOL)
    if approx == "expand" and method == "kfac":
        assert Ke.layers[0].A.dim() == 1  # the token counts: a diagonal factor, never V x V


# -- data sets -------------------------------------------------------------------------------


@pytest.mark.parametrize("method,fisher_type,approx", [("kfac", "type-2", "expand"), ("kfac", "empirical", "reduce"),
                                                       ("kfac", "forward-only", "expand"),
                                                       ("ekfac", "type-2", "reduce"), ("ekfac", "empirical", "expand")])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_dataset_loss_equals_one_big_batch(method, fisher_type, approx, reduction):
    seeded(9)
    make, loss, x, y = data("tokens-pooled-ce", n=11)
    loss = nn.CrossEntropyLoss(reduction=reduction)
    model = make()
    params, f = so.params_dict(model), so.functional_loss(model, loss)
    transform = getattr(so, method)
    batches = [(x[:4], y[:4]), (x[4:5], y[4:5]), (x[5:], y[5:])]
    F_ = so.dataset_loss(f, batches, reduction=reduction)
    got = transform(F_, fisher_type=fisher_type, kfac_approx=approx)(params)
    want = transform(f, fisher_type=fisher_type, kfac_approx=approx)(params, x, y)
    torch.testing.assert_close(got.to_dense(), want.to_dense(), rtol=1e-9, atol=1e-11)
    # and through the curvature registry: the trace from the factors, one pass
    torch.testing.assert_close(so.trace(F_, curvature=so.kfac_curvature(method, fisher_type=fisher_type,
                                                                        kfac_approx=approx))(params), want.trace(),
                               rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_other_parameters_get_the_exact_diagonal(method):
    """other="diagonal": a LayerNorm's parameters get the exact diagonal of the matching curvature, over data sets too."""
    seeded(16)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    x, y = torch.randn(9, 5, dtype=D), torch.randint(0, 3, (9,))
    params, f = so.params_dict(model), so.functional_loss(model, nn.CrossEntropyLoss())
    transform = getattr(so, method)
    for fisher_type, curvature in (("type-2", "ggn"), ("empirical", "empirical_fisher")):
        K = transform(f, fisher_type=fisher_type, other="diagonal")(params, x, y)
        exact = so.diagonal(f, curvature=curvature)(params, x, y)
        d = K.diagonal()
        for name in ("1.weight", "1.bias"):
            torch.testing.assert_close(d[name], exact[name], **TOL)
        assert [layer.info.kind for layer in K.layers][-2:] == [f"diagonal ({curvature})"] * 2
        # the blocks of the other leaves are diagonal in every method
        M = K.to_dense()
        v = torch.randn(M.shape[0], dtype=D)
        flat, unravel = tree.ravel(params)
        torch.testing.assert_close(tree.ravel(K.solve(unravel(v), 0.1))[0],
                                   torch.linalg.solve(M + 0.1 * torch.eye(M.shape[0], dtype=D), v), rtol=1e-8,
                                   atol=1e-10)
        F_ = so.dataset_loss(f, [(x[:4], y[:4]), (x[4:], y[4:])])
        torch.testing.assert_close(transform(F_, fisher_type=fisher_type, other="diagonal")(params).to_dense(), M,
                                   rtol=1e-9, atol=1e-11)
    with pytest.raises(ValueError, match="fisher_type='forward-only' approximates none"):
        so.kfac(f, fisher_type="forward-only", other="diagonal")
    with pytest.raises(ValueError, match="unknown other 'skip'"):
        so.kfac(f, other="skip")


def test_dataset_mc_labels_are_keyed_by_sample_and_reproducible():
    """A data set's Monte-Carlo labels are keyed by each sample: the same seed gives the same K whatever the batching."""
    seeded(10)
    make, loss, x, y = data("mlp-ce", n=10)
    model = make()
    params, f = so.params_dict(model), so.functional_loss(model, loss)
    F_ = so.dataset_loss(f, [(x[:5], y[:5]), (x[5:], y[5:])])
    a = so.ekfac(F_, fisher_type="mc", mc_samples=2, seed=0)(params).to_dense()
    b = so.ekfac(F_, fisher_type="mc", mc_samples=2, seed=0)(params).to_dense()
    assert torch.equal(a, b)
    assert not torch.equal(a, so.ekfac(F_, fisher_type="mc", mc_samples=2, seed=1)(params).to_dense())
    other_split = so.dataset_loss(f, [(x[:3], y[:3]), (x[3:], y[3:])])
    torch.testing.assert_close(so.ekfac(other_split, fisher_type="mc", mc_samples=2, seed=0)(params).to_dense(), a,
                               rtol=1e-9, atol=1e-11)


# -- the curvature registry ------------------------------------------------------------------


def test_curvature_kfac_in_every_transform():
    seeded(11)
    make, loss, x, y = data("mlp-ce", n=8)
    model = make()
    params, f = so.params_dict(model), so.functional_loss(model, loss)
    args = (params, x, y)
    for name, transform in (("kfac", so.kfac), ("ekfac", so.ekfac)):
        K = transform(f)(*args)
        fn = so.trace(f, curvature=name)
        torch.testing.assert_close(fn(*args), K.trace(), **TOL)
        assert fn.last_engine == "generic"
        d = so.diagonal(f, curvature=name)(*args)
        tree.check_like(d, params, "d")
        torch.testing.assert_close(tree.ravel(d)[0], tree.ravel(K.diagonal())[0], **TOL)
        est = so.trace_estimate(f, curvature=name, method="exact")(*args)
        assert int(est.num_matvecs) == 0  # from the factors: no one-hot products
        torch.testing.assert_close(torch.stack(tree.leaves(est.per_leaf)), K.trace_by_leaf(), **TOL)
        hutch = so.trace_estimate(f, curvature=name, method="hutchinson", num_samples=40, seed=0)(*args)
        assert abs(float(hutch.value - K.trace())) <= 5 * float(hutch.stderr)
        top = so.eigenvalues(f, k=3, curvature=name, seed=0, tol=1e-8)(*args)
        torch.testing.assert_close(top, K.eigenvalues()[:3], rtol=1e-5, atol=1e-8)
    cfg = so.kfac_curvature("kfac", fisher_type="empirical", kfac_approx="reduce")
    torch.testing.assert_close(so.trace(f, curvature=cfg)(*args),
                               so.kfac(f, fisher_type="empirical", kfac_approx="reduce")(*args).trace(), **TOL)
    mc = so.kfac_curvature(fisher_type="mc")
    a = so.trace(f, curvature=mc, mc_samples=2, seed=4)(*args)
    torch.testing.assert_close(a, so.kfac(f, fisher_type="mc", mc_samples=2, seed=4)(*args).trace(), **TOL)
    with pytest.raises(ValueError, match="argnums must be 0"):
        so.trace(f, 1, curvature="kfac")(*args)


# -- robustness ------------------------------------------------------------------------------


def test_grad_mode_inplace_activations_and_threads():
    seeded(12)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).to(D)
    x, y = torch.randn(8, 5, dtype=D), torch.randint(0, 3, (8,))
    params = so.params_dict(model)
    fn = so.ekfac(so.functional_loss(model, nn.CrossEntropyLoss()))
    want = fn(params, x, y).to_dense()
    ref = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).to(D)
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(want, so.ekfac(so.functional_loss(ref, nn.CrossEntropyLoss()))(params, x, y).to_dense(),
                               **TOL)
    with torch.no_grad():
        torch.testing.assert_close(fn(params, x, y).to_dense(), want, **TOL)
    with torch.inference_mode():
        torch.testing.assert_close(fn(params, x, y).to_dense(), want, **TOL)
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(fn(params, x, y).to_dense())
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for r in results:
        torch.testing.assert_close(r, want, **TOL)
    assert not model._forward_hooks and not model._forward_pre_hooks  # nothing attached to the user's model
    stacked = {k: torch.stack([t, 2 * t]) for k, t in params.items()}
    with pytest.raises(NotImplementedError, match="outside torch.func transforms"):
        torch.func.vmap(lambda p: fn(p, x, y).trace())(stacked)


def test_function_models_and_subsets_of_parameters():
    """A model written as a function calling F.linear, and params that leave layers out (constants)."""
    seeded(13)
    model = mlp()
    x, y = torch.randn(7, 5, dtype=D), torch.randint(0, 3, (7,))
    full = so.params_dict(model)

    def net(p, x):
        return F.linear(torch.tanh(F.linear(x, p["a"], p["b"])), p["c"], p["d"])

    fn_params = {"a": full["0.weight"], "b": full["0.bias"], "c": full["2.weight"], "d": full["2.bias"]}
    K_fn = so.kfac(so.functional_loss(net, nn.CrossEntropyLoss()))(fn_params, x, y)
    K_mod = so.kfac(so.functional_loss(model, nn.CrossEntropyLoss()))(full, x, y)
    torch.testing.assert_close(K_fn.layers[1].G, K_mod.layers[1].G, **TOL)
    torch.testing.assert_close(K_fn.layers[0].A, K_mod.layers[0].A, **TOL)
    assert [layer.info.name for layer in K_fn.layers] == ["a", "c"]
    # only the last layer's weight: a block of the full K-FAC
    sub = so.kfac(so.functional_loss(model, nn.CrossEntropyLoss()))({"2.weight": full["2.weight"]}, x, y)
    torch.testing.assert_close(sub.to_dense(), K_mod.blocks()[3].dense(), **TOL)  # sorted: 0.bias, 0.weight, 2.bias, 2.weight
    assert sub.layers[0].info.bias is None


def test_repr_and_info():
    seeded(14)
    make, loss, x, y = data("cnn-ce", n=4)
    model = make()
    K = so.kfac(so.functional_loss(model, loss), kfac_approx="reduce")(so.params_dict(model), x, y)
    assert repr(K) == ("KroneckerCurvature(kfac, 3 layers (2 Conv2d, 1 Linear), 119 parameters, "
                       "fisher_type='type-2', kfac_approx='reduce')")
    assert K.info == dict(method="kfac", fisher_type="type-2", kfac_approx="reduce", mc_samples=1)
    assert "damping=0.1" in repr(K.inverse(0.1))
    # a pytree: vmap can return it, optree flattens it to its factors
    leaves, spec = tree.flatten(K)
    assert all(isinstance(t, torch.Tensor) for t in leaves) and len(leaves) == 6
    rebuilt = tree.unflatten(spec, leaves)
    torch.testing.assert_close(rebuilt.to_dense(), K.to_dense(), **TOL)


def test_transformers_bert_classifier():
    """A Hugging Face BERT classifier: K-FAC over its Linear and Embedding layers (LayerNorm left out);
    type-2 EK-FAC's trace is the GGN's trace over the same parameters."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=12, max_position_embeddings=16, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     attn_implementation="eager")  # the GGN reference needs double backward
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(config).to(D).eval()

    class Logits(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, ids):
            return self.model(input_ids=ids).logits

    model = Logits(bert)
    ids, y = torch.randint(0, 40, (5, 6)), torch.randint(0, 3, (5,))
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = {k: v for k, v in so.params_dict(model).items() if "LayerNorm" not in k and "position" not in k}
    with pytest.raises(ValueError, match="LayerNorm"):
        so.kfac(f)(so.params_dict(model), ids, y)
    with pytest.raises(ValueError, match="position_embeddings \\(Embedding on an input of batch size 1\\)"):
        so.kfac(f)({**params, **{k: v for k, v in so.params_dict(model).items() if "position" in k}}, ids, y)
    K = so.ekfac(f)(params, ids, y)
    kinds = {layer.info.kind for layer in K.layers}
    assert kinds == {"Linear", "Embedding"}
    torch.testing.assert_close(K.trace(), so.trace(f, curvature="ggn", engine="generic")(params, ids, y),
                               rtol=1e-8, atol=1e-10)
    # other="diagonal": the LayerNorm parameters get the exact GGN diagonal; EK-FAC's trace is then the whole GGN's
    every = {k: v for k, v in so.params_dict(model).items() if "position" not in k}
    K = so.ekfac(f, other="diagonal")(every, ids, y)
    assert {layer.info.kind for layer in K.layers} == {"Linear", "Embedding", "diagonal (ggn)"}
    ggn = so.diagonal(f, curvature="ggn", engine="generic")(every, ids, y)
    for name, d in K.diagonal().items():
        if "LayerNorm" in name:
            torch.testing.assert_close(d, ggn[name], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(K.trace(), sum(d.sum() for d in ggn.values()), rtol=1e-8, atol=1e-10)


# -- bad input -------------------------------------------------------------------------------


def test_bad_input():
    seeded(15)
    make, loss, x, y = data("mlp-ce", n=6)
    model = make()
    params, f = so.params_dict(model), so.functional_loss(model, loss)
    with pytest.raises(ValueError, match="unknown fisher_type 'fisher'; valid are 'type-2', 'mc', 'empirical', "
                                         "'forward-only'"):
        so.kfac(f, fisher_type="fisher")
    with pytest.raises(ValueError, match="for EK-FAC.*valid are 'type-2', 'mc', 'empirical'$"):
        so.ekfac(f, fisher_type="forward-only")
    with pytest.raises(ValueError, match="unknown kfac_approx 'mean'; valid are 'expand', 'reduce'"):
        so.kfac(f, kfac_approx="mean")
    with pytest.raises(TypeError, match="kfac_approx must be a str"):
        so.kfac(f, kfac_approx=None)
    with pytest.raises(ValueError, match="mc_samples must be an int >= 1, got 0"):
        so.kfac(f, fisher_type="mc", mc_samples=0)
    with pytest.raises(ValueError, match="mc_samples applies to fisher_type='mc' only"):
        so.kfac(f, mc_samples=2)
    with pytest.raises(ValueError, match="seed and generator apply to fisher_type='mc' only"):
        so.kfac(f, seed=0)
    with pytest.raises(TypeError, match="so.functional_loss"):
        so.kfac(lambda p, x, y: x.sum())
    with pytest.raises(ValueError, match="argnums must be 0"):
        so.kfac(f, argnums=1)
    with pytest.raises(ValueError, match="chunk_size"):
        so.kfac(f, chunk_size=0)
    K = so.kfac(f)(params, x, y)
    v = tree.zeros_like(params)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
            K.solve(v, bad)
        with pytest.raises(ValueError, match="damping must be a finite number >= 0"):
            K.inverse(bad)
    with pytest.raises(TypeError, match="damping must be a float"):
        K.solve(v, True)
    # cross-entropy's G is singular: damping=0 is refused with a suggestion, never inf/nan
    with pytest.raises(ValueError, match="singular.*pass damping > 0"):
        K.solve(v, 0.0)
    with pytest.raises(ValueError, match="singular.*pass damping > 0"):
        K.logdet()
    with pytest.raises(ValueError, match="v\\['0.weight'\\] has shape"):
        K.mv({**v, "0.weight": torch.zeros(2, 2, dtype=D)})
    # no predictive distribution: named; forward-only needs none
    odd = so.functional_loss(model, lambda out, t: (out ** 2).mean())
    for fisher_type in ("type-2", "mc", "empirical"):
        with pytest.raises(ValueError, match=f"fisher_type='{fisher_type}' needs the loss's predictive distribution"):
            so.kfac(odd, fisher_type=fisher_type)(params, x, y)
    assert so.kfac(odd, fisher_type="forward-only")(params, x, y).trace() > 0
    # parameters of unsupported layers, unused parameters: listed
    ln = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3), nn.Linear(3, 3)).to(D)
    g = so.functional_loss(nn.Sequential(*list(ln)[:3]), loss)
    with pytest.raises(ValueError, match=r"1.bias \(used by layer_norm\); 1.weight \(used by layer_norm\)"):
        so.kfac(g)(so.params_dict(ln[:3]), x, y)
    net = so.functional_loss(lambda p, x: F.linear(x, p["w"]), loss)
    with pytest.raises(ValueError, match=r"extra \(not used by the model's forward pass\)"):
        so.kfac(net)({"w": torch.ones(3, 5, dtype=D), "extra": torch.zeros(2, dtype=D)}, x, y)
    make, mse, xt, yt = data("tokens-mse")
    tok = make()
    with pytest.raises(ValueError, match="one loss row per sample"):
        so.ekfac(so.functional_loss(tok, mse))(so.params_dict(tok), xt, yt)
    assert so.ekfac(so.functional_loss(tok, mse), fisher_type="empirical")(so.params_dict(tok), xt, yt).trace() > 0
    tied = nn.Sequential(nn.Embedding(5, 5, max_norm=1.0), Pool(), nn.Linear(5, 3)).to(D)
    with pytest.raises(ValueError, match="max_norm"):
        so.kfac(so.functional_loss(tied, loss))(so.params_dict(tied), torch.randint(0, 5, (6, 2)), y)

"""Hessian, GGN, Monte-Carlo Fisher and empirical Fisher: products, diagonals and traces.

References are explicit float64 matrices built here from torch.func alone (J^T H_L J,
per-sample gradient outer products, the MC Fisher with the same drawn labels), and
curvlinops 3.0.1's operators where it is installed.
"""

import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, grad, vmap

import secorder as so
from secorder import tree
from secorder.operators import make_operator, names
from secorder.problem import Problem
from tests.reference import small_cnn, tanh_mlp

D = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


# -- explicit references ---------------------------------------------------------------------


def per_sample_loss(kind, reduction_unused, out_n, y_n, ignore_index=-100):
    """l_n, the unreduced loss of one sample (a sum over its entries)."""
    if kind == "ce":
        return F.cross_entropy(out_n[None], y_n[None], reduction="sum", ignore_index=ignore_index)
    if kind == "mse":
        return ((out_n - y_n) ** 2).sum()
    return F.binary_cross_entropy_with_logits(out_n, y_n, reduction="sum")


def reduction_c(kind, reduction, out, y, ignore_index=-100):
    if reduction == "sum":
        return 1.0
    if kind == "ce":
        return float((y != ignore_index).sum())
    return float(out.numel())


class Case:
    """A model, a loss and data, with explicit dense curvature matrices in ravel order."""

    def __init__(self, arch, kind, reduction, ignore=False, n=5):
        g = torch.Generator().manual_seed(zlib.crc32(f"{arch}-{kind}-{reduction}".encode()) % 1000)  # not hash(): salted per process
        self.model = (tanh_mlp((4, 5, 3)) if arch == "mlp" else small_cnn()).to(D)
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=D) * 0.7)
        shape = (n, 4) if arch == "mlp" else (n, 1, 8, 8)
        self.x = torch.randn(shape, generator=g, dtype=D)
        self.kind, self.reduction = kind, reduction
        if kind == "ce":
            self.y = torch.randint(0, 3, (n,), generator=g)
            if ignore:
                self.y[1] = -100
            self.loss_fn = nn.CrossEntropyLoss(reduction=reduction)
        elif kind == "mse":
            self.y = torch.randn(n, 3, generator=g, dtype=D)
            self.loss_fn = nn.MSELoss(reduction=reduction)
        else:
            self.y = torch.randint(0, 2, (n, 3), generator=g).to(D)
            self.loss_fn = nn.BCEWithLogitsLoss(reduction=reduction)
        self.f = so.functional_loss(self.model, self.loss_fn)
        self.params = so.params_dict(self.model)
        self.flat, self.unravel = tree.ravel(self.params)

    def out_of(self, theta):
        return functional_call(self.model, self.unravel(theta), (self.x,))

    def ggn(self):
        out = self.out_of(self.flat)
        J = torch.func.jacrev(self.out_of)(self.flat).reshape(out.numel(), -1)
        HL = torch.func.hessian(lambda o: self.loss_fn(o.reshape(out.shape), self.y))(out.reshape(-1))
        return J.T @ HL @ J

    def hessian(self):
        return torch.func.hessian(lambda t: self.loss_fn(self.out_of(t), self.y))(self.flat)

    def _outer(self, targets, keep, scale):
        """scale * sum over (sample, target) of grad l_n(target) grad l_n(target)^T, per-sample grads by jacrev."""
        pairs = [(n, t) for n, t in targets if keep[n]]

        def losses(theta):
            out = self.out_of(theta)
            return torch.stack([per_sample_loss(self.kind, self.reduction, out[n], t) for n, t in pairs])

        G = torch.func.jacrev(losses)(self.flat)
        return scale * G.T @ G

    def empirical_fisher(self):
        out = self.out_of(self.flat)
        N = out.shape[0]
        targets = [(n, self.y[n]) for n in range(N)]
        return self._outer(targets, [True] * N, 1.0 / reduction_c(self.kind, self.reduction, out, self.y))

    def fisher(self, seed, M):
        """The MC Fisher with labels drawn as documented (multinomial / normal / bernoulli, curvlinops' order)."""
        out = self.out_of(self.flat).detach()
        g = torch.Generator().manual_seed(seed)
        N = out.shape[0]
        keep = [True] * N
        if self.kind == "ce":
            labels = torch.softmax(out, 1).multinomial(M, replacement=True, generator=g).T
            targets = [(n, labels[m, n]) for m in range(M) for n in range(N)]
            keep = [bool(self.y[n] != -100) for n in range(N)]
        elif self.kind == "mse":
            e = torch.normal(torch.zeros(M, *out.shape, dtype=D), torch.tensor(math.sqrt(0.5)), generator=g)
            targets = [(n, out[n] - e[m, n]) for m in range(M) for n in range(N)]
        else:
            b = torch.sigmoid(out).unsqueeze(0).expand(M, -1, -1).bernoulli(generator=g)
            targets = [(n, b[m, n]) for m in range(M) for n in range(N)]
        return self._outer(targets, keep, 1.0 / (M * reduction_c(self.kind, self.reduction, out, self.y)))

    def kronecker(self, transform):
        """K-FAC / EK-FAC: the dense matrix of the factors (checked against curvlinops in tests/test_kfac.py)."""
        return transform(self.f)(self.params, self.x, self.y).to_dense()

    def matrix(self, curvature, seed=3, M=2):
        return {"hessian": self.hessian, "ggn": self.ggn, "empirical_fisher": self.empirical_fisher,
                "fisher": lambda: self.fisher(seed, M), "kfac": lambda: self.kronecker(so.kfac),
                "ekfac": lambda: self.kronecker(so.ekfac)}[curvature]()


CASES = [("mlp", k, r) for k in ("ce", "mse", "bce") for r in ("mean", "sum")] + [
    ("cnn", "ce", "mean"), ("cnn", "mse", "sum"), ("cnn", "bce", "mean")]
CURVATURES = ["ggn", "fisher", "empirical_fisher"]


def extra(curvature, seed=3, M=2):
    return dict(seed=seed, mc_samples=M) if curvature == "fisher" else {}


def as_flat(case, d):
    return tree.ravel(d)[0]


@pytest.mark.parametrize("arch,kind,reduction", CASES)
def test_every_curvature_against_explicit_matrices(arch, kind, reduction):
    case = Case(arch, kind, reduction, ignore=(kind == "ce" and reduction == "mean"))
    args = (case.params, case.x, case.y)
    v = case.unravel(torch.randn(case.flat.shape, dtype=D))
    vps = {"ggn": so.ggn_vp, "empirical_fisher": so.empirical_fisher_vp,
           "fisher": lambda f: so.fisher_vp(f, seed=3, mc_samples=2)}
    for curvature in CURVATURES:
        M = case.matrix(curvature)
        kw = extra(curvature)
        diag = so.diagonal(case.f, curvature=curvature, engine="generic", chunk_size=7, **kw)(*args)
        torch.testing.assert_close(as_flat(case, diag), M.diagonal(), **TOL)
        torch.testing.assert_close(so.trace(case.f, curvature=curvature, **kw)(*args), M.trace(), **TOL)
        auto = so.diagonal(case.f, curvature=curvature, **kw)(*args)  # structured where it runs
        torch.testing.assert_close(as_flat(case, auto), M.diagonal(), **TOL)
        mv = vps[curvature](case.f)(*args, v)
        torch.testing.assert_close(as_flat(case, mv), M @ tree.ravel(v)[0], **TOL)


def test_hessian_curvature_is_the_hessian():
    case = Case("mlp", "ce", "mean")
    H = case.hessian()
    args = (case.params, case.x, case.y)
    torch.testing.assert_close(as_flat(case, so.diagonal(case.f, curvature="hessian")(*args)), H.diagonal(), **TOL)
    torch.testing.assert_close(so.trace(case.f, curvature="hessian", engine="generic")(*args), H.trace(), **TOL)


@pytest.mark.parametrize("arch,kind,reduction", [c for c in CASES if c[0] == "mlp"] + [("cnn", "ce", "sum")])
def test_against_curvlinops_operators(arch, kind, reduction):
    curvlinops = pytest.importorskip("curvlinops")
    case = Case(arch, kind, reduction)
    params = list(case.model.parameters())
    names_ = [n for n, _ in case.model.named_parameters()]
    n = sum(p.numel() for p in params)
    data = [(case.x, case.y)]
    ops = {
        "ggn": curvlinops.GGNLinearOperator(case.model, case.loss_fn, params, data, check_deterministic=False),
        "empirical_fisher": curvlinops.EFLinearOperator(case.model, case.loss_fn, params, data,
                                                        check_deterministic=False),
        "fisher": curvlinops.FisherMCLinearOperator(case.model, case.loss_fn, params, data, seed=3, mc_samples=2,
                                                    check_deterministic=False),
    }
    args = (case.params, case.x, case.y)
    for curvature, op in ops.items():
        M = op @ torch.eye(n, dtype=D)
        diag = so.diagonal(case.f, curvature=curvature, **extra(curvature))(*args)
        ours = torch.cat([diag[k].reshape(-1) for k in names_])
        torch.testing.assert_close(ours, M.diagonal(), **TOL)
        est = so.trace_estimate(case.f, curvature=curvature, method="exact", **extra(curvature))(*args)
        torch.testing.assert_close(est.value, M.trace(), **TOL)


def test_mc_fisher_is_unbiased_for_the_ggn():
    """Mean of 150 single-label Fishers -> the GGN, within 5 standard errors of the draws' own spread."""
    case = Case("mlp", "ce", "mean", n=4)
    problem = Problem(case.f, 0, False, (case.params, case.x, case.y))
    n = case.flat.numel()
    basis = [v.reshape((n,) + t.shape) for v, t in zip(
        torch.split(torch.eye(n, dtype=D), [t.numel() for t in problem.leaves], dim=1), problem.leaves)]

    def dense(curvature, **kw):
        out = make_operator(curvature, problem, **kw).matvec(basis)
        return torch.cat([o.reshape(n, -1) for o in out], 1)

    S = 150
    draws = torch.stack([dense("fisher", generator=torch.Generator().manual_seed(s)).reshape(-1) for s in range(S)])
    ggn = dense("ggn").reshape(-1)
    torch.testing.assert_close(ggn.reshape(n, n), case.ggn(), **TOL)
    mean, sd = draws.mean(0), draws.std(0)
    assert bool(((mean - ggn).abs() <= 5 * sd / math.sqrt(S) + 1e-12).all())
    # M labels per sample in one call: same expectation, spread shrinks like 1/sqrt(M)
    many = dense("fisher", mc_samples=S, generator=torch.Generator().manual_seed(S)).reshape(-1)
    assert bool(((many - ggn).abs() <= 5 * sd / math.sqrt(S) + 1e-12).all())


def test_structured_and_generic_paths_agree():
    for arch in ("mlp", "cnn"):
        case = Case(arch, "ce", "mean")
        args = (case.params, case.x, case.y)
        for curvature in ("hessian", "ggn"):
            fast = so.diagonal(case.f, curvature=curvature)
            slow = so.diagonal(case.f, curvature=curvature, engine="generic")
            a, b = fast(*args), slow(*args)
            assert fast.last_engine == "structured" and slow.last_engine == "generic"
            for k in a:
                torch.testing.assert_close(a[k], b[k], **TOL)
            est = so.trace_estimate(case.f, curvature=curvature, method="exact")(*args)
            torch.testing.assert_close(est.value, so.trace(case.f, curvature=curvature, engine="generic")(*args),
                                       **TOL)


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "empirical_fisher"])
def test_vmap_per_example_diagonals_equal_a_loop(curvature):
    case = Case("mlp", "ce", "mean")
    X, Y = case.x[:, None], case.y[:, None]
    fn = so.diagonal(case.f, curvature=curvature)
    batched = vmap(fn, in_dims=(None, 0, 0))(case.params, X, Y)
    for i in range(X.shape[0]):
        one = fn(case.params, X[i], Y[i])
        for k in one:
            torch.testing.assert_close(batched[k][i], one[k], **TOL)


def test_vmap_fisher_labels():
    """MSE labels do not depend on the output: randomness='same' equals the loop; CE needs 'different'."""
    case = Case("mlp", "mse", "sum")
    X, Y = case.x[:, None], case.y[:, None]
    fn = so.diagonal(case.f, curvature="fisher", seed=1)
    batched = vmap(fn, in_dims=(None, 0, 0), randomness="same")(case.params, X, Y)
    for i in range(X.shape[0]):
        torch.testing.assert_close(batched["0.weight"][i], fn(case.params, X[i], Y[i])["0.weight"], **TOL)
    ce = Case("mlp", "ce", "sum")
    fn = so.diagonal(ce.f, curvature="fisher", seed=1)
    with pytest.raises(RuntimeError, match="randomness"):
        vmap(fn, in_dims=(None, 0, 0))(ce.params, ce.x[:, None], ce.y[:, None])
    out = vmap(fn, in_dims=(None, 0, 0), randomness="different")(ce.params, ce.x[:, None], ce.y[:, None])
    assert all(bool((v >= 0).all()) for v in out.values())


@pytest.mark.parametrize("curvature", CURVATURES)
def test_grad_of_the_trace(curvature):
    """grad of the trace of a fixed-label curvature vs grad of the explicit trace (third derivatives)."""
    case = Case("mlp", "ce" if curvature != "fisher" else "mse", "mean", n=3)
    kw = extra(curvature, seed=5, M=2)

    def explicit(theta):
        saved = case.flat
        case.flat = theta
        try:
            return case.matrix(curvature, seed=5, M=2).trace()
        finally:
            case.flat = saved

    want = grad(explicit)(case.flat)
    got = grad(lambda p: so.trace(case.f, curvature=curvature, **kw)(p, case.x, case.y))(case.params)
    torch.testing.assert_close(tree.ravel(got)[0], want, rtol=1e-9, atol=1e-11)


class LastStep(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 2, batch_first=True)
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def test_float32_lstm_needs_no_forward_mode():
    """Forward AD has no rule for mkldnn_rnn_layer (float32 LSTM on CPU): products use reverse mode only."""
    torch.manual_seed(0)
    model = LastStep()
    x, y = torch.randn(4, 5, 3), torch.tensor([0, 1, 1, 0])
    f32 = so.functional_loss(model, nn.CrossEntropyLoss())
    p32 = so.params_dict(model)
    model64 = LastStep().to(D)
    model64.load_state_dict({k: v.to(D) for k, v in model.state_dict().items()})
    f64 = so.functional_loss(model64, nn.CrossEntropyLoss())
    p64 = so.params_dict(model64)
    for curvature in ("ggn", "fisher", "empirical_fisher"):
        kw = extra(curvature, seed=0, M=1)
        d32 = so.diagonal(f32, curvature=curvature, **kw)(p32, x, y)
        d64 = so.diagonal(f64, curvature=curvature, **kw)(p64, x.to(D), y)
        for k in d32:
            torch.testing.assert_close(d32[k].to(D), d64[k], rtol=1e-4, atol=1e-6)
    v = {k: torch.ones_like(t) for k, t in p32.items()}
    hv = so.hvp(f32)(p32, x, y, v)
    gv = so.ggn_vp(f32)(p32, x, y, v)
    hv64 = so.hvp(f64)(p64, x.to(D), y, {k: t.to(D) for k, t in v.items()})
    for k in hv:
        torch.testing.assert_close(hv[k].to(D), hv64[k], rtol=1e-4, atol=1e-5)
    assert set(gv) == set(p32)


def test_every_method_works_for_every_curvature():
    case = Case("mlp", "ce", "mean")
    args = (case.params, case.x, case.y)
    exact = {c: so.trace(case.f, curvature=c, **extra(c))(*args) for c in names()}
    for c in names():
        for method, num in (("hutchinson", 30), ("hutch++", 30), ("xtrace", 30)) + (
                (("xnystrace", 20),) if c != "hessian" else ()):
            est = so.trace_estimate(case.f, curvature=c, method=method, num_samples=num, **extra(c, seed=3))(*args)
            assert abs(float(est.value - exact[c])) <= 6 * float(est.stderr) + 1e-8, (c, method)
        for method in ("hutchinson", "xdiag"):
            d = so.diagonal_estimate(case.f, curvature=c, method=method, num_samples=8, **extra(c, seed=3))(*args)
            assert set(d.value) == set(case.params) and d.dof is not None


def test_every_method_of_every_curvature_is_the_estimator_on_the_explicit_matrix():
    """Each (curvature, quantity, method) cell, float64: the transform gives what the estimator
    gives on the explicit matrix (``J^T H_L J``, per-sample gradient outer products, the MC
    Fisher with the same labels) with the same probes, to 1e-10 (value, error bar, per leaf)."""
    from secorder.estimators import hutchinson_diagonal, hutchinson_trace, hutchpp_trace, xdiag, xnystrace, xtrace
    from secorder.operators import LeafOperator

    case = Case("mlp", "ce", "mean", ignore=True)
    args = (case.params, case.x, case.y)
    leaves = tree.leaves(case.params)
    sizes = [t.numel() for t in leaves]

    def explicit(M):
        def matvec(V):
            flat = torch.cat([v.reshape(v.shape[0], -1) for v in V], 1) @ M
            return [c.reshape(v.shape) for c, v in zip(torch.split(flat, sizes, dim=1), V)]
        return LeafOperator(leaves, matvec, None, psd=True)

    def generator(curvature, seed):
        g = torch.Generator().manual_seed(seed)
        if curvature == "fisher":  # the labels come first from the same generator
            torch.softmax(case.out_of(case.flat).detach(), 1).multinomial(2, replacement=True, generator=g)
        return g

    trace_methods = {"hutchinson": (hutchinson_trace, 8), "hutch++": (hutchpp_trace, 9), "xtrace": (xtrace, 8),
                     "xnystrace": (xnystrace, 6)}
    diag_methods = {"hutchinson": (hutchinson_diagonal, 8), "xdiag": (xdiag, 8)}
    for curvature in names():
        M = case.matrix(curvature, seed=5, M=2)
        kw = dict(mc_samples=2) if curvature == "fisher" else {}
        for method, (fn, num) in trace_methods.items():
            if method == "xnystrace" and curvature == "hessian":
                continue  # indefinite here: refused (tests/test_transforms_adversarial.py)
            got = so.trace_estimate(case.f, curvature=curvature, method=method, num_samples=num, seed=5, **kw)(*args)
            want = fn(explicit(M), num, generator=generator(curvature, 5))
            torch.testing.assert_close(got.value, want.value, **TOL, msg=lambda m: f"{curvature} {method}: {m}")
            # The transform's products differ from M's by rounding, and an error bar from a nearly
            # rank-deficient sketch (a jackknife over near-singular pieces) amplifies rounding: agree to
            # 1e-10 on the value's scale, or to 100x what the same estimator moves by when M is perturbed
            # at rounding level (measured, not assumed).
            bump = 1e-15 * M.abs().max() * torch.randn(M.shape, generator=torch.Generator().manual_seed(1), dtype=D)
            moved = fn(explicit(M + (bump + bump.T) / 2), num, generator=generator(curvature, 5)).stderr
            slack = max(1e-10 * float(want.value.abs()), 100 * float((moved - want.stderr).abs()))
            torch.testing.assert_close(got.stderr, want.stderr, rtol=1e-10, atol=slack,
                                       msg=lambda m: f"{curvature} {method}: {m}")
            torch.testing.assert_close(torch.stack(tree.leaves(got.per_leaf)).reshape(-1),
                                       want.per_leaf.reshape(-1), **TOL)
        for method, (fn, num) in diag_methods.items():
            got = so.diagonal_estimate(case.f, curvature=curvature, method=method, num_samples=num, seed=5,
                                       **kw)(*args)
            want = fn(explicit(M), num, generator=generator(curvature, 5))
            torch.testing.assert_close(tree.ravel(got.value)[0], torch.cat([w.reshape(-1) for w in want.value]),
                                       **TOL, msg=lambda m: f"{curvature} {method}: {m}")
            want_se = torch.cat([w.reshape(-1) for w in want.stderr])
            bump = 1e-15 * M.abs().max() * torch.randn(M.shape, generator=torch.Generator().manual_seed(1), dtype=D)
            moved = fn(explicit(M + (bump + bump.T) / 2), num, generator=generator(curvature, 5)).stderr
            slack = 100 * float((torch.cat([w.reshape(-1) for w in moved]) - want_se).abs().max())
            torch.testing.assert_close(tree.ravel(got.stderr)[0], want_se, rtol=1e-10, atol=max(1e-12, slack),
                                       msg=lambda m: f"{curvature} {method}: {m}")


def test_fisher_labels_come_first_from_the_probe_generator():
    """Same seed: the exact MC Fisher of the estimate is the one with the seed's first draws."""
    case = Case("mlp", "ce", "sum")
    args = (case.params, case.x, case.y)
    est = so.trace_estimate(case.f, curvature="fisher", method="hutchinson", num_samples=4000, seed=11)(*args)
    exact = so.trace(case.f, curvature="fisher", seed=11)(*args)
    other = so.trace(case.f, curvature="fisher", seed=12)(*args)
    assert abs(float(est.value - exact)) <= 5 * float(est.stderr)
    assert not torch.equal(exact, other)
    g = torch.Generator().manual_seed(11)
    assert torch.equal(so.trace(case.f, curvature="fisher", generator=g)(*args), exact)


def test_model_as_a_function():
    model = tanh_mlp((4, 5, 3))
    params = so.params_dict(model)

    def net(p, x):
        return functional_call(model, p, (x,))

    f_fn = so.functional_loss(net, nn.CrossEntropyLoss())
    f_mod = so.functional_loss(model, nn.CrossEntropyLoss())
    x, y = torch.randn(6, 4, dtype=D), torch.randint(0, 3, (6,))
    for c in names():
        a = so.diagonal(f_fn, curvature=c, **extra(c))(params, x, y)
        b = so.diagonal(f_mod, curvature=c, engine="generic", **extra(c))(params, x, y)
        for k in a:
            torch.testing.assert_close(a[k], b[k], **TOL)
    # a list of tensors as params: any pytree
    w = [torch.randn(3, 4, dtype=D)]
    lin = so.functional_loss(lambda p, x: x @ p[0].T, nn.MSELoss(reduction="sum"))
    torch.testing.assert_close(so.ggn_trace(lin)(w, x, torch.zeros(6, 3, dtype=D)), 2 * 3 * (x ** 2).sum(), **TOL)


def test_ggn_with_respect_to_inputs_and_custom_loss():
    """GGN of any loss_fn (autograd H_L) and w.r.t. the inputs (argnums=1)."""
    model = tanh_mlp((4, 5, 3))
    loss_fn = lambda out, y: (torch.cosh(out - y)).sum()  # convex, not recognised
    f = so.functional_loss(model, loss_fn)
    params, x, y = so.params_dict(model), torch.randn(2, 4, dtype=D), torch.randn(2, 3, dtype=D)
    flat, unravel = tree.ravel(x)
    J = torch.func.jacrev(lambda z: model(z.reshape(2, 4)))(flat.reshape(-1)).reshape(6, -1)
    HL = torch.func.hessian(lambda o: loss_fn(o.reshape(2, 3), y))(model(x).reshape(-1).detach())
    G = J.T @ HL @ J
    torch.testing.assert_close(so.diagonal(f, 1, curvature="ggn")(params, x, y).reshape(-1), G.diagonal(), **TOL)
    with pytest.raises(ValueError, match="predictive distribution.*cross-entropy"):
        so.trace(f, curvature="fisher")(params, x, y)
    with pytest.raises(ValueError, match="argnums=2"):
        so.trace(f, 2, curvature="ggn")(params, x, y)


def test_make_operator_contract():
    case = Case("mlp", "ce", "mean")
    problem = Problem(case.f, 0, False, (case.params, case.x, case.y))
    for c in names():
        op = make_operator(c, problem, mc_samples=2, generator=torch.Generator().manual_seed(3))
        assert [t.shape for t in op.templates] == [t.shape for t in problem.leaves]
        assert op.psd == (c != "hessian")
        V = [torch.randn((3,) + t.shape, dtype=D) for t in op.templates]
        out = op.matvec(V)
        M = case.matrix(c)
        want = torch.cat([v.reshape(3, -1) for v in V], 1) @ M
        torch.testing.assert_close(torch.cat([o.reshape(3, -1) for o in out], 1), want, **TOL)
    with pytest.raises(ValueError, match="valid curvatures are 'hessian', 'ggn', 'fisher', 'empirical_fisher', 'kfac'"):
        make_operator("gn", problem)


@settings(max_examples=6, deadline=None)
@given(hidden=st.integers(1, 4), n=st.integers(1, 4), seed=st.integers(0, 2**31), chunk=st.integers(1, 9))
def test_aliases_equal_the_general_transforms(hidden, n, seed, chunk):
    torch.manual_seed(seed % 1000)
    model = tanh_mlp((3, hidden, 2))
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    p, x, y = so.params_dict(model), torch.randn(n, 3, dtype=D), torch.randint(0, 2, (n,))
    pairs = [
        (so.hessian_diag(f, chunk_size=chunk), so.diagonal(f, curvature="hessian", chunk_size=chunk)),
        (so.ggn_diag(f, chunk_size=chunk), so.diagonal(f, curvature="ggn", chunk_size=chunk)),
        (so.ggn_trace(f, engine="generic"), so.trace(f, curvature="ggn", engine="generic")),
        (so.hessian_diag_estimate(f, num_samples=5, seed=seed), so.diagonal_estimate(f, num_samples=5, seed=seed)),
        (so.hessian_diag(f, method="xdiag", num_samples=6, seed=seed),
         so.diagonal(f, method="xdiag", num_samples=6, seed=seed)),
    ]
    for alias, general in pairs:
        a, b = alias(p, x, y), general(p, x, y)
        for u, w in zip(tree.leaves(a), tree.leaves(b)):
            assert torch.equal(u, w)


# -- bad input ------------------------------------------------------------------------------


def test_bad_curvature_options_name_the_argument():
    case = Case("mlp", "ce", "mean")
    f = case.f
    with pytest.raises(ValueError, match="unknown curvature 'gauss'; valid curvatures are 'hessian', 'ggn'"):
        so.trace(f, curvature="gauss")
    with pytest.raises(TypeError, match="curvature must be a str"):
        so.diagonal(f, curvature=None)
    for bad, err in ((0, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError)):
        with pytest.raises(err, match="mc_samples must be an int >= 1"):
            so.trace(f, curvature="fisher", mc_samples=bad)
    with pytest.raises(ValueError, match="mc_samples applies to curvature='fisher' only"):
        so.trace(f, curvature="ggn", mc_samples=2)
    with pytest.raises(TypeError, match="so.functional_loss"):
        so.trace(lambda p: p.sum(), curvature="ggn")
    with pytest.raises(TypeError, match="so.functional_loss"):
        so.fisher_vp(lambda p: p.sum())
    with pytest.raises(ValueError, match="seed only apply to the stochastic"):
        so.trace(f, curvature="ggn", seed=0)
    l1 = so.functional_loss(case.model, nn.L1Loss())
    args = (case.params, case.x, torch.zeros(5, 3, dtype=D))
    for c in ("fisher", "empirical_fisher"):
        with pytest.raises(ValueError, match=f"curvature='{c}' needs the loss's predictive distribution.*"
                                             "mean squared error"):
            so.diagonal(l1, curvature=c)(*args)
    so.diagonal(l1, curvature="ggn")(*args)  # the GGN takes any loss
    with pytest.raises(TypeError, match="engine must be a str"):
        so.diagonal(f, curvature="ggn", engine=None)
    with pytest.raises(TypeError, match=r"v\['0.bias'\] has dtype torch.int64"):
        so.ggn_vp(f)(case.params, case.x, case.y, {k: torch.ones(t.shape, dtype=torch.long)
                                                   for k, t in case.params.items()})


def test_complex_tangents_in_every_product():
    case = Case("mlp", "ce", "sum")
    args = (case.params, case.x, case.y)
    re = {k: torch.randn_like(t) for k, t in case.params.items()}
    im = {k: torch.randn_like(t) for k, t in case.params.items()}
    v = {k: torch.complex(re[k], im[k]) for k in re}
    for product in (so.hvp(case.f), so.ggn_vp(case.f), so.fisher_vp(case.f, seed=0), so.empirical_fisher_vp(case.f)):
        out = product(*args, v)
        a, b = product(*args, re), product(*args, im)
        for k in out:
            assert out[k].is_complex()
            torch.testing.assert_close(out[k], torch.complex(a[k], b[k]), **TOL)


def test_torch_compile_composes_with_every_curvature():
    """The Gauss-Newton operators run eagerly inside compiled code (dynamo cannot trace a VJP of a VJP)."""
    case = Case("mlp", "ce", "mean", n=3)
    args = (case.params, case.x, case.y)
    v = tree.tree_map(torch.ones_like, case.params)
    for c in CURVATURES:
        fn = so.trace(case.f, curvature=c, **extra(c))
        torch.testing.assert_close(torch.compile(fn)(*args), fn(*args), **TOL)
    for prod in (so.ggn_vp(case.f), so.fisher_vp(case.f, seed=0), so.empirical_fisher_vp(case.f)):
        a, b = torch.compile(prod)(*args, v), prod(*args, v)
        for k in a:
            torch.testing.assert_close(a[k], b[k], **TOL)


def test_empty_batch_ignored_targets_and_grad_mode_off():
    """Every curvature: an empty batch and all-ignored targets give 0 (as the generic GGN does); no_grad changes nothing."""
    case = Case("mlp", "ce", "mean")
    mse = so.functional_loss(case.model, nn.MSELoss())
    for c in names():
        kw = extra(c)
        fn = so.trace(case.f, curvature=c, engine="generic", **kw)
        assert float(fn(case.params, case.x[:0], case.y[:0])) == 0.0
        assert float(fn(case.params, case.x, torch.full_like(case.y, -100))) == 0.0
        if c != "hessian":
            assert float(so.trace(mse, curvature=c, **kw)(case.params, case.x[:0], torch.zeros(0, 3, dtype=D))) == 0
        want = so.trace(case.f, curvature=c, **kw)(case.params, case.x, case.y)
        with torch.no_grad():
            torch.testing.assert_close(so.trace(case.f, curvature=c, engine="generic", **kw)(
                case.params, case.x, case.y), want, **TOL)

"""Every transform on the models people train: the Hugging Face zoo of tests/zoo.py against float64 references.

For GPT-2, Llama, BERT, ViT, ResNet and ConvNeXt (small random configurations,
``f = so.functional_loss(model, loss_fn, output=...)`` on a dict of inputs), the
references are built with plain ``torch.func`` under ``so.differentiable_ops()``
(PyTorch's fused attention has no double backward, so the references need the
math kernel too): the dense Hessian; the output's Jacobian ``J`` and the loss's
output Hessian for the GGN ``J^T H_out J``; per-sample gradients for the
empirical Fisher; the Monte-Carlo Fisher's labels drawn as curvlinops draws them
from the same seed. Checked: the loss is what the model computes, products,
exact diagonals and traces of every curvature, top eigenvalues, ``dataset_loss``
over dict batches, the model's own ``.loss`` in a hand-written ``f``, that no
call changes the model, per-example curvature under ``vmap`` where the model's
code allows it, the legacy API, the input Laplacian, and bad input.

The tests are grouped by model (one module-scoped fixture per model), so each
model's references are built once.
"""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder as so
from secorder.structured.errors import Unsupported
from tests import zoo

transformers = zoo.require_transformers()

DT = torch.float64


class Refs:
    """Dense float64 references for one zoo case (built with plain torch.func, composites active)."""

    def __init__(self, case: zoo.Case):
        self.case = case
        f, inputs, y = case.f, case.inputs, case.targets
        self.params = case.params()
        self.flat, self.unravel = so.tree.ravel(self.params)
        with so.differentiable_ops():
            loss = lambda p: f(self.unravel(p), inputs, y)
            self.H = torch.func.jacrev(torch.func.grad(loss))(self.flat)  # reverse over reverse
            out_fn = lambda p: f.output(self.unravel(p), inputs)
            self.out = out_fn(self.flat)
            self.J = torch.func.jacrev(out_fn)(self.flat).reshape(self.out.shape[0], -1, self.flat.numel())
        out, N = self.out, self.out.shape[0]
        self.H_out = torch.func.hessian(lambda o: case.loss_fn(o.reshape(out.shape), y))(out.flatten())
        self.c = (y != -100).sum().to(DT)  # cross-entropy's mean over the non-ignored targets
        J2 = self.J.reshape(-1, self.flat.numel())
        # empirical Fisher: per-sample gradients of the summed per-sample loss (no secorder code)
        per_sample = lambda n: lambda p: F.cross_entropy(out_fn(p)[n:n + 1], y[n:n + 1], reduction="sum")
        with so.differentiable_ops():
            self.G_ef = torch.stack([torch.func.grad(per_sample(n))(self.flat) for n in range(N)])
        # Monte-Carlo Fisher: labels drawn from softmax(out) as the operator draws them from seed 3
        probs = torch.softmax(out, dim=1)
        C = out.shape[1]
        rows = probs.movedim(1, -1).reshape(-1, C)
        labels = rows.multinomial(1, replacement=True, generator=torch.Generator().manual_seed(3)).T
        onehot = F.one_hot(labels[0], C).to(DT).reshape(probs.movedim(1, -1).shape).movedim(-1, 1)
        g = torch.where((y != -100).unsqueeze(1), probs - onehot, 0.0).reshape(N, -1)  # ignored targets: none
        self.G_fisher = torch.einsum("nk,nkp->np", g, self.J)
        self.J2 = J2

    # curvature matrices as (diagonal, matvec, dense-free top eigenvalue)
    def diag(self, curvature):
        if curvature == "hessian":
            return self.H.diagonal()
        if curvature == "ggn":
            return torch.einsum("mp,mk,kp->p", self.J2, self.H_out, self.J2)
        G = self.G_ef if curvature == "empirical_fisher" else self.G_fisher
        return (G ** 2).sum(0) / self.c

    def matvec(self, curvature, v):
        if curvature == "hessian":
            return self.H @ v
        if curvature == "ggn":
            return self.J2.T @ (self.H_out @ (self.J2 @ v))
        G = self.G_ef if curvature == "empirical_fisher" else self.G_fisher
        return G.T @ (G @ v) / self.c

    def ggn_eigenvalues(self):
        """The nonzero spectrum of J^T H_out J, from the small matrix H_out^(1/2) J J^T H_out^(1/2)."""
        w, Q = torch.linalg.eigh(self.H_out)
        root = Q @ torch.diag(w.clamp_min(0).sqrt()) @ Q.T
        return torch.linalg.eigvalsh(root @ self.J2 @ self.J2.T @ root)


@pytest.fixture(scope="module", params=zoo.NAMES)
def refs(request):
    return Refs(zoo.build(request.param))


CURVATURES = ("hessian", "ggn", "fisher", "empirical_fisher")


def _seeded(curvature):
    return {"seed": 3} if curvature == "fisher" else {}


def _flat(tree):
    return so.tree.ravel(tree)[0]


def _close(actual, expected, rtol):
    actual = actual.detach()
    scale = expected.abs().max().clamp_min(1e-300)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale + 1e-13, f"max error {float(err):.3g} for a scale of {float(scale):.3g}"


def test_loss_is_what_the_model_computes(refs):
    case = refs.case
    with torch.no_grad():
        returned = case.model(**case.inputs)
    expected = case.loss_fn(returned.logits.transpose(1, 2) if case.name in zoo.CAUSAL_LM else returned.logits,
                            case.targets)
    torch.testing.assert_close(case.f(refs.params, case.inputs, case.targets), expected, rtol=1e-13, atol=0)


def test_products_of_every_curvature(refs):
    case = refs.case
    v = torch.randn(refs.flat.shape, dtype=DT, generator=torch.Generator().manual_seed(5))
    products = {"hessian": so.hvp(case.f), "ggn": so.ggn_vp(case.f), "fisher": so.fisher_vp(case.f, seed=3),
                "empirical_fisher": so.empirical_fisher_vp(case.f)}
    for curvature, product in products.items():
        got = _flat(product(refs.params, case.inputs, case.targets, refs.unravel(v)))
        _close(got, refs.matvec(curvature, v), case.rtol)


def test_exact_diagonals_of_every_curvature(refs):
    case = refs.case
    for curvature in CURVATURES:
        d = so.diagonal(case.f, curvature=curvature, **_seeded(curvature))(refs.params, case.inputs, case.targets)
        _close(_flat(d), refs.diag(curvature), case.rtol)


def test_exact_traces_of_every_curvature_over_some_parameters(refs):
    """The trace over three of the parameter tensors (the others constants of the model): their diagonal blocks."""
    case = refs.case
    sub, mask = _some(refs)
    for curvature in CURVATURES:
        tr = so.trace(case.f, curvature=curvature, **_seeded(curvature))(sub, case.inputs, case.targets)
        _close(tr, refs.diag(curvature)[mask].sum(), case.rtol)


def _some(refs):
    """Three parameter tensors (first, middle, last) and the mask of their entries in the flat order."""
    names = list(refs.params)
    chosen = [names[0], names[len(names) // 2], names[-1]]
    mask = _flat({k: torch.full(t.shape, float(k in chosen)) for k, t in refs.params.items()}) > 0
    return {k: refs.params[k] for k in chosen}, mask


def test_top_eigenvalues(refs):
    """The Hessian's over three parameter tensors (its diagonal block: a dense eigvalsh of all of H would cost
    more than the rest of the zoo), the GGN's over all parameters (from the small output-space matrix)."""
    case = refs.case
    sub, mask = _some(refs)
    block = refs.H[mask][:, mask]
    # residuals below tol * ||H||: the eigenvalues are within about tol^2 ||H|| / gap, far below the tolerance
    top = so.eigenvalues(case.f, k=2, seed=0, tol=1e-6)(sub, case.inputs, case.targets)
    _close(top, torch.linalg.eigvalsh(block).flip(0)[:2], max(case.rtol, 1e-7))
    top_ggn = so.eigenvalues(case.f, k=1, curvature="ggn", seed=0, tol=1e-6)(refs.params, case.inputs, case.targets)
    _close(top_ggn, refs.ggn_eigenvalues()[-1:], max(case.rtol, 1e-7))


def test_dataset_loss_over_dict_batches(refs):
    """Two batches of one sample each, as dicts: the same function and curvature as the one batch of two."""
    case = refs.case
    Fd = so.dataset_loss(case.f, [case.batch(slice(0, 1)), case.batch(slice(1, 2))])
    params = refs.params
    torch.testing.assert_close(Fd(params), case.f(params, case.inputs, case.targets), rtol=max(case.rtol, 1e-12),
                               atol=0)
    v = torch.randn(refs.flat.shape, dtype=DT, generator=torch.Generator().manual_seed(6))
    _close(_flat(so.hvp(Fd)(params, refs.unravel(v))), refs.matvec("hessian", v), case.rtol)
    _close(_flat(so.ggn_vp(Fd)(params, refs.unravel(v))), refs.matvec("ggn", v), case.rtol)
    last = list(params)[-1]
    mask = _flat({k: torch.full(t.shape, float(k == last)) for k, t in params.items()}) > 0
    for curvature in CURVATURES:
        tr = so.trace(Fd, curvature=curvature, **_seeded(curvature))({last: params[last]})
        if curvature != "fisher":  # the data set's Fisher draws its labels per batch (secorder.dataset)
            _close(tr, refs.diag(curvature)[mask].sum(), case.rtol)
        else:
            assert torch.isfinite(tr) and tr >= 0


def test_model_own_loss_in_a_hand_written_f(refs):
    """f(params) = model(**inputs, labels=...).loss, the model's own loss (equal to f): the Hessian transforms.

    transformers computes its losses on logits cast to float32 (transformers/loss/loss_utils.py), so this f is
    float32-accurate even in a float64 model: the references agree to float32's precision.
    """
    case = refs.case
    own = case.own_loss()
    params = refs.params
    value = own(params)
    rtol = 1e-5 if value.dtype == torch.float32 else case.rtol
    torch.testing.assert_close(value, case.f(params, case.inputs, case.targets).to(value.dtype), rtol=rtol, atol=0)
    v = torch.randn(refs.flat.shape, dtype=DT, generator=torch.Generator().manual_seed(7))
    _close(_flat(so.hvp(own)(params, refs.unravel(v))), refs.H @ v, rtol)
    last = list(params)[-1]
    mask = _flat({k: torch.full(t.shape, float(k == last)) for k, t in params.items()}) > 0
    _close(so.trace(lambda p: own(dict(params, **p)))({last: params[last]}), refs.H.diagonal()[mask].sum(),
           rtol)
    est = so.trace_estimate(own, method="hutchinson", num_samples=8, seed=0)(params)
    assert torch.isfinite(est.value) and torch.isfinite(est.stderr)
    if case.name == "gpt2":
        sub, mask = _some(refs)
        top = so.eigenvalues(lambda p: own(dict(params, **p)), k=1, seed=0, tol=1e-6)(sub)
        _close(top, torch.linalg.eigvalsh(refs.H[mask][:, mask])[-1:], rtol)
    with pytest.raises(TypeError, match="output="):
        so.ggn_diag(own)


def _snapshot(model):
    return dict(
        state={k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        training={n: m.training for n, m in model.named_modules()},
        requires_grad={n: p.requires_grad for n, p in model.named_parameters()},
        grads={n: p.grad for n, p in model.named_parameters()},
        config=copy.deepcopy(model.config.to_dict()),
        flags={n: dict(track=m.track_running_stats) for n, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)},
    )


@pytest.mark.parametrize("name", zoo.NAMES)
def test_no_call_changes_the_model(name):
    """Training mode (dropout on, ResNet's batch norms on batch statistics): parameters, buffers, flags, config."""
    case = zoo.build(name, train=True, batch=4)
    model, f, x, y = case.model, case.f, case.inputs, case.targets
    params = case.params()
    before = _snapshot(model)
    so.hvp(f)(params, x, y, params)
    so.ggn_vp(f)(params, x, y, params)
    so.trace(f, curvature="fisher", method="hutchinson", num_samples=2, seed=0)(params, x, y)
    so.diagonal_estimate(f, curvature="empirical_fisher", method="hutchinson", num_samples=2, seed=0)(params, x, y)
    so.eigenvalues(f, k=1, seed=0, num_iterations=5)(params, x, y)
    so.spectral_density(f, curvature="ggn", num_probes=1, num_iterations=4, seed=0)(params, x, y)
    so.trace(so.dataset_loss(f, [case.batch(slice(0, 2)), case.batch(slice(2, 4))]), method="hutchinson",
             num_samples=2, seed=0)(params)
    if name == "resnet":  # a hand-written f updates the running statistics in training mode: refused, explained
        with pytest.raises(RuntimeError, match=r"call model.eval\(\), or build f with so.functional_loss"):
            so.hvp(case.own_loss())(params, params)
    else:
        so.hvp(case.own_loss())(params, params)
    after = _snapshot(model)
    for key in ("training", "requires_grad", "config", "flags"):
        assert after[key] == before[key], key
    assert all(g is None for g in after["grads"].values())
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert model.training


def test_structured_engine_declines_with_a_reason(monkeypatch):
    # ViT runs on the graph walker; with the attention residual's bound lowered its exact Hessian declines,
    # naming both walkers' reasons.
    from secorder.structured.rules import attention

    case = zoo.build("vit")
    ggn = so.trace(case.f, curvature="ggn")
    ggn(case.params(), case.inputs, case.targets)
    assert ggn.last_engine == "structured", ggn.last_fallback_reason
    monkeypatch.setattr(attention, "MAX_RESIDUAL_ENTRIES", 100)
    tr = so.trace(case.f)
    tr(case.params(), case.inputs, case.targets)
    assert tr.last_engine == "generic" and "ViTForImageClassification" in tr.last_fallback_reason
    assert "MAX_RESIDUAL_ENTRIES" in tr.last_fallback_reason
    with pytest.raises(Unsupported, match="ViTForImageClassification"):
        so.trace(case.f, engine="structured")(case.params(), case.inputs, case.targets)


def test_gradient_of_a_curvature_penalty_through_attention():
    """grad of a seeded Hutchinson trace (third derivatives through GPT-2's attention) vs central differences."""
    case = zoo.build("gpt2")
    params = case.params()
    tr = so.trace(case.f, method="hutchinson", num_samples=2, seed=0)
    penalty = lambda p: tr(p, case.inputs, case.targets)  # noqa: E731
    g = _flat(torch.func.grad(penalty)(params))
    flat, unravel = so.tree.ravel(params)
    d = torch.randn(flat.shape, dtype=DT, generator=torch.Generator().manual_seed(9))
    at = lambda t: penalty(unravel(flat + t * d))  # noqa: E731
    h = 3e-5  # the fourth-order central stencil: truncation ~h^4, far below the tolerance
    fd = (8 * (at(h) - at(-h)) - (at(2 * h) - at(-2 * h))) / (12 * h)
    torch.testing.assert_close((g * d).sum(), fd, rtol=1e-7, atol=1e-9)


# ---- per-example curvature under vmap ----------------------------------------------------


def _per_example(case):
    return {k: v[:, None] for k, v in case.inputs.items()}, case.targets[:, None]


@pytest.mark.parametrize("name", ["gpt2", "llama", "vit", "resnet", "convnext"])
def test_per_example_curvature_under_vmap(name):
    case = zoo.build(name, batch=3)
    params = case.params()
    xs, ys = _per_example(case)
    tr = so.trace(case.f, curvature="ggn", method="hutchinson", num_samples=3, seed=0)
    per = torch.func.vmap(tr, in_dims=(None, 0, 0), randomness="same")(params, xs, ys)
    loop = torch.stack([tr(params, *case.batch(slice(i, i + 1))) for i in range(3)])
    torch.testing.assert_close(per, loop, rtol=max(case.rtol, 1e-10), atol=1e-12)


def test_bert_with_an_attention_mask_is_refused_by_vmap_before_secorder_runs():
    """transformers' mask shortcut asks `padding_mask.all()` (data-dependent control flow), which vmap refuses.

    The plain loss fails the same way, so the limit is the model's code, as docs/huggingface.rst says; without
    an attention mask BERT runs under vmap. (If transformers changes this, update the page.)
    """
    case = zoo.build("bert", batch=3)
    params = case.params()
    xs, ys = _per_example(case)
    with pytest.raises(RuntimeError, match="data-dependent control flow"):
        torch.func.vmap(case.f, in_dims=(None, 0, 0))(params, xs, ys)
    no_mask = {"input_ids": xs["input_ids"]}
    tr = so.trace(case.f, curvature="ggn", method="hutchinson", num_samples=3, seed=0)
    per = torch.func.vmap(tr, in_dims=(None, 0, 0), randomness="same")(params, no_mask, ys)
    loop = torch.stack([tr(params, {"input_ids": case.inputs["input_ids"][i:i + 1]}, case.targets[i:i + 1])
                        for i in range(3)])
    torch.testing.assert_close(per, loop, rtol=1e-10, atol=1e-12)


# ---- the legacy API ----------------------------------------------------------------------


class Logits(nn.Module):
    """A Hugging Face model as the legacy model_* functions take it: model(x) -> logits tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits.flatten(0, 1)


@functools.lru_cache(maxsize=1)
def _gpt2_refs():
    return Refs(zoo.build("gpt2"))


def test_legacy_api_on_gpt2():
    from torch_secorder.core import hessian_diagonal, hvp as legacy_hvp

    r = _gpt2_refs()
    case = r.case
    model = case.model
    live = list(model.parameters())
    v = torch.randn(r.flat.shape, dtype=DT, generator=torch.Generator().manual_seed(8))
    vs = list(r.unravel(v).values())
    closure_live = lambda: case.loss_fn(zoo.lm_logits(model(**case.inputs)), case.targets)  # noqa: E731
    as_flat = lambda values: _flat(dict(zip(r.params, values)))  # noqa: E731  (results in parameter order)
    hv = legacy_hvp.exact_hvp(closure_live, live, vs)
    _close(as_flat(hv), r.H @ v, 1e-9)
    # a subset of the parameters (the legacy closure path: one-hot columns on the autograd engine)
    names = list(r.params)[-2:]
    d = hessian_diagonal(closure_live, live[-2:])  # the function, re-exported by torch_secorder.core
    ref = r.unravel(r.H.diagonal().clone())
    _close(torch.cat([t.flatten() for t in d]), torch.cat([ref[n].flatten() for n in names]), 1e-9)
    # the Gauss-Newton product differentiates the model twice: its forward runs on the math kernel
    wrapped = Logits(model)
    gv = legacy_hvp.gauss_newton_product(wrapped, nn.CrossEntropyLoss(), case.inputs["input_ids"],
                                         case.targets.flatten(), vs)
    _close(as_flat(gv), r.matvec("ggn", v), 1e-9)


def test_legacy_prebuilt_loss_through_fused_attention_names_differentiable_ops():
    from torch_secorder.core import hvp as legacy_hvp

    case = zoo.build("gpt2")
    model = case.model
    live = list(model.parameters())
    loss = case.loss_fn(zoo.lm_logits(model(**case.inputs)), case.targets)  # fused attention in its graph
    with pytest.raises(RuntimeError, match=r"not implemented; .*secorder.differentiable_ops\(\)") as err:
        legacy_hvp.hessian_trace(lambda: loss, live, num_samples=2)
    assert "scaled_dot_product" in str(err.value.__cause__) and err.value.__cause__ is not err.value
    with so.differentiable_ops():  # what the hint says: the same loss built inside the context manager
        loss = case.loss_fn(zoo.lm_logits(model(**case.inputs)), case.targets)
    assert isinstance(legacy_hvp.hessian_trace(lambda: loss, live, num_samples=2), float)


def test_legacy_create_graph_fisher_on_fused_attention_warns():
    from torch_secorder.approximations import fisher_diagonal

    case = zoo.build("gpt2")
    logits = case.model(**case.inputs).logits.flatten(0, 1)
    with pytest.warns(UserWarning, match=r"differentiable_ops"):
        fisher_diagonal.generalized_fisher_diagonal(case.model, logits, case.targets.flatten(), create_graph=True)
    with so.differentiable_ops():
        logits = case.model(**case.inputs).logits.flatten(0, 1)
    d = fisher_diagonal.generalized_fisher_diagonal(case.model, logits, case.targets.flatten(), create_graph=True)
    sum(t.sum() for t in d).backward()  # differentiable, as create_graph=True promises
    assert all(p.grad is not None for p in case.model.parameters())


# ---- the input Laplacian ------------------------------------------------------------------


def test_laplacian_with_respect_to_pixel_values():
    case = zoo.build("vit", batch=1)
    params = case.params()
    x = case.inputs["pixel_values"]
    g = lambda pixels: case.f(params, {"pixel_values": pixels}, case.targets)  # noqa: E731
    with so.differentiable_ops():
        ref = torch.func.hessian(lambda z: g(z.reshape(x.shape)))(x.flatten()).trace()
    lap = so.laplacian(case.f, argnums=1)
    torch.testing.assert_close(lap(params, case.inputs, case.targets), ref, rtol=1e-9, atol=1e-12)


# ---- bad input ------------------------------------------------------------------------------


def test_bad_input_on_a_hugging_face_model():
    case = zoo.build("gpt2")
    params, x, y = case.params(), case.inputs, case.targets
    f = so.functional_loss(case.model, nn.CrossEntropyLoss(), output="hidden_states")
    with pytest.raises(ValueError, match=r"fields \['logits'\].*output_hidden_states=True"):
        so.ggn_diag(f)(params, x, y)
    cached = so.functional_loss(case.model, nn.CrossEntropyLoss(), output="cache")
    with pytest.raises(TypeError, match=r"DynamicCache, not a tensor.*use_cache=False"):
        so.hvp(cached)(params, dict(x, use_cache=True), y, params)
    # a float tensor where the model takes token ids: PyTorch's own error
    bad = {"input_ids": x["input_ids"].to(DT)}
    with pytest.raises(RuntimeError) as ours:
        so.trace(case.f, method="hutchinson", num_samples=1, seed=0)(params, bad, y)
    with pytest.raises(RuntimeError) as theirs:
        case.model(**bad)
    assert str(ours.value) == str(theirs.value)

"""so.functional_loss(model, loss_fn, output=None): how the model is called, what the loss sees, and bad input.

Dict inputs are keyword arguments (``model(**inputs)``), tuples positional ones,
anything else the one argument; ``output`` is ``None`` (a tensor as it is, the
``logits`` of a mapping), a field name or a callable. Every transform takes the
resulting ``f`` (the Hugging Face models themselves: tests/test_zoo.py); the
structured engine's module walker declines the forms it does not follow, with a
reason, and the generic path then gives the float64 reference.
"""

import collections
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder as so
from tests.reference import assert_tree_close, dense_hessian

DT = torch.float64


class Keywords(nn.Module):
    """A model called with keyword inputs, returning a mapping (as Hugging Face models do)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(2, 4)

    def forward(self, u, v=None, scale=1.0):
        out = torch.tanh(self.a(u))
        if v is not None:
            out = out + self.b(v)
        return {"loss": out.sum(), "logits": scale * out, "hidden": out.detach()}


Pair = collections.namedtuple("Pair", ["logits", "extra"])


@dataclasses.dataclass
class Result:
    scores: torch.Tensor
    note: str = "x"


class Positional(nn.Module):
    def __init__(self, returns="tensor"):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.returns = returns

    def forward(self, x, y):
        out = torch.tanh(self.lin(x)) * y
        if self.returns == "pair":
            return Pair(out, None)
        if self.returns == "dataclass":
            return Result(out)
        return out


def _data(n=5):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, dtype=DT, generator=g), torch.randn(n, 2, dtype=DT, generator=g),
            torch.randint(0, 4, (n,), generator=g))


def test_dict_inputs_are_keyword_arguments_and_logits_is_the_default():
    torch.manual_seed(0)
    model = Keywords().to(DT)
    u, v, y = _data()
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    inputs = {"u": u, "v": v, "scale": 2.0}
    expected = F.cross_entropy(model(**inputs)["logits"], y)
    torch.testing.assert_close(f(params, inputs, y), expected, rtol=1e-14, atol=0)
    assert torch.equal(f.output(params, inputs), model(**inputs)["logits"])
    assert torch.equal(f.call_model(params, inputs)["hidden"], model(**inputs)["hidden"])


@pytest.mark.parametrize("output", ["hidden_logits", "callable"])
def test_output_field_or_callable(output):
    torch.manual_seed(0)
    model = Keywords().to(DT)
    u, v, y = _data()
    chosen = "logits" if output == "hidden_logits" else (lambda out: out["logits"][:, :3])
    f = so.functional_loss(model, F.cross_entropy, output=chosen)
    expected_out = model(u, v)["logits"] if output == "hidden_logits" else model(u, v)["logits"][:, :3]
    y = y.clamp_max(2)
    params = so.params_dict(model)
    torch.testing.assert_close(f(params, {"u": u, "v": v}, y), F.cross_entropy(expected_out, y), rtol=1e-14, atol=0)


def test_tuple_inputs_are_positional_and_a_tensor_is_one_argument():
    torch.manual_seed(0)
    model = Positional().to(DT)
    u, _, _ = _data()
    w = torch.rand(5, 4, dtype=DT)
    f = so.functional_loss(model, lambda out, t: ((out - t) ** 2).sum())
    params = so.params_dict(model)
    torch.testing.assert_close(f(params, (u, w), torch.zeros(5, 4, dtype=DT)), (model(u, w) ** 2).sum())
    one = so.functional_loss(nn.Linear(3, 2).to(DT), F.mse_loss)
    assert one(so.params_dict(one.model), u, torch.zeros(5, 2, dtype=DT)).shape == ()


@pytest.mark.parametrize("returns, field", [("pair", "logits"), ("dataclass", "scores")])
def test_output_field_of_a_named_tuple_or_dataclass(returns, field):
    torch.manual_seed(0)
    model = Positional(returns).to(DT)
    u, _, y = _data()
    f = so.functional_loss(model, F.cross_entropy, output=field)
    w = torch.ones(5, 4, dtype=DT)
    torch.testing.assert_close(f(so.params_dict(model), (u, w), y), F.cross_entropy(model(u, w)[0] if returns == "pair"
                                                                                   else model(u, w).scores, y))


def test_model_function_receives_inputs_unchanged():
    seen = {}

    def model(p, inputs):
        seen["inputs"] = inputs
        return inputs["x"] @ p

    f = so.functional_loss(model, F.mse_loss)
    x = torch.randn(4, 3, dtype=DT)
    f(torch.ones(3, 2, dtype=DT), {"x": x}, torch.zeros(4, 2, dtype=DT))
    assert set(seen["inputs"]) == {"x"}


def _dense_ggn(out_fn, loss_of_output, flat):
    """``J^T H_out J`` from the output's Jacobian and the loss's output Hessian (float64, plain torch.func)."""
    out = out_fn(flat)
    J = torch.func.jacrev(out_fn)(flat).reshape(out.numel(), -1)
    H_out = torch.func.hessian(lambda o: loss_of_output(o.reshape(out.shape)))(out.flatten())
    return J.T @ H_out @ J, J.reshape(out.shape + (-1,)), out


def test_every_curvature_on_dict_inputs_matches_dense_references():
    """Hessian, GGN, both Fishers: products and exact diagonals on a model called with model(**inputs)."""
    torch.manual_seed(0)
    model = Keywords().to(DT)
    u, v, y = _data()
    inputs = {"u": u, "v": v}
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    H, unravel = dense_hessian(f, (params, inputs, y))
    flat, _ = so.tree.ravel(params)
    out_fn = lambda p: torch.func.functional_call(model, unravel(p), (), inputs)["logits"]
    ggn, J, logits = _dense_ggn(out_fn, lambda o: F.cross_entropy(o, y), flat)
    probs = torch.softmax(logits, 1)
    grads = torch.einsum("ncp,nc->np", J, probs - F.one_hot(y, 4).to(DT))  # per-sample gradients of the sum
    ef = grads.T @ grads / len(y)
    # the Monte-Carlo Fisher's labels, drawn as the operator draws them from the same seed
    labels = torch.multinomial(probs, 1, replacement=True, generator=torch.Generator().manual_seed(3))[:, 0]
    sampled = torch.einsum("ncp,nc->np", J, probs - F.one_hot(labels, 4).to(DT))
    fisher = sampled.T @ sampled / len(y)
    for name, ref in [("hessian", H), ("ggn", ggn), ("fisher", fisher), ("empirical_fisher", ef)]:
        seeded = {"seed": 3} if name == "fisher" else {}
        d = so.diagonal(f, curvature=name, **seeded)(params, inputs, y)
        assert_tree_close(d, unravel(ref.diagonal().clone()), rtol=1e-9, atol=1e-12)
    vec = torch.randn(flat.shape, dtype=DT)
    for product, ref in [(so.hvp(f), H), (so.ggn_vp(f), ggn), (so.fisher_vp(f, seed=3), fisher),
                         (so.empirical_fisher_vp(f), ef)]:
        assert_tree_close(product(params, inputs, y, unravel(vec)), unravel(ref @ vec), rtol=1e-9, atol=1e-12)


def test_dataset_loss_of_dict_batches_with_flattened_token_targets():
    """Inputs [N, T] and targets [N * T]: each batch weighs its tokens, as one big batch does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5)).to(DT)

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, input_ids, attention_mask=None):
            return {"logits": self.body(input_ids)}

    lm = Tokens()
    f = so.functional_loss(lm, nn.CrossEntropyLoss(), output=lambda out: out["logits"].flatten(0, 1))
    ids = torch.randint(0, 5, (3, 4))
    targets = torch.randint(0, 5, (12,))
    batches = [({"input_ids": ids[:1], "attention_mask": torch.ones(1, 4)}, targets[:4]),
               ({"input_ids": ids[1:], "attention_mask": torch.ones(2, 4)}, targets[4:])]
    Fd = so.dataset_loss(f, batches)
    params = so.params_dict(lm)
    whole = {"input_ids": ids, "attention_mask": torch.ones(3, 4)}
    torch.testing.assert_close(Fd(params), f(params, whole, targets))
    assert_tree_close(so.ggn_diag(Fd)(params), so.ggn_diag(f)(params, whole, targets), rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match=r"inputs\['input_ids'\] of shape \(2, 4\)"):
        so.dataset_loss(f, [({"input_ids": ids[1:]}, targets[:5])])(params)


def test_vmap_and_grad_over_dict_inputs():
    torch.manual_seed(0)
    model = Keywords().to(DT)
    u, v, y = _data(4)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    tr = so.trace(f, curvature="ggn")
    per = torch.func.vmap(tr, in_dims=(None, 0, 0))(params, {"u": u[:, None], "v": v[:, None]}, y[:, None])
    loop = torch.stack([tr(params, {"u": u[i:i + 1], "v": v[i:i + 1]}, y[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(per, loop, rtol=1e-10, atol=1e-12)
    hutchinson = so.trace(f, method="hutchinson", num_samples=3, seed=0)
    g = torch.func.grad(lambda p: hutchinson(p, {"u": u, "v": v}, y))(params)
    assert set(g) == set(params) and all(torch.isfinite(t).all() for t in g.values())


def test_structured_engine_follows_output_selections_and_tuple_inputs():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4)).to(DT)
    u, _, y = _data()
    y3 = y.clamp_max(2)
    params = so.params_dict(seq)
    flat, unravel = so.tree.ravel(params)
    # output= selecting from a model that the module walker would otherwise run: the module walk declines
    # (the selection must not be ignored) and the graph walker traces the selection with the model
    sliced = so.functional_loss(seq, nn.CrossEntropyLoss(), output=lambda out: out[:, :3])
    ggn, _, _ = _dense_ggn(lambda p: torch.func.functional_call(seq, unravel(p), (u,))[:, :3],
                           lambda o: F.cross_entropy(o, y3), flat)
    tr = so.trace(sliced, curvature="ggn")
    torch.testing.assert_close(tr(params, u, y3), ggn.trace(), rtol=1e-10, atol=1e-12)
    assert tr.last_engine == "structured", tr.last_fallback_reason
    # a tuple of inputs: the module walker calls model(inputs) on one tensor; the graph walker takes it
    plain = so.functional_loss(seq, nn.CrossEntropyLoss())
    tr2 = so.trace(plain, curvature="ggn")
    torch.testing.assert_close(tr2(params, (u,), y), so.trace(plain, curvature="ggn", engine="generic")(params, u, y),
                               rtol=1e-10, atol=1e-12)
    assert tr2.last_engine == "structured", tr2.last_fallback_reason
    # the plain form still runs on the structured engine
    tr3 = so.trace(plain, curvature="ggn")
    tr3(params, u, y)
    assert tr3.last_engine == "structured"


# ---- bad input --------------------------------------------------------------------------


def test_missing_field_lists_the_fields():
    torch.manual_seed(0)
    model = Keywords().to(DT)
    u, v, y = _data()
    f = so.functional_loss(model, F.cross_entropy, output="scores")
    with pytest.raises(ValueError, match=r"output='scores'.*fields \['loss', 'logits', 'hidden'\]"):
        f(so.params_dict(model), {"u": u}, y)
    with pytest.raises(ValueError, match=r"output='scores'.*fields \['loss', 'logits', 'hidden'\]"):
        so.ggn_diag(f)(so.params_dict(model), {"u": u}, y)

    class NoLogits(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return {"scores": self.lin(x)}

    g = so.functional_loss(NoLogits().to(DT), F.cross_entropy)
    with pytest.raises(ValueError, match=r"output=None takes the field 'logits'.*\['scores'\]"):
        so.hvp(g)(so.params_dict(g.model), u, y.clamp_max(1), so.params_dict(g.model))
    h = so.functional_loss(nn.Linear(3, 2).to(DT), F.cross_entropy, output="logits")
    with pytest.raises(ValueError, match="returned a tensor of shape"):
        h(so.params_dict(h.model), u, y.clamp_max(1))


def test_output_callable_returning_a_non_tensor():
    torch.manual_seed(0)
    model = Keywords().to(DT)
    u, _, y = _data()
    f = so.functional_loss(model, F.cross_entropy, output=lambda out: (out["logits"], out["hidden"]))
    with pytest.raises(TypeError, match="output callable <lambda> returned a tuple of length 2, not a tensor"):
        so.trace(f, curvature="ggn")(so.params_dict(model), {"u": u}, y)


def test_inputs_the_model_rejects_raise_the_models_own_error():
    torch.manual_seed(0)
    model = Keywords().to(DT)
    u, _, y = _data()
    f = so.functional_loss(model, F.cross_entropy)
    with pytest.raises(TypeError) as ours:
        so.hvp(f)(so.params_dict(model), {"u": u, "w": u}, y, so.params_dict(model))
    with pytest.raises(TypeError) as theirs:
        model(**{"u": u, "w": u})
    assert str(ours.value) == str(theirs.value)
    lin = nn.Linear(3, 2).to(DT)
    g = so.functional_loss(lin, F.cross_entropy)
    with pytest.raises(RuntimeError) as ours:
        so.hvp(g)(so.params_dict(lin), u.float(), y.clamp_max(1), so.params_dict(lin))
    with pytest.raises(RuntimeError) as theirs:
        lin(u.float())
    assert str(ours.value) == str(theirs.value)


def test_bad_output_argument():
    with pytest.raises(TypeError, match="output must be None, a field name"):
        so.functional_loss(nn.Linear(2, 2), F.mse_loss, output=3)
    with pytest.raises(ValueError, match="output must name a field"):
        so.functional_loss(nn.Linear(2, 2), F.mse_loss, output="")
    with pytest.raises(TypeError, match="keys must be strings"):
        lin = nn.Linear(2, 2)
        so.functional_loss(lin, F.mse_loss)(so.params_dict(lin), {0: torch.ones(1, 2)}, torch.ones(1, 2))


@pytest.mark.parametrize("curvature", ["ggn", "fisher", "empirical_fisher"])
def test_split_curvature_on_a_hand_written_f_mentions_output(curvature):
    model = Keywords().to(DT)
    f = lambda p, inputs, y: F.cross_entropy(torch.func.functional_call(model, p, (), inputs)["logits"], y)
    with pytest.raises(TypeError, match=r"so.functional_loss\(model, loss_fn, output=None\).*output='logits'"):
        so.diagonal(f, curvature=curvature)


def test_repr_shows_output():
    f = so.functional_loss(nn.Linear(2, 2), F.mse_loss, output="logits")
    assert repr(f) == "functional_loss(Linear, 'mse_loss', output='logits')"


def test_threads_sharing_one_model_get_their_own_results():
    """functional_call swaps the module's tensors while it runs: concurrent calls of one module are serialised."""
    import threading

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 64), nn.Tanh(), nn.Linear(64, 3)).to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    x, y = torch.randn(64, 30, dtype=DT), torch.randint(0, 3, (64,))
    params = so.params_dict(model)
    # each thread its own parameters: a swapped-in tensor of another thread shows as a wrong gradient
    points = [{k: v + 0.1 * i for k, v in params.items()} for i in range(3)]
    g = torch.func.grad(f)
    expected = [g(p, x, y) for p in points]
    wrong = []

    def worker(i):
        for _ in range(15):
            out = g(points[i], x, y)
            if not all(torch.equal(out[k], expected[i][k]) for k in out):
                wrong.append(i)
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong

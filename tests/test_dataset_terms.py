"""so.dataset_loss, issue 25: batch weights are the loss's own term counts, calls that F refuses are refused,
one-shot data and the documented language-model layouts.

Every test here failed on the main branch before its fix (the item of issue 25 is in the docstring).
"""

import functools

import pytest
import torch
import torch.nn.functional as Fn
from torch import nn

import secorder as so

DT = torch.float64
BOUNDS = [0, 4, 10, 13]  # batches of 4, 6 and 3


def _split(x, y, bounds=BOUNDS):
    return [(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _model(seed=0, out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, out)).to(DT)


def _data(seed=1, classes=3, ignored=(0, 1, 2, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(13, 3, dtype=DT, generator=g)
    y = torch.randint(0, classes, (13,), generator=g)
    y[list(ignored)] = -100  # three ignored targets in the first batch, one in the second
    return x, y


def _agrees_with_one_batch(f, x, y, rtol=1e-10):
    model_params = so.params_dict(f.model)
    summed = getattr(f.loss_fn, "reduction", None) == "sum"
    F = so.dataset_loss(f, _split(x, y), reduction="sum" if summed else "mean")
    torch.testing.assert_close(F(model_params), f(model_params, x, y), rtol=rtol, atol=1e-12)
    torch.testing.assert_close(so.trace(F)(model_params), so.trace(f)(model_params, x, y), rtol=rtol, atol=1e-12)
    g1, g2 = F.value_and_grad(model_params)[1], torch.func.grad(f)(model_params, x, y)
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=rtol, atol=1e-12)


W = torch.tensor([1.0, 2.5, 0.5], dtype=DT)


@pytest.mark.parametrize("loss", [
    nn.CrossEntropyLoss(weight=W),
    nn.CrossEntropyLoss(label_smoothing=0.1),
    nn.CrossEntropyLoss(weight=W, label_smoothing=0.1),
    nn.CrossEntropyLoss(weight=W, reduction="sum"),
    functools.partial(Fn.cross_entropy, weight=W, label_smoothing=0.2),
    Fn.cross_entropy,
], ids=["weight", "smoothing", "weight+smoothing", "weight-sum", "partial-weight-smoothing", "function"])
def test_weighted_and_smoothed_cross_entropy_equals_one_big_batch(loss):
    """Items 2 and 3: class weights and label smoothing weighted batches by their sizes (loss 1.0852 for 1.0758)."""
    model = _model()
    f = so.functional_loss(model, loss)
    x, y = _data()
    _agrees_with_one_batch(f, x, y)


def test_nll_loss_with_weights_and_ignored_targets_equals_one_big_batch():
    model = nn.Sequential(_model(), nn.LogSoftmax(dim=1))
    x, y = _data()
    _agrees_with_one_batch(so.functional_loss(model, nn.NLLLoss(weight=W)), x, y)


def test_a_batch_whose_terms_all_weigh_nothing_adds_nothing():
    """Every target of the first batch ignored or of weight 0: PyTorch's mean is nan there; F skips the batch."""
    model = _model()
    x, y = _data(ignored=())
    y[:4] = torch.tensor([-100, 2, 2, -100])
    f = so.functional_loss(model, nn.CrossEntropyLoss(weight=torch.tensor([1.0, 0.5, 0.0], dtype=DT)))
    _agrees_with_one_batch(f, x, y)


def test_total_weight_below_one_is_not_clamped():
    """A weighted count below 1 (small class weights) is a denominator like any other (it was clamped to 1)."""
    model = _model()
    x, y = _data(ignored=())
    f = so.functional_loss(model, nn.CrossEntropyLoss(weight=torch.tensor([0.01, 0.03, 0.002], dtype=DT)))
    _agrees_with_one_batch(f, x, y)


def test_an_unknown_loss_with_ignored_targets_is_refused_not_weighted_by_batch_size():
    """Item 3: ``lambda o, t: F.cross_entropy(o, t)`` with ignored targets gave 1.4234 for 1.3254."""
    model = _model()
    f = so.functional_loss(model, lambda o, t: Fn.cross_entropy(o, t))
    x, y = _data()
    p = so.params_dict(model)
    F = so.dataset_loss(f, _split(x, y))
    for call in (lambda: F(p), lambda: so.trace(F)(p), lambda: so.hvp(F)(p, p)):
        with pytest.raises(ValueError, match="batch 0 has integer targets with negative entries"):
            call()
    plain = so.dataset_loss(lambda p, x, y: f(p, x, y), _split(x, y))  # not even a FunctionalLoss
    with pytest.raises(ValueError, match="batch_reduction='sum' with num_data"):
        plain(p)


def test_batch_reduction_sum_with_num_data_is_the_way_out():
    model = _model()
    x, y = _data()
    p = so.params_dict(model)
    f = so.functional_loss(model, lambda o, t: Fn.cross_entropy(o, t, reduction="sum"))
    n = int((y != -100).sum())
    F = so.dataset_loss(f, _split(x, y), batch_reduction="sum", num_data=n)
    ref = so.functional_loss(model, nn.CrossEntropyLoss())
    torch.testing.assert_close(F(p), ref(p, x, y), rtol=1e-12, atol=0)
    torch.testing.assert_close(so.trace(F)(p), so.trace(ref)(p, x, y), rtol=1e-10, atol=0)
    # a per-sample mean declared as such is not refused (the user says what f is)
    G = so.dataset_loss(so.functional_loss(model, lambda o, t: Fn.cross_entropy(o, t)), _split(x, y),
                        batch_reduction="mean")
    assert torch.isfinite(G(p))


def test_batch_reduction_is_validated():
    model = _model()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    data = _split(*_data())
    with pytest.raises(ValueError, match="batch_reduction must be None, 'mean' or 'sum'"):
        so.dataset_loss(f, data, batch_reduction="none")
    with pytest.raises(TypeError, match="batch_reduction must be None"):
        so.dataset_loss(f, data, batch_reduction=1)
    with pytest.raises(ValueError, match="f's loss is a mean over its terms"):
        so.dataset_loss(f, data, batch_reduction="sum")
    with pytest.raises(ValueError, match="needs num_data"):
        so.dataset_loss(lambda p, x, y: x.sum(), data, batch_reduction="sum")


@pytest.mark.parametrize("loss, targets", [
    (nn.L1Loss(), lambda g: torch.randn(13, 3, dtype=DT, generator=g)),
    (nn.HuberLoss(delta=0.5), lambda g: torch.randn(13, 3, dtype=DT, generator=g)),
    (nn.KLDivLoss(reduction="batchmean"), lambda g: torch.softmax(torch.randn(13, 3, dtype=DT, generator=g), 1)),
    (nn.MultiMarginLoss(), lambda g: torch.randint(0, 3, (13,), generator=g)),
], ids=["l1", "huber", "kl-batchmean", "multi-margin"])
def test_other_losses_count_their_terms(loss, targets):
    model = _model()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 3, dtype=DT, generator=g)
    f = so.functional_loss(nn.Sequential(model, nn.LogSoftmax(1)) if isinstance(loss, nn.KLDivLoss) else model, loss)
    p = so.params_dict(f.model)
    y = targets(g)
    F = so.dataset_loss(f, _split(x, y))
    torch.testing.assert_close(F(p), f(p, x, y), rtol=1e-12, atol=1e-14)


def test_extra_arguments_are_refused_by_every_transform():
    """Item 10: ``so.trace(F)(p, x)`` silently ignored ``x``; ``F(p, x)`` raises."""
    model = _model()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    x, y = _data(ignored=())
    p = so.params_dict(model)
    F = so.dataset_loss(f, _split(x, y))
    calls = {
        "trace": lambda: so.trace(F)(p, x), "trace generic": lambda: so.trace(F, engine="generic")(p, x),
        "hessian_diag": lambda: so.hessian_diag(F)(p, x), "ggn_diag": lambda: so.ggn_diag(F)(p, x),
        "trace_estimate": lambda: so.trace_estimate(F, num_samples=2, seed=0)(p, x),
        "diagonal_estimate": lambda: so.diagonal_estimate(F, num_samples=2, seed=0)(p, x),
        "hvp": lambda: so.hvp(F)(p, x, p), "ggn_vp": lambda: so.ggn_vp(F)(p, x, p),
        "eigenvalues": lambda: so.eigenvalues(F, seed=0)(p, x),
        "spectral_density": lambda: so.spectral_density(F, num_probes=1, seed=0)(p, x),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match="takes the parameters alone"):
            call()
    with pytest.raises(TypeError):
        F(p, x)


class _OneShot:
    """An iterable whose ``__iter__`` gives its batches once and nothing after (a stream)."""

    def __init__(self, batches):
        self.batches, self.used = batches, False

    def __iter__(self):
        if self.used:
            return iter(())
        self.used = True
        return iter(self.batches)


def test_a_one_shot_iterable_gets_the_iterate_again_message():
    """Item 15: the check made when F was built used the one pass; the first call said "data is empty"."""
    model = _model()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    x, y = _data(ignored=())
    p = so.params_dict(model)
    F = so.dataset_loss(f, _OneShot(_split(x, y)))
    torch.testing.assert_close(F(p), f(p, x, y))  # the first pass is the data's one pass
    with pytest.raises(ValueError, match="must be iterable again"):
        F(p)
    G = so.dataset_loss(f, _OneShot(_split(x, y)))
    with pytest.raises(ValueError, match="must give the same batches on every pass"):
        so.trace_estimate(G, num_samples=4, chunk_size=2, seed=0)(p)  # two passes within one call
    with pytest.raises(ValueError, match="data is empty"):
        so.dataset_loss(f, _OneShot([]))(p)


class _Tokens(nn.Module):
    """A tiny language model on ``[N, T]`` tokens: logits ``[N, T, vocab]``."""

    def __init__(self, vocab=5, d=3):
        super().__init__()
        self.emb, self.out = nn.Embedding(vocab, d), nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.out(torch.tanh(self.emb(tokens)))


@pytest.mark.parametrize("layout", ["flatten", "transpose"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_documented_language_model_layout(layout, reduction):
    """Item 16: docs/transformers.rst's ``Flatten(0, 1)`` layout (tokens [N, T], targets [N*T]) was rejected."""
    torch.manual_seed(0)
    tail = nn.Flatten(0, 1) if layout == "flatten" else so.Transpose(1, 2)
    model = nn.Sequential(_Tokens(), tail).to(DT)
    f = so.functional_loss(model, nn.CrossEntropyLoss(reduction=reduction))
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 5, (7, 4), generator=g)
    targets = torch.randint(0, 5, (7, 4), generator=g)
    targets[0, :3] = -100  # padding
    targets[5] = -100
    p = so.params_dict(model)
    y = targets.flatten() if layout == "flatten" else targets
    per_sample = 4 if layout == "flatten" else 1
    batches = [(tokens[a:b], y[a * per_sample:b * per_sample]) for a, b in [(0, 3), (3, 6), (6, 7)]]
    F = so.dataset_loss(f, batches, reduction=reduction)
    torch.testing.assert_close(F(p), f(p, tokens, y), rtol=1e-12, atol=1e-14)
    for transform in (so.trace, so.ggn_diag):
        torch.testing.assert_close(so.tree.ravel(transform(F)(p))[0], so.tree.ravel(transform(f)(p, tokens, y))[0],
                                   rtol=1e-10, atol=1e-13)
    bad = [(tokens[:3], y[:5])]
    with pytest.raises(ValueError, match="leading \\(batch\\) dimensions differ"):
        so.dataset_loss(f, bad)(p)


def test_seeded_fisher_does_not_depend_on_shuffling_or_batching():
    """Item 9: over a DataLoader(shuffle=True) the seeded MC Fisher changed between calls (1.966 then 2.081) and
    between engines, because labels were drawn per batch in visiting order; now they are keyed per sample."""
    model = _model()
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    x, y = _data(ignored=())
    p = so.params_dict(model)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    F = so.dataset_loss(f, loader)
    one = so.dataset_loss(f, [(x, y)])
    ref = so.trace(one, curvature="fisher", seed=3)(p)
    for engine in ("auto", "generic", "auto"):
        fn = so.trace(F, curvature="fisher", seed=3, engine=engine)
        torch.testing.assert_close(fn(p), ref, rtol=1e-10, atol=0)
        assert fn.last_engine == ("structured" if engine == "auto" else "generic")
    v = {k: torch.randn_like(t) for k, t in p.items()}
    a, b = so.fisher_vp(F, seed=3)(p, v), so.fisher_vp(one, seed=3)(p, v)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-13)
    # a different seed gives different labels (the keys are not the content alone)
    assert not torch.allclose(so.trace(one, curvature="fisher", seed=4)(p), ref)

"""The structured engine under adversarial use (issue 9 items 2, 9, 14, 15).

* A module whose behaviour is changed on the instance (``forward``,
  ``__call__``, ``_call_impl``, hooks), on the model, a submodule or the loss,
  sends the model to the generic path, which computes what ``f`` computes.
* A mean over no terms (empty batch, every target ignored): ``f`` is NaN
  (0/0); the gradient and every curvature are 0, as ``torch.func.grad`` and
  ``torch.func.hessian`` of ``f`` say, on both engines.
* Where ``f`` raises for its targets, the engine raises the same error.
* The loss factor's columns are pulled back in chunks whose size the user can
  bound (``factor_chunk_size``), with a default bounded by memory.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder as so
from secorder import tree
from secorder.structured import backprop, model_diagonal, model_trace
from secorder.structured.curvature import SoftmaxFactor
from tests.reference import reference_diag, reference_trace

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)


def data(n=5):
    return torch.randn(n, 3, dtype=DT), torch.randint(0, 3, (n,))


# ---- item 2: instance-level overrides --------------------------------------------------------

def _override_forward_of_a_layer(model, loss):
    model[1].forward = torch.sin
    return model, loss


def _override_forward_of_the_sequential(model, loss):
    layers = list(model)
    model.forward = lambda x: layers[2](torch.sin(layers[0](x)))
    return model, loss


def _override_call_impl(model, loss):
    model[1]._call_impl = lambda x: torch.sin(x)
    return model, loss


def _override_call(model, loss):
    model[1].__call__ = lambda x: torch.sin(x)  # Python ignores it for m(x); the engine declines anyway
    return model, loss


def _hook(model, loss):
    model[1].register_forward_hook(lambda m, i, o: 2 * o)
    return model, loss


def _override_loss_forward(model, loss):
    loss.forward = lambda out, y: F.cross_entropy(2 * out, y)
    return model, loss


OVERRIDES = [_override_forward_of_a_layer, _override_forward_of_the_sequential, _override_call_impl,
             _override_call, _hook, _override_loss_forward]


@pytest.mark.parametrize("override", OVERRIDES, ids=lambda f: f.__name__[1:])
def test_instance_level_overrides_take_the_generic_path(override):
    model, loss = override(mlp(), nn.CrossEntropyLoss())
    x, y = data()
    f = so.functional_loss(model, loss)
    params = so.params_dict(model)
    for make in (so.trace, so.hessian_diag, so.ggn_trace):
        fn = make(f)
        out = fn(params, x, y)
        assert fn.last_engine == "generic", make.__name__
        with pytest.raises(ValueError, match="instance-level|hooks"):
            make(f, engine="structured")(params, x, y)
    torch.testing.assert_close(so.trace(f)(params, x, y), reference_trace(f, (params, x, y)), **TOL)
    assert model_trace(model, loss, x, y) is None
    assert model_diagonal(model, loss, x, y, kind="ggn") is None


def test_functional_loss_subclass_that_overrides_call_declines():
    class Scaled(so.FunctionalLoss):
        def __call__(self, *args, **kwargs):
            return 3 * super().__call__(*args, **kwargs)

    model = mlp()
    f = Scaled(model, nn.CrossEntropyLoss())
    x, y = data()
    params = so.params_dict(model)
    fn = so.trace(f)
    t = fn(params, x, y)
    assert fn.last_engine == "generic"
    torch.testing.assert_close(t, reference_trace(f, (params, x, y)), **TOL)


# ---- item 9: means over no terms ------------------------------------------------------------

EMPTY = [
    (nn.MSELoss(), lambda: (torch.randn(0, 3, dtype=DT), torch.randn(0, 3, dtype=DT))),
    (nn.BCEWithLogitsLoss(), lambda: (torch.randn(0, 3, dtype=DT), torch.rand(0, 3, dtype=DT))),
    (nn.CrossEntropyLoss(), lambda: (torch.randn(0, 3, dtype=DT), torch.zeros(0, dtype=torch.long))),
    (nn.CrossEntropyLoss(ignore_index=1), lambda: (torch.randn(4, 3, dtype=DT), torch.ones(4, dtype=torch.long))),
    (nn.CrossEntropyLoss(reduction="sum"), lambda: (torch.randn(0, 3, dtype=DT), torch.zeros(0, dtype=torch.long))),
    (nn.MSELoss(reduction="sum"), lambda: (torch.randn(0, 3, dtype=DT), torch.randn(0, 3, dtype=DT))),
]


@pytest.mark.parametrize("loss,make", EMPTY, ids=["mse-empty", "bce-empty", "ce-empty", "ce-all-ignored",
                                                  "ce-sum-empty", "mse-sum-empty"])
def test_a_mean_over_no_terms_has_zero_curvature_on_both_engines(loss, make):
    model = mlp()
    x, y = make()
    f = so.functional_loss(model, loss)
    params = so.params_dict(model)
    value = f(params, x, y)
    assert torch.isnan(value) if loss.reduction == "mean" else value == 0
    # The Hessian of f by autograd, row by row (under vmap/jvp mse_loss's decomposition divides by numel 0).
    flat, unravel = tree.ravel(params)
    H = torch.autograd.functional.hessian(lambda v: f(unravel(v), x, y), flat)
    assert bool((H == 0).all())
    ref = unravel(torch.diagonal(H))
    for make_fn in (so.hessian_diag, so.ggn_diag):
        for engine in ("structured", "generic"):
            d = make_fn(f, engine=engine)(params, x, y)
            for k in params:
                torch.testing.assert_close(d[k], ref[k], **TOL)
    for make_fn in (so.trace, so.ggn_trace):
        for engine in ("structured", "generic"):
            assert make_fn(f, engine=engine)(params, x, y) == 0
    grad = torch.func.grad(lambda p: so.trace(f, engine="structured")(p, x, y))(params)
    assert all(bool((v == 0).all()) for v in grad.values())


def test_some_ignored_targets_keep_the_gradient_of_the_trace_finite():
    model = mlp()
    x, y = data()
    y[1] = 1
    f = so.functional_loss(model, nn.CrossEntropyLoss(ignore_index=1))
    params = so.params_dict(model)
    g = torch.func.grad(lambda p: so.trace(f, engine="structured")(p, x, y))(params)
    ref = torch.func.grad(lambda p: reference_trace(f, (p, x, y)))(params)
    for k in params:
        torch.testing.assert_close(g[k], ref[k], rtol=1e-9, atol=1e-12)


# ---- item 14: raise what f raises -------------------------------------------------------------

BAD_TARGETS = [
    (nn.CrossEntropyLoss(), lambda: torch.tensor([0, 1, 2, 1, 0], dtype=torch.int32)),
    (nn.BCEWithLogitsLoss(), lambda: torch.randint(0, 2, (5, 3))),
    (functools.partial(F.binary_cross_entropy_with_logits, reduction="sum"), lambda: torch.randint(0, 2, (5, 3))),
]


@pytest.mark.parametrize("loss,make", BAD_TARGETS, ids=["ce-int32", "bce-long", "bce-fn-long"])
def test_the_engine_raises_what_f_raises(loss, make):
    model = mlp()
    x, _ = data()
    y = make()
    f = so.functional_loss(model, loss)
    params = so.params_dict(model)
    with pytest.raises(Exception) as expected:
        f(params, x, y)
    for make_fn in (so.trace, so.hessian_diag, so.ggn_diag):
        for engine in ("auto", "structured"):
            with pytest.raises(type(expected.value), match=str(expected.value)[:30]):
                make_fn(f, engine=engine)(params, x, y)
    with pytest.raises(type(expected.value)):
        model_trace(model, loss, x, y)


# ---- item 15: the loss factor in chunks ------------------------------------------------------

class ChunkSpy:
    """Records the number of factor columns in each pass of the sweep."""

    def __init__(self, monkeypatch):
        self.sizes = []
        original = backprop.Sweep.pull
        spy = self

        def pull(sweep, plan, states, curv, g, need_input, need_grad_input):
            if not getattr(sweep, "_inside", False):
                spy.sizes.append(sum(t.a.shape[0] for t in curv.terms if isinstance(t, SoftmaxFactor)))
            sweep._inside = True
            try:
                return original(sweep, plan, states, curv, g, need_input, need_grad_input)
            finally:
                sweep._inside = False

        monkeypatch.setattr(backprop.Sweep, "pull", pull)


def wide_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 6), nn.Sigmoid(), so.Residual(nn.Sequential(nn.Linear(6, 6), nn.Tanh())),
                         nn.Linear(6, 10)).to(DT)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_factor_chunks_give_the_same_diagonal_and_are_bounded(chunk, monkeypatch):
    model = wide_model()
    x, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 9, 3, 3])
    f = so.functional_loss(model, nn.CrossEntropyLoss())
    params = so.params_dict(model)
    whole = {kind: model_diagonal(model, nn.CrossEntropyLoss(), x, y, kind=kind) for kind in ("hessian", "ggn")}
    spy = ChunkSpy(monkeypatch)
    for kind in ("hessian", "ggn"):
        spy.sizes.clear()
        d = model_diagonal(model, nn.CrossEntropyLoss(), x, y, kind=kind, factor_chunk_size=chunk)
        assert sum(spy.sizes) == 10 and max(spy.sizes) <= chunk
        for a, b in zip(d, whole[kind]):
            torch.testing.assert_close(a, b, **TOL)
        t = model_trace(model, nn.CrossEntropyLoss(), x, y, kind=kind, factor_chunk_size=chunk)
        torch.testing.assert_close(t, sum(v.sum() for v in whole[kind]), **TOL)
    ref = reference_diag(f, (params, x, y))
    for a, k in zip(whole["hessian"], params):
        torch.testing.assert_close(a, ref[k], **TOL)


def test_default_factor_chunks_follow_the_memory_bound(monkeypatch):
    model = wide_model()
    x, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 9, 3, 3])
    spy = ChunkSpy(monkeypatch)
    # 4 columns x N=4 samples x width 6: the widest layer before the logits (the softmax factor is never
    # formed at the 10 logits: the last linear layer pulls it back implicitly).
    monkeypatch.setattr(backprop, "FACTOR_CHUNK_ENTRIES", 4 * 4 * 6)
    d = model_diagonal(model, nn.CrossEntropyLoss(), x, y)
    assert spy.sizes == [4, 4, 2]
    monkeypatch.setattr(backprop, "FACTOR_CHUNK_ENTRIES", 2 ** 24)
    spy.sizes.clear()
    for a, b in zip(d, model_diagonal(model, nn.CrossEntropyLoss(), x, y)):
        torch.testing.assert_close(a, b, **TOL)
    assert spy.sizes == [10]


def test_factor_chunk_size_is_validated():
    model = mlp()
    x, y = data()
    with pytest.raises(ValueError, match="factor_chunk_size"):
        model_trace(model, nn.CrossEntropyLoss(), x, y, factor_chunk_size=0)
    with pytest.raises(TypeError, match="factor_chunk_size"):
        model_trace(model, nn.CrossEntropyLoss(), x, y, factor_chunk_size=2.0)

"""Legacy ``torch_secorder.core.per_layer_curvature``: per-layer blocks of dense float64 Hessian diagonals and squared gradients."""

import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_secorder import LegacyTypeError, LegacyValueError
from torch_secorder.core.per_layer_curvature import (
    get_layer_curvature_stats,
    per_layer_fisher_diagonal,
    per_layer_hessian_diagonal,
)
from tests.test_legacy_support import model_hessian

F64 = torch.float64


class SimpleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(10, 5)
        self.linear2 = nn.Linear(5, 3)

    def forward(self, x):
        x = F.relu(self.linear1(x))
        return self.linear2(x)


def _blocks(model, flat, layer_names):
    """Split a flat per-parameter vector (model.parameters() order) into per-layer blocks."""
    params = dict(model.named_parameters())
    out, offset = {}, 0
    chunks = {}
    for name, p in params.items():
        chunks[name] = flat[offset:offset + p.numel()]
        offset += p.numel()
    for layer in layer_names:
        out[layer] = torch.cat([chunks[n] for n in params if n.startswith(layer + ".")])
    return out


def _gradient_squares(model, loss_fn, x, y):
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params)
    return torch.cat([g.reshape(-1) ** 2 for g in grads])


def test_documented_examples_verbatim():
    # docs/api/core/per_layer_curvature.rst and tests/unit/test_per_layer_curvature.py of torch-secorder 0.0.1.
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1 = nn.Linear(10, 20)
            self.linear2 = nn.Linear(20, 5)
            self.linear3 = nn.Linear(5, 1)

        def forward(self, x):
            return self.linear3(self.linear2(self.linear1(x)))

    model = Deep()
    inputs, targets = torch.randn(5, 10), torch.randn(5, 1)
    layer_hessians = per_layer_hessian_diagonal(model, nn.MSELoss(), inputs, targets)
    assert {k: tuple(v.shape) for k, v in layer_hessians.items()} == {"linear1": (220,), "linear2": (105,), "linear3": (6,)}
    assert all(h.grad_fn is None for h in layer_hessians.values())
    stats = get_layer_curvature_stats(layer_hessians)
    assert set(stats) == set(layer_hessians) and all(set(s) == {"mean", "std", "max", "min"} for s in stats.values())
    assert all(isinstance(v, float) for s in stats.values() for v in s.values())

    torch.manual_seed(42)
    X, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
    model = SimpleModel()
    fisher = per_layer_fisher_diagonal(model, F.cross_entropy, X, y)
    assert set(fisher) == {"linear1", "linear2"}
    assert fisher["linear1"].shape == (55,) and fisher["linear2"].shape == (18,)
    assert all(torch.all(d >= 0) for d in fisher.values())
    graph = per_layer_fisher_diagonal(model, nn.CrossEntropyLoss(), X, y, create_graph=True)
    assert all(d.grad_fn is not None for d in graph.values())
    graph = per_layer_hessian_diagonal(model, nn.CrossEntropyLoss(), X, y, create_graph=True)
    assert all(d.grad_fn is not None for d in graph.values())
    assert per_layer_hessian_diagonal(model, nn.CrossEntropyLoss(), X, y, layer_types=[nn.Conv2d]) == {}
    assert list(per_layer_fisher_diagonal(model, nn.CrossEntropyLoss(), X, y, layer_types=[nn.Linear])) == ["linear1", "linear2"]
    stats = get_layer_curvature_stats({"layer1": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
                                       "layer2": torch.tensor([[5.0, 6.0], [7.0, 8.0]])})
    assert abs(stats["layer1"]["mean"] - 2.5) < 1e-6 and stats["layer1"]["max"] == 4.0 and stats["layer1"]["min"] == 1.0


def _tanh_model(norm=False):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 5)] + ([nn.RMSNorm(5)] if norm else []) + [nn.Tanh(), nn.Linear(5, 3)]
    return nn.Sequential(*layers).to(F64)


@pytest.mark.parametrize("norm", [False, True], ids=["structured", "closure_path"])
@pytest.mark.parametrize("loss_fn", [F.cross_entropy, F.mse_loss])
def test_hessian_blocks_match_dense_hessian(norm, loss_fn):
    model = _tanh_model(norm)
    x = torch.randn(6, 4, dtype=F64)
    y = torch.randint(0, 3, (6,)) if loss_fn is F.cross_entropy else torch.randn(6, 3, dtype=F64)
    H, _ = model_hessian(model, loss_fn, x, y)
    layers = ["0", "3"] if norm else ["0", "2"]
    ref = _blocks(model, torch.diagonal(H), layers)
    for create_graph in (False, True):
        got = per_layer_hessian_diagonal(model, loss_fn, x, y, create_graph=create_graph)
        assert list(got) == layers
        for k in layers:
            assert got[k].dtype == F64 and got[k].grad_fn is None if not create_graph else True
            torch.testing.assert_close(got[k].detach(), ref[k], rtol=1e-10, atol=1e-12)
    if norm:   # RMSNorm counted as a layer: its parameters' block
        got = per_layer_hessian_diagonal(model, loss_fn, x, y, layer_types=[nn.RMSNorm])
        torch.testing.assert_close(got["1"], _blocks(model, torch.diagonal(H), ["1"])["1"], rtol=1e-10, atol=1e-12)


def test_fisher_blocks_are_squared_minibatch_gradients():
    model = _tanh_model(norm=True)
    x, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    ref = _blocks(model, _gradient_squares(model, F.cross_entropy, x, y), ["0", "3"])
    got = per_layer_fisher_diagonal(model, F.cross_entropy, x, y)
    for k in ref:
        assert got[k].grad_fn is None
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-14)


def test_frozen_layer_is_still_computed_and_flags_restored():
    # 0.0.1 switched requires_grad on for the layer it computed; so do we, and switch it back.
    model = _tanh_model(norm=True)
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(6, 4, dtype=F64), torch.randint(0, 3, (6,))
    H, _ = model_hessian(model, F.cross_entropy, x, y)
    got = per_layer_hessian_diagonal(model, F.cross_entropy, x, y)
    torch.testing.assert_close(got["0"], _blocks(model, torch.diagonal(H), ["0"])["0"], rtol=1e-10, atol=1e-12)
    fisher = per_layer_fisher_diagonal(model, F.cross_entropy, x, y)
    assert fisher["0"][:20].abs().sum() > 0
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True, True]  # RMSNorm: weight only


def test_state_restored_after_exception_and_training_batchnorm():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(F64).train()
    x, y = torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,))
    model[3].bias.requires_grad_(False)
    state = {k: t.clone() for k, t in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    for fn in (per_layer_hessian_diagonal, per_layer_fisher_diagonal):
        fn(model, F.cross_entropy, x, y)
        with pytest.raises(KeyError):
            fn(model, lambda out, target: {}["boom"], x, y)
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items()) and model.training


def test_stats_edge_cases():
    with pytest.warns(UserWarning, match="degrees of freedom"):
        stats = get_layer_curvature_stats({"a": torch.tensor([2.0]), "b": torch.tensor([1, 3])})
    assert stats["a"]["mean"] == 2.0 and stats["a"]["std"] != stats["a"]["std"]   # one entry: NaN, as Tensor.std
    assert stats["b"] == {"mean": 2.0, "std": 2 ** 0.5, "max": 3.0, "min": 1.0}
    with pytest.raises(LegacyValueError, match=r"\['e'\] is empty"):
        get_layer_curvature_stats({"e": torch.zeros(0)})
    with pytest.raises(LegacyTypeError):
        get_layer_curvature_stats([torch.ones(2)])


def test_signatures_and_defaults():
    P = inspect.Parameter
    for fn in (per_layer_hessian_diagonal, per_layer_fisher_diagonal):
        assert [(p.name, p.default) for p in inspect.signature(fn).parameters.values()] == [
            ("model", P.empty), ("loss_fn", P.empty), ("inputs", P.empty), ("targets", P.empty),
            ("layer_types", None), ("create_graph", False)]

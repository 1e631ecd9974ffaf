import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder as so
from tests.reference import assert_tree_close, reference_diag


def test_functional_loss_matches_module_call():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    f = so.functional_loss(model, F.cross_entropy)
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    torch.testing.assert_close(f(so.params_dict(model), x, y), F.cross_entropy(model(x), y))


def test_params_dict_is_detached_and_skips_frozen():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    params = so.params_dict(model)
    assert "0.weight" not in params and set(params) == {"0.bias", "1.weight", "1.bias"}
    assert all(not p.requires_grad for p in params.values())
    assert "0.weight" in so.params_dict(model, trainable_only=False)


def test_frozen_params_are_constants():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].weight.requires_grad_(False)
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    assert_tree_close(so.hessian_diag(f)(params, x, y), reference_diag(f, (params, x, y)))


def test_batchnorm_buffers_are_used_in_eval_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(4))
        model[1].running_var.copy_(torch.rand(4) + 0.5)
    model.eval()
    f = so.functional_loss(model, F.cross_entropy)
    params = so.params_dict(model)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    torch.testing.assert_close(f(params, x, y), F.cross_entropy(model(x), y))
    before = model[1].running_mean.clone()
    assert_tree_close(so.hessian_diag(f)(params, x, y), reference_diag(f, (params, x, y)))
    torch.testing.assert_close(model[1].running_mean, before)
    # Explicit buffers override the model's.
    other = {k: v.clone() for k, v in model.named_buffers()}
    other["1.running_mean"] += 1.0
    assert not torch.allclose(f(params, x, y, buffers=other), f(params, x, y))


def test_bad_arguments():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module or a function"):
        so.functional_loss(3, F.mse_loss)  # a function model(params, inputs) is accepted (issue 10)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        so.functional_loss(nn.Linear(2, 2), "mse")
    f = so.functional_loss(nn.Linear(2, 2), F.mse_loss)
    with pytest.raises(ValueError, match=r"not parameters of the model: \['wieght'\]"):
        f({"wieght": torch.ones(2, 2)}, torch.ones(1, 2), torch.ones(1, 2))
    with pytest.raises(TypeError, match="params must be a dict"):
        f([torch.ones(2, 2)], torch.ones(1, 2), torch.ones(1, 2))

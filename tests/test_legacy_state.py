"""Every legacy function that takes a model leaves it as it found it: parameters, ``requires_grad``,
``.grad``, buffers, train/eval flags, also when the forward or the loss raises."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import torch_secorder as ts
from torch_secorder.analysis import create_random_direction

F64 = torch.float64


class Flaky(nn.Module):
    """Training-mode BatchNorm (its forward updates buffers) and a switch that makes the forward raise."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
        self.fail = False

    def forward(self, x):
        if self.fail:
            raise KeyError("forward failed")
        return self.net(x)


def _calls(model, x, y, y_reg):
    ce = F.cross_entropy
    v = [torch.ones_like(p) for p in model.parameters()]
    d = create_random_direction(model, generator=torch.Generator().manual_seed(0))
    return {
        "model_hessian_trace": lambda: ts.model_hessian_trace(model, ce, x, y),
        "model_hessian_diagonal": lambda: ts.model_hessian_diagonal(model, ce, x, y),
        "model_hessian_diagonal_create_graph": lambda: ts.model_hessian_diagonal(model, ce, x, y, create_graph=True),
        "model_hvp": lambda: ts.model_hvp(model, ce, x, y, v),
        "gauss_newton_product": lambda: ts.gauss_newton_product(model, ce, x, y, v),
        "model_jvp": lambda: ts.model_jvp(model, x, v),
        "model_vjp": lambda: ts.model_vjp(model, x, torch.ones(6, 2, dtype=F64)),
        "per_layer_hessian_diagonal": lambda: ts.per_layer_hessian_diagonal(model, ce, x, y),
        "per_layer_fisher_diagonal": lambda: ts.per_layer_fisher_diagonal(model, ce, x, y),
        "empirical_fisher_diagonal": lambda: ts.empirical_fisher_diagonal(model, ce, x, y),
        "empirical_fisher_trace": lambda: ts.empirical_fisher_trace(model, ce, x, y),
        "gauss_newton_matrix_approximation": lambda: ts.gauss_newton_matrix_approximation(model, F.mse_loss, x, y_reg),
        "gauss_newton_matrix_approximation_create_graph":
            lambda: ts.gauss_newton_matrix_approximation(model, F.mse_loss, x, y_reg, create_graph=True),
        "estimate_eigenvalues": lambda: ts.estimate_eigenvalues(model, lambda m, a, b: ce(m(a), b), x, y),
        "compute_loss_surface_1d": lambda: ts.compute_loss_surface_1d(model, ce, x, y, d, num_points=3),
        "compute_loss_surface_2d": lambda: ts.compute_loss_surface_2d(model, ce, x, y, d, d, num_points=2),
    }


NAMES = list(_calls(nn.Linear(1, 1), None, None, None))


def _setup():
    torch.manual_seed(0)
    model = Flaky().double().train()
    model.net[3].eval()                       # mixed modes
    x, y = torch.randn(6, 3, dtype=F64), torch.randint(0, 2, (6,))
    model.net[0].weight.grad = torch.full_like(model.net[0].weight, 7.0)
    return model, x, y, torch.randn(6, 2, dtype=F64)


def _snapshot(model):
    return (
        {k: t.clone() for k, t in model.state_dict().items()},
        [(p, p.requires_grad, p.grad, p.data_ptr()) for p in model.parameters()],
        [b.data_ptr() for b in model.buffers()],
        [m.training for m in model.modules()],
    )


def _assert_unchanged(model, snap):
    state, params, buffers, modes = snap
    for k, t in model.state_dict().items():
        assert torch.equal(t, state[k]), k
    assert [(p, p.requires_grad, p.grad, p.data_ptr()) for p in model.parameters()] == params
    assert [b.data_ptr() for b in model.buffers()] == buffers
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("name", NAMES)
def test_model_left_as_found_after_a_call_and_after_an_exception(name):
    model, x, y, y_reg = _setup()
    snap = _snapshot(model)
    call = _calls(model, x, y, y_reg)[name]
    call()
    _assert_unchanged(model, snap)
    model.fail = True
    with pytest.raises(KeyError, match="forward failed"):
        call()
    _assert_unchanged(model, snap)

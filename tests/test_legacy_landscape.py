"""Legacy ``torch_secorder.analysis.landscape``: loss slices against direct evaluation, and the model left untouched."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch_secorder import LegacyTypeError, LegacyValueError
from torch_secorder.analysis import compute_loss_surface_1d, compute_loss_surface_2d, create_random_direction

F64 = torch.float64


def _snapshot(model):
    return (
        {k: t.clone() for k, t in model.state_dict().items()},
        [(p, p.requires_grad, p.grad) for p in model.parameters()],
        [m.training for m in model.modules()],
        [p.data_ptr() for p in model.parameters()],
    )


def _assert_unchanged(model, snap):
    state, flags, modes, ptrs = snap
    assert all(torch.equal(t, state[k]) for k, t in model.state_dict().items())
    assert all(p.requires_grad == r and p.grad is g for p, r, g in flags)
    assert [m.training for m in model.modules()] == modes
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def _reference_loss(model, loss_fn, x, y, coefficients, directions):
    # Direct evaluation on a copy of the model whose parameters are moved by hand.
    m = copy.deepcopy(model)
    with torch.no_grad():
        for i, p in enumerate(m.parameters()):
            for c, d in zip(coefficients, directions):
                p.add_(c * d[i])
        return loss_fn(m(x), y)


def test_documented_examples_verbatim():
    # tests/unit/test_landscape.py and the landscape example of torch-secorder 0.0.1.
    class SimpleModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 1)

        def forward(self, x):
            return self.linear(x)

    model = SimpleModel()
    with torch.no_grad():
        model.linear.weight.fill_(0.5)
        model.linear.bias.fill_(1.0)
    inputs = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float32)
    targets = torch.tensor([[5.0], [10.0]], dtype=torch.float32)
    loss_fn = lambda outputs, targets: F.mse_loss(outputs, targets)
    direction = create_random_direction(model)
    assert isinstance(direction, list) and len(direction) == 2
    for d, p in zip(direction, model.parameters()):
        assert d.shape == p.shape and torch.isclose(torch.norm(d), torch.tensor(1.0), atol=1e-6)
    alphas, losses = compute_loss_surface_1d(model, loss_fn, inputs, targets, direction)
    assert alphas.shape == (50,) and losses.shape == (50,) and torch.all(losses >= 0)
    assert alphas.dtype == losses.dtype == torch.float32
    torch.testing.assert_close(alphas, torch.linspace(-1.0, 1.0, 50))
    d1, d2 = create_random_direction(model), create_random_direction(model)
    alphas, betas, surface = compute_loss_surface_2d(model, loss_fn, inputs, targets, d1, d2)
    assert alphas.shape == (25,) and betas.shape == (25,) and surface.shape == (25, 25) and torch.all(surface >= 0)
    assert torch.allclose(model.linear.weight, torch.tensor([[0.5, 0.5]])) and torch.allclose(model.linear.bias, torch.tensor([1.0]))

    alphas_1d, losses_1d = compute_loss_surface_1d(model, F.mse_loss, inputs, targets, direction,
                                                   alpha_range=(-2.0, 2.0), num_points=50)
    assert alphas_1d[0] == -2.0 and alphas_1d[-1] == 2.0
    A, B = torch.meshgrid(alphas, betas, indexing="ij")    # the example's plotting grid
    assert A.shape == surface.shape


def test_1d_and_2d_match_direct_evaluation_float64():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x, y = torch.randn(6, 3, dtype=F64), torch.randint(0, 2, (6,))
    d1 = create_random_direction(model, generator=torch.Generator().manual_seed(1))
    d2 = create_random_direction(model, generator=torch.Generator().manual_seed(2))
    alphas, losses = compute_loss_surface_1d(model, F.cross_entropy, x, y, d1, alpha_range=(-0.5, 2.0), num_points=7)
    assert alphas.dtype == F64 and losses.dtype == F64
    for a, loss in zip(alphas, losses):
        torch.testing.assert_close(loss, _reference_loss(model, F.cross_entropy, x, y, [a], [d1]), rtol=1e-13, atol=1e-14)
    alphas, betas, surface = compute_loss_surface_2d(model, F.cross_entropy, x, y, d1, d2, alpha_range=(0.0, 1.0),
                                                     beta_range=(-1.0, 3.0), num_points=4)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            ref = _reference_loss(model, F.cross_entropy, x, y, [a, b], [d1, d2])
            torch.testing.assert_close(surface[i, j], ref, rtol=1e-13, atol=1e-14)


def test_training_mode_batchnorm_each_point_from_the_original_state_and_model_untouched():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Dropout(0.0), nn.Linear(4, 1)).to(F64).train()
    x, y = torch.randn(8, 3, dtype=F64), torch.randn(8, 1, dtype=F64)
    model[0].weight.requires_grad_(False)
    model[4].weight.grad = torch.ones_like(model[4].weight)
    snap = _snapshot(model)
    d = create_random_direction(model)
    alphas, losses = compute_loss_surface_1d(model, F.mse_loss, x, y, d, num_points=5)
    _assert_unchanged(model, snap)
    for a, loss in zip(alphas, losses):
        torch.testing.assert_close(loss, _reference_loss(model, F.mse_loss, x, y, [a], [d]), rtol=1e-13, atol=1e-14)
    model.eval()
    snap = _snapshot(model)
    compute_loss_surface_2d(model, F.mse_loss, x, y, d, d, num_points=3)
    _assert_unchanged(model, snap)


def test_model_untouched_when_loss_raises():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)).train()
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    snap = _snapshot(model)
    calls = {"n": 0}

    def loss_fn(out, target):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyError("boom")
        return F.mse_loss(out, target)

    with pytest.raises(KeyError, match="boom"):
        compute_loss_surface_1d(model, loss_fn, x, y, create_random_direction(model), num_points=5)
    _assert_unchanged(model, snap)


def test_random_direction_matches_0_0_1_draws_and_generator_is_reproducible():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    torch.manual_seed(7)
    ref = []
    for p in model.parameters():        # what 0.0.1 draws: randn_like from the global generator
        d = torch.randn_like(p)
        ref.append(d / torch.norm(d))
    torch.manual_seed(7)
    for a, b in zip(create_random_direction(model), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for a, b in zip(create_random_direction(model, generator=g1), create_random_direction(model, generator=g2)):
        assert torch.equal(a, b)
    empty = nn.Module()
    empty.w, empty.b = nn.Parameter(torch.zeros(2, 0)), nn.Parameter(torch.ones(2))
    d = create_random_direction(empty)          # a block of norm zero stays zero
    assert d[0].shape == (2, 0) and torch.isclose(d[1].norm(), torch.tensor(1.0))


def test_num_points_edge_cases_and_bad_input():
    model = nn.Linear(2, 1)
    x, y = torch.randn(3, 2), torch.randn(3, 1)
    d = create_random_direction(model)
    alphas, losses = compute_loss_surface_1d(model, F.mse_loss, x, y, d, num_points=0)
    assert alphas.shape == losses.shape == (0,)
    a, b, s = compute_loss_surface_2d(model, F.mse_loss, x, y, d, d, num_points=0)
    assert s.shape == (0, 0)
    alphas, losses = compute_loss_surface_1d(model, F.mse_loss, x, y, d, alpha_range=(0.5, 2.0), num_points=1)
    assert alphas.tolist() == [0.5]
    with pytest.raises(LegacyValueError, match="direction must have one tensor per parameter"):
        compute_loss_surface_1d(model, F.mse_loss, x, y, d[:1])      # 0.0.1 silently moved only the weight
    with pytest.raises(LegacyValueError, match=r"direction2\[0\] has shape"):
        compute_loss_surface_2d(model, F.mse_loss, x, y, d, [torch.ones(2), d[1]])
    with pytest.raises(LegacyValueError, match="num_points"):
        compute_loss_surface_1d(model, F.mse_loss, x, y, d, num_points=-1)
    with pytest.raises(LegacyTypeError, match="alpha_range"):
        compute_loss_surface_1d(model, F.mse_loss, x, y, d, alpha_range=1.0)
    with pytest.raises(LegacyValueError, match="loss_fn must return a scalar"):
        compute_loss_surface_1d(model, lambda o, t: (o - t) ** 2, x, y, d, num_points=2)

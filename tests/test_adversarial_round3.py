"""Issue 25 (no silent wrong answer, round 3): the items that are not about data sets or the Laplacian.

Each test failed on the main branch before the fix it pins (the item number is in its docstring).
"""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import secorder as so
from secorder.density import SpectralDensity

DT = torch.float64


def _density():
    return SpectralDensity(torch.tensor([[0.0, 1.0, 3.0]], dtype=DT), torch.full((1, 3), 1 / 3, dtype=DT),
                           torch.tensor(3), torch.tensor(3), torch.tensor([3]))


@pytest.mark.parametrize("bad", [torch.tensor(-0.1), torch.tensor(0.0), torch.tensor(float("nan")),
                                 torch.tensor([0.5, -0.5]), -0.1, 0.0, float("inf"), float("nan")])
def test_density_validates_a_tensor_sigma_like_a_float(bad):
    """Item 7: ``sigma=torch.tensor(-0.1)`` gave negative densities where ``-0.1`` raised."""
    d = _density()
    grid = torch.linspace(-1, 4, 7, dtype=DT)
    with pytest.raises(ValueError, match="sigma must be positive"):
        d.density(grid, sigma=bad)
    with pytest.raises(ValueError, match="sigma must be positive"):
        d.grid(5, sigma=bad)


def test_density_tensor_sigma_equals_float_sigma_and_bad_types_raise():
    d = _density()
    grid = torch.linspace(-1, 4, 7, dtype=DT)
    assert torch.equal(d.density(grid, sigma=torch.tensor(0.5)), d.density(grid, sigma=0.5))
    with pytest.raises(TypeError, match="dtype torch.bool"):
        d.density(grid, sigma=torch.tensor(True))


def _quadratic(eigs):
    return lambda x: 0.5 * (torch.as_tensor(eigs, dtype=DT) * x**2).sum()


def test_eigenvalues_num_iterations_is_a_cap_when_tol_is_given():
    """Item 17: ``num_iterations=n, tol=...`` was refused; SciPy and PyHessian users pass both."""
    eigs = torch.linspace(1.0, 100.0, 60, dtype=DT)
    f, x = _quadratic(eigs), torch.zeros(60, dtype=DT)
    got = so.eigenvalues(f, k=2, num_iterations=60, tol=1e-10, seed=0)(x)
    assert torch.allclose(got, eigs.flip(0)[:2], rtol=1e-9)
    # the cap binds: too few steps for tol, a warning that names num_iterations, and the Ritz values so far
    with pytest.warns(RuntimeWarning, match="within num_iterations=4"):
        capped = so.eigenvalues(f, k=1, num_iterations=4, tol=1e-12, seed=0)(x)
    fixed = so.eigenvalues(f, k=1, num_iterations=4, seed=0)(x)  # fixed-step mode, as before
    assert torch.allclose(capped, fixed, rtol=1e-12)
    # a cap larger than the dimension is allowed (the run stops at convergence)
    assert torch.allclose(so.eigenvalues(f, num_iterations=500, tol=1e-8, seed=0)(x), eigs[-1:], rtol=1e-7)


def test_eigenvalues_fixed_steps_still_compose_with_vmap():
    """Item 17: num_iterations alone keeps the fixed-step mode (vmap), and tol given names its mode under vmap."""
    scales = torch.tensor([1.0, 2.0], dtype=DT)
    x = torch.zeros(5, dtype=DT)
    f = lambda x, s: s * (torch.arange(1.0, 6.0, dtype=DT) * x**2).sum()
    got = torch.func.vmap(so.eigenvalues(f, num_iterations=5, seed=0), in_dims=(None, 0), randomness="same")(x, scales)
    assert torch.allclose(got[:, 0], 10 * scales, rtol=1e-10)
    with pytest.raises(RuntimeError, match="tol given"):
        torch.func.vmap(so.eigenvalues(f, num_iterations=5, tol=1e-6, seed=0), in_dims=(None, 0), randomness="same")(x, scales)

"""secorder's laplace-torch backends against laplace-torch's BackPACK and curvlinops backends.

Skipped without laplace-torch (an optional extra; see secorder.integrations.laplace
for how to install it next to a CPU PyTorch).
"""

import importlib
import sys

import pytest
import torch
from torch import nn

laplace = pytest.importorskip("laplace")
from laplace import Laplace  # noqa: E402
from laplace.curvature import BackPackEF, BackPackGGN, CurvlinopsHessian  # noqa: E402

from secorder.integrations.laplace import SecorderEF, SecorderGGN, SecorderHessian  # noqa: E402

DT = torch.float64


def mlp():
    torch.manual_seed(711)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).to(DT)
    model.output_size = 2  # what laplace-torch sets in fit (BackPACK's Jacobians read it)
    return model


def cnn():
    torch.manual_seed(711)
    model = nn.Sequential(nn.Conv2d(3, 4, 2, 2), nn.Flatten(), nn.Tanh(), nn.Linear(16, 6), nn.Tanh(),
                          nn.Linear(6, 2)).to(DT)
    model.output_size = 2
    return model


def data(likelihood, image=False, n=10):
    g = torch.Generator().manual_seed(711)
    X = torch.randn((n, 3, 5, 5) if image else (n, 3), generator=g, dtype=DT)
    y = torch.randint(2, (n,), generator=g) if likelihood == "classification" else torch.randn(n, 2, generator=g,
                                                                                                 dtype=DT)
    return X, y


OURS_AND_REFERENCE = [(SecorderGGN, BackPackGGN), (SecorderEF, BackPackEF), (SecorderHessian, CurvlinopsHessian)]


@pytest.mark.parametrize("ours,reference", OURS_AND_REFERENCE)
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
@pytest.mark.parametrize("image", [False, True])
def test_backend_diag_and_full_match_reference(ours, reference, likelihood, image):
    """As laplace-torch's backend tests: diag and full over two halves, summed, equal the reference's full."""
    make = cnn if image else mlp
    model = make()
    X, y = data(likelihood, image)
    loss_ref, H_ref = reference(make(), likelihood).full(X, y)  # its own copy: BackPACK hooks the model
    backend = ours(model, likelihood)
    loss_d, d = (a + b for a, b in zip(backend.diag(X[:5], y[:5]), backend.diag(X[5:], y[5:])))
    loss_f, H = (a + b for a, b in zip(backend.full(X[:5], y[:5]), backend.full(X[5:], y[5:])))
    n = sum(p.numel() for p in model.parameters())
    assert d.shape == (n,) and H.shape == (n, n)
    torch.testing.assert_close(loss_d, loss_ref.to(DT), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_f, loss_ref.to(DT), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(H, H_ref.to(DT), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(d, H_ref.diagonal().to(DT), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("ours,reference", OURS_AND_REFERENCE[:2])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_laplace_fit_and_marginal_likelihood_equal_backpack(structure, ours, reference, likelihood):
    X, y = data(likelihood, n=24)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=10)
    results = []
    for backend in (ours, reference):
        model = mlp()
        la = Laplace(model, likelihood, hessian_structure=structure, backend=backend)
        la.fit(loader)
        prior = torch.tensor(0.7, dtype=DT)
        results.append((la.log_marginal_likelihood(prior), la.H, la.loss))
    (lml, H, loss), (lml_ref, H_ref, loss_ref) = results
    torch.testing.assert_close(lml, lml_ref, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(H, H_ref, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(torch.as_tensor(loss), torch.as_tensor(loss_ref), rtol=1e-10, atol=0.0)


def test_marglik_prior_tuning_and_last_layer_and_subnetwork():
    X, y = data("classification", n=24)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=12)
    found = []
    for backend in (SecorderGGN, BackPackGGN):
        la = Laplace(mlp(), "classification", hessian_structure="diag", backend=backend)
        la.fit(loader)
        la.optimize_prior_precision(method="marglik", n_steps=20)
        found.append(la.prior_precision)
    torch.testing.assert_close(found[0], found[1], rtol=1e-6, atol=0.0)
    # last-layer Laplace: the backend sees the features
    lls = []
    for backend in (SecorderGGN, BackPackGGN):
        la = Laplace(mlp(), "classification", subset_of_weights="last_layer", hessian_structure="full",
                     backend=backend)
        la.fit(loader)
        lls.append(la.log_marginal_likelihood(torch.tensor(1.0, dtype=DT)))
    torch.testing.assert_close(lls[0], lls[1], rtol=1e-6, atol=0.0)
    # a subnetwork: the rows and columns of the chosen parameters
    model = mlp()
    idx = torch.tensor([0, 3, 5, 20, 40], dtype=torch.long)
    backend = SecorderGGN(model, "classification", subnetwork_indices=idx)
    _, H_full = SecorderGGN(model, "classification").full(X, y)
    _, H_sub = backend.full(X, y)
    torch.testing.assert_close(H_sub, H_full[idx][:, idx])
    _, d_sub = backend.diag(X, y)
    torch.testing.assert_close(d_sub, H_full.diagonal()[idx])


def test_stochastic_ggn_is_the_monte_carlo_fisher():
    model = mlp()
    X, y = data("classification", n=40)
    _, H = BackPackGGN(model, "classification").full(X, y)
    _, F = SecorderGGN(model, "classification", stochastic=True, num_samples=2000).full(X, y)
    # a sanity check of the mapping stochastic=True -> curvature="fisher" (the Fisher's statistics are tested in
    # tests/test_curvatures.py): 2000 draws per sample put every entry well within 10% of the largest
    assert float((F - H).abs().max()) < 0.1 * float(H.abs().max())


def test_frozen_parameters_are_left_out():
    model = mlp()
    model[0].bias.requires_grad_(False)
    X, y = data("classification")
    _, d = SecorderGGN(model, "classification").diag(X, y)
    _, H = SecorderGGN(model, "classification").full(X, y)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert d.shape == (n,) and H.shape == (n, n)
    torch.testing.assert_close(d, H.diagonal())


def test_model_hooked_by_backpack_gets_a_clear_error():
    model = mlp()
    X, y = data("classification")
    BackPackEF(model, "classification").full(X, y)  # extend() leaves full backward hooks on the modules
    with pytest.raises(RuntimeError, match="backward hooks"):
        SecorderEF(model, "classification").diag(X, y)


def test_clear_error_without_laplace_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "laplace.curvature", None)
    module = importlib.import_module("secorder.integrations.laplace")
    fresh = importlib.reload(module)
    try:
        with pytest.raises(ImportError, match="pip install --no-deps laplace-torch"):
            fresh.SecorderGGN
    finally:
        monkeypatch.undo()
        importlib.reload(module)


needs_kfac = pytest.mark.skipif(not hasattr(__import__("secorder"), "kfac"), reason="so.kfac (issue 22) not in build")


@needs_kfac
@pytest.mark.parametrize("ours,reference", [(SecorderGGN, "CurvlinopsGGN"), (SecorderEF, "CurvlinopsEF")])
@pytest.mark.parametrize("likelihood", ["classification", "regression"])
def test_kron_laplace_equals_curvlinops_and_backpack(ours, reference, likelihood):
    import laplace.curvature as curvature

    X, y = data(likelihood, n=24)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=10)
    lml = []
    peers = [getattr(curvature, reference)] + ([BackPackGGN] if ours is SecorderGGN else [])
    for backend in [ours] + peers:
        la = Laplace(mlp(), likelihood, subset_of_weights="all", hessian_structure="kron", backend=backend)
        la.fit(loader)
        lml.append(la.log_marginal_likelihood(torch.tensor(0.7, dtype=DT)))
    for other in lml[1:]:
        torch.testing.assert_close(lml[0], other, rtol=1e-6, atol=0.0)


def test_kron_without_kfac_is_a_clear_error():
    import secorder

    if hasattr(secorder, "kfac"):
        pytest.skip("this build has so.kfac")
    X, y = data("classification")
    with pytest.raises(NotImplementedError, match="K-FAC"):
        SecorderGGN(mlp(), "classification").kron(X, y, N=10)

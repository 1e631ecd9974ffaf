"""The structured engine's Monte-Carlo Fisher and empirical Fisher diagonals and traces.

The Monte-Carlo Fisher's labels are drawn by the same function, from the same
generator state, as the generic operator's: for the same seed both engines give
the same matrix (float64, 1e-10). The empirical Fisher is checked against squared
per-sample gradients from ``vmap(grad)`` and against the generic path.
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder as so
from secorder import tree
from secorder.structured import functional_call_diag, model_diagonal, model_trace

DT = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def mlp():
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def cnn():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(2 * 2 * 2, 3)).to(DT)


def residual():
    return nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), so.Residual(nn.Sequential(nn.Linear(4, 4), nn.ELU())),
                         nn.Linear(4, 3)).to(DT)


MODELS = {"mlp": (mlp, (3,)), "cnn": (cnn, (1, 4, 4)), "residual": (residual, (3,))}

LOSSES = [
    (nn.CrossEntropyLoss(), "class"),
    (nn.CrossEntropyLoss(reduction="sum", ignore_index=2), "class"),
    (nn.CrossEntropyLoss(), "prob"),
    (nn.MSELoss(), "real"),
    (nn.MSELoss(reduction="sum"), "real"),
    (nn.BCEWithLogitsLoss(), "prob"),
    (functools.partial(F.binary_cross_entropy_with_logits, reduction="sum"), "prob"),
]


def targets(kind, n):
    if kind == "class":
        return torch.randint(0, 3, (n,))
    if kind == "prob":
        return torch.softmax(torch.randn(n, 3, dtype=DT), 1)
    return torch.randn(n, 3, dtype=DT)


def problem(model_name, loss_fn, target, n=5, seed=0):
    torch.manual_seed(seed)
    build, shape = MODELS[model_name]
    model = build()
    f = so.functional_loss(model, loss_fn)
    return model, f, so.params_dict(model), torch.randn((n,) + shape, dtype=DT), targets(target, n)


def close(a, b, **tol):
    for x, y in zip(tree.leaves(a), tree.leaves(b)):
        torch.testing.assert_close(x, y, **(tol or TOL))


# Every loss and reduction on the MLP; the CNN and the residual model with one loss each.
CASES = [("mlp",) + case for case in LOSSES] + [("cnn",) + LOSSES[0], ("residual",) + LOSSES[3],
                                                 ("residual",) + LOSSES[4]]


def case_id(case):
    return f"{case[0]}-{repr(case[1])[:30]}-{case[2]}"


@pytest.mark.parametrize("model_name,loss_fn,target", CASES, ids=[case_id(c) for c in CASES])
def test_fisher_same_seed_same_matrix_as_the_generic_operator(model_name, loss_fn, target):
    model, f, params, x, y = problem(model_name, loss_fn, target)
    for mc in (1, 3):
        d = so.diagonal(f, curvature="fisher", mc_samples=mc, seed=7, engine="structured")
        t = so.trace(f, curvature="fisher", mc_samples=mc, seed=7, engine="structured")
        dg = so.diagonal(f, curvature="fisher", mc_samples=mc, seed=7, engine="generic")(params, x, y)
        out = d(params, x, y)
        assert d.last_engine == "structured"
        close(out, dg)
        torch.testing.assert_close(t(params, x, y), sum(v.sum() for v in dg.values()), **TOL)
        gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        a = so.diagonal(f, curvature="fisher", mc_samples=mc, generator=gen_a, engine="structured")(params, x, y)
        b = so.diagonal(f, curvature="fisher", mc_samples=mc, generator=gen_b, engine="generic")(params, x, y)
        close(a, b)
        assert torch.equal(gen_a.get_state(), gen_b.get_state())  # the same draws were consumed


@pytest.mark.parametrize("model_name,loss_fn,target", CASES, ids=[case_id(c) for c in CASES])
def test_empirical_fisher_is_the_squared_per_sample_gradients(model_name, loss_fn, target):
    model, f, params, x, y = problem(model_name, loss_fn, target)
    d = so.diagonal(f, curvature="empirical_fisher", engine="structured")(params, x, y)
    close(d, so.diagonal(f, curvature="empirical_fisher", engine="generic")(params, x, y))
    # (1/c) sum_n (grad l_n)^2 with l_n the unreduced per-sample loss and c the reduction factor.
    unreduced = loss_fn.func if isinstance(loss_fn, functools.partial) else type(loss_fn)
    spec_red = getattr(loss_fn, "reduction", None) or loss_fn.keywords.get("reduction", "mean")
    kwargs = {"ignore_index": loss_fn.ignore_index} if isinstance(loss_fn, nn.CrossEntropyLoss) else {}
    per = unreduced(reduction="sum", **kwargs) if isinstance(unreduced, type) else functools.partial(
        unreduced, reduction="sum")

    def loss_n(p, xn, yn):
        return per(torch.func.functional_call(model, p, (xn[None],)), yn[None])

    G = torch.func.vmap(torch.func.grad(loss_n), in_dims=(None, 0, 0))(params, x, y)
    if spec_red == "sum":
        c = 1.0
    elif target == "class":
        c = float((y != getattr(loss_fn, "ignore_index", -100)).sum())
    elif isinstance(loss_fn, nn.CrossEntropyLoss):
        c = float(x.shape[0])
    else:
        c = float(y.numel())
    close(d, {k: (v * v).sum(0) / c for k, v in G.items()})
    t = so.trace(f, curvature="empirical_fisher", engine="structured")(params, x, y)
    torch.testing.assert_close(t, sum(v.sum() for v in d.values()), **TOL)


def test_the_entry_points_validate_and_compose():
    model, f, params, x, y = problem("mlp", nn.CrossEntropyLoss(), "class")
    with pytest.raises(ValueError, match="mc_samples"):
        functional_call_diag(f, (params, x, y), "fisher", False, mc_samples=0)
    with pytest.raises(TypeError, match="mc_samples"):
        functional_call_diag(f, (params, x, y), "fisher", False, mc_samples=1.5)
    live = model_diagonal(model, nn.CrossEntropyLoss(), x, y, kind="fisher", mc_samples=2,
                          generator=torch.Generator().manual_seed(1))
    func = functional_call_diag(f, ({k: v.detach() for k, v in model.named_parameters()}, x, y), "fisher", False,
                                mc_samples=2, generator=torch.Generator().manual_seed(1))
    close(live, list(func.values()))
    ef = model_trace(model, nn.CrossEntropyLoss(), x, y, kind="empirical_fisher")
    torch.testing.assert_close(ef, sum(v.sum() for v in functional_call_diag(
        f, (params, x, y), "empirical_fisher", False).values()), **TOL)
    # per-example empirical Fisher under vmap: one structured sweep, equal to a loop
    fn = so.diagonal(f, curvature="empirical_fisher", engine="structured")
    pe = torch.func.vmap(fn, in_dims=(None, 0, 0))(params, x[:, None], y[:, None])
    for i in range(x.shape[0]):
        close({k: v[i] for k, v in pe.items()}, fn(params, x[i:i + 1], y[i:i + 1]))
    # grad of an empirical-Fisher trace penalty through the structured sweep
    g = torch.func.grad(lambda p: so.trace(f, curvature="empirical_fisher", engine="structured")(p, x, y))(params)
    r = torch.func.grad(lambda p: so.trace(f, curvature="empirical_fisher", engine="generic")(p, x, y))(params)
    close(g, r, rtol=1e-9, atol=1e-12)

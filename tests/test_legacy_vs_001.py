"""Our ``torch_secorder`` against torch-secorder 0.0.1 itself, on the same inputs (skipped without the peer).

0.0.1 runs in a subprocess with its isolated install first on ``PYTHONPATH``
(see ``benchmarks/harness.py``; it has our import name). Where 0.0.1 is right,
the values must agree; the cases where it is wrong are tested against float64
references in the other ``test_legacy_*`` files.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import torch_secorder as ts

REPO = Path(__file__).resolve().parent.parent
PEER = REPO / ".bench_peers" / "torch_secorder_001"

pytestmark = pytest.mark.skipif(not (PEER / ".installed").exists(), reason="torch-secorder 0.0.1 is not installed in .bench_peers")

# Builds the inputs (deterministically, in float32 as 0.0.1 requires) and evaluates every function into `out`.
CASES = textwrap.dedent('''
    import torch, torch.nn as nn, torch.nn.functional as F
    import torch_secorder as ts
    from torch_secorder.analysis import create_random_direction

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
        y_reg = torch.randn(6, 3)
        v = [torch.randn_like(p) for p in model.parameters()]
        return model, x, y, y_reg, v

    def evaluate():
        model, x, y, y_reg, v = build()
        params = list(model.parameters())
        f = lambda: model(x)
        out = {}
        out["jvp"] = ts.jvp(f, params, v)
        out["vjp"] = ts.vjp(f, params, torch.ones(6, 3))
        out["batch_jvp"] = ts.batch_jvp(f, params, [torch.stack([u, 2 * u]) for u in v])
        out["batch_vjp"] = ts.batch_vjp(f, params, torch.stack([torch.ones(6, 3), torch.arange(18.0).reshape(6, 3)]))
        out["full_jacobian"] = ts.full_jacobian(f, params)
        out["model_jvp"] = ts.model_jvp(model, x, v)
        out["model_vjp"] = ts.model_vjp(model, x, torch.ones(6, 3))
        out["flatten"] = ts.flatten_params(params)
        out["unflatten"] = ts.unflatten_params(out["flatten"], ts.get_param_shapes(params))
        out["by_type"] = {k: [p.shape for p in ps] for k, ps in ts.get_params_by_module_type(model, nn.Linear).items()}
        out["by_name"] = [p.shape for p in ts.get_params_by_name_pattern(model, "bias")]
        out["per_layer_hessian"] = ts.per_layer_hessian_diagonal(model, F.cross_entropy, x, y)
        out["per_layer_fisher"] = ts.per_layer_fisher_diagonal(model, F.cross_entropy, x, y)
        out["stats"] = ts.get_layer_curvature_stats(out["per_layer_hessian"])
        out["ef_diag"] = [t.detach() for t in ts.empirical_fisher_diagonal(model, F.cross_entropy, x, y)]
        out["ef_trace"] = ts.empirical_fisher_trace(model, F.cross_entropy, x, y)
        out["gf_diag"] = ts.generalized_fisher_diagonal(model, model(x), y)
        out["gf_trace"] = ts.generalized_fisher_trace(model, model(x), y)
        out["gn"] = list(ts.gauss_newton_matrix_approximation(model, F.mse_loss, x, y_reg))
        torch.manual_seed(1)
        d1, d2 = create_random_direction(model), create_random_direction(model)
        out["direction"] = d1
        out["surface_1d"] = ts.compute_loss_surface_1d(model, F.cross_entropy, x, y, d1, num_points=5)
        out["surface_2d"] = ts.compute_loss_surface_2d(model, F.cross_entropy, x, y, d1, d2, num_points=3)
        out["hessian_trace"] = ts.hessian_trace(lambda: F.cross_entropy(model(x), y), params)
        lin = nn.Linear(3, 1)
        torch.manual_seed(2)
        xl, yl = torch.randn(10, 3), torch.randn(10, 1)
        out["eig_top1"] = ts.estimate_eigenvalues(lin, lambda m, a, b: F.mse_loss(m(a), b), xl, yl)[0]
        A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        out["lanczos_2x2"] = ts.lanczos_iteration(lambda u: A @ u, 2, num_vectors=2)[0]
        out["power_2x2"] = ts.power_iteration(lambda u: A @ u, 2, num_vectors=2)[0]
        return out
''')


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("vs001") / "old.pt"
    script = CASES + f"\ntorch.save(evaluate(), {str(path)!r})\nprint(ts.__version__, ts.__file__)\n"
    env = dict(os.environ, PYTHONPATH=str(PEER), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=str(PEER.parent), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("0.0.1") and "bench_peers" in proc.stdout
    namespace = {}
    exec(CASES, namespace)
    assert namespace["ts"].__file__ == ts.__file__
    return torch.load(path, weights_only=False), namespace["evaluate"]()


def _close(a, b, rtol=1e-5, atol=1e-6):
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _close(a[k], b[k], rtol, atol)
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for u, w in zip(a, b):
            _close(u, w, rtol, atol)
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rtol, abs=atol)
    else:
        assert a == b


@pytest.mark.parametrize("name", [
    "jvp", "vjp", "batch_jvp", "batch_vjp", "full_jacobian", "model_jvp", "model_vjp", "flatten", "unflatten",
    "by_type", "by_name", "per_layer_hessian", "per_layer_fisher", "stats", "ef_diag", "ef_trace", "gf_diag",
    "gf_trace", "gn", "direction", "surface_1d", "surface_2d", "hessian_trace", "eig_top1", "lanczos_2x2", "power_2x2",
])
def test_same_values_types_and_shapes_as_0_0_1(results, name):
    old, ours = results
    rtol = 1e-3 if name in ("eig_top1", "lanczos_2x2", "power_2x2") else 1e-5
    _close(old[name], ours[name], rtol=rtol, atol=1e-5)

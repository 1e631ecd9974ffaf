"""``secorder spectrum``, driven in-process through ``secorder.cli.main``."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder as so
from secorder.cli import main
from secorder.cli import spectrum as spectrum_module
from tests.reference import dense_hessian
from tests.test_cli import TINY, _layout_matches, cli

FAST = ("--steps", "3", "--num-probes", "2", "--num-iterations", "12", "-k", "3")


def tiny_three_batches():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return model, F.cross_entropy, [(torch.randn(5, 3), torch.randint(0, 2, (5,))) for _ in range(3)]


def test_json_layout_and_eigenvalues_match_the_dense_hessian():
    run = cli("spectrum", "--model", TINY, "--dtype", "float64", "--json", "--tol", "1e-10", *FAST)
    assert run.rc == 0, run.err
    result = json.loads(run.out)
    checked = _layout_matches(result, spectrum_module.JSON_LAYOUT, "spectrum")
    assert "spectrum.phases[1].density.negative_mass" in checked
    assert result["k"] == 3 and result["num_params"] == 26 and result["plot"] is None
    # the reference: the same factory under the same seed, the Hessian of the mean loss at initialisation
    torch.manual_seed(0)
    from tests.test_cli import tiny_problem

    model, loss_fn, (x, y) = tiny_problem()
    model = model.double()
    f = so.functional_loss(model, loss_fn)
    params = so.params_dict(model)
    H, _ = dense_hessian(f, (params, x.double(), y))
    ref = torch.linalg.eigvalsh(H)
    init = result["phases"][0]
    assert math.isclose(init["loss"], float(f(params, x.double(), y)), rel_tol=1e-12)
    assert torch.allclose(torch.tensor(init["top_eigenvalues"], dtype=torch.float64), ref.flip(0)[:3], rtol=1e-8)
    assert math.isclose(init["smallest_eigenvalue"], float(ref[0]), rel_tol=1e-8, abs_tol=1e-12)
    d = init["density"]
    assert d["matvecs"] == 2 * 12 and d["min_node"] >= float(ref[0]) - 1e-10 and d["max_node"] <= float(ref[-1]) + 1e-10
    assert 0.0 <= d["negative_mass"] <= 1.0


def test_text_output_and_png(tmp_path):
    out = tmp_path / "spectrum.png"
    run = cli("spectrum", "--model", TINY, "--out", str(out), *FAST)
    assert run.rc == 0, run.err
    assert "top 3 eigenvalues" in run.out and "after 3 steps" in run.out and "negative mass" in run.out
    assert f"density plot: {out}" in run.out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_problem_runs(tmp_path):
    run = cli("spectrum", "--json", "--steps", "2", "--num-probes", "2", "--num-iterations", "8", "-k", "2",
              "--tol", "1e-3")
    assert run.rc == 0, run.err
    result = json.loads(run.out)
    assert result["num_params"] == 64 * 32 + 32 + 32 * 10 + 10
    top = result["phases"][0]["top_eigenvalues"]
    assert len(top) == 2 and top[0] >= top[1] > 0


def test_ggn_curvature_is_positive_semidefinite():
    run = cli("spectrum", "--model", TINY, "--json", "--curvature", "ggn", "--dtype", "float64", *FAST)
    result = json.loads(run.out)
    for phase in result["phases"]:
        assert phase["smallest_eigenvalue"] > -1e-10
        assert phase["density"]["negative_mass"] < 1e-6


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "empirical_fisher"])
def test_every_curvature_over_many_batches_is_the_data_sets(curvature):
    """Issue 28, item 1: spectrum is built on dataset_loss: any curvature, any number of batches, --batch-size."""
    run = cli("spectrum", "--model", "tests.test_cli_spectrum:tiny_three_batches", "--json", "--curvature", curvature,
              "--dtype", "float64", "--tol", "1e-10", "--batch-size", "2", "--steps", "0", "--num-probes", "2",
              "--num-iterations", "12", "-k", "3")
    assert run.rc == 0, run.err
    result = json.loads(run.out)
    assert result["num_batches"] == 9 and result["batch_size"] == 2  # 3 batches of 5, split into 2 + 2 + 1
    torch.manual_seed(0)
    model, loss_fn, batches = tiny_three_batches()
    model = model.double()
    x = torch.cat([b[0] for b in batches]).double()
    y = torch.cat([b[1] for b in batches])
    f = so.functional_loss(model, loss_fn)
    params = so.params_dict(model)
    dense = so.linear_operator(f, curvature=curvature)(params, x, y).to_dense()  # one batch of all 15 examples
    ref = torch.linalg.eigvalsh(dense)
    top = torch.tensor(result["phases"][0]["top_eigenvalues"], dtype=torch.float64)
    torch.testing.assert_close(top, ref.flip(0)[:3], rtol=1e-7, atol=1e-10)
    assert math.isclose(result["phases"][0]["smallest_eigenvalue"], float(ref[0]), rel_tol=1e-6, abs_tol=1e-9)
    text = cli("spectrum", "--model", "tests.test_cli_spectrum:tiny_three_batches", "--curvature", curvature,
               "--batch-size", "2", "--steps", "0", "--num-probes", "2", "--num-iterations", "4", "-k", "1").out
    assert f"{curvature} of 26 parameters, 9 batch(es) of at most 2, device cpu" in text


def test_fisher_over_many_batches_runs():
    run = cli("spectrum", "--model", "tests.test_cli_spectrum:tiny_three_batches", "--json", "--curvature", "fisher",
              "--steps", "0", "--num-probes", "2", "--num-iterations", "6", "-k", "2")
    assert run.rc == 0, run.err
    assert json.loads(run.out)["phases"][0]["smallest_eigenvalue"] > -1e-5  # a PSD matrix


ERRORS = [
    (["--out", "plot.txt"], "--out plot.txt: expected a .png file name"),
    (["--out", "/no/such/folder/plot.png"], "the folder /no/such/folder does not exist"),
]


@pytest.mark.parametrize("args,message", ERRORS, ids=[e[1][:25] for e in ERRORS])
def test_usage_errors_are_one_line_with_status_2(args, message):
    run = cli("spectrum", "--model", TINY, *FAST, *args)
    assert run.rc == 2 and run.out == ""
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secorder: error: --"), run.err
    assert message in lines[0]


def test_missing_matplotlib_is_a_usage_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    run = cli("spectrum", "--model", TINY, *FAST, "--out", str(tmp_path / "x.png"))
    assert run.rc == 2 and "pip install matplotlib" in run.err
    assert "pip install -e \".[plot]\"" in run.err  # users install from a checkout (issue 28, item 9)


BAD_OPTIONS = [("--top-k", "0"), ("-k", "two"), ("--num-probes", "0"), ("--num-iterations", "-1"), ("--tol", "0"),
               ("--tol", "nan"), ("--curvature", "hessian2"), ("--steps", "-1")]


@pytest.mark.parametrize("option,value", BAD_OPTIONS, ids=[f"{o} {v}" for o, v in BAD_OPTIONS])
def test_bad_option_values_name_the_option_with_status_2(option, value):
    run = cli("spectrum", option, value)
    assert run.rc == 2 and run.out == ""
    lines = run.err.strip().splitlines()
    assert lines[0].startswith("usage: secorder spectrum")
    assert lines[-1].startswith("secorder spectrum: error: argument "), lines[-1]
    assert option in lines[-1] or option.lstrip("-") in lines[-1]


def test_spectrum_is_listed_in_the_help():
    assert main(["spectrum", "--help"]) == 0

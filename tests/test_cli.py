"""The ``secorder`` command, driven the way a user calls it: in a subprocess.

The factories at the bottom of this module are ``--model`` targets
(``tests.test_cli:tiny_problem`` and friends); the subprocess runs from the
repository root, so ``tests`` is importable there.
"""

import concurrent.futures
import fcntl
import json
import math
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import termios
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env():
    """The subprocess environment: the checkout on the path, one intra-op thread unless the caller chose.

    The problems here are tiny, where extra threads only spin, and several
    subprocesses run side by side.
    """
    return {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(ROOT)}
TINY = "tests.test_cli:tiny_problem"


def run(*args, timeout=600):
    """``python -m secorder ARGS`` from the repository root; returns the CompletedProcess."""
    cmd = [sys.executable, "-m", "secorder", *args]
    env = _env()
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def as_json(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------
# --model targets


def _tiny():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    return model, x, y


def tiny_problem():
    model, x, y = _tiny()
    return model, F.cross_entropy, (x, y)


def tiny_batches():
    """An iterable (a generator) of three batches."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    data = [(torch.randn(6, 3), torch.randint(0, 2, (6,))) for _ in range(3)]
    return model, F.cross_entropy, (b for b in data)


def returns_pair():
    model, x, y = _tiny()
    return model, F.cross_entropy


def returns_bad_model():
    _, x, y = _tiny()
    return "not a model", F.cross_entropy, (x, y)


def returns_bad_data():
    model, _, _ = _tiny()
    return model, F.cross_entropy, 42


def returns_bad_batch():
    model, x, y = _tiny()
    return model, F.cross_entropy, [(x, y), "oops"]


def nonscalar_loss():
    model, x, y = _tiny()
    return model, lambda out, t: F.cross_entropy(out, t, reduction="none"), (x, y)


class Cube(nn.Module):
    """A module the structured engine does not know: the exact curvature takes the generic path."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4) * 0.5)

    def forward(self, x):
        return (x * self.w) ** 3


def custom_module():
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    return nn.Sequential(Cube(), nn.Linear(4, 4)), F.mse_loss, (x, y)


def wrong_shapes():
    model, _, y = _tiny()
    return model, F.cross_entropy, (torch.randn(10, 5), y)  # the model takes 3 features


def raises():
    raise RuntimeError("dataset not found")


not_callable = 3


# ---------------------------------------------------------------------------
# references


def hessian_trace_reference(problem, seed=0, batches=None):
    """float64 trace of the Hessian of the mean batch loss by ``torch.func.hessian``, at the factory's init."""
    torch.manual_seed(seed)
    model, loss_fn, data = problem()
    model = model.double()
    data = [data] if batches is None else list(data)[:batches]
    data = [(x.double(), y.double() if y.is_floating_point() else y) for x, y in data]
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(*leaves):
        p = dict(zip(names, leaves))
        return sum(loss_fn(torch.func.functional_call(model, p, (x,)), y) for x, y in data) / len(data)

    leaves = tuple(params[n] for n in names)
    H = torch.func.hessian(f, argnums=tuple(range(len(leaves))))(*leaves)
    per_leaf = {}
    for i, n in enumerate(names):
        block = H[i][i].reshape(leaves[i].numel(), leaves[i].numel())
        per_leaf[n] = torch.diagonal(block)
    return per_leaf


# ---------------------------------------------------------------------------
# The command lines, run concurrently once per session: most of a run's time is
# importing torch, so running them side by side keeps this module fast.

TINY_F64 = ["--model", TINY, "--steps", "2", "--dtype", "float64", "--num-samples", "300", "--chunk-size", "300",
            "--seed", "3"]

ERRORS = [
    (["--model", "tests.test_cli"], "expects 'pkg.module:factory'"),
    (["--model", "tests.no_such_module:f"], "cannot import module 'tests.no_such_module'"),
    (["--model", "tests.test_cli:no_such_factory"], "has no attribute 'no_such_factory'"),
    (["--model", "tests.test_cli:not_callable"], "expected a callable factory, got int"),
    (["--model", "tests.test_cli:returns_pair"], "must return a tuple (model, loss_fn, data), got a tuple of length 2"),
    (["--model", "tests.test_cli:returns_bad_model"], "model of type str; expected a torch.nn.Module"),
    (["--model", "tests.test_cli:returns_bad_data"], "data of type int; expected a batch (inputs, targets)"),
    (["--model", "tests.test_cli:returns_bad_batch"], "batch 1 of data is a str"),
    (["--model", "tests.test_cli:nonscalar_loss"], "shape (10,); expected a scalar (0-dim) loss"),
    (["--model", "tests.test_cli:raises"], "the factory raised RuntimeError: dataset not found"),
    (["--model", TINY, "--device", "nonsense"], "unknown device 'nonsense'"),
    (["--model", "tests.test_cli:wrong_shapes"], "computing loss_fn(model(inputs), targets) failed: RuntimeError"),
]

RUNS = {
    "f64": ["report", "--json", *TINY_F64],
    "f64_generic": ["report", "--json", *TINY_F64, "--engine", "generic"],
    "custom": ["report", "--json", "--model", "tests.test_cli:custom_module", "--steps", "1", "--dtype", "float64",
               "--num-samples", "4", "--method", "hutch++"],
    "batches": ["report", "--json", "--model", "tests.test_cli:tiny_batches", "--steps", "1", "--dtype", "float64",
                "--num-samples", "5", "--max-batches", "2"],
    "never": ["report", "--json", "--model", TINY, "--steps", "1", "--exact", "never", "--num-samples", "12",
              "--chunk-size", "12"],
    "table": ["report", "--model", TINY, "--steps", "2", "--num-samples", "5", "--exact-limit", "10",
              "--engine", "generic"],
    "bad_method_samples": ["report", "--model", TINY, "--method", "xtrace", "--num-samples", "5"],
    "debug": ["report", "--model", "tests.test_cli:nonscalar_loss", "--debug"],
    "bad_option": ["report", "--num-samples", "0"],
    "no_command": ["--model", "tests.test_cli:returns_pair"],
    **{f"error{i}": ["report", "--steps", "1", *args] for i, (args, _) in enumerate(ERRORS)},
}


@pytest.fixture(scope="module")
def runs():
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(run, *args) for name, args in RUNS.items()}
        return {name: fut.result() for name, fut in futures.items()}


# ---------------------------------------------------------------------------
# tests


@pytest.mark.slow
def test_default_run_json():
    """The embedded digits MLP: exact and stochastic traces agree, the numbers move with training."""
    r = as_json(run("report", "--json", "--steps", "3", "--num-samples", "30"))
    assert r["num_params"] == 64 * 32 + 32 + 32 * 10 + 10
    assert r["exact"]["computed"] is True
    assert [p["phase"] for p in r["phases"]] == ["init", "after 3 steps"]
    init, trained = r["phases"]
    assert trained["loss"] < init["loss"]  # three Adam steps at lr 1e-2 do lower the loss
    for p in r["phases"]:
        st = p["stochastic_trace"]
        assert st["matvecs"] == 30 and st["num_samples"] == 30
        assert st["ci95"][0] < st["estimate"] < st["ci95"][1]
        assert math.isclose(sum(p["per_layer_trace"].values()), p["exact_trace"], rel_tol=1e-4)
        assert list(p["per_layer_trace"]) == ["0 (Linear)", "2 (Linear)"]
        assert p["exact"]["engine"] == "structured"  # Linear, Tanh and cross-entropy qualify
        d = p["diagonal"]
        assert d["exact"] is True and d["min"] <= d["median"] <= d["max"] and 0 <= d["negative_share"] <= 1
        assert set(p["seconds"]) >= {"loss", "exact", "stochastic"}
    assert "training" in trained["seconds"]


@pytest.mark.parametrize("name,engine", [("f64", "structured"), ("f64_generic", "generic")])
def test_model_factory_exact_matches_float64_hessian(runs, name, engine):
    r = as_json(runs[name])
    assert r["exact"]["engine"] == engine and r["exact"]["computed"]
    ref = hessian_trace_reference(tiny_problem, seed=3)
    init = r["phases"][0]
    assert r["num_params"] == 3 * 4 + 4 + 4 * 2 + 2 and r["dtype"] == "float64"
    expected = float(sum(d.sum() for d in ref.values()))
    assert init["exact_trace"] == pytest.approx(expected, rel=1e-10, abs=1e-12)
    for name, d in ref.items():
        assert init["per_param_trace"][name] == pytest.approx(float(d.sum()), rel=1e-9, abs=1e-12)
    flat = torch.cat(list(ref.values()))
    assert init["diagonal"]["min"] == pytest.approx(float(flat.min()), abs=1e-12)
    assert init["diagonal"]["max"] == pytest.approx(float(flat.max()), abs=1e-12)
    assert init["diagonal"]["negative_share"] == pytest.approx(float((flat < 0).double().mean()))
    # Hutchinson with 300 probes: the estimate is within 4 standard errors of the truth.
    st = init["stochastic_trace"]
    assert abs(st["estimate"] - expected) < 4 * st["stderr"]
    assert st["ci95"][0] < st["estimate"] < st["ci95"][1]
    # after training the parameters moved, so the trace did too
    assert r["phases"][1]["exact_trace"] != init["exact_trace"]


def test_same_seed_same_estimates(runs):
    """Two processes with the same seed draw the same probes: the engine changes only the exact part."""
    a, b = as_json(runs["f64"]), as_json(runs["f64_generic"])
    for pa, pb in zip(a["phases"], b["phases"]):
        assert pa["loss"] == pb["loss"]
        assert pa["stochastic_trace"] == pb["stochastic_trace"]
        assert pa["exact_trace"] == pytest.approx(pb["exact_trace"], rel=1e-10)
    other = as_json(runs["never"])  # seed 0 instead of 3: another model and other probes
    assert other["phases"][0]["loss"] != a["phases"][0]["loss"]


def test_iterable_of_batches_is_the_mean_loss(runs):
    """A generator of three batches, of which --max-batches 2 are read."""
    r = as_json(runs["batches"])
    assert r["num_batches"] == 2
    ref = hessian_trace_reference(tiny_batches, batches=2)
    assert r["phases"][0]["exact_trace"] == pytest.approx(float(sum(d.sum() for d in ref.values())), rel=1e-10)


def test_exact_never_uses_the_stochastic_estimates(runs):
    r = as_json(runs["never"])
    assert r["exact"] == {"mode": "never", "limit": 20000, "computed": False, "engine": None}
    for p in r["phases"]:
        assert p["exact_trace"] is None and "exact" not in p["seconds"]
        assert p["per_layer_source"] == "hutchinson, same probes"
        assert p["diagonal"]["exact"] is False and p["diagonal"]["matvecs"] == 12
        assert p["stochastic_trace"]["matvecs"] == 12
        assert math.isclose(sum(p["per_layer_trace"].values()), p["stochastic_trace"]["estimate"], rel_tol=1e-6)


def test_unsupported_module_falls_back_to_one_hot_hvps(runs):
    """A custom module: the structured engine says why it does not apply, the generic path is exact."""
    r = as_json(runs["custom"])
    init = r["phases"][0]
    assert init["exact"]["engine"] == "generic" and init["exact"]["structured_fallback_reason"]
    ref = hessian_trace_reference(custom_module)
    assert init["exact_trace"] == pytest.approx(float(sum(d.sum() for d in ref.values())), rel=1e-10)
    assert list(init["per_layer_trace"]) == ["0 (Cube)", "1 (Linear)"]
    assert init["stochastic_trace"]["method"] == "hutch++" and init["stochastic_trace"]["matvecs"] == 4


def test_estimator_options_are_checked_up_front(runs):
    proc = runs["bad_method_samples"]
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--method xtrace --num-samples 5" in proc.stderr and "even" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_human_table_and_auto_limit(runs):
    proc = runs["table"]
    assert proc.returncode == 0, proc.stderr
    for text in ["26 parameters", "loss", "Hessian trace (exact)", "95% interval", "matvecs",
                 "per-layer trace", "0 (Linear)", "2 (Linear)", "negative entries", "wall time",
                 "after 2 steps", "exact curvature skipped: 26 parameters > --exact-limit 10",
                 "structured engine does not apply (--engine generic)"]:
        assert text in proc.stdout, text
    assert proc.stderr == ""  # not a terminal: no progress bars


@pytest.mark.parametrize("index", range(len(ERRORS)), ids=[e[1][:30] for e in ERRORS])
def test_errors_are_one_line_with_status_2(runs, index):
    proc, message = runs[f"error{index}"], ERRORS[index][1]
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secorder: error:"), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(runs):
    proc = runs["debug"]
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "UsageError" in proc.stderr


def test_report_is_the_default_command(runs):
    proc = runs["no_command"]
    assert proc.returncode == 2 and "must return a tuple (model, loss_fn, data)" in proc.stderr


def test_bad_option_value_is_a_usage_error(runs):
    proc = runs["bad_option"]
    assert proc.returncode == 2 and "--num-samples" in proc.stderr


def test_progress_bars_on_a_terminal():
    """With stderr on a (pseudo-)terminal, tqdm bars appear; the report itself still goes to stdout."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a pty starts 0 columns wide
    chunks = []

    def reader():
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    env = _env()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "secorder", "report", "--model", TINY, "--steps", "5", "--num-samples", "3"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=slave, timeout=600, text=True,
        )
    finally:
        os.close(slave)
        thread.join(10)
        os.close(master)
    assert proc.returncode == 0
    bars = b"".join(chunks).decode(errors="replace")
    for desc in ("exact diagonal", "training"):
        assert desc in bars, bars
    assert "Hessian trace" in proc.stdout and "Hessian trace" not in bars


def test_console_script():
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("secorder") == "secorder.cli:main"
    exe = shutil.which("secorder")
    if exe is None:
        pytest.skip("the secorder script is not on PATH (package not installed with pip)")
    env = _env()
    forced = ["--exact", "always", "--exact-limit", "10", "--engine", "generic"]
    proc = subprocess.run([exe, "report", "--json", "--model", TINY, "--steps", "0", "--num-samples", "2", *forced],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["num_params"] == 26
    # --exact always overrides the limit
    assert r["exact"] == {"mode": "always", "limit": 10, "computed": True, "engine": "generic"}
    assert r["phases"][0]["exact_trace"] is not None

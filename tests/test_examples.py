"""Every script in examples/ runs, as a user would run it, and its self-checks pass.

The examples assert their own results (vmap against a loop, the closure API
against the functional one, the penalty lowering the trace, ...); these tests
run them in subprocesses, side by side, and check the exit status and the lines
that report those results.
"""

import concurrent.futures
import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _env():
    """The subprocess environment: the checkout on the path, one intra-op thread unless the caller chose.

    The problems here are tiny, where extra threads only spin, and several
    subprocesses run side by side.
    """
    return {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(ROOT)}
EXAMPLES = ROOT / "examples"

# script -> (extra arguments, text its output must contain)
EXPECTED = {
    "quickstart.py": ([], "Hessian trace"),
    "trace_regularised_training.py": ([], "the penalty lowered the trace"),
    "per_example_curvature.py": ([], "vmap matches the loop over examples"),
    "adahessian.py": ([], "AdaHessian"),
    "migrate_closure.py": ([], "the closure and functional APIs agree"),
    "compare_estimators.py": (["--seeds", "2", "--budgets", "12"], "xtrace"),
    "pinn_poisson.py": ([], "the PINN solution matches the analytic solution"),
    "kfac_laplace.py": ([], "the K-FAC Laplace evidence picks prior precision"),
    "hf_spectrum.py": (["--quick", "--out", str(pathlib.Path(tempfile.gettempdir()) / "secorder_hf_spectrum.png")],
                       "every eigenpair checked by Hessian-vector products"),
    "distributed_fsdp.py": ([], "top eigenvalue of the Hessian"),
    "influence.py": (["--quick"], "influence functions agree with a dense solve and with leave-one-out retraining"),
}

# Examples that need an optional package: skipped (not run) where it does not import.
NEEDS = {"hf_spectrum.py": "transformers", "influence.py": "sklearn"}


def _available(script):
    return script not in NEEDS or importlib.util.find_spec(NEEDS[script]) is not None


def _run(script, args):
    env = _env()
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def outputs():
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run, name, args) for name, (args, _) in EXPECTED.items() if _available(name)}
        return {name: fut.result() for name, fut in futures.items()}


def test_every_example_is_listed():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(outputs, script):
    if not _available(script):
        pytest.skip(f"{script} needs {NEEDS[script]}")
    proc = outputs[script]
    assert proc.returncode == 0, proc.stderr
    assert EXPECTED[script][1] in proc.stdout, proc.stdout

"""Issue 28: what a new user still tripped on in the first hour (each test fails if the trap comes back).

The CLI tests drive ``secorder.cli.main`` in-process (see ``tests/test_cli.py``).
"""

import contextlib
import io
import json
import re
import subprocess
import sys
import pathlib

import pytest
import torch
from torch import nn
from torch.func import vmap

import secorder as so
from secorder.transforms import hints
from tests.test_cli import TINY, as_json, cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# item 7: small leaks and noise


@pytest.mark.parametrize("name, general", [("hessian_diag", "diagonal"), ("hessian_diag_estimate", "diagonal_estimate"),
                                           ("ggn_diag", "diagonal"), ("ggn_trace", "trace")])
def test_shortcut_says_it_fixes_the_curvature(name, general):
    with pytest.raises(TypeError) as info:
        getattr(so, name)(lambda x: (x ** 2).sum(), curvature="fisher")
    text = str(info.value)
    assert f"so.{name} fixes curvature=" in text and f"so.{general}(f, curvature='fisher'" in text
    assert "multiple values" not in text


def test_spectral_density_prints_one_line():
    f = lambda x: (x ** 4).sum()  # noqa: E731
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    d = so.spectral_density(f, num_probes=2, num_iterations=3, seed=0)(x)
    text = str(d)
    assert "\n" not in text and repr(d) == text and len(text) < 200
    lo, hi = float(d.nodes.min()), float(d.nodes.max())
    assert text.startswith("SpectralDensity(dim=3, probes=2, nodes=3, ")
    assert f"support=[{lo:.4g}, {hi:.4g}]" in text and f"trace={float(d.trace()):.4g}" in text
    assert f"{float(d.trace()):.4g}" == f"{float(12 * (x ** 2).sum()):.4g}"  # diagonal Hessian: exact trace
    batched = vmap(lambda x: so.spectral_density(f, num_probes=2, num_iterations=3, seed=0)(x),
                   randomness="same")(torch.ones(2, 3))
    assert "\n" not in str(batched) and "batch=(2,)" in str(batched)


@pytest.mark.parametrize("command", ["report", "spectrum"])
def test_steps_0_prints_one_column(command):
    run = cli(command, "--model", TINY, "--steps", "0", "--num-samples" if command == "report" else "--num-probes",
              "2", "--no-progress")
    assert run.rc == 0, run.err
    assert "after 0 steps" not in run.out
    header = next(line for line in run.out.splitlines() if line.strip() == "init" or line.strip().startswith("init "))
    assert header.split() == ["init"]
    r = as_json(cli(command, "--json", "--model", TINY, "--steps", "0",
                    "--num-samples" if command == "report" else "--num-probes", "2"))
    assert [p["phase"] for p in r["phases"]] == ["init"] and r["last_train_loss"] is None


def test_first_product_prints_no_torch_jit_warning():
    """A fresh interpreter: the first forward-mode product would print PyTorch's torch.jit.script deprecation."""
    code = ("import torch, secorder as so\n"
            "print(so.hvp(lambda x: (x ** 3).sum())(torch.ones(2), torch.ones(2)).tolist())\n"
            "import warnings\n"
            "with warnings.catch_warnings(record=True) as seen:\n"
            "    warnings.simplefilter('always')\n"
            "    warnings.warn('`torch.jit.script` is deprecated', DeprecationWarning)\n"
            "print(len(seen))\n")  # the filter is scoped: the same warning from elsewhere still shows
    proc = subprocess.run([sys.executable, "-W", "error::DeprecationWarning", "-W", "error::FutureWarning", "-c", code],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[6.0,", "6.0]", "1"] and "jit" not in proc.stderr


# ---------------------------------------------------------------------------
# item 6: per-example mistakes under vmap


def _conv_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 3))
    f = so.functional_loss(model, nn.functional.cross_entropy)
    return f, so.params_dict(model), torch.randn(5, 1, 4, 4), torch.randint(0, 3, (5,))


@pytest.mark.parametrize("transform", ["trace", "ggn_diag", "hvp", "eigenvalues"])
def test_missing_batch_dimension_under_vmap_gets_the_hint(transform):
    f, p, x, y = _conv_problem()
    if transform == "hvp":
        g = lambda xi, yi: so.hvp(f)(p, xi, yi, p)  # noqa: E731
    else:
        t = getattr(so, transform)(f, **({"seed": 0} if transform == "eigenvalues" else {}))
        g = lambda xi, yi: t(p, xi, yi)  # noqa: E731
    with pytest.raises(RuntimeError) as info:
        vmap(g, randomness="same")(x, y)
    assert hints.BATCH_HINT in str(info.value) and "x[:, None]" in str(info.value)
    assert "shapes cannot be multiplied" in str(info.value.__cause__)  # the original, chained
    if transform != "eigenvalues":  # the hint's fix works
        vmap(g, randomness="same")(x[:, None], y[:, None])


def test_fisher_under_vmap_without_randomness_gets_the_hint():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    f = so.functional_loss(model, nn.functional.cross_entropy)
    p, x, y = so.params_dict(model), torch.randn(5, 1, 4), torch.randint(0, 3, (5, 1))
    g = so.diagonal(f, curvature="fisher", seed=0)
    with pytest.raises(RuntimeError) as info:
        vmap(lambda xi, yi: g(p, xi, yi))(x, y)
    assert hints.RANDOMNESS_HINT in str(info.value) and "randomness='different'" in str(info.value)
    assert "randomness error mode" in str(info.value.__cause__)
    out = vmap(lambda xi, yi: g(p, xi, yi), randomness="different")(x, y)
    assert out["0.weight"].shape == (5, 6, 4)


def test_errors_outside_vmap_are_untouched():
    f, p, x, y = _conv_problem()
    with pytest.raises(RuntimeError) as info:
        so.trace(f)(p, x[0], y[0])
    assert "secorder hint" not in str(info.value)


# ---------------------------------------------------------------------------
# item 10: a clone's folder named secorder shadows the package

_EDITABLE_FINDER = """
import sys
from importlib.machinery import PathFinder
ROOT = {root!r}
class Finder:  # what pip's default editable install adds: consulted after the current directory
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname in ("secorder", "torch_secorder"):
            return PathFinder.find_spec(fullname, [ROOT])
        return None
sys.meta_path.insert(sys.meta_path.index(PathFinder) + 1, Finder)  # ahead of any real editable install's
sys.path[:] = [""] + [p for p in sys.path if p and p != ROOT]
"""


def test_shadowing_clone_folder_is_named(tmp_path):
    (tmp_path / "secorder" / "docs").mkdir(parents=True)  # the clone's root: no __init__.py
    code = _EDITABLE_FINDER.format(root=str(ROOT)) + (
        "import secorder\n"
        "assert getattr(secorder, '__file__', None) is None, secorder  # the trap itself\n"
        "try:\n"
        "    import torch_secorder\n"
        "except ImportError as err:\n"
        "    print(err)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"the folder {tmp_path / 'secorder'} shadows the secorder package" in proc.stdout
    assert "editable_mode=compat" in proc.stdout
    page = (ROOT / "docs" / "installation.rst").read_text()
    assert "shadows the package" in page and "editable_mode=compat" in page


# ---------------------------------------------------------------------------
# item 9: what the docs say check_deterministic detects


def test_check_deterministic_passes_a_plain_shuffle_and_flags_augmentation():
    torch.manual_seed(0)
    x, y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    f = lambda w, xb, yb: ((xb @ w - yb) ** 2).mean()  # noqa: E731
    w = torch.ones(3, dtype=torch.float64)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4, shuffle=True)
    F = so.dataset_loss(f, loader, check_deterministic=True)
    torch.testing.assert_close(so.trace(F)(w), so.trace(lambda w: f(w, x, y))(w))  # order-independent total

    class Augmented:
        def __iter__(self):
            return iter([(x + 0.1 * torch.randn_like(x), y)])

        def __len__(self):
            return 1

    with pytest.raises(ValueError, match="augmentation"):
        so.trace(so.dataset_loss(f, Augmented(), check_deterministic=True))(w)
    page = (ROOT / "docs" / "datasets.rst").read_text()
    assert "does not flag a plain shuffling" in page
    assert "only exact\n       choice under an outer" not in (ROOT / "docs" / "estimators.rst").read_text()


# ---------------------------------------------------------------------------
# item 3: -v logs what ran and why; output options before the command


@pytest.mark.parametrize("argv", [["-v", "report"], ["report", "-v"], ["--verbose", "--no-progress", "report"],
                                  ["-v"]], ids=["before", "after", "two-before", "no-command"])
def test_verbose_logs_what_ran_and_why(argv):
    run = cli(*argv, "--model", TINY, "--steps", "1", "--num-samples", "2", "--engine", "generic")
    assert run.rc == 0, run.err
    log = run.err
    assert "1 batch(es) read" in log and "of at most 256 (--batch-size)" in log           # the batches
    assert "init: exact trace and diagonal by one-hot Hessian-vector products, one per parameter (26), because " \
           "--engine generic" in log                                                       # the engine, and why
    assert "init: stochastic trace by hutchinson: 2 probes, 2 Hessian-vector products" in log  # the estimator
    assert "training: 1 Adam steps" in log and "after 1 steps: loss" in log
    assert len([line for line in log.splitlines() if line.rstrip().endswith(" s")]) >= 6  # time per phase
    assert "Hessian trace" in run.out


def test_verbose_on_the_fast_engine_and_quiet_without_it():
    run = cli("report", "-v", "--model", TINY, "--steps", "0", "--num-samples", "2")
    assert run.rc == 0, run.err
    assert "init: exact trace and diagonal by the fast (structured) engine" in run.err
    quiet = cli("report", "--model", TINY, "--steps", "0", "--num-samples", "2")
    assert quiet.rc == 0 and "INFO" not in quiet.err


def test_output_options_before_the_command_for_every_command():
    r = as_json(cli("--json", "spectrum", "--model", TINY, "--steps", "0", "--num-probes", "2", "-k", "1"))
    assert r["phases"][0]["phase"] == "init"


# ---------------------------------------------------------------------------
# item 8: one progress bar per call, plain lines off a terminal


def _dataset_problem(progress):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    f = so.functional_loss(model, nn.functional.cross_entropy)
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 20, 4)]  # 5 batches
    return so.dataset_loss(f, batches, progress=progress), so.params_dict(model)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _count_bars(monkeypatch):
    import tqdm.auto

    made = []
    real = tqdm.auto.tqdm

    def recording(*args, **kwargs):
        bar = real(*args, **kwargs)
        made.append(kwargs.get("desc"))
        return bar

    monkeypatch.setattr(tqdm.auto, "tqdm", recording)
    return made


# hessian_diag on the generic path: one pass per chunk of columns (the GGN's exact diagonal now takes one pass
# of loss-factor VJPs, issue 20)
@pytest.mark.parametrize("transform", ["eigenvalues", "spectral_density", "trace_estimate", "hessian_diag"])
def test_one_bar_per_call_on_a_terminal(monkeypatch, transform):
    F, p = _dataset_problem(True)
    made = _count_bars(monkeypatch)
    err = _Terminal()
    options = {"eigenvalues": dict(k=1, num_iterations=6, seed=0), "spectral_density": dict(num_probes=2,
               num_iterations=4, seed=0, chunk_size=1), "trace_estimate": dict(num_samples=4, chunk_size=1, seed=0),
               "hessian_diag": dict(engine="generic", chunk_size=5)}[transform]
    with contextlib.redirect_stderr(err):
        getattr(so, transform)(F, **options)(p)
    assert len(made) == 1, made  # before: one bar per pass (per Lanczos step, per probe chunk)
    assert made[0] == f"secorder: {transform.replace('_', ' ')}" or made[0].startswith("secorder: ")
    text = err.getvalue()
    steps = [int(m) for m in re.findall(r"step (\d+), batch \d+/5", text)]
    assert steps and max(steps) >= 3, text  # the step and batch counts are on the bar


def test_plain_lines_off_a_terminal(monkeypatch):
    import secorder.progress as progress

    monkeypatch.setattr(progress, "LINE_INTERVAL", 0.0)  # a line per batch, to see them all
    F, p = _dataset_problem(True)
    err = io.StringIO()  # a log file: not a terminal
    with contextlib.redirect_stderr(err):
        so.eigenvalues(F, k=1, num_iterations=4, seed=0)(p)
    text = err.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and "\x1b" not in text and lines
    assert all(line.startswith("secorder: eigenvalues: ") for line in lines), lines
    assert re.fullmatch(r"secorder: eigenvalues: done, (\d+) step\(s\), (\d+) batch\(es\)", lines[-1])
    steps, batches = map(int, re.findall(r"\d+", lines[-1]))
    assert batches == 5 * steps and steps >= 4
    assert len(lines) == batches + 1  # one call: one stream
    quiet = io.StringIO()
    with contextlib.redirect_stderr(quiet):
        so.eigenvalues(_dataset_problem(None)[0], k=1, num_iterations=4, seed=0)(p)  # default: terminal only
    assert quiet.getvalue() == ""


# ---------------------------------------------------------------------------
# item 2: the CLI shows the library's warnings


class SlowLoss(nn.Module):
    """A loss that warns, as the library's slow exact path will (a UserWarning subclass)."""

    def forward(self, out, y):
        import warnings

        warnings.warn("the exact path takes one product per parameter here (test warning)", UserWarning)
        return nn.functional.cross_entropy(out, y)


def warning_problem():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    return model, SlowLoss(), (torch.randn(10, 3), torch.randint(0, 2, (10,)))


@pytest.mark.parametrize("command", ["report", "spectrum"])
def test_cli_shows_library_warnings(command):
    size = ["--num-samples", "2"] if command == "report" else ["--num-probes", "2", "--num-iterations", "4", "-k", "1"]
    model = ["--model", "tests.test_first_hour:warning_problem", "--steps", "0", *size]
    run = cli(command, *model)
    assert run.rc == 0, run.err
    header = run.out.split("\n\n", 1)[0]  # under the report's header, once
    assert header.count("warning: the exact path takes one product per parameter here (test warning)") == 1, run.out
    r = as_json(cli(command, "--json", *model))
    assert r["warnings"] == ["the exact path takes one product per parameter here (test warning)"]


class SlowLossNotScalar(SlowLoss):
    def forward(self, out, y):
        return super().forward(out, y) * torch.ones(2)  # warns, then returns a loss that is not a scalar


def warning_then_error_problem():
    model, _, data = warning_problem()
    return model, SlowLossNotScalar(), data


def test_cli_shows_warnings_of_a_failed_run():
    run = cli("report", "--model", "tests.test_first_hour:warning_then_error_problem", "--steps", "0")
    assert run.rc == 2 and run.out == ""
    lines = run.err.strip().splitlines()
    assert "secorder: warning: the exact path takes one product per parameter here (test warning)" in lines
    assert any(line.startswith("secorder: error: --model") for line in lines)


def test_a_failed_pass_leaves_no_stale_progress(monkeypatch):
    """A pass that raises closes its progress at once (not when its traceback is freed): the next call gets a bar."""
    import secorder.progress as progress

    F, p = _dataset_problem(True)
    bad = so.dataset_loss(lambda *a: torch.ones(2), F.data, progress=True)  # not a scalar: fails on batch 0
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        with pytest.raises(TypeError) as kept:  # the traceback (and the failed pass's frame) stays alive here
            bad(p)
        assert progress.current() is None
        so.eigenvalues(F, k=1, num_iterations=3, seed=0)(p)
    assert kept.value is not None
    assert err.getvalue().splitlines()[-1].startswith("secorder: eigenvalues: done, ")

"""The ``secorder`` command, driven in-process through ``secorder.cli.main`` (plus two subprocess runs).

``main(argv)`` returns the exit status and never raises ``SystemExit``, so most
tests call it directly with stdout/stderr captured: no torch import per run.
Only ``test_python_dash_m`` and ``test_console_script`` start a process, to check
the two ways a user launches it.

The factories in the middle of this module are ``--model`` targets
(``tests.test_cli:tiny_problem`` and friends); the repository root is on
``sys.path`` under pytest, so ``tests`` is importable.
"""

import concurrent.futures
import contextlib
import functools
import io
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secorder.cli import UsageError, build_parser, load_factory, main
from secorder.cli import report as report_module
from secorder.cli.output import format_table

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "tests.test_cli:tiny_problem"


class Run(NamedTuple):
    rc: int
    out: str
    err: str


def cli(*args: str) -> Run:
    """``secorder ARGS`` in this process; stdout and stderr captured."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return Run(rc, out.getvalue(), err.getvalue())


@functools.lru_cache(maxsize=None)
def cached(*args: str) -> Run:
    """:func:`cli`, once per argument list per session (several tests read the same run)."""
    return cli(*args)


def _no_nan(text):
    raise ValueError(f"not strict JSON: {text}")


def as_json(run: Run):
    assert run.rc == 0, run.err
    return json.loads(run.out, parse_constant=_no_nan)  # strict: NaN / Infinity are refused


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
        return ((x * self.w) ** 3).cumsum(-1)  # cumsum: no rule on the graph walker either


def custom_module():
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    return nn.Sequential(Cube(), nn.Linear(4, 4)), F.mse_loss, (x, y)


def layer_norm():
    """GroupNorm at index 1, which the fast engine does not support."""
    model = nn.Sequential(nn.Linear(3, 4), nn.GroupNorm(1, 4), nn.Tanh(), nn.Linear(4, 2))
    return model, F.cross_entropy, (torch.randn(10, 3), torch.randint(0, 2, (10,)))


def wide_layer():
    """A 3-300 linear layer: its 900-entry weight is several chunks of one-hot columns."""
    model = nn.Sequential(nn.Linear(3, 300), nn.Tanh(), nn.Linear(300, 2))
    return model, F.cross_entropy, (torch.randn(6, 3), torch.randint(0, 2, (6,)))


def diverges():
    """exp of a linear layer under MSE: a large step overflows the loss to inf, then nan."""
    model = nn.Sequential(nn.Linear(3, 1))
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    return model, lambda out, t: (out.exp() - t).pow(2).mean(), (x, y)


def empty_batch():
    model, x, y = _tiny()
    return model, F.cross_entropy, (x[:0], y[:0])


def dict_inputs():
    model, x, y = _tiny()
    return model, F.cross_entropy, ({"x": x}, y)


def wrong_shapes():
    model, _, y = _tiny()
    return model, F.cross_entropy, (torch.randn(10, 5), y)  # the model takes 3 features


def raises():
    raise RuntimeError("dataset not found")


not_callable = 3


# ---------------------------------------------------------------------------
# references


def hessian_trace_reference(problem, seed=0, batches=None):
    """float64 diagonal of the Hessian of the mean batch loss by ``torch.func.hessian``, at the factory's init."""
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


TINY_F64 = ("--model", TINY, "--steps", "2", "--dtype", "float64", "--num-samples", "300", "--chunk-size", "300",
            "--seed", "3")
F64 = ("report", "--json", *TINY_F64)
F64_GENERIC = (*F64, "--engine", "generic")
NEVER = ("report", "--json", "--model", TINY, "--steps", "1", "--exact", "never", "--num-samples", "12",
         "--chunk-size", "12")
TABLE = ("report", "--model", TINY, "--steps", "2", "--num-samples", "5", "--exact-limit", "10", "--engine", "generic")


# ---------------------------------------------------------------------------
# results


def test_default_run_json():
    """The embedded digits MLP: exact and stochastic traces agree, the numbers move with training."""
    r = as_json(cli("report", "--json", "--steps", "3", "--num-samples", "30"))
    assert r["num_params"] == 64 * 32 + 32 + 32 * 10 + 10
    assert r["exact"]["computed"] is True and r["warnings"] == []
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
        assert p["exact"]["structured_fallback_reason"] is None
        d = p["diagonal"]
        assert d["exact"] is True and d["matvecs"] is None
        assert d["min"] <= d["median"] <= d["max"] and 0 <= d["negative_share"] <= 1
        assert set(p["seconds"]) >= {"loss", "exact", "stochastic"}
    assert "training" in trained["seconds"]


@pytest.mark.parametrize("args,engine", [(F64, "structured"), (F64_GENERIC, "generic")])
def test_model_factory_exact_matches_float64_hessian(args, engine):
    r = as_json(cached(*args))
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


def test_same_seed_same_estimates():
    """Two runs with the same seed draw the same probes: the engine changes only the exact part."""
    a, b = as_json(cached(*F64)), as_json(cached(*F64_GENERIC))
    for pa, pb in zip(a["phases"], b["phases"]):
        assert pa["loss"] == pb["loss"]
        assert pa["stochastic_trace"] == pb["stochastic_trace"]
        assert pa["exact_trace"] == pytest.approx(pb["exact_trace"], rel=1e-10)
    other = as_json(cached(*NEVER))  # seed 0 instead of 3: another model and other probes
    assert other["phases"][0]["loss"] != a["phases"][0]["loss"]


def test_iterable_of_batches_is_the_mean_loss():
    """A generator of three batches, of which --max-batches 2 are read."""
    r = as_json(cli("report", "--json", "--model", "tests.test_cli:tiny_batches", "--steps", "1", "--dtype", "float64",
                    "--num-samples", "5", "--max-batches", "2"))
    assert r["num_batches"] == 2
    ref = hessian_trace_reference(tiny_batches, batches=2)
    assert r["phases"][0]["exact_trace"] == pytest.approx(float(sum(d.sum() for d in ref.values())), rel=1e-10)


def test_exact_never_uses_the_stochastic_estimates():
    r = as_json(cached(*NEVER))
    assert r["exact"] == {"mode": "never", "limit": 20000, "computed": False, "engine": None}
    for p in r["phases"]:
        assert p["exact_trace"] is None and "exact" not in p["seconds"]
        assert p["exact"]["reason"] == "--exact never" and p["exact"]["structured_fallback_reason"] is None
        assert p["per_layer_source"] == "hutchinson, same probes"
        assert p["diagonal"]["exact"] is False and p["diagonal"]["matvecs"] == 12
        assert p["stochastic_trace"]["matvecs"] == 12
        assert math.isclose(sum(p["per_layer_trace"].values()), p["stochastic_trace"]["estimate"], rel_tol=1e-6)


def _layout_matches(value, layout, path="report"):
    """Assert that ``value`` has exactly the keys of ``layout`` (recursively); return the paths checked."""
    if isinstance(layout, dict):
        assert isinstance(value, dict), path
        assert list(value) == list(layout), f"{path}: {list(value)} != {list(layout)}"
        return [p for key in layout for p in _layout_matches(value[key], layout[key], f"{path}.{key}")] + [path]
    if isinstance(layout, list):
        assert isinstance(value, list) and value, path
        return [p for i, item in enumerate(value) for p in _layout_matches(item, layout[0], f"{path}[{i}]")]
    assert isinstance(layout, str) and layout, path  # a description
    return [path]


@pytest.mark.parametrize("args", [F64, NEVER], ids=["exact", "never"])
def test_json_keys_are_the_documented_layout(args):
    """Item 10 of issue 16: the docs' JSON layout is generated from JSON_LAYOUT; a real report has exactly its keys."""
    checked = _layout_matches(as_json(cached(*args)), report_module.JSON_LAYOUT)
    assert "report.phases[1].exact.structured_fallback_reason" in checked
    assert "report.seconds.warmup" in checked and "report.last_train_loss" in checked


def test_unsupported_module_falls_back_to_one_hot_hvps():
    """A custom module: the fast engine says why it does not apply, the generic path is exact."""
    r = as_json(cli("report", "--json", "--model", "tests.test_cli:custom_module", "--steps", "1", "--dtype",
                    "float64", "--num-samples", "4", "--method", "hutch++"))
    init = r["phases"][0]
    assert init["exact"]["engine"] == "generic" and "Cube" in init["exact"]["structured_fallback_reason"]
    ref = hessian_trace_reference(custom_module)
    assert init["exact_trace"] == pytest.approx(float(sum(d.sum() for d in ref.values())), rel=1e-10)
    assert list(init["per_layer_trace"]) == ["0 (Cube)", "1 (Linear)"]
    assert init["stochastic_trace"]["method"] == "hutch++" and init["stochastic_trace"]["matvecs"] == 4


def test_fallback_line_is_plain_words_with_details_in_json_and_log():
    """Item 8: no engine= jargon in the text; the engine's own reason in --json and in the -v log."""
    args = ("report", "--model", "tests.test_cli:layer_norm", "--steps", "1", "--num-samples", "2")
    text = cli(*args)
    assert text.rc == 0, text.err
    line = next(l for l in text.out.splitlines() if "exact curvature" in l)
    assert line.strip() == ("exact curvature: Hessian-vector products, one per parameter "
                            "(the fast engine does not support GroupNorm at layer 1)")
    assert "engine=" not in text.out and "structured" not in text.out
    r = as_json(cli(*args, "--json"))
    assert "module '1' (GroupNorm) is not supported" in r["phases"][0]["exact"]["structured_fallback_reason"]
    verbose = cli(*args, "-v")
    assert "(GroupNorm) is not supported" in verbose.err and "INFO" in verbose.err
    assert text.err == ""  # without -v, the log stays quiet


def test_skipped_exact_line_says_why_in_plain_words():
    run = cli("report", "--model", "tests.test_cli:layer_norm", "--steps", "1", "--num-samples", "2",
              "--exact-limit", "5")
    assert ("exact curvature skipped: 34 parameters > --exact-limit 5 and the fast engine does not support "
            "GroupNorm at layer 1 (--exact always forces it)") in run.out


def test_estimator_options_are_checked_up_front():
    run = cli("report", "--model", TINY, "--method", "xtrace", "--num-samples", "5")
    assert run.rc == 2 and run.out == ""
    assert "--method xtrace --num-samples 5" in run.err and "even" in run.err
    assert len(run.err.strip().splitlines()) == 1


def test_human_table_columns_fit_their_content():
    """Item 4: every column is as wide as its widest cell, so wide values never run together."""
    run = cached(*TABLE)
    assert run.rc == 0, run.err
    for text in ["26 parameters", "loss", "Hessian trace (exact)", "95% interval", "matvecs",
                 "per-layer trace", "0 (Linear)", "2 (Linear)", "negative entries", "wall time",
                 "after 2 steps", "exact curvature skipped: 26 parameters > --exact-limit 10 (--engine generic; --exact always forces it)"]:
        assert text in run.out, text
    table = run.out.split("\n\n", 1)[1].splitlines()
    data_rows = [l for l in table if re.search(r"\S\s{2,}\S", l)]  # label + cells (headings have no gap)
    assert len(data_rows) > 10 and len({len(l) for l in data_rows}) == 1, table  # right-aligned to one edge
    interval = next(l for l in table if "95% interval" in l)
    assert re.search(r"\]\s{2,}\[", interval), interval
    assert run.err == ""  # not a terminal: no progress bars


def test_format_table_sizes_columns():
    wide = format_table([("", ["init", "after 200 steps"]), ("95% interval", ["[103, 152.7]", "[9.909e-04, 0.001038]"]),
                         ("heading", None), ("  x", ["1", "2"])])
    lines = wide.splitlines()
    assert lines[1] == "95% interval  [103, 152.7]  [9.909e-04, 0.001038]"
    assert lines[2] == "heading" and lines[3] == "  x                      1                      2"


# ---------------------------------------------------------------------------
# errors and exit statuses

ERRORS = [
    (["--model", "tests.test_cli"], "expects 'path/to/file.py:factory' or 'pkg.module:factory'"),
    (["--model", "tests.no_such_module:f"], "no module 'tests.no_such_module' on the Python path"),
    (["--model", "tests.test_cli:no_such_factory"], "has no attribute 'no_such_factory'"),
    (["--model", "tests.test_cli:tiny_problm"], "did you mean 'tiny_problem'?"),
    (["--model", "tests.test_cli:not_callable"], "expected a callable factory, got int"),
    (["--model", "tests.test_cli:returns_pair"], "must return a tuple (model, loss_fn, data), got a tuple of length 2"),
    (["--model", "tests.test_cli:returns_bad_model"], "model of type str; expected a torch.nn.Module"),
    (["--model", "tests.test_cli:returns_bad_data"], "data of type int; expected a batch (inputs, targets)"),
    (["--model", "tests.test_cli:returns_bad_batch"], "batch 1 of data is a str"),
    (["--model", "tests.test_cli:empty_batch"], "batch 0 has no examples (inputs of shape (0, 3))"),
    (["--model", "tests.test_cli:dict_inputs"], "data (inputs, targets) whose inputs are a dict; expected a tensor"),
    (["--model", "tests.test_cli:nonscalar_loss"], "shape (10,); expected a scalar (0-dim) loss"),
    (["--model", "tests.test_cli:raises"], "the factory raised RuntimeError: dataset not found"),
    (["--model", TINY, "--device", "nonsense"], "unknown device 'nonsense'"),
    (["--model", "tests.test_cli:wrong_shapes"], "computing loss_fn(model(inputs), targets) failed: RuntimeError"),
    (["--model", "no/such/file.py:make"], "no file 'no/such/file.py'"),
]


@pytest.mark.parametrize("args,message", ERRORS, ids=[e[1][:30] for e in ERRORS])
def test_errors_are_one_line_with_status_2(args, message):
    run = cli("report", "--steps", "1", *args)
    assert run.rc == 2, run.err
    assert run.out == ""
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("secorder: error: --"), run.err
    assert message in lines[0]


BAD_OPTIONS = [
    ("--lr", "-1"), ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "fast"),
    ("--steps", "-1"), ("--steps", "2.5"), ("--num-samples", "0"), ("--chunk-size", "0"), ("--exact-limit", "-3"),
    ("--max-batches", "0"), ("--seed", "-1"), ("--seed", str(2**64)), ("--method", "nope"),
    ("--exact", "sometimes"), ("--dtype", "float16"), ("--engine", "fast"),
]


@pytest.mark.parametrize("option,value", BAD_OPTIONS, ids=[f"{o} {v}" for o, v in BAD_OPTIONS])
def test_bad_option_values_name_the_option_with_status_2(option, value):
    """Item 5: argparse's usage of `report`, then one error line naming the option."""
    run = cli("report", option, value)
    assert run.rc == 2 and run.out == ""
    lines = run.err.strip().splitlines()
    assert lines[0].startswith("usage: secorder report")
    assert lines[-1].startswith(f"secorder report: error: argument {option}: "), lines[-1]
    assert "Traceback" not in run.err


def test_unknown_option_shows_the_report_usage():
    for argv in (["report", "--bogus-flag"], ["--bogus-flag"]):  # the second: report is the default command
        run = cli(*argv)
        assert run.rc == 2
        lines = run.err.strip().splitlines()
        assert lines[0].startswith("usage: secorder report") and "--num-samples" in run.err
        assert lines[-1] == "secorder report: error: unrecognized arguments: --bogus-flag"


def test_factory_that_does_not_import_is_a_usage_error(tmp_path, monkeypatch):
    """Item 5: a syntax error or a missing dependency in the factory's module: exit 2, one line naming --model."""
    (tmp_path / "broken.py").write_text("def make(:\n    pass\n")
    (tmp_path / "needs_dep.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for target, message in [
        ("broken.py:make", "running 'broken.py' failed: SyntaxError"),
        ("broken:make", "importing 'broken' failed: SyntaxError"),
        ("needs_dep:make", "importing 'needs_dep' failed: ModuleNotFoundError: No module named 'no_such_dependency_xyz'"),
    ]:
        run = cli("report", "--model", target)
        assert run.rc == 2 and len(run.err.strip().splitlines()) == 1, run.err
        assert run.err.startswith(f"secorder: error: --model {target}: ") and message in run.err, run.err


def test_other_failures_exit_1_in_one_line(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("out of\nmemory")

    monkeypatch.setattr(report_module, "_train", boom)
    run = cli("report", "--model", TINY, "--steps", "1", "--num-samples", "2")
    assert run.rc == 1 and run.out == ""
    assert run.err.strip() == "secorder: error: RuntimeError: out of memory (run with --debug for the traceback)"


def test_debug_raises_with_the_traceback():
    with pytest.raises(UsageError, match=r"shape \(10,\)"):
        cli("report", "--model", "tests.test_cli:nonscalar_loss", "--debug")


def test_report_is_the_default_command():
    run = cli("--model", "tests.test_cli:returns_pair")
    assert run.rc == 2 and "must return a tuple (model, loss_fn, data)" in run.err


def test_help_and_version_return_0():
    help_run = cli("--help")
    assert help_run.rc == 0 and "report" in help_run.out and "COMMAND" in help_run.out
    report_help = cli("report", "--help")
    assert report_help.rc == 0 and "--model FILE.py:FACTORY" in report_help.out and "--json" in report_help.out
    version = cli("--version")
    assert version.rc == 0 and version.out.startswith("secorder ")


# ---------------------------------------------------------------------------
# factories given as files (item 3)


def test_model_as_a_file_path(tmp_path, monkeypatch):
    """path/to/file.py:factory, ./file.py:factory and file.py:factory all load the file; its folder is importable."""
    (tmp_path / "helpers_for_mycnn.py").write_text("import torch\nWIDTH = 5\n")
    (tmp_path / "mycnn.py").write_text(
        "import torch, torch.nn.functional as F\n"
        "from helpers_for_mycnn import WIDTH\n"
        "def make():\n"
        "    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Flatten(),\n"
        "                                torch.nn.Linear(2 * 3 * 3, WIDTH))\n"
        "    return model, F.cross_entropy, (torch.randn(4, 1, 5, 5), torch.randint(0, WIDTH, (4,)))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the loader adds the file's folder
    for target in (f"{tmp_path / 'mycnn.py'}:make", "./mycnn.py:make", "mycnn.py:make"):
        r = as_json(cli("report", "--json", "--model", target, "--steps", "1", "--num-samples", "2"))
        assert r["model"] == target and r["num_params"] == 2 * 9 + 2 + 18 * 5 + 5
        assert r["exact"]["engine"] == "structured"
    assert "mycnn" not in sys.modules  # loaded under its own name, never shadowing a module called mycnn


def test_model_hints_when_nothing_resolves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=r"no module 'mycnn' on the Python path .*pass a file as path/to/file.py:make"):
        load_factory("mycnn:make")
    with pytest.raises(UsageError, match=r"no file 'mycnn.py' \(looked for .*mycnn.py\)"):
        load_factory("mycnn.py:make")
    (tmp_path / "folder.py").mkdir()
    with pytest.raises(UsageError, match="is a folder"):
        load_factory("folder.py:make")
    with pytest.raises(UsageError, match="expects 'path/to/file.py:factory'"):
        load_factory("mycnn.py:")


# ---------------------------------------------------------------------------
# divergence (item 6), progress (item 7), warm-up (item 12)


def test_diverged_loss_is_null_in_json_with_a_warning():
    args = ("report", "--model", "tests.test_cli:diverges", "--steps", "30", "--lr", "100", "--num-samples", "2")
    run = cli(*args, "--json")
    r = as_json(run)  # parses as strict JSON
    assert "NaN" not in run.out and "Infinity" not in run.out
    trained = r["phases"][1]
    assert trained["loss"] is None and r["last_train_loss"] is None
    assert any("training diverged" in w and "--lr 100" in w for w in r["warnings"]), r["warnings"]
    assert any(w.startswith("not finite, written as null: ") and "phases[1].loss" in w for w in r["warnings"])
    assert "secorder: warning: the loss is nan after 30 steps" in run.err  # also on stderr, for a person
    text = cli(*args)
    assert text.rc == 0
    assert "  warning: the loss is nan after 30 steps: training diverged (--lr 100); try a smaller --lr" in text.out


def test_rising_loss_is_a_warning():
    r = as_json(cli("report", "--json", "--model", TINY, "--steps", "3", "--lr", "30", "--num-samples", "2"))
    init, trained = r["phases"]
    assert trained["loss"] > init["loss"]
    assert any(w.startswith("the loss rose from") for w in r["warnings"]), r["warnings"]


class _Recorder:
    """Stands in for output.Progress: records every bar and its updates."""

    bars = []

    def __init__(self, total, desc, enabled, unit="it"):
        self.total, self.desc, self.updates = total, desc, []
        _Recorder.bars.append(self)

    def update(self, n=1):
        self.updates.append(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    @classmethod
    def over(cls, iterable, total, desc, enabled):
        with cls(total, desc, enabled) as bar:
            for item in iterable:
                yield item
                bar.update()


def test_generic_exact_progress_advances_per_chunk_of_columns(monkeypatch):
    """Item 7: the one-hot bar counts columns, one update per batched product, not one per parameter tensor."""
    monkeypatch.setattr(report_module, "Progress", _Recorder)
    _Recorder.bars = []
    run = cli("report", "--model", "tests.test_cli:wide_layer", "--engine", "generic", "--steps", "1",
              "--num-samples", "2")
    assert run.rc == 0, run.err
    bars = [b for b in _Recorder.bars if b.desc.startswith("exact diagonal (one-hot")]
    assert len(bars) == 2  # one per phase
    n = 3 * 300 + 300 + 300 * 2 + 2
    for bar in bars:
        assert bar.total == n and sum(bar.updates) == n
        assert max(bar.updates) <= 160 and len(bar.updates) > 4  # the 900-entry weight alone is 6 chunks


def test_progress_bars_on_a_terminal(monkeypatch):
    """With stderr a terminal, tqdm bars appear there; the report itself still goes to stdout."""

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out, err = io.StringIO(), Terminal()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["report", "--model", TINY, "--steps", "5", "--num-samples", "3", "--engine", "generic"])
    assert rc == 0
    for desc in ("exact diagonal (one-hot HVPs)", "training"):
        assert desc in err.getvalue(), err.getvalue()
    assert "Hessian trace" in out.getvalue() and "Hessian trace" not in err.getvalue()
    out, err = io.StringIO(), Terminal()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["report", "--model", TINY, "--steps", "5", "--num-samples", "3", "--no-progress"]) == 0
    assert err.getvalue() == ""


def test_warm_up_runs_before_anything_is_timed(monkeypatch):
    """Item 12: torch.func's one-time set-up is paid outside the timed parts and reported apart."""
    calls = []
    warm, measure = report_module._warm_up, report_module._measure
    monkeypatch.setattr(report_module, "_warm_up", lambda *a: (calls.append("warm-up"), warm(*a))[1])
    monkeypatch.setattr(report_module, "_measure", lambda *a: (calls.append("measure"), measure(*a))[1])
    run = cli("report", "--model", TINY, "--steps", "1", "--num-samples", "2")
    assert calls == ["warm-up", "measure", "measure"]
    assert re.search(r"wall time \(s\), after a one-time torch.func warm-up of \d+\.\d\d s", run.out), run.out


def test_method_choices_come_from_the_estimator_registry():
    from secorder.estimators import registry

    choices = next(a for a in build_parser().commands["report"]._actions if a.dest == "method").choices
    assert set(choices) == set(registry.names("trace", stochastic_only=True)) - {"xnystrace"}  # PSD only
    assert {"hutchinson", "hutch++", "xtrace"} <= set(choices)


@pytest.mark.parametrize("method", report_module.METHODS)
def test_every_method_runs(method):
    r = as_json(cli("report", "--json", "--model", TINY, "--steps", "0", "--method", method, "--num-samples", "8",
                    "--exact", "never"))
    assert r["phases"][0]["stochastic_trace"]["method"] == method
    assert r["phases"][0]["stochastic_trace"]["matvecs"] == 8


# ---------------------------------------------------------------------------
# the two ways to launch it, in real processes


def _launch(cmd):
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def launched():
    exe = shutil.which("secorder")
    forced = ["--exact", "always", "--exact-limit", "10", "--engine", "generic"]
    commands = {"python -m": [sys.executable, "-m", "secorder", "report", "--json", "--model", TINY, "--steps", "1",
                              "--num-samples", "2"]}
    if exe is not None:
        commands["script"] = [exe, "report", "--json", "--model", TINY, "--steps", "0", "--num-samples", "2", *forced]
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_launch, cmd) for name, cmd in commands.items()}
        return {name: fut.result() for name, fut in futures.items()}


def test_python_dash_m(launched):
    proc = launched["python -m"]
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout, parse_constant=_no_nan)["num_params"] == 26


def test_console_script(launched):
    from importlib.metadata import entry_points

    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("secorder") == "secorder.cli:main"
    if "script" not in launched:
        pytest.skip("the secorder script is not on PATH (package not installed with pip)")
    proc = launched["script"]
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["num_params"] == 26
    # --exact always overrides the limit
    assert r["exact"] == {"mode": "always", "limit": 10, "computed": True, "engine": "generic"}
    assert r["phases"][0]["exact_trace"] is not None
    assert r["last_train_loss"] is None and r["warnings"] == []  # no steps: nothing to warn about

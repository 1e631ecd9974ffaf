"""Every Python code block of the docs runs (issue 28, item 9).

``tests/test_docs.py`` runs the pages' ``>>>`` examples with ``doctest``. The
``.. code-block:: python`` blocks written as plain code (no ``>>>``) are run here,
in page order, in one namespace per page. Many of them are fragments that use
names the page's prose introduces (``model``, ``f``, ``params``, a Hugging Face
``config``); :data:`SETUP` defines those names, small, before the page's first
block, and :data:`BEFORE` before one block where the page switches to another
model. A block that cannot run in one process (``torchrun``) is listed in
:data:`NOT_RUN` with the reason, and is still compiled.

A new block runs with no edit here when it defines its own names; otherwise the
test fails with the block's location and error, and the missing setup goes here.
"""

import os
import pathlib
import re
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts and "_generated" not in p.parts)

_SMALL_MODEL = """
import torch, secorder as so
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
f = so.functional_loss(model, nn.functional.cross_entropy)
params = so.params_dict(model)
x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
inputs, targets = x, y
v = {k: torch.randn_like(t) for k, t in params.items()}
"""

_TRANSFORMERS = """
import torch, transformers, secorder as so
from torch import nn
torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=1, n_head=2, n_inner=32,
                                 bos_token_id=0, eos_token_id=0, use_cache=False)
ids = torch.randint(0, 32, (2, 8))
mask = torch.ones_like(ids)
loader = [{"input_ids": ids[:1], "attention_mask": mask[:1], "labels": ids[:1]},
          {"input_ids": ids[1:], "attention_mask": mask[1:], "labels": ids[1:]}]
"""

_VIT = """
config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32, num_labels=3)
images, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
v = {k: torch.randn_like(t) for k, t in so.params_dict(transformers.ViTForImageClassification(config)).items()}
"""

#: page -> code run before its first block.
SETUP = {
    "composites.rst": """
import types, torch, secorder as so
model = lambda **batch: types.SimpleNamespace(loss=(batch["x"] ** 3).sum())
batch = {"x": torch.ones(3)}
""",
    "structured.rst": _SMALL_MODEL + """
stacked_params = {k: torch.stack([t, 2 * t]) for k, t in params.items()}
""",
    "solve.rst": _SMALL_MODEL + """
train_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=3)
""",
    "huggingface.rst": _TRANSFORMERS,
}

#: (page, a line of the block) -> code run just before that block.
BEFORE = {
    ("huggingface.rst", "vit = transformers.ViTForImageClassification(config).eval()"): _VIT + """
gpt2 = (f, params, inputs, targets)
""",
    ("huggingface.rst", 'batches = [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in loader]'): """
f, params, inputs, targets = gpt2
""",
    ("huggingface.rst", "f = so.functional_loss(vit, nn.CrossEntropyLoss())"): """
params = so.params_dict(vit)
""",
    ("huggingface.rst", "per_example = torch.func.vmap("): """
f, params, inputs, targets = gpt2
""",
    ("huggingface.rst", "with so.slow_path.settings(progress=True):"): """
slow_model = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Linear(8, 3))  # no structured rule
saved = (f, params, inputs, targets)
f, params = so.functional_loss(slow_model, nn.CrossEntropyLoss()), so.params_dict(slow_model)
inputs, targets = torch.randn(6, 4), torch.randint(0, 3, (6,))
""",
}

#: (page, a line of the block) -> code run just after that block.
AFTER = {
    ("huggingface.rst", "with so.slow_path.settings(progress=True):"): """
f, params, inputs, targets = saved
""",
}

#: (page, a line of the block) -> why it does not run here (it is compiled all the same).
NOT_RUN = {
    ("datasets.rst", 'dist.init_process_group("gloo")'): "a torchrun script: one process per rank",
    ("distributed.rst", 'dist.init_process_group("gloo")'): "a torchrun script: one process per rank",
    ("solve.rst", "from laplace import Laplace"): "needs laplace-torch (tests/test_laplace_integration.py runs it)",
}


def python_blocks(text):
    """``[(line, source)]`` of the page's ``.. code-block:: python`` blocks without ``>>>`` prompts."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        match = re.match(r"^(\s*)\.\. code-block:: python\s*$", lines[i])
        if not match:
            i += 1
            continue
        indent, j = len(match.group(1)), i + 1
        while j < len(lines) and lines[j].strip().startswith(":"):  # the directive's options
            j += 1
        body = []
        while j < len(lines) and (not lines[j].strip() or len(lines[j]) - len(lines[j].lstrip()) > indent):
            body.append(lines[j])
            j += 1
        source = textwrap.dedent("\n".join(body)).strip("\n")
        if ">>>" not in source:  # doctest runs those (tests/test_docs.py)
            out.append((i + 1, source))
        i = j
    return out


def _match(table, page, source):
    return next((value for (name, line), value in table.items()
                 if name == page and line in source), None)


PAGES_WITH_BLOCKS = [p for p in PAGES if python_blocks(p.read_text(encoding="utf-8"))]


def test_blocks_are_found():
    names = {p.relative_to(DOCS).as_posix() for p in PAGES_WITH_BLOCKS}
    assert {"structured.rst", "huggingface.rst", "transformers.rst", "cli.rst"} <= names
    assert python_blocks(".. code-block:: python\n   :caption: x\n\n   a = 1\n\n   b = 2\ntext\n") == [(1, "a = 1\n\nb = 2")]


@pytest.mark.parametrize("page", PAGES_WITH_BLOCKS, ids=[p.relative_to(DOCS).as_posix() for p in PAGES_WITH_BLOCKS])
def test_page_code_blocks_run(page, tmp_path, monkeypatch):
    name = page.relative_to(DOCS).as_posix()
    if name in ("huggingface.rst",):
        pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    namespace = {"__name__": f"docs.{name}"}
    exec(compile(SETUP.get(name, ""), f"SETUP[{name!r}]", "exec"), namespace)
    for line, source in python_blocks(page.read_text(encoding="utf-8")):
        code = compile(source, f"docs/{name}:{line}", "exec")
        if _match(NOT_RUN, name, source) is not None:
            continue
        before = _match(BEFORE, name, source)
        if before is not None:
            exec(compile(before, f"BEFORE docs/{name}:{line}", "exec"), namespace)
        try:
            exec(code, namespace)
        except Exception as exc:
            raise AssertionError(f"docs/{name}:{line}: the code block raised {type(exc).__name__}: {exc}") from exc
        after = _match(AFTER, name, source)
        if after is not None:
            exec(compile(after, f"AFTER docs/{name}:{line}", "exec"), namespace)


def test_not_run_blocks_exist():
    """Every entry of NOT_RUN / BEFORE names a block that is still on its page (no stale exemptions)."""
    for table in (NOT_RUN, BEFORE, AFTER):
        for page, line in table:
            sources = [s for _, s in python_blocks((DOCS / page).read_text(encoding="utf-8"))]
            assert any(line in s for s in sources), (page, line)


# ---------------------------------------------------------------------------
# the CLI page's sample outputs come from runs during the build


def _from_code():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_from_code", DOCS / "_from_code.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_page_samples_are_generated():
    text = (DOCS / "cli.rst").read_text(encoding="utf-8")
    for part in ("cli_report_sample", "cli_fallback_sample", "cli_usage_error_sample", "cli_factory_error_sample"):
        assert f".. include:: _generated/{part}.part.rst" in text, part
    assert "batch(es)" not in text and "LayerNorm" not in text  # no hand-copied output left to drift


def test_cli_fallback_and_error_samples(monkeypatch):
    """The fallback sample's model really falls back (and says why); the error samples are one line each."""
    module = _from_code()
    monkeypatch.setitem(__import__("sys").modules, "_from_code", module)
    rc, out, err = module._run_cli(["report", "--no-progress", "--model", "_from_code:fallback_problem", "--steps",
                                    "0", "--num-samples", "2"])
    assert rc == 0, err
    assert "exact curvature: Hessian-vector products, one per parameter (the fast engine does not support Scale at " \
           "layer 1)" in out
    rc, out, err = module._run_cli(["report", "--model", "_from_code:not_scalar_problem"])
    assert rc == 2 and "expected a scalar (0-dim) loss" in err and len(err.strip().splitlines()) == 1

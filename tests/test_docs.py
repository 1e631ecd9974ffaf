"""The documentation cannot drift from the code: its examples run, and the site builds without a warning."""

import doctest
import html
import importlib.util
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.rst") if "_build" not in p.parts and "_generated" not in p.parts)


def test_pages_found():
    names = {p.relative_to(DOCS).as_posix() for p in PAGES}
    assert {"index.rst", "installation.rst", "quickstart.rst", "estimators.rst", "composition.rst", "cli.rst",
            "api.rst", "benchmarks.rst", "examples.rst", "migration/index.rst", "migration/hessian_trace.rst",
            "migration/hessian_diagonal.rst", "migration/hvp.rst"} <= names


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_page_examples_run(page):
    result = doctest.testfile(str(page), module_relative=False, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {page.name}"


def test_migration_pages_keep_the_reference_sections():
    """The legacy reference page's sections, in its order, on each migrated page."""
    text = (DOCS / "migration" / "hessian_trace.rst").read_text()
    headings = ["Hessian Trace Module", "Hessian Trace\n", "Model Hessian Trace", "Trace Estimation Methods", "Notes"]
    positions = [text.index(h) for h in headings]
    assert positions == sorted(positions)
    for page in ["hessian_diagonal.rst", "hvp.rst"]:
        body = (DOCS / "migration" / page).read_text()
        assert "Example\n~~~~~~~" in body and "Notes\n-----" in body and "Estimation Methods" in body


def _load(name):
    spec = importlib.util.spec_from_file_location(f"docs{name}", DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _readme_module():
    return _load("_readme")


README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_is_short():
    """Issue 28, item 4: what a visitor needs; the tables and long sections are in docs/tables.md, on the site."""
    assert len(README.splitlines()) <= 300
    assert len(_five_lines().splitlines()) <= 16  # four lines of set-up, five calls and their outputs
    headings = list(_readme_module().readme_sections(README))
    assert headings == ["In five lines", "What it does", "Command line", "Documentation"], headings


def test_readme_tables_convert():
    module = _readme_module()
    assert doctest.testmod(module).failed == 0
    readme = "# t\n\n## Benchmarks: speed\n\nratio `x`\n\n| a | b |\n|---|--:|\n| 1 | 2 |\n\n## Other\n\nno\n"
    sections = module.readme_sections(readme)
    assert list(sections) == ["Benchmarks: speed", "Other"]
    rst = module.section_body_to_rst(sections["Benchmarks: speed"])
    assert "Benchmarks" not in rst  # the page gives the heading
    assert "ratio ``x``" in rst and "   * - 1\n     - 2" in rst
    assert module.section_tables(sections["Benchmarks: speed"]) == [[["a", "b"], ["1", "2"]]]


def test_generated_parts_doctests():
    assert doctest.testmod(_load("_from_code")).failed == 0


# ---------------------------------------------------------------------------
# the README's first commands and its five lines


def _fenced_blocks(text, language):
    return re.findall(rf"(?ms)^```{language}\n(.*?)^```", text)


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_command():
    """The README opens with the main job's command, then the test command; .ci/run runs the latter verbatim."""
    intro = README.split("\n## ", 1)[0]
    commands = [block.strip() for block in _fenced_blocks(intro, "bash")]
    assert len(commands) == 2 and all("\n" not in c for c in commands), commands
    main_job, tests = commands
    assert main_job.startswith("pip install") and main_job.endswith("secorder report")
    assert tests.startswith("pip install") and tests.endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert tests in ci.splitlines()
    assert "torch==" not in tests + main_job  # the pin is CI's (.ci/run), users install their own torch
    assert "pytorch.org" in intro


def _five_lines():
    (block,) = [b for b in _fenced_blocks(README.split("\n## In five lines", 1)[1].split("\n## ", 1)[0], "pycon")]
    return block


def test_readme_five_lines_run_as_shown():
    """Item 1 of issue 16: the README's calls run and print what the README says they print."""
    test = doctest.DocTestParser().get_doctest(_five_lines(), {}, "README.md: In five lines", "README.md", 0)
    assert len(test.examples) == 9  # four lines of set-up, five calls
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    assert runner.summarize(verbose=False).failed == 0


def test_readme_five_lines_on_a_convolutional_model():
    """The same lines with a Conv -> Flatten -> Linear model, where the per-example batch of one is needed."""
    source = _five_lines()
    conv = "model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(3 * 3 * 3, 5))"
    source, n = re.subn(r"model = torch\.nn\.Sequential\(.*\)", conv, source)
    assert n == 1
    source, n = re.subn(r"x, y = torch\.randn\(64, 20\)", "x, y = torch.randn(64, 2, 5, 5)", source)
    assert n == 1
    examples = doctest.DocTestParser().get_examples(source)
    namespace, values = {}, []
    for example in examples:
        code = compile(example.source, "<README>", "single")
        hook = sys.displayhook
        sys.displayhook = values.append
        try:
            exec(code, namespace)
        finally:
            sys.displayhook = hook
    trace, diag_bias, hv_bias, mean, grad_bias = values
    assert trace.ndim == 0 and trace > 0
    assert diag_bias.shape == hv_bias.shape == grad_bias.shape == (5,)
    assert abs(float(mean) - float(trace)) <= 1e-4 * abs(float(trace))  # the mean of per-example traces is the trace
    import torch

    f, params, x, y = (namespace[k] for k in ("f", "params", "x", "y"))
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):  # why the README adds x[:, None]
        torch.func.vmap(namespace["so"].trace(f), in_dims=(None, 0, 0))(params, x, y)


def test_readme_reads_as_results_not_tasks():
    """Item 2: what was measured and what it means, not a list of targets."""
    assert not re.search(r"(?i)\bissue targets?\b|^targets?:|\breached:", README, re.MULTILINE)


# ---------------------------------------------------------------------------
# the built site


def _page_text(path):
    text = path.read_text(encoding="utf-8")
    start = text.find('<div class="body"')
    body = text[start:] if start >= 0 else text
    text = html.unescape(re.sub(r"<[^>]+>", " ", body))
    for smart, plain in (("\u2026", "..."), ("\u2019", "'"), ("\u2018", "'"), ("\u201c", '"'), ("\u201d", '"'),
                         ("\u2013", "--"), ("\u2014", "---")):  # Sphinx's smart quotes, undone
        text = text.replace(smart, plain)
    return re.sub(r"\s+", " ", text)


def _squeezed(text):
    """Without any whitespace: tags become spaces in the page text, so compare the rest."""
    return re.sub(r"\s+", "", text)


def _cell_text(cell):
    cell = re.sub(r"\*\*([^*]+)\*\*", r"\1", cell.replace("`", ""))
    return re.sub(r"\s+", " ", cell).strip()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built once with -W (every warning an error)."""
    if shutil.which("sphinx-build") is None and importlib.util.find_spec("sphinx") is None:
        pytest.skip("Sphinx is not installed (pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site") / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    return proc, out


@pytest.mark.slow
def test_sphinx_build_has_no_warnings(site):
    proc, out = site
    assert proc.returncode == 0, proc.stderr
    assert (out / "migration" / "hessian_trace.html").exists()


@pytest.mark.slow
def test_every_readme_table_is_on_the_site(site):
    """Item 2: each section with a table (README.md, docs/tables.md) is mapped in docs/_readme.py, and each of its
    rows is on a page (issue 28: the long sections moved from the README to docs/tables.md, still all on the site)."""
    proc, out = site
    assert proc.returncode == 0, proc.stderr
    module = _readme_module()
    pages = {p.relative_to(out).as_posix(): _page_text(p) for p in out.rglob("*.html")
             if "_modules" not in p.parts and p.name not in ("genindex.html", "search.html", "py-modindex.html")}
    squeezed = [_squeezed(text) for text in pages.values()]
    tables = 0
    for heading, section in module.all_sections(ROOT).items():
        found = module.section_tables(section)
        if not found:
            continue
        assert heading in module.SECTIONS, (
            f"section '## {heading}' has a table but is not on the site: add it to SECTIONS in docs/_readme.py")
        for table in found:
            tables += 1
            for row in table:
                cells = " | ".join(_cell_text(c) for c in row)
                assert any(_squeezed(cells.replace("|", "")) in text for text in squeezed), (
                    f"'## {heading}': row {cells!r} is on no page")
    assert tables >= 9  # features, layout, exact trace, structured, estimators (3), legacy (2)
    bench = pages["benchmarks.html"]
    for heading, (part, title) in module.SECTIONS.items():
        if title is not None:
            assert title in bench, title


@pytest.mark.slow
def test_cli_page_lists_every_json_key_and_option(site):
    """Item 10: the CLI page's options and JSON keys, of every command, are generated from the code."""
    from secorder.cli import build_parser
    from secorder.cli.main import command_modules

    proc, out = site
    assert proc.returncode == 0, proc.stderr
    text = _page_text(out / "cli.html")

    def keys(layout):
        for key, value in layout.items():
            yield key
            if isinstance(value, dict):
                yield from keys(value)
            elif isinstance(value, list):
                yield from keys(value[0])

    parsers = build_parser().commands
    for name, module in command_modules().items():
        assert f"usage: secorder {name}" in text, f"docs/cli.rst does not include the help of secorder {name}"
        for key in keys(getattr(module, "JSON_LAYOUT", {})):
            assert f" {key} :" in text, (name, key)
        for action in parsers[name]._actions:
            for option in action.option_strings:
                assert option in text, (name, option)


@pytest.mark.slow
def test_installation_page_lists_every_extra_from_pyproject(site):
    """Item 10: the extras and what they install come from pyproject.toml; each has a purpose written down."""
    module = _load("_from_code")
    found = module.extras(ROOT / "pyproject.toml")
    missing = set(found) - set(module.EXTRA_PURPOSES)
    assert not missing, f"describe the extras {sorted(missing)} in EXTRA_PURPOSES (docs/_from_code.py)"
    proc, out = site
    text = _page_text(out / "installation.html")
    for name, requirements in found.items():
        for requirement in requirements:
            assert requirement in text, (name, requirement)


@pytest.mark.slow
def test_api_reference_documents_each_public_object_once_under_its_public_name(site):
    """Issue 28, item 5: one page per area; ``so.trace`` is ``secorder.trace``, once, and never under its module."""
    import secorder

    proc, out = site
    assert proc.returncode == 0, proc.stderr
    ids = {}
    for page in out.rglob("*.html"):
        if "_modules" in page.parts:
            continue
        for anchor in re.findall(r'<dt class="sig sig-object py" id="([^"]+)"', page.read_text(encoding="utf-8")):
            ids.setdefault(anchor, []).append(page.relative_to(out).as_posix())
    for name in secorder.__all__:
        obj = getattr(secorder, name)
        if isinstance(obj, type(secorder)):  # so.tree, so.composites: modules
            continue
        assert ids.get(f"secorder.{name}") is not None and len(ids[f"secorder.{name}"]) == 1, (name, ids.get(
            f"secorder.{name}"))
        inner = f"{obj.__module__}.{obj.__qualname__}"
        assert inner == f"secorder.{name}" or inner not in ids, f"{name} is also documented as {inner}: {ids[inner]}"
    areas = {p.name for p in (out / "api").glob("*.html")}
    assert {"transforms.html", "curvatures.html", "estimators.html", "spectra.html", "datasets.html",
            "laplacian.html", "structured.html", "legacy.html"} <= areas


@pytest.mark.slow
def test_no_generated_page_is_huge(site):
    """Issue 28, item 5: the API reference was one 1.2 MB page; no page is over about 400 kB now."""
    proc, out = site
    sizes = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*.html") if "_modules" not in p.parts}
    big = {k: v for k, v in sizes.items() if v > 400_000 and k not in ("genindex.html",)}
    assert not big, big

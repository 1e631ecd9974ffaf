"""The documentation cannot drift from the code: its examples run, and the site builds without a warning."""

import doctest
import importlib.util
import pathlib
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


def _readme_module():
    spec = importlib.util.spec_from_file_location("docs_readme", DOCS / "_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_convert():
    module = _readme_module()
    assert doctest.testmod(module).failed == 0
    readme = "# t\n\n## Benchmarks: speed\n\nratio `x`\n\n| a | b |\n|---|--:|\n| 1 | 2 |\n\n## Other\n\nno\n"
    sections = module.readme_sections(readme, "benchmark")
    assert len(sections) == 1 and "Other" not in sections[0]
    rst = module.markdown_to_rst(sections[0])
    assert "Benchmarks: speed\n-----------------" in rst and "ratio ``x``" in rst and "   * - 1\n     - 2" in rst


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("sphinx-build") is None and importlib.util.find_spec("sphinx") is None,
                    reason="Sphinx is not installed (pip install -e '.[docs]')")
def test_sphinx_build_has_no_warnings(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "html" / "migration" / "hessian_trace.html").exists()

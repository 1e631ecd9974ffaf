"""The migration pages of the legacy modules keep 0.0.1's sections and document every public function.

(Their ``>>>`` examples run in ``tests/test_docs.py``.)
"""

import importlib
import pathlib
import re

import pytest

MIGRATION = pathlib.Path(__file__).resolve().parents[1] / "docs" / "migration"

# page -> (module, 0.0.1's headings in its order)
PAGES = {
    "gvp.rst": ("torch_secorder.core.gvp", [
        "Jacobian-Vector Product (GVP) Module", "JVP (Jacobian-Vector Product)", "VJP (Vector-Jacobian Product)",
        "Model JVP", "Model VJP", "Batch JVP", "Batch VJP", "Full Jacobian", "Notes"]),
    "utils.rst": ("torch_secorder.core.utils", [
        "Utility Functions", "Flatten Parameters", "Unflatten Parameters", "Get Parameter Shapes",
        "Get Parameters by Module Type", "Get Parameters by Name Pattern", "Notes"]),
    "per_layer_curvature.rst": ("torch_secorder.core.per_layer_curvature", [
        "Per-Layer Curvature Module", "Per-Layer Hessian Diagonal", "Per-Layer Fisher Diagonal",
        "Layer Curvature Statistics", "Notes"]),
    "fisher_diagonal.rst": ("torch_secorder.approximations.fisher_diagonal", [
        "Fisher Diagonal Module", "Empirical Fisher Diagonal", "Generalized Fisher Diagonal", "Notes"]),
    "fisher_trace.rst": ("torch_secorder.approximations.fisher_trace", [
        "Fisher Trace Module", "Empirical Fisher Trace", "Generalized Fisher Trace", "Notes"]),
    "gauss_newton.rst": ("torch_secorder.approximations.gauss_newton", [
        "Gauss-Newton Module", "Gauss-Newton Matrix Approximation", "Notes"]),
    "eigensolvers.rst": ("torch_secorder.analysis.eigensolvers", [
        "Eigensolvers", "Power Iteration", "Lanczos Algorithm", "Model Eigenvalues", "Notes"]),
    "landscape.rst": ("torch_secorder.analysis.landscape", [
        "Loss Landscape Visualization", "Compute 1D Loss Surface", "Compute 2D Loss Surface",
        "Create Random Direction", "Notes"]),
    "hvp.rst": ("torch_secorder.core.hvp", ["Hessian-Vector Product Module", "Notes"]),
}


def _headings(text):
    lines = text.splitlines()
    return [lines[i] for i in range(len(lines) - 1)
            if lines[i].strip() and re.fullmatch(r"([=\-~])\1+", lines[i + 1]) and len(lines[i + 1]) >= len(lines[i])]


@pytest.mark.parametrize("page", list(PAGES))
def test_page_keeps_sections_tables_and_documents_every_function(page):
    module_name, expected = PAGES[page]
    text = (MIGRATION / page).read_text()
    headings = _headings(text)
    positions = [headings.index(h) for h in expected]
    assert positions == sorted(positions), headings
    assert "Deliberate differences" in headings
    if page != "hvp.rst":
        assert "Old call, new call" in headings and ".. list-table::" in text
        assert headings.count("Example") >= len(expected) - 2
    module = importlib.import_module(module_name)
    public = [n for n in module.__all__ if n not in ("estimate_eigenvalues", "lanczos_iteration")]
    for name in public:
        assert f".. autofunction:: {name}\n" in text, name
    index = (MIGRATION / "index.rst").read_text()
    assert f"   {page[:-4]}\n" in index

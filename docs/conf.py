"""Sphinx configuration for the secorder documentation (``sphinx-build -W docs docs/_build``)."""

from __future__ import annotations

import os
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import secorder  # noqa: E402

from _from_code import write_code_parts  # noqa: E402
from _readme import write_readme_parts  # noqa: E402

project = "secorder"
author = "the secorder authors"
copyright = "2026, the secorder authors"
release = version = secorder.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
napoleon_google_docstring = True
napoleon_numpy_docstring = True
# "Fields:" lists the members of the result NamedTuples (secorder.results)
napoleon_custom_sections = [("Fields", "params_style")]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": False}
exclude_patterns = ["_build", "_generated", "design.md", "tables.md", "*.part.rst"]
templates_path: list = []
html_theme = "alabaster"
html_static_path: list = []
html_theme_options = {"description": "Second-order autodiff for PyTorch", "fixed_sidebar": True}

# Generated parts, included by the pages (never edited by hand, never committed):
# README.md's and docs/tables.md's sections with their tables (see _readme.py for how a section gets onto the
# site), the JSON keys of every command and the extras of pyproject.toml (_from_code.py).
_GENERATED = pathlib.Path(__file__).resolve().parent / "_generated"
write_readme_parts(ROOT, _GENERATED / "readme")
write_code_parts(ROOT, _GENERATED)

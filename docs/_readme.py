"""Markdown sections on the site: README.md's and docs/tables.md's, converted to reStructuredText at build time.

``docs/tables.md`` is where benchmark tables are recorded (the benchmark scripts
print Markdown tables, which go there with the command and the machine), with the
long reference sections; the README keeps what a visitor needs and its feature
table (:data:`SOURCES`). So that the site never drifts from them, ``conf.py`` calls
:func:`write_readme_parts`, which writes the body of every section named in
:data:`SECTIONS` to
``docs/_generated/readme/<part>.part.rst`` (its heading is left out: the page
gives its own), and ``docs/_generated/readme/benchmarks.part.rst``, every part
with a Benchmarks-page title, as a section of that title.

How a new README section gets onto the site:

1. Add one line to :data:`SECTIONS`: ``"<the ## heading>": ("<part>", "<title>")``.
   With a title it appears on the Benchmarks page as a section of that title,
   with nothing else to do; with ``None`` only where a page includes it.
2. To show it on the page that discusses it as well, include it there under a
   heading of that page:

   .. code-block:: rst

      Measured
      --------

      .. include:: _generated/readme/<part>.part.rst

3. ``tests/test_docs.py`` builds the site and fails if a section of either file with
   a table is not in :data:`SECTIONS` or if any of their tables is not on a built page.

Only the Markdown subset the README uses is converted: ``##``-``####``
headings (``###`` becomes a ``~`` underline, ``####`` a ``^`` one), pipe tables,
fenced code blocks (literal blocks), inline code, bold and links. A section whose
conversion would make docutils warn goes in verbatim, as a literal block (and
then its tables fail the test above, which looks for them as tables).
"""

from __future__ import annotations

import pathlib
import re
from typing import Dict, List, Optional, Tuple

_INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)]+)\)")
_TABLE_ROW = re.compile(r"^\s*\|")
_SEPARATOR = re.compile(r"\s*\|?[\s:|-]+\|?\s*")

#: The Markdown files whose ``## `` sections go on the site, relative to the repository root.
SOURCES = ("README.md", "docs/tables.md")

#: ``## `` heading (of README.md or docs/tables.md) -> (part name, its section title on the Benchmarks page or
#: ``None``).
SECTIONS: Dict[str, Tuple[str, Optional[str]]] = {
    "What it does": ("features", None),
    "Layout": ("layout", None),
    "Curvatures": ("curvatures", "Curvatures: GGN, Fisher and empirical Fisher"),
    "Benchmarks": ("exact-trace", "Exact Hessian trace, generic path"),
    "Structured exact engine": ("structured-engine", "Structured exact engine"),
    "Stochastic estimators": ("stochastic-estimators", "Stochastic estimators"),
    "Legacy torch_secorder API": ("legacy", "Legacy torch_secorder API"),
    "Spectra": ("spectra", "Spectra: top eigenvalues and densities"),
    "Laplacian": ("laplacian", "Laplacian: the forward Laplacian"),
    "Data sets": ("datasets", "Data sets: curvature of the whole training loss"),
}


def _code(text: str) -> str:
    r"""Markdown inline code as reStructuredText literals, escaped where a letter touches them.

    Example:
        >>> print(_code("a `Module`s and `x`"))
        a ``Module``\ s and ``x``
    """

    def literal(m: "re.Match[str]") -> str:
        before = "\\ " if m.start() > 0 and m.string[m.start() - 1].isalnum() else ""
        after = "\\ " if m.end() < len(m.string) and m.string[m.end()].isalnum() else ""
        return f"{before}``{m.group(1)}``{after}"

    return _INLINE_CODE.sub(literal, text)


def _inline(text: str) -> str:
    text = _LINK.sub(lambda m: f"`{m.group(1)} <{m.group(2)}>`__" if "://" in m.group(2) else m.group(1), text)
    text = _code(text)
    text = _BOLD.sub(lambda m: f"**{m.group(1)}**", text)
    return text.replace("|", "\\|")


def table_rows(lines: List[str]) -> List[List[str]]:
    """The cells of a Markdown pipe table, row by row, without the ``|---|`` separator line.

    Example:
        >>> table_rows(["| a | `b` |", "|---|--:|", "| 1 | 2 |"])
        [['a', '`b`'], ['1', '2']]
    """
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines
            if not _SEPARATOR.fullmatch(line)]


def _table(lines: List[str]) -> List[str]:
    rows = table_rows(lines)
    width = max(len(r) for r in rows)
    out = ["", ".. list-table::", "   :header-rows: 1", ""]
    for row in rows:
        row = row + [""] * (width - len(row))
        for i, cell in enumerate(row):
            cell = _code(cell) or " "
            cell = cell.replace("*", "\\*") if "``" not in cell else cell
            if re.match(r"([-+]|\d+[.)])(\s|$)", cell):  # "-" alone would start a bullet list, "1." a numbered one
                cell = "\\" + cell
            out.append(f"   {'* -' if i == 0 else '  -'} {cell}")
    out.append("")
    return out


def _special(line: str) -> bool:
    """A line that starts something other than a paragraph: a fence, a heading or a table row."""
    return line.startswith("```") or bool(re.match(r"^#{2,4}\s", line)) or bool(_TABLE_ROW.match(line))


def markdown_to_rst(text: str, level_chars: str = "-~^") -> str:
    """Convert the README's Markdown subset to reStructuredText (``##`` gets the first of ``level_chars``).

    Example:
        >>> print(markdown_to_rst("## Speed\\n\\n| a | b |\\n|---|---|\\n| `x` | 2 |\\n"))
        Speed
        -----
        <BLANKLINE>
        .. list-table::
           :header-rows: 1
        <BLANKLINE>
           * - a
             - b
           * - ``x``
             - 2
        <BLANKLINE>
    """
    out: List[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = re.match(r"^(#{2,4})\s+(.*)$", line)
        if line.startswith("```"):
            block = []
            i += 1
            while i < len(lines) and not lines[i].startswith("```"):
                block.append(lines[i])
                i += 1
            out += ["", "::", ""] + [f"   {b}" for b in block] + [""]
        elif heading:
            title = _code(heading.group(2).strip())
            char = level_chars[min(len(heading.group(1)) - 2, len(level_chars) - 1)]
            out += [title, char * max(len(title), 4), ""]
        elif _TABLE_ROW.match(line):
            block = []
            while i < len(lines) and _TABLE_ROW.match(lines[i]):
                block.append(lines[i])
                i += 1
            out += _table(block)
            continue
        elif line.strip():  # a paragraph: inline code may run over its lines
            block = []
            while i < len(lines) and lines[i].strip() and not _special(lines[i]):
                block.append(lines[i])
                i += 1
            out += _inline("\n".join(block)).split("\n")
            continue
        else:
            out.append("")
        i += 1
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out))  # at most one blank line in a row
    return text.strip() + "\n"


def readme_sections(readme: str) -> Dict[str, str]:
    """``{heading: section}`` for every ``## `` section of ``readme`` (the section text starts with its heading).

    Example:
        >>> sorted(readme_sections("# t\\n\\nintro\\n\\n## A\\n\\na\\n\\n## B `x`\\n\\nb\\n"))
        ['A', 'B `x`']
    """
    parts = re.split(r"(?m)^(?=## )", readme)
    return {p.splitlines()[0][3:].strip(): p for p in parts if p.startswith("## ")}


def section_tables(section: str) -> List[List[List[str]]]:
    """Every pipe table of a README section (outside code blocks), as :func:`table_rows`.

    Example:
        >>> section_tables("## S\\n\\n| a |\\n|---|\\n| 1 |\\n\\n```\\n| not | a table |\\n```\\n")
        [[['a'], ['1']]]
    """
    tables, block, fenced = [], [], False
    for line in section.splitlines() + [""]:
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and _TABLE_ROW.match(line):
            block.append(line)
        elif block:
            tables.append(table_rows(block))
            block = []
    return tables


def rst_problems(text: str) -> str:
    r"""Docutils' warnings for ``text`` (empty when it parses cleanly).

    Example:
        >>> rst_problems("Title\n=====\n\nfine\n")
        ''
        >>> "emphasis" in rst_problems("a *b c\n")
        True
    """
    import io

    from docutils.core import publish_doctree

    stream = io.StringIO()
    publish_doctree(text, settings_overrides={"report_level": 2, "halt_level": 5, "warning_stream": stream})
    return stream.getvalue()


def section_body_to_rst(section: str) -> str:
    r"""A README section's body (without its ``##`` heading) as reStructuredText; verbatim if conversion warns.

    Sub-headings become ``~`` (``###``) and ``^`` (``####``) sections, to sit under
    a page's ``-`` section.

    Example:
        >>> print(section_body_to_rst("## Odd\n\na *b c\n"))
        ::
        <BLANKLINE>
           a *b c
        <BLANKLINE>
        >>> print(section_body_to_rst("## Fine\n\n### Sub\n\ntext\n"))
        Sub
        ~~~~
        <BLANKLINE>
        text
        <BLANKLINE>
    """
    body = section.partition("\n")[2]
    rst = markdown_to_rst(body)
    if not rst_problems("Page\n====\n\nSection\n-------\n\n" + rst):
        return rst
    lines = [f"   {line}" if line.strip() else "" for line in body.strip("\n").splitlines()]
    return "\n".join(["::", "", *lines]) + "\n"


def _write(target: pathlib.Path, text: str) -> None:
    if not target.exists() or target.read_text(encoding="utf-8") != text:  # unchanged: no rebuild
        target.write_text(text, encoding="utf-8")


def all_sections(root: pathlib.Path) -> Dict[str, str]:
    """``{heading: section}`` of every file of :data:`SOURCES` under ``root`` (a heading may appear in one only)."""
    sections: Dict[str, str] = {}
    for name in SOURCES:
        for heading, section in readme_sections((root / name).read_text(encoding="utf-8")).items():
            if heading in sections:
                raise ValueError(f"the section '## {heading}' is in more than one of {SOURCES}")
            sections[heading] = section
    return sections


def write_readme_parts(root: pathlib.Path, out_dir: pathlib.Path) -> List[str]:
    """Write ``<part>.part.rst`` for every section of :data:`SECTIONS`, and ``benchmarks.part.rst``; returns the parts.

    ``root`` is the repository (the files of :data:`SOURCES` are read there). A
    heading in :data:`SECTIONS` that neither file has any more gives a part that
    says so (and the page shows it), rather than a broken build.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = all_sections(root)
    listing: List[str] = []
    written = []
    for heading, (part, title) in SECTIONS.items():
        if heading in sections:
            body = section_body_to_rst(sections[heading])
            # placeholders that a benchmark script has not filled in yet
            body = re.sub(r"(?m)^[A-Z][A-Z_]+_TABLE$", "*(not measured yet: run the script above)*", body)
        else:
            body = f"*(no section* ``## {heading}`` *in {' or '.join(SOURCES)} any more: update docs/_readme.py)*\n"
        _write(out_dir / f"{part}.part.rst", body)
        written.append(part)
        if title is not None:  # a section of the Benchmarks page, at the page's "-" level
            listing += [title, "-" * max(len(title), 4), "", f".. include:: /_generated/readme/{part}.part.rst", ""]
    _write(out_dir / "benchmarks.part.rst", "\n".join(listing) if listing else "No benchmark results yet.\n")
    return written

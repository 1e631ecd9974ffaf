"""Copy README.md's benchmark sections into the docs as reStructuredText (run by conf.py).

Only the small subset of Markdown that the README's benchmark sections use is
converted: ``##``/``###`` headings, pipe tables, inline code and plain
paragraphs. Fenced code blocks become literal blocks.
"""

from __future__ import annotations

import pathlib
import re
from typing import List

_INLINE_CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
_BOLD = re.compile(r"\*\*([^*]+)\*\*")
_LINK = re.compile(r"\[([^\]]+)\]\(([^)]+)\)")


def _inline(text: str) -> str:
    text = _LINK.sub(lambda m: f"`{m.group(1)} <{m.group(2)}>`__" if "://" in m.group(2) else m.group(1), text)
    text = _INLINE_CODE.sub(lambda m: f"``{m.group(1)}``", text)
    text = _BOLD.sub(lambda m: f"**{m.group(1)}**", text)
    return text.replace("|", "\\|") if not text.startswith("|") else text


def _cells(line: str) -> List[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: List[str]) -> List[str]:
    rows = [_cells(l) for l in lines if not re.fullmatch(r"\s*\|?[\s:|-]+\|?\s*", l)]
    width = max(len(r) for r in rows)
    out = ["", ".. list-table::", "   :header-rows: 1", ""]
    for row in rows:
        row = row + [""] * (width - len(row))
        for i, cell in enumerate(row):
            cell = _INLINE_CODE.sub(lambda m: f"``{m.group(1)}``", cell) or " "
            cell = cell.replace("*", "\\*") if "``" not in cell else cell
            out.append(f"   {'* -' if i == 0 else '  -'} {cell}")
    out.append("")
    return out


def markdown_to_rst(text: str, level_chars: str = "-~^") -> str:
    """Convert the README's Markdown subset to reStructuredText.

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
            title = _INLINE_CODE.sub(lambda m: f"``{m.group(1)}``", heading.group(2).strip())
            char = level_chars[min(len(heading.group(1)) - 2, len(level_chars) - 1)]
            out += [title, char * max(len(title), 4), ""]
        elif line.lstrip().startswith("|"):
            block = []
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                block.append(lines[i])
                i += 1
            out += _table(block)
            continue
        else:
            out.append(_inline(line))
        i += 1
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(out))  # at most one blank line in a row
    return text.strip() + "\n"


def readme_sections(readme: str, keyword: str) -> List[str]:
    """The ``##`` sections of ``readme`` whose title contains ``keyword`` (case-insensitive), with their headings."""
    parts = re.split(r"(?m)^(?=## )", readme)
    return [p for p in parts if p.startswith("## ") and keyword.lower() in p.splitlines()[0].lower()]


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


def section_to_rst(section: str) -> str:
    r"""One README section as reStructuredText; verbatim (a literal block) if the conversion would warn.

    Example:
        >>> print(section_to_rst("## Odd\n\na *b c\n"))
        Odd
        ----
        <BLANKLINE>
        ::
        <BLANKLINE>
           a *b c
        <BLANKLINE>
    """
    rst = markdown_to_rst(section)
    probe = rst.replace(".. include::", "..")  # parse the converted text on its own
    if not rst_problems("Page\n====\n\n" + probe):
        return rst
    title, _, body = section.partition("\n")
    heading = title.lstrip("#").strip()
    lines = [f"   {line}" if line.strip() else "" for line in body.strip("\n").splitlines()]
    return "\n".join([heading, "-" * max(len(heading), 4), "", "::", "", *lines]) + "\n"


def write_readme_sections(readme_path: pathlib.Path, out_dir: pathlib.Path) -> None:
    """Write ``benchmarks.part.rst``: every README section about benchmarks, converted."""
    out_dir.mkdir(exist_ok=True)
    readme = readme_path.read_text(encoding="utf-8")
    sections = readme_sections(readme, "benchmark")
    body = "\n".join(section_to_rst(s) for s in sections) if sections else "No benchmark results yet.\n"
    # placeholders that the benchmark scripts have not filled in yet
    body = re.sub(r"(?m)^[A-Z][A-Z_]+_TABLE$", "*(not measured yet: run the script above)*", body)
    target = out_dir / "benchmarks.part.rst"
    if not target.exists() or target.read_text(encoding="utf-8") != body:
        target.write_text(body, encoding="utf-8")

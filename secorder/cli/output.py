"""What commands print: numbers, column-sized text tables, JSON without NaN, progress bars, wall times.

Example:
    >>> print(format_table([("", ["init", "after 9 steps"]), ("loss", ["2.31", "nan"]),
    ...                     ("95% interval", ["[103, 152.7]", "[9.909e-04, 0.001038]"])]))
                          init          after 9 steps
    loss                  2.31                    nan
    95% interval  [103, 152.7]  [9.909e-04, 0.001038]
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable, List, Optional, Sequence, Tuple

import torch

from .. import progress as _progress

__all__ = ["fmt", "format_table", "jsonable", "Progress", "Clock"]

Row = Tuple[str, Optional[Sequence[str]]]


def fmt(x: Optional[float]) -> str:
    """A number in at most about 10 characters; ``-`` for ``None``.

    Example:
        >>> fmt(None), fmt(float("nan")), fmt(0.0), fmt(1234.5678), fmt(1.5e-7), fmt(-2e6)
        ('-', 'nan', '0', '1235', '1.500e-07', '-2.000e+06')
    """
    if x is None:
        return "-"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}" if 1e-3 <= abs(x) < 1e5 or x == 0 else f"{x:.3e}"


def format_table(rows: Sequence[Row], *, indent: int = 0, gap: int = 2) -> str:
    """Rows ``(label, cells)`` as text, every column as wide as its widest cell.

    Labels are left-aligned, cells right-aligned; a row with ``cells=None`` is a
    heading line that spans the table and does not widen the label column.
    """
    label_width = max((len(label) for label, cells in rows if cells is not None), default=0)
    columns = max((len(cells) for _, cells in rows if cells is not None), default=0)
    widths = [max((len(cells[j]) for _, cells in rows if cells is not None and j < len(cells)), default=0)
              for j in range(columns)]
    pad, space = " " * indent, " " * gap
    lines = []
    for label, cells in rows:
        if cells is None:
            lines.append(pad + label)
            continue
        parts = [label.ljust(label_width)] + [c.rjust(w) for c, w in zip(cells, widths)]
        lines.append((pad + space.join(parts)).rstrip())
    return "\n".join(lines)


def _clean(obj: Any, path: str, bad: List[str]) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(path or "<root>")
        return None
    if isinstance(obj, dict):
        return {k: _clean(v, f"{path}.{k}" if path else str(k), bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, f"{path}[{i}]", bad) for i, v in enumerate(obj)]
    return obj


def jsonable(result: Any) -> Tuple[Any, List[str]]:
    """``result`` with every ``nan``/``inf`` replaced by ``None`` (JSON ``null``), and the paths of those values.

    Strict JSON (RFC 8259) has no NaN: ``json.dumps(..., allow_nan=False)`` of the
    first element always succeeds.

    Example:
        >>> jsonable({"loss": float("nan"), "phases": [{"trace": 1.5, "ci95": [float("-inf"), 2.0]}]})
        ({'loss': None, 'phases': [{'trace': 1.5, 'ci95': [None, 2.0]}]}, ['loss', 'phases[0].ci95[0]'])
    """
    bad: List[str] = []
    return _clean(result, "", bad), bad


class Progress:
    """A bar on standard error when ``enabled`` (a terminal), else nothing; ``update(n)`` advances it.

    It is the call progress of :mod:`secorder.progress` for its thread while open:
    the passes over the data set made inside it (a data-set loss's products) show
    their step and batch on this bar instead of opening bars of their own.

    Example:
        >>> with Progress(10, "work", enabled=False) as bar:
        ...     bar.update(3)
    """

    def __init__(self, total: int, desc: str, enabled: bool, unit: str = "it"):
        self._context = _progress.call(desc, bool(enabled), total=total, unit=unit)
        self._bar = self._context.__enter__()

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._context.__exit__(None, None, None)

    @classmethod
    def over(cls, iterable: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
        """Iterate ``iterable``, advancing a bar per item."""
        with cls(total, desc, enabled) as bar:
            for item in iterable:
                yield item
                bar.update()


class Clock:
    """``perf_counter`` that waits for the device's queued work first, so that GPU times are real."""

    def __init__(self, device: torch.device):
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

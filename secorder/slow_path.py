"""No silent hours: a warning, and a progress bar, before an exact result takes one product per parameter.

An exact diagonal or trace off the fast paths (the Hessian when the structured
engine declines, a GGN whose loss has no output-Hessian factor) takes one
batched product per parameter column (:mod:`secorder.estimators.exact`); a
loss-factor diagonal takes one VJP per (sample, factor column)
(:mod:`secorder.operators.factor_diagonal`), which is also watched: a language
model's ``C T`` columns per sequence on the full-batch route add up. Before
the columns run, :class:`ColumnMonitor` times the first chunk of columns (one
batched product, with one device synchronisation on an accelerator), estimates
the whole (columns x measured time per column) and, when the estimate is above
the threshold, emits a :class:`SlowPathWarning` that names why the fast engine
declined (the module or loss it named), the estimate, and the alternatives
(``method="hutchinson"``, ``curvature="ggn"``).

Settings (thread- and task-local, :func:`settings`):

* ``threshold_s``: the estimate above which the warning is emitted; default
  :data:`DEFAULT_THRESHOLD_S` (60 seconds), or the environment variable
  ``SECORDER_SLOW_PATH_SECONDS``.
* ``progress``: a tqdm bar over the columns: ``True`` always, ``False`` never,
  ``None`` (default) on a terminal when the estimate is above the threshold.

Example:
    >>> import warnings, torch, secorder as so
    >>> f = lambda x: (x ** 4).sum()
    >>> with so.slow_path.settings(threshold_s=0.0), warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     d = so.hessian_diag(f)(torch.ones(3))
    >>> [w.category.__name__ for w in caught]
    ['SlowPathWarning']
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Iterator, Optional

import torch

__all__ = ["SlowPathWarning", "DEFAULT_THRESHOLD_S", "Settings", "settings", "current", "reason",
           "ColumnMonitor"]

#: Estimated seconds above which an exact computation by columns warns (one minute).
DEFAULT_THRESHOLD_S = 60.0


class SlowPathWarning(UserWarning):
    """An exact computation is about to take one product per parameter, for longer than the threshold."""


@dataclass(frozen=True)
class Settings:
    """The slow-path settings in effect (see the module docstring)."""

    threshold_s: float
    progress: Optional[bool]


def _default_threshold() -> float:
    text = os.environ.get("SECORDER_SLOW_PATH_SECONDS")
    if text is None:
        return DEFAULT_THRESHOLD_S
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"SECORDER_SLOW_PATH_SECONDS must be a number of seconds, got {text!r}") from None
    return value


_SETTINGS: contextvars.ContextVar[Optional[Settings]] = contextvars.ContextVar("secorder_slow_path", default=None)
_REASON: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("secorder_slow_path_reason", default=None)


def current() -> Settings:
    """The settings in effect here.

    Example:
        >>> current().threshold_s == DEFAULT_THRESHOLD_S or "SECORDER_SLOW_PATH_SECONDS" in os.environ
        True
    """
    found = _SETTINGS.get()
    return found if found is not None else Settings(_default_threshold(), None)


@contextlib.contextmanager
def settings(*, threshold_s: Optional[float] = None, progress: Optional[bool] = None) -> Iterator[Settings]:
    """Change the threshold and/or the progress bar inside a ``with`` block (this thread or task only).

    Args:
        threshold_s: seconds (a number >= 0); ``None`` keeps the current threshold.
        progress: ``True``/``False`` shows/hides the bar over the columns; ``None``
            keeps the current setting.

    Example:
        >>> with settings(threshold_s=5):
        ...     current().threshold_s
        5.0
    """
    if threshold_s is not None:
        if isinstance(threshold_s, bool) or not isinstance(threshold_s, (int, float)) or not threshold_s >= 0:
            raise ValueError(f"threshold_s must be a number of seconds >= 0, got {threshold_s!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool or None, got {type(progress).__name__}")
    now = current()
    new = replace(now, threshold_s=float(threshold_s) if threshold_s is not None else now.threshold_s,
                  progress=progress if progress is not None else now.progress)
    token = _SETTINGS.set(new)
    try:
        yield new
    finally:
        _SETTINGS.reset(token)


@contextlib.contextmanager
def reason(text: Optional[str]) -> Iterator[None]:
    """Why the fast engine declined, for the warnings of the computation inside (set by the transforms)."""
    token = _REASON.set(text)
    try:
        yield
    finally:
        _REASON.reset(token)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_ALTERNATIVES = ("method='hutchinson' (an estimate with an error bar, one product per probe), curvature='ggn' "
                 "(exact diagonals from per-sample loss factors on any model), or a model the structured engine "
                 "supports")


class ColumnMonitor:
    """Watches an exact computation over ``columns`` one-hot columns (:mod:`secorder.estimators.exact`).

    ``work`` describes the whole in the warning (default: one product per parameter),
    ``alternatives`` what to do instead (default: ``method="hutchinson"``, ``curvature="ggn"``).
    Call :meth:`done` after each chunk with the number of columns it took; the first
    call times the chunk (since the monitor was made), estimates the whole and warns
    when it is above the threshold. :meth:`close` closes the progress bar.
    """

    def __init__(self, columns: int, what: str, device: torch.device, *, work: Optional[str] = None,
                 alternatives: Optional[str] = None):
        self.columns, self.what, self.device = columns, what, device
        self.alternatives = alternatives if alternatives is not None else _ALTERNATIVES
        self.work = work if work is not None else f"one product per parameter ({columns:,} columns)"
        self.settings = current()
        self.bar: Any = None
        self.estimate: Optional[float] = None
        self._start = time.perf_counter()

    def _wanted(self) -> bool:
        return not torch.compiler.is_compiling()

    def done(self, columns: int) -> None:
        if not self._wanted():
            return
        if self.estimate is None:
            _sync(self.device)
            spent = time.perf_counter() - self._start
            self.estimate = spent / max(columns, 1) * self.columns
            slow = self.estimate > self.settings.threshold_s
            if slow:
                self._warn()
            show = self.settings.progress if self.settings.progress is not None else (slow and sys.stderr.isatty())
            if show:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=self.columns, desc=f"secorder: {self.what}", unit="col", leave=False,
                                file=sys.stderr)
        if self.bar is not None:
            self.bar.update(columns)

    def _warn(self) -> None:
        why = _REASON.get()
        because = f" because the fast path declined: {why}" if why else ""
        warnings.warn(
            f"secorder: the exact {self.what} takes {self.work}{because}. "
            f"Estimated time: {_duration(self.estimate)} (threshold {_duration(self.settings.threshold_s)}; "
            f"secorder.slow_path.settings(threshold_s=...) changes it). Alternatives: {self.alternatives}.",
            SlowPathWarning, stacklevel=2)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.refresh()
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "ColumnMonitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


"""Progress of a call: one bar (or one stream of plain lines) per transform call, however many passes it makes.

A transform of a :func:`secorder.dataset_loss` makes many passes over the data: one
per Lanczos step, per probe chunk, per block of one-hot columns. Showing one bar
per pass would stack dozens of bars for one ``so.eigenvalues`` call. Instead the
outermost call opens a *call progress* (:func:`call`) for its thread, and every
pass inside it, and every nested evaluation, advances that one: the batch count,
and the step (pass) count with the current pass's batch ``i/n`` as postfix.

Where it is drawn follows the ``progress`` setting:

* ``None`` (the default): a tqdm bar when standard error is a terminal, else nothing;
* ``True``: a tqdm bar on a terminal; elsewhere (a log file, a pipe, CI) plain lines,
  at most one every :data:`LINE_INTERVAL` seconds plus a last one, with no carriage
  returns to garble the log;
* ``False``: nothing.

Example:
    >>> import io, contextlib
    >>> err = io.StringIO()
    >>> with contextlib.redirect_stderr(err):
    ...     with call("secorder: demo", True, unit="batch") as bar:
    ...         for step in range(2):
    ...             with call("secorder: nested", True) as inner:   # the same one
    ...                 assert inner is bar
    ...                 bar.start_pass(3)
    ...                 for _ in range(3):
    ...                     bar.batch_done()
    >>> err.getvalue().splitlines()[-1]
    'secorder: demo: done, 2 step(s), 6 batch(es)'
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Any, Callable, Iterator, Optional

__all__ = ["CallProgress", "call", "current", "mode", "per_call", "LINE_INTERVAL"]

#: Seconds between two plain progress lines (off a terminal).
LINE_INTERVAL = 5.0

_state = threading.local()


def mode(enabled: Optional[bool]) -> Optional[str]:
    """``"bar"``, ``"lines"`` or ``None`` (nothing) for a ``progress`` setting (see the module docstring).

    Example:
        >>> mode(False), mode(None) if not sys.stderr.isatty() else None
        (None, None)
    """
    if enabled is False:
        return None
    tty = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if enabled is None:
        return "bar" if tty else None
    return "bar" if tty else "lines"


class CallProgress:
    """The progress of one call: a tqdm bar or plain lines on standard error.

    ``update(n)`` advances the main count (what the caller counts: columns, tasks);
    ``start_pass(n)`` / ``batch_done()`` report the passes over a data set. When the
    caller counts batches (``unit="batch"``), each batch also advances the main count.
    """

    def __init__(self, desc: str, how: str, *, total: Optional[int] = None, unit: str = "it"):
        self.desc, self.how, self.total, self.unit = desc, how, total, unit
        self.count = 0
        self.closed = False
        self.steps = 0
        self.batches = 0
        self._batch_in_pass = 0
        self._pass_total: Optional[int] = None
        self._last_line = time.monotonic()
        self._file = sys.stderr
        self._bar = None
        if how == "bar":
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=self._file)

    def update(self, n: int = 1) -> None:
        """Advance the main count by ``n``."""
        self.count += n
        if self._bar is not None:
            self._bar.update(n)
        self._maybe_line()

    def start_pass(self, num_batches: Optional[int]) -> None:
        """A pass over the data begins (``num_batches`` when known): one more step."""
        self.steps += 1
        self._batch_in_pass = 0
        self._pass_total = num_batches
        self._postfix()

    def batch_done(self) -> None:
        """One more batch of the current pass."""
        self.batches += 1
        self._batch_in_pass += 1
        if self.unit == "batch":
            self.count += 1
            if self._bar is not None:
                self._bar.update(1)
        self._postfix()
        self._maybe_line()

    def _where(self) -> str:
        of = f"/{self._pass_total}" if self._pass_total is not None else ""
        return f"step {self.steps}, batch {self._batch_in_pass}{of}"

    def _postfix(self) -> None:
        if self._bar is not None and self.steps:
            self._bar.set_postfix_str(self._where(), refresh=False)

    def _maybe_line(self) -> None:
        if self.how != "lines" or time.monotonic() - self._last_line < LINE_INTERVAL:
            return
        self._last_line = time.monotonic()
        total = f"/{self.total}" if self.total is not None else ""
        where = f", {self._where()}" if self.steps else ""
        print(f"{self.desc}: {self.count}{total} {self.unit}{where}", file=self._file, flush=True)

    def close(self) -> None:
        """Close the bar, or write the last line."""
        if self.closed:
            return
        self.closed = True
        if self._bar is not None:
            self._bar.refresh()
            self._bar.close()
        elif self.how == "lines":
            parts = [f"{self.count}/{self.total} {self.unit}"] if self.total is not None else []
            if self.steps:
                parts += [f"{self.steps} step(s)", f"{self.batches} batch(es)"]
            elif self.total is None:
                parts.append(f"{self.count} {self.unit}")
            print(f"{self.desc}: done, {', '.join(parts)}", file=self._file, flush=True)


def current() -> Optional[CallProgress]:
    """The call progress open in this thread, or ``None``.

    A pass abandoned by an exception may keep its generator (and so its progress)
    alive until the traceback is freed; a closed one no longer counts as open.
    """
    bar = getattr(_state, "bar", None)
    return None if bar is None or bar.closed else bar


@contextlib.contextmanager
def call(desc: str, enabled: Optional[bool], *, total: Optional[int] = None,
         unit: str = "it") -> Iterator[Optional[CallProgress]]:
    """The call's progress: the one already open in this thread (nested calls share it), a new one, or ``None``."""
    outer = current()
    if outer is not None:
        yield outer
        return
    how = mode(enabled)
    if how is None:
        yield None
        return
    bar = CallProgress(desc, how, total=total, unit=unit)
    _state.bar = bar
    try:
        yield bar
    finally:
        if getattr(_state, "bar", None) is bar:
            _state.bar = None
        bar.close()


def per_call(f: Any, what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: one call progress around each call of a transformed function of ``f``.

    Only for a data-set loss (its ``progress`` setting, on the rank that shows it);
    any other ``f`` gets the function unchanged.
    """
    import functools

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        setting = getattr(f, "progress_setting", None)
        if setting is None:
            return fn

        @functools.wraps(fn)
        def with_progress(*args: Any, **kwargs: Any) -> Any:
            with call(f"secorder: {what}", setting(), unit="batch"):
                return fn(*args, **kwargs)

        return with_progress

    return decorate

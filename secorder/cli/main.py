"""Parsing, dispatch, error handling and exit statuses of the ``secorder`` command.

:data:`COMMANDS` lists the command modules of this package; see the package
docstring (:mod:`secorder.cli`) for what a command module defines. Every
command gets the output options ``--json``, ``--no-progress``, ``-v/--verbose``
and ``--debug`` from here, and :func:`main` turns what it returns or raises into
output and an exit status:

* 0: success; the result goes to standard output, as text or (``--json``)
  strict JSON, where ``nan``/``inf`` become ``null`` and are listed in the
  result's ``warnings``;
* 2: a usage error: a bad option value or unknown option (argparse prints the
  command's usage and one ``error:`` line naming the option), or a
  :class:`~secorder.cli.errors.UsageError` raised by the command (one
  ``secorder: error:`` line);
* 1: any other exception (one line; ``--debug`` shows the traceback);
* 130: interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import warnings
from types import ModuleType
from typing import Any, Dict, List, Optional, Sequence

from .. import __version__
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, UsageError
from .output import jsonable

__all__ = ["COMMANDS", "DEFAULT_COMMAND", "main", "build_parser", "command_modules"]

#: The command modules of :mod:`secorder.cli`, in the order ``secorder --help`` lists them.
COMMANDS = ("report", "spectrum")
#: What a bare ``secorder`` (or ``secorder --some-option``) runs.
DEFAULT_COMMAND = "report"

logger = logging.getLogger("secorder.cli")


def command_modules() -> Dict[str, ModuleType]:
    """``{name: module}`` for every entry of :data:`COMMANDS`.

    Example:
        >>> sorted(command_modules())
        ['report', 'spectrum']
    """
    return {name: importlib.import_module(f"{__package__}.{name}") for name in COMMANDS}


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reports an unknown option under the usage of the command it was given to."""

    commands: Dict[str, argparse.ArgumentParser]

    def parse_args(self, args: Optional[Sequence[str]] = None, namespace: Any = None) -> argparse.Namespace:  # type: ignore[override]
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            owner = getattr(self, "commands", {}).get(getattr(parsed, "command", None), self)
            owner.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the result as JSON on stdout (nan/inf as null)")
    out.add_argument("--no-progress", action="store_true", help="never show progress bars (they show only on a terminal)")
    out.add_argument("-v", "--verbose", action="store_true",
                     help="log what the command does (which engine ran and why) on stderr")
    out.add_argument("--debug", action="store_true", help="debug log, and the full traceback on errors")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``secorder`` command, one sub-parser per command module.

    Example:
        >>> from secorder.cli import build_parser
        >>> args = build_parser().parse_args(["report", "--steps", "5", "--json"])
        >>> args.command, args.steps, args.json, args.exact
        ('report', 5, True, 'auto')
    """
    parser = _Parser(prog="secorder", allow_abbrev=False,
                     description="Second-order diagnostics for PyTorch models, built on secorder. "
                                 f"Without a command: {DEFAULT_COMMAND}. The output options (--json, --no-progress, "
                                 "-v/--verbose, --debug) go before or after the command.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    parser.commands = {}
    for name, module in command_modules().items():
        command = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION, allow_abbrev=False)
        module.add_arguments(command)
        _add_output_options(command)
        parser.commands[name] = command
    return parser


#: The output options every command takes; they may also come before the command (``secorder -v report``).
GLOBAL_FLAGS = ("--json", "--no-progress", "-v", "--verbose", "--debug")


def normalize_argv(argv: List[str]) -> List[str]:
    """``argv`` with the command first: output options given before it move after it; no command means report.

    Example:
        >>> normalize_argv(["-v", "report", "--steps", "1"])
        ['report', '--steps', '1', '-v']
        >>> normalize_argv(["--json", "--steps", "1"])
        ['report', '--steps', '1', '--json']
        >>> normalize_argv(["--version"]), normalize_argv([])
        (['--version'], ['report'])
    """
    leading = []
    rest = list(argv)
    while rest and rest[0] in GLOBAL_FLAGS:
        leading.append(rest.pop(0))
    if rest and rest[0] in COMMANDS:
        return [rest[0], *rest[1:], *leading]
    if rest and rest[0] in ("-h", "--help", "--version") and not leading:
        return rest
    return [DEFAULT_COMMAND, *rest, *leading]


def _one_line(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _log_handler(args: argparse.Namespace) -> logging.Handler:
    """Log records of ``secorder.*`` on stderr: warnings always, INFO with ``-v``, DEBUG with ``--debug``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    level = logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING
    handler.setLevel(level)
    root = logging.getLogger("secorder")
    root.addHandler(handler)
    handler.previous_level = root.level  # type: ignore[attr-defined]
    root.setLevel(min(level, root.getEffectiveLevel()))
    return handler


def _print(text: str) -> None:
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``secorder`` console script and of ``python -m secorder``; returns the exit status.

    Never raises ``SystemExit`` itself (``--help`` and argparse errors return 0 and
    2), so tests and scripts can call it in-process.

    Example:
        >>> from secorder.cli import main
        >>> main(["report", "--model", "no_such_module_xyz:make"])  # the error goes to stderr
        2
    """
    argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or argparse's usage error (already printed)
        return exc.code if isinstance(exc.code, int) else (EXIT_OK if exc.code is None else EXIT_USAGE)
    module = command_modules()[args.command]
    args.progress = (not args.no_progress) and sys.stderr.isatty()
    handler = _log_handler(args)
    try:
        return _run(module, args)
    finally:
        root = logging.getLogger("secorder")
        root.removeHandler(handler)
        root.setLevel(handler.previous_level)  # type: ignore[attr-defined]


def _library_warnings(caught: List[warnings.WarningMessage]) -> List[str]:
    """The ``UserWarning`` s (``secorder.SlowPathWarning`` among them) of a run, once each, as sentences.

    Other categories are shown as Python would have shown them.
    """
    out: List[str] = []
    for w in caught:
        if issubclass(w.category, UserWarning):
            text = f"{w.category.__name__}: {w.message}" if w.category is not UserWarning else str(w.message)
            if text not in out:
                out.append(text)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    return out


def _run(module: ModuleType, args: argparse.Namespace) -> int:
    """Run the command; the library's warnings become lines of the result's ``warnings`` (and of stderr)."""
    caught: List[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:  # the filters in force decide what is recorded
            status = _run_command(module, args)
    finally:
        raised = _library_warnings(caught)  # after the block: other categories are shown the usual way
        pending = getattr(args, "_result", None)
    if raised and pending is None:  # no result to carry them (an error, or a rank that does not print)
        for text in raised:
            print(f"secorder: warning: {text}", file=sys.stderr)
    if pending is not None:
        _emit(module, args, pending, raised)
    return status


def _run_command(module: ModuleType, args: argparse.Namespace) -> int:
    try:
        result = module.run(args)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"secorder: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("secorder: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if args.debug:
            raise
        print(f"secorder: error: {type(exc).__name__}: {_one_line(exc)} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE
    if result is None:  # a command run by several processes (torchrun): another one prints
        return EXIT_OK
    args._result = result  # printed by _run, once the run's warnings are known
    return EXIT_OK


def _emit(module: ModuleType, args: argparse.Namespace, result: Dict[str, Any], raised: List[str]) -> None:
    """Print ``result`` (text or JSON), with the warnings the library raised during the run among its ``warnings``."""
    if raised:
        result.setdefault("warnings", []).extend(raised)
    if args.json:
        clean, nonfinite = jsonable(result)
        notes: List[str] = clean.setdefault("warnings", [])
        if nonfinite:
            notes.append(f"not finite, written as null: {', '.join(nonfinite)}")
        for note in notes:  # stdout is for programs; a person reading the terminal sees these
            print(f"secorder: warning: {note}", file=sys.stderr)
        _print(json.dumps(clean, indent=2, allow_nan=False))
    else:
        _print(module.format_text(result))

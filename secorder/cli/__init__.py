"""The ``secorder`` command line: one module per command, one place for parsing, errors and output.

``secorder report`` (also ``python -m secorder report``; ``report`` is the
default command, so a bare ``secorder`` does the same) prints the curvature of
a model's loss at initialisation and after training; ``secorder --help`` lists
the commands, ``secorder COMMAND --help`` their options.

Modules:

* :mod:`secorder.cli.main`: the parser, dispatch, error handling and exit
  statuses (0 success, 2 usage error, 1 other failure), strict JSON output and
  logging. Knows no command by its options.
* :mod:`secorder.cli.report`: the ``report`` command.
* :mod:`secorder.cli.problem`: ``--model path/to/file.py:factory`` or
  ``pkg.module:factory`` to a checked ``(model, loss_fn, batches)``, and the
  default digits problem.
* :mod:`secorder.cli.options`: option types (positive numbers, seeds) and the
  options every command about a model shares (``--model``, ``--device``, ...).
* :mod:`secorder.cli.output`: number formatting, column-sized tables, JSON
  without NaN, progress bars, wall-clock timing.
* :mod:`secorder.cli.errors`: :class:`UsageError` and the exit statuses.

Adding a command (say ``secorder spectrum``):

1. Write ``secorder/cli/spectrum.py`` defining

   * ``NAME = "spectrum"``, ``HELP`` (one line for ``secorder --help``) and
     ``DESCRIPTION`` (the top of ``secorder spectrum --help``);
   * ``add_arguments(parser)``: its options. Call
     :func:`secorder.cli.options.add_problem_options` for ``--model``,
     ``--max-batches``, ``--device``, ``--dtype`` and ``--seed``, and use the
     types of :mod:`secorder.cli.options` so that a bad value exits with 2 and
     names the option. ``--json``, ``--no-progress``, ``-v`` and ``--debug`` are
     added by :mod:`~secorder.cli.main` to every command;
   * ``run(args) -> dict``: the work. Load the problem with
     :func:`secorder.cli.problem.load_problem`; raise :class:`UsageError`
     (message starting with the option it is about) for anything the caller
     can fix; show progress with :class:`secorder.cli.output.Progress` when
     ``args.progress`` is true; return a JSON-ready dict with a ``warnings``
     list (plain sentences; ``nan``/``inf`` may stay in, they become ``null``);
   * ``format_text(result) -> str``: the text output, warnings included
     (:func:`secorder.cli.output.format_table` sizes the columns);
   * ``JSON_LAYOUT``: the keys of ``result`` with a description of each (see
     :data:`secorder.cli.report.JSON_LAYOUT`); the docs page is generated from
     it, and a test compares it with a real result.

2. Add ``"spectrum"`` to :data:`secorder.cli.main.COMMANDS`.
3. Test it in-process: ``main(["spectrum", ...])`` returns the exit status
   (never raises ``SystemExit``) and prints to the captured stdout/stderr
   (``tests/test_cli.py``'s ``cli()`` helper); factories for ``--model`` can
   live in the test module (``tests.test_cli:tiny_problem``). Compare a real
   result with ``JSON_LAYOUT`` as ``test_json_keys_are_the_documented_layout``
   does for ``report``.
4. Docs: the CLI page lists every command of :data:`~secorder.cli.main.COMMANDS`
   with its ``DESCRIPTION``, ``--help`` and ``JSON_LAYOUT`` with no edit
   (``docs/_from_code.py``), and ``tests/test_docs.py`` checks that each option
   and key is there; add prose to ``docs/cli.rst`` where the command needs it.
"""

from .errors import UsageError
from .main import build_parser, main
from .problem import digits_mlp, load_factory

__all__ = ["main", "build_parser", "load_factory", "digits_mlp", "UsageError"]

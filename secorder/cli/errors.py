"""Exit statuses and the one exception every command raises for a mistake of the caller's."""

from __future__ import annotations

__all__ = ["UsageError", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake in how the command was called or in what the user's factory returned (exit status 2).

    The message is printed as one line, ``secorder: error: <message>``, so it
    should start with the option it is about (``--model mypkg:make: ...``).

    Example:
        >>> str(UsageError("--device: unknown device 'gpu7'"))
        "--device: unknown device 'gpu7'"
    """

"""How operator commands (`parley admin …`, `parley events …`) fail: one line on stderr, an exit code."""

from __future__ import annotations

from typing import Final

# Exit codes: 2 when the operator's input or setup is wrong (a bad flag value, a missing setting),
# 1 when the command could not do its work (a dependency down, no such thing).
EXIT_FAILED: Final = 1
EXIT_BAD_INPUT: Final = 2


class CommandError(Exception):
    """A failure to report to the operator as plain text (no traceback), with the exit code to use."""

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code

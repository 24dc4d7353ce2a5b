"""Errors that users cause and can fix.

A `UserError` is expected bad input (a wrong key, a missing file, a malformed line). The
CLI prints its message without a traceback and exits with code 2. Its message says what is
wrong, where, and how to fix it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: printed without traceback, exit code 2."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.fix:
            text += f"\n  fix: {self.fix}"
        return text


class LintError(UserError):
    """A data lint found examples that would train the wrong thing."""

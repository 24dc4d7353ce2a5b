"""Quoting values for sbatch scripts: shell words and `#SBATCH` lines.

Every value that reaches a script goes through one of these. A newline or another control
character would end an `#SBATCH` line (or a shell word) early whatever the quoting, so such a
value is refused; so are `%` and backslashes in log paths, which SLURM rewrites.
"""

from __future__ import annotations

import shlex

from nemo_rlhf.errors import UserError


def control_chars(value: str) -> list[str]:
    """The control characters in `value` (newline, tab, ..., DEL), as reprs."""
    return sorted({repr(c) for c in value if ord(c) < 32 or ord(c) == 127})


def refuse_control_chars(value: str, what: str) -> str:
    """Return `value`, or raise a UserError naming `what` when it holds a control character."""
    bad = control_chars(value)
    if bad:
        raise UserError(
            f"{what} contains a newline or control character ({', '.join(bad)}): {value!r}",
            where=what,
            fix="use a name or path without newlines, tabs or other control characters",
        )
    return value


def shell_quote(value) -> str:
    """One shell word (shlex.quote), refusing control characters."""
    return shlex.quote(refuse_control_chars(str(value), "a value in the script"))


def sbatch_quote(value) -> str:
    """A value for an `#SBATCH` line: sbatch reads them with shell-like quotes, but a backslash
    escapes the next character even inside single quotes, so backslashes are doubled first."""
    return shlex.quote(refuse_control_chars(str(value), "an #SBATCH value").replace("\\", "\\\\"))

"""The one error type a user can cause, and how it prints.

Every error a user can trigger (bad file, bad column, unknown model) is a
`TunelabError`: it names *where* (file:line, field), *what* is wrong, and *how to
fix it*. The CLI prints it as one line and exits with code 2; no traceback.
"""

from __future__ import annotations


class TunelabError(Exception):
    """A problem the user can fix.

    >>> str(TunelabError("column 'label' not found", fix="pass --label-column", where="data.csv:1"))
    "data.csv:1: column 'label' not found (fix: pass --label-column)"
    """

    def __init__(self, what: str, *, fix: str, where: str | None = None) -> None:
        self.what = what
        self.fix = fix
        self.where = where
        super().__init__(str(self))

    def __str__(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        return f"{prefix}{self.what} (fix: {self.fix})"


class Interrupted(TunelabError):
    """Training stopped on SIGINT/SIGTERM after checkpointing; the CLI exits with 130."""

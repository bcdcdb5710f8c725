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


def first_problem(exc: Exception) -> str:
    """A pydantic ValidationError (or any error) in one phrase: `format: Input should be 'tunelab-eval/2'
    (and 1 more problem)`, for messages about a file that does not parse into its type."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    found = errors()
    # A value that fits no branch of a union (`float | 'auto'`) errs once per branch, each named in the location.
    keys = list(dict.fromkeys(".".join(str(p) for p in e["loc"] if not str(p).startswith(_BRANCHES)) for e in found))
    more = f" (and {len(keys) - 1} more problem{'s' if len(keys) > 2 else ''})" if len(keys) > 1 else ""
    return f"{keys[0] or '(top level)'}: {found[0]['msg']}{more}"


_BRANCHES = ("function-", "literal[", "float", "int", "str", "bool", "list[", "dict[", "tuple[")

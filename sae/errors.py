"""Errors a user can act on. The CLI prints their message as one line and exits non-zero;
the HTTP service maps them to 4xx with the common error body."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from a user: a path, a config, a request. The message says what and where."""


class DictionaryFormatError(UserError):
    """A dictionary directory that cannot be loaded: names the file and the field."""

    def __init__(self, path: object, field: str | None, problem: str) -> None:
        where = f"{path}" + (f" [{field}]" if field else "")
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.field = field
        self.problem = problem

"""Errors a user can act on: each names the problem and the fix."""

from __future__ import annotations


class DosebenchError(Exception):
    """Base for errors shown to users as one line: ``problem — fix``."""

    def __init__(self, problem: str, *, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}" if fix else problem)


class InputError(DosebenchError, ValueError):
    """A wrong file, a corrupt volume, an impossible parameter."""


class OutputError(DosebenchError):
    """The output location cannot be used."""


class Cancelled(DosebenchError):
    """The job was cancelled; the stage stopped between chunks (or its child process was killed)."""

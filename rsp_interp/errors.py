"""User-facing errors: each message says what went wrong and what to do instead."""

from __future__ import annotations


class RSPInterpError(Exception):
    """Base class for errors a user can fix by changing their input."""


class ModelNotFoundError(RSPInterpError, LookupError):
    def __init__(self, name: str, choices: str, hint: str | None = None):
        why = f" ({hint})" if hint else ""
        super().__init__(f"Unknown model {name!r}{why}. Choices: {choices}")


class InputError(RSPInterpError, ValueError):
    """Bad shapes, values or flags."""


class OutputError(RSPInterpError, OSError):
    """The output location cannot be written."""

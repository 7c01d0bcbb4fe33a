"""The one error type a command raises for input the user can fix: printed as one line, exit status 2."""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input (bad paths, bad options, bad checkpoints)."""

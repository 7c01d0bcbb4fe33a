"""The errors a command reports as one line (exit status 2) instead of a traceback.

``UserError`` is raised for input the user can fix: bad options, paths, files. Library code raises
``ValueError`` for bad arguments, and a real bug often does too, so a command converts a ``ValueError`` only
where it checks the user's input (``user_input()``, at the edge); everything else keeps its traceback.
``CheckpointError`` (a model directory that cannot be read), ``RunError`` (a run folder, training checkpoint
or run setting that cannot be used) and ``EpisodeError`` (an episode folder that cannot be read) are about
the user's files wherever they are raised, so they count too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """An error caused by the user's input (bad paths, bad options, bad checkpoints)."""


@contextmanager
def user_input() -> Iterator[None]:
    """Turn the ``ValueError``/``OSError`` of checking the user's options, configs and files into
    ``UserError``: ``with user_input(): cfg = TrainConfig(...)``."""
    try:
        yield
    except (ValueError, OSError) as err:
        raise UserError(str(err)) from err


def user_error_types() -> tuple[type[Exception], ...]:
    """What ``worldloop`` prints as one line: ``UserError`` and the dedicated file errors."""
    from worldloop.distill.data.episodes import EpisodeError
    from worldloop.distill.stages.run import RunError
    from worldloop.models.checkpoint import CheckpointError

    return (UserError, CheckpointError, RunError, EpisodeError)

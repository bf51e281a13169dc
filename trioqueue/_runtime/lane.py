"""Lanes: one cancel scope shared by the jobs a worker task runs back to back.

Making a trio cancel scope costs more than a no-op job, so a worker task runs its jobs in
one scope (a lane) until a cancel uses it up. Each job reaches its lane through its
`JobHandle`, so ``job_cancel`` and the job's timeout cancel the job that runs in it.
"""

from __future__ import annotations

import math
from typing import final

import trio

__all__ = ["DEADLINE_SLACK", "JobHandle", "Lane"]

DEADLINE_SLACK = 0.001
"""A job's timeout may pass up to this fraction of itself late (60 ms of 60 s), so that
jobs run back to back can share their lane's deadline."""


@final
class Lane:
    """A cancel scope whose deadline follows the job running in it.

    Between jobs nothing can cancel it: no job's handle points at it, and its deadline is
    lifted (`lift`) before anything after a job's own code may wait."""

    __slots__ = ("scope",)

    def __init__(self) -> None:
        self.scope = trio.CancelScope()

    @property
    def used_up(self) -> bool:
        """A cancel (``job_cancel`` or a timeout) reached the lane: no job runs in it any
        more. Not a checkpoint."""
        return self.scope.cancel_called

    def follow(self, timeout: float | None) -> None:
        """Give the lane the deadline of a job starting now with ``timeout`` (None: no
        deadline). Moving a scope's deadline costs trio about as much as a no-op job, so
        a deadline already within the slack stays. Not a checkpoint."""
        scope = self.scope
        if timeout is None:
            if scope.deadline != math.inf:
                scope.deadline = math.inf
            return
        due = trio.current_time() + timeout
        if not due <= scope.deadline <= due + timeout * DEADLINE_SLACK:
            scope.deadline = due + timeout * DEADLINE_SLACK

    def lift(self) -> None:
        """No deadline until the next job follows. Not a checkpoint."""
        if self.scope.deadline != math.inf:
            self.scope.deadline = math.inf


@final
class JobHandle:
    """A claimed job's link to the lane it runs in, so ``job_cancel`` can reach it.

    While the job's own code runs, ``lane`` is its lane's scope; a cancel that comes
    before that is remembered and applied when the job starts."""

    __slots__ = ("cancel_requested", "lane")

    def __init__(self) -> None:
        self.lane: trio.CancelScope | None = None
        self.cancel_requested = False

    def cancel_remotely(self) -> None:
        self.cancel_requested = True
        if self.lane is not None:
            self.lane.cancel()

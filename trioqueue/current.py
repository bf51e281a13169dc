"""``current_client()``: the client running the current job.

Set once in the task that runs a client's runtime (and in ``testing.work_one``), so every
task below it inherits it: jobs, worker middleware, hooks, error handlers, retry policies
and periodic jobs' ``args`` callables. The application's own tasks never see it: a
contextvar set in a child task does not flow back up.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import Client

__all__ = ["current_client", "running_client"]

running_client: ContextVar[Client] = ContextVar("trioqueue.current_client")


def current_client() -> Client:
    """The client running the current job, for example to insert a follow-up job.

    Works in a worker function and in what runs around it (middleware, hooks, the error
    handler). Raises ``RuntimeError`` anywhere else. Not a checkpoint.
    """
    try:
        return running_client.get()
    except LookupError:
        raise RuntimeError(
            "trioqueue.current_client() was called outside a job: it only works in a "
            "worker function, its middleware and hooks, or the client's error handler"
        ) from None

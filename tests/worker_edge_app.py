"""An application module for ``trioqueue worker`` that does what real ones do and
tests/worker_app.py does not, run as a subprocess by tests/test_worker_cli.py (never
imported by the tests themselves: importing it configures logging):

- it sets logging up and logs as it is imported, before the worker could, in the words
  of a module that calls ``logging.basicConfig()`` at the top;
- ``StopSelf`` stops the client from inside a job, ``client.stop(cancel=...)``: the
  process ends without any signal;
- ``Explode`` fails, and the ``error_handler`` then raises a ``BaseException`` of the
  application's own: it escapes the job and the client fails;
- ``Interrupt`` raises ``KeyboardInterrupt``, as Ctrl-C in a job's code would: the client
  stops and the process ends as interrupted.

The database needs only trioqueue's schema.
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

import attrs

import trioqueue as tq

logging.basicConfig(format="edge_app %(levelname)s %(name)s %(message)s")
log = logging.getLogger("worker_edge_app")
log.debug("worker_edge_app: debug at import")
log.warning("worker_edge_app: warning at import")


@attrs.frozen
class StopSelf:
    kind: ClassVar[str] = "edge_stop_self"
    cancel: bool


@attrs.frozen
class Explode:
    kind: ClassVar[str] = "edge_explode"


@attrs.frozen
class Interrupt:
    kind: ClassVar[str] = "edge_interrupt"


class EdgeFailure(BaseException):
    """Not an Exception: the error_handler's raising it is not caught per job."""


workers = tq.Workers()


@workers.worker(StopSelf, timeout=None)
async def stop_self(job: tq.Job[StopSelf]) -> None:
    await tq.current_client().stop(cancel=job.args.cancel)


@workers.worker(Explode)
async def explode(job: tq.Job[Explode]) -> None:
    raise ValueError("explode")


@workers.worker(Interrupt)
async def interrupt(job: tq.Job[Interrupt]) -> None:
    raise KeyboardInterrupt


def error_handler(job: tq.Job[Any], exc: BaseException) -> None:
    if job.kind == Explode.kind:
        raise EdgeFailure("the error handler gave up on everything")


settings = tq.WorkerSettings(
    workers=workers,
    queues={"default": tq.QueueConfig(max_workers=5)},
    error_handler=error_handler,
    fetch_poll_interval=0.1,
    fetch_cooldown=0.01,
    leader_interval=0.2,
)

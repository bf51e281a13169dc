"""An application module for ``trioqueue worker``, run as a subprocess by
tests/test_worker_cli.py (``python -m trioqueue worker worker_app:settings``, with this
folder as the working directory).

Everything a job does that a test wants to see is written to the database, in the
``worker_app_marks`` table the test creates (``job_id``, ``kind``, ``note``):

- ``Marking`` (client worker middleware) writes a ``worked`` mark after every run that
  returned, through ``tq.current_client()``;
- ``Order`` inserts a follow-up ``Notify`` through ``tq.current_client()``;
- ``Tick`` is the periodic job (every half second);
- ``Gate`` runs until a row with its ``name`` is in ``worker_app_gates``: a job that is
  still running whenever the test wants it to be.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

import attrs
import trio
from support import FAST

import trioqueue as tq

TABLES = """
CREATE TABLE worker_app_marks (job_id bigint, kind text NOT NULL, note text NOT NULL);
CREATE TABLE worker_app_gates (name text PRIMARY KEY);
"""


@attrs.frozen
class Order:
    kind: ClassVar[str] = "app_order"
    number: int


@attrs.frozen
class Notify:
    kind: ClassVar[str] = "app_notify"
    number: int


@attrs.frozen
class Tick:
    kind: ClassVar[str] = "app_tick"


@attrs.frozen
class Gate:
    kind: ClassVar[str] = "app_gate"
    name: str


workers = tq.Workers()


@workers.worker(Order)
async def order(job: tq.Job[Order]) -> None:
    await tq.current_client().insert(Notify(job.args.number))


@workers.worker(Notify)
async def notify(job: tq.Job[Notify]) -> None:
    await trio.lowlevel.checkpoint()


@workers.worker(Tick)
async def tick(job: tq.Job[Tick]) -> None:
    await trio.lowlevel.checkpoint()


@workers.worker(Gate, timeout=None)
async def gate(job: tq.Job[Gate]) -> None:
    client = tq.current_client()
    while True:
        async with client.transaction() as tx:
            rows = await tx.fetch("SELECT 1 FROM worker_app_gates WHERE name = $1", job.args.name)
        if rows:
            return
        await trio.sleep(0.05)


async def mark(job: tq.Job[Any], note: str) -> None:
    async with tq.current_client().transaction() as tx:
        await tx.execute(
            "INSERT INTO worker_app_marks (job_id, kind, note) VALUES ($1, $2, $3)",
            job.id,
            job.kind,
            note,
        )


class Marking:
    """Worker middleware: a ``worked`` mark after each run that returned."""

    async def work(
        self, job: tq.Job[Any], call_next: Callable[[tq.Job[Any]], Awaitable[Any]]
    ) -> Any:
        result = await call_next(job)
        await mark(job, "worked")
        return result


settings = tq.WorkerSettings(
    workers=workers,
    queues={"default": tq.QueueConfig(max_workers=10), "other": tq.QueueConfig(max_workers=3)},
    periodic_jobs=[tq.PeriodicJob(every=0.5, args=Tick, id="app-tick")],
    middleware=[Marking()],
    **FAST,
)


def make_settings() -> tq.WorkerSettings:
    return settings


def make_workers() -> tq.Workers:
    return workers


async def make_async() -> tq.WorkerSettings:
    return settings


def make_nothing() -> None:
    return None


def make_broken() -> tq.WorkerSettings:
    raise RuntimeError("no settings today")


no_workers = tq.WorkerSettings(queues={"default": tq.QueueConfig()})
empty_workers = tq.WorkerSettings(workers=tq.Workers())
not_settings = "settings"

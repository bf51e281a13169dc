"""Opening a client: `open_client` and the steps it takes before handing one out.

Where the jobs are stored (a driver given, a ``memory://`` URL, a PostgreSQL URL, or a
private server started for the block), the schema check, and running the client for the
block: its runtime when it has queues, else its periodic job enqueuer alone; beside either,
the service behind ``job_wait`` (``_wait.py``).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import trio

from .._failure import fatal_unwrapped
from .._maintenance.periodic import PeriodicEnqueuer, PeriodicEnqueuerConfig
from .._runtime.startup import Startup
from .._schema import SCHEMA_VERSION
from .._urls import is_memory_url, resolve_database_url
from ..config import ClientConfig, QueueConfig, validate_queues
from ..current import running_client
from ..driver.postgres.driver import open_postgres_driver
from ..driver.protocol import Driver
from ..errors import TrioqueueError, ValidationError
from ..settings import WorkerSettings, merge_settings
from ..workers import Workers
from ._client import Client
from ._wait import JobWaits

__all__ = ["open_client"]


@asynccontextmanager
async def open_client(
    database_url: str | None = None,
    *,
    workers: Workers | None = None,
    queues: Mapping[str, QueueConfig] | None = None,
    driver: Driver | None = None,
    settings: WorkerSettings | None = None,
    **config: Any,
) -> AsyncIterator[Client]:
    """Open a client for the block; with ``queues`` it also works jobs until the block ends.

    Storage: ``driver`` when given (for example ``trioqueue.MemoryDriver()``); else
    ``database_url`` — a PostgreSQL URL, or ``memory://NAME`` for the in-process memory
    store of that name; ``None`` means ``$TRIOQUEUE_DATABASE_URL``, else a private
    PostgreSQL server started (and migrated) for the block.

    ``settings``: a ``WorkerSettings`` holding workers, queues and options; ``workers``,
    ``queues`` (when not None) and option keywords given beside it win.

    Leaving the block is a soft stop (running jobs finish); cancellation from outside is a
    hard stop whose final writes are shielded for up to ``shutdown_timeout`` seconds.
    Config errors raise ValidationError before anything starts.

    Start-up (connecting, the schema check, registering the queues) retries transient
    database errors (``DatabaseError.transient``: a lost or refused connection, a server
    restarting, too many connections) with backoff for up to ``startup_timeout`` seconds,
    logging each retry at WARNING, then raises a DatabaseError naming the step, the time
    tried and the last error; other errors (a failed login, a missing database, a schema
    needing ``trioqueue migrate``) are raised at once. Cancelled while it waits to retry,
    it just cancels.
    """
    workers, queues, config = merge_settings(settings, workers, queues, config)
    cfg = ClientConfig(**config)
    queue_configs = validate_queues(queues)
    if workers is not None and not isinstance(workers, Workers):
        raise ValidationError("workers", "must be a trioqueue.Workers")
    if queue_configs and (workers is None or not len(workers)):
        raise ValidationError("workers", "a client with queues needs at least one worker")
    if driver is not None:
        if database_url is not None:
            raise ValidationError("driver", "give a driver or a database_url, not both")
        async with _run_client(driver, cfg, workers, queue_configs) as client:
            yield client
        return

    from ..embedded import open_embedded_server

    url = resolve_database_url(database_url)
    if url is not None and is_memory_url(url):
        from ..driver.memory import memory_driver_for_url

        async with _run_client(memory_driver_for_url(url), cfg, workers, queue_configs) as client:
            yield client
        return
    if url is None:
        async with open_embedded_server() as embedded_url:
            from .._migrate import migrate

            await migrate(embedded_url)
            async with _open_postgres(embedded_url, cfg, workers, queue_configs) as client:
                yield client
        return
    async with _open_postgres(url, cfg, workers, queue_configs) as client:
        yield client


@asynccontextmanager
async def _open_postgres(
    url: str,
    cfg: ClientConfig,
    workers: Workers | None,
    queues: Mapping[str, QueueConfig],
) -> AsyncIterator[Client]:
    pool_size = int(os.environ.get("TRIOQUEUE_POOL_SIZE", "0")) or 8 + 2 * len(queues)
    # Only a client with queues LISTENs (its notifier); the driver checks at once that
    # no pooler is in the way of that or of prepared statements.
    listen = bool(queues) and not cfg.poll_only
    # Start-up retries transient faults within one startup_timeout, from here on.
    startup = Startup(cfg.startup_timeout)
    async with (
        startup.entered(
            "connecting to the database",
            lambda: open_postgres_driver(
                url, max_size=pool_size, prepare=cfg.prepared_statements, listen=listen
            ),
        ) as driver,
        _run_client(driver, cfg, workers, queues, startup) as client,
    ):
        yield client


@asynccontextmanager
async def _run_client(
    driver: Driver,
    cfg: ClientConfig,
    workers: Workers | None,
    queues: Mapping[str, QueueConfig],
    startup: Startup | None = None,
) -> AsyncIterator[Client]:
    """Check the schema, then run the client (and its runtime, if it has queues).

    The start-up's database steps retry transient errors under ``startup`` (a fresh
    budget of ``startup_timeout`` when None); a schema that is too old fails at once.
    """
    if startup is None:
        startup = Startup(cfg.startup_timeout)
    version = await startup.retry("checking the schema version", driver.schema_version)
    if version < SCHEMA_VERSION:
        raise TrioqueueError(
            f"the database schema is at version {version}, this trioqueue needs "
            f"{SCHEMA_VERSION}: run `trioqueue migrate` (or `await trioqueue.migrate(url)`)"
        )
    client = Client(driver, cfg, workers, queues, driver.clock)
    # job_wait's service: it runs in the nursery below, with the enqueuer or the runtime.
    waits = JobWaits(driver, cfg.fetch_poll_interval, cfg.poll_only)
    client._waits = waits
    if client._runtime is None:
        # An insert-only client enqueues its periodic jobs too: those it was opened with
        # and any added later (with none, its enqueuer just waits for a change).
        enqueuer = PeriodicEnqueuer(
            driver,
            driver.clock,
            client.periodic_jobs,
            client._inserts,
            PeriodicEnqueuerConfig(max_sleep=cfg.leader_interval),
        )

        async def enqueue() -> None:
            running_client.set(client)  # for the args functions; this task's context only
            await enqueuer.run()

        # The block's own exception comes out as itself, as from a client without the
        # enqueuer's nursery: it is held while the nursery closes, then raised, also when
        # the nursery ends with only the Cancelled of a scope around the client.
        raised: BaseException | None = None
        others: BaseExceptionGroup[BaseException] | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(enqueue)
                await nursery.start(waits.run)
                try:
                    yield client
                except BaseException as exc:  # raised again below
                    raised = exc
                finally:
                    nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            _, others = group.split(trio.Cancelled)
            # A Cancelled in the block that the enqueuer's failure caused (its nursery
            # cancelled the block) is not the block's own: the group says what happened.
            if raised is None or (others is not None and isinstance(raised, trio.Cancelled)):
                raise
        if raised is not None and others is not None:
            raise BaseExceptionGroup(
                "the client's block and its periodic enqueuer failed",
                [
                    raised,
                    *others.exceptions,
                ],
            )
        if raised is not None:
            raise raised
        return
    # A job's KeyboardInterrupt or SystemExit stops the client once its outcome is written
    # (docs/failure-modes.md), and comes out as itself, not nested in nursery groups; so
    # does the DatabaseError a start-up step (registering the queues) failed with.
    if client._runtime.notifier is not None:
        # Waits take the runtime's notifications while it runs, then their own.
        waits.share(client._runtime.notifier, client._runtime.done)
    with fatal_unwrapped(), startup.failure_unwrapped():
        async with trio.open_nursery() as nursery:
            await nursery.start(waits.run)
            await nursery.start(client._runtime.run, startup)
            try:
                yield client
            finally:
                client._runtime.soft_stop()
                # Jobs still finishing in the soft stop may wait too: waits end (and
                # pending ones raise) once the runtime is done.
                waits.close(after=client._runtime.done)

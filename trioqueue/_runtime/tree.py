"""The whole nursery tree of a running client, in one place (DESIGN §1).

```
Runtime.run
└── nursery "services"
    ├── notifier         one LISTEN connection → callbacks (unless poll_only)
    ├── elector          leader election; while leader, its nursery runs maintenance:
    │   └── scheduler, rescuer, cleaner, queue cleaner
    ├── periodic jobs    this client's periodic jobs, leader or not (each run inserted once)
    ├── queue keeper     re-announces our queues; in poll_only mode, polls pause state
    ├── stop watcher     soft_stop_timeout → hard stop
    └── dispatcher       receives event batches from the completer, fans out
        └── nursery "completion"
            ├── completer    outcomes → batched writes → events
            └── nursery "work"
                └── producer per queue → its worker tasks (each job in its own cancel scope)
```

Every channel points outward: the completer's event channel is closed only when the
completion nursery is done, and the completer is closed only when the work nursery is done,
so nothing can be sent to a receiver that has stopped reading, and shutdown cannot hang on a
full channel. Soft stop cancels the producers' fetch scopes; hard stop also cancels their
job nurseries, and each cancelled or still-queued job hands back an "interrupted" outcome
first.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, final

import attrs
import trio

from .._maintenance.cleaner import Cleaner, CleanerConfig, QueueCleaner
from .._maintenance.elector import Elector
from .._maintenance.periodic import PeriodicEnqueuer, PeriodicEnqueuerConfig, PrepareInsert
from .._maintenance.rescuer import Rescuer, RescuerConfig
from .._maintenance.scheduler import Scheduler, SchedulerConfig
from ..config import ClientConfig, QueueConfig
from ..current import running_client
from ..driver.protocol import CONTROL_CHANNEL, INSERT_CHANNEL, LEADERSHIP_CHANNEL, Driver
from ..errors import DatabaseError
from ..events import Event, EventKind
from ..job import Job
from ..periodic import PeriodicJobs
from ..workers import Workers
from .completer import FLUSH_SIZE, Completer
from .dispatcher import Dispatcher
from .executor import Executor
from .notifier import Notifier
from .outcome import next_retry_delay
from .producer import Producer
from .startup import Startup

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["Runtime"]

log = logging.getLogger("trioqueue.runtime")

EVENT_CHANNEL_SIZE = 1024
"""Batches of events in flight from the completer to the dispatcher."""

QUEUE_ANNOUNCE_INTERVAL = 600.0
"""Seconds between re-announcements of this client's queues (so the queue cleaner, which
deletes rows not announced for a day, leaves them alone)."""


@final
@attrs.define(eq=False)
class Runtime:
    """The working part of a client with queues. Build it, ``await nursery.start(rt.run)``,
    and stop it with :meth:`soft_stop` / :meth:`hard_stop`."""

    driver: Driver
    config: ClientConfig
    workers: Workers
    queues: Mapping[str, QueueConfig]
    now: Callable[[], datetime]
    periodic_jobs: PeriodicJobs = attrs.field(factory=PeriodicJobs)
    """The client's periodic jobs, enqueued by this client whether it leads or not."""
    prepare_insert: PrepareInsert | None = None
    """The client's insert-params builder; without it no periodic jobs are enqueued."""
    client: Client | None = None
    """What ``trioqueue.current_client()`` returns in this runtime's tasks."""
    dispatcher: Dispatcher = attrs.field(factory=Dispatcher, init=False)
    producers: dict[str, Producer] = attrs.field(factory=dict, init=False)
    notifier: Notifier | None = attrs.field(default=None, init=False)
    elector: Elector | None = attrs.field(default=None, init=False)
    completer: Completer | None = attrs.field(default=None, init=False)
    done: trio.Event = attrs.field(factory=trio.Event, init=False)
    started: trio.Event = attrs.field(factory=trio.Event, init=False)
    """Set once start-up succeeded (the queues are registered, the producers run)."""
    _stopping: trio.Event = attrs.field(factory=trio.Event, init=False)
    _hard: bool = attrs.field(default=False, init=False)
    _paused: dict[str, bool] = attrs.field(factory=dict, init=False)

    def soft_stop(self) -> None:
        """Stop fetching; let running jobs finish. Idempotent, not a checkpoint."""
        for producer in self.producers.values():
            producer.soft_stop()
        self._stopping.set()

    def hard_stop(self) -> None:
        """Stop fetching and cancel running jobs (they go back to ``available``)."""
        self._hard = True
        for producer in self.producers.values():
            producer.hard_stop()
        self._stopping.set()

    def cancel_running_job(self, job_id: int, queue: str | None = None) -> bool:
        """Cancel a job this client runs; False if it does not run it."""
        producers = [self.producers[queue]] if queue in self.producers else self.producers.values()
        return any(p.cancel_job(job_id) for p in producers)

    def queue_changed(self, action: str, queue: str) -> None:
        """A queue was paused or resumed (seen through a control message or a poll).
        Emits an event only when this client runs the queue and its state changed."""
        paused = action == "pause"
        if queue not in self.producers or self._paused.get(queue) == paused:
            return
        self._paused[queue] = paused
        kind = EventKind.QUEUE_PAUSED if paused else EventKind.QUEUE_RESUMED
        self.dispatcher.publish([Event(kind, queue=queue)])
        if action == "resume":
            self.producers[queue].wake()

    def _on_insert(self, payload: dict[str, Any]) -> None:
        producer = self.producers.get(str(payload.get("queue")))
        if producer is not None:
            producer.wake()

    def _on_control(self, payload: dict[str, Any]) -> None:
        action = payload.get("action")
        if action == "cancel":
            job_id = payload.get("job_id")
            if isinstance(job_id, int):
                self.cancel_running_job(job_id, payload.get("queue"))
        elif action in ("pause", "resume"):
            self.queue_changed(str(action), str(payload.get("queue")))

    def max_pending(self) -> int:
        """How many finished-but-unwritten outcomes the completer holds before workers
        wait: the client's worker slots, and at least one flush. With the jobs that are
        running, that is all a crash can make run again (docs/failure-modes.md)."""
        return max(sum(q.max_workers for q in self.queues.values()), FLUSH_SIZE)

    @property
    def is_leader(self) -> bool:
        return self.elector is not None and self.elector.is_leader

    def _retry_delay(self, job: Job[Any]) -> float:
        return next_retry_delay(job, self.workers.get(job.kind), self.config.retry_policy)[0]

    def _maintenance_services(self) -> list[Callable[[], Any]]:
        cfg = self.config
        scheduler = Scheduler(
            self.driver, self.now, SchedulerConfig(interval=cfg.scheduler_interval)
        )
        rescuer = Rescuer(
            self.driver,
            self.now,
            self.workers,
            self._retry_delay,
            RescuerConfig(
                interval=cfg.rescuer_interval,
                rescue_after=cfg.rescue_stuck_jobs_after,
                scheduler_interval=cfg.scheduler_interval,
            ),
        )
        cleaner = Cleaner(
            self.driver,
            self.now,
            CleanerConfig(
                interval=cfg.cleaner_interval,
                completed_retention=cfg.completed_job_retention,
                cancelled_retention=cfg.cancelled_job_retention,
                discarded_retention=cfg.discarded_job_retention,
            ),
        )
        queue_cleaner = QueueCleaner(self.driver, self.now)
        return [scheduler.run, rescuer.run, cleaner.run, queue_cleaner.run]

    async def _queue_keeper(self) -> None:
        """Re-announce our queues now and then; in poll_only mode also poll their pause
        state, since no control notifications arrive."""
        poll = max(self.config.fetch_poll_interval, 1.0)
        announce_at = trio.current_time() + QUEUE_ANNOUNCE_INTERVAL
        while True:
            await trio.sleep(poll if self.config.poll_only else QUEUE_ANNOUNCE_INTERVAL)
            try:
                if trio.current_time() >= announce_at:
                    announce_at = trio.current_time() + QUEUE_ANNOUNCE_INTERVAL
                    for name in self.producers:
                        await self.driver.queue_upsert(name, self.now())
                if self.config.poll_only:
                    paused = await self.driver.queue_paused(list(self.producers))
                    for name in self.producers:
                        self.queue_changed("pause" if name in paused else "resume", name)
            except DatabaseError as exc:
                log.warning("queue upkeep failed: %s", exc)

    def _wake_all(self) -> None:
        for producer in self.producers.values():
            producer.wake()

    async def run(
        self,
        startup: Startup | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the tree until stopped. Reports started once every producer runs.

        Registering the queues retries transient database errors under ``startup`` (the
        client's start-up budget; a fresh ``startup_timeout`` when None), then fails
        the start with its DatabaseError. On cancellation from outside: a hard stop,
        with the final writes shielded for up to ``shutdown_timeout`` seconds.
        """
        if startup is None:
            startup = Startup(self.config.startup_timeout)
        if self.client is not None:
            running_client.set(self.client)  # inherited by every task below this one
        try:
            async with trio.open_nursery() as services:
                if not self.config.poll_only:
                    self.notifier = Notifier(
                        self.driver, [INSERT_CHANNEL, CONTROL_CHANNEL, LEADERSHIP_CHANNEL]
                    )
                    self.notifier.subscribe(INSERT_CHANNEL, self._on_insert)
                    self.notifier.subscribe(CONTROL_CHANNEL, self._on_control)
                    self.notifier.on_connect(self._wake_all)
                    await services.start(self.notifier.run)
                self.elector = Elector(
                    self.driver,
                    self.config.id,
                    self.config.leader_interval,
                    self.now,
                    self._maintenance_services(),
                )
                if self.notifier is not None:
                    self.notifier.subscribe(LEADERSHIP_CHANNEL, self.elector.on_notification)
                services.start_soon(self.elector.run)
                if self.prepare_insert is not None:
                    periodic = PeriodicEnqueuer(
                        self.driver,
                        self.now,
                        self.periodic_jobs,
                        self.prepare_insert,
                        PeriodicEnqueuerConfig(max_sleep=self.config.leader_interval),
                    )
                    services.start_soon(self._after_start, periodic.run)
                services.start_soon(self._queue_keeper)
                services.start_soon(self._stop_watcher)
                await self._run_dispatch(startup, task_status)
                services.cancel_scope.cancel()
        finally:
            self.done.set()

    async def _after_start(self, run: Callable[[], Awaitable[None]]) -> None:
        """``await run()`` once start-up has succeeded: a client whose start fails
        inserts nothing (a periodic run, say)."""
        await self.started.wait()
        await run()

    async def _stop_watcher(self) -> None:
        await self._stopping.wait()
        if self.config.soft_stop_timeout is not None and not self._hard:
            await trio.sleep(self.config.soft_stop_timeout)
            log.info("soft_stop_timeout passed: cancelling running jobs")
            self.hard_stop()

    async def _run_dispatch(self, startup: Startup, task_status: trio.TaskStatus[None]) -> None:
        event_send, event_receive = trio.open_memory_channel[list[Event]](EVENT_CHANNEL_SIZE)
        async with trio.open_nursery() as dispatch:
            dispatch.start_soon(self.dispatcher.run, event_receive, self.config.shutdown_timeout)
            self.completer = Completer(
                self.driver,
                self.now,
                event_send,
                self.workers.args_type,
                self.config.shutdown_timeout,
                self.dispatcher.wants_job_events,
                max_pending=self.max_pending(),
            )
            async with trio.open_nursery() as completion:
                completion.start_soon(self.completer.run)
                try:
                    await self._run_work(startup, task_status)
                finally:
                    self.completer.close()

    async def _register_queue(self, name: str) -> bool:
        """Announce queue ``name``; whether it is paused."""
        return await self.driver.queue_upsert(name, self.now())

    async def _run_work(self, startup: Startup, task_status: trio.TaskStatus[None]) -> None:
        assert self.completer is not None
        executor = Executor(self.workers, self.config, self.completer, self.now)
        for name, queue_config in self.queues.items():
            self.producers[name] = Producer(
                queue=name,
                max_workers=queue_config.max_workers,
                driver=self.driver,
                client_id=self.config.id,
                executor=executor,
                completer=self.completer,
                now=self.now,
                fetch_cooldown=self.config.fetch_cooldown,
                fetch_poll_interval=self.config.fetch_poll_interval,
                check_cancels=self.config.poll_only,
            )
        for name in self.producers:
            self._paused[name] = await startup.retry(
                f"registering queue {name!r}", functools.partial(self._register_queue, name)
            )
        async with trio.open_nursery() as work:
            for producer in self.producers.values():
                await work.start(producer.run)
            if self._hard:
                self.hard_stop()
            elif self._stopping.is_set():
                self.soft_stop()
            self.started.set()
            task_status.started()

"""The whole nursery tree of a running client, in one place: `Runtime.run`.

```
Runtime.run                                                  _runtime/tree.py
└── nursery "services"
    ├── notifier        one LISTEN connection → callbacks     _runtime/notifier.py
    │                   (unless poll_only)
    ├── elector         leader election; while leader, its    _maintenance/elector.py
    │   │               nursery runs maintenance:
    │   └── scheduler, rescuer, cleaner, queue cleaner        _maintenance/*.py
    ├── periodic jobs   this client's periodic jobs, leader   _maintenance/periodic.py
    │                   or not (each run inserted once)
    ├── queue keeper    re-announces our queues; in poll_only  (here)
    │                   mode, polls their pause state
    ├── stop watcher    soft_stop_timeout → hard stop         (here)
    └── nursery "dispatch"
        ├── dispatcher  events → subscribers; drains until    _runtime/dispatcher.py
        │               every event sender has closed
        └── nursery "completion"
            ├── completer  outcomes → batched writes →        _runtime/completer.py
            │              events; closes its event sender
            │              when its input has closed
            └── nursery "work"
                └── producer per queue → its worker tasks     _runtime/producer.py,
                    (jobs run in lanes)                       claimed.py, executor.py
```

Every channel points outward, and closes as the nesting unwinds: each producer holds a
handle on the completer's input and closes it as it ends, and the runtime closes the
original handle when the work nursery is done, so the completer's input closes exactly
when no outcome can come any more. The completer then closes its event sender, and the
runtime its own (which carries queue events) when the completion nursery is done; only
then does the dispatcher's drain end. Nothing can be sent to a receiver that has stopped
reading, and shutdown cannot hang on a full channel. Soft stop cancels the producers'
fetch scopes; hard stop also cancels their job scopes, and each cancelled or still-queued
job hands back an "interrupted" outcome first.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, final

import attrs
import trio

from .._insert import InsertBuilder
from .._maintenance.cleaner import Cleaner, CleanerConfig, QueueCleaner
from .._maintenance.elector import Elector
from .._maintenance.periodic import PeriodicEnqueuer, PeriodicEnqueuerConfig
from .._maintenance.rescuer import Rescuer, RescuerConfig
from .._maintenance.scheduler import Scheduler, SchedulerConfig
from ..config import ClientConfig, QueueConfig
from ..current import running_client
from ..driver.protocol import CONTROL_CHANNEL, INSERT_CHANNEL, LEADERSHIP_CHANNEL, Driver
from ..errors import DatabaseError
from ..events import Event, EventKind
from ..periodic import PeriodicJobs
from ..workers import Workers
from .completer import FLUSH_SIZE, Completer
from .dispatcher import Dispatcher
from .executor import Executor
from .notifier import Notifier
from .producer import Producer
from .startup import Startup

if TYPE_CHECKING:
    from ..client import Client

__all__ = ["Runtime"]

log = logging.getLogger("trioqueue.runtime")

EVENT_CHANNEL_SIZE = 1024
"""Batches of events in flight to the dispatcher."""

LIMITS_SETTLE = 5.0
"""Seconds after start-up when a client with limits announces its limited queues again,
refreshing the partition keys of jobs inserted while it first stored the limits."""
QUEUE_ANNOUNCE_INTERVAL = 600.0
"""Seconds between re-announcements of this client's queues (so the queue cleaner, which
deletes rows not announced for a day, leaves them alone)."""


@final
@attrs.define(eq=False)
class Runtime:
    """The working part of a client with queues. Build it (every part is built here),
    ``await nursery.start(rt.run)``, and stop it with :meth:`soft_stop` /
    :meth:`hard_stop`."""

    driver: Driver
    config: ClientConfig
    workers: Workers
    queues: Mapping[str, QueueConfig]
    now: Callable[[], datetime]
    periodic_jobs: PeriodicJobs = attrs.field(factory=PeriodicJobs)
    """The client's periodic jobs, enqueued by this client whether it leads or not."""
    inserts: InsertBuilder | None = None
    """The client's insert builder; without it no periodic jobs are enqueued."""
    client: Client | None = None
    """What ``trioqueue.current_client()`` returns in this runtime's tasks."""
    dispatcher: Dispatcher = attrs.field(factory=Dispatcher, init=False)
    completer: Completer = attrs.field(init=False)
    producers: dict[str, Producer] = attrs.field(factory=dict, init=False)
    notifier: Notifier | None = attrs.field(default=None, init=False)
    """None in poll_only mode."""
    elector: Elector = attrs.field(init=False)
    periodic: PeriodicEnqueuer | None = attrs.field(default=None, init=False)
    done: trio.Event = attrs.field(factory=trio.Event, init=False)
    started: trio.Event = attrs.field(factory=trio.Event, init=False)
    """Set once start-up succeeded (the queues are registered, the producers run)."""
    _events_out: trio.MemorySendChannel[list[Event]] = attrs.field(init=False)
    _events_in: trio.MemoryReceiveChannel[list[Event]] = attrs.field(init=False)
    _stopping: trio.Event = attrs.field(factory=trio.Event, init=False)
    _hard: bool = attrs.field(default=False, init=False)
    _paused: dict[str, bool] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        cfg = self.config
        self._events_out, self._events_in = trio.open_memory_channel[list[Event]](
            EVENT_CHANNEL_SIZE
        )
        self.completer = Completer(
            self.driver,
            self.now,
            self._events_out.clone(),
            self.workers.args_type,
            cfg.shutdown_timeout,
            self.dispatcher.audience,
            max_pending=self.max_pending(),
        )
        executor = Executor(self.workers, cfg, self.now)
        for name, queue_config in self.queues.items():
            self.producers[name] = Producer(
                queue=name,
                max_workers=queue_config.max_workers,
                limits=queue_config.limits,
                driver=self.driver,
                client_id=cfg.id,
                executor=executor,
                completer=self.completer,
                now=self.now,
                fetch_cooldown=cfg.fetch_cooldown,
                fetch_poll_interval=cfg.fetch_poll_interval,
                check_cancels=cfg.poll_only,
            )
        self.elector = Elector(
            self.driver, cfg.id, cfg.leader_interval, self.now, self._maintenance_services()
        )
        if not cfg.poll_only:
            self.notifier = Notifier(
                self.driver, [INSERT_CHANNEL, CONTROL_CHANNEL, LEADERSHIP_CHANNEL]
            )
            self.notifier.subscribe(INSERT_CHANNEL, self._on_insert)
            self.notifier.subscribe(CONTROL_CHANNEL, self._on_control)
            self.notifier.subscribe(LEADERSHIP_CHANNEL, self.elector.on_notification)
            self.notifier.on_connect(self._wake_all)
        if self.inserts is not None:
            self.periodic = PeriodicEnqueuer(
                self.driver,
                self.now,
                self.periodic_jobs,
                self.inserts,
                PeriodicEnqueuerConfig(max_sleep=cfg.leader_interval),
            )

    async def run(
        self,
        startup: Startup | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Run the tree until stopped. Reports started once every producer runs.

        Registering the queues retries transient database errors under ``startup`` (the
        client's start-up budget; a fresh ``startup_timeout`` when None), then fails the
        start with its DatabaseError. On cancellation from outside: a hard stop, with the
        final writes shielded for up to ``shutdown_timeout`` seconds, and every event they
        produce still delivered (the dispatcher drains until the completer is done).
        """
        startup = Startup(self.config.startup_timeout) if startup is None else startup
        if self.client is not None:
            running_client.set(self.client)  # inherited by every task below this one
        try:
            async with trio.open_nursery() as services:
                if self.notifier is not None:
                    await services.start(self.notifier.run)
                services.start_soon(self.elector.run)
                if self.periodic is not None:
                    services.start_soon(self._after_start, self.periodic.run)
                services.start_soon(self._queue_keeper)
                services.start_soon(self._stop_watcher)
                async with trio.open_nursery() as dispatch:
                    with self._events_out:
                        dispatch.start_soon(self.dispatcher.run, self._events_in)
                        async with trio.open_nursery() as completion:
                            completion.start_soon(self.completer.run)
                            with self.completer.sender() as outcomes:
                                await self._register_queues(startup)
                                async with trio.open_nursery() as work:
                                    for producer in self.producers.values():
                                        await work.start(producer.run, outcomes.clone())
                                    self.started.set()
                                    task_status.started()
                services.cancel_scope.cancel()
        finally:
            self.done.set()

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
        Emits an event, through the dispatcher's channel like every other, only when this
        client runs the queue and its state changed. Not a checkpoint."""
        paused = action == "pause"
        if queue not in self.producers or self._paused.get(queue) == paused:
            return
        self._paused[queue] = paused
        kind = EventKind.QUEUE_PAUSED if paused else EventKind.QUEUE_RESUMED
        try:
            self._events_out.send_nowait([Event(kind, queue=queue)])
        except trio.WouldBlock:
            log.warning("event dispatcher not keeping up: %s event dropped", kind)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the client has stopped: no subscription can see it any more
        if action == "resume":
            self.producers[queue].wake()

    def max_pending(self) -> int:
        """How many finished-but-unwritten outcomes the completer holds before workers
        wait: the client's worker slots, and at least one flush. With the jobs that are
        running, that is all a crash can make run again (docs/failure-modes.md)."""
        return max(sum(q.max_workers for q in self.queues.values()), FLUSH_SIZE)

    @property
    def is_leader(self) -> bool:
        return self.elector.is_leader

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

    def _wake_all(self) -> None:
        for producer in self.producers.values():
            producer.wake()

    def _maintenance_services(self) -> list[Callable[[], Any]]:
        cfg = self.config
        scheduler = Scheduler(
            self.driver, self.now, SchedulerConfig(interval=cfg.scheduler_interval)
        )
        rescuer = Rescuer(
            self.driver,
            self.now,
            self.workers,
            cfg.retry_policy,
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

    async def _register_queues(self, startup: Startup) -> None:
        """Announce every queue, retrying transient errors under ``startup``."""
        for name in self.producers:
            self._paused[name] = await startup.retry(
                f"registering queue {name!r}", functools.partial(self._register_queue, name)
            )

    async def _register_queue(self, name: str) -> bool:
        """Announce queue ``name``; whether it is paused."""
        return await self.driver.queue_upsert(name, self.now(), self.queues[name].limits)

    async def _queue_keeper(self) -> None:
        """Re-announce our queues now and then; in poll_only mode also poll their pause
        state, since no control notifications arrive."""
        poll = max(self.config.fetch_poll_interval, 1.0)
        announce_at = trio.current_time() + QUEUE_ANNOUNCE_INTERVAL
        limited = [name for name, queue in self.queues.items() if queue.limits is not None]
        if limited:
            # Jobs inserted while this client stored its limits may have read the limits
            # before: a second announcement gives them their partition keys.
            await trio.sleep(LIMITS_SETTLE)
            for name in limited:
                try:
                    await self.driver.queue_upsert(
                        name, self.now(), self.queues[name].limits, rekey=True
                    )
                except DatabaseError as exc:
                    log.warning("queue upkeep failed: %s", exc)
        while True:
            await trio.sleep(poll if self.config.poll_only else QUEUE_ANNOUNCE_INTERVAL)
            try:
                if trio.current_time() >= announce_at:
                    announce_at = trio.current_time() + QUEUE_ANNOUNCE_INTERVAL
                    for name in self.producers:
                        await self.driver.queue_upsert(name, self.now(), self.queues[name].limits)
                if self.config.poll_only:
                    paused = await self.driver.queue_paused(list(self.producers))
                    for name in self.producers:
                        self.queue_changed("pause" if name in paused else "resume", name)
            except DatabaseError as exc:
                log.warning("queue upkeep failed: %s", exc)

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

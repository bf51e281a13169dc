"""OpenTelemetry tracing and metrics for inserts and job runs (the ``otel`` extra).

Not imported by ``trioqueue`` itself; import it when you want it::

    from trioqueue.otel import OpenTelemetryMiddleware

    otel = OpenTelemetryMiddleware()          # the global tracer and meter providers
    async with tq.open_client(url, workers=workers, queues=queues, middleware=[otel]):
        ...

One object is both insert and worker middleware. Spans: ``trioqueue.insert_many``
(PRODUCER) around each insert call and ``trioqueue.work/<kind>`` (CONSUMER) around each
run, with the OpenTelemetry messaging attributes. Metrics: counters
``trioqueue.insert.count`` (jobs) and ``trioqueue.work.count`` (runs, by outcome), and
histograms ``trioqueue.insert.duration`` and ``trioqueue.work.duration`` in seconds.

Queue depth: :func:`report_queue_depth` publishes the observable gauges
``trioqueue.queue.depth`` (jobs ``available`` and ``running`` per queue) and
``trioqueue.queue.held_back`` (due jobs a limited queue's limits hold back) for as long as it
runs in one of your nurseries. See docs/observability.md.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, NoReturn, TypeVar, final

import trio
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from . import __version__
from .errors import DatabaseError, JobCancel, JobSnooze, ValidationError
from .job import Job
from .middleware import InsertParams, WorkNext

if TYPE_CHECKING:
    from .client import Client

__all__ = ["OpenTelemetryMiddleware", "report_queue_depth"]

log = logging.getLogger("trioqueue.otel")

R = TypeVar("R")

SYSTEM: Final = "trioqueue"
DURATION_BUCKETS: Final = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
"""Histogram buckets in seconds (the SDK's defaults are meant for milliseconds)."""


def _outcome(exc: BaseException | None) -> str:
    """A run's outcome as the worker middleware sees it.

    ``aborted``: the run's cancel scope was cancelled (its timeout, ``job_cancel`` or a
    hard stop); the executor tells those apart only after the middleware has returned.
    """
    if exc is None:
        return "ok"
    if isinstance(exc, JobSnooze):
        return "snoozed"
    if isinstance(exc, JobCancel):
        return "cancelled"
    if isinstance(exc, Exception):
        return "error"
    return "aborted"


@final
class OpenTelemetryMiddleware:
    """Insert and worker middleware that records spans and metrics.

    ``tracer_provider`` / ``meter_provider``: None uses OpenTelemetry's global providers.
    Exceptions pass through unchanged; the middleware never alters an insert or a run.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("trioqueue", __version__, tracer_provider)
        meter = metrics.get_meter("trioqueue", __version__, meter_provider)
        self._insert_count = meter.create_counter(
            "trioqueue.insert.count", unit="{job}", description="Jobs passed to an insert call."
        )
        self._work_count = meter.create_counter(
            "trioqueue.work.count", unit="{run}", description="Job runs, by outcome."
        )
        self._insert_duration = _histogram(
            meter, "trioqueue.insert.duration", "Duration of insert calls."
        )
        self._work_duration = _histogram(meter, "trioqueue.work.duration", "Duration of job runs.")

    def __repr__(self) -> str:
        return "OpenTelemetryMiddleware()"

    async def insert_many(
        self,
        params: list[InsertParams],
        call_next: Callable[[list[InsertParams]], Awaitable[R]],
    ) -> R:
        """Trace and count one insert call; returns what ``call_next`` returns."""
        by_kind_queue = Counter((p.kind, p.queue) for p in params)
        kinds = sorted({kind for kind, _ in by_kind_queue})
        queues = sorted({queue for _, queue in by_kind_queue})
        attributes: dict[str, Any] = {
            "messaging.system": SYSTEM,
            "messaging.operation.type": "publish",
            "messaging.operation.name": "insert_many",
            "messaging.batch.message_count": len(params),
            "trioqueue.job.kind": kinds[0] if len(kinds) == 1 else kinds,
        }
        if len(queues) == 1:
            attributes["messaging.destination.name"] = queues[0]
        priorities = {p.priority for p in params}
        if len(priorities) == 1:
            attributes["trioqueue.job.priority"] = priorities.pop()
        start = time.perf_counter()
        status = "ok"
        with self._tracer.start_as_current_span(
            "trioqueue.insert_many",
            kind=SpanKind.PRODUCER,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return await call_next(params)
            except BaseException as exc:
                status = "error"
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
                raise
            finally:
                self._insert_duration.record(
                    time.perf_counter() - start, {"messaging.system": SYSTEM, "status": status}
                )
                for (kind, queue), n in by_kind_queue.items():
                    self._insert_count.add(
                        n,
                        {
                            "messaging.system": SYSTEM,
                            "messaging.destination.name": queue,
                            "trioqueue.job.kind": kind,
                            "status": status,
                        },
                    )

    async def work(self, job: Job[Any], call_next: WorkNext) -> object:
        """Trace, time and count one run; exceptions pass through unchanged, and the
        worker's return value (the job's output) too."""
        start = time.perf_counter()
        failure: BaseException | None = None
        with self._tracer.start_as_current_span(
            f"trioqueue.work/{job.kind}",
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": SYSTEM,
                "messaging.operation.type": "process",
                "messaging.operation.name": "work",
                "messaging.destination.name": job.queue,
                "messaging.message.id": str(job.id),
                "trioqueue.job.kind": job.kind,
                "trioqueue.job.attempt": job.attempt,
                "trioqueue.job.priority": job.priority,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                return await call_next(job)
            except BaseException as exc:
                failure = exc
                raise
            finally:
                outcome = _outcome(failure)
                span.set_attribute("trioqueue.job.outcome", outcome)
                if outcome in ("error", "aborted", "cancelled"):
                    assert failure is not None
                    if outcome == "error":
                        span.record_exception(failure)
                    span.set_status(
                        Status(StatusCode.ERROR, f"{type(failure).__name__}: {failure}")
                    )
                labels = {
                    "messaging.system": SYSTEM,
                    "messaging.destination.name": job.queue,
                    "trioqueue.job.kind": job.kind,
                    "outcome": outcome,
                }
                self._work_duration.record(time.perf_counter() - start, labels)
                self._work_count.add(1, labels)


def _histogram(meter: metrics.Meter, name: str, description: str) -> metrics.Histogram:
    kwargs: dict[str, Any] = {}
    # Bucket advice arrived in opentelemetry-api 1.23; older APIs use the SDK's buckets.
    if (
        "explicit_bucket_boundaries_advisory"
        in inspect.signature(meter.create_histogram).parameters
    ):
        kwargs["explicit_bucket_boundaries_advisory"] = list(DURATION_BUCKETS)
    return meter.create_histogram(name, unit="s", description=description, **kwargs)


async def report_queue_depth(
    client: Client,
    *,
    meter_provider: metrics.MeterProvider | None = None,
    interval: float = 15.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Publish how many jobs wait and run in each queue, and how many its limits hold
    back, until cancelled::

        async with trio.open_nursery() as nursery:
            await nursery.start(report_queue_depth, client)

    The observable gauge ``trioqueue.queue.depth`` (unit ``{job}``) has one point per queue
    and state (attributes ``messaging.system``, ``messaging.destination.name`` and
    ``trioqueue.job.state``: ``available`` or ``running``). The observable gauge
    ``trioqueue.queue.held_back`` (unit ``{job}``) has one point per queue with limits
    (``GlobalLimit``, ``RateLimit``; attributes ``messaging.system`` and
    ``messaging.destination.name``): its due jobs that the limits hold back now, which
    ``available`` counts too. Partitions are not attributes: their values come from job
    args, unbounded in number.

    Every ``interval`` seconds this task reads :meth:`Client.queue_list` (one statement,
    counted from the fetch index, so its cost follows the backlog, not the table; plus one
    per limited queue, over that queue's due and running jobs); the
    gauges' callbacks, which the SDK calls from its own thread, only hand out the latest
    reading and never touch the database. A failed read is logged and the previous reading
    kept. ``task_status`` is started after the first reading. On cancellation the gauges
    report nothing more.
    """
    if not interval > 0:
        raise ValidationError("interval", "must be a positive number of seconds")
    depth: tuple[Observation, ...] = ()
    held_back: tuple[Observation, ...] = ()

    def observe_depth(options: CallbackOptions) -> Iterable[Observation]:
        return depth

    def observe_held_back(options: CallbackOptions) -> Iterable[Observation]:
        return held_back

    meter = metrics.get_meter("trioqueue", __version__, meter_provider)
    meter.create_observable_gauge(
        "trioqueue.queue.depth",
        callbacks=[observe_depth],
        unit="{job}",
        description="Jobs available and running per queue.",
    )
    meter.create_observable_gauge(
        "trioqueue.queue.held_back",
        callbacks=[observe_held_back],
        unit="{job}",
        description="Due jobs that a queue's limits hold back, per limited queue.",
    )
    started = False
    try:
        while True:
            try:
                queues = await client.queue_list()
            except DatabaseError as exc:
                log.warning("reading queue depths failed; keeping the last reading: %s", exc)
            else:
                depth = tuple(
                    Observation(
                        count,
                        {
                            "messaging.system": SYSTEM,
                            "messaging.destination.name": q.name,
                            "trioqueue.job.state": state,
                        },
                    )
                    for q in queues
                    for state, count in (("available", q.available), ("running", q.running))
                )
                held_back = tuple(
                    Observation(
                        q.held_back,
                        {"messaging.system": SYSTEM, "messaging.destination.name": q.name},
                    )
                    for q in queues
                    if q.global_limit is not None or q.rate_limit is not None
                )
            if not started:
                started = True
                task_status.started()
            await trio.sleep(interval)
    finally:
        depth = held_back = ()

"""trioqueue.otel: spans and metrics, read back with the SDK's in-memory exporter/reader.

Every test that opens a client runs on both drivers (the ``store_url`` fixture): a memory
store of its own and a fresh PostgreSQL database.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

import attrs
import pytest
import trio
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from support import FAST, eventually

import trioqueue as tq
from trioqueue.limits import QueueLimits
from trioqueue.otel import OpenTelemetryMiddleware


@attrs.frozen
class Task:
    kind: ClassVar[str] = "otel_task"
    mode: str = "ok"


async def _work(job: tq.Job[Task]) -> None:
    if job.args.mode == "fail":
        raise RuntimeError("boom")
    if job.args.mode == "snooze":
        raise tq.JobSnooze(60)


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def reader() -> InMemoryMetricReader:
    return InMemoryMetricReader()


def _middleware(exporter: InMemorySpanExporter, reader: InMemoryMetricReader) -> Any:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OpenTelemetryMiddleware(
        tracer_provider=tracer_provider, meter_provider=MeterProvider(metric_readers=[reader])
    )


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    result: dict[str, list[Any]] = {}
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                result[metric.name] = list(metric.data.data_points)
    return result


async def test_spans_and_metrics_for_inserts_and_runs(
    store_url: str, exporter: InMemorySpanExporter, reader: InMemoryMetricReader
) -> None:
    otel = _middleware(exporter, reader)
    workers = tq.Workers()
    workers.add(Task, _work)
    began = trio.current_time()
    async with tq.open_client(
        store_url,
        workers=workers,
        queues={"default": tq.QueueConfig(max_workers=10)},
        middleware=[otel],
        **FAST,
    ) as client:
        async with client.subscribe(
            tq.EventKind.JOB_COMPLETED, tq.EventKind.JOB_FAILED, tq.EventKind.JOB_SNOOZED
        ) as events:
            await client.insert_many(
                [Task("ok"), Task("fail"), (Task("snooze"), tq.InsertOpts(priority=2))]
            )
            await client.insert_many_fast([Task("ok")])
            with trio.fail_after(30):
                for _ in range(4):
                    await events.receive()
        with pytest.raises(tq.ValidationError):
            await client.insert(Task("ok"), tq.InsertOpts(priority=9))
    elapsed = trio.current_time() - began

    spans = exporter.get_finished_spans()
    inserts = [s for s in spans if s.name == "trioqueue.insert_many"]
    works = [s for s in spans if s.name == "trioqueue.work/otel_task"]
    assert len(inserts) == 2 and len(works) == 4
    first = inserts[0]
    assert first.kind is SpanKind.PRODUCER
    assert first.attributes is not None
    assert first.attributes["messaging.system"] == "trioqueue"
    assert first.attributes["messaging.operation.type"] == "publish"
    assert first.attributes["messaging.destination.name"] == "default"
    assert first.attributes["messaging.batch.message_count"] == 3
    assert first.attributes["trioqueue.job.kind"] == "otel_task"
    assert first.status.status_code is StatusCode.UNSET

    by_outcome = {s.attributes["trioqueue.job.outcome"]: s for s in works if s.attributes}
    assert set(by_outcome) == {"ok", "error", "snoozed"}
    failed = by_outcome["error"]
    assert failed.kind is SpanKind.CONSUMER
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.events[0].name == "exception"
    attributes = failed.attributes
    assert attributes is not None
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.destination.name"] == "default"
    assert attributes["trioqueue.job.kind"] == "otel_task"
    assert attributes["trioqueue.job.attempt"] == 1
    assert attributes["trioqueue.job.priority"] == 1
    assert int(str(attributes["messaging.message.id"])) > 0
    assert by_outcome["snoozed"].status.status_code is StatusCode.UNSET
    assert by_outcome["snoozed"].attributes["trioqueue.job.priority"] == 2  # type: ignore[index]

    points = _points(reader)
    inserted = {(p.attributes["status"], p.value) for p in points["trioqueue.insert.count"]}
    # The rejected insert never reaches the middleware: InsertOpts(priority=9) fails first.
    assert inserted == {("ok", 4)}
    runs = {p.attributes["outcome"]: p.value for p in points["trioqueue.work.count"]}
    assert runs == {"ok": 2, "error": 1, "snoozed": 1}
    durations = points["trioqueue.work.duration"]
    assert sum(p.count for p in durations) == 4
    assert all(0 <= p.sum <= elapsed for p in durations)  # seconds, not a finer unit
    assert sum(p.count for p in points["trioqueue.insert.duration"]) == 2


async def test_a_failed_insert_is_an_error_span(
    store_url: str, exporter: InMemorySpanExporter, reader: InMemoryMetricReader
) -> None:
    otel = _middleware(exporter, reader)

    class Refuse:
        def insert_begin(self, params: list[tq.InsertParams]) -> None:
            raise RuntimeError("refused")

    async with tq.open_client(store_url, middleware=[otel], hooks=[Refuse()]) as c:
        with pytest.raises(RuntimeError, match="refused"):
            await c.insert(Task())
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    points = _points(reader)
    assert [p.attributes["status"] for p in points["trioqueue.insert.count"]] == ["error"]


def test_trioqueue_does_not_import_opentelemetry() -> None:
    import subprocess
    import sys

    code = "import sys, trioqueue; sys.exit('opentelemetry' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


async def test_queue_depth_gauge_follows_the_queues(
    store_url: str, reader: InMemoryMetricReader
) -> None:
    from trioqueue.otel import report_queue_depth

    workers = tq.Workers()
    workers.add(Task, _work)
    provider = MeterProvider(metric_readers=[reader])

    def depth() -> dict[tuple[str, str], int]:
        return {
            (
                p.attributes["messaging.destination.name"],
                p.attributes["trioqueue.job.state"],
            ): p.value
            for p in _points(reader)["trioqueue.queue.depth"]
        }

    async with tq.open_client(
        store_url, workers=workers, queues={"default": tq.QueueConfig()}, **FAST
    ) as client:
        await client.queue_pause("default")
        await client.insert_many([Task(), Task(), Task()])
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: report_queue_depth(
                    client, meter_provider=provider, interval=0.1, task_status=task_status
                )
            )
            # Started after its first reading.
            assert depth() == {("default", "available"): 3, ("default", "running"): 0}
            await client.insert(Task())
            # A later reading has the new job.
            await eventually(lambda: depth()[("default", "available")] == 4)
            assert depth() == {("default", "available"): 4, ("default", "running"): 0}
            nursery.cancel_scope.cancel()
        # Nothing once it stopped (no other metric here, so no data at all).
        assert reader.get_metrics_data() is None
        with pytest.raises(tq.ValidationError, match="interval"):
            await report_queue_depth(client, meter_provider=provider, interval=0)


@attrs.frozen
class Call:
    kind: ClassVar[str] = "otel_call"
    customer: str


async def test_held_back_gauge_per_limited_queue(
    store_url: str, reader: InMemoryMetricReader
) -> None:
    from trioqueue.otel import report_queue_depth

    provider = MeterProvider(metric_readers=[reader])
    limits = QueueLimits(tq.GlobalLimit(1, by_args=("customer",)))

    def held_back() -> dict[str, int]:
        return {
            p.attributes["messaging.destination.name"]: p.value
            for p in _points(reader)["trioqueue.queue.held_back"]
        }

    async with tq.open_client(store_url) as client:
        customers = ["a", "a", "a", "b", "b"]
        await client.insert_many([(Call(c), tq.InsertOpts(queue="calls")) for c in customers])
        await client.insert(Task())
        now = datetime.now(UTC)
        await client.driver.queue_upsert("calls", now, limits)
        await client.driver.queue_upsert("default", now)
        fetched = await client.driver.job_get_available_limited("calls", now, 10, "t", limits)
        assert len(fetched.rows) == 2  # one per customer: three held back
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: report_queue_depth(
                    client, meter_provider=provider, interval=0.1, task_status=task_status
                )
            )
            # One point per limited queue; "default" has no limits, so no point.
            assert held_back() == {"calls": 3}
            points = _points(reader)["trioqueue.queue.held_back"]
            assert dict(points[0].attributes) == {
                "messaging.system": "trioqueue",
                "messaging.destination.name": "calls",
            }
            await client.insert(Call("b"), tq.InsertOpts(queue="calls"))
            await eventually(lambda: held_back() == {"calls": 4})
            nursery.cancel_scope.cancel()
        assert reader.get_metrics_data() is None


async def test_the_middleware_passes_the_output_on(
    store_url: str, exporter: InMemorySpanExporter, reader: InMemoryMetricReader
) -> None:
    """What the worker returns is the job's output, through the middleware too."""

    async def answer(job: tq.Job[Task]) -> dict[str, str]:
        return {"mode": job.args.mode}

    workers = tq.Workers()
    workers.add(Task, answer)
    async with tq.open_client(
        store_url,
        workers=workers,
        queues={"default": tq.QueueConfig(max_workers=2)},
        middleware=[_middleware(exporter, reader)],
        **FAST,
    ) as client:
        job = (await client.insert(Task("echo"))).job
        with trio.fail_after(30):
            done = await client.job_wait(job.id)
    assert (done.state, done.output) == (tq.JobState.COMPLETED, {"mode": "echo"})
    assert [s.name for s in exporter.get_finished_spans()].count("trioqueue.work/otel_task") == 1

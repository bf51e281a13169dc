"""Insert and worker middleware, hooks, per-job logging and the dropped-events counter.

Every test that opens a client runs on both drivers (the ``store_url`` fixture): a memory
store of its own and a fresh PostgreSQL database.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar, TypeVar

import attrs
import pytest
import trio
from support import FAST

import trioqueue as tq
from trioqueue._runtime.executor import Executor
from trioqueue.middleware import WorkNext, build_work_chain

R = TypeVar("R")

FINAL = {
    tq.EventKind.JOB_COMPLETED,
    tq.EventKind.JOB_FAILED,
    tq.EventKind.JOB_CANCELLED,
    tq.EventKind.JOB_SNOOZED,
}


@attrs.frozen
class Task:
    kind: ClassVar[str] = "task"
    mode: str = "ok"


@attrs.frozen
class Other:
    kind: ClassVar[str] = "other"


class Recorder:
    """Insert and worker middleware that records the order it runs in."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log
        self.seen: list[BaseException | None] = []

    async def insert_many(
        self,
        params: list[tq.InsertParams],
        call_next: Callable[[list[tq.InsertParams]], Awaitable[R]],
    ) -> R:
        self.log.append(f"{self.name}>insert")
        result = await call_next(params)
        self.log.append(f"<{self.name}")
        return result

    async def work(self, job: tq.Job[Any], call_next: WorkNext) -> None:
        self.log.append(f"{self.name}>work")
        try:
            await call_next(job)
        except BaseException as exc:
            self.seen.append(exc)
            raise
        else:
            self.seen.append(None)
        finally:
            self.log.append(f"<{self.name}")


class Retag:
    """Insert middleware that changes every job's priority and tags."""

    def __init__(self) -> None:
        self.calls = 0

    async def insert_many(
        self,
        params: list[tq.InsertParams],
        call_next: Callable[[list[tq.InsertParams]], Awaitable[R]],
    ) -> R:
        self.calls += 1
        changed = [attrs.evolve(p, priority=3, tags=(*p.tags, "mw")) for p in params]
        return await call_next(changed)


def _workers(log: list[str], **add: Any) -> tq.Workers:
    workers = tq.Workers()

    async def work(job: tq.Job[Task]) -> None:
        log.append(f"run {job.args.mode}")
        mode = job.args.mode
        if mode == "fail":
            raise RuntimeError("boom")
        if mode == "snooze":
            raise tq.JobSnooze(60)
        if mode == "cancel":
            raise tq.JobCancel("not wanted")
        if mode == "hang":
            await trio.sleep_forever()

    workers.add(Task, work, **add)
    return workers


@asynccontextmanager
async def _client(url: str, workers: tq.Workers | None, **config: Any) -> AsyncIterator[tq.Client]:
    """A client on ``url``: insert-only without ``workers``, else working ``default``."""
    queues = {"default": tq.QueueConfig(max_workers=10)} if workers is not None else None
    async with tq.open_client(url, workers=workers, queues=queues, **FAST, **config) as client:
        yield client


async def _run(client: tq.Client, *items: Any) -> list[tq.Event]:
    """Insert ``items`` and wait for the first outcome event of each."""
    async with client.subscribe(*FINAL) as events:
        await client.insert_many(list(items))
        seen: list[tq.Event] = []
        with trio.fail_after(30):
            async for event in events:
                seen.append(event)
                if len(seen) == len(items):
                    return seen
    raise AssertionError("events ended early")


async def test_insert_middleware_changes_params_on_every_insert_variant(store_url: str) -> None:
    retag = Retag()
    async with _client(store_url, None, middleware=[retag]) as client:
        await client.insert(Task("a"))
        await client.insert(Task("b"), tq.InsertOpts(tags=["own"], priority=1))
        await client.insert_many([Task("c"), (Other(), tq.InsertOpts(queue="q2"))])
        assert await client.insert_many_fast([Task("d"), Task("e")]) == 2
        async with client.transaction() as tx:
            await client.insert_tx(tx, Task("f"))
            await client.insert_many_tx(tx, [Task("g")])
            assert await client.insert_many_fast_tx(tx, [Task("h")]) == 1
        jobs = (await client.job_list()).jobs
    assert retag.calls == 7
    assert len(jobs) == 9
    assert {j.priority for j in jobs} == {3}
    assert all(j.tags[-1] == "mw" for j in jobs)
    assert next(j for j in jobs if j.args["mode"] == "b").tags == ["own", "mw"]
    assert next(j for j in jobs if j.kind == "other").queue == "q2"


async def test_insert_params_carry_the_defaults(store_url: str) -> None:
    seen: list[tq.InsertParams] = []

    class Look:
        async def insert_many(
            self,
            params: list[tq.InsertParams],
            call_next: Callable[[list[tq.InsertParams]], Awaitable[R]],
        ) -> R:
            seen.extend(params)
            return await call_next(params)

    async with _client(store_url, None, middleware=[Look()], max_attempts=7) as client:
        res = await client.insert(Task("x"), tq.InsertOpts(metadata={"k": 1}))
    (p,) = seen
    assert (p.kind, p.queue, p.priority, p.max_attempts) == ("task", "default", 1, 7)
    assert p.args == Task("x") and p.metadata == {"k": 1} and p.tags == ()
    assert p.scheduled_at == res.job.scheduled_at
    assert res.job.max_attempts == 7


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda ps: [attrs.evolve(ps[0], priority=9)], "InsertOpts.priority"),
        (lambda ps: [attrs.evolve(ps[0], queue="bad queue!")], "InsertOpts.queue"),
        (lambda ps: [attrs.evolve(ps[0], metadata={"x": object()})], "InsertOpts.metadata"),
        (lambda ps: [], "jobs"),
        (lambda ps: [Task("raw")], "jobs"),
    ],
)
async def test_what_insert_middleware_passes_on_is_validated(
    store_url: str, change: Callable[[list[tq.InsertParams]], Any], field: str
) -> None:
    class Bad:
        async def insert_many(
            self,
            params: list[tq.InsertParams],
            call_next: Callable[[list[tq.InsertParams]], Awaitable[R]],
        ) -> R:
            return await call_next(change(params))

    async with _client(store_url, None, middleware=[Bad()]) as client:
        with pytest.raises(tq.ValidationError) as info:
            await client.insert(Task("x"))
        assert info.value.field == field
        with pytest.raises(tq.ValidationError):
            await client.insert_many_fast([Task("y")])
        assert (await client.job_list()).jobs == []


async def test_order_of_client_and_kind_middleware_and_hooks(store_url: str) -> None:
    log: list[str] = []

    class Hooks:
        def insert_begin(self, params: list[tq.InsertParams]) -> None:
            log.append(f"insert_begin {len(params)}")

        async def work_begin(self, job: tq.Job[Any]) -> None:
            log.append("work_begin")

        def work_end(self, job: tq.Job[Any], error: BaseException | None) -> None:
            log.append(f"work_end {error!r}")

    async def fn_middleware(job: tq.Job[Any], call_next: WorkNext) -> None:
        log.append("D>work")
        await call_next(job)
        log.append("<D")

    workers = _workers(log, middleware=[Recorder("C", log), fn_middleware])
    a, b = Recorder("A", log), Recorder("B", log)
    async with _client(store_url, workers, middleware=[a, b], hooks=[Hooks()]) as client:
        # Paused while inserting: otherwise the producer, woken by the insert's
        # notification, may start the job before the insert middleware has unwound.
        await client.queue_pause("default")
        async with client.subscribe(*FINAL) as events:
            await client.insert_many([Task("ok")])
            await client.queue_resume("default")
            with trio.fail_after(30):
                event = await events.receive()
    assert event.kind is tq.EventKind.JOB_COMPLETED
    assert log == [
        "A>insert",
        "B>insert",
        "insert_begin 1",
        "<B",
        "<A",
        "work_begin",
        "A>work",
        "B>work",
        "C>work",
        "D>work",
        "run ok",
        "<D",
        "<C",
        "<B",
        "<A",
        "work_end None",
    ]


async def test_a_kinds_own_hooks_run_after_the_clients(store_url: str) -> None:
    log: list[str] = []

    class Named:
        def __init__(self, name: str) -> None:
            self.name = name

        def work_begin(self, job: tq.Job[Any]) -> None:
            log.append(f"{self.name}.work_begin")

        async def work_end(self, job: tq.Job[Any], error: BaseException | None) -> None:
            log.append(f"{self.name}.work_end {error!r}")

    class Fail:
        def work_end(self, job: tq.Job[Any], error: BaseException | None) -> BaseException:
            return tq.JobCancel("the kind said no")

    workers = _workers(log, middleware=[Recorder("C", log)], hooks=[Named("K"), Fail()])
    async with _client(
        store_url, workers, middleware=[Recorder("A", log)], hooks=[Named("H")]
    ) as client:
        [event] = await _run(client, Task("ok"))
    assert log[log.index("H.work_begin") :] == [
        "H.work_begin",
        "K.work_begin",
        "A>work",
        "C>work",
        "run ok",
        "<C",
        "<A",
        "K.work_end None",
        "H.work_end JobCancel('the kind said no')",
    ]
    # The kind's hook turned the run into a cancel; the client's hook saw that.
    assert event.kind is tq.EventKind.JOB_CANCELLED


async def test_worker_middleware_sees_exceptions_and_outcomes_keep_their_meaning(
    store_url: str,
) -> None:
    log: list[str] = []
    rec = Recorder("A", log)
    workers = _workers(log, timeout=0.2)
    async with _client(store_url, workers, middleware=[rec], max_attempts=1) as client:
        events = await _run(
            client, Task("fail"), Task("snooze"), Task("cancel"), Task("hang"), Task("ok")
        )
        by_mode = {e.job.args.mode: e for e in events if e.job is not None}
        hang = await client.job_get(by_mode["hang"].job.id)  # type: ignore[union-attr]
    assert by_mode["fail"].job.state is tq.JobState.DISCARDED  # type: ignore[union-attr]
    assert by_mode["cancel"].kind is tq.EventKind.JOB_CANCELLED
    assert by_mode["ok"].kind is tq.EventKind.JOB_COMPLETED
    assert "JobTimeoutError" in hang.errors[0].error
    kinds = sorted(type(e).__name__ for e in rec.seen)
    assert kinds == ["Cancelled", "JobCancel", "JobSnooze", "NoneType", "RuntimeError"]


async def test_work_end_hook_can_rewrite_the_outcome(store_url: str) -> None:
    seen: list[tuple[str, str]] = []

    class End:
        def work_end(self, job: tq.Job[Any], error: BaseException | None) -> Any:
            seen.append((job.args.mode, type(error).__name__))
            if job.args.mode == "fail":
                return tq.JobCancel("the hook cancels it")
            if job.args.mode == "ok":
                return RuntimeError("the hook fails it")
            return None

    class Raising:
        async def work_end(self, job: tq.Job[Any], error: BaseException | None) -> None:
            if job.args.mode == "snooze":
                raise ValueError("hook raised")

    async with _client(store_url, _workers([]), hooks=[End(), Raising()], max_attempts=1) as client:
        events = await _run(client, Task("fail"), Task("ok"), Task("snooze"))
        by_mode = {e.job.args.mode: e for e in events if e.job is not None}
        ok = await client.job_get(by_mode["ok"].job.id)  # type: ignore[union-attr]
    assert by_mode["fail"].kind is tq.EventKind.JOB_CANCELLED
    assert by_mode["ok"].kind is tq.EventKind.JOB_FAILED
    assert ok.errors[0].error == "RuntimeError: the hook fails it"
    assert by_mode["snooze"].kind is tq.EventKind.JOB_FAILED
    assert sorted(seen) == [("fail", "RuntimeError"), ("ok", "NoneType"), ("snooze", "JobSnooze")]


async def test_insert_begin_hook_can_stop_an_insert(store_url: str) -> None:
    class Refuse:
        async def insert_begin(self, params: list[tq.InsertParams]) -> None:
            if any(p.queue == "closed" for p in params):
                raise tq.ValidationError("queue", "this queue is closed")

    async with _client(store_url, None, hooks=[Refuse()]) as client:
        with pytest.raises(tq.ValidationError, match="closed"):
            await client.insert_many([Task("a"), (Task("b"), tq.InsertOpts(queue="closed"))])
        await client.insert(Task("c"))
        assert len((await client.job_list()).jobs) == 1


def test_bad_middleware_and_hooks_are_rejected() -> None:
    with pytest.raises(tq.ValidationError) as info:
        tq.ClientConfig(middleware=[object()])
    assert info.value.field == "middleware[0]"
    with pytest.raises(tq.ValidationError, match="list"):
        tq.ClientConfig(middleware="mw")
    with pytest.raises(tq.ValidationError) as info:
        tq.ClientConfig(hooks=[Retag(), object()])
    assert info.value.field == "hooks[0]"
    with pytest.raises(tq.ValidationError) as info:
        tq.Workers().add(Task, _noop, middleware=[Retag()])
    assert info.value.field == "middleware[0]"
    with pytest.raises(tq.ValidationError, match="insert_begin belongs") as info:
        tq.Workers().add(Task, _noop, hooks=[Named0()])
    assert info.value.field == "hooks[0]"
    with pytest.raises(tq.ValidationError, match="work_begin or work_end") as info:
        tq.Workers().add(Task, _noop, hooks=[object()])
    cfg = tq.ClientConfig(middleware=[Retag()], hooks=None)
    assert cfg.hooks == () and len(cfg.middleware) == 1


async def _noop(job: tq.Job[Any]) -> None:
    pass


class Named0:
    def insert_begin(self, params: list[tq.InsertParams]) -> None:
        pass


def test_without_middleware_a_run_awaits_the_worker_itself() -> None:
    """Zero cost when unused: the chain of a kind is the worker function, no layer."""
    workers = tq.Workers()
    workers.add(Task, _noop)
    entry = workers.get("task")
    assert entry is not None
    assert build_work_chain(entry.fn, (), (), ()) is _noop
    assert build_work_chain(entry.fn, (Retag(),), (), (object(),)) is _noop
    executor = Executor(workers, tq.ClientConfig(), None)  # type: ignore[arg-type]
    assert executor._chain(entry) is _noop
    assert executor._work_ends == ()


async def test_job_end_logging_fields_and_levels(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trioqueue.executor")
    async with _client(store_url, _workers([]), max_attempts=2) as client:
        await _run(client, Task("ok"))
        async with client.subscribe(tq.EventKind.JOB_FAILED) as events:
            res = await client.insert(Task("fail"))
            with trio.fail_after(30):
                first = await events.receive()
                assert first.job is not None and first.job.state is tq.JobState.RETRYABLE
                await client.job_retry(res.job.id)
                await events.receive()
    records = [r for r in caplog.records if r.name == "trioqueue.executor"]
    done = next(r for r in records if getattr(r, "outcome", None) == "completed")
    assert done.levelno == logging.DEBUG
    assert (done.kind, done.queue, done.attempt, done.state) == ("task", "default", 1, "completed")
    assert isinstance(done.job_id, int) and done.duration >= 0
    failed = [r for r in records if getattr(r, "outcome", None) == "failed"]
    assert [r.levelno for r in failed] == [logging.WARNING, logging.ERROR]
    assert [r.state for r in failed] == ["retryable", "discarded"]
    assert "RuntimeError: boom" in failed[1].getMessage()


async def test_no_per_job_line_above_debug_for_successful_jobs(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trioqueue")
    async with _client(store_url, _workers([])) as client:
        await _run(client, Task("ok"), Task("ok"))
    assert [r for r in caplog.records if r.name == "trioqueue.executor"] == []


async def test_dropped_events_are_counted_in_statistics(store_url: str) -> None:
    async with _client(store_url, _workers([])) as client:
        async with client.subscribe(tq.EventKind.JOB_COMPLETED, buffer=1) as slow:
            await _run(client, Task("ok"), Task("ok"), Task("ok"))
            assert slow.dropped == 2
            assert client.statistics()["dispatcher"].dropped == 2


async def test_middleware_and_hooks_end_to_end(store_url: str) -> None:
    log: list[str] = []
    retag = Retag()
    rec = Recorder("A", log)
    ended: list[int] = []

    class End:
        def work_end(self, job: tq.Job[Any], error: BaseException | None) -> None:
            ended.append(job.id)

    workers = _workers(log, middleware=[Recorder("K", log)])
    async with tq.open_client(
        store_url,
        workers=workers,
        queues={"default": tq.QueueConfig(max_workers=10)},
        middleware=[retag, rec],
        hooks=[End()],
        **FAST,
    ) as client:
        async with client.subscribe(tq.EventKind.JOB_COMPLETED) as events:
            await client.insert(Task("ok"))
            async with client.transaction() as tx:
                await client.insert_tx(tx, Task("ok"))
                await client.insert_many_fast_tx(tx, [Task("ok"), Task("ok")])
            await client.insert_many_fast([Task("ok")])
            with trio.fail_after(30):
                done = [await events.receive() for _ in range(5)]
        with pytest.raises(tq.ValidationError):
            await client.insert(Task("ok"), tq.InsertOpts(queue="bad queue!"))
    assert retag.calls == 4
    assert all(e.job is not None and e.job.priority == 3 for e in done)
    assert all(e.job is not None and e.job.tags == ["mw"] for e in done)
    assert log.count("K>work") == 5 and log.count("run ok") == 5
    assert sorted(ended) == sorted(e.job.id for e in done if e.job is not None)
    assert rec.seen == [None] * 5

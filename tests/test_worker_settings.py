"""WorkerSettings, current_client() and typed args on read (issue 14)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar, overload

import attrs
import pytest
import trio
from support import FAST

import trioqueue as tq
from trioqueue.testing import work_one


@attrs.frozen
class OrderArgs:
    kind: ClassVar[str] = "order"
    order_id: int


@attrs.frozen
class NotifyArgs:
    kind: ClassVar[str] = "notify"
    order_id: int


def _workers(seen: list[tuple[str, Any]]) -> tq.Workers:
    workers = tq.Workers()

    @workers.worker(OrderArgs)
    async def ship(job: tq.Job[OrderArgs]) -> None:
        client = tq.current_client()
        seen.append(("job", client))
        await client.insert(NotifyArgs(job.args.order_id))

    @workers.worker(NotifyArgs)
    async def notify(job: tq.Job[NotifyArgs]) -> None:
        seen.append(("notify", job.args.order_id))

    return workers


# ------------------------------------------------------------------ WorkerSettings


def test_settings_have_every_client_option() -> None:
    """Every ClientConfig option is a WorkerSettings field with the same default (id: None,
    a fresh id per client), so nothing open_client takes is missing from a worker."""
    config_fields = {f.name: f for f in attrs.fields(tq.ClientConfig)}
    settings_fields = {f.name: f for f in attrs.fields(tq.WorkerSettings)}
    assert set(settings_fields) == set(config_fields) | {"workers", "queues"}
    for name, field in config_fields.items():
        if name == "id":
            assert settings_fields[name].default is None
            continue
        default = settings_fields[name].default
        if isinstance(default, attrs.Factory):  # type: ignore[arg-type]
            default = default.factory()
        assert default == field.default, name


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"job_timeout": -1}, "job_timeout"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"queues": {"bad queue": tq.QueueConfig()}}, "queues"),
        ({"queues": {"default": 5}}, "queues['default']"),
        ({"workers": "nope"}, "workers"),
        ({"periodic_jobs": "x"}, "periodic_jobs"),
        ({"id": ""}, "id"),
        ({"args_types": [int]}, "args_types[0]"),
        ({"args_types": OrderArgs}, "args_types"),
    ],
)
def test_settings_are_validated_when_built(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(tq.ValidationError) as info:
        tq.WorkerSettings(**kwargs)
    assert info.value.field == field


def test_settings_are_immutable_and_normalised() -> None:
    job = tq.PeriodicJob(every=60, args=lambda: OrderArgs(1), id="p")
    settings = tq.WorkerSettings(periodic_jobs=[job], args_types=[OrderArgs])
    assert settings.periodic_jobs == (job,)
    assert settings.args_types == (OrderArgs,)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        settings.job_timeout = 5  # type: ignore[misc]


async def test_open_client_with_settings_and_overrides() -> None:
    seen: list[tuple[str, Any]] = []
    settings = tq.WorkerSettings(
        workers=_workers(seen),
        queues={"default": tq.QueueConfig(max_workers=3)},
        job_timeout=12.5,
        max_attempts=7,
        id="from-settings",
        **FAST,
    )
    driver = tq.MemoryDriver()
    async with tq.open_client(driver=driver, settings=settings, max_attempts=3) as client:
        assert client.config.job_timeout == 12.5  # from the settings
        assert client.config.max_attempts == 3  # the keyword beside them wins
        assert client.id == "from-settings"
        assert client._queues == {"default": tq.QueueConfig(max_workers=3)}
    other = {"other": tq.QueueConfig(max_workers=1)}
    async with tq.open_client(driver=driver, settings=settings, queues=other) as client:
        assert client._queues == other
    with pytest.raises(tq.ValidationError) as info:
        async with tq.open_client(driver=driver, settings=settings, job_timeout=0):
            pass
    assert info.value.field == "job_timeout"
    with pytest.raises(tq.ValidationError) as info:
        async with tq.open_client(driver=driver, settings={"workers": None}):  # type: ignore[arg-type]
            pass
    assert info.value.field == "settings"


async def test_one_settings_object_serves_many_clients() -> None:
    """``id`` None in the settings: each client gets a fresh id of its own."""
    settings = tq.WorkerSettings(workers=_workers([]), queues={"default": tq.QueueConfig()})
    driver = tq.MemoryDriver()
    async with (
        tq.open_client(driver=driver, settings=settings) as a,
        tq.open_client(driver=driver, settings=settings) as b,
    ):
        assert a.id != b.id


# ------------------------------------------------------------------ current_client


async def test_current_client_outside_a_job_raises() -> None:
    with pytest.raises(RuntimeError, match="outside a job"):
        tq.current_client()
    async with tq.open_client(
        driver=tq.MemoryDriver(), workers=_workers([]), queues={"default": tq.QueueConfig()}
    ):
        # The application's own task, inside the client's block: still not a job.
        with pytest.raises(RuntimeError, match="outside a job"):
            tq.current_client()


class _Marks:
    def __init__(self, seen: list[tuple[str, Any]]) -> None:
        self.seen = seen

    async def work(
        self, job: tq.Job[Any], call_next: Callable[[tq.Job[Any]], Awaitable[None]]
    ) -> None:
        self.seen.append(("middleware", tq.current_client()))
        await call_next(job)


class _Hook:
    def __init__(self, seen: list[tuple[str, Any]]) -> None:
        self.seen = seen

    async def work_begin(self, job: tq.Job[Any]) -> None:
        self.seen.append(("work_begin", tq.current_client()))

    async def work_end(self, job: tq.Job[Any], error: BaseException | None) -> None:
        self.seen.append(("work_end", tq.current_client()))


@pytest.fixture(params=["memory", "postgres"])
def store(request: pytest.FixtureRequest) -> dict[str, Any]:
    """``open_client`` storage keywords: a fresh memory driver, or a fresh database."""
    if request.param == "memory":
        return {"driver": tq.MemoryDriver()}
    return {"database_url": request.getfixturevalue("database_url")}


async def test_current_client_in_jobs_middleware_hooks_and_error_handler(
    store: dict[str, Any],
) -> None:
    seen: list[tuple[str, Any]] = []
    workers = _workers(seen)

    @attrs.frozen
    class FailArgs:
        kind: ClassVar[str] = "fail_once"

    @workers.worker(FailArgs)
    async def fail(job: tq.Job[FailArgs]) -> None:
        raise ValueError("boom")

    def on_error(job: tq.Job[Any], exc: BaseException) -> tq.ErrorHandlerResult:
        seen.append(("error_handler", tq.current_client()))
        return tq.ErrorHandlerResult(set_cancelled=True)

    settings = tq.WorkerSettings(
        workers=workers,
        queues={"default": tq.QueueConfig(max_workers=4)},
        middleware=[_Marks(seen)],
        hooks=[_Hook(seen)],
        error_handler=on_error,
        **FAST,
    )
    with trio.fail_after(30):
        async with (
            tq.open_client(**store, settings=settings) as client,
            client.subscribe(tq.EventKind.JOB_COMPLETED, tq.EventKind.JOB_CANCELLED) as events,
        ):
            await client.insert(OrderArgs(7))
            await client.insert(FailArgs())
            finished: dict[str, tq.JobState] = {}
            async for event in events:
                assert event.job is not None
                finished[event.job.kind] = event.job.state
                if len(finished) == 3:
                    break
    assert finished == {
        "order": tq.JobState.COMPLETED,
        "notify": tq.JobState.COMPLETED,  # inserted by the job through current_client()
        "fail_once": tq.JobState.CANCELLED,
    }
    places = {place for place, _ in seen}
    assert places >= {"job", "middleware", "work_begin", "work_end", "error_handler", "notify"}
    assert all(value is client for place, value in seen if place != "notify")
    assert ("notify", 7) in seen


async def test_current_client_in_work_one() -> None:
    seen: list[tuple[str, Any]] = []
    async with tq.open_client(driver=tq.MemoryDriver()) as client:
        result = await work_one(_workers(seen), OrderArgs(3), client=client)
        assert result.job.state is tq.JobState.COMPLETED
        assert seen == [("job", client)]
        # The follow-up went through the same client.
        [notify] = (await client.job_list(tq.JobListParams(kinds=["notify"]))).jobs
        assert notify.args == {"order_id": 3}
        # ... and the test's own task is outside a job again.
        with pytest.raises(RuntimeError):
            tq.current_client()


# ------------------------------------------------------------------ args on read


async def test_insert_results_carry_the_inserted_args(store: dict[str, Any]) -> None:
    async with tq.open_client(**store) as client:
        given = OrderArgs(1)
        assert (await client.insert(given)).job.args is given
        async with client.transaction() as tx:
            assert (await client.insert_tx(tx, given)).job.args is given
        many = [NotifyArgs(2), (OrderArgs(3), tq.InsertOpts(priority=2)), {"kind_less": 1}]
        with pytest.raises(tq.ValidationError):
            await client.insert_many(many)
        results = await client.insert_many(many[:2])
        assert [r.job.args for r in results] == [NotifyArgs(2), OrderArgs(3)]
        assert results[0].job.args is many[0]
        # An insert-only client without args types reads them back as the stored object.
        assert (await client.job_get(results[0].job.id)).args == {"order_id": 2}

        # A unique duplicate is the existing job, decoded as the inserted args' type.
        unique = tq.InsertOpts(unique=tq.UniqueOpts(by_args=True))
        first = await client.insert(OrderArgs(9), unique)
        again = await client.insert(OrderArgs(9), unique)
        assert again.unique_skipped_as_duplicate
        assert again.job.id == first.job.id and again.job.args == OrderArgs(9)
        [a, b] = await client.insert_many([(OrderArgs(10), unique), (OrderArgs(10), unique)])
        assert not a.unique_skipped_as_duplicate and b.unique_skipped_as_duplicate
        assert b.job.id == a.job.id and b.job.args == OrderArgs(10)


async def test_insert_results_carry_the_args_of_a_sequence_read_once(
    store: dict[str, Any],
) -> None:
    """A sequence that builds its items as they are read: each result carries the very
    object that was encoded and stored (before, the items were read a second time for
    the results, giving other objects)."""

    class Fresh(Sequence[OrderArgs]):
        def __init__(self) -> None:
            self.made: list[OrderArgs] = []

        def __len__(self) -> int:
            return 3

        @overload
        def __getitem__(self, i: int) -> OrderArgs: ...
        @overload
        def __getitem__(self, i: slice) -> Sequence[OrderArgs]: ...
        def __getitem__(self, i: int | slice) -> Any:
            if isinstance(i, slice) or not 0 <= i < 3:
                raise IndexError(i)
            self.made.append(OrderArgs(len(self.made)))
            return self.made[-1]

    async with tq.open_client(**store, args_types=[OrderArgs]) as client:
        fresh = Fresh()
        results = await client.insert_many(fresh)
        assert [r.job.args for r in results] == [OrderArgs(0), OrderArgs(1), OrderArgs(2)]
        assert all(r.job.args is made for r, made in zip(results, fresh.made, strict=True))
        for r in results:
            assert (await client.job_get(r.job.id)).args == r.job.args


async def test_insert_middleware_replacing_args_is_what_comes_back() -> None:
    class Swap:
        async def insert_many(self, params: list[tq.InsertParams], call_next: Any) -> Any:
            return await call_next([attrs.evolve(p, args=NotifyArgs(99)) for p in params])

    async with tq.open_client(driver=tq.MemoryDriver(), middleware=[Swap()]) as client:
        job = (await client.insert(OrderArgs(1))).job
        assert job.kind == "notify" and job.args == NotifyArgs(99)


async def test_args_types_decode_reads_on_an_insert_only_client(store: dict[str, Any]) -> None:
    async with tq.open_client(**store, args_types=[OrderArgs]) as client:
        order = (await client.insert(OrderArgs(5))).job
        notify = (await client.insert(NotifyArgs(6))).job
        assert (await client.job_get(order.id)).args == OrderArgs(5)
        # Kinds it was not given still come back as the stored JSON object.
        assert (await client.job_get(notify.id)).args == {"order_id": 6}
        listed = (await client.job_list()).jobs
        assert [j.args for j in listed] == [OrderArgs(5), {"order_id": 6}]
    # A Workers on an insert-only client decodes its kinds too.
    async with tq.open_client(**store, workers=_workers([])) as client:
        assert (await client.job_get(notify.id)).args == NotifyArgs(6)
    with pytest.raises(tq.ValidationError, match="two args types"):

        @attrs.frozen
        class Clash:
            kind: ClassVar[str] = "order"

        tq.ClientConfig(args_types=[OrderArgs, Clash])


async def test_current_client_in_periodic_args_functions() -> None:
    """A periodic job's ``args`` function runs with current_client() set, on a client with
    queues and on an insert-only one opened with periodic jobs."""
    seen: list[tq.Client] = []
    called = trio.Event()

    def args() -> NotifyArgs:
        seen.append(tq.current_client())
        called.set()
        return NotifyArgs(1)

    job = tq.PeriodicJob(every=0.05, args=args, id="p", run_on_start=True)
    driver = tq.MemoryDriver()
    with trio.fail_after(30):
        async with tq.open_client(driver=driver, periodic_jobs=[job]) as insert_only:
            await called.wait()
        assert seen[0] is insert_only
        seen.clear()
        called = trio.Event()
        async with tq.open_client(
            driver=driver,
            workers=_workers([]),
            queues={"default": tq.QueueConfig()},
            periodic_jobs=[job],
            **FAST,
        ) as worker:
            await called.wait()
        assert seen[0] is worker


@pytest.mark.parametrize("cancel", [False, True])
async def test_a_job_stopping_its_own_client_does_not_wait_on_itself(cancel: bool) -> None:
    """``current_client().stop()`` from a job starts the stop and returns (before, a soft
    stop waited for the running jobs, the caller among them, for ever)."""
    after_stop: list[bool] = []

    @attrs.frozen
    class StopMe:
        kind: ClassVar[str] = "stop_me"

    workers = tq.Workers()

    async def stop_me(job: tq.Job[StopMe]) -> None:
        await tq.current_client().stop(cancel=cancel)
        after_stop.append(True)  # not reached on a hard stop: it cancels the caller

    workers.add(StopMe, stop_me)
    with trio.fail_after(20):
        async with tq.open_client(
            driver=tq.MemoryDriver(), workers=workers, queues={"default": tq.QueueConfig()}, **FAST
        ) as client:
            job_id = (await client.insert(StopMe())).job.id
            await client._runtime.done.wait()  # type: ignore[union-attr]
            job = await client.job_get(job_id)
    assert after_stop == ([] if cancel else [True])
    assert job.state is (tq.JobState.AVAILABLE if cancel else tq.JobState.COMPLETED)

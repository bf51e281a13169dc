"""Everything PostgreSQL cannot store is a ValidationError before anything is written
(issue 13, item 5): names with a trailing newline; NUL, lone surrogates, NaN/±Infinity,
non-str keys, circular or too deep values in args and metadata; reserved metadata keys;
scheduled times out of range once in UTC; ids and cursors past bigint; bad list filters.

Each case runs on every insert path and on both drivers (the memory driver and
PostgreSQL), and checks that the job count did not change.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar

import attrs
import pytest
import trio

import trioqueue as tq
from trioqueue._maintenance.periodic import PeriodicEnqueuer
from trioqueue.config import ClientConfig
from trioqueue.errors import DatabaseError
from trioqueue.job import validate_kind, validate_queue_name
from trioqueue.periodic import PeriodicJobs

MAX_JSON_DEPTH = 100
"""The documented nesting limit (the object itself is level 1)."""
RESERVED_METADATA_KEYS = ("cancel_attempted_at", "rescue_count", "snoozes")


def test_documented_limits() -> None:
    from trioqueue import _validate

    assert _validate.MAX_JSON_DEPTH == MAX_JSON_DEPTH
    assert frozenset(RESERVED_METADATA_KEYS) == _validate.RESERVED_METADATA_KEYS


@attrs.frozen
class Val:
    kind: ClassVar[str] = "val"
    x: Any = None


@dataclasses.dataclass
class DataVal:
    kind: ClassVar[str] = "data_val"
    x: Any = None


class MapVal(dict[Any, Any]):
    kind: ClassVar[str] = "map_val"


@attrs.frozen
class NewlineKind:
    kind: ClassVar[str] = "newline\n"
    x: int = 0


@pytest.fixture
async def client(store_url: str) -> AsyncIterator[tq.Client]:
    """An insert-only client on each driver."""
    async with tq.open_client(store_url) as c:
        yield c


async def _count(client: tq.Client) -> int:
    return len((await client.job_list(tq.JobListParams(limit=10_000))).jobs)


Insert = Callable[[tq.Client, Sequence[Any]], Awaitable[object]]


async def _insert(client: tq.Client, items: Sequence[Any]) -> object:
    return [await client.insert(*(i if isinstance(i, tuple) else (i,))) for i in items]


async def _insert_tx(client: tq.Client, items: Sequence[Any]) -> object:
    async with client.transaction() as tx:
        return [await client.insert_tx(tx, *(i if isinstance(i, tuple) else (i,))) for i in items]


async def _insert_many(client: tq.Client, items: Sequence[Any]) -> object:
    return await client.insert_many(items)


async def _insert_many_tx(client: tq.Client, items: Sequence[Any]) -> object:
    async with client.transaction() as tx:
        return await client.insert_many_tx(tx, items)


async def _insert_many_fast(client: tq.Client, items: Sequence[Any]) -> object:
    return await client.insert_many_fast(items)


async def _insert_many_fast_tx(client: tq.Client, items: Sequence[Any]) -> object:
    async with client.transaction() as tx:
        return await client.insert_many_fast_tx(tx, items)


PATHS: dict[str, Insert] = {
    "insert": _insert,
    "insert_tx": _insert_tx,
    "insert_many": _insert_many,
    "insert_many_tx": _insert_many_tx,
    "insert_many_fast": _insert_many_fast,
    "insert_many_fast_tx": _insert_many_fast_tx,
}


async def _assert_refused(
    client: tq.Client, bad: Any, field: str, rule: str, *, good_first: bool = True
) -> None:
    """``bad`` (an args object or an (args, opts) pair) is refused with ValidationError
    naming ``field`` and mentioning ``rule`` on every insert path, and nothing is
    written, not even the good job before it in the same call."""
    for name, path in PATHS.items():
        before = await _count(client)
        # One call per job on the insert path: a good job first would be written.
        items = [Val("fine"), bad] if good_first and name != "insert" else [bad]
        with pytest.raises(tq.ValidationError) as info:
            await path(client, items)
        assert info.value.field == field, (name, info.value)
        assert rule in info.value.rule, (name, info.value)
        assert await _count(client) == before, name


# ------------------------------------------------------------------ names


def test_names_with_a_trailing_newline_are_refused() -> None:
    # `$` matches before a trailing newline: `re.match` took each of these.
    with pytest.raises(tq.ValidationError, match=r"InsertOpts\.queue"):
        tq.InsertOpts(queue="default\n")
    with pytest.raises(tq.ValidationError, match=r"InsertOpts\.tags"):
        tq.InsertOpts(tags=["urgent\n"])
    with pytest.raises(tq.ValidationError, match=r"^kind"):
        validate_kind("sort\n")
    with pytest.raises(tq.ValidationError, match=r"queue"):
        validate_queue_name("queue", "default\n")
    with pytest.raises(tq.ValidationError, match=r"PeriodicJob\.id"):
        tq.PeriodicJob(every=60, args=lambda: Val(), id="nightly\n")


async def test_a_kind_with_a_trailing_newline_is_refused_on_every_path(
    client: tq.Client,
) -> None:
    await _assert_refused(client, NewlineKind(), "kind", "job kind")


async def test_queue_pause_and_resume_refuse_a_trailing_newline(client: tq.Client) -> None:
    for call in (client.queue_pause, client.queue_resume):
        with pytest.raises(tq.ValidationError, match=r"queue"):
            await call("default\n")
    assert await client.queue_list() == []


# ------------------------------------------------------------------ args and metadata

_circular_list: list[Any] = []
_circular_list.append(_circular_list)
_circular_dict: dict[str, Any] = {}
_circular_dict["self"] = _circular_dict


def _nested(levels: int) -> Any:
    """``levels`` lists inside one another."""
    value: Any = []
    for _ in range(levels - 1):
        value = [value]
    return value


BAD_JSON: list[tuple[str, Any, str]] = [
    ("NUL in text", "a\x00b", "NUL"),
    ("NUL in a nested key", {"k\x00": 1}, "NUL"),
    ("NUL deep in a list", [["ok", "\x00"]], "NUL"),
    ("lone surrogate", "\udc80", "surrogate"),
    ("lone surrogate in a key", {"\ud800": 1}, "surrogate"),
    ("NaN", math.nan, "finite"),
    ("Infinity", math.inf, "finite"),
    ("-Infinity in a list", [1.0, -math.inf], "finite"),
    ("int key", {1: "a"}, "keys must be str"),
    ("keys 1 and '1'", {1: "a", "1": "b"}, "keys must be str"),
    ("None key", {None: 1}, "keys must be str"),
    ("tuple key", {(1, 2): 1}, "keys must be str"),
    ("circular list", _circular_list, "circular"),
    ("circular dict", _circular_dict, "circular"),
    ("too deep", _nested(MAX_JSON_DEPTH + 5), f"more than {MAX_JSON_DEPTH} levels"),
    ("far too deep", _nested(5000), f"more than {MAX_JSON_DEPTH} levels"),
    ("huge int", 10**5000, "digits"),
    ("a set", {1, 2}, "values are not JSON"),
    ("bytes", b"x", "values are not JSON"),
]


@pytest.mark.parametrize(
    ("value", "rule"), [(v, r) for _, v, r in BAD_JSON], ids=[n for n, _, _ in BAD_JSON]
)
def test_bad_json_values_are_refused_before_the_driver(value: Any, rule: str) -> None:
    """The fast check of the codec, without a database: the same rules on every args
    shape (attrs, dataclass, mapping) and in metadata."""
    from trioqueue._codec import encode_args, encode_metadata

    for args in (Val(value), DataVal(value), MapVal(x=value)):
        with pytest.raises(tq.ValidationError) as info:
            encode_args(args)
        assert info.value.field == "args"
        assert rule in info.value.rule, (args, info.value)
    with pytest.raises(tq.ValidationError) as info:
        encode_metadata({"k": value})
    assert info.value.field == "InsertOpts.metadata"
    assert rule in info.value.rule


async def test_bad_args_are_refused_on_every_path(client: tq.Client) -> None:
    for _, value, rule in BAD_JSON:
        await _assert_refused(client, Val(value), "args", rule)
        await _assert_refused(client, MapVal(x=value), "args", rule)


async def test_top_level_non_str_keys_of_mapping_args_are_refused(client: tq.Client) -> None:
    await _assert_refused(client, MapVal({1: "a", "1": "b"}), "args", "keys must be str")


async def test_bad_metadata_is_refused_on_every_path(client: tq.Client) -> None:
    for _, value, rule in BAD_JSON:
        bad = (Val(1), tq.InsertOpts(metadata={"k": value}))
        await _assert_refused(client, bad, "InsertOpts.metadata", rule)
    bad = (Val(1), tq.InsertOpts(metadata={7: "seven"}))
    await _assert_refused(client, bad, "InsertOpts.metadata", "keys must be str")


@pytest.mark.parametrize("key", RESERVED_METADATA_KEYS)
async def test_reserved_metadata_keys_are_refused(client: tq.Client, key: str) -> None:
    bad = (Val(1), tq.InsertOpts(metadata={"mine": 1, key: "x"}))
    await _assert_refused(client, bad, "InsertOpts.metadata", "reserved")


async def test_values_near_the_limits_round_trip(client: tq.Client) -> None:
    """What the fast check must not refuse: a literal backslash-u0000 (six characters),
    other control characters, non-ASCII text, astral characters, exactly
    ``MAX_JSON_DEPTH`` levels, big ints, subnormal floats."""
    values = [
        "\\u0000",
        "tab\tnew\nline\x01\x1f",
        "ünïcødé ✓ 日本",
        "\U0001f600",
        {"\\u0000": ["\\u0000"]},
        _nested(MAX_JSON_DEPTH - 1),  # with the args object: exactly the limit
        2**63,
        -(10**4000),
        5e-324,
        1.5,
    ]
    for value in values:
        for path in PATHS.values():
            await _delete_all(client)
            await path(client, [Val(value), (Val(1), tq.InsertOpts(metadata={"m": value}))])
            jobs = (await client.job_list(tq.JobListParams(limit=10))).jobs
            assert [j.args for j in jobs] == [{"x": value}, {"x": 1}]
            assert jobs[1].metadata == {"m": value}


async def _delete_all(client: tq.Client) -> None:
    for job in (await client.job_list(tq.JobListParams(limit=10_000))).jobs:
        await client.job_delete(job.id)


async def test_the_callers_transaction_survives_a_refused_insert(client: tq.Client) -> None:
    """A ValidationError is raised before anything is sent: the app's transaction goes on."""
    async with client.transaction() as tx:
        await client.insert_tx(tx, Val("kept"))
        for insert in (
            lambda: client.insert_tx(tx, Val("\x00")),
            lambda: client.insert_many_tx(tx, [Val(1), Val(math.nan)]),
            lambda: client.insert_many_fast_tx(tx, [Val(1), Val("\udc80")]),
        ):
            with pytest.raises(tq.ValidationError):
                await insert()
        await client.insert_many_fast_tx(tx, [Val("kept too")])
    assert sorted(j.args["x"] for j in (await client.job_list()).jobs) == ["kept", "kept too"]


# ------------------------------------------------------------------ times and numbers


def test_scheduled_at_that_overflows_in_utc_is_refused() -> None:
    late = datetime.max.replace(tzinfo=timezone(timedelta(hours=-14)))
    early = datetime.min.replace(tzinfo=timezone(timedelta(hours=14)))
    for at in (late, early):
        with pytest.raises(OverflowError):
            at.astimezone(UTC)
        with pytest.raises(tq.ValidationError, match=r"InsertOpts\.scheduled_at"):
            tq.InsertOpts(scheduled_at=at)


async def test_extreme_scheduled_at_that_fits_round_trips(client: tq.Client) -> None:
    latest = datetime.max.replace(tzinfo=timezone(timedelta(hours=14)))
    earliest = datetime.min.replace(tzinfo=timezone(timedelta(hours=-14)))
    for at in (
        latest,
        earliest,
        datetime.max.replace(tzinfo=UTC),
        datetime.min.replace(tzinfo=UTC),
    ):
        job = (await client.insert(Val(1), tq.InsertOpts(scheduled_at=at))).job
        assert job.scheduled_at == at
        assert (await client.job_get(job.id)).scheduled_at == at


async def test_unique_by_period_before_year_one_does_not_overflow(client: tq.Client) -> None:
    """A period that would start before year 1 (a long period, an early time) used to
    raise OverflowError or ValueError from the unique key."""
    early = datetime.min.replace(tzinfo=UTC)
    for period in (7, 10**9, 1e300):
        opts = tq.InsertOpts(scheduled_at=early, unique=tq.UniqueOpts(by_period=period))
        first = await client.insert(Val(period), opts)
        again = await client.insert(Val(period), opts)
        assert not first.unique_skipped_as_duplicate
        assert again.unique_skipped_as_duplicate and again.job.id == first.job.id


@pytest.mark.parametrize("period", [math.nan, math.inf, -math.inf, 0.5, True])
def test_unique_by_period_must_be_finite_and_at_least_one(period: float) -> None:
    with pytest.raises(tq.ValidationError, match=r"UniqueOpts\.by_period"):
        tq.UniqueOpts(by_period=period)


@pytest.mark.parametrize("job_id", [2**63, -(2**63) - 1, 10**30])
async def test_ids_past_bigint_are_refused(client: tq.Client, job_id: int) -> None:
    for call in (client.job_get, client.job_cancel, client.job_retry, client.job_delete):
        with pytest.raises(tq.ValidationError) as info:
            await call(job_id)
        assert info.value.field == "job_id"
    # The edges of the range are ids like any other: not found.
    for edge in (2**63 - 1, -(2**63)):
        with pytest.raises(tq.JobNotFoundError):
            await client.job_get(edge)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ids": [1, 2**63]}, "JobListParams.ids"),
        ({"ids": [-(2**63) - 1]}, "JobListParams.ids"),
        ({"after": 2**63}, "JobListParams.after"),
        ({"after": -(2**63) - 1}, "JobListParams.after"),
        ({"within_newest": 2**63}, "JobListParams.within_newest"),
        ({"kinds": ["val", "a\x00"]}, "JobListParams.kinds"),
        ({"kinds": ["\udc80"]}, "JobListParams.kinds"),
        ({"kinds": ["val\n"]}, "JobListParams.kinds"),
        ({"kinds": [7]}, "JobListParams.kinds"),
        ({"tags": ["a\x00b"]}, "JobListParams.tags"),
        ({"tags": ["ab\udc80"]}, "JobListParams.tags"),
        ({"tags": [7]}, "JobListParams.tags"),
        ({"queues": ["default\n"]}, "JobListParams.queues"),
    ],
)
def test_job_list_filters_that_cannot_match_stored_values_are_refused(
    kwargs: dict[str, Any], field: str
) -> None:
    with pytest.raises(tq.ValidationError) as info:
        tq.JobListParams(**kwargs)
    assert info.value.field == field


async def test_job_list_at_the_edges_of_bigint(client: tq.Client) -> None:
    job = (await client.insert(Val(1), tq.InsertOpts(tags=["t1"]))).job
    page = await client.job_list(
        tq.JobListParams(
            ids=[job.id, 2**63 - 1], kinds=["val"], tags=["t1"], within_newest=2**63 - 1
        )
    )
    assert [j.id for j in page.jobs] == [job.id]
    assert (await client.job_list(tq.JobListParams(after=2**63 - 1))).jobs == []


def test_client_id_must_be_storable_text() -> None:
    for bad in ("host\x00", "host\udc80"):
        with pytest.raises(tq.ValidationError, match=r"^id"):
            ClientConfig(id=bad)


# ------------------------------------------------------------------ middleware


class Rewrite:
    """Insert middleware that passes on changed params."""

    def __init__(self, change: Callable[[tq.InsertParams], tq.InsertParams]) -> None:
        self.change = change

    async def insert_many(self, params: list[tq.InsertParams], call_next: Any) -> Any:
        return await call_next([self.change(p) for p in params])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda p: attrs.evolve(p, args=Val("\x00")), "args"),
        (lambda p: attrs.evolve(p, args=Val({1: 2})), "args"),
        (lambda p: attrs.evolve(p, metadata={"cancel_attempted_at": "now"}), "InsertOpts.metadata"),
        (lambda p: attrs.evolve(p, metadata={"rescue_count": "x"}), "InsertOpts.metadata"),
        (lambda p: attrs.evolve(p, metadata={"m": math.nan}), "InsertOpts.metadata"),
        (lambda p: attrs.evolve(p, queue="default\n"), "InsertOpts.queue"),
        (lambda p: attrs.evolve(p, tags=("ok\n",)), "InsertOpts.tags"),
        (
            lambda p: attrs.evolve(
                p, scheduled_at=datetime.max.replace(tzinfo=timezone(timedelta(hours=-1)))
            ),
            "InsertOpts.scheduled_at",
        ),
    ],
)
async def test_what_insert_middleware_passes_on_is_validated_the_same(
    change: Callable[[tq.InsertParams], tq.InsertParams], field: str
) -> None:
    async with tq.open_client(driver=tq.MemoryDriver(), middleware=[Rewrite(change)]) as client:
        for name, path in PATHS.items():
            with pytest.raises(tq.ValidationError) as info:
                await path(client, [Val(1)])
            assert info.value.field == field, name
            assert await _count(client) == 0


# ------------------------------------------------------------------ periodic jobs


async def test_bad_periodic_args_leave_that_run_and_others_still_fire(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A run whose args cannot be stored (or whose args function raises) is not inserted,
    and its state is not moved, so a client that can build it (or this one, later) still
    may; the other periodic jobs of the pass fire."""

    def boom() -> Any:
        raise RuntimeError("boom")

    bad = ("nul_args", "int_key", "deep", "reserved_key", "raises")
    jobs = [
        tq.PeriodicJob(every=60, args=lambda: Val("\x00"), id="nul_args"),
        tq.PeriodicJob(every=60, args=lambda: Val({1: "a"}), id="int_key"),
        tq.PeriodicJob(every=60, args=lambda: Val(_nested(5000)), id="deep"),
        tq.PeriodicJob(
            every=60,
            args=lambda: (Val(1), tq.InsertOpts(metadata={"rescue_count": "x"})),
            id="reserved_key",
        ),
        tq.PeriodicJob(every=60, args=boom, id="raises"),
        tq.PeriodicJob(every=60, args=lambda: Val("fine"), id="good"),
    ]
    clock = [datetime(2024, 5, 1, 10, 0, 30, tzinfo=UTC)]
    async with tq.open_client(driver=tq.MemoryDriver()) as client:
        enqueuer = PeriodicEnqueuer(
            client.driver, lambda: clock[0], PeriodicJobs(jobs), client._inserts
        )
        await enqueuer.run_once()  # first sight: plans the 10:01 runs
        before = await client.driver.periodic_job_get_many(list(bad))
        clock[0] = datetime(2024, 5, 1, 10, 1, 0, tzinfo=UTC)
        with caplog.at_level(logging.ERROR, logger="trioqueue.periodic"):
            result = await enqueuer.run_once()
        assert [r.periodic_job_id for r in result.runs] == ["good"]
        assert result.runs[0].job is not None and result.runs[0].job.args == {"x": "fine"}
        assert result.failed == len(bad)
        for jid in bad:
            [record] = [r for r in caplog.records if repr(jid) in r.getMessage()]
            assert "not inserted by this client" in record.getMessage()
            assert record.exc_info is not None
        assert await client.driver.periodic_job_get_many(list(bad)) == before
        # Tried again for the same run time: refused again, logged at DEBUG only.
        errors = len(caplog.records)
        with caplog.at_level(logging.DEBUG, logger="trioqueue.periodic"):
            assert (await enqueuer.run_once()).failed == len(bad)
        again = caplog.records[errors:]
        assert len(again) == len(bad) and all(r.levelno == logging.DEBUG for r in again)
        [stored] = (await client.job_list()).jobs
        assert stored.metadata["periodic_job_id"] == "good"
        # Still due, they are tried again (and fail again); the good job runs its next
        # minute.
        clock[0] = datetime(2024, 5, 1, 10, 2, 0, tzinfo=UTC)
        result = await enqueuer.run_once()
        assert [r.periodic_job_id for r in result.runs if r.job is not None] == ["good"]
        assert result.failed == len(bad)


async def test_periodic_metadata_keys_are_not_reserved() -> None:
    """The enqueuer adds periodic, periodic_job_id, periodic_run_at, missed_runs and
    missed_since: none of them is refused."""
    job = tq.PeriodicJob(
        every=60, args=lambda: (Val(1), tq.InsertOpts(metadata={"mine": 1})), id="meta"
    )
    clock = [datetime(2024, 5, 1, 10, 0, 30, tzinfo=UTC)]
    async with tq.open_client(driver=tq.MemoryDriver()) as client:
        enqueuer = PeriodicEnqueuer(
            client.driver, lambda: clock[0], PeriodicJobs([job]), client._inserts
        )
        await enqueuer.run_once()
        clock[0] = datetime(2024, 5, 1, 10, 5, 0, tzinfo=UTC)  # 10:01-10:04 missed
        [run] = (await enqueuer.run_once()).runs
        assert run.job is not None
        assert set(run.job.metadata) == {
            "mine",
            "periodic",
            "periodic_job_id",
            "periodic_run_at",
            "missed_runs",
            "missed_since",
        }


class RefusingDriver:
    """A memory driver whose job inserts fail as a database refusing the values would."""

    def __init__(self, inner: tq.MemoryDriver) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def job_insert_many(self, params: Any, *args: Any, **kwargs: Any) -> Any:
        if any("refuse me" in p.args_json for p in params):
            exc = DatabaseError("inserting jobs", ValueError("invalid input syntax"))
            exc.rejected_data = True  # type: ignore[misc]
            raise exc
        return await self._inner.job_insert_many(params, *args, **kwargs)


async def test_a_run_the_database_refuses_does_not_hold_back_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Defence in depth: values that pass validation but that the database refuses would
    fail every pass, and before this the pass stopped at them (the jobs after them never
    fired)."""
    jobs = [
        tq.PeriodicJob(every=60, args=lambda: Val("refuse me"), id="refused"),
        tq.PeriodicJob(every=60, args=lambda: Val("fine"), id="good"),
    ]
    clock = [datetime(2024, 5, 1, 10, 0, 30, tzinfo=UTC)]
    async with tq.open_client(driver=tq.MemoryDriver()) as client:
        driver: Any = RefusingDriver(client.driver)  # type: ignore[arg-type]
        enqueuer = PeriodicEnqueuer(driver, lambda: clock[0], PeriodicJobs(jobs), client._inserts)
        await enqueuer.run_once()
        clock[0] = datetime(2024, 5, 1, 10, 1, 0, tzinfo=UTC)
        with caplog.at_level(logging.ERROR, logger="trioqueue.periodic"):
            result = await enqueuer.run_once()
        assert {r.periodic_job_id: r.job is not None for r in result.runs} == {
            "refused": False,
            "good": True,
        }
        assert any("'refused'" in r.getMessage() for r in caplog.records)


async def test_a_leader_with_bad_periodic_jobs_still_runs_the_good_one() -> None:
    """The same through a running client: the enqueuer keeps going."""
    workers = tq.Workers()
    done = trio.Event()

    @workers.worker(Val)
    async def work(job: tq.Job[Val]) -> None:
        if job.args.x == "fine":
            done.set()

    periodic = [
        tq.PeriodicJob(every=3600, args=lambda: Val("\x00"), id="bad", run_on_start=True),
        tq.PeriodicJob(every=3600, args=lambda: Val("fine"), id="good", run_on_start=True),
    ]
    with trio.fail_after(20):
        async with tq.open_client(
            driver=tq.MemoryDriver(),
            workers=workers,
            queues={"default": tq.QueueConfig()},
            periodic_jobs=periodic,
            leader_interval=0.1,
            fetch_poll_interval=0.05,
            fetch_cooldown=0.01,
        ):
            await done.wait()


class _NoRepr:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    def __hash__(self) -> int:
        return 1


def test_a_non_str_key_whose_repr_raises_is_a_validation_error() -> None:
    """The message about a bad key must not fail in its turn (a RuntimeError came out)."""
    from trioqueue._codec import encode_args

    with pytest.raises(tq.ValidationError, match=r"whose repr\(\) raised"):
        encode_args(Val({_NoRepr(): 1}))

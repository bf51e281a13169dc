"""The client's public API (the README and docs/) against a real PostgreSQL: inserting, validation,
transactions, unique jobs, managing jobs, pausing queues and the schema check."""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, ClassVar, overload

import attrs
import pytest
import trio
from support import wait_fetches

import trioqueue as tq


@attrs.frozen
class SortArgs:
    kind: ClassVar[str] = "sort"
    strings: list[str]


@attrs.frozen
class EmailArgs:
    kind: ClassVar[str] = "email"
    to: str


@attrs.frozen
class UnregisteredArgs:
    kind: ClassVar[str] = "unregistered"
    n: int


async def _noop(job: tq.Job[Any]) -> None:
    pass


def _workers() -> tq.Workers:
    workers = tq.Workers()
    workers.add(SortArgs, _noop)
    workers.add(EmailArgs, _noop)
    return workers


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[tq.Client]:
    """An insert-only client: no workers, no queues."""
    async with tq.open_client(database_url) as c:
        yield c


@pytest.fixture
async def typed_client(database_url: str) -> AsyncIterator[tq.Client]:
    """An insert-only client that knows the args types (workers, but no queues)."""
    async with tq.open_client(database_url, workers=_workers()) as c:
        yield c


async def _all_jobs(client: tq.Client) -> list[tq.Job[Any]]:
    return (await client.job_list(tq.JobListParams(limit=10_000))).jobs


async def _set_state(client: tq.Client, job_id: int, sql_set: str) -> None:
    """Force a job's row into a state no public call produces directly."""
    async with client.transaction() as tx:
        status = await tx.execute(f"UPDATE tq_job SET {sql_set} WHERE id = $1", job_id)
    assert status == "UPDATE 1"


def _is_utc(dt: datetime) -> bool:
    return dt.tzinfo is not None and dt.utcoffset() == timedelta(0)


# ------------------------------------------------------------------ insert


async def test_insert_returns_the_stored_job(typed_client: tq.Client) -> None:
    with trio.fail_after(30):
        before = datetime.now(UTC)
        res = await typed_client.insert(
            SortArgs(["b", "a"]),
            tq.InsertOpts(queue="q2", priority=2, tags=["t1", "t_2"], metadata={"m": 1}),
        )
        after = datetime.now(UTC)
    assert isinstance(res, tq.JobInsertResult)
    assert res.unique_skipped_as_duplicate is False
    job = res.job
    assert isinstance(job.id, int)
    assert job.kind == "sort"
    assert job.args == SortArgs(["b", "a"])
    assert job.queue == "q2"
    assert job.state is tq.JobState.AVAILABLE
    assert job.priority == 2
    assert job.attempt == 0
    assert job.max_attempts == 25
    assert job.attempted_at is None
    assert job.attempted_by == []
    assert job.finalized_at is None
    assert job.errors == []
    assert job.tags == ["t1", "t_2"]
    assert job.metadata == {"m": 1}
    assert _is_utc(job.created_at)
    assert _is_utc(job.scheduled_at)
    slack = timedelta(seconds=5)  # client and server clocks are the same machine's
    assert before - slack <= job.created_at <= after + slack
    assert job.scheduled_at <= after + slack


async def test_insert_defaults(client: tq.Client) -> None:
    with trio.fail_after(30):
        job = (await client.insert(SortArgs(["x"]))).job
    assert job.queue == "default"
    assert job.priority == 1
    assert job.max_attempts == 25
    assert job.tags == []
    assert job.metadata == {}
    assert job.state is tq.JobState.AVAILABLE


async def test_insert_only_client_reads_unknown_kinds_as_dicts(client: tq.Client) -> None:
    with trio.fail_after(30):
        given = SortArgs(["b", "a"])
        job = (await client.insert(given)).job
        assert job.args is given  # the insert's own result carries what was inserted
        # A read of a kind the client does not know: the stored JSON object.
        assert (await client.job_get(job.id)).args == {"strings": ["b", "a"]}


async def test_typed_client_decodes_args_on_read(typed_client: tq.Client) -> None:
    with trio.fail_after(30):
        job = (await typed_client.insert(EmailArgs("a@example.com"))).job
        got = await typed_client.job_get(job.id)
    assert got.args == EmailArgs("a@example.com")
    assert got == job


async def test_max_attempts_from_opts_and_client_config(database_url: str) -> None:
    with trio.fail_after(30):
        async with tq.open_client(database_url, max_attempts=7) as c:
            assert (await c.insert(SortArgs([]))).job.max_attempts == 7
            job = (await c.insert(SortArgs([]), tq.InsertOpts(max_attempts=3))).job
            assert job.max_attempts == 3
        async with tq.open_client(database_url) as c:
            assert (await c.insert(SortArgs([]))).job.max_attempts == 25


async def test_scheduled_at_future_past_and_pending(client: tq.Client) -> None:
    now = datetime.now(UTC)
    future = now + timedelta(hours=1)
    past = now - timedelta(hours=1)
    with trio.fail_after(30):
        scheduled = (await client.insert(SortArgs([]), tq.InsertOpts(scheduled_at=future))).job
        due = (await client.insert(SortArgs([]), tq.InsertOpts(scheduled_at=past))).job
        pending = (await client.insert(SortArgs([]), tq.InsertOpts(pending=True))).job
    assert scheduled.state is tq.JobState.SCHEDULED
    assert scheduled.scheduled_at == future
    assert due.state is tq.JobState.AVAILABLE
    assert due.scheduled_at == past
    assert pending.state is tq.JobState.PENDING


async def test_scheduled_at_in_another_timezone_is_the_same_instant(client: tq.Client) -> None:
    tz = timezone(timedelta(hours=5, minutes=30))
    at = (datetime.now(UTC) + timedelta(hours=2)).astimezone(tz)
    with trio.fail_after(30):
        job = (await client.insert(SortArgs([]), tq.InsertOpts(scheduled_at=at))).job
    assert job.scheduled_at == at
    assert _is_utc(job.scheduled_at)


async def test_client_with_workers_rejects_unregistered_kind(typed_client: tq.Client) -> None:
    with trio.fail_after(30):
        with pytest.raises(tq.UnknownJobKindError) as info:
            await typed_client.insert(UnregisteredArgs(1))
        assert isinstance(info.value, tq.ValidationError)
        assert "kind" in str(info.value)
        assert "unregistered" in str(info.value)
        with pytest.raises(tq.UnknownJobKindError):
            await typed_client.insert_many([SortArgs([]), UnregisteredArgs(2)])
        assert await _all_jobs(typed_client) == []


async def test_insert_only_client_accepts_any_kind(client: tq.Client) -> None:
    with trio.fail_after(30):
        job = (await client.insert(UnregisteredArgs(1))).job
    assert job.kind == "unregistered"
    assert job.args == UnregisteredArgs(1)


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: tq.InsertOpts(priority=0), "priority"),
        (lambda: tq.InsertOpts(priority=5), "priority"),
        (lambda: tq.InsertOpts(queue="Bad Queue"), "queue"),
        (lambda: tq.InsertOpts(queue=""), "queue"),
        (lambda: tq.InsertOpts(tags=["a,b"]), "tag"),
        (lambda: tq.InsertOpts(tags=["x"]), "tag"),
        (lambda: tq.UniqueOpts(by_period=0.5), "by_period"),
        (
            lambda: tq.UniqueOpts(
                by_state=[tq.JobState.AVAILABLE, tq.JobState.PENDING, tq.JobState.SCHEDULED]
            ),
            "by_state",
        ),
        (lambda: tq.JobListParams(limit=0), "limit"),
        (lambda: tq.JobListParams(limit=10_001), "limit"),
    ],
    ids=[
        "priority-0",
        "priority-5",
        "queue-space",
        "queue-empty",
        "tag-comma",
        "tag-short",
        "by_period",
        "by_state-no-running",
        "limit-0",
        "limit-10001",
    ],
)
async def test_bad_options_raise_validation_error(client: tq.Client, make: Any, field: str) -> None:
    with pytest.raises(tq.ValidationError) as info:
        make()
    assert isinstance(info.value, ValueError)
    assert field in str(info.value)
    with trio.fail_after(30):
        assert await _all_jobs(client) == []


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: tq.InsertOpts(priority=True), "priority"),
        (lambda: tq.InsertOpts(queue="q" * 65), "queue"),
        (lambda: tq.InsertOpts(tags="ab"), "tags"),
        (lambda: tq.InsertOpts(scheduled_at=datetime(2030, 1, 1)), "scheduled_at"),
        (lambda: tq.InsertOpts(metadata=["not", "a", "mapping"]), "metadata"),
        (lambda: tq.InsertOpts(max_attempts=0), "max_attempts"),
        (lambda: tq.JobListParams(priorities=[5]), "priorities"),
        (lambda: tq.JobListParams(queues=["Bad Queue"]), "queues"),
        (lambda: tq.JobListParams(states=["nope"]), "states"),
    ],
    ids=[
        "priority-bool",
        "queue-too-long",
        "tags-str",
        "naive-datetime",
        "metadata",
        "max_attempts",
        "list-priorities",
        "list-queues",
        "list-states",
    ],
)
async def test_more_bad_options(client: tq.Client, make: Any, field: str) -> None:
    with pytest.raises(tq.ValidationError) as info:
        make()
    assert field in str(info.value)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), "5", True])
def test_bad_worker_timeout_is_refused_when_registered(timeout: Any) -> None:
    # NaN passed the old `timeout <= 0` check and then broke the worker task at the job's
    # start (trio refuses a NaN deadline).
    with pytest.raises(tq.ValidationError, match="timeout"):
        tq.Workers().add(SortArgs, _noop_sort, timeout=timeout)


async def _noop_sort(job: tq.Job[SortArgs]) -> None:
    pass


async def test_unserialisable_args_write_nothing(client: tq.Client) -> None:
    with trio.fail_after(30):
        with pytest.raises(tq.ValidationError, match="args"):
            await client.insert_many([SortArgs(["ok"]), SortArgs([object()])])  # type: ignore[list-item]
        with pytest.raises(tq.ValidationError, match="metadata"):
            await client.insert(SortArgs([]), tq.InsertOpts(metadata={"x": object()}))
        with pytest.raises(tq.ValidationError, match="kind"):
            await client.insert(object())  # no `kind` class attribute
        assert await _all_jobs(client) == []


async def test_by_state_missing_running_names_it(client: tq.Client) -> None:
    with pytest.raises(tq.ValidationError, match="running"):
        tq.UniqueOpts(by_state=["available", "pending", "scheduled"])


async def test_insert_many_empty_raises(client: tq.Client) -> None:
    with trio.fail_after(30):
        with pytest.raises(tq.ValidationError, match="jobs"):
            await client.insert_many([])
        with pytest.raises(tq.ValidationError, match="jobs"):
            await client.insert_many_fast([])
        # Malformed pairs: the empty tuple, a triple.
        for bad in ((), (1, 2, 3)):
            for insert in (client.insert_many, client.insert_many_fast):
                with pytest.raises(tq.ValidationError, match=r"^jobs: .*pair"):
                    await insert([bad])  # type: ignore[list-item]
        assert await _all_jobs(client) == []


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"job_timeout": -1}, "job_timeout"),
        ({"queues": {"default": "not a QueueConfig"}}, "queues"),
        ({"queues": {"Bad Queue": None}}, "queues"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"fetch_poll_interval": 0}, "fetch_poll_interval"),
    ],
    ids=["job_timeout", "queue-config-type", "queue-name", "max_attempts", "poll-interval"],
)
async def test_bad_client_config_raises_before_starting(
    database_url: str, config: dict[str, Any], field: str
) -> None:
    with trio.fail_after(30):
        with pytest.raises(tq.ValidationError) as info:
            async with tq.open_client(database_url, workers=_workers(), **config):
                pytest.fail("the client must not open")  # pragma: no cover
        assert field in str(info.value)
        async with tq.open_client(database_url) as c:
            assert await _all_jobs(c) == []


async def test_queue_config_max_workers_zero() -> None:
    with pytest.raises(tq.ValidationError, match="max_workers"):
        tq.QueueConfig(max_workers=0)


async def test_queues_without_workers_raise(database_url: str) -> None:
    with trio.fail_after(30):
        with pytest.raises(tq.ValidationError, match="workers"):
            async with tq.open_client(database_url, queues={"default": tq.QueueConfig()}):
                pytest.fail("the client must not open")  # pragma: no cover


# ------------------------------------------------------------------ insert_many


async def test_insert_many_results_in_input_order(typed_client: tq.Client) -> None:
    items = [
        SortArgs(["1"]),
        (EmailArgs("2@x"), tq.InsertOpts(queue="q2", priority=3)),
        (SortArgs(["3"]), None),
        (SortArgs(["4"]), tq.InsertOpts(tags=["four"], metadata={"n": 4})),
        EmailArgs("5@x"),
    ]
    with trio.fail_after(30):
        results = await typed_client.insert_many(items)
    assert [r.job.args for r in results] == [
        SortArgs(["1"]),
        EmailArgs("2@x"),
        SortArgs(["3"]),
        SortArgs(["4"]),
        EmailArgs("5@x"),
    ]
    assert all(not r.unique_skipped_as_duplicate for r in results)
    assert len({r.job.id for r in results}) == 5
    assert [r.job.queue for r in results] == ["default", "q2", "default", "default", "default"]
    assert [r.job.priority for r in results] == [1, 3, 1, 1, 1]
    assert results[3].job.tags == ["four"]
    assert results[3].job.metadata == {"n": 4}
    with trio.fail_after(30):
        stored = await _all_jobs(typed_client)
    assert sorted(j.id for j in stored) == sorted(r.job.id for r in results)


async def test_insert_many_fast(client: tq.Client) -> None:
    items = [
        (
            SortArgs([str(i)]),
            tq.InsertOpts(queue="fast", priority=4, tags=["bulk"], metadata={"i": i}),
        )
        for i in range(50)
    ]
    items.append(EmailArgs("x@y"))
    with trio.fail_after(30):
        count = await client.insert_many_fast(items)
        assert count == 51
        fast = (await client.job_list(tq.JobListParams(queues=["fast"], limit=1000))).jobs
        others = (await client.job_list(tq.JobListParams(queues=["default"]))).jobs
    assert len(fast) == 50
    assert sorted(j.args["strings"][0] for j in fast) == sorted(str(i) for i in range(50))
    for j in fast:
        assert j.kind == "sort"
        assert j.priority == 4
        assert j.tags == ["bulk"]
        assert j.metadata == {"i": int(j.args["strings"][0])}
        assert j.state is tq.JobState.AVAILABLE
        assert j.max_attempts == 25
    assert [(j.kind, j.args) for j in others] == [("email", {"to": "x@y"})]


@attrs.frozen
class OwnOptsArgs:
    """Args whose every job picks its own opts."""

    kind: ClassVar[str] = "own_opts"
    n: int

    def insert_opts(self) -> tq.InsertOpts:
        return tq.InsertOpts(queue=f"own{self.n % 3}", priority=1 + self.n % 4)


@pytest.mark.parametrize("fast", [True, False])
async def test_batch_jobs_sharing_opts_keep_their_own_fields(client: tq.Client, fast: bool) -> None:
    # A batch works out a job's fields once per args type and opts object and reuses them
    # (and COPY reuses the previous row's formatted columns): whatever differs per job
    # must still differ, and whatever comes from the opts must follow each job's opts.
    later = datetime.now(UTC) + timedelta(hours=1)
    shared = tq.InsertOpts(queue="shared", tags=["t-1", "t_2"], metadata={"m": "a\\b"})
    unique = tq.InsertOpts(queue="uniq", unique=tq.UniqueOpts(by_args=True))
    items: list[Any] = []
    for i in range(40):
        items.append((SortArgs([str(i)]), shared))
        items.append((EmailArgs(f"{i}@x"), shared))  # the same opts object, another kind
        items.append(OwnOptsArgs(i))  # opts of each job's own
        items.append((SortArgs([f"u{i}"]), unique))  # a unique key of each job's own
        items.append((SortArgs([f"s{i}"]), tq.InsertOpts(scheduled_at=later, max_attempts=3)))
        items.append(SortArgs([f"d{i}\\"]))  # default opts
    with trio.fail_after(30):
        if fast:
            assert await client.insert_many_fast(items) == len(items)
        else:
            await client.insert_many(items)
        jobs = await _all_jobs(client)
    assert len(jobs) == len(items)
    seen: set[str] = set()
    for job in jobs:
        fields = (job.kind, job.queue, job.priority, job.tags, job.metadata, job.max_attempts)
        if job.kind == "own_opts":
            n = job.args["n"]
            assert fields == ("own_opts", f"own{n % 3}", 1 + n % 4, [], {}, 25)
            key = f"own{n}"
        elif job.kind == "email":
            assert fields == ("email", "shared", 1, ["t-1", "t_2"], {"m": "a\\b"}, 25)
            key = job.args["to"]
        else:
            key = job.args["strings"][0]
            if key.startswith("u"):
                assert fields == ("sort", "uniq", 1, [], {}, 25)
            elif key.startswith("s"):
                assert fields == ("sort", "default", 1, [], {}, 3)
                assert job.state is tq.JobState.SCHEDULED
                assert abs((job.scheduled_at - later).total_seconds()) < 1e-3
            elif key.startswith("d"):
                assert key.endswith("\\")
                assert fields == ("sort", "default", 1, [], {}, 25)
            else:
                assert fields == ("sort", "shared", 1, ["t-1", "t_2"], {"m": "a\\b"}, 25)
        assert job.state is tq.JobState.SCHEDULED or not key.startswith("s")
        seen.add(key)
    assert len(seen) == len(items)
    # Each unique job got its own key: the same args again are duplicates, one by one.
    for i in (0, 39):
        again = await client.insert(SortArgs([f"u{i}"]), unique)
        assert again.unique_skipped_as_duplicate
        assert again.job.args == SortArgs([f"u{i}"])  # decoded as the inserted args' type


class _OptsMadeOnRead(Sequence[Any]):
    """A batch that builds each job's opts anew every time an item is read."""

    def __init__(self, n: int) -> None:
        self._n = n

    def __len__(self) -> int:
        return self._n

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[Any]: ...
    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._n))]
        if not -self._n <= i < self._n:
            raise IndexError(i)
        i %= self._n
        return (SortArgs([str(i)]), tq.InsertOpts(queue=f"q{i}", priority=1 + i % 4))


@pytest.mark.parametrize("fast", [True, False])
async def test_batch_whose_opts_are_made_on_read_keeps_each_jobs_opts(
    client: tq.Client, fast: bool
) -> None:
    # Each item's opts object is freed once read, so a later one may get its address:
    # fields shared by opts object identity must not go to that later job.
    with trio.fail_after(30):
        if fast:
            assert await client.insert_many_fast(_OptsMadeOnRead(12)) == 12
        else:
            await client.insert_many(_OptsMadeOnRead(12))
        jobs = await _all_jobs(client)
    got = sorted((int(j.args["strings"][0]), j.queue, j.priority) for j in jobs)
    assert got == [(i, f"q{i}", 1 + i % 4) for i in range(12)]


class _Level(int, enum.Enum):
    """An int enum whose str() is its name, not its value."""

    HIGH = 2
    TRIES = 5


@pytest.mark.parametrize("fast", [True, False])
async def test_int_enum_priority_and_max_attempts_are_stored_as_numbers(
    client: tq.Client, fast: bool
) -> None:
    opts = tq.InsertOpts(priority=_Level.HIGH, max_attempts=_Level.TRIES)
    with trio.fail_after(30):
        if fast:
            assert await client.insert_many_fast([(SortArgs(["e"]), opts)]) == 1
        else:
            await client.insert_many([(SortArgs(["e"]), opts)])
        (job,) = await _all_jobs(client)
    assert (job.priority, job.max_attempts) == (2, 5)


async def test_insert_many_fast_validates_before_writing(typed_client: tq.Client) -> None:
    with trio.fail_after(30):
        with pytest.raises(tq.UnknownJobKindError):
            await typed_client.insert_many_fast([SortArgs([]), UnregisteredArgs(1)])
        assert await _all_jobs(typed_client) == []


async def test_insert_many_fast_bad_job_deep_in_a_streamed_batch_writes_nothing(
    client: tq.Client,
) -> None:
    # Without a transaction of the caller's, jobs are checked as the COPY streams (the
    # first chunks are already at the server): a bad one aborts it all the same.
    items: list[Any] = [SortArgs([str(i)]) for i in range(2000)]
    items[1700] = SortArgs([object()])  # type: ignore[list-item]
    with trio.fail_after(30):
        with pytest.raises(tq.ValidationError, match="JSON-serialisable"):
            await client.insert_many_fast(items)
        assert await _all_jobs(client) == []
        # In the caller's transaction the check comes first, and the transaction lives on.
        async with client.transaction() as tx:
            with pytest.raises(tq.ValidationError, match="JSON-serialisable"):
                await client.insert_many_fast_tx(tx, items)
            assert await client.insert_many_fast_tx(tx, items[:10]) == 10
        assert len(await _all_jobs(client)) == 10


# ------------------------------------------------------------------ transactions


async def test_insert_tx_commits_with_the_apps_rows(client: tq.Client) -> None:
    with trio.fail_after(30):
        async with client.transaction() as tx:
            await tx.execute("CREATE TABLE orders (id int PRIMARY KEY)")
        async with client.transaction() as tx:
            assert await tx.execute("INSERT INTO orders (id) VALUES ($1)", 7) == "INSERT 0 1"
            res = await client.insert_tx(tx, SortArgs(["z"]))
        job = await client.job_get(res.job.id)
        assert job.args == {"strings": ["z"]}
        async with client.transaction() as tx:
            assert await tx.fetch("SELECT id FROM orders") == [(7,)]


async def test_insert_tx_invisible_outside_until_commit(client: tq.Client) -> None:
    with trio.fail_after(30):
        async with client.transaction() as tx:
            res = await client.insert_tx(tx, SortArgs(["z"]))
            # Another connection does not see the uncommitted job.
            with pytest.raises(tq.JobNotFoundError):
                await client.job_get(res.job.id)
            assert (await client.job_get_tx(tx, res.job.id)).id == res.job.id
        assert (await client.job_get(res.job.id)).id == res.job.id


class _Boom(Exception):
    pass


async def test_exception_in_transaction_rolls_back_both(client: tq.Client) -> None:
    with trio.fail_after(30):
        async with client.transaction() as tx:
            await tx.execute("CREATE TABLE orders (id int PRIMARY KEY)")
        job_ids = []
        with pytest.raises(_Boom):
            async with client.transaction() as tx:
                await tx.execute("INSERT INTO orders (id) VALUES ($1)", 7)
                job_ids.append((await client.insert_tx(tx, SortArgs(["z"]))).job.id)
                job_ids.extend(
                    r.job.id
                    for r in await client.insert_many_tx(tx, [SortArgs(["a"]), SortArgs(["b"])])
                )
                raise _Boom
        assert len(job_ids) == 3
        for job_id in job_ids:
            with pytest.raises(tq.JobNotFoundError):
                await client.job_get(job_id)
        assert await _all_jobs(client) == []
        async with client.transaction() as tx:
            assert await tx.fetch("SELECT id FROM orders") == []


async def test_insert_many_tx_commits(client: tq.Client) -> None:
    with trio.fail_after(30):
        async with client.transaction() as tx:
            results = await client.insert_many_tx(
                tx, [SortArgs(["a"]), (SortArgs(["b"]), tq.InsertOpts(queue="other"))]
            )
        assert [r.job.queue for r in results] == ["default", "other"]
        stored = await _all_jobs(client)
    assert [j.id for j in stored] == [r.job.id for r in results]


async def test_cancelled_transaction_rolls_back(client: tq.Client) -> None:
    with trio.fail_after(30):
        with trio.CancelScope() as scope:
            async with client.transaction() as tx:
                await client.insert_tx(tx, SortArgs(["z"]))
                scope.cancel()
                await trio.sleep_forever()
        assert await _all_jobs(client) == []


# ------------------------------------------------------------------ unique jobs


async def test_unique_by_args(client: tq.Client) -> None:
    opts = tq.InsertOpts(unique=tq.UniqueOpts(by_args=True))
    with trio.fail_after(30):
        first = await client.insert(SortArgs(["a"]), opts)
        dup = await client.insert(SortArgs(["a"]), opts)
        other = await client.insert(SortArgs(["b"]), opts)
        assert len(await _all_jobs(client)) == 2
    assert first.unique_skipped_as_duplicate is False
    assert dup.unique_skipped_as_duplicate is True
    assert dup.job.id == first.job.id
    assert dup.job.args == first.job.args
    assert other.unique_skipped_as_duplicate is False
    assert other.job.id != first.job.id


async def test_unique_without_by_args_is_per_kind(client: tq.Client) -> None:
    opts = tq.InsertOpts(unique=tq.UniqueOpts())
    with trio.fail_after(30):
        first = await client.insert(SortArgs(["a"]), opts)
        dup = await client.insert(SortArgs(["b"]), opts)
        other_kind = await client.insert(EmailArgs("x"), opts)
    assert dup.unique_skipped_as_duplicate is True
    assert dup.job.id == first.job.id
    assert other_kind.unique_skipped_as_duplicate is False


async def test_unique_by_queue(client: tq.Client) -> None:
    unique = tq.UniqueOpts(by_queue=True)
    with trio.fail_after(30):
        a1 = await client.insert(SortArgs([]), tq.InsertOpts(queue="a", unique=unique))
        a2 = await client.insert(SortArgs([]), tq.InsertOpts(queue="a", unique=unique))
        b1 = await client.insert(SortArgs([]), tq.InsertOpts(queue="b", unique=unique))
    assert a2.unique_skipped_as_duplicate is True
    assert a2.job.id == a1.job.id
    assert b1.unique_skipped_as_duplicate is False
    assert b1.job.id != a1.job.id
    assert b1.job.queue == "b"


async def test_unique_by_period(client: tq.Client) -> None:
    # Explicit times so the test cannot straddle a period boundary.
    unique = tq.UniqueOpts(by_period=3600)
    base = datetime(2100, 1, 1, 10, 0, tzinfo=UTC)
    with trio.fail_after(30):
        first = await client.insert(
            SortArgs([]), tq.InsertOpts(scheduled_at=base + timedelta(minutes=5), unique=unique)
        )
        same = await client.insert(
            SortArgs([]), tq.InsertOpts(scheduled_at=base + timedelta(minutes=55), unique=unique)
        )
        next_period = await client.insert(
            SortArgs([]), tq.InsertOpts(scheduled_at=base + timedelta(minutes=65), unique=unique)
        )
    assert first.job.state is tq.JobState.SCHEDULED
    assert same.unique_skipped_as_duplicate is True
    assert same.job.id == first.job.id
    assert next_period.unique_skipped_as_duplicate is False
    assert next_period.job.id != first.job.id


async def test_unique_by_period_now(client: tq.Client) -> None:
    # Two inserts right after each other fall in the same (long) period, barring a
    # boundary between them; the period is a day so that is practically impossible.
    opts = tq.InsertOpts(unique=tq.UniqueOpts(by_period=86400))
    with trio.fail_after(30):
        first = await client.insert(SortArgs([]), opts)
        dup = await client.insert(SortArgs([]), opts)
    assert dup.unique_skipped_as_duplicate is True
    assert dup.job.id == first.job.id


async def test_unique_default_states_allow_reinsert_after_cancel(client: tq.Client) -> None:
    opts = tq.InsertOpts(unique=tq.UniqueOpts(by_args=True))
    with trio.fail_after(30):
        first = await client.insert(SortArgs(["a"]), opts)
        await client.job_cancel(first.job.id)
        again = await client.insert(SortArgs(["a"]), opts)
        assert again.unique_skipped_as_duplicate is False
        assert again.job.id != first.job.id
        assert again.job.state is tq.JobState.AVAILABLE
        # Discarded does not block either.
        await _set_state(client, again.job.id, "state = 'discarded', finalized_at = now()")
        third = await client.insert(SortArgs(["a"]), opts)
        assert third.unique_skipped_as_duplicate is False
        assert len({first.job.id, again.job.id, third.job.id}) == 3


async def test_unique_default_states_include_completed(client: tq.Client) -> None:
    opts = tq.InsertOpts(unique=tq.UniqueOpts(by_args=True))
    with trio.fail_after(30):
        first = await client.insert(SortArgs(["a"]), opts)
        await _set_state(client, first.job.id, "state = 'completed', finalized_at = now()")
        dup = await client.insert(SortArgs(["a"]), opts)
    assert dup.unique_skipped_as_duplicate is True
    assert dup.job.id == first.job.id
    assert dup.job.state is tq.JobState.COMPLETED


async def test_unique_custom_states(client: tq.Client) -> None:
    required = [
        tq.JobState.AVAILABLE,
        tq.JobState.PENDING,
        tq.JobState.RUNNING,
        tq.JobState.SCHEDULED,
    ]
    opts = tq.InsertOpts(unique=tq.UniqueOpts(by_args=True, by_state=required))
    with trio.fail_after(30):
        first = await client.insert(SortArgs(["a"]), opts)
        dup = await client.insert(SortArgs(["a"]), opts)
        assert dup.job.id == first.job.id
        await _set_state(client, first.job.id, "state = 'completed', finalized_at = now()")
        again = await client.insert(SortArgs(["a"]), opts)
    assert again.unique_skipped_as_duplicate is False
    assert again.job.id != first.job.id


async def test_unique_duplicates_within_one_batch(client: tq.Client) -> None:
    opts = tq.InsertOpts(unique=tq.UniqueOpts(by_args=True))
    with trio.fail_after(30):
        results = await client.insert_many(
            [
                (SortArgs(["a"]), opts),
                (SortArgs(["b"]), opts),
                (SortArgs(["a"]), opts),
                SortArgs(["a"]),  # not unique: always inserted
            ]
        )
        stored = await _all_jobs(client)
    assert [r.unique_skipped_as_duplicate for r in results] == [False, False, True, False]
    assert results[2].job.id == results[0].job.id
    assert len({results[0].job.id, results[1].job.id, results[3].job.id}) == 3
    assert len(stored) == 3


async def test_unique_batch_against_existing_job(client: tq.Client) -> None:
    opts = tq.InsertOpts(unique=tq.UniqueOpts(by_args=True))
    with trio.fail_after(30):
        existing = await client.insert(SortArgs(["a"]), opts)
        results = await client.insert_many([(SortArgs(["a"]), opts), (SortArgs(["c"]), opts)])
    assert results[0].unique_skipped_as_duplicate is True
    assert results[0].job.id == existing.job.id
    assert results[1].unique_skipped_as_duplicate is False


# ------------------------------------------------------------------ job_get / job_list


async def test_job_get_missing(client: tq.Client) -> None:
    with trio.fail_after(30):
        with pytest.raises(tq.JobNotFoundError) as info:
            await client.job_get(123456)
    assert "123456" in str(info.value)


async def _list_fixture(client: tq.Client) -> dict[str, int]:
    specs = {
        "sort_a_p1": (SortArgs(["1"]), tq.InsertOpts(queue="a", priority=1, tags=["red"])),
        "sort_b_p2": (SortArgs(["2"]), tq.InsertOpts(queue="b", priority=2, tags=["red", "blue"])),
        "email_a_p2": (EmailArgs("3"), tq.InsertOpts(queue="a", priority=2, tags=["blue"])),
        "email_b_p1_sched": (
            EmailArgs("4"),
            tq.InsertOpts(
                queue="b", priority=1, scheduled_at=datetime.now(UTC) + timedelta(hours=1)
            ),
        ),
        "sort_a_p3_pending": (SortArgs(["5"]), tq.InsertOpts(queue="a", priority=3, pending=True)),
    }
    results = await client.insert_many(list(specs.values()))
    return {name: r.job.id for name, r in zip(specs, results, strict=True)}


async def _listed(client: tq.Client, **kwargs: Any) -> list[int]:
    return [j.id for j in (await client.job_list(tq.JobListParams(**kwargs))).jobs]


async def test_job_list_filters(client: tq.Client) -> None:
    with trio.fail_after(30):
        ids = await _list_fixture(client)
        all_ids = sorted(ids.values())
        assert await _listed(client) == all_ids
        assert [j.id for j in (await client.job_list()).jobs] == all_ids

        pick = [ids["sort_b_p2"], ids["email_a_p2"]]
        assert await _listed(client, ids=pick) == sorted(pick)
        assert await _listed(client, kinds=["email"]) == sorted(
            [ids["email_a_p2"], ids["email_b_p1_sched"]]
        )
        assert await _listed(client, queues=["b"]) == sorted(
            [ids["sort_b_p2"], ids["email_b_p1_sched"]]
        )
        assert await _listed(client, states=[tq.JobState.SCHEDULED]) == [ids["email_b_p1_sched"]]
        assert await _listed(client, states=[tq.JobState.PENDING, tq.JobState.SCHEDULED]) == sorted(
            [ids["email_b_p1_sched"], ids["sort_a_p3_pending"]]
        )
        assert await _listed(client, priorities=[2]) == sorted(
            [ids["sort_b_p2"], ids["email_a_p2"]]
        )
        assert await _listed(client, priorities=[3, 4]) == [ids["sort_a_p3_pending"]]
        assert await _listed(client, tags=["red"]) == sorted([ids["sort_a_p1"], ids["sort_b_p2"]])
        assert await _listed(client, tags=["blue"]) == sorted([ids["sort_b_p2"], ids["email_a_p2"]])
        assert await _listed(client, kinds=["nope"]) == []


async def test_job_list_filters_combine_with_and(client: tq.Client) -> None:
    with trio.fail_after(30):
        ids = await _list_fixture(client)
        assert await _listed(client, kinds=["sort"], queues=["a"]) == sorted(
            [ids["sort_a_p1"], ids["sort_a_p3_pending"]]
        )
        assert await _listed(client, kinds=["sort"], queues=["a"], priorities=[1]) == [
            ids["sort_a_p1"]
        ]
        assert await _listed(
            client, queues=["a"], states=[tq.JobState.AVAILABLE], tags=["blue"]
        ) == [ids["email_a_p2"]]
        assert await _listed(client, ids=[ids["sort_a_p1"]], kinds=["email"]) == []
        assert await _listed(client, kinds=["email"], tags=["red"]) == []


async def test_job_list_limit_and_cursor_paging(client: tq.Client) -> None:
    with trio.fail_after(30):
        results = await client.insert_many([SortArgs([str(i)]) for i in range(25)])
        inserted = sorted(r.job.id for r in results)
        seen: list[int] = []
        sizes = []
        after = None
        while True:
            page = await client.job_list(tq.JobListParams(limit=10, after=after))
            if not page.jobs:
                assert page.last_cursor is None
                break
            sizes.append(len(page.jobs))
            seen.extend(j.id for j in page.jobs)
            assert page.last_cursor is not None
            after = page.last_cursor
        assert sizes == [10, 10, 5]
        assert seen == inserted  # every job exactly once, ordered by id


async def test_job_list_paging_with_filter(client: tq.Client) -> None:
    with trio.fail_after(30):
        items = [
            (SortArgs([str(i)]), tq.InsertOpts(queue="even" if i % 2 == 0 else "odd"))
            for i in range(12)
        ]
        results = await client.insert_many(items)
        even = [r.job.id for r in results if r.job.queue == "even"]
        seen: list[int] = []
        page = await client.job_list(tq.JobListParams(queues=["even"], limit=4))
        while page.jobs:
            seen.extend(j.id for j in page.jobs)
            page = await client.job_list(
                tq.JobListParams(queues=["even"], limit=4, after=page.last_cursor)
            )
        assert page.last_cursor is None
        assert seen == sorted(even)


async def test_job_list_empty(client: tq.Client) -> None:
    with trio.fail_after(30):
        page = await client.job_list()
    assert page.jobs == []
    assert page.last_cursor is None


# ------------------------------------------------------------------ cancel / retry / delete


@pytest.mark.parametrize("kind", ["available", "scheduled", "pending"])
async def test_job_cancel_queued(client: tq.Client, kind: str) -> None:
    opts = {
        "available": tq.InsertOpts(),
        "scheduled": tq.InsertOpts(scheduled_at=datetime.now(UTC) + timedelta(hours=1)),
        "pending": tq.InsertOpts(pending=True),
    }[kind]
    with trio.fail_after(30):
        job = (await client.insert(SortArgs([]), opts)).job
        assert job.state == kind
        cancelled = await client.job_cancel(job.id)
        assert cancelled.state is tq.JobState.CANCELLED
        assert cancelled.finalized_at is not None
        assert _is_utc(cancelled.finalized_at)
        assert await client.job_get(job.id) == cancelled


async def test_job_cancel_finalized_job_is_unchanged(client: tq.Client) -> None:
    with trio.fail_after(30):
        job = (await client.insert(SortArgs([]))).job
        await _set_state(client, job.id, "state = 'completed', finalized_at = now()")
        completed = await client.job_get(job.id)
        assert completed.state is tq.JobState.COMPLETED
        assert await client.job_cancel(job.id) == completed
        assert await client.job_get(job.id) == completed
        # Cancelling twice: the second returns the cancelled job as it is.
        other = (await client.insert(SortArgs([]))).job
        first = await client.job_cancel(other.id)
        assert await client.job_cancel(other.id) == first


async def test_job_cancel_of_a_job_completed_by_a_worker(database_url: str) -> None:
    done = trio.Event()
    workers = tq.Workers()

    @workers.worker(SortArgs)
    async def work(job: tq.Job[SortArgs]) -> None:
        done.set()

    with trio.fail_after(30):
        async with tq.open_client(
            database_url,
            workers=workers,
            queues={"default": tq.QueueConfig(max_workers=2)},
            fetch_poll_interval=0.2,
        ) as client:
            async with client.subscribe(tq.EventKind.JOB_COMPLETED) as events:
                job = (await client.insert(SortArgs(["a"]))).job
                await _wait_completed(events, [job.id])
            assert done.is_set()
            completed = await client.job_get(job.id)
            assert completed.state is tq.JobState.COMPLETED
            assert completed.finalized_at is not None
            assert await client.job_cancel(job.id) == completed


async def test_job_cancel_missing(client: tq.Client) -> None:
    with trio.fail_after(30):
        with pytest.raises(tq.JobNotFoundError):
            await client.job_cancel(987654)


@pytest.mark.parametrize("final_state", ["cancelled", "discarded", "completed"])
async def test_job_retry_finalized(client: tq.Client, final_state: str) -> None:
    with trio.fail_after(30):
        job = (await client.insert(SortArgs([]), tq.InsertOpts(max_attempts=5))).job
        await _set_state(
            client, job.id, f"state = '{final_state}', finalized_at = now(), attempt = 2"
        )
        retried = await client.job_retry(job.id)
        assert retried.state is tq.JobState.AVAILABLE
        assert retried.finalized_at is None
        assert retried.max_attempts == 5  # attempts left: unchanged
        assert retried.attempt == 2
        assert await client.job_get(job.id) == retried


async def test_job_retry_out_of_attempts_gets_one_more(client: tq.Client) -> None:
    with trio.fail_after(30):
        job = (await client.insert(SortArgs([]), tq.InsertOpts(max_attempts=3))).job
        await _set_state(client, job.id, "state = 'discarded', finalized_at = now(), attempt = 3")
        retried = await client.job_retry(job.id)
    assert retried.state is tq.JobState.AVAILABLE
    assert retried.finalized_at is None
    assert retried.attempt == 3
    assert retried.max_attempts > retried.attempt
    assert retried.max_attempts == 4


async def test_job_retry_scheduled_makes_it_available_now(client: tq.Client) -> None:
    with trio.fail_after(30):
        future = datetime.now(UTC) + timedelta(hours=1)
        job = (await client.insert(SortArgs([]), tq.InsertOpts(scheduled_at=future))).job
        retried = await client.job_retry(job.id)
    assert retried.state is tq.JobState.AVAILABLE
    assert retried.scheduled_at < future


async def test_job_retry_missing(client: tq.Client) -> None:
    with trio.fail_after(30):
        with pytest.raises(tq.JobNotFoundError):
            await client.job_retry(987654)


async def test_job_delete(client: tq.Client) -> None:
    with trio.fail_after(30):
        job = (await client.insert(SortArgs(["a"]))).job
        keep = (await client.insert(SortArgs(["b"]))).job
        deleted = await client.job_delete(job.id)
        assert deleted.id == job.id
        assert deleted.args == {"strings": ["a"]}
        with pytest.raises(tq.JobNotFoundError):
            await client.job_get(job.id)
        with pytest.raises(tq.JobNotFoundError):
            await client.job_delete(job.id)
        assert [j.id for j in await _all_jobs(client)] == [keep.id]


async def test_job_delete_running_raises(client: tq.Client) -> None:
    with trio.fail_after(30):
        job = (await client.insert(SortArgs([]))).job
        await _set_state(client, job.id, "state = 'running', attempted_at = now()")
        with pytest.raises(tq.JobRunningError) as info:
            await client.job_delete(job.id)
        assert str(job.id) in str(info.value)
        assert (await client.job_get(job.id)).state is tq.JobState.RUNNING


async def test_job_ids_must_be_integers(client: tq.Client) -> None:
    with trio.fail_after(30):
        for call in (client.job_get, client.job_cancel, client.job_retry, client.job_delete):
            with pytest.raises(tq.ValidationError):
                await call("1")  # type: ignore[arg-type]


# ------------------------------------------------------------------ queue pause / resume


def _recording_workers(ran: list[Any]) -> tq.Workers:
    workers = tq.Workers()

    @workers.worker(SortArgs)
    async def work(job: tq.Job[SortArgs]) -> None:
        ran.append(job.args.strings[0])

    return workers


async def _wait_completed(events: tq.Subscription, job_ids: list[int]) -> None:
    remaining = set(job_ids)
    async for event in events:
        if event.kind is tq.EventKind.JOB_COMPLETED:
            remaining.discard(event.job.id)
            if not remaining:
                return
    raise AssertionError(f"the event stream ended before jobs {remaining} completed")


async def test_paused_queue_is_not_worked_until_resumed(database_url: str) -> None:
    ran: list[str] = []
    with trio.fail_after(30):
        async with tq.open_client(database_url) as admin:
            await admin.queue_pause("default")
            job = (await admin.insert(SortArgs(["paused"]))).job
            async with (
                tq.open_client(
                    database_url,
                    workers=_recording_workers(ran),
                    queues={"default": tq.QueueConfig()},
                    fetch_poll_interval=0.2,
                ) as worker,
                worker.subscribe(tq.EventKind.JOB_COMPLETED) as events,
            ):
                await wait_fetches(worker)  # fetches that saw the job, and left it
                assert ran == []
                assert (await admin.job_get(job.id)).state is tq.JobState.AVAILABLE

                await admin.queue_resume("default")
                await _wait_completed(events, [job.id])
                assert ran == ["paused"]
            assert (await admin.job_get(job.id)).state is tq.JobState.COMPLETED


async def test_pause_while_worker_client_runs(database_url: str) -> None:
    ran: list[str] = []
    with trio.fail_after(30):
        async with (
            tq.open_client(
                database_url,
                workers=_recording_workers(ran),
                queues={"default": tq.QueueConfig()},
                fetch_poll_interval=0.2,
            ) as client,
            client.subscribe(tq.EventKind.JOB_COMPLETED) as events,
        ):
            await client.queue_pause("default")
            job = (await client.insert(SortArgs(["x"]))).job
            await wait_fetches(client)  # fetches that saw the job, and left it
            assert ran == []
            assert (await client.job_get(job.id)).state is tq.JobState.AVAILABLE
            await client.queue_resume("default")
            await _wait_completed(events, [job.id])
            assert ran == ["x"]


async def _paused_queues(client: tq.Client) -> dict[str, bool]:
    async with client.transaction() as tx:
        rows = await tx.fetch("SELECT name, paused_at IS NOT NULL FROM tq_queue")
    return dict(rows)


async def test_pause_star_pauses_every_known_queue(database_url: str) -> None:
    ran: list[str] = []
    with trio.fail_after(30):
        async with tq.open_client(database_url) as admin:
            # Make queues "alpha" and "beta" known.
            for name in ("alpha", "beta"):
                await admin.queue_pause(name)
                await admin.queue_resume(name)
            assert await _paused_queues(admin) == {"alpha": False, "beta": False}

            await admin.queue_pause("*")
            assert await _paused_queues(admin) == {"alpha": True, "beta": True}
            a = (await admin.insert(SortArgs(["a"]), tq.InsertOpts(queue="alpha"))).job
            b = (await admin.insert(SortArgs(["b"]), tq.InsertOpts(queue="beta"))).job

            async with (
                tq.open_client(
                    database_url,
                    workers=_recording_workers(ran),
                    queues={"alpha": tq.QueueConfig(), "beta": tq.QueueConfig()},
                    fetch_poll_interval=0.2,
                ) as worker,
                worker.subscribe(tq.EventKind.JOB_COMPLETED) as events,
            ):
                for queue in ("alpha", "beta"):  # fetches that saw the jobs, and left them
                    await wait_fetches(worker, queue)
                assert ran == []

                await admin.queue_resume("*")
                assert await _paused_queues(admin) == {"alpha": False, "beta": False}
                await _wait_completed(events, [a.id, b.id])
                assert sorted(ran) == ["a", "b"]


async def test_pause_and_resume_are_idempotent(client: tq.Client) -> None:
    with trio.fail_after(30):
        await client.queue_pause("q")
        await client.queue_pause("q")
        assert await _paused_queues(client) == {"q": True}
        await client.queue_resume("q")
        await client.queue_resume("q")
        assert await _paused_queues(client) == {"q": False}
        await client.queue_resume("never-seen")  # no error


@pytest.mark.parametrize("name", ["Bad Queue", "", "a b", "UPPER"])
async def test_pause_bad_queue_name(client: tq.Client, name: str) -> None:
    with trio.fail_after(30):
        with pytest.raises(tq.ValidationError, match="queue"):
            await client.queue_pause(name)
        with pytest.raises(tq.ValidationError, match="queue"):
            await client.queue_resume(name)
        assert await _paused_queues(client) == {}


# ------------------------------------------------------------------ schema check


async def test_unmigrated_database_is_refused(empty_database_url: str) -> None:
    with trio.fail_after(30):
        with pytest.raises(tq.TrioqueueError, match="migrate") as info:
            async with tq.open_client(empty_database_url):
                pytest.fail("the client must not open")  # pragma: no cover
    assert not isinstance(info.value, tq.ValidationError)


async def test_client_opens_after_migrate(empty_database_url: str) -> None:
    with trio.fail_after(30):
        await tq.migrate(empty_database_url)
        async with tq.open_client(empty_database_url) as client:
            job = (await client.insert(SortArgs(["a"]))).job
            assert (await client.job_get(job.id)).id == job.id


TRICKY = [
    "back\\slash",
    "tab\there",
    "new\nline\r\n",
    "quote \" and ' both",
    "\\N",
    "unicode é ✓ 😀",
    "",
    "{curly},[square]",
]


@pytest.mark.parametrize("fast", [True, False])
async def test_inserted_text_round_trips_exactly(typed_client: tq.Client, fast: bool) -> None:
    # insert_many_fast formats COPY text by hand: every awkward character must survive.
    items = [
        (
            SortArgs([text, text * 2]),
            tq.InsertOpts(metadata={"note": text, text: [text]}, tags=["a-b", "c_d"]),
        )
        for text in TRICKY
    ]
    if fast:
        assert await typed_client.insert_many_fast(items) == len(TRICKY)
    else:
        await typed_client.insert_many(items)
    jobs = await _all_jobs(typed_client)
    assert [j.args for j in jobs] == [SortArgs([t, t * 2]) for t in TRICKY]
    assert [j.metadata for j in jobs] == [{"note": t, t: [t]} for t in TRICKY]
    assert all(j.tags == ["a-b", "c_d"] for j in jobs)


async def test_insert_many_fast_unique_jobs_and_schedule(typed_client: tq.Client) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    unique = tq.UniqueOpts(by_args=True)
    count = await typed_client.insert_many_fast(
        [
            (SortArgs(["u"]), tq.InsertOpts(unique=unique)),
            (SortArgs(["s"]), tq.InsertOpts(scheduled_at=later, priority=3, max_attempts=7)),
        ]
    )
    assert count == 2
    dup = await typed_client.insert(SortArgs(["u"]), tq.InsertOpts(unique=unique))
    assert dup.unique_skipped_as_duplicate
    jobs = await _all_jobs(typed_client)
    scheduled = next(j for j in jobs if j.args == SortArgs(["s"]))
    assert scheduled.state == tq.JobState.SCHEDULED
    assert (scheduled.priority, scheduled.max_attempts) == (3, 7)
    assert abs((scheduled.scheduled_at - later).total_seconds()) < 1e-3

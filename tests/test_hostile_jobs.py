"""Hostile jobs never stop the others (issue 13, docs/failure-modes.md).

Whatever a job raises — text PostgreSQL cannot store, a ``str()`` that raises, megabytes of
message, a ``BaseException``, a group, a hand-made ``trio.Cancelled``, an impossible
snooze — its attempt is counted, a storable error is recorded, and the client keeps
working. ``KeyboardInterrupt`` and ``SystemExit`` are recorded the same way and then stop
the client. Every test runs on the memory driver and on PostgreSQL.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any, ClassVar

import attrs
import pytest
import trio
from support import FAST

import trioqueue as tq
import trioqueue.testing as tqt
from trioqueue._failure import MAX_ERROR_MESSAGE, MAX_ERROR_TRACE
from trioqueue.driver.protocol import JobOutcome

_stores = itertools.count()


@pytest.fixture(params=["memory", "postgres"])
def url(request: pytest.FixtureRequest) -> str:
    if request.param == "postgres":
        database_url: str = request.getfixturevalue("database_url")
        return database_url
    return f"memory://hostile-{next(_stores)}"


@attrs.frozen
class Act:
    kind: ClassVar[str] = "act"
    mode: str
    n: int = 0


class StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class StrAndReprRaise(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")

    def __repr__(self) -> str:
        raise RuntimeError("no repr either")


def _long_chain() -> BaseException:
    """An error whose traceback runs to hundreds of kilobytes (a long __cause__ chain)."""
    error: BaseException | None = None
    for i in range(300):
        try:
            raise ValueError(f"link {i} " + "y" * 1000) from error
        except ValueError as exc:
            error = exc
    assert error is not None
    return error


def _mutated_snooze() -> BaseException:
    snooze = tq.JobSnooze(1)
    snooze.seconds = math.nan
    return snooze


HOSTILE: dict[str, Callable[[], BaseException]] = {
    "nul": lambda: ValueError("bad byte \x00 here"),
    # Under the cap as raised, six times over it once escaped.
    "many_surrogates": lambda: ValueError("\udc80" * 3988),
    "surrogate": lambda: ValueError("bad \udc80 here"),
    "str_raises": StrRaises,
    "str_and_repr_raise": StrAndReprRaise,
    "huge_message": lambda: ValueError("x" * 1_000_000),
    "huge_trace": _long_chain,
    "generator_exit": GeneratorExit,
    "bare_base_exception": lambda: BaseException("bare"),
    "base_group": lambda: BaseExceptionGroup("g", [ValueError("a"), GeneratorExit()]),
    "fake_cancelled": trio.Cancelled._create,
    "mutated_snooze": _mutated_snooze,
}
"""Each mode: what the job raises. None of these may stop the client."""

FATAL: dict[str, Callable[[], BaseException]] = {
    "keyboard_interrupt": KeyboardInterrupt,
    "system_exit": lambda: SystemExit(3),
    "group_with_keyboard_interrupt": lambda: BaseExceptionGroup("g", [KeyboardInterrupt()]),
    "group_with_keyboard_interrupt_and_more": lambda: BaseExceptionGroup(
        "g", [ValueError("also"), KeyboardInterrupt()]
    ),
}


async def _act(job: tq.Job[Act]) -> None:
    mode = job.args.mode
    if mode == "ok":
        return
    if mode == "block":
        await trio.sleep_forever()
    raise (HOSTILE.get(mode) or FATAL[mode])()


def _workers() -> tq.Workers:
    workers = tq.Workers()
    workers.add(Act, _act)
    return workers


@asynccontextmanager
async def _client(url: str, **config: Any) -> AsyncIterator[tq.Client]:
    settings = {**FAST, "retry_policy": lambda job: 3600.0, **config}
    async with tq.open_client(
        url, workers=_workers(), queues={"default": tq.QueueConfig(max_workers=20)}, **settings
    ) as client:
        yield client


async def _jobs(url: str) -> dict[int, tq.Job[Any]]:
    async with tq.open_client(url) as client:
        page = await client.job_list(tq.JobListParams(limit=1000))
    return {job.id: job for job in page.jobs}


async def _until_attempted(client: tq.Client, ids: set[int]) -> None:
    """Wait until every job of ``ids`` has been attempted and is no longer running."""
    with trio.fail_after(30):
        while True:
            page = await client.job_list(tq.JobListParams(ids=sorted(ids), limit=len(ids)))
            if all(j.attempt >= 1 and j.state is not tq.JobState.RUNNING for j in page.jobs):
                return
            await trio.sleep(0.05)


def _assert_storable(text: str) -> None:
    assert "\x00" not in text
    text.encode("utf-8")  # no lone surrogate


async def test_hostile_errors_are_recorded_and_the_others_complete(url: str) -> None:
    # One batch: good jobs around every hostile one, so that their outcomes are written
    # together. Before the fix, the NUL wedged the completer for good (every neighbour
    # stayed running), and the surrogate or a BaseException killed the client.
    modes = ["ok", *HOSTILE, "ok"] * 2
    async with _client(url) as client:
        results = await client.insert_many([Act(mode, i) for i, mode in enumerate(modes)])
        ids = {r.job.id for r in results}
        await _until_attempted(client, ids)
        # The client still works: a job inserted now completes.
        late = (await client.insert(Act("ok", -1))).job.id
        await _until_attempted(client, {late})
    jobs = await _jobs(url)
    assert jobs[late].state is tq.JobState.COMPLETED
    for result, mode in zip(results, modes, strict=True):
        job = jobs[result.job.id]
        if mode == "ok":
            assert (job.state, job.errors) == (tq.JobState.COMPLETED, []), job
            continue
        assert job.state is tq.JobState.RETRYABLE, (mode, job)
        assert job.attempt == 1, (mode, job)
        [error] = job.errors
        assert error.attempt == 1
        _assert_storable(error.error)
        _assert_storable(error.trace)
        assert len(error.error) <= MAX_ERROR_MESSAGE + 100, mode
        assert len(error.trace) <= MAX_ERROR_TRACE + 100, mode
    error_of = {
        mode: jobs[r.job.id].errors[0]
        for r, mode in zip(results, modes, strict=True)
        if mode != "ok"
    }
    assert error_of["nul"].error == "ValueError: bad byte \\x00 here"
    assert error_of["surrogate"].error == "ValueError: bad \\udc80 here"
    assert error_of["str_raises"].error == "StrRaises: StrRaises()"
    assert error_of["str_and_repr_raise"].error == "StrAndReprRaise"
    assert error_of["huge_message"].error.endswith("[cut: 1000012 characters in all]")
    assert "characters in all]" in error_of["huge_trace"].trace
    assert error_of["huge_trace"].trace.rstrip().endswith("y" * 50)  # its end is kept
    assert error_of["generator_exit"].error == "GeneratorExit"
    assert error_of["bare_base_exception"].error == "BaseException: bare"
    assert error_of["base_group"].error.startswith("BaseExceptionGroup: g")
    assert error_of["fake_cancelled"].error.startswith("Cancelled")
    assert error_of["mutated_snooze"].error.startswith("InvalidSnoozeError: JobSnooze.seconds")


@pytest.mark.parametrize("mode", sorted(FATAL))
async def test_keyboard_interrupt_and_system_exit_stop_the_client_once_recorded(
    url: str, mode: str
) -> None:
    expected = SystemExit if mode == "system_exit" else KeyboardInterrupt
    with pytest.raises(expected) as raised:
        with trio.fail_after(30):
            async with _client(url) as client:
                blockers = await client.insert_many([Act("block", i) for i in range(3)])
                await _until_running(client, {r.job.id for r in blockers})
                fatal = (await client.insert(Act(mode))).job
                await trio.sleep_forever()  # the job's exception ends this block
    if mode == "system_exit":
        assert raised.value.code == 3
    jobs = await _jobs(url)
    # The job's own attempt is counted and its error recorded: no poison job.
    job = jobs[fatal.id]
    assert (job.state, job.attempt) == (tq.JobState.RETRYABLE, 1), job
    [error] = job.errors
    assert error.error.startswith(("KeyboardInterrupt", "SystemExit", "BaseExceptionGroup"))
    if mode == "group_with_keyboard_interrupt_and_more":
        assert "also" in error.trace  # the whole group is recorded; only the KI is raised
    # The others were interrupted by the stop, as by a hard stop: back to work, attempt
    # given back, no error.
    for blocker in blockers:
        other = jobs[blocker.job.id]
        assert (other.state, other.attempt, other.errors) == (tq.JobState.AVAILABLE, 0, [])


async def _until_running(client: tq.Client, ids: set[int]) -> None:
    with trio.fail_after(30):
        while True:
            page = await client.job_list(tq.JobListParams(ids=sorted(ids), limit=len(ids)))
            if all(j.state is tq.JobState.RUNNING for j in page.jobs):
                return
            await trio.sleep(0.05)


async def test_a_job_that_kills_every_client_runs_out_of_attempts(url: str) -> None:
    # Before the fix the job went back to available with its attempt given back, so every
    # client that started fetched it and died too, forever.
    async with tq.open_client(url) as admin:
        fatal = (await admin.insert(Act("keyboard_interrupt"), tq.InsertOpts(max_attempts=2))).job
    for _ in range(2):
        with pytest.raises(KeyboardInterrupt), trio.fail_after(30):
            async with _client(url, retry_policy=lambda job: 0.0):
                await trio.sleep_forever()
    async with _client(url) as client:
        ok = (await client.insert(Act("ok"))).job
        await _until_attempted(client, {ok.id})
    jobs = await _jobs(url)
    assert jobs[ok.id].state is tq.JobState.COMPLETED
    job = jobs[fatal.id]
    assert (job.state, job.attempt, len(job.errors)) == (tq.JobState.DISCARDED, 2, 2)


@pytest.mark.parametrize(
    "answer",
    [math.nan, math.inf, -1.0, "soon", True, None, "raise"],
    ids=["nan", "inf", "negative", "str", "bool", "none", "raises"],
)
async def test_a_retry_policy_answer_that_is_no_delay_falls_back_to_the_default(
    url: str, answer: object
) -> None:
    def policy(job: tq.Job[Any]) -> Any:
        if answer == "raise":
            raise RuntimeError("policy broke")
        return answer

    async with _client(url, retry_policy=policy, scheduler_interval=60.0) as client:
        job = (await client.insert(Act("nul"))).job
        await _until_attempted(client, {job.id})
    stored = (await _jobs(url))[job.id]
    # The default for a first error is 1 s ± 10%: due within scheduler_interval.
    assert stored.state is tq.JobState.AVAILABLE
    assert stored.scheduled_at is not None and stored.attempted_at is not None
    assert 0.8 <= (stored.scheduled_at - stored.errors[0].at).total_seconds() <= 1.2
    assert "the default delay was used" in stored.errors[0].error


@pytest.mark.parametrize("seconds", [math.nan, math.inf, -math.inf, -1, 1e300, True, "5"])
def test_job_snooze_refuses_what_cannot_be_scheduled(seconds: Any) -> None:
    with pytest.raises(tq.ValidationError, match=r"JobSnooze\.seconds"):
        tq.JobSnooze(seconds)


async def test_stored_args_that_are_not_an_object_fail_the_attempt(url: str) -> None:
    # A row written by hand (or by an older version) whose args are not a JSON object: the
    # worker must not get the raw value; the attempt fails with the reason recorded.
    async with tq.open_client(url) as admin:
        [(row, _)] = await admin.driver.job_insert_many(
            [admin._inserts.params(Act("ok"), admin.driver.clock())._replace(args_json="[1, 2]")],
            [],
            admin.driver.clock(),
        )
    async with _client(url) as client:
        await _until_attempted(client, {row[0]})
    job = (await _jobs(url))[row[0]]
    assert job.state is tq.JobState.RETRYABLE
    assert job.errors[0].error.startswith(
        "ArgsDecodeError: the stored args are a JSON list, not an object"
    )


async def test_work_one_records_a_system_exit_then_raises_it() -> None:
    driver = tq.MemoryDriver()
    with pytest.raises(SystemExit) as raised:
        await tqt.work_one(_act, Act("system_exit"), driver=driver)
    assert raised.value.code == 3
    async with tq.open_client(driver=driver) as client:
        [job] = (await client.job_list()).jobs
    assert (job.attempt, [e.error for e in job.errors]) == (1, ["SystemExit: 3"])


async def test_several_jobs_exiting_at_once_still_exit_with_their_code(url: str) -> None:
    # Four jobs in two queues raise SystemExit(3) in the same round: the process must exit
    # with 3, not with a traceback of a group of four.
    with pytest.raises(SystemExit) as raised, trio.fail_after(30):
        async with tq.open_client(
            url,
            workers=_workers(),
            queues={"default": tq.QueueConfig(max_workers=5), "other": tq.QueueConfig()},
            **FAST,
        ) as client:
            await client.insert_many(
                [
                    (Act("system_exit", i), tq.InsertOpts(queue=q))
                    for i in range(2)
                    for q in ("default", "other")
                ]
            )
            await trio.sleep_forever()
    assert raised.value.code == 3


@pytest.mark.parametrize(
    ("answer", "delay"),
    [(2**1100, 10 * 365 * 86400.0), (Decimal("120.5"), 120.5), (1e30, 10 * 365 * 86400.0)],
    ids=["int-past-float", "decimal", "huge-float"],
)
async def test_a_retry_policy_answer_is_taken_as_seconds_and_capped(
    url: str, answer: object, delay: float
) -> None:
    async with _client(url, retry_policy=lambda job: answer) as client:
        job = (await client.insert(Act("nul"))).job
        await _until_attempted(client, {job.id})
        ok = (await client.insert(Act("ok"))).job  # the client goes on
        await _until_attempted(client, {ok.id})
    stored = (await _jobs(url))[job.id]
    assert stored.state is tq.JobState.RETRYABLE
    assert (stored.scheduled_at - stored.errors[0].at).total_seconds() == pytest.approx(delay)
    assert "default delay" not in stored.errors[0].error


async def test_a_row_with_malformed_errors_and_metadata_is_still_read_and_run(url: str) -> None:
    # Written by hand: an errors entry that is not an object, one whose time and attempt
    # are garbage, and metadata that is not an object. Reading such a row used to raise
    # inside the producer, which killed the client and left its whole fetch running.
    async with tq.open_client(url) as admin:
        store = admin.driver
        now = store.clock()
        params = admin._inserts.params(Act("ok"), now)
        [(odd, _)] = await store.job_insert_many(
            [params._replace(metadata_json="[1, 2]", queue="odd")], [], now
        )
        for entry in ("7", '{"at": "garbage", "attempt": "x", "error": "by hand"}'):
            [claimed] = await store.job_get_available("odd", store.clock(), 1, "by-hand")
            outcome = JobOutcome(
                claimed[0], tq.JobState.AVAILABLE, None, None, True, entry, None, claimed[8]
            )
            await store.job_set_state_if_running_many([outcome], store.clock())
        await store.job_insert_many([params._replace(queue="odd")] * 3, [], now)
        read = await admin.job_get(odd[0])
        assert [e.error for e in read.errors] == ["7", "by hand"]
        assert read.metadata == {"(stored metadata is not an object)": [1, 2]}
    async with tq.open_client(
        url, workers=_workers(), queues={"odd": tq.QueueConfig(max_workers=5)}, **FAST
    ) as client:
        await _until_attempted(client, set((await _jobs(url)).keys()))
    assert {job.state for job in (await _jobs(url)).values()} == {tq.JobState.COMPLETED}

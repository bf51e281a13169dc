"""Helpers for testing an application's own jobs, like River's ``rivertest``.

``require_inserted``, ``require_not_inserted`` and ``require_many_inserted`` check which jobs
an application inserted; ``work_one`` runs one job through the real executor and completer
and returns what it left behind. Failed checks raise ``AssertionError`` (pytest shows the
message); bad arguments raise ``trioqueue.ValidationError`` naming the argument and the rule.

::

    import trioqueue.testing as tqt

    async def test_signup_sends_mail(client):
        await signup(client, "ada@example.com")
        job = await tqt.require_inserted(client, SendMail, to="ada@example.com", queue="mail")

    async def test_send_mail_worker():
        res = await tqt.work_one(send_mail, SendMail(to="ada@example.com"))
        assert res.event_kind is tq.EventKind.JOB_COMPLETED

Matching (``**expected``) takes two kinds of key:

- **Job fields**: ``queue``, ``priority``, ``max_attempts``, ``state`` (a ``JobState`` or its
  value), ``scheduled_at`` (an aware datetime, equal to the microsecond) and ``tags`` (the
  list, in order) must equal the job's; ``metadata`` is a subset match: each key given must
  be in the job's metadata with an equal (JSON) value, other keys are ignored.
- **Args**: ``args=`` compares the whole decoded args value with ``==``; any other key names
  a field of the args type (an attrs or dataclass field), compared with the decoded args'
  attribute. A field whose name is also a job field cannot be named directly: use ``args=``.

A job whose args the args type cannot decode never matches. Any other key is a
``ValidationError``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, Generic, TypeVar, final

import attrs
import trio

from ._codec import row_to_job
from ._failure import fatal_unwrapped
from ._job_matcher import Matcher, closest, job_line
from ._runtime.completer import Completer
from ._runtime.executor import Executor
from ._runtime.lane import JobHandle
from .client import Client, open_client
from .config import ClientConfig
from .current import running_client
from .driver.memory import MemoryDriver
from .driver.protocol import Driver
from .errors import TrioqueueError, UnknownJobKindError, ValidationError
from .events import Event, EventKind
from .job import InsertOpts, Job, JobListParams
from .transaction import Transaction
from .workers import Workers, args_kind

__all__ = [
    "ExpectedJob",
    "WorkResult",
    "require_inserted",
    "require_many_inserted",
    "require_not_inserted",
    "work_one",
]

A = TypeVar("A")

_PAGE: Final = 1000


def _reader(client_or_tx: Client | Transaction) -> tuple[Driver, Any, str]:
    """The driver, the ``ex`` to read through, and where the reads look (for messages)."""
    if isinstance(client_or_tx, Client):
        return client_or_tx.driver, None, "visible to the client"
    if isinstance(client_or_tx, Transaction):
        driver: Driver | None = client_or_tx._driver
        if driver is None:
            raise ValidationError(
                "client_or_tx", "the Transaction must come from client.transaction()"
            )
        return driver, client_or_tx.connection, "visible in the transaction"
    raise ValidationError(
        "client_or_tx",
        f"must be a trioqueue.Client or a Transaction from client.transaction(), "
        f"got {type(client_or_tx).__name__}",
    )


async def _jobs(driver: Driver, ex: Any, kinds: Sequence[str] | None) -> list[Job[Any]]:
    """Every job of ``kinds`` (None: all) the reader sees, by id, args as raw JSON."""
    found: list[Job[Any]] = []
    after: int | None = None
    while True:
        params = JobListParams(kinds=kinds, limit=_PAGE, after=after)
        rows = await driver.job_list(params, ex=ex)
        found.extend(row_to_job(row, None) for row in rows)
        if len(rows) < _PAGE:
            return found
        after = rows[-1].id


async def _other_kinds(driver: Driver, ex: Any) -> str:
    rows = await driver.job_list(JobListParams(limit=_PAGE), ex=ex)
    counts = Counter(str(row.kind) for row in rows)
    if not counts:
        return "no jobs of any kind"
    listed = ", ".join(f"{kind!r} x{n}" for kind, n in sorted(counts.items()))
    more = " (first 1000 jobs)" if len(rows) == _PAGE else ""
    return f"jobs of other kinds{more}: {listed}"


async def require_inserted(
    client_or_tx: Client | Transaction, args_type: type[A], /, **expected: object
) -> Job[A]:
    """Assert that exactly one job of ``args_type.kind`` matches ``expected``; return it.

    Looks at the jobs the client sees (committed ones), or, given a ``Transaction`` from
    ``client.transaction()``, at those the transaction sees (its own uncommitted inserts
    too). Other jobs of the kind that do not match are allowed — unlike River's
    ``RequireInserted``, which wants exactly one job of the kind; use
    :func:`require_many_inserted` to pin down every job of a kind. See the module docstring
    for what ``expected`` may name.

    Returns the job with its args decoded as ``args_type``.

    Raises ``AssertionError`` when no job or several match: the message gives how many
    jobs of the kind exist and, for the closest ones, each field that differs (expected vs
    actual). Raises ``ValidationError`` for an unknown key or a badly typed value (before
    reading anything).

    Read-only, and a checkpoint; cancelled, it has changed nothing.
    """
    matcher = Matcher(args_type, expected)
    driver, ex, where = _reader(client_or_tx)
    jobs = await _jobs(driver, ex, [matcher.kind])
    matches: list[Job[Any]] = []
    for job in jobs:
        typed, diffs = matcher.differences(job)
        if not diffs and typed is not None:
            matches.append(typed)
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        ids = ", ".join(str(j.id) for j in matches)
        raise AssertionError(
            f"require_inserted: expected exactly one job matching {matcher.describe()}, "
            f"found {len(matches)} {where} (ids {ids}); add fields to tell them apart, "
            "or use require_many_inserted"
        )
    if not jobs:
        others = await _other_kinds(driver, ex)
        raise AssertionError(
            f"require_inserted: no job of kind {matcher.kind!r} {where} "
            f"(expected one matching {matcher.describe()}); found {others}"
        )
    lines = "\n".join(closest(matcher, jobs))
    raise AssertionError(
        f"require_inserted: no job matches {matcher.describe()}; {len(jobs)} job(s) of kind "
        f"{matcher.kind!r} are {where}. Closest, with the fields that differ:\n{lines}"
    )


async def require_not_inserted(
    client_or_tx: Client | Transaction, args_type: type[A], /, **expected: object
) -> None:
    """Assert that no job of ``args_type.kind`` matches ``expected`` (with no ``expected``:
    that no job of the kind exists at all).

    Reads as :func:`require_inserted` does. Raises ``AssertionError`` naming the matching
    jobs; ``ValidationError`` for bad ``expected``. Read-only, and a checkpoint; cancelled,
    it has changed nothing.
    """
    matcher = Matcher(args_type, expected)
    driver, ex, where = _reader(client_or_tx)
    jobs = await _jobs(driver, ex, [matcher.kind])
    matches = [job for job in jobs if not matcher.differences(job)[1]]
    if matches:
        lines = "\n".join(f"  {job_line(job)}: args {job.args!r}" for job in matches[:10])
        more = f"\n  ... and {len(matches) - 10} more" if len(matches) > 10 else ""
        raise AssertionError(
            f"require_not_inserted: expected no job matching {matcher.describe()}, found "
            f"{len(matches)} {where} (of {len(jobs)} of kind {matcher.kind!r}):\n{lines}{more}"
        )


@final
class ExpectedJob:
    """One entry of :func:`require_many_inserted`: an args type and what its job must
    match (the keys of :func:`require_inserted`). Raises ``ValidationError`` for an
    unknown key or a badly typed value."""

    __slots__ = ("_matcher",)

    def __init__(self, args_type: type[Any], /, **expected: object) -> None:
        self._matcher = Matcher(args_type, expected)

    @property
    def args_type(self) -> type[Any]:
        return self._matcher.args_type

    @property
    def expected(self) -> dict[str, object]:
        return dict(self._matcher.expected)

    def __repr__(self) -> str:
        inner = "".join(f", {k}={v!r}" for k, v in self._matcher.expected.items())
        return f"ExpectedJob({self.args_type.__name__}{inner})"


async def require_many_inserted(
    client_or_tx: Client | Transaction, expected: Sequence[ExpectedJob | type[Any]], /
) -> list[Job[Any]]:
    """Assert that the jobs of the listed kinds, in id (insertion) order, are exactly
    ``expected``: the same count, and the Nth job has the Nth entry's kind and matches it.

    As River's ``RequireManyInserted``: every job of a kind that appears in ``expected`` is
    considered, jobs of other kinds are ignored. A bare args type stands for
    ``ExpectedJob(args_type)`` (any job of that kind). Reads as :func:`require_inserted`
    does. Returns the jobs with typed args, in order.

    Raises ``AssertionError`` listing the expected and actual jobs position by position
    and what differs; ``ValidationError`` for an empty list or a bad entry. Read-only, and
    a checkpoint; cancelled, it has changed nothing.
    """
    if isinstance(expected, str | bytes) or not isinstance(expected, Sequence) or not expected:
        raise ValidationError("expected", "must be a non-empty list of ExpectedJob or args types")
    matchers = [
        e._matcher if isinstance(e, ExpectedJob) else ExpectedJob(e)._matcher for e in expected
    ]
    kinds = sorted({m.kind for m in matchers})
    driver, ex, where = _reader(client_or_tx)
    jobs = await _jobs(driver, ex, kinds)
    typed_jobs: list[Job[Any]] = []
    problems: list[str] = []
    for i, (matcher, job) in enumerate(zip(matchers, jobs, strict=False)):
        typed, diffs = matcher.differences(job)
        if diffs or typed is None:
            problems.append(f"  [{i}] {job_line(job)} vs {matcher.describe()}: {'; '.join(diffs)}")
        else:
            typed_jobs.append(typed)
    if len(jobs) != len(matchers):
        for i in range(len(jobs), len(matchers)):
            problems.append(f"  [{i}] missing: expected {matchers[i].describe()}")
        for i in range(len(matchers), len(jobs)):
            problems.append(f"  [{i}] unexpected: {job_line(jobs[i])} args {jobs[i].args!r}")
    if problems:
        kinds_text = ", ".join(repr(k) for k in kinds)
        raise AssertionError(
            f"require_many_inserted: expected {len(matchers)} job(s) of kinds {kinds_text} "
            f"in this order, found {len(jobs)} {where}; differences:\n" + "\n".join(problems)
        )
    return typed_jobs


# ------------------------------------------------------------------------------------------
# Working one job


@final
@attrs.frozen
class WorkResult(Generic[A]):
    """What :func:`work_one` left behind."""

    event_kind: EventKind
    """The event a client would have published for this run (``JOB_COMPLETED``,
    ``JOB_FAILED``, ``JOB_SNOOZED``, ``JOB_CANCELLED``)."""
    job: Job[A]
    """The job row as the run's outcome wrote it, with the args the worker saw (the raw
    JSON object when they could not be decoded)."""


_CONFIG_FIELDS: Final = frozenset(f.name for f in attrs.fields(ClientConfig))


def _workers_for(workers_or_fn: object, args: object) -> Workers:
    if isinstance(workers_or_fn, Workers):
        kind = args_kind(type(args))
        if workers_or_fn.get(kind) is None:
            raise UnknownJobKindError(kind)
        return workers_or_fn
    if not callable(workers_or_fn):
        raise ValidationError(
            "workers_or_fn", "must be a trioqueue.Workers or an async worker function"
        )
    workers = Workers()
    workers.add(type(args), workers_or_fn)
    return workers


@asynccontextmanager
async def _client_for(
    client: Client | None, driver: Driver | None, database_url: str | None, config: dict[str, Any]
) -> AsyncIterator[Client]:
    given = [
        name
        for name, value in (("client", client), ("driver", driver), ("database_url", database_url))
        if value is not None
    ]
    if len(given) > 1:
        raise ValidationError(given[1], f"give one of {' or '.join(given)}, not both")
    for key in config:
        if key not in _CONFIG_FIELDS:
            raise ValidationError(key, "is not a client config option of open_client")
    if client is not None:
        if not isinstance(client, Client):
            raise ValidationError("client", "must be a trioqueue.Client")
        if config:
            raise ValidationError(
                next(iter(config)), "with client=, the client's own config is used"
            )
        yield client
    elif database_url is not None:
        async with open_client(database_url, **config) as opened:
            yield opened
    else:
        async with open_client(
            driver=driver if driver is not None else MemoryDriver(), **config
        ) as opened:
            yield opened


def _held_opts(args: object, opts: InsertOpts | None) -> InsertOpts:
    """The insert options, but pending (so no producer can take the job before it is
    claimed) and without uniqueness (so equal jobs can be worked one after another)."""
    if opts is None:
        own = getattr(args, "insert_opts", None)
        opts = own() if callable(own) else InsertOpts()
    if not isinstance(opts, InsertOpts):
        raise ValidationError("opts", "must be a trioqueue.InsertOpts")
    return attrs.evolve(opts, pending=True, unique=None)


async def work_one(
    workers_or_fn: Workers | Callable[[Job[A]], Awaitable[object]],
    args: A,
    *,
    opts: InsertOpts | None = None,
    client: Client | None = None,
    driver: Driver | None = None,
    database_url: str | None = None,
    **config: Any,
) -> WorkResult[A]:
    """Insert one job with ``args`` and ``opts``, run it once, and return the outcome.

    The run takes the client's own path: the executor (the worker's ``timeout`` or
    ``job_timeout``, errors and retries with ``retry_policy`` or the worker's
    ``next_retry``, ``JobSnooze``, ``JobCancel``, ``error_handler``) and the completer's
    write. So a failure leaves the job ``retryable`` (or ``available`` when the retry is due
    within ``scheduler_interval``, as with a client) with the error recorded, or
    ``discarded`` on its last attempt. What the worker returns is recorded as the job's
    output as on a client (``res.job.output``); a return value that cannot be stored fails
    the attempt in the same way.

    ``workers_or_fn``: a ``Workers`` that has a worker for ``args``' kind, or one async
    worker function (registered for ``type(args)``). Storage: ``client`` (its config is
    used; ``**config`` must be empty), ``driver`` or ``database_url`` (an insert-only
    client is opened for the call, with ``**config``: any ``open_client`` option); none of
    them: a fresh ``MemoryDriver``.

    The job is inserted ``pending`` and claimed by id, so no running client's producer can
    take it, and it runs at once whatever its ``scheduled_at``, queue or pause. ``opts.unique``
    is ignored (as River's test worker does), so equal jobs can be worked one after another.

    Raises ``ValidationError`` (nothing written) for bad arguments, ``UnknownJobKindError``
    when ``workers`` has no worker for the kind; never raises the worker's exception (it is
    recorded on the job), except ``KeyboardInterrupt`` and ``SystemExit``, which propagate
    once recorded, as they stop a client (docs/failure-modes.md).

    On cancellation from outside while the worker runs: as on a client's hard stop, the
    job goes back to ``available`` with its attempt given back (written, shielded, within
    ``shutdown_timeout``), then Cancelled propagates. Cancelled before the claim, the job
    may stay ``pending``.
    """
    workers = _workers_for(workers_or_fn, args)
    held = _held_opts(args, opts)
    async with _client_for(client, driver, database_url, dict(config)) as runner:
        inserted = (await runner.insert(args, held)).job
        store = runner.driver
        row = await store.job_claim(inserted.id, store.clock(), runner.config.id)
        if row is None:
            raise TrioqueueError(f"job {inserted.id} was taken by someone else before it ran")
        return await _run_claimed(runner, workers, row_to_job(row, None))


async def _run_claimed(client: Client, workers: Workers, job: Job[Any]) -> WorkResult[Any]:
    """Run a claimed job through an Executor and a Completer of its own, as a producer
    does, and return the written job with its event kind."""
    cfg = client.config
    store = client.driver
    entry = workers.get(job.kind)
    args_type = entry.args_type if entry is not None else None
    send, receive = trio.open_memory_channel[list[Event]](8)
    completer = Completer(
        store,
        store.clock,
        send,
        lambda kind: args_type if kind == job.kind else None,
        cfg.shutdown_timeout,
        linger=0.0,
    )
    executor = Executor(workers, cfg, store.clock)
    # A job's KeyboardInterrupt or SystemExit propagates (as itself) once written.
    with fatal_unwrapped():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(completer.run)
            with completer.sender() as outcomes:
                token = running_client.set(client)  # trioqueue.current_client() in the job
                try:
                    finished = await executor.execute(job, JobHandle(), outcomes)
                finally:
                    running_client.reset(token)
    with receive:
        while True:
            try:
                batch = receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            for event in batch:
                if event.job is not None and event.job.id == job.id:
                    return WorkResult(event.kind, event.job)
    # The write found the job no longer running (deleted or changed meanwhile): report it
    # as it is now.
    row = await store.job_get(job.id)
    if row is None:
        raise TrioqueueError(f"job {job.id} was deleted while it ran")
    return WorkResult(finished.event_kind, row_to_job(row, args_type))

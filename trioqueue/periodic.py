"""Periodic jobs: what to insert and when (each client's enqueuer does the inserting).

A :class:`PeriodicJob` pairs a schedule — ``every=`` seconds or a 5-field ``cron=`` string,
both in UTC — with a function that builds the job's args. Run times are fixed points in
time, computed the same way by every client: ``every=N`` runs at the multiples of N seconds
since the Unix epoch, ``cron=`` at the times its expression matches. That is what lets
every client give each run the same unique key (the periodic job's id and the run time),
so a run is inserted at most once however many clients have the job, whoever leads, and
across restarts.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, final

import attrs
import trio

from .errors import ValidationError

__all__ = ["PeriodicJob", "PeriodicJobHandle", "PeriodicJobs", "Schedule"]

ID_MAX_LENGTH = 128
_ID_RE = re.compile(r"[\w][\w.:/@+\-\[\]<>=*, ]*")  # fullmatch: "$" takes "x\n"

MISSED_RUNS_COUNT_LIMIT = 10_000
"""Missed runs are counted up to this many (counting further would only burn CPU)."""

CRON_INSTALL_HINT = "cron schedules need the cronsim package: pip install 'trioqueue[cron]'"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)


def _to_us(at: datetime) -> int:
    """Microseconds since the epoch, exactly (no float rounding)."""
    return (at - _EPOCH) // _US


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _cronsim() -> Any:
    """The cronsim module, imported on first use so the core works without it."""
    try:
        import cronsim
    except ImportError:
        return None
    return cronsim


@final
@attrs.frozen
class Schedule:
    """Run times of a periodic job: every ``interval_us`` microseconds since the epoch,
    or the matches of ``cron``. All methods take and return aware UTC datetimes."""

    interval_us: int | None = None
    cron: str | None = None

    @property
    def key(self) -> str:
        """A stable text form, stored with the job's state to notice a changed schedule."""
        if self.interval_us is not None:
            seconds, micros = divmod(self.interval_us, 1_000_000)
            text = f"{seconds}.{micros:06d}".rstrip("0").rstrip(".")
            return f"every={text}"
        return f"cron={self.cron}"

    def _cron_iter(self, start: datetime, reverse: bool) -> Iterator[datetime]:
        module = _cronsim()
        if module is None:  # installed when the job was built, gone now: unlikely
            raise ValidationError("PeriodicJob.cron", CRON_INSTALL_HINT)
        it: Iterator[datetime] = module.CronSim(self.cron, start.astimezone(UTC), reverse=reverse)
        return it

    def next_after(self, at: datetime) -> datetime:
        """The first run time strictly after ``at``."""
        if self.interval_us is not None:
            n = _to_us(at) // self.interval_us + 1
            return _from_us(n * self.interval_us)
        return next(self._cron_iter(at, reverse=False))

    def latest_at_or_before(self, at: datetime) -> datetime:
        """The last run time at or before ``at`` (the slot ``at`` falls in)."""
        if self.interval_us is not None:
            n = _to_us(at) // self.interval_us
            return _from_us(n * self.interval_us)
        # cronsim's reverse iteration starts strictly before its start, after dropping
        # sub-second digits; one microsecond more makes ``at`` itself a candidate.
        return next(self._cron_iter(at + _US, reverse=True))

    def count_between(self, first: datetime, last: datetime) -> int:
        """How many run times fall in ``[first, last]`` (at most MISSED_RUNS_COUNT_LIMIT)."""
        if last < first:
            return 0
        if self.interval_us is not None:
            step = self.interval_us
            lo = -(-_to_us(first) // step)  # ceil
            hi = _to_us(last) // step
            return max(0, min(hi - lo + 1, MISSED_RUNS_COUNT_LIMIT))
        count = 0
        for at in self._cron_iter(first - _US, reverse=False):
            if at > last or count >= MISSED_RUNS_COUNT_LIMIT:
                break
            count += 1
        return count


EVERY_MAX = 10 * 366 * 86_400
"""The longest ``every`` (seconds): about ten years."""


def _check_every(value: object) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValidationError("PeriodicJob.every", "must be a number of seconds greater than 0")
    us = round(value * 1_000_000)
    if us < 1:
        raise ValidationError("PeriodicJob.every", "must be at least one microsecond")
    if value > EVERY_MAX:
        # Run times must stay datetimes: a grid of centuries would overflow them.
        raise ValidationError(
            "PeriodicJob.every", f"must be at most {EVERY_MAX:,} seconds (10 years)"
        )
    return us


def _check_cron(value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError("PeriodicJob.cron", "must be a string such as '*/5 * * * *'")
    fields = value.split()
    if len(fields) != 5:
        raise ValidationError(
            "PeriodicJob.cron",
            f"must have 5 fields (minute hour day-of-month month day-of-week), got {len(fields)}",
        )
    expr = " ".join(fields)
    module = _cronsim()
    if module is None:
        raise ValidationError("PeriodicJob.cron", CRON_INSTALL_HINT)
    try:
        next(module.CronSim(expr, datetime.now(UTC)))
    except (module.CronSimError, StopIteration, ValueError) as exc:
        raise ValidationError("PeriodicJob.cron", f"{expr!r} is not valid: {exc}") from None
    return expr


def _callable_name(fn: Callable[..., Any]) -> str:
    target = getattr(fn, "func", fn)  # functools.partial: name the wrapped function
    module = getattr(target, "__module__", None) or type(target).__module__
    qualname = getattr(target, "__qualname__", None) or type(target).__qualname__
    return f"{module}.{qualname}"


def _derived_id(fn: Callable[..., Any], schedule: Schedule) -> str:
    text = f"{_callable_name(fn)}@{schedule.key}"
    if len(text) <= ID_MAX_LENGTH:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return f"{text[: ID_MAX_LENGTH - 17]}~{digest}"


@final
@attrs.frozen(kw_only=True)
class PeriodicJob:
    """A job inserted on a schedule by the clients that have it (each run once).

    Give exactly one of ``every`` (seconds; runs at the multiples of ``every`` since the
    Unix epoch, so ``every=3600`` runs on the hour) or ``cron`` (a 5-field cron expression,
    evaluated in UTC; needs ``pip install 'trioqueue[cron]'``).

    ``args`` is called (synchronously, by the client that claimed the run, inside the
    transaction that inserts it: once per run unless a claim is rolled back; keep it
    quick, since clients due at once wait for that claim, and on PostgreSQL a claim idle
    for 30 s is ended by the server) and returns the job's args, an
    ``(args, InsertOpts)`` pair, or ``None`` to skip that run. If it raises, or returns
    what this client cannot insert, the claim is rolled back and the run is left for
    another client with the job (or this one's next pass). The job's
    ``metadata`` gets ``periodic: true``, ``periodic_job_id`` and ``periodic_run_at`` (the
    run time, ISO 8601); its unique options are replaced by a key for the run, unique over
    every state, so a run is never inserted twice.

    ``run_on_start``: also insert a run for the current slot (the latest run time at or
    before now) when a client first sees this job, unless that slot already has its run.

    ``id`` names the job's durable schedule state (``tq_periodic_job``). Leave it ``None``
    and one is derived from the ``args`` function's module and qualified name plus the
    schedule (``myapp.jobs.nightly@cron=0 3 * * *``) — stable across restarts, but renaming
    the function or changing the schedule starts a fresh state. **Prefer an explicit id.**
    """

    args: Callable[[], Any]
    every: float | None = None
    cron: str | None = None
    run_on_start: bool = False
    id: str | None = None
    schedule: Schedule = attrs.field(init=False, eq=False, repr=False)
    effective_id: str = attrs.field(init=False, eq=False, repr=False)
    """``id``, or the derived one when ``id`` is None."""

    def __attrs_post_init__(self) -> None:
        if (self.every is None) == (self.cron is None):
            field = "PeriodicJob.every" if self.every is None else "PeriodicJob.cron"
            raise ValidationError(field, "give exactly one of every= or cron=")
        if self.every is not None:
            schedule = Schedule(interval_us=_check_every(self.every))
        else:
            schedule = Schedule(cron=_check_cron(self.cron))
        if not callable(self.args):
            raise ValidationError(
                "PeriodicJob.args", "must be a function () -> args | (args, opts) | None"
            )
        if not isinstance(self.run_on_start, bool):
            raise ValidationError("PeriodicJob.run_on_start", "must be True or False")
        if self.id is not None and (
            not isinstance(self.id, str)
            or not 1 <= len(self.id) <= ID_MAX_LENGTH
            or not _ID_RE.fullmatch(self.id)
        ):
            raise ValidationError(
                "PeriodicJob.id",
                f"must be 1-{ID_MAX_LENGTH} characters: letters, digits, _ . : / @ + - and "
                "the like, starting with a letter, digit or _",
            )
        object.__setattr__(self, "schedule", schedule)
        effective = self.id if self.id is not None else _derived_id(self.args, schedule)
        object.__setattr__(self, "effective_id", effective)


@final
@attrs.frozen
class PeriodicJobHandle:
    """What :meth:`PeriodicJobs.add` returns; pass it to :meth:`PeriodicJobs.remove`."""

    number: int
    job: PeriodicJob


def check_periodic_jobs(jobs: Iterable[object], field: str = "periodic_jobs") -> None:
    """Each item is a PeriodicJob, and no two share an id."""
    seen: set[str] = set()
    for i, job in enumerate(jobs):
        if not isinstance(job, PeriodicJob):
            raise ValidationError(f"{field}[{i}]", "must be a trioqueue.PeriodicJob")
        if job.effective_id in seen:
            raise ValidationError(
                f"{field}[{i}]",
                f"id {job.effective_id!r} is used twice; give each periodic job its own id=",
            )
        seen.add(job.effective_id)


@final
class PeriodicJobs:
    """A client's periodic jobs (``client.periodic_jobs``), changeable while it runs.

    Every client inserts the runs of its own list, leader or not. Each change wakes the
    client's enqueuer. Methods are synchronous and never block.
    """

    def __init__(self, jobs: Iterable[PeriodicJob] = ()) -> None:
        self._next = 0
        self._handles: dict[int, PeriodicJobHandle] = {}
        self._changed = trio.Event()
        for job in jobs:
            self.add(job)

    def __repr__(self) -> str:
        ids = [h.job.effective_id for h in self._handles.values()]
        return f"<trioqueue.PeriodicJobs {ids!r}>"

    def __iter__(self) -> Iterator[PeriodicJob]:
        return iter([h.job for h in self._handles.values()])

    def __len__(self) -> int:
        return len(self._handles)

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def add(self, job: PeriodicJob) -> PeriodicJobHandle:
        """Add a periodic job; raises ValidationError if its id is already in use."""
        check_periodic_jobs([*self, job], "periodic_jobs.add")
        handle = PeriodicJobHandle(self._next, job)
        self._next += 1
        self._handles[handle.number] = handle
        self._notify()
        return handle

    def remove(self, handle: PeriodicJobHandle) -> bool:
        """Remove the job ``handle`` was returned for; False if it was already gone.

        Its stored schedule state stays: adding it back later (same id) resumes it, with
        a catch-up run if run times passed meanwhile.
        """
        if not isinstance(handle, PeriodicJobHandle):
            raise ValidationError("handle", "must be a handle returned by periodic_jobs.add")
        if self._handles.get(handle.number) is not handle:
            return False
        del self._handles[handle.number]
        self._notify()
        return True

    def clear(self) -> None:
        """Remove every periodic job."""
        self._handles.clear()
        self._notify()

    def watch(self) -> tuple[list[PeriodicJob], trio.Event]:
        """The jobs now, and an event set at the next change (for the enqueuer)."""
        return list(self), self._changed

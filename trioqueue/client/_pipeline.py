"""The insert pipeline: from the items given to ``Client.insert*`` to rows in storage.

Items are built into params by the client's `InsertBuilder`, or first run through the
insert middleware and ``insert_begin`` hooks when the client has any. Then the driver
writes them in one statement (``insert``, ``insert_many``) or with COPY
(``insert_many_fast``), asking the queues' producers to fetch (a NOTIFY, rate-limited
per queue) when jobs are available at once. The public methods on `Client` call one of
`InsertPipeline.one`, `InsertPipeline.many` and `InsertPipeline.fast`.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar, final

from .._codec import row_to_job, row_to_job_with_args
from .._insert import InsertBuilder, InsertItem
from .._runtime.notifier import NotifyLimiter
from ..config import ClientConfig
from ..driver.protocol import Driver, JobInsertParams, JobRow, WorkflowTaskParams
from ..errors import TrioqueueError, ValidationError
from ..job import InsertOpts, Job, JobInsertResult, JobState
from ..middleware import InsertParams, insert_layers, run_insert_begin, run_insert_chain
from ..transaction import Transaction
from ..workflow import Workflow, WorkflowTask

__all__ = ["InsertPipeline"]

A = TypeVar("A")


@final
class InsertPipeline:
    """A client's way of writing jobs.

    ``args_type(kind)`` is the type a stored job of ``kind`` is decoded to (None: its args
    stay the stored JSON), for the existing job a unique duplicate returns.
    """

    def __init__(
        self,
        driver: Driver,
        config: ClientConfig,
        inserts: InsertBuilder,
        now: Callable[[], datetime],
        args_type: Callable[[str], type[Any] | None],
    ) -> None:
        self._driver = driver
        self._inserts = inserts
        self._now = now
        self._args_type = args_type
        self._notify_limiter = NotifyLimiter(config.fetch_cooldown)
        self._insert_layers, self._insert_begins = insert_layers(config.middleware, config.hooks)

    def _inserted(self, row: JobRow, args: Any, skipped: bool) -> JobInsertResult[Any]:
        """An insert's result. A new job carries the very args object inserted; a unique
        duplicate is the existing job, its args decoded as the inserted object's type."""
        if skipped:
            return JobInsertResult(row_to_job(row, self._args_type(row.kind) or type(args)), True)
        return JobInsertResult(row_to_job_with_args(row, args), False)

    def _prepare(
        self, items: Sequence[InsertItem], noted: list[Any] | None = None
    ) -> tuple[list[JobInsertParams], datetime]:
        self._inserts.check_items(items)
        now = self._now()
        return list(self._inserts.params_many(items, now, noted)), now

    async def _through_middleware(
        self,
        items: Sequence[InsertItem],
        write: Callable[[list[JobInsertParams], list[Any], datetime], Awaitable[A]],
    ) -> A:
        """Insert ``items`` through the insert middleware and ``insert_begin`` hooks: what
        the middleware passes on is validated and encoded, then the hooks see it, then
        ``write`` writes it (with the args objects passed on). Only used when the client
        has middleware or hooks."""
        self._inserts.check_items(items)
        now = self._now()
        first = self._inserts.middleware_params(items, now)

        async def inner(params: list[InsertParams]) -> A:
            if not isinstance(params, list) or not params:
                raise ValidationError("jobs", "insert middleware must pass on a non-empty list")
            encoded = []
            for p in params:
                if not isinstance(p, InsertParams):
                    raise ValidationError("jobs", "insert middleware must pass on InsertParams")
                encoded.append(self._inserts.params((p.args, p.opts()), now))
            await run_insert_begin(self._insert_begins, params)
            return await write(encoded, [p.args for p in params], now)

        return await run_insert_chain(self._insert_layers, first, inner)

    def _notify_queues(self, params: Iterable[JobInsertParams]) -> list[str]:
        queues = sorted({p.queue for p in params if p.state is JobState.AVAILABLE})
        return self._notify_limiter.take(queues) if queues else []

    async def many(
        self, items: Sequence[InsertItem], tx: Transaction | None
    ) -> list[JobInsertResult[Any]]:
        """``insert_many`` (inside ``tx`` unless None)."""
        if self._insert_layers or self._insert_begins:
            return await self._through_middleware(
                items, lambda ps, args, now: self._write(ps, args, now, tx)
            )
        args: list[Any] = []
        params, now = self._prepare(items, args)
        return await self._write(params, args, now, tx)

    async def _write(
        self,
        params: list[JobInsertParams],
        args: list[Any],
        now: datetime,
        tx: Transaction | None,
    ) -> list[JobInsertResult[Any]]:
        # Two jobs of one batch with the same unique key: only the first is inserted.
        first_of_key: dict[bytes, int] = {}
        to_insert: list[JobInsertParams] = []
        slots: list[int] = []
        for p in params:
            if p.unique_key is not None and p.unique_key in first_of_key:
                slots.append(-1 - first_of_key[p.unique_key])
                continue
            if p.unique_key is not None:
                first_of_key[p.unique_key] = len(to_insert)
            slots.append(len(to_insert))
            to_insert.append(p)
        rows = await self._driver.job_insert_many(
            to_insert,
            self._notify_queues(to_insert),
            now,
            ex=tx.connection if tx is not None else None,
        )
        results: list[JobInsertResult[Any]] = []
        for slot, given in zip(slots, args, strict=True):
            if slot >= 0:
                row, skipped = rows[slot]
                results.append(self._inserted(row, given, skipped))
            else:
                row, _ = rows[-1 - slot]
                results.append(self._inserted(row, given, True))
        return results

    async def one(
        self, args: Any, opts: InsertOpts | None, tx: Transaction | None
    ) -> JobInsertResult[Any]:
        """``insert``: `many` of one job, without a batch's bookkeeping."""
        if self._insert_layers or self._insert_begins:
            return (await self.many([(args, opts)], tx))[0]
        now = self._now()
        params = [self._inserts.params((args, opts), now)]
        rows = await self._driver.job_insert_many(
            params,
            self._notify_queues(params),
            now,
            ex=tx.connection if tx is not None else None,
        )
        row, skipped = rows[0]
        return self._inserted(row, args, skipped)

    async def fast(self, jobs: Sequence[InsertItem], tx: Transaction | None) -> int:
        """``insert_many_fast``: how many jobs were inserted."""
        if self._insert_layers or self._insert_begins:
            return await self._through_middleware(
                jobs, lambda ps, _, now: self._write_fast(ps, now, tx)
            )
        if tx is not None:
            # The caller's transaction: every job is checked before anything is sent, so
            # a bad one raises without aborting that transaction.
            checked, at = self._prepare(jobs)
            return await self._write_fast(checked, at, tx)
        # A transaction of our own: each job is checked and encoded as the COPY streams,
        # so the server ingests the first jobs while the later ones are prepared. A bad
        # job aborts the COPY and the transaction: nothing is written, and its
        # ValidationError propagates as usual.
        self._inserts.check_items(jobs)
        now = self._now()
        sent: list[JobInsertParams] = []

        def stream() -> Iterator[JobInsertParams]:
            for p in self._inserts.params_many(jobs, now):
                sent.append(p)
                yield p

        return await self._driver.job_insert_fast(stream(), lambda: self._notify_queues(sent), now)

    async def _write_fast(
        self, params: list[JobInsertParams], now: datetime, tx: Transaction | None
    ) -> int:
        return await self._driver.job_insert_fast(
            params,
            self._notify_queues(params),
            now,
            ex=tx.connection if tx is not None else None,
        )

    async def workflow(self, wf: Workflow, tx: Transaction | None) -> dict[str, Job[Any]]:
        """``insert_workflow`` (inside ``tx`` unless None): every task, or nothing."""
        if not isinstance(wf, Workflow):
            raise ValidationError("workflow", f"must be a trioqueue.Workflow, got {wf!r}")
        tasks = list(wf)
        if not tasks:
            raise ValidationError("workflow", "has no tasks: add at least one")
        workflow_id = wf.name if wf.name is not None else str(uuid.uuid4())
        items = [(t.args, t.opts) for t in tasks]

        async def write(
            params: list[JobInsertParams], args: list[Any], now: datetime
        ) -> list[JobInsertResult[Any]]:
            return await self._write_workflow(workflow_id, tasks, params, args, now, tx)

        if self._insert_layers or self._insert_begins:
            # Middleware sees the tasks as one batch, and gets what insert_many gives it.
            results = await self._through_middleware(items, write)
            if not isinstance(results, list) or len(results) != len(tasks):
                raise TrioqueueError(
                    f"insert middleware returned {results!r:.200} for a workflow of "
                    f"{len(tasks)} tasks, not what call_next returned (one JobInsertResult "
                    f"per task); the workflow {workflow_id!r} was inserted"
                )
        else:
            args: list[Any] = []
            params, now = self._prepare(items, args)
            results = await write(params, args, now)
        return {task.name: r.job for task, r in zip(tasks, results, strict=True)}

    async def _write_workflow(
        self,
        workflow_id: str,
        tasks: list[WorkflowTask],
        params: list[JobInsertParams],
        args: list[Any],
        now: datetime,
        tx: Transaction | None,
    ) -> list[JobInsertResult[Any]]:
        if len(params) != len(tasks):
            raise ValidationError("workflow", "insert middleware must pass on one job per task")
        position = {t.name: i for i, t in enumerate(tasks)}
        keys: dict[bytes, str] = {}
        built: list[WorkflowTaskParams] = []
        for task, p in zip(tasks, params, strict=True):
            if p.unique_key is not None:
                if p.unique_key in keys:
                    raise ValidationError(
                        "workflow",
                        f"tasks {keys[p.unique_key]!r} and {task.name!r} have the same unique "
                        "key: one would stand in for the other",
                    )
                keys[p.unique_key] = task.name
            if task.deps:
                p = p._replace(state=JobState.PENDING)
            deps = tuple(position[d] for d in task.deps)
            built.append(WorkflowTaskParams(p, task.name, deps, task.ignore_failed_deps))
        rows = await self._driver.job_insert_workflow(
            workflow_id,
            built,
            self._notify_queues([b.params for b in built]),
            now,
            ex=tx.connection if tx is not None else None,
        )
        return [
            self._inserted(row, given, skipped)
            for (row, skipped), given in zip(rows, args, strict=True)
        ]

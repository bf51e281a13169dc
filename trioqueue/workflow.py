"""`Workflow`: jobs that wait for one another, inserted together.

A workflow is built in memory with `Workflow.add` and written by
``client.insert_workflow(wf)`` (or ``insert_workflow_tx``) in one transaction. Every rule
that can be checked without the database is checked as tasks are added, so a bad
workflow raises ValidationError before anything is written. What happens to the tasks
afterwards (promotion, cancellation) is the database's job: see docs/workflows.md.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, final

import attrs

from ._validate import check_text
from .errors import ValidationError
from .job import InsertOpts, validate_workflow_id

__all__ = ["MAX_TASK_NAME", "Workflow", "WorkflowTask"]

MAX_TASK_NAME = 255
"""The longest task name, in characters."""


@final
@attrs.frozen
class WorkflowTask:
    """One task as added to a `Workflow`: a job's args and options, and the tasks it
    waits for."""

    name: str
    args: Any
    deps: tuple[str, ...]
    opts: InsertOpts | None
    ignore_failed_deps: bool


def _check_task_name(name: object) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_TASK_NAME:
        raise ValidationError(
            "Workflow.add.task", f"task name {name!r} must be 1-{MAX_TASK_NAME} characters"
        )
    check_text("Workflow.add.task", name)
    return name


@final
class Workflow:
    """Tasks (jobs) and the deps between them, to insert together.

    ``name`` becomes the workflow's id (`Job.workflow_id`); without one, a random id is
    given when it is inserted. Tasks with deps are inserted ``pending`` and become
    ``available`` once every dep completed; a dep that ends discarded or cancelled (or
    is deleted) cancels its dependents, unless they were added with
    ``ignore_failed_deps=True``: those run once all their deps are final.

    >>> wf = Workflow("publish-42")
    >>> wf.add("fetch", Fetch(url))
    >>> wf.add("thumb", Resize(64), deps=["fetch"])
    """

    __slots__ = ("_name", "_tasks")

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            validate_workflow_id("Workflow.name", name)
        self._name = name
        self._tasks: dict[str, WorkflowTask] = {}

    def __repr__(self) -> str:
        return f"<trioqueue.Workflow name={self._name!r} tasks={len(self._tasks)}>"

    @property
    def name(self) -> str | None:
        """The id the workflow is inserted with (None: a random one)."""
        return self._name

    @property
    def tasks(self) -> Mapping[str, WorkflowTask]:
        """The tasks added so far, by name, in the order added (read-only)."""
        return dict(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[WorkflowTask]:
        return iter(self._tasks.values())

    def add(
        self,
        task: str,
        args: Any,
        deps: Sequence[str] = (),
        opts: InsertOpts | None = None,
        ignore_failed_deps: bool = False,
    ) -> None:
        """Add a task named ``task`` running ``args`` (as ``client.insert(args, opts)``
        would), once every task named in ``deps`` completed.

        Raises ValidationError, and adds nothing, for a task name used before, a dep that
        names no task added before (so a workflow never has a cycle), a dep named twice, or
        arguments of the wrong type. The args themselves are checked at insert.
        """
        _check_task_name(task)
        if task in self._tasks:
            raise ValidationError("Workflow.add.task", f"task {task!r} was already added")
        if isinstance(deps, str | bytes) or not isinstance(deps, Sequence):
            raise ValidationError(
                "Workflow.add.deps", f"must be a list of task names, got {deps!r}"
            )
        seen: set[str] = set()
        for dep in deps:
            if not isinstance(dep, str) or dep not in self._tasks:
                raise ValidationError(
                    "Workflow.add.deps",
                    f"{dep!r} is not a task added before {task!r}: deps must name tasks "
                    "added earlier",
                )
            if dep in seen:
                raise ValidationError("Workflow.add.deps", f"{dep!r} is named twice")
            seen.add(dep)
        if opts is not None and not isinstance(opts, InsertOpts):
            raise ValidationError("Workflow.add.opts", "must be an InsertOpts or None")
        if not isinstance(ignore_failed_deps, bool):
            raise ValidationError("Workflow.add.ignore_failed_deps", "must be True or False")
        self._tasks[task] = WorkflowTask(task, args, tuple(deps), opts, ignore_failed_deps)

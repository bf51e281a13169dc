"""The shapes of the job statements: the rows they return, and, where it depends on the
input, which variant of a statement runs with which parameters (outcome writes,
``job_list``)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import partial
from typing import Any, Final

from psycopg.rows import RowMaker

from ...job import FINALIZED_STATES, JobListParams, JobState
from ..protocol import JobOutcome, JobRow, WrittenRow
from .arrays import bool_array, int8_array, text_array, timestamptz_array

__all__ = [
    "inserted_row",
    "job_list_statement",
    "job_row",
    "outcome_statement",
    "written_row",
]

# Rows are made as the connection loads them (its ``make_row``). tuple.__new__ makes the
# NamedTuple straight from the loaded tuple, skipping ``_make``'s length check (the queries
# fix the columns): the cheapest way measured, ~0.2 µs a row against ~3.4 µs to load a job.
job_row: Final = partial(tuple.__new__, JobRow)
written_row: Final = partial(tuple.__new__, WrittenRow)


def inserted_row(values: Sequence[Any]) -> tuple[JobRow, bool]:
    """A row of the insert statements: the job's 20 columns, then whether it was skipped
    (a unique job already there); a column after those (a count of notifications) is
    left out."""
    return job_row(values[:20]), bool(values[20])


def _plain_completion(o: JobOutcome) -> bool:
    """A completed outcome that changes nothing but the state, finalized_at and output."""
    return (
        o.state is JobState.COMPLETED
        and o.error_json is None
        and o.metadata_json is None
        and o.scheduled_at is None
        and not o.give_back_attempt
    )


def outcome_statement(
    outcomes: Sequence[JobOutcome], now: datetime, rows: bool
) -> tuple[str, list[Any], RowMaker[Any]]:
    """The statement that writes ``outcomes`` (see `Driver.job_set_state_if_running_many`),
    its parameters, and how its rows are made: the short ``job_complete_many_ids`` when
    nobody reads the rows back and every outcome is a plain completion; else
    ``job_set_state_if_running_many``, returning whole rows or (``rows`` False) ids."""
    if not rows and all(_plain_completion(o) for o in outcomes):
        ids = [
            int8_array([o.id for o in outcomes]),
            timestamptz_array([o.finalized_at for o in outcomes]),
            timestamptz_array([o.attempted_at for o in outcomes]),
            text_array([o.output_json for o in outcomes]),
            now,
        ]
        return "job_complete_many_ids", ids, written_row
    args = [
        int8_array([o.id for o in outcomes]),
        text_array([o.state.value for o in outcomes]),
        timestamptz_array([o.finalized_at for o in outcomes]),
        timestamptz_array([o.scheduled_at for o in outcomes]),
        bool_array([o.give_back_attempt for o in outcomes]),
        text_array([o.error_json for o in outcomes]),
        text_array([o.metadata_json for o in outcomes]),
        now,
        timestamptz_array([o.attempted_at for o in outcomes]),
        text_array([o.output_json for o in outcomes]),
    ]
    if rows:
        return "job_set_state_if_running_many", args, job_row
    return "job_set_state_if_running_many_ids", args, written_row


def job_list_statement(params: JobListParams) -> tuple[str, list[Any]]:
    """The ``job_list`` variant for ``params`` and its parameters: newest first or not,
    one workflow's tasks (an equality its index serves), or live states only (see
    queries.py)."""
    args: list[Any] = [
        list(params.ids) if params.ids is not None else None,
        list(params.kinds) if params.kinds is not None else None,
        list(params.queues) if params.queues is not None else None,
        [s.value for s in params.states] if params.states is not None else None,
        list(params.priorities) if params.priorities is not None else None,
        list(params.tags) if params.tags is not None else None,
        params.after,
        params.limit,
        params.within_newest,
    ]
    name = "job_list_desc" if params.descending else "job_list"
    if params.workflow_id is not None:
        name += "_workflow"
        args.append(params.workflow_id)
    elif params.states and params.ids is None and not FINALIZED_STATES & set(params.states):
        name += "_live"
    return name, args

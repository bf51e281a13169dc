"""``trioqueue jobs list|get|cancel|retry|delete``: look at and manage jobs.

Everything goes through the public client API (an insert-only ``open_client``), so the
CLI sees exactly what an application sees.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import click

from ..client import Client, open_client
from ..job import MAX_LIST_LIMIT, Job, JobListParams, JobState
from .common import (
    JobIdType,
    database_url_option,
    dump_json,
    format_time,
    print_table,
    require_database_url,
    run_trio,
    to_json,
)
from .queues import queue_names_option
from .workflows import check_workflow_id

__all__ = ["jobs"]

_JOB_ID = JobIdType(minimum=1)


@click.group()
def jobs() -> None:
    """List, inspect, cancel, retry and delete jobs."""


def _job_row(job: Job[Any]) -> tuple[object, ...]:
    return (
        job.id,
        job.kind,
        job.queue,
        job.state.value,
        f"{job.attempt}/{job.max_attempts}",
        job.priority,
        format_time(job.scheduled_at),
    )


async def _with_client(url: str, action: Callable[[Client], Awaitable[None]]) -> None:
    # One-off statements gain nothing from being prepared, and unprepared ones also work
    # through a transaction pooler (docs/pgbouncer.md).
    async with open_client(url, prepared_statements=False) as client:
        await action(client)


@jobs.command("list")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice([s.value for s in JobState], case_sensitive=False),
    help="Only jobs in this state (repeat for several).",
)
@click.option("--kind", "kinds", multiple=True, metavar="KIND", help="Only jobs of this kind.")
@queue_names_option("Only jobs of this queue (repeat for several).")
@click.option(
    "--workflow",
    "workflow_id",
    metavar="ID",
    default=None,
    callback=check_workflow_id,
    help="Only the tasks of this workflow.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_LIST_LIMIT),
    default=100,
    show_default=True,
    help="At most this many jobs.",
)
@click.option(
    "--after",
    type=JobIdType(minimum=0),
    default=None,
    metavar="ID",
    help="Only jobs with a higher id: the next page after a listing that ended at ID.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@database_url_option(embedded=False)
def list_jobs(
    states: tuple[str, ...],
    kinds: tuple[str, ...],
    queues: tuple[str, ...],
    workflow_id: str | None,
    limit: int,
    after: int | None,
    as_json: bool,
    database_url: str | None,
) -> int:
    """List jobs, ordered by id, filtered by every option given.

    A full page ends with a hint on stderr: the --after value for the next page.
    """
    url = require_database_url(database_url)
    params = JobListParams(
        states=[JobState(s.lower()) for s in states] or None,
        kinds=kinds or None,
        queues=queues or None,
        workflow_id=workflow_id,
        limit=limit,
        after=after,
    )

    async def action(client: Client) -> None:
        page = await client.job_list(params)
        if as_json:
            dump_json({"jobs": [to_json(j) for j in page.jobs], "last_cursor": page.last_cursor})
            return
        if not page.jobs:
            click.echo("no jobs found")
            return
        headers = ("ID", "KIND", "QUEUE", "STATE", "ATTEMPT/MAX", "PRIORITY", "SCHEDULED_AT")
        print_table(headers, [_job_row(j) for j in page.jobs], right=(0, 4, 5))
        if len(page.jobs) == limit:
            click.echo(f"(more may follow: add --after {page.last_cursor})", err=True)

    return run_trio(_with_client, url, action)


def _print_job(job: Job[Any]) -> None:
    fields: list[tuple[str, object]] = [
        ("id", job.id),
        ("kind", job.kind),
        ("queue", job.queue),
        ("state", job.state.value),
        ("attempt", f"{job.attempt}/{job.max_attempts}"),
        ("priority", job.priority),
        ("scheduled_at", format_time(job.scheduled_at)),
        ("created_at", format_time(job.created_at)),
        ("attempted_at", format_time(job.attempted_at)),
        ("attempted_by", ", ".join(job.attempted_by) or "-"),
        ("finalized_at", format_time(job.finalized_at)),
        ("tags", ", ".join(job.tags) or "-"),
        ("metadata", json.dumps(job.metadata)),
        ("args", json.dumps(to_json(job)["args"])),
        ("errors", len(job.errors)),
    ]
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        click.echo(f"{name.ljust(width)}  {value}")
    for error in job.errors:
        first_line = error.error.splitlines()[0] if error.error else ""
        click.echo(f"  attempt {error.attempt} at {format_time(error.at)}: {first_line}")


@jobs.command("get")
@click.argument("job_id", metavar="ID", type=_JOB_ID)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@database_url_option(embedded=False)
def get_job(job_id: int, as_json: bool, database_url: str | None) -> int:
    """Show one job, with its errors (their tracebacks: --json)."""
    url = require_database_url(database_url)

    async def action(client: Client) -> None:
        job = await client.job_get(job_id)
        if as_json:
            dump_json(to_json(job))
        else:
            _print_job(job)

    return run_trio(_with_client, url, action)


@jobs.command("cancel")
@click.argument("job_id", metavar="ID", type=_JOB_ID)
@database_url_option(embedded=False)
def cancel_job(job_id: int, database_url: str | None) -> int:
    """Cancel a job. A queued job is cancelled now; a running job is cancelled by the
    client running it; a finished job is left as it is."""
    url = require_database_url(database_url)

    async def action(client: Client) -> None:
        job = await client.job_cancel(job_id)
        if job.state is JobState.RUNNING:
            click.echo(f"job {job_id}: cancel requested; the client running it will cancel it")
        elif job.state is JobState.CANCELLED:
            click.echo(f"job {job_id}: cancelled")
        else:
            click.echo(f"job {job_id} is already {job.state.value}: left as it is")

    return run_trio(_with_client, url, action)


@jobs.command("retry")
@click.argument("job_id", metavar="ID", type=_JOB_ID)
@database_url_option(embedded=False)
def retry_job(job_id: int, database_url: str | None) -> int:
    """Make a job available to run now (one that used all its attempts gets one more).
    A running job is left alone."""
    url = require_database_url(database_url)

    async def action(client: Client) -> None:
        job = await client.job_retry(job_id)
        if job.state is JobState.RUNNING:
            click.echo(f"job {job_id} is running: left as it is")
        else:
            click.echo(f"job {job_id}: {job.state.value}")

    return run_trio(_with_client, url, action)


@jobs.command("delete")
@click.argument("job_id", metavar="ID", type=_JOB_ID)
@database_url_option(embedded=False)
def delete_job(job_id: int, database_url: str | None) -> int:
    """Delete a job for good (a running job cannot be deleted: cancel it first)."""
    url = require_database_url(database_url)

    async def action(client: Client) -> None:
        job = await client.job_delete(job_id)
        click.echo(f"job {job_id} deleted (it was {job.state.value})")

    return run_trio(_with_client, url, action)

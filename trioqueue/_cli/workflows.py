"""``trioqueue workflows get ID``: a workflow's tasks, their jobs, states and deps.

Reads through the public client API (``client.workflow_get``), as an application would.
Task names and workflow ids are user text: the table shows every character a terminal
could act on as a ``\\u`` escape; ``--json`` gives them as they are.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import click

from ..client import Client, open_client
from ..errors import ValidationError
from ..job import Job, JobState, validate_workflow_id
from .common import (
    CliError,
    database_url_option,
    dump_json,
    print_table,
    require_database_url,
    run_trio,
    to_json,
)
from .queues import _printable

__all__ = ["DEPS_SHOWN", "check_workflow_id", "workflows"]

DEPS_SHOWN = 10
"""Deps named per task in the table; a fan-in task's others are counted (``--json``: all)."""


def check_workflow_id(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A workflow id argument or option: 1-255 characters without NUL; else exit 2."""
    if value is None:
        return None
    try:
        return validate_workflow_id("workflow id", value)
    except ValidationError as exc:
        raise click.BadParameter(exc.rule) from None


@click.group()
def workflows() -> None:
    """Look at workflows: jobs inserted together that wait for one another."""


def dep_names(job: Job[Any], names: dict[int, str]) -> list[str]:
    """``job``'s deps by task name, in the order added; ``job N`` for a dep that is not a
    task of the workflow (a unique job that stood in for one, or a deleted dep)."""
    return [names.get(dep, f"job {dep}") for dep in job.workflow_deps]


@workflows.command("get")
@click.argument("workflow_id", metavar="ID", callback=check_workflow_id)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@database_url_option(embedded=False)
def get_workflow(workflow_id: str, as_json: bool, database_url: str | None) -> int:
    """Show a workflow's tasks in the order they were added: name, job id, state, kind
    and the tasks each waits for (its deps: the first 10, and how many more; --json lists
    them all).

    Exit code 1 when no task has the workflow id ID.
    """
    url = require_database_url(database_url)

    async def action() -> None:
        async with open_client(url, prepared_statements=False) as client:
            await _show(client, workflow_id, as_json)

    return run_trio(action)


async def _show(client: Client, workflow_id: str, as_json: bool) -> None:
    tasks = await client.workflow_get(workflow_id)
    if not tasks:
        raise CliError(f"workflow {_printable(repr(workflow_id))} not found")
    jobs = sorted(tasks.items(), key=lambda item: item[1].id)
    names = {job.id: name for name, job in jobs}
    if as_json:
        dump_json(
            {
                "workflow_id": workflow_id,
                "tasks": [
                    {"task": name, "deps": dep_names(job, names), "job": to_json(job)}
                    for name, job in jobs
                ],
            }
        )
        return
    counts = Counter(job.state for _, job in jobs)
    summary = ", ".join(f"{counts[s]} {s.value}" for s in JobState if counts[s])
    plural = "" if len(jobs) == 1 else "s"
    click.echo(f"workflow {_printable(workflow_id)}: {len(jobs)} task{plural} ({summary})")
    rows = [
        (
            _printable(name),
            job.id,
            job.state.value,
            job.kind,
            _deps_text(dep_names(job, names)),
        )
        for name, job in jobs
    ]
    print_table(("TASK", "JOB_ID", "STATE", "KIND", "DEPS"), rows, right=(1,))


def _deps_text(deps: list[str]) -> str:
    """Deps for the table: at most DEPS_SHOWN names, then ``+N more``; ``-`` for none."""
    shown = [_printable(dep) for dep in deps[:DEPS_SHOWN]]
    if len(deps) > DEPS_SHOWN:
        shown.append(f"+{len(deps) - DEPS_SHOWN:,} more")
    return ", ".join(shown) or "-"

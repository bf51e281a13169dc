"""``trioqueue queues list|pause|resume``: see queues and their backlog, pause and resume."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from ..client import Client, open_client
from ..errors import ValidationError
from ..job import validate_queue_name
from .common import (
    CliError,
    database_url_option,
    dump_json,
    format_time,
    print_table,
    require_database_url,
    run_trio,
    to_json,
)

__all__ = ["queue_names_option", "queues"]


def _check_queue_names(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[str, ...]:
    for value in values:
        try:
            validate_queue_name("queue", value)
        except ValidationError as exc:
            raise click.BadParameter(exc.rule) from None
    return values


def queue_names_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A repeatable ``--queue NAME`` option whose names are checked."""
    return click.option(
        "--queue",
        "queues",
        multiple=True,
        metavar="NAME",
        callback=_check_queue_names,
        help=help,
    )


def _check_target(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value == "*":
        return value
    try:
        return validate_queue_name("NAME", value)
    except ValidationError as exc:
        raise click.BadParameter(f"{exc.rule}, or '*' for every queue") from None


@click.group()
def queues() -> None:
    """List, pause and resume queues."""


@queues.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@database_url_option(embedded=False)
def list_queues(as_json: bool, database_url: str | None) -> int:
    """List the known queues with their available and running job counts.

    A queue is known once a worker has run it or it was paused.
    """
    url = require_database_url(database_url)

    async def run() -> None:
        async with open_client(url, prepared_statements=False) as client:
            found = await client.queue_list()
        if as_json:
            dump_json({"queues": [to_json(q) for q in found]})
            return
        if not found:
            click.echo("no queues found")
            return
        print_table(
            ("NAME", "STATUS", "AVAILABLE", "RUNNING", "PAUSED_AT", "UPDATED_AT"),
            [
                (
                    q.name,
                    "active" if q.paused_at is None else "paused",
                    q.available,
                    q.running,
                    format_time(q.paused_at),
                    format_time(q.updated_at),
                )
                for q in found
            ],
            right=(2, 3),
        )

    return run_trio(run)


async def _known(client: Client) -> list[str]:
    return [q.name for q in await client.queue_list()]


@queues.command("pause")
@click.argument("name", metavar="NAME", callback=_check_target)
@database_url_option(embedded=False)
def pause_queue(name: str, database_url: str | None) -> int:
    """Pause queue NAME ('*': every known queue): no worker fetches its jobs until it is
    resumed. Running jobs carry on. A queue not known yet is created paused."""
    url = require_database_url(database_url)

    async def run() -> None:
        async with open_client(url, prepared_statements=False) as client:
            known = await _known(client)
            await client.queue_pause(name)
        if name == "*":
            click.echo(f"paused every queue ({len(known)} known)")
        elif name in known:
            click.echo(f"paused queue {name!r}")
        else:
            click.echo(f"paused queue {name!r} (it was not known: created it paused)")

    return run_trio(run)


@queues.command("resume")
@click.argument("name", metavar="NAME", callback=_check_target)
@database_url_option(embedded=False)
def resume_queue(name: str, database_url: str | None) -> int:
    """Resume queue NAME ('*': every paused queue)."""
    url = require_database_url(database_url)

    async def run() -> None:
        async with open_client(url, prepared_statements=False) as client:
            known = await _known(client)
            if name != "*" and name not in known:
                listing = ", ".join(known) or "none"
                raise CliError(f"no queue named {name!r} (known queues: {listing})")
            await client.queue_resume(name)
        click.echo("resumed every queue" if name == "*" else f"resumed queue {name!r}")

    return run_trio(run)

"""``trioqueue queues list|pause|resume``: see queues and their backlog, pause and resume."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import click

from ..client import Client, QueueInfo, open_client
from ..errors import ValidationError
from ..job import validate_queue_name
from ..limits import GlobalLimit, RateLimit
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


def _seconds(per: float) -> str:
    return f"{int(per)}s" if per.is_integer() else f"{per:g}s"


def _limit_text(name: str, amount: str, limit: GlobalLimit | RateLimit) -> str:
    by = (["kind"] if limit.by_kind else []) + [f"args.{field}" for field in limit.by_args]
    return f"{name} {amount}" + (f" by {', '.join(by)}" if by else "")


def format_limits(queue: QueueInfo) -> str:
    """A queue's limits in one line, such as ``global 5 by args.customer; rate 100/60s by
    kind``; ``-`` for none."""
    parts = []
    if (g := queue.global_limit) is not None:
        parts.append(_limit_text("global", str(g.limit), g))
    if (r := queue.rate_limit) is not None:
        parts.append(_limit_text("rate", f"{r.limit}/{_seconds(r.per)}", r))
    return "; ".join(parts) or "-"


def _printable(text: str) -> str:
    """``text`` with every character a terminal could act on (controls, bidi controls,
    lone surrogates) shown as a ``\\u`` escape: partition values are job args, user data."""
    return "".join(
        c if c.isprintable() else (f"\\u{ord(c):04x}" if ord(c) <= 0xFFFF else f"\\U{ord(c):08x}")
        for c in text
    )


def format_partition(partition: Mapping[str, Any]) -> str:
    """A partition as ``args.customer="acme" kind="email"`` (each value as JSON, so ``1``
    and ``"1"`` differ); ``(whole queue)`` for the one partition of an unpartitioned limit."""
    if not partition:
        return "(whole queue)"
    return " ".join(
        f"{key}={_printable(json.dumps(value, ensure_ascii=False, default=repr))}"
        for key, value in partition.items()
    )


def _limited(queue: QueueInfo) -> bool:
    return queue.global_limit is not None or queue.rate_limit is not None


@queues.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
@click.option(
    "--partitions",
    "show_partitions",
    is_flag=True,
    help="Also list each limited queue's busiest partitions, with running and held-back jobs.",
)
@database_url_option(embedded=False)
def list_queues(as_json: bool, show_partitions: bool, database_url: str | None) -> int:
    """List the known queues with their available, running and held-back job counts and
    their limits.

    A queue is known once a worker has run it or it was paused. HELD_BACK: due jobs that
    the queue's limits hold back now (counted in AVAILABLE too).
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
            (
                "NAME",
                "STATUS",
                "AVAILABLE",
                "RUNNING",
                "HELD_BACK",
                "PAUSED_AT",
                "UPDATED_AT",
                "LIMITS",
            ),
            [
                (
                    q.name,
                    "active" if q.paused_at is None else "paused",
                    q.available,
                    q.running,
                    q.held_back if _limited(q) else "-",
                    format_time(q.paused_at),
                    format_time(q.updated_at),
                    format_limits(q),
                )
                for q in found
            ],
            right=(2, 3, 4),
        )
        if show_partitions:
            for q in found:
                if not _limited(q):
                    continue
                click.echo(f"\n{q.name}: busiest partitions ({format_limits(q)})")
                if not q.partitions:
                    click.echo("  no jobs running or held back")
                    continue
                print_table(
                    ("RUNNING", "HELD_BACK", "PARTITION"),
                    [(p.running, p.held_back, format_partition(p.partition)) for p in q.partitions],
                    right=(0, 1),
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

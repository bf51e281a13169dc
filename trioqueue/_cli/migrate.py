"""``trioqueue migrate up|down|list``: apply, revert or list the schema migrations."""

from __future__ import annotations

from typing import Literal

import click

from .common import database_url_option, run_trio

__all__ = ["migrate"]


async def _migrate(
    action: Literal["up", "down", "list"], database_url: str | None, target_version: int | None
) -> int:
    from .._migrate import migrate as run_migrations
    from .._migrate import migration_list

    if action == "list":
        for status in await migration_list(database_url):
            mark = "applied" if status.applied else "pending"
            click.echo(f"{status.version:03d} {status.name:<24} {mark}")
        return 0
    done = await run_migrations(database_url, direction=action, target_version=target_version)
    verb = "applied" if action == "up" else "reverted"
    if done:
        click.echo(f"{verb} migration(s): {', '.join(f'{v:03d}' for v in done)}")
    else:
        click.echo("nothing to do: the schema is " + ("up to date" if action == "up" else "empty"))
    return 0


def _check_version(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    from ..migrations import migrations

    known = [m.version for m in migrations()]
    if value is not None and value != 0 and value not in known:
        raise click.BadParameter(
            f"no migration {value}; the migrations are {', '.join(map(str, known))} (0 = none)"
        )
    return value


@click.command()
@click.argument("action", type=click.Choice(["up", "down", "list"]), default="up", metavar="ACTION")
@click.option(
    "--target-version",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    callback=_check_version,
    help="up: stop at version N; down: revert down to N (0 = everything).",
)
@database_url_option(embedded=True)
def migrate(
    action: Literal["up", "down", "list"], target_version: int | None, database_url: str | None
) -> int:
    """Apply, revert or list the schema migrations.

    ACTION: up (the default) applies, down reverts, list shows each migration. Idempotent
    and safe to run from several processes at once. Without --target-version, up applies
    every pending migration and down reverts only the newest one.
    """
    return run_trio(_migrate, action, database_url, target_version)

"""``trioqueue dashboard``: serve the web dashboard (trioqueue/dashboard/)."""

from __future__ import annotations

import importlib.util

import click

from .common import CliError, database_url_option, require_database_url, run_trio

__all__ = ["dashboard"]

TOKEN_ENV = "TRIOQUEUE_DASHBOARD_TOKEN"
_EXTRA = ("starlette", "hypercorn", "jinja2")


def _missing_extra() -> list[str]:
    return [name for name in _EXTRA if importlib.util.find_spec(name) is None]


@click.command()
@database_url_option(embedded=False)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on. Anything but a loopback address exposes the dashboard: "
    "set a --token.",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8080,
    show_default=True,
    help="Port to listen on (0: any free port).",
)
@click.option("--read-only", is_flag=True, help="Show jobs and queues; offer no actions.")
@click.option(
    "--token",
    metavar="TOKEN",
    envvar=TOKEN_ENV,
    default=None,
    help=f"Access token every request must carry (default: ${TOKEN_ENV}; none).",
)
def dashboard(
    database_url: str | None, host: str, port: int, read_only: bool, token: str | None
) -> int:
    """Serve the web dashboard: job counts, jobs, errors, queues; cancel, retry, delete,
    pause and resume. Runs until interrupted (Ctrl-C)."""
    missing = _missing_extra()
    if missing:
        raise CliError(
            f"the dashboard needs {', '.join(missing)}: pip install 'trioqueue[dashboard]'"
        )
    url = require_database_url(database_url)
    if token is not None and not token.strip():
        raise click.BadParameter("must not be empty", param_hint="--token")
    host = host.strip()
    if not host:
        raise click.BadParameter("must be a host name or address", param_hint="--host")

    async def run() -> None:
        import trio

        from ..dashboard import serve
        from ..dashboard._security import loopback_hosts

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, url, host, port, read_only, token)
            address = binds[0].removesuffix("/") + "/"
            mode = " (read-only)" if read_only else ""
            click.echo(f"trioqueue dashboard{mode} on {address}", err=True)
            if token is not None:
                click.echo(f"open {address}?token={token}", err=True)
            elif loopback_hosts(host) is None:
                click.echo(
                    f"warning: listening on {host} without a token: anyone who can reach "
                    "this address can act on your jobs (pass --token)",
                    err=True,
                )

    return run_trio(run)

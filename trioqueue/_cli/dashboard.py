"""``trioqueue dashboard``: serve the web dashboard (trioqueue/dashboard/).

Signals (SIGINT or SIGTERM): the first stops the server gracefully (no new connections,
open requests get a few seconds to finish) and the command exits, 130 after SIGINT (Ctrl-C,
as every command) and 0 after SIGTERM (a process manager's ordinary stop); the second
cancels whatever is still open at once.
"""

from __future__ import annotations

import importlib.util
import signal
import urllib.parse
from functools import partial

import click
import trio

from .common import INTERRUPTED, CliError, database_url_option, require_database_url, run_trio

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
    pause and resume. Runs until stopped by a signal.

    \b
    Signals (SIGINT or SIGTERM):
      1st  graceful stop; exit code 130 after SIGINT (Ctrl-C), 0 after SIGTERM
      2nd  open requests are cancelled at once
    """
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

    return run_trio(_serve, url, host, port, read_only, token)


async def _serve(url: str, host: str, port: int, read_only: bool, token: str | None) -> int:
    """Serve until signals stop it (see the module docstring); the exit code."""
    from ..dashboard import serve

    stop = trio.Event()
    first: list[signal.Signals] = []
    listening = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as outer:
            server = trio.CancelScope()

            async def watch() -> None:
                async for signum in signals:
                    name = signal.Signals(signum)
                    if not first:
                        first.append(name)
                        click.echo(f"{name.name}: stopping (again: at once)", err=True)
                        stop.set()
                        if not listening:  # still connecting: nothing to drain
                            server.cancel()
                    else:
                        click.echo(f"{name.name}: stopping at once", err=True)
                        server.cancel()

            outer.start_soon(watch)
            with server:
                async with trio.open_nursery() as nursery:
                    binds = await nursery.start(
                        partial(
                            serve, url, host, port, read_only, token, shutdown_trigger=stop.wait
                        )
                    )
                    listening = True
                    _announce(binds[0], host, read_only, token)
            outer.cancel_scope.cancel()
    click.echo("trioqueue dashboard stopped", err=True)
    return INTERRUPTED if first and first[0] is signal.SIGINT else 0


def _announce(bind: str, host: str, read_only: bool, token: str | None) -> None:
    from ..dashboard._security import loopback_hosts

    address = bind.removesuffix("/") + "/"
    mode = " (read-only)" if read_only else ""
    click.echo(f"trioqueue dashboard{mode} on {address}", err=True)
    if token is not None:
        # Percent-encoded, so that a token holding '&', '#', '+', spaces... survives.
        click.echo(f"open {address}?token={urllib.parse.quote(token, safe='')}", err=True)
    elif loopback_hosts(host) is None:
        click.echo(
            f"warning: listening on {host} without a token: anyone who can reach "
            "this address can act on your jobs (pass --token)",
            err=True,
        )

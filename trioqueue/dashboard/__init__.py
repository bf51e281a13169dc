"""The trioqueue web dashboard: ``trioqueue dashboard``, or these two functions.

Needs the ``dashboard`` extra (``pip install 'trioqueue[dashboard]'``: Starlette, Hypercorn
and Jinja2); ``import trioqueue`` never imports it. See docs/dashboard.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

import trio

from ..client import Client, open_client
from ..errors import ValidationError
from ._app import PAGE_SIZE, SCAN_NEWEST, build_app
from ._security import loopback_hosts

__all__ = ["GRACEFUL_SECONDS", "PAGE_SIZE", "SCAN_NEWEST", "create_app", "serve"]

GRACEFUL_SECONDS: Final = 3.0
"""On a graceful stop, how long open requests get to finish before they are cancelled."""


def create_app(
    client: Client,
    *,
    read_only: bool = False,
    token: str | None = None,
    allowed_hosts: list[str] | None = None,
) -> Any:
    """The dashboard as an ASGI app reading and acting through ``client``.

    ``read_only``: no action is offered, and every action request gets 403. ``token``:
    every request but ``GET /healthz`` must carry it (``?token=``, the cookie that sets,
    or ``Authorization: Bearer``), else 401. ``allowed_hosts``: the Host header values to
    accept (None: any); ``serve`` passes the loopback names when it binds a loopback
    address, which shuts out DNS-rebinding pages.

    Raises ValidationError for an empty token or a non-Client ``client``.
    """
    if not isinstance(client, Client):
        raise ValidationError("client", "must be a trioqueue.Client")
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ValidationError("token", "must be a non-empty string, or None for no token")
    if not isinstance(read_only, bool):
        raise ValidationError("read_only", "must be True or False")
    return build_app(client, read_only=read_only, token=token, allowed_hosts=allowed_hosts)


def _bind(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


async def serve(
    database_url: str | None,
    host: str = "127.0.0.1",
    port: int = 8080,
    read_only: bool = False,
    token: str | None = None,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the dashboard on ``host:port`` until ``shutdown_trigger()`` returns, or until
    cancelled.

    Opens an insert-only client on ``database_url`` (None: ``$TRIOQUEUE_DATABASE_URL``),
    builds the app and serves it with Hypercorn's trio worker. ``task_status.started()``
    is called, with the bound addresses (``http://HOST:PORT``), once it is listening;
    ``port=0`` picks a free port.

    When ``shutdown_trigger()`` (an async function, such as ``event.wait``) returns: a
    graceful stop. The server stops accepting, open requests get up to
    ``GRACEFUL_SECONDS`` to finish before they are cancelled, the client's connections are
    closed, and ``serve`` returns. On cancellation: the same without the grace, open
    requests are cancelled at once.
    """
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValidationError("port", "must be an integer from 0 to 65535")
    if not isinstance(host, str) or not host:
        raise ValidationError("host", "must be a host name or address")
    # Unnamed statements: each dashboard query is planned with its actual filter values.
    async with open_client(database_url, prepared_statements=False) as client:
        app = create_app(
            client, read_only=read_only, token=token, allowed_hosts=loopback_hosts(host)
        )
        config = Config()
        config.bind = [_bind(host, port)]
        config.accesslog = None
        config.errorlog = "-"
        config.graceful_timeout = GRACEFUL_SECONDS
        await hypercorn_serve(
            app, config, shutdown_trigger=shutdown_trigger, task_status=task_status
        )

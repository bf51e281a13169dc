"""The worker's health endpoint: ``GET /healthz`` on a tiny HTTP/1.1 responder.

Built on trio sockets alone (no HTTP library in the core). It answers exactly one request
per connection and closes it, which is all a probe (the kubelet, Docker's HEALTHCHECK,
``curl -f``, a load balancer) needs:

- ``GET /healthz`` (or ``HEAD``): the status the worker reports: 200 ``ok`` while its
  producers fetch jobs, 503 ``starting`` before, 503 ``stopping`` once a stop has begun;
- any other path: 404; another method on ``/healthz``: 405; a request that is not
  HTTP/1.x, or has no end of its header within ``MAX_REQUEST_HEAD`` bytes: 400;
- a client that sends nothing for ``REQUEST_TIMEOUT`` seconds is disconnected.

At most ``MAX_CONNECTIONS`` connections are handled at once; more are closed at once, so a
flood cannot grow the worker's memory. A connection's failure (reset, closed early) ends
that connection only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final

import trio

__all__ = ["HealthStatus", "listening_addresses", "open_health_listeners", "serve_health"]

log = logging.getLogger("trioqueue.worker")

HealthStatus = Callable[[], tuple[int, str]]
"""Called for each ``/healthz`` request: the HTTP status (200 or 503) and a one-word body."""

MAX_REQUEST_HEAD: Final = 8192
REQUEST_TIMEOUT: Final = 10.0
MAX_CONNECTIONS: Final = 32

_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


async def open_health_listeners(host: str, port: int) -> list[trio.SocketListener]:
    """Listening sockets on ``host``:``port`` (port 0: a free port of the system's choice),
    one per address ``host`` resolves to. Raises OSError naming the address and why (in
    use, unknown host, not an address of this machine). If cancelled, nothing stays open."""
    try:
        return await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(f"health endpoint: cannot listen on {host}:{port}: {reason}") from None


def listening_addresses(listeners: list[trio.SocketListener]) -> list[str]:
    """``HOST:PORT`` of each listener (``[HOST]:PORT`` for IPv6), as bound."""
    found = []
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        found.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return found


async def serve_health(
    listeners: list[trio.SocketListener],
    status: HealthStatus,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer health probes on ``listeners`` until cancelled; reports started at once.

    Cancelled: the listeners and every open connection are closed, and it returns.
    """
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            limiter.acquire_on_behalf_of_nowait(stream)
        except trio.WouldBlock:
            await trio.aclose_forcefully(stream)
            return
        try:
            await _answer(stream, status)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the prober went away: its loss
        finally:
            limiter.release_on_behalf_of(stream)
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handle, listeners)
        task_status.started()


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    """The request up to the end of its header; ``b""`` (a bad request) after more than
    ``MAX_REQUEST_HEAD`` bytes without that end; None when the client closed first."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_REQUEST_HEAD:
            return b""
        chunk = await stream.receive_some(4096)
        if not chunk:
            return None
        data += chunk
    return data


def _respond(code: int, body: str, *, head_only: bool, allow: bool = False) -> bytes:
    payload = (body + "\n").encode()
    lines = [
        f"HTTP/1.1 {code} {_REASONS[code]}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(payload)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if allow:
        lines.append("Allow: GET, HEAD")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else payload)


def _route(head: bytes, status: HealthStatus) -> bytes:
    """The whole response to a request whose head is ``head``."""
    request_line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _respond(400, "bad request", head_only=False)
    method, target = parts[0], parts[1]
    head_only = method == b"HEAD"
    if target.split(b"?", 1)[0] != b"/healthz":
        return _respond(404, "not found", head_only=head_only)
    if method not in (b"GET", b"HEAD"):
        return _respond(405, "method not allowed", head_only=False, allow=True)
    code, body = status()
    return _respond(code, body, head_only=head_only)


async def _answer(stream: trio.SocketStream, status: HealthStatus) -> None:
    """Read one request from ``stream`` and send its response (nothing when the client
    closes first or takes longer than ``REQUEST_TIMEOUT`` seconds)."""
    with trio.move_on_after(REQUEST_TIMEOUT):
        head = await _read_head(stream)
        if head is not None:
            await stream.send_all(_route(head, status))

"""LISTEN/NOTIFY on a `PgConnection`: what a notification is, and waiting for one.

The connection buffers the notifications libpq hands it while statements run, and
`wait_notifies` (behind `PgConnection.wait_notifies`) waits on its otherwise idle socket
for more, giving way to any statement another task wants to run meanwhile.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

import attrs
import psycopg
import trio
from psycopg import pq
from psycopg.pq import PGnotify
from psycopg.pq.abc import PGconn

if TYPE_CHECKING:
    from .connection import PgConnection

__all__ = ["Notify", "notify_from_pq", "quote_ident", "wait_notifies"]

_ENCODING: Final = "utf-8"
_CONN_BAD: Final = pq.ConnStatus.BAD


@attrs.frozen
class Notify:
    """A notification received on a channel this connection listens to."""

    channel: str
    payload: str
    pid: int


def notify_from_pq(n: PGnotify) -> Notify:
    return Notify(
        n.relname.decode(_ENCODING, "replace"), n.extra.decode(_ENCODING, "replace"), n.be_pid
    )


def quote_ident(pgconn: PGconn, name: str) -> str:
    """``name`` quoted as an SQL identifier (for LISTEN, which takes no parameter)."""
    return bytes(pq.Escaping(pgconn).escape_identifier(name.encode(_ENCODING))).decode(_ENCODING)


async def wait_notifies(conn: PgConnection) -> list[Notify]:
    """`PgConnection.wait_notifies`."""
    lock = conn._lock
    while True:
        if conn._notifies:
            return conn.pending_notifies()
        async with lock:
            pgconn = conn._usable()
            conn._collect_notifies()
            if conn._notifies:
                return conn.pending_notifies()
            if lock.statistics().tasks_waiting:
                continue  # let the statement waiting for the lock go first
            with trio.CancelScope() as scope:
                conn._notify_scope = scope
                try:
                    await trio.lowlevel.wait_readable(conn._fd)
                except trio.ClosedResourceError as ex:
                    raise conn._broke("the connection was closed") from ex
                finally:
                    conn._notify_scope = None
            if scope.cancelled_caught:
                continue  # another task wants the connection
            try:
                pgconn.consume_input()
            except psycopg.OperationalError:
                raise conn._broke("the connection was lost") from None
            if pgconn.status == _CONN_BAD:
                raise conn._broke("the connection was lost")
            conn._collect_notifies()

"""A trio-native PostgreSQL connection on psycopg's sans-I/O core.

psycopg's ``AsyncConnection`` needs asyncio, but the protocol layer underneath it is I/O
free: ``psycopg.pq`` (libpq in non-blocking mode), ``psycopg.generators`` (protocol steps that
yield "wait for readable/writable" requests) and ``psycopg.adapt.Transformer`` (parameter and
row adaptation). `PgConnection` answers those wait requests with
``trio.lowlevel.wait_readable``/``wait_writable`` (``waiting.py``), so everything runs in the
trio task that awaits it, and cancellation is entirely in our hands.
See docs/decisions/0001-psycopg-sans-io-under-trio.md.

These psycopg modules are semi-internal: the project pins psycopg to 3.3.x.

How values are sent and loaded (types, formats, encoding) is in ``adapters.py``; COPY FROM
STDIN in ``copy.py``; the ``async with conn.transaction()`` block and its rollback in
``transaction.py``; waiting for notifications in ``notifications.py``; the session's
prepared statements in ``prepared.py``.
"""

from __future__ import annotations

import select
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar, overload

import attrs
import psycopg
import trio
from psycopg import errors, generators, pq
from psycopg.abc import PQGen
from psycopg.adapt import PyFormat, Transformer
from psycopg.conninfo import make_conninfo
from psycopg.pq import PGnotify
from psycopg.pq.abc import PGconn, PGresult
from psycopg.rows import RowMaker

from .adapters import ADAPTERS
from .copy import abort_copy_in, copy_from_stdin
from .notifications import Notify, notify_from_pq, quote_ident, wait_notifies
from .prepared import PreparedStatements
from .transaction import TransactionBlock
from .waiting import StatementLock, send_cancel, wait_conn, wait_gen

__all__ = ["Notify", "PgConnection", "QueryResult"]

RV = TypeVar("RV")
RowT = TypeVar("RowT")

_AUTO: Final = PyFormat.AUTO
_BINARY: Final = pq.Format.BINARY

_TUPLES_OK: Final = pq.ExecStatus.TUPLES_OK
_COMMAND_OK: Final = pq.ExecStatus.COMMAND_OK
_EMPTY_QUERY: Final = pq.ExecStatus.EMPTY_QUERY
_FATAL_ERROR: Final = pq.ExecStatus.FATAL_ERROR
_COPY_IN: Final = pq.ExecStatus.COPY_IN
_COPY_OUT: Final = pq.ExecStatus.COPY_OUT
_COPY_BOTH: Final = pq.ExecStatus.COPY_BOTH

_ACTIVE: Final = pq.TransactionStatus.ACTIVE
_INTRANS: Final = pq.TransactionStatus.INTRANS
_INERROR: Final = pq.TransactionStatus.INERROR

_CONN_BAD: Final = pq.ConnStatus.BAD

_ENCODING: Final = "utf-8"

DEFAULT_CANCEL_TIMEOUT: Final = 5.0


# --------------------------------------------------------------------------------------------
# Public value types


@attrs.frozen
class QueryResult:
    """The outcome of `PgConnection.execute`."""

    rows: list[tuple[Any, ...]]
    """Decoded rows (empty for commands that return none)."""
    rowcount: int
    """Rows affected or returned (libpq's cmd_tuples); 0 when the command reports none."""
    status: str
    """The command tag, e.g. ``"UPDATE 3"``."""


# --------------------------------------------------------------------------------------------
# Connection


class PgConnection:
    """One PostgreSQL session, driven natively by trio.

    Concurrency: one statement at a time. A `trio.Lock` serializes tasks that share a
    connection, so they queue rather than corrupt the protocol. A transaction, however, spans
    several statements: while `transaction` is open, the connection must not be used by other
    tasks (their statements would land inside it). `PgPool` guarantees that by handing each
    connection to one task at a time.

    On cancellation of a statement in flight, the connection sends the server a cancel request
    and waits for the statement to end, inside a shielded scope bounded by ``cancel_timeout``
    (default 5 s). The connection then stays usable and no statement is left running on the
    server. If that can't be done in time (server or network unresponsive), the connection is
    closed and marked `broken`. Either way ``trio.Cancelled`` is re-raised. A statement that
    had already finished when the cancel request arrived keeps its effect (outside a
    transaction it is committed).

    Server errors raise psycopg's own classes (``psycopg.errors.UniqueViolation``, ...,
    chosen by SQLSTATE); the connection stays usable. I/O failures raise
    ``psycopg.OperationalError`` and mark the connection `broken`.
    """

    __slots__ = (
        "_cancel_timeout",
        "_closed",
        "_fd",
        "_listening",
        "_lock",
        "_notifies",
        "_notify_scope",
        "_pgconn",
        "_poller",
        "_prepared",
        "_tx",
        "_tx_depth",
    )

    def __init__(self, pgconn: PGconn, *, cancel_timeout: float = DEFAULT_CANCEL_TIMEOUT) -> None:
        """Wrap a connected, non-blocking ``pgconn``. Use `connect` instead."""
        self._pgconn = pgconn
        self._fd = pgconn.socket
        self._lock = StatementLock()
        self._tx = Transformer(ADAPTERS)
        self._closed = False
        self._cancel_timeout = cancel_timeout
        self._tx_depth = 0
        self._notifies: list[Notify] = []
        self._notify_scope: trio.CancelScope | None = None
        self._listening: set[str] = set()
        self._poller: select.poll | None = None
        self._prepared = PreparedStatements()
        pgconn.notify_handler = self._notifies_append

    def _notifies_append(self, n: PGnotify) -> None:
        self._notifies.append(notify_from_pq(n))

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        conninfo: str,
        *,
        connect_timeout: float = 10.0,
        cancel_timeout: float = DEFAULT_CANCEL_TIMEOUT,
    ) -> PgConnection:
        """Open a connection.

        ``conninfo`` is a ``postgresql://`` URL or a ``"host=... dbname=..."`` keyword string;
        ``host=/some/dir`` connects through the unix socket in that directory.

        Raises ``psycopg.OperationalError`` if the server can't be reached, refuses the
        connection, or ``connect_timeout`` seconds pass. Note: libpq resolves host names
        synchronously; use an IP address or a unix socket where that matters.
        """
        try:
            dsn = make_conninfo(conninfo, client_encoding="UTF8")
        except psycopg.ProgrammingError as ex:
            raise psycopg.OperationalError(f"invalid connection string: {ex}") from ex
        gen = generators.connect(dsn)
        try:
            with trio.fail_after(connect_timeout):
                pgconn = await wait_conn(gen)
        except trio.TooSlowError:
            gen.close()
            raise psycopg.OperationalError(
                f"connection timeout: no connection after {connect_timeout} s"
            ) from None
        except BaseException:
            gen.close()
            raise
        return cls(pgconn, cancel_timeout=cancel_timeout)

    @property
    def broken(self) -> bool:
        """True when the connection is unusable: closed, I/O error, or a failed cancel."""
        if self._closed:
            return True
        if self._pgconn.status == _CONN_BAD:
            self._close_now()
            return True
        return False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_transaction(self) -> bool:
        """True inside a transaction block (also when it has failed and awaits ROLLBACK)."""
        if self._closed:
            return False
        status = self._pgconn.transaction_status
        return status == _INTRANS or status == _INERROR

    @property
    def backend_pid(self) -> int:
        """The server process id of this session (0 once closed)."""
        return 0 if self._closed else self._pgconn.backend_pid

    @property
    def listening(self) -> frozenset[str]:
        """Channels this connection currently LISTENs to."""
        return frozenset(self._listening)

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        pgconn = self._pgconn
        # Wake up (with ClosedResourceError) any task waiting on the socket before it goes.
        if self._fd >= 0:
            try:
                trio.lowlevel.notify_closing(self._fd)
            except Exception:
                pass
        pgconn.notify_handler = None
        try:
            pgconn.finish()
        except Exception:
            pass
        self._poller = None

    async def aclose(self) -> None:
        """Close the connection. Idempotent; raises no error.

        Always a checkpoint: like trio's own ``aclose()``, if the caller is cancelled the
        connection is still closed and ``trio.Cancelled`` is raised afterwards. A statement in
        flight in another task fails with ``psycopg.OperationalError``.
        """
        self._close_now()
        await trio.lowlevel.checkpoint()

    async def __aenter__(self) -> PgConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"pid={self._pgconn.backend_pid}"
        return f"<PgConnection {state}>"

    # ---- low-level driving -----------------------------------------------------------------

    def _usable(self) -> PGconn:
        if self._closed:
            raise psycopg.OperationalError("the connection is closed")
        return self._pgconn

    def _broke(self, reason: str) -> psycopg.OperationalError:
        msg = ""
        if not self._closed:
            msg = self._pgconn.get_error_message(_ENCODING)
            self._close_now()
        return psycopg.OperationalError(f"{reason}: {msg}" if msg else reason)

    async def _run(self, gen: PQGen[RV]) -> RV:
        """Drive ``gen`` for a statement already sent; cancel it server-side on trio cancel."""
        try:
            return await wait_gen(gen, self._fd)
        except trio.Cancelled:
            await self._cancel_inflight(gen)
            raise
        except trio.ClosedResourceError as ex:
            raise self._broke("the connection was closed") from ex
        except BaseException:
            self._close_now()
            raise

    async def _cancel_inflight(self, gen: PQGen[Any]) -> None:
        """Ask the server to cancel the running statement, then drain its results.

        Shielded and bounded by ``cancel_timeout``; on failure the connection is closed.
        """
        if self._closed:
            return
        with trio.CancelScope(
            shield=True, deadline=trio.current_time() + self._cancel_timeout
        ) as cs:
            try:
                if self._pgconn.transaction_status == _ACTIVE:
                    await send_cancel(self._pgconn)
                await wait_gen(gen, self._fd)  # results (normally QueryCanceled) are discarded
            except Exception:
                self._close_now()
                return
        if cs.cancelled_caught:
            self._close_now()

    def _wake_notify_waiter(self) -> None:
        scope = self._notify_scope
        if scope is not None:
            scope.cancel()

    async def _exec(
        self, query: str, params: Sequence[Any] | None, prepare: bool = False
    ) -> PGresult:
        """Send one statement with the extended protocol; return its (successful) result.
        With ``prepare``, a named prepared statement is used (and made on first use), which
        saves the server parsing and planning it every time.

        The caller holds ``self._lock`` and must decode rows before releasing it.
        """
        pgconn = self._usable()
        tx = self._tx
        if params:
            bufs = tx.dump_sequence(params, [_AUTO] * len(params))
            types: Sequence[int] = tx.types or ()
            formats: Sequence[pq.Format] | None = tx.formats
        else:
            bufs, types, formats = None, (), None
        name = await self._prepared.name(self, query, types) if prepare else None
        try:
            if name is not None:
                pgconn.send_query_prepared(name, bufs, param_formats=formats, result_format=_BINARY)
            else:
                pgconn.send_query_params(
                    query.encode(_ENCODING),
                    bufs,
                    param_types=types or None,
                    param_formats=formats,
                    result_format=_BINARY,
                )
        except psycopg.OperationalError:
            raise self._broke("sending the query failed") from None
        results: list[PGresult] = await self._run(generators.execute(pgconn))
        # A statement outside a transaction commits after its rows were sent: if the
        # commit fails (or the backend is killed meanwhile) an error result follows the
        # rows, and nothing was applied. Never hand back rows of a rolled-back statement.
        for later in results[1:]:
            if later.status == _FATAL_ERROR:
                raise errors.error_from_result(later, encoding=_ENCODING)
        res = results[0]
        status = res.status
        if status == _TUPLES_OK or status == _COMMAND_OK or status == _EMPTY_QUERY:
            return res
        if status == _FATAL_ERROR:
            raise errors.error_from_result(res, encoding=_ENCODING)
        if status == _COPY_IN:
            await abort_copy_in(self, b"COPY is not supported by execute(): use copy_in()")
            raise psycopg.NotSupportedError("COPY is not supported by execute(): use copy_in()")
        if status == _COPY_OUT or status == _COPY_BOTH:
            self._close_now()
            raise psycopg.NotSupportedError("COPY TO/BOTH is not supported (connection closed)")
        raise psycopg.InternalError(f"unexpected result status: {pq.ExecStatus(status).name}")

    def _rows(self, res: PGresult, make_row: RowMaker[RowT]) -> list[RowT]:
        if res.status != _TUPLES_OK:
            return []
        tx = self._tx
        tx.set_pgresult(res)
        try:
            return tx.load_rows(0, res.ntuples, make_row)
        finally:
            tx.set_pgresult(None)

    async def _simple(self, sql: str) -> None:
        """Run ``sql`` (possibly several statements) with the simple-query protocol."""
        self._wake_notify_waiter()
        async with self._lock:
            pgconn = self._usable()
            try:
                pgconn.send_query(sql.encode(_ENCODING))
            except psycopg.OperationalError:
                raise self._broke("sending the query failed") from None
            results: list[PGresult] = await self._run(generators.execute(pgconn))
            for res in results:
                status = res.status
                if status == _FATAL_ERROR:
                    raise errors.error_from_result(res, encoding=_ENCODING)
                if status == _COPY_IN:
                    await abort_copy_in(self, b"COPY is not supported by execute_script()")
                    raise psycopg.NotSupportedError("COPY is not supported by execute_script()")
                if status == _COPY_OUT or status == _COPY_BOTH:
                    self._close_now()
                    raise psycopg.NotSupportedError("COPY TO is not supported (connection closed)")

    # ---- queries ---------------------------------------------------------------------------

    async def execute(
        self, query: str, params: Sequence[Any] | None = None, *, prepare: bool = False
    ) -> QueryResult:
        """Run one statement with ``$1, $2`` placeholders in one round trip.

        ``prepare=True`` runs it as a named prepared statement of this session (made on
        first use, for each combination of parameter types): worth it for statements run
        often. Not for servers behind a transaction-pooling proxy.

        On cancellation: the server is asked to cancel the statement and the connection waits
        (shielded, up to ``cancel_timeout``) until it has stopped; the connection stays usable,
        or is closed if that fails. ``trio.Cancelled`` is then re-raised.
        """
        self._wake_notify_waiter()
        async with self._lock:
            res = await self._exec(query, params, prepare)
            rows = self._rows(res, tuple)
        status = res.command_status
        return QueryResult(
            rows, res.command_tuples or 0, status.decode(_ENCODING) if status else ""
        )

    @overload
    async def fetch(
        self, query: str, params: Sequence[Any] | None = None, *, prepare: bool = False
    ) -> list[tuple[Any, ...]]: ...

    @overload
    async def fetch(
        self,
        query: str,
        params: Sequence[Any] | None = None,
        *,
        prepare: bool = False,
        make_row: RowMaker[RowT],
    ) -> list[RowT]: ...

    async def fetch(
        self,
        query: str,
        params: Sequence[Any] | None = None,
        *,
        prepare: bool = False,
        make_row: RowMaker[Any] = tuple,
    ) -> list[Any]:
        """Run one statement and return all its rows. ``prepare`` and cancellation as in
        `execute`. ``make_row`` makes each row from the tuple of its values, as psycopg
        loads them (by default the row is that tuple), e.g. ``SomeNamedTuple._make``."""
        self._wake_notify_waiter()
        async with self._lock:
            return self._rows(await self._exec(query, params, prepare), make_row)

    @overload
    async def fetchrow(
        self, query: str, params: Sequence[Any] | None = None, *, prepare: bool = False
    ) -> tuple[Any, ...] | None: ...

    @overload
    async def fetchrow(
        self,
        query: str,
        params: Sequence[Any] | None = None,
        *,
        prepare: bool = False,
        make_row: RowMaker[RowT],
    ) -> RowT | None: ...

    async def fetchrow(
        self,
        query: str,
        params: Sequence[Any] | None = None,
        *,
        prepare: bool = False,
        make_row: RowMaker[Any] = tuple,
    ) -> Any:
        """Run one statement and return its first row, or None. ``prepare`` and
        cancellation as in `execute`; ``make_row`` as in `fetch`."""
        self._wake_notify_waiter()
        async with self._lock:
            res = await self._exec(query, params, prepare)
            if res.status != _TUPLES_OK or not res.ntuples:
                return None
            tx = self._tx
            tx.set_pgresult(res)
            try:
                return tx.load_row(0, make_row)
            finally:
                tx.set_pgresult(None)

    async def fetchval(
        self, query: str, params: Sequence[Any] | None = None, *, prepare: bool = False
    ) -> Any:
        """Return the first column of the first row, or None. ``prepare`` and cancellation
        as in `execute`."""
        row = await self.fetchrow(query, params, prepare=prepare)
        return None if row is None else row[0]

    async def execute_script(self, sql: str) -> None:
        """Run several ``;``-separated statements (no parameters), e.g. a migration file.

        Uses the simple-query protocol: outside a transaction, the statements run in one
        implicit transaction and an error rolls them all back. Cancellation as in `execute`.
        """
        await self._simple(sql)

    # ---- transactions ----------------------------------------------------------------------

    def transaction(self) -> TransactionBlock:
        """``async with conn.transaction():`` runs the block in a transaction.

        ``BEGIN`` on entry, ``COMMIT`` on normal exit. Nested blocks (or a block entered while
        a transaction is already open) use ``SAVEPOINT``/``RELEASE``/``ROLLBACK TO``.

        On an exception or trio cancellation in the block (or in COMMIT), the transaction or
        savepoint is rolled back inside a shielded scope bounded by ``cancel_timeout``; if the
        rollback can't complete, the connection is closed (`broken`), which makes the server
        roll back. The original exception then propagates.

        The connection must not be used by other tasks while the block is open.
        """
        return TransactionBlock(self)

    # ---- COPY ------------------------------------------------------------------------------

    async def copy_in_data(self, query: str, chunks: Iterable[bytes]) -> int:
        """Like `copy_in`, but the caller formats the data: ``chunks`` are sent as they
        are (for instance text-format lines already escaped). Same guarantees."""
        return await self.copy_in(query, chunks, raw=True)

    async def copy_in(
        self,
        query: str,
        rows: Iterable[Sequence[Any]],
        *,
        types: Sequence[int | str] | None = None,
        raw: bool = False,
    ) -> int:
        """Stream ``rows`` into ``COPY tbl (cols) FROM STDIN``; return the number of rows copied.

        Each row gives the column values in the order of the COPY column list (None → NULL).
        The format follows the query: text by default (the server parses each value by its
        column type, so no type information is needed), or binary with
        ``WITH (FORMAT binary)``, which then requires ``types`` (the column type names or
        oids, e.g. ``["bigint", "jsonb", "text[]"]``).

        On an error while producing rows, or on cancellation, the COPY is aborted (shielded,
        bounded by ``cancel_timeout``) so nothing is written and the connection stays usable
        (or is closed if even that fails); the exception then propagates.
        """
        return await copy_from_stdin(self, query, rows, types=types, raw=raw)

    # ---- LISTEN / NOTIFY -------------------------------------------------------------------

    async def listen(self, channel: str) -> None:
        """``LISTEN`` to ``channel`` (quoted as an identifier, so dots etc. are fine)."""
        ident = quote_ident(self._usable(), channel)
        await self._simple(f"LISTEN {ident}")
        self._listening.add(channel)

    async def unlisten(self, channel: str) -> None:
        """``UNLISTEN`` ``channel``."""
        ident = quote_ident(self._usable(), channel)
        await self._simple(f"UNLISTEN {ident}")
        self._listening.discard(channel)

    async def unlisten_all(self) -> None:
        """``UNLISTEN *`` and drop notifications not yet returned."""
        await self._simple("UNLISTEN *")
        self._listening.clear()
        self._notifies.clear()

    async def notify(self, channel: str, payload: str) -> None:
        """Send a notification (``SELECT pg_notify($1, $2)``)."""
        await self.execute("SELECT pg_notify($1, $2)", (channel, payload))

    def pending_notifies(self) -> list[Notify]:
        """Return (and forget) the notifications received so far, without waiting."""
        if not self._closed:
            self._collect_notifies()
        out, self._notifies = self._notifies, []
        return out

    def _collect_notifies(self) -> None:
        pgconn = self._pgconn
        while n := pgconn.notifies():
            self._notifies.append(notify_from_pq(n))

    async def wait_notifies(self) -> list[Notify]:
        """Wait until at least one notification has arrived; return all pending ones.

        Notifications that arrived while other statements ran on this connection are buffered
        and returned here, so none are lost. While waiting, the connection stays available:
        a statement from another task interrupts the wait, runs, and the wait resumes.

        Raises ``psycopg.OperationalError`` if the connection is lost. Cancellation just
        stops waiting (nothing is in flight on the server).
        """
        return await wait_notifies(self)

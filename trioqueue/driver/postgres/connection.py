"""A trio-native PostgreSQL connection on psycopg's sans-I/O core.

psycopg's ``AsyncConnection`` needs asyncio, but the protocol layer underneath it is I/O
free: ``psycopg.pq`` (libpq in non-blocking mode), ``psycopg.generators`` (protocol steps that
yield "wait for readable/writable" requests) and ``psycopg.adapt.Transformer`` (parameter and
row adaptation). This module answers those wait requests with
``trio.lowlevel.wait_readable``/``wait_writable``, so everything runs in the trio task that awaits
it, and cancellation is entirely in our hands.
See docs/decisions/0001-psycopg-sans-io-under-trio.md.

These psycopg modules are semi-internal: the project pins psycopg to 3.3.x.

Type notes:

* Parameters use ``$1, $2`` placeholders and are dumped by psycopg's default adapters
  (``PyFormat.AUTO``). A Python ``int`` is sent as int2/int4/int8/numeric depending on its value,
  as psycopg does: write ``$1::bigint`` where an expression (rather than a column) must be wide.
* Results are requested in binary format. Types with no binary loader (enums, custom types)
  come back as ``bytes``: cast them to ``text`` in SQL. ``bit``/``varbit`` load as ``str`` such
  as ``"10101010"``.
* The session uses ``client_encoding=UTF8`` whatever the connection string says.
"""

from __future__ import annotations

import binascii
import json
import select
import struct
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any, Final, TypeVar

import attrs
import psycopg
import trio
from psycopg import capabilities, errors, generators, pq
from psycopg._copy_base import BinaryFormatter, Formatter, TextFormatter
from psycopg.abc import Buffer, PQGen, PQGenConn
from psycopg.adapt import AdaptersMap, Dumper, Loader, PyFormat, Transformer
from psycopg.conninfo import make_conninfo
from psycopg.pq import PGnotify
from psycopg.pq.abc import PGconn, PGresult
from psycopg.types.string import BytesBinaryDumper
from psycopg.waiting import Ready, Wait

from .arrays import dumpers as array_dumpers

__all__ = ["Notify", "PgConnection", "QueryResult", "acquire_without_yielding"]

RV = TypeVar("RV")

_WAIT_R: Final = Wait.R
_WAIT_W: Final = Wait.W
_READY_R: Final = Ready.R
_READY_W: Final = Ready.W
_READY_RW: Final = Ready.RW

_AUTO: Final = PyFormat.AUTO
_BINARY: Final = pq.Format.BINARY
_TEXT: Final = pq.Format.TEXT

_TUPLES_OK: Final = pq.ExecStatus.TUPLES_OK
_COMMAND_OK: Final = pq.ExecStatus.COMMAND_OK
_EMPTY_QUERY: Final = pq.ExecStatus.EMPTY_QUERY
_FATAL_ERROR: Final = pq.ExecStatus.FATAL_ERROR
_COPY_IN: Final = pq.ExecStatus.COPY_IN
_COPY_OUT: Final = pq.ExecStatus.COPY_OUT
_COPY_BOTH: Final = pq.ExecStatus.COPY_BOTH

_IDLE: Final = pq.TransactionStatus.IDLE
_ACTIVE: Final = pq.TransactionStatus.ACTIVE
_INTRANS: Final = pq.TransactionStatus.INTRANS
_INERROR: Final = pq.TransactionStatus.INERROR

_CONN_BAD: Final = pq.ConnStatus.BAD

_ENCODING: Final = "utf-8"

# libpq can loop forever on a single huge put_copy_data (psycopg #255): feed it in chunks.
_COPY_CHUNK: Final = 128 * 1024

# Non-blocking cancel (PQcancelStart/PQcancelPoll) needs libpq >= 17; the binary wheel has 18.
_HAS_CANCEL_CONN: Final = capabilities.has_cancel_safe()

DEFAULT_CANCEL_TIMEOUT: Final = 5.0
# Prepared statements kept per session; past this, statements run unprepared.
_MAX_PREPARED: Final = 256


# --------------------------------------------------------------------------------------------
# Adaptation context


class _BitBinaryLoader(Loader):
    """Load ``bit``/``varbit`` (binary format) as a ``str`` of 0/1, like the text format."""

    format = _BINARY
    _unpack = struct.Struct("!i").unpack_from

    def load(self, data: Buffer) -> str:
        (nbits,) = self._unpack(data)
        bits = bytes(data[4:])
        if not nbits:
            return ""
        return format(int.from_bytes(bits, "big"), f"0{len(bits) * 8}b")[:nbits]


class _BytesHexTextDumper(Dumper):
    """bytea in text format as ``\\x<hex>``, with or without a connection.

    psycopg's text bytea dumper needs a connection to escape correctly: without one (our
    case) libpq's PQescapeBytea doubles single quotes, which corrupts text COPY data.
    """

    format = _TEXT
    oid = psycopg.postgres.types["bytea"].oid

    def dump(self, obj: Buffer) -> Buffer:
        return b"\\x" + binascii.hexlify(obj)


_raw_decode = json.JSONDecoder().raw_decode


class _JsonbBinaryLoader(Loader):
    """Load ``jsonb`` (binary format: a version byte, then the JSON text) faster than
    psycopg's generic loader: the server's output has no surrounding whitespace, so the
    text goes straight to the decoder, and the empty object and array (most metadata and
    errors) skip it altogether."""

    format = _BINARY

    def load(self, data: Buffer) -> Any:
        text = bytes(data[1:])
        if text == b"{}":
            return {}
        if text == b"[]":
            return []
        return _raw_decode(text.decode())[0]


_ADAPTERS: Final = AdaptersMap(psycopg.adapters)
_ADAPTERS.register_loader("jsonb", _JsonbBinaryLoader)
_ADAPTERS.register_loader("bit", _BitBinaryLoader)
_ADAPTERS.register_loader("varbit", _BitBinaryLoader)
for _cls in (bytes, bytearray, memoryview):
    _ADAPTERS.register_dumper(_cls, _BytesHexTextDumper)
    # registered last, so parameters (PyFormat.AUTO) keep going out in binary
    _ADAPTERS.register_dumper(_cls, BytesBinaryDumper)
del _cls
for _array_cls, _array_dumper in array_dumpers():
    _ADAPTERS.register_dumper(_array_cls, _array_dumper)
del _array_cls, _array_dumper


# --------------------------------------------------------------------------------------------
# Public value types


@attrs.frozen
class Notify:
    """A notification received on a channel this connection listens to."""

    channel: str
    payload: str
    pid: int


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
# Waiting


async def _wait_rw(fd: int) -> Ready:
    # Only needed while a large send can't be flushed at once. Waiting for writability alone
    # could deadlock if the server is blocked writing to us, so wake up now and then and let
    # the generator consume input (harmless when there is none) before trying again.
    with trio.move_on_after(0.05):
        await trio.lowlevel.wait_writable(fd)
        return _READY_RW
    return _READY_R


async def _wait_conn(gen: PQGenConn[RV]) -> RV:
    """Drive a generator that yields ``(fd, Wait)`` pairs (connect, cancel)."""
    try:
        fd, s = next(gen)
        while True:
            if s == _WAIT_R:
                await trio.lowlevel.wait_readable(fd)
                ready = _READY_R
            elif s == _WAIT_W:
                await trio.lowlevel.wait_writable(fd)
                ready = _READY_W
            else:
                ready = await _wait_rw(fd)
            fd, s = gen.send(ready)
    except StopIteration as ex:
        rv: RV = ex.value
        return rv


def _notify_from_pq(n: PGnotify) -> Notify:
    return Notify(
        n.relname.decode(_ENCODING, "replace"), n.extra.decode(_ENCODING, "replace"), n.be_pid
    )


def _copy_end_gen(pgconn: PGconn, error: bytes | None) -> PQGen[list[PGresult]]:
    """End (or abort, with ``error``) a COPY FROM STDIN and return the final results.

    Unlike ``psycopg.generators.copy_end`` it returns error results instead of raising, so the
    caller can tell a server error (connection fine) from an I/O error (connection broken).
    """
    while pgconn.put_copy_end(error) == 0:
        while not (yield _WAIT_W):
            pass
    while pgconn.flush() != 0:
        while not (yield _WAIT_W):
            pass
    results: list[PGresult] = yield from generators.fetch_many(pgconn)
    return results


def _quote_ident_bytes(pgconn: PGconn, name: str) -> bytes:
    return bytes(pq.Escaping(pgconn).escape_identifier(name.encode(_ENCODING)))


async def acquire_without_yielding(primitive: trio.Lock | trio.Semaphore) -> None:
    """Acquire ``primitive``, taking it at once if it is free, without a trip through the
    scheduler; when it is not, wait for it as ``acquire`` does (fairly: trio hands it to
    the longest waiter). A cancellation point either way.

    For what every statement passes through (a pool slot, the connection lock): the
    statement's own I/O wait is a scheduling point anyway, and each extra yield cost a
    single insert another pass through trio's run loop."""
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        primitive.acquire_nowait()
    except trio.WouldBlock:
        await primitive.acquire()


class _StatementLock:
    """A ``trio.Lock`` whose ``async with`` uses `acquire_without_yielding`."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def __aenter__(self) -> None:
        await acquire_without_yielding(self._lock)

    async def __aexit__(self, *exc: object) -> None:
        self._lock.release()

    def statistics(self) -> trio.LockStatistics:
        return self._lock.statistics()


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
        "_prepare_seq",
        "_prepared",
        "_tx",
        "_tx_depth",
    )

    def __init__(self, pgconn: PGconn, *, cancel_timeout: float = DEFAULT_CANCEL_TIMEOUT) -> None:
        """Wrap a connected, non-blocking ``pgconn``. Use `connect` instead."""
        self._pgconn = pgconn
        self._fd = pgconn.socket
        self._lock = _StatementLock()
        self._tx = Transformer(_ADAPTERS)
        self._closed = False
        self._cancel_timeout = cancel_timeout
        self._tx_depth = 0
        self._notifies: list[Notify] = []
        self._notify_scope: trio.CancelScope | None = None
        self._listening: set[str] = set()
        self._poller: select.poll | None = None
        self._prepared: dict[tuple[str, tuple[int, ...]], bytes] = {}
        self._prepare_seq = 0
        pgconn.notify_handler = self._notifies_append

    def _notifies_append(self, n: PGnotify) -> None:
        self._notifies.append(_notify_from_pq(n))

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
                pgconn = await _wait_conn(gen)
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

    async def _wait(self, gen: PQGen[RV]) -> RV:
        """Drive a psycopg generator to completion on our socket (no error handling)."""
        fd = self._fd
        try:
            s = next(gen)
            while True:
                if s == _WAIT_R:
                    await trio.lowlevel.wait_readable(fd)
                    s = gen.send(_READY_R)
                elif s == _WAIT_W:
                    await trio.lowlevel.wait_writable(fd)
                    s = gen.send(_READY_W)
                else:
                    s = gen.send(await _wait_rw(fd))
        except StopIteration as ex:
            rv: RV = ex.value
            return rv

    async def _run(self, gen: PQGen[RV]) -> RV:
        """Drive ``gen`` for a statement already sent; cancel it server-side on trio cancel."""
        try:
            return await self._wait(gen)
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
                    await self._send_cancel()
                await self._wait(gen)  # results (normally QueryCanceled) are discarded
            except Exception:
                self._close_now()
                return
        if cs.cancelled_caught:
            self._close_now()

    async def _send_cancel(self) -> None:
        if _HAS_CANCEL_CONN:
            cancel_conn = self._pgconn.cancel_conn()
            cancel_conn.start()
            try:
                await _wait_conn(generators.cancel(cancel_conn))
            finally:
                cancel_conn.finish()
        else:  # pragma: no cover - libpq < 17 only
            cancel = self._pgconn.get_cancel()
            await trio.to_thread.run_sync(cancel.cancel, abandon_on_cancel=True)

    def _wake_notify_waiter(self) -> None:
        scope = self._notify_scope
        if scope is not None:
            scope.cancel()

    async def _prepared_name(self, query: str, types: Sequence[int]) -> bytes | None:
        """The name of ``query`` prepared for these parameter types on this session,
        preparing it first if need be (one extra round trip, once); None once the cache
        is full. The caller holds ``self._lock``."""
        key = (query, tuple(types))
        name = self._prepared.get(key)
        if name is not None or len(self._prepared) >= _MAX_PREPARED:
            return name
        # A fresh name per attempt: a prepare cancelled midway may or may not exist.
        self._prepare_seq += 1
        name = b"tq_%d" % self._prepare_seq
        pgconn = self._usable()
        try:
            pgconn.send_prepare(name, query.encode(_ENCODING), param_types=types)
        except psycopg.OperationalError:
            raise self._broke("sending the query failed") from None
        results: list[PGresult] = await self._run(generators.execute(pgconn))
        for res in results:
            if res.status == _FATAL_ERROR:
                raise errors.error_from_result(res, encoding=_ENCODING)
        self._prepared[key] = name
        return name

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
        name = await self._prepared_name(query, types) if prepare else None
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
            await self._abort_copy_in(b"COPY is not supported by execute(): use copy_in()")
            raise psycopg.NotSupportedError("COPY is not supported by execute(): use copy_in()")
        if status == _COPY_OUT or status == _COPY_BOTH:
            self._close_now()
            raise psycopg.NotSupportedError("COPY TO/BOTH is not supported (connection closed)")
        raise psycopg.InternalError(f"unexpected result status: {pq.ExecStatus(status).name}")

    def _rows(self, res: PGresult) -> list[tuple[Any, ...]]:
        if res.status != _TUPLES_OK:
            return []
        tx = self._tx
        tx.set_pgresult(res)
        try:
            return tx.load_rows(0, res.ntuples, tuple)
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
                    await self._abort_copy_in(b"COPY is not supported by execute_script()")
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
            rows = self._rows(res)
        status = res.command_status
        return QueryResult(
            rows, res.command_tuples or 0, status.decode(_ENCODING) if status else ""
        )

    async def fetch(
        self, query: str, params: Sequence[Any] | None = None, *, prepare: bool = False
    ) -> list[tuple[Any, ...]]:
        """Run one statement and return all its rows. ``prepare`` and cancellation as in
        `execute`."""
        self._wake_notify_waiter()
        async with self._lock:
            return self._rows(await self._exec(query, params, prepare))

    async def fetchrow(
        self, query: str, params: Sequence[Any] | None = None, *, prepare: bool = False
    ) -> tuple[Any, ...] | None:
        """Run one statement and return its first row, or None. ``prepare`` and
        cancellation as in `execute`."""
        self._wake_notify_waiter()
        async with self._lock:
            res = await self._exec(query, params, prepare)
            if res.status != _TUPLES_OK or not res.ntuples:
                return None
            tx = self._tx
            tx.set_pgresult(res)
            try:
                return tx.load_row(0, tuple)
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

    def transaction(self) -> _Transaction:
        """``async with conn.transaction():`` runs the block in a transaction.

        ``BEGIN`` on entry, ``COMMIT`` on normal exit. Nested blocks (or a block entered while
        a transaction is already open) use ``SAVEPOINT``/``RELEASE``/``ROLLBACK TO``.

        On an exception or trio cancellation in the block (or in COMMIT), the transaction or
        savepoint is rolled back inside a shielded scope bounded by ``cancel_timeout``; if the
        rollback can't complete, the connection is closed (`broken`), which makes the server
        roll back. The original exception then propagates.

        The connection must not be used by other tasks while the block is open.
        """
        return _Transaction(self)

    async def _rollback_shielded(self, savepoint: bytes | None) -> None:
        """Roll back the transaction (``None``) or to ``savepoint``; close on any failure."""
        if self.broken:
            return
        with trio.CancelScope(
            shield=True, deadline=trio.current_time() + self._cancel_timeout
        ) as cs:
            try:
                if savepoint is None:
                    if self._pgconn.transaction_status != _IDLE:
                        await self._simple("ROLLBACK")
                    self._tx_depth = 0
                else:
                    sp = savepoint.decode()
                    await self._simple(f"ROLLBACK TO SAVEPOINT {sp}; RELEASE SAVEPOINT {sp}")
            except Exception:
                self._close_now()
                return
        if cs.cancelled_caught:
            self._close_now()

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
        self._wake_notify_waiter()
        async with self._lock:
            pgconn = self._usable()
            try:
                pgconn.send_query(query.encode(_ENCODING))
            except psycopg.OperationalError:
                raise self._broke("sending the query failed") from None
            results: list[PGresult] = await self._run(generators.execute(pgconn))
            res = results[0]
            if res.status == _FATAL_ERROR:
                raise errors.error_from_result(res, encoding=_ENCODING)
            if res.status != _COPY_IN:
                if res.status == _COPY_OUT or res.status == _COPY_BOTH:
                    self._close_now()
                raise psycopg.ProgrammingError(
                    "copy_in() needs a COPY ... FROM STDIN statement,"
                    f" got {pq.ExecStatus(res.status).name}"
                )

            try:
                if raw:
                    for buf in rows:
                        await self._copy_send(buf)  # type: ignore[arg-type]
                else:
                    formatter = self._copy_formatter(res.binary_tuples == 1, types)
                    for row in rows:
                        buf = formatter.write_row(row)
                        if buf:
                            await self._copy_send(buf)
                    buf = formatter.end()
                    if buf:
                        await self._copy_send(buf)
            except BaseException as ex:
                if isinstance(ex, trio.ClosedResourceError):
                    raise self._broke("the connection was closed") from ex
                await self._abort_copy_in(f"copy_in() aborted: {type(ex).__name__}".encode())
                raise

            results = await self._run(_copy_end_gen(pgconn, None))
            for res in results:
                if res.status == _FATAL_ERROR:
                    raise errors.error_from_result(res, encoding=_ENCODING)
            return results[0].command_tuples or 0

    def _copy_formatter(self, binary: bool, types: Sequence[int | str] | None) -> Formatter:
        # A fresh Transformer: set_dumper_types() pins dumpers that must not leak into the
        # connection's shared one.
        tx = Transformer(_ADAPTERS)
        if types is not None:
            registry = _ADAPTERS.types
            oids = [t if isinstance(t, int) else registry.get_oid(t) for t in types]
            tx.set_dumper_types(oids, _BINARY if binary else _TEXT)
        elif binary:
            raise psycopg.ProgrammingError("binary COPY needs types=[...] (the column types)")
        return BinaryFormatter(tx) if binary else TextFormatter(tx)

    async def _copy_send(self, buf: Buffer) -> None:
        pgconn = self._pgconn
        if len(buf) <= _COPY_CHUNK:
            await self._wait(generators.copy_to(pgconn, buf))
            return
        view = memoryview(buf)
        for i in range(0, len(view), _COPY_CHUNK):
            await self._wait(generators.copy_to(pgconn, view[i : i + _COPY_CHUNK]))

    async def _abort_copy_in(self, message: bytes) -> None:
        """Abort a COPY FROM STDIN in progress (shielded, bounded); close on failure."""
        if self.broken:
            return
        with trio.CancelScope(
            shield=True, deadline=trio.current_time() + self._cancel_timeout
        ) as cs:
            try:
                await self._wait(_copy_end_gen(self._pgconn, message))
            except Exception:
                self._close_now()
                return
        if cs.cancelled_caught:
            self._close_now()

    # ---- LISTEN / NOTIFY -------------------------------------------------------------------

    async def listen(self, channel: str) -> None:
        """``LISTEN`` to ``channel`` (quoted as an identifier, so dots etc. are fine)."""
        ident = _quote_ident_bytes(self._usable(), channel).decode(_ENCODING)
        await self._simple(f"LISTEN {ident}")
        self._listening.add(channel)

    async def unlisten(self, channel: str) -> None:
        """``UNLISTEN`` ``channel``."""
        ident = _quote_ident_bytes(self._usable(), channel).decode(_ENCODING)
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
            self._notifies.append(_notify_from_pq(n))

    async def wait_notifies(self) -> list[Notify]:
        """Wait until at least one notification has arrived; return all pending ones.

        Notifications that arrived while other statements ran on this connection are buffered
        and returned here, so none are lost. While waiting, the connection stays available:
        a statement from another task interrupts the wait, runs, and the wait resumes.

        Raises ``psycopg.OperationalError`` if the connection is lost. Cancellation just
        stops waiting (nothing is in flight on the server).
        """
        lock = self._lock
        while True:
            if self._notifies:
                return self.pending_notifies()
            async with lock:
                pgconn = self._usable()
                self._collect_notifies()
                if self._notifies:
                    return self.pending_notifies()
                if lock.statistics().tasks_waiting:
                    continue  # let the statement waiting for the lock go first
                with trio.CancelScope() as scope:
                    self._notify_scope = scope
                    try:
                        await trio.lowlevel.wait_readable(self._fd)
                    except trio.ClosedResourceError as ex:
                        raise self._broke("the connection was closed") from ex
                    finally:
                        self._notify_scope = None
                if scope.cancelled_caught:
                    continue  # another task wants the connection
                try:
                    pgconn.consume_input()
                except psycopg.OperationalError:
                    raise self._broke("the connection was lost") from None
                if pgconn.status == _CONN_BAD:
                    raise self._broke("the connection was lost")
                self._collect_notifies()

    # ---- pool support ----------------------------------------------------------------------

    def _check_idle(self) -> bool:
        """Cheap liveness check for an idle connection: False if it is (now) broken.

        An idle session normally sends nothing; if the socket is readable, read what is there
        (a termination notice, EOF, or buffered notifications).
        """
        if self.broken:
            return False
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(self._fd, select.POLLIN)
        pgconn = self._pgconn
        # A terminated backend sends an error message, then EOF: the first read gets the
        # message, a second one sees EOF. Bounded, in case notifications keep arriving.
        for _ in range(4):
            if not poller.poll(0):
                break
            try:
                pgconn.consume_input()
                pgconn.is_busy()  # parse what was read
            except psycopg.OperationalError:
                self._close_now()
                return False
            if pgconn.status == _CONN_BAD:
                self._close_now()
                return False
            self._collect_notifies()
        return True


class _Transaction:
    """The async context manager returned by `PgConnection.transaction`."""

    __slots__ = ("_conn", "_savepoint")

    def __init__(self, conn: PgConnection) -> None:
        self._conn = conn
        self._savepoint: bytes | None = None

    async def __aenter__(self) -> PgConnection:
        conn = self._conn
        if conn._tx_depth == 0 and not conn.in_transaction:
            self._savepoint = None
            sql = "BEGIN"
        else:
            self._savepoint = f"tq_sp_{conn._tx_depth + 1}".encode()
            sql = f"SAVEPOINT tq_sp_{conn._tx_depth + 1}"
        try:
            await conn._simple(sql)
        except BaseException:
            # A cancelled BEGIN/SAVEPOINT may still have reached the server.
            if self._savepoint is None and conn.in_transaction:
                await conn._rollback_shielded(None)
            raise
        conn._tx_depth += 1
        return conn

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        conn._tx_depth = max(0, conn._tx_depth - 1)
        sp = self._savepoint
        if exc_type is None:
            if sp is None and conn._pgconn.transaction_status == _INERROR and not conn.closed:
                # COMMIT would silently roll back: make the failure visible.
                await conn._rollback_shielded(None)
                raise errors.InFailedSqlTransaction(
                    "the transaction had failed (an error was caught inside the block)"
                    " and has been rolled back"
                )
            try:
                await conn._simple("COMMIT" if sp is None else f"RELEASE SAVEPOINT {sp.decode()}")
            except BaseException:
                if sp is not None or conn.in_transaction:
                    await conn._rollback_shielded(sp)
                raise
        else:
            await conn._rollback_shielded(sp)

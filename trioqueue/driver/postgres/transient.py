"""Which PostgreSQL failures are transient: the same request may succeed a little later.

Used to set ``DatabaseError.transient`` (see trioqueue/errors.py), which ``open_client``'s
start-up retries on. A server error carries its SQLSTATE and is judged by it alone. A
failure to connect carries none (libpq reports it as text only), so it counts as
transient — the server may be restarting, failing over or full — unless its text is one of
the known permanent refusals: a failed login, a missing database or role, a refused
``pg_hba.conf`` rule, an SSL or connection-string mistake. Those texts are PostgreSQL's
and libpq's English ones; on a server or client set to another language an unrecognised
refusal counts as transient, so start-up retries it until ``startup_timeout`` and then
reports it.
"""

from __future__ import annotations

from typing import Final

import psycopg

__all__ = ["TRANSIENT_SQLSTATES", "is_transient"]

TRANSIENT_SQLSTATES: Final = frozenset(
    {
        "57P01",  # admin_shutdown: pg_terminate_backend, or a fast shutdown
        "57P02",  # crash_shutdown: another backend crashed, the server restarts
        "57P03",  # cannot_connect_now: starting up, shutting down, in recovery
        "57P05",  # idle_session_timeout: the session was ended for being idle
        "53300",  # too_many_connections
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "25006",  # read_only_sql_transaction: a standby, say just after a failover
    }
)
"""SQLSTATEs worth trying again, besides all of class 08 (connection exception, which is
also what PgBouncer reports when it cannot reach the server or is full)."""

_PERMANENT_CONNECT_FAILURES: Final = (
    "does not exist",  # database "x" / role "x" does not exist (3D000, 28000)
    "authentication failed",  # password / peer / ident / SCRAM (28P01, 28000)
    "no pg_hba.conf entry",
    "pg_hba.conf rejects connection",
    "permission denied",  # no CONNECT privilege (42501)
    "is not permitted to log in",
    "is not currently accepting connections",  # datallowconn = false (55000)
    "no password supplied",
    "password is missing",
    "ssl was required",
    "does not support ssl",
    "certificate",  # verify failed, file missing, ...
    "invalid connection string",  # PgConnection.connect's own
    "invalid connection option",
    "invalid uri",
    "invalid value for parameter",  # a bad ``options`` setting (22023)
    "unrecognized configuration parameter",  # (42704)
    "unsupported frontend protocol",
    "no such database",  # PgBouncer: not in its [databases] and no "*" entry
    "no such user",  # PgBouncer: not in its auth_file / auth_query
)
"""Lower-case fragments of connection failures that waiting cannot cure."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc``, raised by psycopg or by our connection code, may well not happen
    again on a later try (see the module docstring). False for anything that is not a
    ``psycopg.Error``."""
    if not isinstance(exc, psycopg.Error):
        return False
    sqlstate = exc.sqlstate
    if sqlstate is not None:
        return sqlstate.startswith("08") or sqlstate in TRANSIENT_SQLSTATES
    if not isinstance(exc, psycopg.OperationalError):
        return False
    text = str(exc).lower()
    return not any(fragment in text for fragment in _PERMANENT_CONNECT_FAILURES)

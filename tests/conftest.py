"""Test database fixtures (docs/testing.md).

Tests talk to a real PostgreSQL server: ``$TRIOQUEUE_TEST_DATABASE_URL`` when set, otherwise a
temporary embedded server started once for the session.  On that server the session creates one
migrated *template* database; every test that asks for ``database_url`` gets its own copy
(``CREATE DATABASE ... TEMPLATE``), dropped afterwards, so tests never see each other's rows.

All fixtures here are sync: pytest-trio only allows function-scoped async fixtures, and a
session-scoped server must outlive every test's ``trio.run``.

Hypothesis: under CI (``$CI`` set, or ``TRIOQUEUE_CI=1``, which ``.ci/run`` exports) the
``trioqueue-ci`` profile is loaded: derandomized, so a red run replays the same examples
(docs/testing.md, "Reproducing a CI failure"). Locally the default profile stays as it is.
"""

from __future__ import annotations

import itertools
import os
import secrets
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
import trio
from hypothesis import HealthCheck, settings
from psycopg import sql
from support import env_flag

from trioqueue.embedded import DATABASE_URL_ENV, EmbeddedServer

TEST_DATABASE_URL_ENV = "TRIOQUEUE_TEST_DATABASE_URL"
CI_ENV = "TRIOQUEUE_CI"

# Loaded here, before any test module is imported: the profiles the test modules register
# (and the settings objects they build) inherit every value they do not set themselves
# from the profile loaded when they are made, derandomize and database among them.
settings.register_profile(
    "trioqueue-ci",
    derandomize=True,  # the examples follow from the test's code alone: a rerun replays them
    database=None,  # nothing to keep in a clone that is thrown away
    print_blob=True,  # a failure prints its @reproduce_failure(...) line
    deadline=None,  # CI machines stall; speed is never what a test checks
    suppress_health_check=[HealthCheck.too_slow],
)
if os.environ.get("CI") or env_flag(CI_ENV):
    settings.load_profile("trioqueue-ci")

# pid + random: unique across concurrent sessions (xdist workers, CI jobs sharing a server)
# and across a crashed session's leftovers.
_SESSION_TAG = f"{os.getpid()}_{secrets.token_hex(3)}"
_database_numbers = itertools.count()


def _external_url() -> str | None:
    return os.environ.get(TEST_DATABASE_URL_ENV) or None


def with_dbname(url: str, dbname: str) -> str:
    """``url`` (a URL or a ``key=value`` conninfo) pointing at database ``dbname`` instead."""
    if url.startswith(("postgresql://", "postgres://")):
        parts = urllib.parse.urlsplit(url)
        return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(dbname)))
    return psycopg.conninfo.make_conninfo(url, dbname=dbname)


def _admin(url: str, *statements: sql.Composed) -> None:
    """Run statements on their own autocommit connection (CREATE/DROP DATABASE need that)."""
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def _create_database(server_url: str, name: str, template: str | None) -> str:
    statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
    if template is not None:
        statement = sql.SQL("{} TEMPLATE {}").format(statement, sql.Identifier(template))
    _admin(server_url, statement)
    return with_dbname(server_url, name)


def _drop_database(server_url: str, name: str) -> None:
    # FORCE (PostgreSQL 13+) disconnects whatever the test left connected.
    _admin(
        server_url,
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)),
    )


@contextmanager
def fresh_database(server_url: str, template: str, prefix: str = "tq_x") -> Iterator[str]:
    """A migrated database of its own, copied from ``template`` and dropped afterwards: for
    hypothesis examples that each want one (the ``database_url`` fixture is per test)."""
    name = f"{prefix}_{_SESSION_TAG}_{next(_database_numbers)}"
    url = _create_database(server_url, name, template=template)
    try:
        yield url
    finally:
        _drop_database(server_url, name)


def pytest_report_header(config: pytest.Config) -> list[str]:
    if _external_url() is not None:
        where = f"trioqueue tests use ${TEST_DATABASE_URL_ENV}"
    else:
        where = "trioqueue tests use a temporary embedded PostgreSQL server"
    # (Read when the header is printed: after --hypothesis-profile, if given, was applied.)
    current = getattr(settings, "get_current_profile_name", None)  # not in older releases
    profile = current() if current is not None else "?"
    derandomized = " (derandomized)" if settings.default and settings.default.derandomize else ""
    return [where, f"hypothesis profile {profile!r}{derandomized}"]


@pytest.fixture(autouse=True)
def _no_user_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """Code under test must never fall back to the developer's own $TRIOQUEUE_DATABASE_URL."""
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[EmbeddedServer | None]:
    """The session's embedded server, or None when ``$TRIOQUEUE_TEST_DATABASE_URL`` is set.

    For fault tests (``restart()``); most tests want ``database_url``.
    """
    if _external_url() is not None:
        yield None
        return
    with EmbeddedServer(temporary=True) as server:
        yield server


@pytest.fixture(scope="session")
def pg_server_url(pg_server: EmbeddedServer | None) -> str:
    """A URL on the test server with rights to create databases (its own database: hands off)."""
    external = _external_url()
    if external is not None:
        return external
    assert pg_server is not None
    return pg_server.url


@pytest.fixture(scope="session")
def template_database(pg_server_url: str) -> Iterator[str]:
    """Name of a database migrated to the latest schema, used only as a template.

    After migrating, connections to it are disallowed and any left are terminated, because
    CREATE DATABASE ... TEMPLATE fails while the template has connections.
    """
    from trioqueue import migrate

    name = f"tq_tpl_{_SESSION_TAG}"
    url = _create_database(pg_server_url, name, template=None)
    try:
        trio.run(migrate, url)
        _admin(
            pg_server_url,
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(name)),
            sql.SQL(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = {}"
            ).format(sql.Literal(name)),
        )
        yield name
    finally:
        _drop_database(pg_server_url, name)


@pytest.fixture
def database_url(pg_server_url: str, template_database: str) -> Iterator[str]:
    """URL of a fresh, migrated database for this test alone; dropped afterwards."""
    with fresh_database(pg_server_url, template_database, "tq_t") as url:
        yield url


@pytest.fixture(params=["memory", "postgres"])
def store_url(request: pytest.FixtureRequest) -> str:
    """A fresh, empty store for this test, once per driver: ``memory://NAME`` (an in-process
    store of its own, shared by every client the test opens with it) or a fresh migrated
    PostgreSQL database (as ``database_url``)."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("database_url")
        return url
    return f"memory://tq_m_{_SESSION_TAG}_{next(_database_numbers)}"


@pytest.fixture
def empty_database_url(pg_server_url: str) -> Iterator[str]:
    """URL of a fresh database with no trioqueue schema (for migration tests); dropped after."""
    name = f"tq_e_{_SESSION_TAG}_{next(_database_numbers)}"
    url = _create_database(pg_server_url, name, template="template0")
    try:
        yield url
    finally:
        _drop_database(pg_server_url, name)

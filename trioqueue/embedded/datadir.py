"""The folders a server uses, and the locks that say which live process owns each.

A server has a data folder (persistent and reused between runs, or temporary) and a run folder
(its unix socket, its log and, when temporary, its data).  Each is claimed with an ``flock``
that the kernel drops when the process dies, so folders left by a killed process are found and
cleaned up by the next start.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile
from typing import Final

from .binaries import _exe
from .privileges import _is_root, _run, _ServiceUser

__all__: list[str] = []

logger = logging.getLogger("trioqueue.embedded")

_STOP_TIMEOUT: Final = 30  # seconds pg_ctl waits for the server to shut down
_RUN_DIR_PREFIX: Final = "tqpg-"  # short: the unix socket path must stay under ~100 bytes
_OWNER_LOCK: Final = "owner.lock"
_TMPFS: Final = pathlib.Path("/dev/shm")
_TMPFS_MIN_FREE: Final = 1 << 30


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


def _read_postmaster_pid(data_dir: pathlib.Path) -> list[str]:
    try:
        return (data_dir / "postmaster.pid").read_text().splitlines()
    except OSError:
        return []


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

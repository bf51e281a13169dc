"""Which database a caller means: the URL given, else ``$TRIOQUEUE_DATABASE_URL``, else none.

A leaf: it imports nothing of trioqueue, so the client, the migration entry points and the
command line can resolve a URL without loading the embedded server or a driver.  It also
knows the ``memory://`` prefix that selects the in-process memory driver, so that choosing
that driver does not mean importing it.
"""

from __future__ import annotations

import os
from typing import Final

__all__ = ["DATABASE_URL_ENV", "MEMORY_URL_PREFIX", "is_memory_url", "resolve_database_url"]

DATABASE_URL_ENV: Final = "TRIOQUEUE_DATABASE_URL"
"""The environment variable read when no URL is given."""

MEMORY_URL_PREFIX: Final = "memory://"
"""URLs starting with this name a store of the in-process memory driver."""


def resolve_database_url(url: str | None) -> str | None:
    """Return the database URL to use, or None when the caller should start an embedded server.

    ``url`` wins when it is a non-empty string; otherwise ``$TRIOQUEUE_DATABASE_URL`` when it is
    set and non-empty; otherwise None.  Never starts anything.
    """
    if url:
        return url
    return os.environ.get(DATABASE_URL_ENV) or None


def is_memory_url(url: str | None) -> bool:
    """Whether ``url`` (already resolved) names a memory-driver store."""
    return url is not None and url.startswith(MEMORY_URL_PREFIX)

"""The named stores of the process: ``memory://NAME`` URLs and the `MemoryDriver` each
one names (`memory_driver_for_url`)."""

from __future__ import annotations

import threading

from ..._urls import MEMORY_URL_PREFIX
from .driver import MemoryDriver

__all__ = ["MEMORY_URL_PREFIX", "memory_driver_for_url"]

_named: dict[str, MemoryDriver] = {}
_named_lock = threading.Lock()


def memory_driver_for_url(url: str) -> MemoryDriver:
    """The memory store for a ``memory://`` URL: ``memory://NAME`` is the process-wide
    store of that name (made on first use, shared by every client opened with it);
    ``memory://`` alone is a new private store each time."""
    if not url.startswith(MEMORY_URL_PREFIX):
        raise ValueError(f"not a memory URL (must start with {MEMORY_URL_PREFIX!r}): {url!r}")
    name = url[len(MEMORY_URL_PREFIX) :]
    if not name:
        return MemoryDriver()
    with _named_lock:
        driver = _named.get(name)
        if driver is None:
            driver = _named[name] = MemoryDriver()
        return driver

"""Small helpers shared by test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

from collections.abc import Callable

import trio


async def eventually(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``predicate`` (for state that has no event to wait on) until true, or fail."""
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await trio.sleep(0.02)
    raise AssertionError(f"not reached within {seconds} s")

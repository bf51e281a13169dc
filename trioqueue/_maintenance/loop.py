"""The loop every maintenance service shares: jitter, then ``run_once`` each interval."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable

import trio

from ..errors import DatabaseError

__all__ = ["run_every"]

log = logging.getLogger("trioqueue.maintenance")


async def run_every(interval: float, run_once: Callable[[], Awaitable[object]], what: str) -> None:
    """Call ``run_once`` every ``interval`` seconds, after a 0-1 s start jitter (so
    services of one leader don't all hit the database at once), until cancelled.

    A DatabaseError is logged and the next run tries again; anything else propagates.
    """
    await trio.sleep(random.uniform(0, min(1.0, interval)))
    while True:
        try:
            await run_once()
        except DatabaseError as exc:
            log.warning("%s run failed: %s", what, exc)
        await trio.sleep(interval)

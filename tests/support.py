"""Small helpers shared by test modules (pytest puts this folder on sys.path).

``worker_process.py`` and ``worker_app.py`` run as programs of their own and take `FAST`
from here, so this module imports neither pytest nor hypothesis until a test asks for
`LONG`, `GENERATED` or `GENERATED_POSTGRES` (see ``__getattr__`` at the end).
"""

from __future__ import annotations

import collections
import math
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import attrs
import trio

import trioqueue as tq


def env_flag(name: str) -> bool:
    """Whether ``$name`` is ``1``. Unset, empty or ``0`` is off; anything else raises, so
    that ``TRIOQUEUE_SOAK=yes`` fails at once instead of quietly running the short
    profiles (which is how a soak run gets lost)."""
    value = os.environ.get(name, "")
    if value in ("", "0"):
        return False
    if value == "1":
        return True
    raise ValueError(f"${name} is {value!r}: set it to 1 (on), or to 0 or nothing (off)")


SOAK = env_flag("TRIOQUEUE_SOAK")
"""``TRIOQUEUE_SOAK=1``: the generated suites run their long profiles (``bash .ci/soak``)."""

FAST: dict[str, Any] = {
    "fetch_poll_interval": 0.1,
    "fetch_cooldown": 0.01,
    "scheduler_interval": 0.2,
    "leader_interval": 0.2,
}
"""Client timings for tests: a poll every 0.1 s, maintenance and elections every 0.2 s
(a leader's term is then 0.6 s). Only how soon things happen depends on them; tests
override one as ``{**FAST, "leader_interval": 0.5}`` where they need something else."""


@asynccontextmanager
async def working(
    url: str, workers: tq.Workers, *, max_workers: int = 10, **config: Any
) -> AsyncIterator[tq.Client]:
    """A client working the ``default`` queue of ``url`` with `FAST` timings (``config``
    wins over them)."""
    async with tq.open_client(
        url,
        workers=workers,
        queues={"default": tq.QueueConfig(max_workers=max_workers)},
        **{**FAST, **config},
    ) as client:
        yield client


@attrs.frozen
class Sleep:
    """The job `Tracker`'s worker runs: sleeps ``seconds`` (negative: returns at once,
    without a checkpoint)."""

    kind: ClassVar[str] = "sleep"
    seconds: float = 0.0


class Tracker:
    """What a ``sleep`` worker saw, for tests that stop, kill or restart the clients that
    run it: how often each job ran, starts, finishes and cancellations, and every run that
    began while the same job was already running (``overlaps``).

    Nothing is asserted inside the worker (an assert there would only make a job error):
    tests assert on these after the run, ``assert tracker.overlaps == []`` among them."""

    def __init__(self) -> None:
        self.runs: collections.Counter[int] = collections.Counter()
        self.running: set[int] = set()
        self.overlaps: list[int] = []
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_started(self, n: int) -> None:
        """Return once ``n`` runs have started."""
        while self.started < n:
            await self._changed.wait()

    async def wait_finished(self, n: int) -> None:
        """Return once ``n`` runs have returned."""
        while self.finished < n:
            await self._changed.wait()

    def workers(self, *, shield: float = 0.0, longest: float = math.inf) -> tq.Workers:
        """A ``sleep`` worker that first sleeps ``shield`` seconds shielded from
        cancellation, then ``job.args.seconds``, at most ``longest``."""
        workers = tq.Workers()

        @workers.worker(Sleep)
        async def sleep(job: tq.Job[Sleep]) -> None:
            if job.id in self.running:
                self.overlaps.append(job.id)
            self.running.add(job.id)
            self.runs[job.id] += 1
            self.started += 1
            self._notify()
            try:
                if shield:
                    with trio.CancelScope(shield=True):
                        await trio.sleep(shield)
                if job.args.seconds >= 0:
                    await trio.sleep(min(job.args.seconds, longest))
            except trio.Cancelled:
                self.cancelled += 1
                raise
            finally:
                self.running.discard(job.id)
            self.finished += 1
            self._notify()

        return workers


async def eventually(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``predicate`` (for state that has no event to wait on) until true, or fail."""
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await trio.sleep(0.02)
    raise AssertionError(f"not reached within {seconds} s")


def fetches(client: tq.Client, queue: str = "default") -> int:
    """How many fetches ``client``'s producer of ``queue`` has completed."""
    count: int = client.statistics()["producers"][queue].fetches
    return count


async def wait_fetches(
    client: tq.Client, queue: str = "default", count: int = 2, seconds: float = 30.0
) -> None:
    """Return once ``count`` fetches of ``queue`` by ``client`` have completed after the
    call. A fetch already on its way may be the first; with ``count`` 2 or more at least
    one of them began after the call, and so saw every job committed before it: the
    positive fact a "nothing ran" check waits for before it asserts."""
    target = fetches(client, queue) + count
    await eventually(lambda: fetches(client, queue) >= target, seconds)


def __getattr__(name: str) -> Any:
    """`LONG`, `GENERATED` and `GENERATED_POSTGRES`, made (importing pytest and
    hypothesis) when first asked for."""
    if name == "LONG":
        import pytest

        # pytest-timeout's 120 s is per test, and one generated test runs every example.
        return pytest.mark.timeout(6 * 3600 if SOAK else 600)
    if name in ("GENERATED", "GENERATED_POSTGRES"):
        from hypothesis import HealthCheck, Phase

        # The generated (plan) suites on the memory driver.
        generated: dict[str, Any] = {
            "deadline": None,
            "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
            "print_blob": True,
        }
        if name == "GENERATED":
            return generated
        # On PostgreSQL: each example makes its own database from the session's template,
        # so the function-scoped autouse fixture (which only removes an environment
        # variable) is safely shared by all examples; shrinking is left to the memory
        # driver, since every replay costs real seconds there (a failure is re-run as a
        # plan on the memory driver).
        return {
            **generated,
            "phases": [Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
            "suppress_health_check": [
                *generated["suppress_health_check"],
                HealthCheck.function_scoped_fixture,
            ],
        }
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

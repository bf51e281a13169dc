"""``trioqueue worker`` as a subprocess, for the tests that run it (test_cli.py,
test_worker_cli.py): its stderr collected as it comes, waited on by text. (The fault
tests run their own script, tests/worker_process.py.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from trioqueue.embedded import DATABASE_URL_ENV

LISTENING = re.compile(r"health: listening on 127\.0\.0\.1:(\d+)")


class Worker:
    """A running ``trioqueue worker`` process and the stderr it has written so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stderr = ""
        self.stderr_ended = False
        """The process closed its stderr (it exits): ``stderr`` is all it wrote."""
        self._changed = trio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def collect(self) -> None:
        assert self.process.stderr is not None
        async for chunk in self.process.stderr:
            self.stderr += chunk.decode()
            self._notify()
        self.stderr_ended = True
        self._notify()

    async def wait_for(self, text: str) -> None:
        """Until ``text`` is in stderr; fails once the process has closed its stderr (as it
        does on exit) without writing it."""
        while text not in self.stderr:
            assert not self.stderr_ended, self.stderr
            await self._changed.wait()

    async def health_port(self) -> int:
        while (found := LISTENING.search(self.stderr)) is None:
            await self.wait_for("health: listening on")
        return int(found.group(1))

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)


@asynccontextmanager
async def open_worker_process(cwd: Path, *args: str) -> AsyncIterator[Worker]:
    """``python -m trioqueue worker ARGS`` in ``cwd`` (without the developer's database
    URL in its environment), killed at the end of the block if still running."""
    env = dict(os.environ)
    env.pop(DATABASE_URL_ENV, None)
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trioqueue", "worker", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    worker = Worker(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.collect)
            yield worker
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()

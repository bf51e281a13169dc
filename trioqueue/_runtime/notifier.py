"""The notifier: one LISTEN connection, fanned out to per-channel callbacks.

Callbacks are plain functions that must not block (they set events, cancel scopes or
offer to bounded buffers). The connection is re-opened with backoff when it breaks; after
every (re)connect the ``on_connect`` callbacks run, since notifications sent while it was
down are gone and listeners should re-check the database.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any, final

import attrs
import trio

from ..driver.protocol import Driver
from ..errors import DatabaseError
from .startup import backoff

__all__ = ["NotifyLimiter", "Notifier"]

log = logging.getLogger("trioqueue.notifier")

Callback = Callable[[dict[str, Any]], None]


@final
@attrs.define(eq=False)
class Notifier:
    driver: Driver
    channels: Sequence[str]
    _callbacks: dict[str, list[Callback]] = attrs.field(factory=dict, init=False)
    _on_connect: list[Callable[[], None]] = attrs.field(factory=list, init=False)
    connected: bool = attrs.field(default=False, init=False)

    def subscribe(self, channel: str, callback: Callback) -> None:
        """Call ``callback(payload_dict)`` for each notification on ``channel``. A
        channel not among ``channels`` is LISTENed to as well, from the next connect on
        (subscribe before :meth:`run` to miss nothing)."""
        self._callbacks.setdefault(channel, []).append(callback)

    def listened(self) -> list[str]:
        """The channels each connection LISTENs to: ``channels``, then any other
        subscribed one."""
        return list(dict.fromkeys([*self.channels, *self._callbacks]))

    def on_connect(self, callback: Callable[[], None]) -> None:
        self._on_connect.append(callback)

    def _dispatch(self, channel: str, payload: str) -> None:
        try:
            data = json.loads(payload) if payload else {}
        except ValueError:
            log.warning("ignoring malformed notification on %s: %r", channel, payload)
            return
        if not isinstance(data, dict):
            return
        for callback in self._callbacks.get(channel, ()):
            try:
                callback(data)
            except Exception:
                log.exception("notification callback failed for %s", channel)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled, reconnecting with backoff (0.1 s doubling to 5 s, with
        jitter; a WARNING with the attempt and the delay each time). Reports started once
        the first connection listens, or failed once: a client does not wait for LISTEN
        to start (its producers poll meanwhile), and the loop keeps retrying for as long
        as it runs. Cancellation just cancels."""
        failures = 0
        started = False
        while True:
            try:
                async with self.driver.open_listener(self.listened()) as listener:
                    self.connected = True
                    failures = 0
                    if not started:
                        started = True
                        task_status.started()
                    for callback in self._on_connect:
                        callback()
                    while True:
                        for note in await listener.wait():
                            self._dispatch(note.channel, note.payload)
            except DatabaseError as exc:
                was = "lost" if self.connected else "failed"
                self.connected = False
                failures += 1
                delay = backoff(failures)
                log.warning(
                    "LISTEN connection %s (attempt %d), reconnecting in %.2f s: %s",
                    was,
                    failures,
                    delay,
                    exc,
                )
            if not started:
                started = True
                task_status.started()
            await trio.sleep(delay)


@final
@attrs.define(eq=False)
class NotifyLimiter:
    """At most one insert notification per queue per ``cooldown`` seconds."""

    cooldown: float
    _last: dict[str, float] = attrs.field(factory=dict, init=False)

    def take(self, queues: Sequence[str]) -> list[str]:
        """Which of ``queues`` may be notified now; marks them as notified."""
        now = trio.current_time()
        allowed = []
        for queue in queues:
            if now - self._last.get(queue, -1e18) >= self.cooldown:
                self._last[queue] = now
                allowed.append(queue)
        return allowed

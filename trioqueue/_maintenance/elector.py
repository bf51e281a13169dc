"""Leader election, and the leader-only maintenance services run while leading.

```
follower ──elected──▶ leader ──renewal fails / lost──▶ follower
   ▲                    │
   └──── resigned ◀─────┘ (on stop: DELETE + NOTIFY, so a follower takes over at once)
```

One row in ``tq_leader`` holds the leader's id and when its term expires. Every client
with queues tries to take it every ``leader_interval`` (plus up to 10% jitter); the leader
renews it at the same pace, each time extending the term to ``now + 3 * leader_interval``,
so leadership expires after two missed renewals. While leading, the maintenance services
run in a nursery of the elector's: losing leadership cancels them cleanly, and the client
stopping cancels the elector, which resigns (shielded, with a deadline) so a follower
listening on ``tq_leadership`` takes over within milliseconds — or, when polling, within
about one interval.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, final

import attrs
import trio

from ..driver.protocol import Driver
from ..errors import DatabaseError

__all__ = ["Elector"]

log = logging.getLogger("trioqueue.elector")

RESIGN_DEADLINE = 2.0
"""Seconds the shielded resignation may take on stop."""

TERM_INTERVALS = 3
"""A term lasts this many election intervals: leadership survives two missed renewals."""

Service = Callable[[], Awaitable[Any]]


@final
@attrs.define(eq=False)
class Elector:
    driver: Driver
    client_id: str
    interval: float
    now: Callable[[], datetime]
    services: Sequence[Service]
    """Started (each in its own task) when elected; cancelled when leadership ends."""
    is_leader: bool = attrs.field(default=False, init=False)
    _wake: trio.Event = attrs.field(factory=trio.Event, init=False)
    _resign_requested: bool = attrs.field(default=False, init=False)
    elections: int = attrs.field(default=0, init=False)
    """Times this client has become leader."""

    def on_notification(self, payload: dict[str, Any]) -> None:
        """A message on ``tq_leadership``. Not a checkpoint, never blocks."""
        action = payload.get("action")
        if action == "resigned" and payload.get("leader_id") != self.client_id:
            self._wake.set()
        elif action == "request_resign" and self.is_leader:
            self._resign_requested = True
            self._wake.set()

    def _expiry(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.interval * TERM_INTERVALS)

    async def _attempt(self) -> bool:
        now = self.now()
        try:
            return await self.driver.leader_attempt_elect(self.client_id, now, self._expiry(now))
        except DatabaseError as exc:
            log.warning("leader election attempt failed: %s", exc)
            return False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take part in elections until cancelled; lead when elected.

        On cancellation: maintenance services are cancelled first, then leadership (if
        held) is given up in a shielded scope bounded by ``RESIGN_DEADLINE``.
        """
        task_status.started()
        while True:
            if await self._attempt():
                await self._lead()
                # Give others a fair chance after stepping down.
                await trio.sleep(self.interval * random.uniform(0.5, 1.0))
                continue
            with trio.move_on_after(self.interval * random.uniform(1.0, 1.1)) as waited:
                await self._wake.wait()
            self._wake = trio.Event()
            if not waited.cancelled_caught:
                # Woken by a resignation: try soon, with a little jitter so followers
                # don't all hit the row at the same instant.
                await trio.sleep(random.uniform(0, 0.05))

    async def _lead(self) -> None:
        self.is_leader = True
        self.elections += 1
        self._resign_requested = False
        log.info("client %s was elected leader", self.client_id)
        try:
            async with trio.open_nursery() as nursery:
                for service in self.services:
                    nursery.start_soon(service)
                while await self._renew():
                    pass
                nursery.cancel_scope.cancel()
        finally:
            self.is_leader = False
            with trio.move_on_after(RESIGN_DEADLINE) as scope:
                scope.shield = True
                try:
                    await self.driver.leader_resign(self.client_id)
                except DatabaseError as exc:
                    log.warning("resigning leadership failed (it will expire): %s", exc)
            log.info("client %s is no longer leader", self.client_id)

    async def _renew(self) -> bool:
        """Wait one interval, then extend the term; False when leadership is over."""
        with trio.move_on_after(self.interval * random.uniform(0.9, 1.0)):
            await self._wake.wait()
        self._wake = trio.Event()
        if self._resign_requested:
            log.info("client %s resigns on request", self.client_id)
            return False
        if not await self._attempt():
            log.warning("client %s lost leadership", self.client_id)
            return False
        return True

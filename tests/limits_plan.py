"""Flow control in the generated-plan suites: what the simulation checks claim by claim,
and the limited steps of the driver differential test.

The simulation (``simulation_plan.py``) gives a plan optional limits on `LIMITED_QUEUE` (a
`GlobalLimit`, partitioned or not, and/or a `RateLimit`) and its jobs a kind and a
``customer`` arg to partition by. Its ledger tells a `LimitWatch` every claim, outcome
write and rescue as the storage made them, and the watch checks, at every claim:

- **Global limit.** The runs of a partition that the database counts as ``running`` when
  the claim commits (claimed, neither written nor rescued yet) never exceed the limit.
  On the memory driver the ledger records statements in commit order, so the count is
  exact. On PostgreSQL records may come in any order, so the watch counts only runs
  that were surely running: claimed before the fetch began, and no write or rescue of
  them begun before it returned (a lower bound: the check never accuses falsely).
- **Rate limit.** No partition has more than ``limit`` claims (by ``attempted_at``) in
  any window of ``per`` seconds. Checked at every claim with the claims recorded so far
  (a subset of all, in any order: no false accusation), and once more after the run. A
  fetch is given its ``now`` when it is sent, and fetches may commit in another order
  than their ``now``s (a delay fault, or real time on PostgreSQL); the fetch counts every
  start from its window's beginning on, later ones included, and forgets starts only
  `RATE_KEEP` seconds (at least) after they left the window, so the windows hold exactly
  while no fetch takes that long from its ``now`` to its return (the watch measures it).
  (Proof sketch: of the fetches that started jobs in a window, the last to commit had its
  ``now`` in the window, so it counted every start of the window, none forgotten yet.)

The partitions are computed here, apart from ``trioqueue.limits.partition_of``.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import attrs
import trio

from trioqueue.driver.memory.limits import RATE_KEEP
from trioqueue.limits import GlobalLimit, QueueLimits, RateLimit

LIMITED_QUEUE = "default"
"""The queue a plan's limits apply to (``other`` stays unlimited)."""
PARTITION_FIELD = "customer"
"""The args field jobs are partitioned by."""

Run = tuple[int, int]
"""(job id, run number: ``len(attempted_by)``)."""


def partition(by_kind: bool, by_args: Sequence[str], kind: str, args: Any) -> tuple[Any, ...]:
    """The partition of a job, as a hashable key: its kind (with ``by_kind``), then each
    ``by_args`` field's value (None when missing, or when the args are not an object)."""
    fields = args if isinstance(args, dict) else {}
    values = tuple(json.dumps(fields.get(name), sort_keys=True) for name in by_args)
    return ((kind,) if by_kind else ()) + values


def scaled(limits: QueueLimits | None, scale: float) -> QueueLimits | None:
    """``limits`` with the rate window in seconds of a clock where a plan unit is ``scale``
    seconds."""
    if limits is None or limits.rate_limit is None:
        return limits
    r = limits.rate_limit
    return attrs.evolve(limits, rate_limit=attrs.evolve(r, per=r.per * scale))


def _fullest(times: Iterable[datetime], window: timedelta) -> tuple[int, datetime | None]:
    """The most of ``times`` in one window ``(end - window, end]``, and its ``end`` (the
    fullest windows end at one of the times)."""
    ordered = sorted(times)
    best: tuple[int, datetime | None] = (0, None)
    first = 0
    for i, end in enumerate(ordered):
        if i + 1 < len(ordered) and ordered[i + 1] == end:
            continue  # the window ending here ends at the last of its equal times
        while ordered[first] <= end - window:
            first += 1
        if i + 1 - first > best[0]:
            best = (i + 1 - first, end)
    return best


class LimitWatch:
    """Checks a plan's limits claim by claim (see the module docstring). The ledger calls
    it as statements return; ``violation`` reports, ``features`` counts what happened."""

    def __init__(
        self,
        limits: QueueLimits,
        *,
        exact: bool,
        violation: Callable[[str], None],
        features: Counter[str],
    ) -> None:
        self.global_limit = limits.global_limit
        self.rate_limit = limits.rate_limit
        self.exact = exact
        self.violation = violation
        self.features = features
        self._seq = 0
        self._claims: dict[Run, tuple[int, tuple[Any, ...]]] = {}
        """Every run claimed from the queue: when (in `_seq`) and its global partition."""
        self._freed: set[Run] = set()
        """Runs no longer running: written or rescued (on PostgreSQL: being written)."""
        self._starts: defaultdict[tuple[Any, ...], list[datetime]] = defaultdict(list)
        self._sent: dict[str, float] = {}
        """When each client life's fetch of the queue was sent (its ``now`` was read)."""
        self._slowest = 0.0
        self.held: dict[str, bool] = {}
        """Whether each life's last fetch of the queue said jobs were held back."""

    # ---- what the wrappers report

    def sent(self, life: str) -> None:
        """A fetch of the queue leaves ``life`` (the outermost wrapper: ``now`` was just
        read)."""
        self._sent[life] = trio.current_time()

    def begins(self) -> int:
        """A fetch reaches the storage; the token to give `fetched`."""
        self._seq += 1
        return self._seq

    def fetched(
        self, rows: Sequence[Any], queue: str, begun: int, life: str, held_back: bool | None
    ) -> None:
        """A fetch of ``queue`` (begun at token ``begun``) claimed ``rows``."""
        if queue != LIMITED_QUEUE:
            return
        self._seq += 1
        sent = self._sent.pop(life, None)
        if sent is not None:
            self._slowest = max(self._slowest, trio.current_time() - sent)
        if held_back is not None:
            self.held[life] = held_back
            if held_back:
                self.features["a limited fetch held jobs back"] += 1
        if self.global_limit is not None:
            self._check_global(rows, self._seq if self.exact else begun)
        for row in rows:
            self._claims[(row[0], len(row[9]))] = (self._seq, self._global_key(row))
        if self.rate_limit is not None and rows:
            touched = set()
            for row in rows:
                key = self._rate_key(row)
                self._starts[key].append(row[8])
                touched.add(key)
            for key in touched:
                self._check_rate(key)

    def writing(self, runs: Iterable[Run]) -> None:
        """Outcomes of ``runs`` are about to be written (or the runs rescued)."""
        if not self.exact:
            self._freed.update(runs)

    def written(self, runs: Iterable[Run]) -> None:
        """The storage wrote outcomes of (or rescued) ``runs``: they stopped running."""
        if self.exact:
            self._freed.update(runs)

    def finish(self, violation: Callable[[str], None]) -> None:
        """After the run (outside it: ``violation`` reports): every rate window, with the
        slowest fetch known."""
        self.violation = violation
        if self.rate_limit is not None:
            for key in list(self._starts):
                self._check_rate(key)
            if not self._checkable():
                self.features["a fetch too slow to check the rate windows"] += 1

    # ---- the checks

    def _global_key(self, row: Any) -> tuple[Any, ...]:
        g = self.global_limit
        return () if g is None else partition(g.by_kind, g.by_args, row[1], row[2])

    def _rate_key(self, row: Any) -> tuple[Any, ...]:
        r = self.rate_limit
        return () if r is None else partition(r.by_kind, r.by_args, row[1], row[2])

    def _check_global(self, rows: Sequence[Any], before: int) -> None:
        g = self.global_limit
        assert g is not None
        claimed = Counter(self._global_key(row) for row in rows)
        running: Counter[tuple[Any, ...]] = Counter(
            key
            for run, (seq, key) in self._claims.items()
            if seq < before and run not in self._freed and key in claimed
        )
        for key, n in claimed.items():
            total = running[key] + n
            if total > g.limit:
                ids = [row[0] for row in rows if self._global_key(row) == key]
                self.violation(
                    f"global limit {g.limit} passed: jobs {ids} claimed in partition {key} "
                    f"while {running[key]} of its jobs were running"
                )
            elif total == g.limit:
                self.features["a claim filled a global partition"] += 1

    def _checkable(self) -> bool:
        """Whether every fetch returned soon enough after its ``now`` for the windows to
        hold exactly: before the starts its window counts could be forgotten."""
        r = self.rate_limit
        assert r is not None
        return self._slowest < max(r.per, RATE_KEEP)

    def _check_rate(self, key: tuple[Any, ...]) -> None:
        r = self.rate_limit
        assert r is not None
        if not self._checkable():
            return
        window = timedelta(seconds=r.per)
        times = self._starts[key]
        most, end = _fullest(times, window)
        if most > r.limit and end is not None:
            inside = sorted(t for t in times if end - window < t <= end)
            self.violation(
                f"rate limit {r.limit} per {r.per} s passed in partition {key}: "
                f"{most} starts in the {window.total_seconds()} s up to {end}: {inside}"
            )
            self._starts[key] = []  # reported once
        elif most == r.limit:
            self.features["a rate window was full"] += 1


# ------------------------------------------------------------------------ strategies


def plan_limits(*, postgres: bool = False, always: bool = False) -> Any:
    """A strategy of a simulation plan's limits (global and/or rate, or none unless
    ``always``; ``per`` in plan units): small limits, partitioned by kind and/or the
    customer arg or not. On PostgreSQL the windows are longer (a unit is 20 ms there),
    so that jobs start at a rate the test can wait for, in windows longer than a fetch."""
    from hypothesis import strategies as st

    by_args = st.sampled_from([(), (PARTITION_FIELD,)])
    global_limit = st.builds(GlobalLimit, st.integers(1, 3), st.booleans(), by_args)
    pers = [10.0, 25.0] if postgres else [0.5, 2.0, 5.0, 10.0]
    rate_limit = st.builds(
        RateLimit,
        st.integers(2, 3) if postgres else st.integers(1, 3),
        st.sampled_from(pers),
        st.booleans(),
        by_args,
    )
    some = [
        st.builds(QueueLimits, global_limit, st.none()),
        st.builds(QueueLimits, st.none(), rate_limit),
        st.builds(QueueLimits, global_limit, rate_limit),
    ]
    return st.one_of(some if always else [st.none(), *some])


# ------------------------------------------------------- the differential test's steps

DIFF_ARGS = (
    '{"c": 1}',
    '{"c": 1}',
    '{"c": 1.0}',
    '{"c": 2}',
    '{"c": "x"}',
    '{"c": null}',
    '{"c": 2.5}',
    '{"c": 2.50, "d": 1}',
    '{"c": {"y": 1, "x": [1]}}',
    '{"c": 1, "d": true}',
    '{"d": 1}',
    "{}",
)
"""Args with few distinct partitions (by ``c`` and ``d``): a field missing, null, numbers
written two ways, an object. (Numbers that Python's json never writes, which the drivers
partition apart, are left out: see docs/flow-control.md.)"""


@attrs.frozen
class UseLimits:
    """The limits a differential plan works each of its queues with (in order), then
    optionally spare ones (see `Reconfigure`)."""

    limits: tuple[QueueLimits, ...]


@attrs.frozen
class Reconfigure:
    """The clients of ``queue`` are configured with other limits (the plan's spare ones,
    its last `UseLimits`; the queue's go spare), and one of them announces them."""

    queue: str


@attrs.frozen
class FetchLimited:
    """``job_get_available_limited`` of ``queue`` with the limits it is worked with."""

    queue: str
    limit: int
    client: str = "c1"


def diff_limits() -> Any:
    """A strategy of one QueueLimits for the differential test."""
    from hypothesis import strategies as st

    by_args = st.sampled_from([(), ("c",), ("c", "d")])
    global_limit = st.builds(GlobalLimit, st.integers(1, 3), st.booleans(), by_args)
    rate_limit = st.builds(
        RateLimit, st.integers(1, 3), st.sampled_from([0.5, 1.0, 5.0, 60.0]), st.booleans(), by_args
    )
    return st.one_of(
        st.builds(QueueLimits, global_limit, st.none()),
        st.builds(QueueLimits, st.none(), rate_limit),
        st.builds(QueueLimits, global_limit, rate_limit),
    )


def queue_rows(rows: Sequence[Any]) -> list[Any]:
    """`queue_list` rows to compare across drivers, as tuples. The partitions come in
    the same order from both: by running jobs, then held-back ones, then by the canonical
    text of the partition (PostgreSQL reads more rows than it shows and breaks ties as the
    memory driver does)."""
    return [tuple(row) for row in rows]

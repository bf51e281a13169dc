"""Flow control: limits every client working a queue enforces together.

`GlobalLimit` bounds how many jobs of a queue run at once across all clients, and
`RateLimit` how many start in any sliding window of time. Either may be partitioned: per
job kind (``by_kind``) and/or per distinct values of named top-level args fields
(``by_args``); a partition that is full holds back its own jobs only.

The limits are enforced inside the fetch (docs/decisions/0003-flow-control-in-the-fetch.md),
against the state every client shares in the database. Both drivers compute a job's
partition the same way: `partition_of`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, final

import attrs

from .errors import ValidationError

__all__ = [
    "MAX_LIMIT",
    "GlobalLimit",
    "LimitedFetch",
    "PartitionInfo",
    "QueueLimits",
    "RateLimit",
    "canonical",
    "partition_of",
]

MAX_LIMIT = 1_000_000
"""The largest ``limit`` either kind of limit takes."""
MAX_PER = 366 * 24 * 3600.0
"""The longest rate window, in seconds: a year."""
MAX_FIELDS = 8
"""How many args fields a partition may be made of."""


def _limit(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise ValidationError(field, f"must be an integer from 1 to {MAX_LIMIT:,}")
    return value


def _by_args(field: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable):
        raise ValidationError(field, "must be a tuple of args field names, like ('customer',)")
    names = tuple(value)
    if len(names) > MAX_FIELDS:
        raise ValidationError(field, f"may name at most {MAX_FIELDS} args fields")
    for name in names:
        if not isinstance(name, str) or not name.isidentifier() or not name.isascii():
            raise ValidationError(
                field, f"{name!r} is not an args field name (an ASCII Python identifier)"
            )
    if len(set(names)) != len(names):
        raise ValidationError(field, "names an args field twice")
    return names


def _by_kind(field: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValidationError(field, "must be True or False")
    return value


@final
@attrs.frozen
class GlobalLimit:
    """At most ``limit`` jobs of the queue are ``running`` at once, across every client.

    With ``by_kind`` and/or ``by_args`` (names of top-level args fields), the limit holds
    per partition: per distinct kind and/or per distinct values of those fields. A job
    whose args lack a field is in the partition where that field is ``None``.
    """

    limit: int
    by_kind: bool = False
    by_args: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        _limit("GlobalLimit.limit", self.limit)
        _by_kind("GlobalLimit.by_kind", self.by_kind)
        object.__setattr__(self, "by_args", _by_args("GlobalLimit.by_args", self.by_args))


@final
@attrs.frozen
class RateLimit:
    """At most ``limit`` jobs of the queue start in any window of ``per`` seconds, across
    every client; partitioned like `GlobalLimit`.

    A start is a claim of the job for a run (retries and rescued jobs start again). The
    window is measured with each client's clock, so the clients' clocks should agree
    (NTP keeps them within milliseconds).
    """

    limit: int
    per: float
    by_kind: bool = False
    by_args: tuple[str, ...] = ()

    def __attrs_post_init__(self) -> None:
        _limit("RateLimit.limit", self.limit)
        per = self.per
        if (
            isinstance(per, bool)
            or not isinstance(per, int | float)
            or not math.isfinite(per)
            or not 0 < per <= MAX_PER
        ):
            raise ValidationError(
                "RateLimit.per", f"must be a number of seconds above 0 and at most {MAX_PER:g}"
            )
        object.__setattr__(self, "per", float(per))
        _by_kind("RateLimit.by_kind", self.by_kind)
        object.__setattr__(self, "by_args", _by_args("RateLimit.by_args", self.by_args))


def partition_of(by_kind: bool, by_args: tuple[str, ...], kind: str, args: object) -> str:
    """The partition a job is in, as the JSON text both drivers key it by.

    An object of the partitioning values: ``{"kind": ...}`` with ``by_kind``, then each
    ``by_args`` field as ``{"args.<field>": value}`` (None when the args lack it). The
    text is canonical: keys sorted, no spaces, numbers without a fractional zero, so equal
    partitions have equal text.
    """
    key: dict[str, Any] = {}
    if by_kind:
        key["kind"] = kind
    if by_args:
        fields = args if isinstance(args, Mapping) else {}
        for name in by_args:
            value = fields.get(name)
            if isinstance(value, float) and value.is_integer():
                value = int(value)  # 1 and 1.0 are equal as JSON: one partition
            key["args." + name] = value
    return canonical(key)


def canonical(partition: Mapping[str, Any]) -> str:
    """A partition's canonical JSON text: keys sorted, no spaces."""
    return json.dumps(partition, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@final
@attrs.frozen
class QueueLimits:
    """The limits of one queue, as clients store them in its queue row and as the fetch
    takes them. At least one of the two is set."""

    global_limit: GlobalLimit | None = None
    rate_limit: RateLimit | None = None

    @property
    def key_by(self) -> tuple[bool, tuple[str, ...]]:
        """What a job's partition key (``limit_key``) is made of: the kind if either limit
        partitions by it, and every args field either partitions by, in name order (the
        order ``tq_limit_key_of`` and ``tq_limit_project`` write them in)."""
        limits = [x for x in (self.global_limit, self.rate_limit) if x is not None]
        fields = {name for x in limits for name in x.by_args}
        return any(x.by_kind for x in limits), tuple(sorted(fields))

    def to_json(self) -> str:
        by_kind, by_args = self.key_by
        out: dict[str, Any] = {"key": {"by_kind": by_kind, "by_args": list(by_args)}}
        if (g := self.global_limit) is not None:
            out["global"] = {"limit": g.limit, "by_kind": g.by_kind, "by_args": list(g.by_args)}
        if (r := self.rate_limit) is not None:
            out["rate"] = {
                "limit": r.limit,
                "per": r.per,
                "by_kind": r.by_kind,
                "by_args": list(r.by_args),
            }
        return json.dumps(out, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, value: object) -> QueueLimits | None:
        """The limits stored in a queue row, or None for none (or a row this version
        cannot read: an older or newer client's shape is shown as no limits)."""
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, Mapping):
            return None
        try:
            g = value.get("global")
            r = value.get("rate")
            found = cls(
                GlobalLimit(g["limit"], g["by_kind"], tuple(g["by_args"])) if g else None,
                RateLimit(r["limit"], r["per"], r["by_kind"], tuple(r["by_args"])) if r else None,
            )
        except (KeyError, TypeError, ValidationError):
            return None
        if found.global_limit is None and found.rate_limit is None:
            return None
        return found


@final
@attrs.frozen
class PartitionInfo:
    """One partition of a limited queue, from `QueueInfo.partitions`."""

    partition: dict[str, Any]
    """The partitioning values: ``{"kind": ...}`` and/or ``{"args.<field>": ...}``; empty
    for a limit that is not partitioned."""
    running: int
    """Jobs of the partition running now (the global limit's partitions)."""
    held_back: int
    """Due jobs of the partition that the limits hold back now."""


@final
@attrs.frozen
class LimitedFetch:
    """What a fetch of a limited queue claimed, and whether the limits held jobs back."""

    rows: list[Any]
    """The claimed jobs, as `job_get_available` returns them."""
    held_back: bool
    """Due jobs were left unclaimed because a limit was reached."""
    next_open: datetime | None
    """When a rate window next lets a held-back job start (None: not known, as when only
    the global limit holds jobs back, which frees as jobs end)."""

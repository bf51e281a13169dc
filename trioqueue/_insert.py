"""Turning what an application inserts into the rows a driver writes.

`InsertBuilder` validates an insert item (an args object, or an ``(args, opts)`` pair),
resolves its kind and options and encodes it as the `JobInsertParams` a driver inserts.
The client builds every insert with it, and the periodic enqueuer builds each run's job
with the client's own builder, so both check kinds and apply defaults alike. It sits
below the client and the maintenance services and imports neither.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, final

from ._codec import (
    encode_args,
    encode_metadata,
    sorted_args_json,
    unique_key,
    unique_states_bits,
)
from .driver.protocol import JobInsertParams
from .errors import UnknownJobKindError, ValidationError
from .job import InsertOpts, JobState
from .middleware import InsertParams
from .workers import Workers, args_kind

__all__ = ["InsertBuilder", "InsertItem"]

InsertItem = Any
"""An args object, or an ``(args, InsertOpts | None)`` pair."""

_DEFAULT_OPTS = InsertOpts()


@final
class InsertBuilder:
    """Validates insert items and builds their `JobInsertParams`.

    ``workers``: when it holds any worker, a kind none of them has is refused with
    UnknownJobKindError (a client without workers inserts any kind). ``max_attempts``:
    the attempts of a job whose opts leave them unset. Every method is pure apart from
    caching what it learnt about an args type; none does I/O.
    """

    __slots__ = ("_kinds", "_max_attempts", "_own_opts", "_workers")

    def __init__(self, workers: Workers | None, *, max_attempts: int) -> None:
        self._workers = workers
        self._max_attempts = max_attempts
        self._kinds: dict[type[Any], str] = {}
        """Args types already checked, with their kind: the insert path's cache."""
        self._own_opts: dict[type[Any], bool] = {}
        """Whether an args type has ``insert_opts`` (most have not)."""

    @staticmethod
    def check_items(items: object) -> None:
        """Raise ValidationError unless ``items`` is a non-empty sequence (of items)."""
        if isinstance(items, str | bytes) or not isinstance(items, Sequence):
            raise ValidationError("jobs", "must be a list of args or (args, opts) pairs")
        if not items:
            raise ValidationError("jobs", "insert_many needs at least one job")

    def split(self, item: InsertItem) -> tuple[Any, str, InsertOpts]:
        """An insert item's args, kind (checked) and opts (defaulted)."""
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ValidationError("jobs", "each item must be args or an (args, opts) pair")
            args, opts = item
        else:
            args, opts = item, None
        args_type = type(args)
        kind = self._kinds.get(args_type)
        if kind is None:
            kind = args_kind(args_type)
            if self._workers is not None and len(self._workers) and not self._workers.get(kind):
                raise UnknownJobKindError(kind)
            self._kinds[args_type] = kind
        if opts is None:
            # Most args types have no insert_opts: remember that per type.
            has_own = self._own_opts.get(args_type)
            if has_own is None:
                has_own = self._own_opts[args_type] = hasattr(args_type, "insert_opts")
            own = getattr(args, "insert_opts", None) if has_own else None
            opts = own() if callable(own) else _DEFAULT_OPTS
        if not isinstance(opts, InsertOpts):
            raise ValidationError("opts", "must be an InsertOpts")
        return args, kind, opts

    def params(self, item: InsertItem, now: datetime) -> JobInsertParams:
        """The validated, encoded insert params of one item, as inserted at ``now``.

        Raises ValidationError (UnknownJobKindError for a kind without a worker).
        """
        args, kind, opts = self.split(item)
        args_json = encode_args(args)
        metadata_json = encode_metadata(opts.metadata) if opts.metadata else "{}"
        scheduled_at = opts.scheduled_at.astimezone(UTC) if opts.scheduled_at else now
        if opts.pending:
            state = JobState.PENDING
        elif scheduled_at > now:
            state = JobState.SCHEDULED
        else:
            state = JobState.AVAILABLE
        key = states = None
        if opts.unique is not None:
            sorted_json = sorted_args_json(args) if opts.unique.by_args else None
            key = unique_key(kind, sorted_json, opts, opts.unique, now)
            states = unique_states_bits(opts.unique.states)
        return JobInsertParams(
            args_json=args_json,
            kind=kind,
            max_attempts=opts.max_attempts or self._max_attempts,
            metadata_json=metadata_json,
            priority=opts.priority,
            queue=opts.queue,
            scheduled_at=scheduled_at,
            state=state,
            tags=tuple(opts.tags),
            unique_key=key,
            unique_states=states,
        )

    def params_many(
        self, items: Iterable[InsertItem], now: datetime, noted: list[Any] | None = None
    ) -> Iterator[JobInsertParams]:
        """`params` of each item, lazily. An item whose args type and opts object (the
        same object, or none) an earlier item had gets that item's fields with its own
        args: the other fields depend on nothing else, unless a unique key (it may hash
        the args) or the args type's own ``insert_opts`` is involved, which are never
        shared. Saves most of the per-job work of a big batch. Each item's args object is
        appended to ``noted`` (if given) as it is read: a sequence may build its items
        as they are read, so they are read once."""
        # Keyed by id(opts), holding opts itself: a sequence may build its items as they
        # are read, and an id is only unique while its object lives.
        shared: dict[tuple[type[Any], int], tuple[object, tuple[Any, ...]]] = {}
        make = JobInsertParams._make
        for item in items:
            if isinstance(item, tuple):
                if len(item) != 2:
                    yield self.params(item, now)  # raises
                    continue
                args, opts = item
            else:
                args, opts = item, None
            if noted is not None:
                noted.append(args)
            key = (type(args), id(opts))
            entry = shared.get(key)
            if entry is not None and entry[0] is opts:
                yield make((encode_args(args), *entry[1]))
                continue
            p = self.params(item, now)
            if p.unique_key is None and (opts is not None or not self._own_opts[key[0]]):
                shared[key] = (opts, p[1:])
            yield p

    def middleware_params(self, items: Sequence[InsertItem], now: datetime) -> list[InsertParams]:
        """What insert middleware is handed for ``items``: each item checked (its kind
        too) and its opts' defaults applied, nothing encoded yet."""
        first: list[InsertParams] = []
        for item in items:
            args, _, opts = self.split(item)
            first.append(
                InsertParams(
                    args=args,
                    queue=opts.queue,
                    priority=opts.priority,
                    max_attempts=opts.max_attempts or self._max_attempts,
                    scheduled_at=opts.scheduled_at.astimezone(UTC) if opts.scheduled_at else now,
                    tags=opts.tags,
                    metadata=dict(opts.metadata or {}),
                    pending=opts.pending,
                    unique=opts.unique,
                )
            )
        return first

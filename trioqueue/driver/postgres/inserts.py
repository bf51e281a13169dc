"""Jobs to insert, encoded for the server: as the parallel arrays of the ``job_insert_many``
statement, or as COPY text for ``job_insert_fast``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final

from ..protocol import JobInsertParams
from .arrays import bytea_array, int8_array, text_array, timestamptz_array
from .queries import QUERIES

if TYPE_CHECKING:
    from .connection import PgConnection

__all__ = ["COPY_QUERY", "copy_jobs", "copy_text_chunks", "insert_arrays"]

KEYED_BATCH: Final = 5000
"""Jobs per INSERT when `copy_jobs` inserts jobs of limited queues."""

_INSERT_COLUMNS: Final = (
    "args, kind, max_attempts, metadata, priority, queue, scheduled_at, state, tags, "
    "unique_key, unique_states, created_at"
)
COPY_QUERY: Final = f"COPY tq_job ({_INSERT_COLUMNS}) FROM STDIN"
"""The COPY that `copy_text_chunks` feeds."""


def insert_arrays(params: Sequence[JobInsertParams]) -> list[Any]:
    """The columns of ``params`` as the parameters $1 to $11 of ``job_insert_many``: binary
    arrays (see arrays.py); the smallint columns go as bigint[] and are cast."""
    return [
        text_array([p.args_json for p in params]),
        text_array([p.kind for p in params]),
        int8_array([p.max_attempts for p in params]),
        text_array([p.metadata_json for p in params]),
        int8_array([p.priority for p in params]),
        text_array([p.queue for p in params]),
        timestamptz_array([p.scheduled_at for p in params]),
        text_array([p.state.value for p in params]),
        text_array([",".join(p.tags) for p in params]),
        bytea_array([p.unique_key for p in params]),
        text_array([p.unique_states for p in params]),
    ]


def _copy_text(value: str) -> str:
    """Escape a value for COPY's text format. Our values never hold raw tabs, newlines or
    carriage returns (JSON escapes them; names and tags are validated), only backslashes."""
    return value.replace("\\", "\\\\") if "\\" in value else value


def _copy_text_array(values: Sequence[str]) -> str:
    """A text[] literal for COPY's text format. Every element is quoted: unquoted, a tag
    spelled ``null`` (any case) would be read as a NULL element."""
    if not values:
        return "{}"
    quoted = ('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
    return _copy_text("{" + ",".join(quoted) + "}")


_COPY_CHUNK_ROWS = 100
"""Small enough that a call of a thousand jobs streams in several chunks, each ingested by
the server while the next is prepared (100 beat 50, 250 and 500 here: ~81k against ~76k
jobs/s for 1,000-job calls, medians of alternating runs)."""


def copy_text_chunks(params: Iterable[JobInsertParams], now: datetime) -> Iterator[bytes]:
    """The rows of ``params`` in COPY text format (the columns of `COPY_QUERY`),
    ``_COPY_CHUNK_ROWS`` rows to a chunk, read from ``params`` only as each chunk is
    needed. Formatting by hand is several times faster than a generic row formatter,
    which matters for ``insert_many_fast``; and the columns after ``args`` are formatted
    again only when they differ from the previous row's (in a batch they seldom do)."""
    created = now.isoformat()
    lines: list[str] = []
    last: tuple[Any, ...] | None = None
    tail = ""
    for p in params:
        rest = p[1:]
        if rest != last:
            last = rest
            tail = "\t" + "\t".join(
                (
                    p.kind,
                    str(int(p.max_attempts)),  # int(): an int enum's str() is its name
                    _copy_text(p.metadata_json),
                    str(int(p.priority)),
                    p.queue,
                    created if p.scheduled_at is now else p.scheduled_at.isoformat(),
                    p.state.value,
                    _copy_text_array(p.tags),
                    "\\\\x" + p.unique_key.hex() if p.unique_key is not None else "\\N",
                    p.unique_states if p.unique_states is not None else "\\N",
                    created,
                )
            )
        lines.append(_copy_text(p.args_json) + tail)
        if len(lines) >= _COPY_CHUNK_ROWS:
            yield ("\n".join(lines) + "\n").encode()
            lines = []
    if lines:
        yield ("\n".join(lines) + "\n").encode()


async def copy_jobs(
    conn: PgConnection,
    params: Iterable[JobInsertParams],
    notify_queues: Sequence[str] | Callable[[], Sequence[str]],
    now: datetime,
) -> int:
    """Insert ``params`` on ``conn`` (in its transaction) with COPY; return how many.

    COPY computes nothing, so the jobs of queues with limits, which need their partition
    key (migration 004), go in by INSERT after the COPY, in batches of `KEYED_BATCH`.
    The rows are formatted chunk by chunk as the COPY sends them, so the server ingests a
    chunk while the next is prepared; an exception from ``params`` aborts the COPY (and
    with it the transaction).
    """
    limited = {str(n) for (n,) in await conn.fetch(QUERIES["queue_limited"], [])}
    diverted: list[JobInsertParams] = []

    def unlimited(params: Iterable[JobInsertParams]) -> Iterable[JobInsertParams]:
        for p in params:
            if p.queue in limited:
                diverted.append(p)
            else:
                yield p

    chunks = copy_text_chunks(unlimited(params) if limited else params, now)
    count = await conn.copy_in_data(COPY_QUERY, chunks)
    for at in range(0, len(diverted), KEYED_BATCH):
        batch = diverted[at : at + KEYED_BATCH]
        await conn.execute(QUERIES["job_insert_many_keyed"], [*insert_arrays(batch), now])
        count += len(batch)
    queues = notify_queues() if callable(notify_queues) else notify_queues
    if queues:
        await conn.execute(QUERIES["job_notify_insert"], [list(queues)])
    return count

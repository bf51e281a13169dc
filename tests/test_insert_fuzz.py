"""A hypothesis fuzz of the insert API: every insert either round-trips exactly or raises
ValidationError with nothing written (issue 13, item 5).

Generated: args (an attrs class whose fields hold arbitrary JSON-ish values: text with NUL
and lone surrogates, ints past int64 and past 4300 digits, floats with NaN, ±Infinity,
-0.0 and subnormals, nested lists and dicts with keys of any type, deep and circular
values) and ``InsertOpts`` (queues, tags, priorities, max_attempts, extreme aware
scheduled times, metadata like args, unique options). Run on every insert path and on
both drivers. The invariant, per call:

- it raises ValidationError, the job count is unchanged, and the rules of
  ``trioqueue._validate`` (restated independently in ``_storable`` below) say some
  value of the call cannot be stored; or
- it succeeds, the rules say every value can be stored, and each job read back has
  equal args, metadata (minus the keys trioqueue adds: none at insert), queue, tags,
  priority, max_attempts and scheduled_at (to the microsecond).

Numbers: jsonb keeps numbers as ``numeric``, so a float that prints with an exponent of
16 or more (``1e+16``, ``1e+300``) reads back as the int its text names: ``1e300``
comes back as ``10**300``, equal to ``int(Decimal(repr(x)))`` rather than to the float
itself (documented in docs/operations.md); ``-0.0`` reads back as ``0``.

Profiles (``$TRIOQUEUE_SOAK``, applied per test as in test_simulation.py): the default
runs 200 examples per path on the memory driver and 150 per path on PostgreSQL
(about 15 and 30 seconds in all); ``TRIOQUEUE_SOAK=1`` runs 10,000 and 2,000.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, ClassVar

import attrs
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import LONG, SOAK

import trioqueue as tq

_common: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # one database for every example, emptied
    ],
    "print_blob": True,
}
settings.register_profile("trioqueue-fuzz-memory", max_examples=200, **_common)
settings.register_profile("trioqueue-fuzz-memory-soak", max_examples=10_000, **_common)
settings.register_profile("trioqueue-fuzz-postgres", max_examples=150, **_common)
settings.register_profile("trioqueue-fuzz-postgres-soak", max_examples=2_000, **_common)
MEMORY = settings.get_profile("trioqueue-fuzz-memory-soak" if SOAK else "trioqueue-fuzz-memory")
POSTGRES = settings.get_profile(
    "trioqueue-fuzz-postgres-soak" if SOAK else "trioqueue-fuzz-postgres"
)

MAX_DEPTH = 100
INT_TEXT_LIMIT = 10**4300  # sys.get_int_max_str_digits(): ints from here on have no text
RESERVED = frozenset({"cancel_attempted_at", "rescue_count", "snoozes"})


@attrs.frozen
class Fuzz:
    kind: ClassVar[str] = "fuzz"
    a: Any = None
    b: Any = None
    c: Any = None


# ------------------------------------------------------------------ strategies
# Each has a clean variant (values that can all be stored) and a hostile one (anything);
# an example draws whether it is hostile, so that both stored and refused inserts are
# common (see the "inserted" and "refused" events in --hypothesis-show-statistics).

_edge_chars = st.sampled_from(
    ["\x00", "\udc80", "\ud800", "\\", "u", "0", "\n", "\t", "\x1f", "é", "\U0001f600", "a"]
)
clean_texts = st.one_of(
    st.text(st.characters(exclude_characters="\x00"), max_size=8),
    st.text(
        st.sampled_from(["\\", "u", "0", "\n", "\t", "\x1f", "é", "\U0001f600", "a"]), max_size=8
    ),
    st.just("\\u0000"),  # six characters: the NUL escape's text, but no NUL
)
hostile_texts = st.one_of(
    clean_texts,
    st.text(_edge_chars, max_size=8),
    st.text(st.characters(exclude_categories=()), max_size=8),  # NUL and surrogates too
)
clean_ints = st.one_of(
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1]),
    st.builds(lambda sign: sign * 10**4299, st.sampled_from([1, -1])),  # 4300 digits
)
hostile_ints = st.one_of(
    clean_ints,
    st.builds(lambda k, sign: sign * 10**k, st.integers(4295, 4305), st.sampled_from([1, -1])),
)
clean_floats = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),  # -0.0 and subnormals included
    st.sampled_from([-0.0, 5e-324, 1e300, 1e16, 1.5, 1e23, 1.7976931348623157e308]),
)
hostile_floats = st.one_of(clean_floats, st.floats(), st.sampled_from([math.nan, -math.inf]))


def _nest(value: Any, levels: int) -> Any:
    for _ in range(levels):
        value = [value]
    return value


def _circular(kind: str) -> Any:
    if kind == "list":
        cycle: list[Any] = [1]
        cycle.append(cycle)
        return cycle
    loop: dict[str, Any] = {"k": 1}
    loop["self"] = {"again": loop}
    return loop


def json_strategies(hostile: bool) -> tuple[Any, Any]:
    """(scalars, values) strategies, clean or hostile."""
    texts = hostile_texts if hostile else clean_texts
    scalars = st.one_of(
        texts,
        hostile_ints if hostile else clean_ints,
        hostile_floats if hostile else clean_floats,
        st.booleans(),
        st.none(),
    )
    keys = (
        st.one_of(texts, texts, st.integers(-3, 3), st.none(), st.booleans(), st.floats())
        if hostile
        else texts
    )
    nested = st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.tuples(children, children),
            st.dictionaries(keys, children, max_size=4),
        ),
        max_leaves=12,
    )
    deep = st.builds(_nest, scalars, st.integers(90, 98))  # within the limit of 100
    if hostile:
        deep = st.one_of(
            st.builds(_nest, scalars, st.integers(95, 102)),  # around the limit
            st.builds(_nest, scalars, st.sampled_from([1_000, 5_000])),  # RecursionError land
            st.builds(_circular, st.sampled_from(["list", "dict"])),
        )
    return scalars, st.one_of(scalars, scalars, nested, deep)


CLEAN_SCALARS, CLEAN_VALUES = json_strategies(hostile=False)
HOSTILE_SCALARS, HOSTILE_VALUES = json_strategies(hostile=True)

clean_queues = st.one_of(
    st.sampled_from(["default", "q1", "a-b", "a_b"]),
    st.from_regex(r"[a-z0-9]{1,8}(_[a-z0-9]{1,4})?", fullmatch=True),
)
hostile_queues = st.one_of(
    clean_queues,
    st.sampled_from(["default\n", "", "A", "q" * 65, "a\x00", "a--b", "\udc80"]),
    st.text(max_size=6),
)
clean_tags = st.one_of(
    st.sampled_from(["urgent", "null", "NULL", "a-b", "x_y", "t1", "ünï"]),
    st.from_regex(r"\w[\w\-]{0,6}\w", fullmatch=True),
)
hostile_tags = st.one_of(
    clean_tags,
    st.sampled_from(["urgent\n", "a", "-ab", "a\x00b", "ab\udc80", "t" * 256, "a,b", 'a"b']),
    st.text(max_size=6),
)
offsets = st.builds(
    lambda minutes: timezone(timedelta(minutes=minutes)), st.integers(-23 * 60 - 59, 23 * 60 + 59)
)
clean_scheduled = st.one_of(
    st.none(),
    st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30), timezones=offsets),
    st.sampled_from([datetime.min, datetime.max]).map(lambda at: at.replace(tzinfo=UTC)),
)
hostile_scheduled = st.one_of(
    clean_scheduled,
    st.builds(
        lambda edge, tz: edge.replace(tzinfo=tz),
        st.sampled_from([datetime.min, datetime.max]),
        offsets,
    ),
    st.datetimes(),  # naive: refused
)


def metadata(hostile: bool) -> Any:
    texts = hostile_texts if hostile else clean_texts
    values = HOSTILE_VALUES if hostile else CLEAN_VALUES
    found = st.one_of(st.none(), st.dictionaries(texts, values, max_size=3))
    if hostile:
        keys = st.one_of(st.sampled_from(sorted(RESERVED)), st.integers(-2, 2), texts)
        found = st.one_of(found, st.dictionaries(keys, HOSTILE_SCALARS, max_size=2))
    return found


def uniques(hostile: bool) -> Any:
    period = st.one_of(
        st.none(), st.integers(1, 10**12), st.floats(min_value=1, allow_infinity=False)
    )
    if hostile:
        period = st.one_of(period, st.sampled_from([math.nan, math.inf, 0.5]))
    return st.one_of(
        st.none(),
        st.builds(tq.UniqueOpts, by_args=st.booleans(), by_period=period, by_queue=st.booleans()),
    )


@st.composite
def opts_or_refusal(draw: st.DrawFn, *, unique: bool) -> tq.InsertOpts | None:
    """InsertOpts, or None where the drawn values make InsertOpts itself refuse them
    (a ValidationError at construction: nothing can have been written)."""
    # False first: the shrink target (hypothesis also draws small integers more often
    # than others, so integers would not give these odds).
    hostile = draw(st.sampled_from([False] * 9 + [True]))
    try:
        return tq.InsertOpts(
            queue=draw(hostile_queues if hostile else clean_queues),
            priority=draw(
                st.one_of(st.integers(-1, 6), st.just(True)) if hostile else st.integers(1, 4)
            ),
            max_attempts=draw(
                st.one_of(st.none(), st.integers(-2, 40_000))
                if hostile
                else st.one_of(st.none(), st.integers(1, 32767))
            ),
            scheduled_at=draw(hostile_scheduled if hostile else clean_scheduled),
            tags=draw(st.lists(hostile_tags if hostile else clean_tags, max_size=3)),
            metadata=draw(metadata(draw(st.sampled_from([False] * 3 + [True])))),
            pending=draw(st.booleans()),
            unique=draw(uniques(hostile)) if unique else None,
        )
    except tq.ValidationError as exc:
        event(f"InsertOpts refused at construction: {exc.field}")
        return None


@st.composite
def args_values(draw: st.DrawFn) -> Fuzz:
    kind = draw(st.sampled_from(["flat", "clean", "hostile flat", "hostile"]))
    values = {
        "flat": CLEAN_SCALARS,
        "clean": CLEAN_VALUES,
        "hostile flat": HOSTILE_SCALARS,
        "hostile": HOSTILE_VALUES,
    }[kind]
    return Fuzz(draw(values), draw(values), draw(values))


@st.composite
def batches(draw: st.DrawFn, *, many: bool) -> list[tuple[Fuzz, tq.InsertOpts]] | None:
    """One to three jobs (one for the single-insert paths); only the first may be
    unique, so a batch never collides with itself. None: InsertOpts refused."""
    size = draw(st.integers(1, 3)) if many else 1
    out = []
    for i in range(size):
        opts = draw(opts_or_refusal(unique=i == 0))
        if opts is None:
            return None
        out.append((draw(args_values()), opts))
    return out


# ------------------------------------------------------------------ the rules, restated


def _storable(value: Any, depth: int, path: frozenset[int]) -> bool:
    """Whether jsonb stores ``value`` (at nesting level ``depth``) as it is."""
    if isinstance(value, str):
        return "\x00" not in value and not any("\ud800" <= ch <= "\udfff" for ch in value)
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return abs(value) < INT_TEXT_LIMIT
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list | tuple | dict):
        if depth > MAX_DEPTH or id(value) in path:
            return False
        inner = path | {id(value)}
        if isinstance(value, dict):
            return all(
                isinstance(k, str) and _storable(k, depth, inner) and _storable(v, depth + 1, inner)
                for k, v in value.items()
            )
        return all(_storable(v, depth + 1, inner) for v in value)
    return False


def storable(args: Fuzz, opts: tq.InsertOpts) -> bool:
    fields = {"a": args.a, "b": args.b, "c": args.c}
    if not _storable(fields, 1, frozenset()):
        return False
    meta = dict(opts.metadata or {})
    return RESERVED.isdisjoint(meta) and _storable(meta, 1, frozenset())


def same(expected: Any, got: Any) -> bool:
    """``got`` is ``expected`` read back from jsonb: tuples are lists, and a float that
    prints with an exponent of 16 or more is the int its text names."""
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(expected) is type(got) and expected == got
    if isinstance(expected, float):
        if isinstance(got, int):
            return abs(expected) >= 1e16 and got == int(Decimal(repr(expected)))
        return isinstance(got, float) and got == expected
    if isinstance(expected, int | str | None):
        return type(got) is type(expected) and got == expected
    if isinstance(expected, list | tuple):
        return (
            isinstance(got, list)
            and len(got) == len(expected)
            and all(same(e, g) for e, g in zip(expected, got, strict=True))
        )
    if isinstance(expected, dict):
        return (
            isinstance(got, dict)
            and got.keys() == expected.keys()
            and all(same(v, got[k]) for k, v in expected.items())
        )
    return False


def check_job(job: tq.Job[Any], args: Fuzz, opts: tq.InsertOpts) -> None:
    expected = {"a": args.a, "b": args.b, "c": args.c}
    assert same(expected, job.args), (expected, job.args)
    assert same(dict(opts.metadata or {}), job.metadata), (opts.metadata, job.metadata)
    assert job.kind == "fuzz"
    assert job.queue == opts.queue
    assert job.tags == list(opts.tags)
    assert job.priority == opts.priority
    assert job.max_attempts == (opts.max_attempts or 25)
    if opts.scheduled_at is not None:
        assert job.scheduled_at == opts.scheduled_at  # the same instant, to the microsecond


# ------------------------------------------------------------------ one example


async def _count(client: tq.Client) -> int:
    return len((await client.job_list(tq.JobListParams(limit=10_000))).jobs)


Path = Callable[[tq.Client, list[tuple[Fuzz, tq.InsertOpts]]], Awaitable[list[int] | None]]


async def _ids(results: Sequence[tq.JobInsertResult[Any]]) -> list[int]:
    return [r.job.id for r in results]


async def _insert(client: tq.Client, items: list[tuple[Fuzz, tq.InsertOpts]]) -> list[int] | None:
    [(args, opts)] = items
    return [(await client.insert(args, opts)).job.id]


async def _insert_tx(
    client: tq.Client, items: list[tuple[Fuzz, tq.InsertOpts]]
) -> list[int] | None:
    [(args, opts)] = items
    async with client.transaction() as tx:
        return [(await client.insert_tx(tx, args, opts)).job.id]


async def _insert_many(
    client: tq.Client, items: list[tuple[Fuzz, tq.InsertOpts]]
) -> list[int] | None:
    return await _ids(await client.insert_many(items))


async def _insert_many_tx(
    client: tq.Client, items: list[tuple[Fuzz, tq.InsertOpts]]
) -> list[int] | None:
    async with client.transaction() as tx:
        return await _ids(await client.insert_many_tx(tx, items))


async def _insert_many_fast(
    client: tq.Client, items: list[tuple[Fuzz, tq.InsertOpts]]
) -> list[int] | None:
    assert await client.insert_many_fast(items) == len(items)
    return None


async def _insert_many_fast_tx(
    client: tq.Client, items: list[tuple[Fuzz, tq.InsertOpts]]
) -> list[int] | None:
    async with client.transaction() as tx:
        assert await client.insert_many_fast_tx(tx, items) == len(items)
    return None


PATHS: dict[str, Path] = {
    "insert": _insert,
    "insert_tx": _insert_tx,
    "insert_many": _insert_many,
    "insert_many_tx": _insert_many_tx,
    "insert_many_fast": _insert_many_fast,
    "insert_many_fast_tx": _insert_many_fast_tx,
}


async def run_example(
    client: tq.Client, path: str, items: list[tuple[Fuzz, tq.InsertOpts]] | None
) -> None:
    if items is None:
        return  # InsertOpts refused the drawn values
    ok = all(storable(args, opts) for args, opts in items)
    before = await _count(client)
    try:
        ids = await PATHS[path](client, items)
    except tq.ValidationError as exc:
        event(f"refused: {exc.field}")
        assert await _count(client) == before, "a refused insert wrote something"
        assert not ok, f"refused a storable insert: {exc}"
        return
    event("inserted")
    assert ok, "inserted what the rules say cannot be stored"
    if ids is None:  # the fast paths return a count: read the new jobs back in id order
        jobs = (await client.job_list(tq.JobListParams(limit=10_000))).jobs[before:]
    else:
        jobs = [await client.job_get(i) for i in ids]
    assert len(jobs) == len(items)
    for job, (args, opts) in zip(jobs, items, strict=True):
        check_job(job, args, opts)


def _many(path: str) -> bool:
    return path.startswith("insert_many")


# ------------------------------------------------------------------ the tests


@LONG
@pytest.mark.parametrize("path", list(PATHS))
@MEMORY
@given(data=st.data())
def test_insert_fuzz_on_memory(path: str, data: st.DataObject) -> None:
    items = data.draw(batches(many=_many(path)), label="items")

    async def main() -> None:
        async with tq.open_client(driver=tq.MemoryDriver()) as client:
            await run_example(client, path, items)

    trio.run(main)


@LONG
@pytest.mark.parametrize("path", list(PATHS))
@POSTGRES
@given(data=st.data())
def test_insert_fuzz_on_postgres(path: str, database_url: str, data: st.DataObject) -> None:
    items = data.draw(batches(many=_many(path)), label="items")

    async def main() -> None:
        async with tq.open_client(database_url) as client:
            async with client.transaction() as tx:
                await tx.execute("DELETE FROM tq_job")
            await run_example(client, path, items)

    trio.run(main)

"""Recorded output (issue 17): a worker's return value is stored as ``job.output``.

attrs and dataclass instances become objects (nested ones too); None records no output; a
value that cannot be stored (not JSON that jsonb keeps as it is, over 1 MiB as JSON, or a
value whose own code raises as it is read) fails the attempt with the reason recorded,
retried or discarded like any error, with the error handler and the ``work_end`` hooks
called; the other jobs of the same batch complete. Worker middleware sees the worker's
value and what it returns is what is recorded.

Every test that opens a client runs on both drivers (the ``store_url`` fixture). The
generated test at the end runs random storable and hostile return values through a real
client: 100 examples on the memory driver and 30 on PostgreSQL (``TRIOQUEUE_SOAK=1``:
3,000 and 300).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, ClassVar

import attrs
import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import FAST, LONG, SOAK

import trioqueue as tq
import trioqueue.testing as tqt

CAP = 1_048_576
"""The documented cap: bytes of UTF-8 in the compact JSON text of an output."""
REFUSED = "OutputError: the return value cannot be stored as output: "


@attrs.frozen
class Ret:
    """A job whose worker returns ``VALUES[name]()`` (or the test's own table)."""

    kind: ClassVar[str] = "ret"
    name: str
    n: int = 0


@attrs.define
class Point:
    x: int
    y: int


@dataclasses.dataclass
class Box:
    label: str
    points: list[Point]
    meta: Any = None


@attrs.frozen
class Tree:
    name: str
    children: tuple[Tree, ...] = ()


@attrs.define
class Node:
    """Mutable, so that it can be made to hold itself."""

    name: str
    links: list[Any] = attrs.Factory(list)


@attrs.define
class Sneaky:
    """An attrs instance whose field cannot be read."""

    secret: int = 1

    def __getattribute__(self, name: str) -> Any:
        if name == "secret":
            raise RuntimeError("no secret for you")
        return object.__getattribute__(self, name)


@attrs.define
class Quitter:
    """An attrs instance whose field raises ``GeneratorExit`` (a BaseException) as read."""

    field: int = 1

    def __getattribute__(self, name: str) -> Any:
        if name == "field":
            raise GeneratorExit
        return object.__getattribute__(self, name)


@attrs.define
class Interrupter:
    """An attrs instance whose field raises KeyboardInterrupt as it is read."""

    field: int = 1

    def __getattribute__(self, name: str) -> Any:
        if name == "field":
            raise KeyboardInterrupt
        return object.__getattribute__(self, name)


class HostileObject:
    """A return value that refuses everything."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr")

    __str__ = __repr__

    def __bool__(self) -> bool:
        raise RuntimeError("no bool")

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no eq")

    def __hash__(self) -> int:
        raise RuntimeError("no hash")

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"no attribute {name}")


class ReprRaisingKey:
    """A dict key that hashes but whose ``repr()`` raises."""

    def __repr__(self) -> str:
        raise RuntimeError("no repr for this key")


class BadMapping(Mapping[str, int]):
    """A mapping that cannot be iterated."""

    def __getitem__(self, key: str) -> int:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("this mapping cannot be iterated")

    def __len__(self) -> int:
        return 1


class BadList(list[int]):
    def __iter__(self) -> Iterator[int]:
        raise RuntimeError("this list cannot be iterated")


def _nest(value: Any, levels: int) -> Any:
    for _ in range(levels):
        value = [value]
    return value


def _tree(levels: int) -> Tree:
    tree = Tree("leaf")
    for i in range(levels - 1):
        tree = Tree(f"level {i}", (tree,))
    return tree


def _circular_list() -> list[Any]:
    cycle: list[Any] = [1]
    cycle.append(cycle)
    return cycle


def _circular_dict() -> dict[str, Any]:
    loop: dict[str, Any] = {"k": 1}
    loop["self"] = {"again": loop}
    return loop


def _circular_node() -> Node:
    node = Node("a")
    node.links.append({"back": node})
    return node


def _shared_dag(levels: int) -> list[Any]:
    """A list of a few hundred bytes in memory whose JSON text is 2**levels long."""
    value: list[Any] = [0]
    for _ in range(levels):
        value = [value, value]
    return value


STORED: dict[str, tuple[Callable[[], object], Any]] = {
    "dict": (lambda: {"a": 1, "b": [True, None, "x"]}, {"a": 1, "b": [True, None, "x"]}),
    "list": (lambda: [1, "two", 3.5, [], {}], [1, "two", 3.5, [], {}]),
    "tuple": (lambda: (1, (2, "3")), [1, [2, "3"]]),
    "str": (lambda: "héllo ✓ \U0001f600", "héllo ✓ \U0001f600"),
    "empty_str": (lambda: "", ""),
    "int": (lambda: 42, 42),
    "big_int": (lambda: -(10**40), -(10**40)),
    "zero": (lambda: 0, 0),
    "float": (lambda: 2.5, 2.5),
    "true": (lambda: True, True),
    "false": (lambda: False, False),
    "empty_dict": (lambda: {}, {}),
    "attrs": (lambda: Point(1, 2), {"x": 1, "y": 2}),
    "dataclass": (
        lambda: Box("b", [Point(0, 1)], meta={"k": (Point(2, 3),)}),
        {"label": "b", "points": [{"x": 0, "y": 1}], "meta": {"k": [{"x": 2, "y": 3}]}},
    ),
    "nested_attrs": (
        lambda: Tree("root", (Tree("a"), Tree("b", (Tree("c"),)))),
        {
            "name": "root",
            "children": [
                {"name": "a", "children": []},
                {"name": "b", "children": [{"name": "c", "children": []}]},
            ],
        },
    ),
    "attrs_in_containers": (
        lambda: [{"p": Point(1, 2)}, (Point(3, 4),)],
        [{"p": {"x": 1, "y": 2}}, [{"x": 3, "y": 4}]],
    ),
    "deep_but_within": (lambda: _nest(1, 99), _nest(1, 99)),  # 100 levels: the limit
    "none": (lambda: None, None),
}
"""Return values that are recorded: name -> (make it, the output read back)."""

UNSTORABLE: dict[str, tuple[Callable[[], object], str]] = {
    "nan": (lambda: math.nan, "nan is not a JSON number"),
    "inf": (lambda: {"x": [math.inf]}, "at ['x'][0]: inf is not a JSON number"),
    "neg_inf": (lambda: -math.inf, "-inf is not a JSON number"),
    "nul": (lambda: "a\x00b", "text cannot hold NUL"),
    "nul_key": (lambda: {"k\x00": 1}, "text cannot hold NUL"),
    "nul_in_dataclass": (lambda: Box("y\x00", []), "at ['label']: text cannot hold NUL"),
    "surrogate": (lambda: "bad \udc80", "lone surrogate"),
    "surrogate_key": (lambda: {"\ud800": 1}, "lone surrogate"),
    "int_key": (lambda: {1: "a"}, "object keys must be str, not int"),
    "none_key": (lambda: {"a": {None: 1}}, "at ['a']: object keys must be str, not NoneType"),
    "object": (object, "object values are not JSON"),
    "set": (lambda: {1, 2}, "set values are not JSON"),
    "bytes": (lambda: b"x", "bytes values are not JSON"),
    "datetime": (lambda: datetime.now(UTC), "datetime values are not JSON"),
    "exception": (lambda: ValueError("returned"), "ValueError values are not JSON"),
    "circular_list": (_circular_list, "at [1]: the value is circular"),
    "circular_dict": (_circular_dict, "the value is circular"),
    "circular_attrs": (_circular_node, "the value is circular: a Node instance contains itself"),
    "deep": (lambda: _nest(1, 150), "nested more than 100 levels deep"),
    "deep_attrs": (lambda: _tree(150), "nested more than 100 levels deep"),
    "huge_int": (lambda: 10**5000, "an integer of more than 4300 digits"),
    "too_big": (lambda: "x" * CAP, "the JSON text is 1,048,578 bytes of UTF-8: over the"),
    "shared_dag": (lambda: _shared_dag(60), "the JSON text is over the 1,048,576-byte (1 MiB) cap"),
    "hostile_object": (HostileObject, "HostileObject values are not JSON"),
    "raising_getter": (Sneaky, "reading it raised RuntimeError: no secret for you"),
    "raising_mapping": (BadMapping, "reading it raised RuntimeError: this mapping cannot be"),
    "raising_list": (lambda: BadList([1]), "reading it raised RuntimeError: this list cannot be"),
    # The key check names the key by its repr(), which raises here: still refused.
    "hostile_key": (lambda: {ReprRaisingKey(): 1}, "(a ReprRaisingKey whose repr() raised)"),
}
"""Return values that fail the attempt: name -> (make it, a fragment of the error)."""


def _constant(value: object) -> Callable[[], object]:
    return lambda: value


def _table_workers(table: Mapping[str, Callable[[], object]]) -> tq.Workers:
    async def ret(job: tq.Job[Ret]) -> object:
        return table[job.args.name]()

    workers = tq.Workers()
    workers.add(Ret, ret)
    return workers


VALUES: dict[str, Callable[[], object]] = {
    "ok": lambda: {"ok": True},
    **{name: make for name, (make, _) in STORED.items()},
    **{name: make for name, (make, _) in UNSTORABLE.items()},
    "generator_exit": Quitter,
    "keyboard_interrupt": Interrupter,
}


@asynccontextmanager
async def _client(
    url: str | None, workers: tq.Workers | None = None, **config: Any
) -> AsyncIterator[tq.Client]:
    """A client working ``url`` (None: a fresh memory store), retrying failed jobs an
    hour later."""
    settings_ = {**FAST, "retry_policy": lambda job: 3600.0, **config}
    if url is None:
        settings_["driver"] = tq.MemoryDriver()
    async with tq.open_client(
        url,
        workers=workers or _table_workers(VALUES),
        queues={"default": tq.QueueConfig(max_workers=40)},
        **settings_,
    ) as client:
        yield client


async def _until_attempted(client: tq.Client, ids: set[int], attempt: int = 1) -> None:
    """Wait until every job of ``ids`` has made ``attempt`` attempts and is not running
    or waiting to run."""
    waiting = (tq.JobState.RUNNING, tq.JobState.AVAILABLE)
    with trio.fail_after(60):
        while True:
            page = await client.job_list(tq.JobListParams(ids=sorted(ids), limit=len(ids)))
            if all(j.attempt >= attempt and j.state not in waiting for j in page.jobs):
                return
            await trio.sleep(0.02)


async def _jobs(client: tq.Client, ids: list[int]) -> list[tq.Job[Any]]:
    page = await client.job_list(tq.JobListParams(ids=ids, limit=len(ids)))
    by_id = {job.id: job for job in page.jobs}
    return [by_id[i] for i in ids]


def _storable_text(text: str) -> None:
    assert "\x00" not in text
    text.encode("utf-8")  # no lone surrogate


# ------------------------------------------------------------------ recorded values


async def test_return_values_are_recorded_as_output(store_url: str) -> None:
    names = list(STORED)
    async with _client(store_url) as client:
        results = await client.insert_many([Ret(name) for name in names])
        ids = [r.job.id for r in results]
        await _until_attempted(client, set(ids))
        jobs = await _jobs(client, ids)
        for name, job in zip(names, jobs, strict=True):
            expected = STORED[name][1]
            assert (job.state, job.errors) == (tq.JobState.COMPLETED, []), (name, job)
            assert job.output == expected, name
            assert type(job.output) is type(expected), name  # False is not None, 0 not 0.0
            again = await client.job_get(job.id)
            assert again.output == expected, name


async def test_unstorable_return_values_fail_the_attempt_and_the_others_complete(
    store_url: str,
) -> None:
    # One batch: storable jobs around every unstorable one, so their outcomes are written
    # together; then a job inserted later still completes.
    names = [n for name in [*UNSTORABLE, "generator_exit"] for n in ("ok", name)] + ["ok"]
    async with _client(store_url) as client:
        results = await client.insert_many([Ret(name, i) for i, name in enumerate(names)])
        ids = [r.job.id for r in results]
        await _until_attempted(client, set(ids))
        late = (await client.insert(Ret("dict"))).job.id
        await _until_attempted(client, {late})
        [late_job] = await _jobs(client, [late])
        assert (late_job.state, late_job.output) == (tq.JobState.COMPLETED, STORED["dict"][1])
        jobs = await _jobs(client, ids)
    for name, job in zip(names, jobs, strict=True):
        if name == "ok":
            assert (job.state, job.errors, job.output) == (
                tq.JobState.COMPLETED,
                [],
                {"ok": True},
            ), job
            continue
        assert (job.state, job.attempt, job.output) == (tq.JobState.RETRYABLE, 1, None), name
        [error] = job.errors
        _storable_text(error.error)
        _storable_text(error.trace)
        if name == "generator_exit":
            # What the value's code raised, when it is no Exception, is the attempt's error.
            assert error.error == "GeneratorExit", error
            continue
        assert error.error.startswith(REFUSED), (name, error.error)
        assert UNSTORABLE[name][1] in error.error, (name, error.error)
    errors = {name: job.errors[0] for name, job in zip(names, jobs, strict=True) if name != "ok"}
    # The exception that reading the value raised is in the recorded trace.
    assert "no secret for you" in errors["raising_getter"].trace
    assert "RuntimeError" in errors["raising_getter"].trace


async def test_a_return_value_raising_keyboard_interrupt_is_recorded_then_stops_the_client(
    store_url: str,
) -> None:
    with pytest.raises(KeyboardInterrupt), trio.fail_after(30):
        async with _client(store_url) as client:
            job = (await client.insert(Ret("keyboard_interrupt"))).job
            await trio.sleep_forever()
    async with tq.open_client(store_url) as admin:
        stored = await admin.job_get(job.id)
    assert (stored.state, stored.attempt) == (tq.JobState.RETRYABLE, 1)
    assert [e.error for e in stored.errors] == ["KeyboardInterrupt"]


async def test_output_at_the_cap_is_recorded_and_one_byte_more_fails(store_url: str) -> None:
    cases = {
        "ascii_at_cap": ("x" * (CAP - 2), True),  # two quotes: CAP bytes
        "ascii_over": ("x" * (CAP - 1), False),
        "two_byte_at_cap": ("é" * ((CAP - 2) // 2), True),
        "two_byte_over": ("é" * ((CAP - 2) // 2) + "x", False),
        "list_at_cap": (["y" * (CAP - 4)], True),  # ["..."]
        "list_over": (["y" * (CAP - 3)], False),
    }
    for text, _ in cases.values():
        size = len(json.dumps(text, ensure_ascii=False, separators=(",", ":")).encode())
        assert size in (CAP, CAP + 1)
    table = {name: _constant(value) for name, (value, _) in cases.items()}
    async with _client(store_url, _table_workers(table)) as client:
        results = await client.insert_many([Ret(name) for name in cases])
        ids = [r.job.id for r in results]
        await _until_attempted(client, set(ids))
        jobs = await _jobs(client, ids)
    for (name, (value, fits)), job in zip(cases.items(), jobs, strict=True):
        if fits:
            assert (job.state, job.errors) == (tq.JobState.COMPLETED, []), name
            assert job.output == value, name
        else:
            assert (job.state, job.output) == (tq.JobState.RETRYABLE, None), name
            assert job.errors[0].error == (
                f"{REFUSED}the JSON text is 1,048,577 bytes of UTF-8: "
                "over the 1,048,576-byte (1 MiB) cap on a job's output"
            ), name


# ------------------------------------------------------------------ retries and handlers


async def test_unstorable_output_is_retried_discarded_and_seen_by_the_error_handler(
    store_url: str,
) -> None:
    handled: list[tuple[str, str]] = []
    ended: list[tuple[str, str]] = []

    def handler(job: tq.Job[Ret], error: BaseException) -> tq.ErrorHandlerResult | None:
        handled.append((job.args.name, type(error).__name__))
        return tq.ErrorHandlerResult(set_cancelled=job.args.name == "set")

    class Ends:
        def work_end(self, job: tq.Job[Ret], error: BaseException | None) -> None:
            ended.append((job.args.name, type(error).__name__))

    async with _client(
        store_url, error_handler=handler, retry_policy=lambda job: 0.0, hooks=[Ends()]
    ) as client:
        discard = (await client.insert(Ret("nan"), tq.InsertOpts(max_attempts=2))).job.id
        cancel = (await client.insert(Ret("set"), tq.InsertOpts(max_attempts=5))).job.id
        await _until_attempted(client, {discard}, attempt=2)
        await _until_attempted(client, {cancel})
        discarded, cancelled = await _jobs(client, [discard, cancel])
    assert (discarded.state, discarded.attempt) == (tq.JobState.DISCARDED, 2)
    assert [e.attempt for e in discarded.errors] == [1, 2]
    assert all(e.error.startswith(REFUSED) for e in discarded.errors)
    assert (cancelled.state, cancelled.attempt) == (tq.JobState.CANCELLED, 1)
    assert cancelled.errors[0].error.startswith(f"{REFUSED}must be JSON-serialisable")
    assert sorted(handled) == [("nan", "OutputError")] * 2 + [("set", "OutputError")]
    assert sorted(ended) == sorted(handled)


async def test_a_completed_then_retried_job_keeps_its_latest_output(store_url: str) -> None:
    # Run by run: 1 returns {"run": 1}; 2 raises (the output recorded before stays); 3
    # returns {"run": 3}; 4 returns None (no output: cleared); 5 returns NaN (fails; none).
    runs: list[int] = []

    async def scripted(job: tq.Job[Ret]) -> object:
        runs.append(job.attempt)
        step = len(runs)
        if step == 2:
            raise ValueError("second run fails")
        if step == 4:
            return None
        if step == 5:
            return math.nan
        return {"run": step}

    workers = tq.Workers()
    workers.add(Ret, scripted)
    expected = [
        (tq.JobState.COMPLETED, {"run": 1}),
        (tq.JobState.RETRYABLE, {"run": 1}),
        (tq.JobState.COMPLETED, {"run": 3}),
        (tq.JobState.COMPLETED, None),
        (tq.JobState.RETRYABLE, None),
    ]
    async with _client(store_url, workers) as client:
        job_id = (await client.insert(Ret("scripted"))).job.id
        for attempt, (state, output) in enumerate(expected, start=1):
            if attempt > 1:
                await client.job_retry(job_id)
            await _until_attempted(client, {job_id}, attempt=attempt)
            job = await client.job_get(job_id)
            assert (job.attempt, job.state, job.output) == (attempt, state, output), attempt
    assert len(runs) == 5
    assert job.errors[-1].error.startswith(f"{REFUSED}nan is not a JSON number")


# ------------------------------------------------------------------ middleware, work_one


class Reshape:
    """Client worker middleware: the value it returns is what is recorded."""

    async def work(self, job: tq.Job[Any], call_next: Callable[..., Any]) -> object:
        value = await call_next(job)
        name = job.args.name
        if name == "swallow":
            return None
        if name == "fix":
            return {"was": "nan" if isinstance(value, float) and math.isnan(value) else "?"}
        if name == "spoil":
            return object()
        return {"wrapped": value}


async def _kind_layer(job: tq.Job[Any], call_next: Callable[..., Any]) -> object:
    """Kind-level middleware (inside the client's): turns a Point into its sum, and wraps
    the value of a ``plain`` job in a list."""
    value = await call_next(job)
    if isinstance(value, Point):
        return value.x + value.y
    return [value, "kind"] if job.args.name == "plain" else value


async def test_worker_middleware_returns_what_is_recorded(store_url: str) -> None:
    table: dict[str, Callable[[], object]] = {
        "plain": lambda: {"a": 1},
        "point": lambda: Point(2, 3),
        "swallow": lambda: {"lost": True},
        "fix": lambda: math.nan,
        "spoil": lambda: 1,
    }

    async def ret(job: tq.Job[Ret]) -> object:
        return table[job.args.name]()

    workers = tq.Workers()
    workers.add(Ret, ret, middleware=[_kind_layer])
    async with _client(store_url, workers, middleware=[Reshape()]) as client:
        results = await client.insert_many([Ret(name) for name in table])
        ids = [r.job.id for r in results]
        await _until_attempted(client, set(ids))
        jobs = dict(zip(table, await _jobs(client, ids), strict=True))
    assert jobs["plain"].output == {"wrapped": [{"a": 1}, "kind"]}
    assert jobs["point"].output == {"wrapped": 5}
    # Middleware that returns None records no output, whatever the worker returned.
    assert (jobs["swallow"].state, jobs["swallow"].output) == (tq.JobState.COMPLETED, None)
    # The worker's NaN never reaches the encoder: the middleware's value does.
    assert jobs["fix"].output == {"was": "nan"}
    assert jobs["spoil"].state is tq.JobState.RETRYABLE
    assert jobs["spoil"].errors[0].error.startswith(f"{REFUSED}must be JSON-serialisable")


async def test_work_one_records_output_the_same_way(store_url: str) -> None:
    async def point(job: tq.Job[Ret]) -> object:
        return Tree(job.args.name, (Tree("child"),))

    res = await tqt.work_one(point, Ret("top"), database_url=store_url)
    assert res.event_kind is tq.EventKind.JOB_COMPLETED
    assert res.job.output == {"name": "top", "children": [{"name": "child", "children": []}]}

    async def bad(job: tq.Job[Ret]) -> object:
        return {"x": math.inf}

    res = await tqt.work_one(bad, Ret("bad"), database_url=store_url)
    assert res.event_kind is tq.EventKind.JOB_FAILED
    assert res.job.output is None
    assert res.job.errors[0].error == (
        f"{REFUSED}at ['x']: inf is not a JSON number: numbers must be finite"
    )


# ------------------------------------------------------------------ generated


@attrs.define
class Pair:
    a: Any
    b: Any


@dataclasses.dataclass
class Cell:
    value: Any


class Refused(Exception):
    """The oracle's verdict: the value cannot be stored."""


INT_TEXT_LIMIT = 10**4300  # ints from here on have no text (sys.get_int_max_str_digits())


def _oracle(value: Any, depth: int, stack: set[int], budget: list[int]) -> Any:
    """The output ``value`` must be recorded as, restated from the documentation rather
    than from the code: attrs and dataclass instances are objects of their fields,
    tuples lists; text without NUL or lone surrogates; finite numbers; ints with text;
    str keys; at most 100 levels; nothing circular. Raises Refused otherwise, and when
    the value holds more values than the cap has bytes (each takes one at least)."""
    budget[0] -= 2 if isinstance(value, str) else 1  # a str: two quotes at least
    if budget[0] < 0:
        raise Refused
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        if "\x00" in value or any("\ud800" <= ch <= "\udfff" for ch in value):
            raise Refused
        return value
    if isinstance(value, int):
        if abs(value) >= INT_TEXT_LIMIT:
            raise Refused
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise Refused
        return value
    if attrs.has(type(value)):
        value = {f.name: getattr(value, f.name) for f in attrs.fields(type(value))}
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if not isinstance(value, dict | list | tuple):
        raise Refused
    if depth > 100 or id(value) in stack:
        raise Refused
    stack.add(id(value))
    out: Any
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise Refused
            out[_oracle(key, depth, stack, budget)] = _oracle(item, depth + 1, stack, budget)
    else:
        budget[0] -= len(value)  # a comma or a bracket after each item
        out = [_oracle(item, depth + 1, stack, budget) for item in value]
    stack.discard(id(value))
    return out


def expected_output(value: Any) -> Any:
    """The output read back for ``value``; Refused when it cannot be stored, is over the
    cap as JSON, or reading it raises."""
    try:
        plain = _oracle(value, 1, set(), [CAP])
    except Refused:
        raise
    except Exception:
        raise Refused from None
    if len(json.dumps(plain, ensure_ascii=False, separators=(",", ":")).encode()) > CAP:
        raise Refused
    return plain


def same(expected: Any, got: Any) -> bool:
    """``got`` is ``expected`` read back from jsonb: a float that prints with an exponent
    of 16 or more comes back as the int its text names (docs/operations.md)."""
    if isinstance(expected, bool) or isinstance(got, bool):
        return type(expected) is type(got) and expected == got
    if isinstance(expected, float):
        if isinstance(got, int):
            return abs(expected) >= 1e16 and got == int(Decimal(repr(expected)))
        return isinstance(got, float) and got == expected
    if isinstance(expected, int | str | None):
        return type(got) is type(expected) and got == expected
    if isinstance(expected, list):
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


_texts = st.one_of(
    st.text(max_size=8),  # NUL and lone surrogates too
    st.text(st.sampled_from(["\\", "u", "0", "\n", "é", "\U0001f600", "a", "\x00", "\udc80"])),
    st.just("\\u0000"),  # the NUL escape's six characters: storable
)
_scalars = st.one_of(
    _texts,
    st.integers(),
    st.sampled_from([2**63, -(2**63) - 1]),
    # 4,300 digits (storable) and 4,301 (no text): built, since hypothesis shows reprs.
    st.builds(
        lambda k, sign: sign * 10**k, st.sampled_from([4299, 4300]), st.sampled_from([1, -1])
    ),
    st.floats(),  # NaN and ±Infinity too
    st.sampled_from([-0.0, 5e-324, 1e16, 1e300, 1.7976931348623157e308]),
    st.booleans(),
    st.none(),
)
_ODD_MAKERS: list[Callable[[], object]] = [
    object,
    HostileObject,
    Sneaky,
    BadMapping,
    lambda: BadList([1]),
    lambda: {1, 2},
]
_oddities = st.sampled_from(_ODD_MAKERS).map(lambda make: make())
_keys = st.one_of(_texts, _texts, _texts, st.integers(-2, 2), st.none(), st.booleans())
_values = st.recursive(
    st.one_of(_scalars, _scalars, _scalars, _oddities),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(_keys, children, max_size=4),
        st.builds(Pair, children, children),
        st.builds(Cell, children),
    ),
    max_leaves=12,
)


def _around_cap(char: str, delta: int, in_list: bool) -> Any:
    text = char * ((CAP - 2 - 2 * in_list) // len(char.encode()) + delta)
    return [text] if in_list else text


_specials = st.one_of(
    st.builds(_nest, _scalars, st.integers(95, 102)),
    st.builds(_tree, st.integers(98, 102)),
    st.sampled_from([_circular_list, _circular_dict, _circular_node]).map(lambda make: make()),
    # Small, or 2**30 leaves (a few hundred bytes in memory, gigabytes as JSON).
    st.builds(_shared_dag, st.sampled_from([4, 10, 14, 30])),
    st.builds(
        _around_cap,
        st.sampled_from(["x", "é", "€", "\U0001f600"]),
        st.integers(-1, 1),
        st.booleans(),
    ),
)
RETURN_VALUES = st.one_of(_values, _values, _values, _specials)

_generated: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,  # one store for every example, emptied
    ],
    "print_blob": True,
}
settings.register_profile("trioqueue-output-memory", max_examples=100, **_generated)
settings.register_profile("trioqueue-output-memory-soak", max_examples=3_000, **_generated)
settings.register_profile("trioqueue-output-postgres", max_examples=30, **_generated)
settings.register_profile("trioqueue-output-postgres-soak", max_examples=300, **_generated)
MEMORY = settings.get_profile("trioqueue-output-memory-soak" if SOAK else "trioqueue-output-memory")
POSTGRES = settings.get_profile(
    "trioqueue-output-postgres-soak" if SOAK else "trioqueue-output-postgres"
)


async def run_example(url: str | None, values: list[Any]) -> None:
    """Work one batch whose jobs return ``values`` (and a storable neighbour), then one
    job more, on ``url`` (emptied first) or a fresh memory store: each value is recorded
    as the oracle says, or its attempt fails with an OutputError, and the client goes
    on."""
    table = {str(i): _constant(value) for i, value in enumerate(values)}
    table["ok"] = _constant({"ok": [1, 2]})
    names = [*table]
    with trio.fail_after(120):
        async with _client(url, _table_workers(table)) as client:
            if url is not None:
                async with client.transaction() as tx:
                    await tx.execute("DELETE FROM tq_job")
            results = await client.insert_many([Ret(name) for name in names])
            ids = [r.job.id for r in results]
            await _until_attempted(client, set(ids))
            jobs = await _jobs(client, ids)
            late = (await client.insert(Ret("ok"))).job.id
            await _until_attempted(client, {late})
            assert (await client.job_get(late)).output == {"ok": [1, 2]}
    for name, job in zip(names, jobs, strict=True):
        value = table[name]()
        try:
            expected = expected_output(value)
        except Refused:
            event("refused")
            assert (job.state, job.output) == (tq.JobState.RETRYABLE, None), job
            [error] = job.errors
            assert error.error.startswith(REFUSED), error.error
            _storable_text(error.error)
            _storable_text(error.trace)
            event(f"refused: {error.error[len(REFUSED) :][:24]}")
            continue
        if name != "ok":
            event("stored")
        assert (job.state, job.errors) == (tq.JobState.COMPLETED, []), (value, job)
        assert same(expected, job.output), (expected, job.output)


@LONG
@MEMORY
@given(values=st.lists(RETURN_VALUES, min_size=1, max_size=4))
def test_generated_return_values_on_memory(values: list[Any]) -> None:
    trio.run(run_example, None, values)


@LONG
@POSTGRES
@given(values=st.lists(RETURN_VALUES, min_size=1, max_size=4))
def test_generated_return_values_on_postgres(database_url: str, values: list[Any]) -> None:
    trio.run(run_example, database_url, values)

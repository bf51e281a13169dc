"""The JSON side of trioqueue._codec: the fast paths give exactly what the generic ones do."""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest

from trioqueue._codec import args_to_dict, dumps, encode_args, encode_metadata, unique_key
from trioqueue.errors import ValidationError
from trioqueue.job import InsertOpts, UniqueOpts

GENERIC = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@pytest.mark.parametrize(
    "value",
    [
        {"i": 1},
        {"a": 'ünï "q"\n\t\\', "b": [1, 2.5, None, True, False], "c": {"d": [], "e": {}}},
        [],
        "just a string",
        1.5,
        {"big": 2**70, "neg": -0.0, "nan": float("nan")},
    ],
)
def test_dumps_matches_the_standard_encoder(value: Any) -> None:
    assert dumps(value) == GENERIC(value)


def test_dumps_errors_match_the_standard_encoder() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    with pytest.raises(ValueError, match="Circular reference"):
        dumps(loop)
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps({"x": object()})
    # An error leaves nothing behind for the next call.
    assert dumps({"ok": [1]}) == '{"ok":[1]}'


def test_an_object_that_failed_to_encode_encodes_once_fixed() -> None:
    # The encoder is reused between calls; a failed encoding leaves the failed dict in
    # its circular-reference markers, so the encoder must be replaced after a failure.
    value: dict[str, Any] = {"a": [1], "b": object()}
    with pytest.raises(TypeError):
        dumps(value)
    del value["b"]
    assert dumps(value) == '{"a":[1]}'


def test_each_thread_encodes_with_its_own_encoder() -> None:
    # One value encoded from several threads at once must not look circular.
    shared = {"items": list(range(2000)), "nested": [{"k": i} for i in range(200)]}
    expected = GENERIC(shared)
    results: list[str] = []

    def work() -> None:
        for _ in range(20):
            results.append(dumps(shared))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [expected] * 80


@attrs.frozen
class Scalars:
    i: int
    s: str
    f: float | None = None


@attrs.frozen
class Nested:
    inner: Scalars
    items: list[int] = attrs.field(factory=list)


def test_attrs_args_become_the_same_dict_as_attrs_asdict() -> None:
    assert args_to_dict(Scalars(1, "x")) == {"i": 1, "s": "x", "f": None}
    nested = Nested(Scalars(2, "y", 0.5), [3])
    assert args_to_dict(nested) == attrs.asdict(nested)
    empty = attrs.make_class("Empty", {})
    assert args_to_dict(empty()) == {}
    with pytest.raises(ValidationError, match="args"):
        encode_args(Nested(Scalars(1, "z"), [object()]))  # type: ignore[list-item]


@pytest.mark.parametrize(
    "value",
    [
        Scalars(1, "x"),
        Scalars(-(2**70), 'ünï "q"\n\t\\ \\u0000 \x01', 5e-324),
        Nested(Scalars(2, "y", -0.0), [3, 2**64]),
        {"plain": {"mapping": [1, "two", None, True]}},
    ],
)
def test_encode_args_text_is_what_the_standard_encoder_writes(value: Any) -> None:
    """The checks refuse values; they never change the text of one they accept (unique
    keys and stored rows stay the same)."""
    assert encode_args(value) == GENERIC(args_to_dict(value))


def test_the_strict_encoder_is_reusable_after_a_refusal() -> None:
    with pytest.raises(ValidationError, match="finite"):
        encode_args(Scalars(1, "x", float("nan")))
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(ValidationError, match="circular"):
        encode_args({"loop": loop})
    assert encode_args(Scalars(1, "x", 2.5)) == '{"i":1,"s":"x","f":2.5}'


def test_encode_metadata_checks_like_args() -> None:
    assert encode_metadata({"trace": "abc", "n": [1, {"k": None}]}) == (
        '{"trace":"abc","n":[1,{"k":null}]}'
    )
    for bad, rule in [
        ({"k": "\x00"}, "NUL"),
        ({"k": [float("inf")]}, "finite"),
        ({2: "two"}, "keys must be str"),
        ({"snoozes": 1}, "reserved"),
    ]:
        with pytest.raises(ValidationError, match=rule) as info:
            encode_metadata(bad)
        assert info.value.field == "InsertOpts.metadata"


def test_unique_key_of_a_period_before_year_one() -> None:
    """A period that would start before year 1 is named by its seconds, not a datetime;
    keys of periods that a datetime can name are unchanged."""
    early = InsertOpts(scheduled_at=datetime(1, 1, 1, tzinfo=UTC))
    unique = UniqueOpts(by_period=7)
    now = datetime(2024, 1, 1, tzinfo=UTC)
    assert unique_key("k", None, early, unique, now) == unique_key("k", None, early, unique, now)
    later = InsertOpts(scheduled_at=datetime(2024, 5, 1, 10, 17, tzinfo=UTC))
    hourly = UniqueOpts(by_period=3600)
    expected = hashlib.sha256(b"kind=k&period=2024-05-01T10:00:00+00:00").digest()
    assert unique_key("k", None, later, hourly, now) == expected

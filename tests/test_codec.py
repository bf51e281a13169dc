"""The JSON side of trioqueue._codec: the fast paths give exactly what the generic ones do."""

from __future__ import annotations

import json
import threading
from typing import Any

import attrs
import pytest

from trioqueue._codec import args_to_dict, dumps, encode_args
from trioqueue.errors import ValidationError

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

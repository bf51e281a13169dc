"""What PostgreSQL can store: checks of JSON values and text, with messages that say where.

A job's args and metadata are stored as ``jsonb`` and its names as ``text``. PostgreSQL
refuses some values that Python holds happily, and JSON silently changes others; each is
refused here with a ValidationError naming the field, the place in the value and the rule,
before anything is written:

- text holding NUL (``"\\x00"``): ``text`` and ``jsonb`` strings cannot hold it;
- text holding a lone surrogate (``"\\udc80"``): it has no UTF-8 encoding;
- NaN and ±Infinity: JSON has no such numbers;
- integers too long to write as text (``sys.get_int_max_str_digits()``, 4300 digits by
  default) or for ``numeric`` (131,072 digits);
- object keys that are not ``str`` (JSON would turn ``1`` into ``"1"``, and ``{1: "a",
  "1": "b"}`` would lose a value);
- values nested more than ``MAX_JSON_DEPTH`` levels deep, or circular;
- anything but ``dict``, ``list``, ``tuple``, ``str``, ``int``, ``float``, ``bool`` and
  ``None``.

Nothing here is on the hot path of a flat args object: the codec encodes first and looks
closer only when the text or the value's shape calls for it (see ``_codec._encode``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from typing import Any, Final

from .errors import ValidationError

__all__ = [
    "MAX_JSON_DEPTH",
    "NUMERIC_MAX_DIGITS",
    "RESERVED_METADATA_KEYS",
    "check_json",
    "check_metadata_keys",
    "check_shape",
    "check_text",
    "text_problem",
]

MAX_JSON_DEPTH: Final = 100
"""How deeply args and metadata may nest (the object itself is level 1). Reading a job
back parses its JSON recursively: a generous fixed limit keeps every stored job readable,
whatever the reader's stack, and bounds the work of checking it."""

RESERVED_METADATA_KEYS: Final = frozenset({"cancel_attempted_at", "rescue_count", "snoozes"})
"""Metadata keys trioqueue writes and reads itself (a cancel request, the rescuer's and the
executor's counters, read as integers): an insert may not set them."""

NUMERIC_MAX_DIGITS: Final = 131_072
"""Digits before the decimal point that PostgreSQL's ``numeric`` (jsonb numbers) holds."""
_BIG_INT_BITS: Final = 10_000
"""Below this many bits an int has at most 3,011 digits: no need to count them."""


Path = tuple[Any, ...] | None
"""Where a value sits in the checked value: None at the top, else ``(parent, key)``.
Built as the walk goes (a tuple costs less than text), written out only for a message."""

_PATH_SHOWN: Final = 80


def _where(path: Path) -> str:
    """``at ['items'][3]: `` for a message (shortened in the middle when long)."""
    if path is None:
        return ""
    keys: list[Any] = []
    while path is not None:
        path, key = path
        keys.append(key)
    parts = [f"[{key}]" if isinstance(key, int) else f"[{_short(key)}]" for key in reversed(keys)]
    text = "".join(parts)
    if len(text) > _PATH_SHOWN:
        text = f"{text[: _PATH_SHOWN // 2]}...{text[-_PATH_SHOWN // 2 :]}"
    return f"at {text}: "


def _short(key: str) -> str:
    text = repr(key)
    return text if len(text) <= 40 else f"{text[:30]}...{text[-8:]}"


def text_problem(text: str) -> str | None:
    """Why PostgreSQL cannot store ``text`` (``"nul"``: a NUL; ``"surrogate"``: a lone
    surrogate, which has no UTF-8 encoding), or None when it can."""
    if "\x00" in text:
        return "nul"
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            return "surrogate"
    return None


def check_text(field: str, text: str, path: Path = None) -> None:
    """Raise ValidationError unless ``text`` can be stored as PostgreSQL text (no NUL,
    no lone surrogate)."""
    problem = text_problem(text)
    if problem == "nul":
        raise ValidationError(
            field, f"{_where(path)}text cannot hold NUL (\\x00): PostgreSQL cannot store it"
        )
    if problem == "surrogate":
        raise ValidationError(
            field, f"{_where(path)}text holds a lone surrogate, which has no UTF-8 encoding"
        )


def _check_int(field: str, value: int, path: Path) -> None:
    if value.bit_length() < _BIG_INT_BITS:
        return
    try:
        digits = len(int.__repr__(abs(value)))
    except ValueError:
        limit = sys.get_int_max_str_digits()
        raise ValidationError(
            field,
            f"{_where(path)}an integer of more than {limit} digits cannot be written as JSON",
        ) from None
    if digits > NUMERIC_MAX_DIGITS:
        raise ValidationError(
            field,
            f"{_where(path)}an integer of more than {NUMERIC_MAX_DIGITS} digits cannot be stored",
        )


def _key_repr(key: object) -> str:
    """``repr(key)`` for an error message, or a stand-in when the key's own ``__repr__``
    raises: the message about a bad key must not fail in its turn."""
    try:
        return repr(key)[:200]
    except Exception:
        return f"a {type(key).__name__} whose repr() raised"


def check_json(field: str, value: Any) -> None:
    """Raise ValidationError, naming ``field`` and the place in ``value``, unless ``value``
    is JSON that PostgreSQL's ``jsonb`` stores as it is (rules in the module docstring).

    Never recurses more than ``MAX_JSON_DEPTH`` levels, so a circular or very deep value
    raises ValidationError, never RecursionError."""
    _check(field, value, None, 1, set())


def _check(field: str, value: Any, path: Path, depth: int, open_ids: set[int]) -> None:
    # Most common types first; bool before int, since bool is an int.
    if isinstance(value, str):
        check_text(field, value, path)
        return
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        _check_int(field, value, path)
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(
                field,
                f"{_where(path)}{value!r} is not a JSON number: numbers must be finite",
            )
        return
    if not isinstance(value, dict | list | tuple):
        raise ValidationError(
            field,
            f"{_where(path)}must be JSON-serialisable: {type(value).__name__} values are not "
            "JSON (use dict with str keys, list, str, int, float, bool or None)",
        )
    if id(value) in open_ids:
        raise ValidationError(field, f"{_where(path)}the value is circular (it contains itself)")
    if depth > MAX_JSON_DEPTH:
        raise ValidationError(field, f"{_where(path)}nested more than {MAX_JSON_DEPTH} levels deep")
    open_ids.add(id(value))
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValidationError(
                    field,
                    f"{_where(path)}object keys must be str, not {type(key).__name__} "
                    f"({_key_repr(key)}): JSON would turn it into a string",
                )
            where = (path, key)
            check_text(field, key, where)
            _check(field, item, where, depth + 1, open_ids)
    else:
        for i, item in enumerate(value):
            _check(field, item, (path, i), depth + 1, open_ids)
    open_ids.discard(id(value))


_CONTAINERS: Final = (dict, list, tuple)


def check_shape(field: str, value: dict[str, Any]) -> None:
    """Check what JSON text cannot show: every object key is a str, nothing is nested
    more than ``MAX_JSON_DEPTH`` levels deep, nothing is circular. Only containers are
    visited, and no path is kept (``check_json`` finds the place when something is
    wrong); scalars are left to the encoder and to a look at the text it writes (see
    ``_codec``). Never recurses more than ``MAX_JSON_DEPTH`` levels."""
    if not _shape_ok(value, 1):
        check_json(field, value)  # raises, naming the place and the rule
        raise AssertionError("check_json passed a value check_shape refused")


def _shape_ok(value: Any, depth: int) -> bool:
    # A circular value is too deep: check_json tells the two apart.
    if depth > MAX_JSON_DEPTH:
        return False
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return False
            if isinstance(item, _CONTAINERS) and not _shape_ok(item, depth + 1):
                return False
    else:
        for item in value:
            if isinstance(item, _CONTAINERS) and not _shape_ok(item, depth + 1):
                return False
    return True


def check_metadata_keys(field: str, metadata: Mapping[Any, Any]) -> None:
    """Raise ValidationError if ``metadata`` sets a key that trioqueue reserves."""
    if not RESERVED_METADATA_KEYS.isdisjoint(metadata):
        names = ", ".join(sorted(k for k in RESERVED_METADATA_KEYS if k in metadata))
        raise ValidationError(
            field,
            f"{names}: reserved for trioqueue's own use "
            f"(reserved keys: {', '.join(sorted(RESERVED_METADATA_KEYS))})",
        )

"""One-dimensional arrays as query parameters, encoded in PostgreSQL's binary format.

psycopg's generic list dumper inspects every element and, for lists that mix values with
``None``, falls back to its text format with a regular-expression quote per element. The
completer sends eight such arrays for every batch of outcomes, so the generic path was the
largest single cost of finishing a job. These encoders know their element type and write
the wire format directly: a header, then each element as a length and its bytes.

Each encoder returns a ``bytes`` subclass whose dumper (registered in ``adapters.py``)
passes it through with the array type's oid.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar, Final

from psycopg.abc import Buffer
from psycopg.adapt import Dumper
from psycopg.pq import Format

__all__ = [
    "BinaryArray",
    "BinaryArrayDumper",
    "bool_array",
    "bytea_array",
    "dumpers",
    "int8_array",
    "text_array",
    "timestamptz_array",
]

_HEADER: Final = struct.Struct(">iiiii")
_INT8: Final = struct.Struct(">iq").pack
_LENGTH: Final = struct.Struct(">i").pack
_NULL: Final = _LENGTH(-1)
_TRUE: Final = _LENGTH(1) + b"\x01"
_FALSE: Final = _LENGTH(1) + b"\x00"
_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


class BinaryArray(bytes):
    """An encoded array parameter; the subclass says its type."""

    oid: ClassVar[int]


class _Int8Array(BinaryArray):
    oid = 1016


class _TextArray(BinaryArray):
    oid = 1009


class _TimestamptzArray(BinaryArray):
    oid = 1185


class _BoolArray(BinaryArray):
    oid = 1000


class _ByteaArray(BinaryArray):
    oid = 1001


class BinaryArrayDumper(Dumper):
    """Sends a `BinaryArray` as it is, in binary, with its array type's oid.

    The oid is set per instance, not on the class: a class-level oid would also register
    the dumper as *the* dumper for that type (``AdaptersMap.register_dumper`` does so by
    oid), and binary COPY with declared column types would then hand it lists."""

    format = Format.BINARY

    def __init__(self, cls: type, context: Any = None) -> None:
        super().__init__(cls, context)
        self.oid = cls.oid if issubclass(cls, BinaryArray) else 0

    def dump(self, obj: Buffer) -> Buffer:
        return obj


def dumpers() -> list[tuple[type[BinaryArray], type[BinaryArrayDumper]]]:
    """Each array type with its dumper class, for ``AdaptersMap.register_dumper``."""
    return [
        (cls, BinaryArrayDumper)
        for cls in (_Int8Array, _TextArray, _TimestamptzArray, _BoolArray, _ByteaArray)
    ]


def _array(cls: type[BinaryArray], elem_oid: int, n: int, has_null: bool, body: bytes) -> bytes:
    if not n:
        # An empty array has no dimensions.
        return cls(_LENGTH(0) + _LENGTH(0) + _LENGTH(elem_oid))
    return cls(_HEADER.pack(1, 1 if has_null else 0, elem_oid, n, 1) + body)


def int8_array(values: Sequence[int]) -> bytes:
    """``bigint[]`` of ``values`` (no NULLs)."""
    return _array(_Int8Array, 20, len(values), False, b"".join([_INT8(8, v) for v in values]))


def _bytes_array(cls: type[BinaryArray], elem_oid: int, values: Sequence[bytes | None]) -> bytes:
    """An array whose elements go out as their bytes; ``None`` elements are NULL."""
    parts = []
    has_null = False
    for v in values:
        if v is None:
            has_null = True
            parts.append(_NULL)
        else:
            parts.append(_LENGTH(len(v)) + v)
    return _array(cls, elem_oid, len(values), has_null, b"".join(parts))


def text_array(values: Sequence[str | None]) -> bytes:
    """``text[]``; ``None`` elements are NULL."""
    if not values:
        return _EMPTY_TEXT_ARRAY  # most jobs' tags
    return _bytes_array(_TextArray, 25, [None if v is None else v.encode() for v in values])


_EMPTY_TEXT_ARRAY: Final = _array(_TextArray, 25, 0, False, b"")


def timestamptz_array(values: Iterable[datetime | None]) -> bytes:
    """``timestamptz[]`` of aware datetimes; ``None`` elements are NULL. Equal instants
    (a batch of jobs claimed together shares one) are converted once."""
    seen: dict[datetime, bytes] = {}
    parts = []
    has_null = False
    n = 0
    for v in values:
        n += 1
        if v is None:
            has_null = True
            parts.append(_NULL)
            continue
        data = seen.get(v)
        if data is None:
            if v.tzinfo is None:
                raise ValueError(f"naive datetime {v!r}: timestamptz needs an aware one")
            data = seen[v] = _INT8(8, (v - _PG_EPOCH) // _MICROSECOND)
        parts.append(data)
    return _array(_TimestamptzArray, 1184, n, has_null, b"".join(parts))


def bool_array(values: Iterable[bool]) -> bytes:
    """``boolean[]`` (no NULLs)."""
    parts = [_TRUE if v else _FALSE for v in values]
    return _array(_BoolArray, 16, len(parts), False, b"".join(parts))


def bytea_array(values: Sequence[bytes | None]) -> bytes:
    """``bytea[]``; ``None`` elements are NULL."""
    return _bytes_array(_ByteaArray, 17, values)

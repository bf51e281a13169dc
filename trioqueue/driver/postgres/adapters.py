"""How values cross the wire: the adaptation context every connection shares.

`ADAPTERS` is psycopg's default map with a few loaders and dumpers of our own: faster
``jsonb`` loading, ``bit``/``varbit`` as text-like strings, ``bytea`` in text format that
needs no connection (for text COPY), and the binary array parameters of ``arrays.py``.

Type notes:

* Parameters use ``$1, $2`` placeholders and are dumped by psycopg's default adapters
  (``PyFormat.AUTO``). A Python ``int`` is sent as int2/int4/int8/numeric depending on its value,
  as psycopg does: write ``$1::bigint`` where an expression (rather than a column) must be wide.
* Results are requested in binary format. Types with no binary loader (enums, custom types)
  come back as ``bytes``: cast them to ``text`` in SQL. ``bit``/``varbit`` load as ``str`` such
  as ``"10101010"``.
* The session uses ``client_encoding=UTF8`` whatever the connection string says.
"""

from __future__ import annotations

import binascii
import json
import struct
from typing import Any, Final

import psycopg
from psycopg.abc import Buffer
from psycopg.adapt import AdaptersMap, Dumper, Loader
from psycopg.pq import Format
from psycopg.types.string import BytesBinaryDumper

from .arrays import dumpers as array_dumpers

__all__ = ["ADAPTERS"]


class _BitBinaryLoader(Loader):
    """Load ``bit``/``varbit`` (binary format) as a ``str`` of 0/1, like the text format."""

    format = Format.BINARY
    _unpack = struct.Struct("!i").unpack_from

    def load(self, data: Buffer) -> str:
        (nbits,) = self._unpack(data)
        bits = bytes(data[4:])
        if not nbits:
            return ""
        return format(int.from_bytes(bits, "big"), f"0{len(bits) * 8}b")[:nbits]


class _BytesHexTextDumper(Dumper):
    """bytea in text format as ``\\x<hex>``, with or without a connection.

    psycopg's text bytea dumper needs a connection to escape correctly: without one (our
    case) libpq's PQescapeBytea doubles single quotes, which corrupts text COPY data.
    """

    format = Format.TEXT
    oid = psycopg.postgres.types["bytea"].oid

    def dump(self, obj: Buffer) -> Buffer:
        return b"\\x" + binascii.hexlify(obj)


_raw_decode = json.JSONDecoder().raw_decode


class _JsonbBinaryLoader(Loader):
    """Load ``jsonb`` (binary format: a version byte, then the JSON text) faster than
    psycopg's generic loader: the server's output has no surrounding whitespace, so the
    text goes straight to the decoder, and the empty object and array (most metadata and
    errors) skip it altogether."""

    format = Format.BINARY

    def load(self, data: Buffer) -> Any:
        text = bytes(data[1:])
        if text == b"{}":
            return {}
        if text == b"[]":
            return []
        return _raw_decode(text.decode())[0]


def _adapters() -> AdaptersMap:
    adapters = AdaptersMap(psycopg.adapters)
    adapters.register_loader("jsonb", _JsonbBinaryLoader)
    adapters.register_loader("bit", _BitBinaryLoader)
    adapters.register_loader("varbit", _BitBinaryLoader)
    for cls in (bytes, bytearray, memoryview):
        adapters.register_dumper(cls, _BytesHexTextDumper)
        # registered last, so parameters (PyFormat.AUTO) keep going out in binary
        adapters.register_dumper(cls, BytesBinaryDumper)
    for array_cls, array_dumper in array_dumpers():
        adapters.register_dumper(array_cls, array_dumper)
    return adapters


ADAPTERS: Final = _adapters()
"""The loaders and dumpers of every connection (and of the COPY formatters)."""

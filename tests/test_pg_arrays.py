"""The binary array parameters of trioqueue.driver.postgres.arrays, read back by PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from trioqueue.driver.postgres import PgConnection
from trioqueue.driver.postgres.arrays import (
    bool_array,
    bytea_array,
    int8_array,
    text_array,
    timestamptz_array,
)

TS = [
    datetime(2026, 11, 27, 7, 1, 2, 345678, tzinfo=UTC),
    datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before PostgreSQL's epoch
    datetime(2026, 1, 1, 12, 0, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
]


@pytest.mark.parametrize("prepare", [False, True])
async def test_arrays_round_trip(database_url: str, prepare: bool) -> None:
    conn = await PgConnection.connect(database_url)
    try:
        row = await conn.fetchrow(
            "SELECT $1::bigint[], $2::text[], $3::timestamptz[], $4::boolean[], "
            "pg_typeof($1)::text, cardinality($2), $5::bytea[]",
            [
                int8_array([1, -2, 2**62, 0]),
                text_array(["a", None, "ünï 'quoted' \"x\" \\ {,}", "", "NULL"]),
                timestamptz_array([TS[0], None, TS[1], TS[2], TS[0]]),
                bool_array([True, False]),
                bytea_array([b"\x00\xff'\\", None, b""]),
            ],
            prepare=prepare,
        )
        assert row is not None
        assert row[0] == [1, -2, 2**62, 0]
        assert row[1] == ["a", None, "ünï 'quoted' \"x\" \\ {,}", "", "NULL"]
        assert row[2] == [TS[0], None, TS[1], TS[2], TS[0]]
        assert row[3] == [True, False]
        assert row[4:6] == ("bigint[]", 5)
        assert row[6] == [b"\x00\xff'\\", None, b""]
        # Empty arrays have no dimensions; unnest gives no rows.
        empty = await conn.fetchrow(
            "SELECT $1::bigint[], $2::text[], $3::timestamptz[], $4::boolean[], "
            "(SELECT count(*) FROM unnest($1::bigint[], $3::timestamptz[])), $5::bytea[]",
            [
                int8_array([]),
                text_array([]),
                timestamptz_array([]),
                bool_array([]),
                bytea_array([]),
            ],
            prepare=prepare,
        )
        assert empty == ([], [], [], [], 0, [])
    finally:
        await conn.aclose()


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        timestamptz_array([datetime(2026, 1, 1)])

"""Run the driver conformance suite (``driver_suite.py``) against every driver.

``postgres``: a ``PostgresDriver`` on an isolated, migrated database of its own;
``memory``: a fresh ``MemoryDriver``. Each suite case runs once per driver.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from driver_suite import SUITE, Case

from trioqueue.driver.memory import MemoryDriver
from trioqueue.driver.postgres import open_pool
from trioqueue.driver.postgres.driver import PostgresDriver
from trioqueue.driver.protocol import Driver


@pytest.fixture(params=["postgres", "memory"])
def driver_url(request: pytest.FixtureRequest) -> str | None:
    """The database URL for the postgres run (a fresh database), None for memory."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("database_url")
        return url
    return None


@pytest.fixture
async def driver(driver_url: str | None) -> AsyncIterator[Driver]:
    if driver_url is None:
        yield MemoryDriver()
        return
    async with open_pool(driver_url, max_size=4) as pool:
        yield PostgresDriver(pool, driver_url)


@pytest.mark.parametrize("case", SUITE, ids=[c.__name__ for c in SUITE])
async def test_driver(case: Case, driver: Driver) -> None:
    await case(driver)

"""Small helpers shared by test modules (pytest puts this folder on sys.path)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, Phase

SOAK = os.environ.get("TRIOQUEUE_SOAK") == "1"
"""``TRIOQUEUE_SOAK=1``: the generated suites run their long profiles."""

LONG = pytest.mark.timeout(6 * 3600 if SOAK else 600)
"""pytest-timeout's 120 s is per test, and one generated test runs every example."""

GENERATED: dict[str, Any] = {
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "print_blob": True,
}
"""Settings of the generated (plan) suites on the memory driver."""

GENERATED_POSTGRES: dict[str, Any] = {
    **GENERATED,
    "phases": [Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
    "suppress_health_check": [
        *GENERATED["suppress_health_check"],
        HealthCheck.function_scoped_fixture,
    ],
}
"""On PostgreSQL: each example makes its own database from the session's template, so
the function-scoped autouse fixture (which only removes an environment variable) is
safely shared by all examples; shrinking is left to the memory driver, since every
replay costs real seconds there (a failure is re-run as a plan on the memory driver)."""


async def eventually(predicate: Callable[[], bool], seconds: float = 10.0) -> None:
    """Poll ``predicate`` (for state that has no event to wait on) until true, or fail."""
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await trio.sleep(0.02)
    raise AssertionError(f"not reached within {seconds} s")

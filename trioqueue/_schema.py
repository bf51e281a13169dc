"""The schema version this trioqueue release expects: the newest migration it ships.

A leaf: it imports nothing of trioqueue, so the drivers and the client can read it without
loading the migration runner (a test keeps it equal to the newest migration file)."""

from __future__ import annotations

__all__ = ["SCHEMA_VERSION"]

SCHEMA_VERSION = 5
"""The newest migration in ``trioqueue/migrations``."""

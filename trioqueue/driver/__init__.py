"""Storage drivers: every storage operation by name, and two implementations.

How to find your way:

- ``protocol.py``: the `Driver` protocol, the typed rows (``JobRow``, ``QueueRow``,
  ``LeaderRow``, ``WrittenRow``) and the per-job records (``JobInsertParams``,
  ``JobOutcome``). The runtime and the client call only these operations, never SQL.
- ``postgres/``: the PostgreSQL driver, on a trio-native connection and pool.
- ``memory/``: an in-process store that imitates PostgreSQL, for tests and simulation.
- ``faults.py``: a wrapper that injects faults into any driver, for tests.

A driver imports only the protocol, ``job``, ``errors`` and leaf modules (an
import-linter contract in pyproject.toml keeps it so).
"""

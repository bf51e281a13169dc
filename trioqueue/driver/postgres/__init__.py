"""PostgreSQL driver: a trio-native connection and pool on psycopg's sans-I/O core.

How to find your way:

- ``driver.py``: `PostgresDriver`, the protocol's operations; ``queries.py`` loads their
  SQL from ``queries/*.sql`` by name; ``inserts.py`` encodes jobs to insert (arrays and
  COPY text); ``failures.py`` wraps psycopg errors in ``DatabaseError``;
  ``transient.py`` says which are worth retrying.
- ``connection.py``: `PgConnection`, one connection driven with trio; it leans on
  ``waiting.py`` (trio's side of psycopg's wait requests, the cancel request),
  ``transaction.py`` (transaction blocks), ``notifications.py`` (LISTEN),
  ``copy.py`` (COPY FROM STDIN), ``prepared.py`` (the session's prepared statements)
  and ``adapters.py`` (the type loaders and dumpers).
- ``pool.py``: a bounded pool that replaces broken connections; ``pooler.py`` notices a
  transaction pooler (PgBouncer) in the way; ``arrays.py`` encodes array parameters.
"""

from trioqueue.driver.postgres.connection import PgConnection, QueryResult
from trioqueue.driver.postgres.notifications import Notify
from trioqueue.driver.postgres.pool import PgPool, PoolStatistics, open_pool

__all__ = ["Notify", "PgConnection", "PgPool", "PoolStatistics", "QueryResult", "open_pool"]

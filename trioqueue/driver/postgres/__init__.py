"""PostgreSQL driver: a trio-native connection and pool on psycopg's sans-I/O core."""

from trioqueue.driver.postgres.connection import PgConnection, QueryResult
from trioqueue.driver.postgres.notifications import Notify
from trioqueue.driver.postgres.pool import PgPool, PoolStatistics, open_pool

__all__ = ["Notify", "PgConnection", "PgPool", "PoolStatistics", "QueryResult", "open_pool"]

"""The memory driver: the whole Driver protocol in-process, for simulation and unit tests.

It reproduces the PostgreSQL driver's statements (``driver/postgres/queries/*.sql``) and the
schema they run against (``migrations/*.up.sql``): the same rows, the same CHECK constraints,
the same partial unique index over each job's ``unique_states`` bitmask, the same
notifications, and READ COMMITTED transactions with row locks:

- A transaction's writes are invisible to everything else until it commits, and are
  discarded when it rolls back. Reads through the transaction see its own writes.
- A row a transaction wrote (or locked, as ``INSERT ... ON CONFLICT DO UPDATE`` does) stays
  locked until the transaction ends. Claims (``job_get_available``, ``job_schedule``,
  ``job_delete_finalized``) skip locked rows, as ``FOR UPDATE SKIP LOCKED`` does; every other
  write of a locked row waits for the transaction to end and then re-evaluates, as an
  ``UPDATE`` does in PostgreSQL. So does making a row hold a unique key that another open
  transaction's uncommitted row holds.
- Two transactions waiting for each other: the one that would close the cycle fails with
  ``DatabaseError`` ("deadlock detected"), and its transaction is aborted.
- A statement that fails inside a transaction aborts it, as in PostgreSQL: further
  statements fail, and leaving the block normally raises ``DatabaseError`` after rolling back.

Every operation is one checkpoint followed by an atomic change (nothing awaits in the
middle of a mutation), so concurrent tasks interleave as they would against a database. An
operation cancelled at its checkpoint, or while waiting for a lock, has changed nothing.

Time comes from trio's clock (:meth:`MemoryDriver.clock`), so under
``trio.testing.MockClock(autojump_threshold=0)`` hours of retries, schedules and leadership
terms pass in milliseconds.

How to find your way, from the bottom up:

- ``errors.py``: `MemoryStoreError` and `MemoryDataError` (what PostgreSQL would report;
  always the cause of a ``DatabaseError``), and ``_Blocked`` (a statement must wait).
- ``values.py``: values as PostgreSQL stores them (timestamps, jsonb and its operators,
  text, smallint, the ``unique_states`` bitmask) and the CHECK-violation message.
- ``rows.py``: the stored records (``_Job``, ``_Queue``, ``_Periodic``, ``_Leader``),
  the table's CHECK constraints, and ``_Job.row`` which makes the protocol's `JobRow`.
- ``transaction.py``: `MemoryTransaction`, the ``ex=`` executor and what it holds.
- ``listener.py``: `MemoryListener` and its overflow.
- ``statement.py``: ``_Stmt``, one statement's view, row locks and staged writes, where
  the unique index is enforced and the jobs whose dependents must be settled recorded.
- ``workflows.py``: migration 005's workflow advance (promoting, cancelling and reviving
  a workflow's dependents), how statements call it, and the ``tq_final`` notifications.
- ``store.py``: ``_Store``, the committed rows and their indexes, the clock, running a
  statement (waiting on locks, deadlocks), and committing or discarding transactions.
- ``jobs.py``: inserting jobs and workflows, claiming, and writing the outcomes of runs.
- ``manage.py``: reading and managing jobs (get, list, state, cancel, retry, delete).
- ``maintenance.py``: scheduling due jobs, rescuing stuck ones, deleting old jobs and
  stale queues.
- ``admin.py``: counts, queues, notifications, leadership, periodic job state.
- ``driver.py``: `MemoryDriver`, the store with all of the above.
- ``registry.py``: the process-wide stores named by ``memory://NAME`` URLs.
"""

from __future__ import annotations

from .driver import MemoryDriver
from .errors import MemoryDataError as MemoryDataError
from .errors import MemoryStoreError
from .listener import DEFAULT_LISTENER_BUFFER as DEFAULT_LISTENER_BUFFER
from .listener import ListenerOverflowError as ListenerOverflowError
from .listener import MemoryListener
from .registry import MEMORY_URL_PREFIX, memory_driver_for_url
from .transaction import MemoryTransaction

__all__ = [
    "MEMORY_URL_PREFIX",
    "MemoryDriver",
    "MemoryListener",
    "MemoryStoreError",
    "MemoryTransaction",
    "memory_driver_for_url",
]

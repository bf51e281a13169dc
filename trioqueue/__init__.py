"""trioqueue: a durable PostgreSQL job queue for trio applications.

Every public name lives here; everything else is private and may change.
"""

from __future__ import annotations

from ._migrate import migrate as migrate
from ._migrate import migration_list as migration_list
from ._runtime.dispatcher import Subscription as Subscription
from .client import Client as Client
from .client import JobCounts as JobCounts
from .client import LeaderInfo as LeaderInfo
from .client import QueueInfo as QueueInfo
from .client import open_client as open_client
from .config import ClientConfig as ClientConfig
from .config import QueueConfig as QueueConfig
from .current import current_client as current_client
from .driver.memory import MemoryDriver as MemoryDriver
from .errors import DatabaseError as DatabaseError
from .errors import ErrorHandlerResult as ErrorHandlerResult
from .errors import JobCancel as JobCancel
from .errors import JobNotFoundError as JobNotFoundError
from .errors import JobRunningError as JobRunningError
from .errors import JobSnooze as JobSnooze
from .errors import PoolerError as PoolerError
from .errors import TrioqueueError as TrioqueueError
from .errors import UnknownJobKindError as UnknownJobKindError
from .errors import ValidationError as ValidationError
from .events import Event as Event
from .events import EventKind as EventKind
from .job import AttemptError as AttemptError
from .job import InsertOpts as InsertOpts
from .job import Job as Job
from .job import JobInsertResult as JobInsertResult
from .job import JobListParams as JobListParams
from .job import JobListResult as JobListResult
from .job import JobState as JobState
from .job import UniqueOpts as UniqueOpts
from .limits import GlobalLimit as GlobalLimit
from .limits import PartitionInfo as PartitionInfo
from .limits import RateLimit as RateLimit
from .middleware import InsertMiddleware as InsertMiddleware
from .middleware import InsertParams as InsertParams
from .middleware import WorkerMiddleware as WorkerMiddleware
from .periodic import PeriodicJob as PeriodicJob
from .settings import WorkerSettings as WorkerSettings
from .transaction import Transaction as Transaction
from .workers import Workers as Workers
from .workflow import Workflow as Workflow
from .workflow import WorkflowTask as WorkflowTask

__version__ = "0.1.0"

__all__ = [
    "AttemptError",
    "Client",
    "ClientConfig",
    "DatabaseError",
    "ErrorHandlerResult",
    "Event",
    "EventKind",
    "GlobalLimit",
    "InsertMiddleware",
    "InsertOpts",
    "InsertParams",
    "Job",
    "JobCancel",
    "JobCounts",
    "JobInsertResult",
    "JobListParams",
    "JobListResult",
    "JobNotFoundError",
    "JobRunningError",
    "JobSnooze",
    "JobState",
    "LeaderInfo",
    "MemoryDriver",
    "PartitionInfo",
    "PeriodicJob",
    "PoolerError",
    "QueueConfig",
    "QueueInfo",
    "RateLimit",
    "Subscription",
    "Transaction",
    "TrioqueueError",
    "UniqueOpts",
    "UnknownJobKindError",
    "ValidationError",
    "WorkerMiddleware",
    "WorkerSettings",
    "Workers",
    "Workflow",
    "WorkflowTask",
    "current_client",
    "migrate",
    "migration_list",
    "open_client",
]


def _fixup_module_metadata() -> None:
    """Make tracebacks and reprs name ``trioqueue.X`` rather than the private module."""
    for name in __all__:
        obj = globals()[name]
        if getattr(obj, "__module__", "").startswith("trioqueue.") and hasattr(obj, "__qualname__"):
            try:
                obj.__module__ = "trioqueue"
            except (AttributeError, TypeError):
                pass


_fixup_module_metadata()
del _fixup_module_metadata

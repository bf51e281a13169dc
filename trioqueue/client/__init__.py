"""The client: ``open_client`` and everything an application does with its queue.

How to find your way: ``_open.py`` opens a client (`open_client`: which storage, the
schema check, running the client and its runtime for the block); ``_client.py`` is the
`Client` class and its public methods (inserting, managing jobs and queues, counts,
events, stopping); ``_pipeline.py`` carries an insert from those methods to the driver
(middleware and hooks, unique duplicates within a batch, COPY, notifying the queues);
``_info.py`` holds the values the client reports (`QueueInfo`, `JobCounts`,
`LeaderInfo`). Validating an insert and building its params is below the client, in
``trioqueue/_insert.py`` (`InsertBuilder`), shared with the periodic job enqueuer.
"""

from ._client import Client
from ._info import JobCounts, LeaderInfo, QueueInfo
from ._open import open_client

__all__ = ["Client", "JobCounts", "LeaderInfo", "QueueInfo", "open_client"]

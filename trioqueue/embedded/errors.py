"""The one exception of the embedded server."""

from __future__ import annotations

from ..errors import TrioqueueError

__all__ = ["EmbeddedServerError"]


class EmbeddedServerError(TrioqueueError, RuntimeError):
    """The embedded PostgreSQL server could not be found, started or stopped.

    A ``TrioqueueError`` like every error trioqueue raises on its own account, and still a
    ``RuntimeError`` as it always was.
    """

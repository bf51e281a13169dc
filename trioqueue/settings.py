"""``WorkerSettings``: a whole client configuration in one object, without the URL.

A worker process is configured in code, once, and handed to ``open_client(url,
settings=...)`` or to ``trioqueue worker MODULE:ATTR``. The settings hold every keyword of
``open_client`` but the storage (``database_url`` and ``driver``, which belong to where the
process runs, not to what it does).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, final

import attrs

from .config import (
    ClientConfig,
    ErrorHandler,
    QueueConfig,
    RetryPolicy,
    validate_queues,
)
from .errors import ValidationError
from .periodic import PeriodicJob
from .workers import Workers

__all__ = ["WorkerSettings", "merge_settings"]

_DEFAULTS = {f.name: f.default for f in attrs.fields(ClientConfig)}


def _config_default(name: str) -> Any:
    return _DEFAULTS[name]


@final
@attrs.frozen(kw_only=True)
class WorkerSettings:
    """Everything ``open_client`` takes but the URL (and ``driver``): workers, queues and
    every client option. Each value is validated when built (a ``ValidationError`` names
    the field); whether they fit together (queues need workers) is checked when a client
    opens, since keywords given beside the settings may complete them.

    ``open_client(url, settings=s, **overrides)`` uses them; keywords given beside
    ``settings`` win. ``trioqueue worker MODULE:ATTR`` takes them, and its flags
    (``--queue``) win too. ``id`` None means a fresh ``<host>_<start time>`` per client,
    so one settings object serves many processes.
    """

    workers: Workers | None = None
    queues: dict[str, QueueConfig] = attrs.field(factory=dict, converter=validate_queues)
    id: str | None = None
    job_timeout: float | None = _config_default("job_timeout")
    max_attempts: int = _config_default("max_attempts")
    retry_policy: RetryPolicy | None = None
    fetch_cooldown: float = _config_default("fetch_cooldown")
    fetch_poll_interval: float = _config_default("fetch_poll_interval")
    poll_only: bool = _config_default("poll_only")
    prepared_statements: bool = _config_default("prepared_statements")
    scheduler_interval: float = _config_default("scheduler_interval")
    rescuer_interval: float = _config_default("rescuer_interval")
    rescue_stuck_jobs_after: float = _config_default("rescue_stuck_jobs_after")
    cleaner_interval: float = _config_default("cleaner_interval")
    completed_job_retention: float | None = _config_default("completed_job_retention")
    cancelled_job_retention: float | None = _config_default("cancelled_job_retention")
    discarded_job_retention: float | None = _config_default("discarded_job_retention")
    leader_interval: float = _config_default("leader_interval")
    periodic_jobs: tuple[PeriodicJob, ...] = ()
    error_handler: ErrorHandler | None = None
    soft_stop_timeout: float | None = None
    shutdown_timeout: float = _config_default("shutdown_timeout")
    startup_timeout: float | None = _config_default("startup_timeout")
    middleware: tuple[Any, ...] = ()
    hooks: tuple[Any, ...] = ()
    args_types: tuple[type[Any], ...] = ()

    def __attrs_post_init__(self) -> None:
        if self.workers is not None and not isinstance(self.workers, Workers):
            raise ValidationError("workers", "must be a trioqueue.Workers")
        # Every option is checked now, as open_client would check it, and normalised
        # (lists become tuples) so that the settings stay immutable.
        config = ClientConfig(**self.config_kwargs(with_id="settings"))
        for name in ("periodic_jobs", "middleware", "hooks", "args_types"):
            object.__setattr__(self, name, getattr(config, name))

    def config_kwargs(self, *, with_id: str | None = None) -> dict[str, Any]:
        """The ``ClientConfig`` keywords these settings give (``id`` only when set, or
        ``with_id`` in its place)."""
        kwargs = {name: getattr(self, name) for name in _DEFAULTS if name != "id"}
        chosen = self.id if self.id is not None else with_id
        if chosen is not None:
            kwargs["id"] = chosen
        return kwargs


def merge_settings(
    settings: WorkerSettings | None,
    workers: Workers | None,
    queues: Mapping[str, QueueConfig] | None,
    config: dict[str, Any],
) -> tuple[Workers | None, Mapping[str, QueueConfig] | None, dict[str, Any]]:
    """``open_client``'s keywords with ``settings`` under them: a keyword given beside the
    settings (``workers``/``queues`` not None, any config keyword) wins."""
    if settings is None:
        return workers, queues, config
    if not isinstance(settings, WorkerSettings):
        raise ValidationError("settings", "must be a trioqueue.WorkerSettings")
    return (
        workers if workers is not None else settings.workers,
        queues if queues is not None else settings.queues,
        {**settings.config_kwargs(), **config},
    )

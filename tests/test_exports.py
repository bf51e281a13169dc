"""The public facade: exactly the public names, each importable from `trioqueue`."""

from __future__ import annotations

import enum

import trioqueue as tq

API_NAMES = {
    "AttemptError",
    "DatabaseError",
    "ErrorHandlerResult",
    "Event",
    "EventKind",
    "GlobalLimit",
    "Workflow",
    "InsertOpts",
    "Job",
    "JobCancel",
    "JobInsertResult",
    "JobListParams",
    "JobListResult",
    "JobNotFoundError",
    "JobRunningError",
    "JobSnooze",
    "JobState",
    "PeriodicJob",
    "QueueConfig",
    "RateLimit",
    "UniqueOpts",
    "UnknownJobKindError",
    "ValidationError",
    "Workers",
    "migrate",
    "open_client",
}


def test_api_names_are_exported() -> None:
    missing = API_NAMES - set(tq.__all__)
    assert not missing
    for name in tq.__all__:
        assert hasattr(tq, name), name


def test_no_private_names_exported() -> None:
    assert all(not name.startswith("_") for name in tq.__all__)


def test_public_objects_report_the_facade_module() -> None:
    for name in tq.__all__:
        obj = getattr(tq, name)
        if isinstance(obj, type):
            assert obj.__module__ == "trioqueue", name


def test_enums_match_the_contract() -> None:
    assert issubclass(tq.JobState, enum.StrEnum)
    assert [s.value for s in tq.JobState] == [
        "available",
        "cancelled",
        "completed",
        "discarded",
        "pending",
        "retryable",
        "running",
        "scheduled",
    ]
    assert {k.value for k in tq.EventKind} == {
        "job_completed",
        "job_failed",
        "job_cancelled",
        "job_snoozed",
        "job_interrupted",
        "queue_paused",
        "queue_resumed",
    }


def test_error_hierarchy() -> None:
    assert issubclass(tq.ValidationError, ValueError)
    assert issubclass(tq.UnknownJobKindError, tq.ValidationError)
    for err in (tq.JobNotFoundError, tq.JobRunningError, tq.DatabaseError, tq.ValidationError):
        assert issubclass(err, tq.TrioqueueError)


def test_defaults_match_the_contract() -> None:
    opts = tq.InsertOpts()
    assert (opts.queue, opts.priority, opts.max_attempts, opts.pending) == (
        "default",
        1,
        None,
        False,
    )
    unique = tq.UniqueOpts()
    assert (unique.by_args, unique.by_period, unique.by_queue, unique.by_state) == (
        False,
        None,
        False,
        None,
    )
    params = tq.JobListParams()
    assert (params.limit, params.after) == (100, None)
    assert tq.QueueConfig().max_workers == 100
    cfg = tq.ClientConfig()
    assert cfg.job_timeout == 60.0
    assert cfg.max_attempts == 25
    assert (cfg.fetch_cooldown, cfg.fetch_poll_interval) == (0.1, 1.0)
    assert cfg.scheduler_interval == 5.0
    assert (cfg.rescuer_interval, cfg.rescue_stuck_jobs_after) == (30.0, 3600.0)
    assert cfg.cleaner_interval == 30.0
    assert (
        cfg.completed_job_retention,
        cfg.cancelled_job_retention,
        cfg.discarded_job_retention,
    ) == (86400.0, 86400.0, 604800.0)
    assert cfg.leader_interval == 5.0
    assert cfg.soft_stop_timeout is None
    assert cfg.shutdown_timeout == 10.0

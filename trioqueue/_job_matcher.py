"""Matching stored jobs against what a test expects (``trioqueue.testing``'s
``require_*``): validating ``expected`` once, comparing a job with it, and describing
the closest jobs when none matches."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Final, final

import attrs

from ._codec import decode_args, dumps, with_args
from .errors import ValidationError
from .job import Job, JobState
from .workers import args_kind

__all__ = ["JOB_FIELDS", "Matcher", "closest", "job_line"]

JOB_FIELDS: Final = (
    "queue",
    "priority",
    "max_attempts",
    "state",
    "tags",
    "scheduled_at",
    "metadata",
)
"""The job fields ``expected`` may name, besides ``args`` and the args type's fields."""

_CLOSEST: Final = 3
"""How many non-matching jobs a failure message describes."""


# ------------------------------------------------------------------------------------------
# Matching


def _field_names(args_type: type[Any]) -> frozenset[str] | None:
    """The args type's field names, or None when it has no declared fields."""
    if attrs.has(args_type):
        return frozenset(f.name for f in attrs.fields(args_type))
    if dataclasses.is_dataclass(args_type):
        return frozenset(f.name for f in dataclasses.fields(args_type))
    return None


def _json_value(field: str, value: object) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparing."""
    try:
        return json.loads(dumps(value))
    except (TypeError, ValueError) as exc:
        raise ValidationError(field, f"must be JSON-serialisable: {exc}") from None


def _check_job_field(name: str, value: object) -> object:
    """Validate one expected job field; return the value to compare with."""
    if name in ("queue",):
        if not isinstance(value, str):
            raise ValidationError(name, "must be a queue name (str)")
        return value
    if name in ("priority", "max_attempts"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValidationError(name, "must be an integer")
        return value
    if name == "state":
        try:
            if not isinstance(value, str):
                raise ValueError(value)
            return JobState(value)
        except ValueError:
            states = ", ".join(s.value for s in JobState)
            raise ValidationError(name, f"must be a JobState ({states}), got {value!r}") from None
    if name == "tags":
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ValidationError(name, "must be a sequence of strings")
        if not all(isinstance(t, str) for t in value):
            raise ValidationError(name, "must be a sequence of strings")
        return list(value)
    if name == "scheduled_at":
        if not isinstance(value, datetime) or value.utcoffset() is None:
            raise ValidationError(name, "must be a timezone-aware datetime")
        return value
    assert name == "metadata"
    if not isinstance(value, Mapping):
        raise ValidationError(name, "must be a mapping (a subset of the job's metadata)")
    return _json_value(name, dict(value))


def _show(value: object) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, JobState):
        return value.value
    return repr(value)


@final
class Matcher:
    """``expected`` for one args type, validated once; compares jobs with it."""

    def __init__(self, args_type: type[Any], expected: Mapping[str, object]) -> None:
        if not isinstance(args_type, type):
            raise ValidationError("args_type", f"must be a job args class, got {args_type!r}")
        self.args_type = args_type
        self.kind = args_kind(args_type)
        self.expected = dict(expected)
        self.job_checks: dict[str, object] = {}
        self.arg_checks: dict[str, object] = {}
        self.whole_args: tuple[object] | None = None
        fields = _field_names(args_type)
        for key, value in self.expected.items():
            if key == "args":
                if not isinstance(value, args_type):
                    raise ValidationError(
                        "args", f"must be a {args_type.__name__}, got {type(value).__name__}"
                    )
                self.whole_args = (value,)
            elif key in JOB_FIELDS:
                if fields is not None and key in fields:
                    raise ValidationError(
                        key,
                        f"is both a job field and a field of {args_type.__name__}; "
                        f"compare the args with args={args_type.__name__}(...) instead",
                    )
                self.job_checks[key] = _check_job_field(key, value)
            elif fields is None or key in fields:
                self.arg_checks[key] = value
            else:
                known = ", ".join(sorted(fields))
                raise ValidationError(
                    key,
                    f"is neither a field of {args_type.__name__} ({known}) nor one of "
                    f"args, {', '.join(JOB_FIELDS)}",
                )

    def describe(self) -> str:
        if not self.expected:
            return self.args_type.__name__
        inner = ", ".join(f"{k}={_show(v)}" for k, v in self.expected.items())
        return f"{self.args_type.__name__}({inner})"

    def typed(self, job: Job[Any]) -> tuple[Job[Any] | None, str | None]:
        """The job with decoded args, or None and why they could not be decoded."""
        try:
            return with_args(job, decode_args(self.args_type, job.args)), None
        except Exception as exc:
            return None, f"{type(exc).__name__}: {exc}"

    def differences(self, job: Job[Any]) -> tuple[Job[Any] | None, list[str]]:
        """The typed job and how it differs from ``expected`` (empty: it matches)."""
        diffs: list[str] = []
        if job.kind != self.kind:
            return None, [f"kind: expected {self.kind!r}, got {job.kind!r}"]
        for key, want in self.job_checks.items():
            got: object = getattr(job, key)
            if key == "metadata":
                assert isinstance(want, dict)
                for mkey, mwant in want.items():
                    if mkey not in job.metadata:
                        diffs.append(f"metadata[{mkey!r}]: expected {mwant!r}, got no such key")
                    elif job.metadata[mkey] != mwant:
                        diffs.append(
                            f"metadata[{mkey!r}]: expected {mwant!r}, got {job.metadata[mkey]!r}"
                        )
            elif got != want:
                diffs.append(f"{key}: expected {_show(want)}, got {_show(got)}")
        typed, why = self.typed(job)
        if typed is None:
            diffs.append(f"args: cannot be decoded as {self.args_type.__name__}: {why}")
            return None, diffs
        if self.whole_args is not None and typed.args != self.whole_args[0]:
            diffs.append(f"args: expected {self.whole_args[0]!r}, got {typed.args!r}")
        for key, want in self.arg_checks.items():
            if isinstance(typed.args, Mapping) and key in typed.args:
                got = typed.args[key]
            elif hasattr(typed.args, key):
                got = getattr(typed.args, key)
            else:
                diffs.append(f"{key}: expected {want!r}, the args have no such field")
                continue
            if got != want:
                diffs.append(f"{key}: expected {want!r}, got {got!r}")
        return typed, diffs


def job_line(job: Job[Any]) -> str:
    return f"job {job.id} ({job.kind}, {job.state.value}, queue {job.queue!r})"


def closest(matcher: Matcher, jobs: Sequence[Job[Any]]) -> list[str]:
    """Lines describing the jobs that differ least from ``matcher``'s expectations."""
    ranked = sorted(
        ((matcher.differences(job)[1], job) for job in jobs), key=lambda p: (len(p[0]), p[1].id)
    )
    lines = [f"  {job_line(job)}: {'; '.join(diffs)}" for diffs, job in ranked[:_CLOSEST]]
    if len(ranked) > _CLOSEST:
        lines.append(f"  ... and {len(ranked) - _CLOSEST} more")
    return lines


# ------------------------------------------------------------------------------------------
# Reading what was inserted

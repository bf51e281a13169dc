"""The worker's log output on stderr: ``text`` for people, ``json`` for log collectors.

JSON: one object per line (newlines inside a message or traceback are escaped, so a line
is always one record), with ``time`` (ISO 8601, UTC), ``level``, ``logger`` and
``message``; ``exception`` (the formatted traceback) when the record carries one, ``stack``
when it carries a stack; and every field passed with ``extra=`` under its own name (the
executor's ``job_id``, ``kind``, ``queue``, ``attempt``, ``duration``, ``outcome`` and
``state``, see docs/observability.md). An extra field named like one of the fixed keys is
left out: the fixed keys always mean what they say. Values JSON cannot hold (a datetime,
an object, NaN) appear as their ``str()``.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from datetime import UTC, datetime
from typing import Any, Final

__all__ = ["LOG_FORMATS", "JsonFormatter", "setup_logging"]

LOG_FORMATS: Final = ("text", "json")

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_RECORD_FIELDS: Final = frozenset(
    {
        *logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__,
        "message",
        "asctime",
        "taskName",  # Python 3.12+
    }
)
"""Attributes every LogRecord has: anything else on a record came from ``extra=``."""

_FIXED_KEYS: Final = frozenset({"time", "level", "logger", "message", "exception", "stack"})


def _json_safe(value: Any) -> Any:
    """``value`` if ``json.dumps`` writes it as standard JSON, else its ``str()``."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return str(value)
    return value


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            # Cached on the record, as logging.Formatter does for other handlers.
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            document["exception"] = record.exc_text
        if record.stack_info:
            document["stack"] = self.formatStack(record.stack_info)
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS and key not in _FIXED_KEYS:
                document[key] = _json_safe(value)
        return json.dumps(document, ensure_ascii=False, default=str)


def setup_logging(level: str, log_format: str) -> None:
    """Send every logger's records at ``level`` and above to stderr, as ``log_format``
    (``text`` or ``json``). Leaves logging alone if the root logger already has handlers
    (the command runs inside a program that set up its own)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler])

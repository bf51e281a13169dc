"""Values as PostgreSQL stores them: timestamps, jsonb, text, smallint, bit(8).

Each function takes a value the way a statement's parameter arrives and returns it the way
the column keeps it, or raises ``MemoryDataError`` with the message PostgreSQL (or psycopg,
before sending) would give. The jsonb operators the statements use (``||``, ``?``, ``-``)
are here too, on decoded JSON values.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, NoReturn

from ..._validate import text_problem
from ...job import JobState
from .errors import MemoryDataError

_SMALLINT_MAX: Final = 32767

# The bit(8) unique_states string, leftmost character first: tq_job_state_in_bitmask()
# reads `available` from bit 7 (the rightmost) down to `scheduled` at bit 0 (the leftmost).
_BIT_ORDER: Final = (
    JobState.SCHEDULED,
    JobState.RUNNING,
    JobState.RETRYABLE,
    JobState.PENDING,
    JobState.DISCARDED,
    JobState.COMPLETED,
    JobState.CANCELLED,
    JobState.AVAILABLE,
)


def _ts(value: datetime) -> datetime:
    """A timestamptz: aware datetimes in UTC; naive ones are taken as UTC, as a UTC
    session does."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _opt_ts(value: datetime | None) -> datetime | None:
    return None if value is None else _ts(value)


def _ts_json(value: datetime) -> str:
    """A timestamptz as ``to_json`` writes it in a UTC session:
    ``2026-01-01T00:00:00.5+00:00`` (trailing zeros of the fraction dropped)."""
    text = value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}".rstrip("0")
    return text + "+00:00"


def _numeric(text: str) -> int | float:
    """A JSON number as jsonb keeps it (numeric): ``1e3`` comes back as ``1000``."""
    if Decimal(text).as_tuple().exponent >= 0:  # type: ignore[operator]
        return int(Decimal(text))
    return float(text) + 0.0  # numeric has no negative zero: -0.0 reads back as 0.0


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"Token {name!r} is invalid")


def _jsonb_sorted(value: dict[str, Any]) -> dict[str, Any]:
    """jsonb's key order: shorter keys first, then bytewise."""
    return dict(sorted(value.items(), key=lambda kv: (len(kv[0].encode()), kv[0].encode())))


def _text(value: str) -> str:
    """``value`` if PostgreSQL can take it as text: psycopg refuses a NUL before sending,
    and a lone surrogate cannot be encoded at all."""
    problem = text_problem(value)
    if problem == "nul":
        raise MemoryDataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
    if problem == "surrogate":
        raise MemoryDataError("'utf-8' codec can't encode a lone surrogate")
    return value


def _json_string(value: str) -> str:
    """A string inside a jsonb value: no NUL (``\\u0000``) and no lone surrogate."""
    problem = text_problem(value)
    if problem == "nul":
        raise MemoryDataError("unsupported Unicode escape sequence (\\u0000)")
    if problem == "surrogate":
        raise MemoryDataError("invalid Unicode surrogate in a JSON string")
    return value


def _normalize(value: Any) -> Any:
    if isinstance(value, dict):
        for key in value:
            _json_string(key)
        return _jsonb_sorted({k: _normalize(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_normalize(v) for v in value]
    if isinstance(value, str):
        return _json_string(value)
    return value


def _jsonb(text: str) -> Any:
    """Parse ``text`` as ``::jsonb`` would, or raise MemoryStoreError."""
    _text(text)
    try:
        value = json.loads(text, parse_float=_numeric, parse_constant=_reject_constant)
    except (TypeError, ValueError) as exc:
        raise MemoryDataError(f"invalid input syntax for type json: {exc}") from None
    return _normalize(value)


def _copy(value: Any) -> Any:
    """A deep copy of a JSON value, so callers cannot change stored rows."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def _concat(left: Any, right: Any) -> Any:
    """jsonb ``||``: objects merge (right wins); otherwise arrays concatenate."""
    if isinstance(left, dict) and isinstance(right, dict):
        return _jsonb_sorted({**left, **right})
    return (left if isinstance(left, list) else [left]) + (
        right if isinstance(right, list) else [right]
    )


def _has_key(value: Any, key: str) -> bool:
    """jsonb ``?``."""
    if isinstance(value, dict):
        return key in value
    if isinstance(value, list):
        return key in [v for v in value if isinstance(v, str)]
    return isinstance(value, str) and value == key


def _minus(value: Any, key: str) -> Any:
    """jsonb ``- text``."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != key}
    if isinstance(value, list):
        return [v for v in value if v != key or not isinstance(v, str)]
    raise MemoryDataError("cannot delete from scalar")


def _rescue_count(metadata: Any) -> int:
    """The ``rescue_count`` as job_rescue_many reads it: a JSON number of one to nine
    digits, anything else 0 (so one odd row cannot fail a whole rescue)."""
    if not isinstance(metadata, dict):
        return 0
    value = metadata.get("rescue_count")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 999_999_999:
        return value
    return 0


def _json_text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _insert_payload(queue: str) -> str:
    """``json_build_object('queue', q)::text``."""
    return '{"queue" : ' + _json_text(queue) + "}"


def _unique_states(bits: str | None) -> frozenset[JobState] | None:
    if bits is None:
        return None
    if len(bits) != 8 or set(bits) - {"0", "1"}:
        raise MemoryDataError(f'"{bits}" is not a valid bit(8) value')
    return frozenset(state for state, bit in zip(_BIT_ORDER, bits, strict=True) if bit == "1")


def _smallint(value: int) -> int:
    if not -_SMALLINT_MAX - 1 <= value <= _SMALLINT_MAX:
        raise MemoryDataError("smallint out of range")
    return value


def _check_length(relation: str, constraint: str, value: str) -> None:
    if not 0 < len(value) < 129:
        _violation(relation, constraint)


def _violation(relation: str, constraint: str) -> NoReturn:
    raise MemoryDataError(
        f'new row for relation "{relation}" violates check constraint "{constraint}"'
    )

"""Loads the named SQL statements in ``queries/*.sql`` once, at import."""

from __future__ import annotations

import re
from importlib import resources

__all__ = ["QUERIES"]

_NAME_RE = re.compile(r"^-- name: (\w+)\s*$", re.M)


def _load() -> dict[str, str]:
    found: dict[str, str] = {}
    for entry in resources.files(__package__).joinpath("queries").iterdir():
        if not entry.name.endswith(".sql"):
            continue
        text = entry.read_text(encoding="utf-8")
        marks = list(_NAME_RE.finditer(text))
        for mark, following in zip(marks, [*marks[1:], None], strict=True):
            body = text[mark.end() : following.start() if following else len(text)]
            lines = [ln for ln in body.strip().splitlines() if not ln.lstrip().startswith("--")]
            sql = "\n".join(lines).strip().rstrip(";")
            if mark.group(1) in found:
                raise RuntimeError(f"query {mark.group(1)} is defined twice")
            found[mark.group(1)] = sql
    return found


def _returning_id(sql: str) -> str:
    """``sql`` with its RETURNING list cut down to the job id."""
    head, sep, _ = sql.rpartition("RETURNING")
    if not sep:
        raise RuntimeError("expected a RETURNING clause")
    return head + "RETURNING j.id"


QUERIES = _load()
# Writing outcomes when no subscriber wants the jobs back: the same statement, id only.
QUERIES["job_set_state_if_running_many_ids"] = _returning_id(
    QUERIES["job_set_state_if_running_many"]
)

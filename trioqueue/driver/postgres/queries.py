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


def _ids_only(sql: str) -> str:
    """job_set_state_if_running_many for a writer that wants the written ids only: the
    rows come back as ``(id,)``, and the other columns are never read."""
    head, sep, tail = sql.partition("    RETURNING j.id, j.kind,")
    _returned, sep2, rest = tail.partition("\n)")
    body, sep3, _select = rest.rpartition("\nSELECT id, kind,")
    if not (sep and sep2 and sep3):
        raise RuntimeError("job_set_state_if_running_many changed: update _ids_only")
    returning = "    RETURNING j.id, j.state, j.has_dependents AS hd, j.waited\n)"
    final = "\nSELECT written.id FROM written CROSS JOIN notified CROSS JOIN advanced"
    return head + returning + body + final


QUERIES = _load()


def _newest_first(sql: str) -> str:
    """job_list newest first: the cursor ($7) pages on to smaller ids."""
    after = "($7::bigint IS NULL OR id > $7::bigint)"
    if after not in sql or not sql.endswith("ORDER BY id\nLIMIT $8"):
        raise RuntimeError("job_list changed: update _newest_first")
    sql = sql.replace(after, "($7::bigint IS NULL OR id < $7::bigint)")
    return sql.removesuffix("ORDER BY id\nLIMIT $8") + "ORDER BY id DESC\nLIMIT $8"


# The predicate of tq_job_fetch_idx (migration 3), as SQL.
_LIVE_STATES = "'available', 'pending', 'retryable', 'running', 'scheduled'"


def _live_states_variant(sql: str) -> str:
    """``sql`` (job_list or job_list_desc) for a list of live states only: it sorts by
    ``id + 0``, which the primary key cannot serve, so the planner takes those states'
    entries from tq_job_fetch_idx and sorts them (as many as the backlog) instead of
    walking the primary key through finalized jobs until it has a page; and the states
    ($4, never NULL here) are compared as an enum array the planner can estimate, which a
    text array cast to the enum is not (that made it pick a sequential scan). The live
    states are also spelled out: the fetch index holds live jobs only (migration 3), and
    the planner uses a partial index only when the query's own conditions imply its
    predicate, which ``$4`` alone does not in a generic plan."""
    state_filter = "($4::text[] IS NULL OR state = ANY($4::text[]::tq_job_state[]))"
    if state_filter not in sql or "ORDER BY id" not in sql:
        raise RuntimeError("job_list changed: update _live_states_variant")
    live = "state = ANY($4::tq_job_state[])\n  AND state IN (" + _LIVE_STATES + ")"
    return sql.replace(state_filter, live).replace("ORDER BY id", "ORDER BY id + 0")


QUERIES["job_list_desc"] = _newest_first(QUERIES["job_list"])
for _name in ("job_list", "job_list_desc"):
    QUERIES[f"{_name}_live"] = _live_states_variant(QUERIES[_name])


def _workflow_variant(sql: str) -> str:
    """``sql`` (job_list or job_list_desc) for one workflow's tasks ($10): a plain equality
    that tq_job_workflow_idx serves even in a generic plan."""
    if "\nORDER BY id" not in sql:
        raise RuntimeError("job_list changed: update _workflow_variant")
    return sql.replace("\nORDER BY id", "\n  AND workflow_id = $10::text\nORDER BY id", 1)


for _name in ("job_list", "job_list_desc"):
    QUERIES[f"{_name}_workflow"] = _workflow_variant(QUERIES[_name])
# Writing outcomes when no subscriber wants the jobs back: the same statement, ids only.
QUERIES["job_set_state_if_running_many_ids"] = _ids_only(QUERIES["job_set_state_if_running_many"])

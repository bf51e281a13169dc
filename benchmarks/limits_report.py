"""The flow control benchmark's statistics, targets and tables (``python -m
benchmarks.limits``): medians over rounds, ratios to the no-limit run of the same round,
and one table printed at the end and written as markdown."""

from __future__ import annotations

import statistics
from typing import Any

from .stats import summary

# Not summarized: bookkeeping, or not a number.
_SKIP = {"round", "jobs", "failed", "seconds", "starts_in_window"}


def summarize(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{"scenario/variant": {metric: summary over rounds}} for every numeric metric."""
    values: dict[str, dict[str, list[float]]] = {}
    for rec in records:
        metrics = values.setdefault(f"{rec['scenario']}/{rec['variant']}", {})
        for key, value in rec.items():
            if key in _SKIP or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metrics.setdefault(key, []).append(float(value))
    return {v: {k: summary(xs) for k, xs in m.items()} for v, m in values.items()}


def same_round(
    records: list[dict[str, Any]],
    scenario: str,
    variant: str,
    metric: str,
    base: str = "unlimited",
) -> list[float]:
    """``variant``'s ``metric`` over ``base``'s, per round that measured both."""

    def by_round(name: str) -> dict[int, float]:
        return {
            r["round"]: r[metric]
            for r in records
            if r["scenario"] == scenario and r["variant"] == name and r.get(metric) is not None
        }

    a, b = by_round(variant), by_round(base)
    return [a[k] / b[k] for k in sorted(a) if b.get(k)]


def _range(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def evaluate(
    records: list[dict[str, Any]], stats: dict[str, dict[str, Any]], cfg: dict[str, Any]
) -> list[dict[str, Any]]:
    """The issue's targets, each with its value (a median over rounds), range and verdict."""
    out: list[dict[str, Any]] = []

    def add(key: str, what: str, found: dict[str, Any] | None, goal: float, op: str) -> None:
        entry: dict[str, Any] = {"key": key, "what": what, "goal": goal, "op": op}
        entry["value"] = found["median"] if found else None
        entry["range"] = [found["min"], found["max"]] if found else None
        v = entry["value"]
        if v is None:
            entry["met"] = None
        elif op == ">=":
            entry["met"] = v >= goal
        elif op == "<=":
            entry["met"] = v <= goal
        else:  # "within": |v - 1| <= goal
            entry["met"] = abs(v - 1) <= goal
        out.append(entry)

    if "processing" in cfg["scenario"]:
        add(
            "nobind",
            f"processing, GlobalLimit({cfg['nobind_limit']:,}) that never binds / no limit",
            _range(same_round(records, "processing", "nobind", "processing_jobs_per_s")),
            0.9,
            ">=",
        )
        add(
            "partitioned",
            f"processing, {cfg['customers']} partitions x limit {cfg['partition_limit']}"
            " / no limit",
            _range(same_round(records, "processing", "partitioned", "processing_jobs_per_s")),
            0.7,
            ">=",
        )
    if "rate" in cfg["scenario"]:
        ratios = [r["achieved_ratio"] for r in records if r["scenario"] == "rate"]
        add(
            "rate",
            f"rate achieved over {cfg['rate_seconds']:g} s / configured"
            f" ({cfg['rate_limit']:,} per {cfg['rate_per']:g} s)",
            _range(ratios),
            0.05,
            "within",
        )
        most = stats.get("rate/rate", {}).get("max_in_any_window")
        add(
            "rate_window",
            f"most starts in any {cfg['rate_per']:g} s window",
            {"median": most["max"], "min": most["min"], "max": most["max"]} if most else None,
            cfg["rate_limit"],
            "<=",
        )
    return out


# ------------------------------------------------------------------------------ the table


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "jobs/s":
        return f"{value:,.0f}"
    if unit in ("ms", "per_s"):
        return f"{value:,.1f}"
    if unit == "xact":
        return f"{value:.4f}"
    if unit == "ratio":
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return f"{value:,.0f}"


def _cell(stat: dict[str, Any] | None, unit: str) -> str:
    if not stat:
        return "-"
    if stat.get("n", 2) == 1 or stat["min"] == stat["max"]:
        return _fmt(stat["median"], unit)
    return f"{_fmt(stat['median'], unit)} ({_fmt(stat['min'], unit)}-{_fmt(stat['max'], unit)})"


_GOALS = {">=": "≥ {g}", "<=": "≤ {g:,}", "within": "within ±{p:.0%}"}
_MET = {True: "yes", False: "NO", None: "-"}

PROCESSING_ROWS = (
    ("processing_jobs_per_s", "processing (jobs/s)", "jobs/s"),
    ("batch_enqueue_jobs_per_s", "batch enqueue (jobs/s)", "jobs/s"),
    ("xact_per_job", "transactions per job", "xact"),
    ("cpu_us_per_job", "worker CPU per job (µs)", "count"),
)
FAIRNESS_ROWS = (
    ("others_worst_wait_ms", "worst wait of the other customers (ms)", "ms"),
    ("others_median_worst_wait_ms", "median of their worst waits (ms)", "ms"),
    ("bulk_backlog_at_arrival", "bulk jobs not started when they came", "count"),
    ("bulk_backlog_ms", "time to start those (ms; * estimated from their rate)", "ms"),
    ("others_wait_share_of_backlog", "worst wait / that time", "ratio"),
    ("bulk_jobs_per_s_after_arrival", "bulk starts after they came (jobs/s)", "jobs/s"),
    ("bulk_left_at_end", "bulk jobs left when the run ended", "count"),
    ("bulk_worst_wait_ms", "bulk customer's worst wait (ms)", "ms"),
)


def rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str, str, str]]:
    """(scenario, limit, measure, median (min-max), vs no limit, goal, met) per line."""
    stats = report["stats"]
    records = report["records"]
    targets = {t["key"]: t for t in report["targets"]}
    out = []

    def goal_of(key: str) -> tuple[str, str]:
        t = targets.get(key)
        if t is None:
            return "", ""
        goal = _GOALS[t["op"]].format(g=t["goal"], p=t["goal"])
        return goal, _MET[t["met"]]

    for case in report["cases"].get("processing", []):
        name = case["name"]
        for metric, title, unit in PROCESSING_ROWS:
            stat = stats.get(f"processing/{name}", {}).get(metric)
            vs = goal = met = ""
            if name != "unlimited":
                vs = _cell(_stat(same_round(records, "processing", name, metric)), "ratio")
                if metric == "processing_jobs_per_s":
                    goal, met = goal_of(name)
            out.append(("processing", case["label"], title, _cell(stat, unit), vs, goal, met))
    for case in report["cases"].get("rate", []):
        stat = stats.get("rate/rate", {})
        cfg = report["config"]
        configured = cfg["rate_limit"] / cfg["rate_per"]
        goal, met = goal_of("rate")
        out.append(
            (
                "rate",
                case["label"],
                f"achieved starts/s over {cfg['rate_seconds']:g} s",
                _cell(stat.get("achieved_per_s"), "per_s"),
                f"{_cell(stat.get('achieved_ratio'), 'ratio')} of {configured:,.1f}/s",
                goal,
                met,
            )
        )
        goal, met = goal_of("rate_window")
        most = stat.get("max_in_any_window")
        out.append(
            (
                "rate",
                case["label"],
                f"most starts in any {cfg['rate_per']:g} s window",
                _fmt(most["max"] if most else None, "count"),
                "",
                goal,
                met,
            )
        )
        unlimited = stats.get("processing/unlimited", {}).get("processing_jobs_per_s")
        if unlimited:
            out.append(
                (
                    "rate",
                    "no limit (the processing runs)",
                    "processing (jobs/s)",
                    _cell(unlimited, "jobs/s"),
                    "",
                    "",
                    "",
                )
            )
    for case in report["cases"].get("fairness", []):
        name = case["name"]
        for metric, title, unit in FAIRNESS_ROWS:
            stat = stats.get(f"fairness/{name}", {}).get(metric)
            vs = ""
            if name != "unlimited" and metric.endswith("_ms"):
                vs = _cell(_stat(same_round(records, "fairness", name, metric)), "ratio")
            shown = _cell(stat, unit)
            if metric == "bulk_backlog_ms" and any(
                r.get("bulk_backlog_estimated")
                for r in records
                if r["scenario"] == "fairness" and r["variant"] == name
            ):
                shown += " *"
            out.append(("fairness", case["label"], title, shown, vs, "", ""))
    return out


def _stat(values: list[float]) -> dict[str, Any] | None:
    found = _range(values)
    return {**found, "n": len(values)} if found else None


HEADER = ("scenario", "limit", "measure", "median (min-max)", "vs no limit", "goal", "met")


def console_table(report: dict[str, Any]) -> str:
    lines = [HEADER, *rows(report)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = []
    last = ("", "")
    for line in lines:
        shown = list(line)
        if (line[0], line[1]) == last:
            shown[0] = shown[1] = ""
        last = (line[0], line[1])
        out.append("  ".join(cell.ljust(w) for cell, w in zip(shown, widths, strict=True)))
    return "\n".join(s.rstrip() for s in out)


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    git = report["git"]
    machine = report["machine"]
    server = report["server"]
    lines = [
        f"# trioqueue flow control benchmark, {report['started_at']}",
        "",
        f"Command: `{report['command']}`  ",
        f"trioqueue measured: commit `{git['commit'][:12]}` ({git.get('source', '')})"
        + (" plus uncommitted changes" if git["trioqueue_uncommitted_changes"] else "")
        + "  ",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB,"
        f" Python {machine['python']}  ",
        f"PostgreSQL {server['server_version']} ({server['where']}; fsync {server['fsync']},"
        f" synchronous_commit {server['synchronous_commit']})  ",
        f"Rounds: {cfg['rounds']} (interleaved, order rotated); scenarios:"
        f" {', '.join(cfg['scenario'])}; duration {report['duration_s'] / 60:.1f} min  ",
        f"Sizes: {cfg['jobs']:,} jobs per processing run over {cfg['customers']} customers;"
        f" rate backlog {cfg['rate_backlog']:,} jobs; fairness: a bulk of {cfg['fair_bulk']:,}"
        f" jobs, then {cfg['fair_customers'] - 1} customers x {cfg['fair_jobs']} jobs after"
        f" {cfg['fair_arrive_after']:,} bulk starts (the bulk then drains for at most"
        f" {cfg['fair_drain_seconds']:g} s); each job sleeps {cfg['job_ms']:g} ms  ",
        f"Worker client: `{report['settings']}`  ",
        "CPU busy with other work before each round: "
        + (", ".join(f"{b:.0%}" for b in report["background_cpu_busy"]) or "unknown"),
        "",
        "Cells: median over rounds (min-max); *vs no limit*: ratios to the no-limit run of"
        " the same round.",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|---|---|---|---:|---:|---|:---:|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows(report)]
    if report["errors"]:
        lines += ["", "## Errors", ""]
        for e in report["errors"]:
            first = e["error"].splitlines()[0] if e["error"] else ""
            lines.append(f"- round {e['round']} {e['scenario']} {e['variant']}: {first}")
    return "\n".join(lines) + "\n"

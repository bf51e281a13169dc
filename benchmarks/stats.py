"""Statistics over rounds (median, range, ratios of same-round results) and the targets
they are judged against."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

# Every target of the issue: (key, what, ratio to a peer or a plain value, goal, operator).
TARGETS = (
    ("processing", "processing no-op jobs vs pgqueuer batch 100", "ratio", 2.0, ">="),
    ("batch_enqueue", "batch enqueue (insert_many_fast) vs pgqueuer", "ratio", 2.0, ">="),
    ("single_enqueue", "single insert vs pgqueuer", "ratio", 1.3, ">="),
    ("latency_p50", "idle latency insert → start, p50 (ms)", "value", 1.5, "<="),
    ("latency_p99", "idle latency insert → start, p99 (ms)", "value", 5.0, "<="),
    ("xact_per_job", "database transactions per processed job", "value", 0.05, "<="),
    ("rss", "peak RSS working {rss_jobs:,} queued jobs (MB)", "value", 150.0, "<="),
    ("finalized", "throughput with {finalized_rows:,} finalized rows / empty", "value", 0.8, ">="),
)


def quantile(ordered: list[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted list (NaN when empty)."""
    if not ordered:
        return float("nan")
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "values": values,
    }


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{variant: {metric: summary}} over rounds, for every numeric metric."""
    skip = {"round", "jobs", "seconds", "transactions", "finalized_rows", "rss_jobs"}
    values: dict[str, dict[str, list[float]]] = {}
    for rec in records:
        metrics = values.setdefault(rec["variant"], {})
        for key, value in rec.items():
            if key in skip or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key == "sweep_jobs_per_s":
                key = f"sweep_{rec['max_workers']}_jobs_per_s"
            elif key == "max_workers":
                continue
            metrics.setdefault(key, []).append(float(value))
    return {v: {k: summary(xs) for k, xs in m.items()} for v, m in values.items()}


def per_round(records: list[dict[str, Any]], variant: str, metric: str) -> dict[int, float]:
    return {r["round"]: r[metric] for r in records if r["variant"] == variant and metric in r}


def ratio(
    records: list[dict[str, Any]],
    stats: dict[str, dict[str, Any]],
    a: tuple[str, str],
    b: tuple[str, str],
) -> dict[str, Any] | None:
    """Median of ``a`` over median of ``b``, and the range of same-round ratios."""
    try:
        med = stats[a[0]][a[1]]["median"] / stats[b[0]][b[1]]["median"]
    except (KeyError, ZeroDivisionError):
        return None
    ra, rb = per_round(records, *a), per_round(records, *b)
    rounds = [ra[k] / rb[k] for k in sorted(ra) if rb.get(k)]
    return {"median": med, "min": min(rounds, default=med), "max": max(rounds, default=med)}


def evaluate(
    records: list[dict[str, Any]], stats: dict[str, dict[str, Any]], cfg: argparse.Namespace
) -> list[dict[str, Any]]:
    def med(variant: str, metric: str) -> float | None:
        return stats.get(variant, {}).get(metric, {}).get("median")

    out = []
    pairs = {
        "processing": (
            ("trioqueue", "processing_jobs_per_s"),
            ("pgqueuer_b100", "processing_jobs_per_s"),
        ),
        "batch_enqueue": (
            ("trioqueue", "batch_enqueue_jobs_per_s"),
            ("pgqueuer_b10", "batch_enqueue_jobs_per_s"),
        ),
        "single_enqueue": (
            ("trioqueue", "single_enqueue_jobs_per_s"),
            ("pgqueuer_b10", "single_enqueue_jobs_per_s"),
        ),
    }
    values = {
        "latency_p50": med("trioqueue", "latency_p50_ms"),
        "latency_p99": med("trioqueue", "latency_p99_ms"),
        "xact_per_job": med("trioqueue", "xact_per_job"),
        "rss": med("trioqueue", "rss_peak_mb"),
    }
    fin = ratio(
        records,
        stats,
        ("trioqueue", "finalized_processing_jobs_per_s"),
        ("trioqueue", "processing_jobs_per_s"),
    )
    values["finalized"] = fin["median"] if fin else None
    for key, what, kind, goal, op in TARGETS:
        what = what.format(rss_jobs=cfg.rss_jobs, finalized_rows=cfg.finalized_rows)
        entry: dict[str, Any] = {"key": key, "what": what, "goal": goal, "op": op}
        if kind == "ratio":
            a, b = pairs[key]
            entry["trioqueue"] = med(*a)
            entry["peer"] = med(*b)
            r = ratio(records, stats, a, b)
            entry["value"] = r["median"] if r else None
            entry["range"] = [r["min"], r["max"]] if r else None
        else:
            entry["value"] = values[key]
            if key == "finalized" and fin:
                entry["range"] = [fin["min"], fin["max"]]
        v = entry["value"]
        entry["met"] = None if v is None else (v >= goal if op == ">=" else v <= goal)
        out.append(entry)
    return out

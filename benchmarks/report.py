"""The reports of a run: the markdown file, and the targets table printed at the end."""

from __future__ import annotations

import json
from typing import Any


def fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if metric.endswith("jobs_per_s"):
        return f"{value:,.0f}"
    if metric.endswith("_ms"):
        return f"{value:.2f}"
    if "xact" in metric:
        return f"{value:.4f}"
    if metric.endswith("_mb") or metric.endswith("us_per_job"):
        return f"{value:,.0f}"
    return f"{value:.3g}"


def cell(stats: dict[str, Any] | None, metric: str) -> str:
    if not stats:
        return "-"
    if stats["n"] == 1:
        return fmt(stats["median"], metric)
    return (
        f"{fmt(stats['median'], metric)} ({fmt(stats['min'], metric)}-{fmt(stats['max'], metric)})"
    )


MAIN_ROWS = (
    ("processing_jobs_per_s", "processing no-op jobs (jobs/s)"),
    ("batch_enqueue_jobs_per_s", "batch enqueue (jobs/s)"),
    ("single_enqueue_jobs_per_s", "single enqueue (jobs/s)"),
    ("latency_p50_ms", "idle latency p50 (ms)"),
    ("latency_p99_ms", "idle latency p99 (ms)"),
    ("latency_max_ms", "idle latency max (ms)"),
    ("latency_insert_p50_ms", "of which the insert call, p50 (ms)"),
    ("xact_per_job", "transactions per processed job"),
    ("cpu_us_per_job", "worker CPU per job (µs)"),
    ("worker_rss_peak_mb", "worker peak RSS (MB)"),
)

TRIOQUEUE_ROWS = (
    ("finalized_processing_jobs_per_s", "processing with {finalized_rows} finalized rows (jobs/s)"),
    ("rss_peak_mb", "peak RSS working {rss_jobs} queued jobs (MB)"),
    ("rss_before_mb", "RSS before the client opened (MB)"),
    ("rss_processing_jobs_per_s", "processing {rss_jobs} jobs (jobs/s)"),
    ("ceiling_jobs_per_s", "database ceiling: 1000-row claim + update, raw SQL (jobs/s)"),
)


def markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    stats = report["stats"]
    variants = report["variants"]
    lines = [
        f"# trioqueue benchmark, {report['started_at']}",
        "",
        f"Command: `{report['command']}`  ",
        f"trioqueue measured: commit `{report['git']['commit'][:12]}`"
        f" ({report['git'].get('source', 'working tree')})"
        + (
            " plus uncommitted changes to "
            + ", ".join(report["git"].get("uncommitted_files", []))
            + f" (diff sha256 {report['git'].get('uncommitted_diff_sha256')})"
            if report["git"]["trioqueue_uncommitted_changes"]
            else ""
        )
        + "  ",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['memory_gib']} GiB, {report['machine']['os']}, "
        f"Python {report['machine']['python']}  ",
        f"PostgreSQL {report['server']['server_version']} ({report['server']['where']}; "
        f"fsync {report['server']['fsync']}, synchronous_commit "
        f"{report['server']['synchronous_commit']}, shared_buffers "
        f"{report['server']['shared_buffers']})  ",
        f"Rounds: {cfg['rounds']} (interleaved); jobs per run: {cfg['jobs']:,}; "
        f"single inserts: {cfg['single_inserts']:,}; latency samples: {cfg['latency_samples']}"
        f" per round; duration {report['duration_s'] / 60:.1f} min",
        "",
        f"CPU busy with other work, measured for 1 s before each round: "
        f"{background_line(report['background_cpu_busy'])}",
        "",
        "Cells: median over rounds (min-max).",
        "",
        "## Targets",
        "",
        "| target | trioqueue | peer | result | goal | met |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    for t in report["targets"]:
        value = t["value"]
        if t["key"] in ("processing", "batch_enqueue", "single_enqueue"):
            result = "-" if value is None else f"{value:.2f}x"
            if t.get("range") and cfg["rounds"] > 1:
                result += f" ({t['range'][0]:.2f}-{t['range'][1]:.2f})"
            tq = fmt(t.get("trioqueue"), "jobs_per_s")
            peer = fmt(t.get("peer"), "jobs_per_s")
            goal = f"≥ {t['goal']}x"
        else:
            tq = peer = ""
            if value is None:
                result = "-"
            elif t["key"] == "finalized":
                result = f"{value:.2f}"
                if t.get("range") and cfg["rounds"] > 1:
                    result += f" ({t['range'][0]:.2f}-{t['range'][1]:.2f})"
            elif t["key"] == "xact_per_job":
                result = f"{value:.4f}"
            else:
                result = f"{value:.2f}"
            goal = f"{'≥' if t['op'] == '>=' else '≤'} {t['goal']}"
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['what']} | {tq} | {peer} | {result} | {goal} | {met} |")
    lines += ["", "## All systems", ""]
    header = "| measure | " + " | ".join(v["label"] for v in variants) + " |"
    lines += [header, "|---|" + "---:|" * len(variants)]
    for metric, title in MAIN_ROWS:
        row = [cell(stats.get(v["name"], {}).get(metric), metric) for v in variants]
        if all(c == "-" for c in row):
            continue
        lines.append(f"| {title} | " + " | ".join(row) + " |")
    tq = stats.get("trioqueue", {})
    if tq:
        lines += ["", "## trioqueue only", "", "| measure | median (min-max) |", "|---|---:|"]
        for metric, title in TRIOQUEUE_ROWS:
            if metric in tq:
                name = title.format(
                    finalized_rows=f"{cfg['finalized_rows']:,}", rss_jobs=f"{cfg['rss_jobs']:,}"
                )
                lines.append(f"| {name} | {cell(tq[metric], metric)} |")
        sweep = sorted((int(k.split("_")[1]), k) for k in tq if k.startswith("sweep_"))
        for workers, key in sweep:
            lines.append(f"| processing at max_workers={workers} (jobs/s) | {cell(tq[key], key)} |")
    lines += ["", "## Settings", ""]
    for v in variants:
        shown = ", ".join(f"{k} {x}" for k, x in v["versions"].items())
        lines.append(f"- **{v['label']}** ({shown}): `{json.dumps(v['settings'])}`")
    if report["errors"]:
        lines += ["", "## Errors", ""]
        for e in report["errors"]:
            first = e["error"].splitlines()[0] if e["error"] else ""
            lines.append(f"- round {e['round']} {e['variant']} {e['measure']}: {first}")
    return "\n".join(lines) + "\n"


def background_line(busy: list[float]) -> str:
    if not busy:
        return "unknown"
    return ", ".join(f"{b:.0%}" for b in busy) + " of all cores"


def console_table(report: dict[str, Any]) -> str:
    out = []
    for t in report["targets"]:
        value = t["value"]
        shown = "-" if value is None else (f"{value:.4f}" if value < 0.1 else f"{value:.2f}")
        met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        out.append(f"  {t['what']:<52} {shown:>10}  goal {t['op']} {t['goal']:<5} {met}")
    return "\n".join(out)

"""Plots of a harness result: ``PYTHON benchmarks/plots.py RESULT.json OUT_DIR``.

Runs in benchmarks/.venv-peers, where the harness installs matplotlib (never a dependency of
trioqueue itself). Writes:

- ``throughput_vs_max_workers.png``: trioqueue's processing rate against ``max_workers``
  (median over rounds, bars from min to max), with the peers' processing rates as lines;
- ``latency_cdf.png``: the distribution of idle insert → start latency, every sample of
  every round, per system;
- ``rates.png``: processing, batch enqueue and single enqueue rates side by side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLORS = {
    "trioqueue": "#1f77b4",
    "pgqueuer_b10": "#ff7f0e",
    "pgqueuer_b100": "#d62728",
    "procrastinate": "#2ca02c",
}


def _subtitle(report: dict) -> str:
    commit = report["git"]["commit"][:10]
    dirty = "+changes" if report["git"]["trioqueue_uncommitted_changes"] else ""
    return (
        f"{report['machine']['cores']} cores, PostgreSQL {report['server']['server_version']},"
        f" {report['config']['jobs']:,} jobs, {report['config']['rounds']} round(s),"
        f" commit {commit}{dirty}"
    )


def throughput_vs_workers(report: dict, out: Path) -> bool:
    tq = report["stats"].get("trioqueue", {})
    points = sorted((int(k.split("_")[1]), v) for k, v in tq.items() if k.startswith("sweep_"))
    if not points:
        return False
    xs = [w for w, _ in points]
    med = [s["median"] for _, s in points]
    low = [s["median"] - s["min"] for _, s in points]
    high = [s["max"] - s["median"] for _, s in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.errorbar(
        xs,
        med,
        yerr=[low, high],
        marker="o",
        capsize=4,
        color=COLORS["trioqueue"],
        label="trioqueue",
    )
    labels = {v["name"]: v["label"] for v in report["variants"]}
    for name in ("pgqueuer_b10", "pgqueuer_b100", "procrastinate"):
        stat = report["stats"].get(name, {}).get("processing_jobs_per_s")
        if stat:
            ax.axhline(stat["median"], linestyle="--", color=COLORS[name], label=labels[name])
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    ax.set_xlabel("trioqueue max_workers")
    ax.set_ylabel("no-op jobs processed per second")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("Throughput against max_workers\n" + _subtitle(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_max_workers.png", dpi=120)
    plt.close(fig)
    return True


def latency_cdf(report: dict, out: Path) -> bool:
    samples: dict[str, list[float]] = {}
    for rec in report["records"]:
        if rec["measure"] == "latency":
            samples.setdefault(rec["variant"], []).extend(rec["samples_ms"])
    if not samples:
        return False
    labels = {v["name"]: v["label"] for v in report["variants"]}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, values in samples.items():
        values = sorted(values)
        ys = [(i + 1) / len(values) for i in range(len(values))]
        ax.step(values, ys, where="post", color=COLORS.get(name), label=labels.get(name, name))
    ax.axvline(1.5, color="grey", linestyle=":", label="targets: p50 1.5 ms, p99 5 ms")
    ax.axvline(5.0, color="grey", linestyle=":")
    ax.set_xscale("log")
    low = min(min(v) for v in samples.values())
    high = max(max(v) for v in samples.values())
    ticks = [
        t
        for t in (0.2, 0.5, 1, 1.5, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
        if low / 1.5 <= t <= high * 1.5
    ]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("insert → worker start (ms, log scale)")
    ax.set_ylabel("fraction of samples")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(loc="lower right")
    ax.set_title("Idle latency, cumulative distribution\n" + _subtitle(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "latency_cdf.png", dpi=120)
    plt.close(fig)
    return True


def rates(report: dict, out: Path) -> bool:
    metrics = (
        ("processing_jobs_per_s", "processing"),
        ("batch_enqueue_jobs_per_s", "batch enqueue"),
        ("single_enqueue_jobs_per_s", "single enqueue"),
    )
    variants = [v for v in report["variants"] if v["name"] in report["stats"]]
    if not variants:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (metric, title) in zip(axes, metrics, strict=True):
        names, meds, errs = [], [], [[], []]
        for v in variants:
            stat = report["stats"][v["name"]].get(metric)
            if not stat:
                continue
            names.append(v["label"].replace(" (", "\n("))
            meds.append(stat["median"])
            errs[0].append(stat["median"] - stat["min"])
            errs[1].append(stat["max"] - stat["median"])
        colors = [COLORS.get(v["name"]) for v in variants if report["stats"][v["name"]].get(metric)]
        ax.bar(names, meds, yerr=errs, capsize=4, color=colors)
        ax.set_title(title + " (jobs/s)")
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(_subtitle(report), fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "rates.png", dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    report = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    made = [
        name
        for name, fn in (
            ("throughput_vs_max_workers.png", throughput_vs_workers),
            ("latency_cdf.png", latency_cdf),
            ("rates.png", rates),
        )
        if fn(report, out)
    ]
    print("wrote " + ", ".join(made), file=sys.stderr)


if __name__ == "__main__":
    main()

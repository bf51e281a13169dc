"""The measurements and their rounds: every measure of every variant, in interleaved,
rotated rounds, each on a fresh database; records and errors kept for the report."""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

from .common import log
from .machine import wait_quiet
from .server import Server
from .stats import quantile
from .variants import RunnerError, Variant


@dataclass
class Harness:
    cfg: argparse.Namespace
    server: Server
    variants: list[Variant]
    records: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    background: list[float] = field(default_factory=list)

    def record(self, rnd: int, variant: Variant, measure: str, **values: Any) -> None:
        self.records.append(
            {
                "round": rnd,
                "variant": variant.name,
                "system": variant.system,
                "measure": measure,
                **values,
            }
        )

    def attempt(self, rnd: int, variant: Variant, measure: str, fn: Callable[[], None]) -> None:
        start = time.perf_counter()
        try:
            fn()
        except (RunnerError, subprocess.TimeoutExpired, psycopg.Error) as exc:
            log(f"  ! {variant.label} {measure} failed: {exc}")
            self.errors.append(
                {"round": rnd, "variant": variant.name, "measure": measure, "error": str(exc)}
            )
        else:
            log(f"    ({time.perf_counter() - start:.1f} s)")

    def _process_run(
        self, variant: Variant, dbname: str, url: str, jobs: int, **extra: Any
    ) -> dict[str, Any]:
        before = self.server.transactions(dbname)
        out = variant.run({"command": "process", "url": url, "jobs": jobs, **extra})
        after = self.server.transactions(dbname)
        own = out.get("own_transactions", 0)
        out["transactions"] = after - before - own
        return out

    def _enqueue(self, variant: Variant, url: str, jobs: int) -> dict[str, Any]:
        variant.run({"command": "install", "url": url})
        return variant.run(
            {"command": "enqueue", "url": url, "jobs": jobs, "batch": self.cfg.enqueue_batch}
        )

    @staticmethod
    def _process_values(out: dict[str, Any]) -> dict[str, Any]:
        jobs = out["jobs"]
        return {
            "processing_jobs_per_s": jobs / out["seconds"],
            "xact_per_job": out["transactions"] / jobs,
            "transactions": out["transactions"],
            "cpu_us_per_job": out["cpu_seconds"] / jobs * 1e6,
            "worker_rss_peak_mb": out["rss_peak_mb"],
            "startup_s": out["startup_seconds"],
            "jobs": jobs,
            "seconds": out["seconds"],
        }

    def process(self, rnd: int, variant: Variant) -> None:
        n = self.cfg.jobs
        with self.server.database(variant.name) as (dbname, url):
            enq = self._enqueue(variant, url, n)
            out = self._process_run(variant, dbname, url, n)
        values = self._process_values(out)
        values["batch_enqueue_jobs_per_s"] = enq["jobs"] / enq["seconds"]
        self.record(rnd, variant, "process", **values, versions=out.get("versions"))
        log(
            f"  {variant.label:<22} process {values['processing_jobs_per_s']:>9,.0f} jobs/s"
            f"   batch enqueue {values['batch_enqueue_jobs_per_s']:>9,.0f} jobs/s"
            f"   {values['xact_per_job']:.4f} xact/job"
        )

    def single(self, rnd: int, variant: Variant) -> None:
        with self.server.database(variant.name) as (_, url):
            variant.run({"command": "install", "url": url})
            out = variant.run({"command": "single", "url": url, "jobs": self.cfg.single_inserts})
        rate = out["jobs"] / out["seconds"]
        self.record(rnd, variant, "single", single_enqueue_jobs_per_s=rate)
        log(f"  {variant.label:<22} single insert {rate:>9,.0f} jobs/s")

    def latency(self, rnd: int, variant: Variant) -> None:
        with self.server.database(variant.name) as (_, url):
            variant.run({"command": "install", "url": url})
            out = variant.run(
                {"command": "latency", "url": url, "samples": self.cfg.latency_samples, "seed": rnd}
            )
        ms = sorted(x * 1000 for x in out["samples"])
        values = {
            "latency_p50_ms": quantile(ms, 0.5),
            "latency_p99_ms": quantile(ms, 0.99),
            "latency_max_ms": ms[-1],
            "latency_mean_ms": statistics.fmean(ms),
            "latency_insert_p50_ms": quantile(
                sorted(x * 1000 for x in out.get("insert_samples", [])), 0.5
            ),
        }
        self.record(rnd, variant, "latency", **values, samples_ms=ms)
        log(
            f"  {variant.label:<22} idle latency p50 {values['latency_p50_ms']:.2f} ms,"
            f" p99 {values['latency_p99_ms']:.2f} ms"
        )

    def finalized(self, rnd: int, variant: Variant) -> None:
        n = self.cfg.jobs
        with self.server.database("finalized") as (dbname, url):
            variant.run({"command": "install", "url": url})
            fill = self.server.fill_finalized(url, self.cfg.finalized_rows)
            variant.run(
                {"command": "enqueue", "url": url, "jobs": n, "batch": self.cfg.enqueue_batch}
            )
            out = self._process_run(variant, dbname, url, n)
        values = self._process_values(out)
        self.record(
            rnd,
            variant,
            "finalized",
            finalized_processing_jobs_per_s=values["processing_jobs_per_s"],
            finalized_xact_per_job=values["xact_per_job"],
            finalized_rows=self.cfg.finalized_rows,
            fill_seconds=fill,
        )
        log(
            f"  {variant.label:<22} with {self.cfg.finalized_rows:,} finalized rows"
            f" {values['processing_jobs_per_s']:>9,.0f} jobs/s (fill {fill:.1f} s)"
        )

    def rss(self, rnd: int, variant: Variant) -> None:
        n = self.cfg.rss_jobs
        with self.server.database("rss") as (dbname, url):
            self._enqueue(variant, url, n)
            out = self._process_run(variant, dbname, url, n)
        values = self._process_values(out)
        self.record(
            rnd,
            variant,
            "rss",
            rss_peak_mb=out["rss_peak_mb"],
            rss_before_mb=out["rss_before_mb"],
            rss_jobs=n,
            rss_processing_jobs_per_s=values["processing_jobs_per_s"],
            rss_xact_per_job=values["xact_per_job"],
        )
        log(
            f"  {variant.label:<22} {n:,} jobs: peak RSS {out['rss_peak_mb']:.0f} MB,"
            f" {values['processing_jobs_per_s']:,.0f} jobs/s"
        )

    def ceiling(self, rnd: int, variant: Variant) -> None:
        n = self.cfg.jobs
        with self.server.database("ceiling") as (_, url):
            self._enqueue(variant, url, n)
            out = variant.run({"command": "ceiling", "url": url})
        rate = out["jobs"] / out["seconds"]
        self.record(rnd, variant, "ceiling", ceiling_jobs_per_s=rate)
        log(f"  {'database ceiling':<22} {rate:>9,.0f} jobs/s (1000-row claim + update)")

    def sweep(self, rnd: int, variant: Variant) -> None:
        n = self.cfg.jobs
        for workers in self.cfg.sweep:
            with self.server.database(f"sweep{workers}") as (dbname, url):
                self._enqueue(variant, url, n)
                out = self._process_run(variant, dbname, url, n, max_workers=workers)
            rate = out["jobs"] / out["seconds"]
            self.record(rnd, variant, "sweep", max_workers=workers, sweep_jobs_per_s=rate)
            log(f"  {variant.label:<22} max_workers {workers:>5}: {rate:>9,.0f} jobs/s")

    def run(self) -> None:
        trioqueue = [v for v in self.variants if v.system == "trioqueue"]
        for rnd in range(1, self.cfg.rounds + 1):
            busy = wait_quiet(self.cfg.wait_quiet, self.cfg.quiet_below)
            if busy is not None:
                self.background.append(busy)
            shown = "?" if busy is None else f"{busy:.0%}"
            log(f"round {rnd}/{self.cfg.rounds} (CPU busy with other work: {shown})")
            for measure in ("process", "single", "latency"):
                chosen = [v for v in self.variants if measure in v.measures]
                shift = (rnd - 1) % max(len(chosen), 1)
                for variant in chosen[shift:] + chosen[:shift]:
                    fn = getattr(self, measure)
                    self.attempt(rnd, variant, measure, lambda f=fn, v=variant, r=rnd: f(r, v))
                if measure == "process":
                    for variant in trioqueue:
                        self.attempt(
                            rnd, variant, "finalized", lambda v=variant, r=rnd: self.finalized(r, v)
                        )
            for variant in trioqueue:
                self.attempt(rnd, variant, "ceiling", lambda v=variant, r=rnd: self.ceiling(r, v))
                self.attempt(rnd, variant, "rss", lambda v=variant, r=rnd: self.rss(r, v))
                if self.cfg.plots:
                    self.attempt(rnd, variant, "sweep", lambda v=variant, r=rnd: self.sweep(r, v))

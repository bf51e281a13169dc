"""Screenshots of the web dashboard for docs/dashboard.md.

Rerun from the repository root whenever a page changes, then commit the PNGs::

    pip install -e '.[dev]'              # Playwright is in the dev extra
    apt-get install chromium             # Debian's browser; no `playwright install`
    python docs/dashboard/screenshots.py # writes docs/dashboard/*.png

``$TRIOQUEUE_CHROMIUM`` names another Chromium instead of ``/usr/bin/chromium``; ``--out DIR``
writes the PNGs elsewhere.

It starts a temporary embedded PostgreSQL server, fills it with a day's worth of a small shop's
jobs worked by a real client (mail sent, images resized, cards charged; some failing with
tracebacks, some retrying later, one cancelled, reports scheduled or running, newsletters
waiting in a paused queue), serves the dashboard in-process on a free port and saves
``overview.png``, ``jobs.png``, ``job.png`` (a discarded job and its errors), ``queues.png``
and ``delete.png`` (the delete confirmation).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import socket
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import attrs
import trio

import trioqueue as tq
from trioqueue.dashboard import serve
from trioqueue.embedded import open_embedded_server

HERE = Path(__file__).resolve().parent
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SETTLE_TIMEOUT = 60.0


# ------------------------------------------------------------------------------------------
# The shop's jobs


@attrs.frozen
class SendEmail:
    kind: ClassVar[str] = "send_email"
    to: str
    template: str


@attrs.frozen
class ResizeImage:
    kind: ClassVar[str] = "resize_image"
    path: str
    width: int


@attrs.frozen
class ChargeCard:
    kind: ClassVar[str] = "charge_card"
    order_id: int
    amount_cents: int


@attrs.frozen
class SyncCrm:
    kind: ClassVar[str] = "sync_crm"
    account_id: int


@attrs.frozen
class GenerateReport:
    kind: ClassVar[str] = "generate_report"
    name: str
    month: str


@attrs.frozen
class SendNewsletter:
    kind: ClassVar[str] = "send_newsletter"
    issue: int
    segment: str


class PaymentDeclined(Exception):
    pass


DECLINED_ORDER = 1051
EXPIRED_ORDER = 1043
BROKEN_IMAGE = "uploads/2026/11/catalogue-scan.tiff"


def _decode_image(path: str) -> bytes:
    if path.endswith(".tiff"):
        raise ValueError(f"unsupported image format: TIFF ({path}); convert it to PNG or JPEG")
    return b""


async def _authorize(order_id: int, amount_cents: int) -> None:
    await trio.sleep(0.001)
    if order_id == DECLINED_ORDER:
        raise PaymentDeclined(
            f"order {order_id}: card declined by issuer (code 05, do not honour) "
            f"for {amount_cents / 100:.2f} EUR"
        )


def make_workers(release_reports: trio.Event) -> tq.Workers:
    async def send_email(job: tq.Job[SendEmail]) -> None:
        await trio.sleep(0.002)

    async def resize_image(job: tq.Job[ResizeImage]) -> None:
        _decode_image(job.args.path)
        await trio.sleep(0.002)

    async def charge_card(job: tq.Job[ChargeCard]) -> None:
        if job.args.order_id == EXPIRED_ORDER:
            raise tq.JobCancel("card expired in 10/2026; customer asked to update it")
        await _authorize(job.args.order_id, job.args.amount_cents)

    async def sync_crm(job: tq.Job[SyncCrm]) -> None:
        await trio.sleep(0.001)
        raise ConnectionError(
            f"crm.example.com:443: timed out after 10.0 s (account {job.args.account_id})"
        )

    async def generate_report(job: tq.Job[GenerateReport]) -> None:
        await release_reports.wait()  # "running" while the screenshots are taken

    async def send_newsletter(job: tq.Job[SendNewsletter]) -> None:
        await trio.sleep(0.002)

    def quick_retry(job: tq.Job[Any]) -> float:
        return 0.05

    def crm_retry(job: tq.Job[Any]) -> float:
        return 0.05 if job.attempt == 1 else 2 * 3600.0

    workers = tq.Workers()
    workers.add(SendEmail, send_email)
    workers.add(ResizeImage, resize_image, next_retry=quick_retry)
    workers.add(ChargeCard, charge_card, next_retry=quick_retry)
    workers.add(SyncCrm, sync_crm, next_retry=crm_retry)
    workers.add(GenerateReport, generate_report, timeout=None)
    workers.add(SendNewsletter, send_newsletter)
    return workers


QUEUES = {
    "default": tq.QueueConfig(max_workers=10),
    "mail": tq.QueueConfig(max_workers=20),
    "images": tq.QueueConfig(max_workers=4),
    "billing": tq.QueueConfig(max_workers=5),
    "reports": tq.QueueConfig(max_workers=2),
    "newsletters": tq.QueueConfig(max_workers=10),
}


@attrs.frozen
class Shown:
    """Jobs the screenshots open."""

    failed_job: int
    delete_job: int


async def fill(client: tq.Client) -> Shown:
    """Insert the day's jobs; the running client works them."""
    items: list[tuple[Any, tq.InsertOpts | None]] = []
    templates = ("order_confirmation", "shipping_update", "password_reset", "welcome")
    for i in range(36):
        items.append(
            (
                SendEmail(f"customer{i + 100}@example.com", templates[i % len(templates)]),
                tq.InsertOpts(queue="mail", tags=("transactional",)),
            )
        )
    for i in range(14):
        path = f"uploads/2026/11/product-{2300 + i}.jpg"
        items.append((ResizeImage(path, 800), tq.InsertOpts(queue="images", priority=2)))
    items.append(
        (
            ResizeImage(BROKEN_IMAGE, 800),
            tq.InsertOpts(queue="images", priority=2, max_attempts=3, tags=("catalogue",)),
        )
    )
    for order in range(1040, 1056):
        opts = tq.InsertOpts(
            queue="billing", max_attempts=3, tags=("checkout",), metadata={"shop": "eu-1"}
        )
        items.append((ChargeCard(order, 1999 + 250 * (order % 7)), opts))
    for account in (5102, 5117, 5140):
        items.append((SyncCrm(account), tq.InsertOpts(max_attempts=10, tags=("crm",))))
    for name in ("sales", "inventory"):
        items.append((GenerateReport(name, "2026-11"), tq.InsertOpts(queue="reports")))
    now = datetime.now(UTC)
    for name, days in (("sales", 1), ("refunds", 1), ("inventory", 7)):
        items.append(
            (
                GenerateReport(name, "2026-12"),
                tq.InsertOpts(queue="reports", scheduled_at=now + timedelta(days=days)),
            )
        )
    for segment in ("eu", "us", "asia", "vip"):
        items.append(
            (SendNewsletter(48, segment), tq.InsertOpts(queue="newsletters", tags=("marketing",)))
        )
    results = await client.insert_many(items)
    by_args = {result.job.args: result.job.id for result in results}
    return Shown(
        failed_job=by_args[ChargeCard(DECLINED_ORDER, 1999 + 250 * (DECLINED_ORDER % 7))],
        delete_job=by_args[ChargeCard(EXPIRED_ORDER, 1999 + 250 * (EXPIRED_ORDER % 7))],
    )


def _still_busy(job: tq.Job[Any]) -> bool:
    if job.queue == "newsletters":
        return False  # paused: waits for good
    return not (job.kind == GenerateReport.kind and job.state is tq.JobState.RUNNING)


async def settle(client: tq.Client) -> None:
    """Wait until the client has worked everything it will work before the screenshots."""
    with trio.fail_after(SETTLE_TIMEOUT):
        while True:
            page = await client.job_list(
                tq.JobListParams(states=(tq.JobState.AVAILABLE, tq.JobState.RUNNING), limit=1000)
            )
            if not any(_still_busy(job) for job in page.jobs):
                return
            await trio.sleep(0.2)


# ------------------------------------------------------------------------------------------
# The screenshots


def chromium_path() -> str:
    configured = os.environ.get("TRIOQUEUE_CHROMIUM")
    if configured:
        return configured
    found = "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None
    found = found or shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        sys.exit("no Chromium: apt-get install chromium, or set $TRIOQUEUE_CHROMIUM")
    return found


def take_screenshots(base: str, shown: Shown, out: Path) -> list[Path]:
    from playwright.sync_api import expect, sync_playwright

    saved: list[Path] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})

            def shoot(path: str, name: str, ready: str) -> None:
                page.goto(base + path)
                expect(page.locator(ready).first).to_be_visible()
                target = out / name
                page.screenshot(path=str(target), full_page=True)
                saved.append(target)

            shoot("/", "overview.png", "#state-counts")
            shoot("/jobs", "jobs.png", "tr.job")
            shoot(f"/jobs/{shown.failed_job}", "job.png", "#job-state")
            shoot("/queues", "queues.png", "tr.queue")
            shoot(f"/jobs/{shown.delete_job}/delete", "delete.png", "#confirm-delete")
        finally:
            browser.close()
    return saved


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def main(out: Path) -> list[Path]:
    release_reports = trio.Event()
    async with open_embedded_server(temporary=True) as url:
        await tq.migrate(url)
        async with tq.open_client(url) as admin:
            await admin.queue_pause("newsletters")
        workers = make_workers(release_reports)
        async with tq.open_client(url, workers=workers, queues=QUEUES) as client:
            shown = await fill(client)
            await settle(client)
            port = _free_port()
            async with trio.open_nursery() as nursery:
                await nursery.start(serve, url, "127.0.0.1", port, False, None)
                saved = await trio.to_thread.run_sync(
                    take_screenshots, f"http://127.0.0.1:{port}", shown, out
                )
                nursery.cancel_scope.cancel()
            release_reports.set()
    return saved


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the PNGs")
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    # The failures are staged; their log lines would only bury the list of PNGs.
    logging.getLogger("trioqueue").setLevel(logging.CRITICAL)
    for path in trio.run(main, options.out):
        print(path)

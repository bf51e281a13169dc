"""The web dashboard end to end, in headless Chromium (issue #7).

``trioqueue dashboard`` runs as a real subprocess against the test's own database; Playwright's
sync API drives Debian's Chromium (``/usr/bin/chromium``, or ``$TRIOQUEUE_CHROMIUM``) through it
the way an operator would: from the overview's discarded count to the list, the job, Retry.

Playwright is only the driver: it is always given the system's browser (``executable_path``),
never one of its own downloads (``playwright install`` is not needed and cannot work on CI's
network). ``.ci/run`` installs Debian's ``chromium`` package when it is missing (and fails when
it cannot), then sets ``TRIOQUEUE_REQUIRE_BROWSER=1``. Where no Chromium can be found these
tests skip and say so, unless ``$TRIOQUEUE_REQUIRE_BROWSER`` is ``1``: then they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import attrs
import pytest
import trio
from playwright.sync_api import Browser, Page, expect, sync_playwright
from support import env_flag

import trioqueue as tq
from trioqueue.limits import QueueLimits
from trioqueue.testing import work_one

CHROMIUM_ENV = "TRIOQUEUE_CHROMIUM"
REQUIRE_ENV = "TRIOQUEUE_REQUIRE_BROWSER"
_CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# As the machine's own browser check runs it: as root Chromium needs --no-sandbox, and on a
# closed network its background services only add refused connections.
CHROMIUM_ARGS = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
TIMEOUT_MS = 20_000  # per browser step; generous for a loaded CI machine
START_TIMEOUT = 60.0  # seconds for the dashboard process to answer /healthz
TOKEN = "s3cret-dashboard-token"


def find_chromium() -> str | None:
    """``$TRIOQUEUE_CHROMIUM``, else ``/usr/bin/chromium``, else a Chromium on ``$PATH``."""
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        return configured
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    for name in _CHROMIUM_NAMES:
        found = shutil.which(name)
        if found is not None:
            return found
    return None


@attrs.frozen
class ResizeImage:
    kind: ClassVar[str] = "resize_image"
    path: str


@attrs.frozen
class SendInvoice:
    kind: ClassVar[str] = "send_invoice"
    customer: int


async def _resize_fails(job: tq.Job[ResizeImage]) -> None:
    raise OSError(f"cannot read {job.args.path}: no such file")


async def _make_jobs(database_url: str) -> int:
    """One discarded job (its only attempt failed) and one available job of another kind;
    returns the discarded job's id."""
    result = await work_one(
        _resize_fails,
        ResizeImage("/srv/photos/missing.jpg"),
        opts=tq.InsertOpts(max_attempts=1, queue="images"),
        database_url=database_url,
    )
    assert result.job.state is tq.JobState.DISCARDED
    async with tq.open_client(database_url) as client:
        await client.insert(SendInvoice(42))
    return result.job.id


async def _job_state(database_url: str, job_id: int) -> tq.JobState:
    async with tq.open_client(database_url) as client:
        return (await client.job_get(job_id)).state


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def run_dashboard(database_url: str, log_path: Path, *options: str) -> Iterator[str]:
    """Run ``python -m trioqueue dashboard`` on a free port until the block ends; yield its
    base URL once ``/healthz`` answers ``ok``."""
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    command = [
        sys.executable,
        "-m",
        "trioqueue",
        "dashboard",
        "--database-url",
        database_url,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *options,
    ]
    health = f"{base}/healthz"  # needs no token
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                if process.poll() is not None:
                    output = log_path.read_text(errors="replace")
                    pytest.fail(f"dashboard exited with {process.returncode}:\n{output}")
                try:
                    with urllib.request.urlopen(health, timeout=5) as response:
                        if response.read().strip() == b"ok":
                            break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    output = log_path.read_text(errors="replace")
                    pytest.fail(f"dashboard did not answer {health} in {START_TIMEOUT}s:\n{output}")
                time.sleep(0.1)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = find_chromium()
    if executable is None:
        missing = (
            "no Chromium found (looked for $TRIOQUEUE_CHROMIUM, /usr/bin/chromium and "
            f"{', '.join(_CHROMIUM_NAMES)} on $PATH); install Debian's chromium package, "
            "as .ci/run does"
        )
        if env_flag(REQUIRE_ENV):
            pytest.fail(f"{missing}; ${REQUIRE_ENV}=1 says this test must run")
        pytest.skip(missing)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=executable, args=list(CHROMIUM_ARGS), timeout=60_000
        )
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    expect.set_options(timeout=TIMEOUT_MS)
    try:
        yield context.new_page()
    finally:
        context.close()


def stop_auto_refresh(page: Page) -> None:
    """Untick the page's 5-second reload, so no reload lands between two steps."""
    box = page.locator("#auto-refresh")
    expect(box).to_have_count(1)
    if box.is_checked():
        box.uncheck()


def test_retry_a_discarded_job_from_the_overview(
    page: Page, database_url: str, tmp_path: Path
) -> None:
    job_id = trio.run(_make_jobs, database_url)

    with run_dashboard(database_url, tmp_path / "dashboard.log") as base:
        page.goto(f"{base}/")
        stop_auto_refresh(page)
        discarded = page.locator('#state-counts td[data-state="discarded"]')
        expect(discarded).to_have_text("1")
        expect(page.locator('#state-counts td[data-state="available"]')).to_have_text("1")
        discarded.get_by_role("link").click()

        expect(page).to_have_url(re.compile(r"/jobs\?(.*&)?state=discarded(&|$)"))
        rows = page.locator("tr.job")
        expect(rows).to_have_count(1)
        row = rows.first
        expect(row).to_have_attribute("data-job-id", str(job_id))
        expect(row).to_have_attribute("data-state", "discarded")
        expect(row).to_contain_text("resize_image")
        row.locator(f'a[href$="/jobs/{job_id}"]').click()

        expect(page).to_have_url(re.compile(rf"/jobs/{job_id}$"))
        stop_auto_refresh(page)
        expect(page.locator("#job-state")).to_have_text("discarded")
        expect(page.locator("body")).to_contain_text("cannot read /srv/photos/missing.jpg")
        page.locator("#retry-button").click()

        expect(page.locator(".flash")).to_be_visible()
        expect(page.locator("#job-state")).to_have_text("available")

    assert trio.run(_job_state, database_url, job_id) is tq.JobState.AVAILABLE


@attrs.frozen
class Charge:
    kind: ClassVar[str] = "charge_card"
    customer: int | str


HOSTILE_CUSTOMER = '<img src=x onerror="document.title=1">'
"""A partition value (job args are user data) that would run script if it reached the DOM
as HTML."""


async def _hold_back(database_url: str) -> None:
    """Queue ``billing``, one running job per customer: two customers' jobs claimed, three
    more held back. The claims go through the driver, so no worker has to keep them
    running."""
    limits = QueueLimits(tq.GlobalLimit(1, by_args=("customer",)))
    customers = [42, 42, 42, HOSTILE_CUSTOMER, HOSTILE_CUSTOMER]
    async with tq.open_client(database_url) as client:
        await client.insert_many([(Charge(c), tq.InsertOpts(queue="billing")) for c in customers])
        now = datetime.now(UTC)
        await client.driver.queue_upsert("billing", now, limits)
        fetched = await client.driver.job_get_available_limited("billing", now, 10, "t", limits)
        assert len(fetched.rows) == 2


def test_queues_page_shows_held_back_jobs_and_their_partitions(
    page: Page, database_url: str, tmp_path: Path
) -> None:
    trio.run(_hold_back, database_url)
    with run_dashboard(database_url, tmp_path / "dashboard.log") as base:
        page.goto(f"{base}/queues")
        stop_auto_refresh(page)
        title = page.title()
        row = page.locator('tr.queue[data-queue="billing"]')
        expect(row.locator("td.limits")).to_have_text("global 1 by args.customer")
        expect(row.locator('td[data-state="running"]')).to_have_text("2")
        row.locator("td.held-back").get_by_role("link", name="3").click()

        expect(page).to_have_url(re.compile(r"/queues#partitions-billing$"))
        partitions = page.locator('table.partitions[data-queue="billing"] tr.partition')
        expect(partitions).to_have_count(2)
        expect(partitions.nth(0).locator("td")).to_have_text(["args.customer = 42", "1", "2"])
        # The hostile value shows as text: no element was made of it, no handler ran.
        shown = f"args.customer = {json.dumps(HOSTILE_CUSTOMER)}"
        expect(partitions.nth(1).locator("td")).to_have_text([shown, "1", "1"])
        expect(page.locator("#partitions img")).to_have_count(0)
        assert page.title() == title


def test_token_is_required_and_kept_in_a_cookie(
    browser: Browser, page: Page, database_url: str, tmp_path: Path
) -> None:
    with run_dashboard(database_url, tmp_path / "dashboard.log", "--token", TOKEN) as base:
        refused = page.goto(f"{base}/")
        assert refused is not None
        assert refused.status in (401, 403), refused.status
        expect(page.locator("#state-counts")).to_have_count(0)

        wrong = page.goto(f"{base}/?token=not-{TOKEN}")
        assert wrong is not None
        assert wrong.status in (401, 403), wrong.status

        accepted = page.goto(f"{base}/?token={TOKEN}")
        assert accepted is not None
        assert accepted.ok, accepted.status
        expect(page.locator("#state-counts")).to_be_visible()

        # The cookie the token set carries on to other pages, without the query string.
        page.goto(f"{base}/queues")
        expect(page.locator("#auto-refresh")).to_have_count(1)
        assert "token" not in page.url

        # A browser without the cookie is still refused.
        other = browser.new_context()
        try:
            response = other.new_page().goto(f"{base}/jobs")
            assert response is not None
            assert response.status in (401, 403), response.status
        finally:
            other.close()


def test_a_token_of_any_characters_works_from_the_printed_address(
    page: Page, database_url: str, tmp_path: Path
) -> None:
    token = 'a b;c"d=é&x#y+z%20'
    log = tmp_path / "dashboard.log"
    with run_dashboard(database_url, log, "--token", token) as base:
        printed = re.search(r"^open (\S+)$", log.read_text(), re.MULTILINE)
        assert printed, log.read_text()
        assert printed.group(1).startswith(f"{base}/?token=")
        accepted = page.goto(printed.group(1))
        assert accepted is not None and accepted.ok, accepted
        expect(page.locator("#state-counts")).to_be_visible()
        assert "token" not in page.url
        page.goto(f"{base}/queues")  # the cookie alone from now on
        expect(page.locator("#auto-refresh")).to_have_count(1)


@attrs.frozen
class Step:
    kind: ClassVar[str] = "workflow_step"
    n: int


HOSTILE_TASK = '<img src=x onerror="document.title=1">'
"""A task name (user text) that would run script if it reached the DOM as markup."""


async def _insert_workflow(database_url: str) -> dict[str, int]:
    """fetch -> thumb, full -> publish, then full cancelled (which cancels publish)."""
    wf = tq.Workflow("publish/42")
    wf.add("fetch", Step(1))
    wf.add("thumb", Step(2), deps=["fetch"])
    wf.add(HOSTILE_TASK, Step(3), deps=["fetch"])
    wf.add("publish", Step(4), deps=["thumb", HOSTILE_TASK])
    async with tq.open_client(database_url) as client:
        jobs = await client.insert_workflow(wf)
        await client.job_cancel(jobs[HOSTILE_TASK].id)
    return {name: job.id for name, job in jobs.items()}


def test_a_workflow_graph_from_a_task_to_its_job(
    page: Page, database_url: str, tmp_path: Path
) -> None:
    ids = trio.run(_insert_workflow, database_url)
    with run_dashboard(database_url, tmp_path / "dashboard.log") as base:
        page.goto(f"{base}/jobs/{ids['thumb']}")
        stop_auto_refresh(page)
        title = page.title()
        page.locator("#job-workflow").click()

        expect(page).to_have_url(re.compile(r"/workflows/publish%2F42$"))
        stop_auto_refresh(page)
        expect(page.locator("#workflow-id")).to_have_text("publish/42")
        graph = page.locator("svg#workflow-graph")
        expect(graph).to_be_visible()
        boxes = graph.locator("a.wf-node")
        expect(boxes).to_have_count(4)
        states = {
            int(box.get_attribute("data-job-id") or 0): box.get_attribute("data-state")
            for box in boxes.all()
        }
        assert states == {
            ids["fetch"]: "available",
            ids["thumb"]: "pending",
            ids[HOSTILE_TASK]: "cancelled",
            ids["publish"]: "cancelled",
        }
        expect(graph.locator("path.wf-edge")).to_have_count(4)
        # Drawn left to right by column: every box laid out, a dep left of its dependents.
        x = {
            job_id: (graph.locator(f'a[data-job-id="{job_id}"] rect').bounding_box() or {})["x"]
            for job_id in ids.values()
        }
        assert x[ids["fetch"]] < x[ids["thumb"]] == x[ids[HOSTILE_TASK]] < x[ids["publish"]]
        # The hostile name is text in its box and the table: no element, no handler ran.
        cancelled = graph.locator(f'a[data-job-id="{ids[HOSTILE_TASK]}"]')
        expect(cancelled.locator("text.wf-label")).to_have_text(HOSTILE_TASK[:23] + "…")
        expect(page.locator("#workflow-tasks")).to_contain_text(HOSTILE_TASK)
        expect(page.locator("main img")).to_have_count(0)
        assert page.title() == title.replace(f"Job {ids['thumb']}", "Workflow publish/42")

        graph.locator(f'a[data-job-id="{ids["publish"]}"]').click()
        expect(page).to_have_url(re.compile(rf"/jobs/{ids['publish']}$"))
        expect(page.locator("#job-state")).to_have_text("cancelled")
        expect(page.locator("#job-task")).to_have_text("publish")

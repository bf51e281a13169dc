"""The web dashboard (trioqueue.dashboard): every route through httpx's ASGI transport
against a real database, the safety rules (CSRF, token, read-only, Host), ``serve`` on a
real socket, and the ``trioqueue dashboard`` command's usage errors."""

from __future__ import annotations

import html
import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar

import attrs
import httpx
import pytest
import trio

import trioqueue as tq
from trioqueue.cli import main
from trioqueue.dashboard import PAGE_SIZE, create_app, serve
from trioqueue.limits import QueueLimits

TOKEN = "s3cret-token"


@attrs.frozen
class ReportArgs:
    kind: ClassVar[str] = "report"
    n: int


@attrs.frozen
class MailArgs:
    kind: ClassVar[str] = "mail"
    to: str


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[tq.Client]:
    async with tq.open_client(database_url) as client:
        yield client


@asynccontextmanager
async def browser(app: Any, **kw: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", **kw) as c:
        yield c


def csrf_of(page: httpx.Response) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert found, "the page has no form with a CSRF token"
    return found.group(1)


def row_ids(page: httpx.Response) -> list[int]:
    return [int(i) for i in re.findall(r'<tr class="job" data-job-id="(\d+)"', page.text)]


def flash_of(page: httpx.Response) -> str:
    found = re.search(r'<div class="flash"[^>]*>(.*?)</div>', page.text)
    assert found, "no flash message"
    return html.unescape(found.group(1))


def state_of(page: httpx.Response) -> str:
    found = re.search(r'<span id="job-state"[^>]*>(\w+)</span>', page.text)
    assert found
    return found.group(1)


async def test_overview_queues_and_health(client: tq.Client) -> None:
    await client.insert_many([ReportArgs(n) for n in range(3)])
    await client.insert(MailArgs("a@b.c"), tq.InsertOpts(queue="mail", pending=True))
    cancelled = (await client.insert(ReportArgs(9))).job
    await client.job_cancel(cancelled.id)
    await client.queue_pause("idle")
    async with browser(create_app(client)) as http:
        page = await http.get("/")
        assert page.status_code == 200
        assert '<table id="state-counts"' in page.text
        counts = dict(
            re.findall(r'<td data-state="(\w+)"><a href="/jobs\?state=\1">(\d+)</a>', page.text)
        )
        assert counts == {
            "available": "3",
            "cancelled": "1",
            "completed": "0",
            "discarded": "0",
            "pending": "1",
            "retryable": "0",
            "running": "0",
            "scheduled": "0",
        }
        assert 'id="auto-refresh"' in page.text
        assert "No client leads" in page.text
        assert page.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]

        queues = await http.get("/queues")
        names = re.findall(r'<tr class="queue" data-queue="([\w-]+)"', queues.text)
        assert names == ["default", "idle", "mail"]  # rows and queues with live jobs
        assert 'id="resume-idle"' in queues.text and 'id="pause-default"' in queues.text

        health = await http.get("/healthz")
        assert (health.status_code, health.text) == (200, "ok")
        for asset in ("/static/dashboard.css", "/static/dashboard.js"):
            assert (await http.get(asset)).status_code == 200
        assert (await http.get("/static/../client.py")).status_code == 404
        assert (await http.get("/no/such/page")).status_code == 404


async def test_overview_estimates_big_finalized_states(client: tq.Client) -> None:
    async with client.transaction() as tx:
        await tx.execute(
            "INSERT INTO tq_job (state, max_attempts, finalized_at, args, kind)"
            " SELECT 'completed', 1, now(), '{}', 'report' FROM generate_series(1, 25000)"
        )
        await tx.execute("INSERT INTO tq_job (max_attempts, args, kind) VALUES (1, '{}', 'x')")
    async with client.transaction() as tx:
        await tx.execute("ANALYZE tq_job")
    counts = await client.job_counts()
    assert counts.estimated == {tq.JobState.COMPLETED}
    assert 20_000 <= counts.states[tq.JobState.COMPLETED] <= 30_000  # the planner's figure
    assert counts.states[tq.JobState.AVAILABLE] == 1  # live states stay exact
    assert counts.finalized_last_hour[tq.JobState.COMPLETED] == 25_000
    async with browser(create_app(client)) as http:
        page = await http.get("/")
    estimate = f"{counts.states[tq.JobState.COMPLETED]:,}"
    assert f'<a href="/jobs?state=completed">≈ {estimate}</a>' in page.text
    assert '<a href="/jobs?state=available">1</a>' in page.text


async def test_overview_shows_the_leader(database_url: str) -> None:
    workers = tq.Workers()

    @workers.worker(ReportArgs)
    async def report(job: tq.Job[ReportArgs]) -> None:
        pass

    async with tq.open_client(
        database_url, workers=workers, queues={"default": tq.QueueConfig(max_workers=1)}
    ) as client:
        for _ in range(200):  # elected at start; give it up to ten seconds
            if client.is_leader:
                break
            await trio.sleep(0.05)
        async with browser(create_app(client)) as http:
            page = await http.get("/")
        assert f'<dd id="leader-id">{client.id}</dd>' in html.unescape(page.text)


async def test_job_list_filters_and_pages_newest_first(client: tq.Client) -> None:
    inserted = await client.insert_many(
        [(ReportArgs(n), tq.InsertOpts(tags=["even"] if n % 2 == 0 else [])) for n in range(60)]
        + [(MailArgs("x@y.z"), tq.InsertOpts(queue="mail")) for _ in range(5)]
    )
    ids = [r.job.id for r in inserted]
    async with browser(create_app(client)) as http:
        first = await http.get("/jobs")
        assert first.status_code == 200
        assert row_ids(first) == ids[::-1][:PAGE_SIZE]
        link = re.search(r'<a id="next-page" href="([^"]+)"', first.text)
        assert link
        second = await http.get(html.unescape(link.group(1)))
        assert row_ids(second) == ids[::-1][PAGE_SIZE:]
        assert 'id="next-page"' not in second.text
        assert f'<td><a href="/jobs/{ids[0]}">{ids[0]}</a></td>' in second.text

        mail = await http.get("/jobs", params={"queue": "mail"})
        assert row_ids(mail) == ids[60:][::-1]
        assert 'id="bounded-scan"' in mail.text  # says the scan is bounded
        even = await http.get("/jobs", params={"kind": "report", "tag": "even"})
        assert row_ids(even) == ids[0:60:2][::-1]
        await client.job_cancel(ids[3])
        cancelled = await http.get("/jobs", params={"state": "cancelled"})
        assert row_ids(cancelled) == [ids[3]]
        assert f'data-job-id="{ids[3]}" data-state="cancelled"' in cancelled.text
        assert 'id="bounded-scan"' in cancelled.text  # finalized states walk the primary key
        available = await http.get("/jobs", params={"state": "available"})
        assert len(row_ids(available)) == PAGE_SIZE and 'id="next-page"' in available.text
        assert 'id="bounded-scan"' not in available.text  # live states: the fetch index
        assert row_ids(await http.get("/jobs", params={"state": "running"})) == []

        for query, field in [
            ({"state": "finished"}, "state"),
            ({"after": "-1"}, "after"),
            ({"after": "x"}, "after"),
            ({"kind": "bad kind!"}, "kind"),
            ({"queue": "Bad Queue"}, "queue"),
            ({"tag": "a,b"}, "tag"),
            ([("state", "available"), ("state", "running")], "state"),
        ]:
            bad = await http.get("/jobs", params=query)
            assert bad.status_code == 400, query
            assert f"{field}: " in html.unescape(bad.text)


async def test_job_detail_shows_every_error_with_its_traceback(database_url: str) -> None:
    workers = tq.Workers()

    @workers.worker(ReportArgs)
    async def report(job: tq.Job[ReportArgs]) -> None:
        raise RuntimeError(f"report {job.args.n} <broke>")

    async with tq.open_client(
        database_url,
        workers=workers,
        queues={"default": tq.QueueConfig(max_workers=1)},
        retry_policy=lambda job: 0.0,
    ) as client:
        async with client.subscribe(tq.EventKind.JOB_FAILED) as events:
            job = (await client.insert(ReportArgs(7), tq.InsertOpts(max_attempts=2))).job
            with trio.fail_after(10):
                async for event in events:
                    if event.job.state is tq.JobState.DISCARDED:
                        break
        async with browser(create_app(client)) as http:
            page = await http.get(f"/jobs/{job.id}")
    assert page.status_code == 200
    assert state_of(page) == "discarded"
    text = html.unescape(page.text)
    assert text.count('<article class="job-error">') == 2
    assert "report 7 <broke>" in text and "<broke>" not in page.text  # escaped
    assert text.count("Traceback (most recent call last)") == 2
    assert 'raise RuntimeError(f"report {job.args.n} <broke>")' in text
    assert '"n": 7' in text
    assert "Attempt 1" in text and "Attempt 2" in text


async def test_job_detail_of_a_missing_job_and_a_bad_id(client: tq.Client) -> None:
    async with browser(create_app(client)) as http:
        missing = await http.get("/jobs/424242")
        assert missing.status_code == 404 and "no job 424242" in missing.text
        bad = await http.get("/jobs/12ab")
        assert bad.status_code == 400 and "job id" in bad.text
        assert (await http.get("/jobs/424242/delete")).status_code == 404


async def test_cancel_retry_delete_with_confirmation(client: tq.Client) -> None:
    job = (await client.insert(ReportArgs(1))).job
    async with browser(create_app(client)) as http:
        page = await http.get(f"/jobs/{job.id}")
        assert f'<form method="post" action="/jobs/{job.id}/retry">' in page.text
        assert '<button type="submit" id="retry-button">Retry</button>' in page.text
        assert '<button type="submit" id="cancel-button">Cancel</button>' in page.text
        token = csrf_of(page)

        done = await http.post(f"/jobs/{job.id}/cancel", data={"csrf_token": token})
        assert done.status_code == 303
        assert done.headers["location"].startswith(f"/jobs/{job.id}?")
        shown = await http.get(done.headers["location"])
        assert state_of(shown) == "cancelled"
        assert flash_of(shown) == f"Job {job.id} cancelled."
        again = await http.post(f"/jobs/{job.id}/cancel", data={"csrf_token": token})
        assert "already finished" in flash_of(await http.get(again.headers["location"]))

        done = await http.post(f"/jobs/{job.id}/retry", data={"csrf_token": token})
        shown = await http.get(done.headers["location"])
        assert state_of(shown) == "available"
        assert flash_of(shown) == f"Job {job.id} is available to run now."

        link = re.search(r'<a id="delete-link"[^>]* href="([^"]+)"', shown.text)
        assert link and link.group(1) == f"/jobs/{job.id}/delete"
        confirm = await http.get(link.group(1))
        assert f'<form method="post" action="/jobs/{job.id}/delete"' in confirm.text
        assert 'id="confirm-delete"' in confirm.text
        done = await http.post(f"/jobs/{job.id}/delete", data={"csrf_token": csrf_of(confirm)})
        assert done.status_code == 303 and done.headers["location"].startswith("/jobs?")
        assert flash_of(await http.get(done.headers["location"])) == f"Job {job.id} deleted."
    with pytest.raises(tq.JobNotFoundError):
        await client.job_get(job.id)


async def test_running_jobs_cancel_by_request_and_refuse_delete(client: tq.Client) -> None:
    job = (await client.insert(ReportArgs(1))).job
    assert await client.driver.job_claim(job.id, client.driver.clock(), "elsewhere")
    async with browser(create_app(client)) as http:
        page = await http.get(f"/jobs/{job.id}")
        assert re.search(r'id="retry-button" disabled', page.text)
        token = csrf_of(page)
        deleted = await http.post(f"/jobs/{job.id}/delete", data={"csrf_token": token})
        assert "cannot be deleted" in flash_of(await http.get(deleted.headers["location"]))
        cancelled = await http.post(f"/jobs/{job.id}/cancel", data={"csrf_token": token})
        assert "asked to cancel" in flash_of(await http.get(cancelled.headers["location"]))
    assert (await client.job_get(job.id)).state is tq.JobState.RUNNING


async def test_pause_and_resume_a_queue(client: tq.Client) -> None:
    await client.insert(ReportArgs(1))
    async with browser(create_app(client)) as http:
        page = await http.get("/queues")
        assert '<tr class="queue" data-queue="default"' in page.text
        token = csrf_of(page)
        done = await http.post("/queues/default/pause", data={"csrf_token": token})
        assert done.status_code == 303 and done.headers["location"].startswith("/queues?")
        shown = await http.get(done.headers["location"])
        assert flash_of(shown).startswith("Queue default paused")
        assert 'id="resume-default"' in shown.text and 'id="pause-default"' not in shown.text
        assert [q.paused_at is not None for q in await client.queue_list()] == [True]
        done = await http.post("/queues/default/resume", data={"csrf_token": token})
        shown = await http.get(done.headers["location"])
        assert flash_of(shown) == "Queue default resumed."
        assert [q.paused_at for q in await client.queue_list()] == [None]
        bad = await http.post("/queues/Not%20A%20Queue/pause", data={"csrf_token": token})
        assert bad.status_code == 400 and "queue: " in bad.text


@attrs.frozen
class CallArgs:
    kind: ClassVar[str] = "call"
    customer: Any


PARTITION_ROW = re.compile(
    r'<tr class="partition"><td class="partition-key">(.*?)</td>'
    r'<td data-count="running">(\d+)</td><td data-count="held-back">(\d+)</td></tr>'
)


async def test_queues_page_shows_limits_held_back_and_partitions(client: tq.Client) -> None:
    hostile = "<script>alert(1)</script>\u202e"
    customers = ["acme", "acme", "acme", hostile, hostile, 7]
    await client.insert_many([(CallArgs(c), tq.InsertOpts(queue="calls")) for c in customers])
    await client.insert(ReportArgs(1))
    limits = QueueLimits(
        tq.GlobalLimit(1, by_args=("customer",)), tq.RateLimit(100, 0.5, by_kind=True)
    )
    now = datetime.now(UTC)
    await client.driver.queue_upsert("calls", now, limits)
    await client.driver.queue_upsert("default", now)
    await client.driver.queue_upsert("spare", now, QueueLimits(tq.GlobalLimit(2)))
    fetched = await client.driver.job_get_available_limited("calls", now, 10, "t", limits)
    assert len(fetched.rows) == 3  # one per customer; three held back

    async with browser(create_app(client)) as http:
        page = await http.get("/queues")
    assert page.status_code == 200
    text = page.text
    names = re.findall(r'<tr class="queue" data-queue="([\w-]+)"', text)
    assert names == ["calls", "default", "spare"]

    def cells(name: str) -> tuple[str, str]:
        found = re.search(
            rf'<tr class="queue" data-queue="{name}".*?<td class="held-back">(.*?)</td>\s*'
            r'<td class="limits">(.*?)</td>',
            text,
            re.S,
        )
        assert found, name
        return found.group(1), html.unescape(found.group(2))

    assert cells("calls") == (
        '<a href="#partitions-calls">3</a>',
        "global 1 by args.customer; rate 100/0.5s by kind",
    )
    assert cells("default") == ("—", "—")
    assert cells("spare") == ('<a href="#partitions-spare">0</a>', "global 2")

    section = text.split('<section id="partitions">', 1)[1]
    assert '<h3 id="partitions-calls">calls</h3>' in section
    assert 'id="partitions-default"' not in section  # no limits, no partitions
    calls = section.split('id="partitions-spare"')[0]
    assert [(html.unescape(k), int(r), int(h)) for k, r, h in PARTITION_ROW.findall(calls)] == [
        ('args.customer = "acme"', 1, 2),
        ('args.customer = "<script>alert(1)</script>\\u202e"', 1, 1),
        ("args.customer = 7", 1, 0),
    ]
    # Partition values are job args: escaped, their bidi controls shown as escapes.
    assert "<script>" not in text and "\u202e" not in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\\u202e" in text
    spare = section.split('id="partitions-spare"')[1]
    assert "global 2 · 0 running · 0 held back" in html.unescape(spare)
    assert "No job of this queue is running or held back." in spare


async def test_actions_need_a_valid_csrf_token(client: tq.Client) -> None:
    job = (await client.insert(ReportArgs(1))).job
    other_app = create_app(client)
    async with browser(other_app) as http:
        foreign = csrf_of(await http.get(f"/jobs/{job.id}"))  # another app's secret
    async with browser(create_app(client)) as http:
        valid = csrf_of(await http.get(f"/jobs/{job.id}"))
        forged = valid.split(".")[0] + ".AAAA"
        for form in [{}, {"csrf_token": ""}, {"csrf_token": forged}, {"csrf_token": foreign}]:
            for path in (
                f"/jobs/{job.id}/cancel",
                f"/jobs/{job.id}/retry",
                f"/jobs/{job.id}/delete",
                "/queues/default/pause",
                "/queues/default/resume",
            ):
                refused = await http.post(path, data=form)
                assert refused.status_code == 403, (path, form)
        assert (await http.get(f"/jobs/{job.id}/cancel")).status_code == 405
    assert (await client.job_get(job.id)).state is tq.JobState.AVAILABLE
    assert await client.queue_list() == []


async def test_read_only_renders_no_actions_and_refuses_them(client: tq.Client) -> None:
    job = (await client.insert(ReportArgs(1))).job
    await client.queue_pause("default")
    async with browser(create_app(client, read_only=True)) as http:
        for path in ("/", "/jobs", f"/jobs/{job.id}", "/queues"):
            page = await http.get(path)
            assert page.status_code == 200
            assert 'method="post"' not in page.text and "csrf_token" not in page.text
            assert not re.search(r'id="(retry-button|cancel-button|pause-|resume-)', page.text)
            assert 'id="read-only"' in page.text
        assert 'id="delete-link"' not in (await http.get(f"/jobs/{job.id}")).text
        assert (await http.get(f"/jobs/{job.id}/delete")).status_code == 403
        token = csrf_of(await browser_page(client, f"/jobs/{job.id}"))
        for path in (f"/jobs/{job.id}/cancel", f"/jobs/{job.id}/delete", "/queues/default/resume"):
            assert (await http.post(path, data={"csrf_token": token})).status_code == 403
    assert (await client.job_get(job.id)).state is tq.JobState.AVAILABLE
    assert (await client.queue_list())[0].paused_at is not None


async def browser_page(client: tq.Client, path: str) -> httpx.Response:
    async with browser(create_app(client)) as http:
        return await http.get(path)


async def test_token_is_needed_on_every_request_but_health(client: tq.Client) -> None:
    job = (await client.insert(ReportArgs(1))).job
    app = create_app(client, token=TOKEN)
    async with browser(app) as http:
        for path in ("/", "/jobs", f"/jobs/{job.id}", "/queues", "/static/dashboard.css", "/x"):
            refused = await http.get(path)
            assert refused.status_code == 401, path
            assert "Access token needed" in refused.text
        assert (await http.post(f"/jobs/{job.id}/cancel")).status_code == 401
        assert (await http.get("/healthz")).text == "ok"
        assert (await http.get("/jobs", params={"token": "wrong"})).status_code == 401
        wrong = await http.get("/", headers={"authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        http.cookies.set("trioqueue_dashboard_token", "wrong")
        assert (await http.get("/")).status_code == 401
        http.cookies.clear()

        bearer = await http.get("/queues", headers={"authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 200

        entry = await http.get("/jobs", params={"state": "available", "token": TOKEN})
        assert entry.status_code == 303
        assert entry.headers["location"] == "/jobs?state=available"
        cookie = entry.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        # From now on the cookie alone lets the browser in, actions included.
        page = await http.get(entry.headers["location"])
        assert page.status_code == 200 and row_ids(page) == [job.id]
        detail = await http.get(f"/jobs/{job.id}")
        done = await http.post(f"/jobs/{job.id}/cancel", data={"csrf_token": csrf_of(detail)})
        assert done.status_code == 303
    assert (await client.job_get(job.id)).state is tq.JobState.CANCELLED


async def test_loopback_hosts_only_when_asked(client: tq.Client) -> None:
    app = create_app(client, allowed_hosts=["127.0.0.1", "localhost", "[::1]"])
    async with browser(app) as http:
        assert (await http.get("/healthz", headers={"host": "evil.example"})).status_code == 400
        assert (await http.get("/", headers={"host": "localhost:8080"})).status_code == 200
        assert (await http.get("/", headers={"host": "[::1]:8080"})).status_code == 200


async def test_create_app_checks_its_arguments(client: tq.Client) -> None:
    with pytest.raises(tq.ValidationError, match="token"):
        create_app(client, token="  ")
    with pytest.raises(tq.ValidationError, match="client"):
        create_app("postgresql://x")  # type: ignore[arg-type]


async def test_serve_listens_until_cancelled(database_url: str) -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(serve, database_url, "127.0.0.1", 0, True, TOKEN)
            base = binds[0]
            async with httpx.AsyncClient(base_url=base) as http:
                assert (await http.get("/healthz")).text == "ok"
                assert (await http.get("/")).status_code == 401
                page = await http.get("/", headers={"authorization": f"Bearer {TOKEN}"})
                assert page.status_code == 200 and 'id="read-only"' in page.text
                # serve() accepts loopback Host names only.
                evil = await http.get("/healthz", headers={"host": "evil.example"})
                assert evil.status_code == 400
            nursery.cancel_scope.cancel()


def test_command_usage_errors(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    assert main(["dashboard"]) == 2
    assert "no database" in capsys.readouterr().err
    assert main(["dashboard", "--database-url", "postgresql://x/y", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err
    assert main(["dashboard", "--database-url", "postgresql://x/y", "--token", " "]) == 2
    assert "--token" in capsys.readouterr().err
    assert main(["dashboard", "--database-url", "postgresql://x/y", "--host", ""]) == 2
    assert "--host" in capsys.readouterr().err
    assert main(["dashboard", "--bogus"]) == 2
    assert "--bogus" in capsys.readouterr().err
    command = sys.modules["trioqueue._cli.dashboard"]
    monkeypatch.setattr(command, "_missing_extra", lambda: ["starlette"])
    assert main(["dashboard", "--database-url", "postgresql://x/y"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'trioqueue[dashboard]'" in err


def test_command_reports_an_unreachable_database(capsys: pytest.CaptureFixture[str]) -> None:
    url = "postgresql://nobody@127.0.0.1:1/none"
    assert main(["dashboard", "--database-url", url, "--port", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("trioqueue dashboard: error: ") and "Traceback" not in err

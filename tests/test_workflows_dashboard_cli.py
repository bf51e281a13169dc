"""Seeing a workflow (issue 17): the dashboard's workflow page and the job page's link to
it, the job list's workflow filter, ``trioqueue workflows get`` and ``trioqueue jobs list
--workflow``, against a real database through a real client."""

from __future__ import annotations

import html
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from typing import ClassVar

import attrs
import httpx
import pytest
import trio
from test_dashboard import browser

import trioqueue as tq
from trioqueue.cli import main
from trioqueue.dashboard import create_app
from trioqueue.dashboard._app import WORKFLOW_TABLE_ROWS, workflow_url
from trioqueue.dashboard._workflow_graph import MAX_COLUMN_TASKS
from trioqueue.embedded import DATABASE_URL_ENV

SVG = "{http://www.w3.org/2000/svg}"


@attrs.frozen
class Fetch:
    kind: ClassVar[str] = "wf_fetch"
    url: str


@attrs.frozen
class Resize:
    kind: ClassVar[str] = "wf_resize"
    size: int


@attrs.frozen
class Publish:
    kind: ClassVar[str] = "wf_publish"


LATER = tq.InsertOpts(queue="later")
"""A queue no worker of these tests works: its tasks stay as the workflow left them."""

HOSTILE_IDS = [
    '<script>alert("id")</script>',
    "a/b?c=d#e%2F f",
    "..",
    ".",
    "two\nlines",
    "x\u202eevil",
    " spaced ",
]
HOSTILE_TASK = '<img src=x onerror="alert(1)">\u202e&amp;'


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[tq.Client]:
    async with tq.open_client(database_url) as client:
        yield client


def publish_workflow(name: str | None = None) -> tq.Workflow:
    """fetch -> thumb, full -> publish; fetch in the default queue, the rest in ``later``."""
    wf = tq.Workflow(name)
    wf.add("fetch", Fetch("https://example.com/a.png"))
    wf.add("thumb", Resize(64), deps=["fetch"], opts=LATER)
    wf.add("full", Resize(1024), deps=["fetch"], opts=LATER)
    wf.add("publish", Publish(), deps=["thumb", "full"], opts=LATER)
    return wf


async def run_fetch_then_cancel_full(database_url: str, wf: tq.Workflow) -> dict[str, int]:
    """Insert ``wf``, let a worker complete ``fetch`` (which makes thumb and full
    available), then cancel ``full`` (which cancels publish). Returns task -> job id."""
    workers = tq.Workers()

    @workers.worker(Fetch)
    async def fetch(job: tq.Job[Fetch]) -> dict[str, str]:
        return {"path": "/tmp/a.png"}

    async def never(job: tq.Job[object]) -> None:
        raise AssertionError("the queue 'later' is not worked")

    workers.add(Resize, never)
    workers.add(Publish, never)
    async with tq.open_client(
        database_url, workers=workers, queues={"default": tq.QueueConfig(max_workers=1)}
    ) as client:
        async with client.subscribe(tq.EventKind.JOB_COMPLETED) as events:
            jobs = await client.insert_workflow(wf)
            with trio.fail_after(30):
                async for event in events:
                    if event.job.id == jobs["fetch"].id:
                        break
        # Completing fetch made both its dependents available, in the same statement.
        assert (await client.job_get(jobs["thumb"].id)).state is tq.JobState.AVAILABLE
        await client.job_cancel(jobs["full"].id)
    return {name: job.id for name, job in jobs.items()}


def svg_of(page: httpx.Response) -> ET.Element:
    found = re.search(r'<svg id="workflow-graph".*?</svg>', page.text, re.DOTALL)
    assert found, "the page has no workflow graph"
    return ET.fromstring(found.group(0))


def drawn_states(page: httpx.Response) -> dict[int, str]:
    return {
        int(a.attrib["data-job-id"]): a.attrib["data-state"]
        for a in svg_of(page).iter(f"{SVG}a")
        if "data-job-id" in a.attrib
    }


def table_rows(page: httpx.Response) -> list[list[str]]:
    body = re.search(r'<table id="workflow-tasks">.*?<tbody>(.*?)</tbody>', page.text, re.DOTALL)
    assert body
    rows = re.findall(r'<tr class="wf-task".*?</tr>', body.group(1), re.DOTALL)
    return [
        [html.unescape(re.sub(r"<[^>]+>", "", cell)).strip() for cell in re.findall(
            r"<td[^>]*>(.*?)</td>", row, re.DOTALL)]
        for row in rows
    ]  # fmt: skip


def inner(page: httpx.Response, pattern: str) -> str:
    """The first group of ``pattern`` in the page, unescaped and without tags."""
    found = re.search(pattern, page.text, re.DOTALL)
    assert found, pattern
    return html.unescape(re.sub(r"<[^>]+>", "", found.group(1)))


def link_of(page: httpx.Response, element_id: str) -> str:
    found = re.search(rf'<a id="{element_id}" href="([^"]*)"', page.text)
    assert found, element_id
    return html.unescape(found.group(1))


# ------------------------------------------------------------------ the dashboard


async def test_the_workflow_page_draws_each_task_in_its_state(
    database_url: str, client: tq.Client
) -> None:
    ids = await run_fetch_then_cancel_full(database_url, publish_workflow("publish-42"))
    async with browser(create_app(client)) as http:
        # Every task's job page links to the workflow's page.
        job_page = await http.get(f"/jobs/{ids['publish']}")
        assert job_page.status_code == 200
        assert link_of(job_page, "job-workflow") == "/workflows/publish-42"
        assert re.search(r'<dd id="job-task">publish</dd>', job_page.text)
        deps = re.search(r'<dd id="job-deps">(.*?)</dd>', job_page.text)
        assert deps and re.findall(r'href="/jobs/(\d+)"', deps.group(1)) == [
            str(ids["thumb"]), str(ids["full"])
        ]  # fmt: skip
        plain = (await client.insert(Publish())).job
        assert 'id="job-workflow"' not in (await http.get(f"/jobs/{plain.id}")).text

        page = await http.get(link_of(job_page, "job-workflow"))
        assert page.status_code == 200
        assert re.search(r'<span id="workflow-id">publish-42</span>', page.text)
        assert 'id="auto-refresh"' in page.text  # states change: the page refreshes
        assert drawn_states(page) == {
            ids["fetch"]: "completed",
            ids["thumb"]: "available",
            ids["full"]: "cancelled",
            ids["publish"]: "cancelled",
        }
        graph = svg_of(page)
        arrows = graph.findall(f".//{SVG}path[@marker-end]")
        assert len(arrows) == 4
        assert sorted(a.attrib["class"] for a in arrows) == [
            "wf-edge wf-done", "wf-edge wf-done", "wf-edge wf-waiting", "wf-edge wf-waiting"
        ]  # fmt: skip
        boxes = {
            int(a.attrib["data-job-id"]): float(rect.attrib["x"])
            for a in graph.iter(f"{SVG}a")
            for rect in a.iter(f"{SVG}rect")
        }
        assert boxes[ids["fetch"]] < boxes[ids["thumb"]] == boxes[ids["full"]]
        assert boxes[ids["full"]] < boxes[ids["publish"]]
        for a in graph.iter(f"{SVG}a"):
            assert a.attrib["href"] == f"/jobs/{a.attrib['data-job-id']}"

        summary = inner(page, r'<p id="workflow-summary">(.*?)</p>')
        assert " ".join(summary.split()).startswith(
            "4 tasks in 3 columns: 1 available 2 cancelled 1 completed"
        )
        rows = table_rows(page)
        assert [row[:-1] for row in rows] == [
            ["1", "fetch", str(ids["fetch"]), "completed", "wf_fetch", "default", "—"],
            ["2", "thumb", str(ids["thumb"]), "available", "wf_resize", "later", "fetch"],
            ["2", "full", str(ids["full"]), "cancelled", "wf_resize", "later", "fetch"],
            ["3", "publish", str(ids["publish"]), "cancelled", "wf_publish", "later",
             "thumb, full"],
        ]  # fmt: skip
        assert rows[1][-1] == "—" and rows[0][-1].endswith(" UTC")  # finalized
        assert "not drawn" not in page.text  # no cap applied

        # The job list filtered by the workflow: its four tasks, from the workflow index.
        listed = await http.get(link_of(page, "workflow-jobs"))
        assert listed.status_code == 200
        found = [int(i) for i in re.findall(r'<tr class="job" data-job-id="(\d+)"', listed.text)]
        assert found == sorted(ids.values(), reverse=True)
        assert 'id="bounded-scan"' not in listed.text
        assert link_of(listed, "workflow-link") == "/workflows/publish-42"
        assert 'name="workflow" value="publish-42"' in listed.text
        narrowed = await http.get("/jobs", params={"workflow": "publish-42", "state": "cancelled"})
        assert re.findall(r'data-job-id="(\d+)"', narrowed.text) == [
            str(ids["publish"]), str(ids["full"])
        ]  # fmt: skip


async def test_a_missing_workflow_is_a_404_and_a_bad_id_a_400(client: tq.Client) -> None:
    await client.insert_workflow(publish_workflow("exists"))
    async with browser(create_app(client)) as http:
        missing = await http.get("/workflows/no-such-workflow")
        assert missing.status_code == 404
        assert "There is no workflow with the id “no-such-workflow”." in missing.text
        assert (await http.get("/workflows", params={"id": "nope"})).status_code == 404

        too_long = await http.get("/workflows/" + "w" * 256)
        assert too_long.status_code == 400 and "workflow id: " in too_long.text
        assert (await http.get("/workflows/a%00b")).status_code == 400
        twice = await http.get("/workflows", params=[("id", "exists"), ("id", "exists")])
        assert twice.status_code == 400
        bad_filter = await http.get("/jobs", params={"workflow": "w" * 256})
        assert bad_filter.status_code == 400 and "workflow: " in bad_filter.text

        # No id: a form that asks for one; the trailing slash goes to it.
        form = await http.get("/workflows")
        assert form.status_code == 200 and '<form class="filters" method="get"' in form.text
        assert (await http.get("/workflows", params={"id": ""})).status_code == 200
        slash = await http.get("/workflows/")
        assert (slash.status_code, slash.headers["location"]) == (307, "/workflows")
        assert 'href="/workflows" aria-current="page"' in form.text

        found = await http.get("/workflows", params={"id": "exists"})
        assert found.status_code == 200 and 'id="workflow-graph"' in found.text


async def test_user_text_is_shown_as_text_whatever_it_holds(client: tq.Client) -> None:
    async with browser(create_app(client)) as http:
        for workflow_id in HOSTILE_IDS:
            wf = tq.Workflow(workflow_id)
            wf.add(HOSTILE_TASK, Fetch("x"), opts=LATER)
            wf.add("after " + HOSTILE_TASK, Publish(), deps=[HOSTILE_TASK], opts=LATER)
            jobs = await client.insert_workflow(wf)

            job_page = await http.get(f"/jobs/{jobs[HOSTILE_TASK].id}")
            url = link_of(job_page, "job-workflow")
            assert url == workflow_url(workflow_id)
            page = await http.get(url)
            assert page.status_code == 200, (workflow_id, url)
            shown = inner(page, r'<span id="workflow-id">(.*?)</span>')
            assert shown == workflow_id.replace("\u202e", "\\u202e")
            for text in (job_page.text, page.text):
                assert "<script>" not in text and "<img" not in text
                assert "\u202e" not in text
            graph = svg_of(page)  # well-formed: no value opened or closed an element
            titles = [t.text or "" for t in graph.iter(f"{SVG}title")]
            assert titles[0].startswith(HOSTILE_TASK.replace("\u202e", "\\u202e") + "\n")
            rows = table_rows(page)
            assert rows[1][1] == "after " + HOSTILE_TASK.replace("\u202e", "\\u202e")
            assert rows[1][6] == HOSTILE_TASK.replace("\u202e", "\\u202e")

            listed = await http.get(link_of(page, "workflow-jobs"))
            assert len(re.findall(r'<tr class="job"', listed.text)) == 2, workflow_id


async def test_a_huge_fan_out_page_is_capped_and_says_so(client: tq.Client) -> None:
    n = 10_000
    wf = tq.Workflow("fan-out")
    for i in range(n):
        wf.add(f"part-{i}", Resize(i), opts=LATER)
    wf.add("fan-in", Publish(), deps=[f"part-{i}" for i in range(n)], opts=LATER)
    with trio.fail_after(300):
        await client.insert_workflow(wf)
        async with browser(create_app(client), timeout=120) as http:
            page = await http.get("/workflows/fan-out")
    assert page.status_code == 200
    assert len(page.content) < 1_000_000
    assert len(drawn_states(page)) == MAX_COLUMN_TASKS + 1
    [more] = [a for a in svg_of(page).iter(f"{SVG}a") if "data-tasks" in a.attrib]
    assert more.attrib["data-tasks"] == str(n - MAX_COLUMN_TASKS)
    assert more.attrib["href"] == "/jobs?workflow=fan-out"
    text = html.unescape(page.text)
    assert "9,975 tasks are not drawn one by one" in text
    assert len(table_rows(page)) == WORKFLOW_TABLE_ROWS
    assert f"The table lists the first {WORKFLOW_TABLE_ROWS} of the 10,001 tasks" in text


# ------------------------------------------------------------------ the command line


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_workflows_get_prints_each_task_with_its_deps(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = trio.run(run_fetch_then_cancel_full, database_url, publish_workflow("publish-42"))
    url = ("--database-url", database_url)
    code, out, err = cli(capsys, "workflows", "get", "publish-42", *url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "workflow publish-42: 4 tasks (1 available, 2 cancelled, 1 completed)"
    assert lines[1].split() == ["TASK", "JOB_ID", "STATE", "KIND", "DEPS"]
    assert [line.split(None, 4) for line in lines[2:]] == [
        ["fetch", str(ids["fetch"]), "completed", "wf_fetch", "-"],
        ["thumb", str(ids["thumb"]), "available", "wf_resize", "fetch"],
        ["full", str(ids["full"]), "cancelled", "wf_resize", "fetch"],
        ["publish", str(ids["publish"]), "cancelled", "wf_publish", "thumb, full"],
    ]
    assert lines[1].index("STATE") == lines[2].index("completed")  # aligned

    code, out, err = cli(capsys, "workflows", "get", "publish-42", "--json", *url)
    assert code == 0, err
    document = json.loads(out)
    assert document["workflow_id"] == "publish-42"
    tasks = document["tasks"]
    assert [(t["task"], t["deps"]) for t in tasks] == [
        ("fetch", []), ("thumb", ["fetch"]), ("full", ["fetch"]), ("publish", ["thumb", "full"])
    ]  # fmt: skip
    fetch = tasks[0]["job"]
    assert fetch["id"] == ids["fetch"] and fetch["state"] == "completed"
    assert fetch["output"] == {"path": "/tmp/a.png"}
    assert fetch["workflow_id"] == "publish-42" and fetch["workflow_task"] == "fetch"
    assert tasks[3]["job"]["workflow_deps"] == [ids["thumb"], ids["full"]]

    # jobs list --workflow: the workflow's tasks only.
    trio.run(_insert_plain, database_url)
    code, out, err = cli(capsys, "jobs", "list", "--workflow", "publish-42", *url)
    assert code == 0, err
    assert [int(line.split()[0]) for line in out.splitlines()[1:]] == sorted(ids.values())
    code, out, _ = cli(
        capsys, "jobs", "list", "--workflow", "publish-42", "--state", "cancelled", "--json", *url
    )
    assert [j["id"] for j in json.loads(out)["jobs"]] == [ids["full"], ids["publish"]]
    code, out, _ = cli(capsys, "jobs", "list", "--workflow", "other", *url)
    assert code == 0 and out.strip() == "no jobs found"


async def _insert_plain(database_url: str) -> None:
    async with tq.open_client(database_url) as client:
        await client.insert(Publish())


async def _insert_hostile(database_url: str) -> None:
    async with tq.open_client(database_url) as client:
        wf = tq.Workflow("red\x1b[31m\u202e")
        wf.add("a\x1b]0;title\x07", Fetch("x"), opts=LATER)
        wf.add("b", Publish(), deps=["a\x1b]0;title\x07"], opts=LATER)
        await client.insert_workflow(wf)


def test_workflows_get_escapes_what_a_terminal_would_act_on(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trio.run(_insert_hostile, database_url)
    url = ("--database-url", database_url)
    code, out, err = cli(capsys, "workflows", "get", "red\x1b[31m\u202e", *url)
    assert code == 0, err
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    lines = out.splitlines()
    assert lines[0].startswith("workflow red\\u001b[31m\\u202e: 2 tasks")
    assert lines[2].split()[0] == "a\\u001b]0;title\\u0007"
    assert lines[3].split(None, 4)[4] == "a\\u001b]0;title\\u0007"
    code, out, _ = cli(capsys, "workflows", "get", "red\x1b[31m\u202e", "--json", *url)
    assert json.loads(out)["tasks"][1]["deps"] == ["a\x1b]0;title\x07"]  # JSON: as it is


def test_workflows_get_errors(
    database_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)
    url = ("--database-url", database_url)
    code, out, err = cli(capsys, "workflows", "get", "nope", *url)
    assert (code, out) == (1, "")
    assert err.strip() == "trioqueue workflows get: error: workflow 'nope' not found"

    for args in (("workflows", "get", "w" * 256), ("jobs", "list", "--workflow", "w" * 256)):
        code, _, err = cli(capsys, *args, "--database-url", "postgresql://unused@127.0.0.1:1/x")
        assert code == 2 and "must be a string of 1-255 characters" in err, args
    code, _, err = cli(capsys, "workflows", "get")
    assert code == 2 and "Missing argument 'ID'" in err
    code, _, err = cli(capsys, "workflows", "get", "x")
    assert code == 2 and "no database: pass --database-url URL" in err
    code, out, _ = cli(capsys, "--help")
    assert code == 0 and "workflows" in out


async def _insert_fan_in(database_url: str) -> None:
    async with tq.open_client(database_url) as client:
        wf = tq.Workflow("fan-in")
        for i in range(12):
            wf.add(f"t{i}", Resize(i), opts=LATER)
        wf.add("last", Publish(), deps=[f"t{i}" for i in range(12)], opts=LATER)
        await client.insert_workflow(wf)


def test_workflows_get_names_ten_deps_and_counts_the_rest(
    database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    trio.run(_insert_fan_in, database_url)
    url = ("--database-url", database_url)
    code, out, err = cli(capsys, "workflows", "get", "fan-in", *url)
    assert code == 0, err
    last = out.splitlines()[-1].split(None, 4)
    assert last[0] == "last" and last[4] == ", ".join(f"t{i}" for i in range(10)) + ", +2 more"
    code, out, _ = cli(capsys, "workflows", "get", "fan-in", "--json", *url)
    assert json.loads(out)["tasks"][-1]["deps"] == [f"t{i}" for i in range(12)]

"""The dashboard against hostile input (issue 13): ids and cursors outside int64, redirects
off the site, tokens of any characters, bodies past the limit, bidi controls, forged flash
messages; and ``trioqueue dashboard`` stopped by SIGINT and SIGTERM.

Requests a real client would normalise (``//evil.example/``) go to the ASGI app directly.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio
from test_dashboard import ReportArgs, browser, csrf_of, flash_of

import trioqueue as tq
from trioqueue.dashboard import _security, create_app
from trioqueue.dashboard._app import MAX_FORM_BYTES
from trioqueue.embedded import DATABASE_URL_ENV

Message = dict[str, Any]


@pytest.fixture
async def client(database_url: str) -> AsyncIterator[tq.Client]:
    async with tq.open_client(database_url) as client:
        yield client


async def asgi(
    app: Any,
    method: str,
    path: str,
    *,
    query: str = "",
    headers: list[tuple[str, str]] | None = None,
    receive: Callable[[], Awaitable[Message]] | None = None,
    scheme: str = "http",
) -> tuple[int, dict[str, str], bytes]:
    """One request straight into the ASGI app, path as given: status, headers, body."""
    sent: list[Message] = []

    async def no_body() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": scheme,
        "path": path,
        "raw_path": path.encode("utf-8"),
        "query_string": query.encode("ascii"),
        "root_path": "",
        "headers": [
            (k.lower().encode("latin-1"), v.encode("latin-1"))
            for k, v in (headers if headers is not None else [("host", "testserver")])
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    with trio.fail_after(30):
        await app(scope, receive or no_body, send)
    start = sent[0]
    response_headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in start["headers"]}
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], response_headers, body


def same_site(location: str) -> bool:
    """Whether a browser following ``location`` stays on the site it came from."""
    parts = urllib.parse.urlsplit(location)
    return (
        location.startswith("/")
        and not location.startswith(("//", "/\\"))
        and not parts.scheme
        and not parts.netloc
        and all(33 <= ord(c) < 127 for c in location)
    )


# ------------------------------------------------------------------ ids and cursors


async def test_ids_and_cursors_must_be_ascii_digits_within_int64(client: tq.Client) -> None:
    job = (await client.insert(ReportArgs(1))).job
    bad = ["²", "9999999999999999999", "9223372036854775808", "\uff19", "1_0", "-1", "+1", " 1"]
    async with browser(create_app(client)) as http:
        token = csrf_of(await http.get(f"/jobs/{job.id}"))
        for raw in bad:
            quoted = urllib.parse.quote(raw, safe="")
            for page in (f"/jobs/{quoted}", f"/jobs/{quoted}/delete"):
                refused = await http.get(page)
                assert refused.status_code == 400, (page, refused.status_code)
                assert "job id: " in refused.text
            for action in ("cancel", "retry", "delete"):
                refused = await http.post(f"/jobs/{quoted}/{action}", data={"csrf_token": token})
                assert refused.status_code == 400, (raw, action)
            if raw.strip() == raw:  # query values are stripped first
                listed = await http.get("/jobs", params={"after": raw})
                assert listed.status_code == 400 and "after: " in listed.text, raw
        # The largest bigint is a fine id and cursor: no such job, an empty page.
        assert (await http.get("/jobs/9223372036854775807")).status_code == 404
        assert (await http.get("/jobs", params={"after": "9223372036854775807"})).status_code == 200
    assert (await client.job_get(job.id)).state is tq.JobState.AVAILABLE


# ------------------------------------------------------------------ redirects


async def test_every_redirect_stays_on_the_site(client: tq.Client) -> None:
    gated = create_app(client, token="T")
    for path in ("//evil.example/", "///evil.example", "/\\evil.example/", "/\\/evil.example",
                 "/\t/evil.example", "//evil.example/%2e%2e/x"):  # fmt: skip
        status, headers, _ = await asgi(gated, "GET", path, query="token=T&state=available")
        assert status == 303, path
        assert same_site(headers["location"]), (path, headers["location"])
        assert headers["location"].endswith("?state=available")

    # Starlette's own slash redirect named the Host header's site; this one is relative.
    app = create_app(client)
    for path in ("/jobs/", "/queues/", "//evil.example/", "/jobs/1/"):
        status, headers, _ = await asgi(app, "GET", path, headers=[("host", "evil.example")])
        assert status in (307, 404), path
        if status == 307:
            assert same_site(headers["location"]), (path, headers["location"])
    status, headers, _ = await asgi(app, "GET", "/jobs/", query="state=running")
    assert (status, headers["location"]) == (307, "/jobs?state=running")

    # Actions answer 303 to a page of this site, whatever they act on.
    job = (await client.insert(ReportArgs(1))).job
    async with browser(app) as http:
        token = csrf_of(await http.get("/queues"))
        for path in (f"/jobs/{job.id}/cancel", f"/jobs/{job.id}/retry", "/queues/default/pause",
                     "/queues/default/resume", f"/jobs/{job.id}/delete"):  # fmt: skip
            done = await http.post(path, data={"csrf_token": token})
            assert done.status_code == 303 and same_site(done.headers["location"]), path


# ------------------------------------------------------------------ the token and its cookie


@pytest.mark.parametrize("token", ['a b;c"d=é', "x\\y,z;=\"'", "  spaced  ", "токен ☃ 🔑"])
async def test_a_token_of_any_characters_works_through_its_cookie(
    client: tq.Client, token: str
) -> None:
    app = create_app(client, token=token)
    async with browser(app) as http:
        entry = await http.get("/queues", params={"token": token})
        assert entry.status_code == 303 and entry.headers["location"] == "/queues"
        cookie = entry.headers["set-cookie"]
        name, _, rest = cookie.partition("=")
        value = rest.partition(";")[0]
        assert name == _security.TOKEN_COOKIE
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", value), cookie  # not the token: a MAC
        assert value == _security.cookie_value(token)
        assert "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
        assert "secure" not in cookie.lower()  # plain http: a Secure cookie would not return
        assert (await http.get("/queues")).status_code == 200  # the cookie alone lets it in
        bearer = b"Bearer " + token.strip().encode("utf-8")
        http.cookies.clear()
        if token == token.strip():
            assert (await http.get("/", headers={"authorization": bearer})).status_code == 200

    # The raw token, another token's cookie, a damaged cookie: refused.
    async with browser(app) as http:
        for wrong in (
            token,
            _security.cookie_value(token + "x"),
            value[:-1] + ("B" if value.endswith("A") else "A"),
        ):
            header = f"{_security.TOKEN_COOKIE}={wrong}".encode()
            assert (await http.get("/", headers={"cookie": header})).status_code == 401, wrong


async def test_the_cookie_is_secure_over_https(client: tq.Client) -> None:
    app = create_app(client, token="T")
    status, headers, _ = await asgi(app, "GET", "/", query="token=T", scheme="https")
    assert status == 303 and "; secure" in headers["set-cookie"].lower()


# ------------------------------------------------------------------ request bodies


async def test_a_body_past_the_limit_is_refused_unread(client: tq.Client) -> None:
    app = create_app(client)
    reads = 0

    async def receive() -> Message:
        nonlocal reads
        reads += 1
        await trio.lowlevel.checkpoint()
        return {"type": "http.request", "body": b"x" * 1024, "more_body": reads < 64}

    # Content-Length says too much: 413 before any of the body is read.
    headers = [("host", "testserver"), ("content-type", "application/x-www-form-urlencoded")]
    status, _, body = await asgi(
        app, "POST", "/queues/default/pause", headers=[*headers, ("content-length", "99999999")],
        receive=receive,
    )  # fmt: skip
    assert (status, reads) == (413, 0)
    assert b"Request too large" in body

    # Chunked (no Content-Length): counted as it streams in, stopped just past the limit.
    status, _, _ = await asgi(
        app, "POST", "/queues/default/pause", headers=headers, receive=receive
    )
    assert status == 413
    assert reads <= MAX_FORM_BYTES // 1024 + 1
    assert await client.queue_list() == []


# ------------------------------------------------------------------ bidi controls

BIDI = ["\u202a", "\u202b", "\u202c", "\u202d", "\u202e", "\u2066", "\u2067", "\u2068",
        "\u2069", "\u200e", "\u200f", "\u061c"]  # fmt: skip


async def test_bidi_controls_are_shown_as_escapes_everywhere(client: tq.Client) -> None:
    evil = "".join(BIDI)
    async with client.transaction() as tx:
        await tx.execute(
            "INSERT INTO tq_job (state, attempt, max_attempts, kind, queue, tags, args,"
            " metadata, attempted_by, errors)"
            " VALUES ('retryable', 1, 5, $1, $1, ARRAY[$1], jsonb_build_object('a', $1::text),"
            " jsonb_build_object($1::text, 1), ARRAY[$1],"
            " jsonb_build_array(jsonb_build_object('at', now(), 'attempt', 1, 'error', $1::text,"
            " 'trace', $1::text)))",
            f"gnp.{evil}exe",
        )
    [job] = (await client.job_list(tq.JobListParams())).jobs
    async with browser(create_app(client)) as http:
        for path in ("/", "/jobs", f"/jobs/{job.id}", f"/jobs/{job.id}/delete", "/queues"):
            page = await http.get(path)
            assert page.status_code == 200, path
            for char in BIDI:
                assert char not in page.text, (path, hex(ord(char)))
        shown = (await http.get(f"/jobs/{job.id}")).text
        assert shown.count("\\u202e") >= 5  # kind, queue, tag, attempted by, error, trace...


# ------------------------------------------------------------------ flash messages


async def test_flash_messages_cannot_be_forged_by_a_link(
    client: tq.Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = (await client.insert(ReportArgs(1))).job
    async with browser(create_app(client)) as http:
        token = csrf_of(await http.get("/queues"))
        done = await http.post(f"/jobs/{job.id}/retry", data={"csrf_token": token})
        foreign = done.headers["location"]  # signed with another app's secret
    async with browser(create_app(client)) as http:
        for link in (
            "/queues?flash=paused&name=call-support-now",
            f"/jobs/{job.id}?flash=deleted&id={job.id}",
            foreign,
        ):
            page = await http.get(link)
            assert page.status_code == 200 and 'class="flash"' not in page.text, link

        token = csrf_of(await http.get("/queues"))
        done = await http.post("/queues/default/pause", data={"csrf_token": token})
        real = done.headers["location"]
        assert flash_of(await http.get(real)).startswith("Queue default paused")
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(real).query))
        signature = query["sig"]
        for changed in (
            {"name": "other"},
            {"flash": "resumed"},
            {"sig": signature[:-1] + ("B" if signature.endswith("A") else "A")},
        ):
            page = await http.get("/queues?" + urllib.parse.urlencode({**query, **changed}))
            assert 'class="flash"' not in page.text, changed

        # A real flash link shows for FLASH_MAX_AGE only.
        later = _security.time.time() + _security.FLASH_MAX_AGE + 60
        monkeypatch.setattr(_security.time, "time", lambda: later)
        assert 'class="flash"' not in (await http.get(real)).text


# ------------------------------------------------------------------ stopping the command


async def _stop_dashboard(database_url: str, signum: int) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != DATABASE_URL_ENV}
    command = [sys.executable, "-m", "trioqueue.cli", "dashboard", "--port", "0"]
    process = await trio.lowlevel.open_process(
        [*command, "--database-url", database_url],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    err = ""
    try:
        with trio.fail_after(60):
            async for chunk in process.stderr:
                err += chunk.decode()
                found = re.search(r"dashboard on (http://\S+)", err)
                if found:
                    break
            assert found, err
            async with httpx.AsyncClient(base_url=found.group(1)) as http:
                assert (await http.get("/healthz")).text == "ok"
                process.send_signal(signum)
                async for chunk in process.stderr:
                    err += chunk.decode()
            return await process.wait(), err
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_ctrl_c_stops_the_dashboard_with_130(database_url: str) -> None:
    code, err = await _stop_dashboard(database_url, signal.SIGINT)
    assert code == 130, err
    assert "SIGINT: stopping" in err and "dashboard stopped" in err
    assert "Traceback" not in err


async def test_sigterm_stops_the_dashboard_gracefully_with_0(database_url: str) -> None:
    code, err = await _stop_dashboard(database_url, signal.SIGTERM)
    assert code == 0, err
    assert "SIGTERM: stopping" in err and "dashboard stopped" in err
    assert "Traceback" not in err

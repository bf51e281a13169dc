"""The dashboard's routes: server-rendered pages over the client API, and the actions.

Every page reads through the :class:`~trioqueue.Client` it was given, with bounded work on
any table size (docs/dashboard.md shows the plans). Actions are POSTs carrying a CSRF token,
with a form of at most ``MAX_FORM_BYTES`` (413 past it, refused before it is buffered); each
answers with a redirect (303) to a page that shows what happened in a flash message, whose
query carries a signature so that a link cannot make the page say anything else.

Every value a page shows goes through one Jinja ``finalize`` hook that HTML-escapes it (the
autoescape) and shows bidirectional-text controls as visible escapes (``\\u202e``), so a
job's kind, args or error cannot reorder what the page says around it.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from importlib import resources
from typing import Any, Final

import jinja2
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..client import Client, QueueInfo
from ..errors import JobNotFoundError, JobRunningError, ValidationError
from ..job import (
    FINALIZED_STATES,
    Job,
    JobListParams,
    JobState,
    check_tag,
    parse_bigint,
    validate_kind,
    validate_workflow_id,
)
from ..job import validate_queue_name as _validate_queue_name
from ..limits import GlobalLimit, RateLimit
from ._security import CSRF_MAX_AGE, FLASH_MAX_AGE, SafetyMiddleware, Signer, redirect
from ._workflow_graph import MAX_COLUMN_TASKS, MAX_COLUMNS, NODE_HEIGHT, NODE_WIDTH, layout

__all__ = [
    "MAX_FORM_BYTES",
    "PAGE_SIZE",
    "SCAN_NEWEST",
    "WORKFLOW_TABLE_ROWS",
    "build_app",
    "workflow_url",
]

PAGE_SIZE: Final = 50
"""Jobs per page of the job list."""
SCAN_NEWEST: Final = 100_000
"""A job list filtered by anything but a live state (no index serves those filters in id
order) looks at the newest this many job ids only, and says so."""
REFRESH_SECONDS: Final = 5
MAX_FORM_BYTES: Final = 16 * 1024
"""The largest action form (request body) accepted; a longer one gets 413 unread."""
WORKFLOW_TABLE_ROWS: Final = 500
"""Tasks listed in a workflow page's table (the graph has its own caps); the job list,
filtered by the workflow, pages through the rest."""
_LIVE_STATES: Final = [s for s in JobState if s not in FINALIZED_STATES]
_FINALIZED: Final = [JobState.COMPLETED, JobState.CANCELLED, JobState.DISCARDED]

_FLASH: Final[Mapping[str, str]] = {
    "cancelled": "Job {id} cancelled.",
    "cancel-requested": "Job {id} is running: its worker has been asked to cancel it.",
    "already-finalized": "Job {id} had already finished: nothing to cancel.",
    "retried": "Job {id} is available to run now.",
    "running": "Job {id} is running: it was left alone.",
    "deleted": "Job {id} deleted.",
    "not-deleted-running": "Job {id} is running: it cannot be deleted until it finishes.",
    "paused": "Queue {name} paused: no worker fetches its jobs until it is resumed.",
    "resumed": "Queue {name} resumed.",
}


_BIDI_CONTROLS: Final = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)]
"""Characters that reorder the text around them: the embeddings, overrides and isolates and
the marks (Unicode's Bidi_Control property)."""
_SHOW_BIDI: Final = {c: f"\\u{c:04x}" for c in _BIDI_CONTROLS}


class BadInput(Exception):
    """A query or form value the dashboard refuses: a 400 page naming the field."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class TooLarge(Exception):
    """A request body past ``MAX_FORM_BYTES``: a 413 page."""


def _visible(value: Any) -> Any:
    """Every ``{{ value }}`` of every template, before its autoescape: bidi controls shown as
    escapes such as ``\\u202e``. Markup (already escaped, from ``join`` say) stays Markup;
    the escapes hold no HTML-special character."""
    if isinstance(value, Markup):
        return Markup(str(value).translate(_SHOW_BIDI))
    if isinstance(value, str):
        return value.translate(_SHOW_BIDI)
    text = str(value)
    shown = text.translate(_SHOW_BIDI)
    return value if shown == text else shown


def _templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("trioqueue.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_visible,
    )
    env.filters["time"] = _format_time
    env.filters["count"] = lambda n: f"{n:,}"
    env.filters["pretty_json"] = lambda v: json.dumps(v, indent=2, sort_keys=True, default=str)
    env.filters["limits"] = _format_limits
    env.filters["partition"] = _format_partition
    return env


def _limit_text(name: str, amount: str, limit: GlobalLimit | RateLimit) -> str:
    by = (["kind"] if limit.by_kind else []) + [f"args.{field}" for field in limit.by_args]
    return f"{name} {amount}" + (f" by {', '.join(by)}" if by else "")


def _format_limits(queue: QueueInfo | None) -> str:
    """A queue's limits in one line, as ``trioqueue queues list`` shows them: ``global 5 by
    args.customer; rate 100/60s by kind``; a dash for none."""
    parts = []
    if queue is not None and (g := queue.global_limit) is not None:
        parts.append(_limit_text("global", str(g.limit), g))
    if queue is not None and (r := queue.rate_limit) is not None:
        per = f"{int(r.per)}s" if r.per.is_integer() else f"{r.per:g}s"
        parts.append(_limit_text("rate", f"{r.limit}/{per}", r))
    return "; ".join(parts) or "—"


def _format_partition(partition: Mapping[str, Any]) -> str:
    """A partition as ``args.customer = "acme", kind = "email"``, each value as JSON (so
    ``1`` and ``"1"`` differ). Plain text: the autoescape and ``finalize`` neutralise it
    like any other value, and partition values are job args, user data."""
    if not partition:
        return "(whole queue)"
    return ", ".join(
        f"{key} = {json.dumps(value, ensure_ascii=False, default=repr)}"
        for key, value in partition.items()
    )


def _format_time(value: datetime | None) -> str:
    return "—" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _args_json(job: Job[Any]) -> Any:
    args = job.args
    if isinstance(args, dict):
        return args
    try:
        import attrs

        return attrs.asdict(args) if attrs.has(type(args)) else repr(args)
    except Exception:
        return repr(args)


def workflow_url(workflow_id: str) -> str:
    """The address of a workflow's page: ``/workflows/ID``, the id percent-encoded as one
    path segment (``/`` too). An id a browser or the router would not keep as a segment
    (``.`` and ``..``, which browsers resolve away, or one holding a newline) gets the
    equivalent ``/workflows?id=ID``."""
    if workflow_id in (".", "..") or "\n" in workflow_id:
        return "/workflows?" + urllib.parse.urlencode({"id": workflow_id})
    return "/workflows/" + urllib.parse.quote(workflow_id, safe="")


def _workflow_id(text: str, field: str = "workflow id") -> str:
    try:
        return validate_workflow_id(field, text)
    except ValidationError as exc:
        raise BadInput(field, exc.rule) from None


def _bigint(field: str, text: str) -> int:
    """A job id or cursor: ASCII digits within int64, else BadInput (a 400 page)."""
    try:
        return parse_bigint(field, text)
    except ValidationError as exc:
        raise BadInput(field, exc.rule) from None


def _job_id(request: Request) -> int:
    return _bigint("job id", request.path_params["job_id"])


def _queue_name(request: Request) -> str:
    try:
        return _validate_queue_name("queue", request.path_params["name"])
    except ValidationError as exc:
        raise BadInput("queue", exc.rule) from None


def _one(request: Request, field: str) -> str | None:
    values = request.query_params.getlist(field)
    if len(values) > 1:
        raise BadInput(field, "give it at most once")
    value = values[0].strip() if values else ""
    return value or None


def _list_params(request: Request) -> tuple[dict[str, str], JobListParams, bool]:
    """The job list's filters (as given, for the form and links), the list params, and
    whether the scan is bounded to the newest job ids."""
    filters: dict[str, str] = {}
    state = _one(request, "state")
    kind = _one(request, "kind")
    queue = _one(request, "queue")
    tag = _one(request, "tag")
    workflow = request.query_params.getlist("workflow")
    after = _one(request, "after")
    if state is not None:
        if state not in {s.value for s in JobState}:
            raise BadInput("state", f"{state!r} is not a job state ({', '.join(JobState)})")
        filters["state"] = state
    if kind is not None:
        try:
            filters["kind"] = validate_kind(kind)
        except ValidationError as exc:
            raise BadInput("kind", exc.rule) from None
    if queue is not None:
        try:
            filters["queue"] = _validate_queue_name("queue", queue)
        except ValidationError as exc:
            raise BadInput("queue", exc.rule) from None
    if tag is not None:
        try:
            filters["tag"] = check_tag("tag", tag)
        except ValidationError as exc:
            raise BadInput("tag", exc.rule) from None
    if len(workflow) > 1:
        raise BadInput("workflow", "give it at most once")
    if workflow and workflow[0]:  # not stripped: a workflow id may hold spaces
        filters["workflow"] = _workflow_id(workflow[0], "workflow")
    cursor = None if after is None else _bigint("after", after)
    # Live states are listed from the fetch index (bounded by the backlog), a workflow's
    # tasks from the workflow index (bounded by its size); any other filter walks the
    # primary key, so it looks at the newest SCAN_NEWEST ids only.
    live = state is not None and JobState(state) not in FINALIZED_STATES
    bounded = bool(filters) and not live and "workflow" not in filters
    params = JobListParams(
        states=[JobState(state)] if state else None,
        kinds=[kind] if kind else None,
        queues=[queue] if queue else None,
        tags=[tag] if tag else None,
        after=cursor,
        limit=PAGE_SIZE + 1,
        descending=True,
        within_newest=SCAN_NEWEST if bounded else None,
        workflow_id=filters.get("workflow"),
    )
    return filters, params, bounded


async def _form(request: Request) -> dict[str, str]:
    """The POSTed url-encoded form (first value of each field).

    Raises TooLarge, having read at most ``MAX_FORM_BYTES`` and a chunk, for a body past the
    limit: a ``Content-Length`` over it is refused before any of the body is read, and a
    body without one (chunked) is counted as it streams in.
    """
    length = request.headers.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise BadInput("Content-Length", f"{length!r} is not a number of bytes")
        if len(length) > 12 or int(length) > MAX_FORM_BYTES:
            raise TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise TooLarge
    try:
        fields = urllib.parse.parse_qs(body.decode("utf-8"), max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise BadInput("form", "not a url-encoded form") from None
    return {k: v[0] for k, v in fields.items()}


def build_app(
    client: Client,
    *,
    read_only: bool,
    token: str | None,
    allowed_hosts: list[str] | None,
    refresh_seconds: int = REFRESH_SECONDS,
) -> SafetyMiddleware:
    """The whole dashboard as an ASGI app (see ``trioqueue.dashboard.create_app``)."""
    env = _templates()
    signer = Signer()
    static = resources.files("trioqueue.dashboard").joinpath("static")

    def flash_of(request: Request) -> str | None:
        """The flash message of a redirect from ``back``, if its signature holds."""
        query = request.query_params
        code, subject_id, subject_name = (query.get(k, "") for k in ("flash", "id", "name"))
        message = f"{code}\n{subject_id}\n{subject_name}"
        if code not in _FLASH or not signer.check(
            query.get("sig"), "flash", message, max_age=FLASH_MAX_AGE
        ):
            return None
        return _FLASH[code].format(id=subject_id, name=subject_name)

    def page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = env.get_template(name).render(
            read_only=read_only,
            csrf_token=signer.make("csrf"),
            refresh_seconds=refresh_seconds,
            flash=flash_of(request),
            path=request.url.path,
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def error_page(request: Request, status: int, title: str, message: str) -> HTMLResponse:
        return page(request, "error.html", status, title=title, message=message, refresh=False)

    Handler = Callable[[Request], Awaitable[Response]]

    def guarded(handler: Handler) -> Handler:
        async def run(request: Request) -> Response:
            try:
                return await handler(request)
            except BadInput as exc:
                return error_page(request, 400, "Bad request", f"{exc.field}: {exc.rule}")
            except JobNotFoundError as exc:
                return error_page(request, 404, "Not found", f"There is no job {exc.job_id}.")
            except TooLarge:
                message = f"A form holds at most {MAX_FORM_BYTES:,} bytes."
                return error_page(request, 413, "Request too large", message)

        return run

    def action(handler: Handler) -> Handler:
        async def run(request: Request) -> Response:
            if read_only:
                return error_page(request, 403, "Read-only", "This dashboard is read-only.")
            form = await _form(request)
            if not signer.check(form.get("csrf_token"), "csrf", max_age=CSRF_MAX_AGE):
                return error_page(
                    request,
                    403,
                    "Form expired",
                    "The form's CSRF token is missing or stale: reload the page and try again.",
                )
            return await handler(request)

        return guarded(run)

    def back(path: str, flash: str, *, job_id: int | None = None, queue: str = "") -> Response:
        """A 303 to ``path`` showing the flash message ``flash`` about job ``job_id`` or
        queue ``queue``, signed so that only this app can make such a link."""
        subject = {"id": "" if job_id is None else str(job_id), "name": queue}
        sig = signer.make("flash", f"{flash}\n{subject['id']}\n{queue}")
        query = {"flash": flash, **{k: v for k, v in subject.items() if v}, "sig": sig}
        return redirect(path, urllib.parse.urlencode(query))

    async def overview(request: Request) -> Response:
        counts = await client.job_counts()
        leader = await client.leader_get()
        return page(
            request,
            "overview.html",
            counts=counts,
            leader=leader,
            states=list(JobState),
            live_states=_LIVE_STATES,
            finalized_states=_FINALIZED,
            refresh=True,
        )

    async def job_list(request: Request) -> Response:
        filters, params, bounded = _list_params(request)
        result = await client.job_list(params)
        jobs = result.jobs[:PAGE_SIZE]
        next_url = None
        if len(result.jobs) > PAGE_SIZE:
            next_url = "/jobs?" + urllib.parse.urlencode({**filters, "after": jobs[-1].id})
        return page(
            request,
            "jobs.html",
            jobs=jobs,
            filters=filters,
            states=list(JobState),
            next_url=next_url,
            first_url="/jobs?" + urllib.parse.urlencode(filters) if params.after else None,
            bounded=bounded,
            scan_newest=SCAN_NEWEST,
            workflow_link=workflow_url(filters["workflow"]) if "workflow" in filters else None,
            refresh=True,
        )

    async def job_detail(request: Request) -> Response:
        job = await client.job_get(_job_id(request))
        return page(
            request,
            "job.html",
            job=job,
            args=_args_json(job),
            finalized=job.state in FINALIZED_STATES,
            running=job.state is JobState.RUNNING,
            workflow_url=None if job.workflow_id is None else workflow_url(job.workflow_id),
            refresh=True,
        )

    async def workflow(request: Request) -> Response:
        """A workflow's page (``/workflows/ID`` or ``/workflows?id=ID``), or with no id
        the form that asks for one; 404 for a workflow without tasks."""
        given = request.path_params.get("workflow_id")
        if given is None:
            ids = request.query_params.getlist("id")
            if len(ids) > 1:
                raise BadInput("id", "give it at most once")
            given = ids[0] if ids else ""
            if not given:
                return page(request, "workflows.html", refresh=False)
        elif not given:
            return redirect("/workflows", request.url.query, status_code=307)
        workflow_id = _workflow_id(given)
        tasks = await client.workflow_get(workflow_id)
        if not tasks:
            return error_page(
                request, 404, "Not found", f"There is no workflow with the id “{workflow_id}”."
            )
        graph = layout(tasks.values())
        return page(
            request,
            "workflow.html",
            workflow_id=workflow_id,
            graph=graph,
            states=[(s, graph.states[s]) for s in JobState if s in graph.states],
            rows=graph.tasks[:WORKFLOW_TABLE_ROWS],
            jobs_url="/jobs?" + urllib.parse.urlencode({"workflow": workflow_id}),
            node_width=NODE_WIDTH,
            node_height=NODE_HEIGHT,
            max_column_tasks=MAX_COLUMN_TASKS,
            max_columns=MAX_COLUMNS,
            refresh=True,
        )

    async def job_cancel(request: Request) -> Response:
        job_id = _job_id(request)
        before = await client.job_get(job_id)
        job = await client.job_cancel(job_id)
        if before.state in FINALIZED_STATES:
            code = "already-finalized"
        elif job.state is JobState.RUNNING:
            code = "cancel-requested"
        else:
            code = "cancelled"
        return back(f"/jobs/{job_id}", code, job_id=job_id)

    async def job_retry(request: Request) -> Response:
        job_id = _job_id(request)
        job = await client.job_retry(job_id)
        code = "running" if job.state is JobState.RUNNING else "retried"
        return back(f"/jobs/{job_id}", code, job_id=job_id)

    async def job_delete_confirm(request: Request) -> Response:
        if read_only:
            return error_page(request, 403, "Read-only", "This dashboard is read-only.")
        job = await client.job_get(_job_id(request))
        return page(
            request,
            "delete.html",
            job=job,
            running=job.state is JobState.RUNNING,
            refresh=False,
        )

    async def job_delete(request: Request) -> Response:
        job_id = _job_id(request)
        try:
            await client.job_delete(job_id)
        except JobRunningError:
            return back(f"/jobs/{job_id}", "not-deleted-running", job_id=job_id)
        return back("/jobs", "deleted", job_id=job_id)

    async def queues(request: Request) -> Response:
        rows = {q.name: q for q in await client.queue_list()}
        counts = await client.job_counts()
        names = sorted(set(rows) | set(counts.queues))
        limited = [
            q for q in rows.values() if q.global_limit is not None or q.rate_limit is not None
        ]
        return page(
            request,
            "queues.html",
            names=names,
            rows=rows,
            limited=sorted(limited, key=lambda q: q.name),
            counts=counts.queues,
            live_states=_LIVE_STATES,
            refresh=True,
        )

    async def queue_pause(request: Request) -> Response:
        name = _queue_name(request)
        await client.queue_pause(name)
        return back("/queues", "paused", queue=name)

    async def queue_resume(request: Request) -> Response:
        name = _queue_name(request)
        await client.queue_resume(name)
        return back("/queues", "resumed", queue=name)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def static_file(request: Request) -> Response:
        name = request.path_params["name"]
        media = {"dashboard.css": "text/css", "dashboard.js": "text/javascript"}.get(name)
        if media is None:
            return PlainTextResponse("not found\n", status_code=404)
        return Response(static.joinpath(name).read_bytes(), media_type=media)

    async def not_found(request: Request, exc: Exception) -> Response:
        path = request.url.path
        if request.method in ("GET", "HEAD") and path != "/" and path.endswith("/"):
            # Starlette's own slash redirect is off: it names the Host header's site.
            return redirect(path.rstrip("/"), request.url.query, status_code=307)
        return error_page(request, 404, "Not found", "There is no such page.")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return PlainTextResponse("method not allowed\n", status_code=405)

    routes = [
        Route("/", guarded(overview), methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/jobs", guarded(job_list), methods=["GET"]),
        Route("/jobs/{job_id}", guarded(job_detail), methods=["GET"]),
        Route("/jobs/{job_id}/cancel", action(job_cancel), methods=["POST"]),
        Route("/jobs/{job_id}/retry", action(job_retry), methods=["POST"]),
        Route("/jobs/{job_id}/delete", guarded(job_delete_confirm), methods=["GET"]),
        Route("/jobs/{job_id}/delete", action(job_delete), methods=["POST"]),
        Route("/queues", guarded(queues), methods=["GET"]),
        Route("/queues/{name}/pause", action(queue_pause), methods=["POST"]),
        Route("/queues/{name}/resume", action(queue_resume), methods=["POST"]),
        Route("/workflows", guarded(workflow), methods=["GET"]),
        Route("/workflows/{workflow_id:path}", guarded(workflow), methods=["GET"]),
        Route("/static/{name}", static_file, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: method_not_allowed})
    app.router.redirect_slashes = False
    return SafetyMiddleware(app, token=token, allowed_hosts=allowed_hosts)

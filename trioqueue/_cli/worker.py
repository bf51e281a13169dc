"""``trioqueue worker MODULE:ATTR``: a long-lived process that works jobs.

ATTR is a ``tq.WorkerSettings`` (the whole client configuration), a ``tq.Workers`` (the
client defaults around it), or a zero-argument function returning either. Flags given on
the command line override the settings (see ``worker_settings``).

Signals (SIGINT or SIGTERM, in any mix), counted from before start-up until the process
exits: the first starts a soft stop (no more fetching, running jobs finish), the second a
hard stop (running jobs are cancelled and go back to ``available``), the third exits at
once with code 130 (jobs still running stay ``running`` until a leader's rescuer returns
them to work). During start-up (connecting, possibly retrying for ``startup_timeout``)
nothing runs yet: the first signal cancels the start-up and the worker exits 0.

The worker also ends when its client stops without a signal: 0 when the stop was asked
for (a job's ``client.stop()``), the error's exit code when the client failed.

Logging is set up before MODULE is imported, so a module that logs (or calls
``logging.basicConfig()``) at import cannot take it over. With ``--log-format json`` the
final ``trioqueue worker: error: ...`` and ``interrupted`` lines are log records too.

``--health-port`` serves ``GET /healthz`` (see ``_cli/health.py``): 503 ``starting`` until
the client runs, 200 ``ok`` while its producers fetch, 503 ``stopping`` once any stop has
begun (a signal's, even during start-up; ``soft_stop_timeout``'s; a job's ``SystemExit``
or ``client.stop()``). ``--health-host``
defaults to 127.0.0.1: the endpoint has no authentication, so it is reachable from the
machine (and from inside the container: Docker's HEALTHCHECK, systemd, a local monitor)
unless the operator opens it. Kubernetes' probes come from the kubelet to the pod's IP,
so a Deployment passes ``--health-host 0.0.0.0`` (``::`` on IPv6-only clusters);
docs/deployment.md shows it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import AsyncIterator
from typing import Any

import attrs
import click
import trio

from .._failure import fatal_unwrapped
from ..client import Client, open_client
from ..config import MAX_WORKERS_LIMIT, QueueConfig
from ..errors import ValidationError
from ..job import validate_queue_name
from ..settings import WorkerSettings
from ..workers import Workers
from .common import INTERRUPTED, CliError, database_url_option, require_database_url, run_trio
from .health import listening_addresses, open_health_listeners, serve_health
from .logs import LOG_FORMATS, JsonFormatter, setup_logging

__all__ = ["load_workers", "worker", "worker_settings"]

log = logging.getLogger("trioqueue.worker")

DEFAULT_QUEUES = {"default": 100}
"""The queues worked when neither the settings nor ``--queue`` name any."""

_TARGET = "'MODULE:ATTR'"
_ACCEPTED = "a trioqueue.Workers, a trioqueue.WorkerSettings or a function returning one"


def _parse_queues(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, int]:
    """The ``--queue NAME=MAX_WORKERS`` values as ``{name: max_workers}``."""
    queues: dict[str, int] = {}
    for value in values:
        name, sep, count = value.partition("=")
        if not sep:
            raise click.BadParameter(f"{value!r} is not NAME=MAX_WORKERS (for example default=100)")
        try:
            validate_queue_name("queue", name)
        except ValidationError as exc:
            raise click.BadParameter(f"{value!r}: {exc.rule}") from None
        try:
            max_workers = QueueConfig(max_workers=int(count)).max_workers
        except (ValueError, ValidationError):
            raise click.BadParameter(
                f"{value!r}: MAX_WORKERS must be an integer from 1 to {MAX_WORKERS_LIMIT}"
            ) from None
        if name in queues:
            raise click.BadParameter(f"queue {name!r} is given twice")
        queues[name] = max_workers
    return queues


class Seconds(click.ParamType[float]):
    """A duration on the command line: a finite number of seconds above 0, or ``none``
    (no limit), which converts to ``math.inf``."""

    name = "seconds"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        if text.lower() == "none":
            return math.inf
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds) or seconds <= 0:
            self.fail(f"{text!r} is not a number of seconds above 0 (or none)", param, ctx)
        return seconds


def _where(exc: BaseException) -> str:
    """Where in the user's code ``exc`` was raised, as `` (FILE, line N)``, if anywhere."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def _import_target(spec: str) -> Any:
    """The object ``MODULE:ATTR`` names (the current directory first on ``sys.path``)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(
            f"{spec!r} is not MODULE:ATTR (for example myapp.jobs:settings)", param_hint=_TARGET
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise click.BadParameter(
                f"no module named {missing!r} (looked in the current directory and on sys.path)",
                param_hint=_TARGET,
            ) from None
        raise CliError(f"importing {module_name!r} failed: {exc}{_where(exc)}") from None
    except Exception as exc:
        raise CliError(
            f"importing {module_name!r} failed: {type(exc).__name__}: {exc}{_where(exc)}"
        ) from None
    found: Any = module
    for part in attr.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise click.BadParameter(
                f"module {module_name!r} has no attribute {attr!r}", param_hint=_TARGET
            ) from None
    return found


def load_workers(spec: str) -> WorkerSettings:
    """Import ``MODULE:ATTR`` and return what the worker runs, as ``WorkerSettings``: ATTR
    is a ``WorkerSettings``, a ``Workers`` (put in settings of its own), or a zero-argument
    function returning either. The settings must hold at least one worker.

    Raises click.BadParameter (a usage error) for a spec that names nothing usable,
    CliError when the module or the function raises.
    """
    found = _import_target(spec)
    if not isinstance(found, WorkerSettings | Workers):
        if not callable(found) or isinstance(found, type):
            raise click.BadParameter(
                f"{spec} is a {type(found).__name__}, not {_ACCEPTED}", param_hint=_TARGET
            )
        if inspect.iscoroutinefunction(found):
            raise click.BadParameter(
                f"{spec} is an async function: it must be a plain function returning "
                "a trioqueue.WorkerSettings or a trioqueue.Workers",
                param_hint=_TARGET,
            )
        try:
            made = found()
        except Exception as exc:
            raise CliError(
                f"calling {spec}() failed: {type(exc).__name__}: {exc}{_where(exc)}"
            ) from None
        if not isinstance(made, WorkerSettings | Workers):
            if inspect.iscoroutine(made):
                made.close()  # never awaited: no "never awaited" warning
            raise click.BadParameter(
                f"{spec}() returned {type(made).__name__}, not a trioqueue.WorkerSettings "
                "or a trioqueue.Workers",
                param_hint=_TARGET,
            )
        found = made
    settings = found if isinstance(found, WorkerSettings) else WorkerSettings(workers=found)
    if settings.workers is None:
        raise click.BadParameter(
            f"{spec} is a trioqueue.WorkerSettings without workers: give it "
            "workers=a trioqueue.Workers with the worker functions",
            param_hint=_TARGET,
        )
    if not len(settings.workers):
        raise click.BadParameter(f"{spec} has no workers registered", param_hint=_TARGET)
    return settings


_OPTION_OF_FIELD = {"id": "--id", "job_timeout": "--job-timeout"}


def worker_settings(
    settings: WorkerSettings,
    *,
    queues: dict[str, int] | None = None,
    client_id: str | None = None,
    poll_only: bool = False,
    no_prepared_statements: bool = False,
    job_timeout: float | None = None,
    soft_stop_timeout: float | None = None,
) -> WorkerSettings:
    """``settings`` with the command line's flags applied; a flag not given (None or
    False) leaves the settings' value. Seconds of ``math.inf`` mean no limit (None).

    ``queues`` (from ``--queue``, when any) replaces the settings' queues: only those are
    worked, each with its MAX_WORKERS; a queue the settings configure keeps its other
    options. Without queues on either side, ``DEFAULT_QUEUES``.

    Raises click.BadParameter naming the flag when a value is refused.
    """
    changes: dict[str, Any] = {}
    if queues:
        changes["queues"] = {
            name: attrs.evolve(settings.queues.get(name, QueueConfig()), max_workers=count)
            for name, count in queues.items()
        }
    elif not settings.queues:
        changes["queues"] = {n: QueueConfig(max_workers=c) for n, c in DEFAULT_QUEUES.items()}
    if client_id is not None:
        changes["id"] = client_id
    if poll_only:
        changes["poll_only"] = True
    if no_prepared_statements:
        changes["prepared_statements"] = False
    for name, seconds in (("job_timeout", job_timeout), ("soft_stop_timeout", soft_stop_timeout)):
        if seconds is not None:
            changes[name] = None if math.isinf(seconds) else seconds
    try:
        return attrs.evolve(settings, **changes)
    except ValidationError as exc:
        hint = _OPTION_OF_FIELD.get(exc.field, exc.field)
        raise click.BadParameter(exc.rule, param_hint=repr(hint)) from None


def _health_status(client: Client | None, stop_requested: bool) -> tuple[int, str]:
    """``/healthz``'s answer: 200 while the client's producers fetch jobs, else 503.

    Reads the runtime's own stop flag (the CLI is part of the package), so any stop
    counts: a signal's, ``soft_stop_timeout``'s hard stop, a job's ``SystemExit`` or
    ``client.stop()``. ``stop_requested``: a stop signal has come, perhaps before the
    client started or before the stop it asks for has begun.
    """
    if stop_requested:
        return 503, "stopping"
    if client is None:
        return 503, "starting"
    runtime = client._runtime
    if runtime is None or runtime.done.is_set() or runtime._stopping.is_set():
        return 503, "stopping"
    return 200, "ok"


class _Stops:
    """The stop signals, counted in one place from before start-up until the client has
    stopped (see the module docstring): during start-up a stop signal cancels the
    start-up (``startup``, a cancel scope the caller enters around it); once the client
    runs (``client``), the first is a soft stop and the second a hard stop, run in
    ``nursery``; the third exits at once either way."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.received = 0
        self.client: Client | None = None
        """The running client, once start-up is over; None before."""
        self.startup = trio.CancelScope()
        self._nursery = nursery

    async def count(self, signals: AsyncIterator[int]) -> None:
        """Act on each signal as it comes; runs until cancelled."""
        async for signum in signals:
            self.received += 1
            name = signal.Signals(signum).name
            if self.received >= 3:
                log.warning(
                    "%s: exiting at once (code %d); jobs still running stay running until "
                    "the rescuer returns them",
                    name,
                    INTERRUPTED,
                )
                logging.shutdown()
                os._exit(INTERRUPTED)
            if self.client is None:
                # Nothing runs yet: cancelling the start-up leaves nothing behind, so the
                # first signal is all it takes, and the second has nothing more to do.
                if self.received == 1:
                    log.info("%s: start-up cancelled: no job runs yet, nothing to wait for", name)
                else:
                    log.info("%s: start-up already cancelled (again: exit at once)", name)
                self.startup.cancel()
            elif self.received == 1:
                log.info(
                    "%s: soft stop: no more fetching, running jobs finish (again: hard stop)",
                    name,
                )
                self._nursery.start_soon(self._stop, self.client, False)
            else:
                log.info(
                    "%s: hard stop: running jobs are cancelled and go back to available "
                    "(again: exit at once)",
                    name,
                )
                self._nursery.start_soon(self._stop, self.client, True)

    @staticmethod
    async def _stop(client: Client, cancel: bool) -> None:
        await client.stop(cancel=cancel)


async def _work(url: str, settings: WorkerSettings, health: tuple[str, int] | None) -> int:
    """Work until the client stops: by signals (see the module docstring), or by itself
    (a job calling ``client.stop()``; a failure raises). Signals count from before the
    start-up, which one cancels. The health endpoint, if any, listens before the client
    starts, and closes once it has stopped."""
    pid = os.getpid()
    assert settings.workers is not None
    with (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals,
        fatal_unwrapped(),  # a job's SystemExit leaves as itself, its code kept
    ):
        async with trio.open_nursery() as outer:
            stops = _Stops(outer)
            outer.start_soon(stops.count, signals)
            # Only ever cancelled before the client has started (see _Stops.count).
            with stops.startup:
                if health is not None:
                    listeners = await open_health_listeners(*health)
                    await outer.start(
                        serve_health,
                        listeners,
                        lambda: _health_status(stops.client, stops.received > 0),
                    )
                    for address in listening_addresses(listeners):
                        log.info("health: listening on %s", address)
                async with open_client(url, settings=settings) as client:
                    # A signal that came as start-up ended has cancelled the scope: leaving
                    # the block at once cancels the client (a hard stop) before it works.
                    if not stops.startup.cancel_called:
                        stops.client = client
                        periodic = len(client.periodic_jobs)
                        log.info(
                            "worker started: pid %d, client %s, queues %s, kinds %s%s",
                            pid,
                            client.id,
                            ", ".join(f"{n}={q.max_workers}" for n, q in settings.queues.items()),
                            ", ".join(sorted(settings.workers.kinds())),
                            f", periodic jobs {periodic}" if periodic else "",
                        )
                        runtime = client._runtime
                        assert runtime is not None  # a worker always has queues
                        await runtime.done.wait()
                        if not stops.received:
                            log.info("the client was stopped from within (not by a signal)")
            outer.cancel_scope.cancel()
    if stops.startup.cancelled_caught:
        log.info("worker stopped before it started: pid %d", pid)
    else:
        log.info("worker stopped: pid %d", pid)
    return 0


@click.command()
@click.argument("target", metavar="MODULE:ATTR")
@click.option(
    "--queue",
    "queues",
    multiple=True,
    metavar="NAME=MAX_WORKERS",
    callback=_parse_queues,
    help="Work queue NAME with up to MAX_WORKERS jobs at once; repeat for several queues. "
    "Replaces the settings' queues (default: the settings', else default=100).",
)
@database_url_option(embedded=False)
@click.option(
    "--id",
    "client_id",
    metavar="ID",
    default=None,
    help="Client id, as shown in attempted_by and the leader row (default: the settings', "
    "else <host>_<start time>). Unique per process: the pod or unit name is a good one.",
)
@click.option(
    "--poll-only",
    is_flag=True,
    help="Fetch by polling, without LISTEN/NOTIFY (for a transaction pooler such as "
    "PgBouncer in transaction mode).",
)
@click.option(
    "--no-prepared-statements",
    is_flag=True,
    help="Send every query unprepared (for a transaction pooler such as PgBouncer in "
    "transaction mode).",
)
@click.option(
    "--job-timeout",
    type=Seconds(),
    default=None,
    help="Seconds a job may run unless its worker sets its own timeout; none for no limit "
    "(default: the settings', else 60).",
)
@click.option(
    "--soft-stop-timeout",
    type=Seconds(),
    default=None,
    help="Seconds a soft stop waits for running jobs before cancelling them (a hard stop); "
    "none to wait as long as they run (default: the settings', else none).",
)
@click.option(
    "--health-port",
    type=click.IntRange(0, 65535),
    default=None,
    metavar="PORT",
    help="Serve GET /healthz on PORT: 200 while working, 503 while starting or stopping "
    "(0: a free port, logged).",
)
@click.option(
    "--health-host",
    default="127.0.0.1",
    show_default=True,
    metavar="HOST",
    help="Address of the health endpoint; 0.0.0.0 for Kubernetes probes, which come to "
    "the pod's IP.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="Log level of the messages on stderr.",
)
@click.option(
    "--log-format",
    type=click.Choice(LOG_FORMATS, case_sensitive=False),
    default="text",
    show_default=True,
    help="text: one readable line per message; json: one JSON object per line (time, "
    "level, logger, message, exception, extra fields).",
)
def worker(
    target: str,
    queues: dict[str, int],
    database_url: str | None,
    client_id: str | None,
    poll_only: bool,
    no_prepared_statements: bool,
    job_timeout: float | None,
    soft_stop_timeout: float | None,
    health_port: int | None,
    health_host: str,
    log_level: str,
    log_format: str,
) -> int:
    """Work jobs until stopped, as MODULE:ATTR configures.

    MODULE is imported (the current directory comes first on sys.path); ATTR is a
    trioqueue.WorkerSettings (workers, queues, periodic jobs, middleware, every client
    option), a trioqueue.Workers, or a function of no arguments returning either. Flags
    given here override the settings.

    \b
    Signals (SIGTERM or SIGINT):
      1st  soft stop: no more fetching, running jobs finish; exit code 0
           (during start-up: start-up cancelled, nothing runs yet; exit code 0)
      2nd  hard stop: running jobs are cancelled, back to available; exit code 0
      3rd  exit at once, exit code 130

    Exit codes: 0 stopped by signals (or by a job's client.stop()), 1 runtime error
    (database, schema, a module that fails to import), 2 usage error (MODULE:ATTR, a
    flag), 130 third signal.
    """
    url = require_database_url(database_url)
    host = health_host.strip()
    if not host:
        raise click.BadParameter("must be a host name or address", param_hint="'--health-host'")
    log_format = log_format.lower()
    # Before the import: a module that logs (or calls logging.basicConfig) as it is
    # imported would otherwise set logging up first, and these flags would do nothing.
    setup_logging(log_level, log_format)
    health = (host, health_port) if health_port is not None else None

    def interrupted() -> None:
        _last_line(log_format, logging.WARNING, "interrupted")

    try:
        settings = worker_settings(
            load_workers(target),
            queues=queues,
            client_id=client_id,
            poll_only=poll_only,
            no_prepared_statements=no_prepared_statements,
            job_timeout=job_timeout,
            soft_stop_timeout=soft_stop_timeout,
        )
        return run_trio(_work, url, settings, health, interrupted=interrupted)
    except KeyboardInterrupt:  # Ctrl-C while the module is imported, before trio runs
        interrupted()
        return INTERRUPTED
    except CliError as exc:
        if log_format != "json":
            raise  # shown as every command shows it
        _last_line(log_format, logging.ERROR, f"{exc.command_path}: error: {exc.format_message()}")
        return exc.exit_code


def _last_line(log_format: str, level: int, text: str) -> None:
    """The worker's last word on stderr (an error, ``interrupted``): with ``--log-format
    json`` a record of the worker's logger, so that every line stays one JSON object;
    else the plain line every command prints."""
    if log_format == "json":
        # Formatted and written here, not through the logger: a level above it, or a
        # logging set-up that disabled the logger (dictConfig's default), must not eat
        # the last word.
        record = log.makeRecord(log.name, level, __file__, 0, "%s", (text,), None)
        click.echo(JsonFormatter().format(record), err=True)
    else:
        click.echo(text, err=True)

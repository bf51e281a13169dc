"""``trioqueue worker MODULE:ATTR``: a long-lived process that works jobs.

Signals (SIGINT or SIGTERM, in any mix): the first starts a soft stop (no more fetching,
running jobs finish), the second a hard stop (running jobs are cancelled and go back to
``available``), the third exits at once with code 130 (jobs still running stay
``running`` until a leader's rescuer returns them to work).
"""

from __future__ import annotations

import importlib
import logging
import os
import signal
import sys
import traceback
from typing import Any

import click
import trio

from ..client import open_client
from ..config import MAX_WORKERS_LIMIT, QueueConfig
from ..errors import ValidationError
from ..job import validate_queue_name
from ..workers import Workers
from .common import INTERRUPTED, CliError, database_url_option, require_database_url, run_trio

__all__ = ["worker"]

log = logging.getLogger("trioqueue.worker")

DEFAULT_QUEUES = {"default": 100}


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


def _where(exc: BaseException) -> str:
    """Where in the user's code ``exc`` was raised, as `` (FILE, line N)``, if anywhere."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def load_workers(spec: str) -> Workers:
    """Import ``MODULE:ATTR`` (the current directory first on ``sys.path``) and return its
    ``Workers``; ATTR may also be a zero-argument callable returning one.

    Raises click.BadParameter for a spec that names nothing usable, CliError when the
    module or the callable raises.
    """
    hint = "'MODULE:ATTR'"
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(
            f"{spec!r} is not MODULE:ATTR (for example myapp.jobs:workers)", param_hint=hint
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
                param_hint=hint,
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
                f"module {module_name!r} has no attribute {attr!r}", param_hint=hint
            ) from None
    if isinstance(found, Workers):
        workers = found
    elif callable(found) and not isinstance(found, type):
        try:
            workers = found()
        except Exception as exc:
            raise CliError(
                f"calling {spec}() failed: {type(exc).__name__}: {exc}{_where(exc)}"
            ) from None
        if not isinstance(workers, Workers):
            raise click.BadParameter(
                f"{spec}() returned {type(workers).__name__}, not a trioqueue.Workers",
                param_hint=hint,
            )
    else:
        raise click.BadParameter(
            f"{spec} is a {type(found).__name__}, not a trioqueue.Workers or a function "
            "returning one",
            param_hint=hint,
        )
    if not len(workers):
        raise click.BadParameter(f"{spec} has no workers registered", param_hint=hint)
    return workers


async def _work(url: str, workers: Workers, queues: dict[str, int]) -> int:
    """Work ``queues`` until signals stop the client (see the module docstring)."""
    pid = os.getpid()
    described = ", ".join(f"{name}={count}" for name, count in queues.items())
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_client(
            url,
            workers=workers,
            queues={name: QueueConfig(max_workers=count) for name, count in queues.items()},
        ) as client:
            log.info(
                "worker started: pid %d, client %s, queues %s, kinds %s",
                pid,
                client.id,
                described,
                ", ".join(sorted(workers.kinds())),
            )
            async with trio.open_nursery() as nursery:

                async def stop(cancel: bool) -> None:
                    await client.stop(cancel=cancel)
                    nursery.cancel_scope.cancel()

                received = 0
                async for signum in signals:
                    received += 1
                    name = signal.Signals(signum).name
                    if received == 1:
                        log.info(
                            "%s: soft stop: no more fetching, running jobs finish "
                            "(again: hard stop)",
                            name,
                        )
                        nursery.start_soon(stop, False)
                    elif received == 2:
                        log.info(
                            "%s: hard stop: running jobs are cancelled and go back to "
                            "available (again: exit at once)",
                            name,
                        )
                        nursery.start_soon(stop, True)
                    else:
                        log.warning(
                            "%s: exiting at once (code %d); jobs still running stay running "
                            "until the rescuer returns them",
                            name,
                            INTERRUPTED,
                        )
                        logging.shutdown()
                        os._exit(INTERRUPTED)
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
    help="Work queue NAME with up to MAX_WORKERS jobs at once; repeat for several "
    "queues (default: default=100).",
)
@database_url_option(embedded=False)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
    help="Log level of the messages on stderr.",
)
def worker(
    target: str,
    queues: dict[str, int],
    database_url: str | None,
    log_level: str,
) -> int:
    """Work jobs until stopped, with the workers of MODULE:ATTR.

    MODULE is imported (the current directory comes first on sys.path); ATTR is a
    trioqueue.Workers, or a function of no arguments that returns one.

    \b
    Signals (SIGINT or SIGTERM):
      1st  soft stop: no more fetching, running jobs finish; exit code 0
      2nd  hard stop: running jobs are cancelled, back to available; exit code 0
      3rd  exit at once, exit code 130
    """
    url = require_database_url(database_url)
    workers = load_workers(target)
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_trio(_work, url, workers, queues or dict(DEFAULT_QUEUES))

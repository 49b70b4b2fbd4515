"""The service commands of ``dosebench``: ``db upgrade``, ``worker`` and ``beat`` (mounted in cli.py).

Public API:
    db_app            typer sub-app: ``dosebench db upgrade [--url URL]``
    worker_argv(queues, ...)  the celery worker arguments it uses
    worker_command    ``dosebench worker --queues simulate,reconstruct,... [--concurrency N] [--pool P] [--beat]``
    beat_command      ``dosebench beat [--schedule FILE]``
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from .settings import QUEUES

db_app = typer.Typer(no_args_is_help=True, help="The service database (PostgreSQL, or SQLite embedded).")


@db_app.command("upgrade")
def db_upgrade(url: Annotated[str | None, typer.Option(help="database URL (default: DOSEBENCH_DATABASE_URL)")] = None,
               revision: Annotated[str, typer.Option(help="target revision")] = "head") -> None:
    """Create or migrate the tables (Alembic migrations shipped with dosebench)."""
    from .db import upgrade_database
    from .settings import get_settings

    target = url or get_settings().database_url
    upgrade_database(target, revision)
    typer.echo(f"database at {_redacted(target)} is at revision {revision}")


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for the message
        return "<database>"


def worker_argv(queues: str, concurrency: int = 1, pool: str = "prefork", beat: bool = False,
                loglevel: str = "info", name: str | None = None) -> list[str]:
    """The ``celery worker`` arguments of ``dosebench worker`` (GPU queues: one task per process)."""
    from .celery_app import GPU_QUEUES

    chosen = [q.strip() for q in queues.split(",") if q.strip()]
    unknown = sorted(set(chosen) - set(QUEUES))
    if unknown or not chosen:
        raise ValueError(f"unknown queues {unknown or queues!r}; choose from {', '.join(QUEUES)}")
    argv = ["worker", "--queues", ",".join(chosen), "--concurrency", str(concurrency), "--pool", pool,
            "--loglevel", loglevel, "--hostname", name or f"dosebench-{os.getpid()}@%h",
            "--without-gossip", "--without-mingle"]
    if set(chosen) & set(GPU_QUEUES):
        argv += ["--max-tasks-per-child", "1"]
    if beat:
        argv += ["--beat", "--schedule", os.path.join(os.getcwd(), ".dosebench-beat-schedule")]
    return argv


def worker_command(
    queues: Annotated[str, typer.Option(help="comma-separated queues to serve: " + ", ".join(QUEUES))] = ",".join(QUEUES),
    concurrency: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
    pool: Annotated[str, typer.Option(help="celery pool: prefork or solo")] = "prefork",
    beat: Annotated[bool, typer.Option(help="also run beat (reaper, schedules) in this worker")] = False,
    loglevel: Annotated[str, typer.Option(help="log level")] = "info",
    name: Annotated[str | None, typer.Option(help="node name (default dosebench-<pid>@<host>)")] = None,
) -> None:
    """Serve Celery queues. Processes serving reconstruct or segment (GPU) run one task each and are
    replaced after it (worker_max_tasks_per_child=1), so GPU memory is always returned."""
    from .celery_app import app

    try:
        argv = worker_argv(queues, concurrency, pool, beat, loglevel, name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--queues") from None
    app.worker_main(argv)


def beat_command(
    schedule: Annotated[str, typer.Option(help="celery beat's schedule file")] = ".dosebench-beat-schedule",
    loglevel: Annotated[str, typer.Option(help="log level")] = "info",
) -> None:
    """Run the periodic tasks: the reaper (re-queues or fails stages whose heartbeat went stale), the
    stored cohort schedules (`dosebench schedule create`) and the finalising of evaluation runs. Run one;
    a second one is harmless (a database lease and a unique firing key make each firing happen once)."""
    from .celery_app import app

    app.start(["beat", "--loglevel", loglevel, "--schedule", schedule])

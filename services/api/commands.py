"""The gateway's commands of ``dosebench`` (mounted in cli.py): ``serve``, ``token create``, ``submit``.

Public API:
    serve_command     ``dosebench serve [--host 127.0.0.1 --port 8000] [--embedded [--home DIR]]``
    token_app         typer sub-app: ``dosebench token create NAME``
    submit_command    ``dosebench submit --input CT --doses ... --out DIR --url URL --token TOKEN``
"""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Annotated

import typer

token_app = typer.Typer(no_args_is_help=True, help="API tokens (the server stores only their SHA-256).")


def _fail(message: str, code: int = 2) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="who or what the token is for, e.g. alice-laptop")],
    database_url: Annotated[str | None, typer.Option(help="database URL (default: DOSEBENCH_DATABASE_URL)")] = None,
    home: Annotated[Path | None, typer.Option(help="for `serve --embedded --home DIR`: its folder")] = None,
) -> None:
    """Create an API token and print it once (keep it: it cannot be shown again)."""
    from sqlalchemy.exc import SQLAlchemyError

    from ..core.errors import DosebenchError
    from ..core.settings import get_settings
    from .tokens import create_token

    if home is not None and database_url is not None:
        _fail("give --home (an embedded server's folder) or --database-url, not both")
    if home is not None:
        from ..core.db import upgrade_database
        from .embedded import embedded_database_url

        home.mkdir(parents=True, exist_ok=True)
        database_url = embedded_database_url(home)
        upgrade_database(database_url)
    url = database_url or get_settings().database_url
    try:
        token = create_token(url, name)
    except DosebenchError as exc:
        _fail(str(exc))
        return
    except SQLAlchemyError as exc:
        _fail(f"cannot store the token ({type(exc).__name__}: {str(exc).splitlines()[0]}) — "
              "is the database up and migrated (`dosebench db upgrade`)?")
        return
    typer.echo(token)
    typer.echo(f"token {name!r} created; it is shown only this once "
               "(send it as 'Authorization: Bearer <token>')", err=True)


def serve_command(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="port")] = 8000,
    embedded: Annotated[bool, typer.Option(
        help="no servers: SQLite and a local folder under --home, stages run by an in-process worker thread")] = False,
    home: Annotated[Path, typer.Option(help="--embedded: folder of the database and the artifacts")] = Path(
        "dosebench-server"),
    workers: Annotated[int, typer.Option(min=1, help="API processes (not with --embedded)")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
) -> None:
    """Serve the REST API (OpenAPI at /docs). Services: PostgreSQL, Redis and `dosebench worker` per the
    DOSEBENCH_* settings; run `dosebench db upgrade` first. --embedded: one process, nothing else needed."""
    import uvicorn

    if not embedded:
        uvicorn.run("dosebench.api.app:create_app", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level)
        return
    if workers != 1:
        _fail("--embedded runs one process: leave out --workers")
    from ..core.db import ApiToken, session_factory, upgrade_database
    from .app import create_app
    from .embedded import EmbeddedWorker, embedded_settings
    from .tokens import create_token

    settings = embedded_settings(home)
    upgrade_database(settings.database_url)
    with session_factory(settings.database_url)() as session:
        has_tokens = session.query(ApiToken).count() > 0
    if not has_tokens:
        token = create_token(settings.database_url, "embedded")
        typer.echo(f"first start: created API token 'embedded' (shown once):\n{token}", err=True)
    worker = EmbeddedWorker(settings).start()
    typer.echo(f"embedded server: database {settings.database_url}, artifacts {settings.storage_url}, "
               "one in-process worker thread", err=True)
    try:
        uvicorn.run(create_app(settings, enqueue=worker.enqueue_job), host=host, port=port, log_level=log_level)
    finally:
        worker.stop(timeout_s=5)


def submit_command(
    input: Annotated[Path, typer.Option("--input", "-i", help="CT volume: NIfTI file, or a DICOM series .zip")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the downloaded results")],
    doses: Annotated[str, typer.Option(help="dose fractions, comma-separated")] = "0.2,0.4,0.6,0.8,1.0",
    protocol: Annotated[str, typer.Option(help="built-in protocol name")] = "demo",
    segmenter: Annotated[str, typer.Option(help="segmenter backend spec")] = "threshold",
    seed: Annotated[int, typer.Option(min=0, help="random seed")] = 7,
    url: Annotated[str, typer.Option(envvar="DOSEBENCH_URL", help="server URL")] = "http://127.0.0.1:8000",
    token: Annotated[str | None, typer.Option(envvar="DOSEBENCH_TOKEN", help="API token")] = None,
    poll_interval: Annotated[float, typer.Option(min=0.05, help="seconds between polls")] = 1.0,
    timeout: Annotated[float | None, typer.Option(help="give up waiting after this many seconds")] = None,
) -> None:
    """Upload a study, submit a job, show its progress, and download its results into --out."""
    import httpx
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..core.doses import parse_doses
    from ..core.errors import DosebenchError
    from .client import Client

    console = Console(stderr=True)
    if token is None:
        _fail("no API token: pass --token or set DOSEBENCH_TOKEN (create one with `dosebench token create NAME`)")
    if not input.is_file():
        _fail(f"input {input} is not a file (upload a NIfTI file or a DICOM series zipped into one .zip)")
    try:
        dose_list = parse_doses(doses)
        with Client(url, token) as client:
            study = client.upload_study(input)
            console.print(f"uploaded {input.name}: study {study['id']}")
            job = client.create_job({"study_id": study["id"], "doses": dose_list, "protocol": protocol,
                                     "segmenter": segmenter, "seed": seed}, idempotency_key=str(uuid.uuid4()))
            console.print(f"job {job['id']} {job['state']}")
            columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>5.1f} %"),
                       TimeElapsedColumn())
            with Progress(*columns, console=console, transient=False) as bar:
                task = bar.add_task("queued", total=1.0)

                def show(view: dict) -> None:
                    running = [s for s in view.get("stages", []) if s["state"] == "running"]
                    where = ", ".join(s["name"] + (f" {s['dose']:g}" if s["dose"] is not None else "")
                                      for s in running)
                    bar.update(task, completed=view.get("progress", 0.0),
                               description=f"{view['state']}" + (f": {where}" if where else ""))

                final = client.wait(job["id"], on_update=show, interval_s=poll_interval, timeout_s=timeout)
            if final["state"] != "succeeded":
                _fail(f"job {final['id']} {final['state']}: {final.get('error') or 'no error recorded'}", code=1)
            out.mkdir(parents=True, exist_ok=True)
            files = client.download_artifacts(job["id"], out)
    except DosebenchError as exc:
        _fail(str(exc))
        return
    except httpx.HTTPError as exc:
        _fail(f"cannot reach {url} ({type(exc).__name__}: {exc})")
        return
    for path in files:
        sys.stdout.write(f"{path}\n")
    console.print(f"job {job['id']} succeeded; {len(files)} files in {out}")

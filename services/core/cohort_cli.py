"""The cohort commands of ``dosebench`` (mounted in cli.py): ``study add``, ``cohort ...``, ``schedule ...``,
``evaluate-cohort``. Thin shells over :mod:`dosebench.core.cohorts` and :mod:`dosebench.core.schedules`,
on the database and artifact store of the DOSEBENCH_* settings (the service's, like ``token create``).

Public API:
    study_app, cohort_app, schedule_app     typer sub-apps
    evaluate_cohort_command                 ``dosebench evaluate-cohort NAME [--wait/--no-wait]``;
                                            exit code 0 ok, 1 regression, 2 error
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated

import typer

from .errors import DosebenchError

study_app = typer.Typer(no_args_is_help=True, help="Studies of the service (stored like an API upload).")
cohort_app = typer.Typer(no_args_is_help=True, help="Cohorts: named sets of studies evaluated together.")
schedule_app = typer.Typer(no_args_is_help=True, help="Cron schedules (UTC) of cohort evaluations, fired by beat.")


def _fail(message: str, code: int = 2) -> None:
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def _session():
    from .db import session_factory
    from .settings import get_settings

    return session_factory(get_settings().database_url)()


def _enqueue(job_id: str) -> None:
    from .celery_app import enqueue_ready
    from .settings import get_settings

    enqueue_ready(job_id, get_settings())


def _doses(text: str) -> tuple[float, ...]:
    from .doses import parse_doses

    return tuple(parse_doses(text))


@study_app.command("add")
def study_add(
    path: Annotated[Path, typer.Argument(help="CT volume: NIfTI file, DICOM folder or zipped DICOM series")],
    reference_seg: Annotated[Path | None, typer.Option(help="reference segmentation (NIfTI on the study's grid)")] = None,
    name: Annotated[str | None, typer.Option(help="a label for the study (no patient data)")] = None,
) -> None:
    """Store a study (and its reference segmentation) and print its id."""
    from . import cohorts
    from .settings import get_settings

    try:
        with _session() as session:
            study = cohorts.store_study(session, path, get_settings().storage_url, name=name,
                                        reference_seg=reference_seg, requested_by="cli")
    except DosebenchError as exc:
        _fail(str(exc))
        return
    typer.echo(study.id)


StudyOpt = Annotated[list[str], typer.Option("--study", help="study id (repeat the option for more)")]


@cohort_app.command("create")
def cohort_create(name: Annotated[str, typer.Argument(help="cohort name")], study: StudyOpt = [],  # noqa: B006
                  description: Annotated[str, typer.Option(help="free text")] = "") -> None:
    """Create a cohort of studies; prints its id."""
    from . import cohorts

    try:
        with _session() as session:
            cohort = cohorts.create_cohort(session, name, study, description, created_by="cli")
    except DosebenchError as exc:
        _fail(str(exc))
        return
    typer.echo(cohort.id)


@cohort_app.command("add")
def cohort_add(name: Annotated[str, typer.Argument(help="cohort name or id")], study: StudyOpt) -> None:
    """Add studies to a cohort."""
    from . import cohorts

    try:
        with _session() as session:
            added = cohorts.add_studies(session, cohorts.find_cohort(session, name), study)
    except DosebenchError as exc:
        _fail(str(exc))
        return
    typer.echo(f"added {len(added)} studies", err=True)


@cohort_app.command("list")
def cohort_list() -> None:
    """List cohorts: name, id, number of studies."""
    from sqlalchemy import select

    from . import cohorts
    from .db import Cohort

    with _session() as session:
        for cohort in session.scalars(select(Cohort).order_by(Cohort.name)):
            typer.echo(f"{cohort.name}\t{cohort.id}\t{len(cohorts.cohort_study_ids(session, cohort.id))} studies")


@cohort_app.command("show")
def cohort_show(name: Annotated[str, typer.Argument(help="cohort name or id")]) -> None:
    """A cohort and its studies as JSON."""
    from . import cohorts

    try:
        with _session() as session:
            typer.echo(json.dumps(cohorts.cohort_view(session, cohorts.find_cohort(session, name)), indent=2))
    except DosebenchError as exc:
        _fail(str(exc))


ProtocolOpt = Annotated[str, typer.Option(help="built-in protocol (demo, paper, tiny)")]
DosesOpt = Annotated[str, typer.Option(help="dose fractions, comma-separated; 1.0 is always added")]
SegmenterOpt = Annotated[str, typer.Option(help="segmenter spec, e.g. threshold, threshold?min_component_ml=0")]
SeedOpt = Annotated[int, typer.Option(min=0, help="random seed")]
ThresholdOpt = Annotated[float | None, typer.Option(
    min=0, help="allowed drop of a median Dice (default DOSEBENCH_REGRESSION_THRESHOLD, 0.005)")]
WebhookOpt = Annotated[str | None, typer.Option(help="POST the run's result as JSON here when it finishes")]


@schedule_app.command("create")
def schedule_create(
    cohort: Annotated[str, typer.Option(help="cohort name or id")],
    cron: Annotated[str, typer.Option(help="cron in UTC: 5 fields (a 6th, last, gives seconds), e.g. '0 2 * * *'")],
    protocol: ProtocolOpt = "demo", doses: DosesOpt = "0.2,0.4,0.6,0.8,1.0", segmenter: SegmenterOpt = "threshold",
    seed: SeedOpt = 7, regression_threshold: ThresholdOpt = None, webhook_url: WebhookOpt = None,
) -> None:
    """Create a schedule; beat starts an evaluation run of the cohort at each firing. Prints its id."""
    from . import cohorts, schedules
    from .settings import get_settings

    try:
        request = cohorts.EvaluationRequest(protocol=protocol, doses=_doses(doses), segmenter=segmenter, seed=seed,
                                            regression_threshold=regression_threshold, webhook_url=webhook_url)
        with _session() as session:
            schedule = schedules.create_schedule(session, cohorts.find_cohort(session, cohort), cron, request,
                                                 created_by="cli",
                                                 default_threshold=get_settings().regression_threshold)
            view = schedules.schedule_view(schedule)
    except DosebenchError as exc:
        _fail(str(exc))
        return
    typer.echo(schedule.id)
    typer.echo(f"next firing {view['next_fire_time']}", err=True)


@schedule_app.command("list")
def schedule_list() -> None:
    """List schedules as JSON lines."""
    from sqlalchemy import select

    from . import schedules
    from .db import Schedule

    with _session() as session:
        for schedule in session.scalars(select(Schedule).order_by(Schedule.created_at)):
            typer.echo(json.dumps(schedules.schedule_view(schedule)))


def _set_enabled(schedule_id: str, enabled: bool) -> None:
    from . import schedules

    try:
        with _session() as session:
            schedules.update_schedule(session, schedule_id, enabled=enabled)
    except DosebenchError as exc:
        _fail(str(exc))


@schedule_app.command("disable")
def schedule_disable(schedule_id: Annotated[str, typer.Argument(help="schedule id")]) -> None:
    """Pause a schedule (it fires no more until enabled)."""
    _set_enabled(schedule_id, False)


@schedule_app.command("enable")
def schedule_enable(schedule_id: Annotated[str, typer.Argument(help="schedule id")]) -> None:
    """Resume a schedule (fire times count from now)."""
    _set_enabled(schedule_id, True)


@schedule_app.command("delete")
def schedule_delete(schedule_id: Annotated[str, typer.Argument(help="schedule id")]) -> None:
    """Delete a schedule (its runs stay)."""
    from . import schedules

    try:
        with _session() as session:
            schedules.delete_schedule(session, schedule_id)
    except DosebenchError as exc:
        _fail(str(exc))


def evaluate_cohort_command(
    cohort: Annotated[str, typer.Argument(help="cohort name or id")],
    protocol: ProtocolOpt = "demo", doses: DosesOpt = "0.2,0.4,0.6,0.8,1.0", segmenter: SegmenterOpt = "threshold",
    seed: SeedOpt = 7, regression_threshold: ThresholdOpt = None, webhook_url: WebhookOpt = None,
    wait: Annotated[bool, typer.Option(help="wait for the run; exit 0 ok, 1 regression, 2 error")] = True,
    timeout: Annotated[float | None, typer.Option(help="with --wait: give up after this many seconds (exit 2)")] = None,
    poll_interval: Annotated[float, typer.Option(min=0.05, help="seconds between checks")] = 1.0,
) -> None:
    """Start an evaluation run of a cohort (one job per study on the workers); prints the run id."""
    from . import cohorts
    from .db import RUNNING
    from .settings import get_settings

    settings = get_settings()
    try:
        request = cohorts.EvaluationRequest(protocol=protocol, doses=_doses(doses), segmenter=segmenter, seed=seed,
                                            regression_threshold=regression_threshold, webhook_url=webhook_url)
        with _session() as session:
            run, _ = cohorts.start_run(session, cohorts.find_cohort(session, cohort), request, _enqueue,
                                       default_threshold=settings.regression_threshold, requested_by="cli")
            typer.echo(run.id)
            if not wait:
                return
            deadline = None if timeout is None else time.monotonic() + timeout
            # this process finalises the run too once its jobs end; beat would do it without us
            while (run := cohorts.advance_run(session, run.id, settings.storage_url, _enqueue,
                                              settings.webhook_timeout_s)).state == RUNNING:
                if deadline is not None and time.monotonic() > deadline:
                    _fail(f"run {run.id} still running after {timeout:g} s (it goes on; see GET /v1/evaluations/{run.id})")
                time.sleep(poll_interval)
    except DosebenchError as exc:
        _fail(str(exc))
        return
    view = cohorts.run_view(run)
    verdict = {0: "no regression", 1: "REGRESSION", 2: f"error: {run.error}"}[cohorts.exit_code(run)]
    typer.echo(f"run {run.id} {run.state}: {verdict}; report in {run.report_uri}", err=True)
    for reason in view["reasons"]:
        typer.echo(f"  - {reason}", err=True)
    raise typer.Exit(code=cohorts.exit_code(run))

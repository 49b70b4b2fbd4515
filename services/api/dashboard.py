"""The browser dashboard: server-rendered pages (Jinja2) and a little vanilla JavaScript, no CDN.

Pages:

- ``/login`` (GET form, POST token): the token is checked like an API token and stored in an
  ``HttpOnly; SameSite=Strict`` cookie, which the REST API accepts in place of the bearer header;
  ``POST /logout`` clears it.
- ``/``: the job list (state, per-stage progress bars, attempts, errors) and a form to upload a study
  and submit a job. The page polls ``GET /v1/jobs?stages=true`` with ``If-None-Match`` and
  ``updated_since``, so an idle poll is a 304 with no body.
- ``/jobs/{id}``: one job: stages, the Table-1 block, the figures, the per-label table (sortable),
  the artifacts (downloads through the REST API), cancel and retry.
- ``/jobs/{id}/files/{name}``: a file of the job's evaluate stage (figure, JSON, report) served inline
  with its own media type, for ``<img>`` tags and the report link.
- ``/evaluations``: the cohort evaluation runs (state, studies ok / failed, a REGRESSION badge with its
  reasons), the schedules (cron, next fire time, last run) and the cohorts with an "evaluate now" form
  (it posts to ``/v1/evaluations``). The runs and schedules part polls ``/evaluations/live``, a
  server-rendered fragment with an ETag, so an idle poll is a 304 with no body.
- ``/evaluations/{id}``: one run: Table 1 over the cohort, the comparison with the previous run, the
  studies (each linking to its job), failed studies, versions, and its report files, served inline from
  ``/evaluations/{id}/files/{name}``. While the run is running the page polls ``GET /v1/evaluations/{id}``
  (which also finalises it once its jobs have ended) and reloads when it is done.

Every asset comes from this package (``templates/``, ``static/``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, joinedload

from ..core import cohorts, db, schedules
from ..core.db import Artifact, Cohort, CohortStudy, EvaluationRun, Job, Metric, Schedule, Stage
from ..core.doses import dose_label
from ..core.protocol import builtin_protocol_names
from ..core.settings import Settings
from ..segmenter.backends import KNOWN_SPECS
from ..segmenter.metrics import ALL_GROUP, aggregate, dose_key
from . import views
from .problems import Problem

#: The login cookie's name (the API's ``authenticate`` reads it too).
TOKEN_COOKIE = "dosebench_token"
#: How long a browser login lasts (seconds).
LOGIN_MAX_AGE_S = 12 * 3600
HERE = Path(__file__).parent
#: Files of the evaluate stage the dashboard serves inline, by suffix.
INLINE_MEDIA_TYPES = {".png": "image/png", ".json": "application/json", ".html": "text/html; charset=utf-8",
                      ".md": "text/markdown; charset=utf-8", ".csv": "text/csv; charset=utf-8"}
FIGURES = (("dice_vs_dose", "Median Dice per group against dose (band: median ± MAD)"),
           ("figure1", "Figure 1: full and lowest dose, both segmentations, and where they differ"),
           ("noise_vs_dose", "Quantum noise (HU std) in a flat soft-tissue region against dose, with the "
                             "1/√dose curve"))


#: The files of an evaluation run's report folder that the dashboard serves inline, with their link
#: text. Fixed names: nothing else under the folder can be reached through the dashboard.
EVALUATION_FILES = (("report.html", "report (HTML)"), ("report.md", "report (Markdown)"),
                    ("summary.json", "summary (JSON)"), ("per_study.csv", "per study (CSV)"),
                    ("dice_vs_dose.png", "Dice against dose (PNG)"))
#: The newest runs the evaluations page lists.
EVALUATION_LIST_LIMIT = 100
#: Decimals of a Dice figure on the evaluation pages (the reasons text uses the same).
DICE_DECIMALS = 4
#: A report file is our own output, but it is HTML served from the dashboard's origin: no scripts, no
#: requests anywhere, inline styles and images only.
REPORT_FILE_CSP = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; sandbox"
REFERENCE_TITLES = {
    cohorts.FULL_DOSE_REFERENCE: "Table 1: Dice against the full-dose segmentation (median ± MAD over studies)",
    "reference_seg": "Dice against the reference segmentation (median ± MAD over studies)"}


def list_fingerprint(total: int, newest: datetime | str | None, query: str) -> str:
    """The ETag of a ``GET /v1/jobs`` answer: the filtered set's size and newest ``updated_at``, and the
    query string (filters, paging). Weak: it names the content, not the bytes."""
    digest = hashlib.sha256(f"{total}|{newest}|{query}".encode()).hexdigest()[:32]
    return f'W/"{digest}"'


def _table1(groups: dict, doses: list[float]) -> list[dict[str, Any]]:
    rows = []
    names = sorted(g for g in groups if g != ALL_GROUP) + ([ALL_GROUP] if ALL_GROUP in groups else [])
    for name in names:
        cells = []
        for dose in doses:
            cell = groups[name].get(dose_key(dose))
            cells.append(None if cell is None else f"{cell['median']:.3f} ± {cell['mad']:.3f}")
        rows.append({"group": name, "cells": cells, "n": max((c["n"] for c in groups[name].values()), default=0)})
    return rows


def _evaluate_files(session: Session, job_id: str) -> dict[str, Artifact]:
    """The newest attempt's artifacts of the job's evaluate stage, by file name."""
    pairs = session.execute(select(Stage, Artifact).join(Artifact, Artifact.stage_id == Stage.id)
                            .where(Stage.job_id == job_id, Stage.name == "evaluate")).all()
    newest = max((a.attempt for _, a in pairs), default=None)
    return {a.uri.rstrip("/").rsplit("/", 1)[-1]: a for _, a in pairs if a.attempt == newest}


def _artifact_list(session: Session, job_id: str) -> list[dict[str, Any]]:
    pairs = session.execute(select(Stage, Artifact).join(Artifact, Artifact.stage_id == Stage.id)
                            .where(Stage.job_id == job_id).order_by(Stage.id, Artifact.id)).all()
    newest: dict[int, int] = {}
    for stage, artifact in pairs:
        newest[stage.id] = max(newest.get(stage.id, 0), artifact.attempt)
    return [views.artifact_view(s, a) for s, a in pairs if a.attempt == newest[s.id]]


def _utc_text(moment: datetime | None) -> str | None:
    if moment is None:
        return None
    if moment.tzinfo is None:  # SQLite hands back naive UTC
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _verdict(run: EvaluationRun) -> dict[str, str]:
    """The run's badge: REGRESSION (red), ok, running or error."""
    if run.state == db.FINISHED:
        return {"kind": "regression", "text": "REGRESSION"} if run.regression else {"kind": "ok", "text": "ok"}
    return {"kind": run.state, "text": run.state}


def _study_counts(run: EvaluationRun, job_states: dict[str, int]) -> dict[str, int]:
    """Studies ok / failed / not ended: a finished run's stored counts (what its report says), else the
    live states of its jobs."""
    if run.state == db.FINISHED and run.counts:
        total, ok, failed = int(run.counts["studies"]), int(run.counts["succeeded"]), int(run.counts["failed"])
    else:
        total = len(run.study_ids)
        ok = job_states.get(db.SUCCEEDED, 0)
        failed = job_states.get(db.FAILED, 0) + job_states.get(db.CANCELLED, 0)
    return {"total": total, "ok": ok, "failed": failed, "pending": total - ok - failed}


def _run_summary(run: EvaluationRun, cohort_name: str, job_states: dict[str, int]) -> dict[str, Any]:
    return {"id": run.id, "cohort": cohort_name, "cohort_id": run.cohort_id, "schedule_id": run.schedule_id,
            "fire_time": _utc_text(run.fire_time), "state": run.state, "verdict": _verdict(run),
            "reasons": list(run.reasons or []), "error": run.error, "created_at": _utc_text(run.created_at),
            "finished_at": _utc_text(run.finished_at), "studies": _study_counts(run, job_states),
            "protocol": run.protocol_name, "doses": sorted(run.doses), "segmenter": run.segmenter,
            "seed": run.seed, "regression_threshold": run.regression_threshold, "requested_by": run.requested_by}


def _cohort_names(session: Session) -> dict[str, str]:
    return dict(session.execute(select(Cohort.id, Cohort.name)).all())


def _schedule_rows(session: Session, names: dict[str, str], now: datetime) -> list[dict[str, Any]]:
    """Every schedule with its next fire time and its newest run's state."""
    rows = session.scalars(select(Schedule).order_by(Schedule.created_at, Schedule.id)).all()
    newest = (select(EvaluationRun.schedule_id, func.max(EvaluationRun.created_at).label("at"))
              .where(EvaluationRun.schedule_id.is_not(None)).group_by(EvaluationRun.schedule_id).subquery())
    last_runs = {r.schedule_id: r for r in session.scalars(select(EvaluationRun).join(newest, and_(
        EvaluationRun.schedule_id == newest.c.schedule_id, EvaluationRun.created_at == newest.c.at)))}
    out = []
    for schedule in rows:
        view = schedules.schedule_view(schedule, now)
        upcoming = view["next_fire_time"]
        last = last_runs.get(schedule.id)
        out.append({"id": schedule.id, "cohort": names.get(schedule.cohort_id, schedule.cohort_id),
                    "cron": schedule.cron, "protocol": schedule.protocol_name, "doses": sorted(schedule.doses),
                    "segmenter": schedule.segmenter, "enabled": schedule.enabled,
                    "next_fire_time": _utc_text(datetime.fromisoformat(upcoming)) if upcoming else None,
                    "last_fire_time": _utc_text(schedule.last_fire_time),
                    "last_run": None if last is None else {"id": last.id, "verdict": _verdict(last),
                                                           "created_at": _utc_text(last.created_at)}})
    return out


def evaluations_live_view(session: Session, now: datetime | None = None) -> dict[str, Any]:
    """What the polled part of the evaluations page shows: the newest runs and the schedules."""
    now = now or db.utcnow()
    names = _cohort_names(session)
    total = session.scalar(select(func.count()).select_from(EvaluationRun)) or 0
    runs = session.scalars(select(EvaluationRun).order_by(EvaluationRun.created_at.desc(), EvaluationRun.id)
                           .limit(EVALUATION_LIST_LIMIT)).all()
    live = cohorts.run_job_states(session, [r.id for r in runs if r.state != db.FINISHED])
    return {"runs": [_run_summary(r, names.get(r.cohort_id, r.cohort_id), live.get(r.id, {})) for r in runs],
            "total": total, "schedules": _schedule_rows(session, names, now)}


def live_fingerprint(view: dict[str, Any]) -> str:
    """The ETag of ``/evaluations/live``: a digest of exactly what the fragment shows."""
    text = json.dumps(view, sort_keys=True, default=str)
    return f'W/"{hashlib.sha256(text.encode()).hexdigest()[:32]}"'


def _cohort_rows(session: Session) -> list[dict[str, Any]]:
    sizes = dict(session.execute(select(CohortStudy.cohort_id, func.count()).group_by(CohortStudy.cohort_id)).all())
    return [{"id": c.id, "name": c.name, "description": c.description, "studies": int(sizes.get(c.id, 0))}
            for c in session.scalars(select(Cohort).order_by(Cohort.name))]


def _table1_blocks(run: EvaluationRun) -> list[dict[str, Any]]:
    """Table 1 of each reference (full dose first): per group, median ± MAD and n studies per dose, and
    the number of labels the group has (known for the full-dose reference)."""
    keys = [dose_key(d) for d in sorted(run.doses)]
    counts = run.counts or {}
    per_group = counts.get("labels_per_group", {})
    blocks = []
    references = sorted(run.table1 or {}, key=lambda r: (r != cohorts.FULL_DOSE_REFERENCE, r))
    for reference in references:
        groups = run.table1[reference]
        rows = []
        for group in sorted(g for g in groups if g != ALL_GROUP) + ([ALL_GROUP] if ALL_GROUP in groups else []):
            cells = []
            for key in keys:
                cell = groups[group].get(key)
                cells.append(None if cell is None else {
                    "key": key, "median": cell["median"], "mad": cell["mad"], "n": cell["n"],
                    "text": f"{cell['median']:.{DICE_DECIMALS}f} ± {cell['mad']:.{DICE_DECIMALS}f}"})
            labels = None
            if reference == cohorts.FULL_DOSE_REFERENCE:
                labels = counts.get("labels") if group == ALL_GROUP else per_group.get(group)
            rows.append({"group": group, "cells": cells, "labels": labels})
        blocks.append({"reference": reference, "title": REFERENCE_TITLES.get(reference, reference), "rows": rows})
    return blocks


def _versions_view(run: EvaluationRun) -> dict[str, Any]:
    versions = run.versions or {}
    weights = versions.get("weights")
    return {"dosebench": versions.get("dosebench"), "protocol": run.protocol_name,
            "protocol_sha256": run.protocol_sha256, "segmenter": run.segmenter,
            "weights_none": weights == {}, "weights_error": (weights or {}).get("error"),
            "weights_folder": (weights or {}).get("folder"),
            "weights_files": sorted((weights or {}).get("files", {}).items())}


def _report_files(run: EvaluationRun) -> list[dict[str, str]]:
    """The files of :data:`EVALUATION_FILES` present in the run's report folder (one listing)."""
    if not run.report_uri:
        return []
    fs, root = fsspec.core.url_to_fs(run.report_uri)
    try:
        present = {PurePosixPath(p).name for p in fs.ls(root, detail=False)}
    except FileNotFoundError:
        return []
    return [{"name": name, "caption": caption} for name, caption in EVALUATION_FILES if name in present]


def evaluation_detail_view(session: Session, run: EvaluationRun) -> dict[str, Any]:
    """Everything the evaluation page shows of ``run`` (read only; figures as stored by finalising)."""
    names = _cohort_names(session)
    live = cohorts.run_job_states(session, [run.id]).get(run.id, {})
    studies = cohorts.run_studies(session, run)
    previous = session.get(EvaluationRun, run.previous_run_id) if run.previous_run_id else None
    full = cohorts.FULL_DOSE_REFERENCE
    changes = cohorts.table1_changes((run.table1 or {}).get(full, {}), (previous.table1 or {}).get(full, {}),
                                     run.regression_threshold) if previous is not None else []
    if run.state == db.FINISHED and run.counts:
        failed = [{"study_id": f["study_id"], "study": f["study"], "job_id": f["job_id"], "job_state": f["state"],
                   "error": f.get("error")} for f in run.counts.get("failed_studies", [])]
    else:
        failed = [s for s in studies if s["job_state"] in (db.FAILED, db.CANCELLED)]
    schedule = session.get(Schedule, run.schedule_id) if run.schedule_id else None
    return {"run": _run_summary(run, names.get(run.cohort_id, run.cohort_id), live),
            "dose_keys": [dose_key(d) for d in sorted(run.doses)], "doses": sorted(run.doses),
            "table1": _table1_blocks(run), "previous_run_id": run.previous_run_id, "changes": changes,
            "studies": studies, "failed": failed, "versions": _versions_view(run), "files": _report_files(run),
            "schedule_cron": schedule.cron if schedule is not None else None,
            "webhook_status": run.webhook_status}


def register_dashboard(app: FastAPI, *, settings: Settings, sessions: Callable[[], Session],
                       authenticate: Callable[..., str]) -> None:
    """Add the dashboard's pages, its static files and the login/logout routes to ``app``.

    Parameters
    ----------
    app : FastAPI
        The API app (:func:`dosebench.api.app.create_app`).
    settings : Settings
        The app's settings.
    sessions : Callable[[], Session]
        The app's session factory.
    authenticate : Callable
        The app's token check ``authenticate(session, authorization, cookie_token) -> user``; raises
        :class:`Problem` (401) for an unknown or revoked token.
    """
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals["dose_label"] = dose_label
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def page_user(request: Request, session: Session) -> str | None:
        token = request.cookies.get(TOKEN_COOKIE)
        if not token:
            return None
        try:
            return authenticate(session, None, token)
        except Problem:
            return None

    def to_login() -> RedirectResponse:
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(TOKEN_COOKIE, path="/")
        return response

    @app.get("/login", include_in_schema=False)
    def login_form(request: Request) -> HTMLResponse:
        return templates.TemplateResponse(request, "login.html", {"error": None})

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        form = await request.form()
        token = str(form.get("token") or "").strip()
        with sessions() as session:
            try:
                user = authenticate(session, None, token) if token else None
            except Problem:
                user = None
        if user is None:
            return templates.TemplateResponse(request, "login.html", {"error": "unknown or revoked token"},
                                              status_code=401)
        response = RedirectResponse("/", status_code=303)
        # HttpOnly: page scripts cannot read it; SameSite=Strict: no other site's page can send it
        response.set_cookie(TOKEN_COOKIE, token, max_age=LOGIN_MAX_AGE_S, path="/", httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        return response

    @app.post("/logout", include_in_schema=False)
    def logout() -> RedirectResponse:
        return to_login()

    @app.get("/", include_in_schema=False)
    def index(request: Request) -> Response:
        with sessions() as session:
            user = page_user(request, session)
        if user is None:
            return to_login()
        return templates.TemplateResponse(request, "index.html", {
            "user": user, "protocols": builtin_protocol_names(), "segmenters": list(KNOWN_SPECS)})

    @app.get("/jobs/{job_id}", include_in_schema=False)
    def job_page(job_id: str, request: Request) -> Response:
        with sessions() as session:
            user = page_user(request, session)
            if user is None:
                return to_login()
            job = session.execute(select(Job).where(Job.id == job_id).options(joinedload(Job.stages))).unique() \
                .scalar_one_or_none()
            if job is None:
                raise Problem(404, f"job {job_id} does not exist", fix="go back to the job list at /")
            view = views.job_view(job, list(job.stages))
            metrics = session.execute(select(Metric).where(Metric.job_id == job.id).order_by(
                Metric.reference, Metric.dose, Metric.label_id, Metric.id)).scalars()
            rows = [views.metric_row(m) for m in metrics]
            files = _evaluate_files(session, job.id)
            artifacts = _artifact_list(session, job.id)
            evaluation_run_id = session.scalar(select(db.EvaluationJob.run_id).where(db.EvaluationJob.job_id == job.id))
        doses = sorted(float(d) for d in view["doses"])
        usable = [{**r, "study": job_id} for r in rows if r["reference"] == "full_dose" and r["dice"] is not None]
        table1 = _table1(aggregate(usable), doses) if usable else []
        figures = [{"name": name, "caption": caption, "has_json": f"{name}.json" in files}
                   for name, caption in FIGURES if f"{name}.png" in files]
        return templates.TemplateResponse(request, "job.html", {
            "user": user, "job": view, "doses": doses, "table1": table1, "rows": rows, "figures": figures,
            "artifacts": artifacts, "has_report": "report.html" in files,
            "terminal": view["state"] in db.TERMINAL_STATES, "evaluation_run_id": evaluation_run_id})

    @app.get("/jobs/{job_id}/files/{name}", include_in_schema=False)
    def job_file(job_id: str, name: str, request: Request) -> Response:
        with sessions() as session:
            if page_user(request, session) is None:
                raise Problem(401, "log in first", fix="open /login")
            artifact = _evaluate_files(session, job_id).get(name)
        suffix = Path(name).suffix
        if artifact is None or suffix not in INLINE_MEDIA_TYPES:
            raise Problem(404, f"job {job_id} has no report file {name!r}",
                          fix=f"list the job's artifacts with GET /v1/jobs/{job_id}/artifacts")
        with fsspec.open(artifact.uri, "rb") as handle:
            content = handle.read()
        # results never change once published (a retry writes a new attempt); still revalidate
        return Response(content, media_type=INLINE_MEDIA_TYPES[suffix],
                        headers={"Cache-Control": "private, no-cache", "ETag": f'"{artifact.checksum}"',
                                 "X-Content-Type-Options": "nosniff"})

    @app.get("/evaluations", include_in_schema=False)
    def evaluations_page(request: Request) -> Response:
        with sessions() as session:
            user = page_user(request, session)
            if user is None:
                return to_login()
            live = evaluations_live_view(session)
            cohort_rows = _cohort_rows(session)
        return templates.TemplateResponse(request, "evaluations.html", {
            "user": user, **live, "etag": live_fingerprint(live), "cohorts": cohort_rows,
            "protocols": builtin_protocol_names(), "segmenters": list(KNOWN_SPECS)})

    # declared before /evaluations/{run_id}, which would otherwise take "live" for a run id
    @app.get("/evaluations/live", include_in_schema=False)
    def evaluations_live(request: Request) -> Response:
        with sessions() as session:
            if page_user(request, session) is None:
                raise Problem(401, "log in first", fix="open /login")
            live = evaluations_live_view(session)
        etag = live_fingerprint(live)
        headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return templates.TemplateResponse(request, "evaluations_live.html", live, headers=headers)

    @app.get("/evaluations/{run_id}", include_in_schema=False)
    def evaluation_page(run_id: str, request: Request) -> Response:
        with sessions() as session:
            user = page_user(request, session)
            if user is None:
                return to_login()
            run = session.get(EvaluationRun, run_id)
            if run is None:
                raise Problem(404, f"evaluation run {run_id} does not exist", fix="see the runs at /evaluations")
            view = evaluation_detail_view(session, run)
        return templates.TemplateResponse(request, "evaluation.html", {"user": user, **view})

    @app.get("/evaluations/{run_id}/files/{name}", include_in_schema=False)
    def evaluation_file(run_id: str, name: str, request: Request) -> Response:
        with sessions() as session:
            if page_user(request, session) is None:
                raise Problem(401, "log in first", fix="open /login")
            run = session.get(EvaluationRun, run_id)
        if run is None or not run.report_uri or name not in dict(EVALUATION_FILES):
            raise Problem(404, f"evaluation run {run_id} has no report file {name!r}",
                          fix=f"open /evaluations/{run_id} for the files it has")
        try:
            with fsspec.open(f"{run.report_uri.rstrip('/')}/{name}", "rb") as handle:
                content = handle.read()
        except FileNotFoundError as exc:
            raise Problem(404, f"evaluation run {run_id} has no report file {name!r}",
                          fix=f"open /evaluations/{run_id} for the files it has") from exc
        etag = f'"{hashlib.sha256(content).hexdigest()}"'
        headers = {"Cache-Control": "private, no-cache", "ETag": etag, "X-Content-Type-Options": "nosniff",
                   "Content-Security-Policy": REPORT_FILE_CSP}
        if request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=headers)
        return Response(content, media_type=INLINE_MEDIA_TYPES[Path(name).suffix], headers=headers)

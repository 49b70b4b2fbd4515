"""REST v1 for cohorts, evaluation runs and schedules: ``/v1/cohorts``, ``/v1/evaluations``, ``/v1/schedules``.

Public API:
    register_cohort_routes(app, *, settings, session_dep, user_dep, enqueue)   called once by create_app

Thin handlers over :mod:`dosebench.core.cohorts` and :mod:`dosebench.core.schedules`: a run started here
goes through the very function that beat's schedules and ``dosebench evaluate-cohort`` call.
``GET /v1/evaluations/{id}`` also moves a running run on (finalises it once all its jobs have ended), so
a server without beat, the embedded one, still completes runs.
"""

# no `from __future__ import annotations`: FastAPI resolves the dependency aliases passed in at call time

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from ..core import cohorts, schedules
from ..core.cohorts import CohortError, EvaluationRequest
from ..core.db import EvaluationRun, Schedule, Study
from ..core.settings import Settings
from . import uploads
from .problems import Problem


class CohortRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"name": "liver-ct-2026", "study_ids": ["…", "…"], "description": "three portal-venous CTs"}]})

    name: str = Field(min_length=1, max_length=255)
    study_ids: list[str] = Field(default_factory=list, max_length=10_000)
    description: str = Field(default="", max_length=10_000)


class StudiesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    study_ids: list[str] = Field(min_length=1, max_length=10_000)


class EvaluationBody(BaseModel):
    """One evaluation run: every study of the cohort through every dose level, then Table 1."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"cohort": "liver-ct-2026", "doses": [0.25, 0.5, 1.0], "protocol": "demo", "segmenter": "threshold",
         "seed": 7}]})

    cohort: str = Field(min_length=1, max_length=255, description="cohort name or id")
    doses: list[float] = Field(default=[0.2, 0.4, 0.6, 0.8, 1.0], min_length=1, max_length=32)
    protocol: str = "demo"
    segmenter: str = Field(default="threshold", max_length=255)
    seed: int = Field(default=7, ge=0, le=2**63 - 1)
    regression_threshold: float | None = Field(default=None, ge=0, le=1,
                                               description="allowed drop of a median Dice (default: the server's)")
    webhook_url: str | None = Field(default=None, max_length=2000)


class ScheduleBody(EvaluationBody):
    cron: str = Field(min_length=1, max_length=255,
                      description="5 cron fields in UTC (a 6th, last, gives seconds), e.g. '0 2 * * *'")


class ScheduleChange(BaseModel):
    model_config = ConfigDict(extra="forbid")

    cron: str | None = None
    doses: list[float] | None = None
    protocol: str | None = None
    segmenter: str | None = None
    seed: int | None = Field(default=None, ge=0)
    regression_threshold: float | None = Field(default=None, ge=0, le=1)
    webhook_url: str | None = Field(default=None, description="an empty string removes it")
    enabled: bool | None = None


def _request(body: EvaluationBody) -> EvaluationRequest:
    return EvaluationRequest(protocol=body.protocol, doses=tuple(body.doses), segmenter=body.segmenter,
                             seed=body.seed, regression_threshold=body.regression_threshold,
                             webhook_url=body.webhook_url)


def _not_found(exc: CohortError) -> Problem:
    return Problem(404, exc.problem, fix=exc.fix)


def register_cohort_routes(app: FastAPI, *, settings: Settings, session_dep: Any, user_dep: Any,
                           enqueue: Callable[[str], Any]) -> None:
    """Add the cohort, evaluation and schedule endpoints to ``app``.

    Parameters
    ----------
    app : FastAPI
        The gateway.
    settings : Settings
        Its settings (storage URL, default regression threshold, webhook timeout).
    session_dep, user_dep : typing.Annotated
        ``create_app``'s dependencies: a database Session, and the authenticated token's name.
    enqueue : callable
        ``enqueue(job_id)``: how the app sends a job's ready stages (Celery, or the embedded worker).
    """
    from ..core.db import session_factory

    SessionDep, User = session_dep, user_dep
    sessions = session_factory(settings.database_url)

    def cohort_or_404(session, name_or_id: str):
        try:
            return cohorts.find_cohort(session, name_or_id)
        except CohortError as exc:
            raise _not_found(exc) from exc

    # -- cohorts ---------------------------------------------------------------------------------------

    @app.post("/v1/cohorts", status_code=201, tags=["cohorts"], summary="Create a named cohort of studies")
    def create_cohort(body: CohortRequest, session: SessionDep, user: User) -> dict:
        try:
            cohort = cohorts.create_cohort(session, body.name, body.study_ids, body.description, created_by=user)
        except CohortError as exc:
            raise _not_found(exc) from exc
        return cohorts.cohort_view(session, cohort)

    @app.get("/v1/cohorts", tags=["cohorts"], summary="List cohorts")
    def list_cohorts(session: SessionDep, user: User) -> dict:
        from ..core.db import Cohort, CohortStudy

        sizes = dict(session.execute(select(CohortStudy.cohort_id, func.count()).group_by(CohortStudy.cohort_id)).all())
        rows = session.scalars(select(Cohort).order_by(Cohort.name)).all()
        return {"cohorts": [{"id": c.id, "name": c.name, "description": c.description, "studies": sizes.get(c.id, 0),
                             "created_at": c.created_at.isoformat()} for c in rows]}

    @app.get("/v1/cohorts/{cohort}", tags=["cohorts"], summary="A cohort (by name or id) and its studies")
    def get_cohort(cohort: str, session: SessionDep, user: User) -> dict:
        return cohorts.cohort_view(session, cohort_or_404(session, cohort))

    @app.post("/v1/cohorts/{cohort}/studies", tags=["cohorts"], summary="Add studies to a cohort")
    def add_studies(cohort: str, body: StudiesRequest, session: SessionDep, user: User) -> dict:
        found = cohort_or_404(session, cohort)
        try:
            added = cohorts.add_studies(session, found, body.study_ids)
        except CohortError as exc:
            raise _not_found(exc) from exc
        return {**cohorts.cohort_view(session, found), "added": added}

    # -- evaluation runs ---------------------------------------------------------------------------------

    @app.post("/v1/evaluations", status_code=202, tags=["evaluations"],
              summary="Start an evaluation run: one job per study of the cohort, then Table 1 over the cohort")
    def start_evaluation(body: EvaluationBody, session: SessionDep, user: User) -> dict:
        cohort = cohort_or_404(session, body.cohort)
        run, _ = cohorts.start_run(session, cohort, _request(body), enqueue,
                                   default_threshold=settings.regression_threshold, requested_by=user)
        return cohorts.run_view(run)

    @app.get("/v1/evaluations", tags=["evaluations"], summary="List evaluation runs, newest first")
    def list_evaluations(session: SessionDep, user: User, cohort: str | None = None,
                         schedule_id: str | None = None, regression: bool | None = None,
                         limit: Annotated[int, Query(ge=1, le=500)] = 50,
                         offset: Annotated[int, Query(ge=0)] = 0) -> dict:
        query = select(EvaluationRun)
        if cohort is not None:
            query = query.where(EvaluationRun.cohort_id == cohort_or_404(session, cohort).id)
        if schedule_id is not None:
            query = query.where(EvaluationRun.schedule_id == schedule_id)
        if regression is not None:
            query = query.where(EvaluationRun.regression.is_(regression))
        total = session.execute(select(func.count()).select_from(query.subquery())).scalar_one()
        rows = session.scalars(query.order_by(EvaluationRun.created_at.desc(), EvaluationRun.id)
                               .limit(limit).offset(offset)).all()
        return {"evaluations": [cohorts.run_view(r) for r in rows], "total": total, "limit": limit, "offset": offset}

    @app.get("/v1/evaluations/{run_id}", tags=["evaluations"],
             summary="An evaluation run: state, Table 1, counts, regression verdict and reasons, versions")
    def get_evaluation(run_id: str, session: SessionDep, user: User) -> dict:
        try:
            run = cohorts.advance_run(session, run_id, settings.storage_url, enqueue, settings.webhook_timeout_s)
        except CohortError as exc:
            raise _not_found(exc) from exc
        return cohorts.run_view(run)

    # -- schedules ---------------------------------------------------------------------------------------

    def schedule_or_404(session, schedule_id: str) -> Schedule:
        try:
            return schedules.find_schedule(session, schedule_id)
        except CohortError as exc:
            raise _not_found(exc) from exc

    @app.post("/v1/schedules", status_code=201, tags=["schedules"],
              summary="Create a cron schedule (UTC) that starts an evaluation run of a cohort at each firing")
    def create_schedule(body: ScheduleBody, session: SessionDep, user: User) -> dict:
        cohort = cohort_or_404(session, body.cohort)
        schedule = schedules.create_schedule(session, cohort, body.cron, _request(body), created_by=user,
                                             default_threshold=settings.regression_threshold)
        return schedules.schedule_view(schedule)

    @app.get("/v1/schedules", tags=["schedules"], summary="List schedules")
    def list_schedules(session: SessionDep, user: User) -> dict:
        rows = session.scalars(select(Schedule).order_by(Schedule.created_at, Schedule.id)).all()
        return {"schedules": [schedules.schedule_view(s) for s in rows]}

    @app.get("/v1/schedules/{schedule_id}", tags=["schedules"], summary="A schedule")
    def get_schedule(schedule_id: str, session: SessionDep, user: User) -> dict:
        return schedules.schedule_view(schedule_or_404(session, schedule_id))

    @app.patch("/v1/schedules/{schedule_id}", tags=["schedules"],
               summary="Change a schedule (e.g. {\"enabled\": false} pauses it)")
    def change_schedule(schedule_id: str, body: ScheduleChange, session: SessionDep, user: User) -> dict:
        schedule_or_404(session, schedule_id)
        changed = schedules.update_schedule(session, schedule_id, **body.model_dump(exclude_unset=True))
        return schedules.schedule_view(changed)

    @app.delete("/v1/schedules/{schedule_id}", status_code=204, tags=["schedules"],
                summary="Delete a schedule (its runs stay)")
    def delete_schedule(schedule_id: str, session: SessionDep, user: User) -> None:
        schedule_or_404(session, schedule_id)
        schedules.delete_schedule(session, schedule_id)

    @app.put("/v1/studies/{study_id}/reference-segmentation", tags=["studies"],
             summary="Attach a reference segmentation to a study (multipart field 'file': NIfTI label map)",
             description="The label map must lie on the study's grid (same shape and affine; 422 otherwise). "
                         "Evaluation runs started afterwards also compare every dose with it.",
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                 "type": "object", "required": ["file"], "properties": {
                     "file": {"type": "string", "format": "binary"}}}}}}})
    async def put_reference(study_id: str, request: Request, user: User) -> dict:
        with sessions() as session:
            if session.get(Study, study_id) is None:
                raise Problem(404, f"study {study_id} does not exist", fix="upload it with POST /v1/studies")
        length = request.headers.get("content-length")
        with uploads.scratch_dir() as scratch:
            received = await uploads.receive_upload(
                request.headers.get("content-type", ""), request.stream(), settings.upload_limit_bytes,
                Path(scratch), int(length) if length and length.isdigit() else None)

            def attach() -> dict:
                with sessions() as session:
                    study = session.get(Study, study_id)
                    cohorts.attach_reference_segmentation(session, study, received.path, settings.storage_url)
                    return {"id": study.id, "reference_segmentation": study.reference_seg_uri is not None}

            return await run_in_threadpool(attach)

    # the studies of a cohort, and whether each has a reference segmentation
    @app.get("/v1/cohorts/{cohort}/studies", tags=["cohorts"], summary="The studies of a cohort")
    def cohort_studies(cohort: str, session: SessionDep, user: User) -> dict:
        found = cohort_or_404(session, cohort)
        ids = cohorts.cohort_study_ids(session, found.id)
        rows = {s.id: s for s in session.scalars(select(Study).where(Study.id.in_(ids)))} if ids else {}
        return {"cohort": found.name, "studies": [{"id": i, "name": rows[i].name,
                                                   "reference_segmentation": rows[i].reference_seg_uri is not None}
                                                  for i in ids if i in rows]}

"""The REST gateway (v1): studies, jobs, metrics, artifacts, health; OpenAPI at ``/docs``.

Every endpoint but ``/v1/healthz`` needs ``Authorization: Bearer <token>`` (tokens from
``dosebench token create NAME``; the database keeps only their SHA-256), or the dashboard's login cookie
in its place (:mod:`dosebench.api.dashboard`). Every error is an
``application/problem+json`` document (:mod:`dosebench.api.problems`).

The API writes rows and enqueues work; it runs no science itself, apart from loading an uploaded
volume once to refuse what the stages could not read.
"""

# no `from __future__ import annotations`: FastAPI resolves the dependency aliases defined in create_app

import logging
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import fsspec
from fastapi import Cookie, Depends, FastAPI, Header, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, joinedload

from ..core import db
from ..core.db import ApiToken, Artifact, Job, Metric, Stage, Study
from ..core.doses import validate_dose_fraction
from ..core.errors import InputError
from ..core.protocol import builtin_protocol_names, load_protocol
from ..core.settings import Settings, get_settings
from ..segmenter.backends import KNOWN_SPECS, NNUNET_SPEC, normalise_spec
from ..segmenter.metrics import aggregate
from . import uploads, views
from .cohorts import register_cohort_routes
from .dashboard import TOKEN_COOKIE, list_fingerprint, register_dashboard
from .problems import Problem, install_problem_handlers
from .tokens import bearer_token, hash_token

log = logging.getLogger("dosebench.api")
API_VERSION = "1"
DOWNLOAD_CHUNK_BYTES = 1024**2
TOKEN_CACHE_S = 10.0


class JobRequest(BaseModel):
    """A job: one study through every dose level."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"study_id": "…", "doses": [0.2, 0.4, 0.6, 0.8, 1.0], "protocol": "demo", "segmenter": "threshold",
         "seed": 7}]})

    study_id: str = Field(min_length=1, max_length=64)
    doses: list[float] = Field(min_length=1, max_length=32,
                               description="dose fractions in (0, 1]; 1.0 (the reference) is always added")
    protocol: str = Field(default="demo", description="a built-in protocol name (demo, paper, tiny)")
    segmenter: str = Field(default="threshold", description=f"one of {', '.join(KNOWN_SPECS)}, "
                           f"threshold?min_component_ml=X, or {NNUNET_SPEC} (a folder on the segmenter workers)")
    seed: int = Field(default=7, ge=0, le=2**63 - 1)


def _storage_join(base: str, key: str) -> str:
    return f"{base.rstrip('/')}/{key}"


def _spec_or_none(spec: str) -> str | None:
    try:
        return normalise_spec(spec)
    except InputError:
        return None


def create_app(settings: Settings | None = None, *,
               enqueue: Callable[[str], Any] | None = None) -> FastAPI:
    """The API app. ``enqueue(job_id)`` queues a job's ready stages (default: the Celery app's
    ``enqueue_ready``; the embedded server passes its in-process worker's)."""
    settings = settings or get_settings()
    app = FastAPI(title="dosebench", version=API_VERSION, docs_url="/docs", openapi_url="/openapi.json",
                  description="How far can CT dose be lowered before a segmentation model changes its answer? "
                              "Upload a study, submit a job of dose levels, poll it, fetch metrics and artifacts.")
    install_problem_handlers(app)
    sessions = db.session_factory(settings.database_url)
    app.state.settings = settings
    app.state.sessions = sessions

    if enqueue is None:
        from ..core import celery_app

        if settings is not get_settings():
            celery_app.configure(settings)  # send to this app's broker, not the environment's

        def enqueue(job_id: str) -> None:
            celery_app.enqueue_ready(job_id, settings)

    def _enqueue(job_id: str) -> None:
        try:
            enqueue(job_id)
        except Exception as exc:
            # the job is recorded but not sent: say so; the same request with the same Idempotency-Key
            # sends it again (sending a stage twice is harmless: only one delivery can claim it)
            log.exception("could not enqueue job %s", job_id)
            raise Problem(503, f"job {job_id} was recorded but could not be queued "
                               f"({type(exc).__name__}: {exc})",
                          fix="check GET /v1/healthz; then repeat the request with the same Idempotency-Key",
                          job_id=job_id) from exc

    # token digest -> (name, valid until): a poller's every request need not look its token up; a revoked
    # token is refused at the latest TOKEN_CACHE_S seconds after its revocation
    token_cache: dict[str, tuple[str, float]] = {}

    def get_session() -> Iterator[Session]:
        with sessions() as session:
            yield session

    SessionDep = Annotated[Session, Depends(get_session)]

    def authenticate(session: SessionDep,
                     authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
                     cookie_token: Annotated[str | None, Cookie(alias=TOKEN_COOKIE, include_in_schema=False)] = None
                     ) -> str:
        # the dashboard's login cookie (HttpOnly, SameSite=Strict) is the browser's alternative to the header
        token = bearer_token(authorization) if authorization is not None else (cookie_token or None)
        challenge = {"WWW-Authenticate": 'Bearer realm="dosebench"'}
        if token is None:
            raise Problem(401, "this endpoint needs an API token: send 'Authorization: Bearer <token>'",
                          fix="create one on the server with `dosebench token create NAME`", headers=challenge)
        digest = hash_token(token)
        now = time.monotonic()
        cached = token_cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        row = session.execute(select(ApiToken.name, ApiToken.revoked_at)
                              .where(ApiToken.token_hash == digest)).one_or_none()
        if row is None or row.revoked_at is not None:
            token_cache.pop(digest, None)
            raise Problem(401, "the API token is unknown or revoked",
                          fix="check the token, or create a new one with `dosebench token create NAME`",
                          headers=challenge)
        if len(token_cache) > 10_000:
            token_cache.clear()
        token_cache[digest] = (row.name, now + TOKEN_CACHE_S)
        return row.name

    User = Annotated[str, Depends(authenticate)]

    def authenticate_briefly(
            authorization: Annotated[str | None, Header(include_in_schema=False)] = None,
            cookie_token: Annotated[str | None, Cookie(alias=TOKEN_COOKIE, include_in_schema=False)] = None) -> str:
        """For long requests (uploads): the token check in its own session, so that no database
        connection is held while the body streams in."""
        with sessions() as session:
            return authenticate(session, authorization, cookie_token)

    Uploader = Annotated[str, Depends(authenticate_briefly)]

    def _job_or_404(session: Session, job_id: str) -> Job:
        job = session.get(Job, job_id)
        if job is None:
            raise Problem(404, f"job {job_id} does not exist", fix="list jobs with GET /v1/jobs")
        return job

    # -- studies ---------------------------------------------------------------------------------------

    @app.post("/v1/studies", status_code=201, tags=["studies"],
              summary="Upload a study (multipart field 'file': NIfTI, or a DICOM series as .zip)",
              description="The file streams to the server under the upload limit (413 past it), is loaded once "
                          "as a CT volume (422 if it cannot be), and only then stored. A DICOM series is stored "
                          "as NIfTI (pixels and geometry only: no DICOM header, so no patient data); a zip "
                          "holding several series needs the form field 'series_uid'. DICOM-CT-PD raw "
                          "projections are refused (415): not supported yet.",
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["file"], "properties": {
                      "file": {"type": "string", "format": "binary"},
                      "kind": {"type": "string", "enum": list(uploads.KINDS)},
                      "name": {"type": "string", "description": "a label for the study (no patient data)"},
                      "series_uid": {"type": "string", "description": "SeriesInstanceUID, when the zip holds "
                                                                        "several series"}}}}}}})
    async def upload_study(request: Request, user: Uploader) -> JSONResponse:
        length = request.headers.get("content-length")
        with uploads.scratch_dir() as scratch:
            received = await uploads.receive_upload(
                request.headers.get("content-type", ""), request.stream(), settings.upload_limit_bytes,
                Path(scratch), int(length) if length and length.isdigit() else None)
            kind = uploads.detect_kind(received)
            volume = await run_in_threadpool(uploads.validate_volume, received)
            summary = uploads.header_summary(volume, kind, received)
            if kind == "dicom-zip":
                # keep the pixels and the geometry only: no DICOM header (patient data) is stored
                local = await run_in_threadpool(uploads.nifti_of, volume, Path(scratch))
                suffix = ".nii.gz"
            else:
                local = received.path
                suffix = ".nii.gz" if received.filename.lower().endswith(".gz") else ".nii"
            del volume
            study_id = db.new_id()
            url = _storage_join(settings.storage_url, f"studies/{study_id}/input{suffix}")
            name = (received.fields.get("name") or "").strip()[:255] or f"study-{study_id[:8]}"
            await run_in_threadpool(_store_study, local, url, received, study_id, name, kind, summary, user)
        return JSONResponse({"id": study_id, "kind": kind, "header": summary}, status_code=201,
                            headers={"Location": f"/v1/studies/{study_id}"})

    def _store_study(local: Path, url: str, received: uploads.ReceivedFile, study_id: str, name: str, kind: str,
                     summary: dict, user: str) -> None:
        uploads.store_object(local, url)
        try:
            with sessions() as session, session.begin():
                session.add(Study(id=study_id, name=name, input_uri=url, kind=kind, checksum=received.sha256,
                                  bytes=received.size, header_summary=summary, requested_by=user))
        except BaseException:
            uploads.delete_object(url)
            raise

    @app.get("/v1/studies/{study_id}", tags=["studies"], summary="A study's de-identified header summary")
    def get_study(study_id: str, session: SessionDep, user: User) -> dict:
        study = session.get(Study, study_id)
        if study is None:
            raise Problem(404, f"study {study_id} does not exist", fix="upload it with POST /v1/studies")
        return views.study_view(study)

    # -- jobs ------------------------------------------------------------------------------------------

    @app.post("/v1/jobs", status_code=202, tags=["jobs"], summary="Submit a job (202; idempotent per key)")
    def submit_job(body: JobRequest, session: SessionDep, user: User, response: Response,
                   idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> dict:
        from ..core import jobs as job_model
        from ..stages import JobSpec

        if idempotency_key is not None:
            existing = session.execute(select(Job).where(Job.idempotency_key == idempotency_key)).scalar_one_or_none()
            if existing is not None:
                _same_request_or_409(existing, body, idempotency_key)
                if existing.state == db.QUEUED:
                    _enqueue(existing.id)  # a replay after a failed send queues it (duplicates are harmless)
                response.status_code = 200
                return {"id": existing.id, "state": existing.state}
        doses = [validate_dose_fraction(d) for d in body.doses]
        if body.protocol not in builtin_protocol_names():
            raise InputError(f"unknown protocol {body.protocol!r}",
                             fix=f"use one of {', '.join(builtin_protocol_names())}")
        segmenter = normalise_spec(body.segmenter)
        study = session.get(Study, body.study_id)
        if study is None:
            raise Problem(404, f"study {body.study_id} does not exist", fix="upload it first with POST /v1/studies")
        spec = JobSpec(input_url=study.input_uri, doses=doses, protocol=load_protocol(body.protocol),
                       segmenter=segmenter, seed=body.seed, study=study.name)
        # create_job commits, and on a concurrent insert of the same key returns the winner's job
        job = job_model.create_job(session, study, spec, requested_by=user, idempotency_key=idempotency_key)
        _enqueue(job.id)
        session.refresh(job)
        return {"id": job.id, "state": job.state}

    def _same_request_or_409(job: Job, body: JobRequest, key: str) -> None:
        from ..core.doses import FULL_DOSE

        try:
            doses = sorted({validate_dose_fraction(d) for d in body.doses} | {FULL_DOSE}, reverse=True)
        except InputError:
            doses = None
        same = (job.study_id == body.study_id and job.protocol_name == body.protocol
                and job.segmenter == _spec_or_none(body.segmenter) and int(job.seed) == body.seed
                and doses is not None and sorted(job.doses, reverse=True) == doses)
        if not same:
            raise Problem(409, f"Idempotency-Key {key!r} was already used for job {job.id} with other parameters",
                          fix="use a new Idempotency-Key for a different request", job_id=job.id)

    @app.get("/v1/jobs", tags=["jobs"], summary="List jobs (filters, paging, updated_since for polling)",
             description="Sends an ETag; a request whose If-None-Match holds it is answered 304 with no body "
                         "after one aggregate query, so an idle poll costs little.")
    def list_jobs(session: SessionDep, user: User, request: Request, response: Response,
                  stages: Annotated[bool, Query(description="include each job's stages and progress")] = False,
                  state: Annotated[str | None, Query(description=f"one of {', '.join(db.STATES)}")] = None,
                  study_id: str | None = None,
                  updated_since: Annotated[datetime | None, Query(
                      description="only jobs updated after this ISO 8601 time (cheap polling)")] = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  offset: Annotated[int, Query(ge=0)] = 0) -> dict:
        if state is not None and state not in db.STATES:
            raise InputError(f"unknown state {state!r}", fix=f"use one of {', '.join(db.STATES)}")
        server_time = db.utcnow()  # before the query: a job updated meanwhile is in the next poll's answer
        query = select(Job)
        if state is not None:
            query = query.where(Job.state == state)
        if study_id is not None:
            query = query.where(Job.study_id == study_id)
        if updated_since is not None:
            if updated_since.tzinfo is None:
                raise InputError("updated_since has no time zone", fix="give e.g. 2026-12-01T12:00:00Z")
            query = query.where(Job.updated_at > updated_since)
        # every change of a job or its stages bumps Job.updated_at, so (count, newest update) of the
        # filtered set changes whenever any answer would
        filtered = query.subquery()
        total, newest = session.execute(select(func.count(), func.max(filtered.c.updated_at))).one()
        etag = list_fingerprint(total, newest, str(request.query_params))
        if etag in request.headers.get("if-none-match", ""):
            return Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-cache"})
        response.headers["ETag"] = etag
        response.headers["Cache-Control"] = "no-cache"
        query = query.order_by(Job.updated_at.desc(), Job.id).limit(limit).offset(offset)
        if stages:
            query = query.options(joinedload(Job.stages))
        rows = session.execute(query).unique().scalars()
        jobs = [views.job_view(job, list(job.stages) if stages else None) for job in rows]
        return {"jobs": jobs, "total": total, "limit": limit, "offset": offset,
                "next_offset": offset + len(jobs) if offset + len(jobs) < total else None,
                "server_time": server_time.isoformat()}

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], summary="A job: state, each stage's progress, timings")
    def get_job(job_id: str, session: SessionDep, user: User) -> dict:
        # one query: the job and its stages (ordered by the relationship's Stage.id)
        job = session.execute(select(Job).where(Job.id == job_id).options(joinedload(Job.stages))).unique() \
            .scalar_one_or_none()
        if job is None:
            raise Problem(404, f"job {job_id} does not exist", fix="list jobs with GET /v1/jobs")
        return views.job_view(job, list(job.stages))

    @app.get("/v1/jobs/{job_id}/metrics", tags=["results"],
             summary="Per-label metrics and the Table-1 summary (JSON, or CSV with ?format=csv / Accept: text/csv)",
             responses={200: {"content": {"text/csv": {}}}})
    def get_metrics(job_id: str, request: Request, session: SessionDep, user: User,
                    format: Annotated[str | None, Query(pattern="^(json|csv)$")] = None) -> Response:
        job = _job_or_404(session, job_id)
        metrics = session.execute(select(Metric).where(Metric.job_id == job.id)
                                  .order_by(Metric.reference, Metric.dose, Metric.label_id, Metric.id)).scalars()
        rows = [views.metric_row(m) for m in metrics]
        wants_csv = format == "csv" or (format is None and "text/csv" in request.headers.get("accept", ""))
        if wants_csv:
            return PlainTextResponse(views.metrics_csv(rows), media_type="text/csv",
                                     headers={"Content-Disposition": f'attachment; filename="{job.id}-metrics.csv"'})
        summary: dict[str, Any] = {}
        for reference in sorted({r["reference"] for r in rows}):
            usable = [{**r, "study": job.study_id} for r in rows if r["reference"] == reference and r["dice"] is not None]
            summary[reference] = aggregate(usable) if usable else {}
        return JSONResponse({"job_id": job.id, "state": job.state, "rows": rows, "summary": summary,
                             "aggregation": "per group: mean Dice over its labels, then median and MAD (unscaled) "
                                            "over studies (one study per job: MAD 0)"})

    def _artifacts(session: Session, job: Job) -> list[tuple[Stage, Artifact]]:
        pairs = session.execute(select(Stage, Artifact).join(Artifact, Artifact.stage_id == Stage.id)
                                .where(Stage.job_id == job.id).order_by(Stage.id, Artifact.id)).all()
        # only the newest attempt of each stage is the result; older attempts are history
        newest: dict[int, int] = {}
        for stage, artifact in pairs:
            newest[stage.id] = max(newest.get(stage.id, 0), artifact.attempt)
        return [(s, a) for s, a in pairs if a.attempt == newest[s.id]]

    @app.get("/v1/jobs/{job_id}/artifacts", tags=["results"], summary="The job's published artifacts")
    def list_artifacts(job_id: str, session: SessionDep, user: User) -> dict:
        job = _job_or_404(session, job_id)
        return {"job_id": job.id, "artifacts": [views.artifact_view(s, a) for s, a in _artifacts(session, job)]}

    @app.get("/v1/jobs/{job_id}/artifacts/{name:path}", tags=["results"], summary="Download an artifact (streamed)",
             responses={200: {"content": {"application/octet-stream": {}}}})
    def download_artifact(job_id: str, name: str, session: SessionDep, user: User) -> StreamingResponse:
        job = _job_or_404(session, job_id)
        for stage, artifact in _artifacts(session, job):
            if views.artifact_name(stage, artifact) == name:
                break
        else:
            raise Problem(404, f"job {job.id} has no artifact {name!r}",
                          fix=f"list them with GET /v1/jobs/{job.id}/artifacts")
        fs, path = fsspec.core.url_to_fs(artifact.uri)
        if not fs.exists(path):
            raise Problem(410, f"artifact {name!r} is recorded but its object {artifact.uri} is gone",
                          fix="retry the job to recompute it")
        if fs.isdir(path):
            raise Problem(409, f"artifact {name!r} is a folder (a chunked projection store), not a single file",
                          fix="read it from the artifact store directly (its URI is in the stage's record)")

        def chunks() -> Iterator[bytes]:
            with fs.open(path, "rb") as handle:
                while chunk := handle.read(DOWNLOAD_CHUNK_BYTES):
                    yield chunk

        filename = name.rsplit("/", 1)[-1].replace('"', "")
        return StreamingResponse(chunks(), media_type="application/octet-stream",
                                 headers={"Content-Disposition": f'attachment; filename="{filename}"',
                                          "Content-Length": str(fs.size(path)), "X-Checksum-Sha256": artifact.checksum})

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202, tags=["jobs"],
              summary="Ask a job to stop (cooperative: running stages stop between chunks)")
    def cancel_job(job_id: str, session: SessionDep, user: User) -> dict:
        from ..core import jobs as job_model

        job = _job_or_404(session, job_id)
        if job.state in db.TERMINAL_STATES:
            raise Problem(409, f"job {job.id} is already {job.state}; only a queued or running job can be cancelled")
        job = job_model.request_cancel(session, job.id)
        session.refresh(job)
        return {"id": job.id, "state": job.state, "cancel_requested": bool(job.cancel_requested)}

    @app.post("/v1/jobs/{job_id}/retry", status_code=202, tags=["jobs"],
              summary="Run a failed or cancelled job's unfinished stages again")
    def retry(job_id: str, session: SessionDep, user: User) -> dict:
        from ..core import jobs as job_model

        job = _job_or_404(session, job_id)
        if job.state not in (db.FAILED, db.CANCELLED):
            raise Problem(409, f"job {job.id} is {job.state}; only a failed or cancelled job can be retried")
        try:
            job = job_model.retry_job(session, job.id)
        except job_model.JobStateError as exc:  # it changed state since we looked
            raise Problem(409, exc.problem, fix=exc.fix) from exc
        _enqueue(job.id)
        session.refresh(job)
        return {"id": job.id, "state": job.state}

    # -- health ----------------------------------------------------------------------------------------

    @app.get("/v1/healthz", tags=["health"], summary="Database, broker and storage: each ok or error (200/503)")
    def healthz() -> JSONResponse:
        components = {"database": _check(lambda: _check_database(sessions)),
                      "broker": _check(lambda: _check_broker(settings.broker_url)),
                      "storage": _check(lambda: _check_storage(settings.storage_url))}
        healthy = all(c["status"] == "ok" for c in components.values())
        return JSONResponse({"status": "ok" if healthy else "error", "components": components},
                            status_code=200 if healthy else 503)

    register_dashboard(app, settings=settings, sessions=sessions, authenticate=authenticate)
    register_cohort_routes(app, settings=settings, session_dep=SessionDep, user_dep=User, enqueue=_enqueue)
    return app


def _check(probe: Callable[[], None]) -> dict[str, str]:
    try:
        probe()
    except Exception as exc:  # noqa: BLE001 - any failure is the component's error
        return {"status": "error", "detail": f"{type(exc).__name__}: {exc}"[:500]}
    return {"status": "ok"}


def _check_database(sessions: Any) -> None:
    with sessions() as session:
        session.execute(text("SELECT 1"))


def _check_broker(url: str) -> None:
    if url.startswith("memory://"):
        return
    if url.startswith(("redis://", "rediss://")):
        import redis

        client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
        return
    from kombu import Connection

    with Connection(url, connect_timeout=2) as connection:
        connection.ensure_connection(max_retries=1)


def _check_storage(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if "file" in fs.protocol or "local" in fs.protocol:
        fs.makedirs(path, exist_ok=True)
    if not fs.exists(path):
        raise FileNotFoundError(f"{url} does not exist")
    fs.ls(path, detail=False)

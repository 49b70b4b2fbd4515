"""The job state machine: pure database logic (no Celery), the same on PostgreSQL and SQLite.

Public API (every function takes a Session and commits its own change; re-read objects after):
    create_job(session, study, spec, requested_by, idempotency_key=None) -> Job
    add_study(session, *, name, input_uri, kind, checksum, bytes, header_summary, requested_by=None,
              reference_seg_uri=None) -> Study
    ready_stages(session, job_id) -> list[Stage]          queued stages whose dependencies succeeded
    claim_stage(session, stage_id, worker) -> Stage | None  atomic; exactly one claimer wins
    heartbeat(session, stage_id, attempt, progress=None) -> bool   False: the attempt lost the stage
    is_cancel_requested(session, job_id) -> bool
    complete_stage(session, stage_id, attempt, artifacts) -> list[Stage]   the stages to enqueue now
    fail_stage(session, stage_id, attempt, error) -> bool
    cancel_stage(session, stage_id, attempt) -> bool      the stage stopped on the cancel flag
    record_metrics(session, job_id, per_label_csv_text) -> int
    request_cancel(session, job_id) -> Job
    retry_job(session, job_id) -> Job                     raises JobStateError unless failed/cancelled
    reap_stale(session, stale_after_s, max_attempts) -> list[Stage]   the stages to (re-)enqueue:
                                                          stale running ones put back, and ready
                                                          ones of jobs quiet for stale_after_s
    stage_inputs(session, stage) -> dict                  the published artifact URIs a stage reads
    published_artifacts(session, stage) -> dict[str, str] name -> URI of the stage's winning attempt
    describe_artifact(uri) -> (bytes, sha256)             a file, or a folder (over its sorted files)
    dependencies(name, dose, doses) -> list[(name, dose)]
    JobStateError                                         a transition that is not allowed (HTTP 409)
    States come from dosebench.core.db: QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED.

Stages of a job: ``acquire`` (dose None) -> per dose ``simulate`` -> ``reconstruct`` -> ``segment``,
and ``evaluate`` (dose None) after every ``segment``. A stage row is ``queued`` until a worker claims
it; a claim is one ``UPDATE ... WHERE state='queued'`` that bumps ``attempt``, so duplicate deliveries
of a task run it once. Only the attempt that owns a running stage may heartbeat, publish (artifact
rows) or fail it: a worker that was presumed dead and re-queued by the reaper cannot overwrite the
result of its successor.

Every transition first touches the job row (``UPDATE jobs SET updated_at=now``): that serialises the
transitions of one job (a row lock on PostgreSQL, the write lock on SQLite), so two stages finishing at
once still see each other (the last ``segment`` enqueues ``evaluate`` exactly once), and ``updated_at``
moves on every change, heartbeats included, for cheap dashboard polling.

Job state, derived from its stages: ``succeeded`` when every stage did; ``running`` while a stage runs
or some have succeeded; ``cancelled`` once cancel was requested and nothing runs; ``failed`` when a stage
failed and nothing runs (the other dose chains are not started further: fail fast). ``retry_job`` puts
failed and cancelled stages back to ``queued``; their attempt numbers keep counting, so a retried
stage writes under a new ``attempt-<n>`` key. ``reap_stale`` counts attempts over the stage's whole life
(retries included) against ``max_attempts``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from collections.abc import Iterable
from datetime import timedelta

import fsspec
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..stages import JobSpec
from .db import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
    Artifact,
    Job,
    Metric,
    Stage,
    Study,
    utcnow,
)
from .errors import DosebenchError

PER_DOSE_STAGES = ("simulate", "reconstruct", "segment")
_PREVIOUS = {"simulate": None, "reconstruct": "simulate", "segment": "reconstruct"}


class JobStateError(DosebenchError):
    """A transition the job's state does not allow (e.g. retrying a running job)."""


# -- structure ---------------------------------------------------------------------------------------

def dependencies(name: str, dose: float | None, doses: Iterable[float]) -> list[tuple[str, float | None]]:
    """The (stage, dose) pairs that must have succeeded before (name, dose) may run."""
    if name == "acquire":
        return []
    if name == "simulate":
        return [("acquire", None)]
    if name in ("reconstruct", "segment"):
        return [(_PREVIOUS[name], dose)]
    if name == "evaluate":
        return [("segment", d) for d in doses]
    raise ValueError(f"unknown stage {name!r}")


def _stages(session: Session, job_id: str) -> list[Stage]:
    return list(session.scalars(select(Stage).where(Stage.job_id == job_id).order_by(Stage.id)
                                .execution_options(populate_existing=True)))


def _ready(job: Job, stages: list[Stage]) -> list[Stage]:
    if job.cancel_requested or job.state in (FAILED, CANCELLED) or any(s.state == FAILED for s in stages):
        return []  # fail fast: nothing new starts once a stage failed
    state = {(s.name, s.dose): s.state for s in stages}
    doses = [s.dose for s in stages if s.name == "segment"]
    return [s for s in stages if s.state == QUEUED
            and all(state.get(dep) == SUCCEEDED for dep in dependencies(s.name, s.dose, doses))]


def _lock_job(session: Session, job_id: str) -> Job:
    """Touch the job row first: serialises this job's transitions and bumps ``updated_at``."""
    result = session.execute(update(Job).where(Job.id == job_id).values(updated_at=utcnow()))
    if result.rowcount != 1:
        session.rollback()
        raise KeyError(f"no job {job_id}")
    return session.scalars(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).one()


def _derive(job: Job, stages: list[Stage]) -> None:
    """Set the job's state, error and timings from its stages."""
    states = [s.state for s in stages]
    now = utcnow()
    if states and all(s == SUCCEEDED for s in states):
        state = SUCCEEDED
    elif RUNNING in states:
        state = RUNNING
    elif job.cancel_requested:
        state = CANCELLED
    elif FAILED in states:
        state = FAILED
    elif SUCCEEDED in states:
        state = RUNNING
    else:
        state = QUEUED
    if state == FAILED:
        failed = next(s for s in stages if s.state == FAILED)
        where = failed.name if failed.dose is None else f"{failed.name} (dose {failed.dose:g})"
        job.error = f"{where} failed: {failed.error}"
    elif state != CANCELLED:
        job.error = None
    if state == CANCELLED:
        job.error = "cancelled on request"
    if state in TERMINAL_STATES:
        if job.finished_at is None or job.state not in TERMINAL_STATES:
            job.finished_at = now
    else:
        job.finished_at = None
    if state != QUEUED and job.started_at is None:
        job.started_at = now
    job.state = state
    job.updated_at = now


# -- creation ----------------------------------------------------------------------------------------

def add_study(session: Session, *, name: str, input_uri: str, kind: str, checksum: str, bytes: int,
              header_summary: dict, requested_by: str | None = None,
              reference_seg_uri: str | None = None) -> Study:
    study = Study(name=name, input_uri=input_uri, kind=kind, checksum=checksum, bytes=bytes,
                  header_summary=header_summary, requested_by=requested_by,
                  reference_seg_uri=reference_seg_uri)
    session.add(study)
    session.commit()
    return study


def create_job(session: Session, study: Study, spec: JobSpec, requested_by: str | None,
               idempotency_key: str | None = None) -> Job:
    """A queued job with all its stage rows; the same ``idempotency_key`` returns the existing job."""
    if idempotency_key is not None:
        existing = session.scalars(select(Job).where(Job.idempotency_key == idempotency_key)).first()
        if existing is not None:
            return existing
    now = utcnow()
    job = Job(study_id=study.id, doses=list(spec.doses), protocol_name=spec.protocol.name,
              spec=spec.model_dump(mode="json"), segmenter=spec.segmenter, seed=spec.seed, state=QUEUED,
              cancel_requested=False, idempotency_key=idempotency_key, created_at=now, updated_at=now,
              requested_by=requested_by)
    session.add(job)
    session.flush()
    rows = [Stage(job_id=job.id, name="acquire", dose=None)]
    for dose in spec.doses:
        rows += [Stage(job_id=job.id, name=name, dose=float(dose)) for name in PER_DOSE_STAGES]
    rows.append(Stage(job_id=job.id, name="evaluate", dose=None))
    for row in rows:
        row.state, row.attempt, row.progress = QUEUED, 0, 0.0
    session.add_all(rows)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        if idempotency_key is None:
            raise
        return session.scalars(select(Job).where(Job.idempotency_key == idempotency_key)).one()
    return job


# -- scheduling --------------------------------------------------------------------------------------

def ready_stages(session: Session, job_id: str) -> list[Stage]:
    job = session.scalars(select(Job).where(Job.id == job_id).execution_options(populate_existing=True)).one()
    return _ready(job, _stages(session, job_id))


def claim_stage(session: Session, stage_id: int, worker: str) -> Stage | None:
    """Atomically take a queued, ready stage: running, attempt + 1. None if anyone else has it (or
    it is not runnable: already done, cancelled, a dependency not succeeded, the job failed)."""
    stage = session.get(Stage, stage_id)
    if stage is None:
        return None
    job = _lock_job(session, stage.job_id)
    stages = _stages(session, job.id)
    if stage_id not in {s.id for s in _ready(job, stages)}:
        session.rollback()
        return None
    now = utcnow()
    result = session.execute(
        update(Stage).where(Stage.id == stage_id, Stage.state == QUEUED)
        .values(state=RUNNING, attempt=Stage.attempt + 1, heartbeat_at=now, started_at=now, worker=worker,
                progress=0.0, finished_at=None, error=None))
    if result.rowcount != 1:
        session.rollback()
        return None
    _derive(job, _stages(session, job.id))
    session.commit()
    return session.get(Stage, stage_id, populate_existing=True)


def heartbeat(session: Session, stage_id: int, attempt: int, progress: float | None = None) -> bool:
    """Record that ``attempt`` is alive (and its progress, 0..1); False if it no longer owns the stage."""
    values: dict = {"heartbeat_at": utcnow()}
    if progress is not None:
        values["progress"] = min(max(float(progress), 0.0), 1.0)
    result = session.execute(update(Stage).where(Stage.id == stage_id, Stage.attempt == attempt,
                                                 Stage.state == RUNNING).values(**values))
    if result.rowcount == 1:
        job_id = session.scalar(select(Stage.job_id).where(Stage.id == stage_id))
        session.execute(update(Job).where(Job.id == job_id).values(updated_at=values["heartbeat_at"]))
    session.commit()
    return result.rowcount == 1


def is_cancel_requested(session: Session, job_id: str) -> bool:
    value = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    session.rollback()  # end the read transaction: the next call sees fresh data
    return bool(value)


def _owned(session: Session, stage_id: int, attempt: int) -> tuple[Job, Stage] | None:
    stage = session.get(Stage, stage_id)
    if stage is None:
        return None
    job = _lock_job(session, stage.job_id)
    session.refresh(stage)
    if stage.state != RUNNING or stage.attempt != attempt:
        session.rollback()
        return None
    return job, stage


def describe_artifact(uri: str) -> tuple[int, str]:
    """(bytes, sha256) of a file, or of a folder: the hash over its files' relative names and bytes."""
    fs, path = fsspec.core.url_to_fs(uri)
    digest = hashlib.sha256()
    if fs.isdir(path):
        total = 0
        root = path.rstrip("/")
        for name in sorted(fs.find(root)):
            data = fs.cat_file(name)
            digest.update(name[len(root):].lstrip("/").encode() + b"\0")
            digest.update(hashlib.sha256(data).digest())
            total += len(data)
        return total, digest.hexdigest()
    total = 0
    with fs.open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            total += len(block)
    return total, digest.hexdigest()


def complete_stage(session: Session, stage_id: int, attempt: int, artifacts: dict[str, str]) -> list[Stage]:
    """Publish ``artifacts`` (name -> URI; bytes and sha256 recorded) and mark the stage succeeded, if
    ``attempt`` still owns it. Returns the stages that became ready because of it (to enqueue)."""
    described = {name: (uri, *describe_artifact(uri)) for name, uri in artifacts.items()}  # I/O outside the lock
    owned = _owned(session, stage_id, attempt)
    if owned is None:
        return []
    job, stage = owned
    for name, (uri, size, checksum) in described.items():
        session.add(Artifact(stage_id=stage_id, attempt=attempt, name=name, uri=uri, bytes=size,
                             checksum=checksum))
    now = utcnow()
    stage.state, stage.finished_at, stage.progress, stage.heartbeat_at, stage.error = \
        SUCCEEDED, now, 1.0, now, None
    session.flush()
    stages = _stages(session, job.id)
    _derive(job, stages)
    doses = [s.dose for s in stages if s.name == "segment"]
    ready = [s for s in _ready(job, stages)
             if (stage.name, stage.dose) in dependencies(s.name, s.dose, doses)]
    session.commit()
    return ready


def _finish(session: Session, stage_id: int, attempt: int, state: str, error: str | None) -> bool:
    owned = _owned(session, stage_id, attempt)
    if owned is None:
        return False
    job, stage = owned
    stage.state, stage.error, stage.finished_at = state, error, utcnow()
    session.flush()
    _derive(job, _stages(session, job.id))
    session.commit()
    return True


def fail_stage(session: Session, stage_id: int, attempt: int, error: str) -> bool:
    """Mark the stage failed with ``error`` (if ``attempt`` owns it); the job fails once nothing runs."""
    return _finish(session, stage_id, attempt, FAILED, error)


def cancel_stage(session: Session, stage_id: int, attempt: int) -> bool:
    """The stage stopped because the job was cancelled."""
    return _finish(session, stage_id, attempt, CANCELLED, "cancelled on request")


def request_cancel(session: Session, job_id: str) -> Job:
    """Ask the job to stop: queued stages are cancelled now, running ones stop at their next check."""
    job = _lock_job(session, job_id)
    if job.state in TERMINAL_STATES:
        session.rollback()
        return session.get(Job, job_id, populate_existing=True)
    job.cancel_requested = True
    stages = _stages(session, job_id)
    now = utcnow()
    for stage in stages:
        if stage.state == QUEUED:
            stage.state, stage.finished_at, stage.error = CANCELLED, now, "cancelled on request"
    _derive(job, stages)
    session.commit()
    return job


def retry_job(session: Session, job_id: str) -> Job:
    """Failed and cancelled stages back to queued (attempts keep counting); enqueue ``ready_stages``."""
    job = _lock_job(session, job_id)
    if job.state not in (FAILED, CANCELLED):
        session.rollback()
        raise JobStateError(f"job {job_id} is {job.state}", fix="only failed or cancelled jobs can be retried")
    stages = _stages(session, job_id)
    for stage in stages:
        if stage.state in (FAILED, CANCELLED):
            stage.state, stage.error, stage.finished_at, stage.progress = QUEUED, None, None, 0.0
            stage.heartbeat_at = stage.worker = None
    job.cancel_requested = False
    _derive(job, stages)
    session.commit()
    return job


def reap_stale(session: Session, stale_after_s: float, max_attempts: int) -> list[Stage]:
    """Running stages whose heartbeat is older than ``stale_after_s``: back to queued (returned, to be
    enqueued again), cancelled if the job was cancelled, or failed once ``max_attempts`` are spent.
    Also returns the ready stages of jobs with nothing running that have not changed for
    ``stale_after_s`` (their task message was lost), so no job stays queued or running for ever."""
    cutoff = utcnow() - timedelta(seconds=stale_after_s)
    candidates = list(session.execute(select(Stage.id, Stage.attempt).where(
        Stage.state == RUNNING, Stage.heartbeat_at < cutoff)))
    session.rollback()
    requeued: list[Stage] = []
    for stage_id, attempt in candidates:
        owned = _owned(session, stage_id, attempt)
        if owned is None:
            continue
        job, stage = owned
        if stage.heartbeat_at is not None and stage.heartbeat_at >= cutoff:
            session.rollback()
            continue
        silent = (utcnow() - stage.heartbeat_at).total_seconds() if stage.heartbeat_at else float("inf")
        lost = f"worker {stage.worker or '?'} lost on attempt {attempt} (no heartbeat for {silent:.0f} s)"
        now = utcnow()
        if job.cancel_requested:
            stage.state, stage.error, stage.finished_at = CANCELLED, "cancelled on request", now
        elif attempt >= max_attempts:
            stage.state, stage.finished_at = FAILED, now
            stage.error = f"{lost}; giving up after {attempt} of {max_attempts} attempts"
        else:
            stage.state, stage.error, stage.heartbeat_at, stage.progress = QUEUED, f"{lost}; re-queued", None, 0.0
        session.flush()
        stages = _stages(session, job.id)
        _derive(job, stages)
        if stage.state == QUEUED and stage.id in {s.id for s in _ready(job, stages)}:
            requeued.append(stage)
        session.commit()
    return requeued + _orphans(session, cutoff, {s.id for s in requeued})


def _orphans(session: Session, cutoff, skip: set[int]) -> list[Stage]:
    """Ready stages of jobs that have not changed since ``cutoff``: their task was lost (a worker died
    between publishing a stage and sending the next, or the API between create_job and enqueue).
    Sending them again is harmless (one claim wins); touching the job sends them at most once per
    ``stale_after_s``."""
    quiet = list(session.scalars(select(Job.id).where(Job.state.in_((QUEUED, RUNNING)), Job.updated_at < cutoff,
                                                      Job.cancel_requested.is_(False))))
    session.rollback()
    found: list[Stage] = []
    for job_id in quiet:
        job = _lock_job(session, job_id)
        stages = _stages(session, job_id)
        if RUNNING in {s.state for s in stages}:
            session.rollback()
            continue
        found += [s for s in _ready(job, stages) if s.id not in skip]
        session.commit()
    return found


# -- artifacts and metrics -----------------------------------------------------------------------------

def published_artifacts(session: Session, stage: Stage) -> dict[str, str]:
    """name -> URI of the artifacts of ``stage``'s succeeded attempt ({} unless it succeeded)."""
    if stage.state != SUCCEEDED:
        return {}
    rows = session.scalars(select(Artifact).where(Artifact.stage_id == stage.id, Artifact.attempt == stage.attempt))
    return {row.name: row.uri for row in rows}


def stage_inputs(session: Session, stage: Stage) -> dict:
    """What the executor of ``stage`` reads, from its dependencies' published artifacts:
    simulate: {"counts"}; reconstruct: {"line_integrals"}; segment: {"recon"};
    evaluate: {"recon": {dose: uri}, "seg": {dose: uri}, "labels": uri (of the full dose)}."""
    stages = {(s.name, s.dose): s for s in _stages(session, stage.job_id)}

    def of(name: str, dose: float | None) -> dict[str, str]:
        found = published_artifacts(session, stages[(name, dose)])
        if not found:
            raise JobStateError(f"{name} (dose {dose}) of job {stage.job_id} has no published artifacts")
        return found

    if stage.name == "simulate":
        return {"counts": of("acquire", None)["counts"]}
    if stage.name == "reconstruct":
        return {"line_integrals": of("simulate", stage.dose)["line_integrals"]}
    if stage.name == "segment":
        return {"recon": of("reconstruct", stage.dose)["recon"]}
    if stage.name == "evaluate":
        doses = sorted(d for (name, d) in stages if name == "segment")
        segs = {d: of("segment", d) for d in doses}
        return {"recon": {d: of("reconstruct", d)["recon"] for d in doses},
                "seg": {d: segs[d]["seg"] for d in doses}, "labels": segs[max(doses)]["labels"]}
    return {}


def _number(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def record_metrics(session: Session, job_id: str, per_label_csv_text: str) -> int:
    """Replace the job's metric rows with those of ``per_label.csv`` (non-finite values as NULL)."""
    _lock_job(session, job_id)
    session.execute(delete(Metric).where(Metric.job_id == job_id))
    rows = list(csv.DictReader(io.StringIO(per_label_csv_text)))
    for row in rows:
        session.add(Metric(job_id=job_id, dose=float(row["dose"]), reference=row["reference"], group=row["group"],
                           label=row["label"], label_id=int(row["label_id"]), dice=_number(row["dice"]),
                           surface_dice=_number(row.get("surface_dice")), hd95_mm=_number(row.get("hd95_mm")),
                           volume_change_ml=_number(row.get("volume_change_ml")),
                           reference_voxels=int(row["reference_voxels"]), test_voxels=int(row["test_voxels"])))
    session.commit()
    return len(rows)

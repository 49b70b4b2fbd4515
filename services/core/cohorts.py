"""Cohorts and evaluation runs: the pure logic (database and artifact store; no Celery, no HTTP).

Public API (functions take a Session and commit their own changes):
    store_study(session, path, storage_url, name=None, reference_seg=None, requested_by=None) -> Study
    attach_reference_segmentation(session, study, path, storage_url) -> Study
    create_cohort(session, name, study_ids, description="", created_by=None) -> Cohort
    add_studies(session, cohort, study_ids) -> list[str]        the ids newly added
    find_cohort(session, name_or_id) -> Cohort                  CohortError if there is none
    cohort_view(session, cohort) -> dict
    EvaluationRequest                                           protocol, doses, segmenter, seed, threshold, webhook
    protocol_sha256(protocol) -> str                            sha256 of the protocol's canonical JSON
    start_run(session, cohort, request, enqueue, ...) -> (EvaluationRun, created)
    dispatch_jobs(session, run, enqueue) -> list[str]           create (and send) the jobs a run lacks
    advance_run(session, run_id, storage_url, enqueue, ...) -> EvaluationRun   finalise once all jobs ended
    advance_runs(session, storage_url, enqueue, ...) -> list[str]             every running run, once
    run_view(run) -> dict;  exit_code(run) -> int               0 ok, 1 regression, 2 error / not finished
    weight_checksums(spec) -> dict                              sha256 of the weight files a segmenter reads
    run_job_states(session, run_ids) -> {run: {state: n}}      live progress of runs (for the dashboard)
    run_studies(session, run) -> list[dict]                     per study: job, state, error, mean Dice per dose
    table1_changes(table1, previous, threshold) -> list[dict]   per group and dose: median before, now, change
    CohortError                                                 an unknown cohort or study (HTTP 404)

An evaluation run is one cohort x protocol x doses x segmenter x seed. ``start_run`` stores the run
(with the cohort's study ids at that moment) and commits, then creates one ordinary job per study with
:func:`dosebench.core.jobs.create_job` (idempotency key ``evaluation:<run>:<study>``, so creating it
again returns the same job) and hands each to ``enqueue``, exactly as ``POST /v1/jobs`` does. A process
that dies in between leaves a run with missing jobs: ``advance_run`` creates them.

Completion does not depend on the process that started the run: ``advance_run`` (called by the beat
task ``dosebench.evaluations``, by ``GET /v1/evaluations/{id}`` and by ``evaluate-cohort --wait``) checks
whether every job of the run has ended (succeeded, failed or cancelled); if so it aggregates Table 1
from the Metric rows, compares it with the previous finished run, writes the report under
``evaluations/<run id>/`` and publishes the result with one ``UPDATE ... WHERE state='running'``. Two
finalisers at once compute the same result; exactly one update succeeds, and only its process sends
the webhook.

Table 1: per study and group, the mean Dice over the group's labels; per group and dose, the median
and MAD (unscaled) over studies (:func:`dosebench.segmenter.metrics.aggregate`), for the full-dose
reference and, where studies carry a reference segmentation, against it too. A failed or cancelled
study contributes nothing and is listed.

Regression: the run is compared with the previous finished run of the same schedule, or, for a manual
run, with the previous finished run of the same cohort x protocol x doses x segmenter. A drop of the
median Dice (full-dose reference) of any group at any dose by more than ``regression_threshold``, a
figure that is missing now, or any failed study makes it a regression, with the reasons listed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import fsspec
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import (
    ERROR,
    FINISHED,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
    Cohort,
    CohortStudy,
    EvaluationJob,
    EvaluationRun,
    Job,
    Metric,
    Schedule,
    Stage,
    Study,
    new_id,
    utcnow,
)
from .errors import DosebenchError, InputError

log = logging.getLogger(__name__)

#: the reference of the Table 1 that decides regressions
FULL_DOSE_REFERENCE = "full_dose"
DEFAULT_DOSES = (0.2, 0.4, 0.6, 0.8, 1.0)

Enqueue = Callable[[str], Any]  # job id -> send its ready stages


class CohortError(DosebenchError):
    """An unknown cohort, study, schedule or run (HTTP 404)."""


# -- studies -------------------------------------------------------------------------------------------

def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def store_study(session: Session, path: Path, storage_url: str, *, name: str | None = None,
                reference_seg: Path | None = None, requested_by: str | None = None) -> Study:
    """Store a CT volume (and optionally its reference segmentation) as a new study.

    The same steps as ``POST /v1/studies``, from :mod:`dosebench.api.uploads`: the file is loaded once
    as a CT volume (refused if it cannot be), a DICOM series is kept as NIfTI (pixels and geometry only,
    no patient data), and the object is copied to ``studies/<id>/`` via a temporary key.

    Parameters
    ----------
    session : Session
        Database session.
    path : Path
        NIfTI file, DICOM series as a .zip, or a DICOM folder.
    storage_url : str
        The artifact store's root URL.
    name : str, optional
        A label for the study (no patient data); default ``study-<id prefix>``.
    reference_seg : Path, optional
        A NIfTI label map on the study's grid (same shape and affine).
    requested_by : str, optional
        Who added it.

    Returns
    -------
    Study
        The committed row.

    Raises
    ------
    InputError
        A file that is not a readable CT volume, or a reference segmentation not on its grid.
    """
    import tempfile

    from ..api import uploads
    from ..api.problems import Problem
    from .volume import load_label_map, load_volume

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist", fix="give a NIfTI file, a DICOM folder or a zipped DICOM series")
    study_id = new_id()
    base = storage_url.rstrip("/")
    with tempfile.TemporaryDirectory(prefix="dosebench-study-") as scratch:
        if path.is_dir():
            volume = load_volume(path)
            kind, local, suffix, size, checksum = "dicom-folder", None, ".nii.gz", 0, ""
            received = None
        else:
            received = uploads.ReceivedFile(path=path, filename=path.name, size=path.stat().st_size,
                                            sha256=_sha256_file(path))
            try:
                kind = uploads.detect_kind(received)
                volume = uploads.validate_volume(received)
            except Problem as exc:
                raise InputError(exc.detail, fix=exc.fix) from exc
            size, checksum = received.size, received.sha256
            local = path if kind == "nifti" else None
            suffix = ".nii.gz" if kind != "nifti" or path.name.lower().endswith(".gz") else ".nii"
        if local is None:
            # keep the pixels and the geometry only: no DICOM header (patient data) is stored
            local = uploads.nifti_of(volume, Path(scratch))
            if received is None:
                size, checksum = local.stat().st_size, _sha256_file(local)
        summary = uploads.header_summary(volume, kind, received or uploads.ReceivedFile(
            path=local, filename=local.name, size=size, sha256=checksum))
        reference_url = None
        if reference_seg is not None:
            load_label_map(reference_seg, volume)  # refuses a map not on the study's grid
            reference_url = f"{base}/studies/{study_id}/reference_seg.nii.gz"
        del volume
        url = f"{base}/studies/{study_id}/input{suffix}"
        uploads.store_object(local, url)
        try:
            if reference_seg is not None:
                uploads.store_object(Path(reference_seg), reference_url)
            study = Study(id=study_id, name=(name or "").strip()[:255] or f"study-{study_id[:8]}", input_uri=url,
                          kind=kind, checksum=checksum, bytes=size, header_summary=summary,
                          requested_by=requested_by, reference_seg_uri=reference_url)
            session.add(study)
            session.commit()
        except BaseException:
            session.rollback()
            uploads.delete_object(url)
            if reference_url is not None:
                uploads.delete_object(reference_url)
            raise
    return study


def attach_reference_segmentation(session: Session, study: Study, path: Path, storage_url: str) -> Study:
    """Check that the label map at ``path`` lies on ``study``'s grid and store it as its reference
    segmentation (replacing any earlier one); runs started from now on compare against it too.

    Raises
    ------
    InputError
        Not a readable label map, or not on the study's grid (shape and affine).
    """
    from ..api import uploads
    from ..stages import local_copy
    from .volume import load_label_map, load_volume

    with local_copy(study.input_uri) as local:
        volume = load_volume(local)
    load_label_map(path, volume)
    url = f"{storage_url.rstrip('/')}/studies/{study.id}/reference_seg.nii.gz"
    uploads.store_object(Path(path), url)
    study.reference_seg_uri = url
    session.commit()
    return study


# -- cohorts -------------------------------------------------------------------------------------------

def _studies_or_404(session: Session, study_ids: Iterable[str]) -> list[str]:
    wanted = list(dict.fromkeys(str(s) for s in study_ids))
    found = set(session.scalars(select(Study.id).where(Study.id.in_(wanted)))) if wanted else set()
    missing = [s for s in wanted if s not in found]
    if missing:
        raise CohortError(f"no study {', '.join(missing)}",
                          fix="add studies first (`dosebench study add PATH` or POST /v1/studies)")
    return wanted


def create_cohort(session: Session, name: str, study_ids: Iterable[str] = (), description: str = "",
                  created_by: str | None = None) -> Cohort:
    """A new cohort ``name`` holding ``study_ids``; InputError if the name is taken or empty."""
    name = name.strip()
    if not name or len(name) > 255:
        raise InputError(f"cohort name {name!r} is empty or too long", fix="give a name of 1 to 255 characters")
    ids = _studies_or_404(session, study_ids)
    cohort = Cohort(id=new_id(), name=name, description=description, created_at=utcnow(), created_by=created_by)
    session.add(cohort)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise InputError(f"a cohort named {name!r} exists already", fix="pick another name, or add studies "
                                                                         "to it (`dosebench cohort add`)") from exc
    now = utcnow()
    session.add_all(CohortStudy(cohort_id=cohort.id, study_id=s, added_at=now) for s in ids)
    session.commit()
    return cohort


def add_studies(session: Session, cohort: Cohort, study_ids: Iterable[str]) -> list[str]:
    """Add studies to ``cohort`` (those already in it are skipped); returns the ids newly added."""
    ids = _studies_or_404(session, study_ids)
    present = set(cohort_study_ids(session, cohort.id))
    added = [s for s in ids if s not in present]
    now = utcnow()
    session.add_all(CohortStudy(cohort_id=cohort.id, study_id=s, added_at=now) for s in added)
    try:
        session.commit()
    except IntegrityError:  # added concurrently: they are in the cohort, which is what was asked
        session.rollback()
    return added


def find_cohort(session: Session, name_or_id: str) -> Cohort:
    cohort = session.scalars(select(Cohort).where(Cohort.name == name_or_id)).first() or \
        session.get(Cohort, name_or_id)
    if cohort is None:
        raise CohortError(f"no cohort {name_or_id!r}", fix="list them with `dosebench cohort list`")
    return cohort


def cohort_study_ids(session: Session, cohort_id: str) -> list[str]:
    return list(session.scalars(select(CohortStudy.study_id).where(CohortStudy.cohort_id == cohort_id)
                                .order_by(CohortStudy.added_at, CohortStudy.study_id)))


def cohort_view(session: Session, cohort: Cohort) -> dict:
    rows = session.execute(select(Study).join(CohortStudy, CohortStudy.study_id == Study.id)
                           .where(CohortStudy.cohort_id == cohort.id)
                           .order_by(CohortStudy.added_at, Study.id)).scalars()
    return {"id": cohort.id, "name": cohort.name, "description": cohort.description,
            "created_at": cohort.created_at.isoformat(), "created_by": cohort.created_by,
            "studies": [{"id": s.id, "name": s.name, "kind": s.kind,
                         "reference_segmentation": s.reference_seg_uri is not None} for s in rows]}


# -- evaluation runs -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvaluationRequest:
    """What one evaluation run computes (``regression_threshold`` None: the settings' default)."""

    protocol: str = "demo"
    doses: tuple[float, ...] = DEFAULT_DOSES
    segmenter: str = "threshold"
    seed: int = 7
    regression_threshold: float | None = None
    webhook_url: str | None = None


def protocol_sha256(protocol: Any) -> str:
    """sha256 of the protocol's canonical JSON (keys sorted, no spaces): same settings, same digest."""
    text = json.dumps(protocol.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def doses_key(doses: Iterable[float]) -> str:
    """``0.50,1.00``: the run's doses (1.0 included), ascending, as one comparable string."""
    return ",".join(f"{d:.2f}" for d in sorted({float(d) for d in doses}))


def _validated(request: EvaluationRequest, default_threshold: float) -> tuple[Any, list[float], str, float]:
    from .doses import FULL_DOSE, validate_dose_fraction
    from .protocol import builtin_protocol_names, load_protocol

    if request.protocol not in builtin_protocol_names():
        raise InputError(f"unknown protocol {request.protocol!r}", fix=f"use one of {', '.join(builtin_protocol_names())}")
    if not request.doses:
        raise InputError("no dose levels", fix="give e.g. 0.5,1.0")
    doses = sorted({validate_dose_fraction(d) for d in request.doses} | {FULL_DOSE}, reverse=True)
    if request.seed < 0:
        raise InputError(f"seed {request.seed} is negative", fix="give a seed >= 0")
    threshold = default_threshold if request.regression_threshold is None else float(request.regression_threshold)
    if not threshold >= 0:
        raise InputError(f"regression threshold {threshold!r} is negative", fix="give a Dice drop >= 0, e.g. 0.005")
    if request.webhook_url is not None and not request.webhook_url.startswith(("http://", "https://")):
        raise InputError(f"webhook URL {request.webhook_url!r} is not http(s)", fix="give http://host/path")
    from ..segmenter.backends import normalise_spec

    return load_protocol(request.protocol), doses, normalise_spec(request.segmenter), threshold


def start_run(session: Session, cohort: Cohort, request: EvaluationRequest, enqueue: Enqueue, *,
              default_threshold: float = 0.005, requested_by: str | None = None,
              schedule: Schedule | None = None, fire_time: datetime | None = None) -> tuple[EvaluationRun, bool]:
    """Store a new evaluation run of ``cohort`` and create and send one job per study.

    Parameters
    ----------
    session : Session
        Database session.
    cohort : Cohort
        The cohort (its studies now are the run's studies).
    request : EvaluationRequest
        Protocol, doses, segmenter, seed, regression threshold, webhook.
    enqueue : callable
        ``enqueue(job_id)`` sends a job's ready stages (the API's, the Celery app's ``enqueue_ready``).
    default_threshold : float
        The threshold when ``request`` has none (``Settings.regression_threshold``).
    requested_by : str, optional
        Who asked (a token name, ``schedule:<id>``).
    schedule, fire_time : optional
        The schedule firing this run: ``(schedule.id, fire_time)`` is unique, so a second firing of the
        same time returns the first's run; the schedule's ``last_fire_time`` moves on in the same commit.

    Returns
    -------
    (EvaluationRun, bool)
        The run and whether this call created it.

    Raises
    ------
    InputError
        Unknown protocol or segmenter, bad doses, or a cohort without studies.
    """
    protocol, doses, segmenter, threshold = _validated(request, default_threshold)
    study_ids = cohort_study_ids(session, cohort.id)
    if not study_ids:
        raise InputError(f"cohort {cohort.name!r} has no studies", fix="add some with `dosebench cohort add`")
    run = EvaluationRun(
        id=new_id(), cohort_id=cohort.id, schedule_id=schedule.id if schedule is not None else None,
        fire_time=fire_time, protocol_name=protocol.name, protocol_sha256=protocol_sha256(protocol), doses=doses,
        doses_key=doses_key(doses), segmenter=segmenter, seed=int(request.seed), study_ids=study_ids,
        regression_threshold=threshold, webhook_url=request.webhook_url, state=RUNNING, regression=None,
        reasons=[], table1={}, counts={}, versions={}, created_at=utcnow(), requested_by=requested_by)
    session.add(run)
    try:
        session.flush()  # the unique (schedule_id, fire_time) decides here
        if schedule is not None and fire_time is not None:
            session.execute(update(Schedule).where(Schedule.id == schedule.id, Schedule.last_fire_time < fire_time)
                            .values(last_fire_time=fire_time))
        session.commit()
    except IntegrityError:
        session.rollback()
        if schedule is None:
            raise
        existing = session.scalars(select(EvaluationRun).where(EvaluationRun.schedule_id == schedule.id,
                                                               EvaluationRun.fire_time == fire_time)).one()
        return existing, False
    dispatch_jobs(session, run, enqueue)
    return run, True


def dispatch_jobs(session: Session, run: EvaluationRun, enqueue: Enqueue) -> list[str]:
    """Create the jobs ``run`` lacks (one per study, idempotent) and send them; returns their ids.

    A job that cannot be sent stays queued: the reaper sends ready stages of quiet jobs again."""
    from ..stages import JobSpec
    from .jobs import create_job
    from .protocol import load_protocol

    linked = set(session.scalars(select(EvaluationJob.study_id).where(EvaluationJob.run_id == run.id)))
    missing = [s for s in run.study_ids if s not in linked]
    if not missing:
        return []
    protocol = load_protocol(run.protocol_name)
    created: list[str] = []
    for study_id in missing:
        study = session.get(Study, study_id)
        spec = JobSpec(input_url=study.input_uri, doses=run.doses, protocol=protocol, segmenter=run.segmenter,
                       seed=int(run.seed), reference_seg_url=study.reference_seg_uri, study=study.name)
        job = create_job(session, study, spec, requested_by=run.requested_by or f"evaluation:{run.id}",
                         idempotency_key=f"evaluation:{run.id}:{study_id}")
        session.add(EvaluationJob(run_id=run.id, study_id=study_id, job_id=job.id))
        try:
            session.commit()
        except IntegrityError:  # linked concurrently by another dispatcher
            session.rollback()
            continue
        created.append(job.id)
    for job_id in created:
        try:
            enqueue(job_id)
        except Exception:  # noqa: BLE001 - recorded; the reaper re-sends the stages of quiet jobs
            log.exception("could not send job %s of evaluation run %s", job_id, run.id)
    return created


def _previous_run(session: Session, run: EvaluationRun) -> EvaluationRun | None:
    query = select(EvaluationRun).where(EvaluationRun.state == FINISHED, EvaluationRun.id != run.id,
                                        EvaluationRun.created_at < run.created_at)
    if run.schedule_id is not None:
        query = query.where(EvaluationRun.schedule_id == run.schedule_id)
    else:
        query = query.where(EvaluationRun.cohort_id == run.cohort_id,
                            EvaluationRun.protocol_name == run.protocol_name,
                            EvaluationRun.doses_key == run.doses_key, EvaluationRun.segmenter == run.segmenter)
    return session.scalars(query.order_by(EvaluationRun.created_at.desc(), EvaluationRun.id).limit(1)).first()


def regression_reasons(table1: dict, previous_table1: dict | None, failed: list[dict], threshold: float) -> list[str]:
    """Why a run is a regression (empty: it is not).

    Parameters
    ----------
    table1, previous_table1 : dict
        :func:`~dosebench.segmenter.metrics.aggregate` outputs (full-dose reference) of this run and the
        previous one (None: nothing to compare with).
    failed : list of dict
        The studies that failed or were cancelled (``study``, ``state``, ``error``).
    threshold : float
        The largest allowed drop of a median Dice.

    Returns
    -------
    list[str]
        One sentence per failed study, per group and dose whose median dropped by more than ``threshold``,
        and per figure the previous run had and this one lacks.
    """
    reasons = [f"study {f['study']} {f['state']}: {f.get('error') or 'no error recorded'}" for f in failed]
    for group, cells in sorted((previous_table1 or {}).items()):
        for key, before in sorted(cells.items()):
            now = table1.get(group, {}).get(key)
            if now is None:
                reasons.append(f"{group} at dose {key}: no figure now (previous median Dice {before['median']:.4f})")
                continue
            drop = float(before["median"]) - float(now["median"])
            if drop > threshold:
                reasons.append(f"{group} at dose {key}: median Dice {now['median']:.4f}, down {drop:.4f} from "
                               f"{before['median']:.4f} (threshold {threshold:g})")
    return reasons


def _failure_text(session: Session, job: Job) -> str | None:
    if job.error:
        return job.error
    return session.scalars(select(Stage.error).where(Stage.job_id == job.id, Stage.error.is_not(None))
                           .order_by(Stage.id)).first()


@dataclass
class RunResult:
    """What finalising a run computes (the same from the same rows, whoever computes it)."""

    table1: dict
    counts: dict
    per_study: list[dict]
    reasons: list[str]
    previous_run_id: str | None
    versions: dict


def aggregate_run(session: Session, run: EvaluationRun) -> RunResult:
    """Table 1, counts and per-study rows of a run whose jobs have all ended, plus the regression check."""
    from ..segmenter.metrics import aggregate

    pairs = session.execute(select(EvaluationJob, Job).join(Job, Job.id == EvaluationJob.job_id)
                            .where(EvaluationJob.run_id == run.id)).all()
    jobs_by_study = {link.study_id: job for link, job in pairs}
    names = dict(session.execute(select(Study.id, Study.name).where(Study.id.in_(run.study_ids))).all())
    succeeded = {s: j for s, j in jobs_by_study.items() if j.state == SUCCEEDED}
    failed = [{"study_id": s, "study": names.get(s, s), "job_id": j.id, "state": j.state,
               "error": _failure_text(session, j)}
              for s, j in sorted(jobs_by_study.items()) if j.state != SUCCEEDED]
    study_of_job = {j.id: s for s, j in succeeded.items()}
    metrics = session.scalars(select(Metric).where(Metric.job_id.in_(list(study_of_job)))
                              .order_by(Metric.job_id, Metric.reference, Metric.dose, Metric.label_id)).all() \
        if study_of_job else []
    rows: dict[str, list[dict]] = defaultdict(list)
    labels: dict[str, set[str]] = defaultdict(set)
    for m in metrics:
        labels[m.reference].add(f"{m.group}/{m.label}")
        if m.dice is None:  # not finite: left out, as the job's own summary does
            continue
        rows[m.reference].append({"study": study_of_job[m.job_id], "dose": m.dose, "group": m.group,
                                  "label": m.label, "dice": m.dice})
    table1 = {reference: aggregate(found) for reference, found in sorted(rows.items())}
    full_labels = labels.get(FULL_DOSE_REFERENCE, set())
    labels_per_group: dict[str, int] = defaultdict(int)
    for name in full_labels:
        labels_per_group[name.split("/", 1)[0]] += 1
    counts = {"studies": len(run.study_ids), "succeeded": len(succeeded), "failed": len(failed),
              "studies_with_metrics": len({r["study"] for r in rows.get(FULL_DOSE_REFERENCE, [])}),
              "labels": len(full_labels), "labels_per_group": dict(sorted(labels_per_group.items())),
              "failed_studies": failed}
    per_study = _per_study_rows(run, names, jobs_by_study, rows, failed)
    previous = _previous_run(session, run)
    reasons = regression_reasons(table1.get(FULL_DOSE_REFERENCE, {}),
                                 previous.table1.get(FULL_DOSE_REFERENCE, {}) if previous else None,
                                 failed, run.regression_threshold)
    versions = _versions(run)
    return RunResult(table1=table1, counts=counts, per_study=per_study, reasons=reasons,
                     previous_run_id=previous.id if previous else None, versions=versions)


def _per_study_rows(run: EvaluationRun, names: dict, jobs_by_study: dict, rows: dict, failed: list[dict]) -> list[dict]:
    """One row per study x reference x dose x group: the study's mean Dice over the group's labels."""
    values: dict[tuple, list[float]] = defaultdict(list)
    for reference, found in rows.items():
        for row in found:
            for group in (row["group"], "all"):
                values[(row["study"], reference, float(row["dose"]), group)].append(float(row["dice"]))
    out = []
    for (study, reference, dose, group), dice in sorted(values.items(), key=lambda kv: (
            str(kv[0][0]), kv[0][1], kv[0][2], kv[0][3] == "all", kv[0][3])):
        job = jobs_by_study[study]
        out.append({"study_id": study, "study": names.get(study, study), "job_id": job.id, "job_state": job.state,
                    "reference": reference, "dose": f"{dose:.2f}", "group": group, "labels": len(dice),
                    "mean_dice": repr(sum(dice) / len(dice)), "error": ""})
    for f in failed:
        out.append({"study_id": f["study_id"], "study": f["study"], "job_id": f["job_id"], "job_state": f["state"],
                    "reference": "", "dose": "", "group": "", "labels": 0, "mean_dice": "",
                    "error": f["error"] or ""})
    return out


# -- versions -------------------------------------------------------------------------------------------

@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # keyed by size and mtime: hashed once
    return _sha256_file(Path(path))


def _folder_checksums(root: Path, pattern_ok: Callable[[Path], bool]) -> dict[str, str]:
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and pattern_ok(p)):
        stat = path.stat()
        found[str(path.relative_to(root))] = _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)
    return found


def weight_checksums(spec: str) -> dict:
    """sha256 of every weight file the segmenter ``spec`` reads, by path relative to its folder.

    ``{}`` for the threshold segmenter (no weights); for TotalSegmentator the files of its models in
    the weights folder; for nnU-Net the model folder's checkpoints, plans and dataset files. Where the
    files cannot be read here (this process has no weights), ``{"error": ...}`` says so.
    """
    from ..segmenter.backends import parse_threshold_spec

    try:
        if parse_threshold_spec(spec) is not None:
            return {}
        if spec.lower().startswith("totalsegmentator"):
            from ..segmenter import weights as w

            root = w.resolve_weights_dir()
            mode = "fast" if spec.lower().endswith(":fast") else "total"
            found = {}
            for dataset_id in w.MODES[mode]:
                for relative in w.required_files(dataset_id):
                    path = root / relative
                    stat = path.stat()
                    found[relative] = _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)
            return {"folder": str(root), "files": found}
        if spec.lower().startswith("nnunet:"):
            from ..segmenter.nnunet import parse_spec

            folder = Path(parse_spec(spec).folder)
            files = _folder_checksums(folder, lambda p: p.suffix in (".pth", ".json"))
            if not files:
                raise FileNotFoundError(f"no .pth or .json files under {folder}")
            return {"folder": str(folder), "files": files}
    except Exception as exc:  # noqa: BLE001 - recorded, not fatal: the metrics stand without it
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {"error": f"unknown segmenter {spec!r}"}


def _versions(run: EvaluationRun) -> dict:
    from importlib import metadata

    try:
        dosebench = metadata.version("dosebench")
    except metadata.PackageNotFoundError:
        dosebench = "not installed"
    return {"dosebench": dosebench, "protocol": {"name": run.protocol_name, "sha256": run.protocol_sha256},
            "segmenter": run.segmenter, "weights": weight_checksums(run.segmenter)}


# -- finalisation -----------------------------------------------------------------------------------------

def _publish(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` via a temporary key, so a half-written report is never visible."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = fs._parent(path)
    fs.makedirs(parent, exist_ok=True)
    temporary = f"{parent}/.partial-{uuid.uuid4().hex}"
    fs.pipe_file(temporary, data)
    fs.mv(temporary, path)


def _csv_text(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


PER_STUDY_COLUMNS = ["study_id", "study", "job_id", "job_state", "reference", "dose", "group", "labels",
                     "mean_dice", "error"]


def _report_markdown(run: EvaluationRun, cohort_name: str, result: RunResult, regression: bool,
                     figure: bool = False) -> str:
    from ..segmenter.metrics import format_table1

    doses = sorted(run.doses)
    counts = result.counts
    lines = [f"# Evaluation run {run.id}", "",
             f"Cohort **{cohort_name}** ({counts['studies']} studies: {counts['succeeded']} succeeded, "
             f"{counts['failed']} failed or cancelled); protocol `{run.protocol_name}` "
             f"(sha256 `{run.protocol_sha256[:12]}…`); doses {', '.join(f'{d:g}' for d in doses)}; "
             f"segmenter `{run.segmenter}`; seed {run.seed}.",
             f"Labels: {counts['labels']} ("
             + (", ".join(f"{g}: {n}" for g, n in counts["labels_per_group"].items()) or "none") + ").", ""]
    if run.schedule_id:
        lines += [f"Schedule `{run.schedule_id}`, fire time {run.fire_time.isoformat() if run.fire_time else '?'}.", ""]
    titles = {FULL_DOSE_REFERENCE: "Table 1: Dice against the full-dose segmentation (median ± MAD over studies)",
              "reference_seg": "Dice against the reference segmentation (median ± MAD over studies)"}
    for reference, summary in result.table1.items():
        lines += [format_table1(summary, doses, titles.get(reference, reference)), ""]
    if not result.table1:
        lines += ["No study produced metrics.", ""]
    if figure:
        lines += ["![Median Dice against dose](dice_vs_dose.png)", ""]
    verdict = "**Regression**" if regression else "No regression"
    compared = f"compared with run {result.previous_run_id}" if result.previous_run_id else \
        "no previous finished run to compare with"
    lines += ["## Verdict", "", f"{verdict} ({compared}; threshold {run.regression_threshold:g} of median Dice).", ""]
    lines += [f"- {reason}" for reason in result.reasons]
    if result.reasons:
        lines.append("")
    weights = result.versions["weights"]
    lines += ["## Versions", "", f"- dosebench {result.versions['dosebench']}",
              f"- protocol {run.protocol_name}, sha256 {run.protocol_sha256}",
              f"- weights: {'none (threshold segmenter)' if not weights else json.dumps(weights, sort_keys=True)}", ""]
    return "\n".join(lines)


def _write_report(run: EvaluationRun, cohort_name: str, result: RunResult, regression: bool, storage_url: str) -> str:
    """Write report.md, summary.json, per_study.csv (and the figure and HTML page where the report
    helpers are installed) under ``evaluations/<run id>/``; returns that folder's URL."""
    folder = f"{storage_url.rstrip('/')}/evaluations/{run.id}"
    images: dict[str, bytes] = {}
    full = result.table1.get(FULL_DOSE_REFERENCE)
    if full:
        try:
            from ..reports.figures import dice_vs_dose_png

            images["dice_vs_dose.png"] = dice_vs_dose_png(full, sorted(run.doses),
                                                          f"Cohort evaluation {run.id[:8]}: Dice against dose")
        except ImportError:
            pass
        except Exception:  # noqa: BLE001 - a figure must not cost the results
            log.exception("the Dice-vs-dose figure of run %s failed", run.id)
    markdown = _report_markdown(run, cohort_name, result, regression, figure="dice_vs_dose.png" in images)
    summary = {"run_id": run.id, "cohort": cohort_name, "cohort_id": run.cohort_id, "schedule_id": run.schedule_id,
               "fire_time": run.fire_time.isoformat() if run.fire_time else None,
               "protocol": {"name": run.protocol_name, "sha256": run.protocol_sha256}, "doses": sorted(run.doses),
               "segmenter": run.segmenter, "seed": run.seed, "regression": regression, "reasons": result.reasons,
               "regression_threshold": run.regression_threshold, "previous_run_id": result.previous_run_id,
               "counts": result.counts, "table1": result.table1, "versions": result.versions,
               "aggregation": "per study and group: mean Dice over the group's labels; then median and MAD "
                              "(unscaled) over studies"}
    outputs: dict[str, bytes] = {
        "report.md": markdown.encode(),
        "summary.json": json.dumps(summary, indent=2, sort_keys=True).encode(),
        "per_study.csv": _csv_text(result.per_study, PER_STUDY_COLUMNS).encode(),
        **images,
    }
    try:
        from ..reports.html import render_html

        outputs["report.html"] = render_html(f"Evaluation run {run.id}", markdown, images).encode()
    except ImportError:
        pass
    except Exception:  # noqa: BLE001
        log.exception("the HTML report of run %s failed", run.id)
    for name, data in outputs.items():
        _publish(f"{folder}/{name}", data)
    return folder


def finalise_run(session: Session, run: EvaluationRun, storage_url: str, webhook_timeout_s: float = 5.0) -> bool:
    """Aggregate, compare, write the report and publish the result of a run whose jobs have all ended.

    Returns whether this call published it (False: another finaliser did first). Only the publisher
    sends the webhook."""
    from sqlalchemy import func

    cohort_name = session.scalar(select(Cohort.name).where(Cohort.id == run.cohort_id)) or run.cohort_id
    result = aggregate_run(session, run)
    session.commit()  # end the read: no transaction is held open while the report is written
    regression = bool(result.reasons)
    folder = _write_report(run, cohort_name, result, regression, storage_url)
    published = session.execute(
        update(EvaluationRun).where(EvaluationRun.id == run.id, EvaluationRun.state == RUNNING)
        .values(state=FINISHED, regression=regression, reasons=result.reasons, table1=result.table1,
                counts=result.counts, versions=result.versions, previous_run_id=result.previous_run_id,
                report_uri=folder, finished_at=func.coalesce(EvaluationRun.finished_at, utcnow()), error=None))
    session.commit()
    if published.rowcount != 1:
        return False
    session.refresh(run)
    if run.webhook_url:
        status = send_webhook(run.webhook_url, run_view(run), webhook_timeout_s)
        session.execute(update(EvaluationRun).where(EvaluationRun.id == run.id).values(webhook_status=status))
        session.commit()
        session.refresh(run)
    return True


def send_webhook(url: str, payload: dict, timeout_s: float) -> str:
    """POST ``payload`` as JSON; returns ``HTTP <code>`` or ``failed: <reason>`` (never raises)."""
    import httpx

    try:
        response = httpx.post(url, json=payload, timeout=timeout_s)
    except Exception as exc:  # noqa: BLE001 - a webhook failure is recorded, never fatal
        log.warning("webhook %s failed: %s", url, exc)
        return f"failed: {type(exc).__name__}: {exc}"[:1000]
    if response.status_code >= 400:
        log.warning("webhook %s answered HTTP %s", url, response.status_code)
        return f"failed: HTTP {response.status_code}"
    return f"HTTP {response.status_code}"


def advance_run(session: Session, run_id: str, storage_url: str, enqueue: Enqueue | None = None,
                webhook_timeout_s: float = 5.0) -> EvaluationRun:
    """Move a running run on: create (and send) missing jobs, and finalise it once every job has ended.

    Safe to call from anywhere, any number of times, concurrently."""
    run = session.get(EvaluationRun, run_id, populate_existing=True)
    if run is None:
        raise CohortError(f"no evaluation run {run_id}", fix="list them with GET /v1/evaluations")
    if run.state != RUNNING:
        return run
    if enqueue is not None:
        dispatch_jobs(session, run, enqueue)
    states = list(session.scalars(select(Job.state).join(EvaluationJob, EvaluationJob.job_id == Job.id)
                                  .where(EvaluationJob.run_id == run.id)))
    session.commit()  # ends the read (a commit, unlike a rollback, leaves loaded objects usable)
    if len(states) < len(run.study_ids) or any(state not in TERMINAL_STATES for state in states):
        return run
    try:
        finalise_run(session, run, storage_url, webhook_timeout_s)
    except Exception as exc:  # a run must end: an error that finalising cannot get past ends it
        session.rollback()
        log.exception("evaluation run %s could not be finalised", run.id)
        session.execute(update(EvaluationRun).where(EvaluationRun.id == run.id, EvaluationRun.state == RUNNING)
                        .values(state=ERROR, error=f"{type(exc).__name__}: {exc}"[:2000], finished_at=utcnow()))
        session.commit()
    run = session.get(EvaluationRun, run_id, populate_existing=True)
    session.commit()
    return run


def advance_runs(session: Session, storage_url: str, enqueue: Enqueue | None = None,
                 webhook_timeout_s: float = 5.0) -> list[str]:
    """``advance_run`` on every running run; returns the ids of those that are no longer running."""
    ended = []
    for run_id in list(session.scalars(select(EvaluationRun.id).where(EvaluationRun.state == RUNNING)
                                       .order_by(EvaluationRun.created_at))):
        session.commit()
        try:
            run = advance_run(session, run_id, storage_url, enqueue, webhook_timeout_s)
        except Exception:  # noqa: BLE001 - one broken run must not stop the others
            session.rollback()
            log.exception("advancing evaluation run %s failed", run_id)
            continue
        if run.state != RUNNING:
            ended.append(run_id)
    return ended


# -- views ------------------------------------------------------------------------------------------------

def run_view(run: EvaluationRun) -> dict:
    """The API's and the webhook's JSON of a run."""
    return {"id": run.id, "cohort_id": run.cohort_id, "schedule_id": run.schedule_id,
            "fire_time": run.fire_time.isoformat() if run.fire_time else None, "state": run.state,
            "regression": run.regression, "reasons": list(run.reasons or []),
            "protocol": {"name": run.protocol_name, "sha256": run.protocol_sha256}, "doses": sorted(run.doses),
            "segmenter": run.segmenter, "seed": run.seed, "study_ids": list(run.study_ids),
            "regression_threshold": run.regression_threshold, "previous_run_id": run.previous_run_id,
            "table1": run.table1, "counts": run.counts, "versions": run.versions, "report_uri": run.report_uri,
            "webhook_url": run.webhook_url, "webhook_status": run.webhook_status, "error": run.error,
            "created_at": run.created_at.isoformat(),
            "finished_at": run.finished_at.isoformat() if run.finished_at else None,
            "requested_by": run.requested_by}


def exit_code(run: EvaluationRun) -> int:
    """0: finished, no regression; 1: finished, a regression; 2: an error (or not finished)."""
    if run.state == FINISHED:
        return 1 if run.regression else 0
    return 2


# -- read-only helpers for the dashboard ---------------------------------------------------------------------

def run_job_states(session: Session, run_ids: Iterable[str]) -> dict[str, dict[str, int]]:
    """How many jobs of each run are in each job state, ``{run_id: {state: n}}`` (one grouped query).

    A run's live progress; its stored ``counts`` are only written when it is finalised."""
    from sqlalchemy import func

    wanted = list(run_ids)
    if not wanted:
        return {}
    found: dict[str, dict[str, int]] = defaultdict(dict)
    for run_id, state, n in session.execute(
            select(EvaluationJob.run_id, Job.state, func.count()).join(Job, Job.id == EvaluationJob.job_id)
            .where(EvaluationJob.run_id.in_(wanted)).group_by(EvaluationJob.run_id, Job.state)).all():
        found[run_id][state] = int(n)
    return dict(found)


def run_studies(session: Session, run: EvaluationRun) -> list[dict]:
    """One row per study of ``run`` (in the run's order): its name, job id, job state, the job's error,
    and the study's mean Dice over all its labels per dose (full-dose reference; the same per-study
    score that Table 1's ``all`` row takes the median of). A study whose job was not created yet has
    ``job_id`` None."""
    pairs = session.execute(select(EvaluationJob.study_id, Job).join(Job, Job.id == EvaluationJob.job_id)
                            .where(EvaluationJob.run_id == run.id)).all()
    job_of_study = {study_id: job for study_id, job in pairs}
    names = dict(session.execute(select(Study.id, Study.name).where(Study.id.in_(run.study_ids))).all())
    dice: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    job_ids = [job.id for job in job_of_study.values()]
    if job_ids:
        from ..segmenter.metrics import dose_key

        for job_id, dose, value in session.execute(
                select(Metric.job_id, Metric.dose, Metric.dice)
                .where(Metric.job_id.in_(job_ids), Metric.reference == FULL_DOSE_REFERENCE,
                       Metric.dice.is_not(None))).all():
            dice[job_id][dose_key(dose)].append(float(value))
    rows = []
    for study_id in run.study_ids:
        job = job_of_study.get(study_id)
        error = (_failure_text(session, job) if job is not None and job.state != SUCCEEDED else None)
        rows.append({"study_id": study_id, "study": names.get(study_id, study_id),
                     "job_id": job.id if job is not None else None, "job_state": job.state if job is not None else None,
                     "error": error,
                     "mean_dice": {key: sum(v) / len(v) for key, v in dice[job.id].items()} if job is not None else {}})
    return rows


def table1_changes(table1: dict, previous_table1: dict, threshold: float) -> list[dict]:
    """Per group and dose of the previous run's Table 1 (one reference): its median, the median now, the
    change (now - before; None where there is no figure now) and whether that is a regression by the
    rule of :func:`regression_reasons` (a drop larger than ``threshold``, or no figure now)."""
    changes = []
    for group, cells in sorted(previous_table1.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        for key, before in sorted(cells.items()):
            now = table1.get(group, {}).get(key)
            change = None if now is None else float(now["median"]) - float(before["median"])
            changes.append({"group": group, "dose": key, "previous_median": float(before["median"]),
                            "median": None if now is None else float(now["median"]), "change": change,
                            "regression": change is None or -change > threshold})
    return changes

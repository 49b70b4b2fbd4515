"""The service system end to end: PostgreSQL, Redis and REAL ``dosebench worker`` (Celery) subprocesses.

(a) a job on the cropped CT succeeds and its metrics rows equal the embedded run's per_label.csv;
(b) SIGKILL of the worker in the middle of a stage: the reaper re-queues it, a fresh worker finishes,
    same metrics, never stuck in ``running``;
(c) a task delivered several times runs once (claim) - attempts and artifacts show it;
(d) cancel mid-run ends ``cancelled`` with no further stage started; retry of a failed job succeeds.
"""

from __future__ import annotations

import csv
import shutil
import signal
import time
from pathlib import Path

import pytest
from service_processes import CliProcess, start_service, stop_service  # noqa: E402  (tests/ helper)
from sqlalchemy import select

from dosebench.core import jobs
from dosebench.core.db import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    TERMINAL_STATES,
    Artifact,
    Job,
    Metric,
    Stage,
    session_factory,
)
from dosebench.core.doses import dose_label
from dosebench.core.protocol import load_protocol
from dosebench.stages import JobSpec

pytestmark = pytest.mark.slow

DOSES = [0.5, 1.0]
SEED = 7
JOB_TIMEOUT_S = 150
QUEUE_LIST = "simulate,reconstruct,segment,evaluate"


@pytest.fixture(scope="module")
def service(postgres_url, redis_url, broker_key_prefix, tmp_path_factory):
    """Settings (environment for the workers, Settings for this process) on the test servers."""
    yield start_service(postgres_url, redis_url, broker_key_prefix, tmp_path_factory.mktemp("storage"),
                        tmp_path_factory.mktemp("worker-logs"), HEARTBEAT_INTERVAL_S="0.3", STALE_AFTER_S="3",
                        REAPER_INTERVAL_S="1", MAX_ATTEMPTS="3")
    stop_service()


class Worker(CliProcess):
    """``dosebench worker`` serving every queue (solo pool unless told otherwise)."""

    def __init__(self, service: dict, *extra: str, pool: str = "solo") -> None:
        super().__init__(service, "worker", "worker", "--queues", QUEUE_LIST, "--concurrency", "1", "--pool", pool,
                         "--loglevel", "info", "--name", f"test-{time.monotonic_ns()}@%h", *extra)


@pytest.fixture(scope="module")
def worker(service):
    """One worker serving every queue, shared by the tests that do not kill it. The solo pool: a
    prefork pool serving the GPU queues starts a fresh process per task (max-tasks-per-child 1), which
    would load the numba kernels again for every stage (test_service_cli checks that option)."""
    running = Worker(service)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def embedded_rows(cropped_ct, tmp_path_factory) -> list[tuple]:
    """per_label.csv of the embedded runner on the same input, doses, protocol and seed."""
    from dosebench.pipeline import RunRequest, run_study

    out = tmp_path_factory.mktemp("embedded") / "run"
    run_study(RunRequest(input_path=cropped_ct, doses=DOSES, protocol=load_protocol("tiny"),
                         segmenter="threshold", seed=SEED, out_dir=out))
    with (out / "metrics" / "per_label.csv").open(newline="") as handle:
        return sorted(_csv_row(row) for row in csv.DictReader(handle))


def _number(text: str) -> float | None:
    value = float(text)
    return value if value == value and abs(value) != float("inf") else None


def _csv_row(row: dict) -> tuple:
    return (row["dose"], row["reference"], row["group"], row["label"], int(row["label_id"]), _number(row["dice"]),
            int(row["reference_voxels"]), int(row["test_voxels"]), _number(row["volume_change_ml"]),
            _number(row["surface_dice"]), _number(row["hd95_mm"]))


def _db_rows(service: dict, job_id: str) -> list[tuple]:
    with session_factory(service["settings"].database_url)() as session:
        metrics = session.scalars(select(Metric).where(Metric.job_id == job_id)).all()
        return sorted((dose_label(m.dose), m.reference, m.group, m.label, m.label_id, m.dice, m.reference_voxels,
                       m.test_voxels, m.volume_change_ml, m.surface_dice, m.hd95_mm) for m in metrics)


def _submit(service: dict, input_path: Path, enqueue: bool = True) -> str:
    spec = JobSpec(input_url=str(input_path), doses=DOSES, protocol=load_protocol("tiny"), seed=SEED)
    with session_factory(service["settings"].database_url)() as session:
        study = jobs.add_study(session, name=input_path.name, input_uri=str(input_path), kind="nifti",
                               checksum="0" * 64, bytes=0, header_summary={})
        job = jobs.create_job(session, study, spec, "tests")
    if enqueue:
        from dosebench.core.celery_app import enqueue_ready

        assert len(enqueue_ready(job.id, service["settings"])) == 1
    return job.id


def _stages(service: dict, job_id: str) -> dict[tuple, Stage]:
    with session_factory(service["settings"].database_url)() as session:
        return {(s.name, s.dose): s for s in session.scalars(select(Stage).where(Stage.job_id == job_id))}


def _job(service: dict, job_id: str) -> Job:
    with session_factory(service["settings"].database_url)() as session:
        return session.get(Job, job_id)


def _wait(condition, what: str, worker: Worker | None, timeout: float = JOB_TIMEOUT_S, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}\n" + (worker.tail() if worker else ""))


def _wait_terminal(service: dict, job_id: str, worker: Worker | None) -> Job:
    return _wait(lambda: (job := _job(service, job_id)).state in TERMINAL_STATES and job, f"job {job_id}", worker)


def _running_stage(service: dict, job_id: str) -> Stage | None:
    return next((s for s in _stages(service, job_id).values() if s.state == RUNNING), None)


def test_a_job_succeeds_on_a_real_worker_with_the_embedded_metrics(service, worker, cropped_ct, embedded_rows):
    job_id = _submit(service, cropped_ct)
    job = _wait_terminal(service, job_id, worker)
    assert job.state == SUCCEEDED, (job.error, worker.tail())
    assert job.started_at <= job.finished_at and job.error is None
    assert _db_rows(service, job_id) == embedded_rows
    stages = _stages(service, job_id)
    assert len(stages) == 2 + 3 * len(DOSES)
    assert all(s.state == SUCCEEDED and s.attempt == 1 and s.progress == 1.0 for s in stages.values())
    with session_factory(service["settings"].database_url)() as session:
        artifacts = session.scalars(select(Artifact).join(Stage).where(Stage.job_id == job_id)).all()
        evaluate = stages[("evaluate", None)]
        names = {a.name for a in artifacts if a.stage_id == evaluate.id}
        assert {"per_label.csv", "summary.json", "report.md"} <= names
        for artifact in artifacts:
            assert f"jobs/{job_id}/" in artifact.uri and "/attempt-1/" in artifact.uri
            assert artifact.bytes > 0 and len(artifact.checksum) == 64
            assert jobs.describe_artifact(artifact.uri) == (artifact.bytes, artifact.checksum)


def test_a2_submitted_over_http_run_by_the_worker_metrics_from_the_api(service, worker, cropped_ct, embedded_rows):
    """The whole path: upload and submit over the REST API, the real worker runs every stage, the
    metrics come back through the API (from PostgreSQL) equal to the embedded run's."""
    from fastapi.testclient import TestClient

    from dosebench.api.app import create_app
    from dosebench.api.tokens import create_token

    settings = service["settings"]
    token = create_token(settings.database_url, "http-e2e")
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"}) as client:
        with cropped_ct.open("rb") as handle:
            study = client.post("/v1/studies", files={"file": ("ct.nii.gz", handle)})
        assert study.status_code == 201, study.text
        submitted = client.post("/v1/jobs", json={"study_id": study.json()["id"], "doses": DOSES, "protocol": "tiny",
                                                  "segmenter": "threshold", "seed": SEED},
                                headers={"Idempotency-Key": "http-e2e"})
        assert submitted.status_code == 202, submitted.text
        job_id = submitted.json()["id"]
        state = _wait(lambda: (s := client.get(f"/v1/jobs/{job_id}").json()["state"]) in TERMINAL_STATES and s,
                      f"job {job_id} over HTTP", worker)
        assert state == SUCCEEDED, worker.tail()
        metrics = client.get(f"/v1/jobs/{job_id}/metrics", params={"format": "csv"})
        assert metrics.status_code == 200
        rows = sorted(_csv_row(row) for row in csv.DictReader(metrics.text.splitlines()))
    assert rows == embedded_rows


def test_c_a_task_delivered_several_times_runs_once(service, worker, cropped_ct, embedded_rows):
    from dosebench.core.celery_app import app, enqueue

    # a second worker, so that duplicates really arrive at two processes at once
    extra = Worker(service)
    try:
        _wait(lambda: " ready." in extra.log.read_text(errors="replace"), "the second worker", extra, every=0.2)
        job_id = _submit(service, cropped_ct, enqueue=False)
        stages = _stages(service, job_id)
        acquire = stages[("acquire", None)]
        assert enqueue([acquire] * 3) == [acquire.id] * 3  # the same task, three times
        for dose in DOSES:  # and premature ones: not claimable until their dependencies succeeded
            app.send_task("dosebench.segment", args=[stages[("segment", dose)].id])
        job = _wait_terminal(service, job_id, worker)
        assert job.state == SUCCEEDED, (job.error, worker.tail(), extra.tail())
    finally:
        extra.stop()
    logs = worker.log.read_text(errors="replace") + extra.log.read_text(errors="replace")
    assert logs.count(f"stage {acquire.id} (acquire) attempt 1 succeeded") == 1
    assert logs.count(f"stage {acquire.id} is not claimable") == 2
    stages = _stages(service, job_id)
    assert {s.attempt for s in stages.values()} == {1}
    acquire_dir = service["storage"] / "jobs" / job_id / "acquire" / "all"
    assert sorted(p.name for p in acquire_dir.iterdir()) == ["attempt-1"]
    with session_factory(service["settings"].database_url)() as session:
        acquire_artifacts = session.scalars(select(Artifact).where(
            Artifact.stage_id == stages[("acquire", None)].id)).all()
        assert [(a.attempt, a.name) for a in acquire_artifacts] == [(1, "counts")]
    assert _db_rows(service, job_id) == embedded_rows


def test_d_cancel_mid_run_starts_nothing_further(service, worker, cropped_ct, embedded_rows):
    job_id = _submit(service, cropped_ct)
    running = _wait(lambda: _running_stage(service, job_id), "a running stage", worker)
    with session_factory(service["settings"].database_url)() as session:
        jobs.request_cancel(session, job_id)
    started = {key for key, s in _stages(service, job_id).items() if s.attempt > 0}
    job = _wait_terminal(service, job_id, worker)
    assert job.state == CANCELLED and job.cancel_requested, (job.error, worker.tail())
    time.sleep(1.0)  # nothing may start afterwards either
    stages = _stages(service, job_id)
    assert {key for key, s in stages.items() if s.attempt > 0} == started
    assert (running.name, running.dose) in started
    assert all(s.state in (SUCCEEDED, CANCELLED) for s in stages.values())
    assert _job(service, job_id).state == CANCELLED

    # retry: the cancelled stages run again (new attempts) and the job succeeds
    from dosebench.core.celery_app import enqueue_ready

    with session_factory(service["settings"].database_url)() as session:
        assert jobs.retry_job(session, job_id).state in ("queued", RUNNING)
    assert enqueue_ready(job_id, service["settings"])
    job = _wait_terminal(service, job_id, worker)
    assert job.state == SUCCEEDED, (job.error, worker.tail())
    assert _db_rows(service, job_id) == embedded_rows


def test_d_retry_of_a_failed_job_succeeds_with_a_new_attempt(service, worker, cropped_ct, embedded_rows,
                                                            tmp_path):
    missing = tmp_path / cropped_ct.name  # the same file name: the same study name in the metrics
    job_id = _submit(service, missing)
    job = _wait_terminal(service, job_id, worker)
    assert job.state == FAILED and job.error.startswith("acquire failed: "), job.error
    assert str(missing.name) in job.error
    shutil.copy(cropped_ct, missing)
    from dosebench.core.celery_app import enqueue_ready

    with session_factory(service["settings"].database_url)() as session:
        jobs.retry_job(session, job_id)
    assert enqueue_ready(job_id, service["settings"])
    job = _wait_terminal(service, job_id, worker)
    assert job.state == SUCCEEDED, (job.error, worker.tail())
    stages = _stages(service, job_id)
    assert stages[("acquire", None)].attempt == 2
    assert "/attempt-2/" in _artifact_uri(service, stages[("acquire", None)])
    assert _db_rows(service, job_id) == embedded_rows


def _artifact_uri(service: dict, stage: Stage) -> str:
    with session_factory(service["settings"].database_url)() as session:
        return jobs.published_artifacts(session, stage)["counts"]


def test_b_sigkill_mid_stage_is_reaped_and_the_job_still_succeeds(service, worker, cropped_ct, embedded_rows):
    worker.stop()  # this test runs its own workers
    job_id = _submit(service, cropped_ct)
    first = Worker(service)
    try:
        victim = _wait(lambda: _running_stage(service, job_id), "a running stage", first, every=0.02)
    finally:
        first.kill(signal.SIGKILL)
    stage = _stages(service, job_id)[(victim.name, victim.dose)]
    if stage.state != RUNNING:
        pytest.fail(f"the stage finished before SIGKILL arrived ({stage.state}); cannot test the reaper")
    assert _job(service, job_id).state == RUNNING
    # a fresh worker with the periodic reaper (beat): the stale stage is re-queued and re-sent
    second = Worker(service, "--beat")
    try:
        job = _wait_terminal(service, job_id, second)
        assert job.state == SUCCEEDED, (job.error, second.tail())
        stage = _stages(service, job_id)[(victim.name, victim.dose)]
        assert stage.attempt == victim.attempt + 1 and stage.state == SUCCEEDED
        assert _db_rows(service, job_id) == embedded_rows
    finally:
        second.stop()


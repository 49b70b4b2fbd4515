"""The job state machine (dosebench.core.jobs) on SQLite and PostgreSQL: dependency order, idempotency,
the claim race, heartbeats, publishing, failure, cancel, retry and the reaper."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import delete, select, update

from dosebench.core import jobs
from dosebench.core.db import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Artifact,
    Base,
    Job,
    Metric,
    Stage,
    Study,
    make_engine,
    session_factory,
    upgrade_database,
    utcnow,
)
from dosebench.core.protocol import load_protocol
from dosebench.stages import JobSpec


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request, tmp_path_factory) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'jobs.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    upgrade_database(url)
    upgrade_database(url)  # idempotent
    yield url
    # leave nothing behind for the worker tests sharing the PostgreSQL database (their reaper would
    # send these jobs' stages)
    with session_factory(url)() as session:
        for model in (Metric, Artifact, Stage, Job, Study):
            session.execute(delete(model))
        session.commit()


@pytest.fixture
def session(db_url):
    with session_factory(db_url)() as session:
        yield session


def _spec(doses=(0.5, 1.0)) -> JobSpec:
    return JobSpec(input_url="file:///nowhere/ct.nii.gz", doses=list(doses), protocol=load_protocol("tiny"),
                   seed=7)


def _job(session, doses=(0.5, 1.0), key=None) -> Job:
    study = jobs.add_study(session, name="ct", input_uri="file:///nowhere/ct.nii.gz", kind="nifti",
                           checksum="0" * 64, bytes=1, header_summary={"shape": [1, 1, 1]})
    return jobs.create_job(session, study, _spec(doses), "tester", idempotency_key=key)


def _names(stages) -> list[tuple[str, float | None]]:
    return sorted((s.name, s.dose) for s in stages)


def _run(session, stage: Stage, tmp_path: Path) -> list[Stage]:
    claimed = jobs.claim_stage(session, stage.id, "w1")
    assert claimed is not None
    out = tmp_path / f"{stage.id}-{claimed.attempt}.txt"
    out.write_text(f"{stage.name} {stage.dose}")
    return jobs.complete_stage(session, stage.id, claimed.attempt, {"out": str(out)})


def test_migrations_match_the_models(db_url) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(db_url)
    with engine.connect() as connection:
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    engine.dispose()


def test_stages_run_in_dependency_order(session, tmp_path) -> None:
    job = _job(session)
    assert job.state == QUEUED and job.doses == [1.0, 0.5]
    assert _names(job.stages) == sorted([("acquire", None), ("evaluate", None)] + [
        (n, d) for n in ("simulate", "reconstruct", "segment") for d in (0.5, 1.0)])
    ready = jobs.ready_stages(session, job.id)
    assert _names(ready) == [("acquire", None)]
    # nothing else can be claimed before its dependencies succeed
    evaluate = next(s for s in job.stages if s.name == "evaluate")
    assert jobs.claim_stage(session, evaluate.id, "w1") is None

    ready = _run(session, ready[0], tmp_path)
    assert _names(ready) == [("simulate", 0.5), ("simulate", 1.0)]
    assert session.get(Job, job.id, populate_existing=True).state == RUNNING
    by = {(s.name, s.dose): s for s in job.stages}
    assert _names(_run(session, by[("simulate", 0.5)], tmp_path)) == [("reconstruct", 0.5)]
    assert _names(_run(session, by[("reconstruct", 0.5)], tmp_path)) == [("segment", 0.5)]
    assert _run(session, by[("segment", 0.5)], tmp_path) == []  # evaluate waits for every dose
    for name in ("simulate", "reconstruct"):
        _run(session, by[(name, 1.0)], tmp_path)
    assert _names(_run(session, by[("segment", 1.0)], tmp_path)) == [("evaluate", None)]
    assert _run(session, by[("evaluate", None)], tmp_path) == []
    job = session.get(Job, job.id, populate_existing=True)
    assert job.state == SUCCEEDED and job.finished_at is not None and job.started_at <= job.finished_at
    artifact = session.scalars(select(Artifact).where(Artifact.stage_id == by[("acquire", None)].id)).one()
    assert artifact.attempt == 1 and artifact.bytes == len("acquire None") and len(artifact.checksum) == 64
    assert jobs.published_artifacts(session, by[("acquire", None)]) == {"out": artifact.uri}


def test_idempotency_key_returns_the_existing_job(session) -> None:
    first = _job(session, key="key-1")
    again = _job(session, key="key-1")
    assert again.id == first.id
    assert _job(session, key="key-2").id != first.id
    assert _job(session).id != _job(session).id  # no key: always a new job


def test_claim_race_exactly_one_winner(db_url) -> None:
    factory = session_factory(db_url)
    with factory() as session:
        job = _job(session)
        acquire = jobs.ready_stages(session, job.id)[0]
    barrier = threading.Barrier(4)
    results: list = []

    def claim(worker: str) -> None:
        with factory() as own:
            barrier.wait()
            claimed = jobs.claim_stage(own, acquire.id, worker)
            results.append(claimed.worker if claimed else None)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(r is not None for r in results) == 1
    with factory() as session:
        stage = session.get(Stage, acquire.id)
        assert stage.state == RUNNING and stage.attempt == 1 and stage.worker in results


def test_only_the_owning_attempt_heartbeats_and_publishes(session, tmp_path) -> None:
    job = _job(session)
    acquire = jobs.ready_stages(session, job.id)[0]
    claimed = jobs.claim_stage(session, acquire.id, "w1")
    assert jobs.heartbeat(session, acquire.id, claimed.attempt, 0.5)
    assert not jobs.heartbeat(session, acquire.id, claimed.attempt + 1, 0.5)
    assert session.get(Stage, acquire.id, populate_existing=True).progress == 0.5
    # the reaper re-queues it (stale heartbeat), a second worker claims attempt 2
    session.execute(update(Stage).where(Stage.id == acquire.id).values(heartbeat_at=utcnow() - timedelta(hours=1)))
    session.commit()
    # the database is shared by the module's tests: look at this job's stages only
    assert [s.id for s in jobs.reap_stale(session, 60, 3) if s.job_id == job.id] == [acquire.id]
    second = jobs.claim_stage(session, acquire.id, "w2")
    assert second.attempt == 2
    (tmp_path / "a").write_text("old")
    assert jobs.complete_stage(session, acquire.id, 1, {"counts": str(tmp_path / "a")}) == []  # the lost one
    assert not jobs.fail_stage(session, acquire.id, 1, "late failure")
    stage = session.get(Stage, acquire.id, populate_existing=True)
    assert stage.state == RUNNING and stage.attempt == 2
    assert session.scalars(select(Artifact).where(Artifact.stage_id == acquire.id)).all() == []
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "block.npy").write_bytes(b"12345")
    assert len(jobs.complete_stage(session, acquire.id, 2, {"counts": str(tmp_path / "b")})) == 2
    artifact = session.scalars(select(Artifact).where(Artifact.stage_id == acquire.id)).one()
    assert (artifact.attempt, artifact.bytes) == (2, 5)


def test_reaper_fails_the_stage_once_attempts_are_spent(session) -> None:
    job = _job(session)
    acquire = jobs.ready_stages(session, job.id)[0]
    for attempt in (1, 2):
        assert jobs.claim_stage(session, acquire.id, f"w{attempt}").attempt == attempt
        session.execute(update(Stage).where(Stage.id == acquire.id)
                        .values(heartbeat_at=utcnow() - timedelta(minutes=5)))
        session.commit()
        requeued = jobs.reap_stale(session, 60, max_attempts=2)
        assert [s.id for s in requeued if s.job_id == job.id] == ([acquire.id] if attempt == 1 else [])
    stage = session.get(Stage, acquire.id, populate_existing=True)
    assert stage.state == FAILED
    assert "lost on attempt 2" in stage.error and "giving up after 2 of 2 attempts" in stage.error
    job = session.get(Job, job.id, populate_existing=True)
    assert job.state == FAILED and "acquire failed: worker w2 lost" in job.error
    assert jobs.ready_stages(session, job.id) == []


def test_fresh_heartbeats_are_not_reaped(session) -> None:
    job = _job(session)
    acquire = jobs.ready_stages(session, job.id)[0]
    jobs.claim_stage(session, acquire.id, "w1")
    assert acquire.id not in {s.id for s in jobs.reap_stale(session, 60, 3)}
    assert session.get(Stage, acquire.id, populate_existing=True).state == RUNNING


def test_failure_then_retry_counts_attempts(session, tmp_path) -> None:
    job = _job(session)
    acquire = jobs.ready_stages(session, job.id)[0]
    claimed = jobs.claim_stage(session, acquire.id, "w1")
    assert jobs.fail_stage(session, acquire.id, claimed.attempt, "InputError: no such file")
    job = session.get(Job, job.id, populate_existing=True)
    assert job.state == FAILED and job.error == "acquire failed: InputError: no such file"
    assert job.finished_at is not None
    with pytest.raises(jobs.JobStateError):
        jobs.retry_job(session, _job(session).id)  # a queued job cannot be retried
    job = jobs.retry_job(session, job.id)
    assert job.state == QUEUED and job.error is None and job.finished_at is None
    assert [s.id for s in jobs.ready_stages(session, job.id)] == [acquire.id]
    assert jobs.claim_stage(session, acquire.id, "w1").attempt == 2


def test_cancel_stops_queued_stages_and_the_running_one_finishes_cancelled(session, tmp_path) -> None:
    job = _job(session)
    acquire = jobs.ready_stages(session, job.id)[0]
    claimed = jobs.claim_stage(session, acquire.id, "w1")
    before = session.get(Job, job.id, populate_existing=True).updated_at
    job = jobs.request_cancel(session, job.id)
    assert job.state == RUNNING and job.cancel_requested and job.updated_at >= before
    assert jobs.is_cancel_requested(session, job.id)
    states = {s.name for s in jobs._stages(session, job.id) if s.state == CANCELLED}
    assert states == {"simulate", "reconstruct", "segment", "evaluate"}
    assert jobs.cancel_stage(session, acquire.id, claimed.attempt)
    job = session.get(Job, job.id, populate_existing=True)
    assert job.state == CANCELLED and job.finished_at is not None
    assert jobs.ready_stages(session, job.id) == []
    job = jobs.retry_job(session, job.id)
    assert not job.cancel_requested and job.state == QUEUED
    assert jobs.claim_stage(session, acquire.id, "w1").attempt == 2


def test_record_metrics_stores_infinite_hd95_as_null(session) -> None:
    job = _job(session)
    text = ("study,dose,reference,group,label,label_id,dice,reference_voxels,test_voxels,volume_change_ml,"
            "surface_dice,hd95_mm\n"
            "ct,0.50,full_dose,tissue,body,1,0.99743,4084,4087,0.081,0.997415,0.0\n"
            "ct,0.50,full_dose,tissue,bone,5,0.0,0,12,0.324,0.0,inf\n")
    assert jobs.record_metrics(session, job.id, text) == 2
    assert jobs.record_metrics(session, job.id, text) == 2  # replaces, never duplicates
    rows = session.scalars(select(Metric).where(Metric.job_id == job.id).order_by(Metric.label_id)).all()
    assert [(r.dose, r.label, r.dice, r.hd95_mm) for r in rows] == [(0.5, "body", 0.99743, 0.0),
                                                                   (0.5, "bone", 0.0, None)]


def test_reaper_resends_ready_stages_of_quiet_jobs(session) -> None:
    """A task message lost between publishing a stage and sending the next (or between create_job and
    enqueue_ready) is sent again once the job has been quiet for stale_after_s - once per period."""
    job = _job(session)
    acquire = jobs.ready_stages(session, job.id)[0]
    assert acquire.id not in {s.id for s in jobs.reap_stale(session, 60, 3)}  # fresh: left alone
    session.execute(update(Job).where(Job.id == job.id).values(updated_at=utcnow() - timedelta(minutes=5)))
    session.commit()
    assert acquire.id in {s.id for s in jobs.reap_stale(session, 60, 3)}
    assert acquire.id not in {s.id for s in jobs.reap_stale(session, 60, 3)}  # the job was touched
    cancelled = _job(session)
    jobs.request_cancel(session, cancelled.id)
    session.execute(update(Job).where(Job.id == cancelled.id).values(updated_at=utcnow() - timedelta(minutes=5)))
    session.commit()
    assert not {s.job_id for s in jobs.reap_stale(session, 60, 3)} & {cancelled.id}


def test_a_failed_stage_stops_the_other_dose_chains(session, tmp_path) -> None:
    job = _job(session)
    _run(session, jobs.ready_stages(session, job.id)[0], tmp_path)
    by = {(s.name, s.dose): s for s in jobs._stages(session, job.id)}
    low = jobs.claim_stage(session, by[("simulate", 0.5)].id, "w1")
    full = jobs.claim_stage(session, by[("simulate", 1.0)].id, "w2")
    assert jobs.fail_stage(session, low.id, low.attempt, "RuntimeError: boom")
    assert session.get(Job, job.id, populate_existing=True).state == RUNNING  # simulate 1.0 still runs
    (tmp_path / "li").write_text("x")
    assert jobs.complete_stage(session, full.id, full.attempt, {"line_integrals": str(tmp_path / "li")}) == []
    job = session.get(Job, job.id, populate_existing=True)
    assert job.state == FAILED and job.error == "simulate (dose 0.5) failed: RuntimeError: boom"
    assert jobs.claim_stage(session, by[("reconstruct", 1.0)].id, "w1") is None

"""Cohorts and evaluation runs without workers: Table 1 over a cohort from Metric rows (counts of studies
and labels, failed studies reported), regressions against the previous run, concurrent finalisers, the
webhook, the migration on SQLite and PostgreSQL, the REST endpoints and the CLI."""

from __future__ import annotations

import csv
import http.server
import importlib.util
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from dosebench.core import cohorts, jobs
from dosebench.core.cohorts import EvaluationRequest
from dosebench.core.db import (
    CANCELLED,
    FAILED,
    FINISHED,
    RUNNING,
    SUCCEEDED,
    Base,
    EvaluationJob,
    EvaluationRun,
    Job,
    make_engine,
    session_factory,
    upgrade_database,
)
from dosebench.core.errors import InputError

REQUEST = EvaluationRequest(protocol="tiny", doses=(0.5, 1.0), segmenter="threshold", seed=7)
LABELS = [("tissue", "fat", 3), ("tissue", "bone", 5), ("air", "lung", 2)]


@pytest.fixture
def database(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_database(url)
    return url


@pytest.fixture
def storage(tmp_path) -> str:
    (tmp_path / "storage").mkdir()
    return f"file://{tmp_path / 'storage'}"


def _studies(session, n: int) -> list[str]:
    ids = []
    for i in range(n):
        study = jobs.add_study(session, name=f"s{i}", input_uri=f"file:///nowhere/s{i}.nii.gz", kind="nifti",
                               checksum="0" * 64, bytes=1, header_summary={})
        ids.append(study.id)
    return ids


def _per_label_csv(dice_by_label: dict[str, float]) -> str:
    """A job's per_label.csv: Dice 1 at the full dose, the given Dice at dose 0.5."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["study", "dose", "reference", "group", "label", "label_id", "dice", "reference_voxels",
                     "test_voxels", "volume_change_ml", "surface_dice", "hd95_mm"])
    for dose in (0.5, 1.0):
        for group, label, label_id in LABELS:
            value = dice_by_label[label] if dose == 0.5 else 1.0
            writer.writerow(["x", dose, "full_dose", group, label, label_id, value, 100, 100, 0.0, 1.0, 0.0])
    return out.getvalue()


def _finish_job(session, job_id: str, state: str, dice_by_label: dict[str, float] | None = None,
                error: str | None = None) -> None:
    if dice_by_label is not None:
        jobs.record_metrics(session, job_id, _per_label_csv(dice_by_label))
    job = session.get(Job, job_id)
    job.state, job.error = state, error
    session.commit()


def _run_jobs(session, run_id: str) -> dict[str, str]:
    """study id -> job id of a run."""
    return dict(session.execute(select(EvaluationJob.study_id, EvaluationJob.job_id)
                                .where(EvaluationJob.run_id == run_id)).all())


def test_a_run_aggregates_table1_over_the_cohort_counts_studies_and_labels_and_reports_failures(database, storage):
    sent: list[str] = []
    with session_factory(database)() as session:
        study_ids = _studies(session, 4)
        cohort = cohorts.create_cohort(session, "four", study_ids)
        run, created = cohorts.start_run(session, cohort, REQUEST, sent.append)
        assert created and run.state == RUNNING and run.doses == [1.0, 0.5]
        by_study = _run_jobs(session, run.id)
        assert sorted(by_study) == sorted(study_ids) and sorted(sent) == sorted(by_study.values())
        # same spec as POST /v1/jobs would make, one job per study
        assert {session.get(Job, j).segmenter for j in sent} == {"threshold"}

        values = [{"fat": 0.90, "bone": 0.80, "lung": 0.70},
                  {"fat": 0.80, "bone": 0.60, "lung": 0.50},
                  {"fat": 0.95, "bone": 0.95, "lung": 0.95}]
        for study, dice in zip(study_ids[:3], values, strict=True):
            _finish_job(session, by_study[study], SUCCEEDED, dice)
        assert cohorts.advance_run(session, run.id, storage).state == RUNNING  # one job still queued
        _finish_job(session, by_study[study_ids[3]], FAILED, error="SimulateError: detector on fire")
        run = cohorts.advance_run(session, run.id, storage)

    assert run.state == FINISHED and run.finished_at is not None
    full = run.table1["full_dose"]
    # per study: mean Dice of a group's labels; then median and MAD over the three studies that succeeded
    tissue = [(0.90 + 0.80) / 2, (0.80 + 0.60) / 2, (0.95 + 0.95) / 2]  # 0.85, 0.70, 0.95
    pooled = [(0.9 + 0.8 + 0.7) / 3, (0.8 + 0.6 + 0.5) / 3, 0.95]  # 0.8, 0.6333, 0.95
    for group, scores in (("tissue", tissue), ("air", [0.70, 0.50, 0.95]), ("all", pooled)):
        median = float(np.median(scores))
        assert full[group]["0.50"]["median"] == pytest.approx(median, abs=1e-12)
        assert full[group]["0.50"]["mad"] == pytest.approx(float(np.median(np.abs(np.array(scores) - median))),
                                                            abs=1e-12)
        assert full[group]["0.50"]["n"] == 3 and full[group]["1.00"] == {"median": 1.0, "mad": 0.0, "n": 3}
    assert run.counts["studies"] == 4 and run.counts["succeeded"] == 3 and run.counts["failed"] == 1
    assert run.counts["studies_with_metrics"] == 3
    assert run.counts["labels"] == 3 and run.counts["labels_per_group"] == {"air": 1, "tissue": 2}
    [failed] = run.counts["failed_studies"]
    assert failed["study_id"] == study_ids[3] and failed["state"] == FAILED and "on fire" in failed["error"]
    # a failed study is a regression even with nothing to compare with
    assert run.regression is True and run.previous_run_id is None
    assert run.reasons == ["study s3 failed: SimulateError: detector on fire"]
    assert cohorts.exit_code(run) == 1
    assert run.versions["weights"] == {} and run.versions["protocol"]["name"] == "tiny"
    assert len(run.versions["protocol"]["sha256"]) == 64 and run.versions["dosebench"]

    folder = Path(run.report_uri.removeprefix("file://"))
    assert folder == Path(storage.removeprefix("file://")) / "evaluations" / run.id
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["table1"] == run.table1 and summary["counts"] == run.counts and summary["regression"] is True
    rows = list(csv.DictReader((folder / "per_study.csv").open()))
    tissue_rows = {r["study_id"]: float(r["mean_dice"]) for r in rows if r["group"] == "tissue" and r["dose"] == "0.50"}
    assert tissue_rows == pytest.approx(dict(zip(study_ids[:3], tissue, strict=True)), abs=1e-12)
    assert [r["job_state"] for r in rows if r["study_id"] == study_ids[3]] == [FAILED]
    report = (folder / "report.md").read_text()
    assert "| **all** |" in report and "Regression" in report and "detector on fire" in report
    if importlib.util.find_spec("dosebench.reports") is not None:  # the report helpers, where installed
        assert (folder / "dice_vs_dose.png").read_bytes().startswith(b"\x89PNG")
        assert "<table" in (folder / "report.html").read_text() and "dice_vs_dose.png" in report


def test_an_all_terminal_check_waits_for_every_study_and_cancelled_jobs_end_the_run(database, storage):
    with session_factory(database)() as session:
        cohort = cohorts.create_cohort(session, "two", _studies(session, 2))
        run, _ = cohorts.start_run(session, cohort, REQUEST, lambda job_id: None)
        by_study = _run_jobs(session, run.id)
        first, second = sorted(by_study.values())
        _finish_job(session, first, CANCELLED)
        assert cohorts.advance_run(session, run.id, storage).state == RUNNING
        _finish_job(session, second, CANCELLED)
        run = cohorts.advance_run(session, run.id, storage)
    assert run.state == FINISHED and run.table1 == {} and run.counts["failed"] == 2 and run.regression is True


def test_a_drop_beyond_the_threshold_is_a_regression_and_an_identical_rerun_is_not(database, storage):
    good = {"fat": 0.90, "bone": 0.80, "lung": 0.70}
    worse = {"fat": 0.90 - 0.012, "bone": 0.80, "lung": 0.70 - 0.004}  # tissue median -0.006, air -0.004

    def evaluate(session, cohort, dice):
        run, _ = cohorts.start_run(session, cohort, REQUEST, lambda job_id: None)
        for job_id in _run_jobs(session, run.id).values():
            _finish_job(session, job_id, SUCCEEDED, dice)
        return cohorts.advance_run(session, run.id, storage)

    with session_factory(database)() as session:
        cohort = cohorts.create_cohort(session, "c", _studies(session, 3))
        first = evaluate(session, cohort, good)
        second = evaluate(session, cohort, worse)
        third = evaluate(session, cohort, worse)
        other = cohorts.start_run(session, cohort, EvaluationRequest(protocol="tiny", doses=(0.5, 1.0),
                                                                     segmenter="threshold?min_component_ml=0"),
                                  lambda job_id: None)[0]
    assert first.regression is False and first.reasons == [] and cohorts.exit_code(first) == 0
    assert second.regression is True and second.previous_run_id == first.id
    # threshold 0.005: tissue dropped by 0.006 (a regression), air by 0.004 (not), all by 0.016/3
    assert len(second.reasons) == 2, second.reasons
    assert second.reasons[0].startswith("all at dose 0.50") and second.reasons[1].startswith("tissue at dose 0.50")
    assert third.regression is False and third.previous_run_id == second.id and cohorts.exit_code(third) == 0
    assert other.segmenter == "threshold?min_component_ml=0"


def test_two_finalisers_at_once_publish_once(database, storage):
    with session_factory(database)() as session:
        cohort = cohorts.create_cohort(session, "c", _studies(session, 2))
        run, _ = cohorts.start_run(session, cohort, REQUEST, lambda job_id: None)
        for job_id in _run_jobs(session, run.id).values():
            _finish_job(session, job_id, SUCCEEDED, {"fat": 0.9, "bone": 0.9, "lung": 0.9})
    results: list[bool] = []
    barrier = threading.Barrier(2)

    def finalise() -> None:
        with session_factory(database)() as session:
            found = session.get(EvaluationRun, run.id)
            barrier.wait()
            results.append(cohorts.finalise_run(session, found, storage))

    threads = [threading.Thread(target=finalise) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False, True]


class _Hook(http.server.BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append({"content_type": self.headers["Content-Type"], "body": json.loads(body)})
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_the_webhook_receives_the_result_and_a_dead_one_is_recorded_not_fatal(database, storage):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Hook.received = []
    url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    try:
        with session_factory(database)() as session:
            cohort = cohorts.create_cohort(session, "c", _studies(session, 1))
            request = EvaluationRequest(protocol="tiny", doses=(0.5,), webhook_url=url)
            run, _ = cohorts.start_run(session, cohort, request, lambda job_id: None)
            _finish_job(session, next(iter(_run_jobs(session, run.id).values())), FAILED, error="boom")
            run = cohorts.advance_run(session, run.id, storage, webhook_timeout_s=5)
            assert run.webhook_status == "HTTP 204"
            [hook] = _Hook.received
            assert hook["content_type"] == "application/json"
            assert hook["body"]["id"] == run.id and hook["body"]["regression"] is True
            assert hook["body"]["reasons"] == ["study s0 failed: boom"]

            dead = EvaluationRequest(protocol="tiny", doses=(0.5,), webhook_url="http://127.0.0.1:9/nothing-here")
            run, _ = cohorts.start_run(session, cohort, dead, lambda job_id: None)
            _finish_job(session, next(iter(_run_jobs(session, run.id).values())), SUCCEEDED,
                        {"fat": 1.0, "bone": 1.0, "lung": 1.0})
            run = cohorts.advance_run(session, run.id, storage, webhook_timeout_s=2)
        assert run.state == FINISHED and run.webhook_status.startswith("failed: ")
    finally:
        server.shutdown()


def test_cohorts_refuse_unknown_studies_duplicate_names_and_bad_requests(database):
    with session_factory(database)() as session:
        [study] = _studies(session, 1)
        with pytest.raises(cohorts.CohortError):
            cohorts.create_cohort(session, "c", [study, "missing"])
        cohort = cohorts.create_cohort(session, "c", [study])
        with pytest.raises(InputError):
            cohorts.create_cohort(session, "c", [])
        assert cohorts.add_studies(session, cohort, [study]) == []
        assert cohorts.find_cohort(session, cohort.id).name == "c"
        for bad in (EvaluationRequest(protocol="nope"), EvaluationRequest(segmenter="threshold?speckle=1"),
                    EvaluationRequest(doses=(1.5,)), EvaluationRequest(segmenter="magic")):
            with pytest.raises(InputError):
                cohorts.start_run(session, cohort, bad, lambda job_id: None)
        empty = cohorts.create_cohort(session, "empty", [])
        with pytest.raises(InputError, match="no studies"):
            cohorts.start_run(session, empty, REQUEST, lambda job_id: None)


def test_protocol_digest_is_of_the_canonical_json():
    from dosebench.core.protocol import load_protocol

    tiny, demo = load_protocol("tiny"), load_protocol("demo")
    assert cohorts.protocol_sha256(tiny) == cohorts.protocol_sha256(load_protocol("tiny"))
    assert cohorts.protocol_sha256(tiny) != cohorts.protocol_sha256(demo)
    changed = tiny.model_copy(update={"name": "tiny2"})
    assert cohorts.protocol_sha256(changed) != cohorts.protocol_sha256(tiny)


def test_weight_checksums_of_an_nnunet_folder_and_none_for_threshold(tmp_path):
    import hashlib

    assert cohorts.weight_checksums("threshold") == {}
    assert cohorts.weight_checksums("threshold?min_component_ml=0") == {}
    folder = tmp_path / "model"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"weights")
    (folder / "plans.json").write_text("{}")
    (folder / "notes.txt").write_text("not a weight file")
    found = cohorts.weight_checksums(f"nnunet:{folder}")
    assert found["files"] == {"fold_0/checkpoint_final.pth": hashlib.sha256(b"weights").hexdigest(),
                              "plans.json": hashlib.sha256(b"{}").hexdigest()}
    assert "error" in cohorts.weight_checksums(f"nnunet:{tmp_path / 'absent'}")


# -- the migration ---------------------------------------------------------------------------------------

def _assert_schema_matches_models(url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    finally:
        engine.dispose()


def test_the_migration_upgrades_a_fresh_sqlite_database_and_downgrades(tmp_path):
    from alembic import command

    from dosebench.core.db import alembic_config

    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade_database(url)
    _assert_schema_matches_models(url)
    command.downgrade(alembic_config(url), "0001")
    upgrade_database(url)
    _assert_schema_matches_models(url)


def test_the_migration_upgrades_postgresql_and_the_run_constraint_holds(postgres_url):
    from datetime import UTC, datetime

    from sqlalchemy.exc import IntegrityError

    from dosebench.core import schedules

    upgrade_database(postgres_url)
    _assert_schema_matches_models(postgres_url)
    with session_factory(postgres_url)() as session:
        cohort = cohorts.create_cohort(session, "pg-constraint", _studies(session, 1))
        schedule = schedules.create_schedule(session, cohort, "0 2 * * *", REQUEST)
        fire_time = datetime(2030, 1, 1, 2, tzinfo=UTC)
        for _ in range(2):
            session.add(EvaluationRun(cohort_id=cohort.id, schedule_id=schedule.id, fire_time=fire_time,
                                      protocol_name="tiny", protocol_sha256="0" * 64, doses=[1.0], doses_key="1.00",
                                      segmenter="threshold", seed=7, study_ids=[], regression_threshold=0.005,
                                      reasons=[], table1={}, counts={}, versions={}))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        # the database is shared by the session's other tests: leave no enabled schedule behind
        schedules.update_schedule(session, schedule.id, enabled=False)


# -- the threshold option ----------------------------------------------------------------------------------

def test_the_threshold_spec_option_keeps_small_components_and_is_recorded():
    from dosebench.segmenter.backends import make_segmenter, parse_threshold_spec
    from dosebench.segmenter.threshold import BODY, FAT

    assert parse_threshold_spec("threshold") == {"min_component_ml": 0.5}
    assert parse_threshold_spec("threshold?min_component_ml=0") == {"min_component_ml": 0.0}
    assert parse_threshold_spec("totalsegmentator") is None
    for bad in ("threshold?min_component_ml=-1", "threshold?min_component_ml=x", "threshold?other=1",
                "threshold?min_component_ml=1&min_component_ml=2"):
        with pytest.raises(InputError):
            parse_threshold_spec(bad)
    # a soft-tissue block holding one fat voxel; 2 mm voxels are 0.008 ml, so that speck is far under the
    # default 0.5 ml and becomes body, while min_component_ml=0 keeps it
    hu = np.full((20, 20, 20), -1000.0, dtype=np.float32)
    hu[3:17, 3:17, 3:17] = 40.0
    hu[10, 10, 10] = -100.0
    spacing = (2.0, 2.0, 2.0)
    default = make_segmenter("threshold")
    kept = make_segmenter("threshold?min_component_ml=0")
    assert default.segment(hu, spacing).labels[10, 10, 10] == BODY
    assert kept.segment(hu, spacing).labels[10, 10, 10] == FAT
    assert default.provenance["min_component_ml"] == 0.5 and default.provenance["small_component_cleanup"]
    assert kept.provenance["min_component_ml"] == 0.0 and not kept.provenance["small_component_cleanup"]
    assert kept.spec == "threshold?min_component_ml=0"


# -- REST ----------------------------------------------------------------------------------------------------

def test_the_rest_endpoints_create_cohorts_runs_and_schedules(tmp_path):
    from fastapi.testclient import TestClient

    from dosebench.api.app import create_app
    from dosebench.api.tokens import create_token
    from dosebench.core.settings import Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'api.db'}", storage_url=f"file://{tmp_path / 'store'}",
                        broker_url="memory://")
    upgrade_database(settings.database_url)
    token = create_token(settings.database_url, "tests")
    sent: list[str] = []
    client = TestClient(create_app(settings, enqueue=sent.append))
    auth = {"Authorization": f"Bearer {token}"}
    with session_factory(settings.database_url)() as session:
        study_ids = _studies(session, 3)

    assert client.post("/v1/cohorts", json={"name": "c", "study_ids": study_ids[:2]}).status_code == 401
    created = client.post("/v1/cohorts", json={"name": "c", "study_ids": study_ids[:2]}, headers=auth)
    assert created.status_code == 201 and len(created.json()["studies"]) == 2
    assert client.post("/v1/cohorts", json={"name": "d", "study_ids": ["nope"]}, headers=auth).status_code == 404
    added = client.post("/v1/cohorts/c/studies", json={"study_ids": [study_ids[2]]}, headers=auth).json()
    assert added["added"] == [study_ids[2]] and len(added["studies"]) == 3
    assert [c["studies"] for c in client.get("/v1/cohorts", headers=auth).json()["cohorts"]] == [3]
    assert client.get(f"/v1/cohorts/{created.json()['id']}", headers=auth).json()["name"] == "c"
    assert client.get("/v1/cohorts/zzz", headers=auth).status_code == 404

    bad = client.post("/v1/evaluations", json={"cohort": "c", "segmenter": "magic"}, headers=auth)
    assert bad.status_code == 422
    started = client.post("/v1/evaluations", json={"cohort": "c", "doses": [0.5], "protocol": "tiny"}, headers=auth)
    assert started.status_code == 202
    run = started.json()
    assert run["state"] == RUNNING and sorted(run["study_ids"]) == sorted(study_ids) and len(sent) == 3
    assert client.get(f"/v1/evaluations/{run['id']}", headers=auth).json()["state"] == RUNNING
    with session_factory(settings.database_url)() as session:
        for job_id in _run_jobs(session, run["id"]).values():
            _finish_job(session, job_id, SUCCEEDED, {"fat": 0.9, "bone": 0.9, "lung": 0.9})
    finished = client.get(f"/v1/evaluations/{run['id']}", headers=auth).json()  # the GET finalises it
    assert finished["state"] == FINISHED and finished["regression"] is False
    assert finished["table1"]["full_dose"]["all"]["0.50"] == {"median": pytest.approx(0.9), "mad": 0.0, "n": 3}
    listed = client.get("/v1/evaluations", params={"cohort": "c"}, headers=auth).json()
    assert listed["total"] == 1 and listed["evaluations"][0]["id"] == run["id"]
    assert client.get("/v1/evaluations/nope", headers=auth).status_code == 404

    schedule = client.post("/v1/schedules", json={"cohort": "c", "cron": "0 2 * * *", "protocol": "tiny"},
                           headers=auth)
    assert schedule.status_code == 201 and schedule.json()["next_fire_time"].endswith("T02:00:00+00:00")
    assert client.post("/v1/schedules", json={"cohort": "c", "cron": "every night"}, headers=auth).status_code == 422
    schedule_id = schedule.json()["id"]
    paused = client.patch(f"/v1/schedules/{schedule_id}", json={"enabled": False,
                                                                "segmenter": "threshold?min_component_ml=0"},
                          headers=auth).json()
    assert paused["enabled"] is False and paused["next_fire_time"] is None
    assert paused["segmenter"] == "threshold?min_component_ml=0"
    assert len(client.get("/v1/schedules", headers=auth).json()["schedules"]) == 1
    assert client.delete(f"/v1/schedules/{schedule_id}", headers=auth).status_code == 204
    assert client.get(f"/v1/schedules/{schedule_id}", headers=auth).status_code == 404


# -- CLI -----------------------------------------------------------------------------------------------------

def test_the_cli_adds_studies_with_a_reference_makes_cohorts_and_schedules(tmp_path, cropped_ct, run_cli):
    import os

    import nibabel as nib

    image = nib.load(str(cropped_ct))
    reference = tmp_path / "reference.nii.gz"
    nib.save(nib.Nifti1Image((np.asarray(image.dataobj) > 0).astype(np.uint8), image.affine), str(reference))
    env = {"DOSEBENCH_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
           "DOSEBENCH_STORAGE_URL": f"file://{tmp_path / 'store'}", "DOSEBENCH_BROKER_URL": "memory://"}
    upgrade_database(env["DOSEBENCH_DATABASE_URL"])
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # run_cli passes the environment on
    try:
        added = run_cli("study", "add", cropped_ct, "--reference-seg", reference, "--name", "crop")
        assert added.returncode == 0, added.stderr
        study_id = added.stdout.strip()
        plain = run_cli("study", "add", cropped_ct)
        assert plain.returncode == 0, plain.stderr
        refused = run_cli("study", "add", tmp_path / "missing.nii.gz")
        assert refused.returncode == 2 and "does not exist" in refused.stderr
        made = run_cli("cohort", "create", "crops", "--study", study_id, "--study", plain.stdout.strip())
        assert made.returncode == 0, made.stderr
        shown = json.loads(run_cli("cohort", "show", "crops").stdout)
        # studies added in one call share added_at: compare by id, not by position
        assert {s["id"]: s["reference_segmentation"] for s in shown["studies"]} == \
            {study_id: True, plain.stdout.strip(): False}
        schedule = run_cli("schedule", "create", "--cohort", "crops", "--cron", "*/5 * * * * *", "--protocol", "tiny",
                           "--doses", "0.5", "--segmenter", "threshold?min_component_ml=0")
        assert schedule.returncode == 0, schedule.stderr
        schedule_id = schedule.stdout.strip()
        assert run_cli("schedule", "disable", schedule_id).returncode == 0
        [listed] = [json.loads(line) for line in run_cli("schedule", "list").stdout.splitlines()]
        assert listed["id"] == schedule_id and listed["enabled"] is False and listed["doses"] == [0.5, 1.0]
        assert run_cli("schedule", "delete", schedule_id).returncode == 0
        assert run_cli("schedule", "list").stdout == ""
        bad = run_cli("schedule", "create", "--cohort", "crops", "--cron", "61 * * * *")
        assert bad.returncode == 2 and "not valid" in bad.stderr
        started = run_cli("evaluate-cohort", "crops", "--protocol", "tiny", "--doses", "0.5", "--no-wait")
        assert started.returncode == 0, started.stderr
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    with session_factory(env["DOSEBENCH_DATABASE_URL"])() as session:
        run = session.get(EvaluationRun, started.stdout.strip())
        assert run.state == RUNNING and len(_run_jobs(session, run.id)) == 2
        stored = session.get(jobs.Study, study_id)
        assert stored.reference_seg_uri.endswith(f"studies/{study_id}/reference_seg.nii.gz")
        assert Path(stored.input_uri.removeprefix("file://")).read_bytes() == cropped_ct.read_bytes()
        spec_reference = {session.get(Job, j).spec["reference_seg_url"] for j in _run_jobs(session, run.id).values()}
        assert spec_reference == {stored.reference_seg_uri, None}


def test_a_reference_segmentation_is_attached_over_rest_only_on_the_study_grid(tmp_path, cropped_ct):
    import nibabel as nib
    from fastapi.testclient import TestClient

    from dosebench.api.app import create_app
    from dosebench.api.tokens import create_token
    from dosebench.core.settings import Settings

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'api.db'}", storage_url=f"file://{tmp_path / 'store'}",
                        broker_url="memory://")
    upgrade_database(settings.database_url)
    auth = {"Authorization": f"Bearer {create_token(settings.database_url, 'tests')}"}
    client = TestClient(create_app(settings, enqueue=lambda job_id: None))
    with session_factory(settings.database_url)() as session:
        study = cohorts.store_study(session, cropped_ct, settings.storage_url, name="crop")
    image = nib.load(str(cropped_ct))
    labels = (np.asarray(image.dataobj) > 0).astype(np.uint8)
    good, shifted = tmp_path / "good.nii.gz", tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image(labels, image.affine), str(good))
    moved = image.affine.copy()
    moved[0, 3] += 10.0
    nib.save(nib.Nifti1Image(labels, moved), str(shifted))

    url = f"/v1/studies/{study.id}/reference-segmentation"
    refused = client.put(url, files={"file": ("shifted.nii.gz", shifted.read_bytes())}, headers=auth)
    assert refused.status_code == 422 and "grid" in refused.json()["detail"]
    assert client.put("/v1/studies/nope/reference-segmentation", files={"file": ("g.nii.gz", good.read_bytes())},
                      headers=auth).status_code == 404
    attached = client.put(url, files={"file": ("good.nii.gz", good.read_bytes())}, headers=auth)
    assert attached.status_code == 200 and attached.json()["reference_segmentation"] is True
    with session_factory(settings.database_url)() as session:
        stored = session.get(jobs.Study, study.id).reference_seg_uri
    assert Path(stored.removeprefix("file://")).read_bytes() == good.read_bytes()

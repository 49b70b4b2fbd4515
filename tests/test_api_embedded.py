"""``dosebench serve --embedded`` in process: SQLite, a local folder and the in-process worker thread run
a real (tiny) job from upload to metrics and artifact download through the REST API."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from service_processes import embedded_server  # noqa: E402  (tests/ helper)

from dosebench.api.app import create_app  # noqa: E402
from dosebench.api.embedded import EmbeddedWorker  # noqa: E402
from dosebench.api.tokens import create_token  # noqa: E402
from dosebench.core import db  # noqa: E402
from dosebench.core.settings import get_settings  # noqa: E402


@pytest.mark.slow
def test_embedded_server_runs_a_job(tmp_path: Path, cropped_ct: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOSEBENCH_DATABASE_URL", f"sqlite:///{tmp_path / 'dosebench.db'}")
    monkeypatch.setenv("DOSEBENCH_STORAGE_URL", f"file://{tmp_path / 'storage'}")
    monkeypatch.setenv("DOSEBENCH_BROKER_URL", "memory://")
    get_settings.cache_clear()
    try:
        settings = get_settings()
        db.upgrade_database(settings.database_url)
        token = create_token(settings.database_url, "embedded-test")
        worker = EmbeddedWorker(settings).start()
        try:
            app = create_app(settings, enqueue=worker.enqueue_job)
            with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
                with cropped_ct.open("rb") as handle:
                    study = client.post("/v1/studies", files={"file": ("ct.nii.gz", handle)})
                assert study.status_code == 201, study.text
                job = client.post("/v1/jobs", json={"study_id": study.json()["id"], "doses": [0.5],
                                                    "protocol": "tiny", "segmenter": "threshold", "seed": 7})
                assert job.status_code == 202, job.text
                job_id = job.json()["id"]
                deadline = time.monotonic() + 600
                while True:
                    view = client.get(f"/v1/jobs/{job_id}").json()
                    if view["state"] in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                assert view["state"] == "succeeded", view
                assert all(s["state"] == "succeeded" and s["attempt"] == 1 for s in view["stages"])
                metrics = client.get(f"/v1/jobs/{job_id}/metrics").json()
                assert metrics["rows"] and metrics["summary"]["full_dose"]["all"]["0.50"]["n"] == 1
                assert all(r["dice"] == 1.0 for r in metrics["rows"] if r["dose"] == 1.0)
                names = [a["name"] for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["artifacts"]]
                assert "evaluate/report.md" in names and "reconstruct/0.50/recon.nii.gz" in names
                report = client.get(f"/v1/jobs/{job_id}/artifacts/evaluate/report.md")
                assert report.status_code == 200 and report.text.startswith("# dosebench report")
                recon = client.get(f"/v1/jobs/{job_id}/artifacts/reconstruct/0.50/recon.nii.gz")
                assert recon.status_code == 200 and recon.content[:2] == b"\x1f\x8b"  # gzip: NIfTI .nii.gz
                counts = next(n for n in names if n.startswith("acquire/"))
                store = client.get(f"/v1/jobs/{job_id}/artifacts/{counts}")
                assert store.status_code == 409  # a chunked projection store (folder)
        finally:
            worker.stop(timeout_s=30)
    finally:
        get_settings.cache_clear()


@pytest.mark.slow
def test_serve_embedded_token_and_submit_commands(tmp_path: Path, cropped_ct: Path, run_cli) -> None:
    """The real commands over real HTTP: `db upgrade`, `token create`, `serve --embedded`, `submit`."""


    home = tmp_path / "server"
    created = run_cli("token", "create", "cli-test", "--home", home)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith("dbt_") and "shown only this once" in created.stderr

    with embedded_server(home, tmp_path / "server.log") as base:
        out = tmp_path / "results"
        submitted = run_cli("submit", "--input", cropped_ct, "--doses", "0.5", "--protocol", "tiny",
                            "--segmenter", "threshold", "--seed", "7", "--out", out, "--url", base,
                            "--token", token, "--poll-interval", "0.3", "--timeout", "600")
        assert submitted.returncode == 0, submitted.stderr
        assert "succeeded" in submitted.stderr
        assert (out / "evaluate" / "report.md").read_text().startswith("# dosebench report")
        assert (out / "reconstruct" / "0.50" / "recon.nii.gz").stat().st_size > 0
        assert (out / "metrics.csv").read_text().startswith("dose,reference,group,label")
        refused = run_cli("submit", "--input", cropped_ct, "--doses", "0.5", "--out", tmp_path / "x",
                          "--url", base, "--token", "wrong")
        assert refused.returncode == 2 and "401" in refused.stderr


def test_the_embedded_worker_fires_due_schedules_and_finalises_their_runs(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The embedded process stands in for beat: a due schedule fires once (under the scheduler lease, so
    not while another beat holds it), the worker thread runs the run's jobs (their input is missing, so
    they fail fast), and the run is finalised as a regression naming the failed studies."""
    import json
    from datetime import timedelta

    from sqlalchemy import select

    from dosebench.core import cohorts, jobs, schedules
    from dosebench.core.cohorts import EvaluationRequest
    from dosebench.core.db import BeatLease, EvaluationJob, EvaluationRun, Job, Schedule, Stage, utcnow

    monkeypatch.setenv("DOSEBENCH_DATABASE_URL", f"sqlite:///{tmp_path / 'dosebench.db'}")
    monkeypatch.setenv("DOSEBENCH_STORAGE_URL", f"file://{tmp_path / 'storage'}")
    monkeypatch.setenv("DOSEBENCH_BROKER_URL", "memory://")
    monkeypatch.setenv("DOSEBENCH_SCHEDULE_POLL_INTERVAL_S", "0.1")
    monkeypatch.setenv("DOSEBENCH_EVALUATION_INTERVAL_S", "0.2")
    monkeypatch.setenv("DOSEBENCH_SCHEDULER_LEASE_S", "30")
    get_settings.cache_clear()
    try:
        settings = get_settings()
        db.upgrade_database(settings.database_url)
        factory = db.session_factory(settings.database_url)
        with factory() as session:
            ids = [jobs.add_study(session, name=f"gone-{i}", input_uri=f"file://{tmp_path}/missing-{i}.nii.gz",
                                  kind="nifti", checksum="0" * 64, bytes=1, header_summary={}).id for i in range(2)]
            cohort = cohorts.create_cohort(session, "nightly", ids)
            request = EvaluationRequest(protocol="tiny", doses=(0.5,), segmenter="threshold", seed=7)
            # daily at 02:00 UTC, created two days ago: the missed firings coalesce into one, the latest
            schedule = schedules.create_schedule(session, cohort, "0 2 * * *", request,
                                                 now=utcnow() - timedelta(days=2))
            schedule_id, expected_fire_time = schedule.id, schedules.due_fire_time(schedule, utcnow())
            # another beat (of a service on the same database) holds the lease: this process must not fire
            assert schedules.acquire_lease(session, schedules.SCHEDULER_LEASE, "other-beat", 600)

        worker = EmbeddedWorker(settings).start()
        try:
            time.sleep(1.0)  # ten polls
            with factory() as session:
                assert session.scalars(select(EvaluationRun)).all() == []
                schedules.release_lease(session, schedules.SCHEDULER_LEASE, "other-beat")
            deadline = time.monotonic() + 60
            while True:
                with factory() as session:
                    runs = session.scalars(select(EvaluationRun)).all()
                if (runs and runs[0].state != "running") or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            time.sleep(0.5)  # more polls: the same firing is not made twice
            with factory() as session:
                assert session.get(BeatLease, schedules.SCHEDULER_LEASE).holder == worker.lease_holder
        finally:
            worker.stop(timeout_s=30)

        with factory() as session:
            [run] = session.scalars(select(EvaluationRun)).all()
            assert run.schedule_id == schedule_id and run.fire_time == expected_fire_time
            assert session.get(Schedule, schedule_id).last_fire_time == expected_fire_time
            assert run.state == "finished" and run.regression is True, (run.state, run.error)
            assert run.counts["failed"] == 2 and run.counts["succeeded"] == 0
            assert sorted(r.split(" ", 2)[1] for r in run.reasons) == ["gone-0", "gone-1"]
            assert all(" failed: " in r for r in run.reasons)
            # the jobs ran in this process: their first stage was claimed once and failed on the missing input
            job_ids = list(session.scalars(select(EvaluationJob.job_id).where(EvaluationJob.run_id == run.id)))
            assert len(job_ids) == 2 and {session.get(Job, j).state for j in job_ids} == {"failed"}
            acquire = session.scalars(select(Stage).where(Stage.job_id.in_(job_ids), Stage.name == "acquire")).all()
            assert [s.attempt for s in acquire] == [1, 1] and all(s.state == "failed" for s in acquire)
            assert session.get(BeatLease, schedules.SCHEDULER_LEASE) is None  # released at stop
        summary = json.loads((Path(run.report_uri.removeprefix("file://")) / "summary.json").read_text())
        assert summary["regression"] is True and summary["reasons"] == run.reasons
    finally:
        get_settings.cache_clear()

"""``dosebench serve --embedded`` in process: SQLite, a local folder and the in-process worker thread run
a real (tiny) job from upload to metrics and artifact download through the REST API."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

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
    import os
    import socket
    import subprocess
    import sys

    import httpx

    home = tmp_path / "server"
    created = run_cli("token", "create", "cli-test", "--home", home)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert token.startswith("dbt_") and "shown only this once" in created.stderr

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOSEBENCH_")}
    server = subprocess.Popen([sys.executable, "-m", "dosebench.cli", "serve", "--embedded", "--home", str(home),
                               "--port", str(port), "--log-level", "warning"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/v1/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "the embedded server did not start"
            time.sleep(0.2)
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
    finally:
        server.terminate()
        server.wait(timeout=30)

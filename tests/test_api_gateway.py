"""The REST gateway against real PostgreSQL (conftest's throwaway database): auth, uploads, jobs,
idempotency, refusals that store nothing, cancel/retry, metrics (JSON and CSV), artifacts, health.

No worker runs here: ``enqueue`` is recorded, and metric and artifact rows are inserted directly, as a
finished ``evaluate`` stage would. The end-to-end path with a real Celery worker is tested elsewhere.
"""

from __future__ import annotations

import csv
import gzip
import io
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import func, select

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from dosebench.api.app import create_app  # noqa: E402
from dosebench.api.tokens import create_token  # noqa: E402
from dosebench.core import db  # noqa: E402
from dosebench.core.db import Artifact, Job, Metric, Stage, Study  # noqa: E402
from dosebench.core.settings import Settings  # noqa: E402

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def database(postgres_url: str) -> str:
    db.upgrade_database(postgres_url)
    return postgres_url


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="module")
def enqueued() -> list[str]:
    return []


def _settings(database: str, storage: Path, **overrides) -> Settings:
    values = {"database_url": database, "broker_url": "memory://", "storage_url": f"file://{storage}",
              "upload_limit_bytes": 50 * 1024**2, **overrides}
    return Settings(**values)


@pytest.fixture(scope="module")
def token(database: str) -> str:
    return create_token(database, "tester")


@pytest.fixture(scope="module")
def client(database: str, storage: Path, enqueued: list[str], token: str) -> TestClient:
    app = create_app(_settings(database, storage), enqueue=enqueued.append)
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as test_client:
        yield test_client


def _count(database: str, model) -> int:
    with db.session_factory(database)() as session:
        return session.execute(select(func.count()).select_from(model)).scalar_one()


def _stored_files(storage: Path) -> list[Path]:
    return sorted(p for p in storage.rglob("*") if p.is_file())


def _assert_problem(response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM), response.headers
    body = response.json()
    assert body["status"] == status and body["detail"], body
    for word in words:
        assert word.lower() in body["detail"].lower(), body
    return body


@pytest.fixture(scope="module")
def study_id(client: TestClient, cropped_ct: Path) -> str:
    with cropped_ct.open("rb") as handle:
        response = client.post("/v1/studies", files={"file": ("patient_name.nii.gz", handle)},
                               data={"name": "crop"})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _job_body(study: str, **overrides) -> dict:
    return {"study_id": study, "doses": [0.25, 0.5], "protocol": "tiny", "segmenter": "threshold", "seed": 3,
            **overrides}


# -- auth ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("header", [None, "Bearer not-a-token", "Basic dXNlcjpwYXNz"])
def test_auth_required(client: TestClient, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    with TestClient(client.app, headers=headers) as anonymous:
        for method, path in (("get", "/v1/jobs"), ("get", "/v1/studies/x"), ("post", "/v1/jobs")):
            response = getattr(anonymous, method)(path)
            body = _assert_problem(response, 401, "token")
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert "dosebench token create" in body["fix"]


def test_tokens_are_stored_hashed(database: str, token: str) -> None:
    with db.session_factory(database)() as session:
        hashes = session.execute(select(db.ApiToken.token_hash)).scalars().all()
    assert token not in hashes
    import hashlib

    assert hashlib.sha256(token.encode()).hexdigest() in hashes


def test_openapi_docs(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/v1/studies", "/v1/jobs", "/v1/jobs/{job_id}/metrics", "/v1/healthz"):
        assert path in paths


# -- studies -------------------------------------------------------------------------------------------

def test_upload_study(client: TestClient, study_id: str, database: str, storage: Path, cropped_ct: Path) -> None:
    response = client.get(f"/v1/studies/{study_id}")
    assert response.status_code == 200
    study = response.json()
    assert study["kind"] == "nifti" and study["name"] == "crop"
    assert study["header"]["shape"] == [116, 96, 8]
    assert study["bytes"] == cropped_ct.stat().st_size
    # de-identified: the uploaded file name is not kept anywhere
    assert "patient_name" not in response.text
    with db.session_factory(database)() as session:
        row = session.get(Study, study_id)
    assert row.input_uri.endswith(f"studies/{study_id}/input.nii.gz")
    stored = storage / "studies" / study_id / "input.nii.gz"
    assert stored.read_bytes() == cropped_ct.read_bytes()
    _assert_problem(client.get("/v1/studies/does-not-exist"), 404, "does not exist")


def _refused_upload(client: TestClient, database: str, storage: Path, files: dict, status: int,
                    *words: str, data: dict | None = None) -> dict:
    studies, stored = _count(database, Study), _stored_files(storage)
    body = _assert_problem(client.post("/v1/studies", files=files, data=data or {}), status, *words)
    assert _count(database, Study) == studies, "a refused upload left a study row"
    assert _stored_files(storage) == stored, "a refused upload left a stored object"
    return body


def test_corrupt_nifti_is_refused(client: TestClient, database: str, storage: Path, study_id: str) -> None:
    garbage = gzip.compress(b"this is not a NIfTI header" * 40)
    body = _refused_upload(client, database, storage, {"file": ("broken.nii.gz", garbage)}, 422, "NIfTI")
    assert "broken.nii.gz" in body["detail"] and "upload" not in body["detail"].split("broken")[0].lower()


def test_zip_slip_is_refused(client: TestClient, database: str, storage: Path, study_id: str) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../evil", b"owned")
        archive.writestr("series/ok.dcm", b"not really DICOM")
    _refused_upload(client, database, storage, {"file": ("series.zip", buffer.getvalue())}, 422, "../evil", "outside")
    assert not (storage.parent / "evil").exists()


def test_oversized_upload_is_refused(database: str, storage: Path, token: str, cropped_ct: Path,
                                     study_id: str) -> None:
    app = create_app(_settings(database, storage, upload_limit_bytes=1024), enqueue=lambda job_id: None)
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as small:
        with cropped_ct.open("rb") as handle:
            _refused_upload(small, database, storage, {"file": ("ct.nii.gz", handle)}, 413, "1024 bytes")


def test_unsupported_uploads(client: TestClient, database: str, storage: Path, study_id: str) -> None:
    _refused_upload(client, database, storage, {"file": ("ct.mha", b"xx")}, 415, "cannot tell the format")
    body = _refused_upload(client, database, storage, {"file": ("raw.zip", b"PK")}, 415, "DICOM-CT-PD",
                           data={"kind": "dicom-ct-pd"})
    assert "not supported yet" in body["detail"]
    studies = _count(database, Study)
    _assert_problem(client.post("/v1/studies", content=b"plain", headers={"content-type": "text/plain"}), 415,
                    "multipart")
    _assert_problem(client.post("/v1/studies", files={"name": (None, "no file")}), 422, "no file part")
    assert _count(database, Study) == studies


def test_dicom_zip_upload(client: TestClient, cropped_ct: Path, storage: Path) -> None:
    import nibabel as nib
    import numpy as np
    import pydicom
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    data = np.asarray(nib.load(str(cropped_ct)).dataobj)[:, :, :3].astype(np.int16)
    series = generate_uid()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for k in range(data.shape[2]):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = generate_uid()
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
            ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
            ds.PatientName, ds.Modality, ds.SeriesInstanceUID = "Doe^Jane", "CT", series
            ds.Rows, ds.Columns = data.shape[1], data.shape[0]
            ds.PixelSpacing, ds.SliceThickness = [3.0, 3.0], 3.0
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.ImagePositionPatient = [0.0, 0.0, 3.0 * k]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleSlope, ds.RescaleIntercept = 1, 0
            ds.PixelData = np.ascontiguousarray(data[:, :, k].T).tobytes()
            out = io.BytesIO()
            pydicom.dcmwrite(out, ds, enforce_file_format=True)
            archive.writestr(f"series/{k:03d}.dcm", out.getvalue())
    response = client.post("/v1/studies", files={"file": ("series.zip", buffer.getvalue())})
    assert response.status_code == 201, response.text
    assert response.json()["header"]["shape"] == [116, 96, 3]
    study_id = response.json()["id"]
    assert "Doe" not in client.get(f"/v1/studies/{study_id}").text
    # stored as NIfTI: the same voxels, no DICOM header (the patient's name) kept anywhere
    stored = storage / "studies" / study_id / "input.nii.gz"
    assert sorted(p.name for p in stored.parent.iterdir()) == ["input.nii.gz"]
    volume = nib.load(str(stored))
    assert volume.shape == (116, 96, 3) and volume.get_data_dtype() == np.int16
    assert np.array_equal(np.asarray(volume.dataobj), data)
    assert b"Doe" not in gzip.decompress(stored.read_bytes())


# -- jobs ----------------------------------------------------------------------------------------------

def test_create_job(client: TestClient, study_id: str, enqueued: list[str], database: str) -> None:
    response = client.post("/v1/jobs", json=_job_body(study_id))
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "queued" and job["id"] in enqueued
    detail = client.get(f"/v1/jobs/{job['id']}").json()
    assert detail["doses"] == [1.0, 0.5, 0.25] and detail["protocol"] == "tiny"
    names = [(s["name"], s["dose"]) for s in detail["stages"]]
    assert names[0] == ("acquire", None) and names[-1] == ("evaluate", None) and len(names) == 2 + 3 * 3
    assert all(s["state"] == "queued" and s["progress"] == 0 and s["attempt"] == 0 for s in detail["stages"])


def test_idempotency_key(client: TestClient, study_id: str, database: str) -> None:
    before = _count(database, Job)
    headers = {"Idempotency-Key": "same-key-1"}
    first = client.post("/v1/jobs", json=_job_body(study_id), headers=headers)
    second = client.post("/v1/jobs", json=_job_body(study_id), headers=headers)
    assert first.status_code == 202 and second.status_code in (200, 202)
    assert first.json()["id"] == second.json()["id"]
    assert _count(database, Job) == before + 1
    with db.session_factory(database)() as session:
        assert session.execute(select(func.count()).select_from(Job)
                               .where(Job.idempotency_key == "same-key-1")).scalar_one() == 1
    other = client.post("/v1/jobs", json=_job_body(study_id, seed=99), headers=headers)
    _assert_problem(other, 409, "Idempotency-Key")
    assert _count(database, Job) == before + 1


@pytest.mark.parametrize(("overrides", "status", "word"), [
    ({"doses": [0.0]}, 422, "outside (0, 1]"),
    ({"doses": [1.5]}, 422, "outside (0, 1]"),
    ({"doses": []}, 422, "doses"),
    ({"protocol": "../../etc/passwd.yaml"}, 422, "unknown protocol"),
    ({"segmenter": "magic"}, 422, "unknown segmenter"),
    ({"segmenter": "threshold?min_component_ml=-1"}, 422, "min_component_ml"),
    ({"segmenter": "nnunet:"}, 422, "unknown segmenter"),
    ({"seed": -1}, 422, "seed"),
    ({"study_id": "no-such-study"}, 404, "does not exist"),
])
def test_bad_job_requests_store_nothing(client: TestClient, study_id: str, database: str, enqueued: list[str],
                                        overrides: dict, status: int, word: str) -> None:
    jobs, stages, queued = _count(database, Job), _count(database, Stage), len(enqueued)
    _assert_problem(client.post("/v1/jobs", json=_job_body(study_id, **overrides)), status, word)
    assert (_count(database, Job), _count(database, Stage), len(enqueued)) == (jobs, stages, queued)


@pytest.mark.parametrize(("spec", "stored"), [
    ("Threshold?min_component_ml=0", "threshold?min_component_ml=0"),
    ("TotalSegmentator:fast", "totalsegmentator:fast"),
    ("nnunet:/models/Dataset501_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres?fold=0", None),
])
def test_segmenter_specs_are_normalised_like_evaluation_runs(client: TestClient, study_id: str, database: str,
                                                             spec: str, stored: str | None) -> None:
    """The API takes every spec the segmenter backends know (options and nnU-Net folders included): the
    model folder is checked where the model runs, and its path keeps its case."""
    response = client.post("/v1/jobs", json=_job_body(study_id, segmenter=spec, seed=4242))
    assert response.status_code == 202, response.text
    with db.session_factory(database)() as session:
        assert session.get(Job, response.json()["id"]).segmenter == (stored or spec)


def test_nnunet_folders_outside_the_models_root_are_refused(client: TestClient, study_id: str, database: str,
                                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOSEBENCH_NNUNET_MODELS_ROOT", str(tmp_path / "models"))
    jobs_before = _count(database, Job)
    refused = client.post("/v1/jobs", json=_job_body(study_id, segmenter="nnunet:/etc/some_model", seed=4343))
    _assert_problem(refused, 422, "outside DOSEBENCH_NNUNET_MODELS_ROOT")
    assert _count(database, Job) == jobs_before
    accepted = client.post("/v1/jobs", json=_job_body(study_id, segmenter=f"nnunet:{tmp_path}/models/m", seed=4344))
    assert accepted.status_code == 202, accepted.text


def test_list_jobs_filters_and_paging(client: TestClient, study_id: str) -> None:
    created = [client.post("/v1/jobs", json=_job_body(study_id, seed=100 + i)).json()["id"] for i in range(3)]
    page = client.get("/v1/jobs", params={"study_id": study_id, "limit": 2}).json()
    assert len(page["jobs"]) == 2 and page["total"] >= 3 and page["next_offset"] == 2
    rest = client.get("/v1/jobs", params={"study_id": study_id, "limit": 2, "offset": 2}).json()
    seen = {j["id"] for j in page["jobs"]} | {j["id"] for j in rest["jobs"]}
    assert len(seen) == min(page["total"], 4)
    queued = client.get("/v1/jobs", params={"state": "queued", "limit": 500}).json()
    assert set(created) <= {j["id"] for j in queued["jobs"]}
    assert all(j["state"] == "queued" for j in queued["jobs"])
    later = client.get("/v1/jobs", params={"updated_since": page["server_time"]}).json()
    assert later["jobs"] == []
    _assert_problem(client.get("/v1/jobs", params={"state": "bogus"}), 422, "unknown state")
    _assert_problem(client.get("/v1/jobs", params={"limit": 0}), 422, "limit")
    _assert_problem(client.get("/v1/jobs/nope"), 404, "does not exist")


def test_cancel_and_retry(client: TestClient, study_id: str, enqueued: list[str]) -> None:
    job_id = client.post("/v1/jobs", json=_job_body(study_id, seed=5)).json()["id"]
    _assert_problem(client.post(f"/v1/jobs/{job_id}/retry"), 409, "queued")
    response = client.post(f"/v1/jobs/{job_id}/cancel")
    assert response.status_code == 202 and response.json()["state"] == "cancelled"
    detail = client.get(f"/v1/jobs/{job_id}").json()
    assert detail["state"] == "cancelled" and all(s["state"] == "cancelled" for s in detail["stages"])
    _assert_problem(client.post(f"/v1/jobs/{job_id}/cancel"), 409, "already cancelled")
    queued = len(enqueued)
    response = client.post(f"/v1/jobs/{job_id}/retry")
    assert response.status_code == 202 and response.json()["state"] == "queued"
    assert enqueued[queued:] == [job_id]
    assert all(s["state"] == "queued" for s in client.get(f"/v1/jobs/{job_id}").json()["stages"])
    _assert_problem(client.post("/v1/jobs/nope/cancel"), 404, "does not exist")


# -- results -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def finished_job(client: TestClient, study_id: str, database: str, storage: Path) -> str:
    """A job with metric rows and an evaluate artifact, written as a worker would."""
    job_id = client.post("/v1/jobs", json=_job_body(study_id, seed=11)).json()["id"]
    report = storage / "jobs" / job_id / "evaluate" / "all" / "attempt-1" / "report.md"
    report.parent.mkdir(parents=True)
    report.write_text("# report\n" + "x" * 3_000_000)
    with db.session_factory(database)() as session, session.begin():
        evaluate = session.execute(select(Stage).where(Stage.job_id == job_id, Stage.name == "evaluate")).scalar_one()
        evaluate.attempt = 1
        session.add(Artifact(stage_id=evaluate.id, attempt=1, name="report.md", uri=f"file://{report}",
                             bytes=report.stat().st_size, checksum="0" * 64))
        for dose, liver, spleen in ((1.0, 1.0, 1.0), (0.5, 0.9, 0.8), (0.25, 0.7, None)):
            session.add(Metric(job_id=job_id, dose=dose, reference="full_dose", group="organs", label="liver",
                               label_id=1, dice=liver, surface_dice=liver, hd95_mm=1.5, volume_change_ml=0.1,
                               reference_voxels=100, test_voxels=98))
            session.add(Metric(job_id=job_id, dose=dose, reference="full_dose", group="organs", label="spleen",
                               label_id=2, dice=spleen, surface_dice=None, hd95_mm=None, volume_change_ml=None,
                               reference_voxels=50, test_voxels=0))
    return job_id


def test_metrics_json_and_csv(client: TestClient, finished_job: str) -> None:
    body = client.get(f"/v1/jobs/{finished_job}/metrics").json()
    assert len(body["rows"]) == 6
    organs = body["summary"]["full_dose"]["organs"]
    assert organs["0.50"]["median"] == pytest.approx(0.85) and organs["0.50"]["mad"] == 0
    assert organs["0.25"]["median"] == pytest.approx(0.7)  # the undefined spleen Dice is left out
    assert set(body["summary"]["full_dose"]) == {"organs", "all"}
    for response in (client.get(f"/v1/jobs/{finished_job}/metrics", params={"format": "csv"}),
                     client.get(f"/v1/jobs/{finished_job}/metrics", headers={"Accept": "text/csv"})):
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(response.text)))
        assert len(rows) == 6 and rows[0]["dose"] in ("0.25", "0.50", "1.00")
        assert {r["label"] for r in rows} == {"liver", "spleen"}
        assert any(r["hd95_mm"] == "" for r in rows)
    _assert_problem(client.get(f"/v1/jobs/{finished_job}/metrics", params={"format": "xml"}), 422, "format")


def test_artifacts_list_and_download(client: TestClient, finished_job: str, storage: Path) -> None:
    listing = client.get(f"/v1/jobs/{finished_job}/artifacts").json()["artifacts"]
    assert [a["name"] for a in listing] == ["evaluate/report.md"]
    response = client.get(f"/v1/jobs/{finished_job}/artifacts/evaluate/report.md")
    assert response.status_code == 200
    assert response.content == (storage / "jobs" / finished_job / "evaluate" / "all" / "attempt-1"
                                / "report.md").read_bytes()
    _assert_problem(client.get(f"/v1/jobs/{finished_job}/artifacts/evaluate/nothing"), 404, "no artifact")


# -- health --------------------------------------------------------------------------------------------

def test_healthz(database: str, storage: Path, redis_url: str) -> None:
    healthy = create_app(_settings(database, storage, broker_url=redis_url))
    with TestClient(healthy) as client:
        response = client.get("/v1/healthz")  # no token needed: probes call it
    assert response.status_code == 200, response.text
    assert response.json()["components"] == {"database": {"status": "ok"}, "broker": {"status": "ok"},
                                             "storage": {"status": "ok"}}
    blocker = storage.parent / "not-a-folder"
    blocker.write_text("a file where the storage folder should be")
    broken = create_app(_settings(database, storage, broker_url="redis://127.0.0.1:1/0",
                                  storage_url=f"file://{blocker}/store"))
    with TestClient(broken) as client:
        response = client.get("/v1/healthz")
    assert response.status_code == 503
    components = response.json()["components"]
    assert components["database"]["status"] == "ok" and components["broker"]["status"] == "error"
    assert components["storage"]["status"] == "error"
    assert components["broker"]["detail"] and components["storage"]["detail"]


def test_unknown_endpoint_is_problem_json(client: TestClient) -> None:
    _assert_problem(client.get("/v1/nothing-here"), 404, "no such endpoint")
    _assert_problem(client.delete("/v1/jobs"), 405, "not allowed")


def test_dicom_ct_pd_zip_is_refused_clearly(client: TestClient, database: str, storage: Path, tmp_path: Path,
                                            study_id: str) -> None:
    """Raw projections cannot start a job yet: a zipped DICOM-CT-PD folder gets 415 naming the format."""
    import numpy as np

    ct_pd = pytest.importorskip("dosebench.simulator.dicom_ct_pd")
    from dosebench.core.geometry import HelicalGeometry
    from dosebench.core.protocol import load_protocol

    geometry = HelicalGeometry.covering(load_protocol("tiny").scanner, -6.0, 6.0, radius_mm=150.0)
    geometry = geometry.model_copy(update={"number_of_views": 3})
    projections = np.zeros((3, geometry.detector_rows, geometry.detector_columns), dtype=np.float32)
    files = ct_pd.write_dicom_ct_pd(tmp_path / "raw", projections, geometry, 2.0e5)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for file in files:
            archive.write(file, f"raw/{file.name}")
    body = _refused_upload(client, database, storage, {"file": ("projections.zip", buffer.getvalue())}, 415,
                           "DICOM-CT-PD", "cannot be uploaded yet")
    assert "projections.zip" in body["detail"]


def test_revoked_token_is_refused(database: str, storage: Path) -> None:
    revoked = create_token(database, "revoked")
    with db.session_factory(database)() as session, session.begin():
        row = session.execute(select(db.ApiToken).where(db.ApiToken.name == "revoked")).scalar_one()
        row.revoked_at = db.utcnow()
    app = create_app(_settings(database, storage), enqueue=lambda job_id: None)
    with TestClient(app, headers={"Authorization": f"Bearer {revoked}"}) as client:
        _assert_problem(client.get("/v1/jobs"), 401, "revoked")
        _assert_problem(client.post("/v1/studies", files={"file": ("ct.nii", b"x")}), 401, "revoked")


def test_serve_command_over_http(database: str, storage: Path, token: str, study_id: str, redis_url: str) -> None:
    """`dosebench serve` (uvicorn, settings from DOSEBENCH_*) answers over real HTTP on loopback."""
    import os
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOSEBENCH_")}
    env.update(DOSEBENCH_DATABASE_URL=database, DOSEBENCH_STORAGE_URL=f"file://{storage}",
               DOSEBENCH_BROKER_URL=redis_url)
    server = subprocess.Popen([sys.executable, "-m", "dosebench.cli", "serve", "--port", str(port),
                               "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{base}/v1/healthz", timeout=2)
                break
            except httpx.HTTPError:
                assert server.poll() is None and time.monotonic() < deadline, server.stderr.read()
                time.sleep(0.2)
        assert health.status_code == 200, health.text
        study = httpx.get(f"{base}/v1/studies/{study_id}", headers={"Authorization": f"Bearer {token}"})
        assert study.status_code == 200 and study.json()["id"] == study_id
        assert httpx.get(f"{base}/v1/studies/{study_id}").headers["content-type"] == PROBLEM
    finally:
        server.terminate()
        server.wait(timeout=30)

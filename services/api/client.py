"""A small client of the REST API: what ``dosebench submit`` runs (upload, submit, poll, download)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ..core.errors import DosebenchError

TERMINAL_STATES = ("succeeded", "failed", "cancelled")


class ApiError(DosebenchError):
    """The server refused a request; the message is its problem document's detail."""


class Client:
    def __init__(self, url: str, token: str, timeout_s: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, transport=transport,
                                  headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                body = response.json()
                detail, fix = body.get("detail", response.text), body.get("fix", "")
            except ValueError:
                detail, fix = response.text, ""
            raise ApiError(f"{response.request.method} {response.request.url.path} -> "
                           f"{response.status_code}: {detail}", fix=fix)
        return response

    def upload_study(self, path: Path) -> dict[str, Any]:
        with path.open("rb") as handle:
            response = self._http.post("/v1/studies", files={"file": (path.name, handle)})
        return self._check(response).json()

    def create_job(self, body: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._check(self._http.post("/v1/jobs", json=body, headers=headers)).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._check(self._http.get(f"/v1/jobs/{job_id}")).json()

    def wait(self, job_id: str, on_update: Callable[[dict[str, Any]], None] | None = None,
             interval_s: float = 1.0, timeout_s: float | None = None) -> dict[str, Any]:
        started = time.monotonic()
        while True:
            job = self.job(job_id)
            if on_update is not None:
                on_update(job)
            if job["state"] in TERMINAL_STATES:
                return job
            if timeout_s is not None and time.monotonic() - started > timeout_s:
                raise ApiError(f"job {job_id} still {job['state']} after {timeout_s:g} s",
                               fix="poll it later: GET /v1/jobs/{id}")
            time.sleep(interval_s)

    def download_artifacts(self, job_id: str, out_dir: Path) -> list[Path]:
        listing = self._check(self._http.get(f"/v1/jobs/{job_id}/artifacts")).json()
        written = []
        for item in listing["artifacts"]:
            name = item["name"]
            target = (out_dir / name).resolve()
            if not target.is_relative_to(out_dir.resolve()):
                raise ApiError(f"the server named an artifact {name!r} outside the output folder")
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(f".{target.name}.partial")
            with self._http.stream("GET", f"/v1/jobs/{job_id}/artifacts/{name}") as response:
                if response.status_code == 409:  # a folder artifact (projection store): not downloadable
                    response.read()
                    continue
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                with partial.open("wb") as handle:
                    for chunk in response.iter_bytes():
                        handle.write(chunk)
            partial.replace(target)
            written.append(target)
        metrics = self._http.get(f"/v1/jobs/{job_id}/metrics", params={"format": "csv"})
        if metrics.status_code == 200:
            (out_dir / "metrics.csv").write_text(metrics.text)
            written.append(out_dir / "metrics.csv")
        return written

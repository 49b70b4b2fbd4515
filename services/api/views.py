"""JSON shapes of the API's resources (what the endpoints return), built from the database rows."""

from __future__ import annotations

import csv
import io
from datetime import datetime
from typing import Any

from ..core.db import Artifact, Job, Metric, Stage, Study
from ..core.doses import dose_label

METRIC_COLUMNS = ["dose", "reference", "group", "label", "label_id", "dice", "surface_dice", "hd95_mm",
                  "volume_change_ml", "reference_voxels", "test_voxels"]


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _duration(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def study_view(study: Study) -> dict[str, Any]:
    return {"id": study.id, "name": study.name, "kind": study.kind, "bytes": study.bytes,
            "sha256": study.checksum, "header": study.header_summary or {},
            "created_at": _iso(study.created_at)}


def stage_view(stage: Stage) -> dict[str, Any]:
    return {"name": stage.name, "dose": stage.dose, "state": stage.state,
            "progress": round(float(stage.progress or 0.0), 4), "attempt": stage.attempt, "error": stage.error,
            "worker": stage.worker, "started_at": _iso(stage.started_at), "finished_at": _iso(stage.finished_at),
            "heartbeat_at": _iso(stage.heartbeat_at),
            "duration_s": _duration(stage.started_at, stage.finished_at)}


def job_view(job: Job, stages: list[Stage] | None = None) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": job.id, "study_id": job.study_id, "state": job.state, "doses": list(job.doses or []),
        "protocol": job.protocol_name, "segmenter": job.segmenter, "seed": job.seed,
        "cancel_requested": bool(job.cancel_requested), "error": job.error,
        "created_at": _iso(job.created_at), "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at), "updated_at": _iso(job.updated_at),
        "duration_s": _duration(job.started_at, job.finished_at),
    }
    if stages is not None:
        view["progress"] = round(sum(float(s.progress or 0.0) for s in stages) / len(stages), 4) if stages else 0.0
        view["stages"] = [stage_view(s) for s in stages]
    return view


def artifact_name(stage: Stage, artifact: Artifact) -> str:
    """The artifact's public name: ``<stage>/<dose>/<file>`` (``<stage>/<file>`` for job-wide stages),
    ``<file>`` being the stored object's own name (``recon.nii.gz``), so a download keeps its extension."""
    file = artifact.uri.rstrip("/").rsplit("/", 1)[-1] or artifact.name
    parts = [stage.name] + ([dose_label(stage.dose)] if stage.dose is not None else []) + [file]
    return "/".join(parts)


def artifact_view(stage: Stage, artifact: Artifact) -> dict[str, Any]:
    return {"name": artifact_name(stage, artifact), "key": artifact.name, "stage": stage.name, "dose": stage.dose,
            "attempt": artifact.attempt, "bytes": artifact.bytes, "sha256": artifact.checksum,
            "created_at": _iso(artifact.created_at)}


def metric_row(metric: Metric) -> dict[str, Any]:
    return {"dose": metric.dose, "reference": metric.reference, "group": metric.group, "label": metric.label,
            "label_id": metric.label_id, "dice": metric.dice, "surface_dice": metric.surface_dice,
            "hd95_mm": metric.hd95_mm, "volume_change_ml": metric.volume_change_ml,
            "reference_voxels": metric.reference_voxels, "test_voxels": metric.test_voxels}


def metrics_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else dose_label(v) if k == "dose" else v) for k, v in row.items()})
    return buffer.getvalue()

"""The embedded runner: one study through every stage in this process, results in a folder.

Stages are the pure functions of the simulator, reconstructor and segmenter; this module only
sequences them, writes the output folder and keeps it all-or-nothing: everything is written into a
hidden sibling folder that is renamed into place at the very end, so a failed or interrupted run
leaves no partial output behind.

Output folder layout::

    protocol.json                 scan geometry, photon model, reconstruction settings, seed, versions
    recon/dose-0.20.nii.gz ...    reconstructions in HU, on the input's grid (same shape and affine)
    seg/dose-0.20.nii.gz ...      label maps, plus seg/labels.json
    metrics/per_label.csv         one row per dose x label (x reference)
    metrics/summary.json          median ± MAD per group and dose
    metrics/image_quality.csv     HU bias and noise per dose, against the input
    report.md                     the seed paper's Table 1 layout
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import platform
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from scipy import ndimage

from .core.doses import FULL_DOSE, dose_label
from .core.errors import InputError, OutputError
from .core.progress import NullProgress, ProgressSink
from .core.protocol import Protocol
from .core.units import mu_to_hu
from .core.volume import Volume, load_label_map, load_volume
from .reconstructor.wfbp import reconstruct
from .segmenter.backends import make_segmenter
from .segmenter.labels import LabelInfo, Segmentation, table_from_json, table_to_json
from .segmenter.metrics import aggregate, format_table1, format_table1_csv, per_label_metrics
from .simulator.synthesis import BODY_HU, plan_scan, simulate_dose, synthesise_counts

PER_LABEL_COLUMNS = ["study", "dose", "reference", "group", "label", "label_id", "dice",
                     "reference_voxels", "test_voxels", "volume_change_ml", "surface_dice", "hd95_mm"]


@dataclass(frozen=True)
class RunRequest:
    input_path: Path
    doses: list[float]  # validated, full dose included (see core.doses.parse_doses)
    protocol: Protocol
    segmenter: str
    seed: int
    out_dir: Path
    reference_seg: Path | None = None
    series_uid: str | None = None
    overwrite: bool = False


@dataclass
class RunResult:
    out_dir: Path
    report_markdown: str
    summary: dict
    timings_s: dict[str, float] = field(default_factory=dict)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("dosebench", "numpy", "numba", "scipy", "nibabel", "pydicom"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    if path.is_dir():
        return "folder"
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _prepare_output(out_dir: Path, overwrite: bool) -> Path:
    """Validate the target and return the hidden staging folder beside it."""
    out_dir = out_dir.resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"output {out_dir} exists and is not a folder", fix="choose another --out")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputError(f"output folder {out_dir} already exists and is not empty",
                          fix="choose another --out or pass --overwrite")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out_dir.parent} ({exc.strerror})", fix="choose another --out") from exc
    if not os.access(out_dir.parent, os.W_OK):
        raise OutputError(f"cannot write into {out_dir.parent}", fix="choose a writable --out")
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def _publish(staging: Path, out_dir: Path) -> None:
    """Move the finished staging folder into place (replacing an old result only now)."""
    out_dir = out_dir.resolve()
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out_dir, old)
    os.replace(staging, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def reference_label_table(seg_path: Path) -> dict[int, LabelInfo]:
    """Names of a reference segmentation's labels: a ``labels.json`` (dosebench's format) beside
    it, or ``<name>.labels.json``, else TotalSegmentator's 117-class ``total`` map when installed."""
    stem = seg_path.name.removesuffix(".gz").removesuffix(".nii")
    for candidate in (seg_path.parent / f"{stem}.labels.json", seg_path.parent / "labels.json"):
        if candidate.is_file():
            return table_from_json(json.loads(candidate.read_text()))
    try:
        from totalsegmentator.map_to_binary import class_map  # type: ignore[import-not-found]
    except ImportError:
        raise InputError(
            f"cannot name the labels of reference segmentation {seg_path.name}",
            fix="put a labels.json ({\"id\": {\"name\": ..., \"group\": ...}}) beside it, "
                "or install dosebench[totalseg] for TotalSegmentator's label names",
        ) from None
    return {int(i): LabelInfo(int(i), name, "reference") for i, name in class_map["total"].items()}


def _image_quality_row(dose: float, hu: np.ndarray, volume: Volume, body: np.ndarray) -> dict:
    difference = hu[body].astype(np.float64) - volume.hu[body]
    return {"dose": dose_label(dose), "hu_bias": round(float(difference.mean()), 3),
            "hu_error_std": round(float(difference.std()), 3), "body_voxels": int(body.sum())}


def run_study(request: RunRequest, progress: ProgressSink | None = None) -> RunResult:
    """Simulate, reconstruct, segment and compare every dose level of one study."""
    progress = progress or NullProgress()
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    # Everything that can be refused is checked before any heavy work or any file is written.
    volume = load_volume(request.input_path, request.series_uid)
    segmenter = make_segmenter(request.segmenter)
    reference_map = reference_table = None
    if request.reference_seg is not None:
        reference_map = load_label_map(request.reference_seg, volume)
        reference_table = reference_label_table(request.reference_seg)
    protocol = request.protocol
    geometry = plan_scan(volume, protocol.scanner)
    doses = sorted(set(request.doses) | {FULL_DOSE}, reverse=True)
    staging = _prepare_output(request.out_dir, request.overwrite)
    timings["load_and_plan"] = time.perf_counter() - clock

    try:
        study = volume.source_name.removesuffix(".gz").removesuffix(".nii")
        xs, ys, zs = volume.scanner_coordinates_mm()
        voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
        (staging / "recon").mkdir()
        (staging / "seg").mkdir()
        (staging / "metrics").mkdir()
        body = ndimage.binary_erosion(volume.hu > BODY_HU, iterations=2)

        clock = time.perf_counter()
        progress.start("synthesis", "full-dose acquisition (forward projection)", geometry.number_of_views)
        counts = synthesise_counts(volume, geometry, protocol.photons, request.seed, protocol.views_per_chunk,
                                   progress=lambda n: progress.advance("synthesis", n))
        progress.finish("synthesis")
        timings["synthesis"] = time.perf_counter() - clock

        segmentations: dict[float, Segmentation] = {}
        quality_rows = []
        for dose in doses:
            key = f"dose-{dose_label(dose)}"
            clock = time.perf_counter()
            progress.start(key, f"dose {dose_label(dose)}: simulate", geometry.number_of_views)
            line_integrals = simulate_dose(counts, geometry, protocol.photons, dose, request.seed,
                                           protocol.views_per_chunk,
                                           progress=lambda n, k=key: progress.advance(k, n))
            progress.finish(key)
            timings[f"simulate {dose_label(dose)}"] = time.perf_counter() - clock

            clock = time.perf_counter()
            progress.start(key + "-recon", f"dose {dose_label(dose)}: reconstruct + segment", 2)
            recon = reconstruct(line_integrals, geometry, protocol.reconstruction, xs, ys, zs)
            del line_integrals
            if recon.incomplete_voxels:
                raise RuntimeError(f"{recon.incomplete_voxels} voxels lack data: the helix does not cover the grid")
            # What is saved is what is segmented: HU rounded to the stored integers.
            hu = np.rint(mu_to_hu(recon.mu_per_mm, protocol.photons.mu_water_per_mm)).clip(-1024, 3071)
            volume.save_nifti(hu, staging / "recon" / f"{key}.nii.gz", dtype=np.int16)
            progress.advance(key + "-recon")
            timings[f"reconstruct {dose_label(dose)}"] = time.perf_counter() - clock

            clock = time.perf_counter()
            segmentation = segmenter.segment(hu.astype(np.float32), volume.spacing_mm)
            volume.save_nifti(segmentation.labels, staging / "seg" / f"{key}.nii.gz", dtype=np.uint16)
            segmentations[dose] = segmentation
            quality_rows.append(_image_quality_row(dose, hu, volume, body))
            progress.advance(key + "-recon")
            progress.finish(key + "-recon")
            timings[f"segment {dose_label(dose)}"] = time.perf_counter() - clock
        del counts

        clock = time.perf_counter()
        full = segmentations[FULL_DOSE]
        (staging / "seg" / "labels.json").write_text(json.dumps(table_to_json(full.table), indent=2))
        rows = []
        for dose in sorted(doses):
            for row in per_label_metrics(segmentations[dose].labels, full.labels, full.table, voxel_ml,
                                         spacing_mm=volume.spacing_mm):
                rows.append({"study": study, "dose": dose, "reference": "full_dose", **row})
        reference_rows = []
        shared_names: list[str] = []
        if reference_map is not None and reference_table is not None:
            by_name = {info.name: info for info in reference_table.values()}
            shared_names = sorted(name for name in (i.name for i in full.table.values()) if name in by_name)
            for dose in sorted(doses):
                test_map = segmentations[dose].labels
                for name in shared_names:
                    ours = next(i for i in full.table.values() if i.name == name)
                    theirs = by_name[name]
                    table = {1: LabelInfo(1, name, ours.group)}
                    metrics = per_label_metrics((test_map == ours.id).astype(np.uint8),
                                                (reference_map == theirs.id).astype(np.uint8), table, voxel_ml,
                                                spacing_mm=volume.spacing_mm)
                    for row in metrics:
                        row["label_id"] = ours.id
                        reference_rows.append({"study": study, "dose": dose, "reference": "reference_seg", **row})
        _write_csv(staging / "metrics" / "per_label.csv", rows + reference_rows)
        _write_csv(staging / "metrics" / "image_quality.csv", sorted(quality_rows, key=lambda r: r["dose"]))

        summary = {"study": study, "reference": "full_dose", "aggregation":
                   "per group: mean Dice over its labels per study, then median and MAD (unscaled) over studies",
                   "groups": aggregate(rows)}
        if reference_rows:
            summary["against_reference_segmentation"] = {"shared_labels": shared_names,
                                                         "groups": aggregate(reference_rows)}
        (staging / "metrics" / "summary.json").write_text(json.dumps(summary, indent=2))
        (staging / "metrics" / "summary.csv").write_text(format_table1_csv(summary["groups"], sorted(doses)))

        protocol_record = {
            "protocol": protocol.model_dump(mode="json"),
            "geometry": geometry.model_dump(mode="json"),
            "seed": request.seed,
            "doses": sorted(doses),
            "segmenter": {"spec": segmenter.spec, **segmenter.provenance},
            "dose_reduction": "exact Poisson thinning, Zabic et al. 2013: n_low = (1-f) Poisson(f/(1-f) n)",
            "input": {"name": volume.source_name, "sha256": _sha256(Path(request.input_path)),
                      "shape": list(volume.source_shape), "affine": volume.source_affine.tolist(),
                      "spacing_mm": list(volume.spacing_mm)},
            "reconstruction_grid": "the input grid (same shape and affine)",
            "reference_segmentation": str(request.reference_seg) if request.reference_seg else None,
            "versions": versions(),
            "command": " ".join(sys.argv),
        }
        (staging / "protocol.json").write_text(json.dumps(protocol_record, indent=2))
        report = _report(study, protocol, geometry.number_of_views, sorted(doses), summary, rows,
                         reference_rows, shared_names, quality_rows, request)
        (staging / "report.md").write_text(report)
        timings["metrics_and_report"] = time.perf_counter() - clock
        _publish(staging, request.out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RunResult(out_dir=request.out_dir.resolve(), report_markdown=report, summary=summary, timings_s=timings)


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(PER_LABEL_COLUMNS) if rows and "dice" in rows[0] else list(rows[0]) if rows else PER_LABEL_COLUMNS
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (dose_label(v) if k == "dose" and isinstance(v, float) else
                                 round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})


def _report(study: str, protocol: Protocol, n_views: int, doses: list[float], summary: dict, rows: list[dict],
            reference_rows: list[dict], shared_names: list[str], quality_rows: list[dict],
            request: RunRequest) -> str:
    lines = [
        f"# dosebench report: {study}",
        "",
        f"Protocol `{protocol.name}` ({protocol.description}); {n_views} views; seed {request.seed}; "
        f"segmenter `{request.segmenter}`. Low doses simulated from the full-dose counts by exact Poisson "
        "thinning (Zabic et al. 2013), reconstructed by helical WFBP.",
        "",
        format_table1(summary["groups"], doses, "Dice between low- and full-dose segmentations (median ± MAD)"),
        "One study: each cell is that study's mean Dice over the group's labels, so the MAD is 0; "
        "`dosebench table` aggregates runs of several studies (median ± MAD over studies).",
        "",
        "## Per label",
        "",
        "| Label | Group | " + " | ".join(f"{round(d * 100):g} %" for d in doses) + " |",
        "|:---|:---|" + "---:|" * len(doses),
    ]
    by_label: dict[tuple[str, str], dict[float, float]] = {}
    for row in rows:
        by_label.setdefault((row["label"], row["group"]), {})[row["dose"]] = row["dice"]
    for (label, group), values in by_label.items():
        cells = [f"{values[d]:.3f}" if d in values else "–" for d in doses]
        lines.append(f"| {label} | {group} | " + " | ".join(cells) + " |")
    lines += ["", "## Image quality (against the input CT, body voxels)", "",
              "| Dose | HU bias | HU error std |", "|---:|---:|---:|"]
    for q in sorted(quality_rows, key=lambda r: r["dose"]):
        lines.append(f"| {q['dose']} | {q['hu_bias']:.1f} | {q['hu_error_std']:.1f} |")
    if request.reference_seg is not None:
        lines += ["", "## Against the reference segmentation", ""]
        if reference_rows:
            lines.append(format_table1(summary["against_reference_segmentation"]["groups"], doses,
                                       f"Dice against {request.reference_seg.name} ({', '.join(shared_names)})"))
        else:
            lines.append(f"The segmenter's labels share no name with {request.reference_seg.name}: "
                         "no metrics against it.")
    return "\n".join(lines) + "\n"

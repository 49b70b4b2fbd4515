"""Stage executors: one study's work cut into stages that pass artifacts, not arrays.

Per job: ``acquire`` (the full-dose photon counts, once), then per dose ``simulate`` -> ``reconstruct``
-> ``segment``, and after every dose ``evaluate``. Each executor reads its inputs from artifact URLs,
calls the pure stage functions of the simulator, reconstructor and segmenter, and writes its outputs
under ``out_url`` (any fsspec URL). The embedded runner (:mod:`dosebench.pipeline`) and the Celery
tasks call these same functions, so both give identical bytes for the same job.

A stage is told where to write and never publishes anything itself: whoever calls it records the
outputs (the embedded runner by renaming its staging folder, the service by a database row).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import fsspec
import nibabel as nib
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import ndimage

from .core.doses import FULL_DOSE, dose_label, validate_dose_fraction
from .core.errors import Cancelled, InputError
from .core.geometry import HelicalGeometry
from .core.progress import NullProgress, ProgressSink
from .core.protocol import Protocol
from .core.units import mu_to_hu
from .core.volume import Volume, load_label_map, load_volume, write_atomic_nifti
from .reconstructor.store_io import StoreViews
from .reconstructor.wfbp import reconstruct
from .reports import figures
from .reports.html import render_html
from .segmenter.backends import make_segmenter
from .segmenter.labels import LabelInfo, Segmentation, table_from_json, table_to_json
from .segmenter.metrics import aggregate, format_table1, format_table1_csv, per_label_metrics
from .simulator.dicom_ct_pd import RawScan, air_counts_of, convert_to_store, is_dicom_ct_pd, scan_folder
from .simulator.photons import air_counts
from .simulator.store import create_store, open_store
from .simulator.synthesis import BODY_HU, plan_scan, synthesise_blocks, thin_block

STAGES = ("acquire", "simulate", "reconstruct", "segment", "evaluate")
PER_LABEL_COLUMNS = ["study", "dose", "reference", "group", "label", "label_id", "dice",
                     "reference_voxels", "test_voxels", "volume_change_ml", "surface_dice", "hd95_mm"]


class JobSpec(BaseModel):
    """Everything a stage needs to know about its job (stored with the job; JSON-serialisable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_url: str
    doses: list[float] = Field(min_length=1)
    protocol: Protocol
    segmenter: str = "threshold"
    seed: int = Field(default=7, ge=0)
    reference_seg_url: str | None = None
    series_uid: str | None = None
    study: str = ""

    @field_validator("doses")
    @classmethod
    def _doses(cls, value: list[float]) -> list[float]:
        return sorted({validate_dose_fraction(v) for v in value} | {FULL_DOSE}, reverse=True)


@dataclass(frozen=True)
class StageContext:
    """Hooks of whoever runs the stage: progress display or heartbeat, and the cancel flag."""

    progress: ProgressSink = NullProgress()
    should_cancel: Callable[[], bool] = lambda: False

    def check_cancel(self) -> None:
        if self.should_cancel():
            raise Cancelled("the job was cancelled")


# -- artifact I/O ------------------------------------------------------------------------------------

def _join(url: str, name: str) -> str:
    return f"{url.rstrip('/')}/{name}"


@contextmanager
def local_copy(url: str, suffix: str = ""):
    """A local path for ``url``: the path itself for local files, else a temporary download."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.protocol in ("file", ("file", "local")) or "file" in fs.protocol:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="dosebench-") as tmp:
        target = Path(tmp) / (Path(path).name or f"artifact{suffix}")
        fs.get(path, str(target), recursive=True)
        yield target


def _write_bytes(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    fs.pipe_file(path, data)


def _write_nifti(url: str, image: nib.Nifti1Image) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    if "file" in fs.protocol:
        write_atomic_nifti(image, Path(path))
        return
    with tempfile.TemporaryDirectory(prefix="dosebench-") as tmp:
        local = Path(tmp) / "image.nii.gz"
        nib.save(image, str(local))
        fs.makedirs(fs._parent(path), exist_ok=True)
        fs.put_file(str(local), path)


def _read_nifti(url: str) -> np.ndarray:
    with local_copy(url, ".nii.gz") as path:
        return np.asarray(nib.load(str(path)).dataobj)


def load_input(spec: JobSpec) -> Volume:
    with local_copy(spec.input_url) as path:
        return load_volume(path, spec.series_uid)


def study_name(spec: JobSpec, volume: Volume) -> str:
    return spec.study or volume.source_name.removesuffix(".gz").removesuffix(".nii").removesuffix(".zip")


def _nifti_like(volume: Volume, canonical: np.ndarray, dtype: type) -> nib.Nifti1Image:
    data = volume.to_source_orientation(canonical)
    image = nib.Nifti1Image(np.asarray(np.rint(data) if np.issubdtype(dtype, np.integer) else data, dtype=dtype),
                            volume.source_affine)
    image.set_qform(volume.source_affine, code=1)
    image.set_sform(volume.source_affine, code=1)
    return image


# -- validation (before any work) --------------------------------------------------------------------

def validate_job(spec: JobSpec) -> HelicalGeometry:
    """Everything that can be refused, checked up front: input, segmenter, reference, scan field."""
    volume = load_input(spec)
    make_segmenter(spec.segmenter)
    if spec.reference_seg_url is not None:
        with local_copy(spec.reference_seg_url, ".nii.gz") as path:
            load_label_map(path, volume)
            reference_label_table(path)
    return plan_scan(volume, spec.protocol.scanner)


# -- the stages ---------------------------------------------------------------------------------------

def acquire(spec: JobSpec, out_url: str, context: StageContext = StageContext()) -> dict[str, str]:
    """Full-dose photon counts of the study: synthesised from the image by forward projection, or, when
    the input is a DICOM-CT-PD folder of raw projections, converted from them (``N0 exp(-p)``)."""
    with local_copy(spec.input_url) as path:
        if is_dicom_ct_pd(path):
            return _acquire_raw(scan_folder(path), spec, out_url, context)
    volume = load_input(spec)
    protocol = spec.protocol
    geometry = plan_scan(volume, protocol.scanner)
    store = create_store(_join(out_url, "counts"), geometry, "counts", protocol.views_per_chunk,
                         attrs={"seed": spec.seed, "source": "synthesised from the input image"})
    context.progress.start("acquire", "full-dose acquisition (forward projection)", geometry.number_of_views)
    # one store block per seeding chunk: the blocks equal one whole-volume synthesis exactly
    for index, views, block in synthesise_blocks(volume, geometry, protocol.photons, spec.seed,
                                                 protocol.views_per_chunk):
        store.write_block(index, block)
        context.progress.advance("acquire", len(views))
        context.check_cancel()
    store.finalise()
    context.progress.finish("acquire")
    return {"counts": store.url}


def _acquire_raw(scan: RawScan, spec: JobSpec, out_url: str, context: StageContext) -> dict[str, str]:
    geometry = scan.geometry
    context.progress.start("acquire", "full-dose acquisition (raw projections)", geometry.number_of_views)
    store = convert_to_store(scan, _join(out_url, "counts"), spec.protocol.views_per_chunk,
                             progress=lambda n: context.progress.advance("acquire", n), check=context.check_cancel)
    context.progress.finish("acquire")
    return {"counts": store.url}


def simulate(spec: JobSpec, dose: float, counts_url: str, out_url: str,
             context: StageContext = StageContext()) -> dict[str, str]:
    """Line integrals of the acquisition at ``dose`` (exact Poisson thinning of the counts)."""
    counts_store = open_store(counts_url)
    geometry = counts_store.geometry
    key = f"simulate-{dose_label(dose)}"
    context.progress.start(key, f"dose {dose_label(dose)}: simulate", geometry.number_of_views)
    out = create_store(_join(out_url, "line_integrals"), geometry, "line_integrals", counts_store.views_per_block,
                       attrs={"dose_fraction": dose, "seed": spec.seed})
    if counts_store.views_per_block != spec.protocol.views_per_chunk:
        raise InputError(f"{counts_url} has {counts_store.views_per_block} views per block, the protocol "
                         f"{spec.protocol.views_per_chunk} views per chunk", fix="acquire the counts again")
    # raw data bring their own flat field; synthesised counts follow the protocol's photon model
    air = air_counts_of(counts_store)
    if air is None:
        air = air_counts(spec.protocol.photons, geometry)
    for index, (views, block) in enumerate(counts_store.iter_blocks()):
        context.check_cancel()
        # one block is one seeding chunk: the same draws as thinning the whole set at once
        out.write_block(index, thin_block(block, air[views.start:views.stop], dose, spec.seed, index,
                                          spec.protocol.photons.electronic_noise_sigma))
        context.progress.advance(key, len(views))
    out.finalise()
    context.progress.finish(key)
    return {"line_integrals": out.url}


def reconstruct_dose(spec: JobSpec, dose: float, line_integrals_url: str, out_url: str,
                     context: StageContext = StageContext()) -> dict[str, str]:
    """Helical WFBP of one dose on the input's grid, written as HU (int16) NIfTI."""
    volume = load_input(spec)
    store = open_store(line_integrals_url)
    key = f"reconstruct-{dose_label(dose)}"
    context.progress.start(key, f"dose {dose_label(dose)}: reconstruct", 1)
    context.check_cancel()
    xs, ys, zs = volume.scanner_coordinates_mm()
    # the store is streamed slab by slab (never read whole): a clinical projection set is held at most once
    recon = reconstruct(StoreViews(store), store.geometry, spec.protocol.reconstruction, xs, ys, zs)
    if recon.incomplete_voxels:
        raise RuntimeError(f"{recon.incomplete_voxels} voxels lack data: the helix does not cover the grid")
    hu = np.rint(mu_to_hu(recon.mu_per_mm, spec.protocol.photons.mu_water_per_mm)).clip(-1024, 3071)
    url = _join(out_url, "recon.nii.gz")
    _write_nifti(url, _nifti_like(volume, hu, np.int16))
    context.progress.finish(key)
    return {"recon": url}


def segment_dose(spec: JobSpec, dose: float, recon_url: str, out_url: str,
                 context: StageContext = StageContext()) -> dict[str, str]:
    """Segment one reconstruction (what is segmented is exactly the stored HU)."""
    volume = load_input(spec)
    key = f"segment-{dose_label(dose)}"
    context.progress.start(key, f"dose {dose_label(dose)}: segment", 1)
    context.check_cancel()
    hu = volume.canonical_from_source(_read_nifti(recon_url).astype(np.float32))
    segmentation = make_segmenter(spec.segmenter).segment(hu, volume.spacing_mm, affine=volume.affine,
                                                          should_cancel=context.should_cancel)
    url = _join(out_url, "seg.nii.gz")
    _write_nifti(url, _nifti_like(volume, segmentation.labels, np.uint16))
    labels_url = _join(out_url, "labels.json")
    _write_bytes(labels_url, json.dumps(table_to_json(segmentation.table), indent=2).encode())
    context.progress.finish(key)
    return {"seg": url, "labels": labels_url}


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


def evaluate(spec: JobSpec, recon_urls: dict[float, str], seg_urls: dict[float, str], labels_url: str,
             out_url: str, geometry: HelicalGeometry, versions: dict[str, str],
             context: StageContext = StageContext()) -> dict[str, str]:
    """Metrics of every dose against the full dose (and a reference segmentation), and the report."""
    volume = load_input(spec)
    study = study_name(spec, volume)
    doses = sorted(spec.doses)
    context.progress.start("evaluate", "metrics and report", len(doses))
    table = table_from_json(json.loads(fsspec.open(labels_url, "rb").open().read()))
    labels = {d: volume.canonical_from_source(_read_nifti(seg_urls[d]).astype(np.int32)) for d in doses}
    full = labels[FULL_DOSE]
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    body = ndimage.binary_erosion(volume.hu > BODY_HU, iterations=2)
    rows, quality_rows = [], []
    for dose in doses:
        context.check_cancel()
        for row in per_label_metrics(labels[dose], full, table, voxel_ml, spacing_mm=volume.spacing_mm):
            rows.append({"study": study, "dose": dose, "reference": "full_dose", **row})
        hu = volume.canonical_from_source(_read_nifti(recon_urls[dose]).astype(np.float32))
        difference = hu[body].astype(np.float64) - volume.hu[body]
        quality_rows.append({"dose": dose_label(dose), "hu_bias": round(float(difference.mean()), 3),
                             "hu_error_std": round(float(difference.std()), 3), "body_voxels": int(body.sum())})
        context.progress.advance("evaluate")

    reference_rows: list[dict] = []
    shared: list[str] = []
    if spec.reference_seg_url is not None:
        with local_copy(spec.reference_seg_url, ".nii.gz") as path:
            reference_map = load_label_map(path, volume)
            reference_table = reference_label_table(path)
        by_name = {info.name: info for info in reference_table.values()}
        ours_by_name = {info.name: info for info in table.values()}
        shared = sorted(set(ours_by_name) & set(by_name))
        for dose in doses:
            for name in shared:
                ours, theirs = ours_by_name[name], by_name[name]
                single = {1: LabelInfo(1, name, ours.group)}
                for row in per_label_metrics((labels[dose] == ours.id).astype(np.uint8),
                                             (reference_map == theirs.id).astype(np.uint8), single, voxel_ml,
                                             spacing_mm=volume.spacing_mm):
                    row["label_id"] = ours.id
                    reference_rows.append({"study": study, "dose": dose, "reference": "reference_seg", **row})

    summary: dict = {"study": study, "reference": "full_dose",
                     "aggregation": "per group: mean Dice over its labels per study, "
                                    "then median and MAD (unscaled) over studies",
                     "groups": aggregate(rows)}
    if reference_rows:
        summary["against_reference_segmentation"] = {"shared_labels": shared, "groups": aggregate(reference_rows)}
    record = {
        "protocol": spec.protocol.model_dump(mode="json"),
        "geometry": geometry.model_dump(mode="json"),
        "seed": spec.seed,
        "doses": doses,
        "segmenter": {"spec": spec.segmenter, **make_segmenter(spec.segmenter).provenance},
        "dose_reduction": "exact Poisson thinning, Zabic et al. 2013: n_low = (1-f) Poisson(f/(1-f) n)",
        "input": {"name": volume.source_name, "shape": list(volume.source_shape),
                  "affine": volume.source_affine.tolist(), "spacing_mm": list(volume.spacing_mm)},
        "reconstruction_grid": "the input grid (same shape and affine)",
        "reference_segmentation": spec.reference_seg_url,
        "versions": versions,
    }
    images = _figures(volume, recon_urls, labels, body, doses, summary["groups"], study)
    report_md = _report(study, spec, geometry.number_of_views, doses, summary, rows, reference_rows, shared,
                        quality_rows)
    outputs: dict[str, str | bytes] = {
        "per_label.csv": _csv(rows + reference_rows, PER_LABEL_COLUMNS),
        # every metric row at full precision (per_label.csv rounds to 6 decimals)
        "metrics.json": json.dumps({"study": study, "non_finite": "written as null (HD95 is infinite when a "
                                    "label is present in only one map)", "rows": [
            {k: _finite_or_none(v) for k, v in r.items()} for r in rows + reference_rows]}, indent=1),
        "image_quality.csv": _csv(quality_rows, list(quality_rows[0])),
        "summary.json": json.dumps(summary, indent=2),
        "summary.csv": format_table1_csv(summary["groups"], doses),
        "protocol.json": json.dumps(record, indent=2),
        "report.md": report_md,
        **images,
        "report.html": render_html(f"dosebench report: {study}", report_md,
                                   {k: v for k, v in images.items() if k.endswith(".png")}),
    }
    urls = {}
    for name, content in outputs.items():
        urls[name] = _join(out_url, name)
        _write_bytes(urls[name], content if isinstance(content, bytes) else content.encode())
    context.progress.finish("evaluate")
    return urls


def _figures(volume: Volume, recon_urls: dict[float, str], labels: dict[float, np.ndarray], body: np.ndarray,
             doses: list[float], groups: dict, study: str) -> dict[str, bytes]:
    """The job's figures as PNG, each with the numbers it plots as JSON beside it."""
    recon = {d: volume.canonical_from_source(_read_nifti(recon_urls[d]).astype(np.float32)) for d in doses}
    low = doses[0]  # the lowest dose: where the segmentations differ most
    dice_data = figures.dice_vs_dose_data(groups, doses)
    figure1 = figures.figure1_data(recon[FULL_DOSE], recon[low], labels[FULL_DOSE], labels[low], low)
    noise = figures.noise_vs_dose_data(volume.hu, recon, figures.homogeneous_region(volume.hu, body))
    return {
        "dice_vs_dose.png": figures.dice_vs_dose_png(groups, doses, f"{study}: Dice against dose"),
        "dice_vs_dose.json": json.dumps(dice_data, indent=1).encode(),
        "figure1.png": figures.figure1_png(recon[FULL_DOSE], recon[low], labels[FULL_DOSE], labels[low], low,
                                           figure1["slice_index"]),
        "figure1.json": json.dumps(figure1, indent=1).encode(),
        "noise_vs_dose.png": figures.noise_vs_dose_png(noise, f"{study}: image noise against dose"),
        "noise_vs_dose.json": json.dumps(noise, indent=1).encode(),
    }


def _finite_or_none(value: object) -> object:
    # JSON has no infinity or NaN
    return None if isinstance(value, float) and not np.isfinite(value) else value


def _csv(rows: list[dict], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator=os.linesep)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (dose_label(v) if k == "dose" and isinstance(v, float) else
                             round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def _report(study: str, spec: JobSpec, n_views: int, doses: list[float], summary: dict, rows: list[dict],
            reference_rows: list[dict], shared_names: list[str], quality_rows: list[dict]) -> str:
    protocol = spec.protocol
    lines = [
        f"# dosebench report: {study}",
        "",
        f"Protocol `{protocol.name}` ({protocol.description}); {n_views} views; seed {spec.seed}; "
        f"segmenter `{spec.segmenter}`. Low doses simulated from the full-dose counts by exact Poisson "
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
    lines += ["", "## Figures", "",
              "![Median Dice per group against dose; the band is median ± MAD](dice_vs_dose.png)", "",
              f"![Figure 1: full dose and {round(doses[0] * 100):g} % dose, their segmentations and where they "
              "differ (the axial slice with the most differing voxels)](figure1.png)", "",
              "![Quantum noise (HU std) in a flat soft-tissue region of the input against dose, with the "
              "1/√dose curve; the input's own texture, the same at every dose, is separated out by the "
              "dose-reduction model (see noise_vs_dose.json)](noise_vs_dose.png)", "",
              "The numbers behind each figure are in the JSON file of the same name."]
    lines += ["", "## Image quality (against the input CT, body voxels)", "",
              "| Dose | HU bias | HU error std |", "|---:|---:|---:|"]
    for q in sorted(quality_rows, key=lambda r: r["dose"]):
        lines.append(f"| {q['dose']} | {q['hu_bias']:.1f} | {q['hu_error_std']:.1f} |")
    if spec.reference_seg_url is not None:
        name = Path(spec.reference_seg_url).name
        lines += ["", "## Against the reference segmentation", ""]
        if reference_rows:
            lines.append(format_table1(summary["against_reference_segmentation"]["groups"], doses,
                                       f"Dice against {name} ({', '.join(shared_names)})"))
        else:
            lines.append(f"The segmenter's labels share no name with {name}: no metrics against it.")
    return "\n".join(lines) + "\n"


def stage_key(job_id: str, stage: str, dose: float | None, attempt: int) -> str:
    """Deterministic artifact prefix: ``jobs/<job>/<stage>/<dose>/attempt-<n>``."""
    dose_part = dose_label(dose) if dose is not None else "all"
    return f"jobs/{job_id}/{stage}/{dose_part}/attempt-{attempt}"


def label_table_of(segmentation: Segmentation) -> dict:
    return table_to_json(segmentation.table)

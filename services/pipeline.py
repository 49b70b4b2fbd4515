"""The embedded runner: one study through every stage in this process, results in a folder.

It runs the stage executors of :mod:`dosebench.stages` (the same the service's workers run) in
sequence, lays out the output folder and keeps it all-or-nothing: everything is written into a hidden
sibling folder that is renamed into place at the very end, so a failed or interrupted run leaves no
partial output behind.

Output folder layout::

    protocol.json                 scan geometry, photon model, reconstruction settings, seed, versions
    recon/dose-0.20.nii.gz ...    reconstructions in HU, on the input's grid (same shape and affine)
    seg/dose-0.20.nii.gz ...      label maps, plus seg/labels.json
    metrics/per_label.csv         one row per dose x label (x reference)
    metrics/summary.json          median ± MAD per group and dose (summary.csv: the same as a table)
    metrics/image_quality.csv     HU bias and noise per dose, against the input
    metrics/metrics.json          every per-label row at full precision (non-finite values as null)
    figures/dice_vs_dose.png ...  the figures (dice_vs_dose, figure1, noise_vs_dose), each with a .json
                                  of the numbers it plots
    report.md                     the seed paper's Table 1 layout, linking the figures
    report.html                   the same report, self-contained (figures embedded)
"""

from __future__ import annotations

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

from . import stages
from .core.doses import FULL_DOSE, dose_label
from .core.errors import OutputError
from .core.progress import NullProgress, ProgressSink
from .core.protocol import Protocol
from .reports.figures import FIGURE_NAMES
from .stages import JobSpec, StageContext, validate_job


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


def run_study(request: RunRequest, progress: ProgressSink | None = None) -> RunResult:
    """Simulate, reconstruct, segment and compare every dose level of one study, in this process.

    Runs the same stage executors as the service's workers (:mod:`dosebench.stages`) on a local
    workspace inside the staging folder, then lays the results out as the output folder.
    """
    progress = progress or NullProgress()
    context = StageContext(progress=progress)
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    spec = JobSpec(input_url=str(Path(request.input_path).resolve()), doses=request.doses,
                   protocol=request.protocol, segmenter=request.segmenter, seed=request.seed,
                   reference_seg_url=str(Path(request.reference_seg).resolve()) if request.reference_seg else None,
                   series_uid=request.series_uid)
    # Everything that can be refused is checked before any heavy work or any file is written.
    geometry = validate_job(spec)
    staging = _prepare_output(request.out_dir, request.overwrite)
    timings["load_and_plan"] = time.perf_counter() - clock

    try:
        work = staging / ".work"

        def timed(name, function, *args):
            started = time.perf_counter()
            result = function(*args)
            timings[name] = time.perf_counter() - started
            return result

        counts = timed("acquire", stages.acquire, spec, str(work / "acquire"), context)["counts"]
        recon_urls, seg_urls, labels_url = {}, {}, ""
        for dose in spec.doses:
            label = dose_label(dose)
            simulated = timed(f"simulate {label}", stages.simulate, spec, dose, counts,
                              str(work / f"simulate-{label}"), context)
            recon = timed(f"reconstruct {label}", stages.reconstruct_dose, spec, dose,
                          simulated["line_integrals"], str(work / f"reconstruct-{label}"), context)
            shutil.rmtree(work / f"simulate-{label}")  # the projections are not kept
            seg = timed(f"segment {label}", stages.segment_dose, spec, dose, recon["recon"],
                        str(work / f"segment-{label}"), context)
            recon_urls[dose], seg_urls[dose] = recon["recon"], seg["seg"]
            if dose == FULL_DOSE:
                labels_url = seg["labels"]
        evaluated = timed("evaluate", stages.evaluate, spec, recon_urls, seg_urls, labels_url,
                          str(work / "evaluate"), geometry, versions(), context)

        # the output folder's layout
        for folder in ("recon", "seg", "metrics"):
            (staging / folder).mkdir()
        for dose in spec.doses:
            name = f"dose-{dose_label(dose)}.nii.gz"
            os.replace(recon_urls[dose], staging / "recon" / name)
            os.replace(seg_urls[dose], staging / "seg" / name)
        os.replace(labels_url, staging / "seg" / "labels.json")
        for name in ("per_label.csv", "image_quality.csv", "summary.json", "summary.csv"):
            os.replace(evaluated[name], staging / "metrics" / name)
        record = json.loads(Path(evaluated["protocol.json"]).read_text())
        record["input"]["sha256"] = _sha256(Path(request.input_path))
        record["command"] = " ".join(sys.argv)
        (staging / "protocol.json").write_text(json.dumps(record, indent=2))
        os.replace(evaluated["metrics.json"], staging / "metrics" / "metrics.json")
        # the figures (PNG and the JSON of their numbers) in figures/; report.md links them there
        (staging / "figures").mkdir()
        report = Path(evaluated["report.md"]).read_text()
        for name in FIGURE_NAMES:
            for suffix in (".png", ".json"):
                os.replace(evaluated[name + suffix], staging / "figures" / (name + suffix))
            report = report.replace(f"]({name}.png)", f"](figures/{name}.png)")
        (staging / "report.md").write_text(report)
        os.replace(evaluated["report.html"], staging / "report.html")  # self-contained: images inline
        summary = json.loads((staging / "metrics" / "summary.json").read_text())
        shutil.rmtree(work)
        _publish(staging, request.out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return RunResult(out_dir=request.out_dir.resolve(), report_markdown=report, summary=summary, timings_s=timings)

"""``dosebench simulate``: projections only, all or nothing.

Runs the ``acquire`` and ``simulate`` stage executors of :mod:`dosebench.stages` (the same as ``dosebench
run`` and the service's workers) into a hidden staging folder that is renamed into place at the end.

Output folder layout::

    counts/                       full-dose photon counts (a projection store; raw data: N0 exp(-p), with air.npy)
    dose-0.20/line_integrals/     line integrals at each dose (a projection store each; 1.00 included)
    protocol.json                 protocol, geometry, seed, doses, input, versions
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from . import stages
from .core.doses import dose_label
from .core.progress import NullProgress, ProgressSink
from .core.protocol import Protocol
from .pipeline import _prepare_output, _publish, versions
from .simulator.dicom_ct_pd import is_dicom_ct_pd, scan_folder
from .simulator.synthesis import plan_scan
from .stages import JobSpec, StageContext


@dataclass(frozen=True)
class SimulateRequest:
    input_path: Path
    doses: list[float]
    protocol: Protocol
    seed: int
    out_dir: Path
    series_uid: str | None = None
    overwrite: bool = False


def simulate_projections(request: SimulateRequest, progress: ProgressSink | None = None) -> Path:
    """Write the full-dose counts and every dose's line integrals of one study into ``request.out_dir``."""
    input_path = Path(request.input_path).resolve()
    spec = JobSpec(input_url=str(input_path), doses=request.doses, protocol=request.protocol, seed=request.seed,
                   series_uid=request.series_uid)
    # everything that can be refused is checked before a file is written
    if is_dicom_ct_pd(input_path):
        scan = scan_folder(input_path)
        geometry, source = scan.geometry, {"kind": "DICOM-CT-PD raw projections", **scan.attrs()}
    else:
        volume = stages.load_input(spec)
        geometry = plan_scan(volume, spec.protocol.scanner)
        source = {"kind": "CT volume", "name": volume.source_name, "shape": list(volume.source_shape),
                  "affine": volume.source_affine.tolist(), "spacing_mm": list(volume.spacing_mm)}
    staging = _prepare_output(request.out_dir, request.overwrite)
    try:
        context = StageContext(progress=progress or NullProgress())
        counts_url = stages.acquire(spec, str(staging), context)["counts"]
        stores = {"counts": "counts"}
        for dose in spec.doses:
            folder = f"dose-{dose_label(dose)}"
            stages.simulate(spec, dose, counts_url, str(staging / folder), context)
            stores[dose_label(dose)] = f"{folder}/line_integrals"
        record = {
            "protocol": spec.protocol.model_dump(mode="json"),
            "geometry": geometry.model_dump(mode="json"),
            "geometry_source": "the raw data's headers (the protocol's scanner is not used)"
            if source["kind"].startswith("DICOM-CT-PD") else "the protocol's scanner, planned to cover the input",
            "seed": spec.seed,
            "doses": spec.doses,
            "stores": stores,
            "dose_reduction": "exact Poisson thinning, Zabic et al. 2013: n_low = (1-f) Poisson(f/(1-f) n)",
            "input": {"path": str(input_path), **source},
            "versions": versions(),
            "command": " ".join(sys.argv),
        }
        (staging / "protocol.json").write_text(json.dumps(record, indent=2))
        _publish(staging, request.out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Path(request.out_dir).resolve()

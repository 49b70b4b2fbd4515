"""Reconstruct a line-integral projection store (as :mod:`dosebench.simulator.store` writes it) onto the
grid of :class:`ReconstructionSettings` and write HU as NIfTI (``dosebench reconstruct``).

The NIfTI's world frame for raw projection data is the scanner frame read as RAS: x -> R, y -> A,
z (the rotation axis, along the table) -> S, in mm, isocentre at the origin. Its affine maps voxel
indices exactly onto the reconstruction grid's voxel centres (:func:`grid.grid_affine`).
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from ..core.errors import InputError
from ..core.protocol import MU_WATER_120KVP_PER_MM, ReconstructionSettings
from ..core.units import mu_to_hu
from ..core.volume import write_atomic_nifti
from ..simulator.store import open_store
from .grid import Profile, reconstruct_grid
from .wfbp import DEFAULT_MAX_SLAB_BYTES, Backend


def reconstruct_store(projections_url: str, out_dir: Path, settings: ReconstructionSettings,
                      backend: Backend = "auto", profile: Profile = "triangle",
                      mu_water_per_mm: float = MU_WATER_120KVP_PER_MM,
                      max_slab_bytes: int = DEFAULT_MAX_SLAB_BYTES, overwrite: bool = False) -> Path:
    """Write ``out_dir/recon.nii.gz`` (int16 HU) and ``out_dir/recon.json`` (grid and settings)."""
    store = open_store(projections_url)
    if store.quantity != "line_integrals":
        raise InputError(f"{projections_url} holds {store.quantity}, not line integrals",
                         fix="give the line_integrals store of a dose level (simulate output)")
    out_dir = Path(out_dir)
    target = out_dir / "recon.nii.gz"
    if target.exists() and not overwrite:
        raise InputError(f"{target} exists", fix="choose another --out folder or pass --overwrite")
    try:
        result = reconstruct_grid(store.read_all(), store.geometry, settings, profile=profile, backend=backend,
                                  max_slab_bytes=max_slab_bytes)
    except ValueError as exc:
        raise InputError(f"cannot reconstruct {projections_url}: {exc}",
                         fix="check --fov-mm, --matrix, --thickness-mm and --increment-mm") from exc
    hu = np.rint(mu_to_hu(result.mu_per_mm, mu_water_per_mm)).clip(-1024, 3071).astype(np.int16)
    image = nib.Nifti1Image(hu, result.affine)
    image.set_qform(result.affine, code=1)  # scanner-based
    image.set_sform(result.affine, code=1)
    image.header.set_xyzt_units("mm")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic_nifti(image, target)
    plan = result.plan
    meta = {"source": str(projections_url), "world_frame": "scanner frame as RAS: x->R, y->A, z (rotation axis)->S",
            "shape": list(plan.shape), "affine": result.affine.tolist(),
            "slice_thickness_mm": plan.thickness_mm, "slice_increment_mm": plan.increment_mm,
            "slice_profile": profile if plan.weights is not None else None,
            "native_slices": int(plan.native_zs_mm.size), "incomplete_voxels": result.incomplete_voxels,
            "settings": settings.model_dump(mode="json"), "mu_water_per_mm": mu_water_per_mm}
    (out_dir / "recon.json").write_text(json.dumps(meta, indent=2))
    return target

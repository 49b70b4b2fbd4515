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
from ..simulator.store import ProjectionStore, open_store
from .grid import Profile, reconstruct_grid
from .wfbp import DEFAULT_MAX_SLAB_BYTES, Backend


class StoreViews:
    """A projection store seen as a (views, rows, columns) array that is read only where it is sliced:
    ``views[a:b]`` reads the blocks that hold views a..b-1. The reconstructors take it in place of an
    array, so a store is streamed, never read whole (numba: slab by slab; torch: block by block of views)."""

    def __init__(self, store: ProjectionStore):
        self.store = store
        self.shape = store.shape
        self.dtype = np.dtype(store.dtype)
        self.ndim = 3

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("a projection store is read by contiguous view ranges (views[a:b])")
        start, stop, _ = index.indices(self.shape[0])
        return self.store.read_views(range(start, max(start, stop)))


def reconstruct_store(projections_url: str, out_dir: Path, settings: ReconstructionSettings,
                      backend: Backend = "auto", profile: Profile = "triangle",
                      mu_water_per_mm: float = MU_WATER_120KVP_PER_MM,
                      max_slab_bytes: int = DEFAULT_MAX_SLAB_BYTES, overwrite: bool = False) -> Path:
    """Write ``out_dir/recon.nii.gz`` (int16 HU) and ``out_dir/recon.json`` (grid and settings).

    The store is streamed (:class:`StoreViews`): the numba backend's working set of views stays below
    ``max_slab_bytes``; the torch backend holds the rebinned set once (its own bound is on the device)."""
    store = open_store(projections_url)
    if store.quantity != "line_integrals":
        raise InputError(f"{projections_url} holds {store.quantity}, not line integrals",
                         fix="give the line_integrals store of a dose level (simulate output)")
    out_dir = Path(out_dir)
    target = out_dir / "recon.nii.gz"
    if target.exists() and not overwrite:
        raise InputError(f"{target} exists", fix="choose another --out folder or pass --overwrite")
    try:
        # streamed: only the view blocks each slab needs are read, never the whole set at once
        result = reconstruct_grid(StoreViews(store), store.geometry, settings,  # type: ignore[arg-type]
                                  profile=profile, backend=backend, max_slab_bytes=max_slab_bytes)
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

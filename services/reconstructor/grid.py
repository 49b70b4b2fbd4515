"""Reconstruction grids from :class:`ReconstructionSettings`: field of view, matrix, slice thickness
and increment.

In-plane: ``matrix`` x ``matrix`` square pixels of ``fov_mm / matrix`` centred on the isocentre (the
rotation axis). Either field left None takes a default: ``fov_mm`` the scan field's diameter, ``matrix``
512.

Along z: thin *native* slices are reconstructed every ``native_step`` mm, at most the row pitch at the
isocentre and at most half the thickness, and an integer fraction of the increment so that every
output slice centre is a native slice. Output slices of ``slice_thickness_mm`` every
``slice_increment_mm`` are weighted sums of native slices with a slice-sensitivity profile:

* ``triangle`` (default): weight ``max(0, 1 - |z - z_k| / T)``: a triangle of FWHM ``T`` (the usual
  definition of a slice's thickness), support ``2 T``;
* ``rect``: weight 1 for ``|z - z_k| < T/2`` (1/2 on the edges), support ``T``;

normalised to sum 1 per output slice. The nominal profile adds to the native slices' own profile (set by
the aperture weighting, about one detector row at the isocentre), so the effective FWHM is slightly above
``T`` for thicknesses near the row pitch.

Only ``slice_increment_mm`` given: the thickness is the increment. Only ``slice_thickness_mm``: the
increment is the thickness. Neither (and a ``default_grid`` given): that grid's slices as they are.

The z range of output slice centres: ``z_range_mm`` if given, else the default grid's first and last
slice, else every position where the helix covers the whole profile for the whole scan field (from the
geometry), with the slices centred on that range.

World frame: the scanner frame (mm; isocentre at the origin, rotation axis z) taken as RAS: x -> R,
y -> A, z -> S. The affine maps voxel indices (i, j, k) to (xs[i], ys[j], zs[k]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ..core.geometry import HelicalGeometry
from ..core.protocol import ReconstructionSettings
from .wfbp import DEFAULT_MAX_SLAB_BYTES, Backend, Reconstruction, reconstruct

Profile = Literal["triangle", "rect"]
Grid = tuple[np.ndarray, np.ndarray, np.ndarray]

DEFAULT_MATRIX = 512


@dataclass(frozen=True)
class GridPlan:
    xs_mm: np.ndarray
    ys_mm: np.ndarray
    zs_mm: np.ndarray  # output slice centres
    native_zs_mm: np.ndarray  # thin slices reconstructed
    weights: np.ndarray | None  # (output slices, native slices); None: output = native
    thickness_mm: float | None
    increment_mm: float | None

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.xs_mm.size, self.ys_mm.size, self.zs_mm.size)

    @property
    def affine(self) -> np.ndarray:
        return grid_affine(self.xs_mm, self.ys_mm, self.zs_mm, self.increment_mm)


def _step(values: np.ndarray, fallback: float) -> float:
    if values.size < 2:
        return fallback
    steps = np.diff(values)
    if not np.allclose(steps, steps[0], rtol=1e-6, atol=1e-9):
        raise ValueError("a NIfTI affine needs equally spaced voxel centres")
    return float(steps[0])


def grid_affine(xs_mm: np.ndarray, ys_mm: np.ndarray, zs_mm: np.ndarray, z_fallback: float | None = None) -> np.ndarray:
    """Voxel (i, j, k) -> scanner-frame mm, read as RAS (x -> R, y -> A, z -> S)."""
    dx = _step(xs_mm, 1.0)
    dy = _step(ys_mm, dx)
    dz = _step(zs_mm, z_fallback or 1.0)
    affine = np.diag([dx, dy, dz, 1.0])
    affine[:3, 3] = [xs_mm[0], ys_mm[0], zs_mm[0]]
    return affine


def profile_half_support(thickness_mm: float, profile: Profile) -> float:
    return thickness_mm if profile == "triangle" else thickness_mm / 2.0


def slice_weights(native_zs_mm: np.ndarray, zs_mm: np.ndarray, thickness_mm: float,
                  profile: Profile = "triangle") -> np.ndarray:
    """(output slices, native slices) weights of the slice-sensitivity profile, rows summing to 1."""
    d = np.abs(zs_mm[:, None] - native_zs_mm[None, :])
    if profile == "triangle":
        w = np.clip(1.0 - d / thickness_mm, 0.0, None)
    elif profile == "rect":
        half = thickness_mm / 2.0
        eps = 1e-9 * max(1.0, thickness_mm)
        w = np.where(d < half - eps, 1.0, np.where(d <= half + eps, 0.5, 0.0))
    else:
        raise ValueError(f"unknown slice profile {profile!r}")
    sums = w.sum(axis=1, keepdims=True)
    if np.any(sums <= 0):
        raise ValueError("a slice has no native slice within its profile")
    return w / sums


def covered_z_range(geometry: HelicalGeometry, half_support_mm: float = 0.0) -> tuple[float, float]:
    """Slice centres whose profile the helix fully covers, for every point of the scan field."""
    margin = geometry.z_reach_mm(geometry.scan_field_radius_mm) + 0.5 * geometry.table_feed_per_turn_mm
    lo = geometry.start_z_mm + margin + half_support_mm
    hi = geometry.end_z_mm - margin - half_support_mm
    if hi < lo:
        raise ValueError("the helix is too short to cover one slice of the requested thickness")
    return lo, hi


def plan_grid(geometry: HelicalGeometry, settings: ReconstructionSettings, default_grid: Grid | None = None,
              z_range_mm: tuple[float, float] | None = None, profile: Profile = "triangle") -> GridPlan:
    """The output grid and native slices for ``settings`` (see the module docstring)."""
    # in-plane
    if settings.fov_mm is None and settings.matrix is None and default_grid is not None:
        xs = np.asarray(default_grid[0], np.float64)
        ys = np.asarray(default_grid[1], np.float64)
    else:
        fov = settings.fov_mm if settings.fov_mm is not None else 2.0 * geometry.scan_field_radius_mm
        matrix = settings.matrix if settings.matrix is not None else DEFAULT_MATRIX
        pixel = fov / matrix
        xs = (np.arange(matrix) - (matrix - 1) / 2.0) * pixel
        ys = xs.copy()
    # along z
    thickness, increment = settings.slice_thickness_mm, settings.slice_increment_mm
    if thickness is None and increment is None:
        if default_grid is not None and z_range_mm is None:
            zs = np.asarray(default_grid[2], np.float64)
            return GridPlan(xs, ys, zs, zs, None, None, None)
        thickness = geometry.row_height_at_isocenter_mm
    thickness = float(thickness if thickness is not None else increment)
    increment = float(increment if increment is not None else thickness)
    if thickness <= 0 or increment <= 0:
        raise ValueError("slice thickness and increment must be positive")
    half_support = profile_half_support(thickness, profile)
    if z_range_mm is not None:
        lo, hi = float(min(z_range_mm)), float(max(z_range_mm))
    elif default_grid is not None:
        lo, hi = float(np.min(default_grid[2])), float(np.max(default_grid[2]))
    else:
        lo, hi = covered_z_range(geometry, half_support)
    n_out = int(math.floor((hi - lo) / increment + 1e-9)) + 1
    zs = 0.5 * (lo + hi) + (np.arange(n_out) - (n_out - 1) / 2.0) * increment
    ratio = int(math.ceil(increment / min(geometry.row_height_at_isocenter_mm, thickness / 2.0) - 1e-9))
    native_step = increment / ratio
    n_side = int(math.ceil(half_support / native_step - 1e-9))
    native = zs[0] + np.arange(-n_side, (n_out - 1) * ratio + n_side + 1) * native_step
    weights = slice_weights(native, zs, thickness, profile)
    # native slices no output slice uses (the profile's zero ends) are not reconstructed
    used = np.flatnonzero(weights.any(axis=0))
    native, weights = native[used[0]:used[-1] + 1], weights[:, used[0]:used[-1] + 1]
    return GridPlan(xs, ys, zs, native, weights, thickness, increment)


@dataclass(frozen=True)
class GridReconstruction:
    mu_per_mm: np.ndarray  # float32 (nx, ny, nz) on the output grid
    affine: np.ndarray  # voxel -> scanner frame mm (read as RAS)
    #: output voxels some of whose native voxels lacked data for some parallel directions
    incomplete_voxels: int
    plan: GridPlan


def combine_slices(native: Reconstruction, plan: GridPlan) -> tuple[np.ndarray, int]:
    if plan.weights is None:
        return native.mu_per_mm, native.incomplete_voxels
    mu = np.tensordot(native.mu_per_mm.astype(np.float64), plan.weights.T, axes=([2], [0])).astype(np.float32)
    mask = native.incomplete_mask
    if mask is None:
        mask = np.zeros(native.mu_per_mm.shape, bool)
    used = (plan.weights > 0).astype(np.float32)
    incomplete = int((np.tensordot(mask.astype(np.float32), used.T, axes=([2], [0])) > 0).sum())
    return mu, incomplete


def reconstruct_grid(line_integrals: np.ndarray, geometry: HelicalGeometry, settings: ReconstructionSettings,
                     default_grid: Grid | None = None, z_range_mm: tuple[float, float] | None = None,
                     profile: Profile = "triangle", backend: Backend = "auto",
                     max_slab_bytes: int = DEFAULT_MAX_SLAB_BYTES) -> GridReconstruction:
    """WFBP onto the grid ``settings`` ask for (see the module docstring); with every grid field None
    and a ``default_grid``, exactly :func:`wfbp.reconstruct` on that grid."""
    plan = plan_grid(geometry, settings, default_grid, z_range_mm, profile)
    native = reconstruct(line_integrals, geometry, settings, plan.xs_mm, plan.ys_mm, plan.native_zs_mm,
                         backend=backend, max_slab_bytes=max_slab_bytes)
    mu, incomplete = combine_slices(native, plan)
    return GridReconstruction(mu_per_mm=mu, affine=plan.affine, incomplete_voxels=incomplete, plan=plan)

"""Helical cone-beam forward projector (Joseph's method), numba-parallel on the CPU, and its adjoint.

Each ray steps through the volume one voxel plane at a time along its dominant in-plane axis (x or
y) and interpolates bilinearly in the other two axes (Joseph 1982); the sum times the step length is
the line integral. The volume is centred on the isocentre (scanner frame, see
:mod:`dosebench.core.geometry` and :mod:`dosebench.core.volume`); it is zero outside its grid in x
and y, and continues beyond its first and last slice as those slices (a patient is longer than the
scanned slab). Rays run from the actual source (flying focal spot included) to the nominal detector
element (:meth:`~dosebench.core.geometry.HelicalGeometry.ray_directions`).

How the kernel is made fast (none of it changes a sum beyond float32 rounding):

* one task per (view, column): the rows of a column share their in-plane path, so the plane loop is
  outside and the row loop inside; a plane's samples of all rows are then neighbours along z, the
  volume's contiguous axis, and share the in-plane interpolation and the plane's bounds test;
* float32 volume and sample arithmetic (positions in voxel indices, linear in the plane index),
  per-view and per-column terms precomputed, ``fastmath``;
* branch-free bilinear sampling: the volume is copied inside a zero border, sample positions are
  clamped into it (z clamping is the model's), and offsets are unsigned 32-bit;
* empty space is skipped: the volume is cropped to its non-zero columns in x and y, each ray's planes
  are clipped to those its in-plane position falls into, and planes whose non-zero extent the ray
  misses are skipped (zeros add nothing).

:func:`forward_project_adjoint` is the exact transpose (same rays, same weights): the backprojection
for iterative methods and the dot-product test.
"""
from __future__ import annotations

import math
from typing import Literal

import numba
import numpy as np

from ..core.geometry import HelicalGeometry

#: zero planes added before / after the grid in x and y, and before / after it in z (see _padded): every
#: bilinear sample then reads inside the array without a bounds test
_PAD_BEFORE_XY, _PAD_AFTER_XY, _PAD_Z = 1, 2, 1


def _padded(mu_per_mm: np.ndarray) -> np.ndarray:
    """float32 copy of the volume inside a zero border (1 voxel before, 2 after in x and y; 1 each side
    in z), so that the kernels' clamped sample positions never leave the array."""
    nx, ny, nz = mu_per_mm.shape
    padded = np.zeros((nx + _PAD_BEFORE_XY + _PAD_AFTER_XY, ny + _PAD_BEFORE_XY + _PAD_AFTER_XY, nz + 2 * _PAD_Z),
                      dtype=np.float32)
    padded[_PAD_BEFORE_XY:_PAD_BEFORE_XY + nx, _PAD_BEFORE_XY:_PAD_BEFORE_XY + ny, _PAD_Z:_PAD_Z + nz] = mu_per_mm
    return padded


@numba.njit(cache=True, inline="always")
def _fan_ray(v, c, source, centre, cos_beta, sin_beta, along_central, along_lateral, row_v, centre_index, spacing,
             n_xy, fb0, dfb, step_mm):
    """Joseph parameters of the rays of view ``v``, column ``c``, all rows (voxel-index units).

    The rays of one column share their in-plane path (only the source and the element's in-plane
    position set it), so the dominant axis, the planes crossed and the in-plane positions are common;
    the z path and the step length are per row, written into ``fb0``, ``dfb``, ``step_mm``.
    Returns (use_x, first, last, fa0, dfa): the rays cross planes ``first..last`` (inclusive, empty
    when first > last) of their dominant in-plane axis (x when use_x), at plane ``i`` they are at
    ``fa0 + i dfa`` in the other in-plane axis and ``fb0[r] + i dfb[r]`` in z; ``step_mm[r]`` is the 3D
    length between two planes. Outside first..last every bilinear sample would be zero.
    """
    cb = cos_beta[v]
    sb = sin_beta[v]
    # element minus actual source: (nominal focal centre - actual source) + D_gamma (cos g e_c + sin g e_l) + v e_z
    ux = centre[v, 0] - source[v, 0] - along_central[c] * cb - along_lateral[c] * sb
    uy = centre[v, 1] - source[v, 1] - along_central[c] * sb + along_lateral[c] * cb
    uz0 = centre[v, 2] - source[v, 2]
    in_plane_sq = ux * ux + uy * uy
    # source in voxel indices
    qx = source[v, 0] / spacing[0] + centre_index[0]
    qy = source[v, 1] / spacing[1] + centre_index[1]
    qz = source[v, 2] / spacing[2] + centre_index[2]
    use_x = abs(ux) >= abs(uy)
    if use_x:
        n_planes, n_a = n_xy[0], n_xy[1]
        dfa = (uy / spacing[1]) / (ux / spacing[0])
        fa0 = qy - qx * dfa
        e_dominant, q_dominant, u_dominant, h_dominant = ux / spacing[0], qx, abs(ux), spacing[0]
    else:
        n_planes, n_a = n_xy[1], n_xy[0]
        dfa = (ux / spacing[0]) / (uy / spacing[1])
        fa0 = qx - qy * dfa
        e_dominant, q_dominant, u_dominant, h_dominant = uy / spacing[1], qy, abs(uy), spacing[1]
    for r in range(row_v.shape[0]):
        uz = uz0 + row_v[r]
        dfb[r] = (uz / spacing[2]) / e_dominant
        fb0[r] = qz - q_dominant * dfb[r]
        step_mm[r] = h_dominant * math.sqrt(in_plane_sq + uz * uz) / u_dominant
    # a sample is non-zero only for -1 < fa < n_a: clip the planes to that (one plane of margin
    # against rounding; the kernels clamp, so a margin plane reads zeros)
    first = 0
    last = n_planes - 1
    if dfa != 0.0:
        lo = (-1.0 - fa0) / dfa
        hi = (n_a - fa0) / dfa
        if lo > hi:
            lo, hi = hi, lo
        first = max(first, int(math.floor(max(lo, -1.0))))
        last = min(last, int(math.ceil(min(hi, n_planes + 1.0))))
    elif fa0 <= -1.0 or fa0 >= n_a:
        last = -1
    return use_x, first, last, fa0, dfa


@numba.njit(parallel=True, cache=True, fastmath=True)
def _project_block(padded, shape, support_x, support_y, centre_index, spacing, source, centre, cos_beta, sin_beta,
                   along_central, along_lateral, row_v, out):
    """Joseph line integrals of the rays of ``out`` (views x rows x columns) through ``padded`` (see
    :func:`_padded`; ``shape`` = the unpadded (nx, ny, nz)).

    One task per (view, column): the plane loop is outside, the row loop inside, so the rows' samples
    of a plane are neighbours in z (the contiguous axis) and share the in-plane interpolation.
    ``support_x[i]`` (for x planes) and ``support_y[j]`` (for y planes) bound the padded in-plane
    coordinate of samples that can read a non-zero voxel (see :func:`_plane_support`): the planes
    outside are skipped, which changes no sum.
    """
    flat = padded.ravel()
    stride_x = padded.shape[1] * padded.shape[2]
    stride_y = padded.shape[2]
    nz_max = np.float32(shape[2] - 1)
    zero = np.float32(0.0)
    one = np.float32(1.0)
    n_views, n_rows, n_cols = out.shape
    for vc in numba.prange(n_views * n_cols):
        v = vc // n_cols
        c = vc % n_cols
        fb0 = np.empty(n_rows)
        dfb = np.empty(n_rows)
        step_mm = np.empty(n_rows)
        use_x, first, last, fa0, dfa = _fan_ray(v, c, source, centre, cos_beta, sin_beta, along_central,
                                                along_lateral, row_v, centre_index, spacing, shape, fb0, dfb,
                                                step_mm)
        if use_x:
            stride_plane, stride_a, a_max, support = stride_x, stride_y, np.float32(shape[1] + 1), support_x
        else:
            stride_plane, stride_a, a_max, support = stride_y, stride_x, np.float32(shape[0] + 1), support_y
        # padded sample position: a + 1 in x / y, z + 1 with z clamped (the patient continues); unsigned
        # 32-bit offsets (the caller checks the size) spare the negative-index wraparound tests
        pa0 = np.float32(fa0 + 1.0)
        pda = np.float32(dfa)
        pb0 = fb0.astype(np.float32)
        pdb = dfb.astype(np.float32)
        next_a = np.uint32(stride_a)
        total = np.zeros(n_rows, dtype=np.float32)
        offsets = np.empty(n_rows, dtype=np.uint32)
        weights_b = np.empty(n_rows, dtype=np.float32)
        for i in range(first, last + 1):
            pa = min(max(pa0 + np.float32(i) * pda, zero), a_max)
            if pa <= support[i, 0] or pa >= support[i, 1]:
                continue
            ia = np.int64(pa)
            wa = pa - np.float32(ia)
            base = np.uint32((i + 1) * stride_plane + ia * stride_a)
            plane = np.float32(i)
            # two passes: the z positions (arithmetic only, vectorised), then the reads
            for r in range(n_rows):
                pb = min(max(pb0[r] + plane * pdb[r], zero), nz_max) + one
                ib = np.int32(pb)
                weights_b[r] = pb - np.float32(ib)
                offsets[r] = base + np.uint32(ib)
            for r in range(n_rows):
                k = offsets[r]
                wb = weights_b[r]
                f00 = flat[k]
                f01 = flat[k + np.uint32(1)]
                f10 = flat[k + next_a]
                f11 = flat[k + next_a + np.uint32(1)]
                low = f00 + wb * (f01 - f00)
                high = f10 + wb * (f11 - f10)
                total[r] += low + wa * (high - low)
        for r in range(n_rows):
            out[v, r, c] = total[r] * np.float32(step_mm[r])


def _plane_support(nonzero: np.ndarray) -> np.ndarray:
    """(planes, 2) float32 bounds for :func:`_project_block` from ``nonzero`` (planes x a).

    A bilinear sample at fa reads voxels floor(fa) and floor(fa) + 1, so it can see a non-zero voxel
    of a plane only if first - 1 < fa < last + 1 (first, last: the plane's non-zero extent), i.e. for
    the padded coordinate pa = fa + 1: first < pa < last + 2. An empty plane gets an empty interval."""
    support = np.empty((nonzero.shape[0], 2), dtype=np.float32)
    support[:, 0], support[:, 1] = np.inf, -np.inf
    any_nonzero = nonzero.any(axis=1)
    first = np.argmax(nonzero, axis=1)
    last = nonzero.shape[1] - 1 - np.argmax(nonzero[:, ::-1], axis=1)
    support[any_nonzero, 0] = first[any_nonzero]
    support[any_nonzero, 1] = last[any_nonzero] + 2.0
    return support


@numba.njit(parallel=True, cache=True)
def _backproject_block(line_integrals, shape, centre_index, spacing, source, centre, cos_beta, sin_beta,
                       along_central, along_lateral, row_v, padded_shape, n_parts):
    """The transpose of :func:`_project_block`: every ray's value spread over the voxels its samples
    read, with the same weights (same float32 sample positions). The (view, column) tasks are split
    into ``n_parts`` interleaved sets, each summed into its own float64 copy of the padded volume (no
    write races); returns the copies (n_parts, voxels)."""
    stride_x = padded_shape[1] * padded_shape[2]
    stride_y = padded_shape[2]
    size = padded_shape[0] * stride_x
    nz_max = np.float32(shape[2] - 1)
    one = np.float32(1.0)
    n_views, n_rows, n_cols = line_integrals.shape
    parts = np.zeros((n_parts, size), dtype=np.float64)
    for part in numba.prange(n_parts):
        acc = parts[part]
        fb0 = np.empty(n_rows)
        dfb = np.empty(n_rows)
        step_mm = np.empty(n_rows)
        value = np.empty(n_rows)
        for vc in range(part, n_views * n_cols, n_parts):
            v = vc // n_cols
            c = vc % n_cols
            use_x, first, last, fa0, dfa = _fan_ray(v, c, source, centre, cos_beta, sin_beta, along_central,
                                                    along_lateral, row_v, centre_index, spacing, shape, fb0, dfb,
                                                    step_mm)
            if use_x:
                stride_plane, stride_a, a_max = stride_x, stride_y, np.float32(shape[1] + 1)
            else:
                stride_plane, stride_a, a_max = stride_y, stride_x, np.float32(shape[0] + 1)
            pa0 = np.float32(fa0 + 1.0)
            pda = np.float32(dfa)
            pb0 = fb0.astype(np.float32)
            pdb = dfb.astype(np.float32)
            for r in range(n_rows):
                value[r] = np.float64(line_integrals[v, r, c]) * np.float64(np.float32(step_mm[r]))
            for i in range(first, last + 1):
                pa = min(max(pa0 + np.float32(i) * pda, np.float32(0.0)), a_max)
                ia = np.int64(pa)
                wa = np.float64(pa - np.float32(ia))
                base = (i + 1) * stride_plane + ia * stride_a
                for r in range(n_rows):
                    pb = min(max(pb0[r] + np.float32(i) * pdb[r], np.float32(0.0)), nz_max) + one
                    ib = np.int64(pb)
                    wb = np.float64(pb - np.float32(ib))
                    k = base + ib
                    acc[k] += value[r] * (1.0 - wa) * (1.0 - wb)
                    acc[k + 1] += value[r] * (1.0 - wa) * wb
                    acc[k + stride_a] += value[r] * wa * (1.0 - wb)
                    acc[k + stride_a + 1] += value[r] * wa * wb
    return parts


Backend = Literal["auto", "numba", "torch"]
_CUDA_AVAILABLE: bool | None = None


def _cuda_available() -> bool:
    """Whether torch is installed and sees a CUDA device (checked once per process)."""
    global _CUDA_AVAILABLE
    if _CUDA_AVAILABLE is None:
        try:
            import torch
        except ImportError:
            _CUDA_AVAILABLE = False
        else:
            _CUDA_AVAILABLE = bool(torch.cuda.is_available())
    return _CUDA_AVAILABLE


def resolve_backend(backend: Backend) -> Literal["numba", "torch"]:
    """``auto``: the torch projector on CUDA when available, else numba on the CPU."""
    if backend == "auto":
        return "torch" if _cuda_available() else "numba"
    if backend not in ("numba", "torch"):
        raise ValueError(f"unknown projector backend {backend!r}: use auto, numba or torch")
    return backend


def forward_project(mu_per_mm: np.ndarray, spacing_mm: tuple[float, float, float], geometry: HelicalGeometry,
                    views: range | None = None, out: np.ndarray | None = None,
                    backend: Backend = "auto") -> np.ndarray:
    """Line integrals of ``mu_per_mm`` for ``views`` (default all) of ``geometry``.

    Returns float32 of shape (len(views), detector_rows, detector_columns). ``backend``: ``numba``
    (this module, CPU), ``torch`` (:mod:`dosebench.simulator.projector_torch`: CUDA when available,
    else CPU) or ``auto`` (torch on CUDA when available, else numba).
    """
    if mu_per_mm.ndim != 3:
        raise ValueError("mu_per_mm must be a 3D array")
    views = range(geometry.number_of_views) if views is None else views
    if views.step != 1 or views.start < 0 or views.stop > geometry.number_of_views:
        raise ValueError("views must be a contiguous range within the scan")
    shape = (len(views), geometry.detector_rows, geometry.detector_columns)
    if out is not None and out.shape != shape:
        raise ValueError(f"out has shape {out.shape}, expected {shape}")
    if resolve_backend(backend) == "torch":
        from .projector_torch import forward_project_torch

        result = forward_project_torch(mu_per_mm, spacing_mm, geometry, views).cpu().numpy()
        if out is None:
            return result
        out[...] = result
        return out
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    # only the columns and rows of the grid that hold something non-zero (exact: the rest reads zeros)
    x_range, y_range = _support_xy(mu_per_mm)
    if x_range is None:
        out[...] = 0.0
        return out
    nx, ny, nz = mu_per_mm.shape
    cropped = mu_per_mm[x_range[0]:x_range[1], y_range[0]:y_range[1], :]
    centre_index = np.array([(nx - 1) / 2.0 - x_range[0], (ny - 1) / 2.0 - y_range[0], (nz - 1) / 2.0])
    padded = _padded(cropped)
    if padded.size >= 2**32:
        raise ValueError(f"volume of {mu_per_mm.shape} voxels is too large for the numba projector (2^32 at most)")
    nonzero_xy = np.any(cropped != 0, axis=2)
    rays = _RayTerms.of(geometry, views)
    _project_block(padded, np.array(cropped.shape, dtype=np.int64), _plane_support(nonzero_xy),
                   _plane_support(nonzero_xy.T), centre_index, np.array(spacing_mm, dtype=np.float64), rays.source,
                   rays.centre, rays.cos_beta, rays.sin_beta, rays.along_central, rays.along_lateral, rays.row_v, out)
    return out


def _support_xy(mu_per_mm: np.ndarray) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """Half-open index ranges in x and y outside which the volume is zero everywhere (None: all zero)."""
    nonzero_xy = np.any(mu_per_mm != 0, axis=2)
    xs = np.flatnonzero(nonzero_xy.any(axis=1))
    if xs.size == 0:
        return None, None
    ys = np.flatnonzero(nonzero_xy.any(axis=0))
    return (int(xs[0]), int(xs[-1]) + 1), (int(ys[0]), int(ys[-1]) + 1)


class _RayTerms:
    """Per-view and per-detector terms of the kernels' rays (float64, contiguous)."""

    def __init__(self, source, centre, cos_beta, sin_beta, along_central, along_lateral, row_v):
        self.source, self.centre = source, centre
        self.cos_beta, self.sin_beta = cos_beta, sin_beta
        self.along_central, self.along_lateral, self.row_v = along_central, along_lateral, row_v

    @classmethod
    def of(cls, geometry: HelicalGeometry, views: range) -> _RayTerms:
        beta = geometry.view_angles_rad()[views.start:views.stop]
        gammas = geometry.fan_angles_rad()
        d_gamma = geometry.source_to_detector_mm / (np.cos(gammas) if geometry.detector_shape == "flat" else 1.0)
        return cls(source=np.ascontiguousarray(geometry.source_positions_mm(views), dtype=np.float64),
                   centre=np.ascontiguousarray(geometry.focal_centre_positions_mm(views), dtype=np.float64),
                   cos_beta=np.cos(beta), sin_beta=np.sin(beta),
                   along_central=np.ascontiguousarray(d_gamma * np.cos(gammas)),
                   along_lateral=np.ascontiguousarray(d_gamma * np.sin(gammas)),
                   row_v=np.ascontiguousarray(geometry.row_offsets_mm(), dtype=np.float64))


def forward_project_adjoint(line_integrals: np.ndarray, volume_shape: tuple[int, int, int],
                            spacing_mm: tuple[float, float, float], geometry: HelicalGeometry,
                            views: range | None = None) -> np.ndarray:
    """The exact transpose of the numba :func:`forward_project` (a backprojection without filter or
    weights): ``<forward_project(x), y> = <x, forward_project_adjoint(y)>`` for every volume ``x`` of
    ``volume_shape`` and projections ``y`` (len(views), rows, columns).

    Same rays and same bilinear weights as the projector; what z clamping sends to the edge slices
    comes back to them. Returns float32 of ``volume_shape`` (summed in float64). Memory: one float64
    copy of the volume per numba thread.
    """
    views = range(geometry.number_of_views) if views is None else views
    if views.step != 1 or views.start < 0 or views.stop > geometry.number_of_views:
        raise ValueError("views must be a contiguous range within the scan")
    shape = (len(views), geometry.detector_rows, geometry.detector_columns)
    if line_integrals.shape != shape:
        raise ValueError(f"line_integrals have shape {line_integrals.shape}, expected {shape}")
    if len(volume_shape) != 3:
        raise ValueError("volume_shape must have three axes")
    nx, ny, nz = (int(n) for n in volume_shape)
    padded_shape = (nx + _PAD_BEFORE_XY + _PAD_AFTER_XY, ny + _PAD_BEFORE_XY + _PAD_AFTER_XY, nz + 2 * _PAD_Z)
    centre_index = np.array([(nx - 1) / 2.0, (ny - 1) / 2.0, (nz - 1) / 2.0])
    rays = _RayTerms.of(geometry, views)
    parts = _backproject_block(np.ascontiguousarray(line_integrals, dtype=np.float32),
                               np.array([nx, ny, nz], dtype=np.int64), centre_index,
                               np.array(spacing_mm, dtype=np.float64), rays.source, rays.centre, rays.cos_beta,
                               rays.sin_beta, rays.along_central, rays.along_lateral, rays.row_v,
                               np.array(padded_shape, dtype=np.int64), numba.get_num_threads())
    summed = parts.sum(axis=0).reshape(padded_shape)
    # the zero border reads nothing in the projector, so what lands there is dropped
    return summed[_PAD_BEFORE_XY:_PAD_BEFORE_XY + nx, _PAD_BEFORE_XY:_PAD_BEFORE_XY + ny,
                  _PAD_Z:_PAD_Z + nz].astype(np.float32)

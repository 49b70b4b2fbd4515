"""Helical cone-beam forward projector (Joseph's method), numba-parallel on the CPU.

Each ray steps through the volume one voxel plane at a time along its dominant in-plane axis (x or
y) and interpolates bilinearly in the other two axes (Joseph 1982); the sum times the step length is
the line integral. The volume is centred on the isocentre (scanner frame, see
:mod:`dosebench.core.geometry` and :mod:`dosebench.core.volume`); it is zero outside its grid in x
and y, and continues beyond its first and last slice as those slices (a patient is longer than the
scanned slab).
"""

from __future__ import annotations

import math
from typing import Literal

import numba
import numpy as np

from ..core.geometry import HelicalGeometry


@numba.njit(cache=True, fastmath=False, inline="always")
def _bilinear(vol: np.ndarray, axis_fixed: int, idx: int, fa: float, fb: float) -> float:
    """Bilinear sample in the plane ``axis_fixed == idx`` at fractional (a, b) indices, zero outside."""
    if axis_fixed == 0:
        na, nb = vol.shape[1], vol.shape[2]
    else:
        na, nb = vol.shape[0], vol.shape[2]
    # z is clamped: the patient continues beyond the scanned slab (edge slices replicated), so
    # the end slices are not reconstructed against an artificial air boundary
    fb = min(max(fb, 0.0), nb - 1.0)
    a0 = math.floor(fa)
    b0 = min(math.floor(fb), nb - 2)
    if a0 < -1 or a0 >= na:
        return 0.0
    wa = fa - a0
    wb = fb - b0
    total = 0.0
    for da in range(2):
        a = a0 + da
        if a < 0 or a >= na:
            continue
        w_a = wa if da == 1 else 1.0 - wa
        for db in range(2):
            b = b0 + db
            if b < 0 or b >= nb:
                continue
            w = w_a * (wb if db == 1 else 1.0 - wb)
            if axis_fixed == 0:
                total += w * vol[idx, a, b]
            else:
                total += w * vol[a, idx, b]
    return total


@numba.njit(parallel=True, cache=True)
def _project_block(vol, dx, dy, dz, betas, source_z, gammas, d_gamma, row_v, radius, out):
    nx, ny, nz = vol.shape
    cx = (nx - 1) / 2.0
    cy = (ny - 1) / 2.0
    cz = (nz - 1) / 2.0
    n_views = betas.shape[0]
    n_rows = row_v.shape[0]
    n_cols = gammas.shape[0]
    for vr in numba.prange(n_views * n_rows):
        v = vr // n_rows
        r = vr % n_rows
        beta = betas[v]
        cb = math.cos(beta)
        sb = math.sin(beta)
        sx = radius * cb
        sy = radius * sb
        sz = source_z[v]
        for c in range(n_cols):
            g = gammas[c]
            cg = math.cos(g)
            sg = math.sin(g)
            # in-plane direction: cos(g) * e_central + sin(g) * e_lateral
            ux = -cg * cb - sg * sb
            uy = -cg * sb + sg * cb
            uz = row_v[r] / d_gamma[c]  # mm of z per mm in plane
            total = 0.0
            if abs(ux) >= abs(uy):
                for i in range(nx):
                    s = ((i - cx) * dx - sx) / ux
                    fy = (sy + s * uy) / dy + cy
                    fz = (sz + s * uz) / dz + cz
                    total += _bilinear(vol, 0, i, fy, fz)
                # step length per plane, in 3D
                out[v, r, c] = total * dx * math.sqrt(1.0 + uz * uz) / abs(ux)
            else:
                for j in range(ny):
                    s = ((j - cy) * dy - sy) / uy
                    fx = (sx + s * ux) / dx + cx
                    fz = (sz + s * uz) / dz + cz
                    total += _bilinear(vol, 1, j, fx, fz)
                out[v, r, c] = total * dy * math.sqrt(1.0 + uz * uz) / abs(uy)


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
    betas = geometry.view_angles_rad()[views.start:views.stop]
    source_z = geometry.source_z_mm()[views.start:views.stop]
    gammas = geometry.fan_angles_rad()
    if geometry.detector_shape == "curved":
        d_gamma = np.full_like(gammas, geometry.source_to_detector_mm)
    else:
        d_gamma = geometry.source_to_detector_mm / np.cos(gammas)
    if out is None:
        out = np.empty(shape, dtype=np.float32)
    volume = np.ascontiguousarray(mu_per_mm, dtype=np.float32)
    dx, dy, dz = (float(s) for s in spacing_mm)
    _project_block(volume, dx, dy, dz, betas, source_z, gammas, d_gamma, geometry.row_offsets_mm(),
                   float(geometry.source_to_isocenter_mm), out)
    return out

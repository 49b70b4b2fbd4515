"""Helical cone-beam weighted filtered backprojection (WFBP, Stierstorfer et al. 2004).

1. **Wedge rebinning.** Each detector row is rebinned from fan to parallel geometry: parallel view
   ``j`` has angle ``phi_j = beta_j`` (the angle of fan view ``j``) and rays at distances ``t_i`` from
   the axis; the ray (phi, t) is the fan ray ``gamma = asin(t / R)`` of the (fractional) view whose
   angle is ``phi + gamma``. Rows keep their detector height, so a rebinned "row" is a wedge of rays
   from many source positions.
2. **Filtering** along t with the band-limited ramp (the spatial Ram-Lak kernel of Kak & Slaney,
   which has no DC offset) times an apodisation window, by zero-padded FFT.
3. **Aperture-weighted backprojection**, voxel by voxel: for each parallel direction phi in [0, pi)
   every ray through the voxel from every turn (views phi + m pi, complementary rays included) is
   weighted by ``W(q)``, q the voxel's normalised detector row (``q = +-1`` at the detector's edges;
   ``W = 1`` for ``|q| <= Q`` and a cos^2 taper to 0 at ``|q| = 1``), and the partners' values are
   averaged with those weights. The image is ``pi / N_pi`` times the sum over directions.

Units: line integrals in, mu (1/mm) out. The reconstruction grid is a set of voxel centres in the
scanner frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from ..core.geometry import HelicalGeometry
from ..core.protocol import ReconstructionSettings


@dataclass(frozen=True)
class ParallelData:
    """Rebinned and filtered projections: (views, rows, nt) on rays t_i = (i - (nt-1)/2) * t_spacing."""

    values: np.ndarray
    t_spacing_mm: float


def rebin_to_parallel(line_integrals: np.ndarray, geometry: HelicalGeometry) -> ParallelData:
    """Row-wise fan-to-parallel (wedge) rebinning by bilinear interpolation in (view, column)."""
    n_views, n_rows, n_cols = line_integrals.shape
    if (n_views, n_rows, n_cols) != (geometry.number_of_views, geometry.detector_rows, geometry.detector_columns):
        raise ValueError("projections do not match the geometry's views x rows x columns")
    radius = geometry.source_to_isocenter_mm
    t_spacing = geometry.column_width_at_isocenter_mm
    n_t = n_cols
    t = (np.arange(n_t) - (n_t - 1) / 2.0) * t_spacing
    gamma = np.arcsin(np.clip(t / radius, -1.0, 1.0))
    if geometry.detector_shape == "curved":
        column = geometry.central_column_index + gamma / geometry.column_pitch_at_detector
    else:
        column = (geometry.central_column_index
                  + geometry.source_to_detector_mm * np.tan(gamma) / geometry.column_pitch_at_detector)
    view_offset = geometry.rotation_direction * gamma * geometry.views_per_turn / (2.0 * np.pi)
    out = np.zeros((n_views, n_rows, n_t), dtype=np.float32)
    _rebin(np.ascontiguousarray(line_integrals, dtype=np.float32), view_offset, column, out)
    return ParallelData(values=out, t_spacing_mm=t_spacing)


@numba.njit(parallel=True, cache=True)
def _rebin(proj, view_offset, column, out):
    n_views, n_rows, n_cols = proj.shape
    n_t = out.shape[2]
    for j in numba.prange(n_views):
        for i in range(n_t):
            kf = j + view_offset[i]
            cf = column[i]
            k0 = math.floor(kf)
            c0 = math.floor(cf)
            if k0 < 0 or k0 + 1 > n_views - 1 or c0 < 0 or c0 + 1 > n_cols - 1:
                # rays outside the acquired views or the detector: left at 0; the backprojector
                # never uses them (it checks the same view range)
                if not (0 <= kf <= n_views - 1 and 0 <= cf <= n_cols - 1):
                    continue
                k0 = min(max(k0, 0), n_views - 2)
                c0 = min(max(c0, 0), n_cols - 2)
            wk = kf - k0
            wc = cf - c0
            for r in range(n_rows):
                out[j, r, i] = ((1 - wk) * ((1 - wc) * proj[k0, r, c0] + wc * proj[k0, r, c0 + 1])
                                + wk * ((1 - wc) * proj[k0 + 1, r, c0] + wc * proj[k0 + 1, r, c0 + 1]))


def ramp_filter_response(n_padded: int, t_spacing: float, kernel: str, cutoff: float) -> np.ndarray:
    """Frequency response (rfft bins) of the band-limited ramp times the apodisation window.

    Windows, with u = frequency / (cutoff * Nyquist), zero for u > 1: Ram-Lak 1; Shepp-Logan
    sinc(u / 2) = sin(pi u / 2) / (pi u / 2); cosine cos(pi u / 2); Hann (1 + cos(pi u)) / 2.
    """
    n = np.arange(n_padded)
    n = np.where(n <= n_padded // 2, n, n - n_padded)  # circular distance
    h = np.zeros(n_padded)
    h[0] = 1.0 / (4.0 * t_spacing**2)
    odd = (n % 2) != 0
    h[odd] = -1.0 / (np.pi * n[odd] * t_spacing) ** 2
    response = np.real(np.fft.rfft(h)) * t_spacing  # the convolution integral's dt
    u = np.fft.rfftfreq(n_padded) / 0.5 / cutoff
    if kernel == "ram-lak":
        window = np.ones_like(u)
    elif kernel == "shepp-logan":
        window = np.sinc(u / 2.0)
    elif kernel == "cosine":
        window = np.cos(np.pi * u / 2.0)
    elif kernel == "hann":
        window = 0.5 * (1.0 + np.cos(np.pi * u))
    else:
        raise ValueError(f"unknown reconstruction kernel {kernel!r}")
    window = np.where(u <= 1.0, window, 0.0)
    return response * window


def filter_rows(data: ParallelData, kernel: str, cutoff: float, views_per_block: int = 256) -> ParallelData:
    """Ramp-filter every rebinned row along t, in place, block by block."""
    values = data.values
    n_t = values.shape[2]
    n_padded = 1 << int(math.ceil(math.log2(2 * n_t)))
    response = ramp_filter_response(n_padded, data.t_spacing_mm, kernel, cutoff)
    for start in range(0, values.shape[0], views_per_block):
        block = values[start:start + views_per_block]
        spectrum = np.fft.rfft(block, n=n_padded, axis=2)
        spectrum *= response
        block[...] = np.fft.irfft(spectrum, n=n_padded, axis=2)[..., :n_t]
    return data


@numba.njit(parallel=True, cache=True)
def _backproject(filtered, t_spacing, sin_phi, cos_phi, radius, det_dist, flat, row_pitch_det,
                 views_per_turn, direction, start_z, feed, aperture_q, z_reach_scale, xs, ys, zs, out, n_valid_out):
    n_views, n_rows, n_t = filtered.shape
    n_half = views_per_turn // 2
    nx = xs.shape[0]
    ny = ys.shape[0]
    nz = zs.shape[0]
    t_center = (n_t - 1) / 2.0
    r_mid = (n_rows - 1) / 2.0
    q_edge = n_rows / 2.0  # |q| = 1 at the detector's outer edge
    max_t = t_center * t_spacing
    views_per_mm = views_per_turn / feed
    for col in numba.prange(nx * ny):
        ix = col // ny
        iy = col % ny
        x = xs[ix]
        y = ys[iy]
        r_xy = math.sqrt(x * x + y * y)
        if r_xy >= max_t:
            for iz in range(nz):
                out[ix, iy, iz] = 0.0
                n_valid_out[ix, iy, iz] = 0
            continue
        # views that can see this column of voxels anywhere in the slab
        reach = z_reach_scale * (radius + r_xy)
        gamma_views = math.asin(r_xy / radius) * views_per_turn / (2.0 * math.pi) + 2.0
        j_first = max(0, int(math.floor((zs[0] - reach - start_z) * views_per_mm - gamma_views)))
        j_last = min(n_views - 1, int(math.ceil((zs[nz - 1] + reach - start_z) * views_per_mm + gamma_views)))
        count = j_last - j_first + 1
        if count <= 0:
            for iz in range(nz):
                out[ix, iy, iz] = 0.0
                n_valid_out[ix, iy, iz] = 0
            continue
        # per view: what does not depend on z
        i_frac = np.empty(count)
        src_z = np.empty(count)
        slope = np.empty(count)  # detector mm per mm of z offset: D_gamma / L
        valid = np.zeros(count, dtype=np.bool_)
        for n in range(count):
            j = j_first + n
            t = -x * sin_phi[j] + y * cos_phi[j]
            s = t / radius
            gamma = math.asin(s)
            kf = j + direction * gamma * views_per_turn / (2.0 * math.pi)
            if kf < 0.0 or kf > n_views - 1:
                continue
            cos_g = math.sqrt(1.0 - s * s)
            along = radius * cos_g - (x * cos_phi[j] + y * sin_phi[j])  # source-to-voxel, in plane
            d_gamma = det_dist / cos_g if flat else det_dist
            i_frac[n] = t / t_spacing + t_center
            src_z[n] = start_z + feed * kf / views_per_turn
            slope[n] = d_gamma / along
            valid[n] = True
        num = np.empty(n_half)
        den = np.empty(n_half)
        for iz in range(nz):
            z = zs[iz]
            lo = max(j_first, int(math.floor((z - reach - start_z) * views_per_mm - gamma_views)))
            hi = min(j_last, int(math.ceil((z + reach - start_z) * views_per_mm + gamma_views)))
            num[:] = 0.0
            den[:] = 0.0
            for j in range(lo, hi + 1):
                n = j - j_first
                if not valid[n]:
                    continue
                v = (z - src_z[n]) * slope[n]
                q = v / (q_edge * row_pitch_det)
                aq = abs(q)
                if aq >= 1.0:
                    continue
                if aq <= aperture_q:
                    w = 1.0
                else:
                    c = math.cos(0.5 * math.pi * (aq - aperture_q) / (1.0 - aperture_q))
                    w = c * c
                rf = min(max(r_mid + v / row_pitch_det, 0.0), n_rows - 1.0)
                r0 = min(int(rf), n_rows - 2) if n_rows > 1 else 0
                wr = rf - r0
                fi = i_frac[n]
                i0 = int(math.floor(fi))
                if i0 < 0 or i0 >= n_t - 1:
                    continue
                wi = fi - i0
                if n_rows > 1:
                    val = ((1.0 - wr) * ((1.0 - wi) * filtered[j, r0, i0] + wi * filtered[j, r0, i0 + 1])
                           + wr * ((1.0 - wi) * filtered[j, r0 + 1, i0] + wi * filtered[j, r0 + 1, i0 + 1]))
                else:
                    val = (1.0 - wi) * filtered[j, 0, i0] + wi * filtered[j, 0, i0 + 1]
                k = j % n_half
                num[k] += w * val
                den[k] += w
            total = 0.0
            n_valid = 0
            for k in range(n_half):
                if den[k] > 0.0:
                    total += num[k] / den[k]
                    n_valid += 1
            out[ix, iy, iz] = total * math.pi / n_valid if n_valid > 0 else 0.0
            n_valid_out[ix, iy, iz] = n_valid


@dataclass(frozen=True)
class Reconstruction:
    mu_per_mm: np.ndarray  # float32 (nx, ny, nz)
    #: voxels for which some parallel directions had no ray (outside the helix's coverage)
    incomplete_voxels: int


def backproject(filtered: ParallelData, geometry: HelicalGeometry, settings: ReconstructionSettings,
                xs_mm: np.ndarray, ys_mm: np.ndarray, zs_mm: np.ndarray) -> Reconstruction:
    """Aperture-weighted backprojection onto the grid of voxel centres xs x ys x zs (scanner frame)."""
    phi = geometry.view_angles_rad()
    out = np.zeros((xs_mm.size, ys_mm.size, zs_mm.size), dtype=np.float32)
    n_valid = np.zeros(out.shape, dtype=np.int32)
    z_reach_scale = (geometry.detector_rows / 2.0) * geometry.row_height_at_detector_mm / geometry.source_to_detector_mm
    _backproject(filtered.values, filtered.t_spacing_mm, np.sin(phi), np.cos(phi),
                 float(geometry.source_to_isocenter_mm), float(geometry.source_to_detector_mm),
                 geometry.detector_shape == "flat", float(geometry.row_height_at_detector_mm),
                 int(geometry.views_per_turn), int(geometry.rotation_direction), float(geometry.start_z_mm),
                 float(geometry.table_feed_per_turn_mm), float(settings.aperture_q), z_reach_scale,
                 np.asarray(xs_mm, np.float64), np.asarray(ys_mm, np.float64), np.asarray(zs_mm, np.float64),
                 out, n_valid)
    inside = np.sqrt(xs_mm[:, None] ** 2 + ys_mm[None, :] ** 2) < filtered.t_spacing_mm * (filtered.values.shape[2] - 1) / 2
    incomplete = int(((n_valid < geometry.views_per_turn // 2) & inside[:, :, None]).sum())
    return Reconstruction(mu_per_mm=out, incomplete_voxels=incomplete)


def reconstruct(line_integrals: np.ndarray, geometry: HelicalGeometry, settings: ReconstructionSettings,
                xs_mm: np.ndarray, ys_mm: np.ndarray, zs_mm: np.ndarray) -> Reconstruction:
    """WFBP of one projection set onto the given grid: rebin, filter, backproject."""
    parallel = rebin_to_parallel(line_integrals, geometry)
    filter_rows(parallel, settings.kernel, settings.cutoff)
    return backproject(parallel, geometry, settings, xs_mm, ys_mm, zs_mm)

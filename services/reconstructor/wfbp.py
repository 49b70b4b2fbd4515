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
   The kernel computes this per tile of voxel columns and direction: along one ray, q is linear in z,
   so the slices with |q| < 1 (and those with |q| <= Q) are found directly and only they are visited;
   the sums keep the voxel-by-voxel order, so results equal the plain loop's up to rounding.
   Slabs of slices bound the working copy of the views (``max_slab_bytes``). A torch version of all
   three steps, for CUDA, is :mod:`dosebench.reconstructor.wfbp_torch` (``backend=``).

Units: line integrals in, mu (1/mm) out. The reconstruction grid is a set of voxel centres in the
scanner frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np

from ..core.geometry import HelicalGeometry
from ..core.protocol import ReconstructionSettings


@dataclass(frozen=True)
class ParallelData:
    """Rebinned and filtered projections: (views, rows, nt) on rays t_i = (i - (nt-1)/2) * t_spacing."""

    values: np.ndarray
    t_spacing_mm: float


@dataclass(frozen=True)
class RebinningCoordinates:
    """Where each parallel ray (view j, distance t_i) lies in the fan data: fan view ``j + view_offset[i]``
    and detector column ``column[i]`` (both fractional); rays at ``t_i = (i - (n_t-1)/2) * t_spacing_mm``."""

    t_spacing_mm: float
    view_offset: np.ndarray
    column: np.ndarray


def rebinning_coordinates(geometry: HelicalGeometry) -> RebinningCoordinates:
    """The fan-to-parallel map of every backend: ray (phi, t) is fan angle ``gamma = asin(t / R)`` of the
    view whose angle is ``phi + gamma``."""
    t_spacing = geometry.column_width_at_isocenter_mm
    n_t = geometry.detector_columns
    t = (np.arange(n_t) - (n_t - 1) / 2.0) * t_spacing
    gamma = np.arcsin(np.clip(t / geometry.source_to_isocenter_mm, -1.0, 1.0))
    if geometry.detector_shape == "curved":
        column = geometry.central_column_index + gamma / geometry.column_pitch_at_detector
    else:
        column = (geometry.central_column_index
                  + geometry.source_to_detector_mm * np.tan(gamma) / geometry.column_pitch_at_detector)
    view_offset = geometry.rotation_direction * gamma * geometry.views_per_turn / (2.0 * np.pi)
    return RebinningCoordinates(t_spacing_mm=t_spacing, view_offset=view_offset, column=column)


def check_projection_shape(line_integrals: np.ndarray, geometry: HelicalGeometry) -> None:
    if line_integrals.shape != (geometry.number_of_views, geometry.detector_rows, geometry.detector_columns):
        raise ValueError("projections do not match the geometry's views x rows x columns")


def rebin_to_parallel(line_integrals: np.ndarray, geometry: HelicalGeometry) -> ParallelData:
    """Row-wise fan-to-parallel (wedge) rebinning by bilinear interpolation in (view, column)."""
    check_projection_shape(line_integrals, geometry)
    coordinates = rebinning_coordinates(geometry)
    n_views, n_rows, n_t = line_integrals.shape
    out = np.zeros((n_views, n_rows, n_t), dtype=np.float32)
    _rebin(np.ascontiguousarray(line_integrals, dtype=np.float32), coordinates.view_offset, coordinates.column, out)
    return ParallelData(values=out, t_spacing_mm=coordinates.t_spacing_mm)


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


@numba.njit(inline="always")
def _cos(u):
    """cos(u) for 0 <= u <= pi / 2 by its Taylor series to u^18 (error < 1e-12): libm's cos costs
    more than the rest of a voxel update."""
    u2 = u * u
    c = 1.0 / 6402373705728000.0
    c = c * u2 - 1.0 / 355687428096000.0
    c = c * u2 + 1.0 / 20922789888000.0
    c = c * u2 - 1.0 / 87178291200.0
    c = c * u2 + 1.0 / 479001600.0
    c = c * u2 - 1.0 / 3628800.0
    c = c * u2 + 1.0 / 40320.0
    c = c * u2 - 1.0 / 720.0
    c = c * u2 + 1.0 / 24.0
    c = c * u2 - 0.5
    return c * u2 + 1.0


@numba.njit(inline="always")
def _span(flat_t, base, n_t, n_rows, wi, zs, src_z, slope, lo, hi, tapered, inv_v_edge, aperture_q, taper, r_mid,
          inv_row_pitch, num, den):
    """Slices lo..hi of one ray: weight (1 or the cos^2 taper), row interpolation, accumulation.
    ``flat_t`` is the (views, t, rows) block flattened; ``base`` indexes (view, i0, row 0)."""
    top = n_rows - 1.0
    w0 = 1.0 - wi
    for iz in range(lo, hi + 1):
        v = (zs[iz] - src_z) * slope
        if tapered:
            cw = _cos(taper * (abs(v * inv_v_edge) - aperture_q))
            w = cw * cw
        else:
            w = 1.0
        if n_rows > 1:
            rf = min(max(r_mid + v * inv_row_pitch, 0.0), top)
            r0 = min(int(rf), n_rows - 2)
            wr = rf - r0
            p = base + r0
            val = ((1.0 - wr) * (w0 * flat_t[p] + wi * flat_t[p + n_rows])
                   + wr * (w0 * flat_t[p + 1] + wi * flat_t[p + n_rows + 1]))
        else:
            val = w0 * flat_t[base] + wi * flat_t[base + 1]
        num[iz] += w * val
        den[iz] += w


@numba.njit(inline="always")
def _first_at_most(zs, src_z, slope, inv_v_edge, limit, guess, lo, hi):
    """The first slice of lo..hi with |q| <= limit, searched from ``guess`` (within one slice of it);
    hi + 1 if none. |q| is V-shaped in z along one ray, so those slices are one interval."""
    i = min(max(guess, lo), hi + 1)
    while i > lo and abs((zs[i - 1] - src_z) * slope * inv_v_edge) <= limit:
        i -= 1
    while i <= hi and abs((zs[i] - src_z) * slope * inv_v_edge) > limit:
        i += 1
    return i


@numba.njit(inline="always")
def _last_at_most(zs, src_z, slope, inv_v_edge, limit, guess, lo, hi):
    """The last slice of lo..hi with |q| <= limit, searched from ``guess``; below lo if none."""
    i = min(max(guess, lo - 1), hi)
    while i < hi and abs((zs[i + 1] - src_z) * slope * inv_v_edge) <= limit:
        i += 1
    while i >= lo and abs((zs[i] - src_z) * slope * inv_v_edge) > limit:
        i -= 1
    return i


#: LLVM fast-math flags of the backprojection kernel: contraction to FMA and reassociation within one
#: voxel update (the sums over views keep their order); on the bundled CT the float32 output did not change
FASTMATH = {"contract", "arcp", "nsz", "afn", "reassoc"}

#: columns per side of the tiles the backprojector walks view by view (cache reuse of the views' rays)
TILE = 16


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backproject(filtered_t, view0, n_views, t_spacing, sin_phi, cos_phi, radius, det_dist, flat, row_pitch_det,
                 views_per_turn, direction, start_z, feed, aperture_q, z_reach_scale, xs, ys, zs, z_step,
                 out, n_valid_out):
    """The kernel. ``filtered_t`` holds views ``view0 ..`` as (views, t, rows); ``zs`` ascending, with
    ``z_step`` > 0 when uniformly spaced (then slice ranges are computed, else binary-searched).

    Per tile of TILE x TILE columns and parallel direction k, the views of that direction
    (j = k + m n_half) are walked once; for each column the slices where the ray's normalised row q
    satisfies |q| < 1 form one interval (q is linear in z), found directly, and only those are visited.
    Sums run in the same order as a voxel-by-voxel loop over views (per direction by ascending view,
    then over directions), so results equal the plain algorithm's up to floating-point rounding.
    """
    n_local, n_t, n_rows = filtered_t.shape
    flat_t = filtered_t.ravel()
    n_half = views_per_turn // 2
    nx = xs.shape[0]
    ny = ys.shape[0]
    nz = zs.shape[0]
    t_center = (n_t - 1) / 2.0
    r_mid = (n_rows - 1) / 2.0
    q_edge = n_rows / 2.0  # |q| = 1 at the detector's outer edge
    v_edge = q_edge * row_pitch_det  # |v| at the edge, mm at the detector
    inv_v_edge = 1.0 / v_edge
    inv_row_pitch = 1.0 / row_pitch_det
    max_t = t_center * t_spacing
    views_per_mm = views_per_turn / feed
    view_scale = direction * views_per_turn / (2.0 * math.pi)
    taper = 0.5 * math.pi / (1.0 - aperture_q)
    j_min = max(0, view0)
    j_max = min(n_views - 1, view0 + n_local - 1)
    tiles_x = (nx + TILE - 1) // TILE
    tiles_y = (ny + TILE - 1) // TILE
    n_cols = TILE * TILE
    for tile in numba.prange(tiles_x * tiles_y):
        ix0 = (tile // tiles_y) * TILE
        iy0 = (tile % tiles_y) * TILE
        num = np.zeros((n_cols, nz))
        den = np.zeros((n_cols, nz))
        total = np.zeros((n_cols, nz))
        n_valid = np.zeros((n_cols, nz), dtype=np.int32)
        cx = np.zeros(n_cols)
        cy = np.zeros(n_cols)
        c_first = np.zeros(n_cols, dtype=np.int64)
        c_last = np.zeros(n_cols, dtype=np.int64)
        gamma0 = np.zeros(n_cols)
        cos_g = np.zeros(n_cols)
        d_gamma = np.zeros(n_cols)
        lo_touched = np.zeros(n_cols, dtype=np.int64)
        hi_touched = np.zeros(n_cols, dtype=np.int64)
        n_active = 0
        cols = np.zeros(n_cols, dtype=np.int64)
        tile_first = j_max + 1
        tile_last = j_min - 1
        for c in range(n_cols):
            ix = ix0 + c // TILE
            iy = iy0 + c % TILE
            if ix >= nx or iy >= ny:
                continue
            x = xs[ix]
            y = ys[iy]
            r_xy = math.sqrt(x * x + y * y)
            if r_xy >= max_t:
                continue
            # views that can see this column of voxels anywhere in the slab
            reach = z_reach_scale * (radius + r_xy)
            gamma_views = math.asin(r_xy / radius) * views_per_turn / (2.0 * math.pi) + 2.0
            first = max(j_min, int(math.floor((zs[0] - reach - start_z) * views_per_mm - gamma_views)))
            last = min(j_max, int(math.ceil((zs[nz - 1] + reach - start_z) * views_per_mm + gamma_views)))
            if last < first:
                continue
            cols[n_active] = c
            cx[n_active] = x
            cy[n_active] = y
            c_first[n_active] = first
            c_last[n_active] = last
            tile_first = min(tile_first, first)
            tile_last = max(tile_last, last)
            n_active += 1
        for k in range(n_half):
            # the views of parallel direction k (mod pi): j = k + m n_half; the rays through (x, y)
            # have t and gamma of alternating sign, so one asin per column serves them all
            m_first = -((k - tile_first) // n_half)  # ceil((tile_first - k) / n_half)
            j0 = k + m_first * n_half
            if j0 > tile_last:
                continue
            for a in range(n_active):
                s0 = (-cx[a] * sin_phi[j0] + cy[a] * cos_phi[j0]) / radius
                gamma0[a] = math.asin(s0)
                cos_g[a] = math.sqrt(1.0 - s0 * s0)
                d_gamma[a] = det_dist / cos_g[a] if flat else det_dist
                lo_touched[a] = nz
                hi_touched[a] = -1
            sign = -1.0
            for j in range(j0, tile_last + 1, n_half):
                sign = -sign
                jl = j - view0
                sj = sin_phi[j]
                cj = cos_phi[j]
                for a in range(n_active):
                    if j < c_first[a] or j > c_last[a]:
                        continue
                    x = cx[a]
                    y = cy[a]
                    kf = j + sign * gamma0[a] * view_scale
                    if kf < 0.0 or kf > n_views - 1:
                        continue
                    t = -x * sj + y * cj
                    fi = t / t_spacing + t_center
                    i0 = int(math.floor(fi))
                    if i0 < 0 or i0 >= n_t - 1:
                        continue
                    wi = fi - i0
                    along = radius * cos_g[a] - (x * cj + y * sj)  # source to voxel, in plane
                    src_z = start_z + feed * kf / views_per_turn
                    slope = d_gamma[a] / along  # detector mm per mm of z offset
                    half = v_edge / slope  # |z - src_z| < half <=> |q| < 1
                    if z_step > 0.0:
                        lo = int(math.ceil((src_z - half - zs[0]) / z_step)) - 1
                        hi = int(math.floor((src_z + half - zs[0]) / z_step)) + 1
                    else:
                        lo = np.searchsorted(zs, src_z - half) - 1
                        hi = np.searchsorted(zs, src_z + half)
                    lo = max(lo, 0)
                    hi = min(hi, nz - 1)
                    if lo > hi:
                        continue
                    # exact bounds: |q| < 1 on lo..hi, |q| <= Q (weight 1) on flat_lo..flat_hi
                    while lo <= hi and abs((zs[lo] - src_z) * slope * inv_v_edge) >= 1.0:
                        lo += 1
                    while hi >= lo and abs((zs[hi] - src_z) * slope * inv_v_edge) >= 1.0:
                        hi -= 1
                    if lo > hi:
                        continue
                    lo_touched[a] = min(lo_touched[a], lo)
                    hi_touched[a] = max(hi_touched[a], hi)
                    flat_half = half * aperture_q
                    base = (jl * n_t + i0) * n_rows
                    num_a = num[a]
                    den_a = den[a]
                    if z_step > 0.0:
                        guess_lo = int(math.ceil((src_z - flat_half - zs[0]) / z_step))
                        guess_hi = int(math.floor((src_z + flat_half - zs[0]) / z_step))
                    else:
                        guess_lo = np.searchsorted(zs, src_z - flat_half)
                        guess_hi = guess_lo
                    flat_lo = _first_at_most(zs, src_z, slope, inv_v_edge, aperture_q, guess_lo, lo, hi)
                    flat_hi = _last_at_most(zs, src_z, slope, inv_v_edge, aperture_q,
                                            max(guess_hi, flat_lo - 1), lo, hi)
                    if flat_lo > flat_hi:
                        _span(flat_t, base, n_t, n_rows, wi, zs, src_z, slope, lo, hi, True, inv_v_edge,
                              aperture_q, taper, r_mid, inv_row_pitch, num_a, den_a)
                    else:
                        _span(flat_t, base, n_t, n_rows, wi, zs, src_z, slope, lo, flat_lo - 1, True, inv_v_edge,
                              aperture_q, taper, r_mid, inv_row_pitch, num_a, den_a)
                        _span(flat_t, base, n_t, n_rows, wi, zs, src_z, slope, flat_lo, flat_hi, False, inv_v_edge,
                              aperture_q, taper, r_mid, inv_row_pitch, num_a, den_a)
                        _span(flat_t, base, n_t, n_rows, wi, zs, src_z, slope, flat_hi + 1, hi, True, inv_v_edge,
                              aperture_q, taper, r_mid, inv_row_pitch, num_a, den_a)
            for a in range(n_active):
                for iz in range(lo_touched[a], hi_touched[a] + 1):
                    if den[a, iz] > 0.0:
                        total[a, iz] += num[a, iz] / den[a, iz]
                        n_valid[a, iz] += 1
                    num[a, iz] = 0.0
                    den[a, iz] = 0.0
        for a in range(n_active):
            ix = ix0 + cols[a] // TILE
            iy = iy0 + cols[a] % TILE
            for iz in range(nz):
                out[ix, iy, iz] = total[a, iz] * math.pi / n_valid[a, iz] if n_valid[a, iz] > 0 else 0.0
                n_valid_out[ix, iy, iz] = n_valid[a, iz]


@dataclass(frozen=True)
class Reconstruction:
    mu_per_mm: np.ndarray  # float32 (nx, ny, nz)
    #: voxels for which some parallel directions had no ray (outside the helix's coverage)
    incomplete_voxels: int
    #: which voxels those are (bool, like mu_per_mm)
    incomplete_mask: np.ndarray | None = None


#: default bound on the backprojector's working copy of the filtered views (per slab of slices)
DEFAULT_MAX_SLAB_BYTES = 1 << 30

Backend = Literal["auto", "numba", "torch"]


def slab_plan(geometry: HelicalGeometry, n_t: int, t_spacing: float, zs_sorted: np.ndarray,
              bytes_per_view: int, max_slab_bytes: int, bytes_per_slice: int = 0) -> list[tuple[slice, range]]:
    """Cut ascending slices into slabs whose views (every view any voxel of the slab may need, as the
    kernels' per-column window, for the widest column), plus ``bytes_per_slice`` per slice of
    accumulators, fit ``max_slab_bytes``; at least one slice each."""
    max_t = (n_t - 1) / 2.0 * t_spacing
    radius = geometry.source_to_isocenter_mm
    reach = geometry.z_reach_mm(max_t)
    views_per_mm = geometry.views_per_turn / geometry.table_feed_per_turn_mm
    gamma_views = math.asin(min(max_t / radius, 1.0)) * geometry.views_per_turn / (2.0 * math.pi) + 2.0

    def views(z_lo: float, z_hi: float) -> range:
        first = max(0, int(math.floor((z_lo - reach - geometry.start_z_mm) * views_per_mm - gamma_views)) - 1)
        last = min(geometry.number_of_views - 1,
                   int(math.ceil((z_hi + reach - geometry.start_z_mm) * views_per_mm + gamma_views)) + 1)
        return range(first, max(first, last + 1))

    def size(start: int, stop: int) -> int:
        return len(views(zs_sorted[start], zs_sorted[stop - 1])) * bytes_per_view + (stop - start) * bytes_per_slice

    plan = []
    start = 0
    nz = zs_sorted.size
    while start < nz:
        stop = start + 1
        while stop < nz and size(start, stop + 1) <= max_slab_bytes:
            stop += 1
        plan.append((slice(start, stop), views(zs_sorted[start], zs_sorted[stop - 1])))
        start = stop
    return plan


def _sorted_z(zs_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Ascending slice positions, the permutation that sorts them, and their step (0 if not uniform)."""
    zs = np.asarray(zs_mm, np.float64).ravel()
    order = np.argsort(zs, kind="stable")
    zs_sorted = zs[order]
    step = 0.0
    if zs.size > 1:
        steps = np.diff(zs_sorted)
        if steps[0] > 0 and np.allclose(steps, steps[0], rtol=1e-9, atol=0.0):
            # the kernel computes ranges from zs[0] and the step; it tests every slice it visits, so
            # the exact positions zs_sorted are still the ones used
            step = float(steps[0])
    return zs_sorted, order, step


def incomplete_mask(n_valid: np.ndarray, xs_mm: np.ndarray, ys_mm: np.ndarray, max_t: float,
                    views_per_turn: int) -> np.ndarray:
    """Voxels inside the rebinned field that some parallel directions saw no ray of."""
    inside = np.sqrt(xs_mm[:, None] ** 2 + ys_mm[None, :] ** 2) < max_t
    return (n_valid < views_per_turn // 2) & inside[:, :, None]


def backproject(filtered: ParallelData, geometry: HelicalGeometry, settings: ReconstructionSettings,
                xs_mm: np.ndarray, ys_mm: np.ndarray, zs_mm: np.ndarray,
                max_slab_bytes: int = DEFAULT_MAX_SLAB_BYTES) -> Reconstruction:
    """Aperture-weighted backprojection onto the grid of voxel centres xs x ys x zs (scanner frame).

    Works slab by slab of slices: each slab copies only the views it needs, transposed to (views, t,
    rows) so that the kernel's walk along z reads neighbouring memory; ``max_slab_bytes`` bounds that copy.
    """
    xs = np.asarray(xs_mm, np.float64).ravel()
    ys = np.asarray(ys_mm, np.float64).ravel()
    zs_sorted, order, step = _sorted_z(zs_mm)
    n_views, n_rows, n_t = filtered.values.shape
    phi = geometry.view_angles_rad()
    sin_phi, cos_phi = np.sin(phi), np.cos(phi)
    out = np.zeros((xs.size, ys.size, zs_sorted.size), dtype=np.float32)
    n_valid = np.zeros(out.shape, dtype=np.int32)
    z_reach_scale = (geometry.detector_rows / 2.0) * geometry.row_height_at_detector_mm / geometry.source_to_detector_mm
    plan = slab_plan(geometry, n_t, filtered.t_spacing_mm, zs_sorted, n_rows * n_t * 4, max_slab_bytes)
    for z_slice, views in plan:
        block = np.ascontiguousarray(filtered.values[views.start:views.stop].transpose(0, 2, 1))
        zs_slab = np.ascontiguousarray(zs_sorted[z_slice])
        out_slab = np.zeros((xs.size, ys.size, zs_slab.size), dtype=np.float32)
        valid_slab = np.zeros(out_slab.shape, dtype=np.int32)
        _backproject(block, views.start, n_views, float(filtered.t_spacing_mm), sin_phi, cos_phi,
                     float(geometry.source_to_isocenter_mm), float(geometry.source_to_detector_mm),
                     geometry.detector_shape == "flat", float(geometry.row_height_at_detector_mm),
                     int(geometry.views_per_turn), int(geometry.rotation_direction), float(geometry.start_z_mm),
                     float(geometry.table_feed_per_turn_mm), float(settings.aperture_q), z_reach_scale,
                     xs, ys, zs_slab, step, out_slab, valid_slab)
        out[:, :, z_slice] = out_slab
        n_valid[:, :, z_slice] = valid_slab
    unsorted = np.empty_like(out)
    unsorted[:, :, order] = out
    valid_unsorted = np.empty_like(n_valid)
    valid_unsorted[:, :, order] = n_valid
    max_t = filtered.t_spacing_mm * (n_t - 1) / 2
    mask = incomplete_mask(valid_unsorted, xs, ys, max_t, geometry.views_per_turn)
    return Reconstruction(mu_per_mm=unsorted, incomplete_voxels=int(mask.sum()), incomplete_mask=mask)


def resolve_backend(backend: Backend) -> str:
    """``auto``: torch when a CUDA device is available, else numba."""
    if backend not in ("auto", "numba", "torch"):
        raise ValueError(f"unknown reconstruction backend {backend!r}")
    if backend != "auto":
        return backend
    try:
        import torch
    except ImportError:
        return "numba"
    return "torch" if torch.cuda.is_available() else "numba"


def reconstruct(line_integrals: np.ndarray, geometry: HelicalGeometry, settings: ReconstructionSettings,
                xs_mm: np.ndarray, ys_mm: np.ndarray, zs_mm: np.ndarray, backend: Backend = "auto",
                max_slab_bytes: int = DEFAULT_MAX_SLAB_BYTES) -> Reconstruction:
    """WFBP of one projection set onto the given grid: rebin, filter, backproject."""
    if resolve_backend(backend) == "torch":
        from .wfbp_torch import reconstruct as reconstruct_torch

        return reconstruct_torch(line_integrals, geometry, settings, xs_mm, ys_mm, zs_mm,
                                 max_slab_bytes=max_slab_bytes)
    parallel = rebin_to_parallel(line_integrals, geometry)
    filter_rows(parallel, settings.kernel, settings.cutoff)
    return backproject(parallel, geometry, settings, xs_mm, ys_mm, zs_mm, max_slab_bytes=max_slab_bytes)

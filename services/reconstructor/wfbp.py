"""Helical cone-beam weighted filtered backprojection (WFBP, Stierstorfer et al. 2004).

1. **Wedge rebinning.** Each detector row is rebinned from fan to parallel geometry: parallel view
   ``j`` has angle ``phi_j = beta_j`` (the angle of fan view ``j``) and rays at distances ``t_i`` from
   the axis; the ray (phi, t) is the fan ray ``gamma = asin(t / R)`` of the (fractional) view whose
   angle is ``phi + gamma``. Rows keep their detector height, so a rebinned "row" is a wedge of rays
   from many source positions. With a flying focal spot (``focal_spot_offsets``), every view is
   sampled with its own spot's rays and consecutive views are interpolated onto the nominal parallel
   rays, the spot's z offset as a row shift (:func:`focal_spot_rebinning`, :func:`focal_spot_views`;
   both backends).
2. **Filtering** along t with the band-limited ramp (the spatial Ram-Lak kernel of Kak & Slaney,
   which has no DC offset) times an apodisation window, by zero-padded FFT.
3. **Aperture-weighted backprojection**, voxel by voxel: for each parallel direction phi in [0, pi)
   every ray through the voxel from every turn (views phi + m pi, complementary rays included) is
   weighted by ``W(q)``, q the voxel's normalised detector row (``q = +-1`` at the detector's edges;
   ``W = 1`` for ``|q| <= Q`` and a cos^2 taper to 0 at ``|q| = 1``), and the partners' values are
   averaged with those weights. The image is ``pi / N_pi`` times the sum over directions.
   The kernel (float32, vectorised over 16 voxel columns at a time; see :func:`_backproject`) visits,
   per view, only the slices where some column's ray has |q| < 1 (q is linear in z along one ray);
   the sums keep the voxel-by-voxel order, so results equal the plain loop's up to rounding, and a
   split into slabs or tiles changes no bit.
   Slabs of slices bound the working set (``max_slab_bytes``): :func:`reconstruct` and
   :func:`reconstruct_streamed` read, rebin and filter only the views each slab needs, chunk by chunk,
   so a projection set (in memory or in a projection store) is never held twice. A torch version of
   all three steps, for CUDA, is :mod:`dosebench.reconstructor.wfbp_torch` (``backend=``).

Units: line integrals in, mu (1/mm) out. The reconstruction grid is a set of voxel centres in the
scanner frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numba
import numpy as np
import scipy.fft
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

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
    return rebin_views(line_integrals, 0, range(geometry.number_of_views), geometry)


def _fan_reach(geometry: HelicalGeometry) -> tuple[int, int]:
    """Fan views that parallel view j reads lie in j + lo .. j + hi - 1 (lo, hi with a view's margin;
    with a flying focal spot, also the spacing of one focal spot's views)."""
    if geometry.focal_spot_offsets:
        shift = focal_spot_rebinning(geometry).view_shift
        return int(math.floor(shift.min())) - 2, int(math.ceil(shift.max())) + 3
    offset = rebinning_coordinates(geometry).view_offset
    return int(math.floor(offset.min())) - 1, int(math.ceil(offset.max())) + 2


@dataclass(frozen=True)
class FocalSpotRebinning:
    """Where the parallel ray (view j, t_i, row r) of the nominal parallel geometry lies in the data of
    focal spot f (views f, f + K, ...): fan view ``j + view_shift[f, i]`` (interpolated between that
    spot's views), column ``column[f, i]`` (-1: off the detector), row ``r + row_shift[f, i]``."""

    view_shift: np.ndarray
    column: np.ndarray
    row_shift: np.ndarray


def focal_spot_rebinning(geometry: HelicalGeometry) -> FocalSpotRebinning:
    """The flying focal spot's rebinning map. In the frame of a view (beta = 0) the detector element of
    column c is fixed and the source of spot f sits at angle d_beta, radius R + d_R: the in-plane ray
    between them has parallel angle ``beta + delta_c`` and distance ``t_c`` from the axis, the same for
    every view of the spot. The nominal parallel ray (phi_j = beta_j, t_i) is therefore column
    ``c(t_i)`` of the spot's fractional view with ``beta = phi_j - delta(c)``. Along z, the backprojector
    takes that ray from the nominal source position of view ``j + view_offset_i`` (rebinning_coordinates);
    the spot's source sits ``dz`` higher (its axial offset plus the table travel between the two
    views), which is the row shift ``-dz D_gamma / (R row pitch)`` at the isocentre (exact for voxels on
    the axis; off axis the residual is ``dz (D_gamma / L - D_gamma / R)`` in detector mm, L the in-plane
    source-voxel distance)."""
    coordinates = rebinning_coordinates(geometry)
    n_t = geometry.detector_columns
    t = (np.arange(n_t) - (n_t - 1) / 2.0) * coordinates.t_spacing_mm
    radius = geometry.source_to_isocenter_mm
    flat = geometry.detector_shape == "flat"
    gamma_c = geometry.fan_angles_rad()
    d_gamma_c = geometry.source_to_detector_mm / (np.cos(gamma_c) if flat else 1.0)
    element_x = radius - d_gamma_c * np.cos(gamma_c)  # detector elements in the view's frame
    element_y = d_gamma_c * np.sin(gamma_c)
    gamma_i = np.arcsin(np.clip(t / radius, -1.0, 1.0))
    d_gamma_i = geometry.source_to_detector_mm / (np.cos(gamma_i) if flat else 1.0)
    columns = np.arange(geometry.detector_columns, dtype=np.float64)
    shifts, cols, rows = [], [], []
    for offset in geometry.focal_spot_offsets:
        source_x = (radius + offset.radial_mm) * math.cos(offset.angle_rad)
        source_y = (radius + offset.radial_mm) * math.sin(offset.angle_rad)
        # the ray runs towards -(cos phi, sin phi)
        phi_c = np.arctan2(source_y - element_y, source_x - element_x)
        t_c = -source_x * np.sin(phi_c) + source_y * np.cos(phi_c)
        if np.any(np.diff(t_c) <= 0):
            raise ValueError("flying focal spot offset too large: detector columns no longer ordered in t")
        column = np.interp(t, t_c, columns, left=-1.0, right=-1.0)
        delta = np.interp(t, t_c, phi_c)
        view_shift = -geometry.rotation_direction * delta * geometry.views_per_turn / (2.0 * np.pi)
        dz = (geometry.table_feed_per_turn_mm * (view_shift - coordinates.view_offset) / geometry.views_per_turn
              + offset.axial_mm)
        shifts.append(view_shift)
        cols.append(column)
        rows.append(-dz * d_gamma_i / (radius * geometry.row_height_at_detector_mm))
    return FocalSpotRebinning(view_shift=np.array(shifts), column=np.array(cols), row_shift=np.array(rows))


@numba.njit(parallel=True, cache=True)
def _focal_spot_views(view_first, n_views, view_shift, first_view, weight):
    """Interleaved: fan view k (spot k % K) holds the ray (t_i) of parallel view ``u(k) = k -
    view_shift[k % K, i]``; the parallel view j is interpolated linearly in u between the two
    consecutive fan views ``first_view[jj, i]`` and the next one around it, the next one with
    ``weight[jj, i]`` (``first_view`` -1: outside the acquired views). ``jj = j - view_first``."""
    n_spots = view_shift.shape[0]
    n_t = view_shift.shape[1]
    for jj in numba.prange(first_view.shape[0]):
        j = view_first + jj
        for i in range(n_t):
            first_view[jj, i] = -1
            weight[jj, i] = 0.0
            k0 = int(math.floor(j + view_shift[0, i]))
            # u is increasing in k while the spots' shifts differ by less than a view
            while k0 > 0 and k0 - view_shift[k0 % n_spots, i] > j:
                k0 -= 1
            while k0 + 1 < n_views - 1 and k0 + 1 - view_shift[(k0 + 1) % n_spots, i] < j:
                k0 += 1
            if k0 < 0 or k0 + 1 > n_views - 1:
                continue
            u0 = k0 - view_shift[k0 % n_spots, i]
            u1 = k0 + 1 - view_shift[(k0 + 1) % n_spots, i]
            if not (u0 <= j <= u1):
                continue  # outside the acquired views
            first_view[jj, i] = k0
            weight[jj, i] = (j - u0) / (u1 - u0)


def focal_spot_views(geometry: HelicalGeometry, views: range,
                     spots: FocalSpotRebinning | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For the parallel views ``views`` (rows) and rays t_i (columns): the first of the two consecutive
    fan views each ray is interpolated from (-1: outside the acquired views) and the second's weight;
    the view half of the flying focal spot rebinning, shared by the numba and torch backends."""
    spots = focal_spot_rebinning(geometry) if spots is None else spots
    first_view = np.empty((len(views), geometry.detector_columns), dtype=np.int64)
    weight = np.empty(first_view.shape, dtype=np.float64)
    _focal_spot_views(views.start, geometry.number_of_views, spots.view_shift, first_view, weight)
    return first_view, weight


@numba.njit(parallel=True, cache=True)
def _rebin_focal_spots(proj, fan_first, first_view, view_weight, column, row_shift, out):
    """Each parallel ray from its two fan views (:func:`focal_spot_views`), each sampled at its own
    spot's column and row shift (bilinear in column and row)."""
    n_spots = column.shape[0]
    n_rows = proj.shape[1]
    n_cols = proj.shape[2]
    n_t = out.shape[2]
    for jj in numba.prange(out.shape[0]):
        for i in range(n_t):
            k0 = first_view[jj, i]
            if k0 < 0:
                continue
            wk = view_weight[jj, i]
            for side in range(2):
                k = k0 + side
                f = k % n_spots
                weight = wk if side else 1.0 - wk
                cf = column[f, i]
                if cf < 0.0 or cf > n_cols - 1:
                    continue
                c0 = min(int(math.floor(cf)), n_cols - 2)
                wc = cf - c0
                a = k - fan_first
                for r in range(n_rows):
                    rf = min(max(r + row_shift[f, i], 0.0), n_rows - 1.0)
                    r0 = int(rf)
                    r1 = min(r0 + 1, n_rows - 1)
                    wr = rf - r0
                    out[jj, r, i] += weight * ((1 - wc) * ((1 - wr) * proj[a, r0, c0] + wr * proj[a, r1, c0])
                                               + wc * ((1 - wr) * proj[a, r0, c0 + 1] + wr * proj[a, r1, c0 + 1]))


def fan_views_needed(geometry: HelicalGeometry, views: range) -> range:
    """The fan views that rebinning the parallel views ``views`` reads (within the scan)."""
    lo, hi = _fan_reach(geometry)
    first = max(0, views.start + lo)
    stop = min(geometry.number_of_views, views.stop + hi)
    return range(first, max(first, stop))


def rebin_views(fan: np.ndarray, fan_first: int, views: range, geometry: HelicalGeometry) -> ParallelData:
    """Rebin the parallel views ``views`` from ``fan``, which holds fan views ``fan_first ..`` (at least
    :func:`fan_views_needed`); the same numbers as :func:`rebin_to_parallel` gives for those views.
    With a flying focal spot, every view is sampled with its own spot's rays (:func:`focal_spot_rebinning`)
    and consecutive views (of alternating spots) are interpolated onto the nominal parallel rays."""
    coordinates = rebinning_coordinates(geometry)
    needed = fan_views_needed(geometry, views)
    if fan_first > needed.start or fan_first + fan.shape[0] < needed.stop:
        raise ValueError(f"rebinning views {views.start}..{views.stop - 1} needs fan views "
                         f"{needed.start}..{needed.stop - 1}")
    n_t = geometry.detector_columns
    out = np.zeros((len(views), geometry.detector_rows, n_t), dtype=np.float32)
    if geometry.focal_spot_offsets:
        spots = focal_spot_rebinning(geometry)
        first_view, view_weight = focal_spot_views(geometry, views, spots)
        _rebin_focal_spots(np.ascontiguousarray(fan, dtype=np.float32), fan_first, first_view, view_weight,
                           spots.column, spots.row_shift, out)
        return ParallelData(values=out, t_spacing_mm=coordinates.t_spacing_mm)
    _rebin(np.ascontiguousarray(fan, dtype=np.float32), fan_first, views.start, geometry.number_of_views,
           coordinates.view_offset, coordinates.column, out)
    return ParallelData(values=out, t_spacing_mm=coordinates.t_spacing_mm)


@numba.njit(parallel=True, cache=True)
def _rebin(proj, fan_first, view_first, n_views, view_offset, column, out):
    """``proj`` holds fan views ``fan_first ..``, ``out`` parallel views ``view_first ..``; view indices
    in the arithmetic are the scan's, so any split of the views gives the same numbers."""
    n_cols = proj.shape[2]
    n_rows = proj.shape[1]
    n_t = out.shape[2]
    for jj in numba.prange(out.shape[0]):
        j = view_first + jj
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
            k = k0 - fan_first
            for r in range(n_rows):
                out[jj, r, i] = ((1 - wk) * ((1 - wc) * proj[k, r, c0] + wc * proj[k, r, c0 + 1])
                                 + wk * ((1 - wc) * proj[k + 1, r, c0] + wc * proj[k + 1, r, c0 + 1]))


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
    """Ramp-filter every rebinned row along t, in place, block by block (scipy's FFT in float32 on as
    many threads as numba uses: three times numpy's single-threaded FFT on 2 cores)."""
    values = data.values
    n_t = values.shape[2]
    n_padded = 1 << int(math.ceil(math.log2(2 * n_t)))
    response = ramp_filter_response(n_padded, data.t_spacing_mm, kernel, cutoff).astype(np.float32)
    workers = numba.get_num_threads()
    for start in range(0, values.shape[0], views_per_block):
        block = values[start:start + views_per_block]
        spectrum = scipy.fft.rfft(block, n=n_padded, axis=2, workers=workers)
        spectrum *= response
        block[...] = scipy.fft.irfft(spectrum, n=n_padded, axis=2, workers=workers)[..., :n_t]
    return data


#: LLVM fast-math flags of the backprojection kernel: contraction to FMA and reassociation within one
#: voxel update (the sums over views keep their order, so slabs and tiles do not change a result's bits)
FASTMATH = {"contract", "arcp", "nsz", "afn", "reassoc"}

#: voxel columns (consecutive y) the kernel updates as one vector: every loop over them has this fixed
#: length and no branch, so LLVM vectorises it (rays cross only a few slices of a coarse grid: a loop
#: along z would be too short to vectorise; 16: the profile is transposed as two blocks of 8 rays, and
#: _min_of / _max_of reduce 16 values)
GROUP = 16

#: groups (consecutive x) per tile: the tile's groups share each view's data while it is in cache
TILE_GROUPS = 16

#: detector rows around the group's mean row that the vectorised row interpolation reads per slice:
#: LLVM does not vectorise gathers here, so each column's rows r0 and r0 + 1 of its linear interpolation
#: are picked from a fixed window of rows by blends (:func:`_make_update_slice`): 4 rows where the
#: columns' rows lie within 0.9 of their mean, else 6 (within 1.9); a view whose columns spread wider
#: takes a scalar loop
ROW_WINDOW = 6

#: fields of the kernel's per-column array (per group of columns): position, 1.0 if inside the grid and
#: the rebinned field, and per direction the fan angle in views, the in-plane source distance term
#: ``R cos(gamma)`` and the detector distance along the ray
C_X, C_Y, C_ACTIVE, C_GAMMA, C_COS, C_DIST = range(6)
C_FIELDS = 6

#: fields of the kernel's per-view ray array: weight 1.0/0.0 (ray on the detector and in the scan), first
#: t sample and the weight of the second, source z, detector mm per mm of z, row per mm of z, row at
#: z = 0, and the z range where |q| < 1 (empty when the weight is 0)
R_OK, R_T0, R_WT, R_SRC, R_SLOPE, R_PER_MM, R_AT, R_LO, R_HI, R_SPREAD = range(10)
R_FIELDS = 10


@numba.njit(inline="always")
def _min_of(x, at):
    """min(x[at:at + 16]) as a tree (four dependent steps instead of sixteen)."""
    a0 = min(x[at], x[at + 8])
    a1 = min(x[at + 1], x[at + 9])
    a2 = min(x[at + 2], x[at + 10])
    a3 = min(x[at + 3], x[at + 11])
    a4 = min(x[at + 4], x[at + 12])
    a5 = min(x[at + 5], x[at + 13])
    a6 = min(x[at + 6], x[at + 14])
    a7 = min(x[at + 7], x[at + 15])
    return min(min(min(a0, a4), min(a2, a6)), min(min(a1, a5), min(a3, a7)))


@numba.njit(inline="always")
def _max_of(x, at):
    """max(x[at:at + 16]) as a tree."""
    a0 = max(x[at], x[at + 8])
    a1 = max(x[at + 1], x[at + 9])
    a2 = max(x[at + 2], x[at + 10])
    a3 = max(x[at + 3], x[at + 11])
    a4 = max(x[at + 4], x[at + 12])
    a5 = max(x[at + 5], x[at + 13])
    a6 = max(x[at + 6], x[at + 14])
    a7 = max(x[at + 7], x[at + 15])
    return max(max(max(a0, a4), max(a2, a6)), max(max(a1, a5), max(a3, a7)))


#: shuffles of the 8 x 8 float32 transpose (unpack, shuffle, then swap of 128-bit halves)
_UNPACK_LO = (0, 8, 1, 9, 4, 12, 5, 13)
_UNPACK_HI = (2, 10, 3, 11, 6, 14, 7, 15)
_PAIR_LO = (0, 1, 8, 9, 4, 5, 12, 13)
_PAIR_HI = (2, 3, 10, 11, 6, 7, 14, 15)
_HALF_LO = (0, 1, 2, 3, 8, 9, 10, 11)
_HALF_HI = (4, 5, 6, 7, 12, 13, 14, 15)


@intrinsic
def _rows_to_profile(typingctx, src, offsets, a0, step, weights, profile, at):
    """Eight rows of eight rays into the profile, transposed in registers: ``profile[at + r * GROUP + c] =
    (1 - w) src[o + r] + w src[o + step + r]`` for r, c in 0..7, with ``o = offsets[a0 + c]`` and ``w =
    weights[a0 + c]``. LLVM would store a loop's (row, column) transpose element by element (a scatter);
    here each ray's eight rows are two vector loads and each profile row one vector store."""
    sig = types.void(src, offsets, a0, step, weights, profile, at)

    def codegen(context, builder, signature, args):
        src_v, offsets_v, a0_v, step_v, weights_v, profile_v, at_v = args
        src_a = context.make_array(signature.args[0])(context, builder, src_v)
        offsets_a = context.make_array(signature.args[1])(context, builder, offsets_v)
        weights_a = context.make_array(signature.args[4])(context, builder, weights_v)
        profile_a = context.make_array(signature.args[5])(context, builder, profile_v)
        f32 = ir.FloatType()
        i32 = ir.IntType(32)
        i64 = ir.IntType(64)
        vec = ir.VectorType(f32, 8)
        undef = ir.Constant(vec, ir.Undefined)
        splat = ir.Constant(ir.VectorType(i32, 8), [0] * 8)

        def broadcast(value):
            return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(i32, 0)), undef, splat)

        def shuffle(x, y, mask):
            return builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, 8), list(mask)))

        rays = []
        for c in range(8):
            index = builder.add(a0_v, ir.Constant(i64, c))
            offset = builder.load(builder.gep(offsets_a.data, [index]))
            x0 = builder.load(builder.bitcast(builder.gep(src_a.data, [offset]), vec.as_pointer()), align=4)
            x1 = builder.load(builder.bitcast(builder.gep(src_a.data, [builder.add(offset, step_v)]),
                                              vec.as_pointer()), align=4)
            w1 = builder.load(builder.gep(weights_a.data, [index]))
            w0 = builder.fsub(ir.Constant(f32, 1.0), w1)
            rays.append(builder.fadd(builder.fmul(broadcast(w0), x0), builder.fmul(broadcast(w1), x1)))
        t = []
        for p in range(4):
            t += [shuffle(rays[2 * p], rays[2 * p + 1], _UNPACK_LO), shuffle(rays[2 * p], rays[2 * p + 1], _UNPACK_HI)]
        u = [shuffle(t[0], t[2], _PAIR_LO), shuffle(t[0], t[2], _PAIR_HI),
             shuffle(t[1], t[3], _PAIR_LO), shuffle(t[1], t[3], _PAIR_HI),
             shuffle(t[4], t[6], _PAIR_LO), shuffle(t[4], t[6], _PAIR_HI),
             shuffle(t[5], t[7], _PAIR_LO), shuffle(t[5], t[7], _PAIR_HI)]
        rows = ([shuffle(u[i], u[i + 4], _HALF_LO) for i in range(4)]
                + [shuffle(u[i], u[i + 4], _HALF_HI) for i in range(4)])
        for r in range(8):
            position = builder.add(at_v, ir.Constant(i64, GROUP * r))
            builder.store(rows[r], builder.bitcast(builder.gep(profile_a.data, [position]), vec.as_pointer()),
                          align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefetch(typingctx, array, index):
    """Ask the CPU to fetch the cache line of ``array[index]`` (a hint: no effect on results)."""
    sig = types.void(array, index)

    def codegen(context, builder, signature, args):
        array_a = context.make_array(signature.args[0])(context, builder, args[0])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        # named for the i8* of llvmlite's IR (LLVM with opaque pointers renames it to .p0)
        prefetch = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]),
                                                  "llvm.prefetch.p0i8")
        address = builder.bitcast(builder.gep(array_a.data, [args[1]]), i8p)
        builder.call(prefetch, [address, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


def _taper_coefficients() -> tuple[float, ...]:
    """The aperture weight's taper ``cos^2(pi s / 2) = 1/2 - sin(pi y) / 2`` (s = (q - Q) / (1 - Q) in
    [0, 1], y = s - 1/2) as the polynomial ``1/2 + y P(y^2)``, P being minus half of sin(pi y) / y's
    Taylor series to y^10 (error below 6e-8 on |y| <= 1/2, under float32's rounding of W), scaled so
    that W is exactly 1 at y = -1/2 and 0 at y = 1/2 in exact arithmetic. libm's sin and cos cost more
    than the rest of a voxel update and do not vectorise. Highest power first."""
    series = [(-1) ** k * math.pi ** (2 * k + 1) / math.factorial(2 * k + 1) for k in range(6)]
    at_half = 0.5 * sum(c * 0.25 ** k for k, c in enumerate(series))  # sin(pi / 2) by the series
    return tuple(-0.5 * c / at_half for c in reversed(series))


TAPER_COEFFICIENTS = _taper_coefficients()


@numba.njit(inline="always")
def _taper(y):
    """The taper ``1/2 + y P(y^2)`` (:func:`_taper_coefficients`) in float32, y in [-1/2, 1/2]."""
    y2 = y * y
    p = np.float32(TAPER_COEFFICIENTS[0])
    p = p * y2 + np.float32(TAPER_COEFFICIENTS[1])
    p = p * y2 + np.float32(TAPER_COEFFICIENTS[2])
    p = p * y2 + np.float32(TAPER_COEFFICIENTS[3])
    p = p * y2 + np.float32(TAPER_COEFFICIENTS[4])
    p = p * y2 + np.float32(TAPER_COEFFICIENTS[5])
    return np.float32(0.5) + y * p


def _use_512_bit_vectors(function: ir.Function) -> None:
    """Let LLVM keep the kernel's 16-wide float32 vectors whole on AVX-512 machines: by default it splits
    them in two 256-bit halves (the target's preferred width); whole, the slice update runs ~5-8 % faster
    on this project's 2-core Sapphire Rapids. A hint only: other machines split as before. The string
    attributes are added to llvmlite's attribute set directly, as it only accepts a list of names."""
    set.add(function.attributes, '"min-legal-vector-width"="512"')
    set.add(function.attributes, '"prefer-vector-width"="512"')


def _make_update_slice(window: int):
    """The slice update on a window of ``window`` detector rows (ROW_WINDOW) as an intrinsic:
    ``update(rays, profile, row, num, den, at, z, rb, constants)`` updates the GROUP columns of one slice
    as one vector of GROUP float32, with the arithmetic of the scalar loop it replaces: for each column a,
    ``q_signed = (z - source_z) q_per_mm`` (q: the normalised detector row, |q| = 1 at the detector's
    edges), the aperture weight ``W = 1/2 + y P(y^2)`` with ``y = clip(q taper_scale + taper_offset,
    -1/2, 1/2)`` (1 for |q| <= Q, the cos^2 taper, :func:`_taper_coefficients`), 0 where |q| >= 1;
    the row ``rt = clip(r_mid + q_signed n_rows / 2, 0, top) - rb`` interpolated linearly in the window
    rows of ``profile`` from ``row`` (the two rows picked by blends); then ``num[at + a] += W val``,
    ``den[at + a] += W``. ``rays`` holds source_z and q_per_mm (GROUP each); ``constants`` taper_scale,
    taper_offset, n_rows / 2, r_mid and top."""

    @intrinsic
    def update_slice(typingctx, rays, profile, row, num, den, at, z, rb, constants):
        sig = types.void(rays, profile, row, num, den, at, z, rb, constants)

        def codegen(context, builder, signature, args):
            rays_v, profile_v, row_v, num_v, den_v, at_v, z_v, rb_v, constants_v = args
            _use_512_bit_vectors(builder.function)
            rays_a = context.make_array(signature.args[0])(context, builder, rays_v)
            profile_a = context.make_array(signature.args[1])(context, builder, profile_v)
            num_a = context.make_array(signature.args[3])(context, builder, num_v)
            den_a = context.make_array(signature.args[4])(context, builder, den_v)
            constants_a = context.make_array(signature.args[8])(context, builder, constants_v)
            f32 = ir.FloatType()
            i32 = ir.IntType(32)
            i64 = ir.IntType(64)
            vec = ir.VectorType(f32, GROUP)
            undef = ir.Constant(vec, ir.Undefined)
            splat = ir.Constant(ir.VectorType(i32, GROUP), [0] * GROUP)
            suffix = f"v{GROUP}f32"
            module = builder.module
            fma = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec] * 3), f"llvm.fma.{suffix}")
            fabs = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec]), f"llvm.fabs.{suffix}")
            vmin = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec] * 2), f"llvm.minnum.{suffix}")
            vmax = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec] * 2), f"llvm.maxnum.{suffix}")
            floor = cgutils.get_or_insert_function(module, ir.FunctionType(vec, [vec]), f"llvm.floor.{suffix}")

            def broadcast(value):
                return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(i32, 0)), undef, splat)

            def constant(k):
                return broadcast(builder.load(builder.gep(constants_a.data, [ir.Constant(i64, k)])))

            def pointer(array, offset):
                return builder.bitcast(builder.gep(array.data, [offset]), vec.as_pointer())

            def load(array, offset):
                return builder.load(pointer(array, offset), align=4)

            def uniform(x):
                return ir.Constant(vec, [x] * GROUP)

            taper_scale, taper_offset, half_rows, r_mid, top = (constant(k) for k in range(5))
            source_z = load(rays_a, ir.Constant(i64, 0))
            q_per_mm = load(rays_a, ir.Constant(i64, GROUP))
            zero = uniform(0.0)
            q_signed = builder.fmul(builder.fsub(broadcast(z_v), source_z), q_per_mm)
            q = builder.call(fabs, [q_signed])
            y = builder.call(vmin, [builder.call(vmax, [builder.call(fma, [q, taper_scale, taper_offset]),
                                                        uniform(-0.5)]), uniform(0.5)])
            y2 = builder.fmul(y, y)
            p = uniform(TAPER_COEFFICIENTS[0])
            for coefficient in TAPER_COEFFICIENTS[1:]:
                p = builder.call(fma, [p, y2, uniform(coefficient)])
            taper = builder.call(fma, [y, p, uniform(0.5)])
            w = builder.select(builder.fcmp_ordered("<", q, uniform(1.0)), taper, zero)
            rt = builder.call(vmin, [builder.call(vmax, [builder.call(fma, [q_signed, half_rows, r_mid]), zero]), top])
            rt = builder.fsub(rt, broadcast(rb_v))
            # rows r0 = floor(rt) and r0 + 1 of the window (0 <= rt <= window - 1 where the weight is
            # not 0; rt = window - 1 takes r0 = window - 2 and weight 1 for the row above)
            r0 = builder.call(vmin, [builder.call(floor, [rt]), uniform(window - 2.0)])
            frac = builder.fsub(rt, r0)
            rows = [load(profile_a, builder.add(row_v, ir.Constant(i64, m * GROUP))) for m in range(window)]
            p_lo = rows[0]
            p_hi = rows[1]
            for m in range(1, window - 1):
                at_m = builder.fcmp_ordered(">=", r0, uniform(float(m)))
                p_lo = builder.select(at_m, rows[m], p_lo)
                p_hi = builder.select(at_m, rows[m + 1], p_hi)
            val = builder.call(fma, [builder.fsub(p_hi, p_lo), frac, p_lo])
            num_p = pointer(num_a, at_v)
            den_p = pointer(den_a, at_v)
            builder.store(builder.call(fma, [w, val, builder.load(num_p, align=4)]), num_p, align=4)
            builder.store(builder.fadd(builder.load(den_p, align=4), w), den_p, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return update_slice


_update_slice4 = _make_update_slice(4)
_update_slice6 = _make_update_slice(6)


@numba.njit(parallel=True, cache=True, fastmath=FASTMATH)
def _backproject(filtered_t, view0, n_views, t_spacing, sin_phi, cos_phi, radius, det_dist, flat, row_pitch_det,
                 views_per_turn, direction, start_z, feed, aperture_q, z_reach_scale, xs, ys, zs, z_step,
                 n_workers, out, n_valid_out):
    """The kernel. ``filtered_t`` holds views ``view0 ..`` as (views, t, rows), float32; ``zs`` ascending,
    with ``z_step`` > 0 when uniformly spaced (then slice ranges are computed, else binary-searched).

    Voxel columns are taken GROUP at a time (consecutive y), TILE_GROUPS groups to a tile; tiles are
    dealt round-robin to ``n_workers`` parallel tasks (the corners outside the field hold no work).
    Per tile and parallel direction k, the views of that direction (j = k + m n_half) are walked once
    (the next direction's data of the tile is prefetched meanwhile, :func:`_prefetch`).
    For one group and view, each column's ray (t, fan angle, source z, slope of q along z) is set up
    in one vector step (fields of one flat array, so that LLVM vectorises without alias checks), its two
    neighbouring t samples are interpolated into one profile along the rows (only the rows the slab's
    slices reach; eight rows of eight rays at a time, transposed in registers by
    :func:`_rows_to_profile`), and the slices where any of the group's rays has |q| < 1 are visited; per
    slice, the GROUP columns are updated as one float32 vector (:func:`_make_update_slice`) with the
    weight and the row interpolation computed branch-free (weight 0 where |q| >= 1; each column's two
    rows picked from a window of 4 or 6 rows by blends, as LLVM does not vectorise gathers; a ray not
    used gets a source far away, so that its |q| > 1). Per voxel, the sums run in the same order as a
    voxel-by-voxel loop over views (per direction by ascending view, partners averaged with their
    weights, then over directions), so a slab or tile split changes no bit of a result.
    """
    n_local, n_t, n_rows = filtered_t.shape
    flat_t = filtered_t.ravel()
    n_half = views_per_turn // 2
    nx = xs.shape[0]
    ny = ys.shape[0]
    nz = zs.shape[0]
    f32 = np.float32
    u64 = np.uint64  # indices cast to unsigned: numba then skips its negative-index wraparound
    zero = f32(0.0)
    one = f32(1.0)
    zs32 = zs.astype(np.float32)
    t_center = (n_t - 1) / 2.0
    inv_t_spacing = 1.0 / t_spacing
    v_edge = n_rows / 2.0 * row_pitch_det  # |v| at the detector's outer edge (|q| = 1), mm at the detector
    inv_v_edge64 = 1.0 / v_edge
    r_mid = f32((n_rows - 1) / 2.0)
    top = f32(n_rows - 1.0)
    r_last = u64(max(n_rows - 2, 0))
    n_rows_padded = max(n_rows, ROW_WINDOW)
    # the slice update's constants (see _make_update_slice)
    constants = np.array([1.0 / (1.0 - aperture_q), -aperture_q / (1.0 - aperture_q) - 0.5, n_rows / 2.0,
                          (n_rows - 1) / 2.0, n_rows - 1.0], dtype=np.float32)
    taper_scale = f32(1.0 / (1.0 - aperture_q))
    taper_offset = f32(-aperture_q / (1.0 - aperture_q) - 0.5)
    half_rows = f32(n_rows / 2.0)
    max_t = t_center * t_spacing
    views_per_mm = views_per_turn / feed
    view_scale = direction * views_per_turn / (2.0 * math.pi)
    z_per_view = feed / views_per_turn
    j_min = max(0, view0)
    j_max = min(n_views - 1, view0 + n_local - 1)
    last_view = n_views - 1.0
    groups_y = (ny + GROUP - 1) // GROUP
    tiles_x = (nx + TILE_GROUPS - 1) // TILE_GROUPS
    n_tiles = tiles_x * groups_y
    inv_z_step = 1.0 / z_step if z_step > 0.0 else 0.0
    for worker in numba.prange(n_workers):
        num = np.zeros((TILE_GROUPS, nz, GROUP), dtype=np.float32)
        den = np.zeros((TILE_GROUPS, nz, GROUP), dtype=np.float32)
        total = np.zeros((TILE_GROUPS, nz, GROUP))
        n_valid = np.zeros((TILE_GROUPS, nz, GROUP), dtype=np.int32)
        # per group, GROUP values of each of C_FIELDS column fields (x, y, active, ...) in one flat array,
        # and per view the group's rays (R_FIELDS fields): LLVM then sees each loop's loads and stores
        # at fixed distances in one array and vectorises it without runtime alias checks
        col = np.zeros(TILE_GROUPS * C_FIELDS * GROUP)
        ray = np.zeros(R_FIELDS * GROUP)
        g_first = np.zeros(TILE_GROUPS, dtype=np.int64)
        g_last = np.zeros(TILE_GROUPS, dtype=np.int64)
        profile = np.zeros((n_rows_padded + 1) * GROUP, dtype=np.float32)  # rows past the last stay 0
        i0 = np.zeros(GROUP, dtype=np.int64)
        offsets = np.zeros(GROUP, dtype=np.int64)
        wi = np.zeros(GROUP, dtype=np.float32)
        rays32 = np.zeros(2 * GROUP, dtype=np.float32)  # the slice update's rays: q = |z - source_z| q_per_mm
        source_z = rays32[:GROUP]
        q_per_mm = rays32[GROUP:]
        for tile in range(worker, n_tiles, n_workers):
            ix0 = (tile // groups_y) * TILE_GROUPS
            iy0 = (tile % groups_y) * GROUP
            n_groups = min(TILE_GROUPS, nx - ix0)
            tile_first = j_max + 1
            tile_last = j_min - 1
            for g in range(n_groups):
                first = j_max + 1
                last = j_min - 1
                cb = g * C_FIELDS * GROUP
                for a in range(GROUP):
                    iy = iy0 + a
                    x = xs[ix0 + g]
                    y = ys[min(iy, ny - 1)]
                    r_xy = math.sqrt(x * x + y * y)
                    col[cb + C_X * GROUP + a] = x
                    col[cb + C_Y * GROUP + a] = y
                    col[cb + C_ACTIVE * GROUP + a] = 0.0
                    if iy >= ny or r_xy >= max_t:
                        col[cb + C_X * GROUP + a] = 0.0
                        col[cb + C_Y * GROUP + a] = 0.0
                        continue
                    # views that can see this column of voxels anywhere in the slab
                    reach = z_reach_scale * (radius + r_xy)
                    gamma_views = math.asin(r_xy / radius) * views_per_turn / (2.0 * math.pi) + 2.0
                    c_first = max(j_min, int(math.floor((zs[0] - reach - start_z) * views_per_mm - gamma_views)))
                    c_last = min(j_max, int(math.ceil((zs[nz - 1] + reach - start_z) * views_per_mm + gamma_views)))
                    if c_last < c_first:
                        continue
                    col[cb + C_ACTIVE * GROUP + a] = 1.0
                    first = min(first, c_first)
                    last = max(last, c_last)
                g_first[g] = first
                g_last[g] = last
                tile_first = min(tile_first, first)
                tile_last = max(tile_last, last)
            if tile_last < tile_first:
                continue
            box_x0 = xs[ix0]
            box_x1 = xs[ix0 + n_groups - 1]
            box_y0 = ys[iy0]
            box_y1 = ys[min(iy0 + GROUP, ny) - 1]
            total[:n_groups] = 0.0
            n_valid[:n_groups] = 0
            for k in range(n_half):
                # the views of parallel direction k (mod pi): j = k + m n_half; the rays through (x, y)
                # have t and gamma of alternating sign, so one asin per column serves them all
                m_first = -((k - tile_first) // n_half)  # ceil((tile_first - k) / n_half)
                j0 = k + m_first * n_half
                if j0 > tile_last:
                    continue
                # the next direction's rays through the tile, into the cache while this one is done
                if k + 1 < n_half:
                    m_next = -((k + 1 - tile_first) // n_half)
                    for j in range(k + 1 + m_next * n_half, tile_last + 1, n_half):
                        sj = sin_phi[j]
                        cj = cos_phi[j]
                        t_a = -box_x0 * sj + box_y0 * cj
                        t_b = -box_x1 * sj + box_y0 * cj
                        t_c = -box_x0 * sj + box_y1 * cj
                        t_d = -box_x1 * sj + box_y1 * cj
                        i_lo = max(int(min(min(t_a, t_b), min(t_c, t_d)) * inv_t_spacing + t_center) - 1, 0)
                        i_hi = min(int(max(max(t_a, t_b), max(t_c, t_d)) * inv_t_spacing + t_center) + 2, n_t - 1)
                        first_line = ((j - view0) * n_t + i_lo) * n_rows
                        last_line = ((j - view0) * n_t + i_hi) * n_rows + n_rows - 1
                        for at in range(first_line, last_line + 1, 16):
                            _prefetch(flat_t, at)
                for g in range(n_groups):
                    if g_last[g] < g_first[g]:
                        continue
                    gb = u64(g * C_FIELDS * GROUP)
                    for a in range(GROUP):
                        s0 = (-col[gb + u64(C_X * GROUP + a)] * sin_phi[j0]
                              + col[gb + u64(C_Y * GROUP + a)] * cos_phi[j0]) / radius
                        cos_g = math.sqrt(1.0 - s0 * s0)
                        col[gb + u64(C_GAMMA * GROUP + a)] = math.asin(s0) * view_scale
                        col[gb + u64(C_COS * GROUP + a)] = radius * cos_g
                        col[gb + u64(C_DIST * GROUP + a)] = det_dist / cos_g if flat else det_dist
                    touched_lo = nz
                    touched_hi = -1
                    sign = -1.0
                    for j in range(j0, tile_last + 1, n_half):
                        sign = -sign
                        if j < g_first[g] or j > g_last[g]:
                            continue
                        jl = j - view0
                        sj = sin_phi[j]
                        cj = cos_phi[j]
                        # the group's rays in one vector step
                        for a in range(GROUP):
                            x = col[gb + u64(C_X * GROUP + a)]
                            y = col[gb + u64(C_Y * GROUP + a)]
                            kf = j + sign * col[gb + u64(C_GAMMA * GROUP + a)]
                            fi = (-x * sj + y * cj) * inv_t_spacing + t_center
                            fl = np.floor(fi)
                            inside = (kf >= 0.0) & (kf <= last_view) & (fl >= 0.0) & (fl < n_t - 1.0)
                            ok_a = col[gb + u64(C_ACTIVE * GROUP + a)] if inside else 0.0
                            fl = min(max(fl, 0.0), n_t - 2.0)
                            along = col[gb + u64(C_COS * GROUP + a)] - (x * cj + y * sj)  # source to voxel, in plane
                            z_src = start_z + kf * z_per_view
                            s = col[gb + u64(C_DIST * GROUP + a)] / along  # detector mm per mm of z offset
                            half = v_edge / s  # |z - z_src| < half <=> |q| < 1
                            per_mm = s / row_pitch_det
                            ray[u64(R_OK * GROUP + a)] = ok_a
                            ray[u64(R_T0 * GROUP + a)] = fl
                            ray[u64(R_WT * GROUP + a)] = fi - fl
                            ray[u64(R_SRC * GROUP + a)] = z_src
                            ray[u64(R_SLOPE * GROUP + a)] = s
                            ray[u64(R_PER_MM * GROUP + a)] = per_mm
                            ray[u64(R_AT * GROUP + a)] = (n_rows - 1) / 2.0 - z_src * per_mm
                            ray[u64(R_LO * GROUP + a)] = z_src - half if ok_a > 0.0 else 1e30
                            ray[u64(R_HI * GROUP + a)] = z_src + half if ok_a > 0.0 else -1e30
                        lo_z = _min_of(ray, u64(R_LO * GROUP))
                        hi_z = _max_of(ray, u64(R_HI * GROUP))
                        if lo_z > hi_z:
                            continue
                        if z_step > 0.0:
                            # the slices strictly inside (lo_z, hi_z), and any within 1e-4 of a step of its
                            # ends (where float32 rounding may still give |q| < 1)
                            lo = int(math.ceil((lo_z - zs[0]) * inv_z_step - 1e-4))
                            hi = int(math.floor((hi_z - zs[0]) * inv_z_step + 1e-4))
                        else:
                            lo = np.searchsorted(zs, lo_z) - 1
                            hi = np.searchsorted(zs, hi_z)
                        lo = max(lo, 0)
                        hi = min(hi, nz - 1)
                        if lo > hi:
                            continue
                        for a in range(GROUP):
                            i0[a] = int(ray[u64(R_T0 * GROUP + a)])
                            wi[a] = f32(ray[u64(R_WT * GROUP + a)])
                            # a ray not used gets q > 1e6 on every slice (weight 0)
                            ray_ok = ray[u64(R_OK * GROUP + a)] > 0.0
                            source_z[a] = f32(ray[u64(R_SRC * GROUP + a)]) if ray_ok else f32(-1e7)
                            q_per_mm[a] = f32(ray[u64(R_SLOPE * GROUP + a)] * inv_v_edge64) if ray_ok else one
                        touched_lo = min(touched_lo, lo)
                        touched_hi = max(touched_hi, hi)
                        # how far the rows r(z) = R_AT + R_PER_MM z of the columns stray from their
                        # mean (checked at both ends of the z range, where the spread is largest):
                        # within 0.9 rows a window of 4 rows, within 1.9 one of 6, else the scalar loop
                        z_first = zs[lo]
                        z_last = zs[hi]
                        n_ok = 0.0
                        mean_at = 0.0
                        mean_per_mm = 0.0
                        for a in range(GROUP):
                            ok_a = ray[u64(R_OK * GROUP + a)]
                            n_ok += ok_a
                            mean_at += ok_a * ray[u64(R_AT * GROUP + a)]
                            mean_per_mm += ok_a * ray[u64(R_PER_MM * GROUP + a)]
                        mean_at /= n_ok
                        mean_per_mm /= n_ok
                        for a in range(GROUP):
                            d_at = ray[u64(R_AT * GROUP + a)] - mean_at
                            d_per_mm = ray[u64(R_PER_MM * GROUP + a)] - mean_per_mm
                            d = max(abs(d_at + d_per_mm * z_first), abs(d_at + d_per_mm * z_last))
                            ray[u64(R_SPREAD * GROUP + a)] = d if ray[u64(R_OK * GROUP + a)] > 0.0 else 0.0
                        spread = _max_of(ray, u64(R_SPREAD * GROUP))
                        # the rows the slices lo..hi read: within the spread of the mean row (linear
                        # in z, its extremes at the ends), with a row's margin for rounding; rows left
                        # out keep finite values from earlier rays, which the interpolation weighs by
                        # exactly 0
                        mean_first = mean_at + mean_per_mm * z_first
                        mean_last = mean_at + mean_per_mm * z_last
                        r_min = min(mean_first, mean_last) - spread
                        r_max = max(mean_first, mean_last) + spread
                        row_first = max(int(math.floor(max(r_min, -1.0))) - 1, 0)
                        row_stop = min(int(math.floor(min(r_max, n_rows + 1.0))) + 3, n_rows)
                        # each ray's samples along those rows, interpolated in t once, as (row, column):
                        # eight rows of eight rays at a time (every ray's t samples lie in the block,
                        # weighted 0 where the ray is not used; the last eight rows end at the last row)
                        if n_rows >= 8:
                            for r_block in range(row_first, row_stop, 8):
                                r_start = min(r_block, n_rows - 8)
                                for a in range(GROUP):
                                    offsets[a] = (jl * n_t + i0[a]) * n_rows + r_start
                                _rows_to_profile(flat_t, offsets, 0, n_rows, wi, profile, r_start * GROUP)
                                _rows_to_profile(flat_t, offsets, 8, n_rows, wi, profile, r_start * GROUP + 8)
                        else:
                            for a in range(GROUP):
                                base = (jl * n_t + i0[a]) * n_rows
                                w1 = wi[a]
                                w0 = one - w1
                                for r in range(row_first, row_stop):
                                    profile[u64(r * GROUP + a)] = (w0 * flat_t[u64(base + r)]
                                                                   + w1 * flat_t[u64(base + n_rows + r)])
                        if spread < 0.9:
                            for iz in range(lo, hi + 1):
                                z = zs32[u64(iz)]
                                r_base = int(math.floor(mean_at + mean_per_mm * z)) - 1
                                r_base = min(max(r_base, 0), n_rows_padded - 4)
                                _update_slice4(rays32, profile, r_base * GROUP, num, den, (g * nz + iz) * GROUP, z,
                                               f32(r_base), constants)
                        elif spread < 1.9:
                            for iz in range(lo, hi + 1):
                                z = zs32[u64(iz)]
                                r_base = int(math.floor(mean_at + mean_per_mm * z)) - 2
                                r_base = min(max(r_base, 0), n_rows_padded - 6)
                                _update_slice6(rays32, profile, r_base * GROUP, num, den, (g * nz + iz) * GROUP, z,
                                               f32(r_base), constants)
                        else:
                            for iz in range(lo, hi + 1):
                                z = zs32[u64(iz)]
                                num_z = num[u64(g), u64(iz)]
                                den_z = den[u64(g), u64(iz)]
                                for a in range(GROUP):
                                    q_signed = (z - source_z[a]) * q_per_mm[a]
                                    q = abs(q_signed)
                                    w = _taper(min(max(q * taper_scale + taper_offset, f32(-0.5)), f32(0.5)))
                                    w = w if q < one else zero
                                    rf = min(max(q_signed * half_rows + r_mid, zero), top)
                                    r0 = min(u64(rf), r_last)
                                    wr = rf - f32(r0)
                                    at = r0 * u64(GROUP) + u64(a)
                                    p0 = profile[at]
                                    num_z[a] += w * (p0 + wr * (profile[at + u64(GROUP)] - p0))
                                    den_z[a] += w
                    # average each voxel's partners of this direction, then add the direction
                    for iz in range(max(touched_lo, 0), touched_hi + 1):
                        num_z = num[u64(g), u64(iz)]
                        den_z = den[u64(g), u64(iz)]
                        total_z = total[u64(g), u64(iz)]
                        valid_z = n_valid[u64(g), u64(iz)]
                        for a in range(GROUP):
                            d = den_z[a]
                            seen = d > zero
                            total_z[a] += num_z[a] / d if seen else 0.0
                            valid_z[a] += 1 if seen else 0
                            num_z[a] = zero
                            den_z[a] = zero
            for g in range(n_groups):
                for a in range(GROUP):
                    iy = iy0 + a
                    if iy >= ny or col[g * C_FIELDS * GROUP + C_ACTIVE * GROUP + a] == 0.0:
                        continue
                    for iz in range(nz):
                        count = n_valid[g, iz, a]
                        out[ix0 + g, iy, iz] = total[g, iz, a] * math.pi / count if count > 0 else 0.0
                        n_valid_out[ix0 + g, iy, iz] = count


@dataclass(frozen=True)
class Reconstruction:
    mu_per_mm: np.ndarray  # float32 (nx, ny, nz)
    #: voxels for which some parallel directions had no ray (outside the helix's coverage)
    incomplete_voxels: int
    #: which voxels those are (bool, like mu_per_mm)
    incomplete_mask: np.ndarray | None = None


#: default bound on the views a slab of slices holds: the filtered views (backproject), plus one chunk's
#: fan views, rebinned views and spectrum when streaming (reconstruct, reconstruct_streamed)
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


#: a function that returns the fan views ``views`` (views, rows, columns) of a projection set: a slice of
#: an array in memory, or the blocks of a projection store that hold them
ViewReader = Callable[[range], np.ndarray]

#: parallel views rebinned and filtered at a time when streaming (with their fan views, the working
#: set beside the slab's filtered views)
VIEWS_PER_CHUNK = 64


def _backproject_slabs(filtered_block: Callable[[range], np.ndarray], geometry: HelicalGeometry,
                       settings: ReconstructionSettings, xs_mm: np.ndarray, ys_mm: np.ndarray, zs_mm: np.ndarray,
                       t_spacing: float, plan_bytes: int, plan_bytes_per_view: int, strict: bool = False,
                       fixed_bytes: int = 0) -> Reconstruction:
    """Backproject slab by slab: ``filtered_block(views)`` gives a slab's filtered views as (views, t, rows)
    float32; the slab plan fits ``plan_bytes_per_view`` per view into ``plan_bytes`` (``strict``: a slice
    whose views alone exceed it is an error, else it makes a slab of its own)."""
    xs = np.asarray(xs_mm, np.float64).ravel()
    ys = np.asarray(ys_mm, np.float64).ravel()
    zs_sorted, order, step = _sorted_z(zs_mm)
    n_views, n_t = geometry.number_of_views, geometry.detector_columns
    phi = geometry.view_angles_rad()
    sin_phi, cos_phi = np.sin(phi), np.cos(phi)
    out = np.zeros((xs.size, ys.size, zs_sorted.size), dtype=np.float32)
    n_valid = np.zeros(out.shape, dtype=np.int32)
    z_reach_scale = (geometry.detector_rows / 2.0) * geometry.row_height_at_detector_mm / geometry.source_to_detector_mm
    plan = slab_plan(geometry, n_t, t_spacing, zs_sorted, plan_bytes_per_view, plan_bytes)
    if strict and any(len(views) * plan_bytes_per_view > plan_bytes for _, views in plan):
        needed = max(len(views) for _, views in plan) * plan_bytes_per_view
        raise ValueError(f"max_slab_bytes is too small: one slice's views need {needed + fixed_bytes} bytes")
    for z_slice, views in plan:
        block = filtered_block(views)
        zs_slab = np.ascontiguousarray(zs_sorted[z_slice])
        out_slab = np.zeros((xs.size, ys.size, zs_slab.size), dtype=np.float32)
        valid_slab = np.zeros(out_slab.shape, dtype=np.int32)
        _backproject(block, views.start, n_views, float(t_spacing), sin_phi, cos_phi,
                     float(geometry.source_to_isocenter_mm), float(geometry.source_to_detector_mm),
                     geometry.detector_shape == "flat", float(geometry.row_height_at_detector_mm),
                     int(geometry.views_per_turn), int(geometry.rotation_direction), float(geometry.start_z_mm),
                     float(geometry.table_feed_per_turn_mm), float(settings.aperture_q), z_reach_scale,
                     xs, ys, zs_slab, step, 4 * numba.get_num_threads(), out_slab, valid_slab)
        del block
        out[:, :, z_slice] = out_slab
        n_valid[:, :, z_slice] = valid_slab
    unsorted = np.empty_like(out)
    unsorted[:, :, order] = out
    valid_unsorted = np.empty_like(n_valid)
    valid_unsorted[:, :, order] = n_valid
    max_t = t_spacing * (n_t - 1) / 2
    mask = incomplete_mask(valid_unsorted, xs, ys, max_t, geometry.views_per_turn)
    return Reconstruction(mu_per_mm=unsorted, incomplete_voxels=int(mask.sum()), incomplete_mask=mask)


def backproject(filtered: ParallelData, geometry: HelicalGeometry, settings: ReconstructionSettings,
                xs_mm: np.ndarray, ys_mm: np.ndarray, zs_mm: np.ndarray,
                max_slab_bytes: int = DEFAULT_MAX_SLAB_BYTES) -> Reconstruction:
    """Aperture-weighted backprojection onto the grid of voxel centres xs x ys x zs (scanner frame).

    Works slab by slab of slices: each slab copies only the views it needs, transposed to (views, t,
    rows) so that the kernel reads a ray's rows from neighbouring memory; ``max_slab_bytes`` bounds that copy.
    """
    n_views, n_rows, n_t = filtered.values.shape
    if n_views != geometry.number_of_views:
        raise ValueError("filtered views do not match the geometry's number of views")

    def block(views: range) -> np.ndarray:
        return np.ascontiguousarray(filtered.values[views.start:views.stop].transpose(0, 2, 1))

    return _backproject_slabs(block, geometry, settings, xs_mm, ys_mm, zs_mm, filtered.t_spacing_mm,
                              max_slab_bytes, n_rows * n_t * 4)


class _RollingViews:
    """Fan views read in ascending ranges: keeps the overlap with the previous range, reads the rest."""

    def __init__(self, read_views: ViewReader):
        self.read_views = read_views
        self.held = range(0)
        self.values = np.zeros((0,), np.float32)
        self.views_read = 0  # how many views read_views delivered (a test's check on re-reading)

    def get(self, views: range) -> np.ndarray:
        if self.held.start <= views.start < self.held.stop and views.stop >= self.held.stop:
            kept = self.values[views.start - self.held.start:]
            new = self._read(range(self.held.stop, views.stop))
            self.values = np.concatenate([kept, new]) if len(new) else kept
        else:
            self.values = self._read(views)
        self.held = views
        return self.values

    def _read(self, views: range) -> np.ndarray:
        values = np.asarray(self.read_views(views), dtype=np.float32)
        self.views_read += len(views)
        return values


def streaming_bytes(geometry: HelicalGeometry) -> tuple[int, int]:
    """(bytes per filtered view a slab holds, fixed bytes of the rebinning chunk) of
    :func:`reconstruct_streamed`: a slab of V views holds at most ``V * per_view + fixed`` bytes of views."""
    view_bytes = geometry.detector_rows * geometry.detector_columns * 4
    lo, hi = _fan_reach(geometry)
    chunk_fan = VIEWS_PER_CHUNK + hi - lo
    # the chunk's fan views (twice while the window moves on), its rebinned views and their FFT
    n_padded = 1 << int(math.ceil(math.log2(2 * geometry.detector_columns)))
    fft_bytes = VIEWS_PER_CHUNK * geometry.detector_rows * ((n_padded // 2 + 1) * 8 + n_padded * 4)
    return view_bytes, 2 * chunk_fan * view_bytes + 2 * VIEWS_PER_CHUNK * view_bytes + fft_bytes


def reconstruct_streamed(read_views: ViewReader, geometry: HelicalGeometry, settings: ReconstructionSettings,
                         xs_mm: np.ndarray, ys_mm: np.ndarray, zs_mm: np.ndarray,
                         max_slab_bytes: int = DEFAULT_MAX_SLAB_BYTES) -> Reconstruction:
    """WFBP (numba) that never holds the whole projection set: slab by slab of slices, the slab's views
    are read through ``read_views`` VIEWS_PER_CHUNK at a time (with the neighbouring fan views rebinning
    needs), rebinned, filtered and kept as the slab's filtered block; then backprojected.

    Memory: the slab's filtered views plus one chunk's fan views, rebinned views and spectrum stay
    below ``max_slab_bytes`` (:func:`streaming_bytes`); the output volume comes on top. Slabs overlap in
    views, so views near slab boundaries are read and rebinned more than once. The numbers equal
    :func:`reconstruct`'s bit for bit (the same arithmetic on every view).
    """
    per_view, fixed = streaming_bytes(geometry)
    fan = _RollingViews(read_views)
    n_rows, n_t = geometry.detector_rows, geometry.detector_columns
    t_spacing = rebinning_coordinates(geometry).t_spacing_mm

    def block(views: range) -> np.ndarray:
        out = np.empty((len(views), n_t, n_rows), dtype=np.float32)
        for start in range(views.start, views.stop, VIEWS_PER_CHUNK):
            chunk = range(start, min(start + VIEWS_PER_CHUNK, views.stop))
            needed = fan_views_needed(geometry, chunk)
            parallel = rebin_views(fan.get(needed), needed.start, chunk, geometry)
            filter_rows(parallel, settings.kernel, settings.cutoff)
            out[chunk.start - views.start:chunk.stop - views.start] = parallel.values.transpose(0, 2, 1)
        return out

    return _backproject_slabs(block, geometry, settings, xs_mm, ys_mm, zs_mm, t_spacing,
                              max_slab_bytes - fixed, per_view, strict=True, fixed_bytes=fixed)


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
    """WFBP of one projection set onto the given grid: rebin, filter, backproject (numba: slab by slab,
    without a second copy of the whole set, as :func:`reconstruct_streamed`). Both backends rebin a
    flying focal spot with the same map (:func:`focal_spot_rebinning`, :func:`focal_spot_views`)."""
    if resolve_backend(backend) == "torch":
        from .wfbp_torch import reconstruct as reconstruct_torch

        return reconstruct_torch(line_integrals, geometry, settings, xs_mm, ys_mm, zs_mm,
                                 max_slab_bytes=max_slab_bytes)
    check_projection_shape(line_integrals, geometry)
    return reconstruct_streamed(lambda views: line_integrals[views.start:views.stop], geometry, settings,
                                xs_mm, ys_mm, zs_mm, max_slab_bytes=max_slab_bytes)

"""Forward projection with a flying focal spot (numba and torch) against closed-form line integrals:
rays from the actual (offset) source to the nominal detector element."""

from __future__ import annotations

import numpy as np
import pytest

from dosebench.core.geometry import FocalSpotOffset, HelicalGeometry
from dosebench.core.protocol import load_protocol
from dosebench.simulator.phantoms import Ellipsoid, analytic_line_integrals, line_integrals_between, voxelize
from dosebench.simulator.projector import forward_project

MU_WATER = 0.0193
SPACING = (2.0, 2.0, 2.0)
SHAPE = (100, 90, 60)
SIGMA_MM = 10.0
CENTER_MM = np.array([12.0, -8.0, 3.0])
#: exaggerated offsets (a real z-FFS moves the spot by ~0.5 mm, an in-plane one by ~1e-3 rad), so that
#: ignoring them would fail the tests below by a wide margin
OFFSETS = [FocalSpotOffset(angle_rad=-6e-3, axial_mm=-2.0, radial_mm=-10.0),
           FocalSpotOffset(angle_rad=6e-3, axial_mm=2.0, radial_mm=10.0),
           FocalSpotOffset(angle_rad=3e-3, axial_mm=-1.0, radial_mm=0.0)]


def scan(detector_shape: str = "curved", direction: int = 1, offsets=OFFSETS) -> HelicalGeometry:
    scanner = load_protocol("tiny").scanner.model_copy(update={
        "detector_shape": detector_shape, "rotation_direction": direction, "start_angle_rad": 0.4,
        "row_height_at_isocenter_mm": 2.0, "column_width_at_isocenter_mm": 3.0, "detector_columns": 170,
        "focal_spot_offsets": offsets})
    return HelicalGeometry.covering(scanner, -30.0, 30.0)


def blob() -> np.ndarray:
    xs, ys, zs = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(SHAPE, SPACING, strict=True)]
    x, y, z = np.meshgrid(xs, ys, zs, indexing="ij")
    r_sq = (x - CENTER_MM[0]) ** 2 + (y - CENTER_MM[1]) ** 2 + (z - CENTER_MM[2]) ** 2
    return (MU_WATER * np.exp(-r_sq / (2 * SIGMA_MM**2))).astype(np.float32)


def blob_line_integrals(sources: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Closed form: a Gaussian's integral along a line depends on the line's distance from its centre."""
    offset = CENTER_MM - sources
    along = np.sum(offset * directions, axis=-1)
    distance_sq = np.sum(offset * offset, axis=-1) - along**2
    return MU_WATER * np.sqrt(2 * np.pi) * SIGMA_MM * np.exp(-distance_sq / (2 * SIGMA_MM**2))


def views_near_blob(geometry: HelicalGeometry) -> range:
    near = np.flatnonzero(np.abs(geometry.source_z_mm() - CENTER_MM[2]) < 10.0)
    return range(int(near[0]), int(near[-1]) + 1)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("detector_shape,direction", [("curved", 1), ("flat", -1)])
def test_gaussian_blob_with_flying_focal_spot(backend, detector_shape, direction):
    geometry = scan(detector_shape, direction)
    views = views_near_blob(geometry)
    projected = forward_project(blob(), SPACING, geometry, views, backend=backend)
    sources = geometry.source_positions_mm(views)[:, None, None, :]
    exact = blob_line_integrals(sources, geometry.ray_directions(views))
    peak = MU_WATER * np.sqrt(2 * np.pi) * SIGMA_MM
    assert exact.max() > 0.9 * peak
    # Joseph's error on a Gaussian of width sigma sampled at h: linear interpolation misses a peak by up
    # to (h / sigma)^2 / 8 per interpolated axis, two axes: 1 % of the peak (measured: 0.9 %, as without
    # a flying focal spot); allow 1.5 %
    assert np.abs(projected - exact).max() < 0.015 * peak
    # the offsets matter: the nominal rays' integrals are off by far more than that bound
    nominal = scan(detector_shape, direction, offsets=[])
    nominal_exact = blob_line_integrals(nominal.source_positions_mm(views)[:, None, None, :],
                                        nominal.ray_directions(views))
    assert np.abs(nominal_exact - exact).max() > 0.05 * peak


def test_ellipsoids_with_flying_focal_spot():
    """Voxelised ellipsoids: on rays through >= 60 mm of water the mean line integral is right to 0.5 %
    (the bound of the no-FFS test), against :func:`analytic_line_integrals` of the FFS geometry."""
    geometry = scan()
    phantom = [Ellipsoid((0.0, 0.0, 0.0), (80.0, 60.0, 30.0), MU_WATER),
               Ellipsoid((30.0, 10.0, 5.0), (15.0, 20.0, 12.0), 0.5 * MU_WATER, angle_rad=0.4)]
    xs, ys, zs = [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(SHAPE, SPACING, strict=True)]
    mu = voxelize(phantom, xs, ys, zs, SPACING, supersample=2)
    views = range(geometry.number_of_views // 2, geometry.number_of_views // 2 + 6)
    exact = analytic_line_integrals(phantom, geometry, views)
    # the same lines from the geometry's source and detector positions (independent of ray_directions)
    between = line_integrals_between(phantom, geometry.source_positions_mm(views)[:, None, None, :],
                                     geometry.detector_positions_mm(views))
    np.testing.assert_allclose(exact, between, rtol=1e-6, atol=1e-6)
    projected = forward_project(mu, SPACING, geometry, views, backend="numba")
    thick = exact > 60.0 * MU_WATER
    assert thick.sum() > 1000
    error = projected[thick] - exact[thick]
    assert abs(error.mean()) < 0.005 * exact[thick].mean()
    # the median ray is right to a fraction of a voxel's worth of water (one 2 mm voxel: 0.039)
    assert np.median(np.abs(error)) < 0.5 * SPACING[0] * MU_WATER

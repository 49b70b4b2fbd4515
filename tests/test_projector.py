"""Forward projector against closed-form line integrals (ellipsoids, a Gaussian blob)."""

from __future__ import annotations

import numpy as np
import pytest

from dosebench.core.geometry import HelicalGeometry
from dosebench.core.protocol import load_protocol
from dosebench.simulator.phantoms import Ellipsoid, analytic_line_integrals, voxelize
from dosebench.simulator.projector import forward_project

MU_WATER = 0.0193
SPACING = (2.0, 2.0, 2.0)
SHAPE = (100, 90, 40)


def grid(shape=SHAPE, spacing=SPACING):
    return [(np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(shape, spacing, strict=True)]


def scan(detector_shape: str = "curved", direction: int = 1, start_angle: float = 0.0) -> HelicalGeometry:
    scanner = load_protocol("tiny").scanner.model_copy(
        update={"detector_shape": detector_shape, "rotation_direction": direction, "start_angle_rad": start_angle,
                "row_height_at_isocenter_mm": 2.0, "column_width_at_isocenter_mm": 3.0, "detector_columns": 170})
    return HelicalGeometry.covering(scanner, -30.0, 30.0)


PHANTOM = [
    Ellipsoid((0.0, 0.0, 0.0), (80.0, 60.0, 30.0), MU_WATER),
    Ellipsoid((30.0, 10.0, 5.0), (15.0, 20.0, 12.0), 0.5 * MU_WATER, angle_rad=0.4),
    Ellipsoid((-35.0, -15.0, -4.0), (12.0, 12.0, 15.0), -0.3 * MU_WATER),
]


def grown(ellipsoid: Ellipsoid, by_mm: float) -> Ellipsoid:
    return Ellipsoid(ellipsoid.center_mm, tuple(a + by_mm for a in ellipsoid.semi_axes_mm), ellipsoid.mu_per_mm,
                     ellipsoid.angle_rad)


def closest_approach(ellipsoid: Ellipsoid, geometry: HelicalGeometry, views: range) -> np.ndarray:
    """Smallest distance of each ray from the ellipsoid's centre, in units of the ellipsoid (1 = surface)."""
    m = ellipsoid._to_unit_sphere()
    q0 = (geometry.source_positions_mm(views)[:, None, None, :] - np.asarray(ellipsoid.center_mm)) @ m.T
    q1 = geometry.ray_directions(views) @ m.T
    along = np.sum(q0 * q1, axis=-1) / np.sum(q1 * q1, axis=-1)
    return np.sqrt(np.sum((q0 - along[..., None] * q1) ** 2, axis=-1))


@pytest.mark.parametrize("detector_shape,direction,start", [("curved", 1, 0.0), ("flat", -1, 1.1)])
def test_voxelized_ellipsoids_match_closed_form(detector_shape, direction, start):
    geometry = scan(detector_shape, direction, start)
    views = [range(v, v + 1) for v in range(0, geometry.number_of_views, 13)]
    xs, ys, zs = grid()
    mu = voxelize(PHANTOM, xs, ys, zs, SPACING, supersample=4)
    exact = np.concatenate([analytic_line_integrals(PHANTOM, geometry, v) for v in views])
    projected = np.concatenate([forward_project(mu, SPACING, geometry, v) for v in views])
    error = projected - exact
    crossing = exact > 20.0 * MU_WATER
    assert crossing.sum() > 10_000

    # Per ray: voxelisation (partial volume) plus bilinear interpolation spread each surface over at
    # most one voxel either side, so the error lies within what moving every surface by one voxel
    # changes (plus float32 rounding).
    one_voxel = SPACING[0]
    band = np.zeros_like(exact, dtype=np.float64)
    for ellipsoid in PHANTOM:
        base = np.concatenate([analytic_line_integrals([ellipsoid], geometry, v) for v in views])
        shifts = [np.abs(np.concatenate([analytic_line_integrals([grown(ellipsoid, by)], geometry, v)
                                         for v in views]) - base) for by in (-one_voxel, one_voxel)]
        band += np.maximum(*shifts)
    # Rays that graze a surface (closest approach within 15 % of it) are left out: there a one-voxel
    # smear is not bounded by moving the surface (the chord's derivative is unbounded).
    grazing = np.zeros_like(crossing)
    for ellipsoid in PHANTOM:
        closest = np.concatenate([closest_approach(ellipsoid, geometry, v) for v in views])
        grazing |= np.abs(closest - 1.0) < 0.15
    checked = ~grazing
    assert checked.mean() > 0.5
    outside = (np.abs(error) > band + 1e-4) & checked
    assert not outside.any(), f"{outside.sum()} rays off by more than a one-voxel surface shift"

    # On average over rays through >= 60 mm of water the line integral is right to 0.5 %
    # (0.5 % of a water line integral is 5 HU: the reconstruction's accuracy budget).
    thick = exact > 60.0 * MU_WATER
    assert abs(error[thick].mean()) < 0.005 * exact[thick].mean()


def test_gaussian_blob_matches_closed_form():
    """A smooth object leaves only Joseph's interpolation error (second order, ~(h/sigma)^2/8)."""
    geometry = scan()
    shape = (100, 90, 60)  # z from -59 to 59 mm: the blob is negligible (< 1e-6) at the grid's ends
    xs, ys, zs = grid(shape)
    center = np.array([12.0, -8.0, 3.0])
    sigma = 10.0
    x, y, z = np.meshgrid(xs, ys, zs, indexing="ij")
    blob = (MU_WATER * np.exp(-((x - center[0]) ** 2 + (y - center[1]) ** 2 + (z - center[2]) ** 2)
                              / (2 * sigma**2))).astype(np.float32)
    near = np.flatnonzero(np.abs(geometry.source_z_mm() - center[2]) < 10.0)
    views = range(int(near[0]), int(near[-1]) + 1)
    projected = forward_project(blob, SPACING, geometry, views)
    sources = geometry.source_positions_mm(views)[:, None, None, :]
    directions = geometry.ray_directions(views)
    offset = center - sources
    along = np.sum(offset * directions, axis=-1)
    distance_sq = np.sum(offset * offset, axis=-1) - along**2
    exact = MU_WATER * np.sqrt(2 * np.pi) * sigma * np.exp(-distance_sq / (2 * sigma**2))
    peak = MU_WATER * np.sqrt(2 * np.pi) * sigma
    assert exact.max() > 0.9 * peak  # the blob is really in view
    # (h / sigma)^2 / 8 = (2 / 10)^2 / 8 = 0.5 % of the peak; allow twice that.
    assert np.abs(projected - exact).max() < 0.01 * peak


def test_projector_rejects_bad_view_ranges():
    geometry = scan()
    mu = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(ValueError):
        forward_project(mu, SPACING, geometry, range(0, geometry.number_of_views + 1))
    with pytest.raises(ValueError):
        forward_project(mu[0], SPACING, geometry)

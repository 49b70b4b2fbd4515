"""forward_project_adjoint is the transpose of the numba Joseph projector: <A x, y> = <x, A^T y>."""

from __future__ import annotations

import numpy as np
import pytest

from dosebench.core.geometry import FocalSpotOffset, HelicalGeometry
from dosebench.core.protocol import load_protocol
from dosebench.simulator.projector import forward_project, forward_project_adjoint

SHAPE = (40, 34, 10)
SPACING = (3.0, 3.5, 2.5)
EPS32 = float(np.finfo(np.float32).eps)


def scan(detector_shape: str, direction: int, offsets: list[FocalSpotOffset]) -> HelicalGeometry:
    scanner = load_protocol("tiny").scanner.model_copy(update={
        "detector_shape": detector_shape, "rotation_direction": direction, "start_angle_rad": 0.2,
        "row_height_at_isocenter_mm": 2.0, "column_width_at_isocenter_mm": 2.5, "detector_columns": 90,
        "focal_spot_offsets": offsets})
    # a helix longer than the slab: the end views' rays leave it in z, where z is clamped
    return HelicalGeometry.covering(scanner, -20.0, 20.0)


@pytest.mark.parametrize("detector_shape,direction,offsets", [
    ("curved", 1, []),
    ("flat", -1, []),
    ("curved", -1, [FocalSpotOffset(angle_rad=-1e-3, axial_mm=-0.6, radial_mm=-2.0),
                    FocalSpotOffset(angle_rad=1e-3, axial_mm=0.6, radial_mm=2.0)]),
])
def test_dot_product(detector_shape, direction, offsets):
    geometry = scan(detector_shape, direction, offsets)
    rng = np.random.default_rng(11)
    # non-negative data: the worst-case rounding bound below is then a small fraction of the products
    x = rng.random(SHAPE, dtype=np.float32)
    for views in (range(0, 12), range(geometry.number_of_views // 2, geometry.number_of_views // 2 + 12)):
        y = rng.random((len(views), geometry.detector_rows, geometry.detector_columns), dtype=np.float32)
        ax = forward_project(x, SPACING, geometry, views, backend="numba").astype(np.float64)
        aty32 = forward_project_adjoint(y, SHAPE, SPACING, geometry, views)
        assert aty32.shape == SHAPE and aty32.dtype == np.float32
        aty = aty32.astype(np.float64)
        left = float(np.sum(ax * y))
        right = float(np.sum(x.astype(np.float64) * aty))
        # float32 rounding: a line integral sums at most max(nx, ny) samples of a few float32 operations
        # each (relative error <= (samples + 8) eps per term of |A| |x|); A^T y is rounded to float32 once
        n = max(SHAPE[0], SHAPE[1]) + 8
        tolerance = n * EPS32 * left + EPS32 * right  # x, y >= 0, so A x, A^T y >= 0
        assert tolerance < 1e-4 * left  # a real test: an adjoint off by one weight in 10^4 fails it
        assert abs(left - right) <= tolerance, (left, right, tolerance)


def test_adjoint_of_one_ray_is_its_weights():
    """A^T of a single ray's unit value, dotted with the volume, gives that ray's line integral; every
    voxel it touches lies near the ray, and the edge slices collect what z clamping sent beyond."""
    geometry = scan("curved", 1, [])
    views = range(0, 1)
    y = np.zeros((1, geometry.detector_rows, geometry.detector_columns), np.float32)
    y[0, 0, 45] = 1.0  # lowest row of the first view: it leaves the slab in z
    weights = forward_project_adjoint(y, SHAPE, SPACING, geometry, views)
    assert np.all(weights >= 0)
    assert weights.sum() > 0
    ones = np.ones(SHAPE, np.float32)
    integral = forward_project(ones, SPACING, geometry, views)[0, 0, 45]
    assert abs(weights.sum() - integral) <= 1e-5 * integral
    touched = np.flatnonzero(weights.sum(axis=(0, 1)))
    assert 0 in touched  # the edge slice holds the clamped samples


def test_adjoint_rejects_wrong_shapes():
    geometry = scan("curved", 1, [])
    with pytest.raises(ValueError):
        forward_project_adjoint(np.zeros((2, 3, 4), np.float32), SHAPE, SPACING, geometry, range(0, 2))
    with pytest.raises(ValueError):
        forward_project_adjoint(np.zeros((1, geometry.detector_rows, geometry.detector_columns), np.float32),
                                SHAPE, SPACING, geometry, range(0, 1, 2))

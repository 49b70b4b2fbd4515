"""The numba projector skips empty space (crop to the non-zero columns, per-plane support): exact, so
embedding a volume in more air, or projecting it with the torch projector (which skips nothing),
gives the same line integrals."""

from __future__ import annotations

import numpy as np
import torch

from dosebench.core.geometry import HelicalGeometry
from dosebench.core.protocol import load_protocol
from dosebench.simulator.projector import forward_project
from dosebench.simulator.projector_torch import forward_project_torch

SPACING = (2.0, 2.5, 3.0)


def scan() -> HelicalGeometry:
    scanner = load_protocol("tiny").scanner.model_copy(update={
        "row_height_at_isocenter_mm": 2.0, "column_width_at_isocenter_mm": 2.0, "detector_columns": 150})
    return HelicalGeometry.covering(scanner, -20.0, 20.0)


def two_blobs(shape=(60, 50, 12)) -> np.ndarray:
    """Two separate textured blocks in opposite corners: planes with gaps, empty rows and columns."""
    rng = np.random.default_rng(4)
    mu = np.zeros(shape, np.float32)
    mu[3:14, 30:46, 2:10] = 0.02 + 0.01 * rng.random((11, 16, 8))
    mu[40:55, 5:12, :] = 0.015 + 0.01 * rng.random((15, 7, shape[2]))
    return mu


def test_more_air_changes_nothing():
    geometry = scan()
    mu = two_blobs()
    embedded = np.zeros((mu.shape[0] + 20, mu.shape[1] + 30, mu.shape[2]), np.float32)
    embedded[10:-10, 15:-15] = mu  # the same isocentre: symmetric padding
    views = range(geometry.number_of_views // 2, geometry.number_of_views // 2 + 30)
    a = forward_project(mu, SPACING, geometry, views, backend="numba")
    b = forward_project(embedded, SPACING, geometry, views, backend="numba")
    assert a.max() > 0.3
    # float32 sample positions differ by rounding between the two grids' indices
    assert np.abs(a - b).max() < 1e-5 * a.max()
    assert not forward_project(np.zeros_like(mu), SPACING, geometry, views).any()


def test_skipping_matches_the_projector_that_visits_every_plane():
    geometry = scan()
    mu = two_blobs()
    # half a turn from the helix' middle: x- and y-dominant rays
    views = range(geometry.number_of_views // 2, geometry.number_of_views // 2 + geometry.views_per_turn // 2)
    reference = forward_project_torch(mu, SPACING, geometry, views, device="cpu", dtype=torch.float64).numpy()
    result = forward_project(mu, SPACING, geometry, views, backend="numba")
    assert reference.max() > 0.3
    assert np.abs(result - reference).max() < 1e-5 * reference.max()

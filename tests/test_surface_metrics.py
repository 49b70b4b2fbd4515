"""Surface Dice and HD95 from the real voxel spacing, against analytic spheres and brute force.

Voxelisation error: a sphere's boundary voxels (6-connected) lie up to about one voxel inside the
continuous sphere, so analytic distances hold to within one voxel (the coarsest spacing for anisotropic
grids) and tolerances are stated relative to that.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from dosebench.segmenter.labels import LabelInfo
from dosebench.segmenter.metrics import per_label_metrics, surface_metrics

ISOTROPIC = (1.0, 1.0, 1.0)
ANISOTROPIC = (1.0, 1.0, 2.5)


def _grid(extent_mm: float, spacing: tuple[float, ...]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Shape covering a cube of half-width ``extent_mm`` around its centre, and that centre (mm)."""
    shape = tuple(int(math.ceil(2 * extent_mm / s)) + 1 for s in spacing)
    return shape, tuple((n - 1) * s / 2 for n, s in zip(shape, spacing, strict=True))


def _ball(shape: tuple[int, ...], centre_mm: tuple[float, ...], radius_mm: float,
          spacing: tuple[float, ...]) -> np.ndarray:
    """Voxels whose centre (index x spacing, mm) lies within ``radius_mm`` of ``centre_mm``."""
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    squared = sum((g * s - c) ** 2 for g, c, s in zip(grids, centre_mm, spacing, strict=True))
    return squared <= radius_mm**2


# --- (a) identical spheres ---------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [ISOTROPIC, ANISOTROPIC])
def test_identical_spheres(spacing: tuple[float, ...]) -> None:
    shape, centre = _grid(16.0, spacing)
    ball = _ball(shape, centre, 12.0, spacing)
    surface_dice, hd95 = surface_metrics(ball, ball.copy(), spacing, tolerance_mm=0.0)
    assert surface_dice == 1.0
    assert hd95 == 0.0


# --- (b) concentric spheres of radius r and r + d -----------------------------------------------------


@pytest.mark.parametrize("spacing", [ISOTROPIC, ANISOTROPIC])
@pytest.mark.parametrize("d", [2.0, 3.0])
@pytest.mark.parametrize("r", [10.0, 15.0])
def test_concentric_spheres(spacing: tuple[float, ...], d: float, r: float) -> None:
    """Every point of either sphere's surface is exactly d from the other surface, so HD95 = d and the
    surface Dice is 1 for tau >= d and 0 for tau < d (both up to voxelisation)."""
    shape, centre = _grid(r + d + 3.0, spacing)
    inner = _ball(shape, centre, r, spacing)
    outer = _ball(shape, centre, r + d, spacing)
    voxel = max(spacing)

    _, hd95 = surface_metrics(inner, outer, spacing, tolerance_mm=d)
    assert hd95 == pytest.approx(d, abs=voxel)  # within one (the coarsest) voxel
    if spacing == ISOTROPIC:
        assert hd95 == pytest.approx(d, abs=0.5)  # measured: sqrt(5) for d=2, sqrt(10) for d=3

    # tau = d + 1 mm covers the voxelisation error: every surface point counts.
    assert surface_metrics(inner, outer, spacing, tolerance_mm=d + 1.0)[0] == 1.0
    # tau just under d - 1 mm: (almost) no surface point is that close to the other surface. Exactly 0 at
    # 1 mm voxels; on the anisotropic grid a few points along the coarse axis come closer (measured
    # below 0.04 for these radii).
    low = surface_metrics(inner, outer, spacing, tolerance_mm=d - 1.01)[0]
    assert low == 0.0 if spacing == ISOTROPIC else low <= 0.05
    # Symmetric in its arguments.
    assert surface_metrics(outer, inner, spacing, tolerance_mm=d) == surface_metrics(inner, outer, spacing, d)


# --- (c) shifted equal spheres ---------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [ISOTROPIC, ANISOTROPIC])
@pytest.mark.parametrize("shift", [0.0, 4.0, 10.0, 25.0])
def test_shifted_spheres_dice_and_surface(spacing: tuple[float, ...], shift: float) -> None:
    r = 20.0
    shape, centre = _grid(r + shift / 2 + 3.0, spacing)
    a = _ball(shape, (centre[0] - shift / 2, *centre[1:]), r, spacing)
    b = _ball(shape, (centre[0] + shift / 2, *centre[1:]), r, spacing)
    labels_a, labels_b = a.astype(np.uint8), b.astype(np.uint8)
    table = {1: LabelInfo(1, "ball", "organs")}
    voxel_ml = float(np.prod(spacing)) / 1000.0
    (row,) = per_label_metrics(labels_a, labels_b, table, voxel_ml, spacing_mm=spacing, tolerance_mm=shift + 1.0)

    # Lens of two equal spheres at distance d: V = pi (4r + d)(2r - d)^2 / 12; Dice = V / V_sphere.
    lens = math.pi * (4 * r + shift) * (2 * r - shift) ** 2 / 12.0
    assert row["dice"] == pytest.approx(lens / (4.0 / 3.0 * math.pi * r**3), abs=0.01)
    # No surface point moves by more than the shift: surface Dice at tau = shift + 1 mm is 1 and
    # HD95 at most the shift (plus one voxel).
    assert row["surface_dice"] == 1.0
    assert row["hd95_mm"] <= shift + max(spacing)
    assert (row["surface_dice"], row["hd95_mm"]) == surface_metrics(a, b, spacing, shift + 1.0)


# --- (d) empty masks ---------------------------------------------------------------------------------


def test_one_empty_mask_scores_zero_and_infinity() -> None:
    shape, centre = _grid(8.0, ISOTROPIC)
    ball = _ball(shape, centre, 5.0, ISOTROPIC)
    empty = np.zeros_like(ball)
    assert surface_metrics(ball, empty, ISOTROPIC, 2.0) == (0.0, math.inf)
    assert surface_metrics(empty, ball, ISOTROPIC, 2.0) == (0.0, math.inf)
    with pytest.raises(ValueError):
        surface_metrics(empty, empty, ISOTROPIC, 2.0)


def test_rejects_bad_arguments() -> None:
    a = np.ones((3, 3, 3), dtype=bool)
    with pytest.raises(ValueError):
        surface_metrics(a, np.ones((3, 3, 4), dtype=bool), ISOTROPIC, 2.0)
    with pytest.raises(ValueError):
        surface_metrics(a, a, (1.0, 1.0), 2.0)
    with pytest.raises(ValueError):
        surface_metrics(a, a, (1.0, 0.0, 1.0), 2.0)
    with pytest.raises(ValueError):
        surface_metrics(a, a, ISOTROPIC, -1.0)


# --- brute force: the bounding-box crop changes nothing -----------------------------------------------


def _brute_force(test: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...],
                 tolerance: float) -> tuple[float, float]:
    """The same conventions by explicit neighbour checks and all-pairs distances."""

    def surface_points(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1)
        interior = padded.copy()
        for axis in range(mask.ndim):
            for step in (-1, 1):
                interior &= np.roll(padded, step, axis=axis)
        return (np.argwhere(mask & ~interior[1:-1, 1:-1, 1:-1]) * np.asarray(spacing)).astype(float)

    pt, pr = surface_points(test), surface_points(reference)
    pairwise = cdist(pt, pr)
    d_tr, d_rt = pairwise.min(axis=1), pairwise.min(axis=0)
    within = np.count_nonzero(d_tr <= tolerance) + np.count_nonzero(d_rt <= tolerance)
    return within / (d_tr.size + d_rt.size), float(np.percentile(np.concatenate([d_tr, d_rt]), 95))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_blobs(seed: int) -> None:
    rng = np.random.default_rng(seed)
    spacing = (0.7, 1.0, 2.5)
    shape = (24, 20, 12)
    test = np.zeros(shape, dtype=bool)
    reference = np.zeros(shape, dtype=bool)
    # Boxes placed anywhere, touching the array's edge included (the edge counts as background).
    for mask in (test, reference):
        for _ in range(3):
            lo = [int(rng.integers(0, n - 2)) for n in shape]
            hi = [int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, shape, strict=True)]
            mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    got = surface_metrics(test, reference, spacing, tolerance_mm=2.0)
    expected = _brute_force(test, reference, spacing, tolerance=2.0)
    assert got[0] == pytest.approx(expected[0], abs=1e-12)
    assert got[1] == pytest.approx(expected[1], abs=1e-9)


# --- (e) per_label_metrics with spacing --------------------------------------------------------------


def test_per_label_metrics_adds_surface_columns() -> None:
    spacing = (1.0, 1.0, 2.5)
    shape, centre = _grid(14.0, spacing)
    reference = np.zeros(shape, dtype=np.uint16)
    test = np.zeros_like(reference)
    big = _ball(shape, centre, 10.0, spacing)
    small = _ball(shape, centre, 8.0, spacing)
    reference[big] = 1
    test[small] = 1
    reference[0:3, 0:3, 0:2] = 2  # label 2 only in the reference
    test[-3:, -3:, -2:] = 3  # label 3 only in the test map
    table = {i: LabelInfo(i, f"label_{i}", "organs") for i in (1, 2, 3, 4)}
    voxel_ml = float(np.prod(spacing)) / 1000.0

    rows = per_label_metrics(test, reference, table, voxel_ml, spacing_mm=spacing, tolerance_mm=2.0)
    by_id = {row["label_id"]: row for row in rows}
    assert sorted(by_id) == [1, 2, 3]  # 4 absent from both: left out
    assert list(by_id[1])[-2:] == ["surface_dice", "hd95_mm"]
    assert (by_id[1]["surface_dice"], by_id[1]["hd95_mm"]) == surface_metrics(test == 1, reference == 1, spacing, 2.0)
    assert by_id[1]["hd95_mm"] == pytest.approx(2.0, abs=max(spacing))
    for label_id in (2, 3):
        assert (by_id[label_id]["surface_dice"], by_id[label_id]["hd95_mm"]) == (0.0, math.inf)

    # Without spacing: the rows are exactly the old ones.
    plain = per_label_metrics(test, reference, table, voxel_ml)
    assert all("surface_dice" not in row and "hd95_mm" not in row for row in plain)
    assert plain == [{k: v for k, v in row.items() if k not in ("surface_dice", "hd95_mm")} for row in rows]

"""Analytic phantoms: ellipsoids whose line integrals are known in closed form.

Used to check the projector and the reconstructor against something independent of both: the exact
chord length of a ray through an ellipsoid, and a voxelisation by supersampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.geometry import HelicalGeometry


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid of constant attenuation ``mu_per_mm`` (added to what lies beneath it), semi-axes
    along x, y, z rotated by ``angle_rad`` about z, in the scanner frame (mm)."""

    center_mm: tuple[float, float, float]
    semi_axes_mm: tuple[float, float, float]
    mu_per_mm: float
    angle_rad: float = 0.0

    def _to_unit_sphere(self) -> np.ndarray:
        """Matrix taking an offset from the centre to unit-sphere coordinates."""
        c, s = np.cos(self.angle_rad), np.sin(self.angle_rad)
        rotation_t = np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])
        return np.diag(1.0 / np.asarray(self.semi_axes_mm, dtype=np.float64)) @ rotation_t

    def chord_mm(self, sources: np.ndarray, directions: np.ndarray) -> np.ndarray:
        """Length of each ray inside the ellipsoid. ``sources`` (..., 3) broadcast to ``directions``
        (..., 3), which must be unit vectors."""
        m = self._to_unit_sphere()
        q0 = (np.asarray(sources, dtype=np.float64) - np.asarray(self.center_mm)) @ m.T
        q1 = np.asarray(directions, dtype=np.float64) @ m.T
        a = np.sum(q1 * q1, axis=-1)
        b = np.sum(q0 * q1, axis=-1)
        c = np.sum(q0 * q0, axis=-1) - 1.0
        disc = b * b - a * c
        return np.where(disc > 0, 2.0 * np.sqrt(np.maximum(disc, 0.0)) / a, 0.0)

    def contains(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        m = self._to_unit_sphere()
        offsets = np.stack([x - self.center_mm[0], y - self.center_mm[1], z - self.center_mm[2]], axis=-1)
        return np.sum((offsets @ m.T) ** 2, axis=-1) <= 1.0


def analytic_line_integrals(phantom: list[Ellipsoid], geometry: HelicalGeometry,
                            views: range | None = None) -> np.ndarray:
    """Exact line integrals (float32, views x rows x columns) of ``phantom`` for ``geometry``: along the
    rays from the actual sources (flying focal spot included) through the detector elements."""
    views = range(geometry.number_of_views) if views is None else views
    sources = geometry.source_positions_mm(views)[:, None, None, :]
    directions = geometry.ray_directions(views)
    total = np.zeros(directions.shape[:-1], dtype=np.float64)
    for ellipsoid in phantom:
        total += ellipsoid.mu_per_mm * ellipsoid.chord_mm(sources, directions)
    return total.astype(np.float32)


def line_integrals_between(phantom: list[Ellipsoid], sources_mm: np.ndarray, detectors_mm: np.ndarray) -> np.ndarray:
    """Exact line integrals (float64) along the lines from ``sources_mm`` (..., 3) through
    ``detectors_mm`` (..., 3), broadcast together: any source and detector positions, e.g.
    ``geometry.source_positions_mm(views)[:, None, None]`` and ``geometry.detector_positions_mm(views)``.
    The whole line counts (an ellipsoid beyond the detector too)."""
    sources = np.asarray(sources_mm, dtype=np.float64)
    offsets = np.asarray(detectors_mm, dtype=np.float64) - sources
    directions = offsets / np.linalg.norm(offsets, axis=-1, keepdims=True)
    total = np.zeros(np.broadcast_shapes(sources.shape, directions.shape)[:-1], dtype=np.float64)
    for ellipsoid in phantom:
        total += ellipsoid.mu_per_mm * ellipsoid.chord_mm(sources, directions)
    return total


def voxelize(phantom: list[Ellipsoid], xs_mm: np.ndarray, ys_mm: np.ndarray, zs_mm: np.ndarray,
             spacing_mm: tuple[float, float, float], supersample: int = 4) -> np.ndarray:
    """mu on the grid of voxel centres xs x ys x zs: each voxel's mean over supersample^3 points."""
    offsets = [(np.arange(supersample) + 0.5) / supersample - 0.5] * 3
    out = np.zeros((xs_mm.size, ys_mm.size, zs_mm.size), dtype=np.float64)
    x, y, z = np.meshgrid(xs_mm, ys_mm, zs_mm, indexing="ij")
    for ox in offsets[0] * spacing_mm[0]:
        for oy in offsets[1] * spacing_mm[1]:
            for oz in offsets[2] * spacing_mm[2]:
                for ellipsoid in phantom:
                    out += ellipsoid.mu_per_mm * ellipsoid.contains(x + ox, y + oy, z + oz)
    return (out / supersample**3).astype(np.float32)

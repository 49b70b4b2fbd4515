"""Incident photon counts of a synthesised acquisition (the air scan / flat field)."""

from __future__ import annotations

import numpy as np

from ..core.geometry import HelicalGeometry
from ..core.protocol import BowtieModel, PhotonModel


def bowtie_transmission(model: BowtieModel, ray_distance_mm: np.ndarray, mu_water_per_mm: float) -> np.ndarray:
    """Relative transmission (1 at the centre) of the bowtie for rays at distance t from the axis."""
    t = np.abs(np.asarray(ray_distance_mm, dtype=np.float64))
    if model.kind == "flat":
        return np.ones_like(t)
    r = model.radius_mm
    chord = 2.0 * np.sqrt(np.clip(r * r - t * t, 0.0, None))
    return np.maximum(np.exp(-mu_water_per_mm * (2.0 * r - chord)), model.min_transmission)


def mas_per_view(model: PhotonModel, geometry: HelicalGeometry) -> np.ndarray:
    """Tube current-time product of each view (mAs), tube current modulation applied."""
    base = model.mas_per_rotation / geometry.views_per_turn
    if not model.tube_current_modulation:
        return np.full(geometry.number_of_views, base)
    profile = np.asarray(model.tube_current_modulation, dtype=np.float64)
    if np.any(profile < 0) or not np.all(np.isfinite(profile)) or profile.mean() <= 0:
        raise ValueError("tube_current_modulation must be finite, non-negative, with a positive mean")
    profile = profile / profile.mean()
    reps = int(np.ceil(geometry.number_of_views / profile.size))
    return base * np.tile(profile, reps)[: geometry.number_of_views]


def air_counts(model: PhotonModel, geometry: HelicalGeometry) -> np.ndarray:
    """Expected detected counts of an unattenuated ray, shape (views, 1, columns), float64.

    The same for every row (no heel effect); broadcasts against projections (views, rows, columns).
    """
    gammas = geometry.fan_angles_rad()
    ray_distance = geometry.source_to_isocenter_mm * np.sin(gammas)
    element_area_mm2 = geometry.row_height_at_isocenter_mm * geometry.column_width_at_isocenter_mm
    per_column = (model.fluence_photons_per_mas_mm2 * element_area_mm2
                  * bowtie_transmission(model.bowtie, ray_distance, model.mu_water_per_mm))
    return (mas_per_view(model, geometry)[:, None] * per_column[None, :])[:, None, :]

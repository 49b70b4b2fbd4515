"""HU <-> linear attenuation: the one place the conversion lives."""

from __future__ import annotations

import numpy as np

from .volume import AIR_HU


def hu_to_mu(hu: np.ndarray, mu_water_per_mm: float) -> np.ndarray:
    """mu = mu_water * (1 + HU / 1000), float32, with HU below air clipped to air (mu >= 0)."""
    return (mu_water_per_mm * (1.0 + np.maximum(hu, AIR_HU) / 1000.0)).astype(np.float32)


def mu_to_hu(mu_per_mm: np.ndarray, mu_water_per_mm: float) -> np.ndarray:
    """HU = 1000 * (mu / mu_water - 1), float32."""
    return (1000.0 * (np.asarray(mu_per_mm) / mu_water_per_mm - 1.0)).astype(np.float32)

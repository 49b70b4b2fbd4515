"""Stage functions of the simulator: plan a helical scan for a volume, synthesise its full-dose photon
counts, and thin them to a lower dose. Pure: arrays, geometry and settings in, arrays out."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..core.errors import InputError
from ..core.geometry import HelicalGeometry, ScannerModel
from ..core.protocol import PhotonModel
from ..core.seeds import Purpose, rng_for
from ..core.units import hu_to_mu
from ..core.volume import Volume
from .dose import count_floor, counts_to_line_integrals, reduce_dose
from .photons import air_counts
from .projector import forward_project

#: voxels above this HU count as patient (body, table) when checking the scan field
BODY_HU = -500.0

Progress = Callable[[int], None]


def plan_scan(volume: Volume, scanner: ScannerModel) -> HelicalGeometry:
    """The helical scan of ``scanner`` covering ``volume``; refuses a body outside the scan field."""
    x, y, z = volume.scanner_coordinates_mm()
    radius = np.sqrt(x[:, None] ** 2 + y[None, :] ** 2)
    field = scanner.scan_field_radius_mm
    body_columns = (volume.hu > BODY_HU).any(axis=2)
    outside = body_columns & (radius > field)
    if outside.any():
        worst = float(radius[outside].max())
        raise InputError(
            f"the body reaches {worst:.0f} mm from the isocentre, outside the protocol's "
            f"{2 * field:.0f} mm scan field",
            fix="crop the volume to the patient, or use a protocol with a larger scan field",
        )
    return HelicalGeometry.covering(scanner, float(z[0]), float(z[-1]), radius_mm=field)


def chunks(geometry: HelicalGeometry, views_per_chunk: int) -> list[range]:
    n = geometry.number_of_views
    return [range(s, min(s + views_per_chunk, n)) for s in range(0, n, views_per_chunk)]


def synthesise_counts(volume: Volume, geometry: HelicalGeometry, photons: PhotonModel, seed: int,
                      views_per_chunk: int, progress: Progress | None = None) -> np.ndarray:
    """Full-dose detected photon counts (float32, views x rows x columns) of ``volume``.

    Poisson(N0 exp(-p)) per ray, plus Gaussian electronic noise when the photon model has it; each
    view chunk draws from its own seeded stream, so the result does not depend on chunk order.
    """
    mu = hu_to_mu(volume.hu, photons.mu_water_per_mm)
    air = air_counts(photons, geometry)
    counts = np.empty((geometry.number_of_views, geometry.detector_rows, geometry.detector_columns),
                      dtype=np.float32)
    for index, views in enumerate(chunks(geometry, views_per_chunk)):
        block = counts[views.start:views.stop]
        forward_project(mu, volume.spacing_mm, geometry, views, out=block)
        expected = air[views.start:views.stop] * np.exp(-block.astype(np.float64))
        drawn = rng_for(seed, Purpose.FULL_DOSE_SYNTHESIS, 1.0, index).poisson(expected).astype(np.float64)
        if photons.electronic_noise_sigma > 0:
            noise_rng = rng_for(seed, Purpose.ELECTRONIC_NOISE, 1.0, index)
            drawn += noise_rng.normal(0.0, photons.electronic_noise_sigma, size=drawn.shape)
        block[...] = drawn
        if progress:
            progress(len(views))
    return counts


def simulate_dose(full_dose_counts: np.ndarray, geometry: HelicalGeometry, photons: PhotonModel,
                  dose_fraction: float, seed: int, views_per_chunk: int,
                  progress: Progress | None = None) -> np.ndarray:
    """Line integrals (float32) of the acquisition at ``dose_fraction``, thinned chunk by chunk."""
    air = air_counts(photons, geometry)
    floor = count_floor(dose_fraction)
    line_integrals = np.empty(full_dose_counts.shape, dtype=np.float32)
    for index, views in enumerate(chunks(geometry, views_per_chunk)):
        rng = rng_for(seed, Purpose.DOSE_REDUCTION, dose_fraction, index)
        low = reduce_dose(full_dose_counts[views.start:views.stop], dose_fraction, rng,
                          electronic_noise_sigma=photons.electronic_noise_sigma)
        counts_to_line_integrals(low, dose_fraction * air[views.start:views.stop],
                                 out=line_integrals[views.start:views.stop], floor=floor)
        if progress:
            progress(len(views))
    return line_integrals

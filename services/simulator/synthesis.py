"""Stage functions of the simulator: plan a helical scan for a volume, synthesise its full-dose photon
counts, and thin them to a lower dose. Pure: arrays, geometry and settings in, arrays out."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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


def synthesise_blocks(volume: Volume, geometry: HelicalGeometry, photons: PhotonModel, seed: int,
                      views_per_chunk: int) -> Iterator[tuple[int, range, np.ndarray]]:
    """Full-dose detected photon counts of ``volume``, one view chunk at a time: (index, views, counts).

    Poisson(N0 exp(-p)) per ray, plus Gaussian electronic noise when the photon model has it; each
    chunk draws from its own seeded stream, so the result does not depend on chunk order.
    """
    mu = hu_to_mu(volume.hu, photons.mu_water_per_mm)
    air = air_counts(photons, geometry)
    for index, views in enumerate(chunks(geometry, views_per_chunk)):
        block = forward_project(mu, volume.spacing_mm, geometry, views)
        expected = air[views.start:views.stop] * np.exp(-block.astype(np.float64))
        drawn = rng_for(seed, Purpose.FULL_DOSE_SYNTHESIS, 1.0, index).poisson(expected).astype(np.float64)
        if photons.electronic_noise_sigma > 0:
            noise_rng = rng_for(seed, Purpose.ELECTRONIC_NOISE, 1.0, index)
            drawn += noise_rng.normal(0.0, photons.electronic_noise_sigma, size=drawn.shape)
        yield index, views, drawn.astype(np.float32)


def synthesise_counts(volume: Volume, geometry: HelicalGeometry, photons: PhotonModel, seed: int,
                      views_per_chunk: int, progress: Progress | None = None) -> np.ndarray:
    """All of :func:`synthesise_blocks` in one array (float32, views x rows x columns)."""
    counts = np.empty((geometry.number_of_views, geometry.detector_rows, geometry.detector_columns),
                      dtype=np.float32)
    for _, views, block in synthesise_blocks(volume, geometry, photons, seed, views_per_chunk):
        counts[views.start:views.stop] = block
        if progress:
            progress(len(views))
    return counts


def thin_block(counts: np.ndarray, air: np.ndarray, dose_fraction: float, seed: int, chunk_index: int,
               electronic_noise_sigma: float = 0.0) -> np.ndarray:
    """Line integrals (float32) of one view chunk at ``dose_fraction``: Zabic thinning of the chunk's
    full-dose ``counts`` with the chunk's own seeded stream, normalised by the chunk's ``air`` counts."""
    rng = rng_for(seed, Purpose.DOSE_REDUCTION, dose_fraction, chunk_index)
    low = reduce_dose(counts, dose_fraction, rng, electronic_noise_sigma=electronic_noise_sigma)
    return counts_to_line_integrals(low, dose_fraction * air, floor=count_floor(dose_fraction))


def simulate_dose(full_dose_counts: np.ndarray, geometry: HelicalGeometry, photons: PhotonModel,
                  dose_fraction: float, seed: int, views_per_chunk: int,
                  progress: Progress | None = None) -> np.ndarray:
    """Line integrals (float32) of the acquisition at ``dose_fraction``, thinned chunk by chunk."""
    air = air_counts(photons, geometry)
    line_integrals = np.empty(full_dose_counts.shape, dtype=np.float32)
    for index, views in enumerate(chunks(geometry, views_per_chunk)):
        line_integrals[views.start:views.stop] = thin_block(
            full_dose_counts[views.start:views.stop], air[views.start:views.stop], dose_fraction, seed, index,
            photons.electronic_noise_sigma)
        if progress:
            progress(len(views))
    return line_integrals

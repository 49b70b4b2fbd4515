"""End to end: reconstructed image noise scales as 1/sqrt(dose) (quantum-limited, no electronic noise).

Two independent full-dose acquisitions (different seeds) of the same part of the bundled CT are each
thinned to dose f and reconstructed; their difference holds only noise, with variance 2 sigma(f)^2.
For Poisson counts well above one photon, Var(p) = 1 / (f N) per ray, and the reconstruction is
linear in p, so sigma(f) = sigma(1) / sqrt(f).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from dosebench.core.data import sample_ct
from dosebench.core.protocol import load_protocol
from dosebench.core.units import mu_to_hu
from dosebench.core.volume import Volume, load_volume
from dosebench.reconstructor.wfbp import reconstruct
from dosebench.simulator.synthesis import plan_scan, simulate_dose, synthesise_counts

DOSES = (1.0, 0.5, 0.2)


@pytest.fixture(scope="module")
def noise_by_dose():
    full = load_volume(sample_ct())
    # the central 10 slices: enough voxels for a precise std, fast to simulate
    hu = np.ascontiguousarray(full.hu[:, :, 10:20])
    volume = Volume(hu=hu, affine=full.affine, source_affine=full.affine, source_shape=hu.shape,
                    source_name="crop")
    tiny = load_protocol("tiny")
    # a tenth of the tiny protocol's mAs: noise of a few HU on its coarse grid, while every ray still
    # keeps thousands of photons (the Gaussian regime the 1/sqrt(dose) law assumes)
    protocol = tiny.model_copy(update={"photons": tiny.photons.model_copy(update={"mas_per_rotation": 20.0})})
    geometry = plan_scan(volume, protocol.scanner)
    xs, ys, zs = volume.scanner_coordinates_mm()
    body = ndimage.binary_erosion(volume.hu > -500, iterations=3)
    images = {}
    for seed in (11, 12):
        counts = synthesise_counts(volume, geometry, protocol.photons, seed, protocol.views_per_chunk)
        for dose in DOSES:
            p = simulate_dose(counts, geometry, protocol.photons, dose, seed, protocol.views_per_chunk)
            recon = reconstruct(p, geometry, protocol.reconstruction, xs, ys, zs)
            images[seed, dose] = mu_to_hu(recon.mu_per_mm, protocol.photons.mu_water_per_mm)
    noise = {dose: float(np.std(images[11, dose][body] - images[12, dose][body]) / np.sqrt(2)) for dose in DOSES}
    print("noise std (HU) by dose:", {d: round(v, 3) for d, v in noise.items()})
    return noise


def test_noise_scales_as_inverse_sqrt_dose(noise_by_dose):
    sigma_full = noise_by_dose[1.0]
    assert sigma_full > 1.0  # there is noise to measure
    for dose in (0.5, 0.2):
        expected = sigma_full / np.sqrt(dose)
        # 10 %: the bound; the std of ~1e5 body voxels is itself precise to well under 1 %
        assert noise_by_dose[dose] == pytest.approx(expected, rel=0.10)

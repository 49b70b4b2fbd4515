"""Helical WFBP against analytic phantoms (exact line integrals) and the bundled real CT."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dosebench.core.data import sample_ct, sample_reference_segmentation
from dosebench.core.geometry import HelicalGeometry
from dosebench.core.protocol import ReconstructionSettings, load_protocol
from dosebench.core.units import hu_to_mu, mu_to_hu
from dosebench.core.volume import load_volume
from dosebench.reconstructor.wfbp import ramp_filter_response, reconstruct
from dosebench.simulator.phantoms import Ellipsoid, analytic_line_integrals
from dosebench.simulator.projector import forward_project
from dosebench.simulator.synthesis import plan_scan

MU_WATER = 0.0193


def hu(value: float) -> float:
    """mu of a material of ``value`` HU."""
    return MU_WATER * (1.0 + value / 1000.0)


# Water body (0 HU) with inserts given as HU differences; long in z so that slices near the centre
# see a z-uniform object and ones near a cap see the cone's z-variation.
BODY = Ellipsoid((0.0, 0.0, 0.0), (120.0, 90.0, 70.0), hu(0.0))
INSERTS = {
    "bone (+700 HU)": (Ellipsoid((45.0, 10.0, 0.0), (18.0, 18.0, 50.0), hu(700.0) - hu(0.0)), 700.0),
    "fat (-100 HU)": (Ellipsoid((-45.0, -15.0, 0.0), (22.0, 16.0, 50.0), hu(-100.0) - hu(0.0), 0.5), -100.0),
    "liver (+60 HU)": (Ellipsoid((0.0, 45.0, 0.0), (25.0, 15.0, 50.0), hu(60.0) - hu(0.0)), 60.0),
}
PHANTOM = [BODY, *(e for e, _ in INSERTS.values())]


def scan(pitch: float, detector_shape: str = "curved", direction: int = 1, start: float = 0.0,
         z_half: float = 30.0) -> HelicalGeometry:
    scanner = load_protocol("tiny").scanner.model_copy(update={
        "pitch": pitch, "detector_shape": detector_shape, "rotation_direction": direction,
        "start_angle_rad": start, "detector_rows": 12, "row_height_at_isocenter_mm": 2.0,
        "column_width_at_isocenter_mm": 2.5, "detector_columns": 210, "views_per_turn": 240})
    return HelicalGeometry.covering(scanner, -z_half, z_half, radius_mm=150.0)


def interior(ellipsoid: Ellipsoid, x, y, z, margin_mm: float = 4.0) -> np.ndarray:
    shrunk = Ellipsoid(ellipsoid.center_mm, tuple(a - margin_mm for a in ellipsoid.semi_axes_mm),
                       ellipsoid.mu_per_mm, ellipsoid.angle_rad)
    return shrunk.contains(x, y, z)


def reconstruct_phantom(geometry: HelicalGeometry, kernel: str = "shepp-logan"):
    xs = (np.arange(84) - 41.5) * 3.0
    ys = (np.arange(66) - 32.5) * 3.0
    zs = np.arange(-30.0, 30.1, 3.0)
    line_integrals = analytic_line_integrals(PHANTOM, geometry)
    recon = reconstruct(line_integrals, geometry, ReconstructionSettings(kernel=kernel), xs, ys, zs)
    assert recon.incomplete_voxels == 0
    x, y, z = np.meshgrid(xs, ys, zs, indexing="ij")
    return mu_to_hu(recon.mu_per_mm, MU_WATER), x, y, z


@pytest.mark.parametrize("pitch", [0.5, 1.0, 1.38, 1.5])  # the range and the paper's pitch
def test_phantom_hu_within_5_of_truth(pitch):
    image, x, y, z = reconstruct_phantom(scan(pitch))
    inserts = np.zeros(image.shape, bool)
    for ellipsoid, truth in INSERTS.values():
        mask = interior(ellipsoid, x, y, z)
        inserts |= ellipsoid.contains(x, y, z)
        assert abs(image[mask].mean() - truth) < 5.0
    water = interior(BODY, x, y, z, margin_mm=6.0) & ~ndimage.binary_dilation(inserts, iterations=2)
    assert abs(image[water].mean()) < 5.0
    # Slice by slice too: a helical weighting error shows as a slice-to-slice wobble.
    per_slice = np.array([image[..., k][water[..., k]].mean() for k in range(image.shape[2])])
    assert np.abs(per_slice).max() < 5.0


@pytest.mark.parametrize("detector_shape,direction,start", [("flat", 1, 0.3), ("curved", -1, 2.0), ("flat", -1, 4.0)])
def test_detector_shapes_rotation_directions_and_start_angles(detector_shape, direction, start):
    image, x, y, z = reconstruct_phantom(scan(1.2, detector_shape, direction, start))
    for ellipsoid, truth in INSERTS.values():
        assert abs(image[interior(ellipsoid, x, y, z)].mean() - truth) < 5.0


def test_wrong_geometry_is_detected():
    """The test above can fail: data of one rotation direction reconstructed as the other is wrong."""
    geometry = scan(1.0, direction=1)
    mirrored = geometry.model_copy(update={"rotation_direction": -1})
    xs = (np.arange(84) - 41.5) * 3.0
    ys = (np.arange(66) - 32.5) * 3.0
    zs = np.array([0.0])
    recon = reconstruct(analytic_line_integrals(PHANTOM, geometry), mirrored, ReconstructionSettings(), xs, ys, zs)
    x, y, z = np.meshgrid(xs, ys, zs, indexing="ij")
    image = mu_to_hu(recon.mu_per_mm, MU_WATER)
    errors = [abs(image[interior(e, x, y, z)].mean() - truth) for e, truth in INSERTS.values()]
    assert max(errors) > 100.0


def test_ramp_filter_is_the_ramp():
    """Ram-Lak's response is |f| (times dt's normalisation) well inside the band, and 0 at DC."""
    n, dt = 512, 1.5
    response = ramp_filter_response(n, dt, "ram-lak", 1.0)
    frequencies = np.fft.rfftfreq(n, d=dt)
    middle = slice(n // 16, n // 4)
    assert np.allclose(response[middle], frequencies[middle], rtol=0.02)
    # the sampled spatial kernel leaves a DC term of order 1/(pi^2 n dt), below the first bin's |f|
    assert 0.0 <= response[0] < 0.5 * frequencies[1]
    for kernel in ("shepp-logan", "cosine", "hann"):
        windowed = ramp_filter_response(n, dt, kernel, 1.0)
        assert np.all(windowed <= response + 1e-12) and windowed[-1] <= 0.7 * response[-1]
    cut = ramp_filter_response(n, dt, "ram-lak", 0.5)
    assert np.all(cut[frequencies > 0.5 * frequencies[-1] * 1.01] == 0)


@pytest.fixture(scope="module")
def bundled_reconstruction():
    """The bundled real CT, projected noise-free with the demo protocol and reconstructed."""
    volume = load_volume(sample_ct())
    protocol = load_protocol("demo")
    geometry = plan_scan(volume, protocol.scanner)
    mu = hu_to_mu(volume.hu, protocol.photons.mu_water_per_mm)
    line_integrals = forward_project(mu, volume.spacing_mm, geometry)
    xs, ys, zs = volume.scanner_coordinates_mm()
    recon = reconstruct(line_integrals, geometry, protocol.reconstruction, xs, ys, zs)
    return volume, mu_to_hu(recon.mu_per_mm, protocol.photons.mu_water_per_mm)


# TotalSegmentator 'total' ids of the bundled reference segmentation
ORGANS = {"spleen": [1], "kidney_right": [2], "kidney_left": [3], "liver": [5], "vertebrae": list(range(26, 51))}


def test_bundled_ct_organ_hu_within_10(bundled_reconstruction, tmp_path):
    volume, image = bundled_reconstruction
    path = tmp_path / "recon.nii.gz"
    volume.save_nifti(np.rint(image), path, dtype=np.int16)
    saved = nib.load(str(path))
    original = nib.load(str(sample_ct()))
    assert saved.shape == original.shape and np.allclose(saved.affine, original.affine)
    recon = np.asarray(saved.dataobj, np.float32)
    source = np.asarray(original.dataobj, np.float32)
    labels = np.asarray(nib.load(str(sample_reference_segmentation())).dataobj)
    for name, ids in ORGANS.items():
        mask = ndimage.binary_erosion(np.isin(labels, ids), iterations=1)
        assert mask.sum() > 200, name
        assert abs(recon[mask].mean() - source[mask].mean()) < 10.0, name


def test_bundled_ct_lands_on_the_same_voxels(bundled_reconstruction):
    """Any shift of the reconstruction against the input makes the match worse (affine and centring)."""
    volume, image = bundled_reconstruction
    body = ndimage.binary_erosion(volume.hu > -500, iterations=3)

    def mismatch(shift):
        moved = np.roll(image, shift, axis=(0, 1, 2))
        return np.abs(moved - volume.hu)[body].mean()

    best = mismatch((0, 0, 0))
    for shift in [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]:
        assert mismatch(shift) > best * 1.5

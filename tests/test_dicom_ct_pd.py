"""DICOM-CT-PD raw projections: written here with pydicom in the manual's layout from an analytic phantom,
read back into a HelicalGeometry and a counts store, reconstructed by WFBP."""

from __future__ import annotations

import numpy as np
import pytest

from dosebench.core.errors import InputError
from dosebench.core.geometry import FocalSpotOffset, HelicalGeometry
from dosebench.core.protocol import ReconstructionSettings, load_protocol
from dosebench.core.units import mu_to_hu
from dosebench.reconstructor.wfbp import reconstruct
from dosebench.simulator.dicom_ct_pd import (
    air_counts_of,
    convert_to_store,
    focal_spot_period,
    is_dicom_ct_pd,
    read_views,
    scan_folder,
    write_dicom_ct_pd,
)
from dosebench.simulator.phantoms import Ellipsoid, analytic_line_integrals
from dosebench.simulator.store import open_store

MU_WATER = 0.0193
N0 = 2.0e5


def hu(value: float) -> float:
    return MU_WATER * (1.0 + value / 1000.0)


BODY = Ellipsoid((0.0, 0.0, 0.0), (110.0, 85.0, 60.0), hu(0.0))
BONE = Ellipsoid((45.0, 10.0, 0.0), (18.0, 18.0, 50.0), hu(700.0) - hu(0.0))
LIVER = Ellipsoid((-10.0, 40.0, 0.0), (25.0, 15.0, 50.0), hu(60.0) - hu(0.0))
PHANTOM = [BODY, BONE, LIVER]


def small_scan(detector_shape: str = "curved", direction: int = 1, start: float = 0.4,
               views: int | None = None) -> HelicalGeometry:
    """The helix covering z in [-6, 6] mm, or its first ``views`` views (enough for round trips)."""
    scanner = load_protocol("tiny").scanner.model_copy(update={
        "detector_shape": detector_shape, "rotation_direction": direction, "start_angle_rad": start,
        "detector_rows": 12, "row_height_at_isocenter_mm": 2.0, "column_width_at_isocenter_mm": 2.5,
        "detector_columns": 210, "central_column": 104.75, "views_per_turn": 240, "pitch": 1.0})
    geometry = HelicalGeometry.covering(scanner, -6.0, 6.0, radius_mm=150.0)
    return geometry if views is None else geometry.model_copy(update={"number_of_views": views})


def assert_same_geometry(read: HelicalGeometry, original: HelicalGeometry) -> None:
    a, b = read.model_dump(), original.model_dump()
    for key in ("detector_shape", "detector_rows", "detector_columns", "views_per_turn", "rotation_direction",
                "number_of_views"):
        assert a[key] == b[key], key
    for key in ("source_to_isocenter_mm", "source_to_detector_mm", "row_height_at_isocenter_mm",
                "column_width_at_isocenter_mm", "central_column", "pitch"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-4), key
    assert a["start_z_mm"] == pytest.approx(b["start_z_mm"], abs=1e-3)
    turn = (a["start_angle_rad"] - b["start_angle_rad"]) / (2 * np.pi)
    assert abs(turn - round(turn)) < 1e-6
    # the whole helix, not just its parameters
    np.testing.assert_allclose(read.source_positions_mm(), original.source_positions_mm(), atol=2e-3)
    np.testing.assert_allclose(read.ray_directions(), original.ray_directions(), atol=1e-6)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    geometry = small_scan()
    p = analytic_line_integrals(PHANTOM, geometry)
    folder = tmp_path_factory.mktemp("ctpd") / "raw"
    write_dicom_ct_pd(folder, p, geometry, N0, mu_water_per_mm=MU_WATER)
    return folder, geometry, p


def test_geometry_and_line_integrals_round_trip(written):
    folder, geometry, p = written
    assert is_dicom_ct_pd(folder)
    scan = scan_folder(folder)
    assert not scan.flipped and scan.ffs_mode == "FFSNONE"
    assert scan.mu_water_per_mm == pytest.approx(MU_WATER)
    assert_same_geometry(scan.geometry, geometry)
    read, air = read_views(scan, range(geometry.number_of_views))
    quantum = (p.max() - min(p.min(), 0.0)) / 65000.0  # the writer's RescaleSlope
    assert np.abs(read - p).max() <= 0.5 * quantum + 1e-6 * p.max()
    assert np.all(air == np.float32(N0))


@pytest.mark.parametrize("detector_shape,direction,flip,implicit", [
    ("flat", -1, False, True), ("curved", 1, True, False), ("curved", -1, True, True)])
def test_other_geometries_frames_and_encodings(tmp_path, detector_shape, direction, flip, implicit):
    geometry = small_scan(detector_shape, direction, start=2.5, views=120)
    p = analytic_line_integrals(PHANTOM, geometry)
    write_dicom_ct_pd(tmp_path, p, geometry, np.linspace(1e5, 3e5, geometry.detector_columns),
                      implicit_vr=implicit, flip=flip)
    scan = scan_folder(tmp_path)
    assert scan.flipped == flip
    assert_same_geometry(scan.geometry, geometry)
    read, air = read_views(scan, range(0, 50))
    assert np.abs(read - p[:50]).max() <= 0.5 * (p.max() - min(p.min(), 0.0)) / 65000.0 + 1e-5
    np.testing.assert_allclose(air[0, 0], np.linspace(1e5, 3e5, geometry.detector_columns).astype(np.float32))


def test_counts_store_reconstructs_inserts_within_5_hu(written, tmp_path):
    folder, geometry, p = written
    scan = scan_folder(folder)
    store = convert_to_store(scan, str(tmp_path / "counts"), views_per_block=64)
    reopened = open_store(str(tmp_path / "counts"))
    assert reopened.quantity == "counts" and reopened.shape == p.shape
    assert reopened.attrs["flying_focal_spot"]["mode"] == "FFSNONE"
    counts = reopened.read_all()
    air = air_counts_of(reopened)
    assert air.shape == (p.shape[0], 1, p.shape[2])
    line_integrals = np.log(air / counts).astype(np.float32)
    np.testing.assert_allclose(line_integrals, p, atol=2e-4)
    xs = (np.arange(76) - 37.5) * 3.0
    ys = (np.arange(60) - 29.5) * 3.0
    zs = np.arange(-6.0, 6.1, 3.0)
    recon = reconstruct(line_integrals, store.geometry, ReconstructionSettings(kernel="shepp-logan"), xs, ys, zs)
    assert recon.incomplete_voxels == 0
    image = mu_to_hu(recon.mu_per_mm, scan.mu_water_per_mm)
    x, y, z = np.meshgrid(xs, ys, zs, indexing="ij")
    for insert, truth in ((BONE, 700.0), (LIVER, 60.0)):
        inner = Ellipsoid(insert.center_mm, tuple(a - 4.0 for a in insert.semi_axes_mm), insert.mu_per_mm)
        assert abs(image[inner.contains(x, y, z)].mean() - truth) < 5.0


Z_FFS = [FocalSpotOffset(axial_mm=-0.3, radial_mm=-0.9), FocalSpotOffset(axial_mm=0.3, radial_mm=0.9)]
XYZ_FFS = [FocalSpotOffset(angle_rad=a, axial_mm=z, radial_mm=r)
           for a, z, r in ((-7e-4, -0.3, -1.2), (7e-4, -0.3, 1.2), (-7e-4, 0.3, -1.2), (7e-4, 0.3, 1.2))]


@pytest.mark.parametrize("offsets,mode,flip", [(Z_FFS, "FFSZ", False), (XYZ_FFS, "FFSXYZ", True)])
def test_flying_focal_spot_round_trip(tmp_path, offsets, mode, flip):
    geometry = small_scan(direction=-1 if flip else 1, views=90).model_copy(update={"focal_spot_offsets": offsets})
    p = analytic_line_integrals(PHANTOM, geometry)  # rays from the actual focal spots
    write_dicom_ct_pd(tmp_path / "raw", p, geometry, N0, flip=flip)
    scan = scan_folder(tmp_path / "raw")
    assert scan.flipped == flip and scan.ffs_mode == mode
    read = scan.geometry
    assert len(read.focal_spot_offsets) == len(offsets)
    for got, want in zip(read.focal_spot_offsets, offsets, strict=True):
        # the tags are float32: relative 6e-8
        assert got.angle_rad == pytest.approx(want.angle_rad, rel=1e-6, abs=1e-12)
        assert got.axial_mm == pytest.approx(want.axial_mm, rel=1e-6, abs=1e-12)
        assert got.radial_mm == pytest.approx(want.radial_mm, rel=1e-6, abs=1e-12)
    np.testing.assert_array_equal(read.focal_spot_index(), geometry.focal_spot_index())
    assert_same_geometry(read, geometry)  # actual sources and rays, focal spot included
    assert scan.attrs()["flying_focal_spot"]["mode"] == mode
    # counts round-trip: N0 exp(-p) of the written line integrals, within the uint16 quantisation
    reopened = convert_to_store(scan, str(tmp_path / "counts"), views_per_block=32)
    counts = reopened.read_all().astype(np.float64)
    quantum = (p.max() - min(p.min(), 0.0)) / 65000.0
    np.testing.assert_allclose(counts, N0 * np.exp(-p.astype(np.float64)), rtol=0.5 * quantum + 1e-6)


def test_non_periodic_focal_spot_is_refused(tmp_path):
    geometry = small_scan(views=60)
    p = np.zeros((geometry.number_of_views, geometry.detector_rows, geometry.detector_columns), np.float32)
    rng = np.random.default_rng(5)
    shifts = [(0.0, float(z), 0.0) for z in rng.uniform(-0.5, 0.5, 31)]  # 31 > MAX_FOCAL_SPOT_PERIOD
    write_dicom_ct_pd(tmp_path / "ffs", p, geometry, N0, ffs_mode="FFSZ", ffs_offsets=shifts)
    with pytest.raises(InputError, match="do not repeat") as error:
        scan_folder(tmp_path / "ffs")
    assert "7033,100B/C/D" in str(error.value)


def test_zero_focal_spot_shifts_give_no_offsets(tmp_path):
    geometry = small_scan(views=60)
    p = np.zeros((geometry.number_of_views, geometry.detector_rows, geometry.detector_columns), np.float32)
    write_dicom_ct_pd(tmp_path / "zero", p, geometry, N0, ffs_mode="FFSZ", ffs_offsets=[(0.0, 0.0, 0.0)])
    scan = scan_folder(tmp_path / "zero")
    assert scan.geometry.focal_spot_offsets == []
    assert scan.attrs()["flying_focal_spot"] == {"mode": "FFSZ", "offsets": [[0.0, 0.0, 0.0]]}


def test_focal_spot_period_detection():
    base = np.array([[1e-3, 0.3, 1.0], [-1e-3, 0.3, -1.0], [1e-3, -0.3, 1.0], [-1e-3, -0.3, -1.0]])
    assert focal_spot_period(np.tile(base, (10, 1))) == 4
    assert focal_spot_period(np.tile(base[:2], (10, 1))[:-1]) == 2  # an incomplete last cycle is fine
    assert focal_spot_period(np.zeros((5, 3))) == 1
    broken = np.tile(base, (10, 1))
    broken[17, 1] += 1e-3
    assert focal_spot_period(broken) is None


def test_not_ct_pd_and_missing_views(tmp_path, written):
    folder, geometry, _ = written
    assert not is_dicom_ct_pd(tmp_path)
    gappy = tmp_path / "gappy"
    gappy.mkdir()
    for path in sorted(folder.iterdir())[:200]:
        if path.name != "proj_000100.dcm":
            (gappy / path.name).write_bytes(path.read_bytes())
    with pytest.raises(InputError, match="evenly spaced"):
        scan_folder(gappy)

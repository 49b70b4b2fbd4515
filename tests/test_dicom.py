"""DICOM series reader: NIfTI -> DICOM -> reader round trips, series choice, zips, and refusals."""

from __future__ import annotations

import random
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from dosebench.core import dicom
from dosebench.core.dicom import SeriesInfo, list_series, read_dicom_series
from dosebench.core.errors import InputError

SAMPLE_CT = Path(dicom.__file__).parent / "data" / "sample_ct" / "ct.nii.gz"
INTERCEPT = -1024


@pytest.fixture(scope="module")
def sample() -> nib.Nifti1Image:
    """A small, non-square crop of the bundled CT (int16 HU), so transposes cannot hide."""
    img = nib.load(SAMPLE_CT)
    cropped = img.slicer[30:70, 20:52, 8:16]
    data = np.asanyarray(cropped.dataobj)
    assert data.dtype == np.int16 and data.shape == (40, 32, 8)
    return nib.Nifti1Image(data, cropped.affine)


def _ds(values: list[float] | np.ndarray) -> list[str]:
    """Decimal strings that fit DICOM's 16-character DS limit."""
    return [format_number_as_ds(float(v)) for v in values]


def write_series(
    folder: Path,
    data: np.ndarray,
    affine: np.ndarray,
    *,
    series_uid: str | None = None,
    description: str = "test series",
    compress: str | None = None,
    shuffle: bool = True,
) -> str:
    """Write ``data`` (HU, indexed [column, row, slice]) with RAS ``affine`` as CT Image Storage files.

    Returns the SeriesInstanceUID. Files are named in shuffled order so the reader must sort.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    column_spacing = np.linalg.norm(lps[:3, 0])
    row_spacing = np.linalg.norm(lps[:3, 1])
    orientation = np.concatenate([lps[:3, 0] / column_spacing, lps[:3, 1] / row_spacing])
    n_slices = data.shape[2]
    names = list(range(n_slices))
    if shuffle:
        random.Random(0).shuffle(names)
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        path = folder / f"IM{names[k]:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.Modality = "CT"
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = _ds(lps[:3, :] @ np.array([0.0, 0.0, k, 1.0]))
        ds.ImageOrientationPatient = _ds(orientation)
        ds.PixelSpacing = _ds([row_spacing, column_spacing])
        ds.SliceThickness = format_number_as_ds(float(np.linalg.norm(lps[:3, 2])))
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = str(INTERCEPT)
        ds.RescaleSlope = "1"
        # DICOM pixels are [row, column]: the transpose of our [column, row] slice.
        stored = np.ascontiguousarray((data[:, :, k].astype(np.int32) - INTERCEPT).T).astype(np.int16)
        ds.PixelData = stored.tobytes()
        if compress is not None:
            ds.compress(compress, stored)
        ds.save_as(path, enforce_file_format=True)
    return series_uid


def rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    """Rotation matrix about ``axis`` (Rodrigues)."""
    a = axis / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def assert_same(hu: np.ndarray, affine: np.ndarray, img: nib.Nifti1Image) -> None:
    expected = np.asanyarray(img.dataobj)
    assert hu.dtype == np.float32 and affine.dtype == np.float64
    assert hu.shape == expected.shape
    np.testing.assert_array_equal(hu, expected.astype(np.float32))
    assert np.allclose(affine, img.affine, atol=1e-4), (affine, img.affine)


# ---------------------------------------------------------------------------------------------------
# round trips


def test_round_trip_sample_ct(tmp_path: Path, sample: nib.Nifti1Image) -> None:
    write_series(tmp_path / "ct", np.asanyarray(sample.dataobj), sample.affine)
    hu, affine = read_dicom_series(tmp_path / "ct")
    assert_same(hu, affine, sample)


def test_round_trip_oblique_anisotropic(tmp_path: Path, sample: nib.Nifti1Image) -> None:
    """An oblique grid with three different spacings and a rotated, partly flipped frame."""
    affine = np.eye(4)
    # x flipped (voxel i runs right-to-left) and y flipped: det stays positive (right-handed in LPS).
    frame = rotation(np.array([1.0, 2.0, 3.0]), 25.0) @ np.diag([-1.0, -1.0, 1.0])
    affine[:3, :3] = frame @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [12.5, -40.25, 100.0]
    img = nib.Nifti1Image(np.asanyarray(sample.dataobj), affine)
    write_series(tmp_path / "ct", np.asanyarray(img.dataobj), img.affine)
    hu, out = read_dicom_series(tmp_path / "ct")
    assert_same(hu, out, img)


def flip(img: nib.Nifti1Image, axis: int) -> nib.Nifti1Image:
    """``img`` with array axis ``axis`` reversed and the affine adjusted, so world positions are kept.

    (Written out because nibabel's ``slicer[::-1]`` keeps the old origin.)
    """
    n = img.shape[axis]
    index_flip = np.eye(4)
    index_flip[axis, axis] = -1.0
    index_flip[axis, 3] = n - 1
    return nib.Nifti1Image(np.flip(np.asanyarray(img.dataobj), axis), img.affine @ index_flip)


def test_left_handed_grid_comes_back_sorted_along_the_normal(tmp_path: Path, sample: nib.Nifti1Image) -> None:
    """With slices stored against the normal, the reader returns the same image with k reversed."""
    flipped_i = flip(sample, 0)  # det < 0: slice direction opposes row cosine x column cosine
    assert np.linalg.det(flipped_i.affine[:3, :3]) < 0
    write_series(tmp_path / "ct", np.asanyarray(flipped_i.dataobj), flipped_i.affine)
    hu, affine = read_dicom_series(tmp_path / "ct")
    assert_same(hu, affine, flip(flipped_i, 2))
    assert affine[2, 2] < 0  # slices now run inferior, along the normal


def test_rle_lossless(tmp_path: Path, sample: nib.Nifti1Image) -> None:
    write_series(tmp_path / "ct", np.asanyarray(sample.dataobj), sample.affine, compress=RLELossless)
    first = next((tmp_path / "ct").iterdir())
    assert pydicom.dcmread(first).file_meta.TransferSyntaxUID == RLELossless
    hu, affine = read_dicom_series(tmp_path / "ct")
    assert_same(hu, affine, sample)


def test_jpeg2000_lossless(tmp_path: Path, sample: nib.Nifti1Image) -> None:
    pytest.importorskip("openjpeg", reason="JPEG 2000 encoding needs pylibjpeg-openjpeg")
    write_series(tmp_path / "ct", np.asanyarray(sample.dataobj), sample.affine, compress=JPEG2000Lossless)
    first = next((tmp_path / "ct").iterdir())
    assert pydicom.dcmread(first).file_meta.TransferSyntaxUID == JPEG2000Lossless
    hu, affine = read_dicom_series(tmp_path / "ct")
    assert_same(hu, affine, sample)


def test_rescale_slope_and_non_dicom_files_are_ignored(tmp_path: Path, sample: nib.Nifti1Image) -> None:
    folder = tmp_path / "ct"
    write_series(folder / "nested" / "deeper", np.asanyarray(sample.dataobj), sample.affine)
    (folder / "README.txt").write_text("not DICOM")
    (folder / "nested" / "junk.dcm").write_bytes(b"\0" * 300)
    # A DICOMDIR (here a copy of a slice, which would otherwise duplicate a position) is skipped.
    some_slice = next((folder / "nested" / "deeper").iterdir())
    (folder / "DICOMDIR").write_bytes(some_slice.read_bytes())
    # An instance without pixel data (e.g. a report) does not count.
    report = pydicom.dcmread(some_slice)
    del report.PixelData
    report.SeriesInstanceUID = generate_uid()
    report.save_as(folder / "report.dcm")
    for path in (folder / "nested" / "deeper").iterdir():
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = "2"
        ds.save_as(path)
    hu, _ = read_dicom_series(folder)
    expected = (np.asanyarray(sample.dataobj).astype(np.float64) - INTERCEPT) * 2 + INTERCEPT
    np.testing.assert_array_equal(hu, expected.astype(np.float32))
    assert len(list_series(folder)) == 1


# ---------------------------------------------------------------------------------------------------
# several series


def test_two_series_needs_a_choice(tmp_path: Path, sample: nib.Nifti1Image) -> None:
    data = np.asanyarray(sample.dataobj)
    uid_a = write_series(tmp_path / "a", data, sample.affine, description="AX soft")
    uid_b = write_series(tmp_path / "b", data[:, :, :5] + 7, sample.affine, description="AX bone")
    with pytest.raises(InputError) as info:
        read_dicom_series(tmp_path)
    message = str(info.value)
    for text in (uid_a, uid_b, "AX soft", "AX bone", "8 images", "5 images", "--series UID"):
        assert text in message
    assert "--series" in info.value.fix

    hu, affine = read_dicom_series(tmp_path, uid_b)
    np.testing.assert_array_equal(hu, data[:, :, :5] + 7)
    assert np.allclose(affine, sample.affine, atol=1e-4)

    assert sorted(list_series(tmp_path), key=lambda s: s.description) == [
        SeriesInfo(uid_b, "AX bone", 5),
        SeriesInfo(uid_a, "AX soft", 8),
    ]

    with pytest.raises(InputError) as unknown:
        read_dicom_series(tmp_path, "1.2.3.4")
    assert "1.2.3.4" in str(unknown.value) and uid_a in str(unknown.value) and uid_b in str(unknown.value)


# ---------------------------------------------------------------------------------------------------
# zips


def test_zip_input(tmp_path: Path, sample: nib.Nifti1Image) -> None:
    write_series(tmp_path / "ct", np.asanyarray(sample.dataobj), sample.affine)
    archive = tmp_path / "ct.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in (tmp_path / "ct").iterdir():
            zf.write(path, f"export/CT/{path.name}")
        zf.writestr("export/notes.txt", "hello")
    hu, affine = read_dicom_series(archive)
    assert_same(hu, affine, sample)
    assert list_series(archive)[0].n_instances == 8


@pytest.mark.parametrize("member", ["../evil", "a/../../evil", "/tmp/evil-dosebench-test", "..\\evil"])
def test_zip_slip_is_refused(tmp_path: Path, member: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    archive = work / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok.txt", "fine")
        zf.writestr(member, "payload")
    with pytest.raises(InputError, match="zip member"):
        read_dicom_series(archive)
    assert not (tmp_path / "evil").exists()
    assert not Path("/tmp/evil-dosebench-test").exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bad.zip", "work"]


def test_zip_bombs_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", b"\0" * (2 * 1024**2))  # ~1000:1
    with pytest.raises(InputError, match="ratio"):
        read_dicom_series(archive)

    archive = tmp_path / "big.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("a.bin", b"x" * 3000)
        zf.writestr("b.bin", b"y" * 3000)
    monkeypatch.setattr(dicom, "MAX_ZIP_TOTAL_BYTES", 5000)
    with pytest.raises(InputError, match="zip bomb"):
        read_dicom_series(archive)


def test_temporary_folder_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where TemporaryDirectory goes
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("x/readme.txt", "no images here")
    with pytest.raises(InputError, match="no DICOM image series"):
        read_dicom_series(archive)
    assert list((tmp_path / "tmp").iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# refusals


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError) as info:
        read_dicom_series(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert list_series(tmp_path) == []


def test_missing_path_and_wrong_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_dicom_series(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(InputError, match="neither a folder nor a .zip"):
        read_dicom_series(tmp_path / "x.txt")
    (tmp_path / "broken.zip").write_text("not a zip")
    with pytest.raises(InputError, match="cannot open"):
        read_dicom_series(tmp_path / "broken.zip")


def _slices(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """(path, dataset) sorted by z position (the sample's slice axis is +z)."""
    items = [(p, pydicom.dcmread(p)) for p in folder.iterdir()]
    return sorted(items, key=lambda item: float(item[1].ImagePositionPatient[2]))


def test_single_slice(tmp_path: Path, sample: nib.Nifti1Image) -> None:
    write_series(tmp_path / "ct", np.asanyarray(sample.dataobj)[:, :, :1], sample.affine)
    with pytest.raises(InputError, match="at least 2"):
        read_dicom_series(tmp_path / "ct")


def test_missing_slice_is_a_spacing_error(tmp_path: Path, sample: nib.Nifti1Image) -> None:
    write_series(tmp_path / "ct", np.asanyarray(sample.dataobj), sample.affine)
    path, _ = _slices(tmp_path / "ct")[3]
    path.unlink()
    with pytest.raises(InputError, match="not uniform") as info:
        read_dicom_series(tmp_path / "ct")
    assert "slice 2" in str(info.value) and "slice 3" in str(info.value)


def test_duplicate_position(tmp_path: Path, sample: nib.Nifti1Image) -> None:
    write_series(tmp_path / "ct", np.asanyarray(sample.dataobj), sample.affine)
    (path_a, ds_a), (path_b, ds_b) = _slices(tmp_path / "ct")[2:4]
    ds_b.ImagePositionPatient = ds_a.ImagePositionPatient
    ds_b.save_as(path_b)
    with pytest.raises(InputError, match="share the slice position"):
        read_dicom_series(tmp_path / "ct")


@pytest.mark.parametrize(
    ("keyword", "value", "text"),
    [
        ("PixelSpacing", ["0.5", "0.5"], "PixelSpacing"),
        ("ImageOrientationPatient", ["1", "0", "0", "0", "0.8", "-0.6"], "ImageOrientationPatient"),
        ("Rows", 16, "size"),
    ],
)
def test_inconsistent_slices(tmp_path: Path, sample: nib.Nifti1Image, keyword: str, value, text: str) -> None:
    write_series(tmp_path / "ct", np.asanyarray(sample.dataobj), sample.affine)
    path, ds = _slices(tmp_path / "ct")[4]
    setattr(ds, keyword, value)
    if keyword == "Rows":
        ds.PixelData = ds.PixelData[: 16 * ds.Columns * 2]
    ds.save_as(path)
    with pytest.raises(InputError, match="disagree") as info:
        read_dicom_series(tmp_path / "ct")
    assert text in str(info.value)


def test_undecodable_pixel_data(tmp_path: Path, sample: nib.Nifti1Image) -> None:
    write_series(tmp_path / "ct", np.asanyarray(sample.dataobj), sample.affine)
    path, ds = _slices(tmp_path / "ct")[1]
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"this is not a JPEG 2000 codestream"])
    ds.save_as(path)
    with pytest.raises(InputError) as info:
        read_dicom_series(tmp_path / "ct")
    message = str(info.value)
    assert path.name in message and "JPEG 2000" in message and "pylibjpeg-openjpeg" in message

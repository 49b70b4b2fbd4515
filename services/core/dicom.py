"""Read a CT series from a DICOM folder or ``.zip`` into a HU volume with a NIfTI-style affine.

The output follows nibabel's conventions so that callers can treat a DICOM series exactly like a NIfTI
image: the array is indexed ``[i, j, k]`` = (pixel column, pixel row, slice) and the 4x4 affine maps
``(i, j, k, 1)`` to world RAS+ millimetres.

DICOM patient coordinates are LPS+: x grows to the patient's left, y to the posterior. The first
``ImageOrientationPatient`` triplet is the direction of increasing *column* index (along a row), the
second the direction of increasing *row* index, and ``PixelSpacing`` is ``[row spacing, column
spacing]``, i.e. the first value is the distance between rows (the step along a column).
"""

from __future__ import annotations

import contextlib
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from .errors import InputError

__all__ = ["SeriesInfo", "list_series", "read_dicom_series"]

#: refuse zips that would expand to more than this (zip-bomb guard)
MAX_ZIP_TOTAL_BYTES = 4 * 1024**3
#: refuse zip members that expand more than this many times (zip-bomb guard) ...
MAX_ZIP_RATIO = 200.0
#: ... once they are at least this large: tiny members of constant data legitimately compress
#: better than 200:1 and cannot hurt, so they are left to the total-size guard
ZIP_RATIO_MIN_BYTES = 1024**2

_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PLUGIN_FIX = (
    "install the pixel-data decoders: pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg "
    "(RLE: pylibjpeg-rle; JPEG-LS: pyjpegls), or convert the series to an uncompressed transfer syntax"
)
# Geometry values are decimal strings of at most 16 characters, so compare them with a tolerance.
_GEOMETRY_ATOL = 1e-4
_SPACING_RTOL = 0.01
_DUPLICATE_ATOL_MM = 1e-3


@dataclass(frozen=True)
class SeriesInfo:
    """One image series found under a path: enough to tell series apart in a message or a CLI."""

    uid: str
    description: str
    n_instances: int

    def describe(self) -> str:
        """One-line summary such as ``1.2.3 ('AX 1mm', 120 images)``."""
        return f"{self.uid} ({self.description!r}, {self.n_instances} images)"


@dataclass(frozen=True)
class _Instance:
    """The header fields of one image instance; pixels are decoded later, one file at a time."""

    file: Path
    series_uid: str
    description: str
    rows: int
    columns: int
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    spacing: tuple[float, ...] | None
    frames: int
    samples_per_pixel: int


def list_series(path: Path | str) -> list[SeriesInfo]:
    """Return the image series under ``path`` (a folder, searched recursively, or a ``.zip``).

    Series are sorted by UID; only instances with pixel data and ``ImagePositionPatient`` count (plus
    multi-frame instances, listed so that choosing one can say they are unsupported).
    """
    path = Path(path)
    with _dicom_root(path) as root:
        return _summaries(_group(_scan(root)))


def read_dicom_series(path: Path | str, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read one CT series into ``(hu, affine)``.

    Args:
        path: a folder (searched recursively; non-DICOM files and DICOMDIR are ignored) or a ``.zip``.
        series_uid: the SeriesInstanceUID to read; required when ``path`` holds more than one series.

    Returns:
        ``hu``: float32 array of shape (columns, rows, slices), ``hu[i, j, k]`` = pixel column ``i``,
        row ``j`` of slice ``k`` after RescaleSlope/RescaleIntercept; slices ascend along the slice
        normal (row cosine x column cosine).
        ``affine``: float64 4x4 mapping ``(i, j, k, 1)`` to RAS+ millimetres, as nibabel would.

    Raises:
        InputError: no image series, an ambiguous or unknown series, inconsistent or irregular
            geometry, fewer than two slices, undecodable pixel data, or an unsafe zip.
    """
    path = Path(path)
    with _dicom_root(path) as root:
        series = _group(_scan(root))
        if not series:
            raise InputError(
                f"no DICOM image series found in {path}",
                fix="point to a folder or .zip holding the CT series' DICOM files (with pixel data)",
            )
        uid = _choose_series(path, series, series_uid)
        slices = _sort_and_check(uid, series[uid])
        affine = _affine(slices)
        # Decode while the (possibly temporary) files still exist.
        hu = _read_pixels(slices)
    return hu, affine


# ---------------------------------------------------------------------------------------------------
# locating files


@contextlib.contextmanager
def _dicom_root(path: Path) -> Iterator[Path]:
    """Yield a folder to search: ``path`` itself, or a temporary extraction of a ``.zip``."""
    if not path.exists():
        raise InputError(f"{path} does not exist", fix="give a folder or a .zip of DICOM files")
    if path.is_dir():
        yield path
        return
    if path.suffix.lower() != ".zip":
        raise InputError(
            f"{path} is neither a folder nor a .zip", fix="give the folder (or a .zip) holding the series"
        )
    # The temporary folder goes away however the caller's block ends, errors included.
    with tempfile.TemporaryDirectory(prefix="dosebench-dicom-") as tmp:
        root = Path(tmp)
        _extract_zip(path, root)
        yield root


def _extract_zip(zip_path: Path, dest: Path) -> None:
    """Extract ``zip_path`` into ``dest``, refusing path traversal and zip bombs.

    Every member is checked before anything is written, and sizes are counted again while copying
    because a crafted zip may declare sizes it does not keep to.
    """
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"cannot open {zip_path} as a zip file ({exc})", fix="give a valid .zip") from exc
    with zf:
        root = dest.resolve()
        plan: list[tuple[zipfile.ZipInfo, Path]] = []
        total = 0
        for info in zf.infolist():
            target = _safe_member_target(zip_path, root, info.filename)
            if info.is_dir():
                continue
            total += info.file_size
            if total > MAX_ZIP_TOTAL_BYTES:
                raise InputError(
                    f"{zip_path} expands to more than {MAX_ZIP_TOTAL_BYTES} bytes (possible zip bomb)",
                    fix="unzip it yourself and pass the folder",
                )
            if info.file_size >= ZIP_RATIO_MIN_BYTES and (
                info.compress_size == 0 or info.file_size / info.compress_size > MAX_ZIP_RATIO
            ):
                raise InputError(
                    f"zip member {info.filename!r} in {zip_path} expands {info.file_size} bytes from "
                    f"{info.compress_size} (ratio above {MAX_ZIP_RATIO:g}; possible zip bomb)",
                    fix="unzip it yourself and pass the folder",
                )
            plan.append((info, target))

        written = 0
        for info, target in plan:
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(info) as src, target.open("wb") as dst:
                    while chunk := src.read(1024**2):
                        written += len(chunk)
                        if written > MAX_ZIP_TOTAL_BYTES:
                            raise InputError(
                                f"{zip_path} expands to more than {MAX_ZIP_TOTAL_BYTES} bytes "
                                "(possible zip bomb)",
                                fix="unzip it yourself and pass the folder",
                            )
                        dst.write(chunk)
            except (zipfile.BadZipFile, OSError, RuntimeError, NotImplementedError) as exc:
                # RuntimeError: encrypted member; NotImplementedError: unsupported compression.
                raise InputError(
                    f"cannot extract {info.filename!r} from {zip_path} ({exc})",
                    fix="unzip it yourself and pass the folder",
                ) from exc


def _safe_member_target(zip_path: Path, root: Path, name: str) -> Path:
    """Where member ``name`` may be written under ``root``; InputError if it would escape."""
    # Zips made on Windows may use backslashes; treat them as separators so "..\\x" is caught too.
    normalized = name.replace("\\", "/")
    pure = PurePosixPath(normalized)
    has_drive = len(normalized) >= 2 and normalized[1] == ":"
    if pure.is_absolute() or has_drive:
        raise InputError(
            f"zip member {name!r} in {zip_path} has an absolute path",
            fix="refusing to extract outside a temporary folder; rebuild the zip with relative paths",
        )
    target = (root / pure).resolve()
    if not target.is_relative_to(root):
        raise InputError(
            f"zip member {name!r} in {zip_path} points outside the extraction folder",
            fix="refusing to extract (zip-slip); rebuild the zip without '..' in member paths",
        )
    return target


def _scan(root: Path) -> list[_Instance]:
    """Read the headers of every DICOM image instance under ``root``; other files are skipped."""
    instances = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        if file.name.upper() == "DICOMDIR":
            continue
        try:
            # Defer big values (pixel data) so the scan costs little memory; pixels are read later.
            ds = pydicom.dcmread(file, force=False, defer_size="64 KB")
        except InvalidDicomError:
            continue  # not DICOM (no preamble/"DICM" marker): quietly ignored
        except Exception as exc:  # noqa: BLE001 - a DICOM-looking file pydicom cannot parse
            raise InputError(
                f"cannot read DICOM file {file} ({exc})", fix="remove or replace the damaged file"
            ) from exc
        instance = _instance(file, ds)
        if instance is not None:
            instances.append(instance)
    return instances


def _instance(file: Path, ds: pydicom.Dataset) -> _Instance | None:
    """Header summary of an image instance, or None for a DICOMDIR or an instance without an image."""
    if str(ds.get("SOPClassUID", "")) == _MEDIA_STORAGE_DIRECTORY:
        return None
    if not any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        return None
    # Multi-frame (enhanced) instances keep the position in per-frame groups: not a slice stack.
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if "ImagePositionPatient" not in ds and frames <= 1:
        return None

    def floats(keyword: str) -> tuple[float, ...] | None:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        try:
            values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
            return tuple(float(v) for v in values)
        except (TypeError, ValueError):
            return None  # malformed: reported as missing geometry if this series is chosen

    return _Instance(
        file=file,
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        description=str(ds.get("SeriesDescription", "")),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        position=floats("ImagePositionPatient"),
        orientation=floats("ImageOrientationPatient"),
        spacing=floats("PixelSpacing"),
        frames=frames,
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
    )


def _group(instances: list[_Instance]) -> dict[str, list[_Instance]]:
    """Group instances by SeriesInstanceUID."""
    series: dict[str, list[_Instance]] = {}
    for instance in instances:
        series.setdefault(instance.series_uid, []).append(instance)
    return series


def _summaries(series: dict[str, list[_Instance]]) -> list[SeriesInfo]:
    """One SeriesInfo per series, sorted by UID so messages are stable."""
    return [
        SeriesInfo(uid=uid, description=members[0].description, n_instances=len(members))
        for uid, members in sorted(series.items())
    ]


def _choose_series(path: Path, series: dict[str, list[_Instance]], series_uid: str | None) -> str:
    """The UID to read: ``series_uid`` if it exists, the only series if there is one, else InputError."""
    listing = "; ".join(info.describe() for info in _summaries(series))
    if series_uid is not None:
        if series_uid not in series:
            raise InputError(
                f"series {series_uid} not found in {path}; available: {listing}",
                fix="choose one of the listed UIDs with --series UID",
            )
        return series_uid
    if len(series) > 1:
        raise InputError(
            f"{path} holds {len(series)} image series: {listing}",
            fix="choose one with --series UID (SeriesInstanceUID)",
        )
    return next(iter(series))


# ---------------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True)
class _Slice:
    """A validated single-frame image instance with complete geometry."""

    file: Path
    rows: int
    columns: int
    position: np.ndarray  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray  # ImageOrientationPatient: row cosine, then column cosine
    spacing: np.ndarray  # PixelSpacing: [row spacing, column spacing]


def _as_slice(inst: _Instance) -> _Slice:
    """Check one instance is a single-frame greyscale image with geometry."""
    if inst.frames > 1:
        raise InputError(
            f"{inst.file} is a multi-frame (enhanced) image with {inst.frames} frames",
            fix="export the series as one file per slice (classic CT Image Storage)",
        )
    if inst.samples_per_pixel != 1:
        raise InputError(
            f"{inst.file} has {inst.samples_per_pixel} samples per pixel (colour), not a CT image",
            fix="choose a greyscale CT series",
        )
    if inst.position is None or len(inst.position) != 3:
        raise InputError(
            f"{inst.file} has no valid ImagePositionPatient", fix="choose a series with geometry"
        )
    if inst.orientation is None or len(inst.orientation) != 6:
        raise InputError(
            f"{inst.file} has no valid ImageOrientationPatient", fix="choose a series with geometry"
        )
    if inst.spacing is None or len(inst.spacing) != 2:
        raise InputError(f"{inst.file} has no valid PixelSpacing", fix="choose a series with geometry")
    if inst.rows < 1 or inst.columns < 1:
        raise InputError(f"{inst.file} has no valid Rows/Columns", fix="the file is damaged")
    return _Slice(
        file=inst.file,
        rows=inst.rows,
        columns=inst.columns,
        position=np.asarray(inst.position, dtype=np.float64),
        orientation=np.asarray(inst.orientation, dtype=np.float64),
        spacing=np.asarray(inst.spacing, dtype=np.float64),
    )


def _sort_and_check(uid: str, instances: list[_Instance]) -> list[_Slice]:
    """Sort slices along the slice normal and check they form one regular 3D grid."""
    slices = [_as_slice(inst) for inst in instances]
    first = slices[0]
    for sl in slices[1:]:
        problems = []
        if (sl.rows, sl.columns) != (first.rows, first.columns):
            problems.append(f"size {sl.rows}x{sl.columns} vs {first.rows}x{first.columns}")
        if not np.allclose(sl.spacing, first.spacing, atol=_GEOMETRY_ATOL, rtol=0):
            problems.append(f"PixelSpacing {sl.spacing.tolist()} vs {first.spacing.tolist()}")
        if not np.allclose(sl.orientation, first.orientation, atol=_GEOMETRY_ATOL, rtol=0):
            problems.append(
                f"ImageOrientationPatient {sl.orientation.tolist()} vs {first.orientation.tolist()}"
            )
        if problems:
            raise InputError(
                f"slices of series {uid} disagree: {sl.file} vs {first.file}: " + ", ".join(problems),
                fix="the series mixes images of different geometry; export a single reconstruction",
            )
    if len(slices) < 2:
        raise InputError(
            f"series {uid} has {len(slices)} image slice; a 3D volume needs at least 2",
            fix="choose a series with several slices (an axial CT stack)",
        )

    normal = np.cross(first.orientation[:3], first.orientation[3:])
    depth = np.asarray([float(np.dot(normal, sl.position)) for sl in slices])
    order = np.argsort(depth, kind="stable")
    ordered = [slices[i] for i in order]
    depths = depth[order]

    gaps = np.diff(depths)
    for k, gap in enumerate(gaps):
        if abs(gap) < _DUPLICATE_ATOL_MM:
            raise InputError(
                f"{ordered[k].file} and {ordered[k + 1].file} share the slice position {depths[k]:.3f} mm",
                fix="the series holds repeated slices (several phases or acquisitions); export one of them",
            )
    # Compare with the median gap so the message points at the odd gap (a missing slice, say); when all
    # gaps are within 1% of the median, so is the mean gap that the affine uses.
    typical = float(np.median(gaps))
    for k, gap in enumerate(gaps):
        if abs(gap - typical) > _SPACING_RTOL * typical:
            raise InputError(
                f"slice spacing is not uniform: the gap between slice {k} ({ordered[k].file.name}) and "
                f"slice {k + 1} ({ordered[k + 1].file.name}) is {gap:.4f} mm, the others are about "
                f"{typical:.4f} mm",
                fix="missing or extra slices? export the complete, regularly spaced series",
            )
    # The affine assumes every slice origin lies on one line (tilted gantries included).
    positions = np.stack([sl.position for sl in ordered])
    step = (positions[-1] - positions[0]) / (len(ordered) - 1)
    predicted = positions[0] + np.arange(len(ordered))[:, None] * step
    off_line = np.linalg.norm(positions - predicted, axis=1)
    worst = int(np.argmax(off_line))
    if off_line[worst] > _SPACING_RTOL * np.linalg.norm(step) + _DUPLICATE_ATOL_MM:
        raise InputError(
            f"slice {worst} ({ordered[worst].file.name}) is {off_line[worst]:.4f} mm off the line "
            "through the other slice positions",
            fix="the slices do not form one regular grid; export a single reconstruction",
        )
    return ordered


def _affine(ordered: list[_Slice]) -> np.ndarray:
    """NIfTI-style RAS+ affine of the sorted slices (array index order column, row, slice)."""
    first, last = ordered[0], ordered[-1]
    row_spacing, column_spacing = first.spacing
    lps = np.eye(4)
    lps[:3, 0] = first.orientation[:3] * column_spacing  # i: along a row, one column per step
    lps[:3, 1] = first.orientation[3:] * row_spacing  # j: down a column, one row per step
    lps[:3, 2] = (last.position - first.position) / (len(ordered) - 1)
    lps[:3, 3] = first.position
    # LPS -> RAS flips x and y.
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


# ---------------------------------------------------------------------------------------------------
# pixels


def _read_pixels(ordered: list[_Slice]) -> np.ndarray:
    """Decode each slice, rescale to HU and stack as float32 [column, row, slice]."""
    first = ordered[0]
    hu = np.empty((first.columns, first.rows, len(ordered)), dtype=np.float32)
    for k, sl in enumerate(ordered):
        ds = pydicom.dcmread(sl.file, force=False)
        syntax = ds.file_meta.get("TransferSyntaxUID", "unknown")
        syntax_name = getattr(syntax, "name", str(syntax))
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
            raise InputError(
                f"cannot decode the pixel data of {sl.file} (transfer syntax {syntax_name}, {syntax}): {exc}",
                fix=_PLUGIN_FIX,
            ) from exc
        if pixels.shape != (sl.rows, sl.columns):
            raise InputError(
                f"{sl.file} decodes to shape {pixels.shape}, expected {(sl.rows, sl.columns)}",
                fix="the file is damaged or not a single-frame greyscale image",
            )
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        # float64 arithmetic keeps integer HU exact before the cast; .T turns [row, col] into [col, row].
        hu[:, :, k] = (pixels.astype(np.float64) * slope + intercept).T
    return hu

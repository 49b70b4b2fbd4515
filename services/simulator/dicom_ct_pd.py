"""Raw helical projections in DICOM-CT-PD (the TCIA "LDCT-and-Projection-data" format, user manual v3).

One DICOM file per view. The projection image holds line integrals (``p = pixel * RescaleSlope +
RescaleIntercept``) with DICOM ``Rows`` = detector columns and ``Columns`` = detector rows (the
manual's layout), i.e. ``pixel_array`` is (columns, rows) and is transposed here. Private tags read:

=====================  ===========================================  ===  ================================
tag                    manual name                                  VR   use
=====================  ===========================================  ===  ================================
(7029,1010)/(7029,1011) NumberofDetectorRows / ...Columns           US   detector shape
(7029,1002)            DetectorElementTransverseSpacing (mm)        FL   column pitch at the detector
(7029,1006)            DetectorElementAxialSpacing (mm)             FL   row pitch at the detector
(7029,100B)            DetectorShape (CYLINDRICAL / FLAT)           CS   curved / flat
(7031,1001)            DetectorFocalCenterAngularPosition (rad)     FL   view angle phi_0
(7031,1002)            DetectorFocalCenterAxialPosition (mm)        FL   source z
(7031,1003)            DetectorFocalCenterRadialDistance (mm)       FL   source-to-isocentre R
(7031,1031)            ConstantRadialDistance (mm)                  FL   source-to-detector D
(7031,1033)            DetectorCentralElement (column, row; 1-based) FL  central column (0-based = -1)
(7033,100B/C/D)        SourceAngular/Axial/RadialPositionShift      FL   flying focal spot offsets
(7033,100E)            FlyingFocalSpotMode (FFSNONE, FFSZ, ...)     CS   recorded (the shifts are used)
(7033,1013)            NumberofSourceAngularSteps                   US   views per turn
(7033,1065)            PhotonStatistics (per detector column)       FL   incident counts N0
(7041,1001)            WaterAttenuationCoefficient                  FL   recorded (mu_water of the data)
=====================  ===========================================  ===  ================================

Mapping into :class:`~dosebench.core.geometry.HelicalGeometry` (whose conventions are the reference):

* the source of view k sits at ``(R cos phi_0, R sin phi_0, z_k)``: ``beta_k = phi_0[k]``, so
  ``start_angle_rad = phi_0[0]``; ``rotation_direction`` is the sign of the (unwrapped) angle steps;
  ``views_per_turn`` = (7033,1013), checked against the steps (one step = 2 pi / views_per_turn);
* ``table_feed_per_turn`` = slope of a straight-line fit of z against the view index times views per
  turn (the residual must stay below 0.05 mm: no irregular table motion); ``start_z_mm`` = the fit at
  view 0; ``pitch`` = feed / (rows x row height at the isocentre);
* pitches at the isocentre = detector spacings x R / D (a curved detector's transverse spacing is an
  arc length at radius D, so its angular pitch is spacing / D);
* detector columns run along ``e_l = (-sin beta, cos beta)``, rows upwards in z, as in dosebench;
* flying focal spot: the per-view source shifts (7033,100B/C/D) must repeat with a period of at most
  ``MAX_FOCAL_SPOT_PERIOD`` views (from the first file on); one period of them becomes
  ``focal_spot_offsets`` (angle added to beta, axial to z, radial to R; the detector stays at the
  focal centre the (7031,1001-1003) tags give). All-zero shifts give no offsets at all;
* a table moving towards -z (the usual feet-first/head-first case, negative feed) is turned into the
  positive feed dosebench's helix needs by rotating the frame 180 degrees about x:
  ``(x, y, z) -> (x, -y, -z)``: angles and z change sign and every projection is reversed in rows
  and columns (the ``frame`` attribute of the store says so). A proper rotation: reconstructions
  are the same object, turned over. The focal spot's angular and axial shifts change sign with it.

Conversion: ``counts = N0 * exp(-p)`` per ray, N0 the view's photon statistics for the ray's column;
N0 itself is kept beside the counts (``air.npy`` in the counts store, see :func:`air_counts_of`),
so the simulate stage thins and normalises the raw data with the data's own flat field.

Not supported (refused with an :class:`InputError`): focal spot shifts that do not repeat periodically,
spherical detectors, axial (no table feed) scans, irregular angular sampling, a central row
off the detector's middle.

The angle origin and the detector column direction of real scanners are NOT verified against real
data here (no TCIA data on this machine): they only turn or mirror the reconstructed image.
"""

from __future__ import annotations

import datetime
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydantic import ValidationError
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from ..core.errors import InputError
from ..core.geometry import FocalSpotOffset, HelicalGeometry
from .store import ProjectionStore, create_store

# (group, element), VR
ROWS = ((0x7029, 0x1010), "US")
COLUMNS = ((0x7029, 0x1011), "US")
TRANSVERSE_SPACING = ((0x7029, 0x1002), "FL")
AXIAL_SPACING = ((0x7029, 0x1006), "FL")
DETECTOR_SHAPE = ((0x7029, 0x100B), "CS")
ANGULAR_POSITION = ((0x7031, 0x1001), "FL")
AXIAL_POSITION = ((0x7031, 0x1002), "FL")
RADIAL_DISTANCE = ((0x7031, 0x1003), "FL")
CONSTANT_RADIAL_DISTANCE = ((0x7031, 0x1031), "FL")
CENTRAL_ELEMENT = ((0x7031, 0x1033), "FL")
FFS_ANGULAR_SHIFT = ((0x7033, 0x100B), "FL")
FFS_AXIAL_SHIFT = ((0x7033, 0x100C), "FL")
FFS_RADIAL_SHIFT = ((0x7033, 0x100D), "FL")
FFS_MODE = ((0x7033, 0x100E), "CS")
ANGULAR_STEPS = ((0x7033, 0x1013), "US")
PHOTON_STATISTICS = ((0x7033, 0x1065), "FL")
WATER_ATTENUATION = ((0x7041, 0x1001), "FL")

#: private creators written by :func:`write_dicom_ct_pd` (readers look tags up by number only)
PRIVATE_CREATOR = "DLX_DICOM-CT-PD"
AIR_FILE = "air.npy"
Z_FIT_TOLERANCE_MM = 0.05
#: longest flying focal spot cycle accepted (scanners cycle through 2 or 4 focal positions)
MAX_FOCAL_SPOT_PERIOD = 16
#: shifts closer than this (rad, mm, mm) count as the same focal position (the tags are float32)
FOCAL_SPOT_TOLERANCE = (1e-7, 1e-5, 1e-5)


def focal_spot_period(shifts: np.ndarray) -> int | None:
    """Smallest period p (<= MAX_FOCAL_SPOT_PERIOD, and at most half the views, so that the cycle is
    seen at least twice) with ``shifts[k] == shifts[k % p]`` for every view k, or None."""
    n = shifts.shape[0]
    tolerance = np.asarray(FOCAL_SPOT_TOLERANCE)
    for period in range(1, min(MAX_FOCAL_SPOT_PERIOD, max(n // 2, 1)) + 1):
        expected = shifts[np.arange(n) % period]
        if np.all(np.abs(shifts - expected) <= tolerance):
            return period
    return None


def _decode(element, vr: str):
    """Value of a (possibly implicit-VR, hence 'UN' bytes) element as the manual's VR."""
    value = element.value
    if isinstance(value, bytes):
        if vr == "FL":
            return [float(v) for v in np.frombuffer(value, "<f4")]
        if vr == "US":
            return [int(v) for v in np.frombuffer(value, "<u2")]
        return value.decode("ascii", "replace").strip("\x00 ").strip()
    if vr in ("FL", "US"):
        if isinstance(value, str | int | float):
            return [float(value) if vr == "FL" else int(value)]
        return [float(v) if vr == "FL" else int(v) for v in value]
    return str(value).strip()


def _get(ds: Dataset, spec: tuple[tuple[int, int], str], path: Path, required: bool = True):
    tag, vr = spec
    if tag not in ds:
        if required:
            raise InputError(f"{path.name} lacks DICOM-CT-PD tag ({tag[0]:04X},{tag[1]:04X})",
                             fix="give a complete DICOM-CT-PD projection folder")
        return None
    return _decode(ds[tag], vr)


def _scalar(ds: Dataset, spec, path: Path, required: bool = True):
    value = _get(ds, spec, path, required)
    if value is None:
        return None
    return value if isinstance(value, str) else value[0]


def _candidate_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def is_dicom_ct_pd(path: Path | str) -> bool:
    """Whether ``path`` is a folder whose first DICOM file carries DICOM-CT-PD projection tags."""
    path = Path(path)
    if not path.is_dir():
        return False
    for candidate in _candidate_files(path)[:5]:
        try:
            ds = pydicom.dcmread(candidate, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        return ANGULAR_POSITION[0] in ds and ROWS[0] in ds
    return False


@dataclass(frozen=True)
class RawScan:
    """A DICOM-CT-PD folder's geometry, file order and acquisition facts (no pixel data)."""

    files: list[Path]
    geometry: HelicalGeometry
    #: True when the frame was turned 180 degrees about x (table moving towards -z in the data)
    flipped: bool
    ffs_mode: str
    #: distinct flying focal spot offsets (angular rad, axial mm, radial mm) over the views
    ffs_offsets: list[list[float]]
    mu_water_per_mm: float | None
    #: the largest |z - fit| over the views (mm)
    z_fit_residual_mm: float
    provenance: dict = field(default_factory=dict)

    def attrs(self) -> dict:
        return {
            "source": "DICOM-CT-PD raw projections",
            "files": len(self.files),
            "frame": ("scanner frame turned 180 degrees about x (table feed towards -z in the data): "
                      "angles and z negated, projections reversed in rows and columns")
            if self.flipped else "the data's frame (beta = DetectorFocalCenterAngularPosition)",
            "flying_focal_spot": {"mode": self.ffs_mode, "offsets": self.ffs_offsets},
            "mu_water_per_mm": self.mu_water_per_mm,
            "z_fit_residual_mm": self.z_fit_residual_mm,
            "air_counts": AIR_FILE,
            **self.provenance,
        }


def scan_folder(folder: Path | str) -> RawScan:
    """Read every header of a DICOM-CT-PD folder and map it to a :class:`HelicalGeometry`.

    Raises :class:`InputError` for anything dosebench cannot reconstruct (see the module docstring).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder", fix="give the folder of DICOM-CT-PD projection files")
    headers: list[tuple[int, Path, Dataset]] = []
    for path in _candidate_files(folder):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if ANGULAR_POSITION[0] not in ds:
            continue
        headers.append((int(ds.get("InstanceNumber", len(headers)) or 0), path, ds))
    if len(headers) < 2:
        raise InputError(f"{folder} holds fewer than two DICOM-CT-PD projection files",
                         fix="give the folder of a whole helical acquisition")
    headers.sort(key=lambda item: (item[0], item[1].name))
    first_path, first = headers[0][1], headers[0][2]

    rows = int(_scalar(first, ROWS, first_path))
    columns = int(_scalar(first, COLUMNS, first_path))
    shape_name = str(_scalar(first, DETECTOR_SHAPE, first_path)).upper()
    if shape_name not in ("CYLINDRICAL", "FLAT"):
        raise InputError(f"detector shape {shape_name!r} is not supported",
                         fix="only CYLINDRICAL and FLAT DICOM-CT-PD detectors can be read")
    transverse = float(_scalar(first, TRANSVERSE_SPACING, first_path))
    axial = float(_scalar(first, AXIAL_SPACING, first_path))
    central = _get(first, CENTRAL_ELEMENT, first_path)
    if len(central) != 2:
        raise InputError(f"{first_path.name}: DetectorCentralElement has {len(central)} values, expected 2",
                         fix="check the projection files")
    central_column = float(central[0]) - 1.0  # 1-based in the manual
    central_row = float(central[1]) - 1.0
    if abs(central_row - (rows - 1) / 2.0) > 1e-3:
        raise InputError(f"the central detector row is {central_row + 1:g} (1-based), not the middle of "
                         f"{rows} rows", fix="such detectors are not supported yet")

    angles = np.empty(len(headers))
    z = np.empty(len(headers))
    radius = np.empty(len(headers))
    distance = np.empty(len(headers))
    offsets = np.zeros((len(headers), 3))
    modes = set()
    for i, (_, path, ds) in enumerate(headers):
        if int(_scalar(ds, ROWS, path)) != rows or int(_scalar(ds, COLUMNS, path)) != columns:
            raise InputError(f"{path.name} has another detector size than {first_path.name}",
                             fix="give the files of one acquisition only")
        angles[i] = _scalar(ds, ANGULAR_POSITION, path)
        z[i] = _scalar(ds, AXIAL_POSITION, path)
        radius[i] = _scalar(ds, RADIAL_DISTANCE, path)
        distance[i] = _scalar(ds, CONSTANT_RADIAL_DISTANCE, path)
        modes.add(str(_scalar(ds, FFS_MODE, path, required=False) or "FFSNONE").upper())
        for j, spec in enumerate((FFS_ANGULAR_SHIFT, FFS_AXIAL_SHIFT, FFS_RADIAL_SHIFT)):
            value = _scalar(ds, spec, path, required=False)
            offsets[i, j] = 0.0 if value is None else float(value)
    if len(modes) != 1:
        raise InputError(f"the files mix flying focal spot modes {sorted(modes)}",
                         fix="give the files of one acquisition only")
    ffs_mode = modes.pop()
    distinct = np.unique(np.round(offsets, 9), axis=0).tolist()
    cycle: list[list[float]] = []
    if np.any(offsets != 0.0):
        period = focal_spot_period(offsets)
        if period is None:
            raise InputError(
                f"the flying focal spot shifts (7033,100B/C/D; mode {ffs_mode}, {len(distinct)} distinct "
                f"positions over {len(headers)} views) do not repeat with a period of at most "
                f"{MAX_FOCAL_SPOT_PERIOD} views",
                fix="give the files of one complete acquisition (no missing or reordered views); "
                    "non-periodic focal spot motion is not supported")
        cycle = offsets[:period].tolist()
    if np.ptp(radius) > 1e-3 or np.ptp(distance) > 1e-3:
        raise InputError("the source-to-isocentre or source-to-detector distance changes between views",
                         fix="such acquisitions are not supported")
    source_to_iso, source_to_det = float(radius[0]), float(distance[0])

    unwrapped = np.unwrap(angles)
    steps = np.diff(unwrapped)
    direction = 1 if np.median(steps) > 0 else -1
    steps_tag = _scalar(first, ANGULAR_STEPS, first_path, required=False)
    views_per_turn = int(steps_tag) if steps_tag else int(round(2 * math.pi / abs(float(np.median(steps)))))
    expected_step = direction * 2 * math.pi / views_per_turn
    if np.abs(steps - expected_step).max() > 0.01 * abs(expected_step) + 1e-5:
        worst = int(np.argmax(np.abs(steps - expected_step)))
        raise InputError(f"the view angles are not evenly spaced at 2 pi / {views_per_turn} "
                         f"(step {worst} is {steps[worst]:.6f} rad)",
                         fix="give a complete acquisition (no missing or repeated views)")
    k = np.arange(len(headers), dtype=np.float64)
    slope, intercept = np.polyfit(k, z, 1)
    residual = float(np.abs(z - (slope * k + intercept)).max())
    if residual > Z_FIT_TOLERANCE_MM:
        raise InputError(f"the table does not move at constant speed (z off a straight line by {residual:.3f} mm)",
                         fix="such acquisitions are not supported")
    feed_per_turn = slope * views_per_turn
    if abs(feed_per_turn) < 1e-6:
        raise InputError("the table does not move: an axial scan", fix="only helical acquisitions are supported")
    flipped = feed_per_turn < 0

    magnification = source_to_det / source_to_iso
    row_height_iso = axial / magnification
    column_width_iso = transverse / magnification  # curved: R * (spacing / D); flat: spacing / M
    start_angle = float(-unwrapped[0] if flipped else unwrapped[0])
    # turning the frame about x negates angles and z, so the angular and axial shifts too
    sign = -1.0 if flipped else 1.0
    focal_spot_offsets = [FocalSpotOffset(angle_rad=sign * angle, axial_mm=sign * axial, radial_mm=radial)
                          for angle, axial, radial in cycle]
    try:
        geometry = HelicalGeometry(
            source_to_isocenter_mm=source_to_iso, source_to_detector_mm=source_to_det,
            detector_shape="curved" if shape_name == "CYLINDRICAL" else "flat",
            detector_rows=rows, detector_columns=columns,
            row_height_at_isocenter_mm=row_height_iso, column_width_at_isocenter_mm=column_width_iso,
            central_column=(columns - 1) - central_column if flipped else central_column,
            views_per_turn=views_per_turn, pitch=abs(feed_per_turn) / (rows * row_height_iso),
            start_angle_rad=start_angle, rotation_direction=-direction if flipped else direction,
            number_of_views=len(headers), start_z_mm=float(-intercept if flipped else intercept),
            focal_spot_offsets=focal_spot_offsets)
    except ValidationError as exc:
        first_line = str(exc).strip().splitlines()
        raise InputError(f"the acquisition does not fit dosebench's helical model: {' '.join(first_line[:3])}",
                         fix="check the projection files") from exc
    mu_water = _scalar(first, WATER_ATTENUATION, first_path, required=False)
    provenance = {key: str(first.get(key, "")) for key in ("Manufacturer", "ManufacturerModelName",
                                                          "KVP", "StudyInstanceUID", "SeriesInstanceUID")}
    return RawScan(files=[path for _, path, _ in headers], geometry=geometry, flipped=flipped,
                   ffs_mode=ffs_mode, ffs_offsets=distinct,
                   mu_water_per_mm=None if mu_water is None else float(mu_water),
                   z_fit_residual_mm=residual, provenance=provenance)


def read_views(scan: RawScan, views: range) -> tuple[np.ndarray, np.ndarray]:
    """Line integrals (float32, views x rows x columns) and incident counts N0 (float32, views x 1 x
    columns) of ``views``, in dosebench's frame (reversed when ``scan.flipped``)."""
    g = scan.geometry
    p = np.empty((len(views), g.detector_rows, g.detector_columns), dtype=np.float32)
    air = np.empty((len(views), 1, g.detector_columns), dtype=np.float32)
    for out_index, view in enumerate(views):
        path = scan.files[view]
        ds = pydicom.dcmread(path)
        pixels = np.asarray(ds.pixel_array)
        if pixels.shape != (g.detector_columns, g.detector_rows):
            raise InputError(f"{path.name}: projection image is {pixels.shape[0]} x {pixels.shape[1]}, expected "
                             f"{g.detector_columns} (Rows = detector columns) x {g.detector_rows}",
                             fix="check the projection files")
        slope = float(ds.get("RescaleSlope", 1.0))
        intercept = float(ds.get("RescaleIntercept", 0.0))
        values = pixels.T.astype(np.float64) * slope + intercept
        stats = _get(ds, PHOTON_STATISTICS, path, required=False)
        if stats is None:
            raise InputError(f"{path.name} has no PhotonStatistics (7033,1065)",
                             fix="dosebench needs the incident photon counts to simulate lower doses")
        n0 = np.asarray(stats, dtype=np.float32)
        if n0.size == 1:
            n0 = np.full(g.detector_columns, n0[0], dtype=np.float32)
        if n0.size != g.detector_columns or np.any(~np.isfinite(n0)) or np.any(n0 <= 0):
            raise InputError(f"{path.name}: PhotonStatistics must hold {g.detector_columns} positive values",
                             fix="check the projection files")
        if scan.flipped:
            values = values[::-1, ::-1]
            n0 = n0[::-1]
        p[out_index] = values
        air[out_index, 0] = n0
    return p, air


def convert_to_store(scan: RawScan, url: str, views_per_block: int,
                     progress: Callable[[int], None] | None = None,
                     check: Callable[[], None] | None = None) -> ProjectionStore:
    """A counts store at ``url`` (``counts = N0 exp(-p)``) plus its flat field ``air.npy``."""
    store = create_store(url, scan.geometry, "counts", views_per_block, attrs=scan.attrs())
    air_all = np.empty((scan.geometry.number_of_views, 1, scan.geometry.detector_columns), dtype=np.float32)
    for index in range(store.number_of_blocks):
        views = store.block_views(index)
        p, air = read_views(scan, views)
        air_all[views.start:views.stop] = air
        store.write_block(index, (air.astype(np.float64) * np.exp(-p.astype(np.float64))).astype(np.float32))
        if progress:
            progress(len(views))
        if check:
            check()
    fs, root = store._fs()
    buffer = io.BytesIO()
    np.save(buffer, air_all, allow_pickle=False)
    fs.pipe_file(f"{root}/{AIR_FILE}", buffer.getvalue())
    store.finalise()
    return store


def air_counts_of(store: ProjectionStore) -> np.ndarray | None:
    """The flat field (views x 1 x columns) kept with a counts store converted from raw data, else None."""
    name = store.attrs.get("air_counts")
    if not name:
        return None
    fs, root = store._fs()
    with fs.open(f"{root}/{name}", "rb") as handle:
        air = np.load(io.BytesIO(handle.read()), allow_pickle=False)
    if air.shape != (store.shape[0], 1, store.shape[2]):
        raise InputError(f"{store.url}/{name} has the wrong shape {air.shape}", fix="convert the raw data again")
    return air.astype(np.float64)


# -- writing (test data and examples) ------------------------------------------------------------------

def write_dicom_ct_pd(folder: Path | str, line_integrals: np.ndarray, geometry: HelicalGeometry,
                      photons_per_column: np.ndarray | float, *, mu_water_per_mm: float = 0.0193,
                      ffs_mode: str | None = None, ffs_offsets: Sequence[tuple[float, float, float]] | None = None,
                      implicit_vr: bool = False, flip: bool = False) -> list[Path]:
    """Write ``line_integrals`` (views x rows x columns, in ``geometry``'s frame) as DICOM-CT-PD files,
    one per view, in the manual's layout (uint16 pixels with RescaleSlope/Intercept, Rows = detector
    columns). ``flip`` writes the same scan as a table moving towards -z (the frame turned 180 degrees
    about x). ``ffs_offsets`` (angular rad, axial mm, radial mm in the file's frame) cycle over the views;
    by default they are ``geometry.focal_spot_offsets`` (converted to the file's frame), and ``ffs_mode``
    is named after the components that move. For tests and examples: not a scanner's full header."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    g = geometry
    n_views, rows, columns = line_integrals.shape
    if (n_views, rows, columns) != (g.number_of_views, g.detector_rows, g.detector_columns):
        raise ValueError("line_integrals do not match the geometry")
    photons = np.broadcast_to(np.asarray(photons_per_column, dtype=np.float32), (columns,))
    low = min(float(line_integrals.min()), 0.0)
    slope = max(float(line_integrals.max()) - low, 1e-6) / 65000.0
    angles = g.view_angles_rad()
    z = g.source_z_mm()
    central_column = g.central_column_index
    if ffs_offsets is None:
        sign = -1.0 if flip else 1.0
        ffs_offsets = [(sign * o.angle_rad, sign * o.axial_mm, o.radial_mm) for o in g.focal_spot_offsets]
    if ffs_mode is None:
        shifts = np.abs(np.asarray(ffs_offsets, dtype=np.float64).reshape(-1, 3)).sum(axis=0)
        # a radial shift comes with either kind (the anode's slope), so only angle and z name the mode
        in_plane, axial = shifts[0] > 0, shifts[1] > 0
        ffs_mode = {(False, False): "FFSNONE", (False, True): "FFSZ", (True, False): "FFSXY",
                    (True, True): "FFSXYZ"}[(bool(in_plane), bool(axial))]
    if flip:
        angles, z, central_column = -angles, -z, (columns - 1) - central_column
    study, series = generate_uid(), generate_uid()
    now = datetime.datetime.now(datetime.UTC)
    paths = []
    for view in range(n_views):
        p = line_integrals[view]
        stats = photons
        if flip:
            p, stats = p[::-1, ::-1], stats[::-1]
        pixels = np.clip(np.rint((p.astype(np.float64) - low) / slope), 0, 65535).astype(np.uint16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.Manufacturer = "dosebench synthetic"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.ContentDate = now.strftime("%Y%m%d")
        ds.InstanceNumber = view + 1
        ds.Rows, ds.Columns = columns, rows  # the manual: Rows = detector columns
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{low:.10g}"
        ds.PixelData = np.ascontiguousarray(pixels.T).tobytes()
        for group in (0x7029, 0x7031, 0x7033, 0x7041):
            ds.add_new((group, 0x0010), "LO", PRIVATE_CREATOR)
        offset = (0.0, 0.0, 0.0) if not ffs_offsets else ffs_offsets[view % len(ffs_offsets)]
        values = [
            (ROWS, rows), (COLUMNS, columns),
            (TRANSVERSE_SPACING, g.column_width_at_isocenter_mm * g.magnification),
            (AXIAL_SPACING, g.row_height_at_isocenter_mm * g.magnification),
            (DETECTOR_SHAPE, "CYLINDRICAL" if g.detector_shape == "curved" else "FLAT"),
            (ANGULAR_POSITION, float(np.mod(angles[view], 2 * np.pi))), (AXIAL_POSITION, float(z[view])),
            (RADIAL_DISTANCE, g.source_to_isocenter_mm), (CONSTANT_RADIAL_DISTANCE, g.source_to_detector_mm),
            (CENTRAL_ELEMENT, [central_column + 1.0, g.central_row_index + 1.0]),
            (FFS_ANGULAR_SHIFT, offset[0]), (FFS_AXIAL_SHIFT, offset[1]), (FFS_RADIAL_SHIFT, offset[2]),
            (FFS_MODE, ffs_mode), (ANGULAR_STEPS, g.views_per_turn),
            (PHOTON_STATISTICS, [float(v) for v in stats]), (WATER_ATTENUATION, mu_water_per_mm),
        ]
        for (tag, vr), value in values:
            ds.add_new(tag, vr, value)
        path = folder / f"proj_{view + 1:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

"""CT volumes in and out: NIfTI and DICOM series, validated, in one canonical orientation.

Stages work on the volume's *canonical* array (axes pointing R, A, S as nibabel's
``as_closest_canonical`` gives them) so that axis 2 is always the patient's long axis, the scanner's z.
Outputs go back to the input's own orientation, so a reconstruction has exactly the input's shape and
affine. The scanner frame of an image-domain input is the canonical voxel grid centred on the volume
centre: ``x_mm = (i - (nx - 1) / 2) * dx`` and likewise for y and z.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from .errors import InputError

#: HU below this are air for every purpose (padding values such as -2048 or -3024 included)
AIR_HU = -1000.0


@dataclass(frozen=True)
class Volume:
    """A CT volume: HU in canonical orientation plus what is needed to write results back."""

    hu: np.ndarray  # float32 (nx, ny, nz), canonical RAS axes
    affine: np.ndarray  # canonical voxel -> world (RAS mm)
    source_affine: np.ndarray  # the input's own voxel -> world
    source_shape: tuple[int, int, int]
    source_name: str

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.hu.shape  # type: ignore[return-value]

    def scanner_coordinates_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x, y, z of the voxel centres along each canonical axis in the scanner frame."""
        return tuple(  # type: ignore[return-value]
            (np.arange(n) - (n - 1) / 2.0) * s for n, s in zip(self.shape, self.spacing_mm, strict=True)
        )

    def _to_canonical_transform(self) -> np.ndarray:
        return ornt_transform(io_orientation(self.source_affine), io_orientation(self.affine))

    def to_source_orientation(self, canonical: np.ndarray) -> np.ndarray:
        """Map an array on the canonical grid back onto the input's own grid."""
        back = ornt_transform(io_orientation(self.affine), io_orientation(self.source_affine))
        return apply_orientation(canonical, back)

    def canonical_from_source(self, source_array: np.ndarray) -> np.ndarray:
        return apply_orientation(source_array, self._to_canonical_transform())

    def save_nifti(self, canonical: np.ndarray, path: Path, dtype: type = np.int16) -> None:
        """Write ``canonical`` in the input's orientation with the input's affine (atomic)."""
        data = self.to_source_orientation(canonical)
        if np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            if data.size and (data.min() < info.min or data.max() > info.max):
                raise ValueError(f"values {data.min()}..{data.max()} do not fit {np.dtype(dtype).name}")
            if not np.issubdtype(data.dtype, np.integer):
                data = np.rint(data)
        image = nib.Nifti1Image(np.asarray(data, dtype=dtype), self.source_affine)
        image.set_qform(self.source_affine, code=1)
        image.set_sform(self.source_affine, code=1)
        write_atomic_nifti(image, path)


def write_atomic_nifti(image: nib.Nifti1Image, path: Path) -> None:
    """Write to a temporary name beside ``path`` and rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".nii.gz")
    os.close(fd)
    try:
        nib.save(image, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _validated(data: np.ndarray, affine: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.squeeze(data) if data.ndim > 3 else data
    if data.ndim != 3 or min(data.shape) < 2:
        raise InputError(f"{name} is not a 3D volume (shape {data.shape})",
                         fix="give a CT volume with at least 2 voxels along each of 3 axes")
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{name} has an invalid affine (voxel-to-world matrix)",
                         fix="repair the header (qform/sform) or re-export the volume")
    finite = np.isfinite(data)
    if not finite.all():
        bad = int((~finite).sum())
        raise InputError(f"{name} holds {bad} non-finite voxel values (NaN or inf) of {data.size}",
                         fix="re-export the volume; a CT in HU has finite values everywhere")
    return data, affine


def load_volume(path: Path | str, series_uid: str | None = None) -> Volume:
    """Load a CT volume in HU from NIfTI (``.nii``, ``.nii.gz``) or a DICOM series (folder or zip)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist", fix="check the path")
    name = path.name
    if path.is_dir() or path.suffix.lower() == ".zip":
        from .dicom import read_dicom_series

        data, affine = read_dicom_series(path, series_uid)
    elif name.lower().endswith((".nii", ".nii.gz")):
        try:
            image = nib.load(str(path))
            data = np.asarray(image.dataobj, dtype=np.float32)
            affine = np.asarray(image.affine, dtype=np.float64)
        except Exception as exc:  # nibabel raises many kinds for broken files
            raise InputError(f"{path} is not a readable NIfTI file ({type(exc).__name__}: {exc})",
                             fix="check that the file is complete and really NIfTI") from exc
    else:
        raise InputError(f"{path} is neither NIfTI (.nii, .nii.gz) nor a DICOM folder or zip",
                         fix="convert the volume to NIfTI or give the DICOM series' folder")
    data, affine = _validated(data, affine, name)
    ornt = io_orientation(affine)
    canonical = apply_orientation(data, ornt).astype(np.float32, copy=False)
    canonical_affine = affine @ inv_ornt_aff(ornt, data.shape)
    return Volume(hu=np.ascontiguousarray(canonical), affine=canonical_affine, source_affine=affine,
                  source_shape=tuple(int(s) for s in data.shape), source_name=name)  # type: ignore[arg-type]


def load_label_map(path: Path | str, like: Volume) -> np.ndarray:
    """A label map on ``like``'s grid, returned in canonical orientation."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"segmentation {path} does not exist", fix="check the path")
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
    except Exception as exc:
        raise InputError(f"{path} is not a readable NIfTI label map ({exc})", fix="give a NIfTI file") from exc
    if data.shape != like.source_shape or not np.allclose(image.affine, like.source_affine, atol=1e-3):
        raise InputError(f"segmentation {path.name} is not on the input's grid "
                         f"(shape {data.shape} vs {like.source_shape})",
                         fix="give a segmentation of this very volume (same shape and affine)")
    if not np.issubdtype(data.dtype, np.integer):
        rounded = np.rint(data)
        if not np.allclose(rounded, data):
            raise InputError(f"segmentation {path.name} holds non-integer labels", fix="give a label map")
        data = rounded
    return like.canonical_from_source(data.astype(np.int32))

"""Inputs end to end: a DICOM series runs like its NIfTI; a body outside the scan field is refused."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_dicom import write_series

from dosebench.core.errors import InputError
from dosebench.core.protocol import load_protocol
from dosebench.core.volume import Volume
from dosebench.simulator.synthesis import plan_scan


def test_dicom_series_runs_like_its_nifti(run_cli, cropped_ct: Path, tmp_path: Path):
    """The same CT as NIfTI and as a DICOM series gives the same reconstruction voxel for voxel."""
    image = nib.load(str(cropped_ct))
    series = tmp_path / "series"
    write_series(series, np.asarray(image.dataobj), image.affine)
    outputs = {}
    for name, source in (("nifti", cropped_ct), ("dicom", series)):
        out = tmp_path / name
        result = run_cli("run", "--input", str(source), "--doses", "0.5,1.0", "--protocol", "tiny",
                         "--seed", "3", "--out", str(out), "--quiet")
        assert result.returncode == 0, result.stderr
        outputs[name] = nib.load(str(out / "recon" / "dose-0.50.nii.gz"))
    assert np.allclose(outputs["dicom"].affine, outputs["nifti"].affine, atol=1e-4)
    assert np.array_equal(np.asarray(outputs["dicom"].dataobj), np.asarray(outputs["nifti"].dataobj))


def test_body_outside_the_scan_field_is_refused():
    # 200 x 200 voxels of 3 mm: corners reach 424 mm from the isocentre; the body fills it all
    hu = np.zeros((200, 200, 4), np.float32)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    volume = Volume(hu=hu, affine=affine, source_affine=affine, source_shape=hu.shape, source_name="wide")
    with pytest.raises(InputError, match="outside the protocol's 50[0-9] mm scan field"):
        plan_scan(volume, load_protocol("demo").scanner)
    # the same body inside the field plans fine
    hu[:] = -1000.0
    hu[50:150, 50:150] = 0.0
    plan_scan(volume, load_protocol("demo").scanner)

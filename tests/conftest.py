"""Shared fixtures: a small crop of the bundled CT and a runner for the real ``dosebench`` command."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dosebench.core.data import sample_ct

#: Voxel ranges of the crop (start, stop) per axis of the bundled 122 x 101 x 30 CT (3 mm voxels):
#: the whole body cross-section in-plane (the abdomen spans ~112 x 89 voxels, so a central 64 x 56
#: window would cut through it), 8 central slices. The offsets are non-zero, so the crop's origin
#: differs from the bundled CT's and outputs must carry the crop's own affine to pass.
CROP = ((1, 117), (3, 99), (11, 19))

#: Seconds one CLI call may take: numba compiles the kernels on first use (~15 s, cached after).
CLI_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def cropped_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 116 x 96 x 8 crop of the bundled CT (int16 HU, correct affine) as a NIfTI file."""
    source = nib.load(str(sample_ct()))
    data = np.asarray(source.dataobj)
    (i0, i1), (j0, j1), (k0, k1) = CROP
    crop = np.ascontiguousarray(data[i0:i1, j0:j1, k0:k1]).astype(np.int16)

    # The body (largest connected component above -300 HU) must lie inside the crop, not touch its sides.
    labels, n = ndimage.label(crop > -300)
    assert n >= 1
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    body = np.argwhere(labels == int(np.argmax(sizes)) + 1)
    assert body[:, :2].min() > 0 and np.all(body[:, :2].max(axis=0) < np.array(crop.shape[:2]) - 1), \
        "the crop cuts through the body"

    affine = np.array(source.affine, dtype=np.float64)
    affine[:, 3] = source.affine @ np.array([i0, j0, k0, 1.0])
    image = nib.Nifti1Image(crop, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path = tmp_path_factory.mktemp("input") / "ct_crop.nii.gz"
    nib.save(image, str(path))
    return path


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    # Plain, unwrapped text whatever the caller's terminal settings are.
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE"):
        env.pop(name, None)
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def run_cli(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_cli("run", "--input", ...)`` runs ``python -m dosebench.cli ...`` as a real subprocess
    (in a scratch working directory) and returns the CompletedProcess with text stdout/stderr."""
    workdir = tmp_path_factory.mktemp("cli-cwd")

    def run(*args: str | os.PathLike[str], timeout: float = CLI_TIMEOUT_S,
            executable: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        command = (executable or [sys.executable, "-m", "dosebench.cli"]) + [str(a) for a in args]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=workdir,
                              env=_cli_env(), check=False)

    return run

"""The bundled sample CT (see data/sample_ct/NOTICE.md for its source and licence)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def sample_ct_dir() -> Path:
    return Path(str(resources.files("dosebench.core") / "data" / "sample_ct"))


def sample_ct() -> Path:
    return sample_ct_dir() / "ct.nii.gz"


def sample_reference_segmentation(fast: bool = False) -> Path:
    name = "seg_totalsegmentator_fast.nii.gz" if fast else "seg_totalsegmentator.nii.gz"
    return sample_ct_dir() / name

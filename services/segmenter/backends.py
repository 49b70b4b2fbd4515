"""Segmenter backends, chosen by a spec string.

Specs: ``threshold`` (the baseline, no model), ``totalsegmentator`` (TotalSegmentator's five 1.5 mm part
models) and ``totalsegmentator:fast`` (its 3 mm model); see :mod:`dosebench.segmenter.totalseg`;
``nnunet:/path/to/model_folder[?fold=0&checkpoint=checkpoint_final.pth&tta=0]`` (any nnU-Net v2 trained-model
folder); see :mod:`dosebench.segmenter.nnunet`.

A backend's ``segment(hu, spacing_mm, affine=None)`` takes the HU array in canonical (RAS) orientation,
its voxel spacing and, optionally, its voxel-to-world affine (``Volume.affine``), and returns a
:class:`~dosebench.segmenter.labels.Segmentation` on the same grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..core.errors import InputError
from .labels import Segmentation
from .threshold import threshold_segment


@dataclass(frozen=True)
class Segmenter:
    spec: str
    segment: Callable[..., Segmentation]  # (hu, spacing_mm, affine=None) -> Segmentation
    provenance: dict = field(default_factory=dict)


def _threshold(hu: np.ndarray, spacing_mm: tuple[float, float, float], affine: np.ndarray | None = None,
               should_cancel: object = None) -> Segmentation:
    return threshold_segment(hu, spacing_mm)  # well under a second: no cancel point needed


#: every spec make_segmenter knows
KNOWN_SPECS = ("threshold", "totalsegmentator", "totalsegmentator:fast")
#: the nnU-Net backend's spec form (a prefix and a model folder; not a fixed spec, so not in KNOWN_SPECS)
NNUNET_SPEC = "nnunet:/path/to/model_folder[?fold=0&checkpoint=checkpoint_final.pth&tta=0]"


def make_segmenter(spec: str) -> Segmenter:
    """The backend for ``spec``; an unknown spec is an :class:`InputError` naming the known ones."""
    name = spec.strip().lower()
    if name.startswith("nnunet:"):  # the model folder's path keeps its case
        from .nnunet import make_nnunet

        return make_nnunet(spec)
    if name == "threshold":
        from . import threshold

        return Segmenter(spec="threshold", segment=_threshold,
                         provenance={"backend": "threshold", "module": threshold.__name__,
                                     "thresholds_hu": {
                                         "body_above": threshold.BODY_THRESHOLD_HU,
                                         "lung_below": threshold.LUNG_MAX_HU,
                                         "fat_from": threshold.FAT_MIN_HU,
                                         "soft_tissue_from": threshold.SOFT_TISSUE_MIN_HU,
                                         "bone_from": threshold.BONE_MIN_HU},
                                     "min_component_ml": threshold.MIN_COMPONENT_ML})
    if name in ("totalsegmentator", "totalsegmentator:fast"):
        from .totalseg import make_totalsegmentator

        return make_totalsegmentator(name)
    raise InputError(f"unknown segmenter {spec!r}", fix=f"use one of: {', '.join((*KNOWN_SPECS, NNUNET_SPEC))}")

"""Segmenter backends, chosen by a spec string (``threshold``; more backends register here)."""

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
    segment: Callable[[np.ndarray, tuple[float, float, float]], Segmentation]
    provenance: dict = field(default_factory=dict)


def make_segmenter(spec: str) -> Segmenter:
    """The backend for ``spec``; an unknown spec is an :class:`InputError` naming the known ones."""
    name = spec.strip().lower()
    if name == "threshold":
        from . import threshold

        return Segmenter(spec="threshold", segment=threshold_segment,
                         provenance={"backend": "threshold", "module": threshold.__name__,
                                     "thresholds_hu": {
                                         "body_above": threshold.BODY_THRESHOLD_HU,
                                         "lung_below": threshold.LUNG_MAX_HU,
                                         "fat_from": threshold.FAT_MIN_HU,
                                         "soft_tissue_from": threshold.SOFT_TISSUE_MIN_HU,
                                         "bone_from": threshold.BONE_MIN_HU},
                                     "min_component_ml": threshold.MIN_COMPONENT_ML})
    raise InputError(f"unknown segmenter {spec!r}",
                     fix="use 'threshold' (this version's only built-in backend)")

"""Segmenter backends, chosen by a spec string.

Specs: ``threshold`` (the baseline, no model; ``threshold?min_component_ml=0`` turns its small-component
clean-up off, see :func:`parse_threshold_spec`), ``totalsegmentator`` (TotalSegmentator's five 1.5 mm part
models) and ``totalsegmentator:fast`` (its 3 mm model); see :mod:`dosebench.segmenter.totalseg`;
``nnunet:/path/to/model_folder[?fold=0&checkpoint=checkpoint_final.pth&tta=0]`` (any nnU-Net v2 trained-model
folder); see :mod:`dosebench.segmenter.nnunet`.

A backend's ``segment(hu, spacing_mm, affine=None)`` takes the HU array in canonical (RAS) orientation,
its voxel spacing and, optionally, its voxel-to-world affine (``Volume.affine``), and returns a
:class:`~dosebench.segmenter.labels.Segmentation` on the same grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from urllib.parse import parse_qsl

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
               should_cancel: object = None, *, min_component_ml: float) -> Segmentation:
    # well under a second: no cancel point needed
    return threshold_segment(hu, spacing_mm, min_component_ml=min_component_ml)


#: the options ``threshold?...`` accepts
THRESHOLD_OPTIONS = ("min_component_ml",)


def parse_threshold_spec(spec: str) -> dict[str, float] | None:
    """The options of a threshold spec, or None if ``spec`` is not one.

    Parameters
    ----------
    spec : str
        ``threshold`` or ``threshold?min_component_ml=X`` (X in ml, >= 0; 0: no small-component clean-up).

    Returns
    -------
    dict or None
        ``{"min_component_ml": X}`` (the default size when not given); None for another backend's spec.

    Raises
    ------
    InputError
        An unknown option, a repeated one, or a value that is not a size >= 0.
    """
    from .threshold import MIN_COMPONENT_ML

    name, _, query = spec.strip().partition("?")
    if name.lower() != "threshold":
        return None
    options = {"min_component_ml": MIN_COMPONENT_ML}
    seen: set[str] = set()
    for key, raw in parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)) if query else []:
        if key not in THRESHOLD_OPTIONS or key in seen:
            raise InputError(f"threshold option {key!r} is unknown or repeated in {spec!r}",
                             fix=f"use threshold?{THRESHOLD_OPTIONS[0]}=0.5 (options: {', '.join(THRESHOLD_OPTIONS)})")
        seen.add(key)
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if not (math.isfinite(value) and value >= 0):
            raise InputError(f"threshold option {key}={raw!r} is not a size >= 0 (ml)",
                             fix="e.g. threshold?min_component_ml=0 (0: keep every speck)")
        options[key] = value
    return options


#: every spec make_segmenter knows
KNOWN_SPECS = ("threshold", "totalsegmentator", "totalsegmentator:fast")
#: the nnU-Net backend's spec form (a prefix and a model folder; not a fixed spec, so not in KNOWN_SPECS)
NNUNET_SPEC = "nnunet:/path/to/model_folder[?fold=0&checkpoint=checkpoint_final.pth&tta=0]"


def normalise_spec(spec: str) -> str:
    """The normalised segmenter spec, checked without loading a model (the API and beat have none).

    ``threshold[?min_component_ml=X]``, ``totalsegmentator``, ``totalsegmentator:fast`` or
    ``nnunet:<folder>[?...]`` (the folder is checked where the model runs); anything else is an
    :class:`InputError` naming them.
    """
    text = spec.strip()
    if parse_threshold_spec(text) is not None:
        query = text.partition("?")[2]
        return "threshold" + (f"?{query}" if query else "")
    if text.lower() in KNOWN_SPECS:
        return text.lower()
    if text.lower().startswith("nnunet:") and len(text) > len("nnunet:"):
        from .nnunet import parse_spec

        parse_spec(text)  # the syntax and the models root; the folder's files are checked where it runs
        return text
    raise InputError(f"unknown segmenter {spec!r}",
                     fix=f"use one of: {', '.join((*KNOWN_SPECS, 'threshold?min_component_ml=0', NNUNET_SPEC))}")


def make_segmenter(spec: str) -> Segmenter:
    """The backend for ``spec``; an unknown spec is an :class:`InputError` naming the known ones."""
    name = spec.strip().lower()
    if name.startswith("nnunet:"):  # the model folder's path keeps its case
        from .nnunet import make_nnunet

        return make_nnunet(spec)
    threshold_options = parse_threshold_spec(spec)
    if threshold_options is not None:
        from . import threshold

        size_ml = threshold_options["min_component_ml"]
        query = spec.strip().partition("?")[2]
        return Segmenter(spec="threshold" + (f"?{query}" if query else ""), segment=partial(_threshold, min_component_ml=size_ml),
                         provenance={"backend": "threshold", "module": threshold.__name__,
                                     "thresholds_hu": {
                                         "body_above": threshold.BODY_THRESHOLD_HU,
                                         "lung_below": threshold.LUNG_MAX_HU,
                                         "fat_from": threshold.FAT_MIN_HU,
                                         "soft_tissue_from": threshold.SOFT_TISSUE_MIN_HU,
                                         "bone_from": threshold.BONE_MIN_HU},
                                     "min_component_ml": size_ml,
                                     "small_component_cleanup": size_ml > 0})
    if name in ("totalsegmentator", "totalsegmentator:fast"):
        from .totalseg import make_totalsegmentator

        return make_totalsegmentator(name)
    raise InputError(f"unknown segmenter {spec!r}", fix=f"use one of: {', '.join((*KNOWN_SPECS, NNUNET_SPEC))}")

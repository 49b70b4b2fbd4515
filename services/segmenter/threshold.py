"""The threshold baseline segmenter: five tissue classes from HU alone, no model, no download.

It exists so that the whole pipeline (simulate -> reconstruct -> segment -> compare) runs anywhere,
and as a floor to compare learned segmenters against: a threshold classifier reacts to noise voxel by
voxel, so its Dice drop with dose shows how much of a model's robustness is more than denoising.

Classes (all in group ``tissue``), decided per voxel inside the body mask by half-open HU intervals
that tile the axis without gaps::

    lung         HU < -400            (air inside the body: lungs, bowel gas)
    body        -400 <= HU < -200     (partial-volume air/tissue; also the class small specks fall back to)
    fat         -200 <= HU < -30
    soft_tissue  -30 <= HU < 200
    bone               HU >= 200

Body mask: HU > -500, the largest 3D connected component, holes filled slice by slice (axial slices,
axis 2), a binary closing with a small ball, and the slice-wise hole filling again (the closing can seal
a gap that kept a cavity open). Clean-up: every connected component of lung, fat, soft tissue or bone
smaller than :data:`MIN_COMPONENT_ML` becomes ``body`` (the spec ``threshold?min_component_ml=X`` sets
another size; 0 keeps every speck, a deliberately noisier baseline).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from dosebench.core.errors import InputError
from dosebench.segmenter.labels import LabelInfo, Segmentation

__all__ = [
    "BODY",
    "BODY_CLOSING_RADIUS_MM",
    "BODY_THRESHOLD_HU",
    "BONE",
    "BONE_MIN_HU",
    "FAT",
    "FAT_MIN_HU",
    "LUNG",
    "LUNG_MAX_HU",
    "MIN_COMPONENT_ML",
    "SOFT_TISSUE",
    "SOFT_TISSUE_MIN_HU",
    "THRESHOLD_TABLE",
    "threshold_segment",
]

#: Label ids of the threshold segmenter.
BODY, LUNG, FAT, SOFT_TISSUE, BONE = 1, 2, 3, 4, 5

#: The label table every threshold segmentation carries.
THRESHOLD_TABLE: dict[int, LabelInfo] = {
    BODY: LabelInfo(BODY, "body", "tissue"),
    LUNG: LabelInfo(LUNG, "lung", "tissue"),
    FAT: LabelInfo(FAT, "fat", "tissue"),
    SOFT_TISSUE: LabelInfo(SOFT_TISSUE, "soft_tissue", "tissue"),
    BONE: LabelInfo(BONE, "bone", "tissue"),
}

#: Voxels strictly above this (HU) seed the body mask; halfway between air (-1000) and lung
#: parenchyma would be too low (lung would merge with the air outside), so take the skin/air edge.
BODY_THRESHOLD_HU = -500.0
#: Inside the body, HU below this is air: lung parenchyma (about -850) and bowel gas.
LUNG_MAX_HU = -400.0
#: Fat starts here (fat is about -100; [-400, -200) is partial volume and stays ``body``).
FAT_MIN_HU = -200.0
#: Soft tissue starts here (water 0, muscle and organs about 30..70, contrast-enhanced vessels < 200).
SOFT_TISSUE_MIN_HU = -30.0
#: Bone starts here (cancellous bone about 200..400, cortical bone 700 and above).
BONE_MIN_HU = 200.0

#: Connected components of a tissue class smaller than this (ml) are reassigned to ``body``:
#: at 3 mm voxels 0.5 ml is 19 voxels, at 1 mm 500 voxels, so isolated noise specks go.
MIN_COMPONENT_ML = 0.5
#: Radius (mm) of the ball the body mask is closed with: seals skin folds and thin gaps; at least
#: one voxel along every axis.
BODY_CLOSING_RADIUS_MM = 3.0

# Class of each HU interval, indexed by how many of the ascending thresholds a voxel reaches.
_THRESHOLDS_HU = (LUNG_MAX_HU, FAT_MIN_HU, SOFT_TISSUE_MIN_HU, BONE_MIN_HU)
_CLASS_OF_INTERVAL = np.array([LUNG, BODY, FAT, SOFT_TISSUE, BONE], dtype=np.uint8)

# Face connectivity for the body keeps a couch that only touches the skin diagonally apart;
# full connectivity for tissue classes keeps thin oblique structures (ribs, vessels) in one piece.
_BODY_CONNECTIVITY = ndimage.generate_binary_structure(3, 1)
_TISSUE_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)
# In-plane (axis 0, 1) neighbours only: hole filling with it treats each axial slice on its own.
_SLICE_CONNECTIVITY = np.zeros((3, 3, 3), dtype=bool)
_SLICE_CONNECTIVITY[:, :, 1] = ndimage.generate_binary_structure(2, 1)


def threshold_segment(hu: np.ndarray, spacing_mm: tuple[float, float, float],
                      min_component_ml: float = MIN_COMPONENT_ML) -> Segmentation:
    """Segment a CT volume into body, lung, fat, soft tissue and bone by HU thresholds.

    Parameters
    ----------
    hu : numpy.ndarray
        3D CT volume in HU (float32; other real dtypes are converted), axis 2 = axial slice index.
    spacing_mm : tuple[float, float, float]
        Voxel size along the three axes (mm).
    min_component_ml : float
        Tissue components smaller than this (ml) become ``body``; 0 turns the clean-up off, so
        isolated noise specks keep their class (the spec ``threshold?min_component_ml=0``).

    Returns
    -------
    Segmentation
        ``uint8`` label map of ``hu``'s shape (0 outside the body) and :data:`THRESHOLD_TABLE`.

    Raises
    ------
    InputError
        If ``hu`` is not a finite 3D array, ``spacing_mm`` is not three positive numbers, or
        ``min_component_ml`` is negative or not finite.

    Notes
    -----
    Deterministic: no random draws, and ties between equally large body components go to the one
    with the lowest component index (scan order).
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise InputError(f"threshold_segment needs a 3D volume, got shape {hu.shape}", fix="pass one volume")
    if hu.dtype.kind not in "fiu":
        raise InputError(f"HU volume has dtype {hu.dtype}", fix="pass a real-valued array in HU")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"bad voxel spacing {spacing_mm!r}", fix="give three positive sizes in mm")
    if not (math.isfinite(min_component_ml) and min_component_ml >= 0):
        raise InputError(f"min_component_ml {min_component_ml!r} is not a size", fix="give a size >= 0 in ml")
    hu = hu.astype(np.float32, copy=False)
    if not np.isfinite(hu).all():
        raise InputError("HU volume contains NaN or infinite values", fix="replace them before segmenting")

    body = _body_mask(hu, spacing)

    # Count the thresholds each voxel reaches (0..4) in uint8: avoids an int64 np.digitize result.
    interval = np.zeros(hu.shape, dtype=np.uint8)
    for threshold in _THRESHOLDS_HU:
        interval += hu >= threshold
    labels = _CLASS_OF_INTERVAL[interval]
    labels[~body] = 0

    if min_component_ml > 0:
        _reassign_small_components(labels, spacing, min_component_ml)
    return Segmentation(labels=labels, table=dict(THRESHOLD_TABLE))


def _body_mask(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The patient's body: largest component above :data:`BODY_THRESHOLD_HU`, filled and closed."""
    seed = hu > BODY_THRESHOLD_HU
    components, count = ndimage.label(seed, structure=_BODY_CONNECTIVITY)
    if count == 0:
        return seed  # nothing but air
    sizes = np.bincount(components.ravel())
    sizes[0] = 0  # background is not a candidate
    body = components == int(np.argmax(sizes))

    body = ndimage.binary_fill_holes(body, structure=_SLICE_CONNECTIVITY)
    # Pad by replicating edges so the erosion half of the closing does not eat a body that continues
    # past the volume's border (scipy's border_value=0 would treat outside as air).
    ball = _ellipsoid(BODY_CLOSING_RADIUS_MM, spacing)
    pad = [(r, r) for r in (n // 2 for n in ball.shape)]
    closed = ndimage.binary_closing(np.pad(body, pad, mode="edge"), structure=ball)
    body = closed[tuple(slice(p, p + n) for (p, _), n in zip(pad, body.shape, strict=True))]
    return ndimage.binary_fill_holes(body, structure=_SLICE_CONNECTIVITY)


def _ellipsoid(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Boolean structuring element approximating a ball of ``radius_mm`` on an anisotropic grid."""
    half = [max(1, int(radius_mm / s)) for s in spacing]  # at least one voxel along every axis
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    # Normalise by the half-width actually used so a radius below one voxel still gives a cross.
    return sum((g / h) ** 2 for g, h in zip(grids, half, strict=True)) <= 1.0


def _reassign_small_components(labels: np.ndarray, spacing: tuple[float, float, float],
                               min_component_ml: float = MIN_COMPONENT_ML) -> None:
    """Set tissue components smaller than ``min_component_ml`` to ``body``, in place."""
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    min_voxels = math.ceil(min_component_ml / voxel_ml - 1e-9)  # tolerance: 0.5 ml of 0.125 ml voxels is 4
    # Each class's components come from the map before any reassignment, and reassignment only
    # ever writes ``body``, so the order of the classes does not matter.
    small = np.zeros(labels.shape, dtype=bool)
    for tissue in (LUNG, FAT, SOFT_TISSUE, BONE):
        components, count = ndimage.label(labels == tissue, structure=_TISSUE_CONNECTIVITY)
        if count == 0:
            continue
        too_small = np.bincount(components.ravel()) < min_voxels
        too_small[0] = False  # the rest of the volume
        small |= too_small[components]
    labels[small] = BODY

"""Agreement between segmentations, and the cohort summary of the seed paper's Table 1.

Conventions (ARCHITECTURE, "Metrics conventions"):

- Dice per label between a test (low-dose) and a reference (full-dose) label map; a label absent from
  both is left out, a label present in exactly one scores 0.
- A study's score for a group (a TotalSegmentator part, or ``all`` labels) is the mean Dice over its
  labels; the cohort figure per group and dose is the median ± MAD over studies (MAD unscaled unless
  asked for the scaled, normal-consistent one).
- Surface metrics (optional, from the real voxel spacing): surface Dice at a tolerance (normalised
  surface distance, Nikolov et al. 2021) and HD95 over the pooled distances of both surfaces; see
  :func:`surface_metrics`.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from dosebench.segmenter.labels import LabelInfo

__all__ = [
    "ALL_GROUP",
    "MAD_NORMAL_SCALE",
    "SURFACE_TOLERANCE_MM",
    "aggregate",
    "dice",
    "dose_key",
    "format_table1",
    "format_table1_csv",
    "median_mad",
    "per_label_metrics",
    "surface_metrics",
]

#: Name of the pseudo-group that pools every label of a study.
ALL_GROUP = "all"
#: Factor making the MAD a consistent estimator of a normal distribution's standard deviation.
MAD_NORMAL_SCALE = 1.4826
#: Default tolerance of the surface Dice (mm).
SURFACE_TOLERANCE_MM = 2.0


def dice(test: np.ndarray, reference: np.ndarray) -> float:
    """Dice coefficient ``2 |T ∩ R| / (|T| + |R|)`` of two boolean masks.

    Parameters
    ----------
    test, reference : numpy.ndarray
        Boolean masks of the same shape (non-boolean arrays are read as ``!= 0``).

    Returns
    -------
    float
        In [0, 1].

    Raises
    ------
    ValueError
        If the shapes differ, or both masks are empty (Dice is undefined; callers leave such labels out).
    """
    test = np.asarray(test, dtype=bool)
    reference = np.asarray(reference, dtype=bool)
    if test.shape != reference.shape:
        raise ValueError(f"mask shapes differ: {test.shape} vs {reference.shape}")
    total = int(np.count_nonzero(test)) + int(np.count_nonzero(reference))
    if total == 0:
        raise ValueError("Dice is undefined for two empty masks; leave the label out")
    return 2.0 * int(np.count_nonzero(test & reference)) / total


# --- surface metrics --------------------------------------------------------------------------------
#
# Written here on scipy rather than taken from a library: DeepMind's ``surface-distance`` (the reference
# implementation of Nikolov et al.) is not published on PyPI, MONAI's ``compute_surface_dice`` /
# ``compute_hausdorff_distance`` would make torch and MONAI runtime dependencies of the metrics for two
# functions, and medpy has HD95 but no surface Dice. The whole computation is a boundary extraction and
# two Euclidean distance transforms with the voxel spacing, restricted to the labels' bounding box.


def _validate_spacing(spacing_mm: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != ndim:
        raise ValueError(f"spacing_mm has {len(spacing)} values for a {ndim}-D mask")
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_mm must be positive, got {spacing}")
    return spacing


def _validate_tolerance(tolerance_mm: float) -> float:
    tolerance = float(tolerance_mm)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance_mm must be finite and >= 0, got {tolerance_mm}")
    return tolerance


def _padded_box(slices: Sequence[slice], shape: Sequence[int], pad: int = 1) -> tuple[slice, ...]:
    """``slices`` grown by ``pad`` voxels on each side, clipped to the array."""
    return tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(slices, shape, strict=True))


def _union_box(a: Sequence[slice] | None, b: Sequence[slice] | None) -> tuple[slice, ...]:
    if a is None or b is None:
        found = a if b is None else b
        assert found is not None
        return tuple(found)
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b, strict=True))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Tight bounding box of a boolean mask's non-zero voxels (``None`` if empty)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels: the mask minus its erosion by the 6-connected (face-neighbour) structuring
    element. Outside the array counts as background, so mask voxels on the array's edge are boundary."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _surface_metrics_in_box(test: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...],
                            tolerance: float) -> tuple[float, float]:
    """Surface Dice and HD95 of two non-empty boolean masks already cropped to their padded box."""
    test_surface = _surface(test)
    reference_surface = _surface(reference)
    # Distance (mm) from every voxel to the nearest surface voxel of the other mask; every surface
    # voxel lies inside the box, so cropping does not change these distances.
    to_reference = ndimage.distance_transform_edt(~reference_surface, sampling=spacing)
    to_test = ndimage.distance_transform_edt(~test_surface, sampling=spacing)
    test_to_reference = to_reference[test_surface]
    reference_to_test = to_test[reference_surface]
    n_points = test_to_reference.size + reference_to_test.size
    within = int(np.count_nonzero(test_to_reference <= tolerance)) + \
        int(np.count_nonzero(reference_to_test <= tolerance))
    pooled = np.concatenate([test_to_reference, reference_to_test])
    return within / n_points, float(np.percentile(pooled, 95))


def surface_metrics(
    test_mask: np.ndarray,
    reference_mask: np.ndarray,
    spacing_mm: Sequence[float],
    tolerance_mm: float = SURFACE_TOLERANCE_MM,
) -> tuple[float, float]:
    """Surface Dice at ``tolerance_mm`` and the 95th-percentile Hausdorff distance (HD95) of two masks.

    Parameters
    ----------
    test_mask, reference_mask : numpy.ndarray
        Boolean masks of the same shape (non-boolean arrays are read as ``!= 0``).
    spacing_mm : Sequence[float]
        Voxel size along each array axis (mm); distances are measured in mm with it, so anisotropic
        voxels are handled exactly.
    tolerance_mm : float
        Surface Dice tolerance tau (mm); a surface point counts when its distance is ``<= tau``.

    Returns
    -------
    tuple[float, float]
        ``(surface_dice, hd95_mm)``. If exactly one mask is empty: ``(0.0, inf)`` (there is no surface
        to be near; the CSV writes ``inf``).

    Raises
    ------
    ValueError
        If the shapes differ, the spacing or tolerance is invalid, or both masks are empty (the metrics
        are undefined; callers leave such labels out, as for Dice).

    Notes
    -----
    Conventions:

    - Surface points are boundary voxels: the mask minus its 6-connected erosion (voxel centres, the
      array's outside counted as background).
    - Distances: for every surface point of one mask, the Euclidean distance (mm, with ``spacing_mm``)
      to the nearest surface point of the other mask, by ``scipy.ndimage.distance_transform_edt`` on the
      complement of the other surface, computed only inside the masks' joint bounding box (padded by one
      voxel), which holds every surface point and so gives the same distances as the full array.
    - Surface Dice (normalised surface distance, Nikolov et al. 2021): the number of surface points of
      *both* masks within ``tolerance_mm`` of the other surface, divided by the number of surface points
      of both. Points are counted unweighted (each boundary voxel is one point), not weighted by
      surface-element area as in DeepMind's ``surface-distance``.
    - HD95: the 95th percentile (numpy's default linear interpolation) of the *pooled* distances of
      both directions (test->reference and reference->test together), as in medpy's ``hd95``; not the
      maximum of the two directed 95th percentiles.

    Identical masks give ``(1.0, 0.0)``.
    """
    test = np.asarray(test_mask, dtype=bool)
    reference = np.asarray(reference_mask, dtype=bool)
    if test.shape != reference.shape:
        raise ValueError(f"mask shapes differ: {test.shape} vs {reference.shape}")
    spacing = _validate_spacing(spacing_mm, test.ndim)
    tolerance = _validate_tolerance(tolerance_mm)
    test_box = _bounding_box(test)
    reference_box = _bounding_box(reference)
    if test_box is None and reference_box is None:
        raise ValueError("surface metrics are undefined for two empty masks; leave the label out")
    if test_box is None or reference_box is None:
        return 0.0, math.inf
    box = _padded_box(_union_box(test_box, reference_box), test.shape)
    return _surface_metrics_in_box(test[box], reference[box], spacing, tolerance)


def _label_counts(labels: np.ndarray, minlength: int) -> np.ndarray:
    """Voxel count per label value (index = label id)."""
    return np.bincount(labels.ravel(), minlength=minlength)


def per_label_metrics(
    test_labels: np.ndarray,
    reference_labels: np.ndarray,
    table: Mapping[int, LabelInfo],
    voxel_volume_ml: float,
    spacing_mm: Sequence[float] | None = None,
    tolerance_mm: float = SURFACE_TOLERANCE_MM,
) -> list[dict[str, Any]]:
    """Dice and volume change (and, given the spacing, surface metrics) for every label of ``table``
    present in either map.

    Parameters
    ----------
    test_labels, reference_labels : numpy.ndarray
        Non-negative integer label maps of the same shape (0 = background).
    table : Mapping[int, LabelInfo]
        The labels to report; map values not in the table (and background 0) are ignored.
    voxel_volume_ml : float
        Volume of one voxel (ml), e.g. ``prod(spacing_mm) / 1000``.
    spacing_mm : Sequence[float], optional
        Voxel size along each array axis (mm). When given, every row also carries ``surface_dice`` (at
        ``tolerance_mm``) and ``hd95_mm`` (see :func:`surface_metrics`); a label present in only one map
        has ``0.0`` and ``inf``.
    tolerance_mm : float
        Surface Dice tolerance (mm); used only with ``spacing_mm``.

    Returns
    -------
    list[dict]
        One row per label id in ``table`` and in at least one map, ordered by id, with keys
        ``label_id``, ``label``, ``group``, ``dice``, ``reference_voxels``, ``test_voxels`` and
        ``volume_change_ml`` (test minus reference volume). A label present in only one map has Dice 0.

    Notes
    -----
    Three ``bincount`` passes over the volume serve every label at once: the counts per label in each
    map, and the intersection counts as the counts of the reference where both maps agree. Surface
    metrics work per label inside that label's bounding box in either map (``find_objects``).
    """
    test = np.asarray(test_labels)
    reference = np.asarray(reference_labels)
    if test.shape != reference.shape:
        raise ValueError(f"label map shapes differ: {test.shape} vs {reference.shape}")
    for name, arr in (("test", test), ("reference", reference)):
        if arr.dtype.kind not in "iu":
            raise ValueError(f"{name} label map must have an integer dtype, got {arr.dtype}")
        if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
            raise ValueError(f"{name} label map has negative values")
    if not (math.isfinite(voxel_volume_ml) and voxel_volume_ml > 0):
        raise ValueError(f"voxel_volume_ml must be positive, got {voxel_volume_ml}")
    spacing = None
    if spacing_mm is not None:
        spacing = _validate_spacing(spacing_mm, test.ndim)
        tolerance = _validate_tolerance(tolerance_mm)

    size = 1 + max(int(test.max(initial=0)), int(reference.max(initial=0)), max(table, default=0))
    test_counts = _label_counts(test, size)
    reference_counts = _label_counts(reference, size)
    agree = test == reference
    intersection_counts = _label_counts(reference[agree], size)
    if spacing is not None:
        # Bounding boxes of every label value in each map, one pass each (index = label id - 1).
        test_boxes = ndimage.find_objects(test, max_label=size - 1) if test.size else []
        reference_boxes = ndimage.find_objects(reference, max_label=size - 1) if reference.size else []

    rows: list[dict[str, Any]] = []
    for label_id in sorted(table):
        if label_id <= 0:
            continue  # background is never scored
        n_test = int(test_counts[label_id])
        n_reference = int(reference_counts[label_id])
        if n_test + n_reference == 0:
            continue  # absent from both: Dice undefined, left out by convention
        info = table[label_id]
        row: dict[str, Any] = {
            "label_id": int(label_id),
            "label": info.name,
            "group": info.group,
            "dice": 2.0 * int(intersection_counts[label_id]) / (n_test + n_reference),
            "reference_voxels": n_reference,
            "test_voxels": n_test,
            "volume_change_ml": (n_test - n_reference) * float(voxel_volume_ml),
        }
        if spacing is not None:
            if n_test == 0 or n_reference == 0:
                row["surface_dice"], row["hd95_mm"] = 0.0, math.inf
            else:
                box = _padded_box(_union_box(test_boxes[label_id - 1], reference_boxes[label_id - 1]),
                                  test.shape)
                row["surface_dice"], row["hd95_mm"] = _surface_metrics_in_box(
                    test[box] == label_id, reference[box] == label_id, spacing, tolerance)
        rows.append(row)
    return rows


def median_mad(values: Iterable[float], scaled: bool = False) -> tuple[float, float]:
    """Median and median absolute deviation of ``values``.

    Parameters
    ----------
    values : Iterable[float]
        At least one finite number.
    scaled : bool
        Multiply the MAD by :data:`MAD_NORMAL_SCALE` (1.4826) so it estimates a normal standard deviation.

    Returns
    -------
    tuple[float, float]
        ``(median, mad)``; with an even count the median is the mean of the two middle values.

    Raises
    ------
    ValueError
        If ``values`` is empty or holds NaN or infinity.
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("median_mad needs at least one value")
    if not np.isfinite(x).all():
        raise ValueError("median_mad got NaN or infinite values")
    median = float(np.median(x))
    mad = float(np.median(np.abs(x - median)))
    return median, mad * MAD_NORMAL_SCALE if scaled else mad


def dose_key(dose: float) -> str:
    """The summary key of a dose fraction: two decimals, e.g. ``0.20``."""
    return f"{float(dose):.2f}"


def aggregate(rows: Iterable[Mapping[str, Any]], *, scaled: bool = False) -> dict[str, dict[str, dict]]:
    """Cohort summary per group and dose: median ± MAD over studies of each study's mean Dice.

    Parameters
    ----------
    rows : Iterable[Mapping]
        Per-label rows carrying at least ``study``, ``dose`` (fraction), ``group`` and ``dice``.
    scaled : bool
        Report the scaled MAD (see :func:`median_mad`).

    Returns
    -------
    dict
        ``{group: {"0.20": {"median": m, "mad": d, "n": studies}, ...}, ..., "all": {...}}``; groups
        sorted with ``all`` last, doses ascending. ``all`` pools every label of a study, so a study's
        ``all`` score is the mean over labels, not over groups.

    Raises
    ------
    ValueError
        If a row's group is named ``all`` (it would mix with the pooled group) or its Dice is not finite.
    """
    # (group, dose key) -> study -> Dice values of that study's labels
    per_study: dict[tuple[str, str], dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    doses: dict[str, float] = {}
    for row in rows:
        group = str(row["group"])
        if group == ALL_GROUP:
            raise ValueError(f"group name {ALL_GROUP!r} is reserved for the pooled summary")
        value = float(row["dice"])
        if not math.isfinite(value):
            raise ValueError(f"non-finite Dice in row {dict(row)!r}")
        key = dose_key(row["dose"])
        doses.setdefault(key, float(row["dose"]))
        per_study[(group, key)][row["study"]].append(value)
        per_study[(ALL_GROUP, key)][row["study"]].append(value)

    groups = sorted({g for g, _ in per_study} - {ALL_GROUP})
    if per_study:
        groups.append(ALL_GROUP)
    ordered_doses = sorted(doses, key=doses.__getitem__)
    summary: dict[str, dict[str, dict]] = {}
    for group in groups:
        summary[group] = {}
        for key in ordered_doses:
            studies = per_study.get((group, key))
            if not studies:
                continue
            # Sort by study for a reproducible order; the median does not depend on it.
            scores = [float(np.mean(studies[s])) for s in sorted(studies, key=str)]
            median, mad = median_mad(scores, scaled=scaled)
            summary[group][key] = {"median": median, "mad": mad, "n": len(scores)}
    return summary


def _dose_header(dose: float) -> str:
    """Column header of a dose fraction, e.g. ``20 %`` (``12.5 %`` where needed)."""
    return f"{round(float(dose) * 100.0, 1):g} %"


def _ordered_groups(summary: Mapping[str, Any]) -> list[str]:
    groups = sorted(g for g in summary if g != ALL_GROUP)
    return groups + [ALL_GROUP] if ALL_GROUP in summary else groups


def _n_cell(cells: list[Mapping[str, Any]]) -> str:
    """Number of studies: one figure, or a range where doses differ (a study failed at some dose)."""
    counts = sorted({int(c["n"]) for c in cells})
    if not counts:
        return "0"
    return str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"


def format_table1(
    summary: Mapping[str, Mapping[str, Mapping[str, Any]]], doses: Sequence[float], title: str
) -> str:
    """Markdown table in the seed paper's Table 1 layout.

    Parameters
    ----------
    summary : Mapping
        :func:`aggregate`'s output.
    doses : Sequence[float]
        Dose fractions to show, one column each, in the given order.
    title : str
        Caption, printed in bold above the table.

    Returns
    -------
    str
        One row per group (``all`` last, in bold), cells ``median ± MAD`` with three decimals, ``–``
        where a group has no figure for a dose, and an ``n`` column with the number of studies.
    """
    header = ["Group", *(_dose_header(d) for d in doses), "n"]
    lines = [
        f"**{title}**",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---", *(["---:"] * (len(header) - 1))]) + "|",
    ]
    for group in _ordered_groups(summary):
        cells = [summary[group].get(dose_key(d)) for d in doses]
        texts = ["–" if c is None else f"{c['median']:.3f} ± {c['mad']:.3f}" for c in cells]
        name = f"**{group}**" if group == ALL_GROUP else group
        n = _n_cell([c for c in cells if c is not None])
        lines.append("| " + " | ".join([name, *texts, n]) + " |")
    return "\n".join(lines) + "\n"


def format_table1_csv(summary: Mapping[str, Mapping[str, Mapping[str, Any]]], doses: Sequence[float]) -> str:
    """The Table 1 figures as CSV with columns ``group,dose,median,mad,n``.

    Parameters
    ----------
    summary : Mapping
        :func:`aggregate`'s output.
    doses : Sequence[float]
        Dose fractions to include, in the given order; a group without a figure for a dose has no row.

    Returns
    -------
    str
        CSV text (``\\n`` line ends), dose as ``0.20``, full-precision floats for re-analysis.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["group", "dose", "median", "mad", "n"])
    for group in _ordered_groups(summary):
        for d in doses:
            cell = summary[group].get(dose_key(d))
            if cell is None:
                continue
            median, mad = repr(float(cell["median"])), repr(float(cell["mad"]))
            writer.writerow([group, dose_key(d), median, mad, int(cell["n"])])
    return out.getvalue()

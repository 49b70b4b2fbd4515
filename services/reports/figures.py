"""The job's figures: Dice against dose, the seed paper's Figure 1, and image noise against dose.

Every figure has two functions: ``<name>_data`` computes the numbers it plots (plain JSON types) and
``<name>_png`` draws them. The evaluate stage writes both (``<name>.png`` and ``<name>.json``), so the
numbers in a picture can be compared with the metrics in the database.

matplotlib runs on its Agg backend through explicit ``Figure`` objects (no pyplot state), so drawing
is thread-safe and needs no display.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from scipy import ndimage

from ..segmenter.metrics import ALL_GROUP, dose_key

#: The soft-tissue HU window of the noise region (fat at about -100 HU is left out on purpose: its
#: boundary with muscle is an edge, not a flat region).
SOFT_TISSUE_HU = (-50.0, 150.0)
#: In-plane and through-plane half widths (voxels) of the window in which the input CT must be flat.
FLAT_WINDOW_VOXELS = (2, 2, 1)
#: The flattest fraction of the soft-tissue voxels kept as the homogeneous region.
FLAT_FRACTION = 0.25
#: A local standard deviation this small (HU) counts as flat whatever the fraction (synthetic inputs).
FLAT_STD_FLOOR_HU = 1.0
#: Fewer voxels than this after the erosion: keep the region un-eroded (too few for a stable std).
MIN_REGION_VOXELS = 100
PNG_DPI = 100
#: The figures the evaluate stage writes, each as ``<name>.png`` and ``<name>.json``.
FIGURE_NAMES = ("dice_vs_dose", "figure1", "noise_vs_dose")


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)
    figure.savefig(buffer, format="png", dpi=PNG_DPI)
    return buffer.getvalue()


def _percent(dose: float) -> str:
    return f"{round(float(dose) * 100.0, 1):g} %"


# -- Dice against dose ---------------------------------------------------------------------------------

def dice_vs_dose_data(groups: Mapping[str, Mapping[str, Mapping[str, Any]]], doses: Sequence[float]) -> dict:
    """The numbers of :func:`dice_vs_dose_png`.

    Parameters
    ----------
    groups : Mapping
        :func:`dosebench.segmenter.metrics.aggregate`'s output.
    doses : Sequence[float]
        Dose fractions in (0, 1].

    Returns
    -------
    dict
        ``{"doses": [ascending], "groups": {group: [{"dose", "median", "mad", "n"}, ...]}}``; a dose
        without a figure for a group is left out of that group's list; ``all`` last.
    """
    ordered = sorted({float(d) for d in doses})
    names = sorted(g for g in groups if g != ALL_GROUP) + ([ALL_GROUP] if ALL_GROUP in groups else [])
    series: dict[str, list[dict]] = {}
    for name in names:
        points = []
        for dose in ordered:
            cell = groups[name].get(dose_key(dose))
            if cell is not None:
                points.append({"dose": dose, "median": float(cell["median"]), "mad": float(cell["mad"]),
                               "n": int(cell["n"])})
        series[name] = points
    return {"doses": ordered, "groups": series,
            "band": "median ± MAD (unscaled) over studies of each study's mean Dice over the group's labels"}


def dice_vs_dose_png(groups: dict, doses: list[float], title: str) -> bytes:
    """Median Dice per group against dose, with the median ± MAD band.

    Parameters
    ----------
    groups : dict
        :func:`dosebench.segmenter.metrics.aggregate`'s output:
        ``{group: {"0.20": {"median": m, "mad": d, "n": k}, ...}, ..., "all": {...}}``.
    doses : list[float]
        Dose fractions to plot (x axis, in percent of the full dose).
    title : str
        The figure's title.

    Returns
    -------
    bytes
        A PNG image.
    """
    data = dice_vs_dose_data(groups, doses)
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    for name, points in data["groups"].items():
        if not points:
            continue
        x = np.array([p["dose"] for p in points]) * 100.0
        median = np.array([p["median"] for p in points])
        mad = np.array([p["mad"] for p in points])
        style = {"color": "black", "linewidth": 2.2} if name == ALL_GROUP else {"linewidth": 1.4}
        line, = axes.plot(x, median, marker="o", label=name, **style)
        axes.fill_between(x, median - mad, np.minimum(median + mad, 1.0), color=line.get_color(), alpha=0.18,
                          linewidth=0)
    axes.set_xlabel("dose (% of full dose)")
    axes.set_ylabel("Dice against full dose (median ± MAD)")
    axes.set_ylim(max(0.0, _lowest(data) - 0.05), 1.01)
    axes.set_xlim(0.0, 105.0)
    axes.grid(True, alpha=0.3)
    if data["groups"]:
        axes.legend(fontsize="small", loc="lower right")
    axes.set_title(title, fontsize="medium")
    figure.tight_layout()
    return _png(figure)


def _lowest(data: dict) -> float:
    values = [p["median"] - p["mad"] for points in data["groups"].values() for p in points]
    return min(values) if values else 0.0


# -- Figure 1: images and segmentations at full and low dose ---------------------------------------------

def largest_difference_slice(full_labels: np.ndarray, low_labels: np.ndarray) -> int:
    """The axial slice (canonical axis 2) where the two label maps disagree on the most voxels.

    Parameters
    ----------
    full_labels, low_labels : np.ndarray
        Label maps of the same shape (nx, ny, nz) in canonical orientation.

    Returns
    -------
    int
        The slice index; ties go to the lowest index; with no difference at all, the slice with the most
        labelled voxels (so the figure still shows anatomy).
    """
    if full_labels.shape != low_labels.shape or full_labels.ndim != 3:
        raise ValueError(f"label maps must be 3-D of one shape, got {full_labels.shape} and {low_labels.shape}")
    per_slice = np.count_nonzero(full_labels != low_labels, axis=(0, 1))
    if per_slice.max() == 0:
        per_slice = np.count_nonzero(full_labels, axis=(0, 1))
    return int(np.argmax(per_slice))


def figure1_data(full_hu: np.ndarray, low_hu: np.ndarray, full_labels: np.ndarray, low_labels: np.ndarray,
                 dose: float, slice_index: int | None = None) -> dict:
    """The numbers of :func:`figure1_png`: which slice and dose, and how much the segmentations differ.

    Parameters
    ----------
    full_hu, low_hu : np.ndarray
        Full- and low-dose reconstructions (HU), canonical (nx, ny, nz).
    full_labels, low_labels : np.ndarray
        Their segmentations, same shape.
    dose : float
        The low dose fraction.
    slice_index : int, optional
        The axial slice; default :func:`largest_difference_slice`.

    Returns
    -------
    dict
        ``dose``, ``slice_index``, ``slice_chosen_by``, ``differing_voxels_in_slice``,
        ``labelled_voxels_in_slice`` (full, low) and ``dice_in_slice`` (all labels as foreground-aware
        agreement: voxels with the same nonzero label, twice, over both maps' labelled voxels).
    """
    if not full_hu.shape == low_hu.shape == full_labels.shape == low_labels.shape:
        raise ValueError("images and label maps must share one shape")
    chosen_by = "given"
    if slice_index is None:
        slice_index = largest_difference_slice(full_labels, low_labels)
        chosen_by = "largest number of voxels whose label differs"
    if not 0 <= slice_index < full_hu.shape[2]:
        raise ValueError(f"slice {slice_index} is outside 0..{full_hu.shape[2] - 1}")
    full = full_labels[:, :, slice_index]
    low = low_labels[:, :, slice_index]
    agree = int(np.count_nonzero((full == low) & (full != 0)))
    labelled = int(np.count_nonzero(full)) + int(np.count_nonzero(low))
    return {"dose": float(dose), "slice_index": int(slice_index), "slice_axis": "canonical axis 2 (axial)",
            "slice_chosen_by": chosen_by, "differing_voxels_in_slice": int(np.count_nonzero(full != low)),
            "labelled_voxels_in_slice": {"full_dose": int(np.count_nonzero(full)), "low_dose": int(np.count_nonzero(low))},
            "dice_in_slice": 2.0 * agree / labelled if labelled else None}


def _label_colours(n_labels: int) -> ListedColormap:
    # label 0 transparent, the rest from a qualitative map cycled
    from matplotlib import colormaps

    base = colormaps["tab20"]
    colours = [(0.0, 0.0, 0.0, 0.0)] + [(*base(i % 20)[:3], 0.55) for i in range(max(n_labels, 1))]
    return ListedColormap(colours)


def _display(slice_2d: np.ndarray) -> np.ndarray:
    # canonical (x = R, y = A): transpose and flip so anterior is up and the patient's right on the left
    return np.flipud(slice_2d.T)


def figure1_png(full_hu: np.ndarray, low_hu: np.ndarray, full_labels: np.ndarray, low_labels: np.ndarray,
                dose: float, slice_index: int | None = None, window_hu: tuple[float, float] = (-160.0, 240.0)
                ) -> bytes:
    """Full-dose image, low-dose image, both segmentations as overlays, and where they differ.

    Parameters
    ----------
    full_hu, low_hu, full_labels, low_labels, dose, slice_index
        As :func:`figure1_data`.
    window_hu : tuple[float, float]
        Grey-level window (HU), default the soft-tissue window (level 40, width 400).

    Returns
    -------
    bytes
        A PNG image with five panels.
    """
    data = figure1_data(full_hu, low_hu, full_labels, low_labels, dose, slice_index)
    k = data["slice_index"]
    n_labels = int(max(full_labels.max(initial=0), low_labels.max(initial=0)))
    colours = _label_colours(n_labels)
    full_img, low_img = _display(full_hu[:, :, k]), _display(low_hu[:, :, k])
    full_seg, low_seg = _display(full_labels[:, :, k]), _display(low_labels[:, :, k])
    differ = (full_seg != low_seg).astype(np.uint8)
    figure = Figure(figsize=(15.0, 3.6))
    panels = figure.subplots(1, 5)
    grey = {"cmap": "gray", "vmin": window_hu[0], "vmax": window_hu[1], "interpolation": "nearest"}
    overlay = {"cmap": colours, "vmin": 0, "vmax": n_labels + 1, "interpolation": "nearest"}
    panels[0].imshow(full_img, **grey)
    panels[0].set_title("full dose")
    panels[1].imshow(low_img, **grey)
    panels[1].set_title(f"{_percent(dose)} dose")
    panels[2].imshow(full_img, **grey)
    panels[2].imshow(full_seg, **overlay)
    panels[2].set_title("segmentation, full dose")
    panels[3].imshow(low_img, **grey)
    panels[3].imshow(low_seg, **overlay)
    panels[3].set_title(f"segmentation, {_percent(dose)}")
    panels[4].imshow(full_img, **grey)
    panels[4].imshow(np.ma.masked_equal(differ, 0), cmap=ListedColormap([(1.0, 0.1, 0.1, 0.9)]), vmin=0.5,
                     vmax=1.5, interpolation="nearest")
    panels[4].set_title(f"difference ({data['differing_voxels_in_slice']} voxels)")
    for panel in panels:
        panel.set_axis_off()
    figure.suptitle(f"axial slice {k}", fontsize="small")
    figure.tight_layout()
    return _png(figure)


# -- image noise against dose ------------------------------------------------------------------------------

def homogeneous_region(input_hu: np.ndarray, body: np.ndarray | None = None) -> np.ndarray:
    """Voxels where the input CT is locally flat soft tissue: the region in which noise is measured.

    A voxel belongs when its input HU lies in :data:`SOFT_TISSUE_HU`, the input's standard deviation in
    the (5 × 5 × 3)-voxel window around it is among the lowest :data:`FLAT_FRACTION` of such voxels, and
    it survives one binary erosion (so that the window of the reconstruction blur stays inside; the
    erosion is skipped where it would leave fewer than :data:`MIN_REGION_VOXELS`).

    Parameters
    ----------
    input_hu : np.ndarray
        The input CT (HU), canonical (nx, ny, nz).
    body : np.ndarray, optional
        A body mask to intersect with (default: everything).

    Returns
    -------
    np.ndarray
        Boolean mask; empty where the input has no soft tissue.
    """
    hu = input_hu.astype(np.float64, copy=False)
    size = tuple(2 * w + 1 for w in FLAT_WINDOW_VOXELS)
    mean = ndimage.uniform_filter(hu, size=size, mode="nearest")
    mean_sq = ndimage.uniform_filter(hu * hu, size=size, mode="nearest")
    local_std = np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))
    tissue = (hu >= SOFT_TISSUE_HU[0]) & (hu <= SOFT_TISSUE_HU[1])
    if body is not None:
        tissue &= body
    if not tissue.any():
        return tissue
    threshold = max(float(np.quantile(local_std[tissue], FLAT_FRACTION)), FLAT_STD_FLOOR_HU)
    flat = tissue & (local_std <= threshold)
    eroded = ndimage.binary_erosion(flat, iterations=1)
    return eroded if np.count_nonzero(eroded) >= MIN_REGION_VOXELS else flat


def noise_vs_dose_data(input_hu: np.ndarray, recon_hu: Mapping[float, np.ndarray],
                       region: np.ndarray | None = None) -> dict:
    """HU noise of each dose's reconstruction in a homogeneous region, and the 1/sqrt(dose) reference.

    In a region where the input is flat, a reconstruction's HU still vary: the input's own noise and
    texture (the same at every dose) plus the quantum noise of the simulated scan, whose variance goes
    as 1/dose. The two are separated with the dose-reduction model: the low-dose counts are the full-dose
    counts plus noise that is uncorrelated with them (Zabic et al. 2013), so

        var(recon_d - recon_full) = sigma_full**2 * (1/d - 1),

    where ``sigma_full`` is the quantum noise at the full dose. ``sigma_full**2`` is the least-squares
    fit of that line through the doses below the full one, and the quantum noise at dose ``d`` is
    ``sqrt(sigma_full**2 + var(recon_d - recon_full))``: measured, to be compared with the reference
    ``sigma_full / sqrt(d)``. (With one low dose the fit passes through it exactly; with more, the
    distance of the points from the curve tests the 1/dose law.)

    Parameters
    ----------
    input_hu : np.ndarray
        The input CT (HU), canonical.
    recon_hu : Mapping[float, np.ndarray]
        Reconstruction (HU) per dose fraction, same shape; the highest dose is the reference (1.0).
    region : np.ndarray, optional
        The mask to measure in; default :func:`homogeneous_region` of the input.

    Returns
    -------
    dict
        ``doses`` (ascending); per dose ``total_hu_std`` (std of the reconstruction in the region),
        ``added_hu_std`` (std of reconstruction minus the full-dose one), ``hu_std`` (the quantum noise
        estimate) and ``reference_hu_std`` (``quantum_full_hu_std / sqrt(dose)``); ``region_voxels``,
        and the definitions. Values are None where the region is empty or no lower dose exists.
    """
    if region is None:
        region = homogeneous_region(input_hu)
    doses = sorted(float(d) for d in recon_hu)
    top = doses[-1]
    n = int(np.count_nonzero(region))
    total: list[float | None] = [None] * len(doses)
    added_var: list[float | None] = [None] * len(doses)
    if n >= 2:
        full = recon_hu[top][region].astype(np.float64)
        for i, dose in enumerate(doses):
            values = recon_hu[dose][region].astype(np.float64)
            total[i] = float(values.std())
            added_var[i] = float((values - full).var())
    # least squares of var_added = sigma_full**2 * x, x = top/d - 1, over the lower doses
    x = [top / d - 1.0 for d in doses]
    pairs = [(xi, v) for xi, v in zip(x, added_var, strict=True) if v is not None and xi > 0]
    sigma_full_sq = sum(xi * v for xi, v in pairs) / sum(xi * xi for xi, _ in pairs) if pairs else None
    quantum = [None if sigma_full_sq is None or v is None else math.sqrt(sigma_full_sq + v) for v in added_var]
    reference = [None if sigma_full_sq is None else math.sqrt(sigma_full_sq * top / d) for d in doses]
    return {"doses": doses, "hu_std": quantum, "reference_hu_std": reference, "total_hu_std": total,
            "added_hu_std": [None if v is None else math.sqrt(v) for v in added_var],
            "quantum_full_hu_std": None if sigma_full_sq is None else math.sqrt(sigma_full_sq),
            "region_voxels": n,
            "quantity": "hu_std: quantum noise, sqrt(sigma_full^2 + var(recon_d - recon_full)) over the region, "
                        "sigma_full^2 fitted from var(recon_d - recon_full) = sigma_full^2 (1/d - 1); "
                        "total_hu_std: std of the reconstruction over the region (input texture included)",
            "region": f"input HU in [{SOFT_TISSUE_HU[0]:g}, {SOFT_TISSUE_HU[1]:g}] whose local std "
                      f"({'x'.join(str(2 * w + 1) for w in FLAT_WINDOW_VOXELS)} voxels) is in the lowest "
                      f"{FLAT_FRACTION:.0%} of such voxels (or below {FLAT_STD_FLOOR_HU:g} HU), eroded once",
            "reference": "quantum_full_hu_std * sqrt(full dose / dose)"}


def noise_vs_dose_png(data: dict, title: str = "Image noise against dose") -> bytes:
    """Draw :func:`noise_vs_dose_data`'s numbers: quantum noise against dose and the 1/sqrt(dose) curve.

    Parameters
    ----------
    data : dict
        :func:`noise_vs_dose_data`'s output.
    title : str
        The figure's title.

    Returns
    -------
    bytes
        A PNG image.
    """
    figure = Figure(figsize=(6.4, 4.2))
    axes = figure.add_subplot()
    points = [(d, s) for d, s in zip(data["doses"], data["hu_std"], strict=True) if s is not None]
    if points and data["quantum_full_hu_std"] is not None:
        x = np.array([p[0] for p in points])
        axes.plot(x * 100.0, [p[1] for p in points], marker="o", linewidth=0, label="quantum noise (measured)")
        fine = np.linspace(min(x.min(), 0.05), max(data["doses"]), 200)
        axes.plot(fine * 100.0, data["quantum_full_hu_std"] * np.sqrt(max(data["doses"]) / fine), linestyle="--",
                  color="grey", label="∝ 1/√dose")
        axes.set_ylim(0.0, max(p[1] for p in points) * 1.3)
        total = data["total_hu_std"][-1]
        axes.legend(fontsize="small", title=f"total std at full dose {total:.1f} HU", title_fontsize="small")
    else:
        axes.text(0.5, 0.5, "no homogeneous region or no lower dose", ha="center", va="center",
                  transform=axes.transAxes)
    axes.set_xlabel("dose (% of full dose)")
    axes.set_ylabel("HU std in homogeneous region")
    axes.set_xlim(0.0, 105.0)
    axes.grid(True, alpha=0.3)
    axes.set_title(f"{title} ({data['region_voxels']} voxels)", fontsize="medium")
    figure.tight_layout()
    return _png(figure)

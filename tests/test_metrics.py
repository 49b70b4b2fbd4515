"""Dice, per-label rows, median ± MAD, the cohort summary and its Table 1 rendering."""

from __future__ import annotations

import csv
import io
import math
import random

import numpy as np
import pytest

from dosebench.segmenter.labels import LabelInfo
from dosebench.segmenter.metrics import (
    aggregate,
    dice,
    format_table1,
    format_table1_csv,
    median_mad,
    per_label_metrics,
)

TABLE = {i: LabelInfo(i, f"label_{i}", "organs" if i < 4 else "vertebrae") for i in range(1, 6)}


# --- dice -------------------------------------------------------------------------------------------


def test_dice_by_hand() -> None:
    test = np.array([1, 1, 0, 0, 1], dtype=bool)
    reference = np.array([1, 0, 1, 0, 1], dtype=bool)
    assert dice(test, reference) == pytest.approx(2 * 2 / (3 + 3))
    assert dice(test, test) == 1.0
    assert dice(test, ~test) == 0.0
    assert dice(np.zeros(5, dtype=bool), reference) == 0.0


def test_dice_rejects_empty_pair_and_shape_mismatch() -> None:
    with pytest.raises(ValueError):
        dice(np.zeros((3, 3), dtype=bool), np.zeros((3, 3), dtype=bool))
    with pytest.raises(ValueError):
        dice(np.ones(3, dtype=bool), np.ones(4, dtype=bool))


def _ball(shape: tuple[int, int, int], centre: tuple[float, float, float], radius: float) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)) <= radius**2


@pytest.mark.parametrize("offset", [0, 5, 13, 25, 39])
def test_dice_of_offset_spheres_matches_analytic(offset: int) -> None:
    r = 20
    shape = (2 * r + offset + 4, 2 * r + 4, 2 * r + 4)
    c = r + 2.0
    a = _ball(shape, (c, c, c), r)
    b = _ball(shape, (c + offset, c, c), r)
    # Lens of two equal spheres at distance d: V = pi (4r + d)(2r - d)^2 / 12; Dice = V / V_sphere.
    lens = math.pi * (4 * r + offset) * (2 * r - offset) ** 2 / 12.0
    expected = lens / (4.0 / 3.0 * math.pi * r**3)
    # Voxelising a radius-20 sphere misstates volumes by well under 1 %.
    assert dice(a, b) == pytest.approx(expected, abs=0.01)


# --- per_label_metrics -----------------------------------------------------------------------------


def test_per_label_metrics_by_hand() -> None:
    reference = np.array([[1, 1, 2, 0], [0, 2, 2, 3]], dtype=np.uint8)[..., None]
    test = np.array([[1, 0, 2, 2], [7, 2, 0, 4]], dtype=np.uint8)[..., None]  # 7 is not in the table
    rows = per_label_metrics(test, reference, TABLE, voxel_volume_ml=0.5)
    by_id = {row["label_id"]: row for row in rows}
    assert [row["label_id"] for row in rows] == [1, 2, 3, 4]  # 5 absent from both: left out
    assert by_id[1]["dice"] == pytest.approx(2 * 1 / (2 + 1))
    assert by_id[2]["dice"] == pytest.approx(2 * 2 / (3 + 3))
    assert by_id[3]["dice"] == 0.0  # only in the reference
    assert by_id[4]["dice"] == 0.0  # only in the test map
    assert by_id[1] == {
        "label_id": 1,
        "label": "label_1",
        "group": "organs",
        "dice": pytest.approx(2 / 3),
        "reference_voxels": 2,
        "test_voxels": 1,
        "volume_change_ml": -0.5,
    }
    assert by_id[4]["group"] == "vertebrae"
    # The same figures as dice() on each label's masks.
    for label_id, row in by_id.items():
        assert row["dice"] == pytest.approx(dice(test == label_id, reference == label_id))


def test_per_label_metrics_identical_maps_score_exactly_one() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 118, size=(30, 30, 30)).astype(np.uint8)
    table = {i: LabelInfo(i, f"l{i}", "g") for i in range(1, 118)}
    rows = per_label_metrics(labels, labels.copy(), table, voxel_volume_ml=0.027)
    assert len(rows) == 117
    assert all(row["dice"] == 1.0 and row["volume_change_ml"] == 0.0 for row in rows)


def test_volume_change_uses_voxel_volume() -> None:
    spacing_mm = (0.5, 0.8, 2.0)
    voxel_ml = spacing_mm[0] * spacing_mm[1] * spacing_mm[2] / 1000.0  # 0.0008 ml
    reference = np.zeros((10, 10, 10), dtype=np.uint16)
    test = np.zeros_like(reference)
    reference[:5] = 3  # 500 voxels
    test[:7] = 3  # 700 voxels
    (row,) = per_label_metrics(test, reference, TABLE, voxel_volume_ml=voxel_ml)
    assert row["volume_change_ml"] == pytest.approx(200 * 0.0008)
    assert row["dice"] == pytest.approx(2 * 500 / 1200)


def test_per_label_metrics_rejects_bad_input() -> None:
    a = np.zeros((2, 2), dtype=np.uint8)
    with pytest.raises(ValueError):
        per_label_metrics(a, np.zeros((2, 3), dtype=np.uint8), TABLE, 1.0)
    with pytest.raises(ValueError):
        per_label_metrics(a.astype(np.float32), a, TABLE, 1.0)
    with pytest.raises(ValueError):
        per_label_metrics(a, a, TABLE, 0.0)


# --- median_mad ------------------------------------------------------------------------------------


def test_median_mad_known_values() -> None:
    assert median_mad([1, 2, 3, 4, 100]) == (3.0, 1.0)  # deviations 2, 1, 0, 1, 97
    assert median_mad([4, 1, 3, 2]) == (2.5, 1.0)  # even count: deviations 1.5, .5, .5, 1.5
    assert median_mad([0.5]) == (0.5, 0.0)
    median, mad = median_mad([1, 2, 3, 4, 100], scaled=True)
    assert median == 3.0 and mad == pytest.approx(1.4826)
    with pytest.raises(ValueError):
        median_mad([])
    with pytest.raises(ValueError):
        median_mad([1.0, float("nan")])


# --- aggregate and Table 1 -------------------------------------------------------------------------


def _rows() -> list[dict]:
    """Three studies x two groups at doses 0.2 and 1.0; at 0.4 only studies A and B."""
    dice_values = {
        # (study, dose): {group: [Dice of its labels]}
        ("A", 0.2): {"organs": [0.9, 0.8], "vertebrae": [0.7]},
        ("B", 0.2): {"organs": [0.95], "vertebrae": [0.6, 0.8]},
        ("C", 0.2): {"organs": [0.5], "vertebrae": [0.9]},
        ("A", 0.4): {"organs": [0.9], "vertebrae": [0.8]},
        ("B", 0.4): {"organs": [0.96], "vertebrae": [0.9]},
        ("A", 1.0): {"organs": [1.0, 1.0], "vertebrae": [1.0]},
        ("B", 1.0): {"organs": [1.0], "vertebrae": [1.0, 1.0]},
        ("C", 1.0): {"organs": [1.0], "vertebrae": [1.0]},
    }
    rows = [
        {"study": study, "dose": dose, "group": group, "dice": value, "label": f"{group}_{k}"}
        for (study, dose), groups in dice_values.items()
        for group, values in groups.items()
        for k, value in enumerate(values)
    ]
    rows[0]["dose"] = 0.2000000001  # the same dose level after float round-off
    random.Random(3).shuffle(rows)  # order of rows must not matter
    return rows


def test_aggregate_by_hand() -> None:
    summary = aggregate(_rows())
    assert list(summary) == ["organs", "vertebrae", "all"]
    assert all(list(per_dose) == ["0.20", "0.40", "1.00"] for per_dose in summary.values())

    def cell(group: str, dose: str) -> tuple[float, float, int]:
        c = summary[group][dose]
        return c["median"], c["mad"], c["n"]

    # organs at 0.2: study means 0.85, 0.95, 0.5 -> median 0.85, deviations 0, 0.1, 0.35
    assert cell("organs", "0.20") == (pytest.approx(0.85), pytest.approx(0.1), 3)
    # vertebrae at 0.2: 0.7, 0.7, 0.9 -> median 0.7, deviations 0, 0, 0.2
    assert cell("vertebrae", "0.20") == (pytest.approx(0.7), pytest.approx(0.0), 3)
    # all at 0.2 is the mean over each study's labels: 0.8, 0.78333, 0.7
    # -> median 0.78333, deviations 0.01667, 0, 0.08333
    assert cell("all", "0.20") == (pytest.approx(2.35 / 3), pytest.approx(0.8 - 2.35 / 3), 3)
    # two studies at 0.4: even-count medians
    assert cell("organs", "0.40") == (pytest.approx(0.93), pytest.approx(0.03), 2)
    assert cell("vertebrae", "0.40") == (pytest.approx(0.85), pytest.approx(0.05), 2)
    assert cell("all", "0.40") == (pytest.approx(0.89), pytest.approx(0.04), 2)
    assert cell("all", "1.00") == (1.0, 0.0, 3)

    scaled = aggregate(_rows(), scaled=True)
    assert scaled["organs"]["0.20"]["mad"] == pytest.approx(0.1 * 1.4826)


def test_aggregate_rejects_reserved_group_name() -> None:
    with pytest.raises(ValueError):
        aggregate([{"study": "A", "dose": 1.0, "group": "all", "dice": 1.0}])
    assert aggregate([]) == {}


def test_format_table1() -> None:
    summary = aggregate(_rows())
    text = format_table1(summary, [0.2, 0.4, 1.0], title="Dice vs. full dose")
    lines = text.strip().splitlines()
    assert lines[0] == "**Dice vs. full dose**"
    assert lines[2] == "| Group | 20 % | 40 % | 100 % | n |"
    assert lines[4] == "| organs | 0.850 ± 0.100 | 0.930 ± 0.030 | 1.000 ± 0.000 | 2–3 |"
    assert lines[5].startswith("| vertebrae | 0.700 ± 0.000 | 0.850 ± 0.050 |")
    assert lines[6].startswith("| **all** | 0.783 ± 0.017 |")
    assert len(lines) == 7  # title, blank, header, rule, three groups

    # A dose the summary lacks shows as a dash; a single study count shows as one number.
    only = format_table1(summary, [0.2, 0.6], title="t")
    assert "| organs | 0.850 ± 0.100 | – | 3 |" in only


def test_format_table1_csv() -> None:
    summary = aggregate(_rows())
    text = format_table1_csv(summary, [0.2, 0.4, 1.0])
    records = list(csv.DictReader(io.StringIO(text)))
    assert list(records[0]) == ["group", "dose", "median", "mad", "n"]
    assert len(records) == 9
    assert [r["group"] for r in records[-3:]] == ["all"] * 3
    first = records[0]
    assert (first["group"], first["dose"], first["n"]) == ("organs", "0.20", "3")
    assert float(first["median"]) == pytest.approx(0.85) and float(first["mad"]) == pytest.approx(0.1)

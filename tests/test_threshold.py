"""The threshold baseline segmenter on an analytic phantom and on the bundled real CT."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dosebench.core.errors import InputError
from dosebench.segmenter.labels import LabelInfo, Segmentation, table_from_json, table_to_json
from dosebench.segmenter.metrics import dice
from dosebench.segmenter.threshold import (
    BODY,
    BONE,
    FAT,
    LUNG,
    MIN_COMPONENT_ML,
    SOFT_TISSUE,
    THRESHOLD_TABLE,
    threshold_segment,
)

SAMPLE = Path(__file__).resolve().parents[1] / "services" / "core" / "data" / "sample_ct"
TS_LIVER = 5
TS_VERTEBRAE = range(26, 51)  # vertebrae_S1 .. vertebrae_C1 in TotalSegmentator's `total` map

SPACING = (2.0, 2.0, 2.5)


def _phantom() -> tuple[np.ndarray, dict[int, np.ndarray], list[tuple[int, int, int]]]:
    """Cylinder of soft tissue in air with a fat ring, a bone rod and a lung blob, plus noise specks.

    Returns the HU volume, the known mask of each class and the voxel positions of the specks.
    """
    shape = (72, 72, 24)
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    r = np.hypot(x - 35.5, y - 35.5)
    body = r < 30
    fat = body & (r >= 25)  # 5-voxel (10 mm) ring under the skin
    bone = np.hypot(x - 35.5, y - 48.0) < 4  # a rod along z, like a spine
    lung = (x - 30.0) ** 2 + (y - 26.0) ** 2 + ((z - 12.0) * 1.25) ** 2 < 8.0**2  # ellipsoid, 16 mm
    soft = body & ~fat & ~bone & ~lung

    hu = np.full(shape, -1000.0)
    hu[soft] = 40.0
    hu[fat] = -100.0
    hu[bone] = 700.0
    hu[lung] = -800.0
    # Mild Gaussian noise (fixed seed) that never crosses a threshold: the classes stay exact.
    hu += np.random.default_rng(1234).normal(0.0, 10.0, shape)

    # Single-voxel specks deep in soft tissue (one voxel = 0.01 ml, far below the 0.5 ml minimum),
    # and a speck of tissue in the air outside the body.
    specks = [(42, 36, 5), (20, 40, 18), (45, 25, 10)]
    for (i, j, k), value in zip(specks, (700.0, -800.0, -100.0), strict=True):
        assert soft[i, j, k]
        hu[i, j, k] = value
        soft[i, j, k] = False
    hu[2, 2, 2] = 40.0
    masks = {SOFT_TISSUE: soft, FAT: fat, BONE: bone, LUNG: lung}
    return hu.astype(np.float32), masks, specks


@pytest.fixture(scope="module")
def phantom_result() -> tuple[Segmentation, dict[int, np.ndarray], list[tuple[int, int, int]]]:
    hu, masks, specks = _phantom()
    return threshold_segment(hu, SPACING), masks, specks


@pytest.mark.parametrize("label", [SOFT_TISSUE, FAT, BONE, LUNG])
def test_phantom_classes_land_where_expected(phantom_result, label: int) -> None:
    seg, masks, _ = phantom_result
    assert dice(seg.labels == label, masks[label]) > 0.95


def test_phantom_specks_removed_and_outside_is_background(phantom_result) -> None:
    seg, masks, specks = phantom_result
    assert 0.01 < MIN_COMPONENT_ML  # the specks are one voxel of 0.01 ml
    for speck in specks:
        assert seg.labels[speck] == BODY
    assert seg.labels[2, 2, 2] == 0  # isolated tissue in air is not the body
    body = np.zeros_like(seg.labels, dtype=bool)
    for mask in masks.values():
        body |= mask
    assert dice(seg.labels > 0, body) > 0.99
    # No partial volume in this phantom: only the specks fall back to body.
    assert np.count_nonzero(seg.labels == BODY) == len(specks)


def test_phantom_result_type_and_determinism(phantom_result) -> None:
    seg, _, _ = phantom_result
    hu, _, _ = _phantom()
    again = threshold_segment(hu, SPACING)
    assert seg.labels.dtype == np.uint8 and seg.labels.shape == hu.shape
    np.testing.assert_array_equal(seg.labels, again.labels)
    assert seg.table == THRESHOLD_TABLE
    assert {info.group for info in seg.table.values()} == {"tissue"}
    assert [seg.table[i].name for i in sorted(seg.table)] == ["body", "lung", "fat", "soft_tissue", "bone"]


def test_threshold_intervals_are_half_open() -> None:
    # A block of constant HU fills the whole volume: every voxel is inside the body.
    cases = {
        -401.0: LUNG,
        -400.0: BODY,
        -200.5: BODY,
        -200.0: FAT,
        -30.0: SOFT_TISSUE,
        199.9: SOFT_TISSUE,
        200.0: BONE,
    }
    for value, expected in cases.items():
        hu = np.full((12, 12, 4), value, dtype=np.float32)
        hu[0] = -1000.0  # some air so there is an outside
        labels = threshold_segment(hu, (3.0, 3.0, 3.0)).labels
        assert labels[6, 6, 2] == expected, value


def test_all_air_gives_empty_map() -> None:
    labels = threshold_segment(np.full((8, 8, 3), -1000.0, dtype=np.float32), (1.0, 1.0, 1.0)).labels
    assert not labels.any()


@pytest.mark.parametrize(
    ("hu", "spacing"),
    [
        (np.zeros((4, 4), dtype=np.float32), (1.0, 1.0, 1.0)),
        (np.zeros((4, 4, 4), dtype=np.float32), (1.0, 0.0, 1.0)),
        (np.full((4, 4, 4), np.nan, dtype=np.float32), (1.0, 1.0, 1.0)),
    ],
)
def test_bad_input_is_rejected(hu: np.ndarray, spacing: tuple[float, float, float]) -> None:
    with pytest.raises(InputError):
        threshold_segment(hu, spacing)


@pytest.fixture(scope="module")
def real_ct() -> tuple[Segmentation, np.ndarray]:
    img = nib.load(SAMPLE / "ct.nii.gz")
    hu = np.asarray(img.dataobj, dtype=np.float32)
    spacing = tuple(float(s) for s in img.header.get_zooms()[:3])
    reference = np.asarray(nib.load(SAMPLE / "seg_totalsegmentator.nii.gz").dataobj)
    return threshold_segment(hu, spacing), reference


def test_real_ct_liver_is_soft_tissue(real_ct) -> None:
    seg, reference = real_ct
    liver = reference == TS_LIVER
    assert liver.sum() > 1000
    assert np.mean(seg.labels[liver] == SOFT_TISSUE) > 0.90


def test_real_ct_vertebrae_are_bone_or_soft_tissue(real_ct) -> None:
    seg, reference = real_ct
    vertebrae = np.isin(reference, list(TS_VERTEBRAE))
    assert vertebrae.sum() > 100
    found = seg.labels[vertebrae]
    assert np.mean((found == BONE) | (found == SOFT_TISSUE)) > 0.90
    assert np.mean(found == BONE) > 0.2  # cortical and dense cancellous bone is found as bone


def test_real_ct_labels_come_from_table(real_ct) -> None:
    seg, reference = real_ct
    present = set(np.unique(seg.labels).tolist())
    assert present - {0} <= set(seg.table)
    assert present - {0} == set(THRESHOLD_TABLE)  # an abdominal CT has all five classes
    assert not np.any((reference > 0) & (seg.labels == 0))  # every TotalSegmentator label is in the body


def test_label_table_json_round_trip() -> None:
    data = json.loads(json.dumps(table_to_json(THRESHOLD_TABLE)))
    assert data["4"] == {"name": "soft_tissue", "group": "tissue"}
    assert table_from_json(data) == THRESHOLD_TABLE
    with pytest.raises(InputError):
        table_from_json({"x": {"name": "a", "group": "b"}})
    with pytest.raises(InputError):
        table_from_json({"1": {"name": "a"}})


def test_segmentation_checks_dtype_and_table() -> None:
    table = {1: LabelInfo(1, "a", "g")}
    Segmentation(labels=np.zeros((2, 2, 2), dtype=np.uint16), table=table)
    with pytest.raises(InputError):
        Segmentation(labels=np.zeros((2, 2, 2), dtype=np.float32), table=table)
    with pytest.raises(InputError):
        Segmentation(labels=np.zeros((2, 2, 2), dtype=np.uint8), table={2: LabelInfo(1, "a", "g")})

"""The report figures (dosebench.reports.figures) on synthetic data whose answers are known."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from dosebench.reports import figures  # noqa: E402
from dosebench.segmenter.metrics import aggregate  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _image(data: bytes) -> Image.Image:
    assert data.startswith(PNG_MAGIC)
    return Image.open(io.BytesIO(data))


def _rows() -> list[dict]:
    # two studies, two groups; study b is worse at 20 %
    rows = []
    for study, low in (("a", 0.9), ("b", 0.7)):
        for group, label in (("organs", "liver"), ("organs", "spleen"), ("ribs", "rib_1")):
            rows.append({"study": study, "dose": 0.2, "group": group, "label": label, "dice": low})
            rows.append({"study": study, "dose": 1.0, "group": group, "label": label, "dice": 1.0})
    return rows


def test_dice_vs_dose_data_are_the_aggregate() -> None:
    groups = aggregate(_rows())
    data = figures.dice_vs_dose_data(groups, [1.0, 0.2])
    assert data["doses"] == [0.2, 1.0]
    assert list(data["groups"]) == ["organs", "ribs", "all"]
    low = data["groups"]["all"][0]
    # median of the study means 0.9 and 0.7 is 0.8; MAD = median(|0.9-0.8|, |0.7-0.8|) = 0.1
    assert low["dose"] == 0.2 and low["median"] == pytest.approx(0.8, abs=1e-12)
    assert low["mad"] == pytest.approx(0.1, abs=1e-12) and low["n"] == 2
    assert data["groups"]["ribs"][1] == {"dose": 1.0, "median": 1.0, "mad": 0.0, "n": 2}


def test_dice_vs_dose_png_is_a_png_of_the_stated_size() -> None:
    png = figures.dice_vs_dose_png(aggregate(_rows()), [0.2, 1.0], "test")
    image = _image(png)
    assert image.size == (640, 420)  # 6.4 x 4.2 inches at 100 dpi
    # not a blank canvas: the curves and text put many distinct colours on it
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 20


def test_figure1_default_slice_has_the_largest_difference() -> None:
    shape = (20, 18, 9)
    full = np.zeros(shape, np.int32)
    full[4:14, 4:12, :] = 1
    low = full.copy()
    low[4:6, 4:12, 2] = 0       # 16 voxels differ on slice 2
    low[4:9, 4:12, 6] = 0       # 40 voxels differ on slice 6
    low[14:16, 4:12, 6] = 2     # and 16 more there: 56 on slice 6
    assert figures.largest_difference_slice(full, low) == 6
    hu = np.zeros(shape, np.float32)
    data = figures.figure1_data(hu, hu, full, low, 0.2)
    assert data["slice_index"] == 6 and data["differing_voxels_in_slice"] == 56
    # slice 6: full has 80 labelled voxels, low 40 + 16 = 56; 40 agree: Dice 2*40/136
    assert data["dice_in_slice"] == pytest.approx(80 / 136, abs=1e-12)
    assert figures.figure1_data(hu, hu, full, low, 0.2, slice_index=2)["differing_voxels_in_slice"] == 16
    png = figures.figure1_png(hu, hu + 5, full, low, 0.2)
    assert _image(png).size == (1500, 360)


def test_figure1_without_any_difference_shows_the_most_labelled_slice() -> None:
    full = np.zeros((8, 8, 5), np.int32)
    full[2:6, 2:6, 3] = 1
    assert figures.largest_difference_slice(full, full.copy()) == 3
    with pytest.raises(ValueError):
        figures.largest_difference_slice(full, full[:, :, :4])


def test_noise_follows_one_over_sqrt_dose_in_the_homogeneous_region() -> None:
    rng = np.random.default_rng(3)
    shape = (40, 40, 12)
    # a flat 40 HU block (soft tissue) inside air, with a bone rod: only the flat block should be used
    ct = np.full(shape, -1000.0)
    ct[5:35, 5:35, :] = 40.0
    ct[18:22, 18:22, :] = 700.0
    region = figures.homogeneous_region(ct)
    assert region.any()
    assert np.all(ct[region] == 40.0)
    # the dose-reduction model: full-dose noise, plus at dose d noise uncorrelated with it of variance
    # sigma^2 (1/d - 1); and texture of the input (the same at every dose) that must not count
    sigma_full_hu, texture_hu = 3.0, 8.0
    texture = rng.normal(0.0, texture_hu, shape)
    full = ct + texture + rng.normal(0.0, sigma_full_hu, shape)
    doses = [0.2, 0.5, 1.0]
    recon = {d: full + rng.normal(0.0, sigma_full_hu * math.sqrt(1 / d - 1), shape) for d in doses}
    data = figures.noise_vs_dose_data(ct, recon, region)
    n = data["region_voxels"]
    assert n == int(region.sum()) and n > 1000
    # a sample variance of n normal draws has a relative standard error sqrt(2/(n-1)); allow 5 of them
    tolerance = 5 * math.sqrt(2 / (n - 1))
    assert data["quantum_full_hu_std"] ** 2 == pytest.approx(sigma_full_hu**2, rel=tolerance)
    for dose, quantum, reference in zip(data["doses"], data["hu_std"], data["reference_hu_std"], strict=True):
        assert quantum == pytest.approx(sigma_full_hu / math.sqrt(dose), rel=tolerance)
        assert reference == pytest.approx(data["quantum_full_hu_std"] / math.sqrt(dose), rel=1e-12)
    # the total std includes the texture: sqrt(8^2 + 3^2/d)
    assert data["total_hu_std"][-1] == pytest.approx(math.hypot(texture_hu, sigma_full_hu), rel=tolerance)
    assert data["added_hu_std"][-1] == 0.0
    assert _image(figures.noise_vs_dose_png(data)).size == (640, 420)


def test_noise_without_soft_tissue_is_reported_empty() -> None:
    ct = np.full((10, 10, 4), -1000.0)
    data = figures.noise_vs_dose_data(ct, {1.0: ct.copy()})
    assert data["region_voxels"] == 0 and data["hu_std"] == [None] and data["quantum_full_hu_std"] is None
    assert _image(figures.noise_vs_dose_png(data)).format == "PNG"

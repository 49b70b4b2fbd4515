"""``dosebench simulate`` as a real subprocess: projection stores per dose from a CT volume and from
DICOM-CT-PD raw projections; reproducible bytes; a clean one-line refusal of flying-focal-spot data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from dosebench.core.geometry import HelicalGeometry
from dosebench.core.protocol import load_protocol
from dosebench.simulator.dicom_ct_pd import write_dicom_ct_pd
from dosebench.simulator.phantoms import Ellipsoid, analytic_line_integrals
from dosebench.simulator.store import open_store


def _ok(result) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _simulate(run_cli, input_path: Path, out: Path, seed: int = 7, doses: str = "0.2,0.5"):
    return run_cli("simulate", "--input", input_path, "--doses", doses, "--protocol", "tiny", "--seed", str(seed),
                   "--out", out, "--quiet")


def test_simulate_from_ct_writes_stores_per_dose(run_cli, cropped_ct, tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    _ok(_simulate(run_cli, cropped_ct, first))
    _ok(_simulate(run_cli, cropped_ct, second))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no staging leftovers
    record = json.loads((first / "protocol.json").read_text())
    assert record["seed"] == 7 and record["doses"] == [1.0, 0.5, 0.2]
    geometry = HelicalGeometry.model_validate(record["geometry"])
    shape = (geometry.number_of_views, geometry.detector_rows, geometry.detector_columns)

    counts = open_store(str(first / "counts"))
    assert counts.quantity == "counts" and counts.shape == shape
    stores = {label: open_store(str(first / f"dose-{label}" / "line_integrals")) for label in ("0.20", "0.50", "1.00")}
    values = {}
    for label, store in stores.items():
        assert store.quantity == "line_integrals" and store.shape == shape
        assert store.geometry == counts.geometry
        values[label] = store.read_all()
        assert np.all(np.isfinite(values[label]))
    assert not np.array_equal(values["0.20"], values["0.50"])
    # lower dose, more noise, same mean
    assert np.std(values["0.20"] - values["1.00"]) > np.std(values["0.50"] - values["1.00"]) > 0
    assert abs(float(np.mean(values["0.20"] - values["1.00"]))) < 0.01
    # same seed, same bytes (store.json included)
    assert _files(first).keys() == _files(second).keys()
    a, b = _files(first), _files(second)
    assert all(a[name] == b[name] for name in a if name != "protocol.json")


def _raw_scan() -> tuple[HelicalGeometry, np.ndarray]:
    scanner = load_protocol("tiny").scanner
    geometry = HelicalGeometry.covering(scanner, -3.0, 3.0, radius_mm=150.0)
    geometry = geometry.model_copy(update={"number_of_views": 96})
    phantom = [Ellipsoid((0.0, 0.0, 0.0), (100.0, 80.0, 80.0), 0.0193)]
    return geometry, analytic_line_integrals(phantom, geometry)


def test_simulate_from_dicom_ct_pd(run_cli, tmp_path):
    geometry, p = _raw_scan()
    raw = tmp_path / "raw"
    write_dicom_ct_pd(raw, p, geometry, 1.0e5, flip=True)
    out = tmp_path / "out"
    _ok(_simulate(run_cli, raw, out))
    counts = open_store(str(out / "counts"))
    assert counts.attrs["source"] == "DICOM-CT-PD raw projections"
    assert counts.geometry.number_of_views == 96 and counts.shape == p.shape
    np.testing.assert_allclose(counts.read_all(), 1.0e5 * np.exp(-p), rtol=1e-3)
    full = open_store(str(out / "dose-1.00" / "line_integrals")).read_all()
    np.testing.assert_allclose(full, p, atol=1e-3)
    low = open_store(str(out / "dose-0.20" / "line_integrals")).read_all()
    noise = low - p
    # Thinning adds the noise between the full and the low dose: the written data are noiseless, so
    # Var(n_low) = f (1 - f) n and the line integrals' std is sqrt((1 - f) / (f n)) (real raw data
    # carry the full dose's own Poisson noise on top, which makes it 1 / sqrt(f n))
    expected = np.sqrt(0.8 / (0.2 * 1.0e5 * np.exp(-p)))
    assert 0.9 < float(np.std(noise / expected)) < 1.1
    assert json.loads((out / "protocol.json").read_text())["input"]["kind"] == "DICOM-CT-PD raw projections"


def test_simulate_keeps_the_flying_focal_spot_in_every_store(run_cli, tmp_path):
    """Flying-focal-spot raw data are accepted: the per-view source shifts the files carry reach the
    geometry of the counts and of every dose's line integrals, so the reconstruction sees them."""
    geometry, p = _raw_scan()
    raw = tmp_path / "ffs"
    shifts = [(1e-3, 0.1, 0.0), (-1e-3, -0.1, 0.0)]  # (angle rad, axial mm, radial mm), alternating
    write_dicom_ct_pd(raw, p, geometry, 1.0e5, ffs_mode="FFSXYZ", ffs_offsets=shifts)
    out = tmp_path / "out"
    _ok(_simulate(run_cli, raw, out))
    for store_path in (out / "counts", out / "dose-0.20" / "line_integrals", out / "dose-1.00" / "line_integrals"):
        offsets = open_store(str(store_path)).geometry.focal_spot_offsets
        stored = np.array([(o.angle_rad, o.axial_mm, o.radial_mm) for o in offsets])
        np.testing.assert_allclose(stored, np.array(shifts), rtol=1e-6, atol=1e-9)  # the tags are float32


@pytest.mark.parametrize("bad", ["--seed=-1"])
def test_simulate_rejects_negative_seed(run_cli, cropped_ct, tmp_path, bad):
    result = run_cli("simulate", "--input", cropped_ct, "--out", tmp_path / "o", "--protocol", "tiny", bad, "--quiet")
    assert result.returncode == 2 and "seed" in result.stderr

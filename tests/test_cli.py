"""The ``dosebench`` command end to end, as a real subprocess: output layout, reproducibility, and
one-line errors (no traceback, no output folder, no staging leftovers) for bad input."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

DOSES = ("0.20", "0.50", "1.00")
EXPECTED_FILES = {
    "protocol.json",
    "report.md",
    *(f"recon/dose-{d}.nii.gz" for d in DOSES),
    *(f"seg/dose-{d}.nii.gz" for d in DOSES),
    "seg/labels.json",
    "metrics/per_label.csv",
    "metrics/summary.json",
    "metrics/summary.csv",
    "metrics/image_quality.csv",
    "metrics/metrics.json",
    "report.html",
    *(f"figures/{name}.{suffix}" for name in ("dice_vs_dose", "figure1", "noise_vs_dose") for suffix in ("png", "json")),
}
PER_LABEL_COLUMNS = {"dose", "group", "label", "dice", "reference_voxels", "test_voxels"}


def _run_args(input_path: Path, out: Path, *extra: str, seed: int = 7, doses: str = "0.2,0.5,1.0",
              protocol: str = "tiny", segmenter: str = "threshold") -> list[str]:
    return ["run", "--input", str(input_path), "--doses", doses, "--protocol", protocol,
            "--segmenter", segmenter, "--seed", str(seed), "--out", str(out), "--quiet", *extra]


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def _voxels(path: Path) -> np.ndarray:
    return np.asarray(nib.load(str(path)).dataobj)


def _per_label(out: Path) -> list[dict[str, str]]:
    with (out / "metrics" / "per_label.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def _ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, \
        f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def _study(run_cli, input_path: Path, parent: Path, seed: int) -> Path:
    out = parent / "result"
    _ok(run_cli(*_run_args(input_path, out, seed=seed)))
    return out


@pytest.fixture(scope="module")
def study_a(run_cli, cropped_ct, tmp_path_factory) -> Path:
    return _study(run_cli, cropped_ct, tmp_path_factory.mktemp("study-a"), seed=7)


@pytest.fixture(scope="module")
def study_a_again(run_cli, cropped_ct, tmp_path_factory) -> Path:
    return _study(run_cli, cropped_ct, tmp_path_factory.mktemp("study-a-again"), seed=7)


@pytest.fixture(scope="module")
def study_b(run_cli, cropped_ct, tmp_path_factory) -> Path:
    return _study(run_cli, cropped_ct, tmp_path_factory.mktemp("study-b"), seed=8)


# --- 1. end to end ---------------------------------------------------------------------------------


def test_run_writes_exactly_the_documented_layout(study_a: Path) -> None:
    assert _files(study_a) == EXPECTED_FILES
    assert _hidden(study_a.parent) == [], "a staging folder was left behind"


def test_protocol_json(study_a: Path) -> None:
    record = json.loads((study_a / "protocol.json").read_text())
    assert {"protocol", "geometry", "seed", "doses", "versions"} <= set(record)
    assert record["seed"] == 7
    assert record["doses"] == [0.2, 0.5, 1.0]
    assert record["protocol"]["name"] == "tiny"
    assert record["versions"]["dosebench"]


@pytest.mark.parametrize("kind", ["recon", "seg"])
def test_outputs_are_on_the_input_grid(study_a: Path, cropped_ct: Path, kind: str) -> None:
    source = nib.load(str(cropped_ct))
    for dose in DOSES:
        image = nib.load(str(study_a / kind / f"dose-{dose}.nii.gz"))
        assert image.shape == source.shape, dose
        assert np.allclose(image.affine, source.affine), dose
        data = np.asarray(image.dataobj)
        assert np.issubdtype(data.dtype, np.integer)
        if kind == "recon":  # HU of a body CT, not zeros
            assert -1100 <= data.min() and data.max() <= 3071
            assert (data > -300).mean() > 0.3


def test_labels_json_names_every_label_in_the_maps(study_a: Path) -> None:
    table = json.loads((study_a / "seg" / "labels.json").read_text())
    assert table
    for key, info in table.items():
        assert int(key) > 0
        assert set(info) >= {"name", "group"} and info["name"] and info["group"]
    ids = {int(k) for k in table}
    for dose in DOSES:
        present = set(np.unique(_voxels(study_a / "seg" / f"dose-{dose}.nii.gz")).tolist()) - {0}
        assert present and present <= ids, dose


def test_per_label_csv(study_a: Path) -> None:
    rows = _per_label(study_a)
    assert PER_LABEL_COLUMNS <= set(rows[0])
    names = {info["name"] for info in json.loads((study_a / "seg" / "labels.json").read_text()).values()}
    assert {r["dose"] for r in rows} == set(DOSES)
    for dose in DOSES:
        assert {r["label"] for r in rows if r["dose"] == dose} == names
    for row in rows:
        assert 0.0 <= float(row["dice"]) <= 1.0
        assert int(row["reference_voxels"]) >= 0 and int(row["test_voxels"]) >= 0
    full = [r for r in rows if r["dose"] == "1.00"]
    assert full and all(float(r["dice"]) == 1.0 for r in full), full
    assert all(r["reference_voxels"] == r["test_voxels"] for r in full)


def test_summary_dice_falls_with_dose(study_a: Path) -> None:
    summary = json.loads((study_a / "metrics" / "summary.json").read_text())
    groups = summary["groups"]
    assert "all" in groups
    for group, by_dose in groups.items():
        assert set(by_dose) == set(DOSES), group
        for cell in by_dose.values():
            assert {"median", "mad", "n"} <= set(cell)
    median = {dose: groups["all"][dose]["median"] for dose in DOSES}
    assert median["1.00"] == 1.0
    assert median["0.20"] < median["1.00"]
    assert median["0.20"] <= median["0.50"] <= 1.0
    assert groups["all"]["0.20"]["n"] == 1


def test_report_has_table1(study_a: Path) -> None:
    report = (study_a / "report.md").read_text()
    headers = [line for line in report.splitlines()
               if line.startswith("|") and "20 %" in line and "100 %" in line and "50 %" in line]
    assert headers, report
    assert "±" in report
    assert any(line.startswith("| **all**") or line.startswith("| all") for line in report.splitlines())


# --- 2. reproducibility ----------------------------------------------------------------------------


def test_same_seed_gives_identical_results(study_a: Path, study_a_again: Path) -> None:
    for dose in DOSES:
        first = _voxels(study_a / "recon" / f"dose-{dose}.nii.gz")
        second = _voxels(study_a_again / "recon" / f"dose-{dose}.nii.gz")
        assert first.dtype == second.dtype
        assert np.array_equal(first, second), dose
        assert np.array_equal(_voxels(study_a / "seg" / f"dose-{dose}.nii.gz"),
                              _voxels(study_a_again / "seg" / f"dose-{dose}.nii.gz")), dose
    assert (study_a / "metrics" / "per_label.csv").read_bytes() == \
        (study_a_again / "metrics" / "per_label.csv").read_bytes()


def test_other_seed_gives_other_noise(study_a: Path, study_b: Path) -> None:
    a = _voxels(study_a / "recon" / "dose-0.20.nii.gz")
    b = _voxels(study_b / "recon" / "dose-0.20.nii.gz")
    assert a.shape == b.shape
    assert not np.array_equal(a, b)
    assert json.loads((study_b / "protocol.json").read_text())["seed"] == 8


# --- 3. bad input ----------------------------------------------------------------------------------


def _assert_clean_failure(result: subprocess.CompletedProcess[str], out: Path, *words: str) -> str:
    """Non-zero exit, exactly one 'error:' line naming the problem, no traceback, no output left."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word.lower() in errors[0].lower(), (word, errors[0])
    assert not out.exists(), "a failed run left its output folder"
    assert not list(out.parent.glob(f".{out.name}.partial-*")), "a failed run left its staging folder"
    assert _hidden(out.parent) == []
    return errors[0]


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([3.0, 3.0, 3.0, 1.0])), str(path))
    return path


def _text_file(path: Path) -> Path:
    path.write_text("not a CT\n")
    return path


def _random_bytes(path: Path) -> Path:
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    return path


#: name -> (makes the input in a fresh folder, given that folder and the cropped CT;
#:          options for _run_args; words the one error line must contain)
BAD_INPUTS = {
    "missing-input": (lambda d, ct: d / "nowhere.nii.gz", {}, ("nowhere.nii.gz", "does not exist")),
    "2d-image": (lambda d, ct: _nifti(d / "flat.nii.gz", np.full((64, 64), -1000, dtype=np.int16)), {},
                 ("flat.nii.gz", "not a 3D volume")),
    "one-slice": (lambda d, ct: _nifti(d / "slice.nii.gz", np.full((64, 64, 1), -1000, dtype=np.int16)), {},
                  ("slice.nii.gz", "not a 3D volume")),
    "nan-volume": (lambda d, ct: _nifti(d / "nan.nii.gz", np.full((32, 32, 8), np.nan, dtype=np.float32)), {},
                   ("nan.nii.gz", "non-finite", "NaN")),
    "doses-0": (lambda d, ct: ct, {"doses": "0"}, ("dose fraction 0 ", "outside (0, 1]")),
    "doses-1.5": (lambda d, ct: ct, {"doses": "1.5"}, ("dose fraction 1.5", "outside (0, 1]")),
    "doses-abc": (lambda d, ct: ct, {"doses": "abc"}, ("'abc'", "not a number")),
    "not-nifti": (lambda d, ct: _text_file(d / "scan.txt"), {}, ("scan.txt", "neither NIfTI")),
    "corrupt-nifti": (lambda d, ct: _random_bytes(d / "broken.nii.gz"), {},
                      ("broken.nii.gz", "not a readable NIfTI")),
    "unknown-protocol": (lambda d, ct: ct, {"protocol": "no-such-protocol"},
                         ("unknown protocol", "'no-such-protocol'", "tiny")),
    "unknown-segmenter": (lambda d, ct: ct, {"segmenter": "no-such-model"},
                          ("unknown segmenter", "'no-such-model'", "threshold")),
    # user values that look like rich markup must be shown as typed
    "markup-doses": (lambda d, ct: ct, {"doses": "[/]"}, ("'[/]'", "not a number")),
    "markup-protocol": (lambda d, ct: ct, {"protocol": "[red]x"}, ("unknown protocol", "'[red]x'")),
    "negative-seed": (lambda d, ct: ct, {"seed": "-1"}, ("seed -1", "negative")),
}


@pytest.fixture(scope="module")
def bad_runs(run_cli, cropped_ct: Path,
             tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    """Every bad-input case run once, concurrently (each call is mostly interpreter start-up and
    imports), each in its own folder: name -> (result, its --out path)."""
    jobs = {}
    for name, (make_input, options, _) in BAD_INPUTS.items():
        folder = tmp_path_factory.mktemp(f"bad-{name}")
        out = folder / "out"
        jobs[name] = (_run_args(make_input(folder, cropped_ct), out, **options), out)
    with ThreadPoolExecutor(max_workers=min(8, max(2, os.cpu_count() or 2))) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, (args, _) in jobs.items()}
        return {name: (futures[name].result(), jobs[name][1]) for name in jobs}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_fails_cleanly(bad_runs, name: str) -> None:
    result, out = bad_runs[name]
    _assert_clean_failure(result, out, *BAD_INPUTS[name][2])
    assert result.returncode == 2


def test_existing_output_is_refused_and_untouched(run_cli, cropped_ct: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("precious\n")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    result = run_cli(*_run_args(cropped_ct, out))

    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "already exists" in errors[0] and "--overwrite" in errors[0], errors[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt", "sub"]
    assert _hidden(tmp_path) == []


# --- 4. help ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "demo"])
def test_help_mentions_out(run_cli, command: str) -> None:
    result = run_cli(command, "--help", timeout=60)
    _ok(result)
    assert "--out" in result.stdout


def test_console_script(run_cli) -> None:
    script = Path(sys.executable).with_name("dosebench")
    if not script.exists():
        pytest.skip(f"no console script beside {sys.executable}")
    result = run_cli("run", "--help", timeout=60, executable=[str(script)])
    _ok(result)
    assert "--input" in result.stdout and "--out" in result.stdout

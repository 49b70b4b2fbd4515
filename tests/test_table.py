"""``dosebench table``: Table 1 over several run folders, from their metrics/per_label.csv files
(written here directly, not by the pipeline), by hand-computed medians and MADs."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from dosebench.core.errors import InputError
from dosebench.segmenter.table import table_from_runs, write_table

COLUMNS = ["study", "dose", "reference", "group", "label", "label_id", "dice", "reference_voxels",
           "test_voxels", "volume_change_ml", "surface_dice", "hd95_mm"]
LABELS = {"organs": ["liver", "spleen"], "vertebrae": ["L1"]}

#: folder -> (study name, {dose: {group: [Dice per label]}}). Runs a and b carry the same study name
#: (two scans called "abdomen"): they must count as two studies. Run c lacks dose 0.5 (a failed dose).
RUNS = {
    "run-a": ("abdomen", {"0.20": {"organs": [0.9, 0.8], "vertebrae": [0.7]},
                          "0.50": {"organs": [0.95, 0.89], "vertebrae": [0.85]},
                          "1.00": {"organs": [1.0, 1.0], "vertebrae": [1.0]}}),
    "run-b": ("abdomen", {"0.20": {"organs": [0.6, 1.0], "vertebrae": [0.5]},
                          "0.50": {"organs": [0.94, 0.98], "vertebrae": [0.75]},
                          "1.00": {"organs": [1.0, 1.0], "vertebrae": [1.0]}}),
    "run-c": ("chest", {"0.20": {"organs": [0.7, 0.7], "vertebrae": [0.9]},
                        "1.00": {"organs": [1.0, 1.0], "vertebrae": [1.0]}}),
}
# By hand, per group and dose: each study's mean over the group's labels, then median and MAD.
#   organs    0.20: 0.85, 0.80, 0.70 -> median 0.80, |dev| 0.05, 0, 0.10 -> MAD 0.05
#   vertebrae 0.20: 0.70, 0.50, 0.90 -> median 0.70, |dev| 0, 0.2, 0.2 -> MAD 0.20
#   all       0.20: 2.4/3, 2.1/3, 2.3/3 -> median 2.3/3, |dev| 0.1/3, 0.2/3, 0 -> MAD 0.1/3
#   organs    0.50: 0.92, 0.96 -> median 0.94, MAD 0.02 (two studies)
#   vertebrae 0.50: 0.85, 0.75 -> median 0.80, MAD 0.05
#   all       0.50: 2.69/3, 2.67/3 -> median 2.68/3, MAD 0.01/3
#   every group at 1.00: 1 ± 0 over three studies
EXPECTED = {
    ("organs", "0.20"): (0.80, 0.05, 3),
    ("vertebrae", "0.20"): (0.70, 0.20, 3),
    ("all", "0.20"): (2.3 / 3, 0.1 / 3, 3),
    ("organs", "0.50"): (0.94, 0.02, 2),
    ("vertebrae", "0.50"): (0.80, 0.05, 2),
    ("all", "0.50"): (2.68 / 3, 0.01 / 3, 2),
    ("organs", "1.00"): (1.0, 0.0, 3),
    ("vertebrae", "1.00"): (1.0, 0.0, 3),
    ("all", "1.00"): (1.0, 0.0, 3),
}


def _write_run(folder: Path, study: str, doses: dict[str, dict[str, list[float]]]) -> Path:
    (folder / "metrics").mkdir(parents=True)
    with (folder / "metrics" / "per_label.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for reference in ("full_dose", "reference_seg"):
            for dose, groups in doses.items():
                for group, values in groups.items():
                    for k, (label, value) in enumerate(zip(LABELS[group], values, strict=True)):
                        writer.writerow({
                            "study": study, "dose": dose, "reference": reference, "group": group,
                            "label": label, "label_id": k + 1,
                            # rows against a reference segmentation must not enter the table
                            "dice": value if reference == "full_dose" else 0.0,
                            "reference_voxels": 100, "test_voxels": 90, "volume_change_ml": -0.3,
                            "surface_dice": 0.0 if value < 0.65 else 1.0,
                            "hd95_mm": "inf" if value < 0.65 else 1.5,
                        })
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    return [_write_run(tmp_path / name, study, doses) for name, (study, doses) in RUNS.items()]


def test_table_from_runs_by_hand(runs: list[Path]) -> None:
    summary, doses, rows = table_from_runs(runs)
    assert doses == [0.2, 0.5, 1.0]
    assert list(summary) == ["organs", "vertebrae", "all"]
    assert {row["study"] for row in rows} == {"abdomen (run-a)", "abdomen (run-b)", "chest"}
    assert len(rows) == 3 * 3 + 3 * 3 + 2 * 3  # full-dose rows only
    for (group, dose), (median, mad, n) in EXPECTED.items():
        cell = summary[group][dose]
        assert cell["median"] == pytest.approx(median, abs=1e-12), (group, dose)
        assert cell["mad"] == pytest.approx(mad, abs=1e-12), (group, dose)
        assert cell["n"] == n, (group, dose)


def test_same_study_and_folder_names_fall_back_to_paths(tmp_path: Path) -> None:
    _, doses = RUNS["run-a"]
    first = _write_run(tmp_path / "x" / "result", "abdomen", doses)
    second = _write_run(tmp_path / "y" / "result", "abdomen", doses)
    _, _, rows = table_from_runs([first, second])
    assert {row["study"] for row in rows} == {f"abdomen ({first.resolve()})", f"abdomen ({second.resolve()})"}


def test_write_table(runs: list[Path], tmp_path: Path) -> None:
    summary, doses, _ = table_from_runs(runs)
    markdown, table_csv = write_table(summary, doses, tmp_path / "out" / "report.md")
    assert table_csv == tmp_path / "out" / "report.csv"
    _check_outputs(markdown, table_csv)


def _check_outputs(markdown: Path, table_csv: Path) -> None:
    lines = markdown.read_text().strip().splitlines()
    assert lines[0] == "**Dice between low- and full-dose segmentations, median ± MAD over 3 studies**"
    assert lines[2] == "| Group | 20 % | 50 % | 100 % | n |"
    assert lines[4] == "| organs | 0.800 ± 0.050 | 0.940 ± 0.020 | 1.000 ± 0.000 | 2–3 |"
    assert lines[5] == "| vertebrae | 0.700 ± 0.200 | 0.800 ± 0.050 | 1.000 ± 0.000 | 2–3 |"
    assert lines[6] == "| **all** | 0.767 ± 0.033 | 0.893 ± 0.003 | 1.000 ± 0.000 | 2–3 |"
    assert len(lines) == 7
    records = list(csv.DictReader(io.StringIO(table_csv.read_text())))
    assert list(records[0]) == ["group", "dose", "median", "mad", "n"]
    assert len(records) == len(EXPECTED)
    for record in records:
        median, mad, n = EXPECTED[(record["group"], record["dose"])]
        assert float(record["median"]) == pytest.approx(median, abs=1e-12)
        assert float(record["mad"]) == pytest.approx(mad, abs=1e-12)
        assert int(record["n"]) == n


# --- errors ------------------------------------------------------------------------------------------


def _rewrite(folder: Path, transform) -> None:
    path = folder / "metrics" / "per_label.csv"
    path.write_text(transform(path.read_text()))


def test_folder_without_metrics(runs: list[Path], tmp_path: Path) -> None:
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    with pytest.raises(InputError, match="not-a-run has no metrics/per_label.csv"):
        table_from_runs([*runs, empty])
    with pytest.raises(InputError, match="does not exist"):
        table_from_runs([tmp_path / "missing"])
    with pytest.raises(InputError, match="no run folders"):
        table_from_runs([])
    with pytest.raises(InputError, match="given twice"):
        table_from_runs([runs[0], runs[0].parent / ".." / runs[0].parent.name / runs[0].name])


@pytest.mark.parametrize(
    ("transform", "message"),
    [
        (lambda text: text.replace("dice,", "score,", 1), "lacks the column"),
        (lambda text: text.replace("0.7,", "high,", 1), "is not a number"),
        (lambda text: text.replace("0.9,", "1.9,", 1), "is not in"),
        (lambda text: text.replace(",organs,", ",organs,extra,", 1), "wrong number of fields"),
        (lambda text: text.replace("full_dose", "other"), "no rows with reference full_dose"),
        (lambda text: text.replace("abdomen", "other", 1), "holds 2 studies"),
        (lambda text: text.replace(",organs,", ",all,", 1), "reserved"),
        (lambda text: "", "lacks the column"),
        (lambda text: text + '"unterminated\n', "cannot read"),
    ],
)
def test_malformed_csv_names_the_file(runs: list[Path], transform, message: str) -> None:
    _rewrite(runs[0], transform)
    with pytest.raises(InputError, match=message) as caught:
        table_from_runs(runs)
    assert str(runs[0] / "metrics" / "per_label.csv") in str(caught.value)
    assert caught.value.fix  # every error names the fix


def test_out_must_not_be_the_csv(runs: list[Path], tmp_path: Path) -> None:
    summary, doses, _ = table_from_runs(runs)
    with pytest.raises(InputError):
        write_table(summary, doses, tmp_path / "report.csv")


# --- the command -------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["one --runs", "repeated --runs", "arguments"])
def test_cli_table(run_cli, runs: list[Path], tmp_path: Path, style: str) -> None:
    out = tmp_path / style.replace(" ", "_") / "report.md"
    folders = [str(r) for r in runs]
    if style == "one --runs":
        args = ["table", "--runs", *folders, "--out", str(out)]
    elif style == "repeated --runs":
        args = ["table", *(a for f in folders for a in ("--runs", f)), "--out", str(out)]
    else:
        args = ["table", "--out", str(out), *folders]
    result = run_cli(*args, timeout=60)
    assert result.returncode == 0, result.stderr
    _check_outputs(out, out.with_suffix(".csv"))
    assert "| organs | 0.800 ± 0.050 |" in result.stdout


def test_cli_table_mixed_runs_and_arguments(run_cli, runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    result = run_cli("table", "--runs", runs[0], "--out", out, "--runs", runs[1], runs[2], "--quiet", timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    _check_outputs(out, out.with_suffix(".csv"))


def test_cli_table_folder_without_metrics(run_cli, runs: list[Path], tmp_path: Path) -> None:
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    out = tmp_path / "report.md"
    result = run_cli("table", "--runs", *runs, empty, "--out", out, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "not-a-run" in lines[0] and "dosebench run" in lines[0]
    assert "Traceback" not in result.stderr
    assert not out.exists() and not out.with_suffix(".csv").exists()

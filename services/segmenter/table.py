"""The cohort Table 1 from several ``dosebench run`` folders (``dosebench table``).

Each run folder is one study; its ``metrics/per_label.csv`` rows against the full dose
(``reference == "full_dose"``) are pooled and summarised as in a single run (ARCHITECTURE, "Metrics
conventions"): per group, each study's mean Dice over the group's labels, then median ± MAD (unscaled)
over studies. Rows against a user-supplied reference segmentation are not part of this table.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dosebench.core.errors import InputError, OutputError
from dosebench.segmenter.metrics import ALL_GROUP, aggregate, dose_key, format_table1, format_table1_csv

__all__ = ["PER_LABEL_CSV", "REQUIRED_COLUMNS", "TITLE", "read_run", "table_from_runs", "write_table"]

#: Where a run folder keeps its per-label metrics.
PER_LABEL_CSV = Path("metrics") / "per_label.csv"
#: Columns of ``per_label.csv`` the table needs (the file has more).
REQUIRED_COLUMNS = ("study", "dose", "reference", "group", "label", "dice")
#: The reference whose rows make the table.
FULL_DOSE_REFERENCE = "full_dose"
#: Caption of the table; ``{n}`` is the number of studies.
TITLE = "Dice between low- and full-dose segmentations, median ± MAD over {n} studies"

_FIX_RUN = "pass output folders of `dosebench run` (each holds metrics/per_label.csv)"
_FIX_CSV = "re-create it with `dosebench run`, or leave this folder out"


def read_run(run_dir: Path) -> list[dict[str, Any]]:
    """The full-dose rows of one run folder's ``metrics/per_label.csv``.

    Returns
    -------
    list[dict]
        Rows with ``study`` (str), ``dose`` (float), ``group``, ``label`` (str) and ``dice`` (float),
        plus ``run`` (the folder).

    Raises
    ------
    InputError
        If the folder or its CSV is missing or unreadable, a required column is missing, a value is
        malformed, there are no full-dose rows, or the rows name more than one study.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run folder {run_dir} does not exist or is not a folder", fix=_FIX_RUN)
    path = run_dir / PER_LABEL_CSV
    if not path.is_file():
        raise InputError(f"run folder {run_dir} has no {PER_LABEL_CSV.as_posix()}", fix=_FIX_RUN)
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, strict=True)
            columns = reader.fieldnames or []
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise InputError(f"{path} lacks the column(s) {', '.join(missing)}", fix=_FIX_CSV)
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read {path} ({exc})", fix=_FIX_CSV) from exc

    rows: list[dict[str, Any]] = []
    for line, record in enumerate(records, start=2):  # line 1 is the header
        if None in record or any(record.get(c) is None for c in REQUIRED_COLUMNS):
            raise InputError(f"{path} line {line} has the wrong number of fields", fix=_FIX_CSV)
        if record["reference"] != FULL_DOSE_REFERENCE:
            continue
        try:
            dose = float(record["dose"])
            value = float(record["dice"])
        except ValueError:
            raise InputError(f"{path} line {line}: dose {record['dose']!r} or Dice {record['dice']!r} "
                             "is not a number", fix=_FIX_CSV) from None
        if not (math.isfinite(dose) and 0.0 < dose <= 1.0):
            raise InputError(f"{path} line {line}: dose {record['dose']!r} is not a fraction in (0, 1]",
                             fix=_FIX_CSV)
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise InputError(f"{path} line {line}: Dice {record['dice']!r} is not in [0, 1]", fix=_FIX_CSV)
        if not record["study"]:
            raise InputError(f"{path} line {line} has an empty study name", fix=_FIX_CSV)
        if record["group"] == ALL_GROUP:
            raise InputError(f"{path} line {line}: group name {ALL_GROUP!r} is reserved for the pooled row",
                             fix=_FIX_CSV)
        rows.append({"study": record["study"], "dose": dose, "group": record["group"],
                     "label": record["label"], "dice": value, "run": run_dir})
    if not rows:
        raise InputError(f"{path} has no rows with reference {FULL_DOSE_REFERENCE}", fix=_FIX_CSV)
    studies = sorted({row["study"] for row in rows})
    if len(studies) > 1:
        raise InputError(f"{path} holds {len(studies)} studies ({', '.join(studies)}); a run folder is one study",
                         fix=_FIX_CSV)
    return rows


def table_from_runs(run_dirs: Sequence[Path], *, scaled: bool = False) -> tuple[dict, list[float], list[dict]]:
    """Pool the full-dose per-label rows of several run folders and summarise them.

    Parameters
    ----------
    run_dirs : Sequence[Path]
        Output folders of ``dosebench run``, one study each.
    scaled : bool
        Report the scaled MAD (see :func:`dosebench.segmenter.metrics.median_mad`).

    Returns
    -------
    tuple[dict, list[float], list[dict]]
        ``(summary, doses, rows)``: :func:`~dosebench.segmenter.metrics.aggregate`'s summary, the dose
        fractions present (ascending), and the pooled rows. A row's ``study`` is the CSV's study name;
        where two runs carry the same name it becomes ``"name (folder)"`` (the folder's name, or its
        full path if the names collide too), so the two count as two studies.

    Raises
    ------
    InputError
        If no folders are given, a folder is given twice, or a folder's metrics are missing or malformed.
    """
    folders = [Path(d) for d in run_dirs]
    if not folders:
        raise InputError("no run folders given", fix="pass --runs DIR [DIR ...]")
    seen: dict[Path, Path] = {}
    for folder in folders:
        resolved = folder.resolve()
        if resolved in seen:
            raise InputError(f"run folder {folder} is given twice", fix="name each run folder once")
        seen[resolved] = folder

    per_run = [read_run(folder) for folder in folders]
    names = [runs[0]["study"] for runs in per_run]
    keys = list(names)
    for i, (name, folder) in enumerate(zip(names, folders, strict=True)):
        if names.count(name) > 1:
            keys[i] = f"{name} ({folder.name})"
    first_pass = list(keys)
    for i, (key, folder) in enumerate(zip(first_pass, folders, strict=True)):
        if first_pass.count(key) > 1:
            keys[i] = f"{names[i]} ({folder.resolve()})"

    rows = [{**row, "study": key} for key, runs in zip(keys, per_run, strict=True) for row in runs]
    summary = aggregate(rows, scaled=scaled)
    doses: dict[str, float] = {}
    for row in rows:
        doses.setdefault(dose_key(row["dose"]), row["dose"])
    return summary, sorted(doses.values()), rows


def _studies_in(summary: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> int:
    return max((int(cell["n"]) for cells in summary.values() for cell in cells.values()), default=0)


def write_table(
    summary: Mapping[str, Mapping[str, Mapping[str, Any]]],
    doses: Sequence[float],
    out_path: Path,
    *,
    n_studies: int | None = None,
) -> tuple[Path, Path]:
    """Write the Table 1 Markdown to ``out_path`` and its CSV beside it (same stem, ``.csv``).

    Parameters
    ----------
    summary, doses
        :func:`table_from_runs`'s first two results.
    out_path : Path
        The Markdown file (parent folders are created).
    n_studies : int, optional
        Number of studies for the caption; by default the largest ``n`` in ``summary``.

    Returns
    -------
    tuple[Path, Path]
        The Markdown and CSV paths.

    Raises
    ------
    InputError
        If ``out_path`` ends in ``.csv`` (the CSV would overwrite it).
    OutputError
        If the files cannot be written.
    """
    out_path = Path(out_path)
    if out_path.suffix.lower() == ".csv":
        raise InputError(f"--out {out_path} ends in .csv, the name of the CSV written beside the report",
                         fix="give the Markdown file's name, e.g. --out report.md")
    csv_path = out_path.with_suffix(".csv")
    n = _studies_in(summary) if n_studies is None else int(n_studies)
    markdown = format_table1(summary, doses, TITLE.format(n=n))
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(markdown, encoding="utf-8")
        csv_path.write_text(format_table1_csv(summary, doses), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {out_path} ({exc.strerror or exc})", fix="choose a writable --out") from exc
    return out_path, csv_path

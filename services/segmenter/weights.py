"""TotalSegmentator weights: where they are, whether they are complete, and how to fetch them.

dosebench workers never download anything: TotalSegmentator downloads a model whenever its dataset
folder is missing, so :func:`check_weights` refuses to start a segmentation unless every file the
nnU-Net predictor reads is already on disk. Weights are fetched ahead of time on a connected machine
with ``dosebench weights download`` (which calls TotalSegmentator's own download function) or mounted.

Where the weights are (first that is set)::

    DOSEBENCH_TOTALSEG_WEIGHTS      dosebench's setting
    TOTALSEG_WEIGHTS_PATH           TotalSegmentator's own (config.get_weights_dir)
    $TOTALSEG_HOME_DIR/nnunet/results
    ~/.totalsegmentator/nnunet/results   (/tmp/.totalsegmentator/... when the home folder is "/")

Layout (nnU-Net v2 results folder, as TotalSegmentator 2.18.0 unpacks its release zips)::

    <weights>/Dataset291_TotalSegmentator_part1_organs_1559subj/
        nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/
            plans.json  dataset.json  fold_0/checkpoint_final.pth

The dataset folder names, trainers and plans below are those of TotalSegmentator 2.18.0
(``map_tasks_config.TASK_CONFIGS["total"]`` and ``TASK_ID_WEIGHTS_CONFIGS``); a test checks they
still agree with the installed package. This module imports neither torch nor TotalSegmentator unless
asked to download.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from dosebench.core.errors import InputError

__all__ = [
    "DATASETS",
    "MODES",
    "DatasetStatus",
    "Model",
    "check_weights",
    "download_weights",
    "required_files",
    "resolve_weights_dir",
    "weights_app",
    "weights_status",
]

#: Environment variable naming the weights folder for dosebench (wins over TotalSegmentator's).
WEIGHTS_ENV = "DOSEBENCH_TOTALSEG_WEIGHTS"
PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"
FOLD = 0
CHECKPOINT = "checkpoint_final.pth"


@dataclass(frozen=True)
class Model:
    """One nnU-Net model TotalSegmentator runs for the ``total`` task."""

    dataset_id: int
    folder: str  # the dataset folder (also the release zip's name)
    trainer: str  # the trainer part of the model folder's name
    spacing_mm: float  # TotalSegmentator resamples the input to this before nnU-Net
    part: str | None  # class_map_5_parts key for a part model; None for the 117-class model

    @property
    def model_dir(self) -> str:
        return f"{self.folder}/{self.trainer}__{PLANS}__{CONFIGURATION}"


_FIVE_PARTS = "nnUNetTrainerNoMirroring"
_THREE_MM = "nnUNetTrainer_4000epochs_NoMirroring"

#: Dataset id -> model, as TotalSegmentator 2.18.0 names and runs them.
DATASETS: dict[int, Model] = {
    291: Model(291, "Dataset291_TotalSegmentator_part1_organs_1559subj", _FIVE_PARTS, 1.5, "class_map_part_organs"),
    292: Model(292, "Dataset292_TotalSegmentator_part2_vertebrae_1532subj", _FIVE_PARTS, 1.5,
               "class_map_part_vertebrae"),
    293: Model(293, "Dataset293_TotalSegmentator_part3_cardiac_1559subj", _FIVE_PARTS, 1.5, "class_map_part_cardiac"),
    294: Model(294, "Dataset294_TotalSegmentator_part4_muscles_1559subj", _FIVE_PARTS, 1.5, "class_map_part_muscles"),
    295: Model(295, "Dataset295_TotalSegmentator_part5_ribs_1559subj", _FIVE_PARTS, 1.5, "class_map_part_ribs"),
    297: Model(297, "Dataset297_TotalSegmentator_total_3mm_1559subj", _THREE_MM, 3.0, None),
}

#: dosebench mode -> the datasets it needs ("total": the five 1.5 mm parts; "fast": the 3 mm model).
MODES: dict[str, tuple[int, ...]] = {"total": (291, 292, 293, 294, 295), "fast": (297,)}


def required_files(dataset_id: int) -> list[str]:
    """Paths (relative to the weights folder) the nnU-Net predictor reads for one dataset, fold 0."""
    model = DATASETS[dataset_id]
    return [f"{model.model_dir}/plans.json", f"{model.model_dir}/dataset.json",
            f"{model.model_dir}/fold_{FOLD}/{CHECKPOINT}"]


def resolve_weights_dir(explicit: Path | str | None = None) -> Path:
    """The weights folder: ``explicit``, else the environment as described in the module docstring."""
    if explicit is not None and str(explicit) != "":
        return Path(explicit).expanduser()
    for name in (WEIGHTS_ENV, "TOTALSEG_WEIGHTS_PATH"):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser()
    if os.environ.get("TOTALSEG_HOME_DIR"):
        home = Path(os.environ["TOTALSEG_HOME_DIR"]).expanduser()
    else:
        # as totalsegmentator.config.get_totalseg_dir: in containers the home folder may be "/"
        home = (Path("/tmp") if str(Path.home()) == "/" else Path.home()) / ".totalsegmentator"
    return home / "nnunet" / "results"


@dataclass(frozen=True)
class DatasetStatus:
    dataset_id: int
    folder: str
    present: bool
    missing: tuple[str, ...]  # relative paths of the missing files
    folder_exists: bool = True

    def describe(self) -> str:
        """``ok``, ``folder missing`` or the missing files below the dataset folder."""
        if self.present:
            return "ok"
        if not self.folder_exists:
            return "folder missing"
        return "missing " + ", ".join(m.split("/", 1)[1] for m in self.missing)


def weights_status(path: Path | str | None = None, datasets: tuple[int, ...] | None = None) -> list[DatasetStatus]:
    """Which datasets are complete in the weights folder ``path`` (default: :func:`resolve_weights_dir`).

    Parameters
    ----------
    path : Path or str, optional
        The weights folder.
    datasets : tuple of int, optional
        Dataset ids to check; default every dataset in :data:`DATASETS`.

    Returns
    -------
    list of DatasetStatus
        One per dataset: ``present`` is True when no required file is missing.
    """
    root = resolve_weights_dir(path)
    found = []
    for dataset_id in datasets or tuple(DATASETS):
        missing = tuple(rel for rel in required_files(dataset_id) if not (root / rel).is_file())
        folder = DATASETS[dataset_id].folder
        found.append(DatasetStatus(dataset_id, folder, not missing, missing, (root / folder).is_dir()))
    return found


def check_weights(mode: str, path: Path | str | None = None) -> Path:
    """Raise :class:`InputError` unless every dataset ``mode`` needs is complete; return the folder."""
    root = resolve_weights_dir(path)
    incomplete = [s for s in weights_status(root, MODES[mode]) if not s.present]
    if incomplete:
        described = "; ".join(f"{s.folder} ({s.describe()})" for s in incomplete)
        flag = " --fast" if mode == "fast" else ""
        raise InputError(
            f"TotalSegmentator weights incomplete in {root}: {described}",
            fix=f"check with `dosebench weights status`; fetch them on a connected machine with "
                f"`dosebench weights download{flag}` and copy or mount the folder here, then point "
                f"{WEIGHTS_ENV} (or TOTALSEG_WEIGHTS_PATH) at it — dosebench never downloads while segmenting",
        )
    return root


def download_weights(path: Path | str | None = None, datasets: tuple[int, ...] = MODES["total"] + MODES["fast"],
                     ) -> list[DatasetStatus]:
    """Fetch missing datasets with TotalSegmentator's own ``download_pretrained_weights``.

    Only meaningful on a machine with internet access. A dataset folder that exists but is incomplete
    is refused (TotalSegmentator would skip it because the folder exists): remove it first.
    """
    root = resolve_weights_dir(path)
    status = weights_status(root, datasets)
    broken = [s.folder for s in status if not s.present and (root / s.folder).exists()]
    if broken:
        raise InputError(f"incomplete dataset folders in {root}: {', '.join(broken)}",
                         fix="delete (or move away) these folders and download again")
    todo = [s.dataset_id for s in status if not s.present]
    if todo:
        try:
            from totalsegmentator import libs  # type: ignore[import-not-found]
        except ImportError:
            raise InputError("TotalSegmentator is not installed",
                             fix="pip install 'dosebench[totalseg]' on the connected machine") from None
        previous = os.environ.get("TOTALSEG_WEIGHTS_PATH")
        os.environ["TOTALSEG_WEIGHTS_PATH"] = str(root)  # get_weights_dir() reads it at call time
        try:
            root.mkdir(parents=True, exist_ok=True)
            for dataset_id in todo:
                libs.download_pretrained_weights(dataset_id)
        finally:
            if previous is None:
                os.environ.pop("TOTALSEG_WEIGHTS_PATH", None)
            else:
                os.environ["TOTALSEG_WEIGHTS_PATH"] = previous
    return weights_status(root, datasets)


weights_app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                          help="TotalSegmentator weights: check them, or fetch them on a connected machine.")

PathOpt = Annotated[Path | None, typer.Option(
    "--path", help=f"weights folder (default: ${WEIGHTS_ENV}, $TOTALSEG_WEIGHTS_PATH, "
                   "$TOTALSEG_HOME_DIR/nnunet/results or ~/.totalsegmentator/nnunet/results)")]


def _print_status(root: Path, status: list[DatasetStatus]) -> None:
    typer.echo(f"weights folder: {root}")
    for s in status:
        typer.echo(f"  {s.dataset_id}  {s.folder}  {s.describe()}")
    for mode, ids in MODES.items():
        ready = all(s.present for s in status if s.dataset_id in ids)
        spec = "totalsegmentator" if mode == "total" else "totalsegmentator:fast"
        typer.echo(f"{spec}: {'ready' if ready else 'not ready'}")


@weights_app.command("status")
def status_command(path: PathOpt = None) -> None:
    """List each TotalSegmentator dataset dosebench uses and whether its files are all there."""
    root = resolve_weights_dir(path)
    status = weights_status(root)
    _print_status(root, status)
    if not all(s.present for s in status):
        raise typer.Exit(code=1)


@weights_app.command("download")
def download_command(path: PathOpt = None,
                     fast: Annotated[bool, typer.Option("--fast", help="only the 3 mm model (297)")] = False) -> None:
    """Download the missing datasets (needs internet; run it on a connected machine)."""
    from rich.console import Console
    from rich.markup import escape

    root = resolve_weights_dir(path)
    try:
        status = download_weights(root, MODES["fast"] if fast else MODES["total"] + MODES["fast"])
    except InputError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(code=2) from None
    _print_status(root, status)

"""Any nnU-Net v2 trained model as a segmenter: ``nnunet:/path/to/model_folder[?query]``, run in a child process.

Spec syntax::

    nnunet:/path/to/model_folder
    nnunet:/path/to/model_folder?fold=0,1,2&checkpoint=checkpoint_best.pth&tta=1

``model_folder`` is an nnU-Net v2 trained-model folder, the one holding ``plans.json``, ``dataset.json`` and
``fold_X/<checkpoint>`` (e.g. ``.../Dataset123_Liver/nnUNetTrainer__nnUNetPlans__3d_fullres``); a relative
path is taken from the current directory. Query keys (all optional, each at most once):

``fold``
    ``0`` (default), a comma list such as ``0,1,2`` (the folds' predictions are averaged) or ``all``
    (the ``fold_all`` model).
``checkpoint``
    the checkpoint file name in each fold folder; default ``checkpoint_final.pth``.
``tta``
    ``0`` (default: no mirroring) or ``1`` (test-time augmentation: mirroring along the axes the
    checkpoint allows).

Labels and their names come from ``dataset.json``'s ``labels`` (name -> id; ``background`` is 0, an
``ignore`` label is never predicted). Region-based models (ids given as lists) are refused. Each label's
group is the dataset name (``dataset.json``'s ``name``, else the ``DatasetNNN_Name`` parent folder), unless
``dataset.json`` carries a ``groups`` mapping: either label name -> group, or group -> list of label names
(labels it leaves out keep the dataset name).

Everything is checked when the segmenter is made (folder, json files, folds, checkpoints, the labels), so
a bad spec fails before any simulation. The prediction runs in ``python -m dosebench.segmenter.nnunet_child``
with the process handling of the TotalSegmentator backend (own session, killed with its workers on
timeout or interrupt, ends if its parent dies, network refused): the volume goes to it as a temporary
NIfTI with the volume's affine (nnU-Net resamples to the plans' spacing and back itself) and the label map
comes back on the same grid. nnU-Net's sliding window runs with its default step 0.5 and Gaussian weighting.

Settings (environment): ``DOSEBENCH_NNUNET_DEVICE`` (``auto``, ``cpu`` or ``gpu``; default ``auto``: the GPU
when CUDA is available), ``DOSEBENCH_NNUNET_TIMEOUT_S`` (seconds per call; default none),
``DOSEBENCH_NNUNET_MODELS_ROOT`` (when set, a model folder must lie inside it once symbolic links are
resolved: anyone who may submit jobs could otherwise make a worker load any checkpoint file on its disk,
and nnU-Net checkpoints are pickles; the API, the workers and the CLI all check it; docker-compose.yml and
deploy/k8s set it to the read-only ``/weights`` mount).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dosebench.core.errors import InputError

from .labels import LabelInfo, Segmentation
from .totalseg import (
    SegmenterFailed,
    _tail,
    _usable_cpus,
    _version,
    _write_input,
    child_failure,
    device_setting,
    read_child_labels,
    run_child,
    timeout_setting,
)

__all__ = ["PREFIX", "NnunetModel", "SegmenterFailed", "make_nnunet", "parse_spec", "run_nnunet"]

PREFIX = "nnunet:"
MODELS_ROOT_ENV = "DOSEBENCH_NNUNET_MODELS_ROOT"
SPEC_SYNTAX = "nnunet:/path/to/model_folder[?fold=0|0,1,2|all&checkpoint=checkpoint_final.pth&tta=0|1]"
CHILD_MODULE = "dosebench.segmenter.nnunet_child"
QUERY_KEYS = ("fold", "checkpoint", "tta")
#: nnU-Net's default sliding-window step (nnUNetPredictor(tile_step_size=0.5))
STEP_SIZE = 0.5
FILE_ENDINGS = (".nii.gz", ".nii")
_DATASET_FOLDER = re.compile(r"^Dataset\d{3}_.+$")


@dataclass(frozen=True)
class NnunetSpec:
    folder: Path
    folds: tuple[str, ...] = ("0",)
    checkpoint: str = "checkpoint_final.pth"
    tta: bool = False


@dataclass(frozen=True)
class NnunetModel:
    """A checked trained-model folder: what the child needs and what the provenance records."""

    spec: NnunetSpec
    dataset_name: str
    table: dict[int, LabelInfo]
    file_ending: str
    trainer: str
    configuration: str
    plans_name: str
    channel: str


def _bad_spec(spec: str, problem: str) -> InputError:
    return InputError(f"segmenter {spec!r}: {problem}", fix=f"write it as {SPEC_SYNTAX}")


def parse_spec(spec: str) -> NnunetSpec:
    """Parse ``nnunet:<folder>[?fold=..&checkpoint=..&tta=..]`` (no file checks)."""
    text = spec.strip()
    if text[:len(PREFIX)].lower() != PREFIX:
        raise _bad_spec(spec, f"does not start with {PREFIX!r}")
    rest = text[len(PREFIX):]
    path, _, query = rest.partition("?")
    if not path.strip():
        raise _bad_spec(spec, "names no model folder")
    values: dict[str, str] = {}
    for item in query.split("&") if query else []:
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if key not in QUERY_KEYS:
            raise InputError(f"segmenter {spec!r}: unknown option {key or item!r}",
                             fix=f"use only {', '.join(QUERY_KEYS)}: {SPEC_SYNTAX}")
        if not eq or not value.strip():
            raise _bad_spec(spec, f"option {key!r} has no value")
        if key in values:
            raise _bad_spec(spec, f"option {key!r} is given twice")
        values[key] = value.strip()

    folds: list[str] = []
    for part in values.get("fold", "0").split(","):
        part = part.strip().lower()
        if part != "all" and not part.isdigit():
            raise _bad_spec(spec, f"fold {part!r} is not a fold number or 'all'")
        part = part if part == "all" else str(int(part))
        if part not in folds:
            folds.append(part)

    checkpoint = values.get("checkpoint", "checkpoint_final.pth")
    if "/" in checkpoint or "\\" in checkpoint or checkpoint in (".", ".."):
        raise _bad_spec(spec, f"checkpoint {checkpoint!r} must be a file name inside fold_X/, not a path")

    tta_raw = values.get("tta", "0").lower()
    if tta_raw not in ("0", "1", "false", "true", "no", "yes"):
        raise _bad_spec(spec, f"tta={values['tta']!r} is not 0 or 1")
    tta = tta_raw in ("1", "true", "yes")
    folder = Path(path.strip()).expanduser()
    check_models_root(folder.absolute(), spec)
    return NnunetSpec(folder=folder.absolute(), folds=tuple(folds), checkpoint=checkpoint, tta=tta)


def check_models_root(folder: Path, spec: str) -> None:
    """Refuse a model folder outside ``DOSEBENCH_NNUNET_MODELS_ROOT`` (when set), links resolved."""
    root_text = os.environ.get(MODELS_ROOT_ENV, "").strip()
    if not root_text:
        return
    root = Path(root_text).expanduser().resolve()
    if not folder.resolve().is_relative_to(root):
        raise InputError(f"segmenter {spec!r}: the model folder {folder} is outside {MODELS_ROOT_ENV} ({root})",
                         fix=f"put the trained-model folder under {root} (or ask the administrator to change "
                             f"{MODELS_ROOT_ENV})")


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise InputError(f"the nnU-Net model folder has no {what}: {path} is missing",
                         fix="give the trained-model folder itself (the one holding plans.json, dataset.json "
                             "and fold_X/), e.g. .../DatasetNNN_Name/nnUNetTrainer__nnUNetPlans__3d_fullres")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}", fix=f"restore the model's {what}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} is not a JSON object", fix=f"restore the model's {what}")
    return data


def _label_table(dataset: dict, path: Path, group_default: str) -> dict[int, LabelInfo]:
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise InputError(f"{path} has no 'labels' mapping (name -> id)", fix="restore the model's dataset.json")
    regions = "regions_class_order" in dataset or any(isinstance(v, (list, tuple)) for v in labels.values())
    if regions:
        raise InputError(f"{path} describes a region-based nnU-Net model (label ids given as lists of regions); "
                         "dosebench needs one id per label",
                         fix="use a model trained with plain labels (name -> integer id)")
    ids: dict[str, int] = {}
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).strip().isdigit():
            raise InputError(f"{path}: label {name!r} has id {value!r}, not a non-negative integer",
                             fix="restore the model's dataset.json")
        ids[str(name)] = int(value)
    ignore = {n for n in ids if n == "ignore"}
    predicted = sorted(i for n, i in ids.items() if n not in ignore)
    if predicted != list(range(len(predicted))) or len(set(ids.values())) != len(ids):
        raise InputError(f"{path}: label ids {predicted} are not consecutive from 0 (background) without gaps "
                         "or repeats, as nnU-Net requires", fix="restore the model's dataset.json")
    if predicted[-1] > 65535:
        raise InputError(f"{path}: label id {predicted[-1]} does not fit a uint16 label map",
                         fix="use a model with at most 65535 labels")

    group_of: dict[str, str] = {}
    groups = dataset.get("groups")
    if groups is not None:
        if not isinstance(groups, dict):
            raise InputError(f"{path}: 'groups' is not a mapping",
                             fix="write it as label name -> group, or group -> [label names]")
        for key, value in groups.items():
            pairs = [(str(value), str(key))] if isinstance(value, str) else \
                [(str(key), str(n)) for n in value] if isinstance(value, list) else None
            if pairs is None:
                raise InputError(f"{path}: groups entry {key!r}: {value!r} is neither a group name nor a list "
                                 "of label names", fix="write label name -> group, or group -> [label names]")
            for group, name in pairs:
                if name not in ids or ids[name] == 0 or name in ignore:
                    raise InputError(f"{path}: 'groups' names {name!r}, not a predicted label of 'labels'",
                                     fix="name only labels of dataset.json's 'labels' (not background)")
                group_of[name] = group
    return {i: LabelInfo(i, name, group_of.get(name, group_default))
            for name, i in sorted(ids.items(), key=lambda item: item[1]) if i > 0 and name not in ignore}


def _dataset_name(dataset: dict, folder: Path) -> str:
    name = dataset.get("name")
    if isinstance(name, str) and name.strip():
        return name.strip()
    if _DATASET_FOLDER.match(folder.parent.name):
        return folder.parent.name
    return folder.name


def _read_checkpoint(path: Path) -> dict:
    """The checkpoint's metadata; ``mmap`` keeps the weights on disk (cheap even for big models)."""
    import torch

    try:
        try:
            checkpoint = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
        except Exception:  # noqa: BLE001 - real nnU-Net checkpoints may pickle more than weights_only allows
            checkpoint = torch.load(str(path), map_location="cpu", mmap=True, weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"cannot read the nnU-Net checkpoint {path}: {type(exc).__name__}: {exc}",
                         fix="restore the checkpoint (train or copy it again)") from exc
    if not isinstance(checkpoint, dict) or "trainer_name" not in checkpoint or "init_args" not in checkpoint:
        raise InputError(f"{path} is not an nnU-Net v2 checkpoint (no trainer_name/init_args)",
                         fix="give a folder trained with nnU-Net v2")
    return checkpoint


def check_model(spec: NnunetSpec) -> NnunetModel:
    """Check the trained-model folder ``spec`` names; every problem is an :class:`InputError` with its fix."""
    folder = spec.folder
    if not folder.is_dir():
        raise InputError(f"the nnU-Net model folder {folder} does not exist" if not folder.exists() else
                         f"{folder} is not a folder",
                         fix="give the trained-model folder (holding plans.json, dataset.json and fold_X/) "
                             f"as {SPEC_SYNTAX}")
    plans = _read_json(folder / "plans.json", "plans.json")
    dataset = _read_json(folder / "dataset.json", "dataset.json")
    name = _dataset_name(dataset, folder)
    table = _label_table(dataset, folder / "dataset.json", name)

    channels = dataset.get("channel_names", dataset.get("modality"))
    if not isinstance(channels, dict) or len(channels) != 1:
        raise InputError(f"{folder / 'dataset.json'}: the model takes {len(channels) if isinstance(channels, dict) else 'unknown'} "
                         "input channels; dosebench gives one (CT)",
                         fix="use a single-channel CT model")
    channel = str(next(iter(channels.values())))
    file_ending = str(dataset.get("file_ending", ""))
    if file_ending.lower() not in FILE_ENDINGS:
        raise InputError(f"{folder / 'dataset.json'}: file_ending {file_ending!r} is not NIfTI",
                         fix="use a model trained on .nii.gz or .nii images")

    missing = [folder / f"fold_{f}" / spec.checkpoint for f in spec.folds
               if not (folder / f"fold_{f}" / spec.checkpoint).is_file()]
    if missing:
        first = missing[0]
        present = sorted(p.name for p in folder.glob("fold_*") if (p / spec.checkpoint).is_file())
        if not first.parent.is_dir():
            problem = f"the nnU-Net model has no {first.parent.name}: {first.parent} is missing"
        else:
            problem = f"the nnU-Net model's {first.parent.name} has no {spec.checkpoint}: {first} is missing"
        others = ", ".join(str(p) for p in missing[1:])
        raise InputError(problem + (f" (also missing: {others})" if others else ""),
                         fix=(f"choose folds that exist with ?fold=... (with {spec.checkpoint}: "
                              f"{', '.join(present) or 'none'}) or ?checkpoint=<file>, or copy the missing file"))

    checkpoint = _read_checkpoint(folder / f"fold_{spec.folds[0]}" / spec.checkpoint)
    trainer = str(checkpoint["trainer_name"])
    configuration = str(checkpoint["init_args"].get("configuration", ""))
    configurations = plans.get("configurations")
    if not isinstance(configurations, dict) or configuration not in configurations:
        raise InputError(f"the checkpoint was trained with configuration {configuration!r}, which "
                         f"{folder / 'plans.json'} does not define",
                         fix="give the plans.json the model was trained with")
    if configurations[configuration].get("previous_stage"):
        raise InputError(f"{folder} is a cascade stage ({configuration}); it needs the previous stage's "
                         "segmentation as input", fix="use a 3d_fullres (or 2d / 3d_lowres) model")
    return NnunetModel(spec=spec, dataset_name=name, table=table, file_ending=file_ending.lower(),
                       trainer=trainer, configuration=configuration,
                       plans_name=str(plans.get("plans_name", "")), channel=channel)


def _require_installed() -> None:
    for module in ("nnunetv2", "torch"):
        if importlib.util.find_spec(module) is None:
            raise InputError(f"the nnU-Net backend needs the Python package {module!r}, not installed",
                             fix="pip install 'dosebench[totalseg]' (or use --segmenter threshold)")


def provenance(model: NnunetModel, device: str, timeout_s: float | None) -> dict:
    spec = model.spec
    return {
        "backend": "nnunet",
        "model_folder": str(spec.folder),
        "dataset": model.dataset_name,
        "folds": [f if f == "all" else int(f) for f in spec.folds],
        "checkpoint": spec.checkpoint,
        "trainer": model.trainer,
        "plans": model.plans_name,
        "configuration": model.configuration,
        "test_time_augmentation": spec.tta, "mirroring": spec.tta, "step_size": STEP_SIZE,
        "input_channel": model.channel,
        "labels": len(model.table),
        "label_map": "dataset.json labels; groups from dataset.json 'groups' or the dataset name",
        "device": device, "timeout_s": timeout_s,
        "runs_in": f"child process (python -m {CHILD_MODULE})",
        "versions": {p: _version(p) for p in ("nnunetv2", "torch")},
    }


def make_nnunet(spec: str, timeout_s: float | None = None, device: str | None = None):
    """The nnU-Net backend for ``spec`` (``nnunet:<folder>[?...]``); refuses a bad model folder now."""
    from .backends import Segmenter

    parsed = parse_spec(spec)
    _require_installed()
    model = check_model(parsed)
    device = device or device_setting("DOSEBENCH_NNUNET_DEVICE")
    if device not in ("auto", "cpu", "gpu"):
        raise InputError(f"nnU-Net device {device!r} is not a device", fix="use auto, cpu or gpu")
    timeout_s = timeout_s if timeout_s is not None else timeout_setting("DOSEBENCH_NNUNET_TIMEOUT_S")

    def segment(hu: np.ndarray, spacing_mm: tuple[float, float, float],
                affine: np.ndarray | None = None, should_cancel: Callable[[], bool] | None = None) -> Segmentation:
        return run_nnunet(hu, spacing_mm, affine, model=model, device=device, timeout_s=timeout_s,
                          should_cancel=should_cancel)

    return Segmenter(spec=spec.strip(), segment=segment, provenance=provenance(model, device, timeout_s))


def _failure(returncode: int, log: Path) -> SegmenterFailed:
    return child_failure("nnU-Net", returncode, _tail(log),
                         memory_fix="give the worker more memory, or segment a smaller volume",
                         network_problem="tried to reach the network",
                         network_fix="the model must run offline; check the trainer class it uses",
                         failed_fix="check the input volume and the model folder "
                                    "(its trainer class must be importable)")


def run_nnunet(hu: np.ndarray, spacing_mm: tuple[float, float, float], affine: np.ndarray | None, *,
               model: NnunetModel, device: str = "auto", timeout_s: float | None = None,
               on_start: Callable[[subprocess.Popen], None] | None = None,
               should_cancel: Callable[[], bool] | None = None) -> Segmentation:
    """Segment ``hu`` (canonical array, HU) with the nnU-Net model in a child process."""
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise InputError(f"nnU-Net needs a 3D volume, got shape {hu.shape}", fix="give a CT volume")
    spec = model.spec
    for fold in spec.folds:  # the files may have gone since the segmenter was made
        path = spec.folder / f"fold_{fold}" / spec.checkpoint
        if not path.is_file():
            raise InputError(f"the nnU-Net checkpoint {path} is missing", fix="restore the model folder")
    if affine is None:
        affine = np.diag([*map(float, spacing_mm), 1.0])
    affine = np.asarray(affine, dtype=np.float64)
    table = model.table

    scratch = Path(tempfile.mkdtemp(prefix="dosebench-nnunet-"))
    try:
        source = scratch / f"ct_0000{model.file_ending}"
        target, log_path = scratch / f"seg{model.file_ending}", scratch / "child.log"
        _write_input(hu, affine, source)
        env = dict(os.environ)
        env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
        env.setdefault("nnUNet_def_n_proc", str(min(8, _usable_cpus())))
        for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # silences nnU-Net's warnings
            env.setdefault(name, str(scratch))
        command = [sys.executable, "-m", CHILD_MODULE, str(source), str(target), "--model", str(spec.folder),
                   "--folds", ",".join(spec.folds), "--checkpoint", spec.checkpoint, "--device", device]
        if spec.tta:
            command.append("--tta")
        try:
            returncode = run_child(command, env=env, cwd=scratch, log_path=log_path, timeout_s=timeout_s,
                                   should_cancel=should_cancel, on_start=on_start)
        except subprocess.TimeoutExpired:
            raise SegmenterFailed(f"nnU-Net did not finish within {timeout_s:g} s and was stopped",
                                  fix="raise DOSEBENCH_NNUNET_TIMEOUT_S or use a GPU worker") from None
        if returncode != 0 or not target.is_file():
            raise _failure(returncode, log_path)
        return read_child_labels(target, hu, affine, table, who="nnU-Net",
                                 grid_fix="report this with the input volume's header and the model's plans.json",
                                 ids_problem="dataset.json's labels", ids_fix="check the model folder's dataset.json")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

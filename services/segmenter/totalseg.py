"""The TotalSegmentator backend: TotalSegmentator 2.18.0's ``total`` task, run in a child process.

Specs::

    totalsegmentator        the five 1.5 mm part models (datasets 291-295: organs, vertebrae, cardiac,
                            muscles, ribs), combined into the 117-class ``total`` map
    totalsegmentator:fast   the single 3 mm model (dataset 297), which predicts the 117 classes directly

Both as TotalSegmentator runs them by default: fold 0, no test-time augmentation (no mirroring),
sliding-window step 0.8, the input resampled to the model's spacing and the labels back with
nearest-neighbour. Each label's group is its part of ``class_map_5_parts`` (``organs``,
``vertebrae``, ``cardiac``, ``muscles``, ``ribs``), for the fast model too.

Why a child process (``python -m dosebench.segmenter.totalseg_child``): it can be killed (timeout,
cancelled task), it gives back all of nnU-Net's memory when it ends, and nnU-Net may start its own
worker processes, which a daemonic Celery worker process may not do. The volume goes to the child as a
temporary NIfTI with the volume's affine and comes back the same way; the temporary folder (which also
holds the child's TotalSegmentator home, so each call has its own ``config.json`` with usage statistics
off) is removed whatever happens.

Settings (environment): ``DOSEBENCH_TOTALSEG_WEIGHTS`` (see :mod:`dosebench.segmenter.weights`),
``DOSEBENCH_TOTALSEG_DEVICE`` (``auto``, ``cpu`` or ``gpu``; default ``auto``: the GPU when CUDA is
available), ``DOSEBENCH_TOTALSEG_TIMEOUT_S`` (seconds per call; default none).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np

from dosebench.core.errors import Cancelled, DosebenchError, InputError

from . import weights as w
from .labels import LabelInfo, Segmentation

__all__ = ["SPECS", "SegmenterFailed", "label_table", "make_totalsegmentator"]

#: spec -> dosebench mode (see weights.MODES)
SPECS = {"totalsegmentator": "total", "totalsegmentator:fast": "fast"}

CHILD_MODULE = "dosebench.segmenter.totalseg_child"
#: TotalSegmentator's sliding-window step for the total task (nnunet.nnUNet_predict_image)
STEP_SIZE = 0.8
#: lines of the child's output quoted in an error
LOG_TAIL = 15


class SegmenterFailed(DosebenchError):
    """The segmentation model did not finish: crashed, killed (out of memory) or timed out."""


def _require_installed() -> None:
    for module in ("totalsegmentator", "nnunetv2", "torch"):
        if importlib.util.find_spec(module) is None:
            raise InputError(f"the TotalSegmentator backend needs the Python package {module!r}, not installed",
                             fix="pip install 'dosebench[totalseg]' (or use --segmenter threshold)")


def label_table() -> dict[int, LabelInfo]:
    """The 117 labels of TotalSegmentator's ``total`` map, each grouped by its part model."""
    from totalsegmentator.map_to_binary import class_map, class_map_5_parts  # type: ignore[import-not-found]

    group_of = {name: part.removeprefix("class_map_part_")
                for part, names in class_map_5_parts.items() if part.startswith("class_map_part_")
                for name in names.values()}
    return {int(i): LabelInfo(int(i), name, group_of.get(name, "other"))
            for i, name in sorted(class_map["total"].items())}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def device_setting(variable: str) -> str:
    """A child-process segmenter's device from the environment variable ``variable``: auto, cpu or gpu."""
    device = os.environ.get(variable, "auto").strip().lower() or "auto"
    if device not in ("auto", "cpu", "gpu"):
        raise InputError(f"{variable}={device!r} is not a device", fix="set it to auto, cpu or gpu (or unset it)")
    return device


def timeout_setting(variable: str) -> float | None:
    """A child-process segmenter's time limit (s) from ``variable``; unset means no limit."""
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise InputError(f"{variable}={raw!r} is not a positive number of seconds",
                         fix="set it to e.g. 3600, or unset it for no limit")
    return value


def provenance(mode: str, weights_dir: Path, device: str, timeout_s: float | None) -> dict:
    models = [w.DATASETS[i] for i in w.MODES[mode]]
    return {
        "backend": "totalsegmentator",
        "task": "total",
        "mode": "five 1.5 mm part models" if mode == "total" else "fast: one 3 mm model",
        "datasets": [{"id": m.dataset_id, "folder": m.folder, "trainer": m.trainer, "part": m.part}
                     for m in models],
        "plans": w.PLANS, "configuration": w.CONFIGURATION, "folds": [w.FOLD], "checkpoint": w.CHECKPOINT,
        "resample_mm": models[0].spacing_mm,
        "test_time_augmentation": False, "mirroring": False, "step_size": STEP_SIZE,
        "label_map": "class_map['total'] (117 classes); groups from class_map_5_parts",
        "weights_dir": str(weights_dir),
        "device": device, "timeout_s": timeout_s,
        "runs_in": f"child process (python -m {CHILD_MODULE})",
        "versions": {p: _version(p) for p in ("totalsegmentator", "nnunetv2", "torch")},
    }


def make_totalsegmentator(spec: str, weights_dir: Path | str | None = None, timeout_s: float | None = None,
                          device: str | None = None):
    """The TotalSegmentator backend for ``spec`` (a key of :data:`SPECS`); refuses missing weights now."""
    from .backends import Segmenter

    mode = SPECS[spec]
    _require_installed()
    root = w.check_weights(mode, weights_dir)
    device = device or device_setting("DOSEBENCH_TOTALSEG_DEVICE")
    if device not in ("auto", "cpu", "gpu"):
        raise InputError(f"TotalSegmentator device {device!r} is not a device", fix="use auto, cpu or gpu")
    timeout_s = timeout_s if timeout_s is not None else timeout_setting("DOSEBENCH_TOTALSEG_TIMEOUT_S")
    table = label_table()

    def segment(hu: np.ndarray, spacing_mm: tuple[float, float, float],
                affine: np.ndarray | None = None, should_cancel: Callable[[], bool] | None = None) -> Segmentation:
        return run_totalsegmentator(hu, spacing_mm, affine, mode=mode, weights_dir=root, device=device,
                                    timeout_s=timeout_s, table=table, should_cancel=should_cancel)

    return Segmenter(spec=spec, segment=segment, provenance=provenance(mode, root, device, timeout_s))


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _write_input(hu: np.ndarray, affine: np.ndarray, path: Path) -> None:
    data = np.asarray(hu)
    rounded = np.rint(data)
    if np.array_equal(rounded, data) and data.min() >= -32768 and data.max() <= 32767:
        data = rounded.astype(np.int16)  # HU as stored: 2 bytes a voxel, compresses well
    else:
        data = data.astype(np.float32)
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))


def _write_home(home: Path) -> None:
    """TotalSegmentator's config.json, written before it can write its own (which sends statistics)."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.json").write_text(json.dumps({
        "totalseg_id": "totalseg_dosebench", "send_usage_stats": False, "prediction_counter": 0,
        "statistics_disclaimer_shown": True}, indent=4))


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the child and every process it started (its own session), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass


def _tail(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL:])


def child_failure(tool: str, returncode: int, tail: str, *, memory_fix: str, network_problem: str,
                  network_fix: str, failed_fix: str) -> SegmenterFailed:
    """What a segmentation child's exit means, for ``tool`` (TotalSegmentator, nnU-Net): killed or out of
    memory, refused network access (exit code 3, the child's guard), stopped by a signal, or failed;
    with the end of its output and the fix for each case."""
    if returncode in (-signal.SIGKILL, 128 + signal.SIGKILL) or "MemoryError" in tail or \
            "out of memory" in tail.lower():
        problem = (f"{tool} ran out of memory" if "memory" in tail.lower() else
                   f"{tool} was killed (SIGKILL: most often the kernel's out-of-memory killer)")
        return SegmenterFailed(f"{problem}; its last output:\n{tail}" if tail else problem, fix=memory_fix)
    if returncode == 3:
        return SegmenterFailed(f"{tool} {network_problem}, refused: {tail}", fix=network_fix)
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else str(-returncode)
        return SegmenterFailed(f"{tool} was stopped by signal {name}; its last output:\n{tail}",
                               fix="run it again; if it recurs, check the worker's logs")
    return SegmenterFailed(f"{tool} failed (exit code {returncode}); its last output:\n{tail}", fix=failed_fix)


def _failure(returncode: int, log: Path, mode: str) -> SegmenterFailed:
    other = "totalsegmentator:fast (a 3 mm model, far less memory)" if mode == "total" else "a smaller volume"
    return child_failure("TotalSegmentator", returncode, _tail(log),
                         memory_fix=f"give the worker more memory, or use {other}",
                         network_problem="tried to download weights or reach the network",
                         network_fix="check the weights with `dosebench weights status`",
                         failed_fix="check the input volume and the weights (`dosebench weights status`)")


def wait_for_child(process: subprocess.Popen, timeout_s: float | None,
                   should_cancel: Callable[[], bool] | None = None, poll_s: float = 0.5) -> int:
    """Wait for ``process``; raise ``subprocess.TimeoutExpired`` past ``timeout_s`` and
    :class:`Cancelled` as soon as ``should_cancel()`` says so (the caller kills the process group)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        step = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
        try:
            return process.wait(timeout=step)
        except subprocess.TimeoutExpired:
            if should_cancel is not None and should_cancel():
                raise Cancelled("the job was cancelled; the segmentation child process was stopped") from None
            if deadline is not None and time.monotonic() >= deadline:
                raise


def run_child(command: list[str], *, env: dict[str, str], cwd: Path, log_path: Path, timeout_s: float | None,
              should_cancel: Callable[[], bool] | None = None,
              on_start: Callable[[subprocess.Popen], None] | None = None) -> int:
    """Run a segmenter's child process in its own session, output to ``log_path``; return its exit code.

    Its whole process group (nnU-Net's own workers too) is killed when it ends, on interrupt, on
    cancel (:class:`Cancelled`) and past ``timeout_s`` (``subprocess.TimeoutExpired``, for the caller
    to word)."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                   env=env, cwd=cwd, start_new_session=True)
        try:
            if on_start is not None:
                on_start(process)
            return wait_for_child(process, timeout_s, should_cancel)
        finally:
            _kill_group(process)  # no orphan, whatever happened


def read_child_labels(target: Path, hu: np.ndarray, affine: np.ndarray, table: dict[int, LabelInfo], *,
                      who: str, grid_fix: str, ids_problem: str, ids_fix: str) -> Segmentation:
    """The label map a child wrote, checked: on the input's grid, and only ids of ``table``."""
    image = nib.load(str(target))
    labels = np.asarray(image.dataobj)
    if labels.shape != hu.shape or not np.allclose(image.affine, affine, atol=1e-3):
        raise SegmenterFailed(f"{who} returned a label map of shape {labels.shape} for a volume of shape "
                              f"{hu.shape} (or on another grid)", fix=grid_fix)
    unknown = sorted(set(np.unique(labels).tolist()) - set(table) - {0})
    if unknown:
        raise SegmenterFailed(f"{who} returned label ids outside {ids_problem}: {unknown[:10]}", fix=ids_fix)
    dtype = np.uint8 if max(table, default=0) <= 255 else np.uint16
    return Segmentation(labels=np.ascontiguousarray(labels, dtype=dtype), table=dict(table))


def run_totalsegmentator(hu: np.ndarray, spacing_mm: tuple[float, float, float], affine: np.ndarray | None,
                         *, mode: str, weights_dir: Path, device: str = "auto", timeout_s: float | None = None,
                         table: dict[int, LabelInfo] | None = None,
                         on_start: Callable[[subprocess.Popen], None] | None = None,
                         should_cancel: Callable[[], bool] | None = None) -> Segmentation:
    """Segment ``hu`` (canonical array, HU) with TotalSegmentator in a child process.

    ``affine`` maps the array's voxels to world mm (``Volume.affine``); without it a diagonal affine
    with ``spacing_mm`` is used (TotalSegmentator only needs the spacing and the axis directions).
    """
    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise InputError(f"TotalSegmentator needs a 3D volume, got shape {hu.shape}", fix="give a CT volume")
    w.check_weights(mode, weights_dir)  # they may have gone since the segmenter was made
    if affine is None:
        affine = np.diag([*map(float, spacing_mm), 1.0])
    affine = np.asarray(affine, dtype=np.float64)
    table = table if table is not None else label_table()

    scratch = Path(tempfile.mkdtemp(prefix="dosebench-totalseg-"))
    try:
        source, target, log_path = scratch / "ct.nii.gz", scratch / "seg.nii.gz", scratch / "child.log"
        _write_input(hu, affine, source)
        home = scratch / "home"
        _write_home(home)
        env = dict(os.environ)
        env.update({"TOTALSEG_HOME_DIR": str(home), "TOTALSEG_WEIGHTS_PATH": str(weights_dir),
                    "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"})
        # nnU-Net sizes its export threads by this (default 8); match the CPUs this process may use
        env.setdefault("nnUNet_def_n_proc", str(min(8, _usable_cpus())))
        command = [sys.executable, "-m", CHILD_MODULE, str(source), str(target), "--mode", mode,
                   "--weights", str(weights_dir), "--device", device]
        try:
            returncode = run_child(command, env=env, cwd=scratch, log_path=log_path, timeout_s=timeout_s,
                                   should_cancel=should_cancel, on_start=on_start)
        except subprocess.TimeoutExpired:
            raise SegmenterFailed(
                f"TotalSegmentator did not finish within {timeout_s:g} s and was stopped",
                fix="raise DOSEBENCH_TOTALSEG_TIMEOUT_S, use a GPU worker, or use totalsegmentator:fast",
            ) from None
        if returncode != 0 or not target.is_file():
            raise _failure(returncode, log_path, mode)
        return read_child_labels(target, hu, affine, table, who="TotalSegmentator",
                                 grid_fix="report this with the input volume's header",
                                 ids_problem="its table",
                                 ids_fix="check that the weights belong to TotalSegmentator 2.x's total task")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

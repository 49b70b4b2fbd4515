"""The child process that runs TotalSegmentator: ``python -m dosebench.segmenter.totalseg_child IN OUT ...``.

Started by :mod:`dosebench.segmenter.totalseg` (never by hand): it reads the CT NIfTI ``IN``, runs
TotalSegmentator's ``total`` task (five 1.5 mm part models, or the 3 mm model with ``--mode fast``) and
writes the 117-class label map (uint8, same grid and affine as ``IN``) to ``OUT``.

The parent has already checked the weights and written this process's TotalSegmentator home
(``TOTALSEG_HOME_DIR``, with ``send_usage_stats: false``). Here, as a second line of defence, every
download and network call TotalSegmentator could make is replaced by an error before it runs.

Exit codes: 0 done; 3 TotalSegmentator tried to download weights or reach the network; other codes
are failures (traceback on stderr).

Module level stays import-light: nnU-Net's worker processes (``spawn``) import this module again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

EXIT_NETWORK = 3


class NetworkRefused(RuntimeError):
    pass


def _refuse_network(*args, **kwargs):
    raise NetworkRefused("TotalSegmentator tried to reach the network; dosebench does not allow it")


def _forbid_downloads(weights: Path) -> None:
    """Replace TotalSegmentator's download function and every requests call with refusals."""
    import requests
    from totalsegmentator import config, libs, python_api
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    def no_download(task_id):
        info = TASK_ID_WEIGHTS_CONFIGS.get(task_id, {})
        folder = Path(info.get("rel_path") or "") / info.get("foldername", f"Dataset{task_id}")
        if (weights / folder).exists():
            return  # what download_pretrained_weights checks before downloading
        raise NetworkRefused(f"TotalSegmentator wanted to download the weights of task {task_id} "
                             f"({weights / folder} is missing)")

    libs.download_pretrained_weights = no_download
    python_api.download_pretrained_weights = no_download
    python_api.send_usage_stats = lambda *a, **k: None
    config.send_usage_stats = lambda *a, **k: None
    requests.sessions.Session.request = _refuse_network  # requests.get/post go through here


def watch_parent(poll_s: float = 1.0) -> None:
    """End this process and every process it started if the parent dies (a killed worker process,
    a terminated Celery task): the parent starts us in our own session, so nothing else would."""
    import signal
    import threading

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:  # re-parented: the dosebench process is gone
                try:
                    os.killpg(os.getpgid(0), signal.SIGKILL)
                finally:
                    os._exit(137)

    threading.Thread(target=watch, name="dosebench-orphan-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dosebench.segmenter.totalseg_child")
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--mode", choices=["total", "fast"], required=True)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--threads", type=int, default=1, help="TotalSegmentator's resampling threads")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    watch_parent()
    os.environ["TOTALSEG_WEIGHTS_PATH"] = str(args.weights)
    if "TOTALSEG_HOME_DIR" not in os.environ:
        print("TOTALSEG_HOME_DIR is not set: the parent must give this process its own home", file=sys.stderr)
        return 2

    import nibabel as nib
    import numpy as np
    import torch
    from totalsegmentator import python_api

    _forbid_downloads(args.weights)
    device = args.device
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    imported = time.perf_counter()
    try:
        image = python_api.totalsegmentator(
            args.input, None, ml=True, fast=args.mode == "fast", task="total", device=device, quiet=True,
            nr_thr_resamp=max(1, args.threads), nr_thr_saving=1, statistics=False, preview=False)
    except NetworkRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_NETWORK
    predicted = time.perf_counter()
    labels = np.asarray(image.dataobj).astype(np.uint8)
    out = nib.Nifti1Image(labels, image.affine)
    tmp = args.output.with_name(".tmp-" + args.output.name)
    nib.save(out, str(tmp))
    os.replace(tmp, args.output)
    print(f"dosebench-totalseg: device {device}, imports {imported - started:.1f} s, "
          f"totalsegmentator {predicted - imported:.1f} s, save {time.perf_counter() - predicted:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

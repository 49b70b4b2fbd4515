"""The child process that runs an nnU-Net v2 model: ``python -m dosebench.segmenter.nnunet_child IN OUT ...``.

Started by :mod:`dosebench.segmenter.nnunet` (never by hand), which has already checked the model folder:
it reads the CT NIfTI ``IN`` with the model's own image reader (``plans.json``'s ``image_reader_writer``,
so the axis order is the one the model was trained with), predicts with ``nnUNetPredictor`` (one process,
no export pool) and writes the label map with the same writer to ``OUT``, on ``IN``'s grid.

Network calls (sockets other than local ones, ``requests``) are refused before nnU-Net is imported.

Exit codes: 0 done; 3 something tried to reach the network; other codes are failures (traceback on stderr).
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


def _forbid_network() -> None:
    import socket

    original = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise NetworkRefused(f"nnU-Net tried to connect to {address!r}; dosebench does not allow it")
        return original(self, address)

    socket.socket.connect = connect  # type: ignore[method-assign]
    try:
        import requests
    except ImportError:
        return

    def refuse(*args, **kwargs):
        raise NetworkRefused("nnU-Net tried to reach the network; dosebench does not allow it")

    requests.sessions.Session.request = refuse  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dosebench.segmenter.nnunet_child")
    parser.add_argument("input", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--folds", required=True, help="comma list of fold numbers or 'all'")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--tta", action="store_true", help="mirroring (test-time augmentation)")
    args = parser.parse_args(argv)

    from .totalseg_child import watch_parent

    started = time.perf_counter()
    watch_parent()
    _forbid_network()

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    device = args.device
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device("cuda", 0) if device == "gpu" else torch.device("cpu")
    if device == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("nnUNet_def_n_proc", "1"))))
    folds = tuple(f if f == "all" else int(f) for f in args.folds.split(","))
    imported = time.perf_counter()
    try:
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=args.tta,
                                    perform_everything_on_device=device == "gpu", device=torch_device,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(args.model), folds, checkpoint_name=args.checkpoint)
        io = predictor.plans_manager.image_reader_writer_class()
        image, properties = io.read_images([str(args.input)])
        loaded = time.perf_counter()
        seg = predictor.predict_single_npy_array(image, properties, None, None, False)
    except NetworkRefused as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return EXIT_NETWORK
    predicted = time.perf_counter()
    tmp = args.output.with_name(".tmp-" + args.output.name)
    io.write_seg(seg, str(tmp), properties)
    os.replace(tmp, args.output)
    print(f"dosebench-nnunet: device {device}, trainer {predictor.trainer_name}, folds {list(folds)}, "
          f"mirroring {args.tta}, imports {imported - started:.1f} s, load {loaded - imported:.1f} s, "
          f"predict {predicted - loaded:.1f} s, save {time.perf_counter() - predicted:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

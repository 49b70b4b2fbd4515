"""Fabricate tiny nnU-Net v2 models in TotalSegmentator's weights layout, for tests without the real weights.

Each model is a 2-stage ``PlainConvUNet`` with 2 and 4 features (a few hundred parameters) in exactly the
folder TotalSegmentator 2.18.0 looks for::

    <weights>/<DATASETS[id].folder>/<trainer>__nnUNetPlans__3d_fullres/
        plans.json  dataset.json  fold_0/checkpoint_final.pth

The checkpoint names the trainer ``nnUNetTrainer`` (the variant trainers the folder names mention import
modules such as torchvision that do not load beside the CPU build of torch; the predictor only uses the
trainer class to build the network, which is the same for all of them). Its segmentation heads have zero
weights and a bias that makes one chosen class win in every voxel (or background), so a test knows exactly
which label id a real TotalSegmentator run must return.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from totalsegmentator.map_to_binary import class_map, class_map_5_parts

from dosebench.segmenter.weights import CHECKPOINT, CONFIGURATION, DATASETS, FOLD, PLANS

FEATURES = [2, 4]
#: Patch sizes (nnU-Net axis order: z, y, x as SimpleITK reads them), large enough that the bundled CT
#: (122 x 101 x 30 voxels of 3 mm) needs only a few sliding-window tiles at 1.5 mm and at 3 mm.
PATCH = {1.5: [64, 128, 128], 3.0: [32, 96, 96]}


def labels_of(dataset_id: int) -> dict[int, str]:
    """The class map a dataset's model predicts: its part of ``class_map_5_parts``, or ``total``."""
    part = DATASETS[dataset_id].part
    return dict(class_map_5_parts[part]) if part is not None else dict(class_map["total"])


def _arch_kwargs() -> dict:
    return {
        "n_stages": 2, "features_per_stage": FEATURES,
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]],
        "n_conv_per_stage": [1, 1], "n_conv_per_stage_decoder": [1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
    }


def _plans(dataset_id: int) -> dict:
    model = DATASETS[dataset_id]
    spacing = [model.spacing_mm] * 3
    resampling = "resample_data_or_seg_to_shape"
    return {
        "dataset_name": model.folder,
        "plans_name": PLANS,
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": [200, 200, 200],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: {
            "data_identifier": f"{PLANS}_{CONFIGURATION}",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2,
            "patch_size": PATCH[model.spacing_mm],
            "median_image_size_in_voxels": [200, 200, 200],
            "spacing": spacing,
            "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False],
            "resampling_fn_data": resampling,
            "resampling_fn_seg": resampling,
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": resampling,
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": _arch_kwargs(),
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            },
            "batch_dice": False,
        }},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": {
            "max": 3071.0, "mean": 100.0, "median": 80.0, "min": -1024.0,
            "percentile_00_5": -1000.0, "percentile_99_5": 1500.0, "std": 300.0}},
    }


#: With ``bright=True`` the winner is predicted where the voxel is this many standard deviations (after
#: nnU-Net's CT normalisation and two instance norms) above its patch: bone and brighter, not soft tissue.
BRIGHT_THRESHOLD = 3.0


def _network(num_classes: int, winner: int, bright: bool = False) -> PlainConvUNet:
    kwargs = _arch_kwargs()
    for key in ("conv_op", "norm_op", "nonlin"):
        module, _, name = kwargs[key].rpartition(".")
        kwargs[key] = getattr(__import__(module, fromlist=[name]), name)
    torch.manual_seed(0)
    network = PlainConvUNet(input_channels=1, num_classes=num_classes, deep_supervision=False, **kwargs)
    with torch.no_grad():
        for head in network.decoder.seg_layers:
            head.weight.zero_()
            head.bias.zero_()
            head.bias[winner] = 10.0
        if bright:
            # Pass the intensity straight through (centre taps only, so no blurring), drop the coarse
            # path, and let the head threshold it: winner where the twice instance-normalised intensity
            # exceeds BRIGHT_THRESHOLD, background elsewhere. The output then follows the image, so a
            # flipped or transposed label map would be caught.
            for parameter in network.parameters():
                parameter.zero_()
            for module in network.modules():
                if isinstance(module, torch.nn.InstanceNorm3d):
                    module.weight.fill_(1.0)
            network.encoder.stages[0][0].convs[0].conv.weight[:, 0, 1, 1, 1] = 1.0
            skip = FEATURES[0]  # the decoder stage sees cat(upsampled, skip)
            network.decoder.stages[0].convs[0].conv.weight[:, skip, 1, 1, 1] = 1.0
            for head in network.decoder.seg_layers:
                head.weight[winner, 0] = 10.0
                head.bias[winner] = -10.0 * BRIGHT_THRESHOLD
    return network


def fabricate_model(weights_dir: Path, dataset_id: int, winner: str | None = None, bright: bool = False) -> Path:
    """Write one tiny model; every voxel gets class ``winner`` (a name of its class map) or background;
    with ``bright``, only voxels much brighter than their surroundings get ``winner``."""
    model = DATASETS[dataset_id]
    labels = labels_of(dataset_id)
    ids = {name: i for i, name in labels.items()}
    folder = Path(weights_dir) / model.model_dir
    (folder / f"fold_{FOLD}").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(_plans(dataset_id), indent=1))
    dataset = {"channel_names": {"0": "CT"},
               "labels": {"background": 0, **{labels[i]: i for i in sorted(labels)}},
               "numTraining": 1, "file_ending": ".nii.gz", "name": model.folder}
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    network = _network(max(labels) + 1, 0 if winner is None else ids[winner], bright and winner is not None)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"plans": _plans(dataset_id), "configuration": CONFIGURATION, "fold": FOLD,
                              "dataset_json": dataset, "device": "cpu"},
                "inference_allowed_mirroring_axes": (0, 1, 2)},
               folder / f"fold_{FOLD}" / CHECKPOINT)
    return folder


def fabricate_weights(weights_dir: Path, winners: dict[int, str | None]) -> Path:
    """Fabricate every dataset in ``winners`` (dataset id -> winning class name or None)."""
    for dataset_id, winner in winners.items():
        fabricate_model(weights_dir, dataset_id, winner)
    return Path(weights_dir)

"""The generic nnU-Net v2 backend (``nnunet:<model_folder>[?fold=..&checkpoint=..&tta=..]``), with the real
nnU-Net predictor end to end on CPU.

:mod:`tiny_nnunet`'s network and plans are reused to fabricate tiny trained-model folders of a made-up dataset
(``Dataset900_Tiny``): either one known label wins everywhere (output bias), or only voxels much brighter than
their surroundings get it. The tests then know which ids, names and groups a correct run returns.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("nnunetv2")
torch = pytest.importorskip("torch")

from child_processes import alive, install_fake_child  # noqa: E402
from tiny_nnunet import _network, _plans  # noqa: E402

from dosebench.core.data import sample_ct  # noqa: E402
from dosebench.core.errors import InputError  # noqa: E402
from dosebench.core.volume import load_volume  # noqa: E402
from dosebench.segmenter import nnunet  # noqa: E402
from dosebench.segmenter.backends import make_segmenter  # noqa: E402

DATASET = "Dataset900_Tiny"
LABELS = {"background": 0, "liver": 1, "spleen": 2, "bone": 3}
CONFIGURATION = "3d_fullres"


def fabricate(root: Path, winner: str | None, *, bright: bool = False, spacing_mm: float = 3.0,
              folds: tuple[str, ...] = ("0",), labels: dict | None = None, name: str | None = DATASET,
              groups: dict | None = None) -> Path:
    """A tiny nnU-Net v2 trained-model folder ``root/Dataset900_Tiny/nnUNetTrainer__nnUNetPlans__3d_fullres``."""
    labels = dict(LABELS if labels is None else labels)
    folder = Path(root) / DATASET / f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}"
    plans = copy.deepcopy(_plans(297))  # 3 mm plans, patch 32 x 96 x 96; spacing changed below
    plans["dataset_name"] = DATASET
    plans["configurations"][CONFIGURATION]["spacing"] = [spacing_mm] * 3
    plans["original_median_spacing_after_transp"] = [spacing_mm] * 3
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1, "file_ending": ".nii.gz"}
    if name is not None:
        dataset["name"] = name
    if groups is not None:
        dataset["groups"] = groups
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=1))
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=1))
    plain = all(isinstance(v, int) for v in labels.values())
    num_classes = max(labels.values()) + 1 if plain else 4
    network = _network(num_classes, 0 if winner is None else labels[winner], bright and winner is not None)
    for fold in folds:
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": fold,
                                  "dataset_json": dataset, "device": "cpu"},
                    "inference_allowed_mirroring_axes": (0, 1, 2)},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DOSEBENCH_NNUNET_DEVICE", "DOSEBENCH_NNUNET_TIMEOUT_S"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def spleen_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Spleen everywhere; plans at 2.5 mm, so nnU-Net resamples the 3 mm CT there and back."""
    return fabricate(tmp_path_factory.mktemp("spleen"), "spleen", spacing_mm=2.5,
                     groups={"abdomen": ["liver", "spleen"]})


@pytest.fixture(scope="module")
def bone_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Bone where the voxel is much brighter than its patch; folds 0 and 1 (same weights)."""
    return fabricate(tmp_path_factory.mktemp("bone"), "bone", bright=True, folds=("0", "1"),
                     groups={"bone": "skeleton"})


@pytest.fixture(scope="module")
def ct_slab():
    """The bundled CT (122 x 101 x 30, 3 mm), 16 central slices: its own affine, shifted origin."""
    volume = load_volume(sample_ct())
    affine = np.array(volume.affine, dtype=np.float64)
    affine[:, 3] = volume.affine @ np.array([0, 0, 8, 1.0])
    return np.ascontiguousarray(volume.hu[:, :, 8:24]), volume.spacing_mm, affine


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make tempfile put everything under one folder, to check that a call leaves nothing behind."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


# --- 1. the spec ----------------------------------------------------------------------------------------


def test_spec_defaults_and_options(tmp_path: Path) -> None:
    spec = nnunet.parse_spec(f"  NNUNet:{tmp_path}/Some_Model ")
    assert spec.folder == tmp_path / "Some_Model", "the path keeps its case"
    assert (spec.folds, spec.checkpoint, spec.tta) == (("0",), "checkpoint_final.pth", False)
    spec = nnunet.parse_spec(f"nnunet:{tmp_path}?fold=0, 1,2,1&checkpoint=checkpoint_best.pth&tta=1")
    assert (spec.folds, spec.checkpoint, spec.tta) == (("0", "1", "2"), "checkpoint_best.pth", True)
    assert nnunet.parse_spec(f"nnunet:{tmp_path}?fold=ALL&tta=0").folds == ("all",)
    assert nnunet.parse_spec("nnunet:relative/model").folder == Path.cwd() / "relative" / "model"


def test_model_folders_outside_the_models_root_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """DOSEBENCH_NNUNET_MODELS_ROOT confines model folders (checkpoints are pickles): a folder outside it,
    or a link inside it that leads outside, is refused; inside is accepted; unset, nothing is confined."""
    from dosebench.segmenter.backends import normalise_spec

    root, outside = tmp_path / "models", tmp_path / "elsewhere"
    (root / "Dataset501_Liver" / "model").mkdir(parents=True)
    outside.mkdir()
    (root / "escape").symlink_to(outside)
    assert normalise_spec(f"nnunet:{outside}") == f"nnunet:{outside}"  # unset: no confinement
    monkeypatch.setenv(nnunet.MODELS_ROOT_ENV, str(root))
    assert nnunet.parse_spec(f"nnunet:{root}/Dataset501_Liver/model?fold=0").folder == root / "Dataset501_Liver" / "model"
    for folder in (outside, root / "escape", root / ".." / "elsewhere"):
        with pytest.raises(InputError, match="outside DOSEBENCH_NNUNET_MODELS_ROOT") as caught:
            normalise_spec(f"nnunet:{folder}")
        assert str(root) in caught.value.fix


@pytest.mark.parametrize("query, words", [
    ("?folds=0", ["'folds'", "fold, checkpoint, tta"]),
    ("?fold=0&mirror=1", ["'mirror'"]),
    ("?fold=x", ["fold 'x'"]),
    ("?fold=0&fold=1", ["twice"]),
    ("?tta=maybe", ["tta='maybe'"]),
    ("?checkpoint=../x.pth", ["not a path"]),
    ("?fold=", ["no value"]),
])
def test_bad_query_is_refused(query: str, words: list[str], tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        make_segmenter(f"nnunet:{tmp_path}{query}")
    for word in words:
        assert word in str(caught.value)
    assert "nnunet:/path/to/model_folder" in caught.value.fix


def test_bare_prefix_and_unknown_specs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="names no model folder"):
        make_segmenter("nnunet:")
    with pytest.raises(InputError) as caught:
        make_segmenter("nnunet")
    assert "unknown segmenter" in caught.value.problem and "nnunet:/path/to/model_folder" in caught.value.fix


# --- 2. the model folder, checked up front ----------------------------------------------------------------


def test_missing_folder_and_json_files(tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        make_segmenter(f"nnunet:{tmp_path / 'nope'}")
    assert str(tmp_path / "nope") in caught.value.problem and "does not exist" in caught.value.problem
    folder = fabricate(tmp_path, "liver")
    for name in ("plans.json", "dataset.json"):
        moved = folder / name
        moved.rename(folder / f"{name}.bak")
        with pytest.raises(InputError) as caught:
            make_segmenter(f"nnunet:{folder}")
        assert str(moved) in caught.value.problem and "plans.json, dataset.json" in caught.value.fix
        (folder / f"{name}.bak").rename(moved)
    assert make_segmenter(f"nnunet:{folder}").provenance["dataset"] == DATASET


def test_missing_fold_and_checkpoint(tmp_path: Path) -> None:
    folder = fabricate(tmp_path, "liver")
    with pytest.raises(InputError) as caught:
        make_segmenter(f"nnunet:{folder}?fold=1")
    assert "fold_1" in caught.value.problem and str(folder / "fold_1") in caught.value.problem
    assert "fold_0" in caught.value.fix and "?fold=" in caught.value.fix
    with pytest.raises(InputError, match="fold_all"):
        make_segmenter(f"nnunet:{folder}?fold=all")
    with pytest.raises(InputError) as caught:
        make_segmenter(f"nnunet:{folder}?checkpoint=checkpoint_best.pth")
    assert str(folder / "fold_0" / "checkpoint_best.pth") in caught.value.problem
    (folder / "fold_0" / "checkpoint_final.pth").unlink()
    with pytest.raises(InputError) as caught:
        make_segmenter(f"nnunet:{folder}")
    assert str(folder / "fold_0" / "checkpoint_final.pth") in caught.value.problem
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot read the nnU-Net checkpoint"):
        make_segmenter(f"nnunet:{folder}")


def test_region_based_and_bad_labels_are_refused(tmp_path: Path) -> None:
    folder = fabricate(tmp_path / "regions", None, labels={"background": 0, "whole": [1, 2], "core": 2})
    with pytest.raises(InputError) as caught:
        make_segmenter(f"nnunet:{folder}")
    assert "region-based" in caught.value.problem and str(folder / "dataset.json") in caught.value.problem
    folder = fabricate(tmp_path / "gaps", None, labels={"background": 0, "liver": 1, "bone": 3})
    with pytest.raises(InputError, match="not consecutive"):
        make_segmenter(f"nnunet:{folder}")
    folder = fabricate(tmp_path / "groups", None, groups={"organs": ["liver", "kidney"]})
    with pytest.raises(InputError, match="'kidney'"):
        make_segmenter(f"nnunet:{folder}")


def test_label_table_and_groups_from_dataset_json(tmp_path: Path) -> None:
    plain = make_segmenter(f"nnunet:{fabricate(tmp_path / 'a', None)}")
    table = {1: ("liver", DATASET), 2: ("spleen", DATASET), 3: ("bone", DATASET)}
    folder = fabricate(tmp_path / "b", None, groups={"abdomen": ["liver", "spleen"], "bone": "skeleton"},
                       labels={**LABELS, "ignore": 4})
    grouped = make_segmenter(f"nnunet:{folder}")
    # no "name" in dataset.json: the DatasetNNN_Name parent folder names the dataset
    unnamed = make_segmenter(f"nnunet:{fabricate(tmp_path / 'c', None, name=None)}")
    assert unnamed.provenance["dataset"] == DATASET
    assert {i: (x.name, x.group) for i, x in nnunet.check_model(nnunet.parse_spec(plain.spec)).table.items()} == table
    assert {i: (x.name, x.group) for i, x in nnunet.check_model(nnunet.parse_spec(grouped.spec)).table.items()} == {
        1: ("liver", "abdomen"), 2: ("spleen", "abdomen"), 3: ("bone", "skeleton")}, "ignore is not predicted"


def test_provenance(tmp_path: Path, bone_model: Path) -> None:
    record = make_segmenter(f"nnunet:{bone_model}?fold=0,1&tta=1").provenance
    assert record["backend"] == "nnunet" and record["model_folder"] == str(bone_model)
    assert record["dataset"] == DATASET and record["folds"] == [0, 1] and record["checkpoint"] == "checkpoint_final.pth"
    assert record["trainer"] == "nnUNetTrainer" and record["plans"] == "nnUNetPlans"
    assert record["configuration"] == CONFIGURATION
    assert record["test_time_augmentation"] is True and record["mirroring"] is True
    assert record["versions"]["nnunetv2"] not in ("", "not installed")
    assert make_segmenter(f"nnunet:{bone_model}").provenance["test_time_augmentation"] is False


# --- 3. the child process ---------------------------------------------------------------------------------


def _fake_child(tmp_path: Path, monkeypatch, body: str) -> None:
    """Replace the child module by ``body`` (run with the child's argv)."""
    install_fake_child(tmp_path, monkeypatch, nnunet, "fake_nnunet_child", body)



def test_failing_child_quotes_its_output(tmp_path: Path, monkeypatch, scratch: Path, spleen_model: Path) -> None:
    _fake_child(tmp_path, monkeypatch, """
        raise RuntimeError("nnU-Net could not find trainer class nnUNetTrainerMagic")
    """)
    segmenter = make_segmenter(f"nnunet:{spleen_model}")
    with pytest.raises(nnunet.SegmenterFailed) as caught:
        segmenter.segment(np.zeros((8, 8, 8), np.float32), (3.0, 3.0, 3.0))
    assert "exit code 1" in caught.value.problem and "nnUNetTrainerMagic" in caught.value.problem
    assert list(scratch.iterdir()) == []


def test_timeout_kills_the_child_and_its_workers(tmp_path: Path, monkeypatch, scratch: Path,
                                                 spleen_model: Path) -> None:
    pids = tmp_path / "pids.txt"
    _fake_child(tmp_path, monkeypatch, f"""
        import os, subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{worker.pid}}")
        time.sleep(300)
    """)
    monkeypatch.setenv("DOSEBENCH_NNUNET_TIMEOUT_S", "3")
    segmenter = make_segmenter(f"nnunet:{spleen_model}")
    assert segmenter.provenance["timeout_s"] == 3.0
    with pytest.raises(nnunet.SegmenterFailed, match="did not finish within 3 s"):
        segmenter.segment(np.zeros((8, 8, 8), np.float32), (3.0, 3.0, 3.0))
    child, worker = map(int, pids.read_text().split())
    deadline = time.monotonic() + 10
    while (alive(child) or alive(worker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child) and not alive(worker)
    assert list(scratch.iterdir()) == []


def test_cancel_kills_the_child_and_its_workers(tmp_path: Path, monkeypatch, scratch: Path,
                                                spleen_model: Path) -> None:
    """A cancelled job stops a running segmentation: the child and nnU-Net's workers are killed."""
    from dosebench.core.errors import Cancelled

    pids = tmp_path / "pids.txt"
    _fake_child(tmp_path, monkeypatch, f"""
        import os, subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{worker.pid}}")
        time.sleep(300)
    """)
    segmenter = make_segmenter(f"nnunet:{spleen_model}")
    started = time.monotonic()
    with pytest.raises(Cancelled):
        segmenter.segment(np.zeros((8, 8, 8), np.float32), (3.0, 3.0, 3.0),
                          should_cancel=lambda: pids.exists() and time.monotonic() - started > 1.0)
    assert time.monotonic() - started < 60  # stopped at the flag, not at some timeout
    child, worker = map(int, pids.read_text().split())
    deadline = time.monotonic() + 10
    while (alive(child) or alive(worker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child) and not alive(worker)
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("name, value", [("DOSEBENCH_NNUNET_TIMEOUT_S", "soon"), ("DOSEBENCH_NNUNET_DEVICE", "tpu")])
def test_bad_settings_are_refused(name: str, value: str, monkeypatch, spleen_model: Path) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(InputError, match=name):
        make_segmenter(f"nnunet:{spleen_model}")


# --- 4. the real nnU-Net predictor end to end (CPU) -------------------------------------------------------


def test_uniform_model_resampled_to_its_spacing_with_mirroring(spleen_model: Path, ct_slab, scratch: Path) -> None:
    hu, spacing, affine = ct_slab
    segmentation = make_segmenter(f"nnunet:{spleen_model}?tta=1").segment(hu, spacing, affine=affine)
    assert segmentation.labels.shape == hu.shape and segmentation.labels.dtype == np.uint8
    assert np.all(segmentation.labels == 2), np.unique(segmentation.labels)
    assert {i: (x.id, x.name, x.group) for i, x in segmentation.table.items()} == {
        1: (1, "liver", "abdomen"), 2: (2, "spleen", "abdomen"), 3: (3, "bone", DATASET)}
    assert list(scratch.iterdir()) == [], "temporary files left behind"


def test_bright_model_two_folds_keeps_the_grid(bone_model: Path, ct_slab, scratch: Path) -> None:
    hu, spacing, affine = ct_slab
    hu = hu + np.float32(0.25)  # fractional HU: sent as float32
    # a bright block in an air corner whose mirror images along each axis are air too: a flipped label map
    # would be caught
    block = np.s_[2:8, 85:91, 1:5]
    mirrors = (np.s_[114:120, 85:91, 1:5], np.s_[2:8, 10:16, 1:5], np.s_[2:8, 85:91, 11:15])
    assert hu[block].max() < -900 and all(hu[m].max() < -900 for m in mirrors)
    hu[block] = 1500.0
    segmentation = make_segmenter(f"nnunet:{bone_model}?fold=0,1").segment(hu, spacing, affine=affine)
    labels = segmentation.labels
    assert labels.shape == hu.shape
    assert set(np.unique(labels).tolist()) == {0, 3}
    assert np.all(labels[block] == 3)
    for mirror in mirrors:
        assert not np.any(labels[mirror]), "the label map is flipped"
    bone, soft = hu > 300, (hu > -100) & (hu < 100)
    assert (labels[bone] == 3).mean() > 0.5 and not np.any(labels[soft])
    assert segmentation.table[3].name == "bone" and segmentation.table[3].group == "skeleton"
    assert list(scratch.iterdir()) == []


# --- 5. `dosebench run --segmenter nnunet:<folder>` through the CLI -------------------------------------


def test_cli_run_with_an_nnunet_model(run_cli, cropped_ct: Path, bone_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run_cli("run", "--input", cropped_ct, "--doses", "1.0", "--protocol", "tiny",
                     "--segmenter", f"nnunet:{bone_model}", "--out", out, "--quiet")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    source = nib.load(str(cropped_ct))
    seg = nib.load(str(out / "seg" / "dose-1.00.nii.gz"))
    assert seg.shape == source.shape and np.allclose(seg.affine, source.affine)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= {0, 3}
    labels = json.loads((out / "seg" / "labels.json").read_text())
    assert labels == {"1": {"name": "liver", "group": DATASET}, "2": {"name": "spleen", "group": DATASET},
                      "3": {"name": "bone", "group": "skeleton"}}
    record = json.loads((out / "protocol.json").read_text())["segmenter"]
    assert record["spec"] == f"nnunet:{bone_model}" and record["backend"] == "nnunet"
    assert record["dataset"] == DATASET and record["trainer"] == "nnUNetTrainer"

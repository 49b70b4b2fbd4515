"""The TotalSegmentator backend, with the real TotalSegmentator 2.18.0 and nnU-Net code end to end on CPU.

The real weights cannot be downloaded here, so :mod:`tiny_nnunet` fabricates tiny nnU-Net models in
exactly TotalSegmentator's weights layout, each predicting one known class everywhere (or background):
the tests then know which label id, name and group a correct run returns. Also covered: the label table
and the facts dosebench hard-codes against the installed TotalSegmentator, missing weights refused
before any child process or download, child failures and timeouts, and ``dosebench run`` through the CLI.
"""

from __future__ import annotations

import inspect
import json
import os
import tempfile
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("totalsegmentator")
pytest.importorskip("nnunetv2")

from child_processes import alive, install_fake_child  # noqa: E402
from tiny_nnunet import fabricate_model, fabricate_weights, labels_of  # noqa: E402
from totalsegmentator import libs, python_api  # noqa: E402
from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS  # noqa: E402
from totalsegmentator.map_to_binary import class_map, class_map_5_parts, map_taskid_to_partname_ct  # noqa: E402

from dosebench.core.data import sample_ct  # noqa: E402
from dosebench.core.errors import InputError  # noqa: E402
from dosebench.core.volume import load_volume  # noqa: E402
from dosebench.segmenter import totalseg  # noqa: E402
from dosebench.segmenter import weights as w  # noqa: E402
from dosebench.segmenter.backends import make_segmenter  # noqa: E402

TOTAL_ID = {name: i for i, name in class_map["total"].items()}
GROUP_SIZES = {"organs": 24, "vertebrae": 26, "cardiac": 18, "muscles": 23, "ribs": 26}
#: five-part run: organs says liver everywhere, vertebrae says vertebrae_L1 everywhere, the rest background.
#: TotalSegmentator lays the parts over each other in order 291..295, so vertebrae_L1 must win.
FIVE_PART_WINNERS = {291: "liver", 292: "vertebrae_L1", 293: None, 294: None, 295: None}
FAST_WINNER = "heart"
ENV_NAMES = ("DOSEBENCH_TOTALSEG_WEIGHTS", "TOTALSEG_WEIGHTS_PATH", "TOTALSEG_HOME_DIR")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_NAMES + ("DOSEBENCH_TOTALSEG_TIMEOUT_S", "DOSEBENCH_TOTALSEG_DEVICE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All six datasets, fabricated once for the module; the fast model labels bright voxels only."""
    folder = fabricate_weights(tmp_path_factory.mktemp("weights"), FIVE_PART_WINNERS)
    fabricate_model(folder, 297, FAST_WINNER, bright=True)
    return folder


@pytest.fixture(scope="module")
def bundled_ct():
    return load_volume(sample_ct())


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Make tempfile put everything under one folder, to check that a call leaves nothing behind."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def no_download_no_child(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) any download attempt or child process start."""
    calls: list[str] = []

    def download(task_id, *args, **kwargs):
        calls.append(f"download {task_id}")
        raise AssertionError("TotalSegmentator's download function must not be called")

    def popen(*args, **kwargs):
        calls.append(f"popen {args[0] if args else kwargs}")
        raise AssertionError("no child process may start when weights are missing")

    monkeypatch.setattr(libs, "download_pretrained_weights", download)
    monkeypatch.setattr(python_api, "download_pretrained_weights", download)
    monkeypatch.setattr(totalseg.subprocess, "Popen", popen)
    return calls


# --- 1. facts: label table, and what dosebench hard-codes against TotalSegmentator 2.18.0 ------------


def test_label_table_is_the_total_map_grouped_by_part() -> None:
    table = totalseg.label_table()
    assert {i: info.name for i, info in table.items()} == dict(class_map["total"])
    assert len(table) == 117
    groups = {}
    for info in table.values():
        groups[info.group] = groups.get(info.group, 0) + 1
    assert groups == GROUP_SIZES
    assert table[TOTAL_ID["liver"]].group == "organs"
    assert table[TOTAL_ID["vertebrae_L1"]].group == "vertebrae"
    assert table[TOTAL_ID["heart"]].group == "cardiac"
    assert table[TOTAL_ID["gluteus_maximus_left"]].group == "muscles"
    assert table[TOTAL_ID["rib_left_1"]].group == "ribs"
    for part, names in class_map_5_parts.items():
        if part.startswith("class_map_part_"):
            assert {table[TOTAL_ID[n]].group for n in names.values()} == {part.removeprefix("class_map_part_")}


def test_hard_coded_facts_match_the_installed_totalsegmentator() -> None:
    sub_modes = TASK_CONFIGS["total"]["sub_modes"]
    assert tuple(sub_modes["default"]["task_id"]) == w.MODES["total"]
    assert (sub_modes["fast"]["task_id"],) == w.MODES["fast"]
    for mode, key in (("total", "default"), ("fast", "fast")):
        for dataset_id in w.MODES[mode]:
            model = w.DATASETS[dataset_id]
            assert model.trainer == sub_modes[key]["trainer"]
            assert model.spacing_mm == sub_modes[key]["resample"]
            assert model.folder == TASK_ID_WEIGHTS_CONFIGS[dataset_id]["foldername"]
            assert TASK_ID_WEIGHTS_CONFIGS[dataset_id].get("rel_path") is None
    for dataset_id in w.MODES["total"]:
        assert w.DATASETS[dataset_id].part == map_taskid_to_partname_ct[dataset_id]
    # python_api.totalsegmentator's defaults that the provenance records
    defaults = {k: p.default for k, p in inspect.signature(python_api.totalsegmentator).parameters.items()}
    assert defaults["plans"] == w.PLANS and defaults["task"] == "total"
    assert "tta=False" in inspect.getsource(python_api.totalsegmentator)
    from totalsegmentator.map_tasks_config import DEFAULT_CONFIG
    assert DEFAULT_CONFIG["folds"] == [w.FOLD] and DEFAULT_CONFIG["model"] == w.CONFIGURATION


def test_weights_dir_resolution_follows_dosebench_then_totalsegmentator(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert w.resolve_weights_dir() == tmp_path / "home" / ".totalsegmentator" / "nnunet" / "results"
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "tshome"))
    assert w.resolve_weights_dir() == tmp_path / "tshome" / "nnunet" / "results"
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "tsweights"))
    assert w.resolve_weights_dir() == tmp_path / "tsweights"
    monkeypatch.setenv("DOSEBENCH_TOTALSEG_WEIGHTS", str(tmp_path / "ours"))
    assert w.resolve_weights_dir() == tmp_path / "ours"
    assert w.resolve_weights_dir(tmp_path / "explicit") == tmp_path / "explicit"
    # TotalSegmentator's own resolution agrees for its variables
    from totalsegmentator.config import get_weights_dir
    assert get_weights_dir() == tmp_path / "tsweights"


def test_fabricated_layout_is_what_nnunet_resolves(tiny_weights: Path, monkeypatch) -> None:
    monkeypatch.setenv("nnUNet_results", str(tiny_weights))
    for dataset_id, model in w.DATASETS.items():
        folder = tiny_weights / model.model_dir
        assert (folder / "fold_0" / "checkpoint_final.pth").is_file()
        dataset = json.loads((folder / "dataset.json").read_text())
        assert dataset["file_ending"] == ".nii.gz"
        assert {v: k for k, v in dataset["labels"].items() if v} == labels_of(dataset_id)
    assert all(s.present for s in w.weights_status(tiny_weights))


# --- 2. weights: status, refusal before any child or download, download delegation -------------------


def test_weights_status_names_missing_files(tmp_path: Path) -> None:
    fabricate_model(tmp_path, 297, FAST_WINNER)
    (tmp_path / w.DATASETS[297].model_dir / "fold_0" / "checkpoint_final.pth").unlink()
    status = {s.dataset_id: s for s in w.weights_status(tmp_path)}
    assert not status[297].present and status[297].folder_exists
    assert status[297].missing == (f"{w.DATASETS[297].model_dir}/fold_0/checkpoint_final.pth",)
    assert "fold_0/checkpoint_final.pth" in status[297].describe()
    assert not status[291].present and status[291].describe() == "folder missing"


@pytest.mark.parametrize("spec, expected", [("totalsegmentator", (291, 292, 293, 294, 295)),
                                            ("totalsegmentator:fast", (297,))])
def test_missing_weights_are_refused_before_any_child_or_download(
        spec: str, expected: tuple[int, ...], tmp_path: Path, monkeypatch, no_download_no_child) -> None:
    monkeypatch.setenv("DOSEBENCH_TOTALSEG_WEIGHTS", str(tmp_path / "empty"))
    with pytest.raises(InputError) as caught:
        make_segmenter(spec)
    message = str(caught.value)
    for dataset_id, model in w.DATASETS.items():
        assert (model.folder in message) == (dataset_id in expected), message
    assert "dosebench weights status" in caught.value.fix and "dosebench weights download" in caught.value.fix
    assert no_download_no_child == []
    assert not (tmp_path / "empty").exists(), "nothing may be created in the weights folder"


def test_one_incomplete_part_is_named_alone(tiny_weights: Path, tmp_path: Path, monkeypatch,
                                            no_download_no_child) -> None:
    import shutil

    partial = tmp_path / "weights"
    shutil.copytree(tiny_weights, partial)
    (partial / w.DATASETS[293].model_dir / "plans.json").unlink()
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(partial))
    with pytest.raises(InputError) as caught:
        make_segmenter("totalsegmentator")
    message = caught.value.problem
    assert w.DATASETS[293].folder in message and "plans.json" in message
    assert all(w.DATASETS[i].folder not in message for i in (291, 292, 294, 295))
    assert no_download_no_child == []


def test_weights_going_missing_after_make_is_refused_at_segment(tmp_path: Path, no_download_no_child,
                                                                bundled_ct) -> None:
    fabricate_model(tmp_path, 297, FAST_WINNER)
    segmenter = totalseg.make_totalsegmentator("totalsegmentator:fast", weights_dir=tmp_path)
    (tmp_path / w.DATASETS[297].model_dir / "dataset.json").unlink()
    with pytest.raises(InputError, match="dataset.json"):
        segmenter.segment(bundled_ct.hu, bundled_ct.spacing_mm, affine=bundled_ct.affine)
    assert no_download_no_child == []


@pytest.mark.parametrize("spec", ["totalsegmentator:fastest", "totalseg", "nnunet"])
def test_unknown_spec_names_the_known_ones(spec: str) -> None:
    with pytest.raises(InputError) as caught:
        make_segmenter(spec)
    assert repr(spec) in caught.value.problem
    for known in ("threshold", "totalsegmentator", "totalsegmentator:fast"):
        assert known in caught.value.fix


def test_download_delegates_to_totalsegmentator(tmp_path: Path, monkeypatch) -> None:
    seen: list[tuple[int, str]] = []

    def fake_download(task_id):
        seen.append((task_id, os.environ["TOTALSEG_WEIGHTS_PATH"]))
        fabricate_model(Path(os.environ["TOTALSEG_WEIGHTS_PATH"]), task_id, None)

    monkeypatch.setattr(libs, "download_pretrained_weights", fake_download)
    status = w.download_weights(tmp_path, (297,))
    assert seen == [(297, str(tmp_path))]
    assert [s.present for s in status] == [True]
    assert "TOTALSEG_WEIGHTS_PATH" not in os.environ
    assert w.download_weights(tmp_path, (297,))[0].present and len(seen) == 1, "present: no second download"
    # a half-present folder would be skipped by TotalSegmentator (it only checks the folder): refused
    (tmp_path / w.DATASETS[292].folder).mkdir()
    with pytest.raises(InputError, match=w.DATASETS[292].folder):
        w.download_weights(tmp_path, (292,))


def test_weights_cli_status(tiny_weights: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dosebench.cli import app

    ready = CliRunner().invoke(app, ["weights", "status", "--path", str(tiny_weights)])
    assert ready.exit_code == 0, ready.output
    assert "totalsegmentator: ready" in ready.output and "totalsegmentator:fast: ready" in ready.output
    empty = CliRunner().invoke(app, ["weights", "status", "--path", str(tmp_path)])
    assert empty.exit_code == 1
    assert "folder missing" in empty.output and "not ready" in empty.output



def test_child_refuses_downloads_and_network(tiny_weights: Path, tmp_path: Path, monkeypatch) -> None:
    """The child's second line of defence, applied in this process (and undone after the test)."""
    import requests
    from totalsegmentator import config

    from dosebench.segmenter import totalseg_child

    for owner, name in ((libs, "download_pretrained_weights"), (python_api, "download_pretrained_weights"),
                        (python_api, "send_usage_stats"), (config, "send_usage_stats"),
                        (requests.sessions.Session, "request")):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # restored at teardown
    totalseg_child._forbid_downloads(tiny_weights)
    assert python_api.download_pretrained_weights(297) is None  # present: nothing to do, as TotalSegmentator
    totalseg_child._forbid_downloads(tmp_path / "empty")
    with pytest.raises(totalseg_child.NetworkRefused, match="task 291"):
        python_api.download_pretrained_weights(291)
    with pytest.raises(totalseg_child.NetworkRefused):
        requests.post("https://stats.totalsegmentator.com:443/log_totalseg_run", json={})
    assert python_api.send_usage_stats({"send_usage_stats": True}, {}) is None

# --- 3. child process: failures are reported, the child is killed on timeout, nothing is left ---------


def _fake_child(tmp_path: Path, monkeypatch, body: str) -> None:
    """Replace the child module by ``body`` (run with the child's argv)."""
    install_fake_child(tmp_path, monkeypatch, totalseg, "fake_totalseg_child", body)



def test_killed_child_is_reported_as_out_of_memory(tmp_path: Path, monkeypatch, scratch: Path) -> None:
    fabricate_model(tmp_path / "weights", 297, FAST_WINNER)
    _fake_child(tmp_path, monkeypatch, """
        import os, signal, sys
        print("allocating the logits", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    segmenter = totalseg.make_totalsegmentator("totalsegmentator:fast", weights_dir=tmp_path / "weights")
    with pytest.raises(totalseg.SegmenterFailed) as caught:
        segmenter.segment(np.zeros((8, 8, 8), np.float32), (3.0, 3.0, 3.0))
    assert "SIGKILL" in caught.value.problem and "out-of-memory" in caught.value.problem
    assert "allocating the logits" in caught.value.problem
    assert "more memory" in caught.value.fix
    assert list(scratch.iterdir()) == []


def test_failing_child_quotes_its_output(tmp_path: Path, monkeypatch, scratch: Path) -> None:
    fabricate_model(tmp_path / "weights", 297, FAST_WINNER)
    _fake_child(tmp_path, monkeypatch, """
        raise RuntimeError("nnU-Net could not read the plans")
    """)
    segmenter = totalseg.make_totalsegmentator("totalsegmentator:fast", weights_dir=tmp_path / "weights")
    with pytest.raises(totalseg.SegmenterFailed) as caught:
        segmenter.segment(np.zeros((8, 8, 8), np.float32), (3.0, 3.0, 3.0))
    assert "exit code 1" in caught.value.problem and "could not read the plans" in caught.value.problem
    assert list(scratch.iterdir()) == []


def test_timeout_kills_the_child_and_its_workers(tmp_path: Path, monkeypatch, scratch: Path) -> None:
    fabricate_model(tmp_path / "weights", 297, FAST_WINNER)
    pids = tmp_path / "pids.txt"
    _fake_child(tmp_path, monkeypatch, f"""
        import os, subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{worker.pid}}")
        time.sleep(300)
    """)
    monkeypatch.setenv("DOSEBENCH_TOTALSEG_TIMEOUT_S", "3")
    segmenter = totalseg.make_totalsegmentator("totalsegmentator:fast", weights_dir=tmp_path / "weights")
    assert segmenter.provenance["timeout_s"] == 3.0
    started = time.monotonic()
    with pytest.raises(totalseg.SegmenterFailed, match="did not finish within 3 s"):
        segmenter.segment(np.zeros((8, 8, 8), np.float32), (3.0, 3.0, 3.0))
    assert time.monotonic() - started < 30
    child, worker = map(int, pids.read_text().split())
    deadline = time.monotonic() + 10
    while (alive(child) or alive(worker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child) and not alive(worker)
    assert list(scratch.iterdir()) == []


def test_child_ends_when_its_parent_is_killed(tmp_path: Path, monkeypatch, scratch: Path) -> None:
    """A killed worker process (SIGKILL, a terminated task) must not leave TotalSegmentator running."""
    import subprocess
    import sys

    fabricate_model(tmp_path / "weights", 297, FAST_WINNER)
    pids = tmp_path / "pids.txt"
    _fake_child(tmp_path, monkeypatch, f"""
        import os, subprocess, sys, time
        from dosebench.segmenter.totalseg_child import watch_parent
        watch_parent(poll_s=0.2)
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        open({str(pids)!r}, "w").write(f"{{os.getpid()}} {{worker.pid}}")
        time.sleep(300)
    """)
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import numpy as np
        from pathlib import Path
        from dosebench.segmenter import totalseg
        totalseg.CHILD_MODULE = "fake_totalseg_child"
        totalseg.run_totalsegmentator(np.zeros((8, 8, 8), np.float32), (3.0, 3.0, 3.0), None, mode="fast",
                                      weights_dir=Path({str(tmp_path / "weights")!r}))
    """)], env={**os.environ, "TMPDIR": str(scratch)})
    try:
        deadline = time.monotonic() + 60
        while not (pids.is_file() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
            time.sleep(0.1)
        child, worker = map(int, pids.read_text().split())
        parent.kill()
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while (alive(child) or alive(worker)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child) and not alive(worker)
    finally:
        parent.kill()

def test_bad_timeout_setting_is_refused(monkeypatch, tiny_weights: Path) -> None:
    monkeypatch.setenv("DOSEBENCH_TOTALSEG_TIMEOUT_S", "soon")
    with pytest.raises(InputError, match="DOSEBENCH_TOTALSEG_TIMEOUT_S"):
        totalseg.make_totalsegmentator("totalsegmentator:fast", weights_dir=tiny_weights)


# --- 4. the real TotalSegmentator end to end on the bundled CT (CPU) ---------------------------------


def _check_uniform(segmentation, volume, name: str, group: str) -> None:
    label = TOTAL_ID[name]
    assert segmentation.labels.shape == volume.shape
    assert segmentation.labels.dtype == np.uint8
    assert np.all(segmentation.labels == label), np.unique(segmentation.labels)
    info = segmentation.table[label]
    assert (info.id, info.name, info.group) == (label, name, group)
    assert len(segmentation.table) == 117


@pytest.mark.slow
def test_five_part_models_on_the_bundled_ct(tiny_weights: Path, bundled_ct, monkeypatch, scratch: Path) -> None:
    monkeypatch.setenv("DOSEBENCH_TOTALSEG_WEIGHTS", str(tiny_weights))
    segmenter = make_segmenter("totalsegmentator")
    record = segmenter.provenance
    assert [d["id"] for d in record["datasets"]] == [291, 292, 293, 294, 295]
    assert {d["trainer"] for d in record["datasets"]} == {"nnUNetTrainerNoMirroring"}
    assert record["folds"] == [0] and record["mirroring"] is False and record["test_time_augmentation"] is False
    assert record["resample_mm"] == 1.5 and record["weights_dir"] == str(tiny_weights)

    segmentation = segmenter.segment(bundled_ct.hu, bundled_ct.spacing_mm, affine=bundled_ct.affine)

    # vertebrae part (local id 7) mapped to the total map's id 31, laid over the organs part's liver
    assert labels_of(292)[7] == "vertebrae_L1" and TOTAL_ID["vertebrae_L1"] == 31
    _check_uniform(segmentation, bundled_ct, "vertebrae_L1", "vertebrae")
    assert list(scratch.iterdir()) == [], "temporary files left behind"


@pytest.mark.slow
def test_fast_model_on_the_bundled_ct(tiny_weights: Path, bundled_ct, monkeypatch, scratch: Path) -> None:
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tiny_weights))
    segmenter = make_segmenter("totalsegmentator:fast")
    assert segmenter.spec == "totalsegmentator:fast"
    assert [d["id"] for d in segmenter.provenance["datasets"]] == [297]
    assert segmenter.provenance["datasets"][0]["trainer"] == "nnUNetTrainer_4000epochs_NoMirroring"
    assert segmenter.provenance["resample_mm"] == 3.0

    # The fabricated fast model labels voxels much brighter than their surroundings (bone). A bright block
    # in the anterior-right-inferior corner of the air, where its mirror images along each axis are air
    # too, shows that the label map comes back on the input's grid, not flipped along any axis.
    # HU with a fractional part go to the child as float32, not rounded.
    hu = bundled_ct.hu + np.float32(0.25)
    block = np.s_[2:10, 91:99, 2:8]
    assert hu[block].max() < -900 and hu[112:120, 91:99, 2:8].max() < -900 and hu[2:10, 91:99, 22:28].max() < -900
    hu[block] = 1500.0
    segmentation = segmenter.segment(hu, bundled_ct.spacing_mm, affine=bundled_ct.affine)

    heart = TOTAL_ID[FAST_WINNER]
    labels = segmentation.labels
    assert labels.shape == bundled_ct.shape and labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == {0, heart}
    assert np.all(labels[block] == heart)
    for mirror in (np.s_[112:120, 91:99, 2:8], np.s_[2:10, 2:10, 2:8], np.s_[2:10, 91:99, 22:28]):
        assert not np.any(labels[mirror]), "the label map is flipped"
    bone, soft = bundled_ct.hu > 300, (bundled_ct.hu > -100) & (bundled_ct.hu < 100)
    assert (labels[bone] == heart).mean() > 0.5 and not np.any(labels[soft])
    info = segmentation.table[heart]
    assert (info.id, info.name, info.group) == (heart, FAST_WINNER, "cardiac") and len(segmentation.table) == 117
    assert list(scratch.iterdir()) == [], "temporary files left behind"


# --- 5. `dosebench run --segmenter totalsegmentator:fast` through the CLI ----------------------------


@pytest.mark.slow
def test_cli_run_with_fast_totalsegmentator(run_cli, cropped_ct: Path, tiny_weights: Path, tmp_path: Path,
                                            monkeypatch) -> None:
    monkeypatch.setenv("DOSEBENCH_TOTALSEG_WEIGHTS", str(tiny_weights))
    out = tmp_path / "run"
    # one dose level (the full dose) keeps it to one TotalSegmentator call (~25 s on 2 cores)
    result = run_cli("run", "--input", cropped_ct, "--doses", "1.0", "--protocol", "tiny",
                     "--segmenter", "totalsegmentator:fast", "--out", out, "--quiet")
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"

    heart = TOTAL_ID[FAST_WINNER]
    source = nib.load(str(cropped_ct))
    seg = nib.load(str(out / "seg" / "dose-1.00.nii.gz"))
    recon = np.asarray(nib.load(str(out / "recon" / "dose-1.00.nii.gz")).dataobj)
    assert seg.shape == source.shape and np.allclose(seg.affine, source.affine)
    labels = np.asarray(seg.dataobj)
    assert set(np.unique(labels).tolist()) == {0, heart}
    # the fabricated fast model labels bone: the labelled voxels are bright in the reconstruction
    assert recon[labels == heart].mean() > 150 and recon[labels == 0].mean() < 0
    labels = json.loads((out / "seg" / "labels.json").read_text())
    assert len(labels) == 117 and labels[str(heart)] == {"name": FAST_WINNER, "group": "cardiac"}
    record = json.loads((out / "protocol.json").read_text())["segmenter"]
    assert record["spec"] == "totalsegmentator:fast" and record["backend"] == "totalsegmentator"
    assert record["datasets"][0]["folder"] == w.DATASETS[297].folder
    per_label = (out / "metrics" / "per_label.csv").read_text()
    assert f",{FAST_WINNER}," in per_label


def test_cli_run_without_weights_fails_cleanly(run_cli, cropped_ct: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DOSEBENCH_TOTALSEG_WEIGHTS", str(tmp_path / "no-weights"))
    out = tmp_path / "run"
    result = run_cli("run", "--input", cropped_ct, "--doses", "0.5", "--protocol", "tiny",
                     "--segmenter", "totalsegmentator:fast", "--out", out, "--quiet", timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert w.DATASETS[297].folder in errors[0] and "dosebench weights download" in errors[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "no output and no staging folder"
    assert not (tmp_path / "no-weights").exists()


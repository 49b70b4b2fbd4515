"""Reports: the self-contained HTML page, the evaluate stage's figures and report files, the embedded
run's output folder, and the figures' numbers against the metric rows a real job stored in PostgreSQL."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from dosebench.reports.figures import FIGURE_NAMES  # noqa: E402
from dosebench.reports.html import render_html  # noqa: E402
from dosebench.segmenter.metrics import aggregate, dose_key  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\nnot really a png"
#: per_label.csv (and so the database) keeps Dice to 6 decimals: each value within 5e-7 of the exact
#: one, and so is a mean of them; a median of means and a MAD (a difference of two) within 1e-6
ROUNDING_TOLERANCE = 1e-6


def test_render_html_is_self_contained() -> None:
    markdown = "\n".join([
        "# Report: <study>", "", "Some **bold** text and `code`.", "",
        "| Group | 20 % | n |", "|:---|---:|---:|", "| organs | 0.950 ± 0.000 | 1 |", "| **all** | 0.9 | 1 |", "",
        "![Dice against dose](dice_vs_dose.png)", "", "figure1.png", "", "![missing](absent.png)", ""])
    page = render_html("t <1>", markdown, {"dice_vs_dose.png": PNG, "figure1.png": PNG})
    assert page.startswith("<!DOCTYPE html>") and "<title>t &lt;1&gt;</title>" in page
    assert "<h1>Report: &lt;study&gt;</h1>" in page and "<strong>bold</strong>" in page
    assert "<code>code</code>" in page
    # the table, with its alignment
    assert '<th style="text-align:left">Group</th>' in page
    assert '<td style="text-align:right">0.950 ± 0.000</td>' in page
    assert "<td style=\"text-align:left\"><strong>all</strong></td>" in page
    # both images inline as data URIs, the missing one as text; nothing loaded from elsewhere
    uris = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(uris) == 2 and all(base64.b64decode(u) == PNG for u in uris)
    assert "absent.png: not available" in page
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<link" not in page


@pytest.mark.slow
def test_embedded_run_writes_figures_and_reports(cropped_ct: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "run"
    result = run_cli("run", "--input", cropped_ct, "--doses", "0.25,0.5", "--protocol", "tiny",
                     "--segmenter", "threshold", "--seed", "7", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr
    for name in FIGURE_NAMES:
        assert (out / "figures" / f"{name}.png").read_bytes().startswith(b"\x89PNG")
        json.loads((out / "figures" / f"{name}.json").read_text())
    report = (out / "report.md").read_text()
    assert all(f"](figures/{name}.png)" in report for name in FIGURE_NAMES)
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(FIGURE_NAMES)

    # the figure's numbers are the per-label rows' aggregate
    metrics = json.loads((out / "metrics" / "metrics.json").read_text())["rows"]
    summary = json.loads((out / "metrics" / "summary.json").read_text())["groups"]
    dice = json.loads((out / "figures" / "dice_vs_dose.json").read_text())
    assert aggregate(metrics) == summary
    for group, points in dice["groups"].items():
        for point in points:
            assert point["median"] == summary[group][dose_key(point["dose"])]["median"]
    figure1 = json.loads((out / "figures" / "figure1.json").read_text())
    assert figure1["dose"] == 0.25 and figure1["slice_chosen_by"].startswith("largest")
    noise = json.loads((out / "figures" / "noise_vs_dose.json").read_text())
    assert noise["doses"] == [0.25, 0.5, 1.0] and noise["region_voxels"] > 100
    # the dose-reduction model: var(recon_d - recon_full) = sigma_full^2 (1/d - 1), so each lower dose
    # alone estimates sigma_full; the two estimates agree to the sampling error of a few hundred
    # independent voxels (the region's ~1600 voxels are correlated by the reconstruction blur): 25 %
    alone = [noise["added_hu_std"][i] / (1 / noise["doses"][i] - 1) ** 0.5 for i in (0, 1)]
    assert alone[0] == pytest.approx(alone[1], rel=0.25), noise
    assert noise["hu_std"][0] > noise["hu_std"][1] > noise["hu_std"][2] > 0
    # the input's texture dominates the total std at these photon counts, identical at every dose
    assert noise["total_hu_std"][2] > noise["hu_std"][2]


@pytest.mark.slow
def test_figure_numbers_equal_the_metrics_in_postgresql(postgres_url: str, cropped_ct: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A real job through every stage against PostgreSQL (in this process: run_stage, the function each
    Celery task calls), then the Metric rows read back and compared with the figures' JSON."""
    import fsspec
    from sqlalchemy import delete, select

    from dosebench.core import celery_app, db, jobs
    from dosebench.core.db import Artifact, Job, Metric, Stage, Study
    from dosebench.core.execution import run_stage
    from dosebench.core.protocol import load_protocol
    from dosebench.core.settings import get_settings
    from dosebench.stages import JobSpec

    monkeypatch.setenv("DOSEBENCH_DATABASE_URL", postgres_url)
    monkeypatch.setenv("DOSEBENCH_STORAGE_URL", f"file://{tmp_path / 'storage'}")
    monkeypatch.setenv("DOSEBENCH_BROKER_URL", "memory://")
    get_settings.cache_clear()
    ready: list = []
    monkeypatch.setattr(celery_app, "enqueue", lambda stages: ready.extend(stages) or [s.id for s in stages])
    db.upgrade_database(postgres_url)
    factory = db.session_factory(postgres_url)
    try:
        with factory() as session:
            study = jobs.add_study(session, name="ct_crop", input_uri=str(cropped_ct), kind="nifti",
                                   checksum="0" * 64, bytes=cropped_ct.stat().st_size, header_summary={})
            spec = JobSpec(input_url=str(cropped_ct), doses=[0.25, 0.5], protocol=load_protocol("tiny"),
                           segmenter="threshold", seed=7, study="ct_crop")
            job_id = jobs.create_job(session, study, spec, "tester").id
            ready.extend(jobs.ready_stages(session, job_id))
        while ready:
            stage = ready.pop(0)
            assert run_stage(stage.id, stage.name) == "succeeded", stage.name
        with factory() as session:
            assert session.get(Job, job_id).state == db.SUCCEEDED
            stored = [{"study": "ct_crop", "dose": m.dose, "group": m.group, "label": m.label, "dice": m.dice}
                      for m in session.execute(select(Metric).where(Metric.job_id == job_id,
                                                                    Metric.reference == "full_dose")).scalars()]
            evaluate = session.execute(select(Artifact).join(Stage, Artifact.stage_id == Stage.id)
                                       .where(Stage.job_id == job_id, Stage.name == "evaluate")).scalars().all()
        files = {a.uri.rsplit("/", 1)[-1]: a.uri for a in evaluate}
        assert {f"{n}.{s}" for n in FIGURE_NAMES for s in ("png", "json")} | {"report.html", "metrics.json"} \
            <= set(files)
        with fsspec.open(files["dice_vs_dose.json"], "rt") as handle:
            plotted = json.load(handle)
        from_database = aggregate(stored)
        assert stored and plotted["doses"] == [0.25, 0.5, 1.0]
        assert set(plotted["groups"]) == set(from_database)
        for group, points in plotted["groups"].items():
            assert [p["dose"] for p in points] == [0.25, 0.5, 1.0]
            for point in points:
                cell = from_database[group][dose_key(point["dose"])]
                assert point["median"] == pytest.approx(cell["median"], abs=ROUNDING_TOLERANCE)
                assert point["mad"] == pytest.approx(cell["mad"], abs=ROUNDING_TOLERANCE)
                assert point["n"] == cell["n"] == 1
        # every stored row is in metrics.json, at full precision
        with fsspec.open(files["metrics.json"], "rt") as handle:
            exact = {(r["dose"], r["label"]): r["dice"] for r in json.load(handle)["rows"]
                     if r["reference"] == "full_dose"}
        assert len(exact) == len(stored)
        for row in stored:
            assert row["dice"] == pytest.approx(exact[(row["dose"], row["label"])], abs=5e-7)
    finally:
        get_settings.cache_clear()
        with factory() as session:  # leave nothing for other tests sharing the database
            for model in (Metric, Artifact, Stage, Job, Study):
                session.execute(delete(model))
            session.commit()

"""The dashboard's server side without a browser: the job list's ETag / 304, the login cookie as an
alternative to the bearer header, logout, and the pages' redirects (SQLite, no worker)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("jinja2")
from fastapi.testclient import TestClient  # noqa: E402
from sqlalchemy import select  # noqa: E402

from dosebench.api.app import create_app  # noqa: E402
from dosebench.api.dashboard import TOKEN_COOKIE  # noqa: E402
from dosebench.api.tokens import create_token  # noqa: E402
from dosebench.core import db, jobs  # noqa: E402
from dosebench.core.protocol import load_protocol  # noqa: E402
from dosebench.core.settings import get_settings  # noqa: E402
from dosebench.stages import JobSpec  # noqa: E402


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DOSEBENCH_DATABASE_URL", f"sqlite:///{tmp_path / 'dosebench.db'}")
    monkeypatch.setenv("DOSEBENCH_STORAGE_URL", f"file://{tmp_path / 'storage'}")
    monkeypatch.setenv("DOSEBENCH_BROKER_URL", "memory://")
    get_settings.cache_clear()
    settings = get_settings()
    db.upgrade_database(settings.database_url)
    token = create_token(settings.database_url, "dashboard-test")
    sent: list[str] = []
    app = create_app(settings, enqueue=sent.append)
    try:
        yield app, settings, token
    finally:
        get_settings.cache_clear()


def _add_job(settings, doses=(0.5,)) -> str:
    with db.session_factory(settings.database_url)() as session:
        study = jobs.add_study(session, name="ct", input_uri="file:///nowhere/ct.nii.gz", kind="nifti",
                               checksum="0" * 64, bytes=1, header_summary={})
        spec = JobSpec(input_url="file:///nowhere/ct.nii.gz", doses=list(doses), protocol=load_protocol("tiny"))
        return jobs.create_job(session, study, spec, "tester").id


def test_job_list_answers_304_while_nothing_changes(server) -> None:
    app, settings, token = server
    first_job = _add_job(settings)
    with TestClient(app, headers={"Authorization": f"Bearer {token}"}) as client:
        first = client.get("/v1/jobs", params={"stages": "true"})
        assert first.status_code == 200 and first.json()["total"] == 1
        etag = first.headers["ETag"]
        assert etag.startswith('W/"')
        assert [s["name"] for s in first.json()["jobs"][0]["stages"]][0] == "acquire"

        idle = client.get("/v1/jobs", params={"stages": "true"}, headers={"If-None-Match": etag})
        assert idle.status_code == 304 and idle.content == b"" and idle.headers["ETag"] == etag

        # other query, other ETag: the answer differs
        plain = client.get("/v1/jobs", headers={"If-None-Match": etag})
        assert plain.status_code == 200 and plain.headers["ETag"] != etag and "stages" not in plain.json()["jobs"][0]

        # a stage changes: the job's updated_at moves, so the same request is a 200 again
        with db.session_factory(settings.database_url)() as session:
            stage = jobs.ready_stages(session, first_job)[0]
            assert jobs.claim_stage(session, stage.id, "w1") is not None
        changed = client.get("/v1/jobs", params={"stages": "true"}, headers={"If-None-Match": etag})
        assert changed.status_code == 200 and changed.headers["ETag"] != etag
        assert changed.json()["jobs"][0]["stages"][0]["state"] == "running"

        # a new job changes the answer too
        etag = changed.headers["ETag"]
        _add_job(settings)
        added = client.get("/v1/jobs", params={"stages": "true"}, headers={"If-None-Match": etag})
        assert added.status_code == 200 and added.json()["total"] == 2

        # updated_since: only what changed after the answer's server_time; idle is a 304 as well
        since = added.json()["server_time"]
        empty = client.get("/v1/jobs", params={"updated_since": since})
        assert empty.status_code == 200 and empty.json()["jobs"] == []
        assert client.get("/v1/jobs", params={"updated_since": since},
                          headers={"If-None-Match": empty.headers["ETag"]}).status_code == 304
        with db.session_factory(settings.database_url)() as session:
            jobs.request_cancel(session, first_job)
        moved = client.get("/v1/jobs", params={"updated_since": since}, headers={"If-None-Match": empty.headers["ETag"]})
        assert moved.status_code == 200 and [j["id"] for j in moved.json()["jobs"]] == [first_job]


def test_login_cookie_authenticates_the_api_and_logout_clears_it(server) -> None:
    app, settings, token = server
    job_id = _add_job(settings)
    with TestClient(app) as client:
        assert client.get("/v1/jobs").status_code == 401
        page = client.get("/", follow_redirects=False)
        assert page.status_code == 303 and page.headers["location"] == "/login"
        assert client.get("/login").status_code == 200

        refused = client.post("/login", data={"token": "dbt_wrong"}, follow_redirects=False)
        assert refused.status_code == 401 and TOKEN_COOKIE not in refused.cookies
        assert "unknown or revoked token" in refused.text

        login = client.post("/login", data={"token": token}, follow_redirects=False)
        assert login.status_code == 303 and login.headers["location"] == "/"
        cookie = login.headers["set-cookie"]
        assert f"{TOKEN_COOKIE}={token}" in cookie
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        assert "Path=/" in cookie

        # the cookie is the API's credential now (no Authorization header is sent)
        listed = client.get("/v1/jobs")
        assert listed.status_code == 200 and listed.json()["jobs"][0]["id"] == job_id
        index = client.get("/")
        assert index.status_code == 200 and "dashboard.js" in index.text and "dashboard-test" in index.text
        detail = client.get(f"/jobs/{job_id}")
        assert detail.status_code == 200 and job_id in detail.text
        assert client.get("/jobs/nope").status_code == 404
        assert client.get("/static/dashboard.js").status_code == 200
        assert client.get(f"/jobs/{job_id}/files/dice_vs_dose.png").status_code == 404  # not evaluated yet

        # a header wins over the cookie: a wrong bearer token is refused although the cookie is good
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer dbt_wrong"}).status_code == 401

        out = client.post("/logout", follow_redirects=False)
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert client.get("/v1/jobs").status_code == 401
        assert client.get("/", follow_redirects=False).status_code == 303


# -- cohort evaluation runs and schedules -------------------------------------------------------------------

EVAL_LABELS = [("tissue", "fat", 3), ("tissue", "bone", 5), ("air", "lung", 2)]
#: a figure printed with 4 decimals is within half a unit of the 4th decimal of the stored one
PRINTED_4_DECIMALS = 0.5e-4 + 1e-12


def _per_label_csv(dice_by_label: dict[str, float]) -> str:
    """A job's per_label.csv: Dice 1 at the full dose, the given Dice at dose 0.5."""
    lines = ["study,dose,reference,group,label,label_id,dice,reference_voxels,test_voxels,volume_change_ml,"
             "surface_dice,hd95_mm"]
    for dose in (0.5, 1.0):
        for group, label, label_id in EVAL_LABELS:
            value = dice_by_label[label] if dose == 0.5 else 1.0
            lines.append(f"x,{dose},full_dose,{group},{label},{label_id},{value!r},100,100,0.0,1.0,0.0")
    return "\n".join(lines) + "\n"


def _evaluated_runs(settings):
    """A cohort of three studies with two finished runs of the same settings: the first all well, the
    second with lower Dice and one failed study (a regression), plus a schedule whose firing is running."""
    from datetime import timedelta

    from sqlalchemy import select

    from dosebench.core import cohorts, schedules
    from dosebench.core.cohorts import EvaluationRequest
    from dosebench.core.db import EvaluationJob, Job

    request = EvaluationRequest(protocol="tiny", doses=(0.5, 1.0), segmenter="threshold", seed=7)
    first_dice = [{"fat": 0.90, "bone": 0.80, "lung": 0.70}, {"fat": 0.80, "bone": 0.60, "lung": 0.50},
                  {"fat": 0.95, "bone": 0.95, "lung": 0.95}]
    second_dice = [{"fat": 0.70, "bone": 0.80, "lung": 0.70}, {"fat": 0.80, "bone": 0.55, "lung": 0.50}, None]
    with db.session_factory(settings.database_url)() as session:
        ids = [jobs.add_study(session, name=f"s{i}", input_uri=f"file:///nowhere/s{i}.nii.gz", kind="nifti",
                              checksum="0" * 64, bytes=1, header_summary={}).id for i in range(3)]
        cohort = cohorts.create_cohort(session, "liver", ids, "three CTs")
        runs = []
        for values in (first_dice, second_dice):
            run, _ = cohorts.start_run(session, cohort, request, lambda job_id: None)
            by_study = dict(session.execute(select(EvaluationJob.study_id, EvaluationJob.job_id)
                                            .where(EvaluationJob.run_id == run.id)).all())
            for study_id, dice in zip(ids, values, strict=True):
                job = session.get(Job, by_study[study_id])
                if dice is None:
                    job.state, job.error = db.FAILED, "SimulateError: detector on <fire>"
                else:
                    jobs.record_metrics(session, job.id, _per_label_csv(dice))
                    job.state = db.SUCCEEDED
                session.commit()
            runs.append(cohorts.advance_run(session, run.id, settings.storage_url))
        schedule = schedules.create_schedule(session, cohort, "0 2 * * *", request,
                                             now=db.utcnow() - timedelta(days=2))
        [scheduled_id] = schedules.fire_due(session, db.utcnow(), lambda job_id: None)
        scheduled = session.get(db.EvaluationRun, scheduled_id)
    return runs[0], runs[1], scheduled, schedule


def _rows_by_id(html: str, prefix: str) -> dict[str, str]:
    import re

    return {m.group(1): m.group(2) for m in re.finditer(rf'<tr id="{prefix}-([^"]+)"(.*?)</tr>', html, re.S)}


def _counts(row_html: str) -> tuple[int, int, int]:
    import re

    found = [int(re.search(rf'class="{name}[^"]*">(\d+)<', row_html).group(1))
             for name in ("ok-count", "failed-count", "total-count")]
    return found[0], found[1], found[2]


def test_evaluation_pages_show_the_verdict_table1_and_changes_as_stored(server) -> None:
    import html
    import json
    import re

    app, settings, token = server
    ok_run, bad_run, scheduled, schedule = _evaluated_runs(settings)
    assert ok_run.state == db.FINISHED and ok_run.regression is False
    assert bad_run.regression is True and bad_run.previous_run_id == ok_run.id and len(bad_run.reasons) >= 2
    with TestClient(app) as client:
        assert client.get("/evaluations", follow_redirects=False).status_code == 303  # not logged in
        assert client.get("/evaluations/live").status_code == 401
        assert client.get(f"/evaluations/{ok_run.id}/files/summary.json").status_code == 401
        assert client.post("/login", data={"token": token}, follow_redirects=False).status_code == 303

        index = client.get("/")
        assert 'href="/evaluations"' in index.text  # the header links to the page
        page = client.get("/evaluations")
        assert page.status_code == 200 and "dosebench.evaluationList()" in page.text
        rows = _rows_by_id(page.text, "run")
        assert set(rows) == {ok_run.id, bad_run.id, scheduled.id}
        assert 'data-verdict="regression"' in rows[bad_run.id] and ">REGRESSION<" in rows[bad_run.id]
        for reason in bad_run.reasons:
            assert html.escape(reason) in rows[bad_run.id]
        assert 'data-verdict="ok"' in rows[ok_run.id] and "REGRESSION" not in rows[ok_run.id]
        for run in (ok_run, bad_run):  # the numbers of a finished run are its stored counts
            assert _counts(rows[run.id]) == (run.counts["succeeded"], run.counts["failed"], run.counts["studies"])
        assert _counts(rows[bad_run.id]) == (2, 1, 3)
        assert 'data-state="running"' in rows[scheduled.id] and _counts(rows[scheduled.id]) == (0, 0, 3)
        [schedule_row] = _rows_by_id(page.text, "schedule").values()
        assert "0 2 * * *" in schedule_row and scheduled.id in schedule_row and ">yes<" in schedule_row
        assert 'id="evaluate-now"' in page.text and '<option value="liver">' in page.text

        # the polled fragment: same content, an ETag, and a 304 while nothing changes
        live = client.get("/evaluations/live")
        assert live.status_code == 200 and live.headers["ETag"].startswith('W/"')
        # the page starts polling from what it shows
        assert html.unescape(re.search(r'data-etag="([^"]+)"', page.text).group(1)) == live.headers["ETag"]
        assert _rows_by_id(live.text, "run").keys() == rows.keys()
        idle = client.get("/evaluations/live", headers={"If-None-Match": live.headers["ETag"]})
        assert idle.status_code == 304 and idle.content == b""
        with db.session_factory(settings.database_url)() as session:  # a job of the running run ends
            job = session.scalars(select(db.Job).join(db.EvaluationJob, db.EvaluationJob.job_id == db.Job.id)
                                  .where(db.EvaluationJob.run_id == scheduled.id)).first()
            job.state, job.error = db.FAILED, "boom"
            session.commit()
        moved = client.get("/evaluations/live", headers={"If-None-Match": live.headers["ETag"]})
        assert moved.status_code == 200 and moved.headers["ETag"] != live.headers["ETag"]
        assert _counts(_rows_by_id(moved.text, "run")[scheduled.id]) == (0, 1, 3)

        # the regression run's page: Table 1 cell by cell as stored, the changes, reasons, studies, versions
        detail = client.get(f"/evaluations/{bad_run.id}")
        assert detail.status_code == 200
        text = detail.text
        assert 'id="run-verdict">REGRESSION<' in text
        reasons = text.split('id="reasons"', 1)[1].split("</div>", 1)[0]
        assert [html.unescape(r) for r in re.findall(r"<li>(.*?)</li>", reasons)] == bad_run.reasons
        cells = re.findall(r'<td data-group="([^"]+)" data-dose="([^"]+)" data-n="(\d+)">([-0-9.]+) ± ([-0-9.]+)<',
                           text.split('id="table1-full_dose"', 1)[1].split("</section>", 1)[0])
        stored = bad_run.table1["full_dose"]
        assert len(cells) == sum(len(v) for v in stored.values()) == 3 * 2
        for group, key, n, median, mad in cells:
            assert float(median) == pytest.approx(stored[group][key]["median"], abs=PRINTED_4_DECIMALS)
            assert float(mad) == pytest.approx(stored[group][key]["mad"], abs=PRINTED_4_DECIMALS)
            assert int(n) == stored[group][key]["n"] == 2
        # tissue at 0.5: study means (0.75, 0.675) -> median 0.7125; the first run had (0.85, 0.70, 0.95) -> 0.85
        assert stored["tissue"]["0.50"]["median"] == pytest.approx(0.7125, abs=1e-12)
        changes = re.findall(r'<tr data-group="([^"]+)" data-dose="([^"]+)"( class="regressed")?>.*?'
                             r'<td class="change">([-+0-9.]+)</td>', text, re.S)
        before = ok_run.table1["full_dose"]
        assert len(changes) == 6
        for group, key, regressed, change in changes:
            exact = stored[group][key]["median"] - before[group][key]["median"]
            assert float(change) == pytest.approx(exact, abs=PRINTED_4_DECIMALS)
            assert bool(regressed) == (-exact > bad_run.regression_threshold)
            assert bool(regressed) == any(r.startswith(f"{group} at dose {key}:") for r in bad_run.reasons)
        assert f'href="/evaluations/{ok_run.id}"' in text  # the previous run
        with db.session_factory(settings.database_url)() as session:
            job_ids = list(session.scalars(select(db.EvaluationJob.job_id)
                                           .where(db.EvaluationJob.run_id == bad_run.id)))
        assert all(f'href="/jobs/{j}"' in text for j in job_ids) and len(job_ids) == 3
        assert f'id="evaluation-run" href="/evaluations/{bad_run.id}"' in client.get(f"/jobs/{job_ids[0]}").text
        # per study: the mean Dice over all labels at 0.5; Table 1's "all" cell is their median (two studies:
        # the mean of two figures printed with 4 decimals)
        study_rows = _rows_by_id(text.split('id="study-table"', 1)[1].split("</table>", 1)[0], "study")
        at_half = []
        for row in study_rows.values():
            figures = re.findall(r"<td>([0-9.]+)</td>", row)  # Dice at 0.50, then at 1.00
            at_half += [float(figures[0])] if figures else []
        assert len(at_half) == 2  # the failed study has none
        assert sum(at_half) / 2 == pytest.approx(stored["all"]["0.50"]["median"], abs=PRINTED_4_DECIMALS)
        failed = text.split('id="failed-studies"', 1)[1].split("</section>", 1)[0]
        assert "detector on &lt;fire&gt;" in failed and "s2" in failed  # escaped, never markup
        assert bad_run.protocol_sha256 in text and bad_run.versions["dosebench"] in text

        # its report files, inline from the storage; nothing else under the folder
        links = re.findall(rf'href="/evaluations/{bad_run.id}/files/([^"]+)"', text)
        assert {"report.md", "summary.json", "per_study.csv"} <= set(links)
        summary = client.get(f"/evaluations/{bad_run.id}/files/summary.json")
        assert summary.status_code == 200 and summary.headers["content-type"] == "application/json"
        assert json.loads(summary.content)["table1"] == bad_run.table1
        assert "sandbox" in summary.headers["content-security-policy"]
        assert client.get(f"/evaluations/{bad_run.id}/files/summary.json",
                          headers={"If-None-Match": summary.headers["ETag"]}).status_code == 304
        report = client.get(f"/evaluations/{bad_run.id}/files/report.md")
        assert report.headers["content-type"].startswith("text/markdown") and "Regression" in report.text
        per_study = client.get(f"/evaluations/{bad_run.id}/files/per_study.csv")
        assert per_study.text.startswith("study_id,") and per_study.text.count(bad_run.study_ids[0]) >= 1
        if "dice_vs_dose.png" in links:
            figure = client.get(f"/evaluations/{bad_run.id}/files/dice_vs_dose.png")
            assert figure.content.startswith(b"\x89PNG") and 'id="fig-dice_vs_dose"' in text
        assert client.get(f"/evaluations/{bad_run.id}/files/dosebench.db").status_code == 404
        assert client.get(f"/evaluations/{scheduled.id}/files/summary.json").status_code == 404  # not finished

        # the ok run: badge ok, nothing to compare with; the running one: no verdict yet, live counts
        first = client.get(f"/evaluations/{ok_run.id}").text
        assert 'id="run-verdict">ok<' in first and 'id="reasons"' not in first and "No earlier finished run" in first
        running = client.get(f"/evaluations/{scheduled.id}").text
        assert 'id="run-verdict">running<' in running and "0 2 * * *" in running and 'id="failed-studies"' in running
        assert client.get("/evaluations/no-such-run").status_code == 404

"""The dashboard end to end in headless Chromium: a real `dosebench serve --embedded` (uvicorn, SQLite,
in-process worker) on a free port; log in with a token, upload the cropped CT and submit a tiny job
through the page, watch it go from queued to succeeded, open it, and find Table 1 and the three figures
loaded. A screenshot of the job page goes to test-artifacts/.

Debian's /usr/bin/chromium is driven by Python Playwright (no browser download). Without it the test
skips with the reason; under CI=true it fails instead.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from service_processes import embedded_server as start_embedded_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
#: a job on the cropped CT with the tiny protocol and the threshold segmenter takes well under this
JOB_TIMEOUT_S = 300


def _unavailable(reason: str) -> None:
    """Skip with a visible reason; in CI (CI=true) a missing browser is a failure, never a skip."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: the browser test must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("Python Playwright is not installed (pip install -e '.[dev]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def embedded_server(tmp_path: Path, run_cli):
    home = tmp_path / "server"
    created = run_cli("token", "create", "browser-test", "--home", home)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    with start_embedded_server(home, tmp_path / "server.log") as base:
        yield base, token


@pytest.mark.slow
def test_dashboard_runs_a_job_in_chromium(browser, embedded_server, cropped_ct: Path) -> None:
    base, token = embedded_server
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        # not logged in: the dashboard sends the browser to the login form
        page.goto(f"{base}/")
        assert page.url.endswith("/login")
        page.fill("#token", "dbt_wrong")
        page.click("#login")
        assert "unknown or revoked token" in page.inner_text("#login-error")
        page.fill("#token", token)
        page.click("#login")
        page.wait_for_url(f"{base}/")
        cookie = next(c for c in context.cookies() if c["name"] == "dosebench_token")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        assert page.evaluate("document.cookie") == ""  # HttpOnly: invisible to the page's scripts

        # submit through the page: upload, then the job
        page.set_input_files("#study-file", str(cropped_ct))
        page.fill("#doses", "0.25")
        page.select_option("#protocol", "tiny")
        page.select_option("#segmenter", "threshold")
        page.click("#submit-job")
        page.wait_for_function("document.getElementById('submit-status').textContent.startsWith('job ')")
        status = page.inner_text("#submit-status")
        assert status.endswith("queued"), status
        row = page.locator("table.jobs tbody tr[id^='job-']")
        row.first.wait_for()
        job_id = row.first.get_attribute("id").removeprefix("job-")

        # the list follows the job by polling until it has succeeded, every stage bar full
        seen = set()
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            state = page.get_attribute(f"#job-{job_id}", "data-state")
            seen.add(state)
            if state in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.3)
        assert state == "succeeded", (state, page.inner_text(f"#job-{job_id}"))
        assert seen & {"queued", "running"}, seen  # it was seen before it finished
        bars = page.locator(f"#job-{job_id} .stage")
        # acquire, then simulate / reconstruct / segment for 0.25 and 1.0, then evaluate
        assert bars.count() == 8
        assert page.locator(f"#job-{job_id} .stage.s-succeeded").count() == 8

        # the job page: Table 1, the three figures loaded, the per-label table sorts
        page.click(f"#job-{job_id} a")
        page.wait_for_url(f"{base}/jobs/{job_id}")
        table1 = page.inner_text("#table1")
        assert "Table 1" in table1 and "all" in table1 and "25 %" in table1 and "100 %" in table1
        for name in ("dice_vs_dose", "figure1", "noise_vs_dose"):
            image = page.locator(f"#fig-{name}")
            image.scroll_into_view_if_needed()
            page.wait_for_function(f"document.getElementById('fig-{name}').complete")
            assert image.evaluate("img => img.naturalWidth") > 0, name
        dice_header = page.locator("#per-label thead th", has_text="Dice").first
        dice_header.click()
        values = [float(v) for v in page.locator("#per-label tbody tr td:nth-child(5)").all_inner_texts()]
        assert values == sorted(values) and len(values) >= 2
        dice_header.click()
        values = [float(v) for v in page.locator("#per-label tbody tr td:nth-child(5)").all_inner_texts()]
        assert values == sorted(values, reverse=True)
        assert page.locator("a[href$='/artifacts/evaluate/report.md']").count() == 1
        assert page.locator("#cancel").is_hidden() and page.locator("#retry").is_hidden()

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-job.png"), full_page=True)
        page.goto(f"{base}/")
        page.locator(f"#job-{job_id}").wait_for()
        page.screenshot(path=str(ARTIFACTS / "dashboard-jobs.png"), full_page=True)

        page.click("#logout")
        page.wait_for_url(f"{base}/login")
        assert not [c for c in context.cookies() if c["name"] == "dosebench_token"]
    finally:
        context.close()


@pytest.mark.slow
def test_evaluations_page_starts_a_run_and_shows_its_regression(browser, embedded_server, tmp_path: Path) -> None:
    """The header's Evaluations link, "evaluate now" on a cohort, the run's page following it to the end,
    and the run list picking up a new run and its verdict by polling. The cohort's studies point at
    missing files, so their jobs fail at once and the run is a regression (no science to wait for)."""
    import httpx

    from dosebench.api.embedded import embedded_database_url
    from dosebench.core import db, jobs

    base, token = embedded_server
    with db.session_factory(embedded_database_url(tmp_path / "server"))() as session:
        study_ids = [jobs.add_study(session, name=f"gone-{i}", input_uri=f"file://{tmp_path}/missing-{i}.nii.gz",
                                    kind="nifti", checksum="0" * 64, bytes=1, header_summary={}).id for i in range(2)]
    api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    assert api.post("/v1/cohorts", json={"name": "browser-cohort", "study_ids": study_ids}).status_code == 201

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        page.goto(f"{base}/login")
        page.fill("#token", token)
        page.click("#login")
        page.wait_for_url(f"{base}/")
        page.click("#nav-evaluations")
        page.wait_for_url(f"{base}/evaluations")
        assert "no evaluation runs yet" in page.inner_text("#runs")

        # evaluate now: the page posts the run and opens it; it polls until the run has ended, then reloads
        page.select_option("#eval-cohort", "browser-cohort")
        page.fill("#eval-doses", "0.5")
        page.select_option("#eval-protocol", "tiny")
        page.click("#evaluate")
        page.wait_for_url(f"{base}/evaluations/*")
        run_id = page.url.rsplit("/", 1)[-1]
        page.wait_for_function("document.getElementById('run-verdict').textContent === 'REGRESSION'")
        assert "gone-0" in page.inner_text("#reasons") and "gone-1" in page.inner_text("#reasons")
        assert page.locator("#failed-studies tbody tr").count() == 2
        badge = page.locator("#run-verdict")
        assert badge.evaluate("b => getComputedStyle(b).backgroundColor") == "rgb(210, 67, 60)"  # red

        # the list shows it; a second run started elsewhere appears, and its verdict follows, without a reload
        page.click("text=← all evaluation runs")
        page.wait_for_url(f"{base}/evaluations")
        assert page.get_attribute(f"#run-{run_id}", "data-verdict") == "regression"
        page.evaluate("window.notReloaded = true")
        second = api.post("/v1/evaluations", json={"cohort": "browser-cohort", "doses": [0.5], "protocol": "tiny"})
        assert second.status_code == 202, second.text
        second_id = second.json()["id"]
        page.locator(f"#run-{second_id}").wait_for()
        deadline = time.monotonic() + 60
        while api.get(f"/v1/evaluations/{second_id}").json()["state"] == "running":  # finalise it now
            assert time.monotonic() < deadline
            time.sleep(0.3)
        page.wait_for_function(f"document.getElementById('run-{second_id}').dataset.verdict === 'regression'")
        assert page.evaluate("window.notReloaded") is True
        assert "REGRESSION" in page.inner_text(f"#run-{second_id}")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-evaluations.png"), full_page=True)
    finally:
        context.close()
        api.close()

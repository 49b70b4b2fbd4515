"""Cron schedules without beat: fire times, one run per firing with two concurrent firers (SQLite and
PostgreSQL), the scheduler lease, and what pausing and deleting a schedule do."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from dosebench.core import cohorts, jobs, schedules
from dosebench.core.cohorts import EvaluationRequest
from dosebench.core.db import EvaluationJob, EvaluationRun, Schedule, session_factory, upgrade_database
from dosebench.core.errors import InputError

REQUEST = EvaluationRequest(protocol="tiny", doses=(0.5, 1.0), segmenter="threshold", seed=7)
CREATED = datetime(2030, 1, 1, 0, 0, tzinfo=UTC)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade_database(url)
    return url


@pytest.fixture(scope="module")
def pg_url(postgres_url) -> str:
    upgrade_database(postgres_url)
    return postgres_url


def _cohort(session, name: str, n: int = 3):
    ids = [jobs.add_study(session, name=f"{name}-{i}", input_uri=f"file:///nowhere/{i}.nii.gz", kind="nifti",
                          checksum="0" * 64, bytes=1, header_summary={}).id for i in range(n)]
    return cohorts.create_cohort(session, name, ids)


def test_cron_expressions_are_checked_and_seconds_are_the_sixth_field():
    assert schedules.check_cron(" 0  2 * * * ") == "0 2 * * *"
    assert schedules.check_cron("* * * * * */5") == "* * * * * */5"
    for bad in ("0 2 * *", "61 * * * *", "every night", "* * * * * * * *"):
        with pytest.raises(InputError):
            schedules.check_cron(bad)
    at = datetime(2030, 1, 1, 2, 0, 0, tzinfo=UTC)
    assert schedules.next_fire_time("0 2 * * *", at) == at + timedelta(days=1)  # strictly after
    assert schedules.next_fire_time("* * * * * */5", at) == at + timedelta(seconds=5)


def test_the_due_fire_time_is_the_latest_one_and_missed_firings_coalesce():
    schedule = Schedule(cron="0 2 * * *", last_fire_time=CREATED)
    assert schedules.due_fire_time(schedule, CREATED + timedelta(hours=1, minutes=59)) is None
    assert schedules.due_fire_time(schedule, CREATED + timedelta(hours=2)) == CREATED + timedelta(hours=2)
    assert schedules.due_fire_time(schedule, CREATED + timedelta(days=3, hours=5)) == \
        CREATED + timedelta(days=3, hours=2)
    every_5_s = Schedule(cron="* * * * * */5", last_fire_time=CREATED + timedelta(seconds=5))
    assert schedules.due_fire_time(every_5_s, CREATED + timedelta(seconds=9.9)) is None
    assert schedules.due_fire_time(every_5_s, CREATED + timedelta(seconds=10.2)) == CREATED + timedelta(seconds=10)


def test_a_firing_makes_one_run_however_often_it_is_fired(sqlite_url):
    sent: list[str] = []
    with session_factory(sqlite_url)() as session:
        cohort = _cohort(session, "c")
        schedule = schedules.create_schedule(session, cohort, "0 2 * * *", REQUEST, now=CREATED)
        at = CREATED + timedelta(hours=2, seconds=1)
        [first] = schedules.fire_due(session, at, sent.append)
        assert schedules.fire_due(session, at, sent.append) == []
        assert schedules.fire_due(session, at + timedelta(hours=1), sent.append) == []
        [second] = schedules.fire_due(session, at + timedelta(days=1), sent.append)
        runs = session.scalars(select(EvaluationRun).order_by(EvaluationRun.fire_time)).all()
        assert [r.id for r in runs] == [first, second]
        assert [r.fire_time for r in runs] == [CREATED + timedelta(hours=2), CREATED + timedelta(days=1, hours=2)]
        assert all(r.schedule_id == schedule.id and r.requested_by == f"schedule:{schedule.id}" for r in runs)
        assert len(sent) == 6  # three studies per run, each job sent once

        schedules.update_schedule(session, schedule.id, enabled=False)
        assert schedules.fire_due(session, at + timedelta(days=5), sent.append) == []
        schedules.delete_schedule(session, schedule.id)
        kept = session.scalars(select(EvaluationRun).execution_options(populate_existing=True)).all()
        assert len(kept) == 2 and {r.schedule_id for r in kept} == {None}  # runs outlive their schedule


def _concurrent_firings(url: str, name: str) -> tuple[list[list[str]], str]:
    with session_factory(url)() as session:
        cohort = _cohort(session, name)
        schedule = schedules.create_schedule(session, cohort, "0 2 * * *", REQUEST, now=CREATED)
    at = CREATED + timedelta(hours=2, seconds=3)
    barrier = threading.Barrier(2)
    created: list[list[str]] = []
    errors: list[BaseException] = []

    def fire() -> None:
        try:
            with session_factory(url)() as session:
                barrier.wait()
                created.append(schedules.fire_due(session, at, lambda job_id: None))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=fire) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return created, schedule.id


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_concurrent_firers_make_one_run(backend, request):
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    created, schedule_id = _concurrent_firings(url, f"concurrent-{backend}")
    with session_factory(url)() as session:
        runs = session.scalars(select(EvaluationRun).where(EvaluationRun.schedule_id == schedule_id)).all()
        # the PostgreSQL database is shared by the whole test session: other tests' schedules may fire too,
        # so count only this schedule's runs among what each firer created
        ours = {run.id for run in runs}
        assert sorted(len(set(c) & ours) for c in created) == [0, 1]
        assert len(runs) == 1 and runs[0].fire_time == CREATED + timedelta(hours=2)
        assert session.scalar(select(func.count()).select_from(EvaluationJob)
                              .where(EvaluationJob.run_id == runs[0].id)) == 3
        assert session.get(Schedule, schedule_id).last_fire_time == CREATED + timedelta(hours=2)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_scheduler_lease_has_one_holder_until_it_expires(backend, request):
    url = request.getfixturevalue("sqlite_url" if backend == "sqlite" else "pg_url")
    name = f"lease-{backend}"
    now = datetime(2030, 1, 1, tzinfo=UTC)
    with session_factory(url)() as session:
        assert schedules.acquire_lease(session, name, "beat-a", 10, now)
        assert not schedules.acquire_lease(session, name, "beat-b", 10, now + timedelta(seconds=1))
        assert schedules.acquire_lease(session, name, "beat-a", 10, now + timedelta(seconds=5))  # renewal
        assert not schedules.acquire_lease(session, name, "beat-b", 10, now + timedelta(seconds=14))
        assert schedules.acquire_lease(session, name, "beat-b", 10, now + timedelta(seconds=16))  # a went silent
        assert not schedules.acquire_lease(session, name, "beat-a", 10, now + timedelta(seconds=17))
        schedules.release_lease(session, name, "beat-b")
        assert schedules.acquire_lease(session, name, "beat-a", 10, now + timedelta(seconds=18))

    # two contenders for a fresh lease at the same moment: exactly one gets it
    barrier = threading.Barrier(2)
    won: list[bool] = []

    def contend(holder: str) -> None:
        with session_factory(url)() as session:
            barrier.wait()
            won.append(schedules.acquire_lease(session, f"{name}-race", holder, 10, now))

    threads = [threading.Thread(target=contend, args=(h,)) for h in ("x", "y")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(won) == [False, True]


def test_a_schedule_of_a_cohort_without_studies_skips_the_firing(sqlite_url):
    with session_factory(sqlite_url)() as session:
        empty = cohorts.create_cohort(session, "empty", [])
        schedule = schedules.create_schedule(session, empty, "0 2 * * *", REQUEST, now=CREATED)
        assert schedules.fire_due(session, CREATED + timedelta(hours=3), lambda job_id: None) == []
        assert session.get(Schedule, schedule.id).last_fire_time == CREATED + timedelta(hours=2)
        assert session.scalar(select(func.count()).select_from(EvaluationRun)) == 0

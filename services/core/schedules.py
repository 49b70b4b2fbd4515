"""Cron schedules of evaluation runs, fired by Celery beat: the pure logic (database only).

Public API:
    check_cron(expression) -> str                      validated; 5 fields, or 6 with seconds last
    next_fire_time(expression, after) -> datetime      the first fire time strictly after ``after`` (UTC)
    due_fire_time(schedule, now) -> datetime | None    the latest fire time in (last_fire_time, now]
    create_schedule(session, cohort, cron, request, created_by=None, now=None) -> Schedule
    update_schedule(session, schedule_id, **changes) -> Schedule
    delete_schedule(session, schedule_id) -> None      its runs stay (their schedule_id becomes NULL)
    find_schedule(session, schedule_id) -> Schedule
    schedule_view(schedule) -> dict;  schedule_request(schedule) -> EvaluationRequest
    fire_due(session, now, enqueue, default_threshold) -> list[str]   one run per due schedule
    acquire_lease(session, name, holder, ttl_s, now=None) -> bool
    release_lease(session, name, holder) -> None
    SCHEDULER_LEASE                                    the lease name beat uses

Cron expressions are read in UTC by croniter: ``0 2 * * *`` is 02:00 UTC every day; a sixth field gives
seconds (``* * * * * */5``: every 5 s; for tests). A schedule's fire times are counted from its
``last_fire_time`` (its creation time at first). When beat was down over several fire times, one run is
made for the latest of them (missed firings are coalesced, not replayed).

Exactly one run per firing: ``(schedule_id, fire_time)`` is unique in ``evaluation_runs``, so whoever fires
the same time second gets the first's run back. On top of that only the holder of the ``scheduler``
lease (a row with an expiry, renewed at every poll) fires at all, so a second beat process stays idle
until the first has been silent for ``scheduler_lease_s``.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from croniter import croniter
from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .cohorts import CohortError, Enqueue, EvaluationRequest, _validated, start_run
from .db import BeatLease, Cohort, Schedule, new_id, utcnow
from .errors import InputError

log = logging.getLogger(__name__)

SCHEDULER_LEASE = "scheduler"


def check_cron(expression: str) -> str:
    """``expression`` with single spaces, if croniter reads it as 5 fields (or 6, seconds last)."""
    text = " ".join(expression.split())
    if len(text.split(" ")) not in (5, 6) or not croniter.is_valid(text):
        raise InputError(f"cron expression {expression!r} is not valid",
                         fix="give 5 fields 'minute hour day month weekday' in UTC, e.g. '0 2 * * *' "
                             "(a 6th field, last, gives seconds: '* * * * * */5')")
    return text


def next_fire_time(expression: str, after: datetime) -> datetime:
    """The first fire time of ``expression`` strictly after ``after`` (timezone-aware, UTC)."""
    return croniter(expression, after.astimezone(UTC)).get_next(datetime).astimezone(UTC)


def due_fire_time(schedule: Schedule, now: datetime) -> datetime | None:
    """The latest fire time in ``(schedule.last_fire_time, now]``, or None if none is due."""
    first = next_fire_time(schedule.cron, schedule.last_fire_time)
    if first > now:
        return None
    # the latest fire time not after now: the previous one before now + 1 us (now itself may be one)
    latest = croniter(schedule.cron, (now + timedelta(microseconds=1)).astimezone(UTC)).get_prev(datetime)
    return max(first, latest.astimezone(UTC))


def schedule_request(schedule: Schedule) -> EvaluationRequest:
    return EvaluationRequest(protocol=schedule.protocol_name, doses=tuple(schedule.doses), segmenter=schedule.segmenter,
                             seed=int(schedule.seed), regression_threshold=schedule.regression_threshold,
                             webhook_url=schedule.webhook_url)


def create_schedule(session: Session, cohort: Cohort, cron: str, request: EvaluationRequest,
                    created_by: str | None = None, now: datetime | None = None,
                    default_threshold: float = 0.005) -> Schedule:
    """A new enabled schedule; its first firing is the first fire time after ``now``."""
    cron = check_cron(cron)
    _, doses, segmenter, threshold = _validated(request, default_threshold)
    now = now or utcnow()
    schedule = Schedule(id=new_id(), cohort_id=cohort.id, cron=cron, protocol_name=request.protocol, doses=doses,
                        segmenter=segmenter, seed=int(request.seed), regression_threshold=threshold,
                        webhook_url=request.webhook_url, enabled=True, last_fire_time=now, created_at=now,
                        created_by=created_by)
    session.add(schedule)
    session.commit()
    return schedule


def find_schedule(session: Session, schedule_id: str) -> Schedule:
    schedule = session.get(Schedule, schedule_id)
    if schedule is None:
        raise CohortError(f"no schedule {schedule_id}", fix="list them with `dosebench schedule list`")
    return schedule


UPDATABLE = ("cron", "protocol", "doses", "segmenter", "seed", "regression_threshold", "webhook_url", "enabled")


def update_schedule(session: Session, schedule_id: str, **changes: Any) -> Schedule:
    """Change a schedule (keys of :data:`UPDATABLE`; None leaves a field as it is, except webhook_url
    where an empty string removes it). Enabling it again counts fire times from now."""
    schedule = find_schedule(session, schedule_id)
    unknown = set(changes) - set(UPDATABLE)
    if unknown:
        raise InputError(f"cannot change {', '.join(sorted(unknown))}", fix=f"change only {', '.join(UPDATABLE)}")
    merged = schedule_request(schedule)
    request = EvaluationRequest(
        protocol=changes.get("protocol") or merged.protocol,
        doses=tuple(changes["doses"]) if changes.get("doses") else merged.doses,
        segmenter=changes.get("segmenter") or merged.segmenter,
        seed=merged.seed if changes.get("seed") is None else int(changes["seed"]),
        regression_threshold=merged.regression_threshold if changes.get("regression_threshold") is None
        else float(changes["regression_threshold"]),
        webhook_url=merged.webhook_url if changes.get("webhook_url") is None else (changes["webhook_url"] or None))
    _, doses, segmenter, threshold = _validated(request, merged.regression_threshold or 0.0)
    if changes.get("cron"):
        schedule.cron = check_cron(changes["cron"])
    schedule.protocol_name, schedule.doses, schedule.segmenter = request.protocol, doses, segmenter
    schedule.seed, schedule.regression_threshold, schedule.webhook_url = request.seed, threshold, request.webhook_url
    if changes.get("enabled") is not None:
        enabled = bool(changes["enabled"])
        if enabled and not schedule.enabled:
            schedule.last_fire_time = max(schedule.last_fire_time, utcnow())  # no burst for the time it was off
        schedule.enabled = enabled
    session.commit()
    return schedule


def delete_schedule(session: Session, schedule_id: str) -> None:
    find_schedule(session, schedule_id)
    session.execute(delete(Schedule).where(Schedule.id == schedule_id))
    session.commit()


def schedule_view(schedule: Schedule, now: datetime | None = None) -> dict:
    upcoming = next_fire_time(schedule.cron, max(schedule.last_fire_time, now or utcnow())) if schedule.enabled else None
    return {"id": schedule.id, "cohort_id": schedule.cohort_id, "cron": schedule.cron,
            "protocol": schedule.protocol_name, "doses": sorted(schedule.doses), "segmenter": schedule.segmenter,
            "seed": schedule.seed, "regression_threshold": schedule.regression_threshold,
            "webhook_url": schedule.webhook_url, "enabled": schedule.enabled,
            "last_fire_time": schedule.last_fire_time.isoformat(),
            "next_fire_time": upcoming.isoformat() if upcoming else None,
            "created_at": schedule.created_at.isoformat(), "created_by": schedule.created_by}


def fire_due(session: Session, now: datetime, enqueue: Enqueue, default_threshold: float = 0.005) -> list[str]:
    """Start one evaluation run for each enabled schedule that is due at ``now``; returns the ids of the
    runs this call created (a firing someone else made already is not repeated)."""
    created = []
    for schedule in list(session.scalars(select(Schedule).where(Schedule.enabled.is_(True))
                                         .order_by(Schedule.created_at))):
        fire_time = due_fire_time(schedule, now)
        if fire_time is None:
            continue
        try:
            cohort = session.get(Cohort, schedule.cohort_id)
            run, new = start_run(session, cohort, schedule_request(schedule), enqueue,
                                 default_threshold=default_threshold, requested_by=f"schedule:{schedule.id}",
                                 schedule=schedule, fire_time=fire_time)
        except InputError as exc:
            # e.g. the cohort lost its studies: skip this firing, say why, try at the next one
            session.rollback()
            log.warning("schedule %s at %s: %s", schedule.id, fire_time.isoformat(), exc)
            session.execute(update(Schedule).where(Schedule.id == schedule.id, Schedule.last_fire_time < fire_time)
                            .values(last_fire_time=fire_time))
            session.commit()
            continue
        if new:
            log.info("schedule %s fired at %s: evaluation run %s", schedule.id, fire_time.isoformat(), run.id)
            created.append(run.id)
    return created


def acquire_lease(session: Session, name: str, holder: str, ttl_s: float, now: datetime | None = None) -> bool:
    """Take or renew lease ``name`` for ``holder`` until now + ``ttl_s``; False if another holds it.

    One statement decides (an INSERT of a new lease, or an UPDATE that only matches a lease this holder
    has or one that expired), so two contenders can never both succeed."""
    now = now or utcnow()
    expires = now + timedelta(seconds=ttl_s)
    taken = session.execute(update(BeatLease).where(BeatLease.name == name,
                                                    or_(BeatLease.holder == holder, BeatLease.expires_at < now))
                            .values(holder=holder, expires_at=expires))
    if taken.rowcount == 1:
        session.commit()
        return True
    session.rollback()
    if session.get(BeatLease, name) is not None:
        session.rollback()
        return False
    session.add(BeatLease(name=name, holder=holder, expires_at=expires))
    try:
        session.commit()
    except IntegrityError:  # another contender inserted it first
        session.rollback()
        return False
    return True


def release_lease(session: Session, name: str, holder: str) -> None:
    """Give the lease up (a clean shutdown: another beat may take over at once)."""
    session.execute(delete(BeatLease).where(BeatLease.name == name, BeatLease.holder == holder))
    session.commit()

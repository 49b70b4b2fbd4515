"""The one Celery app of the service: Redis broker, queues ``simulate``, ``reconstruct``, ``segment``,
``evaluate``; tasks take IDs only (the database is the source of truth).

Public API:
    app                        the Celery app (``celery -A dosebench.core.celery_app worker ...``)
    configure(settings=None)   (re)apply Settings to ``app`` (done at import with get_settings())
    celery_config(settings)    the configuration dict (broker, routes, limits, visibility timeout, beat)
    STAGE_TASKS                stage name -> task name; TASK_QUEUES: task name -> queue
    GPU_QUEUES                 queues whose worker processes serve one task each (reconstruct, segment)
    enqueue(stages)            send the task of each Stage (by id)
    enqueue_ready(job_id, settings=None) -> list[int]   after create_job / retry_job: send what is ready
    reap_once(settings=None) -> list[int]               one reaper pass (what the beat task ``reap`` runs)
    evaluations_once(settings=None) -> list[str]        finalise evaluation runs whose jobs have all ended
                                                        (what the beat task ``evaluations`` runs)
    fire_schedules_once(settings, holder) -> list[str]  fire the due schedules if ``holder`` gets the
                                                        scheduler lease (what beat's scheduler does)
    DosebenchScheduler                                  beat's scheduler: Celery's, plus the database's
                                                        cron schedules (dosebench.core.schedules)

Delivery: tasks are acknowledged late and rejected (re-queued) when their worker process dies, one
message is prefetched at a time, and Redis redelivers an unacknowledged message after
``visibility_timeout_s`` (longer than every hard time limit, see :mod:`dosebench.core.settings`). A
message may therefore arrive twice; the stage claim in :mod:`dosebench.core.jobs` makes the second a
no-op. A worker killed outright (no rejection) leaves its stage ``running`` with a stale heartbeat: the
periodic ``reap`` task re-queues it (or fails it once ``max_attempts`` are spent).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from celery import Celery
from celery.beat import PersistentScheduler
from kombu import Exchange, Queue
from kombu import pools as kombu_pools

from .settings import QUEUES, Settings, get_settings

STAGE_TASKS = {name: f"dosebench.{name}" for name in ("acquire", "simulate", "reconstruct", "segment", "evaluate")}
TASK_QUEUES = {
    "dosebench.acquire": "simulate",
    "dosebench.simulate": "simulate",
    "dosebench.reconstruct": "reconstruct",
    "dosebench.segment": "segment",
    "dosebench.evaluate": "evaluate",
    "dosebench.reap": "evaluate",
    "dosebench.evaluations": "evaluate",
}
GPU_QUEUES = ("reconstruct", "segment")
logger = logging.getLogger(__name__)
TASK_MODULES = ["dosebench.simulator.tasks", "dosebench.reconstructor.tasks", "dosebench.segmenter.tasks"]


def celery_config(settings: Settings) -> dict:
    transport: dict = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.broker_key_prefix:
        transport["global_keyprefix"] = settings.broker_key_prefix
    annotations = {}
    for task, queue in TASK_QUEUES.items():
        soft, hard = settings.time_limits(queue)
        annotations[task] = {"soft_time_limit": soft, "time_limit": hard}
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport,
        "broker_connection_retry_on_startup": True,
        # results are never read (the database has them); the backend is configured only so that
        # anything reading it uses the same visibility timeout
        "result_backend": settings.broker_url,
        "result_backend_transport_options": transport,
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # one direct exchange per queue: a message reaches exactly the queue it is routed to
        "task_queues": [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in QUEUES],
        "task_default_queue": "evaluate",
        "task_routes": {task: {"queue": queue, "exchange": queue, "routing_key": queue}
                        for task, queue in TASK_QUEUES.items()},
        "task_annotations": annotations,
        # a reap message not run within one interval is dropped: the next one does the same work
        "beat_schedule": {"reap": {"task": "dosebench.reap", "schedule": settings.reaper_interval_s,
                                   "options": {"expires": settings.reaper_interval_s}},
                          "evaluations": {"task": "dosebench.evaluations", "schedule": settings.evaluation_interval_s,
                                          "options": {"expires": settings.evaluation_interval_s}}},
        # beat also fires the cron schedules stored in the database (one run per firing)
        "beat_scheduler": "dosebench.core.celery_app:DosebenchScheduler",
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
    }


app = Celery("dosebench", include=TASK_MODULES)


def configure(settings: Settings | None = None) -> Celery:
    """Apply ``settings`` (default: the environment's) to ``app``; forgets any open broker connections."""
    settings = settings or get_settings()
    app.conf.update(celery_config(settings))
    # Forget connections made with the old settings: the app's pool is kombu's global pool for that
    # broker, which its producer pool shares; closing one and keeping the others would leave the app
    # sending through a closed pool ("Acquire on closed pool").
    kombu_pools.reset()
    app._pool = None
    app.amqp._producer_pool = None
    return app


configure()


def enqueue(stages: Iterable) -> list[int]:
    """Send the task of each stage (anything with ``id`` and ``name``); returns the stage ids."""
    sent = []
    for stage in stages:
        app.send_task(STAGE_TASKS[stage.name], args=[stage.id])
        sent.append(stage.id)
    return sent


def enqueue_ready(job_id: str, settings: Settings | None = None) -> list[int]:
    """Send the tasks of the job's ready stages (after ``create_job`` or ``retry_job``). Sending a
    stage that is already on its way is harmless: only one delivery can claim it."""
    from . import jobs
    from .db import session_factory

    settings = settings or get_settings()
    with session_factory(settings.database_url)() as session:
        return enqueue(jobs.ready_stages(session, job_id))


def reap_once(settings: Settings | None = None) -> list[int]:
    """Re-queue (and re-send) or fail the running stages whose heartbeat went stale."""
    from . import jobs
    from .db import session_factory

    settings = settings or get_settings()
    with session_factory(settings.database_url)() as session:
        return enqueue(jobs.reap_stale(session, settings.stale_after_s, settings.max_attempts))


@app.task(name="dosebench.reap")
def reap() -> list[int]:
    return reap_once()


def evaluations_once(settings: Settings | None = None) -> list[str]:
    """Finalise the evaluation runs whose jobs have all ended (and create jobs a run lacks)."""
    from . import cohorts
    from .db import session_factory

    settings = settings or get_settings()
    with session_factory(settings.database_url)() as session:
        return cohorts.advance_runs(session, settings.storage_url, lambda job_id: enqueue_ready(job_id, settings),
                                    settings.webhook_timeout_s)


@app.task(name="dosebench.evaluations")
def evaluations() -> list[str]:
    return evaluations_once()


def fire_schedules_once(settings: Settings, holder: str) -> list[str]:
    """If ``holder`` takes (or keeps) the scheduler lease: start a run for every due schedule."""
    from . import schedules
    from .db import session_factory, utcnow

    with session_factory(settings.database_url)() as session:
        if not schedules.acquire_lease(session, schedules.SCHEDULER_LEASE, holder, settings.scheduler_lease_s):
            return []
        return schedules.fire_due(session, utcnow(), lambda job_id: enqueue_ready(job_id, settings),
                                  settings.regression_threshold)


class DosebenchScheduler(PersistentScheduler):
    """Celery beat's scheduler plus the database's cron schedules: every ``schedule_poll_interval_s`` it
    fires what is due, if it holds the scheduler lease. Run one beat; a second one stays idle (and the
    unique (schedule, fire time) of a run would refuse its duplicates anyway)."""

    def __init__(self, *args, **kwargs) -> None:
        import os
        import socket
        import uuid

        super().__init__(*args, **kwargs)
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._next_poll = 0.0

    def tick(self, *args, **kwargs) -> float:
        import time

        remaining = super().tick(*args, **kwargs)
        settings = get_settings()
        now = time.monotonic()
        if now >= self._next_poll:
            self._next_poll = now + settings.schedule_poll_interval_s
            try:
                fire_schedules_once(settings, self._holder)
            except Exception:  # the database may be down a moment: beat goes on, and tries again
                logger.exception("firing the evaluation schedules failed")
        return min(remaining, max(self._next_poll - time.monotonic(), 0.05))

    def close(self) -> None:
        from . import schedules
        from .db import session_factory

        try:
            with session_factory(get_settings().database_url)() as session:
                schedules.release_lease(session, schedules.SCHEDULER_LEASE, self._holder)
        except Exception:  # noqa: BLE001 - the lease expires on its own
            logger.exception("could not release the scheduler lease")
        super().close()

"""``dosebench serve --embedded``: the REST API on SQLite and a local folder, with an in-process worker.

No Redis and no Celery worker: one worker *thread* runs the stages through
:func:`dosebench.core.execution.run_stage`, the very function every Celery task calls (claim, run the
stage executor, publish or fail, then hand on what became ready). Where ``run_stage`` hands the next
stages to :func:`dosebench.core.celery_app.enqueue`, this process routes them onto the thread's own
queue instead, so nothing is ever sent to a broker. Stages run one at a time, in submission order. At
start the thread re-queues the ready stages of unfinished jobs (a restarted server resumes), and every
``reaper_interval_s`` it runs the same stale-heartbeat reaper as the service's beat task.

A second thread stands in for Celery beat: every ``schedule_poll_interval_s`` it fires the due cron
schedules (:func:`dosebench.core.celery_app.fire_schedules_once`, under the same scheduler lease, so a
beat of the service on the same database and this thread never both fire), and every
``evaluation_interval_s`` it finalises the evaluation runs whose jobs have all ended
(:func:`dosebench.core.celery_app.evaluations_once`). The jobs they create come to the worker thread
through the same routed ``enqueue``. It runs apart from the worker thread so that a firing is on time
even while a long stage runs.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
import uuid
from pathlib import Path

from ..core.settings import Settings, get_settings

log = logging.getLogger("dosebench.embedded")


def embedded_database_url(home: Path) -> str:
    return f"sqlite:///{home.resolve() / 'dosebench.db'}"


def embedded_settings(home: Path) -> Settings:
    """Settings for an embedded server under ``home`` (exported to the environment, so that the
    stage runner, which reads :func:`get_settings`, uses the same database and storage)."""
    home = home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DOSEBENCH_DATABASE_URL"] = embedded_database_url(home)
    os.environ["DOSEBENCH_STORAGE_URL"] = f"file://{home / 'storage'}"
    os.environ["DOSEBENCH_BROKER_URL"] = "memory://"
    get_settings.cache_clear()
    settings = get_settings()
    (home / "storage").mkdir(exist_ok=True)
    return settings


class EmbeddedWorker:
    """One thread running queued stages with ``run_stage``; ``enqueue_job`` is the API's enqueue. With
    ``beat`` (the default) a second thread fires due schedules and finalises evaluation runs."""

    def __init__(self, settings: Settings, *, beat: bool = True) -> None:
        self.settings = settings
        self._queue: queue.Queue[tuple[int, str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="dosebench-embedded-worker", daemon=True)
        self._stopping = threading.Event()
        self._beat_thread = threading.Thread(target=self._beat_loop, name="dosebench-embedded-beat",
                                             daemon=True) if beat else None
        #: who holds the scheduler lease while this process fires schedules
        self.lease_holder = f"embedded:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    # what the API calls after create_job / retry_job
    def enqueue_job(self, job_id: str) -> None:
        from ..core import jobs
        from ..core.db import session_factory

        with session_factory(self.settings.database_url)() as session:
            self.enqueue_stages(jobs.ready_stages(session, job_id))

    # what run_stage calls (in place of celery_app.enqueue) with the stages that became ready
    def enqueue_stages(self, stages) -> list[int]:
        sent = []
        for stage in stages:
            self._queue.put((stage.id, stage.name))
            sent.append(stage.id)
        return sent

    def start(self) -> EmbeddedWorker:
        from ..core import celery_app

        self._original_enqueue = celery_app.enqueue
        celery_app.enqueue = self.enqueue_stages  # run_stage looks it up at call time
        self._resume()
        self._thread.start()
        if self._beat_thread is not None:
            self._beat_thread.start()
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        from ..core import celery_app

        self._stopping.set()
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._beat_thread is not None:
            if self._beat_thread.is_alive():
                self._beat_thread.join(timeout_s)
            self._release_lease()
        if celery_app.enqueue == self.enqueue_stages:
            celery_app.enqueue = self._original_enqueue

    def _fire_schedules(self) -> list[str]:
        from ..core.celery_app import fire_schedules_once

        return fire_schedules_once(self.settings, self.lease_holder)

    def _finalise_runs(self) -> list[str]:
        from ..core.celery_app import evaluations_once

        return evaluations_once(self.settings)

    def _release_lease(self) -> None:
        from ..core import schedules
        from ..core.db import session_factory

        try:
            with session_factory(self.settings.database_url)() as session:
                schedules.release_lease(session, schedules.SCHEDULER_LEASE, self.lease_holder)
        except Exception:  # noqa: BLE001 - the lease expires on its own
            log.exception("could not release the scheduler lease")

    def _beat_loop(self) -> None:
        # both at once at start: a firing missed while the server was down is made now (coalesced)
        next_fire = next_finalise = time.monotonic()
        while not self._stopping.is_set():
            now = time.monotonic()
            if now >= next_fire:
                next_fire = now + self.settings.schedule_poll_interval_s
                try:
                    fired = self._fire_schedules()
                    if fired:
                        log.info("schedules fired evaluation runs %s", ", ".join(fired))
                except Exception:  # noqa: BLE001 - the database may be busy a moment: try at the next poll
                    log.exception("firing the evaluation schedules failed")
            if now >= next_finalise:
                next_finalise = now + self.settings.evaluation_interval_s
                try:
                    self._finalise_runs()
                except Exception:  # noqa: BLE001
                    log.exception("finalising evaluation runs failed")
            self._stopping.wait(max(min(next_fire, next_finalise) - time.monotonic(), 0.05))

    def _resume(self) -> None:
        from sqlalchemy import select

        from ..core import jobs
        from ..core.db import QUEUED, RUNNING, Job, session_factory

        with session_factory(self.settings.database_url)() as session:
            unfinished = session.execute(select(Job.id).where(Job.state.in_((QUEUED, RUNNING)))).scalars().all()
            for job_id in unfinished:
                self.enqueue_stages(jobs.ready_stages(session, job_id))

    def _loop(self) -> None:
        from ..core.celery_app import reap_once
        from ..core.execution import run_stage

        while True:
            try:
                item = self._queue.get(timeout=self.settings.reaper_interval_s)
            except queue.Empty:
                try:
                    reap_once(self.settings)  # re-queued stages come back through enqueue_stages
                except Exception:  # noqa: BLE001
                    log.exception("the embedded reaper failed")
                continue
            if item is None:
                return
            stage_id, name = item
            try:
                outcome = run_stage(stage_id, name)
                log.info("stage %s (%s): %s", stage_id, name, outcome)
            except Exception:  # noqa: BLE001 - run_stage records stage failures itself; keep serving
                log.exception("stage %s (%s) raised", stage_id, name)

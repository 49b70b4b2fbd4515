"""``dosebench serve --embedded``: the REST API on SQLite and a local folder, with an in-process worker.

No Redis and no Celery worker: one worker *thread* runs the stages through
:func:`dosebench.core.execution.run_stage`, the very function every Celery task calls (claim, run the
stage executor, publish or fail, then hand on what became ready). Where ``run_stage`` hands the next
stages to :func:`dosebench.core.celery_app.enqueue`, this process routes them onto the thread's own
queue instead, so nothing is ever sent to a broker. Stages run one at a time, in submission order. At
start the thread re-queues the ready stages of unfinished jobs (a restarted server resumes), and every
``reaper_interval_s`` it runs the same stale-heartbeat reaper as the service's beat task.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
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
    """One thread running queued stages with ``run_stage``; ``enqueue_job`` is the API's enqueue."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._queue: queue.Queue[tuple[int, str] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="dosebench-embedded-worker", daemon=True)

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
        return self

    def stop(self, timeout_s: float | None = None) -> None:
        from ..core import celery_app

        self._queue.put(None)
        self._thread.join(timeout_s)
        if celery_app.enqueue == self.enqueue_stages:
            celery_app.enqueue = self._original_enqueue

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

"""The worker side of one stage: claim it, run its executor, publish or fail it, enqueue what is next.

Public API:
    run_stage(stage_id, name) -> str     what a Celery task does ("succeeded", "not claimable", ...)
    EXECUTORS                            stage name -> function(spec, stage, inputs, out_url, context)
    DatabaseHeartbeat                    a ProgressSink that heartbeats the stage from a thread

The executor writes under ``{storage_url}/{stage_key(job, stage, dose, attempt)}/``, a prefix no other
attempt uses; nothing there counts until ``complete_stage`` publishes the artifact rows, so a
half-written or superseded attempt is never read.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import fsspec

from .. import stages as executors
from ..stages import Cancelled, JobSpec, StageContext, stage_key
from . import jobs
from .db import Job, Stage, session_factory
from .errors import DosebenchError
from .settings import get_settings

log = logging.getLogger(__name__)


class DatabaseHeartbeat:
    """Progress sink and cancel flag of a running stage. A daemon thread writes the heartbeat (with
    the latest progress) every ``interval_s`` and reads the job's cancel flag; a worker that dies stops
    heartbeating, which is how the reaper finds it. Losing the stage (reaped) reads as cancel."""

    def __init__(self, factory, stage_id: int, job_id: str, attempt: int, interval_s: float) -> None:
        self._factory, self._stage_id, self._job_id, self._attempt = factory, stage_id, job_id, attempt
        self._interval = interval_s
        self._totals: dict[str, int] = {}
        self._done: dict[str, int] = {}
        self._stop = threading.Event()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{stage_id}", daemon=True)

    # ProgressSink
    def start(self, key: str, description: str, total: int) -> None:
        self._totals[key], self._done[key] = max(int(total), 1), 0

    def advance(self, key: str, amount: int = 1) -> None:
        self._done[key] = self._done.get(key, 0) + amount

    def finish(self, key: str) -> None:
        self._done[key] = self._totals.get(key, 1)

    @property
    def fraction(self) -> float:
        total = sum(self._totals.values())
        return min(sum(self._done.values()) / total, 1.0) if total else 0.0

    def should_cancel(self) -> bool:
        return self._cancel.is_set()

    def _beat(self) -> None:
        with self._factory() as session:
            if not jobs.heartbeat(session, self._stage_id, self._attempt, self.fraction):
                self._cancel.set()  # reaped and handed to another attempt: stop working
            if jobs.is_cancel_requested(session, self._job_id):
                self._cancel.set()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self._beat()
            except Exception:  # a database hiccup must not kill the stage; the reaper decides
                log.exception("heartbeat of stage %s failed", self._stage_id)

    def __enter__(self) -> DatabaseHeartbeat:
        self._beat()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _acquire(spec: JobSpec, stage: Stage, inputs: dict, out: str, context: StageContext) -> dict[str, str]:
    return executors.acquire(spec, out, context)


def _simulate(spec: JobSpec, stage: Stage, inputs: dict, out: str, context: StageContext) -> dict[str, str]:
    return executors.simulate(spec, stage.dose, inputs["counts"], out, context)


def _reconstruct(spec: JobSpec, stage: Stage, inputs: dict, out: str, context: StageContext) -> dict[str, str]:
    return executors.reconstruct_dose(spec, stage.dose, inputs["line_integrals"], out, context)


def _segment(spec: JobSpec, stage: Stage, inputs: dict, out: str, context: StageContext) -> dict[str, str]:
    return executors.segment_dose(spec, stage.dose, inputs["recon"], out, context)


def _evaluate(spec: JobSpec, stage: Stage, inputs: dict, out: str, context: StageContext) -> dict[str, str]:
    from ..pipeline import versions
    from ..simulator.synthesis import plan_scan

    geometry = plan_scan(executors.load_input(spec), spec.protocol.scanner)
    return executors.evaluate(spec, inputs["recon"], inputs["seg"], inputs["labels"], out, geometry, versions(),
                              context)


EXECUTORS = {"acquire": _acquire, "simulate": _simulate, "reconstruct": _reconstruct, "segment": _segment,
             "evaluate": _evaluate}


def _error_text(exc: BaseException) -> str:
    from celery.exceptions import SoftTimeLimitExceeded

    if isinstance(exc, SoftTimeLimitExceeded):
        return "SoftTimeLimitExceeded: the stage ran past its queue's soft time limit"
    if isinstance(exc, DosebenchError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def run_stage(stage_id: int, name: str) -> str:
    """Claim stage ``stage_id`` (a no-op if it is not claimable), run it, publish or fail it, and
    enqueue the stages that became ready. Returns the outcome, for the task's log line."""
    from .celery_app import enqueue

    settings = get_settings()
    factory = session_factory(settings.database_url)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    with factory() as session:
        stage = jobs.claim_stage(session, stage_id, worker)
        if stage is None:
            log.info("stage %s is not claimable (done, running elsewhere, cancelled or not ready)", stage_id)
            return "not claimable"
        if stage.name != name:
            jobs.fail_stage(session, stage_id, stage.attempt, f"task {name} was sent for a {stage.name} stage")
            return "failed"
        attempt, job = stage.attempt, session.get(Job, stage.job_id)
        out_url = f"{settings.storage_url.rstrip('/')}/{stage_key(job.id, stage.name, stage.dose, attempt)}"
        started = time.perf_counter()
        ready: list[Stage] = []
        try:
            spec = JobSpec.model_validate(job.spec)
            inputs = jobs.stage_inputs(session, stage)
            session.rollback()  # no transaction held open while the stage runs
            with DatabaseHeartbeat(factory, stage_id, job.id, attempt, settings.heartbeat_interval_s) as beat:
                context = StageContext(progress=beat, should_cancel=beat.should_cancel)
                context.check_cancel()
                artifacts = EXECUTORS[name](spec, stage, inputs, out_url, context)
            if name == "evaluate":
                with fsspec.open(artifacts["per_label.csv"], "rt", encoding="utf-8") as handle:
                    jobs.record_metrics(session, job.id, handle.read())
            ready = jobs.complete_stage(session, stage_id, attempt, artifacts)
            outcome = "succeeded"
        except Cancelled:
            session.rollback()
            jobs.cancel_stage(session, stage_id, attempt)
            outcome = "cancelled"
        except Exception as exc:
            session.rollback()
            log.exception("stage %s (%s) attempt %s failed", stage_id, name, attempt)
            jobs.fail_stage(session, stage_id, attempt, _error_text(exc))
            outcome = "failed"
    enqueue(ready)
    log.info("stage %s (%s) attempt %s %s in %.1f s", stage_id, name, attempt, outcome,
             time.perf_counter() - started)
    return outcome

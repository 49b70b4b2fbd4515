"""Celery tasks of the ``segment`` and ``evaluate`` queues (routed by name in
:mod:`dosebench.core.celery_app`): thin shells over :func:`dosebench.core.execution.run_stage`.
``evaluate`` also stores the per-label metrics rows."""

from __future__ import annotations

from ..core.celery_app import app
from ..core.execution import run_stage


@app.task(name="dosebench.segment")
def segment(stage_id: int) -> str:
    return run_stage(stage_id, "segment")


@app.task(name="dosebench.evaluate")
def evaluate(stage_id: int) -> str:
    return run_stage(stage_id, "evaluate")

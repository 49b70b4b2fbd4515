"""Celery tasks of the ``simulate`` queue: thin shells over :func:`dosebench.core.execution.run_stage`."""

from __future__ import annotations

from ..core.celery_app import app
from ..core.execution import run_stage


@app.task(name="dosebench.acquire")
def acquire(stage_id: int) -> str:
    return run_stage(stage_id, "acquire")


@app.task(name="dosebench.simulate")
def simulate(stage_id: int) -> str:
    return run_stage(stage_id, "simulate")

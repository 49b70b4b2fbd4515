"""Celery task of the ``reconstruct`` queue: a thin shell over :func:`dosebench.core.execution.run_stage`."""

from __future__ import annotations

from ..core.celery_app import app
from ..core.execution import run_stage


@app.task(name="dosebench.reconstruct")
def reconstruct(stage_id: int) -> str:
    return run_stage(stage_id, "reconstruct")

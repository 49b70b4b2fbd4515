"""Service settings, read from the environment (prefix ``DOSEBENCH_``), validated once.

Public API:
    Settings            pydantic-settings model (fields below; env ``DOSEBENCH_<FIELD>``)
    get_settings()      the process-wide cached Settings (``get_settings.cache_clear()`` to re-read)
    QUEUES              the Celery queue names: simulate, reconstruct, segment, evaluate
    Settings.time_limits(queue) -> (soft_s, hard_s)

Time limits: every queue has a soft limit (the task gets ``SoftTimeLimitExceeded`` and fails its stage
cleanly) and a hard limit (the worker process is killed). Redis redelivers an unacknowledged task only
after ``visibility_timeout_s``, so that must exceed every hard limit, or a still-running task would be
delivered a second time; this is validated at start-up.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

QUEUES = ("simulate", "reconstruct", "segment", "evaluate")


def _default_storage_url() -> str:
    return "file://" + str(Path("dosebench-data").resolve())


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DOSEBENCH_", extra="ignore")

    database_url: str = "sqlite:///./dosebench.db"
    broker_url: str = "redis://127.0.0.1:6379/0"
    #: prefix of every Redis key the broker uses (kombu global_keyprefix): several systems, or
    #: concurrent test sessions, can share one Redis database without seeing each other's tasks
    broker_key_prefix: str = ""
    storage_url: str = Field(default_factory=_default_storage_url)
    upload_limit_bytes: int = Field(default=2 * 1024**3, gt=0)

    simulate_soft_time_limit_s: float = Field(default=1800, gt=0)
    simulate_hard_time_limit_s: float = Field(default=2100, gt=0)
    reconstruct_soft_time_limit_s: float = Field(default=3600, gt=0)
    reconstruct_hard_time_limit_s: float = Field(default=4200, gt=0)
    segment_soft_time_limit_s: float = Field(default=3600, gt=0)
    segment_hard_time_limit_s: float = Field(default=4200, gt=0)
    evaluate_soft_time_limit_s: float = Field(default=900, gt=0)
    evaluate_hard_time_limit_s: float = Field(default=1200, gt=0)
    visibility_timeout_s: float = Field(default=7200, gt=0)

    heartbeat_interval_s: float = Field(default=10, gt=0)
    stale_after_s: float = Field(default=120, gt=0)
    max_attempts: int = Field(default=3, ge=1)
    reaper_interval_s: float = Field(default=30, gt=0)

    #: evaluation runs (dosebench.core.cohorts): the largest drop of a group's median Dice (at any dose)
    #: against the previous run that is not yet a regression
    regression_threshold: float = Field(default=0.005, ge=0)
    #: how often the beat task finalises evaluation runs whose jobs have all ended
    evaluation_interval_s: float = Field(default=15, gt=0)
    #: how often beat looks for schedules that are due (the finest cron step it can honour)
    schedule_poll_interval_s: float = Field(default=5, gt=0)
    #: the scheduler lease: the beat holding it fires the schedules; another takes over after this long
    scheduler_lease_s: float = Field(default=60, gt=0)
    #: a webhook POST gives up after this long (a failure is logged and recorded, never fatal)
    webhook_timeout_s: float = Field(default=5, gt=0)

    def time_limits(self, queue: str) -> tuple[float, float]:
        """(soft, hard) seconds of ``queue``."""
        if queue not in QUEUES:
            raise KeyError(f"unknown queue {queue!r}; queues are {', '.join(QUEUES)}")
        return getattr(self, f"{queue}_soft_time_limit_s"), getattr(self, f"{queue}_hard_time_limit_s")

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        for queue in QUEUES:
            soft, hard = self.time_limits(queue)
            if soft >= hard:
                raise ValueError(f"DOSEBENCH_{queue.upper()}_SOFT_TIME_LIMIT_S ({soft:g}) must be below "
                                 f"DOSEBENCH_{queue.upper()}_HARD_TIME_LIMIT_S ({hard:g})")
            if hard >= self.visibility_timeout_s:
                raise ValueError(f"DOSEBENCH_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s:g}) must exceed "
                                 f"the {queue} hard time limit ({hard:g}): Redis would deliver a running "
                                 "task a second time")
        if self.scheduler_lease_s <= self.schedule_poll_interval_s:
            raise ValueError(f"DOSEBENCH_SCHEDULER_LEASE_S ({self.scheduler_lease_s:g}) must exceed "
                             f"DOSEBENCH_SCHEDULE_POLL_INTERVAL_S ({self.schedule_poll_interval_s:g}): the "
                             "beat holding the lease renews it at every poll")
        if self.stale_after_s <= self.heartbeat_interval_s:
            raise ValueError(f"DOSEBENCH_STALE_AFTER_S ({self.stale_after_s:g}) must exceed "
                             f"DOSEBENCH_HEARTBEAT_INTERVAL_S ({self.heartbeat_interval_s:g})")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()

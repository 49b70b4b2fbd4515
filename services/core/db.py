"""The database: SQLAlchemy 2 typed models, engines and Alembic migrations (PostgreSQL or SQLite).

Public API:
    Base                            declarative base (``Base.metadata`` is what the migrations create)
    Study, Job, Stage, Artifact, Metric, ApiToken    the models
    Cohort, CohortStudy, EvaluationRun, EvaluationJob, Schedule, BeatLease    cohorts, evaluation
                                    runs over them, their cron schedules and the beat's lease
                                    (the logic: dosebench.core.cohorts and dosebench.core.schedules)
    FINISHED, ERROR                 evaluation run states besides RUNNING
    QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED, STATES, TERMINAL_STATES    job and stage states
    utcnow()                        timezone-aware UTC now (what every timestamp column holds)
    make_engine(url)                a new Engine (SQLite: foreign keys on, usable across threads)
    session_factory(url)            a cached ``sessionmaker`` for ``url`` (expire_on_commit=False)
    upgrade_database(url, revision="head")   run the Alembic migrations shipped in the package
    new_id()                        a new uuid4 string (primary keys)

Timestamps are stored in UTC and always read back timezone-aware (SQLite keeps them naive; the
``UTCDateTime`` column type adds the zone back). ``Metric.hd95_mm`` and ``Metric.surface_dice`` are
NULL when the metric is not finite (an empty label on one side gives an infinite HD95): SQL has no
portable infinity, so NULL means "infinite / undefined", and the per_label.csv writes it as ``inf``/``nan``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL_STATES = (SUCCEEDED, FAILED, CANCELLED)
#: an evaluation run is RUNNING until its Table 1 is stored (FINISHED) or it cannot be (ERROR)
FINISHED, ERROR = "finished", "error"

MIGRATIONS = Path(__file__).with_name("migrations")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator):
    """A timestamp stored in UTC, always returned timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255))
    input_uri: Mapped[str] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(32))  # nifti, dicom-folder, dicom-zip
    checksum: Mapped[str] = mapped_column(String(64))  # sha256 hex of the uploaded bytes
    bytes: Mapped[int] = mapped_column(BigInteger)
    # de-identified: shape, spacing, orientation and modality only
    header_summary: Mapped[dict] = mapped_column(JSON, default=dict)
    reference_seg_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    requested_by: Mapped[str | None] = mapped_column(String(255), nullable=True)

    jobs: Mapped[list[Job]] = relationship(back_populates="study")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), index=True)
    doses: Mapped[list] = mapped_column(JSON)
    protocol_name: Mapped[str] = mapped_column(String(255))
    spec: Mapped[dict] = mapped_column(JSON)  # JobSpec.model_dump(mode="json")
    segmenter: Mapped[str] = mapped_column(String(255))
    seed: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default=QUEUED, index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(255), unique=True, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    requested_by: Mapped[str | None] = mapped_column(String(255), nullable=True)

    study: Mapped[Study] = relationship(back_populates="jobs")
    stages: Mapped[list[Stage]] = relationship(back_populates="job", order_by="Stage.id")


class Stage(Base):
    __tablename__ = "stages"
    __table_args__ = (UniqueConstraint("job_id", "name", "dose"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    dose: Mapped[float | None] = mapped_column(Float, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=QUEUED, index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0)  # claims so far; the running one's number
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    job: Mapped[Job] = relationship(back_populates="stages")
    artifacts: Mapped[list[Artifact]] = relationship(back_populates="stage", order_by="Artifact.id")


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("stage_id", "attempt", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    stage_id: Mapped[int] = mapped_column(ForeignKey("stages.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(255))
    uri: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(BigInteger)
    checksum: Mapped[str] = mapped_column(String(64))  # sha256 (of a folder: over its sorted files)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    stage: Mapped[Stage] = relationship(back_populates="artifacts")


class Metric(Base):
    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    dose: Mapped[float] = mapped_column(Float)
    reference: Mapped[str] = mapped_column(String(32))  # full_dose | reference_seg
    group: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(255))
    label_id: Mapped[int] = mapped_column(Integer)
    dice: Mapped[float | None] = mapped_column(Float, nullable=True)
    surface_dice: Mapped[float | None] = mapped_column(Float, nullable=True)  # NULL: not finite
    hd95_mm: Mapped[float | None] = mapped_column(Float, nullable=True)  # NULL: infinite / undefined
    volume_change_ml: Mapped[float | None] = mapped_column(Float, nullable=True)
    reference_voxels: Mapped[int] = mapped_column(BigInteger)
    test_voxels: Mapped[int] = mapped_column(BigInteger)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the token
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Cohort(Base):
    """A named set of studies that is evaluated together."""

    __tablename__ = "cohorts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(255), nullable=True)


class CohortStudy(Base):
    __tablename__ = "cohort_studies"

    cohort_id: Mapped[str] = mapped_column(ForeignKey("cohorts.id", ondelete="CASCADE"), primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), primary_key=True, index=True)
    added_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Schedule(Base):
    """A cron schedule (UTC) that starts an evaluation run of a cohort at each firing."""

    __tablename__ = "schedules"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    cohort_id: Mapped[str] = mapped_column(ForeignKey("cohorts.id"), index=True)
    cron: Mapped[str] = mapped_column(String(255))  # 5 fields, or 6 with seconds last
    protocol_name: Mapped[str] = mapped_column(String(255))
    doses: Mapped[list] = mapped_column(JSON)
    segmenter: Mapped[str] = mapped_column(String(255))
    seed: Mapped[int] = mapped_column(BigInteger)
    regression_threshold: Mapped[float] = mapped_column(Float)  # allowed drop of a median Dice
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    # fire times are counted from here: the creation time, then each fire time handled
    last_fire_time: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(255), nullable=True)


class EvaluationRun(Base):
    """One cohort x protocol x doses x segmenter x seed: a job per study, then Table 1 over the cohort.

    ``(schedule_id, fire_time)`` is unique: whoever fires a schedule, a firing makes one run (manual runs
    have both NULL, which a unique constraint never compares equal)."""

    __tablename__ = "evaluation_runs"
    __table_args__ = (UniqueConstraint("schedule_id", "fire_time"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    cohort_id: Mapped[str] = mapped_column(ForeignKey("cohorts.id"), index=True)
    schedule_id: Mapped[str | None] = mapped_column(ForeignKey("schedules.id", ondelete="SET NULL"),
                                                    nullable=True, index=True)
    fire_time: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    protocol_name: Mapped[str] = mapped_column(String(255))
    protocol_sha256: Mapped[str] = mapped_column(String(64))  # of the protocol's canonical JSON
    doses: Mapped[list] = mapped_column(JSON)  # descending, 1.0 included (as JobSpec stores them)
    doses_key: Mapped[str] = mapped_column(String(255))  # "0.50,1.00": compares runs in SQL
    segmenter: Mapped[str] = mapped_column(String(255))
    seed: Mapped[int] = mapped_column(BigInteger)
    study_ids: Mapped[list] = mapped_column(JSON)  # the cohort when the run started
    regression_threshold: Mapped[float] = mapped_column(Float)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    state: Mapped[str] = mapped_column(String(16), default=RUNNING, index=True)  # running|finished|error
    regression: Mapped[bool | None] = mapped_column(Boolean, nullable=True)  # None until finished
    reasons: Mapped[list] = mapped_column(JSON, default=list)
    previous_run_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    table1: Mapped[dict] = mapped_column(JSON, default=dict)  # {reference: aggregate(...)}
    counts: Mapped[dict] = mapped_column(JSON, default=dict)  # studies, labels, failed studies
    versions: Mapped[dict] = mapped_column(JSON, default=dict)  # dosebench, weights, protocol
    report_uri: Mapped[str | None] = mapped_column(Text, nullable=True)
    webhook_status: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    requested_by: Mapped[str | None] = mapped_column(String(255), nullable=True)


class EvaluationJob(Base):
    """The job of one study in an evaluation run."""

    __tablename__ = "evaluation_jobs"

    run_id: Mapped[str] = mapped_column(ForeignKey("evaluation_runs.id", ondelete="CASCADE"), primary_key=True)
    study_id: Mapped[str] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), unique=True)


class BeatLease(Base):
    """A named lease with an expiry: whoever holds ``scheduler`` fires the schedules."""

    __tablename__ = "beat_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


def make_engine(url: str) -> Engine:
    """A new engine for ``url``. SQLite: foreign keys enforced, a busy timeout, usable across threads."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # pragma: no cover - trivial
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


@lru_cache(maxsize=16)
def session_factory(url: str) -> sessionmaker:
    """The (cached) session factory of ``url``: ``with session_factory(url)() as session: ...``."""
    return sessionmaker(make_engine(url), expire_on_commit=False)


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` to ``revision`` (creates every table on an empty database)."""
    from alembic import command

    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        Path(url.removeprefix("sqlite:///")).expanduser().resolve().parent.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(url), revision)

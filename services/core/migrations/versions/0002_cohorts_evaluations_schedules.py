"""cohorts, evaluation runs, schedules and the beat lease

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

Written for PostgreSQL and SQLite alike (batch mode for SQLite's ALTER limits).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('cohorts',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=255), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_cohorts')),
    sa.UniqueConstraint('name', name=op.f('uq_cohorts_name'))
    )
    op.create_table('beat_leases',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('holder', sa.String(length=255), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_beat_leases'))
    )
    op.create_table('cohort_studies',
    sa.Column('cohort_id', sa.String(length=36), nullable=False),
    sa.Column('study_id', sa.String(length=36), nullable=False),
    sa.Column('added_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['cohort_id'], ['cohorts.id'], name=op.f('fk_cohort_studies_cohort_id_cohorts'),
                            ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_cohort_studies_study_id_studies')),
    sa.PrimaryKeyConstraint('cohort_id', 'study_id', name=op.f('pk_cohort_studies'))
    )
    with op.batch_alter_table('cohort_studies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_cohort_studies_study_id'), ['study_id'], unique=False)

    op.create_table('schedules',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('cohort_id', sa.String(length=36), nullable=False),
    sa.Column('cron', sa.String(length=255), nullable=False),
    sa.Column('protocol_name', sa.String(length=255), nullable=False),
    sa.Column('doses', sa.JSON(), nullable=False),
    sa.Column('segmenter', sa.String(length=255), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('regression_threshold', sa.Float(), nullable=False),
    sa.Column('webhook_url', sa.Text(), nullable=True),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.Column('last_fire_time', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=255), nullable=True),
    sa.ForeignKeyConstraint(['cohort_id'], ['cohorts.id'], name=op.f('fk_schedules_cohort_id_cohorts')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_schedules'))
    )
    with op.batch_alter_table('schedules', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_schedules_cohort_id'), ['cohort_id'], unique=False)

    op.create_table('evaluation_runs',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('cohort_id', sa.String(length=36), nullable=False),
    sa.Column('schedule_id', sa.String(length=36), nullable=True),
    sa.Column('fire_time', sa.DateTime(timezone=True), nullable=True),
    sa.Column('protocol_name', sa.String(length=255), nullable=False),
    sa.Column('protocol_sha256', sa.String(length=64), nullable=False),
    sa.Column('doses', sa.JSON(), nullable=False),
    sa.Column('doses_key', sa.String(length=255), nullable=False),
    sa.Column('segmenter', sa.String(length=255), nullable=False),
    sa.Column('seed', sa.BigInteger(), nullable=False),
    sa.Column('study_ids', sa.JSON(), nullable=False),
    sa.Column('regression_threshold', sa.Float(), nullable=False),
    sa.Column('webhook_url', sa.Text(), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('regression', sa.Boolean(), nullable=True),
    sa.Column('reasons', sa.JSON(), nullable=False),
    sa.Column('previous_run_id', sa.String(length=36), nullable=True),
    sa.Column('table1', sa.JSON(), nullable=False),
    sa.Column('counts', sa.JSON(), nullable=False),
    sa.Column('versions', sa.JSON(), nullable=False),
    sa.Column('report_uri', sa.Text(), nullable=True),
    sa.Column('webhook_status', sa.Text(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('requested_by', sa.String(length=255), nullable=True),
    sa.ForeignKeyConstraint(['cohort_id'], ['cohorts.id'], name=op.f('fk_evaluation_runs_cohort_id_cohorts')),
    sa.ForeignKeyConstraint(['schedule_id'], ['schedules.id'], name=op.f('fk_evaluation_runs_schedule_id_schedules'),
                            ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evaluation_runs')),
    sa.UniqueConstraint('schedule_id', 'fire_time', name=op.f('uq_evaluation_runs_schedule_id_fire_time'))
    )
    with op.batch_alter_table('evaluation_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_evaluation_runs_cohort_id'), ['cohort_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluation_runs_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluation_runs_schedule_id'), ['schedule_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluation_runs_state'), ['state'], unique=False)

    op.create_table('evaluation_jobs',
    sa.Column('run_id', sa.String(length=36), nullable=False),
    sa.Column('study_id', sa.String(length=36), nullable=False),
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_evaluation_jobs_job_id_jobs')),
    sa.ForeignKeyConstraint(['run_id'], ['evaluation_runs.id'], name=op.f('fk_evaluation_jobs_run_id_evaluation_runs'),
                            ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['study_id'], ['studies.id'], name=op.f('fk_evaluation_jobs_study_id_studies')),
    sa.PrimaryKeyConstraint('run_id', 'study_id', name=op.f('pk_evaluation_jobs')),
    sa.UniqueConstraint('job_id', name=op.f('uq_evaluation_jobs_job_id'))
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('evaluation_jobs')
    with op.batch_alter_table('evaluation_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_evaluation_runs_state'))
        batch_op.drop_index(batch_op.f('ix_evaluation_runs_schedule_id'))
        batch_op.drop_index(batch_op.f('ix_evaluation_runs_created_at'))
        batch_op.drop_index(batch_op.f('ix_evaluation_runs_cohort_id'))
    op.drop_table('evaluation_runs')
    with op.batch_alter_table('schedules', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_schedules_cohort_id'))
    op.drop_table('schedules')
    with op.batch_alter_table('cohort_studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_cohort_studies_study_id'))
    op.drop_table('cohort_studies')
    op.drop_table('beat_leases')
    op.drop_table('cohorts')

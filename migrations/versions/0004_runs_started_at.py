"""Index runs by start time, for the status page's last-24-hours charts.

The page aggregates the runs of the last 24 hours on every view; without this index that is
a scan of every run ever recorded (a year of 1,000 tenants every 15 minutes is 35 million
rows). Building it takes a lock that holds writers back while it runs: seconds per million
runs, once, during `syncd migrate`.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_runs_started_at"), "runs", ["started_at"], schema="syncd")


def downgrade() -> None:
    op.drop_index(op.f("ix_runs_started_at"), table_name="runs", schema="syncd")

"""An hourly rollup of finished runs, for the status page's 24-hour charts.

The page used to aggregate the last day of `syncd.runs` on every view: 96,000 runs at 1,000
tenants every 15 minutes, hundreds of milliseconds. `syncd.run_hours` holds a row per
(hour, tenant, status) instead, kept by the statement that ends a run. The upgrade fills it
from the runs already recorded, in one pass over `syncd.runs` during `syncd migrate`: on the
benchmarks' 2-core machine, shared with other work, 20 s for 30 days of 1,000 tenants every
15 minutes and five minutes for a year of them (35 million runs).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Hours are binned from the epoch, not truncated in the session's time zone (a zone half an
# hour off UTC would shift every bucket). In the key's order: the primary key grows at its
# end only, and an hour's rows share a few pages, as the rows a daemon adds hour by hour do
# (grouped in hash order, the last day's 28,000 rows of a year lay on 11,600 pages). Kept
# here rather than imported: a migration runs the SQL of its own time.
BACKFILL = """
    INSERT INTO syncd.run_hours (hour, tenant_id, status, runs, runs_timed, duration_sum_s,
                                 duration_max_s, pairs_added, pairs_removed)
    SELECT date_bin('1 hour', started_at, TIMESTAMPTZ '1970-01-01 00:00:00+00'),
           tenant_id,
           status,
           count(*),
           count(finished_at),
           coalesce(sum(date_part('epoch', finished_at - started_at)), 0),
           max(date_part('epoch', finished_at - started_at)),
           coalesce(sum(pairs_added), 0),
           coalesce(sum(pairs_removed), 0)
      FROM syncd.runs
     WHERE status <> 'running'
     GROUP BY 1, 2, 3
     ORDER BY 1, 2, 3
"""


def upgrade() -> None:
    op.create_table(
        "run_hours",
        sa.Column("hour", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("runs", sa.Integer(), nullable=False),
        sa.Column("runs_timed", sa.Integer(), nullable=False),
        sa.Column("duration_sum_s", sa.Double(), nullable=False),
        sa.Column("duration_max_s", sa.Double(), nullable=True),
        sa.Column("pairs_added", sa.BigInteger(), nullable=False),
        sa.Column("pairs_removed", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("status <> 'running'", name=op.f("ck_run_hours_status_finished")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["syncd.tenants.id"], name=op.f("fk_run_hours_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("hour", "tenant_id", "status", name=op.f("pk_run_hours")),
        schema="syncd",
    )
    # A year of runs makes millions of groups: room to hash them in memory, for this
    # transaction only.
    op.execute("SET LOCAL work_mem = '256MB'")
    op.execute(BACKFILL)
    op.execute("ANALYZE syncd.run_hours")


def downgrade() -> None:
    op.drop_table("run_hours", schema="syncd")

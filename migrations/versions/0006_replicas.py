"""Replicas: each tenant's due time and claim, and the replica that ran each run.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SYNC_RUNS = """
        SELECT r.id,
               t.name AS tenant,
               r.started_at,
               r.finished_at,
               r.status,
               r.pages_fetched,
               r.pairs_seen,
               r.pairs_added,
               r.pairs_removed,
               r.error,
               r.collections{replica}
          FROM syncd.runs r
          JOIN syncd.tenants t ON t.id = r.tenant_id
"""


def upgrade() -> None:
    op.add_column("runs", sa.Column("replica", sa.Text(), nullable=True), schema="syncd")
    # A view is a public contract: columns are only ever appended. CREATE OR REPLACE may
    # append one, and unlike DROP + CREATE it keeps the readers' grants.
    op.execute(
        "CREATE OR REPLACE VIEW syncd.sync_runs AS "
        + SYNC_RUNS.format(replica=",\n               r.replica")
    )
    op.create_table(
        "schedule",
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("due_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("schedule", sa.Text(), nullable=True),
        sa.Column("failures", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("claimed_by", sa.Text(), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(claimed_by IS NULL) = (claimed_at IS NULL) "
            "AND (claimed_by IS NULL) = (claimed_until IS NULL)",
            name=op.f("ck_schedule_claim_whole"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["syncd.tenants.id"], name=op.f("fk_schedule_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_schedule")),
        schema="syncd",
    )


def downgrade() -> None:
    op.drop_table("schedule", schema="syncd")
    # A column cannot leave a view in place: the view is recreated (its grants go with it).
    op.execute("DROP VIEW syncd.sync_runs")
    op.execute("CREATE VIEW syncd.sync_runs AS " + SYNC_RUNS.format(replica=""))
    op.drop_column("runs", "replica", schema="syncd")

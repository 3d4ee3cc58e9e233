"""The mass-delete guard's baseline: a reset time per tenant, an index of runs by start.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "tenants",
        sa.Column("delete_baseline_since", sa.DateTime(timezone=True), nullable=True),
        schema="syncd",
    )
    # A collection may succeed in a run that is partial as a whole: the baseline reads every
    # run of the tenant within its window, not only the succeeded ones.
    op.create_index(
        op.f("ix_runs_tenant_id_started_at"), "runs", ["tenant_id", "started_at"], schema="syncd"
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_runs_tenant_id_started_at"), "runs", schema="syncd")
    op.drop_column("tenants", "delete_baseline_since", schema="syncd")

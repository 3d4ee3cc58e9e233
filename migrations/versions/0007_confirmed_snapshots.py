"""Confirmed snapshots: the key of each collection's last complete, fully applied snapshot,
so that a run whose snapshot has the same key skips staging and diff.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Empty: the first run of each collection after the upgrade applies in full and
    # records its key.
    op.create_table(
        "confirmed_snapshots",
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("collection", sa.Text(), nullable=False),
        sa.Column("total", sa.BigInteger(), nullable=False),
        sa.Column("page_size", sa.Integer(), nullable=False),
        sa.Column("digests", sa.LargeBinary(), nullable=False),
        sa.Column("items", sa.BigInteger(), nullable=False),
        sa.Column("run_id", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["syncd.tenants.id"],
            name=op.f("fk_confirmed_snapshots_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", "collection", name=op.f("pk_confirmed_snapshots")),
        schema="syncd",
    )


def downgrade() -> None:
    op.drop_table("confirmed_snapshots", schema="syncd")

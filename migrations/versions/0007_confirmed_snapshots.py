"""Confirmed snapshots: the key of each collection's last complete, fully applied snapshot,
so that a run whose snapshot has the same key skips staging and diff; and triggers that
forget every key when `links` or `catalog_items` change other than by syncd's apply.

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

# syncd's apply sets `syncd.applying` for its transaction (`store.prepare_apply`) and
# records the keys it confirms in the same transaction. Any other change to the stored data
# (a hand edit, a later migration, a syncd from before this revision) may make a key lie
# about what is stored: all keys go, and the next runs diff in full.
FORGET = """
CREATE FUNCTION syncd.forget_confirmed_snapshots() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('syncd.applying', true) IS DISTINCT FROM 'on' THEN
        DELETE FROM syncd.confirmed_snapshots;
    END IF;
    RETURN NULL;
END
$$
"""
TABLES = ("links", "catalog_items")


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
        sa.CheckConstraint(
            "octet_length(digests) % 16 = 0", name=op.f("ck_confirmed_snapshots_digests_whole")
        ),
        schema="syncd",
    )
    op.execute(FORGET)
    for table in TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_forget_confirmed_snapshots "
            f"AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON syncd.{table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION syncd.forget_confirmed_snapshots()"
        )


def downgrade() -> None:
    for table in TABLES:
        op.execute(f"DROP TRIGGER {table}_forget_confirmed_snapshots ON syncd.{table}")
    op.execute("DROP FUNCTION syncd.forget_confirmed_snapshots()")
    op.drop_table("confirmed_snapshots", schema="syncd")

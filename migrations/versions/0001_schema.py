"""Create schema syncd.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # env.py creates the schema before Alembic's version table goes into it; this revision
    # records that the schema is syncd's.
    op.execute("CREATE SCHEMA IF NOT EXISTS syncd")
    op.execute("COMMENT ON SCHEMA syncd IS 'syncd: copy of VSPC backup copy job links'")


def downgrade() -> None:
    op.execute("COMMENT ON SCHEMA syncd IS NULL")

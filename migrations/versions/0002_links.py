"""Tenants, runs, link intervals, and the reporting views.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NIL = "00000000-0000-0000-0000-000000000000"

VIEWS = {
    "job_links_current": f"""
        SELECT t.name AS tenant,
               l.job_uid,
               NULLIF(l.unique_job_uid, '{NIL}'::uuid) AS unique_job_uid,
               l.linked_job_uid,
               l.valid_from AS first_seen_at,
               CASE WHEN l.opened_run_id <= t.confirmed_run_id THEN t.confirmed_at END
                   AS last_confirmed_at
          FROM syncd.links l
          JOIN syncd.tenants t ON t.id = l.tenant_id
         WHERE l.valid_to IS NULL
    """,
    "job_links_history": f"""
        SELECT t.name AS tenant,
               l.job_uid,
               NULLIF(l.unique_job_uid, '{NIL}'::uuid) AS unique_job_uid,
               l.linked_job_uid,
               l.valid_from,
               l.valid_to,
               l.opened_run_id,
               l.closed_run_id
          FROM syncd.links l
          JOIN syncd.tenants t ON t.id = l.tenant_id
    """,
    "job_link_changes": f"""
        SELECT t.name AS tenant,
               l.job_uid,
               NULLIF(l.unique_job_uid, '{NIL}'::uuid) AS unique_job_uid,
               l.linked_job_uid,
               'added'::text AS change,
               l.valid_from AS changed_at,
               l.opened_run_id AS sync_run_id
          FROM syncd.links l
          JOIN syncd.tenants t ON t.id = l.tenant_id
        UNION ALL
        SELECT t.name,
               l.job_uid,
               NULLIF(l.unique_job_uid, '{NIL}'::uuid),
               l.linked_job_uid,
               'removed'::text,
               l.valid_to,
               l.closed_run_id
          FROM syncd.links l
          JOIN syncd.tenants t ON t.id = l.tenant_id
         WHERE l.valid_to IS NOT NULL
    """,
    "sync_runs": """
        SELECT r.id,
               t.name AS tenant,
               r.started_at,
               r.finished_at,
               r.status,
               r.pages_fetched,
               r.pairs_seen,
               r.pairs_added,
               r.pairs_removed,
               r.error
          FROM syncd.runs r
          JOIN syncd.tenants t ON t.id = r.tenant_id
    """,
    "tenant_status": """
        SELECT t.name AS tenant,
               last_run.started_at AS last_run_at,
               last_run.status AS last_status,
               last_success.finished_at AS last_success_at,
               t.current_pairs
          FROM syncd.tenants t
          LEFT JOIN LATERAL (
                SELECT r.started_at, r.status FROM syncd.runs r
                 WHERE r.tenant_id = t.id ORDER BY r.id DESC LIMIT 1
          ) last_run ON true
          LEFT JOIN LATERAL (
                SELECT r.finished_at FROM syncd.runs r
                 WHERE r.tenant_id = t.id AND r.status = 'succeeded' ORDER BY r.id DESC LIMIT 1
          ) last_success ON true
    """,
}


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Integer(), sa.Identity(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("confirmed_run_id", sa.BigInteger(), nullable=True),
        sa.Column("confirmed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("current_pairs", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("name", name=op.f("uq_tenants_name")),
        schema="syncd",
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("pages_fetched", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("pairs_seen", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("pairs_added", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("pairs_removed", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("host", sa.Text(), nullable=True),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.CheckConstraint(
            "status IN ('running', 'succeeded', 'partial', 'failed')",
            name=op.f("ck_runs_status_known"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["syncd.tenants.id"], name=op.f("fk_runs_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        schema="syncd",
    )
    op.create_index(op.f("ix_runs_tenant_id_id"), "runs", ["tenant_id", "id"], schema="syncd")
    op.create_index(
        op.f("ix_runs_tenant_id"),
        "runs",
        ["tenant_id"],
        schema="syncd",
        postgresql_where=sa.text("status = 'running'"),
    )
    op.create_table(
        "links",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("job_uid", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("unique_job_uid", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("linked_job_uid", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_to", sa.DateTime(timezone=True), nullable=True),
        sa.Column("opened_run_id", sa.BigInteger(), nullable=False),
        sa.Column("closed_run_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_links")),
        schema="syncd",
    )
    op.create_index(
        "uq_links_open_pair",
        "links",
        ["tenant_id", "job_uid", "linked_job_uid", "unique_job_uid"],
        unique=True,
        schema="syncd",
        postgresql_where=sa.text("valid_to IS NULL"),
    )
    op.create_index(
        op.f("ix_links_tenant_id_valid_from"), "links", ["tenant_id", "valid_from"], schema="syncd"
    )
    op.create_index(
        op.f("ix_links_valid_to"),
        "links",
        ["valid_to"],
        schema="syncd",
        postgresql_where=sa.text("valid_to IS NOT NULL"),
    )
    for name, body in VIEWS.items():
        op.execute(f"CREATE VIEW syncd.{name} AS {body}")


def downgrade() -> None:
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS syncd.{name}")
    op.drop_table("links", schema="syncd")
    op.drop_table("runs", schema="syncd")
    op.drop_table("tenants", schema="syncd")

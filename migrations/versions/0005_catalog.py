"""Both copy modes and a job catalog: links.copy_mode, catalog_items, runs.collections, views.

Links stored before this revision are periodic backup copy job links (the only collection
syncd read): the column's default makes them `periodic`, their intervals unchanged. The
views that gain a column are dropped and created again with it last (a view's columns
cannot be inserted in the middle, and `CREATE OR REPLACE` cannot add one before others);
grants on views go with them, so `syncd grant-reader` must run again after upgrading.

Downgrading deletes the immediate links and the catalog (the older schema has no place
for them).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NIL = "00000000-0000-0000-0000-000000000000"

# Job types a backup copy job takes as its source; syncd.collections.PROTECTABLE_JOB_TYPES
# holds the same list (a test compares them).
PROTECTABLE_JOB_TYPES = ("BackupVm", "AgentBackupJob", "AgentPolicy")


def _current(alias: str, collection: str, tenant: str, uid: str) -> str:
    """A LEFT JOIN to the current version of a catalog item (NULLs when there is none)."""
    return f"""
          LEFT JOIN syncd.catalog_items {alias}
                 ON {alias}.tenant_id = {tenant} AND {alias}.collection = '{collection}'
                AND {alias}.valid_to IS NULL AND {alias}.uid = {uid}"""


def _server_and_organization(job: str, tenant: str) -> str:
    """The job's backup server (`bs`) and organization (`org`): the one the job is assigned
    to, else its backup server's owner."""
    return _current(
        "bs", "backup_servers", tenant, f"({job}.attributes->>'backupServerUid')::uuid"
    ) + (
        _current(
            "org",
            "organizations",
            tenant,
            f"""coalesce(NULLIF(({job}.attributes->>'mappedOrganizationUid')::uuid, '{NIL}'::uuid),
                                  (bs.attributes->>'organizationUid')::uuid,
                                  ({job}.attributes->>'organizationUid')::uuid)""",
        )
    )


JOB_COLUMNS = """
               (c.attributes->>'uniqueUid')::uuid AS unique_job_uid,
               c.attributes->>'name' AS name,
               c.attributes->>'type' AS type,
               c.attributes->>'description' AS description,
               (c.attributes->>'backupServerUid')::uuid AS backup_server_uid,
               (c.attributes->>'organizationUid')::uuid AS organization_uid,
               (c.attributes->>'mappedOrganizationUid')::uuid AS mapped_organization_uid,
               (c.attributes->>'isEnabled')::boolean AS is_enabled"""

CHANGED_VIEWS = {
    "job_links_current": f"""
        SELECT t.name AS tenant,
               l.job_uid,
               NULLIF(l.unique_job_uid, '{NIL}'::uuid) AS unique_job_uid,
               l.linked_job_uid,
               l.valid_from AS first_seen_at,
               CASE WHEN l.opened_run_id <= t.confirmed_run_id THEN t.confirmed_at END
                   AS last_confirmed_at,
               l.copy_mode
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
               l.closed_run_id,
               l.copy_mode
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
               l.opened_run_id AS sync_run_id,
               l.copy_mode
          FROM syncd.links l
          JOIN syncd.tenants t ON t.id = l.tenant_id
        UNION ALL
        SELECT t.name,
               l.job_uid,
               NULLIF(l.unique_job_uid, '{NIL}'::uuid),
               l.linked_job_uid,
               'removed'::text,
               l.valid_to,
               l.closed_run_id,
               l.copy_mode
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
               r.error,
               r.collections
          FROM syncd.runs r
          JOIN syncd.tenants t ON t.id = r.tenant_id
    """,
}

NEW_VIEWS = {
    "jobs_current": f"""
        SELECT t.name AS tenant,
               c.uid AS job_uid,{JOB_COLUMNS},
               c.volatile->>'status' AS status,
               (c.volatile->>'lastRun')::timestamptz AS last_run_at,
               (c.volatile->>'lastEndTime')::timestamptz AS last_end_at,
               c.first_seen_at
          FROM syncd.catalog_items c
          JOIN syncd.tenants t ON t.id = c.tenant_id
         WHERE c.collection = 'jobs' AND c.valid_to IS NULL
    """,
    "jobs_history": f"""
        SELECT t.name AS tenant,
               c.uid AS job_uid,{JOB_COLUMNS},
               c.valid_from,
               c.valid_to
          FROM syncd.catalog_items c
          JOIN syncd.tenants t ON t.id = c.tenant_id
         WHERE c.collection = 'jobs'
    """,
    "backup_servers_current": """
        SELECT t.name AS tenant,
               c.uid AS backup_server_uid,
               c.attributes->>'name' AS name,
               c.attributes->>'version' AS version,
               (c.attributes->>'organizationUid')::uuid AS organization_uid
          FROM syncd.catalog_items c
          JOIN syncd.tenants t ON t.id = c.tenant_id
         WHERE c.collection = 'backup_servers' AND c.valid_to IS NULL
    """,
    "organizations_current": """
        SELECT t.name AS tenant,
               c.uid AS organization_uid,
               c.attributes->>'name' AS name,
               c.attributes->>'alias' AS alias,
               c.attributes->>'type' AS type
          FROM syncd.catalog_items c
          JOIN syncd.tenants t ON t.id = c.tenant_id
         WHERE c.collection = 'organizations' AND c.valid_to IS NULL
    """,
    # Names are NULL where the catalog lacks the job: a link to a deleted job is a finding.
    "job_links_named": f"""
        SELECT t.name AS tenant,
               l.copy_mode,
               l.job_uid AS copy_job_uid,
               cj.attributes->>'name' AS copy_job_name,
               l.linked_job_uid AS source_job_uid,
               sj.attributes->>'name' AS source_job_name,
               sj.attributes->>'type' AS source_job_type,
               bs.attributes->>'name' AS backup_server_name,
               org.attributes->>'name' AS organization_name
          FROM syncd.links l
          JOIN syncd.tenants t ON t.id = l.tenant_id
          {_current("cj", "jobs", "l.tenant_id", "l.job_uid")}
          {_current("sj", "jobs", "l.tenant_id", "l.linked_job_uid")}
          {_server_and_organization("cj", "l.tenant_id")}
         WHERE l.valid_to IS NULL
    """,
    "unprotected_jobs": f"""
        SELECT t.name AS tenant,
               j.uid AS job_uid,
               j.attributes->>'name' AS name,
               j.attributes->>'type' AS type,
               bs.attributes->>'name' AS backup_server_name,
               org.attributes->>'name' AS organization_name
          FROM syncd.catalog_items j
          JOIN syncd.tenants t ON t.id = j.tenant_id
          {_server_and_organization("j", "j.tenant_id")}
         WHERE j.collection = 'jobs'
           AND j.valid_to IS NULL
           AND (j.attributes->>'isEnabled')::boolean
           AND j.attributes->>'type' IN ({", ".join(f"'{t}'" for t in PROTECTABLE_JOB_TYPES)})
           AND NOT EXISTS (
                SELECT FROM syncd.links l
                 WHERE l.tenant_id = j.tenant_id
                   AND l.valid_to IS NULL
                   AND l.linked_job_uid = j.uid
           )
    """,
}

# The views as revision 0002 created them, for the downgrade.
OLD_VIEWS = {
    "job_links_current": f"""
        SELECT t.name AS tenant, l.job_uid,
               NULLIF(l.unique_job_uid, '{NIL}'::uuid) AS unique_job_uid, l.linked_job_uid,
               l.valid_from AS first_seen_at,
               CASE WHEN l.opened_run_id <= t.confirmed_run_id THEN t.confirmed_at END
                   AS last_confirmed_at
          FROM syncd.links l JOIN syncd.tenants t ON t.id = l.tenant_id
         WHERE l.valid_to IS NULL
    """,
    "job_links_history": f"""
        SELECT t.name AS tenant, l.job_uid,
               NULLIF(l.unique_job_uid, '{NIL}'::uuid) AS unique_job_uid, l.linked_job_uid,
               l.valid_from, l.valid_to, l.opened_run_id, l.closed_run_id
          FROM syncd.links l JOIN syncd.tenants t ON t.id = l.tenant_id
    """,
    "job_link_changes": f"""
        SELECT t.name AS tenant, l.job_uid,
               NULLIF(l.unique_job_uid, '{NIL}'::uuid) AS unique_job_uid, l.linked_job_uid,
               'added'::text AS change, l.valid_from AS changed_at, l.opened_run_id AS sync_run_id
          FROM syncd.links l JOIN syncd.tenants t ON t.id = l.tenant_id
        UNION ALL
        SELECT t.name, l.job_uid, NULLIF(l.unique_job_uid, '{NIL}'::uuid), l.linked_job_uid,
               'removed'::text, l.valid_to, l.closed_run_id
          FROM syncd.links l JOIN syncd.tenants t ON t.id = l.tenant_id
         WHERE l.valid_to IS NOT NULL
    """,
    "sync_runs": """
        SELECT r.id, t.name AS tenant, r.started_at, r.finished_at, r.status, r.pages_fetched,
               r.pairs_seen, r.pairs_added, r.pairs_removed, r.error
          FROM syncd.runs r JOIN syncd.tenants t ON t.id = r.tenant_id
    """,
}

LINK_COLUMNS = ["job_uid", "linked_job_uid", "unique_job_uid"]


def upgrade() -> None:
    for name in CHANGED_VIEWS:
        op.execute(f"DROP VIEW syncd.{name}")

    op.add_column(
        "links",
        sa.Column("copy_mode", sa.Text(), server_default=sa.text("'periodic'"), nullable=False),
        schema="syncd",
    )
    op.create_check_constraint(
        op.f("ck_links_copy_mode_known"),
        "links",
        "copy_mode IN ('periodic', 'immediate')",
        schema="syncd",
    )
    op.drop_index("uq_links_open_pair", "links", schema="syncd")
    op.create_index(
        "uq_links_open_pair",
        "links",
        ["tenant_id", "copy_mode", *LINK_COLUMNS],
        unique=True,
        schema="syncd",
        postgresql_where=sa.text("valid_to IS NULL"),
    )

    op.add_column(
        "runs",
        sa.Column("collections", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        schema="syncd",
    )
    op.add_column(
        "tenants",
        sa.Column(
            "unavailable_collections",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'"),
            nullable=False,
        ),
        schema="syncd",
    )

    op.create_table(
        "catalog_items",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("tenant_id", sa.Integer(), nullable=False),
        sa.Column("collection", sa.Text(), nullable=False),
        sa.Column("uid", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("attributes", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("volatile", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_to", sa.DateTime(timezone=True), nullable=True),
        sa.Column("opened_run_id", sa.BigInteger(), nullable=False),
        sa.Column("closed_run_id", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_catalog_items")),
        schema="syncd",
    )
    op.create_index(
        "uq_catalog_items_open_item",
        "catalog_items",
        ["tenant_id", "collection", "uid"],
        unique=True,
        schema="syncd",
        postgresql_where=sa.text("valid_to IS NULL"),
    )

    for name, body in {**CHANGED_VIEWS, **NEW_VIEWS}.items():
        op.execute(f"CREATE VIEW syncd.{name} AS {body}")


def downgrade() -> None:
    for name in [*reversed(list(NEW_VIEWS)), *CHANGED_VIEWS]:
        op.execute(f"DROP VIEW IF EXISTS syncd.{name}")
    op.drop_index("uq_catalog_items_open_item", "catalog_items", schema="syncd")
    op.drop_table("catalog_items", schema="syncd")
    op.drop_column("tenants", "unavailable_collections", schema="syncd")
    op.drop_column("runs", "collections", schema="syncd")
    op.execute("DELETE FROM syncd.links WHERE copy_mode <> 'periodic'")
    op.drop_index("uq_links_open_pair", "links", schema="syncd")
    op.create_index(
        "uq_links_open_pair",
        "links",
        ["tenant_id", *LINK_COLUMNS],
        unique=True,
        schema="syncd",
        postgresql_where=sa.text("valid_to IS NULL"),
    )
    op.drop_constraint(op.f("ck_links_copy_mode_known"), "links", schema="syncd")
    op.drop_column("links", "copy_mode", schema="syncd")
    for name, body in OLD_VIEWS.items():
        op.execute(f"CREATE VIEW syncd.{name} AS {body}")

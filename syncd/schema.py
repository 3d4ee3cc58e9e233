"""The database's public names: syncd's schema and the reporting views in it.

Reporting tools and `syncd grant-reader` depend on these names; the table definitions behind
them are in `models`, which only Alembic, the tests and the benchmarks import.
"""

SCHEMA = "syncd"

# The reporting views: a public contract (names and columns are used by reporting tools).
REPORTING_VIEWS = (
    "job_links_current",
    "job_links_history",
    "job_link_changes",
    "sync_runs",
    "tenant_status",
    "jobs_current",
    "jobs_history",
    "backup_servers_current",
    "organizations_current",
    "job_links_named",
    "unprotected_jobs",
)

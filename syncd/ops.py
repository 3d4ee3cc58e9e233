"""Operator commands: `syncd migrate`, `sync`, `check`, `status` and `grant-reader`.

`check` talks to VSPC only (no database); `status` and `grant-reader` talk to the database
only. Each `cmd_*(args, cfg, scrubber)` returns the command's exit code; errors the operator
must act on are raised as `errors.SyncdError` subclasses, which the CLI prints and turns
into exit 1 (or 2 for usage and configuration errors).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import sqlalchemy as sa
from rich.markup import escape
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import (
    claims,
    collections,
    config,
    console,
    db,
    errors,
    logs,
    schema,
    status,
    store,
    sync,
    vspc,
)
from syncd.status import RunStatus

# `check` is interactive: a dead server should be reported in seconds, not after the full
# retry budget a scheduled sync deserves.
CHECK_MAX_RETRIES = 1
CHECK_BACKOFF_MAX_S = 2.0


# --- migrate and sync ----------------------------------------------------------------------


async def cmd_migrate(
    args: argparse.Namespace, cfg: config.Config, scrubber: logs.SecretScrubber
) -> int:
    """`syncd migrate`: brings the schema to this syncd's head revision."""
    async with db.open_configured_engine(cfg, args.data_dir) as engine:
        before = await db.schema_state(engine)
        after = await db.migrate(engine)
    if before.current == after.current:
        print(f"schema already at {after.current}")
    else:
        print(f"schema upgraded from {before.current or 'nothing'} to {after.current}")
    return errors.EXIT_OK


async def cmd_sync(
    args: argparse.Namespace, cfg: config.Config, scrubber: logs.SecretScrubber
) -> int:
    """`syncd sync`: every (or each named) tenant once, now, whatever its due time (a tenant
    a daemon is running is skipped as busy), moving its due time; 0 when all succeeded,
    else 1."""
    tenants = cfg.select_tenants(args.tenant)
    if args.allow_mass_delete and not args.tenant:
        raise errors.UsageError(
            "--allow-mass-delete needs --tenant NAME: allow it one tenant at a time"
        )
    out = console.make_console()
    async with db.open_migrated_engine(cfg, args.data_dir, synchronous_commit=False) as engine:
        results = await console.sync_with_progress(
            out,
            tenants,
            engine,
            max_concurrent_tenants=cfg.daemon.max_concurrent_tenants,
            max_concurrent_applies=cfg.database.max_concurrent_applies,
            allow_mass_delete=args.allow_mass_delete,
            scrubber=scrubber,
            replica=claims.Replica.of(cfg.daemon),
        )
    out.print(console.summary_table(results))
    return console.sync_exit_code(results)


# --- check ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    """What `syncd check` found for one tenant."""

    tenant: str
    auth_method: str
    reachable: str
    tls: str
    page_ok: bool
    total_pairs: int | None = None
    problem: str | None = None
    hint: str | None = None
    # How each configured collection answered its first page: "ok", "unavailable" (HTTP
    # 404: an older VSPC), or "failed"; empty when the tenant could not be reached at all.
    collections: Mapping[str, str] = field(default_factory=dict)

    def collections_text(self) -> str:
        """The `collections` cell: how many answer, and which do not."""
        if not self.collections:
            return ""
        answering = [name for name, state in self.collections.items() if state == "ok"]
        text = f"{len(answering)} of {len(self.collections)}"
        for state in ("unavailable", "failed"):
            names = [name for name, found in self.collections.items() if found == state]
            if names:
                text += f"; {state}: {', '.join(names)}"
        return text


def _tls_in_use(tenant: config.Tenant) -> str:
    if not tenant.url.lower().startswith("https://"):
        return "none (http)"
    if not tenant.verify_tls:
        return "not verified (verify_tls = false)"
    return "verified (ca_file)" if tenant.ca_file is not None else "verified"


def _causes(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _diagnose(tenant: config.Tenant, exc: errors.TenantError) -> CheckResult:
    """Turns the client's exception into table cells and, where its message lacks one, a hint."""
    causes = _causes(exc)
    tls = _tls_in_use(tenant)
    base = CheckResult(
        tenant=tenant.name,
        auth_method=tenant.auth.method,
        reachable="yes",
        tls=tls,
        page_ok=False,
        problem=str(exc),
    )
    if isinstance(exc, errors.TransportError):
        connected = any(isinstance(cause, aiohttp.ClientSSLError) for cause in causes)
        return dataclasses.replace(base, reachable="yes" if connected else "-", tls="FAILED")
    retryable = next((c for c in causes if isinstance(c, errors.RetryableError)), None)
    if retryable is not None and retryable.reason == "connection_error":
        if any(isinstance(cause, aiohttp.ClientConnectorDNSError) for cause in causes):
            hint = "the host name in url does not resolve: check its spelling and your DNS"
        elif any(isinstance(cause, ConnectionRefusedError) for cause in causes):
            hint = (
                "nothing listens at that host and port: check the port in url (VSPC's REST "
                "API listens on 1280 by default) and that VSPC is running"
            )
        else:
            hint = "check the host and port in url, and firewalls between syncd and VSPC"
        return dataclasses.replace(base, reachable="no", tls="-", hint=hint)
    if retryable is not None and retryable.reason == "timeout":
        return dataclasses.replace(
            base,
            reachable="no answer",
            tls="-",
            hint="check firewalls and proxies; raise request_timeout if VSPC is just slow",
        )
    if retryable is not None:
        return dataclasses.replace(
            base, hint="VSPC is busy or failing (throttled or a server error): try again later"
        )
    if isinstance(exc, errors.AuthError) and isinstance(tenant.auth, config.ApiKeyAuth):
        return dataclasses.replace(
            base,
            hint="check the key given by api_key / api_key_env / api_key_file, and that it "
            "has not been revoked or expired in VSPC",
        )
    if isinstance(exc, errors.AuthError):
        return dataclasses.replace(
            base,
            hint="check username and password; accounts with multi-factor authentication "
            "need an API key instead",
        )
    return base


def _quick(tenant: config.Tenant) -> config.Tenant:
    settings = tenant.settings.model_copy(
        update={
            "max_retries": min(tenant.settings.max_retries, CHECK_MAX_RETRIES),
            "backoff_max_s": min(tenant.settings.backoff_max_s, CHECK_BACKOFF_MAX_S),
        }
    )
    return dataclasses.replace(tenant, settings=settings)


async def _first_page(
    client: vspc.VspcClient, collection: collections.Collection
) -> tuple[str, int | None, str | None]:
    """(state, total, problem) of one item of `collection`'s first page; `TenantError`s
    other than an unavailable collection propagate."""
    try:
        page = await client.fetch_first_page(limit=1, collection=collection)
    except errors.CollectionUnavailable:
        return "unavailable", None, None
    return "ok", page.total, None


async def _first_page_of_other(
    client: vspc.VspcClient, collection: collections.Collection
) -> tuple[str, int | None, str | None]:
    try:
        return await _first_page(client, collection)
    except errors.TenantError as exc:
        return "failed", None, f"{collection.name}: {'; '.join(errors.cause_chain(exc))}"


async def check_tenant(
    tenant: config.Tenant, scrubber: logs.SecretScrubber | None = None
) -> CheckResult:
    """Authenticates as `tenant` and fetches one item of the first page of each of its
    collections: the first decides whether the tenant is reachable at all, the others say
    which collections answer (a 404 is an unavailable collection, not a failure).

    Always returns a result; its problem text is cleaned and scrubbed of known secrets
    (the tenant's own, and tokens obtained while checking).
    """
    secrets = scrubber if scrubber is not None else logs.SecretScrubber()
    secrets.register(tenant.secrets())
    first, *others = collections.by_names(tenant.settings.collections)
    # The check's tokens stay known to the scrubber until its problem text is clean.
    with secrets.issued_tokens() as issued_tokens:
        try:
            async with vspc.open_client(_quick(tenant), on_secret=issued_tokens) as client:
                answers = [await _first_page(client, first)]
                answers += await asyncio.gather(*(_first_page_of_other(client, c) for c in others))
        except errors.TenantError as exc:
            result = _diagnose(tenant, exc)
            return dataclasses.replace(
                result, problem=errors.clean_text(secrets.scrub(result.problem or ""))
            )
    wanted = [first, *others]
    totals = [
        total
        for collection, (_, total, _) in zip(wanted, answers, strict=True)
        if collection.kind is collections.Kind.LINKS and total is not None
    ]
    problems = [problem for _, _, problem in answers if problem]
    return CheckResult(
        tenant=tenant.name,
        auth_method=tenant.auth.method,
        reachable="yes",
        tls=_tls_in_use(tenant),
        page_ok=not problems,
        total_pairs=sum(totals) if totals else None,
        problem=errors.clean_text(secrets.scrub("; ".join(problems))) if problems else None,
        collections={c.name: state for c, (state, _, _) in zip(wanted, answers, strict=True)},
    )


async def check_tenants(
    tenants: Sequence[config.Tenant],
    *,
    max_concurrent: int,
    scrubber: logs.SecretScrubber | None = None,
) -> list[CheckResult]:
    """`check_tenant` for each tenant, at most `max_concurrent` at once, in the given order.

    One tenant's failure, of any kind, never stops another's check.
    """

    def crashed(tenant: config.Tenant, exc: Exception) -> CheckResult:
        return CheckResult(
            tenant=tenant.name,
            auth_method=tenant.auth.method,
            reachable="-",
            tls=_tls_in_use(tenant),
            page_ok=False,
            problem=errors.clean_text(f"internal error: {type(exc).__name__}: {exc}"),
        )

    return await sync.run_each(
        tenants,
        lambda tenant: check_tenant(tenant, scrubber),
        max_concurrent=max_concurrent,
        on_crash=crashed,
    )


def check_table(results: Sequence[CheckResult]) -> Table:
    """The table `syncd check` prints."""
    table = Table(title="syncd check")
    columns = ("tenant", "auth", "server reachable", "TLS", "first page", "total pairs")
    for column in (*columns, "collections answering"):
        table.add_column(column)
    for result in results:
        table.add_row(
            escape(result.tenant),
            result.auth_method,
            result.reachable,
            result.tls,
            "OK" if result.page_ok else "[red]FAILED[/]",
            "" if result.total_pairs is None else str(result.total_pairs),
            result.collections_text(),
        )
    return table


async def cmd_check(
    args: argparse.Namespace, cfg: config.Config, scrubber: logs.SecretScrubber
) -> int:
    """`syncd check`: 0 when every (selected) tenant authenticated and served a page, else 1."""
    tenants = cfg.select_tenants(args.tenant)
    out = console.make_console()
    where = f"{cfg.path}" if cfg.path is not None else "the configuration"
    out.print(f"{escape(where)}: valid, {len(cfg.tenants)} tenant(s)", highlight=False)
    results = await check_tenants(
        tenants, max_concurrent=cfg.daemon.max_concurrent_tenants, scrubber=scrubber
    )
    out.print(check_table(results))
    failed = [result for result in results if not result.page_ok]
    for result in failed:
        # soft_wrap: a long message stays one line, for grep and for the terminal to wrap.
        out.print(
            f"[bold red]{escape(result.tenant)}[/]: {escape(result.problem or '')}",
            soft_wrap=True,
            highlight=False,
        )
        if result.hint:
            out.print(f"  hint: {escape(result.hint)}", highlight=False, soft_wrap=True)
    out.print(f"{len(results) - len(failed)} of {len(results)} tenant(s) passed")
    return errors.EXIT_OK if not failed else errors.EXIT_FAILED


# --- status --------------------------------------------------------------------------------


async def read_status(engine: AsyncEngine, configured: Sequence[str]) -> list[status.TenantStatus]:
    """Every configured tenant, then every other tenant the database holds (its data stays)."""
    stored = {row.tenant: row for row in await store.read_tenant_status(engine)}
    names = list(dict.fromkeys(configured)) + [name for name in stored if name not in configured]
    return [
        dataclasses.replace(stored[name], configured=name in configured)
        if name in stored
        else status.TenantStatus(name)
        for name in names
    ]


def format_age(seconds: float | None) -> str:
    """ "45s", "12m 5s", "3h 5m", "2d 4h" (the two largest units), or "" for None."""
    if seconds is None:
        return ""
    whole = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size or (unit == "s" and not parts):
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return " ".join(parts[:2])


def _when(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def status_table(statuses: Sequence[status.TenantStatus]) -> Table:
    """The table `syncd status` prints."""
    table = Table(title="syncd status")
    for column in ("tenant", "last run", "status", "last success", "age", "pairs", "collections"):
        table.add_column(column)
    for row in statuses:
        name = escape(row.tenant)
        if not row.configured:
            name += " [dim](not in config)[/]"
        shown = str(row.last_status or "never synced")
        if row.last_status in (RunStatus.FAILED, RunStatus.PARTIAL):
            shown = f"[red]{shown}[/]"
        table.add_row(
            name,
            _when(row.last_run_at),
            shown,
            _when(row.last_success_at),
            format_age(row.age_s),
            "" if row.pairs is None else str(row.pairs),
            _collections_cell(row.collections),
        )
    return table


def _collections_cell(outcomes: Mapping[str, Mapping[str, Any]] | None) -> str:
    """The last run's collections that did not succeed, with their status; or, when all
    ended alike, how many and how."""
    if not outcomes:
        return ""
    statuses = {str(outcome.get("status")) for outcome in outcomes.values()}
    if len(statuses) == 1:
        return f"all {len(outcomes)} {escape(statuses.pop())}"
    odd = [
        f"{escape(name)}: {escape(str(outcome.get('status')))}"
        for name, outcome in outcomes.items()
        if outcome.get("status") != "succeeded"
    ]
    return ", ".join(odd)


async def cmd_status(
    args: argparse.Namespace, cfg: config.Config, scrubber: logs.SecretScrubber
) -> int:
    """`syncd status`: 0 when every configured tenant's last run succeeded, else 1."""
    async with db.open_migrated_engine(cfg, args.data_dir) as engine:
        statuses = await read_status(engine, [tenant.name for tenant in cfg.tenants])
    ok = all(row.ok for row in statuses if row.configured)
    if args.json:
        document = {"ok": ok, "tenants": [row.as_json() for row in statuses]}
        print(json.dumps(document, indent=2))
    else:
        out = console.make_console()
        out.print(status_table(statuses))
        if not statuses:
            out.print("no tenants configured and none synced yet")
    return errors.EXIT_OK if ok else errors.EXIT_FAILED


# --- grant-reader --------------------------------------------------------------------------


class RoleNotFound(errors.SyncdError):
    """The role `grant-reader` was asked to grant to does not exist."""


async def grant_reader(engine: AsyncEngine, role: str) -> list[str]:
    """Lets `role` connect, use schema syncd and SELECT the reporting views; nothing else.

    The base tables stay out of reach: a view reads them with its owner's rights. Returns
    the statements run. Raises `RoleNotFound` when `role` does not exist.
    """
    async with engine.begin() as connection:
        exists = await connection.scalar(
            sa.text("SELECT 1 FROM pg_roles WHERE rolname = :role"), {"role": role}
        )
        if not exists:
            similar = await connection.scalar(
                sa.text("SELECT rolname FROM pg_roles WHERE lower(rolname) = lower(:role)"),
                {"role": role},
            )
            quote = connection.dialect.identifier_preparer.quote_identifier
            hint = (
                f" (there is {similar!r}: PostgreSQL folds unquoted names to lower case)"
                if similar
                else f"; create it first, e.g. CREATE ROLE {quote(role)} LOGIN PASSWORD '...'"
            )
            raise RoleNotFound(f"role {role!r} does not exist{hint}")
        # Identifiers cannot be bind parameters: quote them, and send the statements as they
        # are (exec_driver_sql), because sa.text would read ":name" inside a quoted role name
        # as a bind parameter.
        quote = connection.dialect.identifier_preparer.quote_identifier
        database = await connection.scalar(sa.text("SELECT current_database()"))
        grantee = quote(role)
        views = ", ".join(
            f"{quote(schema.SCHEMA)}.{quote(view)}" for view in schema.REPORTING_VIEWS
        )
        statements = [
            f"GRANT CONNECT ON DATABASE {quote(str(database))} TO {grantee}",
            f"GRANT USAGE ON SCHEMA {quote(schema.SCHEMA)} TO {grantee}",
            f"GRANT SELECT ON {views} TO {grantee}",
        ]
        for statement in statements:
            await connection.exec_driver_sql(statement)
    return statements


async def cmd_grant_reader(
    args: argparse.Namespace, cfg: config.Config, scrubber: logs.SecretScrubber
) -> int:
    """`syncd grant-reader ROLE`: 0 when granted; a missing role raises `RoleNotFound`."""
    async with db.open_migrated_engine(cfg, args.data_dir) as engine:
        with db.database_errors(f"cannot grant to role {args.role!r}"):
            statements = await grant_reader(engine, args.role)
    for statement in statements:
        print(f"{statement};")
    print(
        f"role {args.role!r} may now SELECT {', '.join(schema.REPORTING_VIEWS)} in schema "
        f"{schema.SCHEMA}, and nothing else there. Run this again after upgrading syncd: a "
        "migration that recreates a view drops its grants."
    )
    return errors.EXIT_OK

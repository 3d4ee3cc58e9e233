"""The monitoring profile: Prometheus, Grafana, their provisioning files and syncd's dashboards.

No Grafana or Prometheus runs here. The files are parsed and their wiring checked against
docker-compose.yml; every PromQL expression may name only metrics a running daemon exports
(taken from a real scrape of its /metrics); every SQL query of the PostgreSQL dashboard runs,
with Grafana's macros filled in, as a role made by `syncd grant-reader` against a migrated
database holding synced data.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import config, ops
from syncd import simulator as sim
from syncd.sync import sync_tenant
from tests.fixtures.helpers import tenant_for
from tests.test_deploy import interpolate, service_environment
from tests.test_metrics import exercised, scrape_app

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
MONITORING = ("reader-role", "grant-reader", "prometheus", "grafana")
READER_PASSWORD = "reader-password-for-tests"

_roles = itertools.count()


def load_yaml(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(document, dict), path
    return document


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "docker-compose.yml")


@pytest.fixture(scope="module")
def datasources() -> dict[str, dict[str, Any]]:
    """The provisioned data sources by uid."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted((GRAFANA / "provisioning" / "datasources").glob("*.yaml")):
        document = load_yaml(path)
        assert document["apiVersion"] == 1
        for source in document["datasources"]:
            assert source["uid"] not in found, f"{path}: uid {source['uid']} twice"
            found[source["uid"]] = source
    return found


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    """Every dashboard JSON file by title."""
    boards = {}
    for path in DASHBOARDS:
        board = json.loads(path.read_text(encoding="utf-8"))
        boards[board["title"]] = board
    return boards


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside collapsed rows."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def targets(board: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every query of the dashboard."""
    for panel in panels(board):
        for target in panel.get("targets", []):
            yield panel, target


def mounts(service: dict[str, Any]) -> dict[str, tuple[Path, str]]:
    """A service's bind mounts: container path -> (host path, mode)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target, *mode = interpolate(volume, {}).split(":")
        if source.startswith("."):
            found[target] = ((ROOT / source).resolve(), mode[0] if mode else "rw")
    return found


# --- docker-compose.yml: the "monitoring" profile ------------------------------------------


def test_monitoring_profile_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in MONITORING:
        assert services[name]["profiles"] == ["monitoring"], name
        for target, (source, mode) in mounts(services[name]).items():
            assert source.exists(), f"{name} mounts {source}, missing from the repository"
            assert mode == "ro", f"{name}: {target} should be read-only"
        for port in services[name].get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond localhost"
    for volume in ("prometheus-data", "grafana-data"):
        assert volume in compose["volumes"]

    grafana = services["grafana"]
    assert grafana["depends_on"]["grant-reader"] == {"condition": "service_completed_successfully"}
    grant = services["grant-reader"]
    assert grant["image"] == services["syncd"]["image"]
    assert grant["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert grant["depends_on"]["reader-role"] == {"condition": "service_completed_successfully"}


def test_grafana_mounts_its_provisioning_and_the_dashboards(compose: dict[str, Any]) -> None:
    grafana = mounts(compose["services"]["grafana"])
    provisioning, _ = grafana["/etc/grafana/provisioning"]
    assert provisioning == GRAFANA / "provisioning"
    for kind in ("datasources", "dashboards"):
        assert list((provisioning / kind).glob("*.yaml")), f"no {kind} provisioning file"
    providers = load_yaml(provisioning / "dashboards" / "syncd.yaml")["providers"]
    assert [provider["type"] for provider in providers] == ["file"]
    path = providers[0]["options"]["path"]
    host, _ = grafana[path]
    assert sorted(host.glob("*.json")) == DASHBOARDS and len(DASHBOARDS) == 2
    environment = compose["services"]["grafana"]["environment"]
    home = environment["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (host / Path(home).relative_to(path)).is_file()


def test_the_reader_role_is_the_same_everywhere(
    compose: dict[str, Any], datasources: dict[str, dict[str, Any]]
) -> None:
    services = compose["services"]
    command = services["reader-role"]["command"]
    role = command[command.index("-v", 2) + 1].removeprefix("reader=")
    assert services["grant-reader"]["command"] == ["grant-reader", role]
    postgres = datasources["syncd-postgres"]
    assert postgres["user"] == role
    # The password reaches the role and Grafana from one variable of the host.
    host = {"GRAFANA_DB_PASSWORD": "from-the-host"}
    grafana_env = service_environment(services["grafana"], host)
    role_env = service_environment(services["reader-role"], host)
    variable = re.fullmatch(r"\$\{(\w+)\}", postgres["secureJsonData"]["password"])
    assert variable is not None, "the password must come from the environment"
    assert grafana_env[variable[1]] == role_env["SYNCD_READER_PASSWORD"] == "from-the-host"
    # It reaches syncd's database on the compose network.
    database = services["postgres"]["environment"]["POSTGRES_DB"]
    assert postgres["jsonData"]["database"] == database == role_env["PGDATABASE"]
    assert postgres["url"].split(":")[0] == "postgres" == role_env["PGHOST"]


def test_prometheus_scrapes_syncd(
    compose: dict[str, Any], datasources: dict[str, dict[str, Any]]
) -> None:
    services = compose["services"]
    mounted, _ = mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"]
    scrape = load_yaml(mounted)
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    (target,) = jobs["syncd"]["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services and services[host]["command"] == ["run"]
    listen = config.load_config(ROOT / "deploy" / "demo.toml", environ={}).daemon.listen
    assert config.parse_listen(listen)[1] == int(port)
    assert jobs["syncd"].get("metrics_path", "/metrics") == "/metrics"
    interval = config.parse_duration_s(scrape["global"]["scrape_interval"])
    assert config.parse_duration_s(datasources["syncd-prometheus"]["jsonData"]["timeInterval"]) == (
        interval
    )
    assert datasources["syncd-prometheus"]["url"] == "http://prometheus:9090"


# --- the dashboards ------------------------------------------------------------------------


def test_dashboards_parse_and_use_the_provisioned_data_sources(
    dashboards: dict[str, dict[str, Any]], datasources: dict[str, dict[str, Any]]
) -> None:
    assert set(dashboards) == {"syncd operations", "Backup copy coverage"}
    assert len({board["uid"] for board in dashboards.values()}) == 2
    kinds = {uid: source["type"] for uid, source in datasources.items()}
    for title, board in dashboards.items():
        ids = [panel["id"] for panel in panels(board)]
        assert len(ids) == len(set(ids)), f"{title}: panel ids repeat"
        for panel, target in targets(board):
            uid = target["datasource"]["uid"]
            assert uid in kinds, f"{title} / {panel['title']}: unknown data source {uid}"
            assert target["datasource"]["type"] == kinds[uid]
            assert panel["datasource"]["uid"] == uid
            if kinds[uid] == "prometheus":
                assert target["expr"].strip(), panel["title"]
            else:
                assert target["rawQuery"] and target["rawSql"].strip(), panel["title"]
                assert target["format"] in ("time_series", "table")
        for variable in board["templating"]["list"]:
            assert variable["datasource"]["uid"] in kinds


def test_operations_dashboard_has_a_tenant_variable_and_the_issue_panels(
    dashboards: dict[str, dict[str, Any]],
) -> None:
    board = dashboards["syncd operations"]
    (variable,) = board["templating"]["list"]
    assert (variable["name"], variable["multi"], variable["includeAll"]) == ("tenant", True, True)
    exprs = " ".join(target["expr"] for _, target in targets(board))
    for needed in (
        "syncd_sync_runs_total",
        "histogram_quantile",
        "syncd_consecutive_failures",
        "syncd_last_success_timestamp_seconds",
        "syncd_http_requests_total",
        "syncd_http_retries_total",
        "syncd_pairs_changed_total",
        "syncd_ready",
    ):
        assert needed in exprs, needed
    requests = next(p for p in panels(board) if p["title"] == "HTTP requests by code")
    highlighted = {o["matcher"]["options"] for o in requests["fieldConfig"]["overrides"]}
    assert "429" in highlighted and any(option.startswith("^5") for option in highlighted)
    per_tenant = [t["expr"] for _, t in targets(board) if "tenant" in t["expr"]]
    assert all("$tenant" in expr for expr in per_tenant)


def test_coverage_dashboard_shows_named_links_and_unprotected_jobs(
    dashboards: dict[str, dict[str, Any]],
) -> None:
    board = dashboards["Backup copy coverage"]
    queries = {panel["title"]: target["rawSql"] for panel, target in targets(board)}
    assert "FROM syncd.unprotected_jobs" in queries["Unprotected jobs"]
    assert "FROM syncd.job_links_named" in queries["Named links"]
    assert all("$tenant" in queries[title] for title in ("Unprotected jobs", "Named links"))


# --- PromQL: only names the daemon exports -------------------------------------------------

_PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (with Grafana variables) reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables ($tenant, $__rate_interval)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function
        if match[0].lower() not in _PROMQL_KEYWORDS:
            names.add(match[0])
    return names


def test_metric_names_are_found_in_promql() -> None:
    assert metric_names(
        'sum by (tenant, status) (increase(syncd_sync_runs_total{tenant=~"$tenant"}'
        "[$__rate_interval]))"
    ) == {"syncd_sync_runs_total"}
    assert metric_names(
        '(time() - a_seconds{x="y"}) / on (tenant) b_seconds > 3 * c or vector(0)'
    ) == {"a_seconds", "b_seconds", "c"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m])))") == {
        "h_bucket"
    }
    assert metric_names('count(up{job="syncd"} == 0) and bool x') == {"up", "x"}


def promql_expressions(board: dict[str, Any]) -> list[str]:
    """Every PromQL text of a dashboard: panel queries and label_values() variables."""
    exprs = [target["expr"] for _, target in targets(board) if "expr" in target]
    for variable in board["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        match = re.fullmatch(r"label_values\((.+),\s*\w+\)", text.strip())
        if variable["datasource"]["type"] == "prometheus":
            assert match, f"variable {variable['name']}: {text}"
            exprs.append(match[1])
    return exprs


async def test_promql_uses_only_metrics_the_daemon_exports(
    dashboards: dict[str, dict[str, Any]],
) -> None:
    async with scrape_app(exercised()) as text:
        exported = {
            sample.name
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
    assert "syncd_sync_duration_seconds_bucket" in exported
    exprs = [expr for board in dashboards.values() for expr in promql_expressions(board)]
    assert len(exprs) >= 15
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{expr!r} reads {sorted(unknown)}, which syncd does not export"


# --- SQL: every query runs as the reader role ----------------------------------------------


def fill_macros(sql: str, *, start: datetime, end: datetime, tenants: list[str]) -> str:
    """`sql` as Grafana's PostgreSQL data source sends it for a time range and `$tenant`."""
    time_from, time_to = (f"'{moment.isoformat()}'" for moment in (start, end))
    sql = re.sub(
        r"\$__timeFilter\(([^)]+)\)",
        lambda match: f"{match[1]} BETWEEN {time_from} AND {time_to}",
        sql,
    )
    sql = sql.replace("$__timeFrom()", time_from).replace("$__timeTo()", time_to)
    quoted = ",".join("'" + tenant.replace("'", "''") + "'" for tenant in tenants)
    sql = re.sub(r"\$\{tenant\}|\$tenant\b", quoted, sql)
    assert "$" not in sql, f"a macro or variable the test does not know: {sql}"
    return sql


@pytest.fixture
async def reader_role(db_url: str) -> AsyncIterator[str]:
    """A LOGIN role that `syncd grant-reader` will be given; dropped afterwards."""
    name = f"syncd_grafana_{os.getpid()}_{next(_roles)}"
    admin = await asyncpg.connect(db_url)
    try:
        await admin.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{READER_PASSWORD}'")
        yield name
    finally:
        await admin.execute(f"DROP OWNED BY {name}")
        await admin.execute(f"DROP ROLE {name}")
        await admin.close()


@pytest.fixture
async def synced(engine: AsyncEngine, sim_state: sim.SimulatorState, simulator: str) -> None:
    """Two tenants synced, one of them twice with churn in between."""
    first = tenant_for(sim_state.tenants["tenant-1"], simulator)
    second = tenant_for(sim_state.tenants["tenant-2"], simulator)
    assert (await sync_tenant(first, engine)).status == "succeeded"
    assert (await sync_tenant(second, engine)).status == "succeeded"
    sim_state.churn("tenant-1", 0.02)
    assert (await sync_tenant(first, engine)).status == "succeeded"


async def test_every_sql_query_runs_as_the_reader_role(
    dashboards: dict[str, dict[str, Any]],
    db_url: str,
    engine: AsyncEngine,
    synced: None,
    reader_role: str,
) -> None:
    await ops.grant_reader(engine, reader_role)
    board = dashboards["Backup copy coverage"]
    end = datetime.now(UTC) + timedelta(minutes=1)
    start = end - timedelta(days=30)
    reader = await asyncpg.connect(db_url, user=reader_role, password=READER_PASSWORD)
    try:
        (variable,) = board["templating"]["list"]
        tenants = [row[0] for row in await reader.fetch(variable["query"])]
        assert tenants == ["tenant-1", "tenant-2"]
        queries = [(panel, target) for panel, target in targets(board)]
        assert len(queries) >= 6
        for panel, target in queries:
            sql = fill_macros(target["rawSql"], start=start, end=end, tenants=tenants)
            rows = await reader.fetch(sql)
            assert rows, f"{panel['title']}: no rows from the demo data"
            if target["format"] == "time_series":
                assert next(iter(rows[0].keys())) == "time", panel["title"]
        links = next(t for p, t in queries if p["title"] == "Links per tenant over time")
        series = await reader.fetch(
            fill_macros(links["rawSql"], start=start, end=end, tenants=tenants)
        )
        last = {row["metric"]: row["links"] for row in series}
        assert last == {"tenant-1": 300, "tenant-2": 300}
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await reader.fetch("SELECT count(*) FROM syncd.runs")
    finally:
        await reader.close()


async def test_reader_role_script_makes_a_role_that_grafana_can_log_in_as(
    db_url: str, engine: AsyncEngine
) -> None:
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("no psql installed (the compose file runs the script in postgres:17)")
    role = f"syncd_grafana_{os.getpid()}_{next(_roles)}"
    password = 'it\'s a "password"'
    process = await asyncio.create_subprocess_exec(
        psql,
        db_url,
        "-X",
        "-v",
        "ON_ERROR_STOP=1",
        "-v",
        f"reader={role}",
        "-f",
        str(GRAFANA / "reader-role.sql"),
        env={"PATH": os.environ.get("PATH", ""), "SYNCD_READER_PASSWORD": password},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    admin = await asyncpg.connect(db_url)
    try:
        assert process.returncode == 0, (out + err).decode()
        # The password is set (the test server may trust any; production checks it).
        assert await admin.fetchval(
            "SELECT rolcanlogin AND rolpassword IS NOT NULL FROM pg_authid WHERE rolname = $1",
            role,
        )
        await ops.grant_reader(engine, role)
        reader = await asyncpg.connect(db_url, user=role, password=password)
        try:
            assert await reader.fetchval("SELECT count(*) FROM syncd.tenant_status") == 0
        finally:
            await reader.close()
    finally:
        await admin.execute(f"DROP OWNED BY {role}")
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()

"""A hostile or broken VSPC, and hostile files: bounds hold, secrets stay out, tenants stay apart.

Each test is one way a server or a file attacks syncd (the simulator's hostile fault kinds
play the server), and checks the promise that answers it: a bound that trips fails only
that tenant's run and names the config key that raises it; server text is stored and shown
cleaned, capped and scrubbed; one tenant's failure never stops another's run.
"""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import config, db, errors, logs, metrics, sync
from syncd import simulator as sim
from syncd.status import RunStatus
from syncd.sync import sync_tenant
from tests.fixtures.fault_helpers import (
    assert_history_sound,
    run_cli,
    run_row,
    summary_rows,
    tenant_block,
    toml_string,
    write_config,
)
from tests.fixtures.helpers import (
    current_pairs,
    expected_pairs,
    fetch_all,
    tenant_for,
)

TENANT = "tenant-1"
# One collection read: a fault at one request, or at one offset only the links reach, then
# fails the whole run, as these cases want (mixed outcomes are tests/test_catalog.py's).
LINKS_ONLY = {"collections": ["backup_copy_job_objects"]}


def _requests_of(state: sim.SimulatorState, tenant: str) -> int:
    """Requests of `tenant` per collection (each collection is asked for its own pages)."""
    paths = {record.path for record in state.request_log if record.tenant == tenant}
    assert paths == set(sim.COLLECTION_PATHS.values()), paths
    return sum(1 for record in state.request_log if record.tenant == tenant) // len(paths)


async def _stored_errors(engine: AsyncEngine) -> list[str]:
    rows = await fetch_all(engine, "SELECT error FROM syncd.sync_runs WHERE error IS NOT NULL")
    return [row[0] for row in rows]


# --- 1. a huge total, a one-item first page -----------------------------------------------


async def test_a_huge_total_fails_the_run_naming_max_total(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine
) -> None:
    sim_state.inject(sim.Fault("huge_total", tenant=TENANT, offset=0, total=10**12, times=None))
    result = await sync_tenant(tenant_for(sim_state.tenants[TENANT], simulator), sync_engine)
    assert result.status == RunStatus.FAILED
    assert result.error is not None and "max_total" in result.error, result.error
    # Nothing planned beyond the first page of each collection.
    assert _requests_of(sim_state, TENANT) == 1
    assert await run_row(sync_engine, result.run_id) == ("failed", result.error, True)


async def test_a_one_item_first_page_never_becomes_a_page_size_of_one(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine
) -> None:
    sim_state.inject(
        sim.Fault("short_page", tenant=TENANT, offset=0, times=None),
    )
    sim_state.inject(sim.Fault("huge_total", tenant=TENANT, offset=0, total=10**6, times=None))
    result = await sync_tenant(tenant_for(sim_state.tenants[TENANT], simulator), sync_engine)
    # Every collection with items fails; the empty one (no immediate pairs here) has no
    # page to shorten.
    failed = {name for name, outcome in result.collections.items() if outcome.status == "failed"}
    assert failed == set(sim.COLLECTIONS) - {"immediate_copy_job_objects"}
    assert result.status == RunStatus.PARTIAL
    assert result.error is not None and "set [sync] page_size = 2" in result.error, result.error
    assert _requests_of(sim_state, TENANT) == 1


# --- 2. bodies without a size limit, gzip bombs ---------------------------------------------


async def test_an_oversized_body_fails_the_run_naming_max_body_size(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine
) -> None:
    sim_state.inject(
        sim.Fault("oversized_body", tenant=TENANT, offset=49, size_bytes=3 * 1024**2, times=None)
    )
    tenant = tenant_for(sim_state.tenants[TENANT], simulator, max_body_size="1MiB", **LINKS_ONLY)
    result = await sync_tenant(tenant, sync_engine)
    assert result.status == RunStatus.FAILED, result
    assert result.error is not None and "max_body_size" in result.error
    assert "Content-Length" in result.error  # refused before reading it
    assert await current_pairs(sync_engine, TENANT) == set()
    await assert_history_sound(sync_engine)


async def test_a_gzip_bomb_stops_at_the_cap_in_bounded_memory(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine
) -> None:
    bomb_bytes = 96 * 1024**2
    sim_state.inject(
        sim.Fault("gzip_bomb", tenant=TENANT, offset=0, size_bytes=bomb_bytes, times=None)
    )
    tenant = tenant_for(sim_state.tenants[TENANT], simulator, max_body_size="1MiB")
    tracemalloc.start()
    try:
        result = await sync_tenant(tenant, sync_engine)
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.status == RunStatus.FAILED, result
    assert result.error is not None and "max_body_size" in result.error
    assert "decompressed" in result.error
    # The body inflates to 96 MiB; syncd (and the simulator in this process) held far less.
    assert peak_bytes < 24 * 1024**2, f"peak {peak_bytes / 1024**2:.1f} MiB"


# --- 3. secrets echoed in server error text -------------------------------------------------


async def test_an_echoed_api_key_never_reaches_the_database_or_the_result(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine
) -> None:
    sim_tenant = sim_state.tenants[TENANT]
    sim_state.inject(sim.Fault("echo_secret", tenant=TENANT, offset=0))
    result = await sync_tenant(tenant_for(sim_tenant, simulator, **LINKS_ONLY), sync_engine)
    assert result.status == RunStatus.FAILED
    assert result.error is not None and "[redacted]" in result.error
    assert sim_tenant.api_key not in result.error
    assert all(sim_tenant.api_key not in text for text in await _stored_errors(sync_engine))


async def test_echoed_oauth_tokens_and_passwords_are_scrubbed(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine
) -> None:
    sim_tenant = sim_state.tenants[TENANT]
    tenant = tenant_for(sim_tenant, simulator, password=True, **LINKS_ONLY)
    # The page request quotes the bearer token the password grant just issued.
    sim_state.inject(sim.Fault("echo_secret", tenant=TENANT, offset=0))
    scrubber = logs.SecretScrubber()
    echoed_token = await sync_tenant(tenant, sync_engine, scrubber=scrubber)
    assert echoed_token.status == RunStatus.FAILED
    assert echoed_token.error is not None and "[redacted]" in echoed_token.error
    assert "sim-at-" not in echoed_token.error
    # The token reached the process scrubber too (logs, /status), the moment it arrived.
    assert "sim-at-" not in scrubber.scrub(" ".join(sim_state.issued_tokens))
    # The token endpoint quotes the password it was sent.
    sim_state.inject(sim.Fault("echo_secret", offset=None))
    echoed_password = await sync_tenant(tenant, sync_engine)
    assert echoed_password.status == RunStatus.FAILED
    assert echoed_password.error is not None
    assert sim_tenant.password not in echoed_password.error
    assert "[redacted]" in echoed_password.error
    for text in await _stored_errors(sync_engine):
        assert sim_tenant.password not in text and "sim-at-" not in text and "sim-rt-" not in text


# --- 4. and 5. server text reaching terminals unescaped, uncapped ---------------------------

HOSTILE_MESSAGE = "[/] [bold red]x\x1b]0;pwned\x07\x1b[2J\x1b[31mred\u202e"


@pytest.mark.parametrize("shape", sim.ERROR_SHAPES)
async def test_a_5_mb_message_is_capped_everywhere(
    shape: str, sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine
) -> None:
    huge = "A" * (5 * 1024**2)
    offset = None if shape == "oauth" else 0
    sim_state.inject(sim.Fault("message", tenant=None, offset=offset, message=huge, shape=shape))
    tenant = tenant_for(
        sim_state.tenants[TENANT], simulator, password=shape == "oauth", **LINKS_ONLY
    )
    result = await sync_tenant(tenant, sync_engine)
    assert result.status == RunStatus.FAILED
    assert result.error is not None and "AAAA" in result.error
    assert len(result.error) <= errors.MESSAGE_MAX_CHARS
    assert all(len(text) <= errors.MESSAGE_MAX_CHARS for text in await _stored_errors(sync_engine))


async def test_control_characters_and_markup_from_the_server_are_data(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine
) -> None:
    sim_state.inject(sim.Fault("message", tenant=TENANT, offset=0, message=HOSTILE_MESSAGE))
    result = await sync_tenant(tenant_for(sim_state.tenants[TENANT], simulator), sync_engine)
    assert result.error is not None
    assert "[/] [bold red]x" in result.error  # kept as text
    assert not any(ord(char) < 32 or 0x7F <= ord(char) <= 0x9F for char in result.error)
    assert "\u202e" not in result.error


async def test_sync_and_check_print_hostile_text_literally(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, tmp_path: Path
) -> None:
    sim_state.inject(
        sim.Fault("message", tenant=TENANT, offset=0, message=HOSTILE_MESSAGE, times=None)
    )
    blocks = [
        tenant_block(sim_state.tenants[name], simulator) for name in sorted(sim_state.tenants)
    ]
    path = write_config(tmp_path, db_url, blocks)
    assert (await run_cli("--config", str(path), "migrate")).code == 0
    synced = await run_cli("--config", str(path), "sync")
    assert synced.code == 1, synced.output
    assert "MarkupError" not in synced.output and "Traceback" not in synced.output
    assert "\x1b" not in synced.stdout
    rows = summary_rows(synced.stdout)
    assert "failed" in rows[TENANT] and "[/]" in rows[TENANT], synced.stdout
    assert all("succeeded" in rows[name] for name in ("tenant-2", "tenant-3")), synced.stdout
    checked = await run_cli("--config", str(path), "check")
    assert checked.code == 1, checked.output
    assert "\x1b" not in checked.stdout and "Traceback" not in checked.output
    assert "[/] [bold red]x" in checked.stdout, checked.stdout


async def test_an_echoed_key_never_reaches_the_terminal(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, tmp_path: Path
) -> None:
    sim_tenant = sim_state.tenants[TENANT]
    sim_state.inject(sim.Fault("echo_secret", tenant=TENANT, offset=0, times=None))
    path = write_config(tmp_path, db_url, [tenant_block(sim_tenant, simulator)])
    assert (await run_cli("--config", str(path), "migrate")).code == 0
    synced = await run_cli("--config", str(path), "sync")
    checked = await run_cli("--config", str(path), "check")
    for result in (synced, checked):
        assert result.code == 1, result.output
        assert sim_tenant.api_key not in result.output
        assert "[redacted]" in result.stdout, result.stdout


# --- 6. one tenant never takes the others down ----------------------------------------------


class _ExplodingProgress:
    """A progress sink that fails for one tenant: an unexpected exception inside its run."""

    def __init__(self, victim: str) -> None:
        self.victim = victim

    def advance(self, tenant: str, pairs: int, total: int | None) -> None:
        if tenant == self.victim:
            raise RuntimeError("progress display broke")


async def test_an_unexpected_exception_fails_only_its_own_tenant(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine
) -> None:
    tenants = [tenant_for(sim_state.tenants[name], simulator) for name in sorted(sim_state.tenants)]
    results = await sync.sync_tenants(
        tenants,
        sync_engine,
        max_concurrent_tenants=2,
        progress=_ExplodingProgress(TENANT),
    )
    by_name = {result.tenant: result for result in results}
    crashed = by_name[TENANT]
    assert crashed.status == RunStatus.FAILED and crashed.run_id is not None
    assert crashed.error is not None and "internal error" in crashed.error
    assert "progress display broke" in crashed.error
    assert await run_row(sync_engine, crashed.run_id) == ("failed", crashed.error, True)
    for name in ("tenant-2", "tenant-3"):
        assert by_name[name].status == RunStatus.SUCCEEDED
        assert await current_pairs(sync_engine, name) == expected_pairs(sim_state.tenants[name])
    await assert_history_sound(sync_engine)


async def test_a_user_and_password_in_a_tenant_url_is_a_config_error(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, tmp_path: Path
) -> None:
    with_user = simulator.replace("http://", "http://admin:hunter2@")
    path = write_config(
        tmp_path, db_url, [tenant_block(sim_state.tenants[TENANT], with_user)], mode=0o600
    )
    result = await run_cli("--config", str(path), "sync")
    assert result.code == 2, result.output
    assert "tenants[0].url: must not hold a user name or password" in result.stderr
    assert "hunter2" not in result.output


async def test_one_hostile_tenant_among_healthy_ones_exits_1_after_syncing_the_rest(
    sim_state: sim.SimulatorState, simulator: str, db_url: str, tmp_path: Path
) -> None:
    sim_state.inject(sim.Fault("huge_total", tenant=TENANT, offset=0, total=10**13, times=None))
    blocks = [
        tenant_block(sim_state.tenants[name], simulator) for name in sorted(sim_state.tenants)
    ]
    path = write_config(tmp_path, db_url, blocks)
    assert (await run_cli("--config", str(path), "migrate")).code == 0
    result = await run_cli("--config", str(path), "sync")
    assert result.code == 1, result.output
    rows = summary_rows(result.stdout)
    assert "failed" in rows[TENANT] and "max_total" in rows[TENANT], result.stdout
    async with db.open_engine(db_url) as engine:
        for name in ("tenant-2", "tenant-3"):
            assert "succeeded" in rows[name], result.stdout
            assert await current_pairs(engine, name) == expected_pairs(sim_state.tenants[name])


# --- 7. draining the collection run by run --------------------------------------------------


async def test_halving_the_collection_every_run_is_stopped_by_the_baseline(
    sim_state: sim.SimulatorState, simulator: str, sync_engine: AsyncEngine
) -> None:
    sim_tenant = sim_state.tenants[TENANT]
    tenant = tenant_for(sim_tenant, simulator, mass_delete_floor=0, max_delete_fraction=0.5)
    assert (await sync_tenant(tenant, sync_engine)).status == RunStatus.SUCCEEDED
    stored = len(expected_pairs(sim_tenant))
    statuses = []
    for _ in range(5):
        sim_state.remove_pairs(TENANT, len(sim_tenant.items) // 2)
        result = await sync_tenant(tenant, sync_engine)
        statuses.append(result.status)
        # Never fewer than half of the most pairs confirmed this week.
        assert len(await current_pairs(sync_engine, TENANT)) >= stored // 2
    assert statuses[0] == RunStatus.SUCCEEDED  # 300 -> 150: half is allowed
    assert set(statuses[1:]) == {RunStatus.PARTIAL}, statuses
    assert "mass-delete guard" in (result.error or "")
    # The operator confirms: the removals go through and the baseline starts afresh.
    allowed = await sync_tenant(tenant, sync_engine, allow_mass_delete=True)
    assert allowed.status == RunStatus.SUCCEEDED
    assert await current_pairs(sync_engine, TENANT) == expected_pairs(sim_tenant)
    assert (await sync_tenant(tenant, sync_engine)).status == RunStatus.SUCCEEDED
    await assert_history_sound(sync_engine)


def test_the_guard_judges_against_the_baseline_not_the_last_run() -> None:
    settings = config.SyncSettings(mass_delete_floor=0, max_delete_fraction=0.5)

    def verdict(removals: int, present: int, baseline: int) -> str | None:
        return sync.mass_delete_verdict(
            removals=removals,
            present_before=present,
            baseline=baseline,
            snapshot_empty=False,
            settings=settings,
        )

    assert verdict(250, 500, baseline=500) is None  # half of what is there: allowed
    assert verdict(250, 500, baseline=1000) is not None  # leaves 250 of a week's 1000
    assert verdict(1, 500, baseline=1000) is not None  # a trickle below the line
    assert verdict(1, 501, baseline=1000) is None  # still at half of the baseline
    floor = config.SyncSettings(mass_delete_floor=10, max_delete_fraction=0.5)
    small = sync.mass_delete_verdict(
        removals=6, present_before=6, baseline=8, snapshot_empty=False, settings=floor
    )
    assert small is None  # small tenants: the whole drop is within the floor


# --- 8., 9. and 10. hostile and careless files ----------------------------------------------


def _tenant_toml(**fields: str) -> str:
    lines = ['[[tenants]]\nname = "a"\nurl = "https://vspc.example.com:1280"']
    lines += [f"{key} = {toml_string(value)}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def _config_problems(path: Path) -> list[str]:
    with pytest.raises(errors.ConfigError) as raised:
        config.load_config(path, environ={})
    return list(raised.value.problems)


def test_a_secret_file_must_be_a_small_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text(_tenant_toml(api_key_file="/dev/zero"))
    assert _config_problems(path) == [
        "tenants[0].api_key_file: secret file /dev/zero is not a regular file"
    ]
    fifo = tmp_path / "key.fifo"
    os.mkfifo(fifo)
    path.write_text(_tenant_toml(api_key_file=str(fifo)))
    assert "is not a regular file" in _config_problems(path)[0]  # and did not block
    big = tmp_path / "big.key"
    big.write_bytes(b"k" * (64 * 1024 + 1))
    path.write_text(_tenant_toml(api_key_file=str(big)))
    assert "larger than 64 KiB" in _config_problems(path)[0]
    fits = tmp_path / "fits.key"
    fits.write_bytes(b"k" * (64 * 1024 - 1) + b"\n")
    path.write_text(_tenant_toml(api_key_file=str(fits)))
    assert config.load_config(path, environ={}).tenants[0].secrets() == ("k" * 65535,)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://vspc.example.com:1280", "plain http:// to vspc.example.com"),
        ("http://10.0.0.5:1280", "plain http:// to 10.0.0.5"),
        ("http://127.0.0.1:1280", None),
        ("http://localhost:1280", None),
        ("http://[::1]:1280", None),
        ("https://vspc.example.com:1280", None),
    ],
)
def test_credentials_over_plain_http_to_another_host_are_warned_about(
    url: str, expected: str | None
) -> None:
    cfg = config.validate_config(
        {"tenants": [{"name": "a", "url": url, "api_key": "key-1234"}]}, environ={}
    )
    found = [warning.message for warning in config.config_warnings(cfg)]
    if expected is None:
        assert found == []
    else:
        assert len(found) == 1 and expected in found[0] and "API key" in found[0]


async def test_the_http_warning_is_logged_once_by_the_cli(db_url: str, tmp_path: Path) -> None:
    block = '[[tenants]]\nname = "far"\nurl = "http://vspc.example.com:1280"\napi_key = "k-123"\n'
    path = write_config(tmp_path, db_url, [block, block.replace('"far"', '"far-2"')])
    result = await run_cli("--config", str(path), "migrate")
    assert result.code == 0, result.output
    assert result.stderr.count("plain http://") == 2  # once per tenant


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("postgresql://syncd@db.example.com:fivefourthreetwo/syncd", "port a number from 1"),
        ("postgresql://syncd@db.example.com:99999/syncd", "port a number from 1 to 65535"),
        ("postgresql://syncd@db.example.com/syncd?sslmode=maybe", "sslmode 'maybe' is not one"),
        ("postgresql://syncd@db.example.com/syncd?sslcompression=1", "unknown query parameter"),
    ],
)
async def test_every_database_url_problem_is_a_config_error(
    url: str, problem: str, tmp_path: Path
) -> None:
    path = write_config(tmp_path, url, [])
    result = await run_cli("--config", str(path), "status")
    assert result.code == 2, result.output
    problems = [line.strip() for line in result.stderr.splitlines()[1:]]
    assert len(problems) == 1 and problems[0].startswith("database.url: "), result.stderr
    assert problem in problems[0]
    assert "Traceback" not in result.output


def test_a_password_in_the_database_url_query_is_a_secret(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text(
        '[database]\nurl = "postgresql://syncd@db.example.com/syncd?password=s3cret-pw"\n'
    )
    path.chmod(0o644)
    cfg = config.load_config(path, environ={})
    assert "s3cret-pw" in cfg.secrets()
    assert cfg.secret_files == (path,)
    assert [warning.path for warning in config.config_warnings(cfg)] == [path]
    url = cfg.database.url
    assert url is not None and "s3cret-pw" not in repr(cfg)
    assert url.get_secret_value().startswith("postgresql+asyncpg://")


def test_sslmode_reaches_asyncpg_as_ssl() -> None:
    normalized = config.normalize_database_url("postgresql://u@h:5432/db?sslmode=require")
    assert normalized == "postgresql+asyncpg://u@h:5432/db?ssl=require"


def test_metric_labels_are_scrubbed_of_known_secrets() -> None:
    scrubber = logs.SecretScrubber()
    scrubber.register(["key-0f-tenant"])
    registry = metrics.Metrics(scrub=scrubber.scrub)
    registry.request_done("acme key-0f-tenant", "200")
    registry.retry_scheduled("acme key-0f-tenant", "429")
    text = registry.render().decode()
    assert "key-0f-tenant" not in text and 'tenant="acme [redacted]"' in text

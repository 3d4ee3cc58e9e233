"""The scheduler's and the daemon's decisions, as pure functions (no loop, no I/O), and
what the scheduler takes in from the database (`refresh`).

The claims' decisions (due times, backoff, when to look again) are in test_claims.py.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import SecretStr

from syncd import claims, config, daemon, metrics, scheduler, status
from syncd.status import RunStatus
from syncd.sync import SyncResult


def _tenant(name: str, **settings: object) -> config.Tenant:
    return config.Tenant(
        name=name,
        url="https://vspc.example.com",
        auth=config.ApiKeyAuth(SecretStr(f"key-of-{name}")),
        verify_tls=True,
        ca_file=None,
        settings=config.SyncSettings.model_validate(settings),
    )


NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def test_stagger_spreads_first_runs_evenly_within_the_spread() -> None:
    offsets = scheduler.stagger_offsets_s(4, 10.0)
    assert offsets == [0.0, 2.5, 5.0, 7.5]
    assert scheduler.stagger_offsets_s(0, 10.0) == []
    assert scheduler.stagger_offsets_s(1, 10.0) == [0.0]


def test_jitter_and_misfire_grace_scale_with_the_period_within_bounds() -> None:
    assert scheduler.jitter_s(2.0) == pytest.approx(0.2)
    assert scheduler.jitter_s(86_400.0) == 60.0
    assert scheduler.misfire_grace_s(0.5) == 1.0
    assert scheduler.misfire_grace_s(120.0) == 60.0
    assert scheduler.misfire_grace_s(86_400.0) == 600.0


def test_plan_reload_sorts_tenants_into_added_removed_changed_unchanged() -> None:
    current = {name: _tenant(name) for name in ("a", "b", "c")}
    new = [_tenant("b"), _tenant("c", interval="5m"), _tenant("d")]
    plan = scheduler.plan_reload(current, new)
    assert plan == scheduler.ReloadPlan(
        added=("d",), removed=("a",), changed=("c",), unchanged=("b",)
    )


def test_plan_reload_sees_a_changed_secret() -> None:
    current = {"a": _tenant("a")}
    rotated = config.Tenant(
        **{**current["a"].__dict__, "auth": config.ApiKeyAuth(SecretStr("rotated"))}
    )
    assert scheduler.plan_reload(current, [rotated]).changed == ("a",)


def test_interval_trigger_period_and_jitter() -> None:
    trigger, period_s = scheduler.make_trigger(config.SyncSettings(interval="15m"), NOW)
    assert period_s == 900.0
    assert trigger.jitter == 60.0
    assert claims.schedule_text(config.SyncSettings(interval="15m")) == "every 900s"


def test_cron_trigger_period_is_the_gap_between_ticks() -> None:
    settings = config.SyncSettings(cron="*/15 * * * *")
    trigger, period_s = scheduler.make_trigger(settings, NOW)
    assert period_s == 900.0
    assert trigger.jitter == 60.0
    assert claims.schedule_text(settings) == "cron */15 * * * *"


@pytest.mark.parametrize(
    ("failures", "delay_s"), [(0, 15.0), (1, 0.5), (2, 1.0), (4, 4.0), (10, 30.0), (10**6, 30.0)]
)
def test_database_recheck_backs_off_to_a_cap(failures: int, delay_s: float) -> None:
    assert daemon.database_recheck_s(failures) == delay_s


def _config(**sections: object) -> config.Config:
    return config.validate_config(sections, environ={})


def test_restart_needed_names_settings_that_cannot_change_live() -> None:
    running = _config(database={"url": "postgresql://u@h/a"})
    new = _config(
        database={"url": "postgresql://u@h/b", "pool_size": 3, "max_concurrent_applies": 4},
        daemon={
            "listen": "127.0.0.1:1",
            "max_concurrent_tenants": 2,
            "shutdown_grace": "1s",
            "replica_name": "renamed",
        },
    )
    assert daemon.restart_needed(running, new, listen_overridden=False) == [
        "database.url",
        "database.max_concurrent_applies",
        "database.pool_size",
        "daemon.listen",
        "daemon.max_concurrent_tenants",
        "daemon.replica_name",
    ]
    assert "daemon.listen" not in daemon.restart_needed(running, new, listen_overridden=True)
    assert daemon.restart_needed(running, running, listen_overridden=False) == []


def test_refresh_takes_in_newer_runs_of_other_replicas_and_keeps_its_own_newer_ones() -> None:
    async def never(tenant: config.Tenant) -> SyncResult:
        raise AssertionError("refresh runs nothing")

    daemon_config = config.DaemonConfig(replica_name="me")
    registry = metrics.Metrics()
    tenant_scheduler = scheduler.TenantScheduler(
        sync=never,
        engine=None,  # type: ignore[arg-type]  # refresh never touches the database
        daemon=daemon_config,
        sync_metrics=registry,
        blocked=lambda: None,
        on_database_error=lambda: None,
    )
    tenant_scheduler.apply([_tenant("a")], daemon_config)
    stored = status.TenantStatus(
        "a",
        last_run_at=NOW,
        last_status=RunStatus.SUCCEEDED,
        last_success_at=NOW,
        pairs=5,
        last_run_id=7,
        last_replica="other",
        due_at=NOW + timedelta(minutes=15),
        consecutive_failures=0,
    )
    tenant_scheduler.refresh([stored])
    row = tenant_scheduler.status()[0]
    assert (row.last_run_id, row.last_replica, row.pairs) == (7, "other", 5)
    assert row.due_at == NOW + timedelta(minutes=15) and row.claimed_by is None
    assert registry.registry.get_sample_value("syncd_pairs_current", {"tenant": "a"}) == 5

    # An older run (this replica saw run 7 already) changes nothing but the due time.
    older = dataclasses.replace(
        stored, last_run_id=6, last_replica="stale", pairs=1, claimed_by="third"
    )
    tenant_scheduler.refresh([older])
    row = tenant_scheduler.status()[0]
    assert (row.last_run_id, row.last_replica, row.pairs, row.claimed_by) == (
        7,
        "other",
        5,
        "third",
    )

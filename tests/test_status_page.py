"""GET / of the daemon's endpoint, served for real, charts read from a real database.

The database holds runs of a real sync against the simulator. The page must answer 200
whatever the database does: charts when it can be read, the rows and the reason when not.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import db, history, page, web
from syncd import simulator as sim
from syncd.sync import sync_tenant
from tests.fixtures.helpers import tenant_for
from tests.test_page import HOSTILE
from tests.webapp import StaticView, Tree, served, strip_bars


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def rows(*names: str, **fields: Any) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    return [
        {
            "tenant": name,
            "schedule": "every 900s",
            "period_s": 900.0,
            "running": False,
            "queued": False,
            "waiting_for": None,
            "last_status": "succeeded",
            "last_error": None,
            "last_success_at": (now - timedelta(minutes=1)).isoformat(),
            "pairs": 300,
            "next_run_at": (now + timedelta(minutes=14)).isoformat(),
            "consecutive_failures": 0,
        }
        | fields
        for name in names
    ]


async def get_page(view: StaticView, **app: Any) -> tuple[int, dict[str, str], str]:
    async with served(view, **app) as (session, base_url), session.get(base_url + "/") as answer:
        return answer.status, dict(answer.headers), await answer.text()


async def test_page_draws_the_database_history_of_the_configured_tenants(
    engine: AsyncEngine, sim_state: sim.SimulatorState, simulator: str
) -> None:
    tenant = tenant_for(sim_state.tenants["tenant-1"], simulator)
    assert (await sync_tenant(tenant, engine)).status == "succeeded"
    sim_state.churn("tenant-1", 0.02)
    assert (await sync_tenant(tenant, engine)).status == "succeeded"

    view = StaticView(rows("tenant-1", HOSTILE))
    status, headers, text = await get_page(
        view, read_history=functools.partial(history.read_history, engine)
    )

    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src" not in policy
    assert headers["X-Content-Type-Options"] == "nosniff"
    tree = Tree(text)
    by_status = tree.root.find_all("svg", data_chart="runs-by-status")[0]
    assert sum("succeeded" in rect.text() for rect in by_status.find_all("rect")) >= 1
    pairs = tree.root.find_all("svg", data_chart="pairs-changed")[0]
    assert any("pairs added" in rect.text() for rect in pairs.find_all("rect"))
    synced = tree.root.find_all("tr", data_tenant="tenant-1")[0]
    strip = synced.find_all("svg", data_chart="recent-duration")[0]
    assert [css for _, _, css in strip_bars(strip)] == ["fill-succeeded"] * 2
    assert ": 2 succeeded; " in strip.find_all("title")[0].text()
    changes = synced.find_all("svg", data_chart="recent-pairs")[0].find_all("title")[0]
    assert changes.text() == "Pairs changed by the last 2 runs: +306 \u22126"
    hostile = tree.root.find_all("tr", data_tenant=HOSTILE)[0]
    assert "no runs yet" in hostile.text()
    assert "<script>" not in text


async def test_page_without_a_reachable_database_keeps_the_rows() -> None:
    url = f"postgresql://syncd@127.0.0.1:{closed_port()}/syncd"
    async with db.open_engine(url, pool_size=1, connect_timeout_s=1.0) as engine:
        read = functools.partial(history.read_history, engine)
        # The daemon has not noticed yet: the page tries, fails, and says why.
        status, _, text = await get_page(StaticView(rows("acme")), read_history=read)
        assert status == 200
        note = Tree(text).root.find_all(data_charts_unavailable="")[0].text()
        assert "cannot read the run history" in note
        assert Tree(text).root.find_all("tr", data_tenant="acme")

        # The daemon knows: the page does not even try, and shows the readiness reason.
        down = {"database": "cannot reach the database: refused", "schema": None}
        status, _, text = await get_page(
            StaticView(rows("acme"), checks=down | {"scheduler": None}), read_history=read
        )
        tree = Tree(text)
        assert status == 200
        assert tree.root.with_class("ready")[0].text() == "Not ready"
        unavailable = tree.root.find_all(data_charts_unavailable="")[0].text()
        assert unavailable == "Charts unavailable: cannot reach the database: refused"
        assert tree.root.find_all("tr", data_tenant="acme")


async def test_a_slow_history_read_does_not_hold_the_page(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(web, "PAGE_HISTORY_TIMEOUT_S", 0.05)

    async def never(names: Sequence[str], *, recent_of: Sequence[str]) -> history.History:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    status, _, text = await get_page(StaticView(rows("acme")), read_history=never)
    assert status == 200
    assert "took longer than 0.05s" in text


async def test_page_scrubs_known_secrets() -> None:
    view = StaticView(rows("acme", last_status="failed", last_error="key s3cr3t-key refused"))
    status, _, text = await get_page(
        view, scrub=lambda value: value.replace("s3cr3t-key", "[REDACTED]")
    )
    assert status == 200 and "s3cr3t-key" not in text and "[REDACTED]" in text


async def test_the_last_runs_are_read_for_the_detailed_tenants_alone() -> None:
    asked: list[tuple[list[str], list[str]]] = []

    async def recording(names: Sequence[str], *, recent_of: Sequence[str]) -> history.History:
        asked.append((list(names), list(recent_of)))
        return history.History(hours=history.fill_hours([], datetime.now(UTC)), recent={})

    names = [f"tenant-{index:03d}" for index in range(page.DETAILED_TENANTS + 10)]
    view = StaticView(rows(*names) + rows("failing", last_status="failed"))
    status, _, text = await get_page(view, read_history=recording)
    assert status == 200
    # Every tenant's 24 hours; the last runs of the failing one and the first others.
    assert asked == [([*names, "failing"], ["failing", *names[: page.DETAILED_TENANTS - 1]])]
    assert len(Tree(text).root.with_class("tenant")) == page.DETAILED_TENANTS
    assert len(Tree(text).root.with_class("other")) == 11

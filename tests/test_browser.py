"""The status page in a real browser: headless Chromium on a live `syncd run`.

The daemon syncs three tenants from the simulator: one healthy, one whose name is made of
HTML metacharacters, one whose API key is refused. The database also holds the day of runs
before this daemon started (as a deployment would), so the 24-hour charts have something to
draw. The test reads what a person would see (rows, words, colours, chart bars, the hostile
name as text) and saves a screenshot: into `$SYNCD_TEST_ARTIFACTS` when set (CI keeps that
directory; `SYNCD_TEST_ARTIFACTS=docs` refreshes the README's picture), else the test's
temporary directory.

Needs the Debian package `chromium` (Playwright drives it; its own browser download is not
used). Without it the test is skipped, saying so; CI installs it first (see .ci/run).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import simulator as sim
from syncd import store
from tests.fixtures.daemons import running_daemon
from tests.fixtures.fault_helpers import wait_for
from tests.fixtures.helpers import FAST_SETTINGS

pytestmark = pytest.mark.slow

HOSTILE = "<script>alert(1)</script> & co"
FAILING = "globex"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The page's colours (page.COLOURS) as the browser computes them.
GREEN, RED, BLUE = "rgb(46, 125, 50)", "rgb(198, 40, 40)", "rgb(21, 101, 192)"
DARK_GREEN = "rgb(27, 94, 32)"  # text in green


def chromium() -> str:
    """The installed Chromium, or skip (with the reason) where there is none."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("CI must run the browser test: .ci/run installs Chromium first")
        pytest.skip("no Chromium installed (Debian package `chromium`); CI installs it")
    return path


def write_config(
    path: Path, database_url: str, tenants: Sequence[tuple[str, str, str, str]]
) -> None:
    """A config with (name, url, api key, interval) tenants."""
    settings = dict(FAST_SETTINGS)
    lines = ["[database]", f"url = {json.dumps(database_url)}", "", "[sync]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    lines += ["", "[daemon]", 'listen = "127.0.0.1:0"', 'startup_spread = "100ms"']
    for name, url, api_key, interval in tenants:
        lines += ["", "[[tenants]]", f"name = {json.dumps(name)}", f"url = {json.dumps(url)}"]
        lines += [f"api_key = {json.dumps(api_key)}", f"interval = {json.dumps(interval)}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    path.chmod(0o600)


async def seed_past_day(engine: AsyncEngine, names: Sequence[str]) -> None:
    """A day of 15-minute runs before the daemon started; `FAILING` has failed for 4 hours."""
    rnd = random.Random(7)
    now = datetime.now(UTC)
    runs: list[dict[str, Any]] = []
    async with engine.begin() as connection:
        for name in names:
            tenant_id = await connection.scalar(
                sa.text("INSERT INTO syncd.tenants (name) VALUES (:name) RETURNING id"),
                {"name": name},
            )
            for step in range(96, 0, -1):
                started = now - timedelta(minutes=15 * step, seconds=rnd.uniform(0, 60))
                failing = name == FAILING and step <= 16
                duration_s = rnd.uniform(0.2, 0.6) if failing else rnd.uniform(0.8, 3.5)
                runs.append(
                    {
                        "tenant_id": tenant_id,
                        "started_at": started,
                        "finished_at": started + timedelta(seconds=duration_s),
                        "status": "failed" if failing else "succeeded",
                        "added": 0 if failing else rnd.choice([0, 0, 1, 2, 5]),
                        "removed": 0 if failing else rnd.choice([0, 0, 0, 1, 3]),
                        "error": "the API key was refused (HTTP 401)" if failing else None,
                    }
                )
        await connection.execute(
            sa.text(
                "INSERT INTO syncd.runs (tenant_id, started_at, finished_at, status, "
                "pairs_added, pairs_removed, error) VALUES (:tenant_id, :started_at, "
                ":finished_at, :status, :added, :removed, :error)"
            ),
            runs,
        )
        # Written past `store`, as an import would: the hourly rollup is recomputed.
        await store.rebuild_run_hours(connection)


# One synchronous look at the page: a meta refresh cannot reload it halfway through.
READ_PAGE = r"""() => {
  const style = (el, prop) => el ? getComputedStyle(el)[prop] : null;
  const text = el => el ? el.textContent : null;
  // A strip draws its bars as one path per colour: (x, colour) of each box, left to right.
  const bars = svg => !svg ? [] : [...svg.querySelectorAll('path')]
    .flatMap(path => [...path.getAttribute('d').matchAll(/M([\d.]+) /g)]
      .map(m => ({x: +m[1], fill: style(path, 'fill')})))
    .sort((a, b) => a.x - b.x);
  const rows = [...document.querySelectorAll('tr.tenant')].map(tr => {
    const badge = tr.querySelector('.badge');
    const age = tr.querySelector('td.age');
    const error = tr.querySelector('td.error');
    return {
      name: tr.querySelector('td.name').innerText,
      state: badge.dataset.state,
      badge: badge.innerText,
      badgeColour: style(badge, 'backgroundColor'),
      age: age.innerText,
      ageColour: style(age, 'color'),
      error: error ? error.innerText : null,
      errorTitle: error ? error.title : null,
      durationBars: bars(tr.querySelector('svg[data-chart="recent-duration"]')),
      durationTitle: text(tr.querySelector('svg[data-chart="recent-duration"] title')),
      pairsTitle: text(tr.querySelector('svg[data-chart="recent-pairs"] title')),
    };
  });
  const chart = id => [...document.querySelectorAll(`svg[data-chart="${id}"] rect`)]
    .map(rect => ({fill: style(rect, 'fill'), tip: rect.textContent,
                   height: rect.getBoundingClientRect().height}));
  const ready = document.querySelector('.ready');
  return {
    title: document.title,
    ready: ready.innerText,
    readyColour: style(ready, 'backgroundColor'),
    checks: [...document.querySelectorAll('.check')].map(el => el.innerText),
    scripts: document.querySelectorAll('script').length,
    rows,
    runsByStatus: chart('runs-by-status'),
    pairsChanged: chart('pairs-changed'),
    duration: chart('run-duration'),
  };
}"""


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    """Where the screenshot goes: `$SYNCD_TEST_ARTIFACTS`, else the test's directory."""
    directory = Path(os.environ.get("SYNCD_TEST_ARTIFACTS") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory


async def test_status_page_in_a_browser(
    tmp_path: Path,
    artifacts: Path,
    db_url: str,
    engine: AsyncEngine,
    sim_state: sim.SimulatorState,
    simulator: str,
) -> None:
    executable = chromium()
    async_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")

    # The failing tenant runs once (its next run is an hour away), so it is seen failed,
    # not running again; 3 periods of it are 3 hours, and its last success is 4 hours old.
    tenants = [
        ("tenant-1", simulator, sim_state.tenants["tenant-1"].api_key, "3s"),
        (HOSTILE, simulator, sim_state.tenants["tenant-2"].api_key, "3s"),
        (FAILING, simulator, "not-a-key-vspc-knows", "1h"),
    ]
    await seed_past_day(engine, [tenant[0] for tenant in tenants])
    config_path = tmp_path / "syncd.toml"
    write_config(config_path, db_url, tenants)

    async with running_daemon(config_path) as daemon:
        await daemon.wait_runs("tenant-1", 1)
        sim_state.churn("tenant-1", 0.05)
        await daemon.wait_runs("tenant-1", 2, timeout_s=10.0)
        await daemon.wait_runs(HOSTILE, 1)
        await daemon.wait_runs(FAILING, 1, status="failed")

        async with async_api.async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=executable, args=CHROMIUM_ARGS
            )
            try:
                page = await browser.new_page(viewport={"width": 1280, "height": 700})
                requests: list[str] = []
                dialogs: list[str] = []
                page.on("request", lambda request: requests.append(request.url))
                page.on("dialog", lambda dialog: dialogs.append(dialog.message))
                response = await page.goto(daemon.base_url + "/", wait_until="load")
                assert response is not None and response.status == 200
                seen = await page.evaluate(READ_PAGE)
                document = await page.content()
                await page.screenshot(path=str(artifacts / "status-page.png"), full_page=True)

                # It refreshes itself: a second load of / within a few refresh periods.
                async def reloaded() -> bool:
                    return requests.count(daemon.base_url + "/") >= 2

                await wait_for(reloaded, timeout_s=15.0, what="the page to reload itself")
            finally:
                await browser.close()

    assert seen["title"] == "syncd: ready"
    assert (seen["ready"], seen["readyColour"]) == ("Ready", GREEN)
    assert seen["checks"] == ["database: ok", "schema: ok", "scheduler: ok"]

    rows = {row["name"]: row for row in seen["rows"]}
    assert set(rows) == {"tenant-1", HOSTILE, FAILING}
    # The hostile name is text: no script element, no alert, and it reads as written.
    assert seen["scripts"] == 0 and dialogs == []
    assert rows[HOSTILE]["state"] in ("succeeded", "running", "queued")

    failing = rows[FAILING]
    assert failing["state"] == "failed" and failing["badgeColour"] == RED
    assert failing["ageColour"] == RED
    assert failing["age"].startswith("4h")
    assert "401" in failing["errorTitle"] and failing["error"]
    assert all(bar["fill"] == RED for bar in failing["durationBars"][-3:])

    healthy = rows["tenant-1"]
    assert healthy["ageColour"] == DARK_GREEN and healthy["error"] is None
    assert healthy["badgeColour"] in (GREEN, BLUE)  # succeeded, or running again
    assert len(healthy["durationBars"]) == 20  # the last 20 runs, seeded and live
    assert healthy["durationTitle"].startswith("Last 20 runs, ")
    # The first sync's 300 pairs and the churn's 15 are among the last 20 runs' changes.
    added = re.search(r": \+(\d+) ", healthy["pairsTitle"])
    assert added is not None and int(added[1]) >= 315, healthy["pairsTitle"]

    fills = {bar["fill"] for bar in seen["runsByStatus"]}
    assert {GREEN, RED} <= fills
    assert any(bar["height"] > 0 and "failed" in bar["tip"] for bar in seen["runsByStatus"])
    assert any("pairs removed" in bar["tip"] for bar in seen["pairsChanged"])
    assert any("longest" in bar["tip"] for bar in seen["duration"])

    assert not any(api_key in document for _, _, api_key, _ in tenants)
    # Nothing but the daemon was asked for anything (the favicon request is the browser's).
    assert requests and all(url.startswith(daemon.base_url + "/") for url in requests)
    assert (artifacts / "status-page.png").stat().st_size > 10_000

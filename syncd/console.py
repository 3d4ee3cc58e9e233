"""Terminal output shared by the commands: the console, progress bars and result tables.

Every string that comes from a server, a tenant's configuration or the database is shown
as literal text (a `rich.text.Text` or escaped markup), never interpreted as markup: an
error message `[/]` prints as itself instead of crashing the command.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from sqlalchemy.ext.asyncio import AsyncEngine

from syncd import claims, config, errors, logs, sync
from syncd.status import RunStatus

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


def make_console() -> Console:
    """Console for tables: piped output (CI logs, `| less`) gets 160 columns, not rich's 80."""
    console = Console()
    return console if console.is_terminal else Console(width=160)


def literal(text: str | None) -> Text:
    """`text` as a table cell shown exactly as it is (control characters stripped)."""
    return Text(errors.clean_text(text or "", limit=len(text or "") + 1))


class RichProgress:
    """Per-tenant progress bars (pairs received of the snapshot's total)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._tasks: dict[str, TaskID] = {}

    def advance(self, tenant: str, pairs: int, total: int | None) -> None:
        task = self._tasks.get(tenant)
        if task is None:
            task = self._tasks[tenant] = self._progress.add_task(escape(tenant), total=total)
        self._progress.update(task, advance=pairs, total=total)


def summary_table(results: Sequence[sync.SyncResult]) -> Table:
    """The table `syncd sync` (and the demo) prints at the end."""
    table = Table(title="syncd sync")
    for column in ("tenant", "status", "pairs", "added", "removed", "pages", "seconds", "error"):
        table.add_column(column, overflow="fold")
    for result in results:
        status = Text(str(result.status))
        if not result.ok:
            status.stylize("red")
        table.add_row(
            literal(result.tenant),
            status,
            "" if result.current_pairs is None else str(result.current_pairs),
            str(result.added),
            str(result.removed),
            str(result.pages_fetched),
            f"{result.duration_s:.2f}",
            literal(result.error),
        )
    return table


def sync_exit_code(results: Sequence[sync.SyncResult]) -> int:
    """0 when every tenant succeeded or was skipped as busy, else 1."""
    return errors.EXIT_OK if all(result.ok for result in results) else errors.EXIT_FAILED


async def sync_with_progress(
    console: Console,
    tenants: Sequence[config.Tenant],
    engine: AsyncEngine,
    *,
    max_concurrent_tenants: int,
    max_concurrent_applies: int,
    allow_mass_delete: bool = False,
    scrubber: logs.SecretScrubber | None = None,
    replica: claims.Replica | None = None,
) -> list[sync.SyncResult]:
    """`sync.sync_tenants` with progress bars on a terminal, plain log lines otherwise."""

    async def sync_all(progress: sync.ProgressSink | None) -> list[sync.SyncResult]:
        return await sync.sync_tenants(
            tenants,
            engine,
            max_concurrent_tenants=max_concurrent_tenants,
            max_concurrent_applies=max_concurrent_applies,
            allow_mass_delete=allow_mass_delete,
            progress=progress,
            scrubber=scrubber,
            replica=replica,
        )

    if not console.is_terminal:
        return await sync_all(None)
    # Only a terminal shows progress bars: a cron job's output does not pay for them.
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        return await sync_all(RichProgress(bar))


def status_style(status: RunStatus | str | None) -> str:
    """The colour a run status is shown in."""
    return "red" if status in (RunStatus.FAILED, RunStatus.PARTIAL) else ""

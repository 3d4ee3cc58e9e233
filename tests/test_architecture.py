"""syncd's modules import downward: no import circle, and nothing imports the CLI.

Read from the source with `ast` (every import, at module level or inside a function), so a
circle cannot hide behind a function-level import. Imports under `if TYPE_CHECKING:` are
left out: they name types for mypy and never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "syncd"

# What each command must not import (start-up time): `--version` and `--help` import only
# the CLI; `sync`, `check`, `status` never the daemon's stack, Alembic or the simulator.
NOT_FOR_THE_CLI = ("asyncio", "aiohttp", "sqlalchemy", "pydantic", "structlog", "rich", "syncd.ops")
NOT_FOR_ONE_SHOT_COMMANDS = (
    "alembic",
    "apscheduler",
    "prometheus_client",
    "aiohttp.web",
    "rich.progress",
    "platformdirs",
    "syncd.daemon",
    "syncd.scheduler",
    "syncd.web",
    "syncd.metrics",
    "syncd.simulator",
    "syncd.demo",
    # The ORM's table classes: Alembic's environment reads them, the commands need only the
    # names in syncd.schema.
    "syncd.models",
)


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for block in ast.walk(tree):
            if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING"):
                block.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                for alias in node.names:
                    candidate = f"{base}.{alias.name}"
                    found.add(candidate if candidate in modules else base)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {target for target in found if target in modules and target != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_module_imports_the_cli() -> None:
    importers = sorted(name for name, targets in _imports().items() if "syncd.cli" in targets)
    assert importers == [], f"the CLI is imported by {importers}: commands import downward"


def test_no_import_circle_among_syncd_modules() -> None:
    graph = _imports()
    # syncd/__init__.py is imported by everything (for __version__) and imports nothing.
    assert graph["syncd"] == set()
    assert _cycle({name: targets - {"syncd"} for name, targets in graph.items()}) is None


def test_the_checker_finds_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def _imported_by(*modules: str, among: tuple[str, ...]) -> list[str]:
    """Which of `among` a fresh interpreter holds after importing `modules`."""
    code = (
        f"import sys, {', '.join(modules)}\n"
        f"print(' '.join(m for m in {among!r} if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return result.stdout.split()


def test_the_cli_alone_imports_no_command_stack() -> None:
    assert _imported_by("syncd.cli", among=NOT_FOR_THE_CLI) == []


def test_one_shot_commands_import_only_what_they_run() -> None:
    # What `syncd sync` (and check, status, grant-reader) loads: the CLI, logging and the
    # config, then syncd.ops; the schema check compares with db.HEAD_REVISION instead of
    # reading Alembic's scripts.
    loaded = _imported_by(
        "syncd.cli", "syncd.logs", "syncd.config", "syncd.ops", among=NOT_FOR_ONE_SHOT_COMMANDS
    )
    assert loaded == [], f"imported by syncd.ops: {loaded}; import them where they are used"

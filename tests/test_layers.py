"""
Imports flow one way (docs/architecture.md, "Where each part lives"): a module
imports only from its own layer or the layers below it, and importing a module
starts nothing.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import polystream

PACKAGE = Path(polystream.__file__).parent

LAYERS: list[tuple[str, ...]] = [
    ("errors", "config", "timing", "logs", "numbers", "stats", "memory"),  # base
    ("feed.protocol", "book", "catalog"),  # model
    ("feed", "store", "venue", "cluster", "cache"),  # I/O (cluster: leases; cache: Redis)
    ("pipeline", "monitor"),  # from events to rows and decisions
    ("app", "ops"),  # wiring, and what operators meet: health, metrics, status, systemd
    ("cli", "demo", "replay", "record", "__main__"),  # entry points
]


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> int:
    """The layer of ``polystream.<module>``: the longest matching prefix wins."""
    best, depth = -1, -1
    for index, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > depth:
                best, depth = index, len(name)
    assert best >= 0, f"polystream.{module} is in no layer"
    return best


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "polystream":
                found += [alias.name for alias in node.names]
            elif node.module.startswith("polystream."):
                found.append(node.module.removeprefix("polystream."))
        elif isinstance(node, ast.Import):
            found += [
                a.name.removeprefix("polystream.")
                for a in node.names
                if a.name.startswith("polystream.")
            ]
    return found


def test_imports_flow_one_way() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module(path)
        if not me:
            continue
        for other in _imports(path):
            if layer(other) > layer(me):
                upward.append(
                    f"polystream.{me} (layer {layer(me)}) imports polystream.{other} (layer {layer(other)})"
                )
    assert upward == []


def test_importing_starts_nothing() -> None:
    """Every module imports cleanly, with no thread or task started and no socket opened."""
    import threading

    before = threading.active_count()
    for info in pkgutil.walk_packages(polystream.__path__, "polystream."):
        if info.name != "polystream.__main__":  # runs the CLI by design
            importlib.import_module(info.name)
    assert threading.active_count() == before


def test_the_daemon_loads_the_optional_clients_only_when_configured() -> None:
    """
    The signing library (about 30 MiB) and the Redis client (about 10 MiB)
    are imported only in ``execute.mode = "clob"`` / with ``cache.redis_url``:
    a daemon without them keeps its memory (bench.scale's RSS goal).
    """
    import subprocess
    import sys

    code = (
        "import sys, polystream.app, polystream.cli, polystream.ops.metrics;"
        "print(sorted(m for m in ('redis', 'py_clob_client_v2', 'eth_account') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

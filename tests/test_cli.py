"""
The command line as a user meets it: real subprocesses for start-up errors,
and ``status`` against a real running daemon's health endpoint.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import trio

from polystream.app import App, run
from polystream.config import Config, FeedConfig, HealthConfig
from polystream.ops.status import (
    EXIT_DOWN,
    EXIT_HEALTHY,
    EXIT_UNHEALTHY,
    fetch_health,
    render_health,
)

ROOT = Path(__file__).parent.parent


def _polystream(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("POLYSTREAM_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "polystream", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=60,
        check=False,
    )


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_bad_config_value_names_the_key() -> None:
    result = _polystream("run", env={"POLYSTREAM_FEED__PING_INTERVAL": "soon"})
    assert result.returncode == 2
    assert "feed.ping_interval" in result.stderr
    assert "seconds > 0" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_config_file_value_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[positions]\nmark = "last"\n')
    result = _polystream("run", "--config", str(config))
    assert result.returncode == 2
    assert "positions.mark" in result.stderr and '"display"' in result.stderr


def test_unreachable_database_is_one_clear_line_without_password() -> None:
    dsn = f"postgresql://trader:hunter2@127.0.0.1:{_closed_port()}/trading"
    result = _polystream("run", env={"POLYSTREAM_DATABASE__DSN": dsn})
    assert result.returncode == 1
    assert "cannot connect" in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_repo_config_file_is_valid() -> None:
    result = _polystream(
        "status",
        "--config",
        str(ROOT / "config.toml"),
        "--url",
        f"http://127.0.0.1:{_closed_port()}/health",
    )
    assert result.returncode == EXIT_DOWN
    assert "not running" in result.stdout


def test_status_json_when_down() -> None:
    result = _polystream(
        "status", "--json", env={"POLYSTREAM_HEALTH__LISTEN": f"127.0.0.1:{_closed_port()}"}
    )
    assert result.returncode == EXIT_DOWN
    assert orjson.loads(result.stdout)["reachable"] is False


async def test_status_healthy_then_unhealthy(db_dsn: str) -> None:
    """Zero positions: healthy with no shards. A position on an unreachable feed: unhealthy."""
    config = Config(
        feed=FeedConfig(
            url=f"ws://127.0.0.1:{_closed_port()}/ws/market",
            backoff_initial=0.05,
            backoff_max=0.1,
            reconcile_interval=0.2,
        ),
        health=HealthConfig(listen="127.0.0.1:0"),
    )
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            app: App = await nursery.start(run, config, db_dsn)
            url = app.health_urls[0] + "/health"
            code, doc, _ = await trio.to_thread.run_sync(fetch_health, url)
            assert (code, doc is not None) == (EXIT_HEALTHY, True)
            assert doc is not None and doc["shards"] == [] and doc["subscribed_assets"] == 0
            assert "no shards" in render_health(doc)

            with psycopg.connect(db_dsn) as conn:
                conn.execute(
                    "INSERT INTO positions (user_id, market_id, token_id, size,"
                    " entry_price) VALUES ('u', 'm', '123', 10, 0.5)"
                )
            doc2: dict[str, Any] | None = None
            while doc2 is None or not doc2["shards"]:
                await trio.sleep(0.05)
                code, doc2, _ = await trio.to_thread.run_sync(fetch_health, url)
            assert code == EXIT_UNHEALTHY
            assert doc2["status"] == "unhealthy"
            assert any("shard 0" in p for p in doc2["problems"])

            result = await trio.to_thread.run_sync(lambda: _polystream("status", "--url", url))
            assert result.returncode == EXIT_UNHEALTHY
            assert "UNHEALTHY" in result.stdout and "shard" in result.stdout
            metrics = await trio.to_thread.run_sync(
                lambda: httpx.get(app.health_urls[0] + "/metrics").text
            )
            assert "polystream_subscribed_assets" in metrics
            app.stop()


def test_service_install_as_the_readme_says(tmp_path: Path) -> None:
    units, etc = tmp_path / "units", tmp_path / "etc"
    result = _polystream(
        "service", "install", "--user", "--unit-dir", str(units), "--config-dir", str(etc)
    )
    assert result.returncode == 0, result.stderr
    unit = (units / "polystream.service").read_text()
    assert "Type=notify" in unit and "User=" not in unit
    assert "systemctl --user enable --now polystream" in result.stdout
    system = _polystream(
        "service",
        "install",
        "--user-name",
        "trader",
        "--unit-dir",
        str(tmp_path / "sys"),
        "--config-dir",
        str(tmp_path / "sysetc"),
    )
    assert system.returncode == 0, system.stderr
    assert "User=trader" in (tmp_path / "sys" / "polystream.service").read_text()


def test_status_when_down_shows_what_the_database_knows(db_dsn: str) -> None:
    with psycopg.connect(db_dsn) as conn:
        conn.execute(
            "INSERT INTO markets (id, condition_id, clob_token_ids, source, updated_at)"
            " VALUES ('1', '0x1', '[\"a\"]', 'ws', now()), ('2', '0x2', '[\"b\"]', 'poll', now())"
        )
    result = _polystream(
        "status",
        "--url",
        f"http://127.0.0.1:{_closed_port()}/health",
        env={"POLYSTREAM_DATABASE__DSN": db_dsn},
    )
    assert result.returncode == EXIT_DOWN
    assert "not running" in result.stdout
    assert "what the database knows" in result.stdout
    assert "markets ws" in result.stdout and "markets poll" in result.stdout

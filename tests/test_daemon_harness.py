"""
``polystream.ops.daemon``: the environment a ``polystream run`` child gets, and
one real child started, read, measured and stopped.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import trio
from expected import UPDOWN

from polystream.errors import PolystreamError
from polystream.ops.daemon import daemon_env, free_port, open_daemon, setting_variables
from polystream.replay import ReplayServer, serve_replay


def test_setting_variables_names_and_texts() -> None:
    assert setting_variables(
        {"feed__ping_interval": 1.0, "poll__attempts": 1, "resync__enabled": False}
    ) == {
        "POLYSTREAM_FEED__PING_INTERVAL": "1.0",
        "POLYSTREAM_POLL__ATTEMPTS": "1",
        "POLYSTREAM_RESYNC__ENABLED": "false",
    }


def test_daemon_env_drops_the_parents_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYSTREAM_LOG__LEVEL", "debug")
    monkeypatch.setenv("POLYSTREAM_CONFIG", "/elsewhere.toml")
    monkeypatch.setenv("UNRELATED", "kept")
    env = daemon_env("dbname=x", "ws://127.0.0.1:1/ws/market", 9, feed__ping_interval=1.0)
    assert env["UNRELATED"] == "kept"
    assert {k: v for k, v in env.items() if k.startswith("POLYSTREAM_")} == {
        "POLYSTREAM_LOG__FORMAT": "json",
        "POLYSTREAM_DATABASE__DSN": "dbname=x",
        "POLYSTREAM_FEED__URL": "ws://127.0.0.1:1/ws/market",
        "POLYSTREAM_HEALTH__LISTEN": "127.0.0.1:9",
        "POLYSTREAM_FEED__PING_INTERVAL": "1.0",
    }


def test_daemon_env_inherit_keeps_them_under_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYSTREAM_LOG__LEVEL", "debug")
    monkeypatch.setenv("POLYSTREAM_FEED__URL", "wss://venue/ws/market")
    env = daemon_env("dbname=x", "ws://127.0.0.1:1/ws/market", 9, inherit=True)
    assert env["POLYSTREAM_LOG__LEVEL"] == "debug"
    assert env["POLYSTREAM_FEED__URL"] == "ws://127.0.0.1:1/ws/market"


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


async def test_a_child_runs_answers_and_stops_cleanly(db_dsn: str, tmp_path: Path) -> None:
    log_path = tmp_path / "daemon.log"
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            server: ReplayServer = await nursery.start(
                lambda task_status: serve_replay(
                    [Path(f"{UPDOWN}.jsonl.gz")], speed=1.0, task_status=task_status
                )
            )
            async with open_daemon(db_dsn, server.url, log_path) as daemon:
                first = await daemon.wait_ready()
                assert first["status"] in ("ok", "unhealthy")
                assert (await daemon.health())["frames"] >= 0
                assert daemon.cpu_seconds() > 0
                assert daemon.peak_rss_kib() > 10_000
                assert await daemon.stop() == 0
                assert await daemon.stop() == 0  # again: the same code at once
                with pytest.raises(PolystreamError, match="daemon exited 0"):
                    await daemon.health()
            nursery.cancel_scope.cancel()
    assert b"daemon_stopped" in log_path.read_bytes()


async def test_a_child_that_exits_fails_the_wait(tmp_path: Path) -> None:
    log_path = tmp_path / "daemon.log"
    with trio.fail_after(60):
        async with open_daemon(
            "postgresql://nobody@127.0.0.1:1/none",
            "ws://127.0.0.1:1/ws/market",
            log_path,
            settings={"log__level": "nonsense"},  # a configuration error: exit 2
        ) as daemon:
            with pytest.raises(PolystreamError, match="daemon exited 2"):
                await daemon.wait_ready()

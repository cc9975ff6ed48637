"""
What an operator meets, as a real subprocess against a real PostgreSQL
(issue "The operator's experience"): a second daemon on a taken health port,
and the cause of a feed failure in the logs, ``/health`` and ``status``.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import psycopg
import pytest
from cli_process import clean_env, free_port, run_polystream

from polystream.config import TransportKind
from polystream.errors import TransportError
from polystream.feed.transport import TRANSPORTS, open_transport
from polystream.store.markets import import_markets_file

ROOT = Path(__file__).parent.parent
UPDOWN = ROOT / "examples" / "updown-2025-12-11"


@pytest.fixture
def daemon_env(db_dsn: str) -> dict[str, str]:
    with psycopg.connect(db_dsn) as conn:
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
        conn.execute(
            "INSERT INTO positions (user_id, market_id, outcome, size, entry_price)"
            " VALUES ('ops', '900003', 'Up', 10, 0.5)"
        )
    return clean_env(
        POLYSTREAM_DATABASE__DSN=db_dsn,
        POLYSTREAM_HEALTH__LISTEN=f"127.0.0.1:{free_port()}",
        POLYSTREAM_POLL__ENABLED="false",
    )


@pytest.fixture
def running(daemon_env: dict[str, str]) -> Iterator[subprocess.Popen[str]]:
    """A daemon whose feed URL points at a closed port: it runs, but cannot connect."""
    env = daemon_env | {"POLYSTREAM_FEED__URL": f"ws://127.0.0.1:{free_port()}/ws/market"}
    process = subprocess.Popen(
        [sys.executable, "-m", "polystream", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://{env['POLYSTREAM_HEALTH__LISTEN']}/health"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code in (200, 503):
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    yield process
    process.send_signal(signal.SIGTERM)
    process.wait(30)


def test_taken_health_port_is_one_line_and_nothing_is_written(
    daemon_env: dict[str, str], db_dsn: str
) -> None:
    """Another process (a second ``polystream run``, say) holds ``health.listen``."""
    host, port = daemon_env["POLYSTREAM_HEALTH__LISTEN"].split(":")
    with socket.socket() as holder:
        holder.bind((host, int(port)))
        holder.listen()
        env = daemon_env | {"POLYSTREAM_FEED__URL": "ws://127.0.0.1:9/ws/market"}
        result = run_polystream("run", env=env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "health.listen" in lines[0] and "already in use" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    with psycopg.connect(db_dsn) as conn:  # no reconcile ran: the token is still not filled in
        assert conn.execute("SELECT token_id, current_price FROM positions").fetchall() == [
            (None, None)
        ]


def test_feed_failure_names_its_cause_and_the_next_retry(
    running: subprocess.Popen[str], daemon_env: dict[str, str]
) -> None:
    url = f"http://{daemon_env['POLYSTREAM_HEALTH__LISTEN']}/health"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        document = orjson.loads(httpx.get(url, timeout=2).content)
        shards = document["shards"]
        if shards and shards[0]["last_error"]:
            break
        time.sleep(0.1)
    shard = shards[0]
    assert shard["last_error"].startswith("connection refused by 127.0.0.1:")
    assert "connection refused" in "; ".join(document["problems"])
    status = run_polystream("status", "--url", url, env=clean_env())
    assert status.returncode == 1
    assert "connection refused by 127.0.0.1:" in status.stdout
    assert "next retry in" in status.stdout or shard["state"] == "connecting"
    running.send_signal(signal.SIGTERM)
    output, _ = running.communicate(timeout=30)
    lines = [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]
    reasons = [line["reason"] for line in lines if line["event"] == "feed_disconnected"]
    assert reasons and all(r.startswith("connection refused by") for r in reasons)


@pytest.mark.parametrize("kind", TRANSPORTS)
async def test_unknown_host_and_refused_port_are_named(kind: TransportKind) -> None:
    try:
        socket.getaddrinfo("no-such-host.invalid", 443)
    except socket.gaierror:
        pass
    else:
        pytest.skip("this machine resolves *.invalid")
    with pytest.raises(TransportError) as unknown:
        async with open_transport(
            kind, "wss://no-such-host.invalid/ws/market", max_message_size=2**20
        ):
            pass
    assert unknown.value.reason.startswith("host not found: no-such-host.invalid")
    port = free_port()
    with pytest.raises(TransportError) as refused:
        async with open_transport(kind, f"ws://127.0.0.1:{port}/ws/market", max_message_size=2**20):
            pass
    assert refused.value.reason == f"connection refused by 127.0.0.1:{port}"

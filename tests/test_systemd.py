"""systemd notifications: the sd_notify datagram protocol and the watchdog task."""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import psycopg
import pytest
import structlog
import trio
import trio.testing

from polystream.app import App, run
from polystream.config import Config, FeedConfig, HealthConfig
from polystream.ops.systemd import Notifier, notify_running, run_watchdog, stats_status, status_line
from polystream.stats import Stats


class Receiver:
    """A bound AF_UNIX datagram socket read by a thread, timestamping each message."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []
        self.queue: queue.Queue[tuple[float, str]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            item = (time.monotonic(), data.decode())
            self.messages.append(item)
            self.queue.put(item)

    def get(self, timeout: float = 5.0) -> str:
        """The next message (blocking; raises queue.Empty after ``timeout``)."""
        return self.queue.get(timeout=timeout)[1]

    async def aget(self, timeout: float = 5.0) -> str:
        return await trio.to_thread.run_sync(self.get, timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    path = str(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    receiver = Receiver(path)
    yield receiver
    receiver.close()


class Recorder(Notifier):
    """A notifier that records (trio time, assignments) instead of sending."""

    sent: list[tuple[float, tuple[str, ...]]]

    def send(self, *assignments: str) -> bool:
        self.sent.append((trio.current_time(), assignments))
        return True


def recorder(watchdog_interval: float | None) -> Recorder:
    notifier = Recorder("/unused", watchdog_interval)
    notifier.sent = []
    return notifier


def kinds(message: str) -> list[str]:
    return [line.split("=", 1)[0] for line in message.splitlines()]


# --- environment -------------------------------------------------------------


def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier.from_environ()
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert not notifier.ready("up")
    assert not notifier.watchdog()
    assert not notifier.stopping()


async def test_run_watchdog_returns_without_socket() -> None:
    with trio.fail_after(1):
        await run_watchdog(Notifier(), lambda: True, lambda: "x")


def test_environment_parsing() -> None:
    env = {"NOTIFY_SOCKET": "@sd", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "42"}
    notifier = Notifier.from_environ(env, pid=42)
    assert notifier.address == "\0sd"
    assert notifier.watchdog_interval == 15.0
    assert Notifier.from_environ(env, pid=43).watchdog_interval is None  # another process's
    del env["WATCHDOG_PID"]
    assert Notifier.from_environ(env, pid=1).watchdog_interval == 15.0
    assert Notifier.from_environ({**env, "WATCHDOG_USEC": "junk"}).watchdog_interval is None
    assert Notifier.from_environ({"WATCHDOG_USEC": "1000"}).watchdog_interval is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": "/run/x"}).address == "/run/x"


def test_unset_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_environ(unset_environment=True)
    assert notifier.address == "/run/systemd/notify"
    assert notifier.watchdog_interval == 1.0
    assert "NOTIFY_SOCKET" not in os.environ
    assert "WATCHDOG_USEC" not in os.environ
    assert "WATCHDOG_PID" not in os.environ


def test_unsupported_address_is_ignored() -> None:
    with structlog.testing.capture_logs() as logs:
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert logs[0]["event"] == "systemd_notify_socket_unsupported"


def test_send_failure_does_not_raise(tmp_path: Path) -> None:
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with structlog.testing.capture_logs() as logs:
        assert not notifier.ready()
        assert not notifier.watchdog()
    notifier.close()
    assert [entry["event"] for entry in logs] == ["systemd_notify_failed"]  # once per reason
    assert logs[0]["reason"] == "ENOENT"


# --- real datagrams ------------------------------------------------------------


def test_status_is_one_line(receiver: Receiver) -> None:
    notifier = Notifier.from_environ()
    assert notifier.status("two\nlines  here")
    assert receiver.get() == "STATUS=two lines here"
    notifier.close()


def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"polystream-test-{uuid.uuid4().hex}"
    receiver = Receiver("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        notifier = Notifier.from_environ()
        assert notifier.ready("up")
        assert receiver.get() == "READY=1\nSTATUS=up"
        notifier.close()
    finally:
        receiver.close()


async def test_messages_arrive_in_order(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 0.05 s
    notifier = Notifier.from_environ()
    assert notifier.watchdog_interval == 0.05
    with trio.fail_after(10):
        notifier.ready("starting")
        notifier.status("12 assets")
        async with trio.open_nursery() as nursery:
            await nursery.start(run_watchdog, notifier, lambda: True, lambda: "fine")
            got = [await receiver.aget() for _ in range(5)]
            nursery.cancel_scope.cancel()
        notifier.stopping()
        got.append(await receiver.aget())
    notifier.close()
    assert got[0] == "READY=1\nSTATUS=starting"
    assert got[1] == "STATUS=12 assets"
    assert got[2:5] == ["WATCHDOG=1\nSTATUS=fine"] * 3
    assert got[5] == "STOPPING=1\nSTATUS=stopping"


async def test_watchdog_stops_while_the_loop_is_blocked(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # ping every 0.05 s
    notifier = Notifier.from_environ()
    block = 0.6
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_watchdog, notifier, lambda: True, lambda: "fine")
            for _ in range(3):
                assert kinds(await receiver.aget())[0] == "WATCHDOG"
            blocked_at = time.monotonic()
            time.sleep(block)  # a wedged loop: a blocking call that never yields to trio
            unblocked_at = time.monotonic()
            while True:  # pings resume once the loop runs again
                await receiver.aget()
                if receiver.messages[-1][0] > unblocked_at:
                    break
            nursery.cancel_scope.cancel()
    notifier.close()
    # A ping sent just before the block may be read a moment after it began.
    during = [
        at
        for at, message in receiver.messages
        if blocked_at + 0.1 < at < unblocked_at and message.startswith("WATCHDOG")
    ]
    assert during == []
    before = [at for at, _ in receiver.messages if at <= blocked_at]
    assert len(before) >= 3


# --- interval logic (MockClock) ---------------------------------------------------


async def test_watchdog_interval_and_health(autojump_clock: trio.testing.MockClock) -> None:
    notifier = recorder(watchdog_interval=15.0)
    health = {"ok": True}
    async with trio.open_nursery() as nursery:
        await nursery.start(
            run_watchdog, notifier, lambda: health["ok"], lambda: "ok" if health["ok"] else "bad"
        )
        await trio.sleep(40)  # pings at 0, 15, 30
        health["ok"] = False
        await trio.sleep(40)  # status only at 45, 60, 75
        health["ok"] = True
        await trio.sleep(20)  # pings again at 90
        nursery.cancel_scope.cancel()
    assert notifier.sent == [
        (0.0, ("WATCHDOG=1", "STATUS=ok")),
        (15.0, ("WATCHDOG=1", "STATUS=ok")),
        (30.0, ("WATCHDOG=1", "STATUS=ok")),
        (45.0, ("STATUS=bad",)),
        (60.0, ("STATUS=bad",)),
        (75.0, ("STATUS=bad",)),
        (90.0, ("WATCHDOG=1", "STATUS=ok")),
    ]


async def test_watchdog_grace(autojump_clock: trio.testing.MockClock) -> None:
    notifier = recorder(watchdog_interval=10.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(
            partial(run_watchdog, grace=25.0), notifier, lambda: trio.current_time() < 5, str
        )
        await trio.sleep(55)
        nursery.cancel_scope.cancel()
    # unhealthy from t=10 (first check after t=5): pings until 10 + 25 = 35
    assert [(at, parts[0]) for at, parts in notifier.sent] == [
        (0.0, "WATCHDOG=1"),
        (10.0, "WATCHDOG=1"),
        (20.0, "WATCHDOG=1"),
        (30.0, "WATCHDOG=1"),
        (40.0, "STATUS="),
        (50.0, "STATUS="),
    ]


async def test_status_only_without_watchdog(autojump_clock: trio.testing.MockClock) -> None:
    notifier = recorder(watchdog_interval=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(run_watchdog, notifier, lambda: True, lambda: "s")
        await trio.sleep(25)
        nursery.cancel_scope.cancel()
    assert notifier.sent == [(0.0, ("STATUS=s",)), (10.0, ("STATUS=s",)), (20.0, ("STATUS=s",))]


# --- status text ----------------------------------------------------------------------


def test_status_line() -> None:
    assert (
        status_line(assets=12, shards=1, frames=14_200, last_write_age=0.31)
        == "12 assets on 1 shard, 14k frames, last write 0.3s ago"
    )
    assert (
        status_line(
            assets=1,
            shards=2,
            frames=3_400_000,
            last_write_age=None,
            problems=["database not connected"],
        )
        == "1 asset on 2 shards, 3.4M frames, no write yet; unhealthy: database not connected"
    )
    assert "last write 45s ago" in status_line(assets=0, shards=0, frames=5, last_write_age=45)
    assert "last write 3min ago" in status_line(assets=0, shards=0, frames=5, last_write_age=200)


def test_stats_status() -> None:
    stats = Stats()
    shard = stats.shard(0)
    shard.assets = 12
    shard.state = "connected"
    stats.db_connected = True
    stats.frames = 14_000
    stats.last_write_at = time.monotonic()
    text = stats_status(stats)
    assert text.startswith("12 assets on 1 shard, 14k frames, last write ")
    assert "unhealthy" not in text
    stats.db_connected = False
    assert stats_status(stats).endswith("; unhealthy: database not connected")


# --- with the daemon ---------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_notify_running_with_the_daemon(
    db_dsn: str, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """READY once app.run has started; pings while healthy; none once a shard cannot connect."""
    monkeypatch.setenv("WATCHDOG_USEC", "100000")
    notifier = Notifier.from_environ()
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
            await nursery.start(
                partial(notify_running, grace=0.0), notifier, app.stats, app.stopping
            )
            ready = await receiver.aget()
            assert ready.startswith("READY=1\nSTATUS=0 assets on 0 shards, 0 frames, ")
            assert (await receiver.aget()).startswith("WATCHDOG=1\nSTATUS=0 assets")
            with psycopg.connect(db_dsn) as conn:
                conn.execute(
                    "INSERT INTO positions (user_id, market_id, token_id, size,"
                    " entry_price) VALUES ('u', 'm', '123', 10, 0.5)"
                )
            while not (message := await receiver.aget()).startswith("STATUS="):
                assert message.startswith("WATCHDOG=1")
            assert "unhealthy: " in message and "shard 0" in message
            notifier.stopping()
            app.stop()
            while (message := await receiver.aget()) != "STOPPING=1\nSTATUS=stopping":
                assert message.startswith("STATUS="), message  # no WATCHDOG while unhealthy
            nursery.cancel_scope.cancel()  # the CLI cancels it when run() returns
    notifier.close()

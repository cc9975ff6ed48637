"""
Redis cache invalidation (``[cache]``, polystream.cache) against a real
``redis-server`` started by the test on a free loopback port, with a
password: the daemon's real ``run`` on the replay server and a real
PostgreSQL invalidates the configured keys after each committed flush, keeps
writing prices while Redis is stopped, says so in ``/health``, ``status``
and ``/metrics``, and sends every key still pending once Redis is back.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import psycopg
import pytest
import redis
import trio
import trio.testing
from expected import (
    UPDOWN,
    expected_assets,
    insert_position,
    mismatches,
    replay_config,
    serve_updown,
)

from polystream.app import App, run
from polystream.cache import KEYS_PER_COMMAND, CacheInvalidator, RedisSender, invalidator_of
from polystream.catalog import Catalog
from polystream.config import CacheConfig, Config
from polystream.errors import CacheError
from polystream.ops.status import render_health
from polystream.replay import ReplayServer
from polystream.stats import Stats
from polystream.store.markets import import_markets_file

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (Debian package redis-server)",
)

PASSWORD = "s3cret-redis-pw"


class RedisServer:
    """A private ``redis-server`` on a free loopback port, keeping nothing on disk."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL the daemon is given (with the password)."""
        return f"redis://:{PASSWORD}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A client of this server."""
        return redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD)

    def start(self) -> None:
        """Start it and wait until it answers PING (at most 10 s)."""
        self.process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--requirepass", PASSWORD),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop it (its keys are gone with it)."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _updown_keys(dsn: str) -> tuple[list[str], list[str]]:
    """The market keys and price keys of the demo capture's markets (default templates)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id, clob_token_ids FROM markets ORDER BY id").fetchall()
    return [f"market:{m}" for m, _ in rows], [f"price:{t}" for _, tokens in rows for t in tokens]


def _hold_positions(dsn: str) -> list[str]:
    """Import the demo capture's markets and hold one position of a user per market."""
    users = []
    with psycopg.connect(dsn) as conn:
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
        markets = [m for (m,) in conn.execute("SELECT id FROM markets ORDER BY id")]
        for index, market in enumerate(markets):
            users.append(f"user-{index}")
            insert_position(conn, market, "Up", "10", "0.5", user=users[-1])
    return users


def _watched_keys(dsn: str) -> tuple[list[str], list[str]]:
    """Hold a position per market; every key the default templates give, and the market keys."""
    users = _hold_positions(dsn)
    market_keys, price_keys = _updown_keys(dsn)
    return market_keys + price_keys + [f"positions:{u}" for u in users], market_keys


def _config(port: int, redis_url: str, **cache: Any) -> Config:
    config: Config = replay_config(port, cache=CacheConfig(redis_url=redis_url, **cache))
    return attrs.evolve(config, feed=attrs.evolve(config.feed, reconcile_interval=30.0))


async def _replayed(nursery: trio.Nursery, redis_server: RedisServer, dsn: str) -> App:
    """The daemon (cache on ``redis_server``) once it wrote the whole demo capture exactly."""
    server: ReplayServer = await serve_updown(nursery)
    app: App = await nursery.start(run, _config(server.port, redis_server.url), dsn)
    await server.finished.wait()
    expected = expected_assets(UPDOWN)
    while await trio.to_thread.run_sync(mismatches, dsn, expected):
        await trio.sleep(0.05)
    return app


async def _exists(server: RedisServer, keys: list[str]) -> int:
    return await trio.to_thread.run_sync(lambda: server.client().exists(*keys))


async def test_each_committed_flush_invalidates_its_keys(
    db_dsn: str, redis_server: RedisServer
) -> None:
    watched, market_keys = _watched_keys(db_dsn)
    cache = redis_server.client()
    cache.mset(dict.fromkeys([*watched, "market:not-ours", "other"], "cached"))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            app = await _replayed(nursery, redis_server, db_dsn)
            while await _exists(redis_server, watched):
                await trio.sleep(0.05)
            stats = app.stats.cache
            assert stats is not None and stats.up is True and stats.errors == 0
            # Each round trip carries what several flushes wrote, each key once.
            assert app.markets.batches.count >= 1 and stats.batches >= 1
            assert stats.keys >= len(watched)
            # A key written again after its invalidation is invalidated by the next flush.
            cache.set(market_keys[0], "stale")
            seen = app.markets.batches.count
            app.markets.touch(market_keys[0].removeprefix("market:"))
            await app.markets.batches.after(seen)
            while await _exists(redis_server, market_keys[:1]):
                await trio.sleep(0.05)
            app.stop()
            nursery.cancel_scope.cancel()  # the replay server
    assert cache.get("market:not-ours") == b"cached" and cache.get("other") == b"cached"


async def test_the_feed_keeps_writing_while_redis_is_stopped(
    db_dsn: str, redis_server: RedisServer
) -> None:
    watched, _ = _watched_keys(db_dsn)
    redis_server.stop()
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            app = await _replayed(nursery, redis_server, db_dsn)  # although Redis is down
            stats = app.stats.cache
            assert stats is not None
            while stats.pending < len(watched):
                await trio.sleep(0.05)
            assert stats.up is False and stats.errors >= 1 and stats.keys == 0
            async with httpx.AsyncClient() as client:
                health = (await client.get(f"{app.health_urls[0]}/health")).json()
                metrics = (await client.get(f"{app.health_urls[0]}/metrics")).text
            assert health["status"] == "ok"  # Redis is not the daemon's health
            assert health["cache"]["up"] is False and health["cache"]["pending"] >= len(watched)
            shown = render_health(health)
            assert "cache invalidation: Redis DOWN" in shown
            assert "polystream_cache_up 0.0" in metrics
            assert "polystream_cache_errors_total" in metrics
            for text in (orjson.dumps(health).decode(), shown, metrics):
                assert PASSWORD not in text
            # Redis comes back: every key still pending is invalidated.
            await trio.to_thread.run_sync(redis_server.start)
            cache = redis_server.client()
            cache.mset(dict.fromkeys([*watched, "other"], "cached"))
            while await _exists(redis_server, watched):
                await trio.sleep(0.05)
            assert stats.up is True and stats.pending == 0 and stats.keys >= len(watched)
            app.stop()
            nursery.cancel_scope.cancel()  # the replay server
    assert cache.get("other") == b"cached"


def _invalidator(server: RedisServer, catalog: Catalog, **config: Any) -> CacheInvalidator:
    stats = Stats()
    invalidator = invalidator_of(CacheConfig(redis_url=server.url, **config), catalog, stats)
    assert invalidator is not None and stats.cache is invalidator.stats
    return invalidator


async def test_keys_of_many_flushes_go_in_one_pipelined_round_trip(
    redis_server: RedisServer,
) -> None:
    catalog = Catalog()
    catalog.add_market("m1", ("t1", "t2"))
    sent: list[list[str]] = []
    invalidator = _invalidator(redis_server, catalog, price_keys=("price:{id}:{token_id}",))
    send = invalidator.send

    def counted(keys: Sequence[str]) -> None:
        sent.append(list(keys))
        send(keys)

    invalidator.send = counted
    redis_server.client().mset(dict.fromkeys(["market:m1", "price:m1:t1", "price:m1:t2"], "x"))
    for _ in range(100):  # a busy market: one key per round trip, not per flush
        invalidator.markets_written(("m1",))
    invalidator.positions_priced(("alice", "bob"))
    assert await invalidator.flush()
    assert sent == [["market:m1", "price:m1:t1", "price:m1:t2", "positions:alice", "positions:bob"]]
    assert redis_server.client().exists("market:m1", "price:m1:t1", "price:m1:t2") == 0
    assert invalidator.stats.keys == 5 and invalidator.stats.batches == 1
    assert await invalidator.flush() and len(sent) == 1  # nothing pending: no round trip


async def test_publish_mode_tells_the_keys_on_the_channel(redis_server: RedisServer) -> None:
    invalidator = _invalidator(redis_server, Catalog(), mode="publish", channel="inval")
    listener = redis_server.client().pubsub()
    listener.subscribe("inval")
    assert listener.get_message(timeout=5)["type"] == "subscribe"
    users = tuple(f"u{i}" for i in range(KEYS_PER_COMMAND + 5))
    invalidator.positions_priced(users)
    assert await invalidator.flush()
    told: list[str] = []
    while len(told) < len(users):
        message = await trio.to_thread.run_sync(lambda: listener.get_message(timeout=5))
        assert message is not None
        told += orjson.loads(message["data"])["keys"]
    assert told == [f"positions:{u}" for u in users]  # two messages, each key once
    listener.close()


async def test_redis_down_keeps_the_keys_and_retries_with_backoff(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stats = Stats()
    calls: list[list[str]] = []
    answers = [CacheError("Connection refused"), CacheError("Timeout"), None]

    in_flight = threading.Event()

    def send(keys: Sequence[str]) -> None:
        calls.append(list(keys))
        in_flight.wait(10)  # the first round trip is out until the test lets it fail
        answer = answers.pop(0)
        if answer is not None:
            raise answer

    invalidator = invalidator_of(CacheConfig(redis_url="redis://h:1"), Catalog(), stats)
    assert invalidator is not None
    invalidator.send = send
    async with trio.open_nursery() as nursery:
        await nursery.start(invalidator.run)
        invalidator.changed(["a"])
        while not calls:
            await trio.sleep(0.01)
        invalidator.changed(["b", "a"])  # while "a" is out: "b" waits, "a" is not twice
        in_flight.set()
        while invalidator.stats.up is not True:
            assert invalidator.stats.pending in (1, 2)  # never dropped while Redis fails
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert calls == [["a"], ["a", "b"], ["a", "b"]]
    assert invalidator.stats.errors == 2 and invalidator.stats.pending == 0
    assert invalidator.stats.last_error == "Timeout"


def test_a_sender_without_redis_raises_a_redis_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed: nothing listens there
    sender = RedisSender(url=f"redis://127.0.0.1:{port}/0", mode="delete", channel="c", timeout=0.5)
    with pytest.raises(CacheError, match=r"127\.0\.0\.1"):
        sender.send(["k"])
    sender.close()

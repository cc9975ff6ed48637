"""
The feed against a real loopback WebSocket server that records what the
client sends: subscribe messages, sharding, dynamic changes, PING,
reconnect, large frames, bad frames and foreign assets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import attrs
import orjson
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from polystream.config import FeedConfig
from polystream.feed.pool import FeedPool, FrameEvents
from polystream.feed.protocol import BookSnapshot, FeedEvent, LastTradePrice
from polystream.feed.transport import TRANSPORTS
from polystream.stats import Stats

ASSETS = [f"{n:077d}" for n in range(1, 8)]


@attrs.define
class Peer:
    """One accepted connection: every text message received, in order."""

    number: int
    received: list[str] = attrs.field(factory=list)
    outbox: trio.MemorySendChannel[str] | None = None
    closed: trio.Event = attrs.field(factory=trio.Event)

    def subscribed(self) -> set[str]:
        assets: set[str] = set()
        for text in self.received:
            if text == "PING":
                continue
            message = orjson.loads(text)
            if message.get("type") == "market" or message.get("operation") == "subscribe":
                assets |= set(message["assets_ids"])
            elif message.get("operation") == "unsubscribe":
                assets -= set(message["assets_ids"])
        return assets


@attrs.define
class RecordingServer:
    """A market-channel peer for tests: records, answers PING, sends on demand."""

    port: int = 0
    peers: list[Peer] = attrs.field(factory=list)
    changed: trio.Event = attrs.field(factory=trio.Event)
    answer_pings: bool = True
    transport: str = "sansio"  # the client side's feed.transport, for _pool
    refuse: int = 0  # close this many connections right after their subscribe, unanswered

    async def handler(self, request: WebSocketRequest) -> None:
        ws = await request.accept()
        send, receive = trio.open_memory_channel[str](100)
        peer = Peer(len(self.peers), outbox=send)
        self.peers.append(peer)
        try:
            async with trio.open_nursery() as nursery:

                async def pump() -> None:
                    async for text in receive:
                        await ws.send_message(text)
                    await ws.aclose()  # outbox closed by the test: drop the connection
                    nursery.cancel_scope.cancel()

                nursery.start_soon(pump)
                while True:
                    message = await ws.get_message()
                    assert isinstance(message, str)
                    peer.received.append(message)
                    if self.refuse > 0 and len(peer.received) == 1:
                        self.refuse -= 1
                        await ws.aclose(1011, "subscribe refused")
                    if message == "PING" and self.answer_pings:
                        await ws.send_message("PONG")
                    self._notify()
        except* ConnectionClosed:
            pass
        finally:
            peer.closed.set()
            self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, predicate: Any) -> None:
        while not predicate():
            await self.changed.wait()

    def live(self) -> list[Peer]:
        return [p for p in self.peers if not p.closed.is_set()]

    async def drop_all(self) -> None:
        for peer in self.live():
            assert peer.outbox is not None
            await peer.outbox.aclose()


@pytest.fixture(params=TRANSPORTS)
async def server(
    nursery: trio.Nursery, request: pytest.FixtureRequest
) -> AsyncIterator[RecordingServer]:
    """A recording peer; every feed test runs once per client transport."""
    recorder = RecordingServer(transport=request.param)

    async def handler(request: WebSocketRequest) -> None:
        await recorder.handler(request)

    listener = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    recorder.port = listener.port
    yield recorder


def _pool(
    server: RecordingServer, **overrides: Any
) -> tuple[FeedPool, trio.MemoryReceiveChannel[list[FeedEvent]], Stats]:
    settings: dict[str, Any] = {
        "url": f"ws://127.0.0.1:{server.port}/ws/market",
        "transport": server.transport,
        "max_assets_per_connection": 3,
        "backoff_initial": 0.01,
        "backoff_max": 0.05,
        "connect_stagger": 0.0,
        "ping_interval": 0.05,
    }
    settings.update(overrides)
    send, receive = trio.open_memory_channel[list[FeedEvent]](100)
    stats = Stats()
    return FeedPool(FeedConfig(**settings), send, stats), receive, stats


async def test_shards_subscribe_and_follow_changes(
    server: RecordingServer, nursery: trio.Nursery
) -> None:
    pool, _, stats = _pool(server)
    await nursery.start(pool.run)
    with trio.fail_after(10):
        pool.set_assets(set(ASSETS[:5]))  # 3 + 2 over two connections
        await server.wait_for(
            lambda: len(server.live()) == 2 and all(p.received for p in server.live())
        )
        first = [orjson.loads(p.received[0]) for p in server.peers]
        assert all(m["type"] == "market" for m in first)
        assert sorted(a for m in first for a in m["assets_ids"]) == ASSETS[:5]
        assert sorted(len(m["assets_ids"]) for m in first) == [2, 3]

        # Remove two of shard 0, add one: dynamic operations on the open sockets.
        shard0 = next(
            p for p in server.peers if len(orjson.loads(p.received[0])["assets_ids"]) == 3
        )
        kept = sorted(shard0.subscribed())[:1]
        desired = set(kept) | set(ASSETS[3:5]) | {ASSETS[5]}
        pool.set_assets(desired)
        await server.wait_for(
            lambda: set().union(*(p.subscribed() for p in server.live())) == desired
        )
        texts = [t for p in server.peers for t in p.received[1:] if t != "PING"]
        assert all("type" not in orjson.loads(t) for t in texts)  # never a second `type`
        assert len(server.live()) == 2

        # Emptying a shard closes its connection.
        pool.set_assets(set(ASSETS[3:5]))
        await server.wait_for(lambda: len(server.live()) == 1)
        assert server.live()[0].subscribed() == set(ASSETS[3:5])
        assert stats.health()["subscribed_assets"] == 2


async def test_subscribe_frames_respect_the_byte_cap(
    server: RecordingServer, nursery: trio.Nursery
) -> None:
    ids = [f"{n:077d}" for n in range(500)]
    pool, _, _ = _pool(server, max_assets_per_connection=500, max_subscribe_bytes=4096)
    await nursery.start(pool.run)
    with trio.fail_after(10):
        pool.set_assets(set(ids))
        await server.wait_for(
            lambda: bool(server.peers) and server.peers[0].subscribed() == set(ids)
        )
        frames = [t for t in server.peers[0].received if t != "PING"]
        assert len(frames) > 1
        assert all(len(t.encode()) <= 4096 for t in frames)
        assert orjson.loads(frames[0])["type"] == "market"
        assert all(orjson.loads(t)["operation"] == "subscribe" for t in frames[1:])


async def test_reconnect_resubscribes_everything(
    server: RecordingServer, nursery: trio.Nursery
) -> None:
    pool, _, stats = _pool(server)
    await nursery.start(pool.run)
    with trio.fail_after(10):
        pool.set_assets(set(ASSETS[:2]))
        await server.wait_for(lambda: len(server.peers) == 1 and server.peers[0].received)
        pool.set_assets(set(ASSETS[:3]))  # a dynamic change before the drop
        await server.wait_for(lambda: server.peers[0].subscribed() == set(ASSETS[:3]))
        await server.drop_all()
        await server.wait_for(lambda: len(server.peers) == 2 and server.peers[1].received)
        again = orjson.loads(server.peers[1].received[0])
        assert again["type"] == "market"
        assert set(again["assets_ids"]) == set(ASSETS[:3])
        assert stats.shards[0].reconnects == 1


async def test_ping_and_events(server: RecordingServer, nursery: trio.Nursery) -> None:
    pool, events, stats = _pool(server)
    await nursery.start(pool.run)
    with trio.fail_after(10):
        pool.set_assets({ASSETS[0]})
        await server.wait_for(lambda: "PING" in (server.peers[0].received if server.peers else []))
        peer = server.peers[0]
        assert peer.outbox is not None
        big_book = {
            "event_type": "book",
            "asset_id": ASSETS[0],
            "market": "0xm",
            "bids": [{"price": f"0.{n % 980 + 10:03d}", "size": str(n)} for n in range(90_000)],
            "asks": [{"price": "0.99", "size": "1"}],
            "timestamp": "1",
            "hash": "h",
        }
        frame = orjson.dumps([big_book]).decode()
        assert len(frame) > 2 * 2**20  # above trio-websocket's 1 MiB default
        await peer.outbox.send(frame)
        await peer.outbox.send("not json {")
        await peer.outbox.send('{"event_type":"mystery","asset_id":"x"}')
        foreign = {
            "event_type": "last_trade_price",
            "asset_id": ASSETS[6],
            "market": "0xm",
            "price": "0.5",
            "size": "1",
            "side": "BUY",
            "timestamp": "2",
        }
        await peer.outbox.send(orjson.dumps(foreign).decode())
        mine = dict(foreign, asset_id=ASSETS[0], price=".52")
        await peer.outbox.send(orjson.dumps(mine).decode())
        big = await events.receive()  # a big frame: the reader waits until it is applied
        assert isinstance(big, FrameEvents)
        big.applied.set()
        (book,) = big
        assert isinstance(book, BookSnapshot) and len(book.bids) == 90_000
        (trade,) = await events.receive()
        assert isinstance(trade, LastTradePrice) and trade.price == Decimal("0.52")
        assert stats.parse_errors == {"invalid_json": 1}
        assert stats.ignored_events == {"mystery": 1}  # an undefined type is no error
        assert stats.foreign_events == 1
        assert stats.control["PONG"] >= 1
        assert stats.shards[0].ping_rtt is not None
        assert stats.shards[0].state == "connected"
        assert stats.shards[0].reconnects == 0


async def test_unanswered_ping_reconnects(server: RecordingServer, nursery: trio.Nursery) -> None:
    """A half-open link: the socket stays open, PINGs go unanswered, nothing arrives."""
    server.answer_pings = False
    pool, _, stats = _pool(server, ping_interval=0.05, pong_timeout=0.3)
    await nursery.start(pool.run)
    with trio.fail_after(10):
        pool.set_assets({ASSETS[0]})
        await server.wait_for(lambda: len(server.peers) >= 2)
    first = server.peers[0]
    assert first.received.count("PING") >= 2
    assert stats.shards[0].reconnects >= 1
    assert "no PONG" in (stats.shards[0].last_error or "")


async def test_no_ping_before_subscribe_and_no_empty_connection(
    server: RecordingServer, nursery: trio.Nursery
) -> None:
    """A text PING before a valid subscribe earns close 1008 (docs/protocol.md, "What the venue really does")."""
    pool, _, _ = _pool(server)
    await nursery.start(pool.run)
    with trio.fail_after(10):
        pool.set_assets(set())
        await trio.testing.wait_all_tasks_blocked()
        assert server.peers == []  # nothing to subscribe: no connection at all
        pool.set_assets({ASSETS[0]})
        await server.wait_for(lambda: bool(server.peers) and "PING" in server.peers[0].received)
        first = server.peers[0].received[0]
        assert first != "PING" and orjson.loads(first)["assets_ids"] == [ASSETS[0]]
        pool.set_assets(set())  # emptied: the connection goes
        await server.wait_for(lambda: not server.live())


def _book(asset: str) -> str:
    return orjson.dumps(
        {
            "event_type": "book",
            "asset_id": asset,
            "market": "0xm",
            "bids": [],
            "asks": [],
            "timestamp": "1",
            "hash": "",
        }
    ).decode()


async def test_coverage_counts_books_and_trades_not_price_changes(
    server: RecordingServer, nursery: trio.Nursery
) -> None:
    pool, events, stats = _pool(server)
    await nursery.start(pool.run)
    with trio.fail_after(10):
        pool.set_assets(set(ASSETS[:3]))
        await server.wait_for(lambda: bool(server.peers) and server.peers[0].received)
        outbox = server.peers[0].outbox
        assert outbox is not None
        change = {"asset_id": ASSETS[0], "price": "0.5", "size": "1", "side": "BUY", "hash": "h"}
        await outbox.send(
            orjson.dumps(
                {
                    "event_type": "price_change",
                    "market": "0xm",
                    "timestamp": "1",
                    "price_changes": [change],
                }
            ).decode()
        )
        await outbox.send(
            orjson.dumps(
                {
                    "event_type": "last_trade_price",
                    "asset_id": ASSETS[1],
                    "market": "0xm",
                    "price": "0.5",
                    "size": "1",
                    "side": "BUY",
                    "timestamp": "2",
                }
            ).decode()
        )
        await outbox.send(_book(ASSETS[2]))
        for _ in range(3):
            await events.receive()
    shard = stats.shards[0]
    assert shard.seen_assets == {ASSETS[1], ASSETS[2]}  # a price change confirms nothing
    assert shard.book_hashes["unverifiable"] == 1


async def test_refused_subscribe_shrinks_frames_and_they_grow_back(
    server: RecordingServer, nursery: trio.Nursery
) -> None:
    server.refuse = 1  # the venue closes the first connection after its subscribe, unserved
    pool, _, stats = _pool(server, max_subscribe_bytes=8192)
    await nursery.start(pool.run)
    with trio.fail_after(10):
        pool.set_assets({ASSETS[0]})
        await server.wait_for(lambda: len(server.peers) == 2 and server.peers[1].received)
        shard = pool.shards[0]
        assert shard.subscribe_bytes == 2048  # quartered
        assert stats.shards[0].reconnects == 1
        # Healthy for backoff_max (0.05 s) at a time: doubled back, then the configured cap.
        while shard.subscribe_bytes:
            await trio.sleep(0.01)
        assert len(server.peers) == 2


async def test_drop_after_data_is_no_refusal(
    server: RecordingServer, nursery: trio.Nursery
) -> None:
    pool, events, stats = _pool(server, max_subscribe_bytes=8192)
    await nursery.start(pool.run)
    with trio.fail_after(10):
        pool.set_assets({ASSETS[0]})
        await server.wait_for(lambda: bool(server.peers) and server.peers[0].received)
        outbox = server.peers[0].outbox
        assert outbox is not None
        await outbox.send(_book(ASSETS[0]))  # the venue answered the subscribe...
        await events.receive()
        await server.drop_all()  # ... and the link dropped within the second: a reconnect
        await server.wait_for(lambda: len(server.peers) == 2 and server.peers[1].received)
    assert pool.shards[0].subscribe_bytes == 0  # frames not shrunk
    assert stats.shards[0].reconnects == 1

"""
The replay server: protocol, filtering, books, pacing and capture loading;
the venue's book hashes, tick-size changes and the CLOB REST app.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterable
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from polystream.errors import ReplayError
from polystream.replay import (
    Capture,
    ReplayChanges,
    ReplayOptions,
    ReplayServer,
    ScheduledFault,
    Synthetic,
    Tape,
    book_hash,
    synthetic_asset_id,
)
from polystream.store.markets import GammaMarket
from polystream.venue.clob import Quote, open_clob_client

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
UPDOWN = EXAMPLES / "updown-2025-12-11.jsonl.gz"
EXPECTED = EXAMPLES / "updown-2025-12-11.expected.json"
AAIMEK = Path(__file__).resolve().parent / "data" / "replay" / "aaimek-2025-01.jsonl.gz"
ENRICO = Path(__file__).resolve().parent / "data" / "replay" / "enricobignozzi-2026-09-24.jsonl"

SOL_UP = "26975287284659697395137026699226669940909216664286471914722914103715066514506"
BTC_1H_UP = "59966631802035353161496423965041979939676433202178195563654228017276340993669"
TIMEOUT = 60


def _asset(slug: str, outcome: str) -> str:
    """The asset id of one outcome in the expected file."""
    assets = json.loads(EXPECTED.read_text())["assets"]
    (found,) = (a for a, s in assets.items() if (s["slug"], s["outcome"]) == (slug, outcome))
    return str(found)


@pytest.fixture(scope="session")
def updown() -> Capture:
    return Capture.load([UPDOWN])


@pytest.fixture(scope="session")
def expected() -> dict[str, Any]:
    state: dict[str, Any] = json.loads(EXPECTED.read_text())["assets"]
    return state


class Books:
    """A plain book model of what a client received, kept apart from the server's."""

    def __init__(self) -> None:
        self.bids: dict[str, dict[Decimal, str]] = {}
        self.asks: dict[str, dict[Decimal, str]] = {}
        self.last_trade: dict[str, str] = {}

    def apply_frame(self, text: str) -> list[dict[str, Any]]:
        value = orjson.loads(text)
        events: list[dict[str, Any]] = value if isinstance(value, list) else [value]
        for event in events:
            self.apply(event)
        return events

    def apply(self, event: dict[str, Any]) -> None:
        kind = event["event_type"]
        if kind == "book":
            asset = event["asset_id"]
            self.bids[asset] = {Decimal(x["price"]): x["size"] for x in event["bids"]}
            self.asks[asset] = {Decimal(x["price"]): x["size"] for x in event["asks"]}
            if event.get("last_trade_price"):
                self.last_trade[asset] = event["last_trade_price"]
        elif kind == "price_change":
            for entry in event["price_changes"]:
                side = self.bids if entry["side"] == "BUY" else self.asks
                levels = side.setdefault(entry["asset_id"], {})
                if Decimal(entry["size"]) == 0:
                    levels.pop(Decimal(entry["price"]), None)
                else:
                    levels[Decimal(entry["price"])] = entry["size"]
        elif kind == "last_trade_price":
            self.last_trade[event["asset_id"]] = event["price"]

    def check(self, asset: str, state: dict[str, Any]) -> None:
        bids, asks = self.bids.get(asset, {}), self.asks.get(asset, {})
        best_bid = str(max(bids)) if bids else None
        best_ask = str(min(asks)) if asks else None
        assert (best_bid, best_ask) == (state["best_bid"], state["best_ask"])
        assert (len(bids), len(asks)) == (state["bid_levels"], state["ask_levels"])
        assert self.last_trade.get(asset) == state["last_trade_price"]


def event_assets(event: dict[str, Any]) -> set[str]:
    if "price_changes" in event:
        return {entry["asset_id"] for entry in event["price_changes"]}
    return {event["asset_id"]}


async def until_pong(ws: WebSocketConnection) -> list[str]:
    """Everything received before the next ``PONG``."""
    received: list[str] = []
    while (message := await ws.get_message()) != "PONG":
        assert isinstance(message, str)
        received.append(message)
    return received


async def drain_after_finished(server: ReplayServer, ws: WebSocketConnection) -> list[str]:
    """All frames up to the end of the tape: wait for ``finished``, then PING as a barrier."""
    received: list[str] = []

    async def read() -> None:
        received.extend(await until_pong(ws))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await server.finished.wait()
        await ws.send_message("PING")
    return received


def subscribe(assets: Iterable[str], **extra: Any) -> str:
    return json.dumps({"assets_ids": list(assets), "type": "market", **extra})


def write_capture(path: Path, frames: Iterable[Any]) -> Path:
    path.write_text("".join(json.dumps(frame) + "\n" for frame in frames))
    return path


def trade(asset: str, timestamp_ms: int, price: str = "0.5") -> dict[str, Any]:
    return {
        "event_type": "last_trade_price",
        "asset_id": asset,
        "market": "0xm",
        "price": price,
        "size": "1",
        "side": "BUY",
        "timestamp": str(timestamp_ms),
    }


def venue_hash(book: dict[str, Any]) -> str:
    """
    The venue's book hash, written out apart from ``book_hash``: SHA-1 of the
    compact JSON in the Go struct's key order, ``hash`` empty, WebSocket books
    hashed with ``min_order_size`` "5" and ``neg_risk`` false (protocol.md, 11;
    py-clob-client-v2 ``generate_orderbook_summary_hash``).
    """
    payload = {
        "market": book["market"],
        "asset_id": book["asset_id"],
        "timestamp": book["timestamp"],
        "hash": "",
        "bids": [{"price": level["price"], "size": level["size"]} for level in book["bids"]],
        "asks": [{"price": level["price"], "size": level["size"]} for level in book["asks"]],
        "min_order_size": book.get("min_order_size", "5"),
        "tick_size": book["tick_size"],
        "neg_risk": book.get("neg_risk", False),
        "last_trade_price": book["last_trade_price"],
    }
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def test_asset_ids_match_expected_file() -> None:
    assert _asset("sol-updown-15m-1765450800", "Up") == SOL_UP
    assert _asset("bitcoin-up-or-down-december-11-6am-et", "Up") == BTC_1H_UP


async def test_ping_pong_and_second_type_is_invalid(updown: Capture) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server: ReplayServer = await nursery.start(ReplayServer(tape=Tape(updown)).serve)
            async with open_websocket_url(server.url) as ws:
                await ws.send_message("PING")
                assert await ws.get_message() == "PONG"
                await ws.send_message(subscribe([]))  # empty list: accepted, no snapshot
                await ws.send_message("hello")
                await ws.send_message('{"assets_ids": [')
                await ws.send_message(subscribe([SOL_UP]))
                assert await ws.get_message() == "INVALID OPERATION"
                await ws.send_message("PING")
                assert await until_pong(ws) == []
            assert server.stats.messages_ignored == 2
            assert server.stats.invalid_json == 1
            assert not server.tape_started.is_set()  # nothing was subscribed
            nursery.cancel_scope.cancel()


async def test_initial_subscribe_filters_and_books_match(
    updown: Capture, expected: dict[str, Any]
) -> None:
    wanted = {SOL_UP, BTC_1H_UP}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(tape=Tape(updown), max_speed=True)
            await nursery.start(server.serve)
            async with open_websocket_url(server.url) as ws:
                await ws.send_message(subscribe(sorted(wanted)))
                received = await drain_after_finished(server, ws)
            nursery.cancel_scope.cancel()

    first = orjson.loads(received[0])
    assert isinstance(first, list)
    assert {book["asset_id"] for book in first} == wanted
    for book in first:
        assert book["event_type"] == "book"
        assert {"market", "bids", "asks", "timestamp", "hash", "tick_size"} <= book.keys()
        assert book["last_trade_price"] == ""
        assert book["hash"] == venue_hash(book)
    # Without tick_changes the tape makes no tick change (SOL Up passes 0.96).
    assert not server.tick_change_log and server.stats.tick_size_changes_sent == 0
    assert all('"tick_size_change"' not in text for text in received)

    books = Books()
    events = 0
    for text in received:
        for event in books.apply_frame(text):
            events += 1
            assert event_assets(event) <= wanted
    for asset in wanted:
        books.check(asset, expected[asset])

    # Frames wholly about subscribed assets arrive byte for byte as recorded.
    whole = [f.text for f in updown.frames if f.asset_ids <= wanted]
    assert set(whole) <= set(received)
    assert server.stats.frames_sent == len(received) - 1  # all but the snapshot
    assert server.stats.events_sent == events - 2
    assert server.tape.frames_played == len(updown.frames)


async def test_dynamic_subscribe_after_end_gives_current_books(
    updown: Capture, expected: dict[str, Any]
) -> None:
    later = [
        _asset("ethereum-up-or-down-december-11-6am-et", "Down"),
        _asset("sol-updown-15m-1765450800", "Down"),
        _asset("xrp-updown-15m-1765450800", "Up"),  # trades only: empty book
    ]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(tape=Tape(updown), max_speed=True)
            await nursery.start(server.serve)
            async with open_websocket_url(server.url) as ws:
                await ws.send_message(subscribe([SOL_UP]))
                await drain_after_finished(server, ws)
                request = {"operation": "subscribe", "assets_ids": [*later, "12345", SOL_UP]}
                await ws.send_message(json.dumps(request))
                await ws.send_message("PING")
                frames = await until_pong(ws)
            nursery.cancel_scope.cancel()

    assert len(frames) == 1  # one array: new known assets only (not "12345", not SOL_UP)
    snapshot = orjson.loads(frames[0])
    assert [book["asset_id"] for book in snapshot] == later
    books = Books()
    for book in snapshot:
        books.apply(book)
        prices = [Decimal(level["price"]) for level in book["bids"]]
        assert prices == sorted(prices)  # bids ascending
        prices = [Decimal(level["price"]) for level in book["asks"]]
        assert prices == sorted(prices, reverse=True)  # asks descending
        assert book["tick_size"] == "0.01"
    for asset in later:
        books.check(asset, expected[asset])


async def test_unsubscribe_stops_events(updown: Capture) -> None:
    sol_down = _asset("sol-updown-15m-1765450800", "Down")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(tape=Tape(updown), max_speed=True, loop=True)
            await nursery.start(server.serve)
            async with open_websocket_url(server.url) as ws:
                await ws.send_message(subscribe([SOL_UP, sol_down], initial_dump=False))
                for _ in range(20):
                    await ws.get_message()
                request = {"operation": "unsubscribe", "assets_ids": [SOL_UP]}
                await ws.send_message(json.dumps(request))
                await ws.send_message("PING")
                await until_pong(ws)  # frames queued before the unsubscribe
                after = [await ws.get_message() for _ in range(300)]
            nursery.cancel_scope.cancel()
    for text in after:
        assert isinstance(text, str)
        for event in Books().apply_frame(text):
            assert event_assets(event) == {sol_down}


async def test_frames_are_paced_by_recorded_time(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    times_ms = [1_000, 1_500, 1_500, 4_000, 5_000]
    path = write_capture(tmp_path / "paced.jsonl", [trade("A", t) for t in times_ms])
    capture = Capture.load([path])
    assert capture.schedule(2.0) == [0.0, 0.25, 0.25, 1.5, 2.0]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(tape=Tape(capture), speed=2.0)
            await nursery.start(server.serve)
            async with open_websocket_url(server.url) as ws:
                await trio.sleep(7)  # a late client: the tape waits for a subscribe
                await ws.send_message(subscribe(["A"], initial_dump=False))
                arrivals = []
                for _ in times_ms:
                    await ws.get_message()
                    arrivals.append(trio.current_time())
            nursery.cancel_scope.cancel()
    assert [t - arrivals[0] for t in arrivals] == pytest.approx([0.0, 0.25, 0.25, 1.5, 2.0])


async def test_tape_keeps_books_of_unsubscribed_assets(tmp_path: Path) -> None:
    book = {
        "event_type": "book",
        "asset_id": "A",
        "market": "0xm",
        "bids": [{"price": "0.4", "size": "10"}, {"price": "0.45", "size": "5"}],
        "asks": [{"price": "0.6", "size": "10"}, {"price": "0.55", "size": "5"}],
        "timestamp": "1000",
        "hash": "0x1",
    }
    change = {
        "event_type": "price_change",
        "market": "0xm",
        "timestamp": "2000",
        "price_changes": [
            {"asset_id": "A", "price": "0.45", "size": "0", "side": "BUY"},
            {"asset_id": "A", "price": "0.500", "size": "7", "side": "SELL"},
        ],
    }
    path = write_capture(tmp_path / "books.jsonl", [book, change, trade("A", 3000, "0.52")])
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(
                tape=Tape(Capture.load([path])), max_speed=True, start_when_subscribed=False
            )
            await nursery.start(server.serve)
            await server.finished.wait()  # nobody connected: the tape still ran
            async with open_websocket_url(server.url) as ws:
                await ws.send_message(subscribe(["A", "B"]))
                (snapshot,) = orjson.loads(await ws.get_message())
            nursery.cancel_scope.cancel()
    assert snapshot["bids"] == [{"price": "0.4", "size": "10"}]
    assert snapshot["asks"] == [
        {"price": "0.6", "size": "10"},
        {"price": "0.55", "size": "5"},
        {"price": "0.500", "size": "7"},
    ]
    assert snapshot["last_trade_price"] == "0.52"
    assert snapshot["tick_size"] == "0.001"  # inferred from the prices
    assert snapshot["timestamp"] == "2000"  # the book's last change


def test_captures_merge_by_frame_time(tmp_path: Path) -> None:
    one = write_capture(tmp_path / "one.jsonl", [trade("A", 1), trade("A", 5)])
    two = tmp_path / "two.jsonl.gz"
    two.write_bytes(
        gzip.compress(b"[%s]\n\n%s\n" % (orjson.dumps(trade("B", 2)), orjson.dumps(trade("B", 5))))
    )
    capture = Capture.load([one, two])
    assert [(f.time_ms, sorted(f.asset_ids)) for f in capture.frames] == [
        (1, ["A"]),
        (2, ["B"]),
        (5, ["A"]),
        (5, ["B"]),
    ]
    assert capture.frames[1].is_array
    assert capture.markets == {"A": "0xm", "B": "0xm"}


def test_gzip_capture_from_repo() -> None:
    capture = Capture.load([AAIMEK])
    assert len(capture.frames) == 3829
    assert len(capture.markets) == 2


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("not json", "invalid JSON"),
        ('{"asset_id": "A"}', "event_type"),
        ('[{"event_type": "book", "timestamp": "x"}]', "bad timestamp"),
        ('{"event_type": "book", "timestamp": "3"}', "cannot be applied"),
    ],
)
def test_bad_line_names_path_and_line(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{json.dumps(trade('A', 1))}\n\n{line}\n")
    with pytest.raises(ReplayError, match=rf"bad\.jsonl:3: .*{reason}"):
        Capture.load([path])


def test_unreadable_capture(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match=r"missing\.jsonl"):
        Capture.load([tmp_path / "missing.jsonl"])
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"not gzip")
    with pytest.raises(ReplayError, match=r"broken\.jsonl\.gz: cannot read"):
        Capture.load([broken])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ReplayError, match="no frames"):
        Capture.load([empty])


async def test_late_subscriber_and_quitter(updown: Capture, expected: dict[str, Any]) -> None:
    """A client joining mid-tape gets books that the following frames keep exact;
    a client leaving mid-tape stops nothing; small outboxes make the tape wait."""
    late = [SOL_UP, BTC_1H_UP, _asset("ethereum-up-or-down-december-11-6am-et", "Up")]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(tape=Tape(updown), max_speed=True, outbox_frames=4)
            await nursery.start(server.serve)
            everything: list[str] = []

            async def driver(task_status: trio.TaskStatus[None]) -> None:
                async with open_websocket_url(server.url) as ws:
                    await ws.send_message(subscribe(sorted(updown.markets)))
                    for _ in range(3000):
                        everything.append(str(await ws.get_message()))
                    task_status.started()
                    everything.extend(await drain_after_finished(server, ws))

            async def quitter() -> None:
                async with open_websocket_url(server.url) as ws:
                    await ws.send_message(subscribe(sorted(updown.markets)))
                    await ws.get_message()

            async with trio.open_nursery() as clients:
                clients.start_soon(quitter)
                await clients.start(driver)
                assert 0 < server.tape.position < len(updown.frames)
                async with open_websocket_url(server.url) as ws:
                    await ws.send_message(subscribe(late))
                    received = await drain_after_finished(server, ws)
            nursery.cancel_scope.cancel()

    assert server.stats.connections == 3
    assert len(everything) == 1 + len(updown.frames)  # snapshot + every frame, none dropped
    assert everything[1:] == [frame.text for frame in updown.frames]
    books = Books()
    for text in received:
        books.apply_frame(text)
    for asset in late:
        books.check(asset, expected[asset])


# --- synthetic assets -------------------------------------------------------------


def test_synthetic_ids_markets_and_gamma_objects(updown: Capture) -> None:
    synthetic = Synthetic.build(updown.markets, 30)
    originals = sorted(updown.markets, key=lambda a: (updown.markets[a], a))
    assert len(originals) == 12
    for k, asset in enumerate(synthetic.ordered):
        assert asset.index == k
        assert asset.original == originals[k % 12]
        assert asset.copy == k // 12
        assert asset.asset_id == synthetic_asset_id(k, asset.original)
        assert len(asset.asset_id) == 77 and asset.asset_id.isdigit()
        assert asset.market.startswith("0x") and len(asset.market) == 66
    assert Synthetic.build(updown.markets, 30) == synthetic  # deterministic
    # The copies of one recorded market share one synthetic market; copies differ.
    markets = [GammaMarket.from_gamma(obj) for obj in synthetic.gamma_markets()]
    assert [len(m.clob_token_ids) for m in markets] == [2] * 15
    assert len({m.id for m in markets}) == len({m.condition_id for m in markets}) == 15
    tokens = [t for m in markets for t in m.clob_token_ids]
    assert sorted(tokens) == sorted(synthetic.assets)
    for market in markets:
        first, second = (synthetic.assets[t] for t in market.clob_token_ids)
        assert first.copy == second.copy and first.original_market == second.original_market
    assert not set(synthetic.assets) & set(updown.markets)
    with pytest.raises(ReplayError, match="synthesize"):
        Synthetic.build(updown.markets, -1)


def test_options_as_keywords_go_on_top_of_the_value(updown: Capture) -> None:
    """``ReplayChanges`` names exactly the option fields; keywords override ``options``."""
    assert ReplayChanges.__optional_keys__ == {f.name for f in attrs.fields(ReplayOptions)}
    base = ReplayOptions(loop=True, synthesize=24, faults=[ScheduledFault("pause", after=3)])
    server = ReplayServer(Tape(updown), base, max_speed=True)
    assert server.options == attrs.evolve(base, max_speed=True)
    assert server.options.faults == (ScheduledFault("pause", after=3),)
    assert server.synthetic == Synthetic.build(updown.markets, 24)
    with pytest.raises(TypeError):
        ReplayServer(Tape(updown), max_sped=True)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        ReplayServer(Tape(updown), speed=0.0)
    with pytest.raises(ReplayError, match="synthesize"):
        ReplayServer(Tape(updown), synthesize=-1)


async def test_synthetic_assets_get_relabelled_books_and_events(updown: Capture) -> None:
    """A synthetic copy sees exactly its original's books and events, under its own ids;
    a client with no copies gets the recorded frames byte for byte."""
    synthetic = Synthetic.build(updown.markets, 24)  # two copies of each asset
    sol = [a for a in synthetic.ordered if a.original == SOL_UP]
    assert [a.copy for a in sol] == [0, 1]
    copy_ids = [a.asset_id for a in sol]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(
                tape=Tape(updown), max_speed=True, synthetic=synthetic, record=True
            )
            await nursery.start(server.serve)
            async with (
                open_websocket_url(server.url) as plain,
                open_websocket_url(server.url) as copies,
            ):
                await plain.send_message(subscribe([SOL_UP]))
                await copies.send_message(subscribe(copy_ids[:1]))
                await copies.send_message(
                    json.dumps({"operation": "subscribe", "assets_ids": copy_ids[1:]})
                )
                async with trio.open_nursery() as readers:
                    got: dict[str, list[str]] = {}

                    async def read(name: str, ws: WebSocketConnection) -> None:
                        got[name] = await drain_after_finished(server, ws)

                    readers.start_soon(read, "plain", plain)
                    readers.start_soon(read, "copies", copies)
            nursery.cancel_scope.cancel()

    plain_books, copy_books = Books(), Books()
    for text in got["plain"]:
        plain_books.apply_frame(text)
    markets_seen: set[str] = set()
    for text in got["copies"]:
        for event in copy_books.apply_frame(text):
            assert event_assets(event) <= set(copy_ids)
            markets_seen.add(event["market"])
    assert markets_seen == {a.market for a in sol}
    for copy_id in copy_ids:
        assert copy_books.bids[copy_id] == plain_books.bids[SOL_UP]
        assert copy_books.asks[copy_id] == plain_books.asks[SOL_UP]
        assert copy_books.last_trade.get(copy_id) == plain_books.last_trade.get(SOL_UP)
    # The plain client got the tape's own text for SOL-only frames: nothing re-encoded.
    sol_frames = [f.text for f in updown.frames if f.plain and f.asset_ids == {SOL_UP}]
    assert sol_frames and set(sol_frames) <= set(got["plain"])
    stats = server.stats
    assert stats.synthetic_snapshots_sent == 2 and stats.snapshots_sent == 3
    assert stats.synthetic_events_sent > 0
    assert stats.max_subscribed == 2 and stats.max_request_assets == 1
    # The record: every request, its size, and when each snapshot went out.
    second = server.connection_logs[1]
    assert [r.operation for r in second.requests] == ["type", "subscribe"]
    assert [r.asset_ids for r in second.requests] == [(copy_ids[0],), (copy_ids[1],)]
    assert max(r.size_bytes for r in second.requests) == stats.max_message_bytes
    assert set(second.snapshots) == set(copy_ids) == second.subscribed
    assert second.closed_at is not None
    assert set(server.snapshot_times) == {SOL_UP, *copy_ids}
    assert server.subscribe_times[copy_ids[1]] >= server.subscribe_times[copy_ids[0]]


async def test_unsubscribed_copy_gets_nothing_more(updown: Capture) -> None:
    synthetic = Synthetic.build(updown.markets, 12)
    (copy,) = (a.asset_id for a in synthetic.ordered if a.original == SOL_UP)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(
                tape=Tape(updown), max_speed=True, synthetic=synthetic, start_when_subscribed=False
            )
            await nursery.start(server.serve)
            async with open_websocket_url(server.url) as ws:
                await ws.send_message(subscribe([copy]))
                await ws.send_message(
                    json.dumps({"operation": "unsubscribe", "assets_ids": [copy]})
                )
                received = await drain_after_finished(server, ws)
            nursery.cancel_scope.cancel()
    # Only the snapshot (the tape may have sent a frame before the unsubscribe was read).
    events = [e for text in received for e in orjson.loads(text)]
    assert events[0]["event_type"] == "book" and events[0]["asset_id"] == copy
    assert server.stats.synthetic_events_sent == len(events) - 1


async def test_loop_moves_timestamps_on(tmp_path: Path) -> None:
    """A looped lap is later in time, or a consumer would drop it as stale."""
    times_ms = [1_000, 1_500, 4_000]
    path = write_capture(tmp_path / "loop.jsonl", [trade("A", t) for t in times_ms])
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(tape=Tape(Capture.load([path])), max_speed=True, loop=True)
            await nursery.start(server.serve)
            async with open_websocket_url(server.url) as ws:
                await ws.send_message(subscribe(["A"], initial_dump=False))
                stamps = [int(json.loads(await ws.get_message())["timestamp"]) for _ in range(9)]
            nursery.cancel_scope.cancel()
    span = 4_000 - 1_000 + 1_000
    assert stamps == [t + lap * span for lap in range(3) for t in times_ms]


# --- book hashes ------------------------------------------------------------------


def _levels(text: str) -> list[dict[str, str]]:
    """``"0.01:5 0.02:7"`` -> ``[{"price": "0.01", "size": "5"}, ...]``."""
    return [dict(zip(("price", "size"), pair.split(":"), strict=True)) for pair in text.split()]


# A book the venue sent: nautechsystems/nautilus_trader @648970ce64a3,
# crates/adapters/polymarket/test_data/ws_book_snapshot_captured.json. Its tests
# test_book_snapshot_hash_matches_captured_snapshot and ..._rejects_mismatch (the
# first bid's size 3149725.71) expect the two hashes asserted below.
NAUTILUS_CAPTURED: dict[str, Any] = {
    "market": "0x6bd56627aa21311850825edb27e53434a0e17a4f782be0086bc07f71eee00d0d",
    "asset_id": "350977769852917329387037893294763093471844346281449484439085576212613048126",
    "timestamp": "1786604072222",
    "hash": "ed47eb91f3c7985fac1cb18cb7c19535eddd3c0a",
    "bids": _levels(
        "0.01:3149725.72 0.02:70281.2 0.03:37268.67 0.04:171213.7 0.05:507106.18 "
        "0.06:219685.67 0.07:182528.55"
    ),
    "asks": _levels(
        "0.99:156606.14 0.98:17512.3 0.97:800 0.95:1116.11 0.94:9.37 0.91:20 0.9:13150 "
        "0.89:1818.18 0.88:218.18 0.85:1833.33 0.8:15350 0.75:4900 0.71:12047.41 0.7:10666 "
        "0.67:9564.39 0.65:17500 0.64:7465.28 0.62:7708.87 0.61:7275.64 0.6:6250 "
        "0.58:13398.75 0.57:5000 0.56:999.99 0.53:1000 0.51:500 0.5:2674.62 0.49:13398.75 "
        "0.48:3000 0.42:5000 0.4:103895.18 0.39:13000.01 0.38:441 0.37:687.5 0.36:3499.81 "
        "0.34:16.66 0.32:499.99 0.3:2270.36 0.29:200 0.27:1000 0.25:2020 0.24:450 0.23:920 "
        "0.22:820 0.21:2120 0.2:8257.29 0.19:6262.98 0.18:1243 0.17:10057.82 0.16:2668.5 "
        "0.15:4843 0.14:26283.92 0.13:6757.23 0.12:7341.68 0.11:29764.37 0.1:93315.63 "
        "0.09:153220.41 0.08:228198.28"
    ),
    "tick_size": "0.01",
    "event_type": "book",
    "last_trade_price": "0.920",
}

REST_BOOK_KEYS = [
    "market",
    "asset_id",
    "timestamp",
    "hash",
    "bids",
    "asks",
    "min_order_size",
    "tick_size",
    "neg_risk",
    "last_trade_price",
]


def _hash_of(book: dict[str, Any], **changes: Any) -> str:
    book = {**book, **changes}
    return book_hash(
        book["market"],
        book["asset_id"],
        book["timestamp"],
        book["bids"],
        book["asks"],
        book["tick_size"],
        book["last_trade_price"],
    )


def test_book_hash_reproduces_real_snapshots() -> None:
    """The venue's own hashes: 28 books of a raw capture and nautilus's captured book."""
    recorded = orjson.loads(ENRICO.read_bytes().split(b"\n", 1)[0])
    assert len(recorded) == 28
    for book in [*recorded, NAUTILUS_CAPTURED]:
        assert _hash_of(book) == book["hash"] == venue_hash(book)
    first_bid = {"price": "0.01", "size": "3149725.71"}
    bids = [first_bid, *NAUTILUS_CAPTURED["bids"][1:]]
    assert _hash_of(NAUTILUS_CAPTURED, bids=bids) == "6402b534c270a1ce46a75c62f1d7e3651182cc75"
    # A REST book carries min_order_size and neg_risk: hashed as given.
    book = NAUTILUS_CAPTURED
    labels = (book["market"], book["asset_id"], book["timestamp"], book["bids"], book["asks"])
    rest = (*labels, book["tick_size"], book["last_trade_price"])
    assert book_hash(*rest, min_order_size="5", neg_risk=False) == book["hash"]
    assert book_hash(*rest, min_order_size="5", neg_risk=True) != book["hash"]
    assert book_hash(*rest, min_order_size="1") != book["hash"]


async def test_replayed_books_keep_the_venues_hashes() -> None:
    """Replayed to its end, a raw capture's books that saw no change come back as the
    venue sent them, hash included; the changed ones carry the hash of their new state,
    on the WebSocket and over REST alike."""
    capture = Capture.load([ENRICO])
    recorded = {book["asset_id"]: book for book in capture.frames[0].events}
    changed = {event["market"] for frame in capture.frames[1:] for event in frame.events}
    assets = sorted(recorded)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(tape=Tape(capture), max_speed=True, start_when_subscribed=False)
            await nursery.start(partial(server.serve, rest_port=0))
            await server.finished.wait()
            async with open_websocket_url(server.url) as ws:
                await ws.send_message(subscribe(assets))
                snapshot = orjson.loads(await ws.get_message())
            assert server.rest_url is not None
            async with httpx.AsyncClient(base_url=server.rest_url) as http:
                response = await http.post("/books", json=[{"token_id": a} for a in assets])
            nursery.cancel_scope.cancel()

    assert [book["asset_id"] for book in snapshot] == assets
    unchanged = 0
    for book in snapshot:
        assert book["hash"] == venue_hash(book)
        original = recorded[book["asset_id"]]
        if original["market"] in changed:
            assert book["hash"] != original["hash"]
        else:
            assert book == original and list(book) == list(original)
            unchanged += 1
    assert unchanged == 18  # 9 of the 14 markets see no change after the snapshot
    rest = response.json()
    assert [book["hash"] for book in rest] == [book["hash"] for book in snapshot]
    assert all(list(book) == REST_BOOK_KEYS and book["hash"] == venue_hash(book) for book in rest)


async def test_synthetic_snapshots_mid_tape_carry_venue_hashes(updown: Capture) -> None:
    """Copies subscribed mid-tape get the books the client's frames say, each hashed
    under its own ids."""
    synthetic = Synthetic.build(updown.markets, 24)
    assets = sorted(updown.markets)
    copies = {a.asset_id: a for a in synthetic.ordered}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(tape=Tape(updown), max_speed=True, synthetic=synthetic)
            await nursery.start(server.serve)
            async with open_websocket_url(server.url) as ws:
                await ws.send_message(subscribe(assets))
                books = Books()
                for _ in range(3001):
                    books.apply_frame(str(await ws.get_message()))
                request = {"operation": "subscribe", "assets_ids": sorted(copies)}
                await ws.send_message(json.dumps(request))
                while True:
                    events = books.apply_frame(str(await ws.get_message()))
                    if events[0]["event_type"] == "book" and events[0]["asset_id"] in copies:
                        break
            nursery.cancel_scope.cancel()

    assert 0 < server.tape.position < len(updown.frames)
    assert sorted(event["asset_id"] for event in events) == sorted(copies)
    assert len({event["hash"] for event in events}) == len(copies)
    for event in events:
        label = copies[event["asset_id"]]
        assert event["market"] == label.market
        assert event["hash"] == venue_hash(event)
        assert books.bids[label.asset_id] == books.bids[label.original]
        assert books.asks[label.asset_id] == books.asks[label.original]


# --- tick-size changes --------------------------------------------------------------


async def test_tick_size_change_precedes_the_crossing_frame(updown: Capture) -> None:
    """SOL Up's bid passes 0.96 (and SOL Down's ask 0.04) in one frame: each holder gets a
    tick_size_change just before it, then price changes and never a book; later books
    and REST say 0.001."""
    sol_down = _asset("sol-updown-15m-1765450800", "Down")
    synthetic = Synthetic.build(updown.markets, 12)
    (copy,) = (a for a in synthetic.ordered if a.original == SOL_UP)
    got: dict[str, list[str]] = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(
                tape=Tape(updown), max_speed=True, tick_changes=True, synthetic=synthetic
            )
            await nursery.start(partial(server.serve, rest_port=0))
            server.pause()  # every client subscribed before the first frame
            async with (
                open_websocket_url(server.url) as sol,
                open_websocket_url(server.url) as btc,
                open_websocket_url(server.url) as copies,
            ):
                clients = {"sol": sol, "btc": btc, "copies": copies}
                await sol.send_message(subscribe([SOL_UP, sol_down]))
                await btc.send_message(subscribe([BTC_1H_UP]))
                await copies.send_message(subscribe([copy.asset_id]))
                for name, ws in clients.items():
                    got[name] = [str(await ws.get_message())]  # the snapshot
                server.resume()
                async with trio.open_nursery() as readers:

                    async def read(name: str, ws: WebSocketConnection) -> None:
                        got[name] += await drain_after_finished(server, ws)

                    for name, ws in clients.items():
                        readers.start_soon(read, name, ws)
            async with open_websocket_url(server.url) as late:
                await late.send_message(subscribe([SOL_UP, copy.asset_id]))
                late_books = orjson.loads(await late.get_message())
            assert server.rest_url is not None
            async with httpx.AsyncClient(base_url=server.rest_url) as http:
                rest = (await http.get("/book", params={"token_id": SOL_UP})).json()
            nursery.cancel_scope.cancel()

    log = server.tick_change_log
    assert [(c.asset_id, c.old_tick_size, c.new_tick_size, c.clients) for c in log] == sorted(
        [(SOL_UP, "0.01", "0.001", (1,)), (sol_down, "0.01", "0.001", (1,))]
    )
    (index,) = {c.frame for c in log}
    crossing = updown.frames[index]
    assert crossing.asset_ids == {SOL_UP, sol_down} and crossing.plain
    # The holder: both changes, then the crossing frame as recorded.
    received = got["sol"]
    at = received.index(crossing.text)
    changes = [orjson.loads(text) for text in received[at - 2 : at]]
    assert changes == [c.event() for c in log]
    assert changes[0] == {
        "event_type": "tick_size_change",
        "market": updown.markets[log[0].asset_id],
        "asset_id": log[0].asset_id,
        "old_tick_size": "0.01",
        "new_tick_size": "0.001",
        "timestamp": str(crossing.time_ms),
    }
    assert sum('"tick_size_change"' in text for text in received) == 2
    books = Books()
    for text in received[: at - 2]:
        books.apply_frame(text)
    assert max(books.bids[SOL_UP]) <= Decimal("0.96") <= min(books.asks[SOL_UP])
    assert min(books.asks[sol_down]) >= Decimal("0.04")
    books.apply_frame(crossing.text)
    assert max(books.bids[SOL_UP]) > Decimal("0.96") and min(books.asks[sol_down]) < Decimal("0.04")
    # After it: price changes (and trades), never a book; their entries carry the
    # venue's best bid and ask, which the client's book agrees with.
    entries = 0
    for text in received[at + 1 :]:
        for event in orjson.loads(text) if text.startswith("[") else [orjson.loads(text)]:
            assert event["event_type"] in ("price_change", "last_trade_price")
            for entry in event.get("price_changes", ()):
                books.apply({**event, "price_changes": [entry]})
                bids, asks = books.bids[entry["asset_id"]], books.asks[entry["asset_id"]]
                assert Decimal(entry["best_bid"]) == (max(bids) if bids else 0)
                assert Decimal(entry["best_ask"]) == (min(asks) if asks else 1)
                entries += 1
    assert entries > 0
    # Not a holder: nothing. A synthetic copy: the change relabelled, before the frame.
    assert not any('"tick_size_change"' in text for text in got["btc"])
    copy_events = [orjson.loads(text) for text in got["copies"]]
    (where,) = [i for i, ev in enumerate(copy_events) if ev[0]["event_type"] == "tick_size_change"]
    (sol_change,) = (c for c in log if c.asset_id == SOL_UP)
    relabelled = {**sol_change.event(), "asset_id": copy.asset_id, "market": copy.market}
    assert copy_events[where] == [relabelled]
    assert copy_events[where + 1][0]["event_type"] == "price_change"
    assert copy_events[where + 1][0]["timestamp"] == str(crossing.time_ms)
    assert server.stats.tick_size_changes_sent == 3
    # The tape's books took the new tick: later snapshots and REST.
    assert [b["tick_size"] for b in late_books] == ["0.001", "0.001"]
    assert all(b["hash"] == venue_hash(b) for b in late_books)
    assert rest["tick_size"] == "0.001" and rest["hash"] == late_books[0]["hash"]


def _change(timestamp_ms: int, *entries: tuple[str, str, str]) -> dict[str, Any]:
    """A price change of asset A: entries are (price, size, side)."""
    return {
        "event_type": "price_change",
        "market": "0xm",
        "timestamp": str(timestamp_ms),
        "price_changes": [
            {"asset_id": "A", "price": price, "size": size, "side": side}
            for price, size, side in entries
        ],
    }


def tick_capture(path: Path) -> Path:
    """Asset A's bid passes 0.96 at frame 2; both sides are back inside at frame 5."""
    frames = [
        {
            "event_type": "book",
            "asset_id": "A",
            "market": "0xm",
            "bids": [{"price": "0.50", "size": "10"}],
            "asks": [{"price": "0.60", "size": "10"}],
            "timestamp": "1000",
            "hash": "0",
        },
        _change(2000, ("0.60", "0", "SELL"), ("0.99", "5", "SELL")),  # an ask above 0.96: no
        _change(3000, ("0.97", "5", "BUY")),  # the bid passes 0.96: 0.01 -> 0.001
        _change(4000, ("0.971", "1", "BUY")),  # on the new tick
        _change(5000, ("0.97", "0", "BUY"), ("0.971", "0", "BUY")),  # ask still 0.99: stays
        _change(6000, ("0.99", "0", "SELL"), ("0.60", "5", "SELL")),  # inside: back to 0.01
        trade("A", 7000, "0.55"),
    ]
    return write_capture(path, frames)


async def test_tick_size_goes_back_when_both_sides_return_inside(tmp_path: Path) -> None:
    capture = Capture.load([tick_capture(tmp_path / "ticks.jsonl")])
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(
                tape=Tape(capture),
                max_speed=True,
                tick_changes=True,
                faults=(ScheduledFault("pause", after=3),),
            )
            await nursery.start(partial(server.serve, rest_port=0))
            assert server.rest_url is not None
            async with (
                open_websocket_url(server.url) as ws,
                httpx.AsyncClient(base_url=server.rest_url) as http,
            ):
                await ws.send_message(subscribe(["A"], initial_dump=False))
                received = [str(await ws.get_message()) for _ in range(4)]
                assert server.paused  # right after the frame that lowered the tick
                paused_book = (await http.get("/book", params={"token_id": "A"})).json()
                server.resume()
                received += await drain_after_finished(server, ws)
                final_book = (await http.get("/book", params={"token_id": "A"})).json()
            nursery.cancel_scope.cancel()

    texts = [f.text for f in capture.frames]
    lowered, raised = (c.event() for c in server.tick_change_log)
    assert [(c.frame, c.old_tick_size, c.new_tick_size) for c in server.tick_change_log] == [
        (2, "0.01", "0.001"),
        (5, "0.001", "0.01"),
    ]
    assert received == [*texts[:2], _json(lowered), *texts[2:5], _json(raised), *texts[5:]]
    assert lowered["timestamp"] == "3000" and raised["timestamp"] == "6000"
    assert paused_book["tick_size"] == "0.001" and paused_book["bids"][-1]["price"] == "0.97"
    assert final_book["tick_size"] == "0.01"
    for book in (paused_book, final_book):
        assert book["hash"] == venue_hash(book)


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


# --- CLOB REST ----------------------------------------------------------------------


def _d(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


async def test_rest_answers_like_the_clob_from_the_tape(
    updown: Capture, expected: dict[str, Any]
) -> None:
    synthetic = Synthetic.build(updown.markets, 12)
    (copy,) = (a for a in synthetic.ordered if a.original == SOL_UP)
    assets = sorted(updown.markets)
    every = [*assets, copy.asset_id]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(
                tape=Tape(updown), max_speed=True, start_when_subscribed=False, synthetic=synthetic
            )
            await nursery.start(partial(server.serve, rest_port=0))
            await server.finished.wait()
            async with open_websocket_url(server.url) as ws:
                await ws.send_message(subscribe(every))
                snapshot = orjson.loads(await ws.get_message())
            assert server.rest_url is not None and server.rest_url.startswith("http://127.0.0.1:")
            async with httpx.AsyncClient(base_url=server.rest_url) as http:
                books = await http.post("/books", json=[{"token_id": a} for a in [*every, "123"]])
                one = await http.get("/book", params={"token_id": SOL_UP})
                missing = await http.get("/book", params={"token_id": "123"})
                no_id = await http.get("/book")
                sides = [{"token_id": a, "side": side} for a in every for side in ("BUY", "SELL")]
                prices = await http.post("/prices", json=sides)
                mids = await http.post("/midpoints", json=[{"token_id": a} for a in every])
                errors = [
                    await http.post("/books", json=[{"token_id": SOL_UP}] * 501),
                    await http.post("/books", content=b"[{"),
                    await http.post("/prices", json=[{"token_id": SOL_UP, "side": "buy"}]),
                    await http.post("/midpoints", json={"token_id": SOL_UP}),
                    await http.get("/books"),
                    await http.get("/nothing"),
                ]
                server.rest_fail_next.extend([429, 503])
                failed = [await http.post("/midpoints", json=[{"token_id": SOL_UP}]) for _ in "abc"]
            before = len(server.rest_requests)
            server.rest_fail_next.append(429)
            async with open_clob_client(server.rest_url, wait_initial=0.01, wait_max=0.05) as clob:
                quotes = await clob.quotes(every)
            retried = await server.wait_rest_requests(before + 3)
            nursery.cancel_scope.cancel()

    assert books.status_code == 200
    rest = books.json()
    assert [book["asset_id"] for book in rest] == every  # "123" is unknown: left out
    by_asset = {book["asset_id"]: book for book in rest}
    for book, ws_book in zip(rest, snapshot, strict=True):
        assert list(book) == REST_BOOK_KEYS
        assert book["hash"] == venue_hash(book) == ws_book["hash"]
        assert (book["min_order_size"], book["neg_risk"]) == ("5", False)
        assert {k: book[k] for k in ws_book if k != "event_type"} == {
            k: v for k, v in ws_book.items() if k != "event_type"
        }
        bids = [Decimal(level["price"]) for level in book["bids"]]
        asks = [Decimal(level["price"]) for level in book["asks"]]
        assert bids == sorted(bids) and asks == sorted(asks, reverse=True)
        if book["asset_id"] in expected:
            state = expected[book["asset_id"]]
            assert (bids[-1:], asks[-1:]) == (
                [Decimal(state["best_bid"])] if state["best_bid"] else [],
                [Decimal(state["best_ask"])] if state["best_ask"] else [],
            )
    assert by_asset[copy.asset_id]["market"] == copy.market
    assert by_asset[copy.asset_id]["bids"] == by_asset[SOL_UP]["bids"]
    assert one.json() == by_asset[SOL_UP]
    assert missing.status_code == 404 and "error" in missing.json()
    assert no_id.status_code == 400
    # /prices: BUY = best bid, SELL = best ask, strings; empty sides left out.
    answer = prices.json()
    for asset in assets:
        state = expected[asset]
        want = {"BUY": state["best_bid"], "SELL": state["best_ask"]}
        want = {side: price for side, price in want.items() if price is not None}
        got = {side: Decimal(price) for side, price in answer.get(asset, {}).items()}
        assert got == {side: Decimal(price) for side, price in want.items()}, asset
    assert answer[SOL_UP] == {"BUY": "0.99"} and answer[copy.asset_id] == answer[SOL_UP]
    midpoints = mids.json()
    for asset in assets:
        assert _d(midpoints.get(asset)) == _d(expected[asset]["midpoint"]), asset
    assert [r.status_code for r in errors] == [400, 400, 400, 400, 405, 404]
    assert all("error" in r.json() for r in errors)
    assert [r.status_code for r in failed] == [429, 503, 200]
    assert failed[0].headers["retry-after"] == "0"
    # The daemon's CLOB client reads the same quotes, through an injected 429.
    for asset in assets:
        state = expected[asset]
        quote = Quote(_d(state["best_bid"]), _d(state["best_ask"]), _d(state["midpoint"]))
        if quote == Quote(None, None, None):
            assert asset not in quotes
        else:
            assert quotes[asset] == quote, asset
    assert quotes[copy.asset_id] == quotes[SOL_UP]
    assert [(r.path, r.status) for r in retried[before:]] == [
        ("/prices", 429),
        ("/prices", 200),
        ("/midpoints", 200),
    ]
    first = server.rest_requests[0]
    assert (first.method, first.path, first.status) == ("POST", "/books", 200)
    assert first.body == [{"token_id": a} for a in [*every, "123"]]
    assert server.rest_requests[1].query == f"token_id={SOL_UP}"
    assert server.stats.rest_requests == len(server.rest_requests)


async def test_rest_books_match_the_feed_mid_tape(updown: Capture) -> None:
    """Paused mid-tape: REST books, prices and a new WebSocket snapshot all say what the
    frames a client received say."""
    assets = sorted(updown.markets)
    after = 5000
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            server = ReplayServer(
                tape=Tape(updown), max_speed=True, faults=(ScheduledFault("pause", after=after),)
            )
            await nursery.start(partial(server.serve, rest_port=0))
            assert server.rest_url is not None
            async with (
                open_websocket_url(server.url) as ws,
                httpx.AsyncClient(base_url=server.rest_url) as http,
            ):
                await ws.send_message(subscribe(assets))
                books = Books()
                for _ in range(1 + after):  # the snapshot, then every frame up to the pause
                    books.apply_frame(str(await ws.get_message()))
                assert server.paused
                rest = (await http.post("/books", json=[{"token_id": a} for a in assets])).json()
                sides = [{"token_id": a, "side": side} for a in assets for side in ("BUY", "SELL")]
                prices = (await http.post("/prices", json=sides)).json()
                async with open_websocket_url(server.url) as late:
                    await late.send_message(subscribe(assets))
                    snapshot = orjson.loads(await late.get_message())
                server.resume()
            nursery.cancel_scope.cancel()

    two_sided = 0
    for book, ws_book in zip(rest, snapshot, strict=True):
        asset = book["asset_id"]
        bids = {Decimal(level["price"]): level["size"] for level in book["bids"]}
        asks = {Decimal(level["price"]): level["size"] for level in book["asks"]}
        assert (bids, asks) == (books.bids[asset], books.asks[asset]), asset
        assert book["hash"] == ws_book["hash"] == venue_hash(book)
        assert book["timestamp"] == ws_book["timestamp"]
        want = {"BUY": max(bids)} if bids else {}
        want |= {"SELL": min(asks)} if asks else {}
        assert {s: Decimal(p) for s, p in prices.get(asset, {}).items()} == want
        two_sided += bool(bids and asks)
    assert two_sided == 6  # the three markets with book data


# --- the command line ---------------------------------------------------------------


async def _log_event(stream: trio.abc.ReceiveStream, event: str) -> dict[str, Any]:
    """Read JSON log lines from ``stream`` until one with ``event``."""
    buffer = b""
    while True:
        while b"\n" not in buffer:
            chunk = await stream.receive_some()
            assert chunk, f"output ended before {event}"
            buffer += chunk
        line, buffer = buffer.split(b"\n", 1)
        if line.startswith(b"{"):
            record: dict[str, Any] = orjson.loads(line)
            if record.get("event") == event:
                return record


async def test_cli_replay_with_tick_changes_and_rest_port(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "polystream",
        "replay",
        "--port",
        "0",
        "--rest-port",
        "0",
        "--tick-changes",
        "--max-speed",
        "--exit-at-end",
        str(tick_capture(tmp_path / "ticks.jsonl")),
    ]
    env = {**os.environ, "POLYSTREAM_LOG__FORMAT": "json"}
    received: list[str] = []
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                partial(trio.run_process, command, stdout=subprocess.PIPE, env=env, check=False)
            )
            assert process.stdout is not None
            listening = await _log_event(process.stdout, "replay_listening")
            assert listening["tick_changes"] is True
            async with httpx.AsyncClient(base_url=listening["rest_url"]) as http:
                book = (await http.get("/book", params={"token_id": "A"})).json()
            async with open_websocket_url(listening["url"]) as ws:
                await ws.send_message(subscribe(["A"], initial_dump=False))
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        received.append(str(await ws.get_message()))
            await process.stdout.aclose()
    assert process.returncode == 0
    reason = closed.value.reason
    assert reason is not None and reason.code == 1001  # --exit-at-end: going away
    assert book["tick_size"] == "0.01" and book["hash"] == venue_hash(book)
    assert [book["asset_id"], book["bids"], book["asks"]] == ["A", [], []]  # tape not started
    changes = [orjson.loads(text) for text in received if '"tick_size_change"' in text]
    assert [(c["asset_id"], c["new_tick_size"]) for c in changes] == [("A", "0.001"), ("A", "0.01")]
    assert len(received) == 7 + 2

"""The replay server: protocol, filtering, books, pacing and capture loading."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing
from trio_websocket import WebSocketConnection, open_websocket_url

from polystream.errors import ReplayError
from polystream.markets import GammaMarket
from polystream.replay import Capture, ReplayServer, Synthetic, Tape, synthetic_asset_id

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
UPDOWN = EXAMPLES / "updown-2025-12-11.jsonl.gz"
EXPECTED = EXAMPLES / "updown-2025-12-11.expected.json"
AAIMEK = Path(__file__).resolve().parent / "data" / "replay" / "aaimek-2025-01.jsonl.gz"

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

"""
The market-channel parser on every real sample, on edge cases and on random
input; the client messages and subscribe chunking.

Sources: docs/protocol.md, "Subscribing"-6; samples and their recorded
counts in ../shared/data/real/PROVENANCE.md.

Every sample these tests need ships in tests/data/ (provenance in
tests/data/README.md). The project's shared data set, ``shared/`` beside the
repository root (or the directory $POLYSTREAM_SHARED_DIR names), is an optional
extra: the tests that read it are skipped by name when it is absent, so a clone
collects the same test ids with or without it.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polystream.errors import MalformedFrame
from polystream.feed.protocol import (
    CONTROL_FRAMES,
    BestBidAsk,
    BookSnapshot,
    FeedEvent,
    FrameParser,
    LastTradePrice,
    MarketResolved,
    NewMarket,
    ParsedFrame,
    PriceChange,
    TickSizeChange,
    chunk_asset_ids,
    encode_operation,
    encode_subscribe,
    parse_frame,
)

TESTS = Path(__file__).parent
SHIPPED_REAL = TESTS / "data" / "real"
REPLAY = TESTS / "data" / "replay"
EXAMPLES = TESTS.parent / "examples"


def _shared_dir() -> Path:
    """The optional shared data set: $POLYSTREAM_SHARED_DIR, else shared/ beside the repo."""
    override = os.environ.get("POLYSTREAM_SHARED_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[2] / "shared"


SHARED = _shared_dir()
SHARED_REAL = SHARED / "data" / "real"
SHARED_REPLAY = SHARED / "data" / "replay"
SHARED_HINT = "shared/ beside the repository root, or set POLYSTREAM_SHARED_DIR"

# Samples of shared/data/real that tests/data/real holds only in part (a subset
# of records, see tests/data/README.md) or not at all because of their size.
CAIO = "caiooooo-polymarket-l2-collector/data"
SHARED_EXTRAS = tuple(
    f"{CAIO}/{interval}/{coin}/{kind}/1765450800{side}.json"
    for interval, coin, kind in (
        ("15m", "btc", "trades"),
        ("15m", "eth", "trades"),
        ("15m", "sol", "orderbooks"),
        ("15m", "xrp", "trades"),
        ("1h", "btc", "orderbooks"),
        ("1h", "btc", "trades"),
        ("1h", "eth", "orderbooks"),
        ("1h", "eth", "trades"),
    )
    for side in ("down", "up")
)
# Shipped subsets: shipped file -> (shared file, number of leading records kept).
SHIPPED_SUBSETS = {
    f"{CAIO}/15m/sol/orderbooks/1765450800up.first10.json": (
        f"{CAIO}/15m/sol/orderbooks/1765450800up.json",
        10,
    ),
}
# Shipped replay captures -> their shared original (the .gz is the gzip-compressed .jsonl).
SHIPPED_REPLAY = {
    "aaimek-2025-01.jsonl.gz": "aaimek-2025-01.jsonl",
    "aaimek-2025-01.expected.json": "aaimek-2025-01.expected.json",
    "aaimek-2025-01.markets.json": "aaimek-2025-01.markets.json",
    "adriancova-2026-09-30.jsonl": "adriancova-2026-09-30.jsonl",
    "adriancova-session-2026-10-05.jsonl": "adriancova-session-2026-10-05.jsonl",
    "enricobignozzi-2026-09-24.jsonl": "enricobignozzi-2026-09-24.jsonl",
}


def _skip_unless(path: Path) -> tuple[Any, ...]:
    if path.exists():
        return ()
    return (pytest.mark.skip(reason=f"optional extra {path} is absent ({SHARED_HINT})"),)


KNOWN_TYPES = (
    "book",
    "price_change",
    "last_trade_price",
    "tick_size_change",
    "best_bid_ask",
    "new_market",
    "market_resolved",
)
EVENT_TYPE_OF: dict[type[Any], str] = {
    BookSnapshot: "book",
    PriceChange: "price_change",
    LastTradePrice: "last_trade_price",
    TickSizeChange: "tick_size_change",
    BestBidAsk: "best_bid_ask",
    NewMarket: "new_market",
    MarketResolved: "market_resolved",
}

# A market-channel asset id of the nautilus samples, and its condition id.
NT_ASSET = "48331043336612883890938759509493159234755048973500640148014422747788308965732"
NT_MARKET = "0xdd22472e552920b8438158ea7238bfadfa4f736aa4cee91a6b86c39ead110917"
AAIMEK_ASSET = "54774190602932495681624596813895280541057113822779394733336244613748178149294"
AAIMEK_MARKET = "0xd987b38ecf3bdf4cb69734004c51238875411e0924dd0e9b30e3b31e623c4f00"


# ------------------------------------------------------------------ helpers


def _frames_of(path: Path) -> list[str | bytes]:
    """The raw frame texts a sample file holds (recorder wrappers removed)."""
    if path.suffix == ".json":
        return [path.read_bytes()]
    frames: list[str | bytes] = []
    for line in path.read_bytes().splitlines():
        if not line.strip():
            continue
        record = orjson.loads(line)
        if path.parent.name == "adriancova-polymarket-bot-v2":
            if "payloadUtf8" in record:
                frames.append(record["payloadUtf8"])
            elif record.get("dir") == "recv":
                frames.append(record["data"])
        elif path.parent.name == "enricobignozzi-polymarket":
            payload = record["payload"]
            # The recorder's own checksum proves this field is the frame text.
            assert hashlib.sha256(payload.encode()).hexdigest() == record["payload_sha256"]
            frames.append(payload)
        else:
            frames.append(line)
    return frames


def _sample_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in (".json", ".jsonl") and p.is_file())


def _real_params() -> list[Any]:
    """Every shipped sample, then the shared samples that are not shipped whole."""
    params: list[Any] = [
        pytest.param(path, id=f"tests/{path.relative_to(SHIPPED_REAL)}")
        for path in _sample_files(SHIPPED_REAL)
    ]
    params += [
        pytest.param(
            SHARED_REAL / relative,
            id=f"shared/{relative}",
            marks=_skip_unless(SHARED_REAL / relative),
        )
        for relative in SHARED_EXTRAS
    ]
    return params


def _dec(value: Any) -> Decimal | None:
    return None if value in (None, "") else Decimal(value)


def _ts(obj: dict[str, Any]) -> int:
    value = obj.get("timestamp")
    return 0 if value in (None, "") else int(value)


AMBIGUOUS = "ambiguous"


def _expected_kind(obj: Any) -> str | None:
    """
    The event type a raw object has on the wire, inferred for legacy shapes
    that are unambiguous (docs/protocol.md, "What the venue really does"); ``AMBIGUOUS`` for a
    trade-like object without ``event_type`` (last trade or one-level price change).
    """
    if not isinstance(obj, dict):
        return None
    kind = obj.get("event_type")
    if isinstance(kind, str):
        return kind
    if "price_changes" in obj:
        return "price_change"
    if "asset_id" in obj and ("bids" in obj or "buys" in obj):
        return "book"
    if "asset_id" in obj and "new_tick_size" in obj:
        return "tick_size_change"
    if "asset_id" in obj and "price" in obj and "side" in obj:
        return AMBIGUOUS
    return None


def _top(raw: dict[str, Any], name: str) -> Decimal | None:
    """A venue top-of-book field: ``""``, a bid <= 0 or an ask >= 1 is an empty side."""
    value = _dec(raw.get(name))
    if value is None or (value <= 0 if name == "best_bid" else value >= 1):
        return None
    return value


def _assert_decimals(*values: Decimal | None) -> None:
    for value in values:
        assert value is None or type(value) is Decimal, value


def _levels(raw: Any) -> list[tuple[Decimal, Decimal]]:
    return [(Decimal(level["price"]), Decimal(level["size"])) for level in raw or []]


def _check_event(obj: dict[str, Any], event: FeedEvent) -> None:
    """Compare a parsed event with the raw object it came from."""
    kind = _expected_kind(obj)
    assert kind is not None
    assert EVENT_TYPE_OF[type(event)] == kind
    if isinstance(event, BookSnapshot):
        assert event.asset_id == obj["asset_id"]
        assert event.condition_id == obj.get("market", "")
        assert event.timestamp_ms == _ts(obj)
        bids = obj["bids"] if "bids" in obj else obj.get("buys")
        asks = obj["asks"] if "asks" in obj else obj.get("sells")
        assert [(lv.price, lv.size) for lv in event.bids] == _levels(bids)
        assert [(lv.price, lv.size) for lv in event.asks] == _levels(asks)
        _assert_decimals(*(lv.price for lv in event.bids + event.asks))
        assert event.tick_size == _dec(obj.get("tick_size"))
        assert event.last_trade_price == _dec(obj.get("last_trade_price"))
    elif isinstance(event, PriceChange):
        assert event.condition_id == obj.get("market", "")
        assert event.timestamp_ms == _ts(obj)
        if "price_changes" in obj:
            entries = [(e["asset_id"], e) for e in obj["price_changes"]]
        elif "changes" in obj:
            entries = [(obj["asset_id"], e) for e in obj["changes"]]
        else:
            entries = [(obj["asset_id"], obj)]
        assert len(event.changes) == len(entries)
        for change, (asset_id, raw) in zip(event.changes, entries, strict=True):
            assert change.asset_id == asset_id
            assert change.price == Decimal(raw["price"])
            assert change.size == Decimal(raw["size"])
            assert change.side == raw["side"].upper()
            assert change.has_top == ("best_bid" in raw and "best_ask" in raw)
            if change.has_top:
                assert change.best_bid == _top(raw, "best_bid")
                assert change.best_ask == _top(raw, "best_ask")
            _assert_decimals(change.price, change.size, change.best_bid, change.best_ask)
    elif isinstance(event, LastTradePrice):
        assert (event.asset_id, event.condition_id) == (obj["asset_id"], obj.get("market", ""))
        assert event.price == Decimal(obj["price"])
        assert event.size == Decimal(obj["size"])
        assert event.side == obj["side"].upper()
        assert event.timestamp_ms == _ts(obj)
        _assert_decimals(event.price, event.size)
    elif isinstance(event, TickSizeChange):
        assert event.asset_id == obj["asset_id"]
        assert event.old_tick_size == _dec(obj.get("old_tick_size"))
        assert event.new_tick_size == Decimal(obj["new_tick_size"])
        assert event.timestamp_ms == _ts(obj)
    elif isinstance(event, BestBidAsk):
        assert (event.asset_id, event.condition_id) == (obj["asset_id"], obj["market"])
        assert event.best_bid == _top(obj, "best_bid")
        assert event.best_ask == _top(obj, "best_ask")
        assert event.timestamp_ms == _ts(obj)
        _assert_decimals(event.best_bid, event.best_ask)
    elif isinstance(event, NewMarket):
        assert (event.market_id, event.condition_id, event.slug) == (
            obj["id"],
            obj["market"],
            obj["slug"],
        )
        assert event.assets_ids == tuple(obj.get("assets_ids") or obj["clob_token_ids"])
        assert event.outcomes == tuple(obj["outcomes"])
        assert event.timestamp_ms == _ts(obj)
    elif isinstance(event, MarketResolved):
        assert (event.market_id, event.condition_id) == (obj["id"], obj["market"])
        assert event.assets_ids == tuple(obj["assets_ids"])
        assert event.winning_asset_id == obj["winning_asset_id"]
        assert event.winning_outcome == obj["winning_outcome"]
        assert event.timestamp_ms == _ts(obj)


def _check_frame(raw: str | bytes) -> ParsedFrame:
    """Parse one real frame and check every object of it against the parser's output."""
    try:
        parsed = parse_frame(raw)
    except MalformedFrame:
        # Only a whole-frame failure, and only for something that is no object/array.
        value = orjson.loads(raw)
        assert not isinstance(value, dict | list)
        raise
    if parsed.control is not None:
        assert parsed.control in CONTROL_FRAMES
        assert parsed.events == [] and parsed.problems == []
        return parsed
    value = orjson.loads(raw)
    objects = value if isinstance(value, list) else [value]
    events = iter(parsed.events)
    expected_problems: list[str] = []
    expected_ignored: list[str] = []
    for obj in objects:
        kind = _expected_kind(obj)
        if not isinstance(obj, dict):
            expected_problems.append("not_an_object")
        elif kind is None:
            expected_problems.append("missing_field")
        elif kind == AMBIGUOUS:
            expected_problems.append("ambiguous_event")
        elif kind not in KNOWN_TYPES:  # user channel (order, trade) and anything else
            expected_ignored.append(kind)
        else:
            _check_event(obj, next(events))
    assert next(events, None) is None
    assert [p.kind for p in parsed.problems] == expected_problems
    assert parsed.ignored == expected_ignored
    return parsed


# ------------------------------------------------------------------ real samples


@pytest.mark.parametrize("path", _real_params())
def test_real_sample_parses(path: Path) -> None:
    frames = _frames_of(path)
    assert frames
    for raw in frames:
        try:
            _check_frame(raw)
        except MalformedFrame as exc:
            assert exc.kind == "not_an_object"


def _summary(path: Path) -> tuple[Counter[str], Counter[str], Counter[str]]:
    events: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    controls: Counter[str] = Counter()
    for raw in _frames_of(path):
        parsed = parse_frame(raw)
        events.update(EVENT_TYPE_OF[type(e)] for e in parsed.events)
        problems.update(p.kind for p in parsed.problems)
        if parsed.control:
            controls[parsed.control] += 1
    return events, problems, controls


@pytest.mark.parametrize(
    ("relative", "events", "controls"),
    [
        # Counts recorded in ../shared/data/real/PROVENANCE.md.
        pytest.param(
            "adriancova-polymarket-bot-v2/market-ws-frames-h1-run-8.jsonl",
            {"book": 5, "price_change": 20, "last_trade_price": 2},
            {"PONG": 2},
            id="adriancova-h1-run-8",
        ),
        pytest.param(
            "adriancova-polymarket-bot-v2/ws-market-v2-session.jsonl",
            {"book": 1, "new_market": 1},
            {"PONG": 5},
            id="adriancova-v2-session",
        ),
        pytest.param(
            "enricobignozzi-polymarket/native_exact_arb_ws_frames.jsonl",
            {"book": 28, "price_change": 51, "best_bid_ask": 58},
            {},
            id="enricobignozzi",
        ),
    ],
)
def test_recorded_sessions_counts(
    relative: str, events: dict[str, int], controls: dict[str, int]
) -> None:
    got_events, problems, got_controls = _summary(SHIPPED_REAL / relative)
    assert dict(got_events) == events
    assert dict(got_controls) == controls
    assert not problems


@pytest.mark.parametrize(
    ("relative", "records"),
    [
        # Record counts of PROVENANCE.md; the orderbook file is the first 10 of its 248 states.
        (f"{CAIO}/15m/sol/trades/1765450800up.json", 137),
        (f"{CAIO}/15m/sol/trades/1765450800down.json", 110),
        (f"{CAIO}/15m/sol/orderbooks/1765450800up.first10.json", 10),
    ],
)
def test_derived_records_have_no_asset_id(relative: str, records: int) -> None:
    """Caiooooo's derived trades and L2 states carry no asset_id: each is a problem, not an event."""
    (raw,) = _frames_of(SHIPPED_REAL / relative)
    parsed = parse_frame(raw)
    assert parsed.events == []
    assert len(parsed.problems) == records


def _source_dirs() -> list[str]:
    return sorted(p.name for p in SHIPPED_REAL.iterdir() if p.is_dir())


@pytest.mark.parametrize("source", _source_dirs())
def test_shipped_samples_match_shared(source: str) -> None:
    """Each shipped sample is a byte copy of its shared original (subsets: a prefix of it)."""
    shared_dir = SHARED_REAL / source
    if not shared_dir.is_dir():
        pytest.skip(f"optional extra {shared_dir} is absent ({SHARED_HINT})")
    differing = []
    for path in sorted(p for p in (SHIPPED_REAL / source).rglob("*") if p.is_file()):
        relative = path.relative_to(SHIPPED_REAL).as_posix()
        if relative in SHIPPED_SUBSETS:
            original, records = SHIPPED_SUBSETS[relative]
            full = (SHARED_REAL / original).read_bytes()
            ok = (
                full.startswith(path.read_bytes()[: -len(b"\n]")])
                and orjson.loads(path.read_bytes()) == orjson.loads(full)[:records]
            )
        else:
            ok = (SHARED_REAL / relative).read_bytes() == path.read_bytes()
        if not ok:
            differing.append(relative)
    assert differing == []


def test_shipped_replay_captures_match_shared() -> None:
    if not SHARED_REPLAY.is_dir():
        pytest.skip(f"optional extra {SHARED_REPLAY} is absent ({SHARED_HINT})")
    for shipped, original in SHIPPED_REPLAY.items():
        data = (REPLAY / shipped).read_bytes()
        if shipped.endswith(".gz"):
            data = gzip.decompress(data)
        assert data == (SHARED_REPLAY / original).read_bytes(), shipped


def test_every_shared_sample_is_shipped_or_an_extra() -> None:
    """A sample added to shared/data/real must be shipped (whole or in part) or listed."""
    if not SHARED_REAL.is_dir():
        pytest.skip(f"optional extra {SHARED_REAL} is absent ({SHARED_HINT})")
    covered = {p.relative_to(SHIPPED_REAL).as_posix() for p in _sample_files(SHIPPED_REAL)}
    covered |= {original for original, _ in SHIPPED_SUBSETS.values()}
    covered |= set(SHARED_EXTRAS)
    shared = {p.relative_to(SHARED_REAL).as_posix() for p in _sample_files(SHARED_REAL)}
    assert sorted(shared - covered) == []
    assert sorted(set(SHARED_EXTRAS) - shared) == []


def _one(relative: str) -> FeedEvent:
    parsed = parse_frame((SHIPPED_REAL / relative).read_bytes())
    assert parsed.problems == []
    assert len(parsed.events) == 1
    return parsed.events[0]


def test_legacy_single_level_price_change() -> None:
    event = _one("nautilus_trader/ws_messages/price_change.json")
    assert isinstance(event, PriceChange)
    assert event.condition_id == NT_MARKET
    assert event.timestamp_ms == 1723967931411
    assert len(event.changes) == 1
    change = event.changes[0]
    assert change.asset_id == NT_ASSET
    assert change.price == Decimal("0.514") and type(change.price) is Decimal
    assert change.size == Decimal("21574.08")
    assert change.side == "SELL"
    assert change.best_bid is None and change.best_ask is None


def test_current_price_change_v2() -> None:
    event = _one("nautilus_trader/ws_messages/price_change_v2.json")
    assert isinstance(event, PriceChange)
    assert (
        event.condition_id == "0x5f65177b394277fd294cd75650044e32ba009a95022d88a0c1d565897d72f8f1"
    )
    assert event.timestamp_ms == 1729084877448
    asset = "52114319501245915516055106046884209969926127482827954674443846427813813222426"
    assert [(c.asset_id, c.price, c.size, c.side) for c in event.changes] == [
        (asset, Decimal("0.6"), Decimal("3300"), "BUY"),
        (asset, Decimal("0.5"), Decimal("3400"), "BUY"),
        (asset, Decimal("0.7"), Decimal("3400"), "BUY"),
    ]
    assert {(c.best_bid, c.best_ask) for c in event.changes} == {(Decimal("0.6"), Decimal("0.7"))}


def test_legacy_changes_price_change() -> None:
    event = _one("aaimek-polymarket-data-collection/price_change_message_example.json")
    assert isinstance(event, PriceChange)
    assert event.condition_id == AAIMEK_MARKET
    assert event.timestamp_ms == 1737487191055
    assert [(c.asset_id, c.price, c.size, c.side) for c in event.changes] == [
        (AAIMEK_ASSET, Decimal("0.644"), Decimal("0"), "BUY")
    ]


def test_book_without_event_type() -> None:
    event = _one("aaimek-polymarket-data-collection/book_message_example.json")
    assert isinstance(event, BookSnapshot)
    assert event.asset_id == AAIMEK_ASSET
    assert event.condition_id == AAIMEK_MARKET
    assert event.timestamp_ms == 1737487185966
    assert event.hash == "a983441a2c69866fff45bf16b8c5c66858f68379"
    assert event.bids[0].price == Decimal("0.001") and event.bids[0].size == Decimal("100")
    assert event.bids[2].size == Decimal("428.65")
    assert event.asks
    assert all(type(lv.price) is Decimal for lv in event.bids + event.asks)


def test_ws_book() -> None:
    event = _one("nautilus_trader/ws_messages/book.json")
    assert isinstance(event, BookSnapshot)
    assert (event.asset_id, event.condition_id) == (NT_ASSET, NT_MARKET)
    assert event.timestamp_ms == 1728799418260
    assert event.hash == "655a38d4977427b086c25b985993691b753ed166"
    assert (len(event.bids), len(event.asks)) == (76, 86)
    assert (event.bids[0].price, event.bids[0].size) == (Decimal("0.001"), Decimal("9000023.58"))
    assert (event.bids[-1].price, event.bids[-1].size) == (Decimal("0.511"), Decimal("1304.72"))
    assert (event.asks[-1].price, event.asks[-1].size) == (Decimal("0.514"), Decimal("20230.87"))
    assert event.tick_size is None and event.last_trade_price is None


def test_ws_last_trade_price() -> None:
    event = _one("nautilus_trader/ws_messages/last_trade_price.json")
    assert event == LastTradePrice(
        asset_id="21742633143463906290569050155826241533067272736897614950488156847949938836455",
        condition_id=NT_MARKET,
        price=Decimal("0.491"),
        size=Decimal("85.36"),
        side="SELL",
        timestamp_ms=1724564136087,
    )


def test_ws_tick_size_change() -> None:
    event = _one("nautilus_trader/ws_messages/tick_size_change.json")
    assert isinstance(event, TickSizeChange)
    assert event.asset_id == (
        "115474063863764126958837769719736461272619491980773624567012766320777398670353"
    )
    assert (event.old_tick_size, event.new_tick_size) == (Decimal("0.01"), Decimal("0.001"))
    assert event.timestamp_ms == 1739068041853


def test_custom_feature_events() -> None:
    bba = _one("nautilus_trader/rust_test_data/ws_market_best_bid_ask_msg.json")
    assert bba == BestBidAsk(
        asset_id="85354956062430465315924116860125388538595433819574542752031640332592237464430",
        condition_id="0x0005c0d312de0be897668695bae9f32b624b4a1ae8b140c49f08447fcc74f442",
        best_bid=Decimal("0.73"),
        best_ask=Decimal("0.77"),
        timestamp_ms=1766789469958,
    )
    yes = "76043073756653678226373981964075571318267289248134717369284518995922789326425"
    no = "31690934263385727664202099278545688007799199447969475608906331829650099442770"
    new = _one("nautilus_trader/rust_test_data/ws_market_new_market_msg.json")
    assert isinstance(new, NewMarket)
    assert new.market_id == "1031769"
    assert new.slug == "nvda-above-240-on-january-30-2026"
    assert new.assets_ids == (yes, no)
    assert new.outcomes == ("Yes", "No")
    resolved = _one("nautilus_trader/rust_test_data/ws_market_resolved_msg.json")
    assert resolved == MarketResolved(
        market_id="1031769",
        condition_id="0x311d0c4b6671ab54af4970c06fcf58662516f5168997bdda209ec3db5aa6b0c1",
        assets_ids=(yes, no),
        winning_asset_id=yes,
        winning_outcome="Yes",
        timestamp_ms=1766790415550,
    )


def test_price_change_without_event_type_two_assets() -> None:
    event = _one("nautilus_trader/rust_test_data/ws_quotes.json")
    assert isinstance(event, PriceChange)
    assert event.timestamp_ms == 1703875201000
    assert [(c.price, c.side, c.best_bid, c.best_ask) for c in event.changes] == [
        (Decimal("0.51"), "BUY", Decimal("0.51"), Decimal("0.52")),
        (Decimal("0.49"), "SELL", Decimal("0.48"), Decimal("0.49")),
    ]
    assert len({c.asset_id for c in event.changes}) == 2


def test_v2_session_book_with_empty_last_trade() -> None:
    frames = _frames_of(SHIPPED_REAL / "adriancova-polymarket-bot-v2/ws-market-v2-session.jsonl")
    book = parse_frame(frames[0]).events[0]
    assert isinstance(book, BookSnapshot)
    assert book.asset_id == (
        "663574927012476832975694178961957910328055987427402067619466963999000625152"
    )
    assert book.bids == () and book.asks == ()
    assert book.tick_size == Decimal("0.01")
    assert book.last_trade_price is None  # "" on the wire
    assert book.timestamp_ms == 1791238858575


@pytest.mark.parametrize(
    "relative",
    [
        "nautilus_trader/ws_messages/order_placement.json",
        "nautilus_trader/ws_messages/order_cancel.json",
        "nautilus_trader/ws_messages/user_trade1.json",
        "nautilus_trader/ws_messages/user_trade4.json",
        "nautilus_trader/rust_test_data/ws_user_order_msg.json",
        "nautilus_trader/rust_test_data/ws_user_trade_msg.json",
    ],
)
def test_user_channel_messages_are_ignored_event_types(relative: str) -> None:
    """Types the market channel does not define are normal input, counted apart, not errors."""
    parsed = parse_frame((SHIPPED_REAL / relative).read_bytes())
    assert parsed.events == [] and parsed.problems == []
    assert parsed.ignored in (["order"], ["trade"])
    assert parsed.event_types == parsed.ignored


# ------------------------------------------------------------------ replay captures


def _capture_lines(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return [line for line in data.splitlines() if line.strip()]


CAPTURES = [
    *sorted(REPLAY.glob("*.jsonl")),
    REPLAY / "aaimek-2025-01.jsonl.gz",
    EXAMPLES / "updown-2025-12-11.jsonl.gz",
]


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.name)
def test_replay_capture_parses_without_problems(capture: Path) -> None:
    lines = _capture_lines(capture)
    assert lines
    counts: Counter[str] = Counter()
    for line in lines:
        parsed = parse_frame(line)
        assert parsed.problems == [], (line[:120], parsed.problems)
        assert parsed.control is None
        assert parsed.events
        counts.update(EVENT_TYPE_OF[type(e)] for e in parsed.events)
    expected_path = capture.with_name(capture.name.split(".jsonl")[0] + ".expected.json")
    if expected_path.exists():
        expected = orjson.loads(expected_path.read_bytes())["counts"]
        assert len(lines) == expected["frames"]
        assert dict(counts) == expected["events_by_type"]


@pytest.mark.parametrize("capture", CAPTURES, ids=lambda p: p.name)
def test_memo_path_equals_the_checked_path_on_recorded_frames(capture: Path) -> None:
    """
    One long-lived parser (the feed's) builds most events from its memos;
    each frame parsed by a fresh parser (every field checked) gives the same
    events. Frames of recorded sessions repeat their prices, sizes and tops.
    """
    warm = FrameParser()
    lines = _capture_lines(capture)
    for line in lines:
        warm.parse(line)
    for line in lines:
        assert warm.parse(line).events == parse_frame(line).events, line[:200]


def test_expected_counts_cover_both_reference_captures() -> None:
    for capture in (REPLAY / "aaimek-2025-01.jsonl.gz", EXAMPLES / "updown-2025-12-11.jsonl.gz"):
        assert capture.with_name(capture.name.split(".jsonl")[0] + ".expected.json").exists()


# ------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("text", sorted(CONTROL_FRAMES))
def test_control_frames(text: str) -> None:
    for raw in (text, text.encode(), f"{text}\n"):
        parsed = parse_frame(raw)
        assert parsed.control == text
        assert parsed.events == [] and parsed.problems == []


def test_control_frame_set() -> None:
    assert {"PONG", "INVALID OPERATION", "NO NEW ASSETS"} == CONTROL_FRAMES


def _pc_entry(**overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "asset_id": "111",
        "price": "0.5",
        "size": "10",
        "side": "BUY",
        "hash": "h",
    }
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not None}


def _pc(*entries: dict[str, Any]) -> bytes:
    return orjson.dumps(
        {
            "event_type": "price_change",
            "market": "0xm",
            "timestamp": "1757908892351",
            "price_changes": list(entries),
        }
    )


def test_empty_and_zero_best_prices() -> None:
    """
    ``""``, a bid <= 0 and an ask >= 1 all spell an empty side (section 11),
    also from the memos (a parser that has seen each string as bid and ask).
    """
    raw = _pc(
        _pc_entry(best_bid="", best_ask="0.6"),
        _pc_entry(best_bid="0", best_ask=""),
        _pc_entry(best_bid="0.4", best_ask="1"),
        _pc_entry(best_bid="0.00", best_ask="1.0"),
    )
    warm = FrameParser()
    warm.parse(_pc(*(_pc_entry(best_bid=v, best_ask=v) for v in ("", "0", "1", "0.00", "1.0"))))
    parsed = parse_frame(raw)
    assert warm.parse(raw).events == parsed.events
    assert parsed.problems == []
    (event,) = parsed.events
    assert isinstance(event, PriceChange)
    assert event.timestamp_ms == 1757908892351
    assert [(c.best_bid, c.best_ask, c.has_top) for c in event.changes] == [
        (None, Decimal("0.6"), True),
        (None, None, True),
        (Decimal("0.4"), None, True),
        (None, None, True),
    ]


@pytest.mark.parametrize(("side", "expected"), [("buy", "BUY"), ("sell", "SELL"), ("Sell", "SELL")])
def test_lowercase_side(side: str, expected: str) -> None:
    (event,) = parse_frame(_pc(_pc_entry(side=side))).events
    assert isinstance(event, PriceChange)
    assert event.changes[0].side == expected


def test_price_without_leading_zero() -> None:
    frame = orjson.dumps(
        {
            "event_type": "last_trade_price",
            "asset_id": "7",
            "market": "0xm",
            "price": ".48",
            "size": "219.217767",
            "side": "buy",
            "timestamp": "1750428146322",
        }
    )
    (event,) = parse_frame(frame).events
    assert event == LastTradePrice(
        "7", "0xm", Decimal("0.48"), Decimal("219.217767"), "BUY", 1750428146322
    )
    (pc,) = parse_frame(_pc(_pc_entry(price=".48", best_bid=".47", best_ask=".5"))).events
    assert isinstance(pc, PriceChange)
    assert (pc.changes[0].price, pc.changes[0].best_bid) == (Decimal("0.48"), Decimal("0.47"))


GOOD_BOOK = {
    "event_type": "book",
    "asset_id": "222",
    "market": "0xm",
    "bids": [{"price": "0.4", "size": "5"}],
    "asks": [{"price": "0.6", "size": "7"}],
    "timestamp": "1",
    "hash": "x",
}
GOOD_TRADE = {
    "event_type": "last_trade_price",
    "asset_id": "333",
    "market": "0xm",
    "price": "0.55",
    "size": "3",
    "side": "SELL",
    "timestamp": "2",
}


@pytest.mark.parametrize(
    ("bad", "kind"),
    [
        ({"event_type": "book", "market": "0xm", "bids": [], "asks": []}, "missing_field"),
        ({**GOOD_TRADE, "price": None}, "bad_number"),
        ({k: v for k, v in GOOD_TRADE.items() if k != "price"}, "missing_field"),
        ({**GOOD_TRADE, "price": "abc"}, "bad_number"),
        ({**GOOD_TRADE, "price": "NaN"}, "bad_number"),
        ({**GOOD_TRADE, "price": "Infinity"}, "bad_number"),
        ({**GOOD_TRADE, "price": True}, "bad_number"),
        ({**GOOD_TRADE, "price": "1.01"}, "price_out_of_range"),
        ({**GOOD_TRADE, "price": "-0.01"}, "price_out_of_range"),
        ({**GOOD_TRADE, "size": "-1"}, "negative_size"),
        ({**GOOD_BOOK, "bids": [{"price": "0.4", "size": "-5"}]}, "negative_size"),
        ({**GOOD_BOOK, "asks": [{"price": "2", "size": "5"}]}, "price_out_of_range"),
        ({"asset_id": "1", "price": "0.5"}, "missing_field"),
        ({"asset_id": "1", "price": "0.5", "side": "BUY", "size": "1"}, "ambiguous_event"),
        ("not an object", "not_an_object"),
        (42, "not_an_object"),
        (None, "not_an_object"),
        ([GOOD_BOOK], "not_an_object"),
        (
            {"event_type": "price_change", "price_changes": [_pc_entry(size="-3")]},
            "negative_size",
        ),
        (
            {"event_type": "price_change", "price_changes": [_pc_entry(price=None)]},
            "missing_field",
        ),
    ],
)
def test_bad_event_in_array_keeps_the_good_ones(bad: Any, kind: str) -> None:
    frame = orjson.dumps([GOOD_BOOK, bad, GOOD_TRADE])
    parsed = parse_frame(frame)
    assert [p.kind for p in parsed.problems] == [kind]
    assert all(isinstance(p, MalformedFrame) for p in parsed.problems)
    assert len(parsed.events) == 2
    book, trade = parsed.events
    assert isinstance(book, BookSnapshot) and book.asset_id == "222"
    assert book.bids[0].price == Decimal("0.4") and book.asks[0].size == Decimal("7")
    assert isinstance(trade, LastTradePrice) and trade.price == Decimal("0.55")
    assert trade.timestamp_ms == 2


@pytest.mark.parametrize("event_type", ["order", "trade", "settlement_preview"])
def test_undefined_event_type_beside_known_ones(event_type: str) -> None:
    parsed = parse_frame(orjson.dumps([GOOD_BOOK, {"event_type": event_type}, GOOD_TRADE]))
    assert parsed.problems == []
    assert parsed.ignored == [event_type]
    assert [type(e) for e in parsed.events] == [BookSnapshot, LastTradePrice]


def test_one_bad_entry_costs_only_itself() -> None:
    frame = orjson.dumps(
        [
            {"event_type": "price_change", "market": "0xa", "price_changes": [_pc_entry()]},
            {
                "event_type": "price_change",
                "market": "0xb",
                "price_changes": [_pc_entry(), _pc_entry(price="7"), _pc_entry(price="0.3")],
            },
            {"event_type": "price_change", "market": "0xc", "price_changes": [_pc_entry(size="x")]},
        ]
    )
    parsed = parse_frame(frame)
    assert [
        (e.condition_id, len(e.changes)) for e in parsed.events if isinstance(e, PriceChange)
    ] == [
        ("0xa", 1),
        ("0xb", 2),  # the good siblings of the bad entry
    ]
    assert [p.kind for p in parsed.problems] == ["price_out_of_range", "bad_number"]
    assert "price_changes[1]" in parsed.problems[0].detail
    assert parsed.event_types == ["price_change", "price_change", "price_change"]


def test_not_utf8_bytes() -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_frame(b'{"event_type": "book", "asset_id": "\xff\xfe"}')
    assert info.value.kind == "not_utf8"


@pytest.mark.parametrize(
    "raw",
    [
        orjson.dumps([GOOD_BOOK])[:-5],
        b'{"event_type": "book"',
        "",
        "   ",
        "PING",
        "pong",
        "[{]",
    ],
)
def test_truncated_or_invalid_json(raw: str | bytes) -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_frame(raw)
    assert info.value.kind == "invalid_json"


@pytest.mark.parametrize("raw", ["1", '"book"', "null", "true", "1.5"])
def test_json_scalar_frame(raw: str) -> None:
    with pytest.raises(MalformedFrame) as info:
        parse_frame(raw)
    assert info.value.kind == "not_an_object"


def test_empty_array_frame() -> None:
    parsed = parse_frame("[]")
    assert parsed.events == [] and parsed.problems == [] and parsed.control is None


@pytest.mark.parametrize("stamp", ["\u00b2", "17\u2460"])
def test_unicode_digit_timestamp_is_a_problem_not_a_crash(stamp: str) -> None:
    frame = orjson.dumps({**GOOD_TRADE, "timestamp": stamp})
    parsed = parse_frame(frame)
    assert parsed.events == []
    assert [p.kind for p in parsed.problems] == ["bad_field"]


# ------------------------------------------------------------------ hypothesis

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)
number_text = st.decimals(allow_nan=True, allow_infinity=True).map(str) | st.sampled_from(
    ["", "0", "1", ".48", "-0.5", "1e3", "0x10", "1_0", " 0.5 ", "1e-999999"]
)
FIELD_NAMES = [
    "asset_id",
    "market",
    "price",
    "size",
    "side",
    "hash",
    "bids",
    "asks",
    "buys",
    "sells",
    "changes",
    "price_changes",
    "best_bid",
    "best_ask",
    "tick_size",
    "last_trade_price",
    "old_tick_size",
    "new_tick_size",
    "id",
    "assets_ids",
    "clob_token_ids",
    "outcomes",
    "winning_asset_id",
    "winning_outcome",
]
level = st.fixed_dictionaries({}, optional={"price": number_text, "size": number_text})
change_entry = st.fixed_dictionaries(
    {},
    optional={
        "asset_id": st.text(max_size=5) | json_scalars,
        "price": number_text | json_scalars,
        "size": number_text | json_scalars,
        "side": st.sampled_from(["BUY", "SELL", "buy", "sell", "", "HOLD"]) | json_scalars,
        "best_bid": number_text | json_scalars,
        "best_ask": number_text | json_scalars,
    },
)
field_value = (
    json_values
    | number_text
    | st.lists(level, max_size=3)
    | st.lists(change_entry, max_size=3)
    | st.lists(st.text(max_size=5), max_size=3)
)
timestamp_value = (
    st.integers()
    | st.from_regex(r"\A[0-9]{0,15}\Z")
    | st.text(st.sampled_from("0123456789\u00b2\u2460\u0663\uff11x "), max_size=15)
    | st.text(max_size=15)
    | json_scalars
)
event_objects = st.builds(
    lambda kind, fields, extra, stamp: {
        **extra,
        **fields,
        "event_type": kind,
        **({} if stamp is None else {"timestamp": stamp[0]}),
    },
    st.sampled_from(KNOWN_TYPES) | st.sampled_from(["order", "trade", ""]) | json_scalars,
    st.dictionaries(st.sampled_from(FIELD_NAMES), field_value, max_size=8),
    st.dictionaries(
        st.text(max_size=8).filter(lambda k: k not in ("timestamp", "event_type")),
        json_values,
        max_size=3,
    ),
    st.none() | st.tuples(timestamp_value),
)

price_text = st.sampled_from(["", "0", "1", ".5", "0.01", "0.999"]) | st.decimals(
    min_value=0, max_value=1, places=3
).map(str)
size_text = st.sampled_from(["0", "10", "1e3"]) | st.decimals(min_value=0, places=2).map(str)
sides = st.sampled_from(["BUY", "SELL", "buy", "sell"])
ids = st.from_regex(r"\A[0-9]{1,78}\Z")
valid_level = st.fixed_dictionaries({"price": price_text, "size": size_text})
valid_entry = st.fixed_dictionaries(
    {"asset_id": ids, "price": price_text, "size": size_text, "side": sides},
    optional={"best_bid": price_text, "best_ask": price_text, "hash": st.text(max_size=5)},
)
short_text = st.text(max_size=6)
TEMPLATES: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "book": {
        "asset_id": ids,
        "market": short_text,
        "bids": st.lists(valid_level, max_size=3),
        "asks": st.lists(valid_level, max_size=3),
        "hash": short_text,
        "tick_size": price_text,
        "last_trade_price": price_text,
    },
    "price_change": {"market": short_text, "price_changes": st.lists(valid_entry, max_size=3)},
    "last_trade_price": {
        "asset_id": ids,
        "market": short_text,
        "price": price_text,
        "size": size_text,
        "side": sides,
    },
    "tick_size_change": {
        "asset_id": ids,
        "market": short_text,
        "old_tick_size": price_text,
        "new_tick_size": price_text,
    },
    "best_bid_ask": {
        "asset_id": ids,
        "market": short_text,
        "best_bid": price_text,
        "best_ask": price_text,
        "spread": price_text,
    },
    "new_market": {
        "id": short_text | st.integers(),
        "market": short_text,
        "question": short_text,
        "slug": short_text,
        "assets_ids": st.lists(ids, max_size=2),
        "outcomes": st.lists(short_text, max_size=2),
    },
    "market_resolved": {
        "id": short_text,
        "market": short_text,
        "assets_ids": st.lists(ids, max_size=2),
        "winning_asset_id": ids,
        "winning_outcome": short_text,
    },
}


def _mutate(
    kind: str,
    base: dict[str, Any],
    overrides: dict[str, Any],
    drop: set[str],
    stamp: tuple[Any] | None,
) -> dict[str, Any]:
    obj = {k: v for k, v in base.items() if k not in drop} | overrides
    obj["event_type"] = kind
    if stamp is not None:
        obj["timestamp"] = stamp[0]
    return obj


# Valid objects of every type with a few fields replaced or removed.
near_valid_objects = st.one_of(
    [
        st.builds(
            _mutate,
            st.just(kind),
            st.fixed_dictionaries(template),
            st.dictionaries(st.sampled_from(FIELD_NAMES), field_value, max_size=2),
            st.sets(st.sampled_from(sorted(template)), max_size=2),
            st.none() | st.tuples(timestamp_value),
        )
        for kind, template in TEMPLATES.items()
    ]
)
any_object = event_objects | near_valid_objects
frames_of_objects = any_object | st.lists(any_object | json_values, max_size=4)


def _parse_or_malformed(raw: str | bytes) -> ParsedFrame | None:
    """
    Parse ``raw`` with a fresh parser, then twice more with one parser: the
    second time its memos hold every string of the frame, so the common
    events take the memo path (FrameParser.level_changes, .last_trade), and
    must give what the checked path gave, problems included.
    """
    try:
        parsed = parse_frame(raw)
    except MalformedFrame as exc:
        assert exc.kind in ("not_utf8", "invalid_json", "not_an_object")
        return None
    assert all(isinstance(p, MalformedFrame) for p in parsed.problems)
    warm = FrameParser()
    warm.parse(raw)
    again = warm.parse(raw)
    assert again.events == parsed.events
    assert _reported(again) == _reported(parsed)
    return parsed


def _reported(parsed: ParsedFrame) -> list[tuple[str, str]]:
    return [(p.kind, p.detail) for p in parsed.problems]


@given(st.binary(max_size=200))
def test_random_bytes_never_crash(raw: bytes) -> None:
    _parse_or_malformed(raw)


@given(st.text(max_size=200))
def test_random_text_never_crash(raw: str) -> None:
    _parse_or_malformed(raw)


@given(json_values)
def test_random_json_never_crash(value: Any) -> None:
    _parse_or_malformed(json.dumps(value))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(frames_of_objects)
def test_random_event_objects_never_crash(value: Any) -> None:
    parsed = _parse_or_malformed(json.dumps(value))
    if parsed is not None:
        objects = value if isinstance(value, list) else [value]
        # Each object is an event, an ignored type, or reported; a price change
        # can be an event and reports for its bad entries at once.
        used = len(parsed.events) + len(parsed.ignored)
        assert used <= len(objects) <= used + len(parsed.problems)


asset_ids = st.from_regex(r"\A[1-9][0-9]{0,77}\Z")
prices = st.builds(
    lambda units, places: (Decimal(units) / Decimal(10) ** places).quantize(
        Decimal(1).scaleb(-places)
    ),
    st.integers(0, 10_000),
    st.integers(2, 4),
).filter(lambda d: d <= 1)
sizes = st.decimals(min_value=0, max_value=10**9, places=2)
entries = st.lists(
    st.tuples(
        asset_ids,
        prices,
        sizes,
        st.sampled_from(["BUY", "SELL", "buy", "sell"]),
        st.none() | prices,
        st.none() | prices,
    ),
    min_size=1,
    max_size=6,
)


@given(entries, st.integers(0, 2**53), st.text(max_size=66))
def test_price_change_round_trip(
    generated: list[tuple[str, Decimal, Decimal, str, Decimal | None, Decimal | None]],
    timestamp: int,
    market: str,
) -> None:
    frame = {
        "event_type": "price_change",
        "market": market,
        "timestamp": str(timestamp),
        "price_changes": [
            {
                "asset_id": asset,
                "price": str(price),
                "size": str(size),
                "side": side,
                "hash": "0xabc",
                "best_bid": "" if bid is None else str(bid),
                "best_ask": "" if ask is None else str(ask),
            }
            for asset, price, size, side, bid, ask in generated
        ],
    }
    raw = orjson.dumps(frame)
    parsed = parse_frame(raw)
    assert parsed.problems == []
    warm = FrameParser()  # its second parse takes the memo path: the same events
    warm.parse(raw)
    assert warm.parse(raw).events == parsed.events
    (event,) = parsed.events
    assert isinstance(event, PriceChange)
    assert event.condition_id == market
    assert event.timestamp_ms == timestamp

    def top(value: Decimal | None, empty: bool) -> Decimal | None:
        return None if value is None or empty else value

    assert [
        (c.asset_id, c.price, c.size, c.side, c.best_bid, c.best_ask) for c in event.changes
    ] == [
        (a, p, s, side.upper(), top(b, b is not None and b <= 0), top(k, k is not None and k >= 1))
        for a, p, s, side, b, k in generated
    ]
    for change, (_, price, *_rest) in zip(event.changes, generated, strict=True):
        assert str(change.price) == str(price)  # same digits, not just the same value


# ------------------------------------------------------------------ client messages


def test_encode_subscribe() -> None:
    assert orjson.loads(encode_subscribe(["1", "2"])) == {
        "assets_ids": ["1", "2"],
        "type": "market",
    }
    assert orjson.loads(encode_subscribe([], custom_feature_enabled=True)) == {
        "assets_ids": [],
        "type": "market",
        "custom_feature_enabled": True,
    }
    assert isinstance(encode_subscribe(["1"]), str)


def test_encode_operation() -> None:
    assert orjson.loads(encode_operation("subscribe", iter(["a", "b"]))) == {
        "operation": "subscribe",
        "assets_ids": ["a", "b"],
    }
    assert orjson.loads(encode_operation("subscribe", ["a"], custom_feature_enabled=True)) == {
        "operation": "subscribe",
        "assets_ids": ["a"],
        "custom_feature_enabled": True,
    }
    # custom_feature_enabled only makes sense when subscribing
    assert orjson.loads(encode_operation("unsubscribe", ["a"], custom_feature_enabled=True)) == {
        "operation": "unsubscribe",
        "assets_ids": ["a"],
    }


def _ids(count: int, digits: int = 77) -> list[str]:
    return [str(10 ** (digits - 1) + i * 7919) for i in range(count)]


def _all_encodings(chunk: list[str]) -> list[str]:
    return [
        encode_subscribe(chunk),
        encode_subscribe(chunk, custom_feature_enabled=True),
        encode_operation("subscribe", chunk, custom_feature_enabled=True),
        encode_operation("unsubscribe", chunk),
    ]


@pytest.mark.parametrize("max_bytes", [40 * 1024, 1024, 4096])
def test_chunk_asset_ids_respects_max_bytes(max_bytes: int) -> None:
    ids = _ids(10_000)
    assert all(len(i) == 77 for i in ids)
    chunks = chunk_asset_ids(ids, max_bytes)
    assert [i for chunk in chunks for i in chunk] == ids
    for chunk in chunks:
        assert chunk
        for message in _all_encodings(chunk):
            assert len(message.encode()) <= max_bytes
    # not wastefully small: every chunk but the last could not take the next id
    sizes = [len(c) for c in chunks]
    per_chunk = (max_bytes - 96) // 80
    assert all(size == per_chunk for size in sizes[:-1])
    assert len(chunks) == -(-10_000 // per_chunk)


def test_chunk_asset_ids_small_inputs() -> None:
    assert chunk_asset_ids([], 40 * 1024) == []
    assert chunk_asset_ids(["1"], 40 * 1024) == [["1"]]


@given(st.lists(asset_ids, max_size=300), st.integers(1024, 8192))
def test_chunk_asset_ids_property(ids: list[str], max_bytes: int) -> None:
    chunks = chunk_asset_ids(ids, max_bytes)
    assert [i for chunk in chunks for i in chunk] == ids
    for chunk in chunks:
        assert chunk
        for message in _all_encodings(chunk):
            assert len(message.encode()) <= max_bytes

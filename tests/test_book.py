"""The book model reproduces the recorded final state of every replay capture."""

from __future__ import annotations

import gzip
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from polystream.book import AssetBook, Books, display_price
from polystream.feed.protocol import BookSnapshot, parse_frame

DATA = Path(__file__).parent / "data" / "replay"
EXAMPLES = Path(__file__).parent.parent / "examples"

CAPTURES = [
    (EXAMPLES / "updown-2025-12-11.jsonl.gz", EXAMPLES / "updown-2025-12-11.expected.json"),
    (DATA / "aaimek-2025-01.jsonl.gz", DATA / "aaimek-2025-01.expected.json"),
]


def _lines(path: Path) -> list[bytes]:
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        return [line for line in handle.read().splitlines() if line.strip()]


def _dec(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


@pytest.mark.parametrize(("capture", "expected_path"), CAPTURES, ids=lambda p: p.name)
def test_final_state_matches_expected(capture: Path, expected_path: Path) -> None:
    expected = orjson.loads(expected_path.read_bytes())
    books = Books()
    counts: dict[str, int] = {}
    for line in _lines(capture):
        parsed = parse_frame(line)
        assert not parsed.problems
        for event in parsed.events:
            name = type(event).__name__
            counts[name] = counts.get(name, 0) + 1
        books.apply(parsed.events)
    assert set(books) == set(expected["assets"])
    for asset_id, want in expected["assets"].items():
        top = books[asset_id].top()
        assert top.best_bid == _dec(want["best_bid"]), asset_id
        assert top.best_ask == _dec(want["best_ask"]), asset_id
        assert top.midpoint == _dec(want["midpoint"]), asset_id
        assert top.spread == _dec(want["spread"]), asset_id
        assert top.last_trade_price == _dec(want["last_trade_price"]), asset_id
        assert top.display == _dec(want["display_price"]), asset_id
        assert len(books[asset_id].bids.levels) == want["bid_levels"]
        assert len(books[asset_id].asks.levels) == want["ask_levels"]


def test_level_order_is_not_trusted() -> None:
    frame = orjson.dumps(
        {
            "event_type": "book",
            "asset_id": "1",
            "market": "0x1",
            "bids": [
                {"price": "0.4", "size": "5"},
                {"price": "0.45", "size": "1"},
                {"price": "0.3", "size": "9"},
            ],
            "asks": [
                {"price": ".5", "size": "1"},
                {"price": "0.7", "size": "2"},
                {"price": "0.48", "size": "0"},
            ],
            "timestamp": "1",
            "hash": "x",
        }
    )
    (event,) = parse_frame(frame).events
    assert isinstance(event, BookSnapshot)
    book = AssetBook("1")
    book.apply_snapshot(event)
    assert (book.best_bid, book.best_ask) == (Decimal("0.45"), Decimal("0.5"))
    assert book.top().display == Decimal("0.475")


def test_removing_best_level_falls_back_to_next() -> None:
    books = Books()
    frame = (
        b'{"event_type":"price_change","market":"m","timestamp":"5","price_changes":['
        b'{"asset_id":"a","price":"0.5","size":"10","side":"buy","hash":"h","best_bid":"","best_ask":""},'
        b'{"asset_id":"a","price":"0.52","size":"3","side":"BUY","hash":"h"},'
        b'{"asset_id":"a","price":"0.52","size":"0","side":"BUY","hash":"h"}]}'
    )
    books.apply(parse_frame(frame).events)
    book = books["a"]
    assert book.best_bid == Decimal("0.5")
    assert book.best_ask is None
    assert book.top().display is None


def test_display_price_rule() -> None:
    d = Decimal
    assert display_price(d("0.40"), d("0.50"), d("0.9")) == d("0.45")
    assert display_price(d("0.40"), d("0.51"), d("0.9")) == d("0.9")
    assert display_price(d("0.40"), d("0.51"), None) == d("0.455")
    assert display_price(None, d("0.51"), d("0.2")) == d("0.2")
    assert display_price(None, None, None) is None

"""Gamma market import: decoding real Gamma objects and upserting them into ``markets``."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest

from polystream.errors import ImportDataError
from polystream.store.db import connect
from polystream.store.markets import (
    GammaMarket,
    import_markets_file,
    parse_gamma_payload,
    upsert_markets,
)

TESTS = Path(__file__).parent
REAL = TESTS / "data" / "real" / "nautilus_trader" / "rust_test_data"
GAMMA_OBJECTS = sorted(REAL.glob("gamma_market*.json"))
UPDOWN = TESTS.parent / "examples" / "updown-2025-12-11.markets.json"
AAIMEK = TESTS / "data" / "replay" / "aaimek-2025-01.markets.json"


def _market_row(dsn: str, market_id: str) -> dict[str, Any]:
    with connect(dsn) as conn, conn.cursor() as cur:
        cur.execute("SELECT * FROM markets WHERE id = %s", (market_id,))
        row = cur.fetchone()
        assert row is not None and cur.description is not None
        return {col.name: value for col, value in zip(cur.description, row, strict=True)}


def test_real_gamma_objects_decode() -> None:
    assert len(GAMMA_OBJECTS) == 7
    for path in GAMMA_OBJECTS:
        (market,) = parse_gamma_payload(path.read_bytes())
        assert market.id.isdigit()
        assert len(market.outcomes) == len(market.clob_token_ids) == len(market.outcome_prices)
        assert all(isinstance(p, Decimal) for p in market.outcome_prices)


@pytest.mark.parametrize(
    ("name", "bid", "ask"),
    [
        ("gamma_market_closed_zero_zero_legacy.json", None, None),  # bestBid 0, bestAsk 1
        ("gamma_market_sports_market_money_line.json", Decimal("0.999"), None),  # bestAsk 1
        ("gamma_market_closed_binary_accepting_false.json", None, Decimal("0.001")),
    ],
)
def test_gamma_empty_sides_are_no_quotes(
    name: str, bid: Decimal | None, ask: Decimal | None
) -> None:
    """A Gamma bestBid of 0 or bestAsk of 1 is an empty side, never a price (protocol.md)."""
    market = GammaMarket.from_gamma(orjson.loads((REAL / name).read_bytes()))
    assert (market.best_bid, market.best_ask) == (bid, ask)


def test_from_gamma_fields() -> None:
    market = GammaMarket.from_gamma(orjson.loads((REAL / "gamma_market.json").read_bytes()))
    assert market.id == "1557558"
    assert market.condition_id == (
        "0x78443f961b9a65869dcb39359de9960165c7e5cbad0904eac7f29cd77872a63b"
    )
    assert market.slug == "btc-updown-5m-1773307200"
    assert market.outcomes == ("Up", "Down")
    assert market.outcome_prices == (Decimal("0.505"), Decimal("0.495"))
    assert market.clob_token_ids[0].startswith("1042398980388071360523998001514085214677")
    assert market.end_date == datetime(2026, 3, 12, 9, 25, tzinfo=UTC)
    assert (market.active, market.closed) == (True, False)
    assert market.tick_size == Decimal("0.01")
    assert (market.best_bid, market.best_ask) == (Decimal("0.5"), Decimal("0.51"))
    assert market.last_trade_price == Decimal("0.51")


def test_from_gamma_accepts_real_arrays_and_legacy_fields() -> None:
    market = GammaMarket.from_gamma(
        {
            "id": 43,
            "conditionId": "",
            "outcomes": ["Long", "Short"],
            "outcomePrices": [
                "0.5843311669077693146635445446077281",
                "0.4156688330922306853364554553922719",
            ],
            "clobTokenIds": ["1", "2"],
            "endDate": None,
        }
    )
    assert market.id == "43"
    assert market.condition_id is None
    assert market.outcome_prices[0] == Decimal("0.5843311669077693146635445446077281")
    assert market.end_date is None and market.tick_size is None and market.best_bid is None


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"outcomes": '["Up", '}, "outcomes"),
        ({"outcomes": '{"a": 1}'}, "outcomes"),
        ({"clobTokenIds": '["1"]'}, "clobTokenIds"),
        ({"outcomePrices": '["0.5", "abc"]'}, "outcomePrices"),
        ({"outcomePrices": '["0.5", "1.5"]'}, "outcomePrices"),
        ({"bestBid": "NaN"}, "bestBid"),
        ({"bestAsk": True}, "bestAsk"),
        ({"orderPriceMinTickSize": 0}, "orderPriceMinTickSize"),
        ({"endDate": "next tuesday"}, "endDate"),
        ({"active": "yes"}, "active"),
        ({"question": 7}, "question"),
    ],
)
def test_bad_fields_name_market_and_field(change: dict[str, object], field: str) -> None:
    obj = orjson.loads((REAL / "gamma_market.json").read_bytes()) | change
    with pytest.raises(ImportDataError) as info:
        GammaMarket.from_gamma(obj)
    assert "1557558" in str(info.value)
    assert repr(field) in str(info.value)


def test_bad_payloads() -> None:
    with pytest.raises(ImportDataError, match="id"):
        parse_gamma_payload(b'{"question": "no id"}')
    with pytest.raises(ImportDataError, match="line 2"):
        parse_gamma_payload(b'{"id": "1"}\n{"id": \n')
    with pytest.raises(ImportDataError, match="object"):
        parse_gamma_payload(b"[1, 2]")
    with pytest.raises(ImportDataError, match="str"):
        parse_gamma_payload(b'"just a string"')


def test_payload_forms_agree(tmp_path: Path) -> None:
    array = parse_gamma_payload(UPDOWN.read_bytes())
    assert [m.id for m in array][:2] == ["900001", "900002"]
    objects = orjson.loads(UPDOWN.read_bytes())
    lines = b"\n".join(orjson.dumps(o) for o in objects) + b"\n\n"
    assert parse_gamma_payload(lines) == array
    single = parse_gamma_payload(orjson.dumps(objects[0]))
    assert single == array[:1]
    assert parse_gamma_payload(b"\xef\xbb\xbf" + UPDOWN.read_bytes()) == array


def test_import_object_array_and_json_lines(db_dsn: str, tmp_path: Path) -> None:
    jsonl = tmp_path / "markets.jsonl"
    jsonl.write_bytes(
        b"\n".join(orjson.dumps(orjson.loads(p.read_bytes())) for p in GAMMA_OBJECTS[1:])
    )
    updown = parse_gamma_payload(UPDOWN.read_bytes())
    with connect(db_dsn) as conn:
        assert import_markets_file(conn, GAMMA_OBJECTS[0]) == 1
        assert import_markets_file(conn, UPDOWN) == len(updown)
        assert import_markets_file(conn, AAIMEK) == 1
        assert import_markets_file(conn, jsonl) == len(GAMMA_OBJECTS) - 1
        count = conn.execute("SELECT count(*) FROM markets WHERE source = 'gamma'").fetchone()
    assert count == (len(GAMMA_OBJECTS) + len(updown) + 1,)

    row = _market_row(db_dsn, "1557558")
    assert row["outcomes"] == ["Up", "Down"]
    assert row["outcome_prices"] == ["0.505", "0.495"]
    assert len(row["clob_token_ids"]) == 2
    assert (row["best_bid"], row["best_ask"]) == (Decimal("0.5"), Decimal("0.51"))
    assert row["tick_size"] == Decimal("0.01")
    assert row["last_mid_price"] is None

    aaimek = _market_row(db_dsn, "900101")
    assert aaimek["end_date"] is None and aaimek["best_bid"] is None
    assert aaimek["outcome_prices"] == ["0.2", "0.8"]


def test_reimport_keeps_live_prices(db_dsn: str) -> None:
    markets = parse_gamma_payload(UPDOWN.read_bytes())
    with connect(db_dsn) as conn:
        upsert_markets(conn, markets)
        conn.execute(
            "UPDATE markets SET source = 'ws', best_bid = 0.61, best_ask = 0.62,"
            ' outcome_prices = \'["0.615", "0.385"]\', tick_size = 0.001,'
            " updated_at = '2025-12-11T11:05:00Z' WHERE id = '900001'"
        )
        conn.execute("UPDATE markets SET source = 'poll', best_bid = 0.3 WHERE id = '900002'")
        conn.commit()
        renamed = [
            GammaMarket.from_gamma(o | {"question": "Renamed " + o["id"], "bestBid": 0.1})
            for o in orjson.loads(UPDOWN.read_bytes())
        ]
        assert upsert_markets(conn, renamed) == len(markets)

    live = _market_row(db_dsn, "900001")
    assert live["question"] == "Renamed 900001"
    assert live["source"] == "ws"
    assert (live["best_bid"], live["best_ask"]) == (Decimal("0.61"), Decimal("0.62"))
    assert live["outcome_prices"] == ["0.615", "0.385"]
    assert live["tick_size"] == Decimal("0.001")
    assert live["updated_at"] == datetime(2025, 12, 11, 11, 5, tzinfo=UTC)

    polled = _market_row(db_dsn, "900002")
    assert (polled["source"], polled["best_bid"]) == ("poll", Decimal("0.3"))

    gamma_only = _market_row(db_dsn, markets[2].id)
    assert (gamma_only["source"], gamma_only["best_bid"]) == ("gamma", Decimal("0.1"))


def test_upsert_edge_cases(db_dsn: str) -> None:
    base = orjson.loads((REAL / "gamma_market.json").read_bytes())
    first = GammaMarket.from_gamma(base | {"question": "first"})
    last = GammaMarket.from_gamma(base | {"question": "last"})
    with connect(db_dsn) as conn:
        assert upsert_markets(conn, []) == 0
        assert upsert_markets(conn, [first, last]) == 1
    assert _market_row(db_dsn, "1557558")["question"] == "last"


def test_import_missing_file(db_dsn: str, tmp_path: Path) -> None:
    with connect(db_dsn) as conn, pytest.raises(ImportDataError, match=r"nope\.json"):
        import_markets_file(conn, tmp_path / "nope.json")

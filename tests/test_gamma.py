"""
Gamma metadata filling against a local HTTP server serving real Gamma market
objects, and a real PostgreSQL database (``db_dsn``).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote

import attrs
import orjson
import pytest
import structlog
import trio

from polystream.errors import ImportDataError
from polystream.ops.health import answer_lifespan, serve_asgi
from polystream.pipeline.metadata import (
    MetadataFiller,
    RetrySchedule,
    import_from_gamma,
    missing_markets,
    run_metadata_filler,
)
from polystream.store.db import connect
from polystream.store.link import DbLink
from polystream.venue.gamma import GammaClient, GammaError, classify_ref, open_gamma_client

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "tests" / "data" / "real" / "nautilus_trader" / "rust_test_data"
EXAMPLE = ROOT / "examples" / "updown-2025-12-11.markets.json"

BTC_5M = "1557558"  # gamma_market.json
CLOSED_ID = "1460332"  # gamma_market_closed_binary_accepting_false.json
CLOSED_CID = "0x8ccc3f4951ff02c1d34b87988752b4444ad17228732780a6cf22afefe8478bb6"
CEASEFIRE_ID = "1812085"
CEASEFIRE_SLUG = "russia-x-ukraine-ceasefire-by-end-of-2027"
UNKNOWN_ID = "999999999"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _real_markets() -> list[dict[str, Any]]:
    markets: list[dict[str, Any]] = [
        orjson.loads(path.read_bytes()) for path in sorted(REAL.glob("gamma_market*.json"))
    ]
    markets.extend(orjson.loads(EXAMPLE.read_bytes()))
    return markets


def _tokens(market: dict[str, Any]) -> list[str]:
    tokens: list[str] = orjson.loads(market["clobTokenIds"])
    return tokens


@attrs.define
class FakeGamma:
    """Answers like Gamma's /markets and /markets/slug/{slug}; records requests."""

    markets: list[dict[str, Any]]
    url: str = ""
    fail_next: list[int] = attrs.field(factory=list)  # statuses for the next requests
    requests: list[tuple[str, list[tuple[str, str]]]] = attrs.field(factory=list)

    def market(self, market_id: str) -> dict[str, Any]:
        return next(m for m in self.markets if str(m["id"]) == market_id)

    def market_requests(self, param: str) -> list[list[str]]:
        """Values of ``param`` in each /markets request, in order."""
        return [
            [v for k, v in query if k == param]
            for path, query in self.requests
            if path == "/markets" and any(k == param for k, _ in query)
        ]

    def _answer(self, path: str, query: list[tuple[str, str]]) -> tuple[int, object]:
        if path == "/markets":
            ids = {v for k, v in query if k == "id"}
            cids = {v for k, v in query if k == "condition_ids"}
            limit = int(dict(query).get("limit", "20"))
            found = [m for m in self.markets if str(m["id"]) in ids or m["conditionId"] in cids]
            return 200, found[: min(limit, 100)]
        if path.startswith("/markets/slug/"):
            slug = unquote(path.removeprefix("/markets/slug/"))
            for market in self.markets:
                if market.get("slug") == slug:
                    return 200, market
            return 404, {"type": "not found error", "error": "id not found"}
        return 404, {"error": "not found"}

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        path = scope["path"]
        query = parse_qsl(scope["query_string"].decode(), keep_blank_values=True)
        self.requests.append((path, query))
        body: object
        if self.fail_next:
            status, body = self.fail_next.pop(0), {"error": "injected"}
        else:
            status, body = self._answer(path, query)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": orjson.dumps(body)})


@pytest.fixture
async def gamma(nursery: trio.Nursery) -> FakeGamma:
    fake = FakeGamma(_real_markets())
    urls: list[str] = await nursery.start(serve_asgi, fake.app, "127.0.0.1:0")
    fake.url = urls[0]
    return fake


@pytest.fixture
async def client(gamma: FakeGamma) -> AsyncIterator[GammaClient]:
    async with open_gamma_client(gamma.url, attempts=3, wait_initial=0.01, wait_max=0.05) as c:
        yield c


@pytest.fixture
def link(db_dsn: str) -> Iterator[DbLink]:
    link = DbLink(db_dsn, "gamma")
    yield link
    link.close()


def _add_positions(dsn: str, *market_ids: str, status: str = "active") -> None:
    with connect(dsn) as conn:
        for market_id in market_ids:
            conn.execute(
                "INSERT INTO positions (user_id, market_id, outcome, size, entry_price, status)"
                " VALUES ('u1', %s, 'Yes', 10, 0.5, %s)",
                (market_id, status),
            )


def _market_row(dsn: str, market_id: str) -> tuple[Any, ...] | None:
    with connect(dsn) as conn:
        return conn.execute(
            "SELECT clob_token_ids, source, condition_id FROM markets WHERE id = %s",
            (market_id,),
        ).fetchone()


class Calls:
    """``on_filled`` stand-in: counts calls and lets a test wait for the n-th."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = trio.Event()

    def __call__(self) -> None:
        self.count += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, n: int) -> None:
        while self.count < n:
            await self._changed.wait()


# ------------------------------------------------------------------ pure logic


def test_classify_ref() -> None:
    assert classify_ref("1557558") == "id"
    assert classify_ref(CLOSED_CID) == "condition_id"
    assert classify_ref(CLOSED_CID.upper().replace("0X", "0x")) == "condition_id"
    assert classify_ref("0x1234") == "slug"
    assert classify_ref(CEASEFIRE_SLUG) == "slug"


async def test_retry_schedule_grows_and_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    schedule = RetrySchedule(initial=60.0, maximum=300.0)
    assert schedule.due(["a", "b"], trio.current_time()) == ["a", "b"]
    assert schedule.failed("a", trio.current_time()) is True
    times = []
    for _ in range(5):
        due_at = schedule.next_try("a")
        assert due_at is not None
        assert schedule.due(["a", "b"], trio.current_time()) == ["b"]
        await trio.sleep_until(due_at)
        times.append(trio.current_time())
        assert schedule.due(["a", "b"], trio.current_time()) == ["a", "b"]
        assert schedule.failed("a", trio.current_time()) is False
    assert times == [60, 180, 420, 720, 1020]  # waits 60, 120, 240, then capped at 300
    assert schedule.next_try("a") == 1020 + 300
    schedule.failed("b", trio.current_time())
    schedule.retain(["b"])  # "a" no longer missing: forgotten
    assert len(schedule) == 1
    assert schedule.next_try("a") is None
    schedule.succeeded("b")
    assert len(schedule) == 0


# ------------------------------------------------------------------ client


async def test_lookup_by_id_condition_id_and_slug(gamma: FakeGamma, client: GammaClient) -> None:
    lookup = await client.lookup([BTC_5M, CLOSED_CID, CEASEFIRE_SLUG, UNKNOWN_ID, "no-such-slug"])
    assert lookup.found[BTC_5M].clob_token_ids == tuple(_tokens(gamma.market(BTC_5M)))
    assert lookup.found[CLOSED_CID].id == CLOSED_ID
    assert lookup.found[CEASEFIRE_SLUG].id == CEASEFIRE_ID
    assert lookup.unknown == (UNKNOWN_ID, "no-such-slug")
    assert gamma.market_requests("id") == [[BTC_5M, UNKNOWN_ID]]
    assert gamma.market_requests("condition_ids") == [[CLOSED_CID]]


async def test_requests_carry_at_most_100_ids(gamma: FakeGamma, client: GammaClient) -> None:
    ids = [BTC_5M] + [str(10_000_000 + n) for n in range(149)]
    markets = await client.markets_by_ids(ids)
    assert [m.id for m in markets] == [BTC_5M]
    assert [len(batch) for batch in gamma.market_requests("id")] == [100, 50]
    cids = [f"0x{n:064x}" for n in range(201)]
    assert await client.markets_by_condition_ids(cids) == []
    assert [len(b) for b in gamma.market_requests("condition_ids")] == [100, 100, 1]


async def test_503_and_429_are_retried(gamma: FakeGamma, client: GammaClient) -> None:
    gamma.fail_next = [503, 429]
    markets = await client.markets_by_ids([BTC_5M])
    assert [m.id for m in markets] == [BTC_5M]
    assert len(gamma.requests) == 3


async def test_gives_up_after_the_attempts(gamma: FakeGamma, client: GammaClient) -> None:
    gamma.fail_next = [502] * 10
    with pytest.raises(GammaError, match="HTTP 502"):
        await client.markets_by_ids([BTC_5M])
    assert len(gamma.requests) == 3  # attempts=3


async def test_other_4xx_is_not_retried(gamma: FakeGamma, client: GammaClient) -> None:
    gamma.fail_next = [422]
    with pytest.raises(GammaError, match="HTTP 422"):
        await client.markets_by_ids([BTC_5M])
    assert len(gamma.requests) == 1


async def test_transport_errors_are_retried_then_reported() -> None:
    # A port nothing listens on: connection refused on every attempt.
    async with open_gamma_client("http://127.0.0.1:9", attempts=2, wait_initial=0.01) as c:
        with pytest.raises(GammaError, match=r"connection refused by 127\.0\.0\.1:9"):
            await c.markets_by_ids([BTC_5M])


async def test_malformed_market_is_skipped(gamma: FakeGamma, client: GammaClient) -> None:
    bad = copy.deepcopy(gamma.market(BTC_5M))
    bad["id"], bad["conditionId"], bad["outcomePrices"] = "42", "0x" + "4" * 64, '["7", "8"]'
    gamma.markets.append(bad)
    with structlog.testing.capture_logs() as logs:
        lookup = await client.lookup([BTC_5M, "42"])
    assert set(lookup.found) == {BTC_5M}
    assert lookup.unknown == ("42",)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["gamma_market_malformed"]


# ------------------------------------------------------------------ database


async def test_missing_markets(db_dsn: str, link: DbLink) -> None:
    with connect(db_dsn) as conn:
        conn.execute("INSERT INTO markets (id) VALUES ('700')")  # no token ids
        conn.execute("INSERT INTO markets (id, clob_token_ids) VALUES ('701', '[]')")
        conn.execute(
            "INSERT INTO markets (id, condition_id, clob_token_ids)"
            " VALUES ('702', %s, '[\"1\", \"2\"]')",
            ("0x" + "a" * 64,),
        )
    _add_positions(db_dsn, "700", "701", "702", "0x" + "a" * 64, CLOSED_CID, "12", "12", "no-id")
    _add_positions(db_dsn, "800", status="closed")
    assert await link.call(missing_markets) == ["12", "700", "701", CLOSED_CID]


async def test_filler_fills_missing_markets(
    db_dsn: str, link: DbLink, gamma: FakeGamma, client: GammaClient
) -> None:
    with connect(db_dsn) as conn:  # a row another service made without token ids
        conn.execute(
            "INSERT INTO markets (id, question) VALUES (%s, 'placeholder')", (CEASEFIRE_ID,)
        )
    _add_positions(db_dsn, BTC_5M, CLOSED_CID, CEASEFIRE_ID)
    calls = Calls()
    filler = MetadataFiller(link, client, calls)
    with trio.fail_after(10):
        assert await filler.fill_once() == 3
    assert calls.count == 1
    for market_id in (BTC_5M, CLOSED_ID, CEASEFIRE_ID):
        row = _market_row(db_dsn, market_id)
        assert row is not None
        assert row[0] == _tokens(gamma.market(market_id))
        assert row[1] == "gamma"
    assert await link.call(missing_markets) == []
    with trio.fail_after(10):
        assert await filler.fill_once() == 0  # nothing missing: no request, no call
    assert calls.count == 1
    assert len(gamma.requests) == 2


async def test_unknown_id_is_logged_once_and_does_not_block(
    db_dsn: str, link: DbLink, gamma: FakeGamma, client: GammaClient
) -> None:
    _add_positions(db_dsn, UNKNOWN_ID, BTC_5M)
    calls = Calls()
    filler = MetadataFiller(link, client, calls)
    with structlog.testing.capture_logs() as logs, trio.fail_after(10):
        assert await filler.fill_once() == 1
        assert await filler.fill_once() == 0  # the unknown id is not due yet
    unknown = [e for e in logs if e["event"] == "gamma_market_unknown"]
    assert unknown == [
        {"event": "gamma_market_unknown", "market_id": UNKNOWN_ID, "log_level": "warning"}
    ]
    assert _market_row(db_dsn, BTC_5M) is not None
    assert calls.count == 1
    assert gamma.market_requests("id") == [[BTC_5M, UNKNOWN_ID]]
    assert filler.schedule.next_try(UNKNOWN_ID) is not None


async def test_unknown_id_is_retried_later(
    db_dsn: str, link: DbLink, gamma: FakeGamma, client: GammaClient, nursery: trio.Nursery
) -> None:
    _add_positions(db_dsn, UNKNOWN_ID, BTC_5M)
    calls = Calls()
    with structlog.testing.capture_logs() as logs, trio.fail_after(20):
        filler: MetadataFiller = await nursery.start(
            partial(
                run_metadata_filler,
                link,
                client,
                calls,
                interval=0.05,
                retry_initial=0.2,
                retry_max=0.4,
            )
        )
        await calls.wait_for(1)
        # Gamma learns the market (e.g. the end of its hydration window).
        late = copy.deepcopy(gamma.market(CLOSED_ID))
        late["id"], late["conditionId"] = UNKNOWN_ID, "0x" + "9" * 64
        gamma.markets.append(late)
        await calls.wait_for(2)
    row = _market_row(db_dsn, UNKNOWN_ID)
    assert row is not None and row[0] == _tokens(late)
    assert len(filler.schedule) == 0
    assert sum(e["event"] == "gamma_market_unknown" for e in logs) == 1
    assert len(gamma.market_requests("id")) >= 2


async def test_filler_wake_runs_a_round(
    db_dsn: str, link: DbLink, gamma: FakeGamma, client: GammaClient, nursery: trio.Nursery
) -> None:
    calls = Calls()
    with trio.fail_after(20):
        filler: MetadataFiller = await nursery.start(
            partial(run_metadata_filler, link, client, calls, interval=3600)
        )
        _add_positions(db_dsn, BTC_5M)
        filler.wake()
        await calls.wait_for(1)
    assert _market_row(db_dsn, BTC_5M) is not None


async def test_filler_batches_150_missing_ids(
    db_dsn: str, link: DbLink, gamma: FakeGamma, client: GammaClient
) -> None:
    unknown = [str(10_000_000 + n) for n in range(149)]
    _add_positions(db_dsn, BTC_5M, *unknown)
    calls = Calls()
    filler = MetadataFiller(link, client, calls)
    with structlog.testing.capture_logs() as logs, trio.fail_after(20):
        assert await filler.fill_once() == 1
    assert [len(batch) for batch in gamma.market_requests("id")] == [100, 50]
    assert sum(e["event"] == "gamma_market_unknown" for e in logs) == 149
    assert len(filler.schedule) == 149


async def test_filler_survives_a_gamma_outage(
    db_dsn: str, link: DbLink, gamma: FakeGamma, client: GammaClient
) -> None:
    _add_positions(db_dsn, BTC_5M)
    calls = Calls()
    filler = MetadataFiller(link, client, calls)
    gamma.fail_next = [503] * 3  # every attempt of the first round
    with structlog.testing.capture_logs() as logs, trio.fail_after(10):
        assert await filler.fill_once() == 0
        assert len(filler.schedule) == 0  # an outage is not "unknown"
        assert await filler.fill_once() == 1
    assert [e["event"] for e in logs if e["event"].startswith("gamma_")] == [
        "gamma_unavailable",
        "gamma_markets_filled",
    ]
    assert calls.count == 1


async def test_market_without_tokens_waits(
    db_dsn: str, link: DbLink, gamma: FakeGamma, client: GammaClient
) -> None:
    gamma.market(BTC_5M)["clobTokenIds"] = "[]"  # hydration window
    _add_positions(db_dsn, BTC_5M)
    calls = Calls()
    filler = MetadataFiller(link, client, calls)
    with structlog.testing.capture_logs() as logs, trio.fail_after(10):
        assert await filler.fill_once() == 0
    assert [e["event"] for e in logs if e["event"].startswith("gamma_")] == [
        "gamma_market_without_tokens"
    ]
    assert calls.count == 0
    assert filler.schedule.next_try(BTC_5M) is not None
    assert await link.call(missing_markets) == [BTC_5M]


# ------------------------------------------------------------------ CLI import


async def test_import_by_id_slug_and_condition_id(
    db_dsn: str, gamma: FakeGamma, client: GammaClient
) -> None:
    with trio.fail_after(10):
        count = await import_from_gamma(db_dsn, [BTC_5M, CEASEFIRE_SLUG, CLOSED_CID], client)
    assert count == 3
    for market_id in (BTC_5M, CEASEFIRE_ID, CLOSED_ID):
        row = _market_row(db_dsn, market_id)
        assert row is not None
        assert row[0] == _tokens(gamma.market(market_id))
        assert row[1] == "gamma"
    assert _market_row(db_dsn, CLOSED_ID) == (
        _tokens(gamma.market(CLOSED_ID)),
        "gamma",
        CLOSED_CID,
    )


async def test_import_unknown_ref_names_it(
    db_dsn: str, gamma: FakeGamma, client: GammaClient
) -> None:
    with pytest.raises(ImportDataError, match=f"{UNKNOWN_ID}, no-such-market"):
        await import_from_gamma(db_dsn, [BTC_5M, UNKNOWN_ID, "no-such-market"], client)
    assert _market_row(db_dsn, BTC_5M) is None  # all or nothing


async def test_a_failing_upsert_does_not_block_the_others(
    db_dsn: str, link: DbLink, gamma: FakeGamma, client: GammaClient
) -> None:
    with connect(db_dsn) as conn:  # another id already holds this condition id
        conn.execute("INSERT INTO markets (id, condition_id) VALUES ('555', %s)", (CLOSED_CID,))
    _add_positions(db_dsn, BTC_5M, CLOSED_ID)
    calls = Calls()
    filler = MetadataFiller(link, client, calls)
    with structlog.testing.capture_logs() as logs, trio.fail_after(10):
        assert await filler.fill_once() == 1
    failed = [e for e in logs if e["event"] == "gamma_market_upsert_failed"]
    assert [e["market_id"] for e in failed] == [CLOSED_ID]
    row = _market_row(db_dsn, BTC_5M)
    assert row is not None and row[1] == "gamma"
    assert _market_row(db_dsn, CLOSED_ID) is None
    assert calls.count == 1
    assert await link.call(missing_markets) == [CLOSED_ID]

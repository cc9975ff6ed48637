"""
The HTTP polling fallback: the CLOB client against a local HTTP server that
answers ``POST /midpoints`` and ``POST /prices`` like the CLOB, from real
books and the final state of a real capture; the poller's timing alone under
``MockClock`` with a fake fetch; and the two together over the real clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import pytest
import structlog
import trio
import trio.testing

from polystream.feed.pool import Shard
from polystream.ops.health import answer_lifespan, serve_asgi
from polystream.pipeline.fallback import Poller, ShardWatch, run_poller
from polystream.stats import ShardStats
from polystream.venue.clob import ClobClient, ClobError, Quote, open_clob_client, prices_moved

ROOT = Path(__file__).resolve().parent.parent
NAUTILUS = ROOT / "tests" / "data" / "real" / "nautilus_trader"
BOOKS = [
    NAUTILUS / "http_responses" / "book.json",
    NAUTILUS / "rust_test_data" / "clob_book_response.json",
]
EXPECTED = ROOT / "examples" / "updown-2025-12-11.expected.json"

BOOK_ASSET = "23360939988679364027624185518382759743328544433592111535569478055890815567848"
CLOB_ASSET = "12345678901234567890"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def _d(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


def _book_quote(path: Path) -> tuple[str, Quote]:
    """Best bid = highest bid, best ask = lowest ask (the file's order is not trusted)."""
    book = orjson.loads(path.read_bytes())
    bids = [Decimal(level["price"]) for level in book["bids"] if Decimal(level["size"]) > 0]
    asks = [Decimal(level["price"]) for level in book["asks"] if Decimal(level["size"]) > 0]
    bid, ask = max(bids), min(asks)
    return book["asset_id"], Quote(bid, ask, (bid + ask) / 2)


def real_quotes() -> dict[str, Quote]:
    """What the CLOB would say: the two real REST books and the capture's final tops."""
    quotes = dict(_book_quote(path) for path in BOOKS)
    for asset_id, final in orjson.loads(EXPECTED.read_bytes())["assets"].items():
        quotes[asset_id] = Quote(
            _d(final["best_bid"]), _d(final["best_ask"]), _d(final["midpoint"])
        )
    return quotes


@attrs.define
class FakeClob:
    """
    Answers ``POST /midpoints`` and ``POST /prices`` like the CLOB: JSON
    objects keyed by token id, midpoints as strings, prices as numbers (as
    in the docs examples); an empty side or unknown token is left out.
    ``raw`` replaces the answer for a token; records (path, body) of each request.
    """

    quotes: dict[str, Quote]
    url: str = ""
    fail_next: list[int] = attrs.field(factory=list)
    raw: dict[str, dict[str, Any]] = attrs.field(factory=dict)  # path -> token -> value
    requests: list[tuple[str, list[dict[str, str]]]] = attrs.field(factory=list)
    arrived: trio.Event = attrs.field(factory=trio.Event)

    def bodies(self, path: str) -> list[list[dict[str, str]]]:
        return [body for p, body in self.requests if p == path]

    def _midpoints(self, body: list[dict[str, str]]) -> dict[str, Any]:
        answer: dict[str, Any] = {}
        for item in body:
            quote = self.quotes.get(item["token_id"])
            if quote is not None and quote.midpoint is not None:
                answer[item["token_id"]] = str(quote.midpoint)
        return answer

    def _prices(self, body: list[dict[str, str]]) -> dict[str, Any]:
        answer: dict[str, dict[str, Any]] = {}
        for item in body:
            quote = self.quotes.get(item["token_id"])
            price = None
            if quote is not None:
                price = quote.best_bid if item["side"] == "BUY" else quote.best_ask
            if price is not None:
                answer.setdefault(item["token_id"], {})[item["side"]] = float(price)
        return answer

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        data = b""
        while True:
            message = await receive()
            data += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        body = orjson.loads(data) if data else []
        self.requests.append((path, body))
        self.arrived.set()
        status: int = 200
        answer: Any
        if self.fail_next:
            status, answer = self.fail_next.pop(0), {"error": "injected"}
        elif scope["method"] != "POST" or path not in ("/midpoints", "/prices"):
            status, answer = 404, {"error": "not found"}
        else:
            answer = self._midpoints(body) if path == "/midpoints" else self._prices(body)
            asked = {item["token_id"] for item in body}
            answer.update((t, v) for t, v in self.raw.get(path, {}).items() if t in asked)
        headers = [(b"content-type", b"application/json")]
        if status == 429:
            headers.append((b"retry-after", b"0"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": orjson.dumps(answer)})


@pytest.fixture
async def clob(nursery: trio.Nursery) -> FakeClob:
    fake = FakeClob(real_quotes())
    urls: list[str] = await nursery.start(serve_asgi, fake.app, "127.0.0.1:0")
    fake.url = urls[0]
    return fake


@pytest.fixture
async def client(clob: FakeClob) -> AsyncIterator[ClobClient]:
    async with open_clob_client(clob.url, attempts=3, wait_initial=0.01, wait_max=0.05) as c:
        yield c


# ------------------------------------------------------------------ client


def test_real_books_give_the_expected_tops() -> None:
    quotes = real_quotes()
    # book.json lists asks descending (best last); clob_book_response.json ascending.
    assert quotes[BOOK_ASSET] == Quote(Decimal("0.1"), Decimal("0.14"), Decimal("0.12"))
    assert quotes[CLOB_ASSET] == Quote(Decimal("0.50"), Decimal("0.51"), Decimal("0.505"))


async def test_quotes_of_real_assets(clob: FakeClob, client: ClobClient) -> None:
    expected = real_quotes()
    with trio.fail_after(10):
        quotes = await client.quotes([*expected, "999"])
    for asset_id, quote in expected.items():
        if quote.best_bid is None and quote.best_ask is None and quote.midpoint is None:
            assert asset_id not in quotes  # trades only in the capture: the CLOB knows nothing
        else:
            assert quotes[asset_id] == quote, asset_id
    assert "999" not in quotes
    assert len(clob.bodies("/prices")) == len(clob.bodies("/midpoints")) == 1
    assert clob.bodies("/prices")[0][:2] == [
        {"token_id": BOOK_ASSET, "side": "BUY"},
        {"token_id": BOOK_ASSET, "side": "SELL"},
    ]
    assert client.bad_values == 0


async def test_midpoint_is_computed_without_midpoints(clob: FakeClob, client: ClobClient) -> None:
    with trio.fail_after(10):
        quotes = await client.quotes([CLOB_ASSET], midpoints=False)
    assert quotes == {CLOB_ASSET: Quote(Decimal("0.5"), Decimal("0.51"), Decimal("0.505"))}
    assert clob.bodies("/midpoints") == []


async def test_batches_of_at_most_500_items(clob: FakeClob, client: ClobClient) -> None:
    assets = [*real_quotes(), *(str(10**20 + n) for n in range(1200 - len(real_quotes())))]
    assert len(assets) == 1200
    with trio.fail_after(10):
        mids = await client.midpoints(assets)
        sides = await client.prices(assets)
    assert [len(body) for body in clob.bodies("/midpoints")] == [500, 500, 200]
    assert [len(body) for body in clob.bodies("/prices")] == [500, 500, 500, 500, 400]
    asked = [item["token_id"] for body in clob.bodies("/midpoints") for item in body]
    assert asked == assets
    assert mids[CLOB_ASSET] == Decimal("0.505")
    assert sides[BOOK_ASSET] == (Decimal("0.1"), Decimal("0.14"))


async def test_503_and_429_are_retried(clob: FakeClob, client: ClobClient) -> None:
    clob.fail_next = [503, 429]
    with trio.fail_after(10):
        mids = await client.midpoints([CLOB_ASSET])
    assert mids == {CLOB_ASSET: Decimal("0.505")}
    assert len(clob.requests) == 3
    assert client.requests == 3


async def test_gives_up_after_the_attempts(clob: FakeClob, client: ClobClient) -> None:
    clob.fail_next = [502] * 10
    with trio.fail_after(10), pytest.raises(ClobError, match="HTTP 502"):
        await client.prices([CLOB_ASSET])
    assert len(clob.requests) == 3  # attempts=3


async def test_other_4xx_is_not_retried(clob: FakeClob, client: ClobClient) -> None:
    clob.fail_next = [400]
    with trio.fail_after(10), pytest.raises(ClobError, match="HTTP 400"):
        await client.midpoints([CLOB_ASSET])
    assert len(clob.requests) == 1


async def test_transport_errors_are_retried_then_reported() -> None:
    async with open_clob_client("http://127.0.0.1:9", attempts=2, wait_initial=0.01) as c:
        with trio.fail_after(10), pytest.raises(ClobError, match="ConnectError"):
            await c.midpoints([CLOB_ASSET])
    assert c.requests == 2


async def test_an_answer_that_is_not_an_object() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"[1, 2]")

    transport = httpx.MockTransport(handler)
    async with httpx.AsyncClient(base_url="http://clob.test", transport=transport) as http:
        with trio.fail_after(10), pytest.raises(ClobError, match="expected a JSON object"):
            await ClobClient(http).midpoints([CLOB_ASSET])


async def test_bad_numbers_are_skipped_and_counted(clob: FakeClob, client: ClobClient) -> None:
    bad = ["1.5", "-0.1", "NaN", "Infinity", "abc", True, None, [], "", 2]
    ids = [str(n) for n in range(len(bad))]
    clob.raw["/midpoints"] = dict(zip(ids, bad, strict=True)) | {"7777": "0.3"}
    clob.raw["/prices"] = {
        "0": {"BUY": "1.01", "SELL": 0.6},  # bad bid, good ask
        "1": "0.5",  # not an object
        "2": {"BUY": "nan", "SELL": "x"},  # both bad: nothing known
        "3": {"BUY": 0, "SELL": 1},  # the empty-side markers: valid, nothing known
        "4": {"BUY": "0.48", "SELL": 1},  # ask side empty
        "7777": {"BUY": 0.2},  # not asked for: ignored
    }
    with structlog.testing.capture_logs() as logs, trio.fail_after(10):
        mids = await client.midpoints(ids)
        sides = await client.prices(ids)
        quotes = await client.quotes(ids)
    assert mids == {}
    assert sides == {"0": (None, Decimal("0.6")), "4": (Decimal("0.48"), None)}
    assert quotes == {
        "0": Quote(None, Decimal("0.6"), None),
        "4": Quote(Decimal("0.48"), None, None),
    }
    per_round = len(bad) + 4  # /prices: "0" BUY, "1", "2" BUY and SELL
    assert client.bad_values == 2 * per_round
    bad_logs = [e for e in logs if e["event"] == "clob_bad_values"]  # one line per answer
    assert [(e["path"], e["count"]) for e in bad_logs] == [
        ("/midpoints", len(bad)),
        ("/prices", 4),
        ("/prices", 4),
        ("/midpoints", len(bad)),
    ]


# ------------------------------------------------------------------ shard health


def _shard(index: int, state: str, *assets: str) -> Shard:
    shard = Shard(index, ShardStats(index, state=state))
    shard.assets = set(assets)
    return shard


def test_shard_watch_polls_shards_down_past_the_grace() -> None:
    watch = ShardWatch(grace=10.0)
    up = _shard(0, "connected", "a", "b")
    down = _shard(1, "backoff", "c")
    new = _shard(2, "starting", "d")
    assert watch.assets([up, down, new], now=100.0) == set()
    assert watch.assets([up, down, new], now=109.9) == set()
    assert watch.assets([up, down, new], now=110.0) == {"c", "d"}
    down.stats.state = "connecting"  # still down: the clock keeps running
    new.stats.state = "connected"
    assert watch.assets([up, down, new], now=111.0) == {"c"}
    down.stats.state = "connected"
    assert watch.assets([up, down, new], now=112.0) == set()
    down.stats.state = "backoff"  # down again: a new grace
    assert watch.assets([up, down, new], now=113.0) == set()
    assert watch.assets([up, down, new], now=123.0) == {"c"}
    assert watch.assets([up], now=124.0) == set()  # shard closed: forgotten
    assert watch._down_since == {}


# ------------------------------------------------------------------ poller timing


@attrs.define
class FakeFetch:
    """A fetch without I/O: records (time, tokens) and quotes every token at 0.5/0.6."""

    calls: list[tuple[float, list[str]]] = attrs.field(factory=list)
    fail: set[str] = attrs.field(factory=set)  # a batch holding one of these fails
    during: Callable[[], None] | None = None

    async def __call__(self, token_ids: Sequence[str]) -> dict[str, Quote]:
        self.calls.append((trio.current_time(), list(token_ids)))
        await trio.sleep(0.25)  # a request takes time
        if self.during is not None:
            self.during()
        if self.fail & set(token_ids):
            raise ClobError("POST /prices: HTTP 503 from CLOB")
        return {t: Quote(Decimal("0.5"), Decimal("0.6"), Decimal("0.55")) for t in token_ids}


@attrs.define
class Delivered:
    quotes: list[tuple[float, str]] = attrs.field(factory=list)

    def __call__(self, asset_id: str, bid: Decimal | None, ask: Decimal | None) -> None:
        assert (bid, ask) == (Decimal("0.5"), Decimal("0.6"))
        self.quotes.append((trio.current_time(), asset_id))


async def test_poller_polls_only_while_assets_need_it(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    needed: set[str] = set()
    fetch, delivered = FakeFetch(), Delivered()
    with structlog.testing.capture_logs() as logs:
        poller: Poller = await nursery.start(
            Poller(fetch, lambda: needed, delivered, interval=60.0, check_interval=1.0).run
        )
        await trio.sleep(100)
        assert fetch.calls == []  # nothing polled while the set is empty
        assert not poller.active
        needed.update({"a", "b"})
        poller.wake()  # e.g. a shard went down
        await trio.sleep(200)
        needed.clear()  # the shard is healthy again
        await trio.sleep(300)
    assert [(t, tokens) for t, tokens in fetch.calls] == [
        (100, ["a", "b"]),
        (160, ["a", "b"]),
        (220, ["a", "b"]),
        (280, ["a", "b"]),
    ]
    assert delivered.quotes == [(t + 0.25, a) for t in (100, 160, 220, 280) for a in ("a", "b")]
    assert not poller.active
    assert (poller.polls, poller.poll_errors, poller.assets_polled) == (4, 0, 8)
    assert poller.last_poll_at is not None
    health = poller.snapshot(poller.last_poll_at + 2.0)
    assert health == {
        "active": False,
        "assets": 0,
        "polls": 4,
        "errors": 0,
        "assets_polled": 8,
        "last_poll_age_s": 2.0,
    }
    events = [e["event"] for e in logs if e["event"].startswith("poll_")]
    assert events == ["poll_started", "poll_stopped"]


async def test_poller_notices_the_set_within_a_check(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    needed: set[str] = set()
    fetch = FakeFetch()
    await nursery.start(
        Poller(fetch, lambda: needed, Delivered(), interval=60.0, check_interval=1.0).run
    )
    await trio.sleep(10.5)
    needed.add("a")  # no wake(): the next check sees it
    await trio.sleep(5)
    assert [t for t, _ in fetch.calls] == [11]


async def test_joining_assets_are_polled_at_once_alone(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    needed = {"a"}
    fetch = FakeFetch()
    poller: Poller = await nursery.start(
        Poller(fetch, lambda: needed, Delivered(), interval=60.0, check_interval=1.0).run
    )
    await trio.sleep(20)
    needed.add("b")  # a second shard went down
    poller.wake()
    await trio.sleep(30)
    needed.discard("b")  # it came back ...
    await trio.sleep(2)
    needed.add("b")  # ... and went down again: new again
    await trio.sleep(20)
    assert fetch.calls == [(0, ["a"]), (20, ["b"]), (52.25, ["b"]), (60, ["a", "b"])]
    # checks run check_interval after the previous check or round ended


async def test_failed_batches_are_counted_and_the_others_delivered(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    needed = {f"t{n:04d}" for n in range(1200)}
    fetch, delivered = FakeFetch(fail={"t0600"}), Delivered()
    with structlog.testing.capture_logs() as logs:
        poller: Poller = await nursery.start(
            Poller(fetch, lambda: needed, delivered, interval=60.0, batch_size=500).run
        )
        await trio.sleep(30)
    assert [len(tokens) for _, tokens in fetch.calls] == [500, 500, 200]
    assert [t for t, _ in fetch.calls] == [0, 0.25, 0.5]
    assert (poller.polls, poller.poll_errors, poller.assets_polled) == (1, 1, 700)
    assert len(delivered.quotes) == 700
    failed = [e for e in logs if e["event"] == "poll_failed"]
    assert [(e["assets"], e["log_level"]) for e in failed] == [(500, "warning")]


async def test_quotes_of_recovered_assets_are_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    needed = {"a", "b"}
    fetch, delivered = FakeFetch(during=lambda: needed.discard("b")), Delivered()
    poller = Poller(fetch, lambda: needed, delivered)
    assert await poller.poll(sorted(needed)) == 1
    assert [a for _, a in delivered.quotes] == ["a"]


# ------------------------------------------------------------------ end to end


@attrs.define
class Needed:
    """``assets_to_poll`` stand-in that lets a test wait for the poller's n-th read."""

    assets: set[str] = attrs.field(factory=set)
    reads: int = 0
    _read: trio.Event = attrs.field(factory=trio.Event)

    def __call__(self) -> set[str]:
        self.reads += 1
        self._read.set()
        self._read = trio.Event()
        return set(self.assets)

    async def wait_reads(self, more: int) -> None:
        target = self.reads + more
        while self.reads < target:
            await self._read.wait()


async def test_run_poller_against_the_fake_clob(
    clob: FakeClob, client: ClobClient, nursery: trio.Nursery
) -> None:
    needed = Needed()
    got: dict[str, tuple[Decimal | None, Decimal | None]] = {}

    def on_quotes(asset_id: str, bid: Decimal | None, ask: Decimal | None) -> None:
        got[asset_id] = (bid, ask)

    with trio.fail_after(20):
        poller: Poller = await nursery.start(
            partial(run_poller, client, needed, on_quotes, interval=0.05, check_interval=0.02)
        )
        await needed.wait_reads(3)
        assert clob.requests == []  # idle: no request
        needed.assets.update({BOOK_ASSET, CLOB_ASSET})
        poller.wake()
        while poller.polls < 3:
            await needed.wait_reads(1)
        assert poller.active
        needed.assets.clear()  # the shard is healthy again
        await needed.wait_reads(2)  # the round in flight ended; idle now
        count = len(clob.requests)
        await needed.wait_reads(5)
    assert len(clob.requests) == count  # stopped
    assert not poller.active
    expected = real_quotes()
    assert got == {
        a: (expected[a].best_bid, expected[a].best_ask) for a in (BOOK_ASSET, CLOB_ASSET)
    }
    assert {path for path, _ in clob.requests} == {"/prices"}
    assert poller.assets_polled >= 6


async def test_poller_survives_a_clob_outage(
    clob: FakeClob, client: ClobClient, nursery: trio.Nursery
) -> None:
    clob.fail_next = [503] * 3  # every attempt of the first request
    delivered: list[str] = []
    arrived = trio.Event()

    def on_quotes(asset_id: str, *_: Decimal | None) -> None:
        delivered.append(asset_id)
        arrived.set()

    with trio.fail_after(20):
        poller: Poller = await nursery.start(
            partial(run_poller, client, lambda: {CLOB_ASSET}, on_quotes, interval=0.05)
        )
        await arrived.wait()
    assert poller.poll_errors == 1
    assert delivered[0] == CLOB_ASSET


# ------------------------------------------------------------------ stale check


async def test_prices_moved(clob: FakeClob, client: ClobClient) -> None:
    ours: dict[str, tuple[Decimal | None, Decimal | None]] = {
        CLOB_ASSET: (Decimal("0.50"), Decimal("0.51")),
        BOOK_ASSET: (Decimal("0.1"), Decimal("0.14")),
    }
    with trio.fail_after(10):
        assert await prices_moved(client, ours.get, [CLOB_ASSET, BOOK_ASSET, "999"]) is None
        ours[BOOK_ASSET] = (Decimal("0.09"), Decimal("0.14"))
        moved = await prices_moved(client, ours.get, [CLOB_ASSET, BOOK_ASSET])
        assert moved == f"asset {BOOK_ASSET}: ours 0.09/0.14, venue 0.1/0.14"
        unknown: dict[str, tuple[Decimal | None, Decimal | None]] = {}
        assert await prices_moved(client, unknown.get, [CLOB_ASSET, BOOK_ASSET]) is None
        clob.fail_next = [500] * 3
        with structlog.testing.capture_logs() as logs:
            assert await prices_moved(client, ours.get, [BOOK_ASSET]) is None
    assert [e["event"] for e in logs if not e["event"].startswith("stamina")] == [
        "stale_check_failed"
    ]

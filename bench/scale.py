"""
Scale benchmark: ``polystream run`` with 10,000 assets subscribed (5,000 binary
markets) and 100,000 active positions on them, each with a take-profit and a
stop-loss (200,000 thresholds, none crossed); the initial dump of all 10,000
books arriving as multi-MB frames while the heartbeat goes on.

Run ``.venv/bin/python -m bench.scale`` (``--help``); it writes
``bench/results-scale.json`` and ``.md`` and prints the table. About a minute
on two cores.

The bench's loopback WebSocket server (:class:`DumpServer`, wsproto) answers
each subscribe with ONE JSON array frame of the books it names, as the venue
can: 200 assets per connection (the daemon's default) with ``--levels`` (100)
levels per side make frames of 1.5 MB (250 levels: 3.6 MB). 100 is above the
deepest real book seen: the Caiooooo L2 collector's recorded states of the
BTC/ETH/SOL/XRP up/down markets (among the venue's most active; an excerpt
is in tests/data/real/caiooooo-polymarket-l2-collector) have a median of 47
levels per side, p90 80, max 93. The books are realistic: 0.001 ticks,
bids ascending and asks descending (best last, as the venue sends them), the
NO token's book the mirror of the YES token's, ``tick_size``,
``last_trade_price`` and the venue's ``hash``, so every book is verified and
none is fetched over REST. Sizes come from 4,096 values, so the daemon's
parser shares their ``Decimal`` objects; real sizes, mostly distinct, would
add one (104 bytes) per level held. Every text ``PING`` is answered with ``PONG`` at
once, behind a dump frame being written (one connection's writes never
interleave).

Stretches: ``startup`` (spawn until every shard is connected and subscribed
and all rules are loaded; the dumps are held back until then), ``dump`` (until
``/health`` shows every dump frame read and applied and every asset covered),
``after`` (until the database has every market and position priced, then
``--settle`` s of heartbeat, then until the daemon has read a PONG for every
PING the server answered, at most 3 s). Memory: the daemon's ``VmRSS`` at the
end of each stretch and its peak ``VmHWM``; the goal is a peak <= 150 MB
(10^6 bytes). Loop lag per stretch: :mod:`bench.looplag`.

Exact checks (any difference: exit 1), against what the bench generated:
every asset subscribed exactly once, <= 200 per connection; every dump frame
read, one ``book`` event per asset, all hashes verified, no parse error or
foreign event; every market row as its books say (display prices of both
outcomes; best bid, best ask, midpoint and last trade of the first;
``source = 'ws'``), every position priced at its token's display price with
its P&L; no trigger; 0 reconnects; every PONG the server sent read by the
daemon (missed: never read; one read late but within ``feed.pong_timeout``
is not, the longest PING gap and the loop lag say how late); a PONG on every
connection; ``/health`` ok without database errors; exit 0, no log warning.
The goals are reported beside the checks, not part of them.

``time.monotonic()`` is one clock for all processes; the machine is shared and
noisy: compare figures within one run only. PostgreSQL: ``POLYSTREAM_BENCH_DSN``,
else ``POLYSTREAM_TEST_DSN`` (admin DSNs), else an embedded server; the
database ``polystream_bench_scale_<pid>`` is dropped afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

from bench.harness import (
    ROOT,
    BenchError,
    DaemonLog,
    Link,
    accept_client,
    add_output_options,
    bench_setup,
    data_frames,
    exit_status,
    log_directory,
    print_hotspots,
    profiling,
    progress,
    throwaway_database,
    write_results,
)
from bench.looplag import LAG_METHOD, LagReading, read_lag
from polystream.config import TransportKind
from polystream.feed.transport import TRANSPORTS
from polystream.ops.daemon import DaemonProcess, open_daemon, setting_variables

TICKS = 1000  # 0.001 ticks: prices are t / 1000, 0 < t < 1000
MAX_PER_CONNECTION = 200  # feed.max_assets_per_connection, the default
GOAL_PEAK_RSS_BYTES = 150 * 10**6
NOWHERE = "http://127.0.0.1:9"  # Gamma and the CLOB's REST API: nothing is asked of them
POLL_INTERVAL = 0.05
_TWO = Decimal(2)
_PRICE_TEXT = [str((Decimal(t) / TICKS).normalize()) for t in range(TICKS + 1)]


# --- the workload ----------------------------------------------------------------


def _asset_id(market: int, outcome: int) -> str:
    """A 77-digit decimal token id, as the venue's."""
    digest = int(hashlib.sha256(f"scale-asset/{market}/{outcome}".encode()).hexdigest(), 16)
    return str(10**76 + digest % (9 * 10**76))


@attrs.frozen
class Quote:
    """What one asset's book says (probabilities); every spread here is <= 0.03."""

    best_bid: Decimal
    best_ask: Decimal
    last_trade: Decimal

    @property
    def midpoint(self) -> Decimal:
        return (self.best_bid + self.best_ask) / _TWO

    @property
    def display(self) -> Decimal:
        """Polymarket's displayed price: the midpoint, the spread being <= 0.10."""
        return self.midpoint


@attrs.frozen
class ScaleMarket:
    """One binary market: Gamma id, condition id, the YES and NO tokens."""

    id: str
    condition_id: str
    tokens: tuple[str, str]

    def gamma(self) -> dict[str, Any]:
        """The market as a Gamma object (``GammaMarket.from_gamma`` reads it)."""
        return {
            "id": self.id,
            "conditionId": self.condition_id,
            "question": f"Scale market {self.id}?",
            "slug": f"scale-{self.id}",
            "outcomes": orjson.dumps(["Yes", "No"]).decode(),
            "clobTokenIds": orjson.dumps(list(self.tokens)).decode(),
            "orderPriceMinTickSize": 0.001,
            "active": True,
            "closed": False,
        }


@attrs.frozen
class Workload:
    """
    The markets; each asset's ``book`` event (JSON, encoded once) and quote;
    the positions, ``(market_id, outcome, token, size, entry, TP, SL)``.
    """

    markets: tuple[ScaleMarket, ...]
    books: Mapping[str, bytes]
    quotes: Mapping[str, Quote]
    positions: tuple[tuple[str, str, str, Decimal, Decimal, Decimal, Decimal], ...]
    levels: int

    @property
    def assets(self) -> int:
        return 2 * len(self.markets)

    @classmethod
    def build(cls, markets: int, levels: int, per_asset: int, seed: int) -> Workload:
        """``markets`` binary markets, ``levels`` levels per side, ``per_asset`` positions each."""
        rng = random.Random(seed)
        sizes = [f"{rng.randint(5, 20000)}.{rng.randint(0, 99):02d}" for _ in range(4096)]
        stamp = str(int(time.time() * 1000))
        found: list[ScaleMarket] = []
        books: dict[str, bytes] = {}
        quotes: dict[str, Quote] = {}
        rows = []
        for number in range(markets):
            digest = hashlib.sha256(f"scale-market/{number}".encode()).hexdigest()
            market = ScaleMarket(
                str(7_000_000 + number), f"0x{digest}", (_asset_id(number, 0), _asset_id(number, 1))
            )
            found.append(market)
            for token, outcome, (book, quote) in zip(
                market.tokens,
                ("Yes", "No"),
                _binary_books(market, rng, sizes, levels, stamp),
                strict=True,
            ):
                books[token], quotes[token] = book, quote
                bid = int(quote.best_bid * TICKS)
                for _ in range(per_asset):  # TP above and SL below the best bid: never crossed
                    take_profit = min(TICKS - 1, bid + 10 * rng.randint(1, 20))
                    stop_loss = max(1, bid - 10 * rng.randint(1, 20))
                    rows.append(
                        (
                            market.id,
                            outcome,
                            token,
                            Decimal(rng.randint(1, 50000)) / 100,
                            Decimal(rng.randint(50, 950)) / TICKS,
                            Decimal(take_profit) / TICKS,
                            Decimal(stop_loss) / TICKS,
                        )
                    )
        return cls(tuple(found), books, quotes, tuple(rows), levels)


def _binary_books(
    market: ScaleMarket, rng: random.Random, sizes: list[str], levels: int, stamp: str
) -> list[tuple[bytes, Quote]]:
    """
    The YES token's book (best bid 0.300..0.700, spread 1..30 ticks, ``levels``
    levels per side) and the NO token's, its mirror; each encoded with its hash.
    """
    bid = rng.randint(300, 700)
    ask = bid + rng.randint(1, 30)
    bids = sorted([bid, *rng.sample(range(1, bid), min(levels, bid - 1) - 1)])
    asks = sorted([ask, *rng.sample(range(ask + 1, TICKS), min(levels, TICKS - ask - 1) - 1)])
    bid_sizes = [rng.choice(sizes) for _ in bids]
    ask_sizes = [rng.choice(sizes) for _ in asks]
    last = rng.randint(bid, ask)
    yes = (bids, bid_sizes, asks, ask_sizes, last)
    no = ([TICKS - t for t in asks], ask_sizes, [TICKS - t for t in bids], bid_sizes, TICKS - last)
    return [
        _book(market.condition_id, token, stamp, *sides)
        for token, sides in zip(market.tokens, (yes, no), strict=True)
    ]


def _book(
    condition_id: str,
    token: str,
    stamp: str,
    bids: list[int],
    bid_sizes: list[str],
    asks: list[int],
    ask_sizes: list[str],
    last: int,
) -> tuple[bytes, Quote]:
    """One ``book`` event (bids ascending, asks descending: best last) and its quote."""
    from polystream.replay.books import book_hash

    bid_levels = [
        {"price": _PRICE_TEXT[p], "size": s} for p, s in sorted(zip(bids, bid_sizes, strict=True))
    ]
    ask_levels = [
        {"price": _PRICE_TEXT[p], "size": s}
        for p, s in sorted(zip(asks, ask_sizes, strict=True), reverse=True)
    ]
    tick, last_text = "0.001", _PRICE_TEXT[last]
    event = {
        "event_type": "book",
        "asset_id": token,
        "market": condition_id,
        "bids": bid_levels,
        "asks": ask_levels,
        "timestamp": stamp,
        "hash": book_hash(condition_id, token, stamp, bid_levels, ask_levels, tick, last_text),
        "tick_size": tick,
        "last_trade_price": last_text,
    }
    quote = Quote(Decimal(max(bids)) / TICKS, Decimal(min(asks)) / TICKS, Decimal(last) / TICKS)
    return orjson.dumps(event), quote


def prepare_database(dsn: str, workload: Workload) -> None:
    """The markets (Gamma metadata, no prices) and the positions, in two statements."""
    from polystream.store import db
    from polystream.store.markets import GammaMarket, upsert_markets

    with db.connect(dsn, application_name="polystream-bench") as conn:
        upsert_markets(conn, [GammaMarket.from_gamma(m.gamma()) for m in workload.markets])
        conn.execute(  # one column array each: (market_id, outcome, token, size, entry, TP, SL)
            "INSERT INTO positions (user_id, market_id, outcome, token_id, size, entry_price,"
            " take_profit_price, stop_loss_price)"
            " SELECT 'bench', u.* FROM unnest(%s::text[], %s::text[], %s::text[],"
            " %s::numeric[], %s::numeric[], %s::numeric[], %s::numeric[]) AS u",
            [[row[i] for row in workload.positions] for i in range(7)],
        )
        conn.commit()
        conn.execute("ANALYZE")


# --- the server ------------------------------------------------------------------


@attrs.define(eq=False)
class Connection:
    """What the server saw of one connection (times ``time.monotonic()``)."""

    number: int
    assets: list[str] = attrs.field(factory=list)
    subscribes: int = 0
    unsubscribed: int = 0
    unknown_assets: int = 0
    dump_bytes: list[int] = attrs.field(factory=list)
    dump_started: list[float] = attrs.field(factory=list)
    dump_written: list[float] = attrs.field(factory=list)
    pings: list[float] = attrs.field(factory=list)
    pongs: int = 0
    other_text: Counter[str] = attrs.field(factory=Counter)
    closed_early: bool = False
    error: str | None = None

    def ping_gap(self, since: float) -> float:
        """The longest interval between two PINGs, the second after ``since`` (s)."""
        gaps = zip(self.pings, self.pings[1:], strict=False)
        return max((b - a for a, b in gaps if b > since), default=0.0)


@attrs.define(eq=False)
class DumpServer:
    """
    A loopback WebSocket server answering each subscribe with ONE array frame
    of the named books once ``release`` is set (at once after that), and every
    text ``PING`` with ``PONG``. Serves any number of connections until cancelled.
    """

    books: Mapping[str, bytes]
    release: trio.Event = attrs.field(factory=trio.Event)
    port: int = 0
    connections: list[Connection] = attrs.field(factory=list)
    stopping: bool = False

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/market"

    def subscribed(self) -> int:
        """Assets subscribed so far, all connections."""
        return sum(len(c.assets) for c in self.connections)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        from wsproto import ConnectionType, WSConnection

        conn = Connection(len(self.connections))
        self.connections.append(conn)
        send, receive = trio.open_memory_channel[list[str]](math.inf)
        try:
            link = Link(stream, WSConnection(ConnectionType.SERVER))
            first = await accept_client(link)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._dumps, link, conn, receive)
                self._message(conn, first, send)
                await self._read(link, conn, send)
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError, BenchError) as exc:
            conn.error = f"{type(exc).__name__}: {exc}"
        finally:
            conn.closed_early = not self.stopping
            await stream.aclose()

    def _message(
        self, conn: Connection, text: str, dumps: trio.MemorySendChannel[list[str]]
    ) -> None:
        """A text message that is not ``PING``: a subscribe is queued for its dump."""
        try:
            message = orjson.loads(text)
        except orjson.JSONDecodeError:
            message = None
        assets = message.get("assets_ids") if isinstance(message, dict) else None
        if not isinstance(assets, list) or not assets:
            conn.other_text[text[:40]] += 1
        elif message.get("operation") == "unsubscribe":
            conn.unsubscribed += len(assets)
        else:
            named = [str(a) for a in assets]
            conn.assets += named
            conn.subscribes += 1
            dumps.send_nowait(named)

    async def _dumps(
        self, link: Link, conn: Connection, subscribes: trio.MemoryReceiveChannel[list[str]]
    ) -> None:
        """Once released, each subscribe's books as ONE array frame, in its order."""
        from wsproto.events import TextMessage

        await self.release.wait()
        async for assets in subscribes:
            known = [self.books[a] for a in assets if a in self.books]
            conn.unknown_assets += len(assets) - len(known)
            frame = b"[" + b",".join(known) + b"]"
            conn.dump_bytes.append(len(frame))
            conn.dump_started.append(time.monotonic())
            await link.send_event(TextMessage(data=frame.decode()))
            conn.dump_written.append(time.monotonic())

    async def _read(
        self, link: Link, conn: Connection, dumps: trio.MemorySendChannel[list[str]]
    ) -> None:
        """The client's side until EOF or its close: PINGs answered, subscribes queued."""
        from wsproto.events import CloseConnection, Ping, TextMessage

        text = ""
        while data := await link.stream.receive_some(65536):
            arrived = time.monotonic()
            link.ws.receive_data(data)
            for event in link.ws.events():
                if isinstance(event, TextMessage):
                    text += event.data
                    if not event.message_finished:
                        continue
                    message, text = text, ""
                    if message == "PING":
                        conn.pings.append(arrived)
                        await link.send_text("PONG")
                        conn.pongs += 1
                    else:
                        self._message(conn, message, dumps)
                elif isinstance(event, Ping):
                    await link.send_event(event.response())
                elif isinstance(event, CloseConnection):
                    with contextlib.suppress(trio.BrokenResourceError):
                        await link.send_event(event.response())
                    return


# --- the run ---------------------------------------------------------------------


@attrs.frozen
class Options:
    """The daemon's heartbeat, transport and pricing rate; settling time, timeout, logs."""

    ping_interval: float
    transport: TransportKind
    positions_per_second: float
    settle: float
    timeout: float
    log_dir: Path
    profile_dir: Path | None = None

    def daemon_settings(self) -> dict[str, object]:
        """
        The daemon's overrides. ``feed.stale_after`` is an hour: after the dump the
        bench's feed is silent by design (the venue never is), and a stale check
        would ask the CLOB, which is NOWHERE here.
        """
        return {
            "log__level": "info",
            "feed__ping_interval": self.ping_interval,
            "feed__transport": self.transport,
            "feed__stale_after": 3600.0,
            "pipeline__positions_per_second": self.positions_per_second,
            "gamma__url": NOWHERE,
            "poll__url": NOWHERE,
        }


@attrs.frozen
class Mark:
    """The daemon at the end of a stretch: loop lag, memory (KiB), CPU seconds, when."""

    lag: LagReading
    rss_kib: int
    hwm_kib: int
    cpu_s: float
    at: float


@attrs.define
class Run:
    """What the bench saw of one run (``time.monotonic()``)."""

    spawned_at: float = 0.0
    released_at: float = 0.0
    covered_at: float | None = None
    priced_at: float | None = None
    marks: dict[str, Mark] = attrs.field(factory=dict)
    health: dict[str, Any] = attrs.field(factory=dict)
    server_pongs: int = 0
    daemon_pongs: int = 0
    health_misses: int = 0
    exit_code: int | None = None
    log_problems: list[str] = attrs.field(factory=list)


def memory_kib(pid: int) -> tuple[int, int]:
    """``VmRSS`` and ``VmHWM`` of process ``pid``, KiB (``/proc/<pid>/status``)."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found["VmRSS"], found["VmHWM"]


async def _health(run: Run, daemon: DaemonProcess) -> dict[str, Any]:
    """``/health``, asked again while it does not answer within 2 s (counted: a stalled loop)."""
    while (document := await daemon.try_health()) is None:
        run.health_misses += 1
    return document


async def _wait(
    run: Run,
    daemon: DaemonProcess,
    done: Callable[[dict[str, Any]], Awaitable[bool]],
    what: str,
) -> None:
    """Until ``await done(/health)``; progress every 10 s."""
    shown = time.monotonic()
    while True:
        health = await _health(run, daemon)
        if await done(health):
            return
        if time.monotonic() - shown >= 10:
            shown = time.monotonic()
            covered = sum(s["assets_with_data"] for s in health["shards"])
            pending = {k: v for k, v in health["pending"].items() if v}
            progress(
                f"  waiting for {what}: {data_frames(health)} data frames, {covered:,} assets "
                f"covered, pending {pending}"
            )
        await trio.sleep(POLL_INTERVAL)


async def _mark(run: Run, name: str, daemon: DaemonProcess) -> None:
    lag = await read_lag(daemon)
    rss, hwm = memory_kib(daemon.pid)
    run.marks[name] = Mark(lag, rss, hwm, daemon.cpu_seconds(), time.monotonic())
    progress(f"{name}: VmRSS {rss / 1024:.1f} MiB, VmHWM {hwm / 1024:.1f} MiB")


def _probe(dsn: str) -> Any:
    """The bench's own connection (a psycopg connection) for :func:`_priced`."""
    from polystream.store import db

    return db.connect(dsn, application_name="polystream-bench-probe", autocommit=True)


def _priced(conn: Any) -> tuple[int, int]:
    """Markets priced from the feed (``source = 'ws'``), positions with a current price."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM markets WHERE source = 'ws'),"
        " (SELECT count(*) FROM positions WHERE current_price IS NOT NULL)"
    ).fetchone()
    return int(row[0]), int(row[1])


async def _measure(workload: Workload, server: DumpServer, dsn: str, options: Options) -> Run:
    """The daemon's run: connected and loaded, the dump, pricing and heartbeat, SIGTERM."""
    run = Run()
    assets, rules = workload.assets, 2 * len(workload.positions)
    log_path = options.log_dir / "daemon-scale.log"
    settings = options.daemon_settings()
    async with open_daemon(dsn, server.url, log_path, settings=settings, cwd=ROOT) as daemon:
        run.spawned_at = daemon.spawned_at

        async def loaded(h: dict[str, Any]) -> bool:
            connected = all(s["state"] == "connected" for s in h["shards"])
            wanted = (h["desired_assets"], h["subscribed_assets"], server.subscribed())
            return connected and wanted == (assets,) * 3 and h["monitor"]["rules"] == rules

        with trio.fail_after(options.timeout):
            await daemon.wait_ready()
            await _wait(run, daemon, loaded, "connections and rules")
        await _mark(run, "startup", daemon)

        async def covered(h: dict[str, Any]) -> bool:
            frames = sum(c.subscribes for c in server.connections)
            written = sum(len(c.dump_written) for c in server.connections)
            seen = sum(s["assets_with_data"] for s in h["shards"])
            queued = h["pending"]["router_queue"]
            return written == frames and data_frames(h) >= frames and seen >= assets and not queued

        profile = None if options.profile_dir is None else options.profile_dir / "daemon-dump.txt"
        async with profiling(daemon.pid, profile):
            server.release.set()
            run.released_at = time.monotonic()
            with trio.move_on_after(options.timeout):
                await _wait(run, daemon, covered, "the dump")
                run.covered_at = time.monotonic()
        await _mark(run, "dump", daemon)

        want = (len(workload.markets), len(workload.positions))
        with await trio.to_thread.run_sync(_probe, dsn) as conn:

            async def priced(h: dict[str, Any]) -> bool:
                idle = not any(h["pending"].values())
                return idle and await trio.to_thread.run_sync(_priced, conn) == want

            with trio.move_on_after(options.timeout):
                await _wait(run, daemon, priced, "the pricing")
                run.priced_at = time.monotonic()
        await trio.sleep(options.settle)
        with trio.move_on_after(3):  # until every PONG sent before a /health read is read
            while True:
                run.server_pongs = sum(c.pongs for c in server.connections)
                run.health = await _health(run, daemon)
                run.daemon_pongs = int(run.health["control_frames"].get("PONG", 0))
                if run.daemon_pongs >= run.server_pongs:
                    break
                await trio.sleep(POLL_INTERVAL)
        await _mark(run, "end", daemon)
        server.stopping = True
        run.exit_code = await daemon.stop()
    run.log_problems = DaemonLog.read(log_path).problems()
    return run


# --- the checks ------------------------------------------------------------------


def subscription_differences(server: DumpServer, workload: Workload) -> list[str]:
    """Every asset subscribed exactly once, none unknown, <= 200 per connection."""
    seen = Counter(a for c in server.connections for a in c.assets)
    found = []
    missing = [t for m in workload.markets for t in m.tokens if t not in seen]
    twice = [a for a, n in seen.items() if n > 1]
    for label, listed in (("never subscribed", missing), ("subscribed twice", twice)):
        if listed:
            found.append(f"{len(listed)} assets {label}, e.g. {listed[0][:12]}")
    crowded = [c.number for c in server.connections if len(c.assets) > MAX_PER_CONNECTION]
    if crowded:
        found.append(f"connections {crowded} hold more than {MAX_PER_CONNECTION} assets")
    for what in ("unknown_assets", "unsubscribed"):
        total = sum(getattr(c, what) for c in server.connections)
        if total:
            found.append(f"{total} assets {what.replace('_', ' ')}")
    other = sum((c.other_text for c in server.connections), Counter())
    if other:
        found.append(f"messages neither PING nor (un)subscribe: {dict(other)}")
    return found


def health_differences(run: Run, server: DumpServer, workload: Workload) -> list[str]:
    """``/health`` at the end, and the heartbeat as the server saw it."""
    health, assets = run.health, workload.assets
    shards, conns = health["shards"], server.connections
    frames = sum(len(c.dump_bytes) for c in conns)
    want = {
        "data frames read": frames,
        "events": {"book": assets},
        "book hashes": {"verified": assets},
        "parse errors": {},
        "ignored events": {},
        "foreign events": 0,
        "subscribed, desired assets": (assets, assets),
        "shard states": {"connected": len(shards)},
        "status, database errors": ("ok", 0),
        "rules, triggers": (2 * len(workload.positions), {}),
        "reconnects": 0,
        "connections closed early": [],
        "connections beyond the shards": 0,
        "PONGs sent but not read by the daemon": 0,
        "connections without a PONG": [],
        "shards without a ping_rtt": [],
    }
    got = {
        "data frames read": data_frames(health),
        "events": _nonzero(health["events"]),
        "book hashes": _nonzero(health["book_hashes"]),
        "parse errors": _nonzero(health["parse_errors"]),
        "ignored events": _nonzero(health["ignored_events"]),
        "foreign events": health["foreign_events"],
        "subscribed, desired assets": (health["subscribed_assets"], health["desired_assets"]),
        "shard states": dict(Counter(s["state"] for s in shards)),
        "status, database errors": (health["status"], health["database"]["errors"]),
        "rules, triggers": (health["monitor"]["rules"], _nonzero(health["monitor"]["triggers"])),
        "reconnects": sum(int(s["reconnects"]) for s in shards),
        "connections closed early": [c.number for c in conns if c.closed_early],
        "connections beyond the shards": len(conns) - len(shards),
        "PONGs sent but not read by the daemon": max(0, run.server_pongs - run.daemon_pongs),
        "connections without a PONG": [c.number for c in conns if not c.pongs],
        "shards without a ping_rtt": [s["index"] for s in shards if s["ping_rtt_s"] is None],
    }
    return [f"{key}: {got[key]}, expected {want[key]}" for key in want if got[key] != want[key]]


def _nonzero(counts: Mapping[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


def database_differences(dsn: str, workload: Workload) -> list[str]:
    """Every market row and position as the books say, and no trigger."""
    from polystream.store import db

    quotes = workload.quotes
    found: list[str] = []
    with db.connect(dsn, application_name="polystream-bench-check", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, outcome_prices, best_bid, best_ask, last_mid_price, last_trade_price,"
            " source FROM markets"
        ).fetchall()
        by_id = {row[0]: row[1:] for row in rows}
        for market in workload.markets:
            yes, no = (quotes[t] for t in market.tokens)
            want = ([yes.display, no.display], yes.best_bid, yes.best_ask, yes.midpoint)
            want_row = (*want, yes.last_trade, "ws")
            row = by_id.get(market.id)
            got = None
            if row is not None:
                got = ([None if p is None else Decimal(p) for p in row[0] or []], *row[1:])
            if got != want_row:
                found.append(f"market {market.id}: {got}, expected {want_row}")
        rows = conn.execute(
            "SELECT id, token_id, size, entry_price, current_price, pnl_amount, pnl_percentage,"
            " status FROM positions"
        ).fetchall()
        if len(rows) != len(workload.positions):
            found.append(f"{len(rows)} positions, expected {len(workload.positions)}")
        for pid, token, size, entry, *priced in rows:
            price = quotes[token].display
            pct = ((price - entry) / entry * 100).quantize(Decimal("0.0001"), ROUND_HALF_UP)
            if priced != [price, size * (price - entry), pct, "active"]:
                pnl = size * (price - entry)
                found.append(f"position {pid}: {priced}, expected {price} {pnl} {pct} active")
        (triggers,) = conn.execute("SELECT count(*) FROM triggers").fetchone() or (None,)
        if triggers != 0:
            found.append(f"{triggers} triggers: no threshold is crossed")
    if len(found) > 20:
        found = [*found[:20], f"... and {len(found) - 20} more"]
    return found


# --- results ---------------------------------------------------------------------

Row = tuple[str, str, Any, str]
"""One figure: ``section.name`` in the JSON document, table label, value, unit."""


def figures(workload: Workload, server: DumpServer, run: Run, options: Options) -> list[Row]:
    """Every figure of the run, in table order (the loop lag from :mod:`bench.looplag`)."""
    startup, dump, end = (run.marks[name] for name in ("startup", "dump", "end"))
    conns, shards = server.connections, run.health["shards"]
    zero = LagReading(startup.lag.bounds, (0.0,) * len(startup.lag.cumulative), 0.0, 0.0)
    lag = {
        "startup": startup.lag.since(zero).figures(),
        "dump": dump.lag.since(startup.lag).figures(),
        "after": end.lag.since(dump.lag).figures(),
    }
    sizes = [n for c in conns for n in c.dump_bytes]
    first = min((t for c in conns for t in c.dump_started), default=run.released_at)
    written = max((t for c in conns for t in c.dump_written), default=None)
    dump_end = run.covered_at or end.at
    rtts = [s["ping_rtt_s"] * 1000 for s in shards if s["ping_rtt_s"] is not None]

    def mib(kib: int) -> float:
        return round(kib / 1024, 1)

    def since_first(at: float | None) -> float | None:
        return None if at is None else round(at - first, 2)

    def mb(n: float) -> float:
        return round(n / 1e6, 2)

    lag_rows: list[Row] = []
    for name, title in (("dump", "dump"), ("startup", "start-up"), ("after", "after the dump")):
        p99, top = lag[name]["p99"], lag[name]["max"]
        bold = "**" if name == "dump" else ""
        lag_rows += [
            (f"loop_lag.{name}_p99", f"{bold}Loop lag p99, {title}{bold}", p99["value"], "ms"),
            (f"loop_lag.{name}_max", f"Loop lag max, {title}", top["value"], top["unit"]),
        ]
    lag_rows.append(
        (
            "loop_lag.dump_over_100ms",
            "Loop lag samples > 100 ms, dump",
            lag["dump"]["over_100ms"],
            "samples",
        )
    )
    return [
        ("memory.peak_rss", "**Daemon peak RSS (VmHWM)**, goal <= 150 MB", mib(end.hwm_kib), "MiB"),
        ("memory.rss_loaded", "Daemon RSS, connected, rules loaded", mib(startup.rss_kib), "MiB"),
        ("memory.peak_rss_loaded", "Daemon peak RSS before the dump", mib(startup.hwm_kib), "MiB"),
        ("memory.rss_dump", "Daemon RSS, dump applied", mib(dump.rss_kib), "MiB"),
        ("memory.peak_rss_dump", "Daemon peak RSS, dump applied", mib(dump.hwm_kib), "MiB"),
        ("memory.rss_end", "Daemon RSS at the end (all priced, settled)", mib(end.rss_kib), "MiB"),
        ("dump.frames", "Dump frames (one array frame per subscribe)", len(sizes), "frames"),
        ("dump.frame_mb_min", "Dump frame size, min", mb(min(sizes, default=0)), "MB (10^6 B)"),
        ("dump.frame_mb_max", "Dump frame size, max", mb(max(sizes, default=0)), "MB"),
        ("dump.total_mb", "Dump, all frames", mb(sum(sizes)), "MB"),
        ("dump.written_s", "First dump byte -> last frame written", since_first(written), "s"),
        ("dump.covered_s", "First dump byte -> dump applied", since_first(run.covered_at), "s"),
        (
            "dump.priced_s",
            "First dump byte -> every market and position priced",
            since_first(run.priced_at),
            "s",
        ),
        (
            "dump.cpu_s",
            "Daemon CPU, release -> dump applied",
            round(dump.cpu_s - startup.cpu_s, 2),
            "s",
        ),
        *lag_rows,
        ("heartbeat.connections", "Connections", len(conns), "connections"),
        (
            "heartbeat.pings",
            "PINGs received (to the end)",
            sum(len(c.pings) for c in conns),
            "PINGs",
        ),
        (
            "heartbeat.pings_during_dump",
            "PINGs received during the dump",
            sum(run.released_at <= t <= dump_end for c in conns for t in c.pings),
            "PINGs",
        ),
        (
            "heartbeat.pongs_sent",
            "PONGs sent (server) by the last /health read",
            run.server_pongs,
            "PONGs",
        ),
        ("heartbeat.pongs_read", "PONGs read (daemon /health)", run.daemon_pongs, "PONGs"),
        (
            "heartbeat.missed_pongs",
            "**Missed PONGs** (sent, never read)",
            max(0, run.server_pongs - run.daemon_pongs),
            "PONGs",
        ),
        (
            "heartbeat.reconnects",
            "Reconnects",
            sum(int(s["reconnects"]) for s in shards),
            "reconnects",
        ),
        (
            "heartbeat.max_ping_gap_s",
            f"Longest PING gap on a connection from the release (interval {options.ping_interval} s)",
            round(max((c.ping_gap(run.released_at) for c in conns), default=0.0), 2),
            "s",
        ),
        (
            "heartbeat.ping_rtt_max_ms",
            "ping_rtt at the end, max over shards",
            round(max(rtts, default=0.0), 2),
            "ms",
        ),
        (
            "heartbeat.health_misses",
            "/health reads unanswered within 2 s",
            run.health_misses,
            "reads",
        ),
        (
            "startup.loaded_s",
            "Start-up: spawn -> connected, rules loaded",
            round(startup.at - run.spawned_at, 2),
            "s",
        ),
    ]


def document(
    workload: Workload,
    server: DumpServer,
    run: Run,
    options: Options,
    machine: dict[str, Any],
    differences: list[str],
) -> dict[str, Any]:
    """The results document (JSON-ready): workload, figures by section, goals, checks."""
    rows = figures(workload, server, run, options)
    doc: dict[str, Any] = {
        "machine": machine,
        "workload": {
            "markets": len(workload.markets),
            "assets": workload.assets,
            "positions": len(workload.positions),
            "thresholds": 2 * len(workload.positions),
            "levels_per_side": workload.levels,
            "tick_size": "0.001",
            "ping_interval_s": options.ping_interval,
            "daemon_transport": options.transport,
            "daemon_settings": setting_variables(options.daemon_settings()),
            "loop_lag_method": LAG_METHOD,
        },
        "table": [[label, value, unit] for _, label, value, unit in rows],
    }
    for key, _, value, unit in rows:
        section, name = key.split(".")
        doc.setdefault(section, {})[name] = {"value": value, "unit": unit}
    peak = run.marks["end"].hwm_kib * 1024
    doc["memory"]["peak_rss"] |= {"bytes": peak, "goal_bytes": GOAL_PEAK_RSS_BYTES}
    p99 = doc["loop_lag"]["dump_p99"]["value"]
    doc["goals"] = {
        "peak_rss_within_150_mb": peak <= GOAL_PEAK_RSS_BYTES,
        "no_missed_pong": doc["heartbeat"]["missed_pongs"]["value"] == 0,
        "dump_loop_lag_p99_within_5_ms": p99 is not None and p99 <= 5.0,
    }
    doc["connections"] = [
        {
            "connection": c.number,
            "assets": len(c.assets),
            "dump_bytes": c.dump_bytes,
            "pings": len(c.pings),
            "pongs": c.pongs,
            "max_ping_gap_s": round(c.ping_gap(run.released_at), 3),
            "error": c.error,
        }
        for c in server.connections
    ]
    doc["correctness"] = {
        "exit_code": run.exit_code,
        "log_problems": Counter(run.log_problems).most_common(10),
        "differences": differences,
    }
    return doc


def markdown(doc: dict[str, Any]) -> str:
    """The results table, the goals and the correctness line, as Markdown."""
    work, machine, check = doc["workload"], doc["machine"], doc["correctness"]
    lines = [
        f"Scale: {work['assets']:,} assets ({work['markets']:,} binary markets) subscribed, "
        f"{work['positions']:,} active positions with TP and SL ({work['thresholds']:,} "
        f"thresholds, none crossed); initial dump: one array frame of its books per subscribe, "
        f"{work['levels_per_side']} levels per side (tick {work['tick_size']}); PING every "
        f"{work['ping_interval_s']} s; feed.transport {work['daemon_transport']}; "
        f"{machine['cpu_count']} CPUs, Python {machine['python']}, {machine['date']}. One run.",
        "",
        "| Measurement | Value | Unit |",
        "| --- | ---: | --- |",
    ]
    for label, value, unit in doc["table"]:
        text = (
            "n/a" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:,.2f}"
        )
        lines.append(f"| {label} | {text} | {unit} |")
    goals = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in doc["goals"].items())
    beat = doc["heartbeat"]
    lines += [
        "",
        f"Goals (reported, not part of correctness): {goals}.",
        "",
        f"Loop lag: {work['loop_lag_method']}.",
        "",
        f"Correctness (exact): {work['assets']:,} assets each subscribed once (<= "
        f"{MAX_PER_CONNECTION} per connection), {doc['dump']['frames']['value']} dump frames all "
        f"read, {work['assets']:,} books all hash-verified, no parse error; {work['markets']:,} "
        f"markets and {work['positions']:,} positions priced as the books say (display prices, "
        "best bid/ask, midpoint, last trade, P&L, source 'ws'), no trigger; "
        f"{beat['reconnects']['value']} reconnects, {beat['missed_pongs']['value']} missed "
        f"PONGs; exit {check['exit_code']}, {len(check['log_problems'])} log warnings; "
        f"{len(check['differences'])} differences.",
    ]
    return "\n".join(lines) + "\n"


# --- orchestration ---------------------------------------------------------------


async def bench(
    workload: Workload, admin_dsn: str, options: Options
) -> tuple[DumpServer, Run, list[str]]:
    """The run on a fresh database: the server, what was seen, the differences."""
    with throwaway_database(admin_dsn, f"polystream_bench_scale_{os.getpid()}") as dsn:
        await trio.to_thread.run_sync(prepare_database, dsn, workload)
        progress("database ready; starting the daemon")
        server = DumpServer(workload.books)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            run = await _measure(workload, server, dsn, options)
            nursery.cancel_scope.cancel()
        differences = subscription_differences(server, workload)
        differences += health_differences(run, server, workload)
        for stretch, at in (("the dump applied", run.covered_at), ("all priced", run.priced_at)):
            if at is None:
                differences.append(f"{stretch} not within {options.timeout} s")
        differences += await trio.to_thread.run_sync(database_differences, dsn, workload)
    if run.exit_code != 0:
        differences.append(f"daemon exit {run.exit_code}")
    differences += [f"log: {problem}" for problem, _ in Counter(run.log_problems).most_common(10)]
    return server, run, differences


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.scale", description=(__doc__ or "").split("\n\n")[0]
    )
    add = parser.add_argument
    add("--markets", type=int, default=5_000, help="binary markets (5,000: 10,000 assets)")
    add("--positions-per-asset", type=int, default=10, help="positions per asset (10: 100,000)")
    add(
        "--levels",
        type=int,
        default=100,
        help="book levels per side (100: above the deepest real book seen, 93)",
    )
    add("--ping-interval", type=float, default=1.0, help="feed.ping_interval, s (1.0)")
    add("--daemon-transport", choices=TRANSPORTS, default="sansio", help="feed.transport (sansio)")
    add(
        "--positions-per-second",
        type=float,
        default=10_000.0,
        help="pipeline.positions_per_second (10,000: the daemon's 500 would take 200 s)",
    )
    add("--settle", type=float, default=5.0, help="s of heartbeat only after the pricing (5)")
    add("--timeout", type=float, default=300.0, help="s for each of start-up, dump, pricing (300)")
    add("--seed", type=int, default=20251211)
    add_output_options(parser, "results-scale", profile="the dump")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write its results; returns 1 on any difference, else 0."""
    args = _parse_args(argv)
    with contextlib.ExitStack() as stack:
        admin_dsn, machine = stack.enter_context(bench_setup())
        workload = Workload.build(args.markets, args.levels, args.positions_per_asset, args.seed)
        progress(
            f"workload: {workload.assets:,} assets, {len(workload.positions):,} positions, "
            f"{sum(len(b) for b in workload.books.values()) / 1e6:.0f} MB of books"
        )
        options = Options(
            args.ping_interval,
            args.daemon_transport,
            args.positions_per_second,
            args.settle,
            args.timeout,
            log_directory(stack, args.log_dir, "polystream-bench-scale-"),
            args.profile,
        )
        server, run, differences = trio.run(bench, workload, admin_dsn, options)
    if args.profile is not None:
        print_hotspots(args.profile, top=25)
        return 0  # profiled figures are not written as results
    doc = document(workload, server, run, options, machine, differences)
    write_results(args.out, "results-scale", doc, markdown(doc))
    return exit_status(differences)


if __name__ == "__main__":
    sys.exit(main())

"""
Ingest benchmark: how fast ``polystream run`` turns market-channel frames into
database state, compared, in the same run, with a bare trio-websocket client
(``ingest.ratio``) and a bare Sans-I/O reader (the physical reference).

Run ``make bench`` or ``.venv/bin/python -m bench.ingest`` (from the
repository root; ``--help`` for options). It writes
``bench/results.json`` and ``bench/results.md`` and prints the table.

The workload is ``examples/updown-2025-12-11.jsonl.gz`` (6 markets, 12 assets)
repeated N times, each repetition's timestamps after the previous one's (the
daemon rightly drops events older than what it holds). Each repetition starts
with the book array, so the state after the last frame is the one in
``examples/updown-2025-12-11.expected.json``.

One benchmark-only sender serves all measurements: a loopback TCP server doing the
WebSocket handshake with wsproto, then writing the frames, encoded once up front,
with plain ``send_all`` of 1 MiB chunks; a sibling task reads and discards what the
client sends (its ``PING``s). Each round, interleaved, measures:

* ``sender``: a child process that reads raw bytes and discards them (the sender's
  own ceiling; it must be well above the clients');
* ``bare_client``: a child process with trio-websocket's ``get_message`` only;
* ``sansio_client``: a child process with the daemon's own Sans-I/O transport
  (``polystream.feed.transport.open_transport("sansio", ...)``: websockets'
  ``ClientProtocol`` driven inline over a trio stream) and ``receive()`` only,
  counting messages: the least a trio WebSocket reader can do, the physical
  reference beside the trio-websocket baseline;
* ``daemon``: ``polystream run`` as a child process on a fresh database holding the
  6 markets and 2 active positions per asset, ``feed.transport`` from
  ``--daemon-transport`` (default ``sansio``, the daemon's default); the clock runs
  from the first byte sent until a poll of the database (every 20 ms) sees the
  final state, the daemon has read every frame and has nothing pending
  (``/health``). The sender holds the tape until the bench has read the daemon's
  loop-lag histogram (``bench.looplag``), read again once the final state is seen:
  the run's loop lag p99 and max;
* ``daemon_quiet`` and ``daemon_told``: the same run with the change notifications off
  (``pipeline.notify = false``), and with them on plus Redis cache invalidation
  (``cache.redis_url``: a ``redis-server`` of the bench's own on a free port).
  ``ingest.notify.ratio`` is told over quiet, round by round (goal >= 0.9). In the told
  run a connection of the bench LISTENs on ``polystream_markets`` and
  ``polystream_positions_priced`` from a thread: each notification's delay is its
  receive time minus its ``sent_ms`` (queued just before the commit, so the delay
  after the commit is at most that), and every market and user must be told; every
  Redis key of the held markets, tokens and user, set before the run, must be gone
  at its end, with no Redis error.

Times are ``time.monotonic()``, one system-wide clock for all processes. The
machine is shared and noisy: compare figures within one run only.

PostgreSQL: ``POLYSTREAM_BENCH_DSN``, else ``POLYSTREAM_TEST_DSN`` (an admin DSN),
else an embedded server in a temporary directory (``bench.harness``). Each daemon run
gets its own database ``polystream_bench_<pid>_<round>``, dropped afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import attrs
import orjson
import redis
import trio

from bench.harness import (
    CAPTURE,
    CAPTURE_EXPECTED,
    CAPTURE_MARKETS,
    CAPTURE_TAPE,
    ROOT,
    BenchError,
    DaemonLog,
    ExpectingServer,
    Link,
    Market,
    Session,
    add_output_options,
    bench_setup,
    capture_lines,
    checkpoint,
    data_frames,
    exit_status,
    lap_offset_ms,
    load_markets,
    log_directory,
    print_hotspots,
    profiling,
    progress,
    quantile,
    shift_timestamps,
    text_frames,
    throwaway_database,
    write_results,
)
from bench.looplag import LAG_METHOD, read_lag
from polystream.config import TransportKind
from polystream.feed.transport import TRANSPORTS
from polystream.ops.daemon import (
    DaemonProcess,
    free_port,
    open_daemon,
    peak_rss_kib,
    setting_variables,
)

CHUNK_BYTES = 1 << 20
POLL_INTERVAL = 0.02
MIN_FRAMES = 150_000
MESSAGE_QUEUE = 256  # polystream.feed.pool._MESSAGE_QUEUE
MAX_MESSAGE_SIZE = 16 * 1024 * 1024  # polystream.config.FeedConfig.max_message_size
ENTRY_PRICES = (Decimal("0.30"), Decimal("0.60"))  # two positions per asset
DAEMON_SETTINGS = {
    "log__format": "json",
    "log__level": "info",
    "pipeline__debounce": "0.2",
    "pipeline__market_flush_interval": "0.05",
}
CLIENT_KINDS = {"discard": "sender", "bare": "bare_client", "sansio": "sansio_client"}
"""``--client`` of a child process -> its key in the runs and the results."""
DAEMON_KINDS = ("daemon", "daemon_quiet", "daemon_told")
"""Daemon runs of a round: defaults (notifications on, no Redis), notifications off,
notifications and Redis invalidation on."""
CHANGE_CHANNELS = ("polystream_markets", "polystream_positions_priced")
USER = "bench"
"""The ``user_id`` of every position the bench opens."""


# --- the workload ----------------------------------------------------------------


@attrs.frozen
class Tape:
    """The capture repeated ``repeat`` times, encoded once as server-to-client text frames;
    each repetition's timestamps follow the previous one's."""

    blob: bytes
    frames: int
    events: int
    repeat: int
    event_types: dict[str, int] = attrs.field(factory=dict)  # per repetition, from the JSON

    @classmethod
    def load(cls, path: Path, repeat: int | None) -> Tape:
        """
        Read ``path``, repeated ``repeat`` times (None: enough for MIN_FRAMES frames),
        encoded once.
        """
        lines = capture_lines(path)
        span_ms = lap_offset_ms(lines)
        events = 0
        types: Counter[str] = Counter()
        for line in lines:
            data = orjson.loads(line)
            objects = data if isinstance(data, list) else [data]
            events += len(objects)
            types.update(str(obj.get("event_type")) for obj in objects)
        if repeat is None:
            repeat = math.ceil(MIN_FRAMES / len(lines))
        shifted = (shift_timestamps(line, lap * span_ms) for lap in range(repeat) for line in lines)
        return cls(
            blob=b"".join(text_frames(shifted)),
            frames=len(lines),
            events=events,
            repeat=repeat,
            event_types=dict(types),
        )

    @property
    def total_frames(self) -> int:
        """Frames of all repetitions."""
        return self.frames * self.repeat

    @property
    def total_events(self) -> int:
        """Events of all repetitions."""
        return self.events * self.repeat

    @property
    def total_bytes(self) -> int:
        """Encoded bytes of all repetitions."""
        return len(self.blob)

    @property
    def total_event_types(self) -> dict[str, int]:
        """Events sent per ``event_type``, all repetitions."""
        return {kind: n * self.repeat for kind, n in sorted(self.event_types.items())}


def _dec(value: str | None) -> Decimal | None:
    return None if value is None else Decimal(value)


MarketState = tuple[
    list[Decimal | None], Decimal | None, Decimal | None, Decimal | None, Decimal | None
]


@attrs.frozen
class FinalState:
    """What ``markets`` and ``positions`` hold after the last frame (expected.json)."""

    markets: dict[str, MarketState]
    prices: dict[str, Decimal | None]

    @classmethod
    def expected(cls, markets: Sequence[Market]) -> FinalState:
        """The final state of ``markets`` from ``expected.json``."""
        assets = orjson.loads(CAPTURE_EXPECTED.read_bytes())["assets"]
        rows: dict[str, MarketState] = {}
        for market in markets:
            first = assets[market.tokens[0]]
            rows[market.id] = (
                [_dec(assets[t]["display_price"]) for t in market.tokens],
                _dec(first["best_bid"]),
                _dec(first["best_ask"]),
                _dec(first["midpoint"]),
                _dec(first["last_trade_price"]),
            )
        prices = {t: _dec(assets[t]["display_price"]) for m in markets for t in m.tokens}
        return cls(rows, prices)


# --- the sender ------------------------------------------------------------------


@attrs.define(eq=False)
class ClientSession(Session):
    """
    One expected client connection of ``kind`` (``discard``, ``bare``, ``sansio``,
    ``daemon``); the tape waits for ``go``.
    """

    kind: str
    go: trio.Event = attrs.field(factory=trio.Event)


@attrs.define(eq=False)
class Sender(ExpectingServer[ClientSession]):
    """The bench's WebSocket server: the tape, written with plain socket sends."""

    tape: Tape = attrs.field(kw_only=True)

    async def play(self, link: Link, session: ClientSession) -> None:
        """
        Once ``session.go`` is set, the whole tape in 1 MiB chunks (the client's
        frames are discarded meanwhile).
        """
        await session.go.wait()
        view = memoryview(self.tape.blob)
        session.first_byte_at = time.monotonic()
        for offset in range(0, len(view), CHUNK_BYTES):
            await link.send_bytes(view[offset : offset + CHUNK_BYTES])
        session.sent_all_at = time.monotonic()


# --- the client child processes --------------------------------------------------


async def _bare_client(url: str, frames: int, assets: list[str]) -> dict[str, Any]:
    from trio_websocket import open_websocket_url

    async with open_websocket_url(
        url,
        max_message_size=MAX_MESSAGE_SIZE,
        message_queue_size=MESSAGE_QUEUE,
        disconnect_timeout=2,
    ) as ws:
        await ws.send_message(orjson.dumps({"assets_ids": assets, "type": "market"}).decode())
        cpu_start = time.process_time()
        count = 0
        while count < frames:
            await ws.get_message()
            count += 1
        end = time.monotonic()
        cpu = time.process_time() - cpu_start
    return {"end": end, "frames": count, "cpu_s": cpu}


async def _sansio_client(url: str, frames: int, assets: list[str]) -> dict[str, Any]:
    from polystream.feed.transport import open_transport

    async with open_transport("sansio", url, max_message_size=MAX_MESSAGE_SIZE) as ws:
        await ws.send(orjson.dumps({"assets_ids": assets, "type": "market"}).decode())
        cpu_start = time.process_time()
        count = 0
        while count < frames:
            await ws.receive()
            count += 1
        end = time.monotonic()
        cpu = time.process_time() - cpu_start
    return {"end": end, "frames": count, "cpu_s": cpu}


async def _discard_client(port: int, total_bytes: int, assets: list[str]) -> dict[str, Any]:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request, TextMessage

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host=f"127.0.0.1:{port}", target="/ws/market")))
        accepted = False
        while not accepted:
            data = await stream.receive_some(65536)
            if not data:
                raise BenchError("sender closed during the handshake")
            ws.receive_data(data)
            accepted = any(isinstance(e, AcceptConnection) for e in ws.events())
        subscribe = orjson.dumps({"assets_ids": assets, "type": "market"}).decode()
        await stream.send_all(ws.send(TextMessage(data=subscribe)))
        cpu_start = time.process_time()
        received = 0
        while received < total_bytes:
            data = await stream.receive_some(CHUNK_BYTES)
            if not data:
                raise BenchError(f"sender closed after {received} of {total_bytes} bytes")
            received += len(data)
        end = time.monotonic()
        cpu = time.process_time() - cpu_start
    return {"end": end, "bytes": received, "cpu_s": cpu}


def _client_main(args: argparse.Namespace) -> int:
    assets = args.assets.split(",")
    url = f"ws://127.0.0.1:{args.port}/ws/market"
    if args.client == "bare":
        result = trio.run(_bare_client, url, args.frames, assets)
    elif args.client == "sansio":
        result = trio.run(_sansio_client, url, args.frames, assets)
    else:
        result = trio.run(_discard_client, args.port, args.bytes, assets)
    result["peak_rss_kib"] = peak_rss_kib(os.getpid())
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


async def run_client(sender: Sender, kind: str, assets: list[str]) -> dict[str, Any]:
    """Run a client child process against the sender; return its figures."""
    tape = sender.tape
    session = sender.expect(ClientSession(kind))
    session.go.set()
    command = [
        sys.executable,
        "-m",
        "bench.ingest",
        "--client",
        kind,
        "--port",
        str(sender.port),
        "--frames",
        str(tape.total_frames),
        "--bytes",
        str(tape.total_bytes),
        "--assets",
        ",".join(assets),
    ]
    with trio.fail_after(120):
        done = await trio.run_process(command, capture_stdout=True, cwd=ROOT)
        await session.closed.wait()
    result = orjson.loads(done.stdout.splitlines()[-1])
    if session.first_byte_at is None or session.error is not None:
        raise BenchError(f"{kind} client: {session.error or 'nothing sent'}")
    elapsed = result["end"] - session.first_byte_at
    received, sent = (
        (result["bytes"], tape.total_bytes)
        if kind == "discard"
        else (result["frames"], tape.total_frames)
    )
    return {
        "received": received,  # frames (clients) or bytes (raw reader), must equal sent
        "sent": sent,
        "elapsed_s": elapsed,
        "frames_per_s": tape.total_frames / elapsed,
        "events_per_s": tape.total_events / elapsed,
        "mb_per_s": tape.total_bytes / elapsed / 1e6,
        "peak_rss_mib": result["peak_rss_kib"] / 1024,
        "cpu_s": result["cpu_s"],
        "cpu_us_per_event": result["cpu_s"] / tape.total_events * 1e6,
    }


# --- the daemon ------------------------------------------------------------------


def prepare_database(dsn: str, markets: Sequence[Market]) -> None:
    """Import the capture's markets into the migrated database, open two positions per asset."""
    from polystream.store import db
    from polystream.store.markets import import_markets_file

    with db.connect(dsn, application_name="polystream-bench") as conn:
        import_markets_file(conn, CAPTURE_MARKETS)
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO positions (user_id, market_id, outcome, token_id, size, entry_price)"
                " VALUES (%s, %s, %s, %s, %s, %s)",
                [
                    (USER, market, outcome, token, Decimal(100), entry)
                    for m in markets
                    for market, outcome, token in m.owners
                    for entry in ENTRY_PRICES
                ],
            )
        conn.commit()


class StateProbe:
    """
    A connection of the bench's own that compares the database with
    :class:`FinalState`: every held market's row (display prices in token
    order, best bid/ask, midpoint and last trade of the first token,
    ``source = 'ws'``) and every position's current price and P&L
    (``size * (price - entry)``, percent of entry rounded to 4 places).
    """

    def __init__(self, dsn: str, want: FinalState) -> None:
        from polystream.store import db

        self._conn = db.connect(dsn, application_name="polystream-bench-probe", autocommit=True)
        self._want = want

    def mismatches(self) -> list[str]:
        """Every difference from the final state (empty: the database holds it exactly)."""
        rows = self._conn.execute(
            "SELECT id, outcome_prices, best_bid, best_ask, last_mid_price, last_trade_price,"
            " source FROM markets WHERE id = ANY(%s)",
            (list(self._want.markets),),
        ).fetchall()
        found = []
        for market_id, prices, bid, ask, mid, last, source in rows:
            got = ([None if p is None else Decimal(p) for p in prices or []], bid, ask, mid, last)
            if got != self._want.markets[market_id] or source != "ws":
                found.append(f"market {market_id}: {got} {source}")
        missing = set(self._want.markets) - {row[0] for row in rows}
        found += [f"market {market_id}: no row" for market_id in sorted(missing)]
        positions = self._conn.execute(
            "SELECT id, token_id, size, entry_price, current_price, pnl_amount, pnl_percentage"
            " FROM positions"
        ).fetchall()
        if len(positions) != self.positions:
            found.append(f"{len(positions)} positions, expected {self.positions}")
        for pid, token, size, entry, price, pnl, pct in positions:
            want = self._want.prices[token]
            if want is None or price != want:
                found.append(f"position {pid}: price {price}, expected {want}")
                continue
            want_pnl = size * (want - entry)
            want_pct = ((want - entry) / entry * 100).quantize(Decimal("0.0001"), ROUND_HALF_UP)
            if (pnl, pct) != (want_pnl, want_pct):
                found.append(f"position {pid}: P&L {pnl} {pct}, expected {want_pnl} {want_pct}")
        return found

    def matches(self) -> bool:
        """Whether the database holds the final state exactly."""
        return not self.mismatches()

    @property
    def positions(self) -> int:
        """Positions :func:`prepare_database` opens."""
        return len(self._want.prices) * len(ENTRY_PRICES)

    def close(self) -> None:
        """Close the probe's connection."""
        self._conn.close()


class ChangeListener:
    """
    LISTEN on :data:`CHANGE_CHANNELS` from a thread of the bench's own: every
    notification with the bench's receive time (unix ms, ``time.time()``).
    """

    def __init__(self, dsn: str) -> None:
        from polystream.store import db

        self._conn = db.connect(dsn, application_name="polystream-bench-listen", autocommit=True)
        for channel in CHANGE_CHANNELS:
            self._conn.execute(f"LISTEN {channel}")
        self.received: list[tuple[str, dict[str, Any], float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="bench-listen", daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            for note in self._conn.notifies(timeout=0.1):
                self.received.append((note.channel, orjson.loads(note.payload), time.time() * 1000))

    def close(self) -> None:
        """Stop listening (what arrived stays in ``received``)."""
        self._stop.set()
        self._thread.join(5)
        self._conn.close()

    def figures(self, markets: Sequence[Market]) -> dict[str, Any]:
        """Delays (ms, receive time - ``sent_ms``), counts, and who was never told."""
        delays = sorted(at - body["sent_ms"] for _, body, at in self.received)
        told: dict[str, set[str]] = {channel: set() for channel in CHANGE_CHANNELS}
        for channel, body, _ in self.received:
            told[channel].update(body.get("ids") or body.get("users") or ())
        untold = sorted({m.id for m in markets} - told["polystream_markets"])
        untold += sorted({USER} - told["polystream_positions_priced"])
        counts = Counter(channel for channel, _, _ in self.received)
        return {
            "notifications": {channel: counts[channel] for channel in CHANGE_CHANNELS},
            "delay_p50_ms": quantile(delays, 0.5) if delays else None,
            "delay_p99_ms": quantile(delays, 0.99) if delays else None,
            "delay_max_ms": delays[-1] if delays else None,
            "untold": untold,
        }


class BenchRedis:
    """A ``redis-server`` of the bench's own on a free loopback port, nothing on disk."""

    def __init__(self) -> None:
        self.port = free_port()
        self._process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    self.close()
                    raise BenchError("redis-server did not answer within 10 s") from None
                time.sleep(0.02)

    @property
    def url(self) -> str:
        """Its URL for ``cache.redis_url``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        """Stop it."""
        self.client.close()
        self._process.terminate()
        self._process.wait(10)


def cache_keys(markets: Sequence[Market]) -> list[str]:
    """The keys the default templates give the held markets, their tokens and the user."""
    return (
        [f"market:{m.id}" for m in markets]
        + [f"price:{t}" for m in markets for t in m.tokens]
        + [f"positions:{USER}"]
    )


async def _invalidated(cache: redis.Redis, keys: list[str], health: dict[str, Any]) -> list[str]:
    """Differences: keys still in Redis 10 s after the final state, or Redis errors."""
    differences = []
    left = 0
    for _ in range(int(10 / POLL_INTERVAL)):  # Redis is polled: no event to wait on
        left = await trio.to_thread.run_sync(lambda: cache.exists(*keys))
        if not left:
            break
        await trio.sleep(POLL_INTERVAL)
    if left:
        differences.append(f"{left} Redis keys not invalidated")
    state = health.get("cache") or {}
    if state.get("errors") or state.get("up") is not True:
        differences.append(f"Redis invalidation: {state}")
    return differences


def _drained(health: dict[str, Any], frames: int) -> bool:
    pending = health["pending"]
    return bool(
        data_frames(health) >= frames
        and not any(pending.get(k) for k in ("markets", "positions", "router_queue"))
    )


def health_differences(health: dict[str, Any], tape: Tape) -> list[str]:
    """
    How ``/health`` at the end differs from what was sent: data frames read,
    events counted per ``event_type`` (counted here from the JSON), nothing
    pending, no event dropped as foreign.
    """
    found = []
    if data_frames(health) != tape.total_frames:
        found.append(f"frames read {data_frames(health)}, sent {tape.total_frames}")
    events = {kind: n for kind, n in sorted(health["events"].items()) if n}
    if events != tape.total_event_types:
        found.append(f"events {events}, sent {tape.total_event_types}")
    pending = {k: v for k, v in health["pending"].items() if v}
    if pending:
        found.append(f"pending at the end: {pending}")
    if health["foreign_events"]:
        found.append(f"{health['foreign_events']} events dropped as foreign")
    return found


async def _stays_matched(probe: StateProbe, seconds: float = 0.2) -> bool:
    """Guard against an early match: the state must hold for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        await trio.sleep(POLL_INTERVAL)
        if not await trio.to_thread.run_sync(probe.matches):
            return False
    return True


async def wait_final_state(
    probe: StateProbe, daemon: DaemonProcess, frames: int
) -> tuple[float, int]:
    """
    Poll until the database holds the final state and the daemon has read every
    frame with nothing pending; return when the state was first seen and how
    many earlier polls matched too soon (the state also holds between repetitions).
    """
    early = 0
    while True:
        await trio.sleep(POLL_INTERVAL)
        if not await trio.to_thread.run_sync(probe.matches):
            continue
        seen_at = time.monotonic()
        if _drained(await daemon.health(), frames) and await _stays_matched(probe):
            return seen_at, early
        early += 1


@attrs.frozen
class Options:
    """Rounds, the daemon's ``feed.transport``, and where logs and profiles go."""

    rounds: int
    log_dir: Path
    profile_dir: Path | None
    daemon_transport: TransportKind = "sansio"

    @property
    def daemon_settings(self) -> dict[str, str]:
        """The daemon's configuration overrides (:data:`DAEMON_SETTINGS` + its transport)."""
        return {**DAEMON_SETTINGS, "feed__transport": self.daemon_transport}


async def run_daemon(
    sender: Sender,
    admin_dsn: str,
    round_no: int,
    want: FinalState,
    markets: Sequence[Market],
    options: Options,
    kind: str = "daemon",
    cache: BenchRedis | None = None,
) -> dict[str, Any]:
    """
    One end-to-end measurement of ``polystream run`` on a fresh database;
    ``kind`` one of :data:`DAEMON_KINDS` (``daemon_told`` needs ``cache``).
    """
    name = f"polystream_bench_{os.getpid()}_{round_no}_{kind}"
    with throwaway_database(admin_dsn, name) as dsn:
        await trio.to_thread.run_sync(prepare_database, dsn, markets)
        await trio.to_thread.run_sync(checkpoint, dsn)  # earlier runs' writes: not in this one
        probe = StateProbe(dsn, want)
        settings = options.daemon_settings
        listener = keys = None
        if kind == "daemon_quiet":
            settings = {**settings, "pipeline__notify": "false"}
        elif kind == "daemon_told":
            assert cache is not None
            settings = {**settings, "cache__redis_url": cache.url}
            keys = cache_keys(markets)
            await trio.to_thread.run_sync(lambda: cache.client.mset(dict.fromkeys(keys, "x")))
            listener = ChangeListener(dsn)
        try:
            profile = None
            if options.profile_dir is not None:
                profile = options.profile_dir / f"{kind}-{round_no}.txt"
            log_path = options.log_dir / f"{kind}-{round_no}.log"
            run = await _measure_daemon(
                sender, dsn, probe, want, log_path, profile, settings, cache, keys
            )
        finally:
            probe.close()
            if listener is not None:
                listener.close()
        if listener is not None:
            told = listener.figures(markets)
            run |= told
            run["differences"] += [f"never told: {untold}" for untold in told["untold"]]
        return run


async def _measure_daemon(
    sender: Sender,
    dsn: str,
    probe: StateProbe,
    want: FinalState,
    log_path: Path,
    profile: Path | None,
    settings: dict[str, str],
    cache: BenchRedis | None = None,
    keys: list[str] | None = None,
) -> dict[str, Any]:
    """
    One daemon run: the loop-lag histogram read, the tape, then the final
    state and the histogram again. Every way the run can go wrong is a
    ``differences`` entry (the caller fails the benchmark on any):
    final state not reached within 300 s or not exact, ``/health`` not as sent
    (:func:`health_differences`), subscription, exit code, log warnings,
    reconnects.
    """
    tape = sender.tape
    session = sender.expect(ClientSession("daemon"))
    differences: list[str] = []
    seen_at: float | None = None
    early = 0
    async with open_daemon(dsn, sender.url, log_path, settings=settings, cwd=ROOT) as daemon:
        async with profiling(daemon.pid, profile):
            with trio.fail_after(60):
                await daemon.wait_for(session.connected)
            lag_before = await read_lag(daemon)
            cpu_start = daemon.cpu_seconds()
            session.go.set()
            if sorted(session.assets) != sorted(want.prices):
                differences.append(f"subscribed {len(session.assets)} assets, not the 12 held")
            with trio.move_on_after(300):
                seen_at, early = await wait_final_state(probe, daemon, tape.total_frames)
            peak_kib = daemon.peak_rss_kib()
            cpu = daemon.cpu_seconds() - cpu_start
            lag = (await read_lag(daemon)).since(lag_before).figures()
            if seen_at is None:
                differences.append("final state not reached within 300 s")
            differences += await trio.to_thread.run_sync(probe.mismatches)
            health = await daemon.health()
            differences += health_differences(health, tape)
            if cache is not None and keys is not None:
                differences += await _invalidated(cache.client, keys, health)
        code = await daemon.stop()
    assert session.first_byte_at is not None
    log = DaemonLog.read(log_path)
    if code != 0:
        differences.append(f"daemon exit {code}")
    differences += [f"log: {problem}" for problem in log.problems()[:10]]
    if sender.unexpected:
        differences.append(f"{sender.unexpected} unexpected connections (reconnects)")
    if differences:
        progress(f"daemon differences (log {log_path}): {differences[:5]}")
    elapsed = (seen_at or time.monotonic()) - session.first_byte_at
    stopped = log.last("daemon_stopped")
    return {
        "elapsed_s": elapsed,
        "events_per_s": tape.total_events / elapsed,
        "frames_per_s": tape.total_frames / elapsed,
        "peak_rss_mib": peak_kib / 1024,
        "cpu_s": cpu,
        "cpu_us_per_event": cpu / tape.total_events * 1e6,
        "exit_code": code,
        "early_matches": early,
        "rows_markets": stopped.get("rows_markets"),
        "rows_positions": stopped.get("rows_positions"),
        "loop_lag": lag,
        "loop_lag_p99_ms": lag["p99"]["value"],
        "loop_lag_max_ms": lag["max"]["value"],
        "differences": differences,
    }


# --- orchestration ---------------------------------------------------------------


Runs = dict[str, list[dict[str, Any]]]


async def bench(tape: Tape, admin_dsn: str, options: Options) -> Runs:
    """
    Run ``options.rounds`` interleaved rounds (raw reader, bare trio-websocket client,
    bare Sans-I/O reader, then the daemon kinds of :data:`DAEMON_KINDS`); returns
    every round's figures.
    """
    markets = load_markets()
    want = FinalState.expected(markets)
    assets = [t for m in markets for t in m.tokens]
    runs: Runs = {key: [] for key in (*CLIENT_KINDS.values(), *DAEMON_KINDS)}
    sender = Sender(tape=tape)
    cache = await trio.to_thread.run_sync(BenchRedis)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.serve)
            for round_no in range(1, options.rounds + 1):
                for kind, key in CLIENT_KINDS.items():
                    runs[key].append(await run_client(sender, kind, assets))
                for kind in DAEMON_KINDS:
                    runs[kind].append(
                        await run_daemon(
                            sender, admin_dsn, round_no, want, markets, options, kind, cache
                        )
                    )
                _progress(round_no, runs)
            nursery.cancel_scope.cancel()
    finally:
        cache.close()
    return runs


def _progress(round_no: int, runs: Runs) -> None:
    s, b, r, d = (runs[k][-1] for k in ("sender", "bare_client", "sansio_client", "daemon"))
    quiet, told = runs["daemon_quiet"][-1], runs["daemon_told"][-1]
    progress(
        f"round {round_no}: sender {s['frames_per_s']:,.0f} frames/s, "
        f"bare client {b['events_per_s']:,.0f} events/s, Sans-I/O reader "
        f"{r['events_per_s']:,.0f} events/s, daemon {d['events_per_s']:,.0f} "
        f"events/s ({d['elapsed_s']:.2f} s, peak RSS {d['peak_rss_mib']:.1f} MiB, "
        f"loop lag p99 {d['loop_lag_p99_ms']} ms, max {d['loop_lag_max_ms']} ms); "
        f"notifications off {quiet['events_per_s']:,.0f} events/s, notifications and Redis "
        f"on {told['events_per_s']:,.0f} events/s (NOTIFY delay p99 {told['delay_p99_ms']} ms)"
    )


def figure(values: Sequence[float], unit: str, baseline: str | None = None) -> dict[str, Any]:
    """Median, min, max and every value of ``values``, with ``unit``."""
    result: dict[str, Any] = {
        "value": statistics.median(values),
        "unit": unit,
        "min": min(values),
        "max": max(values),
        "runs": list(values),
    }
    if baseline is not None:
        result["baseline"] = baseline
    return result


def _client_figures(kind: str, each: Any) -> dict[str, Any]:
    return {
        "frames_per_s": figure(each(kind, "frames_per_s"), "frames/s"),
        "events_per_s": figure(each(kind, "events_per_s"), "events/s"),
        "cpu_per_event": figure(each(kind, "cpu_us_per_event"), "CPU µs/event"),
    }


def results(tape: Tape, runs: Runs, machine: dict[str, Any], options: Options) -> dict[str, Any]:
    """The results document (JSON-ready): figures, workload, machine, correctness."""

    def each(kind: str, key: str) -> list[float]:
        return [float(run[key]) for run in runs[kind]]

    def per_round(kind: str, key: str, base: str = "bare_client") -> list[float]:
        """``kind``'s ``key`` over ``base``'s, round by round."""
        return [a / b for a, b in zip(each(kind, key), each(base, key), strict=True)]

    busy = [run["cpu_s"] / run["elapsed_s"] for run in runs["daemon"]]
    headroom = per_round("sender", "frames_per_s")
    return {
        "machine": machine,
        "correctness": correctness(tape, runs),
        "workload": {
            "capture": f"{CAPTURE.relative_to(ROOT)}.jsonl.gz",
            "repetitions": tape.repeat,
            "frames": tape.total_frames,
            "events": tape.total_events,
            "bytes": tape.total_bytes,
            "rounds": len(runs["daemon"]),
            "daemon_transport": options.daemon_transport,
            "daemon_settings": setting_variables(options.daemon_settings),
            "loop_lag_method": LAG_METHOD,
            "loop_lag_window": "tape's first byte (sender held until the first reading) "
            "to the final state seen",
        },
        "ingest": {
            "sender": {
                "frames_per_s": figure(each("sender", "frames_per_s"), "frames/s"),
                "mb_per_s": figure(each("sender", "mb_per_s"), "MB/s (10^6 bytes)"),
                "headroom": figure(
                    headroom,
                    "sender frames/s per bare-client frames/s",
                    "ingest.bare_client.frames_per_s",
                ),
            },
            "bare_client": _client_figures("bare_client", each),
            "sansio_client": {
                **_client_figures("sansio_client", each),
                "ratio_to_bare": figure(
                    per_round("sansio_client", "events_per_s"),
                    "Sans-I/O reader events/s per bare-client events/s",
                    "ingest.bare_client.events_per_s",
                ),
            },
            "daemon": {
                "events_per_s": figure(
                    each("daemon", "events_per_s"), "events/s", "ingest.bare_client.events_per_s"
                ),
                "frames_per_s": figure(
                    each("daemon", "frames_per_s"), "frames/s", "ingest.bare_client.frames_per_s"
                ),
                "elapsed": figure(each("daemon", "elapsed_s"), "s"),
                "cpu_per_event": figure(
                    each("daemon", "cpu_us_per_event"),
                    "CPU µs/event",
                    "ingest.bare_client.cpu_per_event",
                ),
                "cpu_busy": figure(busy, "daemon CPU s per elapsed s (all threads)"),
                "transport": options.daemon_transport,
                "loop_lag_p99": figure(
                    each("daemon", "loop_lag_p99_ms"), "ms, interpolated in its bucket"
                ),
                "loop_lag_max": figure(
                    each("daemon", "loop_lag_max_ms"),
                    "ms (exact where the daemon's maximum grew in the run)",
                ),
                "loop_lag": [run["loop_lag"] for run in runs["daemon"]],
                "early_matches": [run["early_matches"] for run in runs["daemon"]],
                "rows_written": {
                    "markets": [run["rows_markets"] for run in runs["daemon"]],
                    "positions": [run["rows_positions"] for run in runs["daemon"]],
                },
            },
            "ratio": figure(
                per_round("daemon", "events_per_s"),
                "daemon events/s per bare-client events/s",
                "ingest.bare_client.events_per_s",
            ),
            "ratio_sansio": figure(
                per_round("daemon", "events_per_s", "sansio_client"),
                "daemon events/s per Sans-I/O-reader events/s",
                "ingest.sansio_client.events_per_s",
            ),
            "cpu_ratio": figure(
                per_round("daemon", "cpu_us_per_event"),
                "daemon CPU per event / bare-client CPU per event",
                "ingest.bare_client.cpu_per_event",
            ),
            "cpu_ratio_sansio": figure(
                per_round("daemon", "cpu_us_per_event", "sansio_client"),
                "daemon CPU per event / Sans-I/O-reader CPU per event",
                "ingest.sansio_client.cpu_per_event",
            ),
        },
        "notify": {
            "quiet_events_per_s": figure(
                each("daemon_quiet", "events_per_s"), "events/s, notifications off"
            ),
            "told_events_per_s": figure(
                each("daemon_told", "events_per_s"),
                "events/s, notifications and Redis invalidation on",
                "notify.quiet_events_per_s",
            ),
            "ratio": figure(
                per_round("daemon_told", "events_per_s", "daemon_quiet"),
                "events/s with notifications and Redis on per events/s with both off",
                "notify.quiet_events_per_s",
            ),
            "delay_p50": figure(
                each("daemon_told", "delay_p50_ms"), "ms, receive time - sent_ms (commit)"
            ),
            "delay_p99": figure(
                each("daemon_told", "delay_p99_ms"), "ms, receive time - sent_ms (commit)"
            ),
            "delay_max": figure(
                each("daemon_told", "delay_max_ms"), "ms, receive time - sent_ms (commit)"
            ),
            "notifications": [run["notifications"] for run in runs["daemon_told"]],
        },
        "memory": {
            "daemon_peak_rss": figure(
                each("daemon", "peak_rss_mib"), "MiB", "memory.bare_client_peak_rss"
            ),
            "bare_client_peak_rss": figure(each("bare_client", "peak_rss_mib"), "MiB"),
            "sansio_client_peak_rss": figure(each("sansio_client", "peak_rss_mib"), "MiB"),
        },
    }


def correctness(tape: Tape, runs: Runs) -> dict[str, Any]:
    """
    The exact checks of every round: each daemon run's differences (see
    :func:`_measure_daemon`), and the clients' received counts against what
    was sent.
    """
    clients = [
        f"{kind} round {n}: received {run['received']} of {run['sent']}"
        for kind in CLIENT_KINDS.values()
        for n, run in enumerate(runs[kind], 1)
        if run["received"] != run["sent"]
    ]
    daemon = [
        f"{kind} round {n}: {difference}"
        for kind in DAEMON_KINDS
        for n, run in enumerate(runs[kind], 1)
        for difference in run["differences"]
    ]
    markets = load_markets()
    return {
        "rounds": len(runs["daemon"]),
        "daemon_exact": sum(
            1 for kind in DAEMON_KINDS for run in runs[kind] if not run["differences"]
        ),
        "clients_exact": sum(
            1 for k in CLIENT_KINDS.values() for run in runs[k] if run["received"] == run["sent"]
        ),
        "frames": tape.total_frames,
        "bytes": tape.total_bytes,
        "event_types": tape.total_event_types,
        "markets": len(markets),
        "positions": sum(len(m.tokens) for m in markets) * len(ENTRY_PRICES),
        "differences": clients + daemon,
    }


def correctness_line(check: dict[str, Any]) -> str:
    """The correctness summary printed under the table."""
    types = ", ".join(f"{kind} {n:,}" for kind, n in check["event_types"].items())
    rounds = check["rounds"]
    return (
        f"Correctness (exact): daemon {check['daemon_exact']}/{len(DAEMON_KINDS) * rounds} "
        f"runs (defaults, notifications off, notifications and Redis on) read "
        f"{check['frames']:,}/{check['frames']:,} frames with events by type as sent ({types}), "
        f"ended with {check['markets']}/{check['markets']} markets and "
        f"{check['positions']}/{check['positions']} positions equal to expected.json's final "
        "state (prices, P&L, source 'ws'), nothing pending, exit 0, no warnings; with "
        "notifications and Redis on, every market and the user told on LISTEN, every "
        "Redis key of the held markets, tokens and user invalidated, no Redis error; bare client, "
        f"Sans-I/O reader and raw reader {check['clients_exact']}/{3 * rounds} runs received all "
        f"{check['frames']:,} frames / {check['bytes']:,} bytes; "
        f"{len(check['differences'])} differences"
    )


TABLE_ROWS = [
    ("Sender alone (raw reader)", "ingest.sender.frames_per_s"),
    ("Sender alone (raw reader)", "ingest.sender.mb_per_s"),
    ("Bare trio-websocket client", "ingest.bare_client.frames_per_s"),
    ("Bare trio-websocket client", "ingest.bare_client.events_per_s"),
    ("Bare trio-websocket client", "ingest.bare_client.cpu_per_event"),
    ("Bare Sans-I/O reader (physical reference)", "ingest.sansio_client.frames_per_s"),
    ("Bare Sans-I/O reader (physical reference)", "ingest.sansio_client.events_per_s"),
    ("Bare Sans-I/O reader (physical reference)", "ingest.sansio_client.cpu_per_event"),
    ("Sans-I/O reader / bare trio-websocket client", "ingest.sansio_client.ratio_to_bare"),
    ("Daemon, feed to final DB state", "ingest.daemon.events_per_s"),
    ("Daemon, feed to final DB state", "ingest.daemon.elapsed"),
    ("Daemon, feed to final DB state", "ingest.daemon.cpu_per_event"),
    ("Daemon, feed to final DB state", "ingest.daemon.cpu_busy"),
    ("Daemon loop lag p99 (over the run)", "ingest.daemon.loop_lag_p99"),
    ("Daemon loop lag max (over the run)", "ingest.daemon.loop_lag_max"),
    ("**Daemon / bare trio-websocket client**", "ingest.ratio"),
    ("Daemon / bare Sans-I/O reader", "ingest.ratio_sansio"),
    ("Daemon / bare trio-websocket client, CPU per event", "ingest.cpu_ratio"),
    ("Daemon / bare Sans-I/O reader, CPU per event", "ingest.cpu_ratio_sansio"),
    ("Daemon, notifications off", "notify.quiet_events_per_s"),
    ("Daemon, notifications and Redis invalidation on", "notify.told_events_per_s"),
    ("**Notifications and Redis on / off**", "notify.ratio"),
    ("NOTIFY delay after commit, p50", "notify.delay_p50"),
    ("NOTIFY delay after commit, p99", "notify.delay_p99"),
    ("NOTIFY delay after commit, max", "notify.delay_max"),
    ("Daemon peak RSS (VmHWM)", "memory.daemon_peak_rss"),
    ("Bare client peak RSS (VmHWM)", "memory.bare_client_peak_rss"),
    ("Sans-I/O reader peak RSS (VmHWM)", "memory.sansio_client_peak_rss"),
]


def _number(value: float) -> str:
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}"


def markdown(document: dict[str, Any]) -> str:
    """The results table and the correctness line, as Markdown."""
    work, machine = document["workload"], document["machine"]
    lines = [
        f"Ingest: {work['frames']:,} frames / {work['events']:,} events "
        f"({work['bytes'] / 1e6:.0f} MB; `{work['capture']}` x {work['repetitions']}), "
        f"median of {work['rounds']} interleaved rounds (min-max), daemon "
        f"feed.transport {work['daemon_transport']}, {machine['cpu_count']} CPUs, "
        f"Python {machine['python']}, {machine['date']}.",
        "",
        "| Measurement | Value | Min-max | Unit |",
        "| --- | ---: | ---: | --- |",
    ]
    for label, path in TABLE_ROWS:
        node = document
        for key in path.split("."):
            node = node[key]
        lines.append(
            f"| {label} | {_number(node['value'])} | {_number(node['min'])}-"
            f"{_number(node['max'])} | {node['unit']} |"
        )
    lines += [
        "",
        f"Loop lag: {work['loop_lag_method']}; over the {work['loop_lag_window']}.",
        "",
        correctness_line(document["correctness"]),
    ]
    return "\n".join(lines) + "\n"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.ingest", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help=f"repetitions of the capture (default: >= {MIN_FRAMES:,} frames)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--daemon-transport",
        choices=TRANSPORTS,
        default="sansio",
        help="the daemon's feed.transport (default sansio, the daemon's default)",
    )
    add_output_options(parser, "results", profile="each daemon run")
    parser.add_argument("--client", choices=list(CLIENT_KINDS), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--assets", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the benchmark (or, with ``--client``, one client child); returns 1 on any
    difference, else 0.
    """
    args = _parse_args(argv)
    if args.client:
        return _client_main(args)
    with contextlib.ExitStack() as stack:
        admin_dsn, machine = stack.enter_context(bench_setup())
        tape = Tape.load(CAPTURE_TAPE, args.repeat)
        progress(
            f"workload: {tape.total_frames:,} frames, {tape.total_events:,} events, "
            f"{tape.total_bytes / 1e6:.0f} MB"
        )
        log_dir = log_directory(stack, args.log_dir, "polystream-bench-logs-")
        options = Options(args.rounds, log_dir, args.profile, args.daemon_transport)
        runs = trio.run(bench, tape, admin_dsn, options)
    if args.profile is not None:
        print_hotspots(args.profile, top=15)
        return 0  # profiled figures are not written as results
    document = results(tape, runs, machine, options)
    table = markdown(document)
    write_results(args.out, "results", document, table)
    return exit_status(document["correctness"]["differences"])


if __name__ == "__main__":
    sys.exit(main())

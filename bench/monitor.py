"""
Monitor benchmark: TP/SL triggers and timed predictions under load, and the
feed's heartbeat while they run.

Run ``.venv/bin/python -m bench.monitor`` (``--help`` for options). It writes
``bench/results-monitor.json`` and ``bench/results-monitor.md`` and prints the
table. About three minutes on two cores.

Workload: ``examples/updown-2025-12-11`` (6 markets, 12 assets). The database
holds 100,000 active positions spread over the 12 assets, each with a
take-profit and a stop-loss price (200,000 thresholds), and 24 plain positions;
the loaded runs also hold 1,000 pending predictions on those assets, windows
``[now, now + 240 s]``, mixed timing modes (about 200 decide during a run, the
rest after it). 1,000 of the positions are crossed by the recorded best bid, at
frames computed here from the recording (as ``tests/test_monitor_e2e.py``
does); the others never are.

Three runs of ``polystream run`` (a child process, ``feed.ping_interval = 1``),
each on a fresh database cloned from a template:

* ``loaded``: rules and predictions, the capture repeated ``--repeat`` times at
  maximum speed;
* ``baseline``: the same 100,024 positions without TP/SL and no predictions,
  the same tape: the difference in daemon CPU is the monitor's;
* ``paced``: rules and predictions, one repetition at ``--speed`` times the
  recorded speed, where the daemon keeps up.

The sender is the bench's own loopback WebSocket server (wsproto, frames
encoded once up front). It writes whole frames in chunks of at most 64 KiB, a
chunk always ends at a frame that first crosses a rule, and the
``time.monotonic()`` after each chunk's ``send_all`` stamps its frames: a
crossing frame's stamp is the moment its own last byte reached the kernel. It
stamps every text ``PING`` from the daemon on arrival and answers ``PONG`` at
once. A thread of the bench ``LISTEN``s on ``polystream_triggers`` (and counts
``polystream_positions``/``polystream_predictions``, which make the daemon
reload its rules) and stamps each notification on receipt; trigger ids are
mapped to positions through the ``triggers`` table afterwards.

Times are ``time.monotonic()``, one clock for all processes. The machine is
shared and noisy: compare figures within one run only.

PostgreSQL: ``POLYSTREAM_BENCH_DSN``, else ``POLYSTREAM_TEST_DSN`` (an admin
DSN), else an embedded server for the run (``bench.common.admin_database``). Databases
``polystream_benchmon_<pid>_*`` are dropped afterwards.
"""

from __future__ import annotations

import argparse
import array
import bisect
import contextlib
import gzip
import itertools
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import attrs
import orjson
import psycopg
import trio
from psycopg import sql

from bench.common import (
    BenchError,
    ExpectingServer,
    accept,
    admin_database,
    log_directory,
    write_results,
)
from bench.ingest import (
    CAPTURE,
    ROOT,
    Market,
    _cpu_seconds,
    _free_port,
    _health,
    _log_summary,
    _quiet_logging,
    _start_py_spy,
    _tail,
    _vm_hwm_kib,
    hotspots,
    load_markets,
    machine_facts,
)

OUT_DIR = Path(__file__).resolve().parent
CHUNK_BYTES = 64 * 1024
PING_INTERVAL = 1.0
POLL_INTERVAL = 0.1
TICK = Decimal("0.0001")
PREDICTION_WINDOW_S = 240.0
PLAIN_ENTRY_PRICES = (Decimal("0.30"), Decimal("0.60"))  # two rule-less positions per asset
TRIGGERS = "polystream_triggers"
RELOAD_CHANNELS = ("polystream_positions", "polystream_predictions")
Kind = Literal["take_profit", "stop_loss"]


# --- the recording ---------------------------------------------------------------


@attrs.frozen
class Recording:
    """
    One repetition of the capture: each frame encoded as a server-to-client
    WebSocket text frame, its server timestamp (ms), and per asset the best
    bid after every frame that touched it (``(frame index, bid)``, unknown
    bids left out: the monitor does not compare those).
    """

    frames: tuple[bytes, ...]
    times_ms: tuple[int, ...]
    events: int
    bids: dict[str, list[tuple[int, Decimal]]]
    lines: tuple[bytes, ...] = ()

    def lap(self, number: int) -> tuple[bytes, ...]:
        """The frames of repetition ``number``, timestamps moved after the previous one's
        (a repeated, older timestamp is rightly dropped by the daemon as stale)."""
        if number == 0:
            return self.frames
        from wsproto.frame_protocol import FrameProtocol

        from bench.ingest import shift_timestamps

        encoder = FrameProtocol(client=False, extensions=[])
        offset = number * (self.times_ms[-1] - min(self.times_ms) + 1000)
        return tuple(
            bytes(encoder.send_data(shift_timestamps(line, offset).decode(), fin=True))
            for line in self.lines
        )

    @classmethod
    def load(cls, path: Path) -> Recording:
        from wsproto.frame_protocol import FrameProtocol

        from polystream.book import AssetBook
        from polystream.protocol import PriceChange, parse_frame

        encoder = FrameProtocol(client=False, extensions=[])
        books: dict[str, AssetBook] = {}
        bids: dict[str, list[tuple[int, Decimal]]] = {}
        frames: list[bytes] = []
        times: list[int] = []
        events = 0
        for line in gzip.decompress(path.read_bytes()).split(b"\n"):
            if not line.strip():
                continue
            index = len(frames)
            frames.append(bytes(encoder.send_data(line.decode(), fin=True)))
            touched: set[str] = set()
            stamp = times[-1] if times else 0
            parsed = parse_frame(line)
            events += len(parsed.event_types)
            for event in parsed.events:
                stamp = max(stamp, getattr(event, "timestamp_ms", 0) or 0)
                if isinstance(event, PriceChange):
                    for change in event.changes:
                        book = books.setdefault(change.asset_id, AssetBook(change.asset_id))
                        book.apply_change(change, event.timestamp_ms)
                        touched.add(change.asset_id)
                else:
                    asset = event.asset_id  # type: ignore[union-attr]
                    books.setdefault(asset, AssetBook(asset)).apply(event)
                    touched.add(asset)
            times.append(stamp)
            for asset in touched:
                bid = books[asset].best_bid
                if bid is not None:
                    bids.setdefault(asset, []).append((index, bid))
        lines = [line for line in gzip.decompress(path.read_bytes()).split(b"\n") if line.strip()]
        return cls(tuple(frames), tuple(times), events, bids, tuple(lines))

    @property
    def bytes(self) -> int:
        return sum(len(frame) for frame in self.frames)


@attrs.frozen
class BidPath:
    """One asset's best-bid path with running extremes, for first crossings in O(log n)."""

    frames: list[int]
    bids: list[Decimal]
    high: list[Decimal]  # running maximum: non-decreasing
    neg_low: list[Decimal]  # minus the running minimum: non-decreasing

    @classmethod
    def of(cls, path: list[tuple[int, Decimal]]) -> BidPath:
        high: list[Decimal] = []
        neg_low: list[Decimal] = []
        for _, bid in path:
            high.append(max(bid, high[-1]) if high else bid)
            neg_low.append(max(-bid, neg_low[-1]) if neg_low else -bid)
        return cls([f for f, _ in path], [b for _, b in path], high, neg_low)

    def first_crossing(self, kind: Kind, level: Decimal) -> tuple[int, Decimal] | None:
        """(frame, bid) of the first tick with ``bid >= level`` (TP) or ``<= level`` (SL)."""
        if kind == "take_profit":
            at = bisect.bisect_left(self.high, level)
        else:
            at = bisect.bisect_left(self.neg_low, -level)
        if at == len(self.frames):
            return None
        return self.frames[at], self.bids[at]


# --- the rules ---------------------------------------------------------------------


@attrs.frozen
class Crossing:
    """What must fire for a position: at ``frame`` (index in a repetition)."""

    frame: int
    kind: Kind
    price: Decimal


PositionRow = tuple[int, str, str, str, str, Decimal, Decimal, Decimal | None, Decimal | None]


@attrs.frozen
class RuleBook:
    """The positions to insert and the crossings they must produce."""

    rows: list[PositionRow]  # id, user, market, outcome, token, size, entry, tp, sl
    expected: dict[int, Crossing]

    @property
    def cut_frames(self) -> frozenset[int]:
        return frozenset(c.frame for c in self.expected.values())

    def without_thresholds(self) -> list[PositionRow]:
        return [(*row[:7], None, None) for row in self.rows]


def _level(rng: random.Random, low: Decimal, high: Decimal) -> Decimal | None:
    """A uniform price in ``[low, high]`` on a 0.0001 grid, or None if empty."""
    a, b = math.ceil(low / TICK), math.floor(high / TICK)
    return None if a > b else Decimal(rng.randint(a, b)) * TICK


def _thresholds(
    rng: random.Random, path: BidPath | None, cross: Kind | None
) -> tuple[Decimal | None, Decimal | None]:
    """TP and SL of one position: outside the recorded range unless ``cross`` says one crosses."""
    if path is None:  # an asset without a best bid: any level is never compared
        return _level(rng, Decimal("0.5"), 1 - TICK), _level(rng, TICK, Decimal("0.5") - TICK)
    first, high, low = path.bids[0], path.high[-1], -path.neg_low[-1]
    tp = _level(rng, high + TICK, 1 - TICK)
    sl = _level(rng, TICK, low - TICK)
    if cross == "take_profit":
        tp = _level(rng, first + TICK, high)
    elif cross == "stop_loss":
        sl = _level(rng, low, first - TICK)
    return tp, sl


def make_rules(
    recording: Recording, markets: Sequence[Market], count: int, crossed: int, seed: int
) -> RuleBook:
    """
    ``count`` positions round-robin over the assets, ``crossed`` of them (on
    assets with a best bid) with one threshold inside the recorded range;
    the expected first crossing of every position is computed from the path.
    """
    rng = random.Random(seed)
    owners = [(m.id, o, t) for m in markets for o, t in zip(m.outcomes, m.tokens, strict=True)]
    paths = {asset: BidPath.of(p) for asset, p in recording.bids.items() if p}
    eligible = [i for i in range(count) if owners[i % len(owners)][2] in paths]
    chosen = rng.sample(eligible, min(crossed, len(eligible)))
    crossing: dict[int, Kind] = {
        i: ("take_profit" if n % 2 == 0 else "stop_loss") for n, i in enumerate(chosen)
    }
    rows: list[PositionRow] = []
    expected: dict[int, Crossing] = {}
    for i in range(count):
        market, outcome, token = owners[i % len(owners)]
        path = paths.get(token)
        tp, sl = _thresholds(rng, path, crossing.get(i))
        entry = Decimal("0.5") if path is None else path.bids[0]
        rows.append((i + 1, "bench", market, outcome, token, Decimal(10), entry, tp, sl))
        if path is None:
            continue
        hits = [
            (hit[0], kind, hit[1])
            for kind, level in (("take_profit", tp), ("stop_loss", sl))
            if level is not None and (hit := path.first_crossing(kind, level)) is not None  # type: ignore[arg-type]
        ]
        if hits:
            frame, kind, price = min(hits)
            expected[i + 1] = Crossing(frame, kind, price)  # type: ignore[arg-type]
    return RuleBook(rows, expected)


def plain_positions(markets: Sequence[Market], first_id: int) -> list[PositionRow]:
    """Two positions without TP/SL per asset (what the ingest benchmark holds)."""
    rows: list[PositionRow] = []
    for m in markets:
        for outcome, token in zip(m.outcomes, m.tokens, strict=True):
            for entry in PLAIN_ENTRY_PRICES:
                rows.append(
                    (
                        first_id + len(rows),
                        "bench",
                        m.id,
                        outcome,
                        token,
                        Decimal(100),
                        entry,
                        None,
                        None,
                    )
                )
    return rows


# --- predictions -------------------------------------------------------------------


@attrs.frozen
class PredictionPlan:
    """One pending prediction to insert, and when it must be decided (epoch s; None: on a tick)."""

    id: int
    market: str
    outcome: str
    token: str
    timing: str
    delay_s: float
    fraction: float
    forecast: Decimal | None
    min_edge: Decimal | None
    due: float | None
    opens_at: float
    closes_at: float

    def row(self) -> tuple[Any, ...]:
        return (
            self.id,
            "bench",
            self.market,
            self.token,
            self.outcome,
            Decimal(5),
            Decimal("0.99"),
            _ts(self.opens_at),
            _ts(self.closes_at),
            self.timing,
            self.delay_s,
            self.fraction,
            self.forecast,
            self.min_edge,
        )


def _ts(epoch: float) -> Any:
    import datetime

    return datetime.datetime.fromtimestamp(epoch, tz=datetime.UTC)


# (share, timing): what decides after the run, and what decides during it
_PREDICTION_MIX = (
    (0.4, "from_end"),  # at close - delay: after the run
    (0.2, "percentage"),  # at 50-90 % of the window: after the run
    (0.2, "edge_never"),  # forecast 0.01: no edge; skipped at the from_end deadline
    (0.1, "from_start"),  # 12-20 s after opening: during the run
    (0.1, "edge_now"),  # forecast 0.99, min edge 0: at the first tick with an ask
)


def make_predictions(
    count: int, markets: Sequence[Market], bid_assets: set[str], now: float, seed: int
) -> list[PredictionPlan]:
    rng = random.Random(seed)
    owners = [(m.id, o, t) for m in markets for o, t in zip(m.outcomes, m.tokens, strict=True)]
    quoted = [owner for owner in owners if owner[2] in bid_assets]
    plans: list[PredictionPlan] = []
    closes = now + PREDICTION_WINDOW_S
    for share, mode in _PREDICTION_MIX:
        pool = quoted if mode == "edge_now" else owners
        for _ in range(round(share * count)):
            pid = len(plans) + 1
            market, outcome, token = pool[pid % len(pool)]
            delay, fraction = rng.uniform(0, 30), rng.uniform(0.5, 0.9)
            forecast = min_edge = None
            due: float | None = closes - delay
            if mode == "from_start":
                delay = rng.uniform(12, 20)  # after start-up (~2-10 s), during the tape
                due = now + delay
            elif mode == "percentage":
                due = now + fraction * PREDICTION_WINDOW_S
            elif mode == "edge_now":
                forecast, min_edge, due = Decimal("0.99"), Decimal(0), None
            elif mode == "edge_never":
                forecast, min_edge = Decimal("0.01"), Decimal("0.05")
            timing = "edge" if mode.startswith("edge") else mode
            plans.append(
                PredictionPlan(
                    pid,
                    market,
                    outcome,
                    token,
                    timing,
                    delay,
                    fraction,
                    forecast,
                    min_edge,
                    due,
                    now,
                    closes,
                )
            )
    return plans


# --- the database ------------------------------------------------------------------


def _admin(admin_dsn: str) -> psycopg.Connection[Any]:
    from polystream import db

    return db.connect(admin_dsn, application_name="polystream-bench", autocommit=True)


def build_template(admin_dsn: str, name: str, positions: list[PositionRow]) -> None:
    """A migrated database with the capture's markets and ``positions`` (COPY)."""
    from polystream import db
    from polystream.markets import import_markets_file

    db.drop_database(admin_dsn, name)
    db.create_database(admin_dsn, name)
    dsn = db.dsn_with_dbname(admin_dsn, name)
    with db.connect(dsn, application_name="polystream-bench", statement_timeout_s=None) as conn:
        db.migrate(conn)
        import_markets_file(conn, Path(f"{CAPTURE}.markets.json"))
        with contextlib.suppress(psycopg.Error), conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")  # no NOTIFY per row
        with conn.cursor() as cur:
            columns = (
                "id, user_id, market_id, outcome, token_id, size, entry_price, "
                "take_profit_price, stop_loss_price"
            )
            with cur.copy(f"COPY positions ({columns}) FROM STDIN") as copy:
                for row in positions:
                    copy.write_row(row)
            cur.execute(
                "SELECT setval(pg_get_serial_sequence('positions', 'id'), %s)",
                (max(row[0] for row in positions),),
            )
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE positions")


def clone_database(admin_dsn: str, template: str, name: str) -> str:
    from polystream import db

    db.drop_database(admin_dsn, name)
    with _admin(admin_dsn) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)
            )
        )
    return db.dsn_with_dbname(admin_dsn, name)


def insert_predictions(dsn: str, plans: Sequence[PredictionPlan]) -> None:
    from polystream import db

    columns = (
        "id, user_id, market_id, token_id, outcome, stake_usdc, limit_price, opens_at, "
        "closes_at, timing_mode, delay_s, fraction, forecast_probability, min_edge"
    )
    with db.connect(dsn, application_name="polystream-bench") as conn:
        with conn.cursor() as cur, cur.copy(f"COPY predictions ({columns}) FROM STDIN") as copy:
            for plan in plans:
                copy.write_row(plan.row())
        conn.commit()


def read_outcome(dsn: str) -> tuple[list[tuple[Any, ...]], dict[int, str]]:
    """The ``triggers`` rows and the status of every prediction."""
    from polystream import db

    with db.connect(dsn, application_name="polystream-bench") as conn:
        triggers = conn.execute(
            "SELECT id, kind, position_id, prediction_id, price, reason FROM triggers"
        ).fetchall()
        statuses = conn.execute("SELECT id, status FROM predictions").fetchall()
    return triggers, {int(k): str(v) for k, v in statuses}


class NotifyListener:
    """
    A thread with its own autocommit connection: ``LISTEN``s, stamps every
    notification with ``time.monotonic()`` on receipt.
    """

    def __init__(self, dsn: str) -> None:
        from polystream import db

        self._conn = db.connect(
            dsn,
            application_name="polystream-bench-listen",
            statement_timeout_s=None,
            autocommit=True,
        )
        for channel in (TRIGGERS, *RELOAD_CHANNELS):
            self._conn.execute(f"LISTEN {channel}")
        self.received: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-listen", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for note in self._conn.notifies(timeout=0.2):
                self.received.append((time.monotonic(), note.channel, note.payload))

    def count(self, channels: Sequence[str]) -> int:
        return sum(1 for _, channel, _ in list(self.received) if channel in channels)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._conn.close()


# --- the sender --------------------------------------------------------------------


@attrs.define(eq=False)
class Playback:
    """
    One expected daemon connection: what to send (``repeat`` times, at
    ``speed`` x recorded speed or as fast as possible when None) and what the
    sender saw. ``sent_at[i]`` stamps frame ``i`` of the first repetition.
    """

    recording: Recording
    repeat: int
    speed: float | None
    cuts: frozenset[int]
    connected: trio.Event = attrs.field(factory=trio.Event)
    sent_all: trio.Event = attrs.field(factory=trio.Event)
    closed: trio.Event = attrs.field(factory=trio.Event)
    assets: list[str] = attrs.field(factory=list)
    sent_at: array.array[float] = attrs.field(factory=lambda: array.array("d"))
    frames_sent: int = 0
    first_byte_at: float | None = None
    sent_all_at: float | None = None
    pings: list[float] = attrs.field(factory=list)
    pongs: int = 0
    other_text: Counter[str] = attrs.field(factory=Counter)
    error: str | None = None
    all_frames: tuple[bytes, ...] = ()

    def __attrs_post_init__(self) -> None:
        self.all_frames = tuple(
            frame for lap in range(self.repeat) for frame in self.recording.lap(lap)
        )

    @property
    def total_frames(self) -> int:
        return len(self.recording.frames) * self.repeat

    def chunks(self) -> Iterator[tuple[int, int]]:
        """``(start, end)`` global frame ranges: <= 64 KiB, ending at every cut frame."""
        frames, n = self.all_frames, len(self.recording.frames)
        start, size = 0, 0
        for g in range(self.total_frames):
            size += len(frames[g])
            if size >= CHUNK_BYTES or (g < n and g in self.cuts) or g == self.total_frames - 1:
                yield start, g + 1
                start, size = g + 1, 0


@attrs.define(eq=False)
class Sender(ExpectingServer[Playback]):
    """The bench's WebSocket server; a connection nobody expected (a reconnect) is counted."""

    def expect(self, playback: Playback) -> Playback:
        """The next connection plays ``playback``."""
        return self.expect_session(playback)

    async def run_session(self, stream: trio.SocketStream, playback: Playback) -> None:
        """Handshake, then the playback; PINGs are answered with PONG meanwhile."""
        from wsproto import ConnectionType, WSConnection

        ws = WSConnection(ConnectionType.SERVER)
        playback.assets = list(orjson.loads(await accept(stream, ws)).get("assets_ids", []))
        playback.connected.set()
        lock = trio.StrictFIFOLock()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_answer_pings, stream, ws, lock, playback, nursery.cancel_scope)
            await _play(stream, lock, playback)


async def _play(stream: trio.SocketStream, lock: trio.StrictFIFOLock, playback: Playback) -> None:
    recording, speed = playback.recording, playback.speed
    n = len(recording.frames)
    playback.sent_at = array.array("d", bytes(8 * n))
    start = trio.current_time()
    playback.first_byte_at = time.monotonic()
    for begin, end in playback.chunks():
        if speed is not None:  # the chunk's last frame is due at its recorded offset / speed
            offset_ms = recording.times_ms[(end - 1) % n] - recording.times_ms[0]
            await trio.sleep_until(start + offset_ms / 1000 / speed)
        data = b"".join(playback.all_frames[begin:end])
        async with lock:
            await stream.send_all(data)
        stamp = time.monotonic()
        for g in range(begin, min(end, n)):
            playback.sent_at[g] = stamp
        playback.frames_sent = end
    playback.sent_all_at = time.monotonic()
    playback.sent_all.set()
    await trio.sleep_forever()  # until the daemon closes: keep answering PINGs


async def _answer_pings(
    stream: trio.SocketStream,
    ws: Any,
    lock: trio.StrictFIFOLock,
    playback: Playback,
    scope: trio.CancelScope,
) -> None:
    """Stamp each text ``PING`` on arrival and answer ``PONG`` at once; end on close/EOF."""
    from wsproto.events import CloseConnection, Ping, TextMessage

    text = ""
    while True:
        data = await stream.receive_some(65536)
        arrived = time.monotonic()
        if not data:
            scope.cancel()
            return
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, TextMessage):
                text += event.data
                if not event.message_finished:
                    continue
                message, text = text, ""
                if message != "PING":
                    playback.other_text[message[:40]] += 1
                    continue
                playback.pings.append(arrived)
                async with lock:
                    await stream.send_all(ws.send(TextMessage(data="PONG")))
                playback.pongs += 1
            elif isinstance(event, Ping):
                async with lock:
                    await stream.send_all(ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                async with lock:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await stream.send_all(ws.send(event.response()))
                scope.cancel()
                return


# --- one daemon run ----------------------------------------------------------------


@attrs.frozen
class RunSpec:
    """One daemon run: its template database, rules, predictions and tape."""

    name: str
    template: str
    rules: RuleBook | None
    predictions: int
    repeat: int
    speed: float | None


@attrs.frozen
class Context:
    admin_dsn: str
    recording: Recording
    markets: list[Market]
    sender: Sender
    log_dir: Path
    profile_dir: Path | None
    seed: int


@attrs.define
class Measured:
    """What was seen while the daemon ran (monotonic seconds unless ``_wall``)."""

    playback: Playback
    spawned_at: float
    connected_at: float
    read_at: float = 0.0
    quiet_at: float = 0.0
    settled: bool = False
    stop_wall: float = 0.0
    cpu_s: float = 0.0
    peak_rss_kib: int = 0
    max_backlog: int = 0
    health: dict[str, Any] = attrs.field(factory=dict)
    daemon_pongs: int = 0
    pings: int = 0
    answered: int = 0
    exit_code: int | None = None
    log: dict[str, Any] = attrs.field(factory=dict)
    decided_at: dict[int, float] = attrs.field(factory=dict)  # trigger id -> monotonic s


def _daemon_env(dsn: str, url: str, health_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLYSTREAM_")}
    env.update(
        {
            "POLYSTREAM_DATABASE__DSN": dsn,
            "POLYSTREAM_FEED__URL": url,
            "POLYSTREAM_FEED__PING_INTERVAL": str(PING_INTERVAL),
            "POLYSTREAM_HEALTH__LISTEN": f"127.0.0.1:{health_port}",
            "POLYSTREAM_LOG__FORMAT": "json",
        }
    )
    return env


def _data_frames(health: dict[str, Any]) -> int:
    control: dict[str, int] = health["control_frames"]
    return int(health["frames"]) - sum(control.values())


def _settled(health: dict[str, Any], expected: int) -> bool:
    monitor = health["monitor"]
    fired = monitor["triggers"]
    tpsl = fired.get("take_profit", 0) + fired.get("stop_loss", 0)
    written = monitor["triggers_written"] + monitor["triggers_duplicate"]
    return bool(tpsl >= expected and written == sum(fired.values()))


async def _poll(url: str) -> dict[str, Any]:
    return await trio.to_thread.run_sync(_health, url)


async def _follow(m: Measured, url: str, expected: int) -> None:
    """Poll ``/health`` until every frame is read, then until every decision is written."""
    playback = m.playback
    while True:
        await trio.sleep(POLL_INTERVAL)
        read = _data_frames(await _poll(url))
        m.max_backlog = max(m.max_backlog, playback.frames_sent - read)
        if playback.sent_all.is_set() and read >= playback.total_frames:
            m.read_at = time.monotonic()
            break
    calm = 0
    with trio.move_on_after(60):
        while calm < 3:
            calm = calm + 1 if _settled(await _poll(url), expected) else 0
            await trio.sleep(POLL_INTERVAL)
        m.settled = True
    m.quiet_at = time.monotonic()


async def _settle_heartbeat(m: Measured, url: str) -> None:
    """Wait (<= 3 s) until the daemon has read a PONG for every PING the sender had received."""
    m.pings = len(m.playback.pings)
    m.answered = m.playback.pongs
    with trio.move_on_after(3):
        while True:
            m.health = await _poll(url)
            m.daemon_pongs = int(m.health["control_frames"].get("PONG", 0))
            if m.daemon_pongs >= m.pings:
                break
            await trio.sleep(POLL_INTERVAL)


async def _wait_connected(playback: Playback, process: trio.Process, log_path: Path) -> None:
    with trio.fail_after(120):
        while not playback.connected.is_set():
            if process.poll() is not None:
                raise BenchError(f"daemon exited {process.returncode}: {_tail(log_path)}")
            with trio.move_on_after(0.05):
                await playback.connected.wait()


async def _stop(process: trio.Process, spy: trio.Process | None) -> int:
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        with trio.fail_after(30):
            await spy.wait()
    process.send_signal(signal.SIGTERM)
    with trio.fail_after(30):
        code: int = await process.wait()
    return code


async def _measure(spec: RunSpec, ctx: Context, dsn: str) -> Measured:
    cuts = spec.rules.cut_frames if spec.rules is not None else frozenset()
    playback = ctx.sender.expect(Playback(ctx.recording, spec.repeat, spec.speed, cuts))
    health_port = _free_port()
    url = f"http://127.0.0.1:{health_port}/health"
    log_path = ctx.log_dir / f"daemon-{spec.name}.log"
    with log_path.open("wb") as log:
        spawned_at = time.monotonic()
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "polystream", "run"],
            env=_daemon_env(dsn, ctx.sender.url, health_port),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    spy: trio.Process | None = None
    try:
        await _wait_connected(playback, process, log_path)
        m = Measured(playback, spawned_at, time.monotonic())
        cpu_start = _cpu_seconds(process.pid)
        if ctx.profile_dir is not None and spec.name == "loaded":
            spy = await _start_py_spy(process.pid, ctx.profile_dir / f"daemon-{spec.name}.txt")
        await _follow(m, url, 0 if spec.rules is None else len(spec.rules.expected))
        m.cpu_s = _cpu_seconds(process.pid) - cpu_start
        await _settle_heartbeat(m, url)
        m.peak_rss_kib = _vm_hwm_kib(process.pid)
        m.stop_wall = time.time()
        m.exit_code = await _stop(process, spy)
    finally:
        for child in (spy, process):
            if child is not None and child.returncode is None:
                child.kill()
                await child.wait()
    m.log = _log_summary(log_path)
    m.decided_at = _decisions(log_path)
    return m


def _decisions(log_path: Path) -> dict[int, float]:
    """
    Trigger id -> when the monitor decided (``trigger_written`` log lines carry
    ``decided_at``, wall-clock epoch seconds), moved onto ``time.monotonic()``.
    """
    offset = time.time() - time.monotonic()
    decided: dict[int, float] = {}
    for line in log_path.read_bytes().splitlines():
        if b"trigger_written" not in line:
            continue
        with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            record = orjson.loads(line)
            decided[int(record["trigger_id"])] = float(record["decided_at"]) - offset
    return decided


async def run_daemon(spec: RunSpec, ctx: Context) -> dict[str, Any]:
    """Clone the template, add predictions, run and measure the daemon, read the outcome."""
    from polystream import db

    name = f"polystream_benchmon_{os.getpid()}_{spec.name}"
    dsn = await trio.to_thread.run_sync(clone_database, ctx.admin_dsn, spec.template, name)
    try:
        plans: list[PredictionPlan] = []
        if spec.predictions:
            plans = make_predictions(
                spec.predictions, ctx.markets, set(ctx.recording.bids), time.time(), ctx.seed
            )
            await trio.to_thread.run_sync(insert_predictions, dsn, plans)
        listener = await trio.to_thread.run_sync(NotifyListener, dsn)
        try:
            measured = await _measure(spec, ctx, dsn)
        finally:
            await trio.to_thread.run_sync(listener.stop)
        triggers, statuses = await trio.to_thread.run_sync(read_outcome, dsn)
    finally:
        await trio.to_thread.run_sync(db.drop_database, ctx.admin_dsn, name)
    return summarize(spec, ctx, measured, listener.received, triggers, statuses, plans)


# --- what a run says ---------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
    }


def _tpsl_outcome(
    rules: RuleBook | None,
    triggers: list[tuple[Any, ...]],
    playback: Playback,
    notified: dict[int, float],
    decided: dict[int, float],
) -> dict[str, Any]:
    """Exactly once, at the right price, nothing else; latency of each crossed rule."""
    expected = rules.expected if rules is not None else {}
    rows = [row for row in triggers if row[2] is not None]
    per_position = Counter(int(row[2]) for row in rows)
    wrong = []
    latencies, to_decision, to_notify = [], [], []
    for tid, kind, position_id, _, price, _ in rows:
        want = expected.get(int(position_id))
        if want is None:
            continue
        if (kind, price) != (want.kind, want.price):
            wrong.append([int(position_id), kind, str(price), want.kind, str(want.price)])
        sent = playback.sent_at[want.frame]
        if tid in notified:
            latencies.append((notified[tid] - sent) * 1000)
        if tid in decided:
            to_decision.append((decided[tid] - sent) * 1000)
            if tid in notified:
                to_notify.append((notified[tid] - decided[tid]) * 1000)
    return {
        "expected": len(expected),
        "fired_once": sum(1 for pid in expected if per_position[pid] == 1),
        "missing": sorted(pid for pid in expected if per_position[pid] == 0)[:20],
        "duplicates": sorted(pid for pid, n in per_position.items() if n > 1)[:20],
        "unexpected": sorted(pid for pid in per_position if pid not in expected)[:20],
        "wrong_kind_or_price": wrong[:20],
        "triggers_without_notify": sum(1 for row in rows if row[0] not in notified),
        "latency_ms": _spread(latencies),
        "frame_to_decision_ms": _spread(to_decision),
        "decision_to_notify_ms": _spread(to_notify),
        "latency_ms_all": sorted(latencies),
    }


def _prediction_outcome(
    plans: list[PredictionPlan],
    triggers: list[tuple[Any, ...]],
    statuses: dict[int, str],
    stop_wall: float,
) -> dict[str, Any]:
    per_prediction = Counter(int(row[3]) for row in triggers if row[3] is not None)
    decided = set(per_prediction)
    must = {p.id for p in plans if p.due is None or p.due <= stop_wall - 1}
    must_not = {p.id for p in plans if p.due is not None and p.due >= stop_wall + 1}
    reasons = Counter(str(row[5]) for row in triggers if row[3] is not None)
    return {
        "loaded": len(plans),
        "decided_during_run": len(decided),
        "due_during_run": len(must),
        "not_decided_but_due": sorted(must - decided)[:20],
        "decided_too_early": sorted(must_not & decided)[:20],
        "duplicates": sorted(pid for pid, n in per_prediction.items() if n > 1)[:20],
        "status_mismatch": sum(
            1 for pid, status in statuses.items() if (status != "pending") != (pid in decided)
        ),
        "reasons": dict(reasons),
    }


def _heartbeat(m: Measured) -> dict[str, Any]:
    """PING intervals while the tape was being played and decisions written."""
    playback = m.playback
    start = playback.first_byte_at or m.connected_at
    pings = [t for t in playback.pings if start <= t <= m.quiet_at]
    intervals = [b - a for a, b in itertools.pairwise(pings)]
    jitter = [abs(i - PING_INTERVAL) * 1000 for i in intervals]
    shards = m.health.get("shards", [])
    return {
        "pings_in_window": len(pings),
        "pings_received": m.pings,
        "pongs_sent": m.answered,
        "pongs_read_by_daemon": m.daemon_pongs,
        "missed_pongs": max(0, m.pings - m.daemon_pongs),
        "jitter_ms": _spread(jitter),
        "max_interval_s": max(intervals) if intervals else None,
        "ping_rtt_ms": [
            None if s.get("ping_rtt_s") is None else s["ping_rtt_s"] * 1000 for s in shards
        ],
        "reconnects": sum(int(s.get("reconnects", 0)) for s in shards),
        "shard_states": [s.get("state") for s in shards],
    }


def summarize(
    spec: RunSpec,
    ctx: Context,
    m: Measured,
    received: list[tuple[float, str, str]],
    triggers: list[tuple[Any, ...]],
    statuses: dict[int, str],
    plans: list[PredictionPlan],
) -> dict[str, Any]:
    playback = m.playback
    events = ctx.recording.events * spec.repeat
    assert playback.first_byte_at is not None
    notified = {int(payload): t for t, channel, payload in received if channel == TRIGGERS}
    elapsed = m.read_at - playback.first_byte_at
    window = m.quiet_at - m.connected_at
    return {
        "name": spec.name,
        "repeat": spec.repeat,
        "speed": spec.speed,
        "frames": playback.total_frames,
        "events": events,
        "rules": 0 if spec.rules is None else 2 * len(spec.rules.rows),
        "startup_s": m.connected_at - m.spawned_at,
        "elapsed_s": elapsed,
        "events_per_s": events / elapsed,
        "settled": m.settled,
        "cpu_s": m.cpu_s,
        "cpu_window_s": window,
        "cpu_us_per_event": m.cpu_s / events * 1e6,
        "cpu_busy": m.cpu_s / window,
        "peak_rss_mib": m.peak_rss_kib / 1024,
        "max_backlog_frames": m.max_backlog,
        "reload_notifications": sum(1 for _, c, _ in received if c in RELOAD_CHANNELS),
        "tpsl": _tpsl_outcome(spec.rules, triggers, playback, notified, m.decided_at),
        "predictions": _prediction_outcome(plans, triggers, statuses, m.stop_wall),
        "heartbeat": _heartbeat(m),
        "health_monitor": m.health.get("monitor"),
        "exit_code": m.exit_code,
        "log_problems": Counter(m.log["problems"]).most_common(10),
        "unexpected_connections": ctx.sender.unexpected,
        "sender_error": playback.error,
        "other_text_from_daemon": dict(playback.other_text),
    }


# --- orchestration -----------------------------------------------------------------


@contextlib.contextmanager
def templates(
    admin_dsn: str, book: RuleBook, markets: Sequence[Market]
) -> Iterator[tuple[str, str]]:
    """Two template databases: positions with TP/SL, and the same positions without."""
    from polystream import db

    names = (f"polystream_benchmon_{os.getpid()}_rules", f"polystream_benchmon_{os.getpid()}_plain")
    plain = plain_positions(markets, len(book.rows) + 1)
    try:
        build_template(admin_dsn, names[0], book.rows + plain)
        build_template(admin_dsn, names[1], book.without_thresholds() + plain)
        yield names
    finally:
        for name in names:
            db.drop_database(admin_dsn, name)


async def bench(ctx: Context, specs: Sequence[RunSpec]) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(ctx.sender.serve)
        for spec in specs:
            with trio.fail_after(600):
                runs[spec.name] = run = await run_daemon(spec, ctx)
            print(
                f"{spec.name}: {run['events_per_s']:,.0f} events/s, "
                f"{run['cpu_us_per_event']:.1f} CPU µs/event, trigger latency p50 "
                f"{run['tpsl']['latency_ms']['p50']} ms, PINGs {run['heartbeat']['pings_received']}"
                f", startup {run['startup_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
        nursery.cancel_scope.cancel()
    return runs


def _figure(value: float | None, unit: str, **extra: Any) -> dict[str, Any]:
    return {"value": value, "unit": unit, **extra}


def _latency(run: dict[str, Any], label: str) -> dict[str, Any]:
    spread = run["tpsl"]["latency_ms"]
    return {
        "p50": _figure(spread["p50"], "ms"),
        "p99": _figure(spread["p99"], "ms"),
        "max": _figure(spread["max"], "ms"),
        "count": _figure(spread["count"], "crossed rules"),
        "pacing": label,
        "frame_to_decision_p50": _figure(
            run["tpsl"]["frame_to_decision_ms"]["p50"],
            "ms (monitor's decided_at, from the daemon log)",
        ),
        "frame_to_decision_p99": _figure(
            run["tpsl"]["frame_to_decision_ms"]["p99"],
            "ms (monitor's decided_at, from the daemon log)",
        ),
        "decision_to_notify_p50": _figure(
            run["tpsl"]["decision_to_notify_ms"]["p50"], "ms (executor + database)"
        ),
        "decision_to_notify_p99": _figure(
            run["tpsl"]["decision_to_notify_ms"]["p99"], "ms (executor + database)"
        ),
        "max_backlog": _figure(
            run["max_backlog_frames"], "frames sent but not yet read (sampled every 0.1 s)"
        ),
    }


def _heartbeat_figures(run: dict[str, Any], baseline: str | None) -> dict[str, Any]:
    beat = run["heartbeat"]
    extra = {} if baseline is None else {"baseline": baseline}
    return {
        "jitter_p50": _figure(beat["jitter_ms"]["p50"], "ms |interval - 1 s|", **extra),
        "jitter_p99": _figure(beat["jitter_ms"]["p99"], "ms |interval - 1 s|", **extra),
        "jitter_max": _figure(beat["jitter_ms"]["max"], "ms |interval - 1 s|", **extra),
        "pings": _figure(beat["pings_received"], "PINGs received by the sender"),
        "pongs": _figure(beat["pongs_sent"], "PONGs sent by the sender"),
        "missed_pongs": _figure(beat["missed_pongs"], "PONGs sent but not read by the daemon"),
        "reconnects": _figure(beat["reconnects"] + run["unexpected_connections"], "reconnects"),
        "ping_rtt": _figure(
            beat["ping_rtt_ms"][0] if beat["ping_rtt_ms"] else None,
            "ms (/health ping_rtt_s at the end)",
        ),
    }


def document(
    runs: dict[str, dict[str, Any]], ctx: Context, book: RuleBook, machine: dict[str, Any]
) -> dict[str, Any]:
    loaded, base, paced = runs["loaded"], runs["baseline"], runs["paced"]
    cpu_unit = "daemon CPU µs/event (all threads)"
    return {
        "machine": machine,
        "workload": {
            "capture": f"{CAPTURE.relative_to(ROOT)}.jsonl.gz",
            "frames_per_repetition": len(ctx.recording.frames),
            "events_per_repetition": ctx.recording.events,
            "positions_with_tp_and_sl": len(book.rows),
            "thresholds": 2 * len(book.rows),
            "crossed_positions": len(book.expected),
            "predictions": loaded["predictions"]["loaded"],
            "max_speed_repetitions": loaded["repeat"],
            "paced_speed": paced["speed"],
            "ping_interval_s": PING_INTERVAL,
            "sender_stamps": "per chunk of <= 64 KiB of whole frames; every chunk ends at a "
            "frame that first crosses a rule, so those stamps are per frame",
        },
        "latency": {
            "paced": _latency(paced, f"{paced['speed']}x recorded speed"),
            "max_speed": _latency(loaded, "maximum speed: the sender runs ahead of the daemon"),
        },
        "cpu": {
            "loaded_per_event": _figure(
                loaded["cpu_us_per_event"], cpu_unit, baseline="cpu.baseline_per_event"
            ),
            "baseline_per_event": _figure(base["cpu_us_per_event"], cpu_unit),
            "marginal_per_event": _figure(
                loaded["cpu_us_per_event"] - base["cpu_us_per_event"],
                "CPU µs/event: rules + predictions loaded minus none",
                baseline="cpu.baseline_per_event",
            ),
            "loaded_events_per_s": _figure(
                loaded["events_per_s"], "events/s", baseline="cpu.baseline_events_per_s"
            ),
            "baseline_events_per_s": _figure(base["events_per_s"], "events/s"),
            "startup_loaded": _figure(
                loaded["startup_s"], "s from spawn to subscribed", baseline="cpu.startup_baseline"
            ),
            "startup_baseline": _figure(base["startup_s"], "s from spawn to subscribed"),
            "rule_reload_notifications": _figure(
                loaded["reload_notifications"], "NOTIFYs that make the daemon reload its rules"
            ),
        },
        "heartbeat": {
            "loaded": _heartbeat_figures(loaded, "heartbeat.baseline"),
            "baseline": _heartbeat_figures(base, None),
            "paced": _heartbeat_figures(paced, "heartbeat.baseline"),
        },
        "correctness": {
            name: {
                "tpsl": {k: v for k, v in run["tpsl"].items() if k != "latency_ms_all"},
                "predictions": run["predictions"],
                "exit_code": run["exit_code"],
                "log_problems": run["log_problems"],
                "settled": run["settled"],
            }
            for name, run in runs.items()
        },
        "runs": {
            name: {k: v for k, v in run.items() if k not in ("tpsl", "predictions")}
            for name, run in runs.items()
        },
    }


def _cell(node: dict[str, Any]) -> str:
    value = node["value"]
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


TABLE = [
    ("Tick to trigger NOTIFY, paced, p50", "latency.paced.p50", None),
    ("Tick to trigger NOTIFY, paced, p99", "latency.paced.p99", None),
    ("Tick to trigger NOTIFY, paced, max", "latency.paced.max", None),
    ("– of which frame to decision, paced, p50", "latency.paced.frame_to_decision_p50", None),
    ("– of which frame to decision, paced, p99", "latency.paced.frame_to_decision_p99", None),
    ("– of which decision to NOTIFY, paced, p50", "latency.paced.decision_to_notify_p50", None),
    ("– of which decision to NOTIFY, paced, p99", "latency.paced.decision_to_notify_p99", None),
    ("Tick to trigger NOTIFY, max speed, p50", "latency.max_speed.p50", None),
    ("Tick to trigger NOTIFY, max speed, p99", "latency.max_speed.p99", None),
    ("Tick to trigger NOTIFY, max speed, max", "latency.max_speed.max", None),
    ("Daemon backlog, max speed, max", "latency.max_speed.max_backlog", None),
    ("Daemon backlog, paced, max", "latency.paced.max_backlog", None),
    ("Daemon CPU per event, rules loaded", "cpu.loaded_per_event", "cpu.baseline_per_event"),
    ("**Monitor CPU per event (marginal)**", "cpu.marginal_per_event", None),
    ("Events/s at max speed, rules loaded", "cpu.loaded_events_per_s", "cpu.baseline_events_per_s"),
    ("Start-up to subscribed, rules loaded", "cpu.startup_loaded", "cpu.startup_baseline"),
    ("Rule reloads requested (NOTIFY)", "cpu.rule_reload_notifications", None),
    (
        "PING jitter p50, max speed, rules",
        "heartbeat.loaded.jitter_p50",
        "heartbeat.baseline.jitter_p50",
    ),
    (
        "PING jitter p99, max speed, rules",
        "heartbeat.loaded.jitter_p99",
        "heartbeat.baseline.jitter_p99",
    ),
    (
        "PING jitter max, max speed, rules",
        "heartbeat.loaded.jitter_max",
        "heartbeat.baseline.jitter_max",
    ),
    (
        "PING jitter p99, paced, rules",
        "heartbeat.paced.jitter_p99",
        "heartbeat.baseline.jitter_p99",
    ),
    ("PINGs / PONGs, max speed, rules", "heartbeat.loaded.pings", "heartbeat.baseline.pings"),
    (
        "Missed PONGs, max speed, rules",
        "heartbeat.loaded.missed_pongs",
        "heartbeat.baseline.missed_pongs",
    ),
    ("Missed PONGs, paced", "heartbeat.paced.missed_pongs", None),
    (
        "Reconnects, max speed, rules",
        "heartbeat.loaded.reconnects",
        "heartbeat.baseline.reconnects",
    ),
    ("ping_rtt at the end, paced", "heartbeat.paced.ping_rtt", None),
    (
        "ping_rtt at the end, max speed, rules",
        "heartbeat.loaded.ping_rtt",
        "heartbeat.baseline.ping_rtt",
    ),
]


def _node(doc: dict[str, Any], path: str) -> dict[str, Any]:
    node: Any = doc
    for key in path.split("."):
        node = node[key]
    result: dict[str, Any] = node
    return result


def markdown(doc: dict[str, Any]) -> str:
    work, machine = doc["workload"], doc["machine"]
    lines = [
        f"Monitor: {work['positions_with_tp_and_sl']:,} positions with TP and SL "
        f"({work['thresholds']:,} thresholds, {work['crossed_positions']:,} crossed), "
        f"{work['predictions']:,} pending predictions; `{work['capture']}` x "
        f"{work['max_speed_repetitions']} at max speed and x 1 at {work['paced_speed']}x "
        f"recorded speed; PING every {work['ping_interval_s']} s; {machine['cpu_count']} CPUs, "
        f"Python {machine['python']}, {machine['date']}. One run each; baseline = the same "
        "positions without TP/SL and no predictions.",
        "",
        "| Measurement | Value | Unit | Baseline (no rules) |",
        "| --- | ---: | --- | ---: |",
    ]
    for label, path, baseline in TABLE:
        node = _node(doc, path)
        base = "" if baseline is None else _cell(_node(doc, baseline))
        if path.endswith(".pings"):
            pongs = _node(doc, path.replace(".pings", ".pongs"))
            lines.append(f"| {label} | {_cell(node)} / {_cell(pongs)} | PINGs / PONGs | {base} |")
            continue
        lines.append(f"| {label} | {_cell(node)} | {node['unit']} | {base} |")
    lines += ["", "Correctness:", ""]
    for name, check in doc["correctness"].items():
        tpsl, pred = check["tpsl"], check["predictions"]
        lines.append(
            f"* {name}: {tpsl['fired_once']:,}/{tpsl['expected']:,} crossed rules fired exactly "
            f"once; missing {len(tpsl['missing'])}, duplicates {len(tpsl['duplicates'])}, "
            f"unexpected {len(tpsl['unexpected'])}, wrong kind/price "
            f"{len(tpsl['wrong_kind_or_price'])}; predictions decided "
            f"{pred['decided_during_run']}/{pred['loaded']} (due {pred['due_during_run']}), "
            f"late {len(pred['not_decided_but_due'])}, early {len(pred['decided_too_early'])}, "
            f"duplicates {len(pred['duplicates'])}; exit {check['exit_code']}"
        )
    return "\n".join(lines) + "\n"


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.monitor", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--positions", type=int, default=100_000, help="positions with TP and SL (default 100,000)"
    )
    parser.add_argument(
        "--crossed",
        type=int,
        default=1_000,
        help="of which crossed by the recording (default 1,000)",
    )
    parser.add_argument(
        "--predictions", type=int, default=1_000, help="pending predictions (default 1,000)"
    )
    parser.add_argument(
        "--repeat", type=int, default=4, help="repetitions of the capture at max speed (default 4)"
    )
    parser.add_argument(
        "--speed", type=float, default=20.0, help="paced run: x recorded speed (default 20: 45 s)"
    )
    parser.add_argument("--seed", type=int, default=20251211)
    parser.add_argument(
        "--out",
        type=Path,
        default=OUT_DIR,
        help="where results-monitor.json/.md go (default bench/)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="keep the daemon logs here (default: a temporary directory)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="record the loaded max-speed run with py-spy into this directory "
        "(slows the daemon: results are not written)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    _quiet_logging()
    machine = machine_facts()
    recording = Recording.load(Path(f"{CAPTURE}.jsonl.gz"))
    markets = load_markets()
    book = make_rules(recording, markets, args.positions, args.crossed, args.seed)
    print(
        f"workload: {len(recording.frames):,} frames/{recording.events:,} events per "
        f"repetition, {len(book.rows):,} positions, {len(book.expected):,} crossed",
        file=sys.stderr,
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        dsn, machine["database"] = stack.enter_context(admin_database())
        log_dir = log_directory(stack, args.log_dir, "polystream-benchmon-logs-")
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
        rules_db, plain_db = stack.enter_context(templates(dsn, book, markets))
        ctx = Context(dsn, recording, markets, Sender(), log_dir, args.profile, args.seed)
        specs = [
            RunSpec("loaded", rules_db, book, args.predictions, args.repeat, None),
            RunSpec("baseline", plain_db, None, 0, args.repeat, None),
            RunSpec("paced", rules_db, book, args.predictions, 1, args.speed),
        ]
        if args.profile is not None:
            specs = specs[:1]
        runs = trio.run(bench, ctx, specs)
    if args.profile is not None:
        for path in sorted(args.profile.glob("daemon-*.txt")):
            print(hotspots(path, top=25), file=sys.stderr)
        return 0
    doc = document(runs, ctx, book, machine)
    table = markdown(doc)
    write_results(args.out, "results-monitor", doc, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""
Monitor benchmark: TP/SL triggers and timed predictions under load, and the
feed's heartbeat while they run.

Run ``.venv/bin/python -m bench.monitor`` (``--help`` for options). It writes
``bench/results-monitor.json`` and ``bench/results-monitor.md`` and prints the
table. About four minutes on two cores.

Workload: ``examples/updown-2025-12-11`` (6 markets, 12 assets). The database
holds 100,000 active positions spread over the 12 assets, each with a
take-profit and a stop-loss price (200,000 thresholds), and 24 plain positions.
1,000 of the positions are crossed by the recorded best bid, at frames
computed here from the recording (as ``tests/test_monitor_e2e.py`` does); the
others never are.

The loaded runs also hold 1,000 predictions (``--predictions``) in the groups
of ``PREDICTION_MIX``, and the expected outcome of every one is computed here
from the recording (the best ask of each asset after each frame, and after the
last one, checked against ``expected.json``) and the run's timeline, by the
rules the monitor documents. Decision times are only placed where the books
they see are known, each at least ``MARGIN_S`` (2 s) away from the moments
that change them:

* 70 % are inserted before the daemon starts: due 1-6 s later, while no quote
  exists (the sender holds the tape until 2 s after both the subscription and
  the last of those): deferred, then decided on the first ask the tape brings
  (or still deferred at the end on assets the tape never quotes); edge
  predictions decided on the first qualifying ask, or never; and due 540 s or
  more into their 900 s windows: still pending at the stop (checked);
* 30 % are inserted once the daemon has applied the whole tape (frames read,
  router queue empty): due 2-3 s later on the final books (placed, skipped
  ``price_above_limit``, or deferred), windows closing without an ask
  (``no_price``), already closed (``window_closed``), edge deadlines passing
  (``no_edge``), edges given by the final books (decided on loading).

Every trigger and ``predictions`` row is compared with its expectation (kind,
reason, price, status, ``decided_at`` not earlier than possible, exactly one
trigger), every deferred prediction must have exactly one
``prediction_deferred`` log line (others none), and ``/health`` at the end
must count the pending and the deferred ones. Any difference in any run, in
TP/SL or predictions, makes the benchmark exit 1.

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
    bid after every frame that moved it (``(frame index, bid)``, unknown
    bids left out: the monitor does not compare those) and the best ask
    after every such frame (``(frame index, ask or None)``), and the best ask
    of every asset after the last frame. Books are kept with
    :class:`polystream.book.Books`, the router's model; the final asks are
    checked against ``expected.json`` in :meth:`AskFacts.of`.
    """

    frames: tuple[bytes, ...]
    times_ms: tuple[int, ...]
    events: int
    bids: dict[str, list[tuple[int, Decimal]]]
    asks: dict[str, list[tuple[int, Decimal | None]]]
    final_asks: dict[str, Decimal | None]
    lines: tuple[bytes, ...] = ()

    def lap(self, number: int) -> tuple[bytes, ...]:
        """The frames of repetition ``number``, timestamps moved after the previous one's
        (a repeated, older timestamp is rightly dropped by the daemon as stale)."""
        if number == 0:
            return self.frames
        from wsproto.frame_protocol import FrameProtocol

        encoder = FrameProtocol(client=False, extensions=[])
        return tuple(
            bytes(encoder.send_data(line.decode(), fin=True)) for line in self.lap_lines(number)
        )

    def lap_lines(self, number: int) -> list[bytes]:
        """The JSON lines of repetition ``number`` (timestamps shifted as in :meth:`lap`)."""
        from bench.ingest import shift_timestamps

        offset = number * (self.times_ms[-1] - min(self.times_ms) + 1000)
        return [shift_timestamps(line, offset) for line in self.lines]

    @classmethod
    def load(cls, path: Path) -> Recording:
        """
        Read and encode the capture, following its books.

        Raises:
            BenchError: a second repetition does not end in the state the
                first ends in (the daemon sees several).
        """
        from wsproto.frame_protocol import FrameProtocol

        from polystream.book import Books
        from polystream.protocol import parse_frame

        encoder = FrameProtocol(client=False, extensions=[])
        books = Books()
        bids: dict[str, list[tuple[int, Decimal]]] = {}
        asks: dict[str, list[tuple[int, Decimal | None]]] = {}
        frames: list[bytes] = []
        times: list[int] = []
        events = 0
        lines = [line for line in gzip.decompress(path.read_bytes()).split(b"\n") if line.strip()]
        for index, line in enumerate(lines):
            frames.append(bytes(encoder.send_data(line.decode(), fin=True)))
            stamp = times[-1] if times else 0
            parsed = parse_frame(line)
            events += len(parsed.event_types)
            for event in parsed.events:
                stamp = max(stamp, getattr(event, "timestamp_ms", 0) or 0)
            times.append(stamp)
            for asset in books.apply(parsed.events).moved:
                bid, ask = books[asset].best_bid, books[asset].best_ask
                if bid is not None:
                    bids.setdefault(asset, []).append((index, bid))
                asks.setdefault(asset, []).append((index, ask))
        final = {asset: book.best_ask for asset, book in books.items()}
        recording = cls(tuple(frames), tuple(times), events, bids, asks, final, tuple(lines))
        for line in recording.lap_lines(1):
            books.apply(parse_frame(line).events)
        if {asset: book.best_ask for asset, book in books.items()} != final:
            raise BenchError("a second repetition of the capture ends in another state")
        return recording

    @property
    def bytes(self) -> int:
        """Encoded size of one repetition."""
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
        """The path of ``(frame, bid)`` pairs, with its running extremes."""
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
        """Frames (of one repetition) at which some rule first crosses."""
        return frozenset(c.frame for c in self.expected.values())

    def without_thresholds(self) -> list[PositionRow]:
        """The same positions with no TP/SL (the baseline's)."""
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
#
# Every prediction's outcome is computed here, from the recording and the
# run's timeline alone, by the rules the monitor documents
# (polystream/monitor.py: timing modes, deferral while an asset has no ask,
# edge deadline). A decision time is only ever placed where the books it
# sees are known: before the tape starts (no quote at all: the sender holds
# the tape), after the daemon has applied the whole tape (the final books),
# or long after the stop; each at least MARGIN_S away from those moments.

Phase = Literal["before_tape", "after_tape"]

PREDICTION_WINDOW_S = 900.0  # long windows: "late" decision times stay far after the stop
EARLY_DUE_S = (1.0, 6.0)  # before-tape decisions: s after planning (the tape waits for them)
LATE_FROM = 0.6  # not-yet-due decisions: at least this far into the window (540 s)
AFTER_DUE_S = (2.0, 3.0)  # after-tape decisions: s after insertion
AFTER_CLOSE_S = 4.0  # the no_price group's windows close this long after insertion
AFTER_EDGE_DEADLINE_S = 3.0  # the no_edge group's deadline, after insertion
LOAD_WITHIN_S = 1.5  # inserted predictions must be loaded before the first is due
MARGIN_S = 2.0  # a decision time's distance from any moment it could be confused with
HIGH_LIMIT, LOW_LIMIT = Decimal("0.99"), Decimal("0.05")
HIGH_FORECAST, LOW_FORECAST = Decimal("0.99"), Decimal("0.01")

# (share, group, phase): what each group tests
PREDICTION_MIX: tuple[tuple[float, str, Phase], ...] = (
    (0.15, "late_from_end", "before_tape"),  # due long after the stop: pending
    (0.15, "late_percentage", "before_tape"),
    (0.15, "edge_never", "before_tape"),  # forecast 0.01, min edge 0.05: no ask gives it
    (0.10, "edge_first_ask", "before_tape"),  # forecast 0.99, min edge 0: the first ask
    (0.15, "due_before_tape", "before_tape"),  # due with no quote: deferred, then first ask
    (0.10, "due_after_tape", "after_tape"),  # due on the final books (or deferred)
    (0.05, "no_price", "after_tape"),  # assets without a final ask, window closes in 4 s
    (0.05, "window_closed", "after_tape"),  # the window closed before insertion
    (0.05, "no_edge", "after_tape"),  # forecast 0.01, deadline 3 s after insertion
    (0.05, "edge_final_ask", "after_tape"),  # forecast 0.99: decided when loaded, if quoted
)


@attrs.frozen
class PredictionPlan:
    """
    One pending prediction to insert (times epoch seconds, prices
    probabilities), of a ``group`` of :data:`PREDICTION_MIX`, inserted in
    ``phase``: before the daemon starts, or once it has applied the tape.
    """

    id: int
    group: str
    phase: Phase
    market: str
    outcome: str
    token: str
    timing: str
    delay_s: float
    fraction: float
    forecast: Decimal | None
    min_edge: Decimal | None
    limit: Decimal
    opens_at: float
    closes_at: float

    @property
    def decision_at(self) -> float:
        """
        When it is due (epoch s), as ``predictions.timing_mode`` is specified:
        ``from_start`` delay after opening, ``percentage`` of the window,
        ``from_end`` delay before closing (and ``edge``'s no-edge deadline),
        clamped into the window.
        """
        if self.timing == "from_start":
            at = self.opens_at + self.delay_s
        elif self.timing == "percentage":
            at = self.opens_at + self.fraction * (self.closes_at - self.opens_at)
        else:
            at = self.closes_at - self.delay_s
        return min(max(at, self.opens_at), self.closes_at)

    def row(self) -> tuple[Any, ...]:
        """The ``predictions`` row (COPY column order of :func:`insert_predictions`)."""
        return (
            self.id,
            "bench",
            self.market,
            self.token,
            self.outcome,
            Decimal(5),
            self.limit,
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


@attrs.frozen
class AskFacts:
    """
    What the recording says about best asks: per asset the ask after each
    frame that moved it (one repetition: later ones repeat it) and after the
    last frame (all repetitions end in that state: :meth:`Recording.load`).
    """

    asks: dict[str, list[tuple[int, Decimal | None]]]
    final: dict[str, Decimal | None]

    @classmethod
    def of(cls, recording: Recording, markets: Sequence[Market]) -> AskFacts:
        """
        The facts, with the final asks checked against ``expected.json``.

        Raises:
            BenchError: the books followed here end elsewhere than expected.json.
        """
        want = orjson.loads(Path(f"{CAPTURE}.expected.json").read_bytes())["assets"]
        final: dict[str, Decimal | None] = {}
        for token in (t for m in markets for t in m.tokens):
            final[token] = recording.final_asks.get(token)
            stated = want[token]["best_ask"]
            if final[token] != (None if stated is None else Decimal(stated)):
                raise BenchError(f"final ask of {token[:10]}: {final[token]} != {stated}")
        return cls(recording.asks, final)

    def first_ask(
        self, asset: str, forecast: Decimal | None = None, min_edge: Decimal | None = None
    ) -> Decimal | None:
        """
        The first ask the tape gives ``asset`` (with ``forecast``: the first
        with ``forecast - ask >= min_edge``); None if it never does.
        """
        for _, ask in self.asks.get(asset, []):
            if ask is None:
                continue
            if forecast is None or forecast - ask >= (min_edge or Decimal(0)):
                return ask
        return None

    def quoted_at_end(self) -> set[str]:
        """Assets with a best ask after the last frame."""
        return {asset for asset, ask in self.final.items() if ask is not None}


def _mix_counts(count: int) -> list[tuple[str, Phase, int]]:
    return [(group, phase, round(share * count)) for share, group, phase in PREDICTION_MIX]


def make_predictions(
    count: int,
    markets: Sequence[Market],
    facts: AskFacts,
    phase: Phase,
    now: float,
    seed: int,
) -> list[PredictionPlan]:
    """
    The predictions of ``phase`` (ids numbered over both phases, in
    :data:`PREDICTION_MIX` order), planned at ``now`` (epoch s): before the
    daemon starts for ``before_tape``, at insertion for ``after_tape``.
    """
    rng = random.Random(f"{seed}-{phase}")
    owners = [(m.id, o, t) for m in markets for o, t in zip(m.outcomes, m.tokens, strict=True)]
    unquoted = [owner for owner in owners if owner[2] not in facts.quoted_at_end()]
    plans: list[PredictionPlan] = []
    pid = 0
    for group, group_phase, n in _mix_counts(count):
        for _ in range(n):
            pid += 1
            if group_phase != phase:
                continue
            pool = unquoted if group == "no_price" else owners
            plans.append(_plan(pid, group, phase, pool[pid % len(pool)], rng, now))
    return plans


def _plan(
    pid: int,
    group: str,
    phase: Phase,
    owner: tuple[str, str, str],
    rng: random.Random,
    now: float,
) -> PredictionPlan:
    """
    One prediction of ``group`` planned at ``now`` (epoch s); timed ones
    cycle through the three timing modes, every fourth has the low limit.
    """
    market, outcome, token = owner
    limit = LOW_LIMIT if pid % 4 == 0 else HIGH_LIMIT
    if group.startswith("edge_") or group == "no_edge":
        return _edge_plan(pid, group, phase, owner, rng, now, limit)
    window = PREDICTION_WINDOW_S
    opens, closes = now, now + window
    timing = ("from_start", "from_end", "percentage")[pid % 3]
    delay, fraction = 0.0, 0.5
    due: float | None = None
    if group == "late_from_end":
        timing, delay = "from_end", rng.uniform(0, (1 - LATE_FROM) * window)
    elif group == "late_percentage":
        timing, fraction = "percentage", rng.uniform(LATE_FROM, 0.95)
    elif group == "due_before_tape":
        due = now + rng.uniform(*EARLY_DUE_S)
    elif group == "due_after_tape":
        opens, due = now - 10, now + rng.uniform(*AFTER_DUE_S)
    elif group == "no_price":
        timing, opens, closes = "from_start", now - 1, now + AFTER_CLOSE_S
        due = now + rng.uniform(*AFTER_DUE_S)
    elif group == "window_closed":
        timing, opens, closes, delay = "from_end", now - 60, now - 30, 5.0
    if due is not None:  # the timing mode's parameter that makes it due then
        if timing == "from_start":
            delay = due - opens
        elif timing == "from_end":
            delay = closes - due
        else:
            fraction = (due - opens) / (closes - opens)
    return PredictionPlan(
        pid,
        group,
        phase,
        market,
        outcome,
        token,
        timing,
        delay,
        fraction,
        None,
        None,
        limit,
        opens,
        closes,
    )


def _edge_plan(
    pid: int,
    group: str,
    phase: Phase,
    owner: tuple[str, str, str],
    rng: random.Random,
    now: float,
    limit: Decimal,
) -> PredictionPlan:
    """
    An edge prediction: forecast 0.99 with min edge 0 (any ask up to 0.99
    gives it) or 0.01 with 0.05 (none does); deadline late in a long window,
    or, for ``no_edge``, AFTER_EDGE_DEADLINE_S after ``now``.
    """
    market, outcome, token = owner
    high = group in ("edge_first_ask", "edge_final_ask")
    forecast = HIGH_FORECAST if high else LOW_FORECAST
    min_edge = Decimal(0) if high else Decimal("0.05")
    opens = now - 1 if phase == "after_tape" else now
    closes = now + PREDICTION_WINDOW_S
    delay = rng.uniform(0, (1 - LATE_FROM) * PREDICTION_WINDOW_S)
    if group == "no_edge":
        closes = now + 2 * AFTER_EDGE_DEADLINE_S
        delay = closes - (now + AFTER_EDGE_DEADLINE_S)
    return PredictionPlan(
        pid,
        group,
        phase,
        market,
        outcome,
        token,
        "edge",
        delay,
        0.5,
        forecast,
        min_edge,
        limit,
        opens,
        closes,
    )


@attrs.frozen
class Moments:
    """
    A run's timeline (epoch s): ``tape`` first byte of the tape sent,
    ``applied`` the daemon seen to have applied every frame, ``inserted``
    the after-tape predictions committed (None: none), ``stop`` SIGTERM sent.
    """

    tape: float
    applied: float
    inserted: float | None
    stop: float


class Unattributable(Exception):
    """A prediction's outcome depends on a moment the bench cannot place (a design error)."""


@attrs.frozen
class Expected:
    """
    What must become of one prediction: ``status`` (``pending``, ``decided``,
    ``skipped``), with the trigger's ``reason`` and ``price`` (the ask
    seen); ``deferred``: one ``prediction_deferred`` line; ``still_deferred``:
    deferred at the end; ``not_before``: earliest ``decided_at`` (epoch s).
    """

    status: str
    reason: str | None = None
    price: Decimal | None = None
    deferred: bool = False
    still_deferred: bool = False
    not_before: float | None = None

    @property
    def kind(self) -> str | None:
        """The ``triggers.kind`` it must write (None: none)."""
        if self.status == "pending":
            return None
        return "prediction" if self.status == "decided" else "prediction_skipped"


def _span(at: float, moments: Moments) -> str:
    """
    Which books a decision at ``at`` sees: ``no_quotes`` (before the tape),
    ``final`` (the whole tape applied, before the stop), ``after_stop``.

    Raises:
        Unattributable: during the tape, or within MARGIN_S of its start or the stop.
    """
    if at <= moments.tape - MARGIN_S:
        return "no_quotes"
    if moments.applied <= at <= moments.stop - MARGIN_S:
        return "final"
    if at >= moments.stop + MARGIN_S:
        return "after_stop"
    raise Unattributable(f"a decision or close at {at:.3f} is not clear of the tape or the stop")


def expected_outcome(plan: PredictionPlan, facts: AskFacts, moments: Moments) -> Expected:
    """
    What the monitor must make of ``plan`` on this timeline. A prediction is
    loaded before the tape (``before_tape``: the daemon loads its rules
    before subscribing, and the tape waits MARGIN_S after the subscription)
    or within LOAD_WITHIN_S of ``moments.inserted`` (checked by the run).

    Raises:
        Unattributable: see :func:`_span`.
    """
    if plan.phase == "before_tape":
        loaded = moments.tape - MARGIN_S
    else:
        assert moments.inserted is not None
        loaded = moments.inserted
    if plan.closes_at < loaded:  # closed before it was loaded (after-tape loads only)
        ask = facts.final[plan.token] if plan.phase == "after_tape" else None
        return Expected("skipped", "window_closed", ask)
    due = _span(max(plan.decision_at, loaded), moments)
    if plan.timing == "edge":
        return _expected_edge(plan, facts, moments, due)
    if due == "after_stop":
        return Expected("pending")
    if due == "no_quotes":  # deferred; decided on the first ask the tape brings
        ask, not_before = facts.first_ask(plan.token), moments.tape
    else:
        ask, not_before = facts.final[plan.token], plan.decision_at
    if ask is not None:
        if due == "no_quotes" and _span(plan.closes_at, moments) == "no_quotes":
            return Expected("skipped", "no_price", None, deferred=True)
        return _placed(plan, ask, plan.timing, not_before, deferred=due == "no_quotes")
    # no ask ever after its decision time: deferred until the window closes
    if plan.closes_at <= moments.stop - MARGIN_S:
        return Expected("skipped", "no_price", None, deferred=True, not_before=plan.closes_at)
    if plan.closes_at >= moments.stop + MARGIN_S:
        return Expected("pending", deferred=True, still_deferred=True)
    raise Unattributable(f"prediction {plan.id} closes at the stop")


def _placed(
    plan: PredictionPlan,
    ask: Decimal,
    reason: str,
    not_before: float | None,
    *,
    deferred: bool = False,
) -> Expected:
    """Placed with ``reason`` at ``ask``, unless the ask is above the limit price."""
    if ask > plan.limit:
        return Expected("skipped", "price_above_limit", ask, deferred, not_before=not_before)
    return Expected("decided", reason, ask, deferred, not_before=not_before)


def _expected_edge(
    plan: PredictionPlan, facts: AskFacts, moments: Moments, deadline: str
) -> Expected:
    """An edge prediction: the first qualifying ask before its deadline, else ``no_edge`` there."""
    if plan.phase == "before_tape":  # every tick of the tape falls inside [opens, deadline)
        if deadline == "no_quotes":
            return Expected("skipped", "no_edge", None, not_before=plan.decision_at)
        ask = facts.first_ask(plan.token, plan.forecast, plan.min_edge)
        if ask is not None:
            return _placed(plan, ask, "edge", moments.tape)
    else:  # loaded on the final books: decided at once if they give the edge
        ask = facts.final[plan.token]
        assert plan.forecast is not None
        if ask is not None and plan.forecast - ask >= (plan.min_edge or Decimal(0)):
            return _placed(plan, ask, "edge", moments.inserted)
    if deadline == "after_stop":
        return Expected("pending")
    return Expected("skipped", "no_edge", facts.final[plan.token], not_before=plan.decision_at)


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
    """
    A fresh database ``name`` cloned from ``template``; returns its DSN (drops a leftover
    first).
    """
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
    """COPY ``plans`` into ``predictions`` (one commit: one NOTIFY per row on commit)."""
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


PredictionRow = tuple[str, Decimal | None, str | None, float | None]


@attrs.frozen
class Outcome:
    """
    What the database holds after a run: every ``triggers`` row (id, kind,
    position id, prediction id, price, reason) and every prediction's
    (status, decision price, decision reason, decided_at epoch s).
    """

    triggers: list[tuple[Any, ...]]
    predictions: dict[int, PredictionRow]


def read_outcome(dsn: str) -> Outcome:
    """Read the :class:`Outcome` (a plain connection of the bench's own)."""
    from polystream import db

    with db.connect(dsn, application_name="polystream-bench") as conn:
        triggers = conn.execute(
            "SELECT id, kind, position_id, prediction_id, price, reason FROM triggers"
        ).fetchall()
        rows = conn.execute(
            "SELECT id, status, decision_price, decision_reason, extract(epoch FROM decided_at)"
            " FROM predictions"
        ).fetchall()
    return Outcome(
        triggers,
        {
            int(pid): (str(status), price, reason, None if at is None else float(at))
            for pid, status, price, reason, at in rows
        },
    )


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
        """Notifications received so far on ``channels``."""
        return sum(1 for _, channel, _ in list(self.received) if channel in channels)

    def stop(self) -> None:
        """End the thread, take what is still queued on the connection, close it."""
        self._stop.set()
        self._thread.join(timeout=5)
        for note in self._conn.notifies(timeout=0.5, stop_after=None):
            self.received.append((time.monotonic(), note.channel, note.payload))
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
    go: trio.Event = attrs.field(factory=trio.Event)  # set once hold_until is
    hold_until: float = 0.0  # epoch s: no frame before
    started: trio.Event = attrs.field(factory=trio.Event)
    first_byte_wall: float | None = None
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
        """Frames to send: one repetition times ``repeat``."""
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
    await playback.go.wait()  # the tape waits (PINGs are answered meanwhile)
    await trio.sleep(max(0.0, playback.hold_until - time.time()))
    start = trio.current_time()
    playback.first_byte_wall = time.time()
    playback.first_byte_at = time.monotonic()
    playback.started.set()
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
    """What every run shares: the database server, the tape and its facts, the sender."""

    admin_dsn: str
    recording: Recording
    facts: AskFacts
    markets: list[Market]
    sender: Sender
    log_dir: Path
    profile_dir: Path | None
    seed: int


@attrs.define
class Measured:
    """What was seen while the daemon ran (monotonic seconds unless ``_wall``: epoch s)."""

    playback: Playback
    spawned_at: float
    connected_at: float
    read_at: float = 0.0
    applied_wall: float = 0.0
    quiet_at: float = 0.0
    settled: bool = False
    inserted_wall: float | None = None
    loaded_in_s: float | None = None
    after_settled: bool = True
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
    deferral_lines: Counter[int] = attrs.field(factory=Counter)  # prediction id -> lines
    after_plans: list[PredictionPlan] = attrs.field(factory=list)


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


def _decided_total(health: dict[str, Any]) -> int:
    fired = health["monitor"]["triggers"]
    return int(fired.get("prediction", 0) + fired.get("prediction_skipped", 0))


def _settled(health: dict[str, Any], expected: int) -> bool:
    monitor = health["monitor"]
    fired = monitor["triggers"]
    tpsl = fired.get("take_profit", 0) + fired.get("stop_loss", 0)
    written = monitor["triggers_written"] + monitor["triggers_duplicate"]
    return bool(tpsl >= expected and written == sum(fired.values()))


async def _poll(url: str) -> dict[str, Any]:
    return await trio.to_thread.run_sync(_health, url)


async def _follow(m: Measured, url: str, expected: int) -> None:
    """
    Poll ``/health`` until every frame is read and applied (the router's
    queue empty: the router applies a frame without a checkpoint, so a
    ``/health`` answer never falls inside one), then until every decision is
    written.
    """
    playback = m.playback
    while True:
        await trio.sleep(POLL_INTERVAL)
        health = await _poll(url)
        read = _data_frames(health)
        m.max_backlog = max(m.max_backlog, playback.frames_sent - read)
        if playback.sent_all.is_set() and read >= playback.total_frames:
            if not m.read_at:
                m.read_at = time.monotonic()
            if health["pending"]["router_queue"] == 0:
                m.applied_wall = time.time()
                break
    calm = 0
    with trio.move_on_after(60):
        while calm < 3:
            calm = calm + 1 if _settled(await _poll(url), expected) else 0
            await trio.sleep(POLL_INTERVAL)
        m.settled = True
    m.quiet_at = time.monotonic()


async def _after_tape(m: Measured, spec: RunSpec, ctx: Context, dsn: str, url: str) -> None:
    """
    Insert the after-tape predictions (decided on the final books), check
    that the daemon loaded them all within LOAD_WITHIN_S (in memory or
    decided: ``/health`` monitor ``predictions`` + prediction triggers),
    wait MARGIN_S past the last short deadline, then until every decision is
    written (<= 30 s).
    """
    now = time.time()
    plans = make_predictions(spec.predictions, ctx.markets, ctx.facts, "after_tape", now, ctx.seed)
    m.after_plans = plans
    known = len(plans) + sum(
        n for _, phase, n in _mix_counts(spec.predictions) if phase == "before_tape"
    )
    await trio.to_thread.run_sync(insert_predictions, dsn, plans)
    m.inserted_wall = time.time()
    with trio.move_on_after(LOAD_WITHIN_S):
        while True:
            health = await _poll(url)
            if health["monitor"]["predictions"] + _decided_total(health) == known:
                m.loaded_in_s = time.time() - m.inserted_wall
                break
            await trio.sleep(0.02)
    short = [t for p in plans for t in (p.decision_at, p.closes_at) if t < now + 60]
    await trio.sleep(max(0.0, max(short, default=now) + MARGIN_S - time.time()))
    m.after_settled = False
    with trio.move_on_after(30):
        while True:  # another process: nothing to wait on but its answers
            if _settled(await _poll(url), 0):
                m.after_settled = True
                break
            await trio.sleep(POLL_INTERVAL)


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


async def _measure(spec: RunSpec, ctx: Context, dsn: str, planned_at: float) -> Measured:
    """
    Run the daemon: the tape starts MARGIN_S after the subscription and
    MARGIN_S after the last before-tape decision time (every run, so that
    runs compare), CPU is counted from the tape's first byte to the end of
    the tape's decisions; then the after-tape predictions, then SIGTERM.
    """
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
        playback.hold_until = max(time.time(), planned_at + EARLY_DUE_S[1]) + MARGIN_S
        playback.go.set()
        await playback.started.wait()
        cpu_start = _cpu_seconds(process.pid)
        if ctx.profile_dir is not None and spec.name == "loaded":
            spy = await _start_py_spy(process.pid, ctx.profile_dir / f"daemon-{spec.name}.txt")
        await _follow(m, url, 0 if spec.rules is None else len(spec.rules.expected))
        m.cpu_s = _cpu_seconds(process.pid) - cpu_start
        if spec.predictions:
            await _after_tape(m, spec, ctx, dsn, url)
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
    m.deferral_lines = _deferral_lines(log_path)
    return m


def _log_records(log_path: Path, event: bytes) -> Iterator[dict[str, Any]]:
    """The daemon's JSON log records whose line mentions ``event``."""
    for line in log_path.read_bytes().splitlines():
        if event in line:
            with contextlib.suppress(orjson.JSONDecodeError):
                record = orjson.loads(line)
                if isinstance(record, dict):
                    yield record


def _decisions(log_path: Path) -> dict[int, float]:
    """
    Trigger id -> when the monitor decided (``trigger_written`` log lines carry
    ``decided_at``, wall-clock epoch seconds), moved onto ``time.monotonic()``.
    """
    offset = time.time() - time.monotonic()
    decided: dict[int, float] = {}
    for record in _log_records(log_path, b"trigger_written"):
        with contextlib.suppress(KeyError, TypeError, ValueError):
            decided[int(record["trigger_id"])] = float(record["decided_at"]) - offset
    return decided


def _deferral_lines(log_path: Path) -> Counter[int]:
    """Prediction id -> ``prediction_deferred`` lines in the daemon's log."""
    lines: Counter[int] = Counter()
    for record in _log_records(log_path, b"prediction_deferred"):
        if record.get("event") == "prediction_deferred":
            lines[int(record["prediction_id"])] += 1
    return lines


async def run_daemon(spec: RunSpec, ctx: Context) -> dict[str, Any]:
    """Clone the template, add predictions, run and measure the daemon, read the outcome."""
    from polystream import db

    name = f"polystream_benchmon_{os.getpid()}_{spec.name}"
    dsn = await trio.to_thread.run_sync(clone_database, ctx.admin_dsn, spec.template, name)
    try:
        planned_at = time.time()
        plans: list[PredictionPlan] = []
        if spec.predictions:
            plans = make_predictions(
                spec.predictions, ctx.markets, ctx.facts, "before_tape", planned_at, ctx.seed
            )
            await trio.to_thread.run_sync(insert_predictions, dsn, plans)
        listener = await trio.to_thread.run_sync(NotifyListener, dsn)
        try:
            measured = await _measure(spec, ctx, dsn, planned_at)
        finally:
            await trio.to_thread.run_sync(listener.stop)
        outcome = await trio.to_thread.run_sync(read_outcome, dsn)
    finally:
        await trio.to_thread.run_sync(db.drop_database, ctx.admin_dsn, name)
    return summarize(spec, ctx, measured, listener.received, outcome, plans + measured.after_plans)


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
    missing = sorted(pid for pid in expected if per_position[pid] == 0)
    duplicates = sorted(pid for pid, n in per_position.items() if n > 1)
    unexpected = sorted(pid for pid in per_position if pid not in expected)
    silent = [int(row[0]) for row in triggers if row[0] not in notified]
    counts = {
        "missing": len(missing),
        "duplicates": len(duplicates),
        "unexpected": len(unexpected),
        "wrong_kind_or_price": len(wrong),
        "without_notify": len(silent),  # any trigger row, positions' or predictions'
    }
    return {
        "expected": len(expected),
        "fired_once": sum(1 for pid in expected if per_position[pid] == 1),
        "counts": counts,
        "differences": sum(counts.values()),
        "missing": missing[:20],
        "duplicates": duplicates[:20],
        "unexpected": unexpected[:20],
        "wrong_kind_or_price": wrong[:20],
        "triggers_without_notify": silent[:20],
        "latency_ms": _spread(latencies),
        "frame_to_decision_ms": _spread(to_decision),
        "decision_to_notify_ms": _spread(to_notify),
        "latency_ms_all": sorted(latencies),
    }


def _prediction_outcome(
    plans: list[PredictionPlan], outcome: Outcome, m: Measured, facts: AskFacts
) -> dict[str, Any]:
    """
    Every prediction against its :func:`expected_outcome` (:func:`_check_plans`),
    no trigger for an unplanned one, and the run's own checks
    (:func:`_run_checks`); the tallies and differences, JSON-ready.
    """
    if not plans:
        return {"loaded": 0, "differences": 0, "counts": {}}
    assert m.playback.first_byte_wall is not None
    moments = Moments(m.playback.first_byte_wall, m.applied_wall, m.inserted_wall, m.stop_wall)
    triggers: dict[int, list[tuple[Any, ...]]] = {}
    for row in outcome.triggers:
        if row[3] is not None:
            triggers.setdefault(int(row[3]), []).append(row)
    tally, found = _check_plans(plans, facts, moments, triggers, outcome, m.deferral_lines)
    for pid, rows in sorted(triggers.items()):  # what _check_plans did not take
        found.append(("unexpected", f"prediction {pid} not planned: {rows}"))
    found += _run_checks(m, tally)
    classes = ("due_decided", "due_deferred", "not_due")
    return {
        "loaded": len(plans),
        "expected": {k: tally[k] for k in classes},
        "as_expected": {k: tally[f"{k}_ok"] for k in classes},
        "deferral_lines": {"expected": tally["deferral_lines"], "ok": tally["deferral_lines_ok"]},
        "deferrals_counted": (m.health.get("monitor") or {}).get("prediction_deferrals"),
        "differences": len(found),
        "counts": dict(Counter(kind for kind, _ in found)),
        "difference_sample": [f"{kind}: {what}" for kind, what in found[:30]],
        "reasons": dict(Counter(str(row[5]) for row in outcome.triggers if row[3] is not None)),
        "loaded_in_s": m.loaded_in_s,
        "timeline_s": {
            "applied": moments.applied - moments.tape,
            "inserted": None if moments.inserted is None else moments.inserted - moments.tape,
            "stop": moments.stop - moments.tape,
        },
    }


def _check_plans(
    plans: list[PredictionPlan],
    facts: AskFacts,
    moments: Moments,
    triggers: dict[int, list[tuple[Any, ...]]],
    outcome: Outcome,
    deferral_lines: Counter[int],
) -> tuple[Counter[str], list[tuple[str, str]]]:
    """
    Each plan against its expectation (:func:`_compare`) and its
    ``prediction_deferred`` lines (one if deferred, else none); takes the
    plan's rows out of ``triggers``. Returns the tally (per class: expected,
    and ``<class>_ok`` as expected) and the differences ``(kind, what)``.
    """
    tally: Counter[str] = Counter()
    found: list[tuple[str, str]] = []
    for plan in plans:
        try:
            want = expected_outcome(plan, facts, moments)
        except Unattributable as exc:
            found.append(("unattributable", f"{plan.id} ({plan.group}): {exc}"))
            continue
        label = "due_decided" if want.status != "pending" else "not_due"
        if want.still_deferred:
            label = "due_deferred"
        tally[label] += 1
        problems = _compare(plan, want, triggers.pop(plan.id, []), outcome.predictions.get(plan.id))
        lines = deferral_lines.get(plan.id, 0)
        tally["deferral_lines"] += want.deferred
        if lines != int(want.deferred):
            problems.append(("deferral_log", f"{plan.id} ({plan.group}): {lines} lines"))
        elif want.deferred:
            tally["deferral_lines_ok"] += 1
        if not problems:
            tally[f"{label}_ok"] += 1
        found += problems
    return tally, found


def _compare(
    plan: PredictionPlan, want: Expected, got: list[tuple[Any, ...]], row: PredictionRow | None
) -> list[tuple[str, str]]:
    """How the trigger rows and the predictions row of ``plan`` differ from ``want``."""
    name = f"{plan.id} ({plan.group})"
    if row is None:
        return [("missing", f"{name}: no predictions row")]
    status, price, reason, decided_at = row
    if len(got) > 1:
        return [("duplicate", f"{name}: {len(got)} triggers")]
    if want.kind is None:
        if got or status != "pending":
            return [("extra", f"{name}: {status} {got}, expected pending")]
        return []
    if not got:
        return [("missing", f"{name}: {status}, expected {want.status} {want.reason} {want.price}")]
    _, kind, _, _, trigger_price, trigger_reason = got[0]
    problems = []
    if (kind, trigger_reason, trigger_price) != (want.kind, want.reason, want.price):
        problems.append(
            (
                "wrong",
                f"{name}: trigger {kind} {trigger_reason} {trigger_price}, expected "
                f"{want.kind} {want.reason} {want.price}",
            )
        )
    if (status, reason, price) != (want.status, want.reason, want.price):
        problems.append(("wrong", f"{name}: row {status} {reason} {price}"))
    early = want.not_before is not None and (decided_at or 0) < want.not_before - 0.001
    if early:
        problems.append(("early", f"{name}: decided at {decided_at}, not before {want.not_before}"))
    return problems


def _run_checks(m: Measured, tally: Counter[str]) -> list[tuple[str, str]]:
    """The run's own preconditions and ``/health`` at the end, against the tally."""
    found: list[tuple[str, str]] = []
    if m.inserted_wall is not None and m.loaded_in_s is None:
        found.append(("setup", f"after-tape predictions not loaded within {LOAD_WITHIN_S} s"))
    if not m.after_settled:
        found.append(("setup", "after-tape decisions not all written within 30 s"))
    monitor = m.health.get("monitor") or {}
    counted = (monitor.get("prediction_deferrals") or {}).get("no_price", 0)
    if counted < tally["deferral_lines"]:  # every look counts: at least one per deferred one
        found.append(("health", f"{counted} deferrals counted, {tally['deferral_lines']} deferred"))
    pending = tally["due_deferred"] + tally["not_due"]
    got = (monitor.get("predictions"), monitor.get("predictions_deferred"))
    if got != (pending, tally["due_deferred"]):
        found.append(
            (
                "health",
                f"/health predictions, deferred {got}, expected {pending, tally['due_deferred']}",
            )
        )
    return found


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
    outcome: Outcome,
    plans: list[PredictionPlan],
) -> dict[str, Any]:
    """One run's figures and correctness checks (JSON-ready)."""
    playback = m.playback
    events = ctx.recording.events * spec.repeat
    assert playback.first_byte_at is not None
    notified = {int(payload): t for t, channel, payload in received if channel == TRIGGERS}
    elapsed = m.read_at - playback.first_byte_at
    window = m.quiet_at - playback.first_byte_at
    triggers = outcome.triggers
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
        "reload_notifications": sum(
            1 for t, c, _ in received if c in RELOAD_CHANNELS and t <= m.quiet_at
        ),
        "tpsl": _tpsl_outcome(spec.rules, triggers, playback, notified, m.decided_at),
        "predictions": _prediction_outcome(plans, outcome, m, ctx.facts),
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
    """
    Serve the sender and run ``specs`` in order (each within 600 s); returns each run's
    summary.
    """
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
    """The results document (JSON-ready): figures with units, correctness per run."""
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
    """The results table and the correctness lines, as Markdown."""
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
    lines += ["", "Correctness (exact, against expectations computed from the recording):", ""]
    for name, check in doc["correctness"].items():
        lines.append(f"* {correctness_line(name, check)}")
    return "\n".join(lines) + "\n"


def correctness_line(name: str, check: dict[str, Any]) -> str:
    """One run's correctness: TP/SL, predictions, the daemon's exit and settling."""
    tpsl, pred = check["tpsl"], check["predictions"]
    counts = tpsl["counts"]
    text = (
        f"{name}: TP/SL {tpsl['fired_once']:,}/{tpsl['expected']:,} crossed rules fired exactly "
        f"once; missing {counts['missing']}, duplicates {counts['duplicates']}, unexpected "
        f"{counts['unexpected']}, wrong kind/price {counts['wrong_kind_or_price']}, triggers "
        f"without NOTIFY {counts['without_notify']}; "
    )
    if pred["loaded"]:
        want, ok, lines = pred["expected"], pred["as_expected"], pred["deferral_lines"]
        text += (
            f"predictions: {ok['due_decided']}/{want['due_decided']} due decided as expected, "
            f"{ok['due_deferred']}/{want['due_deferred']} due and deferred as expected (no ask), "
            f"{ok['not_due']}/{want['not_due']} not yet due pending as expected, "
            f"prediction_deferred lines {lines['ok']}/{lines['expected']}, "
            f"{pred['differences']} differences"
        )
    else:
        text += "predictions: none loaded"
    return text + f"; settled {check['settled']}; exit {check['exit_code']}"


def failures(doc: dict[str, Any]) -> list[str]:
    """What makes the benchmark fail: any difference, an unsettled run, a non-zero exit."""
    found = []
    for name, check in doc["correctness"].items():
        if check["tpsl"]["differences"]:
            found.append(f"{name}: TP/SL {check['tpsl']['counts']}")
        if check["predictions"]["differences"]:
            sample = "; ".join(check["predictions"]["difference_sample"][:10])
            found.append(f"{name}: predictions {check['predictions']['counts']}: {sample}")
        if not check["settled"] or check["exit_code"] != 0:
            found.append(f"{name}: settled {check['settled']}, exit {check['exit_code']}")
    return found


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
    """
    Run the benchmark; writes the results. Returns 1 when any run has a difference (see
    :func:`failures`), else 0.
    """
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
        facts = AskFacts.of(recording, markets)
        ctx = Context(dsn, recording, facts, markets, Sender(), log_dir, args.profile, args.seed)
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
    problems = failures(doc)
    for problem in problems:
        print(f"FAILED {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

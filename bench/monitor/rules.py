"""
The monitor benchmark's positions: 100,000 with a take-profit and a stop-loss
price, a chosen few crossed by the recorded best bid, and the first crossing
each must fire (computed here from the recording's bid paths).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from decimal import Decimal

import attrs

from bench.harness import Market
from bench.monitor.recording import BidPath, Kind, Recording

TICK = Decimal("0.0001")
PLAIN_ENTRY_PRICES = (Decimal("0.30"), Decimal("0.60"))  # two rule-less positions per asset


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
    owners = [owner for m in markets for owner in m.owners]
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
    for market, outcome, token in (owner for m in markets for owner in m.owners):
        for entry in PLAIN_ENTRY_PRICES:
            row_id = first_id + len(rows)
            rows.append((row_id, "bench", market, outcome, token, Decimal(100), entry, None, None))
    return rows

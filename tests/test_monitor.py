"""
The monitor's logic under ``MockClock``: timing modes decide in the right
virtual second, edge predictions on the first qualifying tick, windows
closed early are skipped with their reason, and nothing fires twice.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
import trio
import trio.testing

from polystream.book import TopOfBook
from polystream.monitor import Decision, Monitor, Prediction, RuleSet, TpSlRule, decision_time
from polystream.stats import Stats

D = Decimal


@pytest.fixture
def autojump_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


def top(asset: str, bid: str | None, ask: str | None) -> TopOfBook:
    return TopOfBook(
        asset_id=asset,
        best_bid=None if bid is None else D(bid),
        best_ask=None if ask is None else D(ask),
        last_trade_price=None,
        tick_size=D("0.01"),
        has_book=True,
        timestamp_ms=0,
    )


def monitor(decisions: list[Decision]) -> Monitor:
    return Monitor(decisions.append, Stats(), clock=trio.current_time)


def prediction(pid: int, timing: str, **kw: object) -> Prediction:
    fields: dict[str, object] = {
        "id": pid,
        "asset_id": "a",
        "stake_usdc": D("10"),
        "limit_price": D("0.60"),
        "opens_at": 100.0,
        "closes_at": 200.0,
        "timing": timing,
    }
    fields.update(kw)
    return Prediction(**fields)  # type: ignore[arg-type]


def test_decision_times() -> None:
    assert decision_time(prediction(1, "from_start", delay_s=15)) == 115
    assert decision_time(prediction(1, "from_end", delay_s=15)) == 185
    assert decision_time(prediction(1, "percentage", fraction=0.25)) == 125
    assert decision_time(prediction(1, "edge", delay_s=30)) == 170
    assert decision_time(prediction(1, "from_start", delay_s=500)) == 200  # clamped


@pytest.mark.parametrize(
    ("timing", "extra", "at"),
    [
        ("from_start", {"delay_s": 15.0}, 115.0),
        ("from_end", {"delay_s": 15.0}, 185.0),
        ("percentage", {"fraction": 0.3}, 130.0),
    ],
)
async def test_each_timing_mode_decides_at_its_second(
    autojump_clock: trio.testing.MockClock, timing: str, extra: dict[str, float], at: float
) -> None:
    decisions: list[Decision] = []
    mon = monitor(decisions)
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        mon.on_price("a", top("a", "0.50", "0.55"))
        mon.add_prediction(prediction(7, timing, **extra))
        await trio.sleep(at - 0.001)
        assert decisions == []
        await trio.sleep(0.002)
        assert len(decisions) == 1
        (decision,) = decisions
        assert decision.decided_at == at
        assert (decision.kind, decision.reason, decision.price) == ("prediction", timing, D("0.55"))
        assert decision.dedupe_key == "prediction:7"
        await trio.sleep(500)
        assert len(decisions) == 1
        nursery.cancel_scope.cancel()


async def test_edge_decides_on_first_qualifying_tick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    decisions: list[Decision] = []
    mon = monitor(decisions)
    p = prediction(3, "edge", forecast_probability=D("0.70"), min_edge=D("0.10"), delay_s=20.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        mon.add_prediction(p)
        mon.on_price("a", top("a", "0.50", "0.55"))  # edge 0.15, but the window is not open
        await trio.sleep(120)
        mon.on_price("a", top("a", "0.60", "0.61"))  # edge 0.09: not enough
        await trio.sleep(7.5)
        assert decisions == []
        mon.on_price("a", top("a", "0.59", "0.60"))  # edge 0.10: first qualifying tick
        assert [(d.kind, d.reason, d.price, d.decided_at) for d in decisions] == [
            ("prediction", "edge", D("0.60"), 127.5)
        ]
        mon.on_price("a", top("a", "0.40", "0.45"))
        await trio.sleep(200)
        assert len(decisions) == 1
        nursery.cancel_scope.cancel()


async def test_edge_never_seen_is_skipped_no_edge(autojump_clock: trio.testing.MockClock) -> None:
    decisions: list[Decision] = []
    mon = monitor(decisions)
    p = prediction(4, "edge", forecast_probability=D("0.50"), min_edge=D("0.05"), delay_s=20.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        mon.add_prediction(p)
        await trio.sleep(150)
        mon.on_price("a", top("a", "0.50", "0.52"))
        await trio.sleep(100)
        assert [(d.kind, d.reason, d.decided_at) for d in decisions] == [
            ("prediction_skipped", "no_edge", 180.0)
        ]
        nursery.cancel_scope.cancel()


async def test_window_closed_early_is_skipped(autojump_clock: trio.testing.MockClock) -> None:
    decisions: list[Decision] = []
    mon = monitor(decisions)
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        mon.on_price("a", top("a", "0.50", "0.55"))
        mon.add_prediction(prediction(5, "from_end", delay_s=10.0))
        await trio.sleep(150)
        # The moderator closed the window at 140: the reload brings the new close.
        mon.replace_all(
            RuleSet(predictions=[prediction(5, "from_end", delay_s=10.0, closes_at=140.0)])
        )
        await trio.sleep(1)
        assert [(d.kind, d.reason, d.decided_at) for d in decisions] == [
            ("prediction_skipped", "window_closed", 150.0)
        ]
        nursery.cancel_scope.cancel()


async def test_price_checks_at_decision_time(autojump_clock: trio.testing.MockClock) -> None:
    decisions: list[Decision] = []
    mon = monitor(decisions)
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        mon.add_prediction(prediction(8, "from_start", delay_s=1.0, asset_id="b"))  # no price
        mon.add_prediction(prediction(11, "from_start", delay_s=1.0, asset_id="d"))  # no price yet
        mon.on_price("c", top("c", "0.70", "0.75"))
        mon.add_prediction(prediction(9, "from_start", delay_s=2.0, asset_id="c"))  # above limit
        await trio.sleep(103)
        assert [(d.prediction_id, d.reason) for d in decisions] == [(9, "price_above_limit")]
        mon.on_price("d", top("d", "0.50", "0.55"))  # the quote arrives: decided at the retry
        await trio.sleep(5)
        assert [(d.prediction_id, d.reason, d.decided_at) for d in decisions][1:] == [
            (11, "from_start", 106.0)
        ]
        await trio.sleep(100)  # no quote ever for "b": skipped before the window closes
        assert [(d.prediction_id, d.reason) for d in decisions][2:] == [(8, "no_price")]
        assert 195 <= decisions[2].decided_at < 200
        nursery.cancel_scope.cancel()


async def test_cancelled_prediction_never_decides(autojump_clock: trio.testing.MockClock) -> None:
    decisions: list[Decision] = []
    mon = monitor(decisions)
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        mon.add_prediction(prediction(10, "from_end"))
        await trio.sleep(50)
        mon.replace_all(RuleSet())  # cancelled in the database
        await trio.sleep(500)
        assert decisions == []
        assert mon.next_decision_at() is None
        nursery.cancel_scope.cancel()


def test_tpsl_fires_crossed_rules_once() -> None:
    decisions: list[Decision] = []
    mon = Monitor(decisions.append, Stats())
    for pid, kind, level in [
        (1, "take_profit", "0.60"),
        (2, "take_profit", "0.70"),
        (3, "stop_loss", "0.40"),
        (4, "stop_loss", "0.30"),
        (1, "stop_loss", "0.35"),
    ]:
        mon.add_rule(TpSlRule(pid, "a", kind, D(level)))  # type: ignore[arg-type]
    mon.on_price("a", top("a", "0.55", "0.56"))
    assert decisions == []
    mon.on_price("a", top("a", "0.65", "0.66"))
    assert [(d.position_id, d.kind, d.price) for d in decisions] == [(1, "take_profit", D("0.65"))]
    mon.on_price("a", top("a", "0.66", "0.67"))
    mon.on_price("a", top("a", "0.30", "0.31"))  # position 1's SL is gone with its TP
    assert [(d.position_id, d.kind) for d in decisions] == [
        (1, "take_profit"),
        (3, "stop_loss"),
        (4, "stop_loss"),
    ]
    # A reload bringing the same rules back (row not yet seen as closing) fires nothing.
    mon.replace_all(
        RuleSet(
            tpsl=[
                TpSlRule(1, "a", "take_profit", D("0.60")),
                TpSlRule(2, "a", "take_profit", D("0.70")),
            ]
        )
    )
    mon.on_price("a", top("a", "0.99", "1"))
    assert [(d.position_id, d.kind) for d in decisions][-1] == (2, "take_profit")
    assert len(decisions) == 4


def test_tick_touches_only_crossed_rules() -> None:
    decisions: list[Decision] = []
    mon = Monitor(decisions.append, Stats())
    for n in range(100_000):  # TP thresholds 0.5001 .. 1.0000, 20 rules at each level
        mon.add_rule(TpSlRule(n, "a", "take_profit", D("0.5") + D(n % 5000 + 1) / 10_000))
    mon.on_price("a", top("a", "0.5003", "0.5004"))
    assert len(decisions) == 3 * 20  # levels 0.5001, 0.5002, 0.5003
    assert {d.price for d in decisions} == {D("0.5003")}
    assert mon.rule_count == 100_000 - 60
    mon.on_price("a", top("a", "0.5003", "0.5004"))
    assert len(decisions) == 60


def test_no_price_no_trigger() -> None:
    decisions: list[Decision] = []
    mon = Monitor(decisions.append, Stats())
    mon.add_rule(TpSlRule(1, "a", "stop_loss", D("0.40")))
    mon.on_price("a", top("a", None, "0.10"))  # empty bid side: best_bid unknown
    assert decisions == []
    mon.on_price("a", top("a", "0.39", "0.41"))
    assert [d.position_id for d in decisions] == [1]

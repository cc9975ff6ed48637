"""
The monitor's logic under ``MockClock``: timing modes decide in the right
virtual second, edge predictions on the first qualifying tick, windows
closed early are skipped with their reason, due predictions without a quote
are deferred visibly (log line, counts) until an ask arrives or the window
closes, and nothing fires twice.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from decimal import Decimal
from typing import Any

import pytest
import structlog.testing
import trio
import trio.testing
from prometheus_client import generate_latest

from polystream.book import TopOfBook
from polystream.monitor.engine import (
    CROSSED_PER_TICK,
    DEFERRAL_REASONS,
    DEFERRED_PER_TICK,
    NO_PRICE_RETRY,
    Monitor,
)
from polystream.monitor.rules import Decision, Prediction, RuleSet, TpSlRule, decision_time
from polystream.ops.metrics import registry_of
from polystream.ops.status import render_health
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


async def test_a_prediction_served_elsewhere_is_left_to_its_owner_until_it_comes_here(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A cluster: a due prediction of an asset another daemon serves is not skipped here."""
    decisions: list[Decision] = []
    mon = monitor(decisions)
    served: set[str] = set()
    mon.serves = served.__contains__
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        mon.add_prediction(prediction(8, "from_start", delay_s=15.0))
        await trio.sleep(130)  # due at 115: its asset is served elsewhere
        assert decisions == []
        mon.ownership_changed()  # nothing changed for it
        await trio.sleep(1)
        assert decisions == []
        served.add("a")
        mon.on_price("a", top("a", "0.50", "0.55"))
        mon.ownership_changed()  # its partition came here: decided at once
        await trio.sleep(0.001)
        assert [(d.dedupe_key, d.kind, d.price) for d in decisions] == [
            ("prediction:8", "prediction", D("0.55"))
        ]
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


async def test_a_tick_decides_exactly_the_edge_predictions_its_ask_gives_their_edge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Edge predictions are looked up by the highest ask with their edge: same decisions."""
    decisions: list[Decision] = []
    mon = monitor(decisions)
    forecasts = {10 + i: D("0.40") + D("0.05") * i for i in range(8)}  # 0.40 .. 0.75
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        for pid, forecast in forecasts.items():
            mon.add_prediction(
                prediction(pid, "edge", forecast_probability=forecast, min_edge=D("0.10"))
            )
        mon.add_prediction(prediction(30, "edge", forecast_probability=None, delay_s=20.0))
        # Replaced with a lower forecast: looked up by the new one only.
        mon.add_prediction(prediction(17, "edge", forecast_probability=D("0.45")))
        mon.remove_prediction(16)  # 0.70: gone, never decided
        await trio.sleep(120)
        mon.on_price("a", top("a", "0.50", "0.55"))  # edge for forecasts >= 0.65
        assert sorted(d.dedupe_key for d in decisions) == ["prediction:15"]
        mon.on_price("a", top("a", "0.30", "0.35"))  # edge for forecasts >= 0.45
        assert sorted(d.dedupe_key for d in decisions) == [
            f"prediction:{pid}" for pid in (11, 12, 13, 14, 15, 17)
        ]
        assert all(d.reason == "edge" for d in decisions)
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


@pytest.mark.parametrize(("late", "reason"), [(0.3, "from_end"), (1.5, "window_closed")])
async def test_due_at_the_close_and_woken_a_little_late(
    autojump_clock: trio.testing.MockClock, late: float, reason: str
) -> None:
    """``from_end`` with ``delay_s`` 0 is due exactly at the close; a timer a moment late still decides."""
    decisions: list[Decision] = []
    mon = monitor(decisions)
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        mon.on_price("a", top("a", "0.50", "0.55"))
        await trio.sleep(200 + late)  # the deadline task runs now, ``late`` s after the close
        mon.add_prediction(prediction(9, "from_end", delay_s=0.0))
        await trio.testing.wait_all_tasks_blocked()
        assert [(d.kind, d.reason) for d in decisions] == [
            ("prediction" if reason == "from_end" else "prediction_skipped", reason)
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
        mon.on_price("d", top("d", "0.50", "0.55"))  # the quote arrives: decided with it
        assert [(d.prediction_id, d.reason, d.price, d.decided_at) for d in decisions][1:] == [
            (11, "from_start", D("0.55"), 103.0)
        ]
        await trio.sleep(100)  # no quote ever for "b": skipped when the window closes
        assert [(d.prediction_id, d.reason, d.price, d.decided_at) for d in decisions][2:] == [
            (8, "no_price", None, 200.0)
        ]
        nursery.cancel_scope.cancel()


def _events(logs: list[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == event]


async def test_due_without_quote_is_deferred_then_decided_when_an_ask_arrives(
    autojump_clock: trio.testing.MockClock,
) -> None:
    decisions: list[Decision] = []
    mon = monitor(decisions)
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(mon.run)
            mon.add_prediction(prediction(21, "from_start", delay_s=1.0, asset_id="d"))
            await trio.sleep(101.5)
            assert decisions == []
            assert _events(logs, "prediction_deferred") == [
                {
                    "event": "prediction_deferred",
                    "log_level": "info",
                    "prediction_id": 21,
                    "asset_id": "d",
                    "reason": "no_price",
                    "retry_in_s": NO_PRICE_RETRY,
                    "due_at": 101.0,
                    "closes_at": 200.0,
                }
            ]
            assert (mon.deferred_count, mon.stats.predictions_deferred) == (1, 1)
            assert mon.stats.prediction_deferrals == {"no_price": 1}
            await trio.sleep(10)  # looked at again at 106 and 111: counted, not logged
            assert mon.stats.prediction_deferrals == {"no_price": 3}
            assert len(_events(logs, "prediction_deferred")) == 1
            mon.on_price("d", top("d", "0.50", None))  # a bid only: still no ask
            assert decisions == []
            mon.on_price("d", top("d", "0.50", "0.55"))  # decided at once, with that ask
            assert [(d.kind, d.reason, d.price, d.decided_at) for d in decisions] == [
                ("prediction", "from_start", D("0.55"), 111.5)
            ]
            assert (mon.deferred_count, mon.stats.predictions_deferred) == (0, 0)
            (ended,) = _events(logs, "prediction_deferral_ended")
            assert (ended["prediction_id"], ended["reason"]) == (21, "from_start")
            assert (ended["checks"], ended["deferred_s"]) == (3, 10.5)
            await trio.sleep(200)
            assert len(decisions) == 1
            assert mon.stats.prediction_deferrals == {"no_price": 3}
            nursery.cancel_scope.cancel()


async def test_many_deferred_predictions_are_decided_a_few_inline_the_rest_by_the_task(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """
    A hundred predictions due before their asset's first quote: the tick that
    brings the ask decides DEFERRED_PER_TICK of them in the router's step, the
    deadline task the rest right after (in slices), each once, on that ask.
    """
    decisions: list[Decision] = []
    mon = monitor(decisions)
    count = 3 * DEFERRED_PER_TICK + 5
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        for pid in range(1, count + 1):
            mon.add_prediction(prediction(pid, "from_start", delay_s=1.0, asset_id="f"))
        await trio.sleep(102)
        assert decisions == [] and mon.deferred_count == count
        mon.on_price("f", top("f", "0.50", "0.55"))
        assert len(decisions) == DEFERRED_PER_TICK  # inline, in the caller's step
        await trio.testing.wait_all_tasks_blocked()
        assert sorted(d.prediction_id or 0 for d in decisions) == list(range(1, count + 1))
        assert {(d.kind, d.price) for d in decisions} == {("prediction", D("0.55"))}
        assert (mon.deferred_count, mon.stats.predictions_deferred) == (0, 0)
        await trio.sleep(200)
        assert len(decisions) == count
        nursery.cancel_scope.cancel()


async def test_deferred_prediction_is_skipped_no_price_when_the_window_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    decisions: list[Decision] = []
    mon = monitor(decisions)
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(mon.run)
            p = prediction(22, "from_end", delay_s=12.0, limit_price=D("0.40"))
            mon.add_prediction(p)
            await trio.sleep(195)
            assert decisions == []
            assert mon.stats.predictions_deferred == 1
            # An unchanged row on a full reload keeps the deferral as it is.
            mon.replace_all(RuleSet(predictions=[p]))
            await trio.sleep(10)
            assert [(d.kind, d.reason, d.price, d.decided_at) for d in decisions] == [
                ("prediction_skipped", "no_price", None, 200.0)
            ]
            # looked at 188, 193, 198 (no price), then at the close, 200: skipped
            assert mon.stats.prediction_deferrals == {"no_price": 3}
            assert mon.stats.predictions_deferred == 0
            assert [e["retry_in_s"] for e in _events(logs, "prediction_deferred")] == [5.0]
            (ended,) = _events(logs, "prediction_deferral_ended")
            assert (ended["reason"], ended["checks"], ended["deferred_s"]) == ("no_price", 3, 12.0)
            nursery.cancel_scope.cancel()


async def test_deferred_prediction_with_an_ask_above_its_limit_is_skipped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    decisions: list[Decision] = []
    mon = monitor(decisions)
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        mon.add_prediction(prediction(23, "percentage", fraction=0.5, asset_id="e"))
        await trio.sleep(160)
        mon.on_price("e", top("e", "0.70", "0.75"))
        assert [(d.reason, d.price, d.decided_at) for d in decisions] == [
            ("price_above_limit", D("0.75"), 160.0)
        ]
        assert mon.stats.predictions_deferred == 0
        nursery.cancel_scope.cancel()


async def test_edge_without_quote_at_its_deadline_is_skipped_not_deferred(
    autojump_clock: trio.testing.MockClock,
) -> None:
    decisions: list[Decision] = []
    mon = monitor(decisions)
    p = prediction(24, "edge", forecast_probability=D("0.90"), min_edge=D("0.05"), delay_s=20.0)
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(mon.run)
            mon.add_prediction(p)
            await trio.sleep(181)
            assert [(d.kind, d.reason, d.price, d.decided_at) for d in decisions] == [
                ("prediction_skipped", "no_edge", None, 180.0)
            ]
            mon.on_price("a", top("a", "0.40", "0.45"))  # an edge after the deadline: too late
            assert len(decisions) == 1
            nursery.cancel_scope.cancel()
    assert _events(logs, "prediction_deferred") == []
    assert mon.stats.prediction_deferrals == {"no_price": 0}


async def test_reload_before_the_write_commits_does_not_bring_a_decision_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    decisions: list[Decision] = []
    mon = monitor(decisions)
    with structlog.testing.capture_logs() as logs:
        async with trio.open_nursery() as nursery:
            await nursery.start(mon.run)
            mon.add_prediction(prediction(25, "from_start", delay_s=1.0))
            await trio.sleep(102)
            mon.on_price("a", top("a", "0.50", "0.55"))
            assert [d.prediction_id for d in decisions] == [25]
            # The row still reads 'pending' (the executor has not written it yet).
            mon.replace_all(RuleSet(predictions=[prediction(25, "from_start", delay_s=1.0)]))
            mon.on_price("a", top("a", None, None))
            await trio.sleep(20)
            assert [d.prediction_id for d in decisions] == [25]
            assert mon.next_decision_at() is None
            nursery.cancel_scope.cancel()
    assert len(_events(logs, "prediction_deferred")) == 1
    assert mon.stats.predictions_deferred == 0


async def test_deferrals_in_health_metrics_and_status(
    autojump_clock: trio.testing.MockClock,
) -> None:
    decisions: list[Decision] = []
    mon = monitor(decisions)
    stats = mon.stats
    assert set(stats.prediction_deferrals) == set(DEFERRAL_REASONS)
    text = generate_latest(registry_of(stats)).decode()
    assert "polystream_predictions_deferred 0.0" in text
    assert 'polystream_prediction_deferrals_total{reason="no_price"} 0.0' in text
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        mon.add_prediction(prediction(26, "from_start", delay_s=1.0, asset_id="z"))
        mon.add_prediction(prediction(27, "from_start", delay_s=2.0, asset_id="z"))
        await trio.sleep(103)
        nursery.cancel_scope.cancel()
    health = stats.health()["monitor"]
    assert (health["predictions_deferred"], health["prediction_deferrals"]) == (2, {"no_price": 2})
    text = generate_latest(registry_of(stats)).decode()
    assert "polystream_predictions_deferred 2.0" in text
    assert 'polystream_prediction_deferrals_total{reason="no_price"} 2.0' in text
    rendered = render_health({"status": "ok", "monitor": health})
    assert "2 due but deferred; deferrals: no_price 2" in rendered


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


async def test_tick_touches_only_crossed_rules_and_fires_a_burst_in_slices(
    autojump_clock: trio.testing.MockClock,
) -> None:
    decisions: list[Decision] = []
    mon = Monitor(decisions.append, Stats())
    for n in range(100_000):  # TP thresholds 0.5001 .. 1.0000, 20 rules at each level
        mon.add_rule(TpSlRule(n, "a", "take_profit", D("0.5") + D(n % 5000 + 1) / 10_000))
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        mon.on_price("a", top("a", "0.5003", "0.5004"))
        assert len(decisions) == CROSSED_PER_TICK  # inline, in the router's step
        assert mon.rule_count == 100_000 - 60  # every crossed rule is taken at once
        await trio.testing.wait_all_tasks_blocked()
        assert len(decisions) == 3 * 20  # levels 0.5001, 0.5002, 0.5003: the rest by the task
        assert {d.price for d in decisions} == {D("0.5003")}
        assert len({d.dedupe_key for d in decisions}) == 60
        mon.on_price("a", top("a", "0.5003", "0.5004"))
        await trio.testing.wait_all_tasks_blocked()
        assert len(decisions) == 60
        nursery.cancel_scope.cancel()


async def test_a_burst_left_to_the_task_is_fired_when_the_monitor_stops() -> None:
    decisions: list[Decision] = []
    mon = Monitor(decisions.append, Stats())
    for n in range(40):
        mon.add_rule(TpSlRule(n, "a", "stop_loss", D("0.40")))
    async with trio.open_nursery() as nursery:
        await nursery.start(mon.run)
        mon.on_price("a", top("a", "0.39", "0.41"))
        nursery.cancel_scope.cancel()  # before the task ran: the rest fire on the way out
    assert sorted(d.position_id or 0 for d in decisions) == list(range(40))


def test_no_price_no_trigger() -> None:
    decisions: list[Decision] = []
    mon = Monitor(decisions.append, Stats())
    mon.add_rule(TpSlRule(1, "a", "stop_loss", D("0.40")))
    mon.on_price("a", top("a", None, "0.10"))  # empty bid side: best_bid unknown
    assert decisions == []
    mon.on_price("a", top("a", "0.39", "0.41"))
    assert [d.position_id for d in decisions] == [1]

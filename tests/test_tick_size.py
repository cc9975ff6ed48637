"""
A real tick size change near resolution, as the venue does it (docs/protocol.md,
"What the venue really does"): ``tick_size_change`` when a price passes 0.96 /
0.04, and never a fresh ``book`` after it. The replay server's tick-size mode
plays ``examples/updown-2025-12-11`` that way (SOL Up's best bid reaches 0.97 at
frame 14,054) and answers CLOB REST (``POST /books``) from its tape.

The daemon must keep quoting through the change from the venue's per-entry
best bid/ask: take-profits above 0.96 and a stop-loss below 0.04 fire at the
first qualifying event after the change, at the right price (computed from the
recording, independently of the daemon); it fetches the books over REST and
ends with the undisturbed final state. Real PostgreSQL, loopback WebSocket and
HTTP.
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import psycopg
import trio
from expected import (
    UPDOWN,
    best_bid_frames,
    expected_assets,
    insert_position,
    mismatches,
)

from polystream.app import App, run
from polystream.config import (
    Config,
    FeedConfig,
    HealthConfig,
    PipelineConfig,
    PollConfig,
    ResyncConfig,
)
from polystream.replay import Capture, ReplayServer, ScheduledFault, Tape
from polystream.store.markets import import_markets_file

SOL = "900003"
RULES = [  # (outcome, kind, level): every first crossing comes after the tick change
    ("Up", "take_profit", "0.97"),  # crossed by the very frame the change precedes
    ("Up", "take_profit", "0.99"),
    ("Down", "stop_loss", "0.01"),
]
TIMEOUT = 120  # a guard against a hang, not a timing assertion
HOLD_AT = 14_040  # frames: at maximum speed up to here, then paced through the change
PACE = 10.0  # times the recorded speed: the last 63 recorded seconds in about 6 s


def first_crossing_after(
    path: list[tuple[int, Decimal | None]], frame: int, kind: str, level: Decimal
) -> tuple[int, Decimal]:
    """The first (frame, best bid) at or after ``frame`` that crosses ``level``."""
    for number, bid in path:
        crossed = bid is not None and (bid >= level if kind == "take_profit" else bid <= level)
        if number >= frame and crossed:
            assert bid is not None
            return number, bid
    raise AssertionError(f"no crossing of {level} after frame {frame}")


async def test_rules_near_resolution_fire_through_a_tick_size_change(db_dsn: str) -> None:
    bids = best_bid_frames()
    with psycopg.connect(db_dsn) as conn:
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
        rules = {}
        for outcome, rule_kind, text in RULES:
            position_id, token = insert_position(
                conn,
                SOL,
                outcome,
                "10",
                "0.5",
                take_profit=text if rule_kind == "take_profit" else None,
                stop_loss=text if rule_kind == "stop_loss" else None,
            )
            rules[position_id] = (token, rule_kind, Decimal(text))
    server = ReplayServer(
        tape=Tape(Capture.load([Path(f"{UPDOWN}.jsonl.gz")])),
        max_speed=True,
        tick_changes=True,
        faults=(ScheduledFault("pause", after=HOLD_AT),),
    )
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await nursery.start(
                lambda task_status: server.serve(rest_port=0, task_status=task_status)
            )
            assert server.rest_url is not None
            config = Config(
                feed=FeedConfig(url=server.url),
                poll=PollConfig(url=server.rest_url),
                resync=ResyncConfig(min_interval=0.05),
                pipeline=PipelineConfig(market_flush_interval=0.05, debounce=0.1),
                health=HealthConfig(listen="127.0.0.1:0"),
            )
            app: App = await nursery.start(run, config, db_dsn)
            while not server.paused or app.stats.frames < server.stats.frames_sent:
                await trio.sleep(0.02)  # the daemon has caught up with the held tape
            # The venue is live: the daemon keeps up, a REST book is the present one.
            server.resume(speed=PACE)
            await server.finished.wait()
            expected = expected_assets(UPDOWN)
            while True:  # until the markets and positions rows are the final state
                seen = app.markets.batches.count
                if not await trio.to_thread.run_sync(mismatches, db_dsn, expected):
                    break
                with trio.move_on_after(0.1):  # a markets write, or a positions one meanwhile
                    await app.markets.batches.after(seen)
            while app.stats.triggers_written < len(rules):
                await trio.sleep(0.02)
            changes = {change.asset_id: change.frame for change in server.tick_change_log}
            resync = app.stats.health()["resync"]
            app.stop()
            nursery.cancel_scope.cancel()
    with psycopg.connect(db_dsn) as conn:
        fired = conn.execute("SELECT position_id, kind, price FROM triggers ORDER BY id").fetchall()
    want = {}
    for position_id, (token, kind, level) in rules.items():
        assert token in changes, "the replay made no tick size change for the rule's asset"
        _, price = first_crossing_after(bids[token], changes[token], kind, level)
        assert all(  # nothing crossed before the change: the rule fires after it or never
            bid is None or (bid < level if kind == "take_profit" else bid > level)
            for n, bid in bids[token]
            if n < changes[token]
        )
        want[position_id] = (kind, price)
    assert {pid: (kind, price) for pid, kind, price in fired} == want  # once each, right price
    assert resync["requested"].get("tick_size_change", 0) >= 2  # both SOL tokens
    assert resync["fetched"] >= 1 and resync["pending"] == 0
    asked = {
        item["token_id"]
        for request in server.rest_requests
        if request.path == "/books"
        for item in request.body
    }
    assert {rules_token for rules_token, _, _ in rules.values()} <= asked

"""
Closing orders on the CLOB (``execute.mode = "clob"``, polystream.monitor.orders)
on a real PostgreSQL and the fake CLOB (polystream.replay.orders) over real
HTTP on loopback: each TP/SL gives one signed order of the right side, size
and limit, recovered by the signature; two daemons give one order; a crash
after the send gives no second order after the restart; a venue that is down
is retried within bounds and reported; a dry run sends nothing; the cap
refuses; a refusal is recorded with its reason.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import ROUND_FLOOR, Decimal
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import psycopg
import pytest
import trio
from expected import UPDOWN, insert_position, insert_rules, replay_config, serve_updown

from polystream.app import App, run
from polystream.config import (
    ExecuteConfig,
    load_config,
)
from polystream.errors import ConfigError
from polystream.monitor.executor import write_decisions
from polystream.monitor.orders import ORDER_LOCK, OrderFacts, OrderPlacer, OrderPlan, plan_order
from polystream.monitor.rules import Decision
from polystream.replay import ReplayServer
from polystream.replay.orders import FakeClob, Outcome
from polystream.stats import Stats
from polystream.store.link import DbLink
from polystream.store.markets import import_markets_file
from polystream.venue.orders import TradingAccount, throwaway_account

D = Decimal
RULES = [  # (market id, outcome, kind, level): each crossed in the recording
    ("900003", "Up", "take_profit", "0.60"),
    ("900003", "Up", "stop_loss", "0.40"),
    ("900005", "Up", "take_profit", "0.60"),
    ("900005", "Down", "stop_loss", "0.40"),
]


@pytest.fixture
def account() -> TradingAccount:
    return throwaway_account()[0]


@pytest.fixture
async def fake(nursery: trio.Nursery, account: TradingAccount) -> FakeClob:
    clob = FakeClob.for_account(account.credentials, account.address)
    served: FakeClob = await nursery.start(clob.serve)
    return served


def _rows(dsn: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, args).fetchall()


def _limit(price: Decimal) -> Decimal:
    """The SELL limit: 0.02 under ``price``, down to the 0.01 tick, at least one tick."""
    tick = D("0.01")
    return max(((price - D("0.02")) / tick).to_integral_value(ROUND_FLOOR) * tick, tick)


def _posts(fake: FakeClob) -> list[Any]:
    return [r for r in fake.requests if r.method == "POST" and r.path == "/order"]


# ------------------------------------------------------------------ end to end


async def _run_daemons(
    dsn: str, fake: FakeClob, account: TradingAccount, count: int, **execute: Any
) -> list[App]:
    """``count`` daemons in clob mode over one max-speed replay, until every order settled."""
    async with trio.open_nursery() as nursery:
        server: ReplayServer = await serve_updown(nursery)
        execute_config = ExecuteConfig(mode="clob", clob_url=fake.url, **execute)
        config = replay_config(server.port, execute=execute_config)
        apps: list[App] = []
        for _ in range(count):
            apps.append(await nursery.start(partial(run, config, dsn, account=account)))
        await server.finished.wait()
        while _rows(dsn, "SELECT 1 FROM triggers WHERE status IN ('pending', 'signed')") or any(
            a.executor.pending or (a.placer and a.placer.pending) for a in apps
        ):
            await trio.sleep(0.05)
        for app in apps:
            app.stop()
        nursery.cancel_scope.cancel()
    return apps


async def test_each_tpsl_places_one_signed_closing_order_with_two_daemons(
    db_dsn: str, fake: FakeClob, account: TradingAccount
) -> None:
    with psycopg.connect(db_dsn) as conn:
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
        rules = insert_rules(conn, RULES, user="tpsl")
    assert all(crossing is not None for _, crossing in rules.values())

    with trio.fail_after(120):
        apps = await _run_daemons(db_dsn, fake, account, count=2, enabled=True)

    posts = _posts(fake)
    assert len(posts) == 4  # one per rule, although two daemons saw every crossing
    assert {p.signer for p in posts} == {account.address}  # recovered from the signature
    assert all(p.outcome == "fill" for p in posts)
    rows = _rows(
        db_dsn,
        "SELECT t.position_id, t.status, t.order_id, t.order_side, t.order_size, t.order_price,"
        " t.filled_size, t.attempts, p.status, t.price FROM triggers t"
        " JOIN positions p ON p.id = t.position_id",
    )
    assert len(rows) == 4
    for pid, status, order_id, side, size, limit, filled, attempts, position, price in rows:
        _, crossing = rules[pid]
        assert price == crossing
        assert (status, side, size, filled, attempts, position) == (
            "filled", "SELL", D("10"), D("10"), 1, "closed"
        )  # fmt: skip
        assert limit == _limit(crossing)
        order = fake.orders[order_id]  # the venue's id is the one stored before the send
        assert (order.side, order.original_size, order.price) == ("SELL", D("10"), limit)
        assert order.body["order"]["makerAmount"] == "10000000"  # 10 shares
        assert order.body["order"]["takerAmount"] == str(int(limit * 10 * 1_000_000))
    filled = sum(a.stats.orders["filled"] for a in apps if a.stats.orders is not None)
    assert filled == 4


async def test_a_crash_after_the_send_places_no_second_order(
    db_dsn: str, fake: FakeClob, account: TradingAccount
) -> None:
    with psycopg.connect(db_dsn) as conn:
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
        insert_rules(conn, RULES[:1])
    fake.script.append(Outcome.accept_then_drop())  # the venue fills it, the answer never comes
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server: ReplayServer = await serve_updown(nursery)
            execute = ExecuteConfig(mode="clob", clob_url=fake.url, enabled=True)
            config = replay_config(server.port, execute=execute)
            await nursery.start(partial(run, config, db_dsn, account=account))
            await fake.wait_requests(1, path="/order")
            nursery.cancel_scope.cancel()  # dies before it learns the answer
    ((status, order_id),) = _rows(db_dsn, "SELECT status, order_id FROM triggers")
    assert status == "signed" and order_id in fake.orders  # sent, not confirmed

    async with _placer(db_dsn, fake, account, enabled=True) as placer:  # the restarted daemon
        await placer.scan()
        await _settled(db_dsn, placer)
    assert _rows(db_dsn, "SELECT status, attempts, filled_size FROM triggers") == [
        ("filled", 0, D("10"))
    ]
    assert len(_posts(fake)) == 1  # asked, not sent again
    assert placer.outcomes["recovered"] == 1


# ------------------------------------------------------------------ one placer


@asynccontextmanager
async def _placer(
    dsn: str, fake: FakeClob, account: TradingAccount, **execute: Any
) -> AsyncIterator[OrderPlacer]:
    config = ExecuteConfig(mode="clob", clob_url=fake.url, **execute)
    link = DbLink(dsn=dsn, name="orders-test", stats=Stats())
    try:
        async with (
            httpx.AsyncClient(base_url=fake.url, timeout=config.request_timeout) as http,
            trio.open_nursery() as nursery,
        ):
            placer = OrderPlacer(config=config, link=link, http=http, signer=account, stats=Stats())
            await nursery.start(placer.run)
            yield placer
            nursery.cancel_scope.cancel()
    finally:
        link.close()


def _decide(dsn: str, *, size: str = "10", price: str = "0.70") -> int:
    """One position on 900003 Up and its take-profit trigger row (pending); the trigger id."""
    with psycopg.connect(dsn) as conn:
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
        pid, _ = insert_position(conn, "900003", "Up", size, "0.5", take_profit="0.65")
        decision = Decision("take_profit", f"position:{pid}:tp", D(price), "test", position_id=pid)
        (trigger_id,) = write_decisions(conn, [decision])
    assert trigger_id is not None
    return trigger_id


async def _settled(dsn: str, *placers: OrderPlacer) -> str:
    """
    The one trigger's status once settled, and ``placers`` done with it (what
    they count follows the row's commit: the test must not stop them before).
    """
    while True:
        ((status,),) = await trio.to_thread.run_sync(
            lambda: _rows(dsn, "SELECT status FROM triggers")
        )
        if status not in ("pending", "signed") and not any(p.pending for p in placers):
            return str(status)
        await trio.sleep(0.02)


async def test_two_placers_on_one_trigger_send_one_order(
    db_dsn: str, fake: FakeClob, account: TradingAccount
) -> None:
    trigger_id = _decide(db_dsn)
    fake.script.append(Outcome.live())
    async with (
        _placer(db_dsn, fake, account, enabled=True) as one,
        _placer(db_dsn, fake, account, enabled=True) as other,
    ):
        one.submit(trigger_id)
        other.submit(trigger_id)
        with trio.fail_after(30):
            assert await _settled(db_dsn, one, other) == "placed"
    assert len(_posts(fake)) == 1
    assert one.outcomes["placed"] + other.outcomes["placed"] == 1


async def test_orders_held_by_the_venue_do_not_hold_up_the_next_one(
    db_dsn: str, fake: FakeClob, account: TradingAccount
) -> None:
    """The placer's workers take orders in parallel: those waiting on the venue keep no other."""
    fake.script.extend([Outcome.timeout(), Outcome.timeout(), Outcome.fill()])  # two held open
    async with _placer(db_dsn, fake, account, enabled=True, request_timeout=60.0) as placer:
        for count in (1, 2, 3):  # each decided once the one before is held by the venue
            placer.submit(_decide(db_dsn))
            with trio.fail_after(10):
                await fake.wait_requests(count, path="/order")
        with trio.fail_after(10):
            while _rows(db_dsn, "SELECT status FROM triggers ORDER BY id")[-1] != ("filled",):
                await trio.sleep(0.02)
        assert _rows(db_dsn, "SELECT status FROM triggers ORDER BY id")[:2] == [("signed",)] * 2


async def test_a_placer_with_the_decisions_facts_and_one_reading_them_send_one_order(
    db_dsn: str, fake: FakeClob, account: TradingAccount
) -> None:
    """
    The executor's hand-off carries the order's facts (no read, the row is
    locked by the claim); a second placer reading them locks first: one order.
    """
    trigger_id = _decide(db_dsn)
    facts = OrderFacts(
        trigger_id, "take_profit", "pending", D("0.70"), _token(db_dsn, trigger_id), D("10"),
        None, None, D("0.01"), False,
    )  # fmt: skip
    fake.script.append(Outcome.live())
    async with (
        _placer(db_dsn, fake, account, enabled=True) as one,
        _placer(db_dsn, fake, account, enabled=True) as other,
    ):
        other.submit(trigger_id)
        one.submit(trigger_id, facts)
        with trio.fail_after(30):
            assert await _settled(db_dsn, one, other) == "placed"
    assert len(_posts(fake)) == 1
    assert one.outcomes["placed"] + other.outcomes["placed"] == 1
    (post,) = _posts(fake)
    assert post.body["order"]["makerAmount"] == "10000000"  # SELL 10 shares


def test_the_claim_locks_its_rows_and_leaves_one_held_elsewhere(db_dsn: str) -> None:
    """polystream_claim_orders (migration 0004): a row locked by another session is not claimed."""
    trigger_id = _decide(db_dsn)
    claim = (
        "SELECT trigger_id, status FROM polystream_claim_orders(%s, 'signed', %s, %s, %s, %s,"
        " %s, 1000, 'test', %s, %s)"
    )
    args = [[trigger_id], ["0xabc"], ['{"order": {}}'], ["SELL"], [D(10)], [D("0.68")]]
    locks = (
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s"
        " AND objid = %s AND pid = pg_backend_pid()"
    )
    with (
        psycopg.connect(db_dsn, autocommit=True) as other,
        psycopg.connect(db_dsn, autocommit=True) as conn,
    ):
        other.execute("SELECT pg_advisory_lock(%s, %s)", [ORDER_LOCK, trigger_id])
        assert conn.execute(claim, [*args, ORDER_LOCK, [trigger_id]]).fetchall() == []
        assert conn.execute(locks, [ORDER_LOCK, trigger_id]).fetchone() == (0,)
        other.execute("SELECT pg_advisory_unlock(%s, %s)", [ORDER_LOCK, trigger_id])
        rows = conn.execute(claim, [*args, ORDER_LOCK, [trigger_id]]).fetchall()
        assert rows == [(trigger_id, "signed")]
        assert conn.execute(locks, [ORDER_LOCK, trigger_id]).fetchone() == (1,)  # held on
        assert conn.execute(claim, [*args, ORDER_LOCK, []]).fetchall() == []  # claimed once


def _token(dsn: str, trigger_id: int) -> str:
    ((token,),) = _rows(
        dsn,
        "SELECT p.token_id FROM triggers t JOIN positions p ON p.id = t.position_id"
        " WHERE t.id = %s",
        trigger_id,
    )
    return str(token)


async def test_a_decision_left_pending_is_ordered_after_a_while_unless_it_is_stale(
    db_dsn: str, fake: FakeClob, account: TradingAccount
) -> None:
    """
    A pending row (a crash before the claim) is taken up once its decider had
    its time, never when older than execute.retry_window (e.g. an outbox row
    from before clob mode was enabled).
    """
    stale, left = _decide(db_dsn), _decide(db_dsn)
    _rows_changed(
        db_dsn, "UPDATE triggers SET created_at = now() - interval '1 hour' WHERE id = %s", stale
    )
    async with _placer(db_dsn, fake, account, enabled=True, retry_window=60.0) as placer:
        await placer.scan()
        assert placer.pending == 0  # the fresh one is its decider's for a while
        _rows_changed(
            db_dsn, "UPDATE triggers SET created_at = now() - interval '5 seconds' WHERE id = %s",
            left,
        )  # fmt: skip
        await placer.scan()
        with trio.fail_after(30):
            while _rows(db_dsn, "SELECT status FROM triggers WHERE id = %s", left) != [("filled",)]:
                await trio.sleep(0.02)
    assert _rows(db_dsn, "SELECT status FROM triggers WHERE id = %s", stale) == [("pending",)]
    assert len(_posts(fake)) == 1


def _rows_changed(dsn: str, statement: str, *args: Any) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(statement, args)


async def test_a_venue_that_is_down_is_retried_then_the_order_placed(
    db_dsn: str, fake: FakeClob, account: TradingAccount
) -> None:
    trigger_id = _decide(db_dsn)
    fake.script.extend([Outcome.unavailable(), Outcome.rate_limited(0.1), Outcome.fill()])
    async with _placer(db_dsn, fake, account, enabled=True) as placer:
        placer.submit(trigger_id)
        with trio.fail_after(30):
            assert await _settled(db_dsn, placer) == "filled"
    assert [p.status for p in _posts(fake)] == [503, 429, 200]
    assert _rows(db_dsn, "SELECT attempts, error FROM triggers") == [(3, None)]
    assert placer.outcomes["retried"] == 2 and placer.outcomes["rate_limited"] == 1
    assert len({p.order_id for p in _posts(fake) if p.order_id}) <= 1  # one order, never re-signed


async def test_a_venue_down_past_the_retry_window_fails_the_order_visibly(
    db_dsn: str, fake: FakeClob, account: TradingAccount
) -> None:
    trigger_id = _decide(db_dsn)
    fake.default = Outcome.unavailable()  # down for good
    async with _placer(db_dsn, fake, account, enabled=True, retry_window=1.0) as placer:
        placer.submit(trigger_id)
        with trio.fail_after(30):
            assert await _settled(db_dsn, placer) == "failed"
    ((attempts, error, position),) = _rows(
        db_dsn,
        "SELECT t.attempts, t.error, p.status FROM triggers t JOIN positions p"
        " ON p.id = t.position_id",
    )
    assert 1 <= attempts <= 10 and error.startswith("not confirmed: 503")
    assert position == "closing"  # never closed by a failed order
    assert placer.outcomes["failed"] == 1


async def test_a_refusal_of_the_venue_is_recorded_with_its_reason(
    db_dsn: str, fake: FakeClob, account: TradingAccount
) -> None:
    trigger_id = _decide(db_dsn)
    fake.script.append(Outcome.reject("not enough balance / allowance"))
    async with _placer(db_dsn, fake, account, enabled=True) as placer:
        placer.submit(trigger_id)
        with trio.fail_after(30):
            assert await _settled(db_dsn, placer) == "rejected"
    ((error,),) = _rows(db_dsn, "SELECT error FROM triggers")
    assert "not enough balance / allowance" in error
    assert placer.outcomes["rejected"] == 1 and len(_posts(fake)) == 1


async def test_a_dry_run_signs_and_stores_but_sends_nothing(
    db_dsn: str, fake: FakeClob, account: TradingAccount
) -> None:
    trigger_id = _decide(db_dsn)
    async with _placer(db_dsn, fake, account) as placer:  # execute.enabled defaults to false
        placer.submit(trigger_id)
        with trio.fail_after(30):
            assert await _settled(db_dsn, placer) == "dry_run"
    ((order_id, body, side, size, price),) = _rows(
        db_dsn, "SELECT order_id, order_body, order_side, order_size, order_price FROM triggers"
    )
    assert order_id.startswith("0x") and (side, size, price) == ("SELL", D("10"), D("0.68"))
    assert "owner" not in body  # the API key is not stored
    assert fake.requests == []


async def test_the_daily_cap_refuses_an_order_that_would_pass_it(
    db_dsn: str, fake: FakeClob, account: TradingAccount
) -> None:
    trigger_id = _decide(db_dsn, size="100")  # 100 shares at 0.68: 68 USDC
    async with _placer(db_dsn, fake, account, enabled=True, max_daily_notional=50.0) as placer:
        placer.submit(trigger_id)
        with trio.fail_after(30):
            assert await _settled(db_dsn, placer) == "refused"
    ((error,),) = _rows(db_dsn, "SELECT error FROM triggers")
    assert error.startswith("daily notional cap") and fake.requests == []


async def test_a_resting_order_is_followed_and_kept_alive_by_the_heartbeat(
    db_dsn: str, fake: FakeClob, account: TradingAccount
) -> None:
    trigger_id = _decide(db_dsn)
    fake.script.append(Outcome.live())
    async with _placer(db_dsn, fake, account, enabled=True) as placer:
        placer.submit(trigger_id)
        with trio.fail_after(30):
            assert await _settled(db_dsn, placer) == "placed"
        assert await placer.heartbeat() and await placer.heartbeat()  # chained ids
        ((order_id,),) = _rows(db_dsn, "SELECT order_id FROM triggers")
        fake.match(order_id)  # a counterparty takes the rest
        await placer.scan()
        with trio.fail_after(30):
            while _rows(db_dsn, "SELECT 1 FROM triggers WHERE status = 'filled'") == []:
                await trio.sleep(0.05)
    assert _rows(db_dsn, "SELECT status FROM positions") == [("closed",)]
    assert fake.counts["heartbeat"] >= 2 and placer.outcomes["heartbeats"] == 2


async def test_orders_go_out_no_faster_than_the_order_bucket(
    autojump_clock: trio.testing.MockClock, account: TradingAccount
) -> None:
    """execute.orders_per_second (protocol.md section 9): a burst of 1.5 s, then the rate."""
    config = ExecuteConfig(mode="clob", orders_per_second=10.0)
    async with httpx.AsyncClient() as http:
        placer = OrderPlacer(
            config=config, link=DbLink(dsn="unused", name="bucket"), http=http,
            signer=account, stats=Stats(),
        )  # fmt: skip
        start = trio.current_time()
        times = []
        for _ in range(25):
            await placer._take_token(1)
            times.append(trio.current_time() - start)
    assert times[:15] == [0.0] * 15  # the burst: capacity 1.5 s of the rate
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(times[15:])]
    assert times[15] == pytest.approx(0.1) and gaps == [0.1] * 9


# ------------------------------------------------------------------ planning, config


def _facts(**changes: Any) -> OrderFacts:
    base = OrderFacts(
        trigger_id=1, kind="take_profit", status="pending", price=D("0.655"), token_id="t",
        size=D("12.349"), stake=None, limit=None, tick=D("0.01"), neg_risk=False,
    )  # fmt: skip
    return attrs.evolve(base, **changes)


def test_a_close_sells_the_size_held_no_lower_than_the_slippage_allows() -> None:
    assert plan_order(_facts(), D("0.02")) == OrderPlan("SELL", D("12.34"), D("0.63"), D("0.01"))
    assert plan_order(_facts(price=D("0.015")), D("0.02")).price == D("0.01")  # type: ignore[union-attr]
    assert plan_order(_facts(tick=None), D("0.02")) == "no tick size for the market"
    assert plan_order(_facts(size=D("0.004")), D("0.02")) == "size rounds to 0 shares"


def test_a_prediction_buys_stake_over_limit_shares_at_its_limit() -> None:
    facts = _facts(kind="prediction", size=None, stake=D("25"), limit=D("0.333"))
    assert plan_order(facts, D("0.02")) == OrderPlan("BUY", D("75.75"), D("0.33"), D("0.01"))


def test_clob_mode_without_credentials_stops_with_the_names_only() -> None:
    config = load_config(None, {"POLYSTREAM_EXECUTE__MODE": "clob"})
    with pytest.raises(ConfigError, match="POLYMARKET_PRIVATE_KEY, POLYMARKET_API_KEY"):
        TradingAccount.from_environment({}, config.execute.signature_type)
    secret = "0x" + "11" * 32
    environ = {
        "POLYMARKET_PRIVATE_KEY": secret,
        "POLYMARKET_API_KEY": "key",
        "POLYMARKET_API_SECRET": "c2VjcmV0",
        "POLYMARKET_API_PASSPHRASE": "passphrase-value",
    }
    account = TradingAccount.from_environment(environ, "eoa")
    assert secret[2:] not in repr(account) and "passphrase-value" not in repr(account)
    with pytest.raises(ConfigError, match="POLYMARKET_FUNDER"):
        TradingAccount.from_environment(environ, "gnosis_safe")
    with pytest.raises(ConfigError) as bad:
        TradingAccount.from_environment(environ | {"POLYMARKET_PRIVATE_KEY": "0x12"}, "eoa")
    assert "0x12" not in str(bad.value)


async def test_replay_clob_port_serves_a_fake_clob_for_the_account_it_writes(
    db_dsn: str, tmp_path: Path
) -> None:
    """``polystream replay --clob-port --clob-env``: the demo's venue, end to end."""
    import subprocess
    import sys

    from cli_process import clean_env, free_port

    port, clob_port, env_file = free_port(), free_port(), tmp_path / "clob.env"
    command = [sys.executable, "-m", "polystream", "replay", f"{UPDOWN}.jsonl.gz"]
    command += ["--port", str(port), "--clob-port", str(clob_port), "--clob-env", str(env_file)]
    process = subprocess.Popen(command, env=clean_env(), stdout=subprocess.DEVNULL)
    try:
        with trio.fail_after(30):
            while not (env_file.exists() and env_file.read_text().count("\n") == 4):
                await trio.sleep(0.05)
        assert env_file.stat().st_mode & 0o777 == 0o600
        environ = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
        account = TradingAccount.from_environment(environ, "eoa")
        trigger_id = _decide(db_dsn)
        url = f"http://127.0.0.1:{clob_port}"
        fake = attrs.evolve(FakeClob.for_account(account.credentials, account.address), url=url)
        async with _placer(db_dsn, fake, account, enabled=True) as placer:
            placer.submit(trigger_id)
            with trio.fail_after(30):
                assert (
                    await _settled(db_dsn, placer) == "filled"
                )  # signed, checked and filled there
    finally:
        process.terminate()
        process.wait(10)


async def test_a_kill_9_after_the_send_places_no_second_order(
    db_dsn: str, nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Real processes: ``polystream run`` is killed (SIGKILL) while the venue
    holds the answer to the order it has already filled; a new process asks
    the venue, records the fill and sends nothing more.
    """
    import signal

    from polystream.ops.daemon import open_daemon

    account, environ = throwaway_account()
    for name, value in environ.items():  # what the children read: POLYMARKET_*
        monkeypatch.setenv(name, value)
    fake = FakeClob.for_account(account.credentials, account.address)
    fake = await nursery.start(fake.serve)
    with psycopg.connect(db_dsn) as conn:
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
        insert_rules(conn, RULES[:1])
    settings = {"execute__mode": "clob", "execute__enabled": "true", "execute__clob_url": fake.url}
    fake.script.append(Outcome.accept_then_drop())  # filled at the venue, the answer held
    with trio.fail_after(90):
        server: ReplayServer = await serve_updown(nursery)
        async with open_daemon(db_dsn, server.url, tmp_path / "1.log", settings=settings) as first:
            await first.wait_ready()
            await fake.wait_requests(1, path="/order")
            os.kill(first.pid, signal.SIGKILL)
            assert await first.stop() == -signal.SIGKILL
        ((status, order_id),) = _rows(db_dsn, "SELECT status, order_id FROM triggers")
        assert status == "signed" and order_id in fake.orders  # sent, never confirmed
        async with open_daemon(db_dsn, server.url, tmp_path / "2.log", settings=settings) as second:
            await second.wait_ready()
            assert await _settled(db_dsn) == "filled"
            assert await second.stop() == 0
    assert len(_posts(fake)) == 1  # asked, not sent again
    assert _rows(db_dsn, "SELECT attempts, filled_size FROM triggers") == [(0, D("10"))]
    assert b"order_filled" in (tmp_path / "2.log").read_bytes()

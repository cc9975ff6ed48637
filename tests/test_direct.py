"""
The trigger path's connection on the event loop (:class:`DirectLink`): opened
ahead of the first trigger, and a failure to open it is counted, not raised;
a statement sent at once by the deciding task and its answer read by any task
(the executor's prompt path), exactly once when the connection dies meanwhile.
Real PostgreSQL.
"""

from __future__ import annotations

import select
from decimal import Decimal
from functools import partial
from typing import Any

import psycopg
import trio
import trio.testing

from polystream.monitor.executor import TRIGGER_STATEMENTS, Executor, write_decisions_direct
from polystream.monitor.rules import Decision
from polystream.stats import Stats
from polystream.store.direct import DirectLink


def _backends(dsn: str, name: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [name]
        ).fetchone()
        assert row is not None
        return int(row[0])


async def test_warm_up_opens_the_connection_before_the_first_statement(db_dsn: str) -> None:
    link = DirectLink(dsn=db_dsn, name="warm-test", stats=Stats())
    try:
        assert _backends(db_dsn, "polystream-warm-test") == 0 and not link.connected
        await link.warm_up()
        assert _backends(db_dsn, "polystream-warm-test") == 1 and link.connected
        await link.warm_up()  # already open: nothing more
        assert await link.execute("SELECT $1::int + 1", [41]) == [("42",)]
        assert _backends(db_dsn, "polystream-warm-test") == 1
    finally:
        link.close()
    assert not link.connected


async def test_warm_up_against_a_database_that_is_down_is_counted_not_raised() -> None:
    stats = Stats()
    link = DirectLink(
        dsn="postgresql://nobody:hunter2@127.0.0.1:9/none?connect_timeout=2",
        name="warm-down",
        stats=stats,
    )
    await link.warm_up()
    assert stats.db_errors == 1 and not stats.db_connected and not link.connected
    assert stats.last_db_error is not None and "hunter2" not in stats.last_db_error


# ---------------------------------------------------------------- send now, read later


def _position(dsn: str, take_profit: str = "0.6") -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "INSERT INTO positions (user_id, market_id, token_id, size, entry_price,"
            " take_profit_price) VALUES ('u', 'm', 't', 1, 0.5, %s) RETURNING id",
            [take_profit],
        ).fetchone()
    assert row is not None
    return int(row[0])


def _take_profit(position_id: int) -> Decision:
    return Decision(
        "take_profit",
        f"position:{position_id}:take_profit:0.6",
        Decimal("0.61"),
        "best_bid_above",
        position_id=position_id,
    )


def _one(dsn: str, sql: str) -> Any:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(sql).fetchone()
    assert row is not None
    return row[0]


async def test_send_now_sends_without_waiting_and_any_task_reads_the_answer(db_dsn: str) -> None:
    link = DirectLink(dsn=db_dsn, name="send-now", stats=Stats())
    sql = "SELECT $1::int + 1"
    try:
        assert not link.send_now(sql, [1])  # not connected, not prepared: nothing sent
        await link.warm_up([sql])
        assert not link.send_now("SELECT 2", [])  # not prepared: use execute()
        assert link.send_now(sql, [41])
        assert link.in_flight
        assert not link.send_now(sql, [1])  # one statement at a time
        assert await link.finish() == [("42",)]
        assert not link.in_flight
        assert link.send_now(sql, [1])
        with trio.fail_after(10):
            while (rows := link.poll()) is None:  # never waits: the caller's own loop
                await trio.sleep(0.001)
        assert rows == [("2",)]
        assert await link.finish() is None  # nothing on the wire any more
        assert await link.execute(sql, [9]) == [("10",)]  # execute() after send_now
    finally:
        link.close()


async def test_finish_ends_when_another_task_takes_the_answer(db_dsn: str) -> None:
    link = DirectLink(dsn=db_dsn, name="send-now-two", stats=Stats())
    sql = "SELECT pg_sleep(0.2), $1::int"
    finished: list[Any] = []
    try:
        await link.warm_up([sql])
        assert link.send_now(sql, [7])
        async with trio.open_nursery() as nursery:

            async def wait_for_it() -> None:
                finished.append(await link.finish())

            nursery.start_soon(wait_for_it)
            await trio.testing.wait_all_tasks_blocked()  # the waiter sits on the socket
            # Wait for the answer outside trio (the waiter cannot run meanwhile), take it here.
            assert link._conn is not None
            assert select.select([link._conn.pgconn.socket], [], [], 10)[0]
            rows = None
            with trio.fail_after(10):
                while (rows := link.poll()) is None:
                    select.select([link._conn.pgconn.socket], [], [], 0.1)
        assert rows == [("", "7")]
        assert finished == [None]  # the waiter saw the answer taken, and returned
        assert not link.in_flight
    finally:
        link.close()


async def _decide_from_the_routers_task(executor: Executor, decision: Decision) -> None:
    """Submit, pump once (the statement leaves at once), then pump until it is answered."""
    executor.submit(decision)
    executor.pump()
    assert executor.link is not None and executor.link.in_flight and executor.pending == 1
    with trio.fail_after(10):
        while executor.pending:
            await trio.sleep(0.001)
            executor.pump()


async def test_a_decision_goes_out_from_the_deciding_task_without_the_executors(
    db_dsn: str,
) -> None:
    """
    The router's task calls ``pump()`` after each frame: the statement leaves at
    once and its answer is taken there too; the executor's own task never runs.
    """
    position_id = _position(db_dsn)
    stats = Stats()
    link = DirectLink(dsn=db_dsn, name="triggers-test", stats=stats)
    executor = Executor(
        mode="outbox", sink=partial(write_decisions_direct, link), stats=stats, link=link
    )
    try:
        await link.warm_up(TRIGGER_STATEMENTS)
        await _decide_from_the_routers_task(executor, _take_profit(position_id))
        assert stats.triggers_written == 1 and stats.triggers_duplicate == 0
        assert _one(db_dsn, "SELECT count(*) FROM triggers") == 1
        assert _one(db_dsn, "SELECT status FROM positions") == "closing"
        # The same rule again: decided once.
        await _decide_from_the_routers_task(executor, _take_profit(position_id))
        assert stats.triggers_written == 1 and stats.triggers_duplicate == 1
        assert _one(db_dsn, "SELECT count(*) FROM triggers") == 1
    finally:
        link.close()


async def test_a_statement_whose_connection_dies_on_the_wire_is_written_once_after(
    db_dsn: str,
) -> None:
    """
    The position is locked elsewhere, so the sent statement waits in the server;
    its backend is terminated: the decision goes back to the queue and the
    executor's task writes it (reconnecting) exactly once.
    """
    position_id = _position(db_dsn)
    stats = Stats()
    link = DirectLink(dsn=db_dsn, name="triggers-die", stats=stats)
    executor = Executor(
        mode="outbox",
        sink=partial(write_decisions_direct, link),
        stats=stats,
        link=link,
        retry=0.05,
    )
    await link.warm_up(TRIGGER_STATEMENTS)
    with psycopg.connect(db_dsn) as holder:
        holder.execute("SELECT 1 FROM positions WHERE id = %s FOR UPDATE", [position_id])
        executor.submit(_take_profit(position_id))
        executor.pump()
        assert link.in_flight
        with psycopg.connect(db_dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = 'polystream-triggers-die'"
            )
        # Gone before the lock is released: the statement never ran to its commit.
        with trio.fail_after(10):
            while _backends(db_dsn, "polystream-triggers-die"):
                await trio.sleep(0.01)
        holder.rollback()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(executor.run)
            with trio.fail_after(20):
                while executor.pending:  # counts the batch the retry is writing too
                    await trio.sleep(0.001)
            # Written by the retry itself (not by the final flush of a cancelled one).
            assert stats.db_errors >= 1 and stats.triggers_written == 1
            nursery.cancel_scope.cancel()
        assert stats.triggers_duplicate == 0
        assert _one(db_dsn, "SELECT count(*) FROM triggers") == 1
        assert _one(db_dsn, "SELECT status FROM positions") == "closing"
    finally:
        link.close()

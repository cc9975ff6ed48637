"""
Scale-out (polystream.cluster): daemons on one database split the markets by
partition through leases in PostgreSQL, cover a killed one, take over from
one that stops cleanly without a partition ever unowned, and write only what
they hold. Real PostgreSQL; the last tests run real ``polystream run``
processes against a real replay server.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from cli_process import clean_env, free_port, run_polystream
from expected import (
    UPDOWN,
    expected_assets,
    hold_every_updown_token,
    mismatches,
)
from test_db_outage import restart_config, seed
from throwaway_pg import ThrowawayPostgres

from polystream.app import App, run
from polystream.cluster import Fence, Member, cycle, hand_over, partition_of, read_cluster
from polystream.pipeline.writers import MarketRow, write_markets
from polystream.replay import ReplayServer, serve_replay
from polystream.store import db

PARTITIONS = 6
TTL = 30.0  # the unit tests end sessions themselves; nothing must expire meanwhile


def _member(name: str, partitions: int = PARTITIONS, ttl: float = TTL) -> Member:
    return Member(member_id=name, host="test", pid=1, partitions=partitions, ttl=ttl)


@contextmanager
def _sessions(dsn: str, *names: str) -> Iterator[dict[str, psycopg.Connection[Any]]]:
    """One autocommit-free connection per member: its lease session."""
    with ExitStack() as stack:
        yield {name: stack.enter_context(psycopg.connect(dsn)) for name in names}


def _cycle(conn: psycopg.Connection[Any], name: str, held: set[int] | None = None) -> set[int]:
    with conn.transaction():
        owned, _ = cycle(conn, _member(name), held or set())
    return set(owned)


def _owners(dsn: str) -> dict[int, str | None]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT partition, CASE WHEN expires_at > now() THEN owner END"
            " FROM cluster_leases ORDER BY partition"
        ).fetchall()
    return {int(p): o for p, o in rows}


def test_partition_of_is_stable_and_in_range() -> None:
    # CRC-32: the same on every host and Python version (hash() is salted per process).
    assert partition_of("123456789", 64) == 0xCBF43926 % 64  # CRC-32's published check value
    assert {partition_of(str(i), 7) for i in range(1000)} == set(range(7))


def test_members_split_the_partitions_evenly_and_cover_a_dead_one(db_dsn: str) -> None:
    with _sessions(db_dsn, "a", "b", "c") as conn:
        assert _cycle(conn["a"], "a") == set(range(PARTITIONS))  # alone: everything
        assert _cycle(conn["b"], "b") == set()  # none free yet
        a = _cycle(conn["a"], "a", set(range(PARTITIONS)))  # two live: a gives back half
        assert len(a) == 3
        b = _cycle(conn["b"], "b")
        assert a.isdisjoint(b) and a | b == set(range(PARTITIONS))
        assert _cycle(conn["c"], "c") == set()
        a, b = _cycle(conn["a"], "a", a), _cycle(conn["b"], "b", b)
        c = _cycle(conn["c"], "c")
        assert [len(a), len(b), len(c)] == [2, 2, 2]
        assert a | b | c == set(range(PARTITIONS))
        _end_session(db_dsn, conn["c"])  # killed: dead at once, not one TTL later
        a, b = _cycle(conn["a"], "a", a), _cycle(conn["b"], "b", b)
        assert a.isdisjoint(b) and a | b == set(range(PARTITIONS))
        assert set(_owners(db_dsn).values()) == {"a", "b"}


def _end_session(dsn: str, conn: psycopg.Connection[Any]) -> None:
    """Close ``conn`` and wait until its server process has gone (as after a kill -9)."""
    pid = conn.info.backend_pid
    conn.close()
    with psycopg.connect(dsn) as watcher:
        for _ in range(500):
            if watcher.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone():
                time.sleep(0.01)  # another process: nothing to wait on but its absence
            else:
                return
    raise AssertionError(f"backend {pid} still there after 5 s")


def test_a_clean_stop_hands_every_partition_to_a_live_peer(db_dsn: str) -> None:
    with _sessions(db_dsn, "a", "b", "c") as conn:
        _cycle(conn["a"], "a")
        _cycle(conn["b"], "b")
        a = _cycle(conn["a"], "a", set(range(PARTITIONS)))
        _cycle(conn["b"], "b")
        with conn["a"].transaction():
            given = hand_over(conn["a"], _member("a"))
        assert set(given) == a and set(given.values()) == {"b"}
        assert set(_owners(db_dsn).values()) == {"b"}  # never unowned in between
        with conn["b"].transaction():
            view = read_cluster(conn["b"], TTL)
        assert [(m[0], m[2], m[4]) for m in view.members] == [("b", True, PARTITIONS)]
        assert view.unowned == [] and view.partitions == PARTITIONS


def test_a_leaving_member_keeps_no_share(db_dsn: str) -> None:
    with _sessions(db_dsn, "a") as conn, conn["a"].transaction():
        owned, _ = cycle(conn["a"], _member("a"), set())
        assert len(owned) == PARTITIONS
        owned, _ = cycle(conn["a"], _member("a"), set(owned), leaving=True)
        assert owned == {}


def _row(market_id: str) -> MarketRow:
    return MarketRow(market_id, None, True, Decimal("0.4"), Decimal("0.6"), None, None, None)


def _markets(dsn: str, count: int) -> list[str]:
    ids = [str(900_000 + i) for i in range(count)]
    with psycopg.connect(dsn) as conn:
        for market_id in ids:
            conn.execute("INSERT INTO markets (id) VALUES (%s)", [market_id])
    return ids


def test_a_write_is_fenced_to_the_partitions_held(db_dsn: str) -> None:
    ids = _markets(db_dsn, 24)
    with _sessions(db_dsn, "a", "b") as conn:
        _cycle(conn["a"], "a")
        _cycle(conn["b"], "b")
        a = _cycle(conn["a"], "a", set(range(PARTITIONS)))
        fence = Fence("a", PARTITIONS, lambda token: token)
        with psycopg.connect(db_dsn) as writer:
            with writer.transaction():
                written = write_markets(writer, [_row(m) for m in ids], fence)
            priced = {
                m for (m,) in writer.execute("SELECT id FROM markets WHERE best_bid IS NOT NULL")
            }
        mine = {m for m in ids if partition_of(m, PARTITIONS) in a}
        assert (
            written.rows == len(mine)
            and set(written.ids) == priced == mine
            and 0 < len(mine) < len(ids)
        )
        # A member that holds nothing (b never took its half yet) writes nothing.
        with psycopg.connect(db_dsn) as writer, writer.transaction():
            assert (
                write_markets(writer, [_row(m) for m in ids], Fence("b", PARTITIONS, str)).rows == 0
            )


def test_a_lease_cannot_change_owner_under_an_open_write(db_dsn: str) -> None:
    with _sessions(db_dsn, "a", "b") as conn:
        owned = _cycle(conn["a"], "a")
        fence = Fence("a", PARTITIONS, str)
        with psycopg.connect(db_dsn) as writer, writer.transaction():
            assert fence.held(writer) == frozenset(owned)  # share-locked until commit
            _end_session(db_dsn, conn["a"])  # a dies mid-write: b may take them, but not yet
            assert _cycle(conn["b"], "b") == set()  # locked leases are skipped, not taken
        assert _cycle(conn["b"], "b") == set(range(PARTITIONS))  # the write committed: now


# ------------------------------------------------------------------ real daemons

ALL_TOKENS = 12  # the replay's 6 markets, 2 outcomes each


@contextmanager
def _daemon(
    dsn: str, url: str, log: Path, ttl: float
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLYSTREAM_")}
    env.update(
        POLYSTREAM_DATABASE__DSN=dsn,
        POLYSTREAM_FEED__URL=url,
        POLYSTREAM_FEED__CLUSTER="true",
        POLYSTREAM_FEED__CLUSTER_PARTITIONS="16",
        POLYSTREAM_FEED__CLUSTER_LEASE_TTL=str(ttl),
        POLYSTREAM_HEALTH__LISTEN=f"127.0.0.1:{port}",
        POLYSTREAM_LOG__FORMAT="json",
        POLYSTREAM_PIPELINE__DEBOUNCE="0.2",
    )
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "polystream", "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process, f"http://127.0.0.1:{port}/health"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _split(server: ReplayServer) -> list[frozenset[str]]:
    return [s for s in server.subscriptions().values() if s]


async def _until(check: Any, timeout: float) -> float:
    """Seconds until ``check()`` holds (polled every 50 ms); fails after ``timeout``."""
    started = trio.current_time()
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.05)
    return trio.current_time() - started


def _covered_once(server: ReplayServer, daemons: int) -> bool:
    """
    Every token subscribed by exactly one connection, on at most ``daemons``
    connections (the split is by partition: with 6 markets in 16 partitions a
    daemon may hold partitions that hold no market).
    """
    sets = _split(server)
    union = frozenset().union(*sets)
    return len(sets) <= daemons and sum(map(len, sets)) == len(union) == ALL_TOKENS


async def test_daemons_split_the_feed_and_cover_a_killed_one_and_a_stopped_one(
    db_dsn: str, tmp_path: Path
) -> None:
    hold_every_updown_token(db_dsn)
    ttl = 1.5
    async with trio.open_nursery() as nursery:
        server: ReplayServer = await nursery.start(
            lambda task_status: serve_replay(
                [Path(f"{UPDOWN}.jsonl.gz")], speed=50.0, loop=True, task_status=task_status
            )
        )
        url = f"ws://127.0.0.1:{server.port}/ws/market"
        with (
            _daemon(db_dsn, url, tmp_path / "a.log", ttl) as (a, health_a),
            _daemon(db_dsn, url, tmp_path / "b.log", ttl) as (b, health_b),
            _daemon(db_dsn, url, tmp_path / "c.log", ttl) as (c, health_c),
        ):
            # Three daemons: each market on exactly one, every market on one.
            async with httpx.AsyncClient() as http:

                async def members() -> list[int]:
                    found = []
                    for health in (health_a, health_b, health_c):
                        try:
                            cluster = (await http.get(health)).json()["cluster"]
                        except httpx.TransportError:  # not listening yet
                            found.append(-1)
                            continue
                        found.append(cluster["partitions"] if cluster["members"] == 3 else -1)
                    return found

                with trio.fail_after(60):
                    # Each its share at most (ceil(16 / 3) = 6), all 16 held, none twice.
                    while not (
                        sum(held := await members()) == 16 and min(held) > 0 and max(held) <= 6
                    ):
                        await trio.sleep(0.1)
            await _until(lambda: _covered_once(server, 3), 30)
            assert len(_split(server)) >= 2, held
            # kill -9: its session ends; the others take its partitions within a cycle.
            b.send_signal(signal.SIGKILL)
            b.wait(timeout=10)
            took = await _until(lambda: _covered_once(server, 2), 20)
            assert took < ttl + 2 * ttl / 3 + 1.0, took
            # `polystream status` on one of them shows the whole cluster.
            env = clean_env(
                POLYSTREAM_DATABASE__DSN=db_dsn,
                POLYSTREAM_FEED__CLUSTER="true",
                POLYSTREAM_FEED__CLUSTER_LEASE_TTL=str(ttl),
                POLYSTREAM_HEALTH__LISTEN=health_a.removeprefix("http://").removesuffix("/health"),
            )
            shown = await trio.to_thread.run_sync(lambda: run_polystream("status", env=env))
            assert "cluster: 2 live daemon(s), 16 partitions, 0 unowned" in shown.stdout, shown
            assert shown.stdout.count(" alive ") == 2, shown.stdout
            # A clean stop hands over: never unowned, covered by the last one.
            c.send_signal(signal.SIGTERM)
            assert await trio.to_thread.run_sync(lambda: c.wait(timeout=30)) == 0
            await _until(lambda: _covered_once(server, 1), 20)
            owners = _owners(db_dsn)
            assert len(owners) == 16 and None not in owners.values()
            assert len(set(owners.values())) == 1
            async with httpx.AsyncClient() as http:
                assert (await http.get(health_a)).json()["cluster"]["partitions"] == 16
            # Every position priced, by whichever owner its market had.
            await _until(lambda: _unpriced(db_dsn) == 0, 20)
            assert a.poll() is None
        nursery.cancel_scope.cancel()
    handed = [
        line for line in (tmp_path / "c.log").read_text().splitlines() if "cluster_left" in line
    ]
    assert handed and '"handed_over": 0' not in handed[0], handed


def _unpriced(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM positions WHERE current_price IS NULL").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.slow
async def test_two_daemons_through_a_database_restart_end_as_one_would(
    throwaway_server: ThrowawayPostgres,
) -> None:
    """
    Two clustered daemons (in this process) through a PostgreSQL restart: both
    lose their leases, rejoin and split again; the final ``markets`` and
    ``positions`` state equals the recording's final state (what one daemon
    writes), every crossed TP/SL fired exactly once, the partitions are all
    owned, none twice. The database is the one of test_db_outage.
    """
    own_server = throwaway_server
    dsn = own_server.dsn
    crossed = set(seed(dsn))

    with trio.fail_after(150):
        async with trio.open_nursery() as nursery:
            replay: ReplayServer = await nursery.start(
                lambda task_status: serve_replay(
                    [Path(f"{UPDOWN}.jsonl.gz")], speed=30.0, task_status=task_status
                )
            )
            config = restart_config(
                dsn, replay, cluster=True, cluster_partitions=16, cluster_lease_ttl=1.5
            )
            apps: list[App] = [await nursery.start(run, config, dsn) for _ in range(2)]

            def split() -> bool:
                held = [a.cluster.owned if a.cluster else frozenset() for a in apps]
                return all(held) and not (held[0] & held[1]) and len(held[0] | held[1]) == 16

            await _until(split, 20)
            await apps[0].positions.batches.after(0)
            await trio.to_thread.run_sync(own_server.stop)
            # Both stop serving before their leases could expire on the server.
            await _until(lambda: not any(a.cluster and a.cluster.owned for a in apps), 10)
            await trio.to_thread.run_sync(own_server.start)
            await _until(split, 30)
            await replay.finished.wait()
            expected = expected_assets(UPDOWN)
            while problems := await trio.to_thread.run_sync(mismatches, dsn, expected):
                await trio.sleep(0.2)
            assert not problems
            while any(a.executor.pending for a in apps):
                await trio.sleep(0.1)
            for a in apps:
                a.stop()
            nursery.cancel_scope.cancel()

    with db.connect(dsn) as conn:
        fired = [pid for (pid,) in conn.execute("SELECT position_id FROM triggers")]
    assert sorted(fired) == sorted(crossed)  # each once, by whichever daemon held it
    assert all(a.stats.db_errors > 0 for a in apps)  # the outage really happened

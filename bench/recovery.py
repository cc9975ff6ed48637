"""
Recovery benchmark: how fast ``polystream run`` comes back after its
connection drops, and how stale prices get while the feed is down for good.

Run ``.venv/bin/python -m bench.recovery`` (``--help`` for options). It writes
``bench/results-recovery.json`` (``{"value", "unit"}`` per figure) and
``bench/results-recovery.md`` and prints the table.

The daemon runs as a child process (``python -m polystream run``, configured
through ``POLYSTREAM_*`` environment variables) against the replay server in
this process (``polystream.replay``, ``record`` on) playing the updown capture
at ``--speed`` (15x: the 15-minute capture lasts a minute), with an active
position on each of its 12 tokens in a fresh database.

* **Time to recover after a dropped connection**: ``--drops`` times (default
  50), 0.3 to 0.6 s apart, the server closes the daemon's connection
  (``ReplayServer.drop("tcp")``: a TCP FIN, no close frame). Per drop, from the
  moment the server closed it (``time.monotonic()`` in this process) to: the
  server reading the daemon's resubscribe; the server writing the fresh
  snapshots of all 12 assets to the new socket; ``/health`` first showing the
  shard ``connected`` again (polled every ~2 ms over HTTP, so this one
  includes up to a few ms of polling). ``feed.backoff_initial`` is 0.05 s,
  ``backoff_max`` 0.5 s; a delay is drawn in [0, initial * 2**attempt]
  (full jitter), and the attempt count resets only once a connection stayed
  up ``backoff_max`` s, so a drop 0.3 to 0.5 s after the last reconnect
  draws from a doubled range: that is the p99 tail.
* **Staleness bound with the HTTP fallback**: the server then answers every
  handshake ``429`` and drops the connection: the feed is down for good. A
  fake CLOB REST server here answers ``POST /prices`` with prices that move on
  every request. Every 50 ms this process reads, for the 6 held markets, the
  age of ``markets.updated_at`` (PostgreSQL's clock) and keeps the largest,
  from the first ``source = 'poll'`` write on, for ``--outage`` seconds.
  Compare with ``poll.interval`` (``--poll-interval``, default 1 s; also
  ``poll.grace`` 1 s and ``poll.check_interval`` 0.1 s).

Times are on a shared, noisy machine: compare figures within one run only.

PostgreSQL: ``POLYSTREAM_BENCH_DSN``, else ``POLYSTREAM_TEST_DSN`` (an admin
DSN), else an embedded server for the run (``bench.harness.admin_database``).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import psycopg
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from bench.harness import (
    CAPTURE_MARKETS,
    CAPTURE_TAPE,
    OUT_DIR,
    ROOT,
    BenchError,
    DaemonLog,
    bench_setup,
    exit_status,
    quantile,
    throwaway_database,
    write_results,
)
from polystream.ops.daemon import DaemonProcess, open_daemon
from polystream.ops.health import Receive, Scope, Send, answer_lifespan
from polystream.replay import Capture, ReplayServer, Tape
from polystream.store.markets import import_markets_file

BACKOFF_INITIAL = 0.05
BACKOFF_MAX = 0.5
POLL_GRACE = 1.0
POLL_CHECK = 0.1


def _prepare(dsn: str) -> list[str]:
    """Markets and one active position per token in the migrated database; returns the token ids."""
    with psycopg.connect(dsn) as conn:
        import_markets_file(conn, CAPTURE_MARKETS)
        rows = conn.execute(
            "INSERT INTO positions (user_id, market_id, outcome, token_id, size, entry_price)"
            " SELECT 'bench', m.id, o.name, m.clob_token_ids ->> (o.ord::int - 1), 10, 0.5"
            " FROM markets m,"
            " jsonb_array_elements_text(m.outcomes) WITH ORDINALITY o(name, ord)"
            " RETURNING token_id"
        ).fetchall()
    return [str(row[0]) for row in rows]


class MovingClob:
    """
    ``POST /prices`` like the CLOB, every answer a new price (bid, bid + 0.02);
    ``served`` keeps every bid answered.
    """

    def __init__(self) -> None:
        self.requests = 0
        self.served: set[Decimal] = set()

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI app (lifespan, and ``POST /prices`` answered for every token asked)."""
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        data = b""
        while True:
            message = await receive()
            data += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.requests += 1
        bid = Decimal("0.30") + Decimal("0.01") * (self.requests % 40)
        self.served.add(bid)
        answer: dict[str, Any] = {}
        if scope["path"] == "/prices":
            for item in orjson.loads(data or b"[]"):
                price = bid if item["side"] == "BUY" else bid + Decimal("0.02")
                answer.setdefault(item["token_id"], {})[item["side"]] = str(price)
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": orjson.dumps(answer)})


async def _until(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Poll ``condition`` every ~2 ms (it reads another process: nothing to wait on)."""
    with trio.move_on_after(within) as scope:
        while not await condition():  # noqa: ASYNC110
            await trio.sleep(0.002)
    if scope.cancelled_caught:
        raise BenchError(f"timed out waiting for {what}")


async def measure_drops(
    server: ReplayServer,
    daemon: DaemonProcess,
    drops: int,
    tokens: set[str],
    differences: list[str],
) -> dict[str, list[float]]:
    """
    Drop the daemon's connection ``drops`` times; per drop, the three delays
    in ms. Each drop must be followed by exactly one new connection, whose
    first request names exactly the held ``tokens`` and which gets a fresh
    snapshot of each, and by exactly one more reconnect in ``/health``;
    anything else is added to ``differences``.
    """

    async def shard() -> dict[str, Any]:
        shards = (await daemon.health())["shards"]
        return shards[0] if shards else {}

    async def connected() -> bool:
        return (await shard()).get("state") == "connected" and bool(server.subscriptions())

    resub: list[float] = []
    snap: list[float] = []
    health: list[float] = []
    for _ in range(drops):
        await _until(connected, 10, "a connected shard")
        await trio.sleep(random.uniform(0.3, 0.6))
        before = (await shard())["reconnects"]
        await server.drop("tcp")
        dropped_at = server.fault_log[-1].at

        async def back(before: int = before) -> bool:
            now = await shard()
            return now.get("state") == "connected" and now["reconnects"] > before

        await _until(back, 10, "the shard to reconnect")
        health.append((time.monotonic() - dropped_at) * 1000)
        await _until(partial(_served, server, dropped_at), 10, "the fresh snapshots")
        log = _opened_after(server, dropped_at)[0]
        resub.append((log.requests[0].received_at - dropped_at) * 1000)
        snap.append((max(log.snapshots.values()) - dropped_at) * 1000)
        differences += _drop_differences(server, dropped_at, tokens, before, await shard())
    return {"resubscribe": resub, "snapshots": snap, "health": health}


def _drop_differences(
    server: ReplayServer, dropped_at: float, tokens: set[str], before: int, shard: dict[str, Any]
) -> list[str]:
    """What one recovered drop did differently from one reconnect that resubscribes ``tokens``."""
    found = []
    logs = _opened_after(server, dropped_at)
    if len(logs) != 1:
        found.append(f"drop at {dropped_at:.3f}: {len(logs)} connections opened after it")
    first = set(logs[0].requests[0].asset_ids) if logs and logs[0].requests else set()
    if first != tokens:
        found.append(f"drop at {dropped_at:.3f}: resubscribed {len(first)} assets, not the 12 held")
    if logs and set(logs[0].snapshots) != tokens:
        found.append(f"drop at {dropped_at:.3f}: snapshots of {len(logs[0].snapshots)} assets")
    if shard.get("reconnects") != before + 1:
        found.append(f"drop at {dropped_at:.3f}: reconnects {before} -> {shard.get('reconnects')}")
    return found


def _opened_after(server: ReplayServer, at: float) -> list[Any]:
    return [log for log in server.connection_logs if log.opened_at > at]


async def _served(server: ReplayServer, at: float) -> bool:
    """Whether the first connection opened after ``at`` got its 12 snapshots written."""
    await trio.lowlevel.checkpoint()
    logs = _opened_after(server, at)
    return bool(logs and logs[0].requests and len(logs[0].snapshots) == 12)


def _polled_quotes(dsn: str, served: set[Decimal]) -> tuple[int, list[str]]:
    """
    The held markets, and those whose row does not hold a quote the fake
    CLOB served (``source = 'poll'``, best bid one of ``served``, best ask =
    bid + 0.02).
    """
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT id, source, best_bid, best_ask FROM markets"
            " WHERE id IN (SELECT market_id FROM positions) ORDER BY id"
        ).fetchall()
    return len(rows), [
        f"market {market_id}: {source} {bid}/{ask}"
        for market_id, source, bid, ask in rows
        if source != "poll" or bid not in served or ask != bid + Decimal("0.02")
    ]


def _ages(dsn: str) -> tuple[float, bool]:
    """Largest age of ``markets.updated_at`` over held markets (s), and whether any is 'poll'."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT max(extract(epoch FROM clock_timestamp() - updated_at)),"
            " bool_or(source = 'poll')"
            " FROM markets WHERE id IN (SELECT market_id FROM positions)"
        ).fetchone()
    assert row is not None
    return float(row[0]), bool(row[1])


async def measure_outage(
    server: ReplayServer, dsn: str, clob: MovingClob, outage: float, differences: list[str]
) -> dict[str, float]:
    """
    Feed down for good; the largest age of the stored prices while polling.
    No connection may be accepted meanwhile, and at the end every held
    market must hold a polled quote (:func:`_polled_quotes`), else
    ``differences`` says so.
    """
    server.refusing = 429
    connections = len(server.connection_logs)
    await server.drop("tcp")
    down_at = time.monotonic()
    while True:
        _, polled = await trio.to_thread.run_sync(_ages, dsn)
        if polled:
            break
        if time.monotonic() - down_at > 30:
            raise BenchError("no 'poll' write within 30 s of the outage")
        await trio.sleep(0.02)
    first_poll = time.monotonic() - down_at
    ages: list[float] = []
    end = time.monotonic() + outage
    while time.monotonic() < end:
        age, _ = await trio.to_thread.run_sync(_ages, dsn)
        ages.append(age)
        await trio.sleep(0.05)
    if len(server.connection_logs) != connections:
        differences.append(f"{len(server.connection_logs) - connections} connections while refused")
    if not server.stats.rejected:
        differences.append("no handshake was refused during the outage")
    held, unquoted = await trio.to_thread.run_sync(_polled_quotes, dsn, set(clob.served))
    differences += unquoted
    return {
        "held_markets": float(held),
        "polled_markets": float(held - len(unquoted)),
        "first_poll_write_s": first_poll,
        "max_age_s": max(ages),
        "p50_age_s": statistics.median(ages),
        "samples": float(len(ages)),
        "clob_requests": float(clob.requests),
        "rejected_handshakes": float(server.stats.rejected),
    }


def _settings(clob_url: str, poll_interval: float) -> dict[str, object]:
    """The daemon's settings: fast reconnects, the fake CLOB polled every ``poll_interval`` s."""
    return {
        "log__level": "info",
        "feed__backoff_initial": BACKOFF_INITIAL,
        "feed__backoff_max": BACKOFF_MAX,
        "poll__url": clob_url,
        "poll__interval": poll_interval,
        "poll__grace": POLL_GRACE,
        "poll__check_interval": POLL_CHECK,
        "poll__attempts": 1,
        "pipeline__market_flush_interval": 0.05,
    }


async def run(args: argparse.Namespace, dsn: str, tokens: set[str]) -> dict[str, Any]:
    """
    The drops, then the outage, against one daemon; figures and differences.

    Raises:
        BenchError: a wait timed out.
        PolystreamError: the daemon exited.
    """
    capture = Capture.load([CAPTURE_TAPE])
    server = ReplayServer(tape=Tape(capture), speed=args.speed, loop=True, record=True)
    clob = MovingClob()
    differences: list[str] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        hyper = HypercornConfig()
        hyper.bind = ["127.0.0.1:0"]
        hyper.accesslog = hyper.errorlog = None
        urls = await nursery.start(partial(serve, clob.app, hyper, mode="asgi"))  # type: ignore[arg-type]
        settings = _settings(urls[0], args.poll_interval)
        async with open_daemon(dsn, server.url, args.log, settings=settings, cwd=ROOT) as daemon:
            with trio.fail_after(30):
                await daemon.wait_ready()
            drops = await measure_drops(server, daemon, args.drops, tokens, differences)
            outage = await measure_outage(server, dsn, clob, args.outage, differences)
            code = await daemon.stop()
        nursery.cancel_scope.cancel()
    if code != 0:
        differences.append(f"daemon exit {code}")
    errors = DaemonLog.read(args.log).problems(levels=("error", "critical"))  # warnings expected
    differences += [f"log: {line}" for line in errors[:10]]
    return {
        "drops": drops,
        "outage": outage,
        "differences": differences,
        "rejected": server.stats.rejected,
        "exit_code": code,
    }


def correctness_line(measured: dict[str, Any], args: argparse.Namespace) -> str:
    """The exact checks, in one line."""
    drops, outage = len(measured["drops"]["health"]), measured["outage"]
    differences = measured["differences"]
    errors = sum(1 for d in differences if d.startswith("log: "))
    return (
        f"Correctness (exact): {drops}/{args.drops} drops recovered, each on exactly one new "
        "connection resubscribing exactly the 12 held tokens and sent 12/12 fresh snapshots, "
        f"/health reconnects +1 each; outage: no connection accepted while refused "
        f"({measured['rejected']} handshakes refused), {outage['polled_markets']:.0f}/"
        f"{outage['held_markets']:.0f} held markets holding a quote the fake CLOB served "
        f"(source 'poll', ask = bid + 0.02); daemon exit {measured['exit_code']}, error log "
        f"lines {errors}; {len(differences)} differences"
    )


def _results(measured: dict[str, Any], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    names = {
        "resubscribe": "drop to resubscribe read by the server",
        "snapshots": "drop to fresh snapshots written by the server",
        "health": "drop to /health shard connected",
    }
    for key, label in names.items():
        values = measured["drops"][key]
        for q, tag in ((0.5, "p50"), (0.99, "p99")):
            results[f"recover_{key}_{tag}_ms"] = {
                "value": round(quantile(values, q), 1),
                "unit": "ms",
                "what": f"{label}, {tag} of {len(values)} drops",
            }
    results["backoff_initial_s"] = {
        "value": BACKOFF_INITIAL,
        "unit": "s",
        "what": "feed.backoff_initial",
    }
    outage = measured["outage"]
    results["poll_interval_s"] = {
        "value": args.poll_interval,
        "unit": "s",
        "what": "poll.interval (X)",
    }
    results["poll_grace_s"] = {"value": POLL_GRACE, "unit": "s", "what": "poll.grace"}
    results["outage_first_poll_write_s"] = {
        "value": round(outage["first_poll_write_s"], 3),
        "unit": "s",
        "what": "feed down to first source='poll' row",
    }
    results["outage_max_price_age_s"] = {
        "value": round(outage["max_age_s"], 3),
        "unit": "s",
        "what": f"largest markets.updated_at age while polling, {args.outage:g} s sampled every 50 ms",
    }
    results["outage_p50_price_age_s"] = {
        "value": round(outage["p50_age_s"], 3),
        "unit": "s",
        "what": "median of those ages",
    }
    return results


def _table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| figure | value | unit | what |", "|---|---:|---|---|"]
    for name, figure in results.items():
        lines.append(f"| {name} | {figure['value']} | {figure['unit']} | {figure['what']} |")
    return "\n".join(lines)


def main() -> int:
    """Run the benchmark and write its results; returns 1 on any difference, else 0."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1] if __doc__ else None)
    parser.add_argument("--drops", type=int, default=50)
    parser.add_argument("--speed", type=float, default=15.0)
    parser.add_argument("--poll-interval", type=float, default=1.0)
    parser.add_argument("--outage", type=float, default=15.0, help="seconds sampled while down")
    parser.add_argument("--log", type=Path, default=Path("/tmp/polystream-bench-recovery.log"))
    parser.add_argument(
        "--out", type=Path, default=OUT_DIR, help="where results-recovery.json/.md go (bench/)"
    )
    args = parser.parse_args()
    name = f"polystream_bench_recovery_{os.getpid()}"
    with bench_setup() as (admin, _machine), throwaway_database(admin, name) as dsn:
        tokens = set(_prepare(dsn))
        measured = trio.run(run, args, dsn, tokens)
    results = _results(measured, args)
    table = _table(results) + "\n\n" + correctness_line(measured, args)
    markdown = (
        "# Recovery benchmark (`python -m bench.recovery`)\n\n"
        + (__doc__ or "").split("\n\n", 1)[1].split("\n\nPostgreSQL:")[0]
        + "\n\n"
        + table
        + "\n"
    )
    figures = {k: {"value": v["value"], "unit": v["unit"]} for k, v in results.items()}
    write_results(args.out, "results-recovery", figures, markdown, printed=table)
    return exit_status(measured["differences"])


if __name__ == "__main__":
    sys.exit(main())

"""
Subscription benchmark: how fast ``polystream run`` follows the database.

Run ``.venv/bin/python -m bench.subscriptions`` (``--help`` for options). It
writes ``bench/results-subscriptions.json`` and ``bench/results-subscriptions.md``
and prints the table.

The daemon runs as a child process (``python -m polystream run``, configured
through ``POLYSTREAM_*`` environment variables) against the replay server
running in this process (``polystream.replay``) on the updown capture, with
synthetic assets (re-labelled copies of the 12 recorded ones) and ``record``
on, so the server notes when each subscribe frame arrived and when each
snapshot was written to its socket. Two runs, each on a fresh database
``polystream_bench_subs_<pid>_<run>`` holding 5,200 synthetic binary markets:

* ``idle``: no position at start (nothing subscribed), then
  **position-insert-to-subscribe-frame latency**: N times (different markets),
  a plain psycopg connection in this process INSERTs (autocommit) one active
  position; the clock runs from the commit's acknowledgement (also: from
  just before the INSERT is sent) until the server reads the subscribe frame
  naming that position's token;
* ``loaded``: 5,000 active positions at start (10,000 assets); **time to full
  coverage**: from just before the child process is spawned (and separately
  from the server's first accepted connection) until every one of the 10,000
  assets had its ``book`` snapshot written to a socket; also when the
  daemon's ``/health`` first counts all 10,000 as having data. Then the same
  latency measurement with those 10,000 assets subscribed (the first new
  asset opens a new connection: 50 shards are full).

Times are ``time.monotonic()`` in this process. The machine is shared and
noisy: compare figures within one run only. With ``--events`` (default) the
server forwards the tape's events to every synthetic copy, paced at
``--speed`` (default 0.1: ~1,300 events/s at 10,000 assets), so the daemon
works on a live feed while it subscribes; ``--no-events`` serves snapshots
only. At ``--speed 1`` (~13k events/s) the daemon falls behind (its ingest
rate here is ~5k events/s, ``bench/results.md``) and shards drop on the PONG
watchdog. Each insert with 10,000 assets subscribed costs a full reconcile
(the whole desired set is re-read on each NOTIFY), hence fewer samples there (``--loaded-samples``).

PostgreSQL: ``POLYSTREAM_BENCH_DSN``, else ``POLYSTREAM_TEST_DSN`` (an admin
DSN), else an embedded server for the run (``bench.harness.admin_database``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import psycopg
import trio

from bench.harness import (
    CAPTURE_TAPE,
    ROOT,
    DaemonLog,
    add_output_options,
    bench_setup,
    exit_status,
    log_directory,
    progress,
    throwaway_database,
    write_results,
)
from polystream.ops.daemon import DaemonProcess, open_daemon
from polystream.replay import Capture, ReplayServer, Synthetic, Tape
from polystream.store.markets import GammaMarket, upsert_markets

COVERAGE_MARKETS = 5_000  # x 2 tokens = 10,000 assets
POLL = 0.002
SAMPLE_TIMEOUT = 10.0
MAX_PER_CONNECTION = 200  # feed.max_assets_per_connection, the default
INSERT = (
    "INSERT INTO positions (user_id, market_id, outcome, token_id, size, entry_price)"
    " VALUES ('bench', %s, 'Yes', %s, 10, 0.5)"
)


@attrs.frozen
class Options:
    """
    What to measure: samples, connect stagger, synthetic events and tape speed, log
    directory.
    """

    samples: int
    loaded_samples: int
    stagger: float
    events: bool
    speed: float
    log_dir: Path


# --- database ----------------------------------------------------------------


def prepare(dsn: str, markets: Sequence[GammaMarket], positions: int) -> None:
    """All markets; one active position on each of the first ``positions``."""
    with psycopg.connect(dsn) as conn:
        upsert_markets(conn, markets)
        held = markets[:positions]
        conn.execute(
            "INSERT INTO positions (user_id, market_id, outcome, token_id, size, entry_price)"
            " SELECT 'bench', u.id, 'Yes', u.token, 10, 0.5"
            " FROM unnest(%s::text[], %s::text[]) AS u(id, token)",
            ([m.id for m in held], [m.clob_token_ids[0] for m in held]),
        )
        conn.execute("ANALYZE")


# --- measurements ------------------------------------------------------------


def _insert(conn: psycopg.Connection[Any], market: GammaMarket) -> tuple[float, float]:
    """INSERT in autocommit; returns when it was sent and when the commit was acknowledged."""
    sent_at = time.monotonic()
    conn.execute(INSERT, (market.id, market.clob_token_ids[0]))
    return sent_at, time.monotonic()


async def measure_latency(
    server: ReplayServer,
    daemon: DaemonProcess,
    dsn: str,
    markets: Sequence[GammaMarket],
    differences: list[str],
) -> tuple[list[float], list[float]]:
    """
    Insert-to-subscribe-frame latencies, seconds, one per market, in order: from
    the INSERT sent, and from its commit acknowledged. A token not subscribed
    within SAMPLE_TIMEOUT is added to ``differences`` (and has no sample).

    Raises:
        PolystreamError: the daemon exited.
    """
    from_sent: list[float] = []
    from_commit: list[float] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for market in markets:
            token = market.clob_token_ids[0]
            sent_at, committed_at = await trio.to_thread.run_sync(_insert, conn, market)
            with trio.move_on_after(SAMPLE_TIMEOUT) as scope:
                while server.subscribe_times.get(token, 0.0) < sent_at:
                    daemon.ensure_running()
                    await trio.sleep(POLL)
            if scope.cancelled_caught:
                differences.append(f"{token[:12]} not subscribed {SAMPLE_TIMEOUT} s after insert")
                continue
            received_at = server.subscribe_times[token]
            from_sent.append(received_at - sent_at)
            from_commit.append(received_at - committed_at)
            await trio.sleep(0.02 + random.random() * 0.02)  # independent samples
    return from_sent, from_commit


async def subscription_differences(
    server: ReplayServer, daemon: DaemonProcess, want: set[str]
) -> list[str]:
    """
    How the open connections' subscriptions differ from ``want`` (every
    token of each market holding an active position inserted here: the
    daemon follows whole markets): none missing, none extra, none
    on two connections, at most MAX_PER_CONNECTION per connection; and
    ``/health`` counting them as desired, subscribed and covered (an event
    since subscription: the snapshot), within 5 s.
    """
    subscriptions = server.subscriptions()
    seen = Counter(asset for assets in subscriptions.values() for asset in assets)
    found = []
    for label, assets in (
        ("missing", want - seen.keys()),
        ("extra", seen.keys() - want),
        ("on two connections", {a for a, n in seen.items() if n > 1}),
    ):
        if assets:
            found.append(f"{len(assets)} assets {label}, e.g. {sorted(assets)[0][:12]}")
    crowded = [n for n, assets in subscriptions.items() if len(assets) > MAX_PER_CONNECTION]
    if crowded:
        found.append(f"connections {crowded} hold more than {MAX_PER_CONNECTION} assets")
    expected = (len(want),) * 3
    counted: tuple[int, ...] | None = None
    with trio.move_on_after(5):
        while counted != expected:
            document = await daemon.try_health()
            if document is not None:
                covered = sum(s["assets_with_data"] for s in document["shards"])
                counted = (document["desired_assets"], document["subscribed_assets"], covered)
            await trio.sleep(0.05)
    if counted != expected:
        found.append(f"/health desired, subscribed, covered {counted}, expected {len(want)}")
    return found


async def measure_coverage(
    server: ReplayServer, daemon: DaemonProcess, wanted: set[str]
) -> dict[str, float]:
    """Times (monotonic) at which the server, then ``/health``, saw every asset covered."""
    times = server.snapshot_times
    server_done: float | None = None
    health_done: float | None = None
    with trio.fail_after(120):
        while server_done is None or health_done is None:
            if server_done is None and len(wanted.intersection(times)) == len(wanted):
                server_done = max(times[a] for a in wanted)
            if health_done is None:
                document = await daemon.try_health()
                shards = document["shards"] if document else []
                if sum(s["assets_with_data"] for s in shards) >= len(wanted):
                    health_done = time.monotonic()
            await trio.sleep(0.02)
    return {"server": server_done, "health": health_done}


def percentiles(latencies: Sequence[float]) -> dict[str, Any]:
    """p50/p99/max/mean in ms of ``latencies`` (s); values None with fewer than 2 samples."""
    ms = sorted(x * 1000 for x in latencies)
    if len(ms) < 2:
        empty = {"value": None, "unit": "ms"}
        return {"p50": empty, "p99": empty, "max": empty, "mean": empty, "samples": len(ms)}
    cuts = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "p50": {"value": round(statistics.median(ms), 2), "unit": "ms"},
        "p99": {"value": round(cuts[98], 2), "unit": "ms"},
        "max": {"value": round(ms[-1], 2), "unit": "ms"},
        "mean": {"value": round(statistics.fmean(ms), 2), "unit": "ms"},
        "samples": len(ms),
    }


# --- runs --------------------------------------------------------------------


def new_server(capture: Capture, synthetic: Synthetic, options: Options) -> ReplayServer:
    """A recording replay server over the capture and its synthetic copies."""
    return ReplayServer(
        tape=Tape(capture),
        speed=options.speed,
        synthetic=synthetic,
        synthetic_events=options.events,
        record=True,
    )


def _open_daemon(
    dsn: str, server: ReplayServer, options: Options, log_name: str
) -> contextlib.AbstractAsyncContextManager[DaemonProcess]:
    """``polystream run`` on ``dsn`` against the replay server, logging to ``log_name``."""
    settings = {"log__level": "info", "feed__connect_stagger": options.stagger}
    return open_daemon(dsn, server.url, options.log_dir / log_name, settings=settings, cwd=ROOT)


def _checked(
    from_sent: list[float],
    from_commit: list[float],
    daemon: DaemonProcess,
    code: int,
    expected: int,
    differences: list[str],
) -> dict[str, Any]:
    """What both runs report: latencies, exit code, log warnings, subscription differences."""
    return {
        "latency": percentiles(from_commit),
        "latency_from_insert_sent": percentiles(from_sent),
        "exit_code": code,
        "log_problems": DaemonLog.read(daemon.log_path).problems()[:10],
        "subscribed": {"expected": expected, "differences": differences},
    }


async def run_idle(
    capture: Capture,
    synthetic: Synthetic,
    dsn: str,
    latency: Sequence[GammaMarket],
    options: Options,
) -> dict[str, Any]:
    """The idle run: nothing held at start, then the latency samples; its figures and checks."""
    async with trio.open_nursery() as nursery:
        server: ReplayServer = await nursery.start(new_server(capture, synthetic, options).serve)
        differences: list[str] = []
        async with _open_daemon(dsn, server, options, "idle.log") as daemon:
            with trio.fail_after(60):
                await daemon.wait_ready()
            from_sent, from_commit = await measure_latency(
                server, daemon, dsn, latency, differences
            )
            want = {token for m in latency for token in m.clob_token_ids}
            differences += await subscription_differences(server, daemon, want)
            code = await daemon.stop()
        nursery.cancel_scope.cancel()
    return {
        **_checked(from_sent, from_commit, daemon, code, len(want), differences),
        "connections": server.stats.connections,
    }


async def run_loaded(
    capture: Capture,
    synthetic: Synthetic,
    dsn: str,
    wanted: set[str],
    latency: Sequence[GammaMarket],
    options: Options,
) -> dict[str, Any]:
    """
    The loaded run: cold start to full coverage, then latency samples; its figures and
    checks.
    """
    async with trio.open_nursery() as nursery:
        server: ReplayServer = await nursery.start(new_server(capture, synthetic, options).serve)
        differences: list[str] = []
        async with _open_daemon(dsn, server, options, "loaded.log") as daemon:
            done = await measure_coverage(server, daemon, wanted)
            differences += [
                f"at full coverage: {d}"
                for d in await subscription_differences(server, daemon, wanted)
            ]
            connections = len(server.subscriptions())
            first_connection = server.connection_logs[0].opened_at
            samples = latency[: options.loaded_samples]
            from_sent, from_commit = await measure_latency(
                server, daemon, dsn, samples, differences
            )
            after = wanted | {token for m in samples for token in m.clob_token_ids}
            differences += [
                f"after the inserts: {d}"
                for d in await subscription_differences(server, daemon, after)
            ]
            code = await daemon.stop()
        nursery.cancel_scope.cancel()
    start = daemon.spawned_at
    return {
        "coverage_from_process_start": {"value": round(done["server"] - start, 3), "unit": "s"},
        "coverage_from_first_connection": {
            "value": round(done["server"] - first_connection, 3),
            "unit": "s",
        },
        "first_connection_after_start": {
            "value": round(first_connection - start, 3),
            "unit": "s",
        },
        "health_coverage_from_process_start": {
            "value": round(done["health"] - start, 3),
            "unit": "s",
        },
        "connections_used": {"value": connections, "unit": "connections"},
        "max_subscribe_frame": {"value": server.stats.max_message_bytes, "unit": "bytes"},
        "max_assets_per_connection": {"value": server.stats.max_subscribed, "unit": "assets"},
        **_checked(from_sent, from_commit, daemon, code, len(after), differences),
        "connections_total": server.stats.connections,
    }


async def bench(admin: str, options: Options) -> dict[str, Any]:
    """Both runs, each on its own throwaway database."""
    capture = Capture.load([CAPTURE_TAPE])
    count = 2 * (COVERAGE_MARKETS + options.samples)
    synthetic = Synthetic.build(capture.markets, count)
    markets = [GammaMarket.from_gamma(obj) for obj in synthetic.gamma_markets()]
    held, latency = markets[:COVERAGE_MARKETS], markets[COVERAGE_MARKETS:]
    wanted = {token for m in held for token in m.clob_token_ids}
    base = f"polystream_bench_subs_{os.getpid()}"
    with throwaway_database(admin, f"{base}_idle") as dsn:
        await trio.to_thread.run_sync(prepare, dsn, markets, 0)
        progress("run idle: latency with nothing subscribed")
        idle = await run_idle(capture, synthetic, dsn, latency, options)
    with throwaway_database(admin, f"{base}_loaded") as dsn:
        await trio.to_thread.run_sync(prepare, dsn, markets, COVERAGE_MARKETS)
        progress("run loaded: cold start with 10,000 assets, then latency")
        loaded = await run_loaded(capture, synthetic, dsn, wanted, latency, options)
    return {"idle": idle, "loaded": loaded}


# --- report ------------------------------------------------------------------


def markdown(document: dict[str, Any]) -> str:
    """The results table and the correctness line, as Markdown."""
    idle, loaded = document["runs"]["idle"], document["runs"]["loaded"]
    work, machine = document["workload"], document["machine"]
    rows = [
        ("Commit -> subscribe frame, p50, 0 assets subscribed", idle["latency"]["p50"]),
        ("Commit -> subscribe frame, p99, 0 assets subscribed", idle["latency"]["p99"]),
        ("Commit -> subscribe frame, max, 0 assets subscribed", idle["latency"]["max"]),
        (
            "INSERT sent -> subscribe frame, p99, 0 assets subscribed",
            idle["latency_from_insert_sent"]["p99"],
        ),
        ("Commit -> subscribe frame, p50, 10,000 subscribed", loaded["latency"]["p50"]),
        ("Commit -> subscribe frame, p99, 10,000 subscribed", loaded["latency"]["p99"]),
        ("Commit -> subscribe frame, max, 10,000 subscribed", loaded["latency"]["max"]),
        (
            "INSERT sent -> subscribe frame, p99, 10,000 subscribed",
            loaded["latency_from_insert_sent"]["p99"],
        ),
        ("Cold start -> 10,000 snapshots sent (from spawn)", loaded["coverage_from_process_start"]),
        (
            "Cold start -> 10,000 snapshots sent (from 1st connection)",
            loaded["coverage_from_first_connection"],
        ),
        ("Spawn -> first connection", loaded["first_connection_after_start"]),
        (
            "Cold start -> /health shows 10,000 covered (from spawn)",
            loaded["health_coverage_from_process_start"],
        ),
        ("Connections used for 10,000 assets", loaded["connections_used"]),
        ("Largest subscribe frame received", loaded["max_subscribe_frame"]),
        ("Most assets on one connection", loaded["max_assets_per_connection"]),
    ]
    lines = [
        f"Subscriptions: {work['samples']} inserts at 0 assets, {work['loaded_samples']} at "
        f"10,000; {work['coverage_assets']:,} assets "
        f"({work['coverage_assets'] // 2:,} markets) at cold start, connect stagger "
        f"{work['connect_stagger']} s, events to synthetic assets "
        f"{'on, tape speed ' + str(work['tape_speed']) if work['synthetic_events'] else 'off'}; "
        f"{machine['cpu_count']} CPUs, "
        f"Python {machine['python']}, load {machine['load_average'][0]:.2f}, {machine['date']}.",
        "",
        "| Measurement | Value | Unit |",
        "| --- | ---: | --- |",
    ]
    for label, figure in rows:
        value = figure["value"]
        text = (
            "n/a" if value is None else f"{value:,}" if isinstance(value, int) else f"{value:.2f}"
        )
        lines.append(f"| {label} | {text} | {figure['unit']} |")
    lines += ["", correctness_line(document)]
    return "\n".join(lines) + "\n"


def failures(document: dict[str, Any]) -> list[str]:
    """Every difference of both runs: subscriptions, samples, exit code, log warnings."""
    found = []
    for name, run in document["runs"].items():
        found += [f"{name}: {d}" for d in run["subscribed"]["differences"]]
        if run["exit_code"] != 0:
            found.append(f"{name}: daemon exit {run['exit_code']}")
        found += [f"{name}: log: {problem}" for problem in run["log_problems"]]
    return found


def correctness_line(document: dict[str, Any]) -> str:
    """The exact checks, in one line under the table."""
    idle, loaded = document["runs"]["idle"], document["runs"]["loaded"]
    work = document["workload"]
    return (
        f"Correctness (exact): idle: {idle['latency']['samples']}/{work['samples']} inserted "
        f"positions' tokens subscribed, subscription set equal to the "
        f"{idle['subscribed']['expected']} tokens of their markets (none missing, extra or twice; "
        f"<= {MAX_PER_CONNECTION} per connection; /health desired = subscribed = covered); "
        f"loaded: all {work['coverage_assets']:,} held tokens covered, then "
        f"{loaded['latency']['samples']}/{work['loaded_samples']} inserts subscribed, set equal "
        f"to the {loaded['subscribed']['expected']:,} tokens of the held markets; exit codes "
        f"{idle['exit_code']}/{loaded['exit_code']}, log warnings "
        f"{len(idle['log_problems']) + len(loaded['log_problems'])}; "
        f"{len(failures(document))} differences"
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.subscriptions", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--samples", type=int, default=200, help="inserts, 0 assets subscribed (200)"
    )
    parser.add_argument(
        "--loaded-samples",
        type=int,
        default=40,
        help="inserts with 10,000 assets subscribed (40: each costs a full reconcile)",
    )
    parser.add_argument(
        "--stagger", type=float, default=0.1, help="feed.connect_stagger, s (0.1, the default)"
    )
    parser.add_argument(
        "--events",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="forward tape events to synthetic assets (default on)",
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=0.1,
        help="tape speed (0.1: ~1,300 events/s to 10,000 synthetic assets; 1.0 gives "
        "~13k/s, beyond the daemon's ingest rate on 2 cores)",
    )
    add_output_options(parser, "results-subscriptions")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write its results; returns 1 on any difference, else 0."""
    args = _parse_args(argv)
    with contextlib.ExitStack() as stack:
        admin, machine = stack.enter_context(bench_setup())
        log_dir = log_directory(stack, args.log_dir, "polystream-bench-subs-")
        options = Options(
            args.samples, args.loaded_samples, args.stagger, args.events, args.speed, log_dir
        )
        runs = trio.run(bench, admin, options)
    document = {
        "workload": {
            "capture": str(CAPTURE_TAPE.relative_to(ROOT)),
            "samples": args.samples,
            "loaded_samples": args.loaded_samples,
            "tape_speed": args.speed,
            "coverage_assets": 2 * COVERAGE_MARKETS,
            "connect_stagger": args.stagger,
            "max_assets_per_connection": 200,
            "synthetic_events": args.events,
            "latency_clock": "autocommit INSERT acknowledged (latency) or sent "
            "(latency_from_insert_sent) -> server read the subscribe frame naming its token",
            "coverage_clock": "child spawn -> last of the 10,000 snapshots written to a socket",
        },
        "machine": machine,
        "runs": runs,
    }
    write_results(args.out, "results-subscriptions", document, markdown(document))
    return exit_status(failures(document))


if __name__ == "__main__":
    sys.exit(main())

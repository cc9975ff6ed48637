"""
Scale-out benchmark (docs/cluster.md): events/s of two clustered daemons
against one on the same tape and the same machine, and the failover time over
``--kills`` kill -9s.

Throughput. The capture's 6 markets split 3/3 over ``feed.cluster_partitions
= 2`` (CRC-32 partitions 0,0,0,1,1,1 of ids 900001..900006; with 6 markets no
partition count splits them evenly in general). The work is the same for one
daemon and for two (:class:`Tapes`): each partition's frames, repeated to
about ``--laps`` x half the capture each. One daemon holds both partitions and
is sent both halves; two daemons, once each holds one partition (read from
``cluster_leases``), are each sent the half of their own markets' tokens, as
the venue sends only what a connection subscribed; both start together. Each
daemon is pinned to a CPU of its own, as ``polystream run --workers`` places
its children (:func:`polystream.ops.workers.worker_cpus`); the one daemon to
the first. Events/s = events sent /
elapsed from the first byte to the last daemon's last frame read (its
``/health``). Correctness: each daemon read every frame sent to it, the two
token sets are disjoint and cover the 12 tokens, no reconnect, exit 0.

Failover. Two daemons (the defaults: TTL 3 s, 64 partitions) on the replay server
looping at 50x: kill -9 one, time until the survivor's connection is
subscribed to all 12 tokens (every market covered again), start a new one,
wait until both hold partitions again; ``--kills`` times.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson
import psycopg
import trio

from bench.harness import (
    CAPTURE,
    CAPTURE_TAPE,
    ROOT,
    BenchError,
    ExpectingServer,
    Link,
    Session,
    add_output_options,
    bench_setup,
    capture_lines,
    checkpoint,
    data_frames,
    exit_status,
    lap_offset_ms,
    load_markets,
    log_directory,
    progress,
    quantile,
    shift_timestamps,
    text_frames,
    throwaway_database,
    write_results,
)
from bench.ingest import DAEMON_SETTINGS, prepare_database
from polystream.cluster import partition_of
from polystream.config import FeedConfig
from polystream.ops.daemon import DaemonProcess, free_port, open_daemon
from polystream.ops.workers import worker_cpus

PARTITIONS = 2
CHUNK_BYTES = 1 << 20
SETTINGS = {
    **DAEMON_SETTINGS,  # the ingest bench's daemon, in cluster mode
    "feed__cluster": "true",
    "feed__cluster_partitions": str(PARTITIONS),
}


@attrs.define(eq=False, kw_only=True)
class TapeSession(Session):
    """A connection whose tape (encoded frames) is set before ``go``."""

    go: trio.Event = attrs.field(factory=trio.Event)
    blob: bytes = b""
    frames: int = 0
    events: int = 0


@attrs.define(eq=False)
class TapeSender(ExpectingServer[TapeSession]):
    """Writes each session its own tape once ``go`` is set."""

    async def play(self, link: Link, session: TapeSession) -> None:
        """The session's tape in 1 MiB chunks."""
        await session.go.wait()
        view = memoryview(session.blob)
        session.first_byte_at = time.monotonic()
        for offset in range(0, len(view), CHUNK_BYTES):
            await link.send_bytes(view[offset : offset + CHUNK_BYTES])
        session.sent_all_at = time.monotonic()


def _tape(lines: Sequence[bytes], laps: int, span: int) -> tuple[bytes, int, int]:
    """
    ``(encoded frames, frames, events)`` of ``lines`` repeated ``laps`` times,
    each lap's timestamps ``span`` ms after the previous one's.
    """
    events = sum(len(v) if isinstance(v := orjson.loads(line), list) else 1 for line in lines)
    shifted = (shift_timestamps(line, lap * span) for lap in range(laps) for line in lines)
    return b"".join(text_frames(shifted)), len(lines) * laps, events * laps


def _lines_of(lines: Sequence[bytes], tokens: set[str]) -> list[bytes]:
    """The frames that name one of ``tokens`` (each frame after the first is one market's)."""
    encoded = [t.encode() for t in tokens]
    return [line for line in lines if any(t in line for t in encoded)]


@attrs.frozen
class Tapes:
    """
    The work, the same for one daemon and for two: the first frame (every book),
    then each partition's frames repeated so that both partitions carry about
    ``laps`` x half the capture's frames (their markets are not equally busy:
    unequal halves would measure the busier half, not the pair). One daemon is
    sent ``first + half 0 + half 1``; each of two ``first + its half``.
    """

    tokens: list[set[str]]  # per partition
    first: tuple[bytes, int, int]
    halves: list[tuple[bytes, int, int]]

    @classmethod
    def build(cls, laps: int) -> Tapes:
        """From the capture and its markets (partition of each market: :func:`partition_of`)."""
        lines = capture_lines(CAPTURE_TAPE)
        span = lap_offset_ms(lines)
        tokens: list[set[str]] = [set() for _ in range(PARTITIONS)]
        for market in load_markets():
            tokens[partition_of(market.id, PARTITIONS)].update(market.tokens)
        halves = []
        for part in tokens:
            mine = _lines_of(lines[1:], part)
            repeat = max(1, round(laps * len(lines) / PARTITIONS / len(mine)))
            halves.append(_tape(mine, repeat, span))
        return cls(tokens, _tape(lines[:1], 1, span), halves)

    def of(self, tokens: set[str] | None) -> tuple[bytes, int, int]:
        """The tape of the daemon holding ``tokens`` (None: every partition)."""
        parts = [h for t, h in zip(self.tokens, self.halves, strict=True) if tokens in (None, t)]
        if not parts:
            raise BenchError(f"{len(tokens or ())} tokens are no partition's")
        chosen = [self.first, *parts]
        return (
            b"".join(b for b, _, _ in chosen),
            sum(f for _, f, _ in chosen),
            sum(e for _, _, e in chosen),
        )


async def _held(daemon: DaemonProcess) -> tuple[str, int]:
    """``(member id, partitions held)`` from ``/health`` (``("", 0)`` until it answers)."""
    health = await daemon.try_health()
    cluster = (health or {}).get("cluster") or {}
    return str(cluster.get("member", "")), int(cluster.get("partitions", 0))


async def _until(check: Any, limit_s: float, what: str) -> None:
    """Poll ``check()`` every 50 ms (another process: nothing to wait on); BenchError after ``limit_s``."""
    with trio.move_on_after(limit_s):
        while True:
            if await check():
                return
            await trio.sleep(0.05)
    raise BenchError(f"{what}: not within {limit_s:g} s")


def _tokens_of(dsn: str, member: str) -> set[str]:
    """The tokens of the markets in ``member``'s partitions (``cluster_leases``)."""
    with psycopg.connect(dsn) as conn:
        parts = {
            p
            for (p,) in conn.execute(
                "SELECT partition FROM cluster_leases WHERE owner = %s", [member]
            )
        }
        rows = conn.execute("SELECT id, clob_token_ids FROM markets").fetchall()
    return {
        t for market, tokens in rows if partition_of(market, PARTITIONS) in parts for t in tokens
    }


async def _read_all(daemon: DaemonProcess, frames: int) -> float:
    """
    When the daemon read the last of ``frames`` data frames (``time.monotonic()``,
    one clock for every process here): the answer's time minus its shards'
    youngest ``last_frame_age_s``. So ``/health`` is asked only every 100 ms
    (building it is work on the measured daemon) and the end is still exact.
    """
    while True:
        health = await daemon.try_health()
        if health is not None and data_frames(health) >= frames:
            ages = [s["last_frame_age_s"] for s in health["shards"] if s["last_frame_age_s"]]
            return time.monotonic() - min(ages, default=0.0)
        daemon.ensure_running()
        await trio.sleep(0.1)


async def _throughput(admin_dsn: str, daemons: int, tapes: Tapes, log_dir: Path) -> dict[str, Any]:
    sender = TapeSender()
    name = f"polystream_benchscale_{os.getpid()}_{daemons}"
    with throwaway_database(admin_dsn, name) as dsn:
        await trio.to_thread.run_sync(prepare_database, dsn, load_markets())
        await trio.to_thread.run_sync(checkpoint, dsn)
        async with trio.open_nursery() as nursery:
            await nursery.start(sender.serve)
            async with contextlib.AsyncExitStack() as stack:
                running: list[tuple[DaemonProcess, TapeSession]] = []
                for index in range(daemons):
                    session = sender.expect(TapeSession())
                    daemon = await stack.enter_async_context(
                        open_daemon(
                            dsn,
                            sender.url,
                            log_dir / f"scale-{daemons}-{index}.log",
                            settings=SETTINGS,
                            cwd=ROOT,
                        )
                    )
                    with trio.fail_after(60):
                        await daemon.wait_for(session.connected)
                    core = worker_cpus(daemons)[index]
                    if core is not None:  # as `polystream run --workers` places them
                        os.sched_setaffinity(daemon.pid, {core})
                    running.append((daemon, session))

                async def balanced() -> bool:
                    held = [(await _held(d))[1] for d, _ in running]
                    return held == [PARTITIONS // daemons] * daemons

                await _until(balanced, 30, "partitions not split evenly")
                sets = []
                for daemon, session in running:
                    member, _ = await _held(daemon)
                    tokens = await trio.to_thread.run_sync(_tokens_of, dsn, member)
                    sets.append(tokens)
                    session.blob, session.frames, session.events = tapes.of(
                        None if daemons == 1 else tokens
                    )
                before = [data_frames(await d.health()) for d, _ in running]
                cpu = [d.cpu_seconds() for d, _ in running]
                for _, session in running:
                    session.go.set()
                ends = []
                with trio.fail_after(300):
                    for (daemon, session), seen in zip(running, before, strict=True):
                        ends.append(await _read_all(daemon, seen + session.frames))
                cpu = [d.cpu_seconds() - c for (d, _), c in zip(running, cpu, strict=True)]
                starts = [s.first_byte_at for _, s in running]
                assert all(s is not None for s in starts)
                elapsed = max(ends) - min(s for s in starts if s is not None)
                codes = [await d.stop() for d, _ in running]
            nursery.cancel_scope.cancel()
    union = set().union(*sets)
    problems = []
    if sum(map(len, sets)) != len(union) or len(union) != 12:
        problems.append(f"token sets overlap or miss tokens: {[len(s) for s in sets]}")
    if sender.unexpected:
        problems.append(f"{sender.unexpected} reconnects")
    if any(codes):
        problems.append(f"exit codes {codes}")
    events = sum(s.events for _, s in running)
    return {
        "daemons": daemons,
        "events": events,
        "frames": [s.frames for _, s in running],
        "elapsed_s": elapsed,
        "events_per_s": events / elapsed,
        "cpu_s": cpu,
        "problems": problems,
    }


# ------------------------------------------------------------------ failover


def _spawn(dsn: str, url: str, log: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("POLYSTREAM_")}
    env.update(
        POLYSTREAM_DATABASE__DSN=dsn,
        POLYSTREAM_FEED__URL=url,
        POLYSTREAM_FEED__CLUSTER="true",
        POLYSTREAM_HEALTH__LISTEN=f"127.0.0.1:{port}",
        POLYSTREAM_LOG__FORMAT="json",
    )
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "polystream", "run"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def _failover(admin_dsn: str, kills: int, log_dir: Path) -> dict[str, Any]:
    from polystream.replay import ReplayServer, serve_replay

    times: list[float] = []
    partitions = FeedConfig().cluster_partitions  # the daemons run with the defaults
    with throwaway_database(admin_dsn, f"polystream_benchfail_{os.getpid()}") as dsn:
        await trio.to_thread.run_sync(prepare_database, dsn, load_markets())
        async with trio.open_nursery() as nursery:
            server: ReplayServer = await nursery.start(
                lambda task_status: serve_replay(
                    [CAPTURE_TAPE], speed=50.0, loop=True, task_status=task_status
                )
            )
            url = f"ws://127.0.0.1:{server.port}/ws/market"

            def covered(connections: int) -> bool:
                sets = [s for s in server.subscriptions().values() if s]
                union = frozenset().union(*sets)
                return len(sets) <= connections and sum(map(len, sets)) == len(union) == 12

            async def both_hold() -> bool:
                with psycopg.connect(dsn) as conn:
                    rows = conn.execute(
                        "SELECT owner, count(*) FROM cluster_leases"
                        " WHERE expires_at > now() GROUP BY owner"
                    ).fetchall()
                return len(rows) == 2 and sum(n for _, n in rows) == partitions and covered(2)

            processes = [
                _spawn(dsn, url, log_dir / f"failover-{i}.log", free_port()) for i in range(2)
            ]
            try:
                for kill in range(kills):
                    await _until(both_hold, 60, "two daemons not holding every partition")
                    victim = processes.pop(kill % 2)
                    victim.send_signal(signal.SIGKILL)
                    killed_at = time.monotonic()
                    await trio.to_thread.run_sync(victim.wait)

                    async def one_covers() -> bool:
                        return covered(1)

                    await _until(one_covers, 30, f"kill {kill + 1}: not covered again")
                    times.append(time.monotonic() - killed_at)
                    progress(f"kill {kill + 1}: covered again in {times[-1]:.2f} s")
                    processes.insert(
                        kill % 2, _spawn(dsn, url, log_dir / f"failover-{kill}.log", free_port())
                    )
            finally:
                for process in processes:
                    process.send_signal(signal.SIGTERM)
                for process in processes:
                    await trio.to_thread.run_sync(process.wait)
            nursery.cancel_scope.cancel()
    return {
        "kills": len(times),
        "times_s": times,
        "p50_s": quantile(times, 0.5),
        "p99_s": quantile(times, 0.99),
        "max_s": max(times),
    }


async def bench(
    admin_dsn: str, laps: int, rounds: int, kills: int, log_dir: Path
) -> dict[str, Any]:
    """``rounds`` interleaved rounds of one daemon then two daemons, then the kills."""
    ones, twos = [], []
    tapes = Tapes.build(laps)
    for round_no in range(1, rounds + 1):
        ones.append(await _throughput(admin_dsn, 1, tapes, log_dir))
        twos.append(await _throughput(admin_dsn, 2, tapes, log_dir))
        progress(
            f"round {round_no}: one daemon {ones[-1]['events_per_s']:,.0f} events/s,"
            f" two daemons {twos[-1]['events_per_s']:,.0f} events/s"
        )
    failover = await _failover(admin_dsn, kills, log_dir)
    return {"one": ones, "two": twos, "failover": failover}


def main(argv: Sequence[str] | None = None) -> int:
    """Run it; 1 when a correctness check failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--laps", type=int, default=8, help="Capture repetitions per run.")
    parser.add_argument("--rounds", type=int, default=5, help="Interleaved rounds (median).")
    parser.add_argument("--kills", type=int, default=10, help="kill -9s for the failover time.")
    add_output_options(parser, "results-scaleout")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack, bench_setup() as (admin_dsn, machine):
        log_dir = log_directory(stack, args.log_dir, "polystream-benchscale-logs-")
        runs = trio.run(bench, admin_dsn, args.laps, args.rounds, args.kills, log_dir)
    fail = runs["failover"]
    ratios = sorted(
        t["events_per_s"] / o["events_per_s"] for o, t in zip(runs["one"], runs["two"], strict=True)
    )
    ratio = quantile(ratios, 0.5)
    one = {"events_per_s": quantile([r["events_per_s"] for r in runs["one"]], 0.5)}
    two = {"events_per_s": quantile([r["events_per_s"] for r in runs["two"]], 0.5)}
    problems = [p for r in runs["one"] + runs["two"] for p in r["problems"]]
    document = {
        "machine": machine,
        "capture": f"{CAPTURE.relative_to(ROOT)}.jsonl.gz",
        "scaleout": {
            "one_daemon_events_per_s": one["events_per_s"],
            "two_daemons_events_per_s": two["events_per_s"],
            "scale_ratio": ratio,
            "scale_ratio_min_max": [ratios[0], ratios[-1]],
            "failover_p50_s": fail["p50_s"],
            "failover_p99_s": fail["p99_s"],
            "failover_max_s": fail["max_s"],
            "failover_kills": fail["kills"],
        },
        "runs": runs,
        "problems": problems,
    }
    table = "\n".join(
        [
            f"Scale-out: the capture x {args.laps}, feed.cluster_partitions {PARTITIONS} for "
            f"throughput (6 markets split 3/3), median of {args.rounds} interleaved rounds; "
            f"the defaults (64 partitions, TTL 3 s) for failover; "
            f"{machine['cpu_count']} CPUs, {machine['date']}.",
            "",
            "| Measurement | Value | Unit |",
            "| --- | ---: | --- |",
            f"| One daemon | {one['events_per_s']:,.0f} | events/s |",
            f"| Two daemons (same tape, split by partition) | {two['events_per_s']:,.0f} | events/s |",
            f"| **Two / one (scale ratio)** | {ratio:.2f} | min-max {ratios[0]:.2f}-{ratios[-1]:.2f}; goal >= 1.6 |",
            f"| Failover after kill -9, p50 | {fail['p50_s']:.2f} | s (kill to every market covered) |",
            f"| Failover after kill -9, p99 | {fail['p99_s']:.2f} | s, over {fail['kills']} kills (goal <= 5) |",
            f"| Failover after kill -9, max | {fail['max_s']:.2f} | s |",
            "",
            f"Correctness: {len(problems)} problems{': ' + '; '.join(problems) if problems else ''}.",
            "",
        ]
    )
    write_results(args.out, "results-scaleout", document, table)
    return exit_status(problems)


if __name__ == "__main__":
    sys.exit(main())

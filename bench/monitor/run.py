"""
One monitor-benchmark run: a database cloned from a template, the before-tape
predictions, ``polystream run`` (``feed.ping_interval = 1``) against the sender,
the tape, the after-tape predictions, SIGTERM; what was seen meanwhile
(:class:`Measured`) and what the database holds afterwards.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import trio

from bench.harness import (
    ROOT,
    DaemonLog,
    Market,
    checkpoint,
    data_frames,
    profiling,
    throwaway_database,
)
from bench.looplag import read_lag
from bench.monitor.database import NotifyListener, Outcome, insert_predictions, read_outcome
from bench.monitor.predictions import (
    EARLY_DUE_S,
    LOAD_WITHIN_S,
    MARGIN_S,
    PredictionPlan,
    make_predictions,
    mix_counts,
)
from bench.monitor.recording import AskFacts, Recording
from bench.monitor.rules import RuleBook
from bench.monitor.sender import Playback, Sender
from polystream.ops.daemon import DaemonProcess, open_daemon

PING_INTERVAL = 1.0
POLL_INTERVAL = 0.1
LAG_READ_AHEAD_S = 0.2  # the loop-lag histogram is read this long before the tape starts


@attrs.frozen
class RunSpec:
    """One daemon run: its template database, rules, predictions and tape."""

    name: str
    template: str
    rules: RuleBook | None
    predictions: int
    repeat: int
    speed: float | None
    settings: dict[str, object] = attrs.field(factory=dict)  # more daemon settings


@attrs.frozen
class Context:
    """What every run shares: the database server, the tape and its facts, the sender."""

    admin_dsn: str
    recording: Recording
    facts: AskFacts
    markets: list[Market]
    sender: Sender
    log_dir: Path
    profile_dir: Path | None
    seed: int


@attrs.define
class Measured:
    """What was seen while the daemon ran (monotonic seconds unless ``_wall``: epoch s)."""

    playback: Playback
    spawned_at: float
    connected_at: float
    read_at: float = 0.0
    applied_wall: float = 0.0
    quiet_at: float = 0.0
    settled: bool = False
    inserted_wall: float | None = None
    loaded_in_s: float | None = None
    after_settled: bool = True
    stop_wall: float = 0.0
    cpu_s: float = 0.0
    peak_rss_kib: int = 0
    max_backlog: int = 0
    loop_lag: dict[str, Any] = attrs.field(factory=dict)  # the tape's stretch (checks.summarize)
    loop_lag_run: dict[str, Any] = attrs.field(factory=dict)  # subscribed -> SIGTERM
    health: dict[str, Any] = attrs.field(factory=dict)
    daemon_pongs: int = 0
    pings: int = 0
    answered: int = 0
    exit_code: int | None = None
    log_problems: list[str] = attrs.field(factory=list)  # warnings, errors, non-JSON lines
    decided_at: dict[int, float] = attrs.field(factory=dict)  # trigger id -> monotonic s
    deferral_lines: Counter[int] = attrs.field(factory=Counter)  # prediction id -> lines
    after_plans: list[PredictionPlan] = attrs.field(factory=list)


@attrs.frozen
class RunRecord:
    """
    A finished run: what was seen, every notification (``time.monotonic()`` on
    receipt, channel, payload), the database's outcome, every prediction planned.
    """

    spec: RunSpec
    measured: Measured
    received: list[tuple[float, str, str]]
    outcome: Outcome
    plans: list[PredictionPlan]


def _decided_total(health: dict[str, Any]) -> int:
    fired = health["monitor"]["triggers"]
    return int(fired.get("prediction", 0) + fired.get("prediction_skipped", 0))


def _settled(health: dict[str, Any], expected: int) -> bool:
    monitor = health["monitor"]
    fired = monitor["triggers"]
    tpsl = fired.get("take_profit", 0) + fired.get("stop_loss", 0)
    written = monitor["triggers_written"] + monitor["triggers_duplicate"]
    return bool(tpsl >= expected and written == sum(fired.values()))


async def _follow(m: Measured, daemon: DaemonProcess, expected: int) -> None:
    """
    Poll ``/health`` until every frame is read and applied (the router's
    queue empty: the router applies a frame without a checkpoint, so a
    ``/health`` answer never falls inside one), then until every decision is
    written.
    """
    playback = m.playback
    while True:
        await trio.sleep(POLL_INTERVAL)
        health = await daemon.health()
        read = data_frames(health)
        m.max_backlog = max(m.max_backlog, playback.frames_sent - read)
        if playback.sent_all.is_set() and read >= playback.total_frames:
            if not m.read_at:
                m.read_at = time.monotonic()
            if health["pending"]["router_queue"] == 0:
                m.applied_wall = time.time()
                break
    calm = 0
    with trio.move_on_after(60):
        while calm < 3:
            calm = calm + 1 if _settled(await daemon.health(), expected) else 0
            await trio.sleep(POLL_INTERVAL)
        m.settled = True
    m.quiet_at = time.monotonic()


async def _after_tape(
    m: Measured, spec: RunSpec, ctx: Context, dsn: str, daemon: DaemonProcess
) -> None:
    """
    Insert the after-tape predictions (decided on the final books), check
    that the daemon loaded them all within LOAD_WITHIN_S (in memory or
    decided: ``/health`` monitor ``predictions`` + prediction triggers),
    wait MARGIN_S past the last short deadline, then until every decision is
    written (<= 30 s).
    """
    now = time.time()
    plans = make_predictions(spec.predictions, ctx.markets, ctx.facts, "after_tape", now, ctx.seed)
    m.after_plans = plans
    known = len(plans) + sum(
        n for _, phase, n in mix_counts(spec.predictions) if phase == "before_tape"
    )
    await trio.to_thread.run_sync(insert_predictions, dsn, plans)
    m.inserted_wall = time.time()
    with trio.move_on_after(LOAD_WITHIN_S):
        while True:
            health = await daemon.health()
            if health["monitor"]["predictions"] + _decided_total(health) == known:
                m.loaded_in_s = time.time() - m.inserted_wall
                break
            await trio.sleep(0.02)
    short = [t for p in plans for t in (p.decision_at, p.closes_at) if t < now + 60]
    await trio.sleep(max(0.0, max(short, default=now) + MARGIN_S - time.time()))
    m.after_settled = False
    with trio.move_on_after(30):
        while True:  # another process: nothing to wait on but its answers
            if _settled(await daemon.health(), 0):
                m.after_settled = True
                break
            await trio.sleep(POLL_INTERVAL)


async def _settle_heartbeat(m: Measured, daemon: DaemonProcess) -> None:
    """Wait (<= 3 s) until the daemon has read a PONG for every PING the sender had received."""
    m.pings = len(m.playback.pings)
    m.answered = m.playback.pongs
    with trio.move_on_after(3):
        while True:
            m.health = await daemon.health()
            m.daemon_pongs = int(m.health["control_frames"].get("PONG", 0))
            if m.daemon_pongs >= m.pings:
                break
            await trio.sleep(POLL_INTERVAL)


async def _measure(spec: RunSpec, ctx: Context, dsn: str, planned_at: float) -> Measured:
    """
    Run the daemon: the tape starts MARGIN_S after the subscription and
    MARGIN_S after the last before-tape decision time (every run, so that
    runs compare), CPU is counted from the tape's first byte to the end of
    the tape's decisions, and loop lag (``bench.looplag``) from
    LAG_READ_AHEAD_S before that first byte to the same end (and over the
    whole run, subscribed to SIGTERM); then the after-tape predictions, then
    SIGTERM.
    """
    cuts = spec.rules.cut_frames if spec.rules is not None else frozenset()
    playback = ctx.sender.expect(Playback(ctx.recording, spec.repeat, spec.speed, cuts))
    log_path = ctx.log_dir / f"daemon-{spec.name}.log"
    profile = None
    if ctx.profile_dir is not None and spec.name == "loaded":
        profile = ctx.profile_dir / f"daemon-{spec.name}.txt"
    settings = {"feed__ping_interval": PING_INTERVAL, **spec.settings}
    async with open_daemon(dsn, ctx.sender.url, log_path, settings=settings, cwd=ROOT) as daemon:
        with trio.fail_after(120):
            await daemon.wait_for(playback.connected)
        m = Measured(playback, daemon.spawned_at, time.monotonic())
        lag_run = await read_lag(daemon)
        playback.hold_until = max(time.time(), planned_at + EARLY_DUE_S[1]) + MARGIN_S
        playback.go.set()
        await trio.sleep(max(0.0, playback.hold_until - LAG_READ_AHEAD_S - time.time()))
        lag_tape = await read_lag(daemon)
        await playback.started.wait()
        cpu_start = daemon.cpu_seconds()
        async with profiling(daemon.pid, profile):
            await _follow(m, daemon, 0 if spec.rules is None else len(spec.rules.expected))
            m.cpu_s = daemon.cpu_seconds() - cpu_start
            m.loop_lag = (await read_lag(daemon)).since(lag_tape).figures()
            if spec.predictions:
                await _after_tape(m, spec, ctx, dsn, daemon)
            await _settle_heartbeat(m, daemon)
            m.peak_rss_kib = daemon.peak_rss_kib()
            m.loop_lag_run = (await read_lag(daemon)).since(lag_run).figures()
            m.stop_wall = time.time()
        m.exit_code = await daemon.stop()
    log = DaemonLog.read(log_path)
    m.log_problems = log.problems()
    m.decided_at = _decisions(log)
    m.deferral_lines = Counter(int(r["prediction_id"]) for r in log.events("prediction_deferred"))
    return m


def _decisions(log: DaemonLog) -> dict[int, float]:
    """
    Trigger id -> when the monitor decided (``trigger_written`` log lines carry
    ``decided_at``, wall-clock epoch seconds), moved onto ``time.monotonic()``.
    """
    offset = time.time() - time.monotonic()
    decided: dict[int, float] = {}
    for record in log.events("trigger_written"):
        with contextlib.suppress(KeyError, TypeError, ValueError):
            decided[int(record["trigger_id"])] = float(record["decided_at"]) - offset
    return decided


async def run_daemon(spec: RunSpec, ctx: Context) -> RunRecord:
    """Clone the template, add predictions, run and measure the daemon, read the outcome."""
    name = f"polystream_benchmon_{os.getpid()}_{spec.name}"
    with throwaway_database(ctx.admin_dsn, name, template=spec.template) as dsn:
        await trio.to_thread.run_sync(checkpoint, dsn)  # earlier runs' writes: not in this one
        planned_at = time.time()
        plans: list[PredictionPlan] = []
        if spec.predictions:
            plans = make_predictions(
                spec.predictions, ctx.markets, ctx.facts, "before_tape", planned_at, ctx.seed
            )
            await trio.to_thread.run_sync(insert_predictions, dsn, plans)
        listener = await trio.to_thread.run_sync(NotifyListener, dsn)
        try:
            measured = await _measure(spec, ctx, dsn, planned_at)
        finally:
            await trio.to_thread.run_sync(listener.stop)
        outcome = await trio.to_thread.run_sync(read_outcome, dsn)
    return RunRecord(spec, measured, listener.received, outcome, plans + measured.after_plans)

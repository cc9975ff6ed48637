"""
What a monitor-benchmark run says: its figures (throughput, CPU, latency from
the crossing frame's stamp to the trigger's NOTIFY, PING jitter) and its exact
checks (every crossed rule fired once at the right price and nothing else; every
prediction as :func:`~bench.monitor.expected.expected_outcome` says, with its
``prediction_deferred`` lines; ``/health`` counting what is pending).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from bench.monitor.database import RELOAD_CHANNELS, TRIGGERS, Outcome, PredictionRow
from bench.monitor.expected import Expected, Moments, Unattributable, expected_outcome
from bench.monitor.predictions import LOAD_WITHIN_S, PredictionPlan
from bench.monitor.recording import AskFacts
from bench.monitor.rules import RuleBook
from bench.monitor.run import PING_INTERVAL, Context, Measured, RunRecord
from bench.monitor.sender import Playback


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _spread(values: Sequence[float]) -> dict[str, Any]:
    return {
        "count": len(values),
        "p50": percentile(values, 0.5),
        "p99": percentile(values, 0.99),
        "max": max(values) if values else None,
    }


def _tpsl_outcome(
    rules: RuleBook | None,
    triggers: list[tuple[Any, ...]],
    playback: Playback,
    notified: dict[int, float],
    decided: dict[int, float],
) -> dict[str, Any]:
    """Exactly once, at the right price, nothing else; latency of each crossed rule."""
    expected = rules.expected if rules is not None else {}
    rows = [row for row in triggers if row[2] is not None]
    per_position = Counter(int(row[2]) for row in rows)
    wrong = []
    latencies, to_decision, to_notify = [], [], []
    for tid, kind, position_id, _, price, _ in rows:
        want = expected.get(int(position_id))
        if want is None:
            continue
        if (kind, price) != (want.kind, want.price):
            wrong.append([int(position_id), kind, str(price), want.kind, str(want.price)])
        sent = playback.sent_at[want.frame]
        if tid in notified:
            latencies.append((notified[tid] - sent) * 1000)
        if tid in decided:
            to_decision.append((decided[tid] - sent) * 1000)
            if tid in notified:
                to_notify.append((notified[tid] - decided[tid]) * 1000)
    missing = sorted(pid for pid in expected if per_position[pid] == 0)
    duplicates = sorted(pid for pid, n in per_position.items() if n > 1)
    unexpected = sorted(pid for pid in per_position if pid not in expected)
    silent = [int(row[0]) for row in triggers if row[0] not in notified]
    counts = {
        "missing": len(missing),
        "duplicates": len(duplicates),
        "unexpected": len(unexpected),
        "wrong_kind_or_price": len(wrong),
        "without_notify": len(silent),  # any trigger row, positions' or predictions'
    }
    return {
        "expected": len(expected),
        "fired_once": sum(1 for pid in expected if per_position[pid] == 1),
        "counts": counts,
        "differences": sum(counts.values()),
        "missing": missing[:20],
        "duplicates": duplicates[:20],
        "unexpected": unexpected[:20],
        "wrong_kind_or_price": wrong[:20],
        "triggers_without_notify": silent[:20],
        "latency_ms": _spread(latencies),
        "frame_to_decision_ms": _spread(to_decision),
        "decision_to_notify_ms": _spread(to_notify),
        "latency_ms_all": sorted(latencies),
    }


def _prediction_outcome(
    plans: list[PredictionPlan], outcome: Outcome, m: Measured, facts: AskFacts
) -> dict[str, Any]:
    """
    Every prediction against its :func:`expected_outcome` (:func:`_check_plans`),
    no trigger for an unplanned one, and the run's own checks
    (:func:`_run_checks`); the tallies and differences, JSON-ready.
    """
    if not plans:
        return {"loaded": 0, "differences": 0, "counts": {}}
    assert m.playback.first_byte_wall is not None
    moments = Moments(m.playback.first_byte_wall, m.applied_wall, m.inserted_wall, m.stop_wall)
    triggers: dict[int, list[tuple[Any, ...]]] = {}
    for row in outcome.triggers:
        if row[3] is not None:
            triggers.setdefault(int(row[3]), []).append(row)
    tally, found = _check_plans(plans, facts, moments, triggers, outcome, m.deferral_lines)
    for pid, rows in sorted(triggers.items()):  # what _check_plans did not take
        found.append(("unexpected", f"prediction {pid} not planned: {rows}"))
    found += _run_checks(m, tally)
    classes = ("due_decided", "due_deferred", "not_due")
    return {
        "loaded": len(plans),
        "expected": {k: tally[k] for k in classes},
        "as_expected": {k: tally[f"{k}_ok"] for k in classes},
        "deferral_lines": {"expected": tally["deferral_lines"], "ok": tally["deferral_lines_ok"]},
        "deferrals_counted": (m.health.get("monitor") or {}).get("prediction_deferrals"),
        "differences": len(found),
        "counts": dict(Counter(kind for kind, _ in found)),
        "difference_sample": [f"{kind}: {what}" for kind, what in found[:30]],
        "reasons": dict(Counter(str(row[5]) for row in outcome.triggers if row[3] is not None)),
        "loaded_in_s": m.loaded_in_s,
        "timeline_s": {
            "applied": moments.applied - moments.tape,
            "inserted": None if moments.inserted is None else moments.inserted - moments.tape,
            "stop": moments.stop - moments.tape,
        },
    }


def _check_plans(
    plans: list[PredictionPlan],
    facts: AskFacts,
    moments: Moments,
    triggers: dict[int, list[tuple[Any, ...]]],
    outcome: Outcome,
    deferral_lines: Counter[int],
) -> tuple[Counter[str], list[tuple[str, str]]]:
    """
    Each plan against its expectation (:func:`_compare`) and its
    ``prediction_deferred`` lines (one if deferred, else none); takes the
    plan's rows out of ``triggers``. Returns the tally (per class: expected,
    and ``<class>_ok`` as expected) and the differences ``(kind, what)``.
    """
    tally: Counter[str] = Counter()
    found: list[tuple[str, str]] = []
    for plan in plans:
        try:
            want = expected_outcome(plan, facts, moments)
        except Unattributable as exc:
            found.append(("unattributable", f"{plan.id} ({plan.group}): {exc}"))
            continue
        label = "due_decided" if want.status != "pending" else "not_due"
        if want.still_deferred:
            label = "due_deferred"
        tally[label] += 1
        problems = _compare(plan, want, triggers.pop(plan.id, []), outcome.predictions.get(plan.id))
        lines = deferral_lines.get(plan.id, 0)
        tally["deferral_lines"] += want.deferred
        if lines != int(want.deferred):
            problems.append(("deferral_log", f"{plan.id} ({plan.group}): {lines} lines"))
        elif want.deferred:
            tally["deferral_lines_ok"] += 1
        if not problems:
            tally[f"{label}_ok"] += 1
        found += problems
    return tally, found


def _compare(
    plan: PredictionPlan, want: Expected, got: list[tuple[Any, ...]], row: PredictionRow | None
) -> list[tuple[str, str]]:
    """How the trigger rows and the predictions row of ``plan`` differ from ``want``."""
    name = f"{plan.id} ({plan.group})"
    if row is None:
        return [("missing", f"{name}: no predictions row")]
    status, price, reason, decided_at = row
    if len(got) > 1:
        return [("duplicate", f"{name}: {len(got)} triggers")]
    if want.kind is None:
        if got or status != "pending":
            return [("extra", f"{name}: {status} {got}, expected pending")]
        return []
    if not got:
        return [("missing", f"{name}: {status}, expected {want.status} {want.reason} {want.price}")]
    _, kind, _, _, trigger_price, trigger_reason = got[0]
    problems = []
    if (kind, trigger_reason, trigger_price) != (want.kind, want.reason, want.price):
        problems.append(
            (
                "wrong",
                f"{name}: trigger {kind} {trigger_reason} {trigger_price}, expected "
                f"{want.kind} {want.reason} {want.price}",
            )
        )
    if (status, reason, price) != (want.status, want.reason, want.price):
        problems.append(("wrong", f"{name}: row {status} {reason} {price}"))
    early = want.not_before is not None and (decided_at or 0) < want.not_before - 0.001
    if early:
        problems.append(("early", f"{name}: decided at {decided_at}, not before {want.not_before}"))
    return problems


def _run_checks(m: Measured, tally: Counter[str]) -> list[tuple[str, str]]:
    """The run's own preconditions and ``/health`` at the end, against the tally."""
    found: list[tuple[str, str]] = []
    if m.inserted_wall is not None and m.loaded_in_s is None:
        found.append(("setup", f"after-tape predictions not loaded within {LOAD_WITHIN_S} s"))
    if not m.after_settled:
        found.append(("setup", "after-tape decisions not all written within 30 s"))
    monitor = m.health.get("monitor") or {}
    counted = (monitor.get("prediction_deferrals") or {}).get("no_price", 0)
    if counted < tally["deferral_lines"]:  # every look counts: at least one per deferred one
        found.append(("health", f"{counted} deferrals counted, {tally['deferral_lines']} deferred"))
    pending = tally["due_deferred"] + tally["not_due"]
    got = (monitor.get("predictions"), monitor.get("predictions_deferred"))
    if got != (pending, tally["due_deferred"]):
        found.append(
            (
                "health",
                f"/health predictions, deferred {got}, expected {pending, tally['due_deferred']}",
            )
        )
    return found


def _heartbeat(m: Measured) -> dict[str, Any]:
    """PING intervals while the tape was being played and decisions written."""
    playback = m.playback
    start = playback.first_byte_at or m.connected_at
    pings = [t for t in playback.pings if start <= t <= m.quiet_at]
    intervals = [b - a for a, b in itertools.pairwise(pings)]
    jitter = [abs(i - PING_INTERVAL) * 1000 for i in intervals]
    shards = m.health.get("shards", [])
    return {
        "pings_in_window": len(pings),
        "pings_received": m.pings,
        "pongs_sent": m.answered,
        "pongs_read_by_daemon": m.daemon_pongs,
        "missed_pongs": max(0, m.pings - m.daemon_pongs),
        "jitter_ms": _spread(jitter),
        "max_interval_s": max(intervals) if intervals else None,
        "ping_rtt_ms": [
            None if s.get("ping_rtt_s") is None else s["ping_rtt_s"] * 1000 for s in shards
        ],
        "reconnects": sum(int(s.get("reconnects", 0)) for s in shards),
        "shard_states": [s.get("state") for s in shards],
    }


def summarize(record: RunRecord, ctx: Context) -> dict[str, Any]:
    """One run's figures and correctness checks (JSON-ready)."""
    spec, m, received, outcome = record.spec, record.measured, record.received, record.outcome
    playback = m.playback
    events = ctx.recording.events * spec.repeat
    assert playback.first_byte_at is not None
    notified = {int(payload): t for t, channel, payload in received if channel == TRIGGERS}
    elapsed = m.read_at - playback.first_byte_at
    window = m.quiet_at - playback.first_byte_at
    triggers = outcome.triggers
    return {
        "name": spec.name,
        "repeat": spec.repeat,
        "speed": spec.speed,
        "frames": playback.total_frames,
        "events": events,
        "rules": 0 if spec.rules is None else 2 * len(spec.rules.rows),
        "startup_s": m.connected_at - m.spawned_at,
        "elapsed_s": elapsed,
        "events_per_s": events / elapsed,
        "settled": m.settled,
        "cpu_s": m.cpu_s,
        "cpu_window_s": window,
        "cpu_us_per_event": m.cpu_s / events * 1e6,
        "cpu_busy": m.cpu_s / window,
        "peak_rss_mib": m.peak_rss_kib / 1024,
        "max_backlog_frames": m.max_backlog,
        "reload_notifications": sum(
            1 for t, c, _ in received if c in RELOAD_CHANNELS and t <= m.quiet_at
        ),
        "tpsl": _tpsl_outcome(spec.rules, triggers, playback, notified, m.decided_at),
        "predictions": _prediction_outcome(record.plans, outcome, m, ctx.facts),
        "heartbeat": _heartbeat(m),
        "loop_lag": m.loop_lag,
        "loop_lag_run": m.loop_lag_run,
        "health_monitor": m.health.get("monitor"),
        "exit_code": m.exit_code,
        "log_problems": Counter(m.log_problems).most_common(10),
        "unexpected_connections": ctx.sender.unexpected,
        "sender_error": playback.error,
        "other_text_from_daemon": dict(playback.other_text),
    }

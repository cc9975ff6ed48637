"""
The monitor benchmark's results: the document (figures with units, the
correctness of every run), the Markdown table with one correctness line per
run, and what makes the benchmark fail.
"""

from __future__ import annotations

from typing import Any

from bench.harness import CAPTURE, ROOT
from bench.looplag import LAG_METHOD
from bench.monitor.rules import RuleBook
from bench.monitor.run import PING_INTERVAL, Context


def _figure(value: float | None, unit: str, **extra: Any) -> dict[str, Any]:
    return {"value": value, "unit": unit, **extra}


def _latency(run: dict[str, Any], label: str) -> dict[str, Any]:
    spread = run["tpsl"]["latency_ms"]
    return {
        "p50": _figure(spread["p50"], "ms"),
        "p99": _figure(spread["p99"], "ms"),
        "max": _figure(spread["max"], "ms"),
        "count": _figure(spread["count"], "crossed rules"),
        "pacing": label,
        "frame_to_decision_p50": _figure(
            run["tpsl"]["frame_to_decision_ms"]["p50"],
            "ms (monitor's decided_at, from the daemon log)",
        ),
        "frame_to_decision_p99": _figure(
            run["tpsl"]["frame_to_decision_ms"]["p99"],
            "ms (monitor's decided_at, from the daemon log)",
        ),
        "decision_to_notify_p50": _figure(
            run["tpsl"]["decision_to_notify_ms"]["p50"], "ms (executor + database)"
        ),
        "decision_to_notify_p99": _figure(
            run["tpsl"]["decision_to_notify_ms"]["p99"], "ms (executor + database)"
        ),
        "max_backlog": _figure(
            run["max_backlog_frames"], "frames sent but not yet read (sampled every 0.1 s)"
        ),
    }


def _heartbeat_figures(run: dict[str, Any], baseline: str | None) -> dict[str, Any]:
    beat = run["heartbeat"]
    extra = {} if baseline is None else {"baseline": baseline}
    return {
        "jitter_p50": _figure(beat["jitter_ms"]["p50"], "ms |interval - 1 s|", **extra),
        "jitter_p99": _figure(beat["jitter_ms"]["p99"], "ms |interval - 1 s|", **extra),
        "jitter_max": _figure(beat["jitter_ms"]["max"], "ms |interval - 1 s|", **extra),
        "pings": _figure(beat["pings_received"], "PINGs received by the sender"),
        "pongs": _figure(beat["pongs_sent"], "PONGs sent by the sender"),
        "missed_pongs": _figure(beat["missed_pongs"], "PONGs sent but not read by the daemon"),
        "reconnects": _figure(beat["reconnects"] + run["unexpected_connections"], "reconnects"),
        "ping_rtt": _figure(
            beat["ping_rtt_ms"][0] if beat["ping_rtt_ms"] else None,
            "ms (/health ping_rtt_s at the end)",
        ),
        "loop_lag_p99": _figure(
            run["loop_lag"]["p99"]["value"],
            "ms, interpolated in its bucket (tape's first byte -> decisions written)",
            bucket_upper_ms=run["loop_lag"]["p99"]["bucket_upper_ms"],
            **extra,
        ),
        "loop_lag_max": _figure(
            run["loop_lag"]["max"]["value"],
            run["loop_lag"]["max"]["unit"] + " (tape's first byte -> decisions written)",
            exact=run["loop_lag"]["max"]["exact"],
            **extra,
        ),
        "loop_lag_run_p99": _figure(
            run["loop_lag_run"]["p99"]["value"],
            "ms, interpolated in its bucket (subscribed -> SIGTERM)",
        ),
        "loop_lag_run_max": _figure(
            run["loop_lag_run"]["max"]["value"],
            run["loop_lag_run"]["max"]["unit"] + " (subscribed -> SIGTERM)",
        ),
    }


def document(
    runs: dict[str, dict[str, Any]], ctx: Context, book: RuleBook, machine: dict[str, Any]
) -> dict[str, Any]:
    """The results document (JSON-ready): figures with units, correctness per run."""
    loaded, base, paced = runs["loaded"], runs["baseline"], runs["paced"]
    cpu_unit = "daemon CPU µs/event (all threads)"
    return {
        "machine": machine,
        "workload": {
            "capture": f"{CAPTURE.relative_to(ROOT)}.jsonl.gz",
            "frames_per_repetition": len(ctx.recording.frames),
            "events_per_repetition": ctx.recording.events,
            "positions_with_tp_and_sl": len(book.rows),
            "thresholds": 2 * len(book.rows),
            "crossed_positions": len(book.expected),
            "predictions": loaded["predictions"]["loaded"],
            "max_speed_repetitions": loaded["repeat"],
            "paced_speed": paced["speed"],
            "ping_interval_s": PING_INTERVAL,
            "sender_stamps": "per chunk of <= 64 KiB of whole frames; every chunk ends at a "
            "frame that first crosses a rule, so those stamps are per frame",
            "loop_lag_method": LAG_METHOD,
        },
        "latency": {
            "paced": _latency(paced, f"{paced['speed']}x recorded speed"),
            "max_speed": _latency(loaded, "maximum speed: the sender runs ahead of the daemon"),
        },
        "cpu": {
            "loaded_per_event": _figure(
                loaded["cpu_us_per_event"], cpu_unit, baseline="cpu.baseline_per_event"
            ),
            "baseline_per_event": _figure(base["cpu_us_per_event"], cpu_unit),
            "marginal_per_event": _figure(
                loaded["cpu_us_per_event"] - base["cpu_us_per_event"],
                "CPU µs/event: rules + predictions loaded minus none",
                baseline="cpu.baseline_per_event",
            ),
            "loaded_events_per_s": _figure(
                loaded["events_per_s"], "events/s", baseline="cpu.baseline_events_per_s"
            ),
            "baseline_events_per_s": _figure(base["events_per_s"], "events/s"),
            "startup_loaded": _figure(
                loaded["startup_s"], "s from spawn to subscribed", baseline="cpu.startup_baseline"
            ),
            "startup_baseline": _figure(base["startup_s"], "s from spawn to subscribed"),
            "rule_reload_notifications": _figure(
                loaded["reload_notifications"], "NOTIFYs that make the daemon reload its rules"
            ),
        },
        "heartbeat": {
            "loaded": _heartbeat_figures(loaded, "heartbeat.baseline"),
            "baseline": _heartbeat_figures(base, None),
            "paced": _heartbeat_figures(paced, "heartbeat.baseline"),
        },
        "goals": goals(runs),
        "correctness": {
            name: {
                "tpsl": {k: v for k, v in run["tpsl"].items() if k != "latency_ms_all"},
                "predictions": run["predictions"],
                "exit_code": run["exit_code"],
                "log_problems": run["log_problems"],
                "settled": run["settled"],
            }
            for name, run in runs.items()
        },
        "runs": {
            name: {k: v for k, v in run.items() if k not in ("tpsl", "predictions")}
            for name, run in runs.items()
        },
    }


LOOP_LAG_GOAL_MS = 5.0


def goals(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """
    Per run, loop lag p99 <= 5 ms over the tape and 0 missed PONGs: reported,
    not part of correctness (which stays about results: see :func:`failures`).
    """
    found: dict[str, Any] = {}
    for name, run in runs.items():
        p99 = run["loop_lag"]["p99"]["value"]
        found[name] = {
            "loop_lag_p99_within_5_ms": p99 is not None and p99 <= LOOP_LAG_GOAL_MS,
            "no_missed_pong": run["heartbeat"]["missed_pongs"] == 0,
        }
    return found


def _cell(node: dict[str, Any]) -> str:
    value = node["value"]
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"


TABLE = [
    ("Tick to trigger NOTIFY, paced, p50", "latency.paced.p50", None),
    ("Tick to trigger NOTIFY, paced, p99", "latency.paced.p99", None),
    ("Tick to trigger NOTIFY, paced, max", "latency.paced.max", None),
    ("– of which frame to decision, paced, p50", "latency.paced.frame_to_decision_p50", None),
    ("– of which frame to decision, paced, p99", "latency.paced.frame_to_decision_p99", None),
    ("– of which decision to NOTIFY, paced, p50", "latency.paced.decision_to_notify_p50", None),
    ("– of which decision to NOTIFY, paced, p99", "latency.paced.decision_to_notify_p99", None),
    ("Tick to trigger NOTIFY, max speed, p50", "latency.max_speed.p50", None),
    ("Tick to trigger NOTIFY, max speed, p99", "latency.max_speed.p99", None),
    ("Tick to trigger NOTIFY, max speed, max", "latency.max_speed.max", None),
    ("Daemon backlog, max speed, max", "latency.max_speed.max_backlog", None),
    ("Daemon backlog, paced, max", "latency.paced.max_backlog", None),
    ("Daemon CPU per event, rules loaded", "cpu.loaded_per_event", "cpu.baseline_per_event"),
    ("**Monitor CPU per event (marginal)**", "cpu.marginal_per_event", None),
    ("Events/s at max speed, rules loaded", "cpu.loaded_events_per_s", "cpu.baseline_events_per_s"),
    ("Start-up to subscribed, rules loaded", "cpu.startup_loaded", "cpu.startup_baseline"),
    ("Rule reloads requested (NOTIFY)", "cpu.rule_reload_notifications", None),
    (
        "PING jitter p50, max speed, rules",
        "heartbeat.loaded.jitter_p50",
        "heartbeat.baseline.jitter_p50",
    ),
    (
        "PING jitter p99, max speed, rules",
        "heartbeat.loaded.jitter_p99",
        "heartbeat.baseline.jitter_p99",
    ),
    (
        "PING jitter max, max speed, rules",
        "heartbeat.loaded.jitter_max",
        "heartbeat.baseline.jitter_max",
    ),
    (
        "PING jitter p99, paced, rules",
        "heartbeat.paced.jitter_p99",
        "heartbeat.baseline.jitter_p99",
    ),
    ("PINGs / PONGs, max speed, rules", "heartbeat.loaded.pings", "heartbeat.baseline.pings"),
    (
        "Missed PONGs, max speed, rules",
        "heartbeat.loaded.missed_pongs",
        "heartbeat.baseline.missed_pongs",
    ),
    ("Missed PONGs, paced", "heartbeat.paced.missed_pongs", None),
    (
        "Reconnects, max speed, rules",
        "heartbeat.loaded.reconnects",
        "heartbeat.baseline.reconnects",
    ),
    (
        "Loop lag p99, max speed, rules",
        "heartbeat.loaded.loop_lag_p99",
        "heartbeat.baseline.loop_lag_p99",
    ),
    (
        "Loop lag max, max speed, rules",
        "heartbeat.loaded.loop_lag_max",
        "heartbeat.baseline.loop_lag_max",
    ),
    ("Loop lag p99, paced", "heartbeat.paced.loop_lag_p99", "heartbeat.baseline.loop_lag_p99"),
    ("Loop lag max, paced", "heartbeat.paced.loop_lag_max", "heartbeat.baseline.loop_lag_max"),
    ("ping_rtt at the end, paced", "heartbeat.paced.ping_rtt", None),
    (
        "ping_rtt at the end, max speed, rules",
        "heartbeat.loaded.ping_rtt",
        "heartbeat.baseline.ping_rtt",
    ),
]


def _node(doc: dict[str, Any], path: str) -> dict[str, Any]:
    node: Any = doc
    for key in path.split("."):
        node = node[key]
    result: dict[str, Any] = node
    return result


def markdown(doc: dict[str, Any]) -> str:
    """The results table and the correctness lines, as Markdown."""
    work, machine = doc["workload"], doc["machine"]
    lines = [
        f"Monitor: {work['positions_with_tp_and_sl']:,} positions with TP and SL "
        f"({work['thresholds']:,} thresholds, {work['crossed_positions']:,} crossed), "
        f"{work['predictions']:,} pending predictions; `{work['capture']}` x "
        f"{work['max_speed_repetitions']} at max speed and x 1 at {work['paced_speed']}x "
        f"recorded speed; PING every {work['ping_interval_s']} s; {machine['cpu_count']} CPUs, "
        f"Python {machine['python']}, {machine['date']}. One run each; baseline = the same "
        "positions without TP/SL and no predictions.",
        "",
        "| Measurement | Value | Unit | Baseline (no rules) |",
        "| --- | ---: | --- | ---: |",
    ]
    for label, path, baseline in TABLE:
        node = _node(doc, path)
        base = "" if baseline is None else _cell(_node(doc, baseline))
        if path.endswith(".pings"):
            pongs = _node(doc, path.replace(".pings", ".pongs"))
            lines.append(f"| {label} | {_cell(node)} / {_cell(pongs)} | PINGs / PONGs | {base} |")
            continue
        lines.append(f"| {label} | {_cell(node)} | {node['unit']} | {base} |")
    met = "; ".join(
        f"{name}: loop lag p99 <= {LOOP_LAG_GOAL_MS:g} ms "
        f"{'yes' if g['loop_lag_p99_within_5_ms'] else 'NO'}, "
        f"0 missed PONGs {'yes' if g['no_missed_pong'] else 'NO'}"
        for name, g in doc["goals"].items()
    )
    lines += [
        "",
        f"Goals (reported, not part of correctness): {met}.",
        "",
        f"Loop lag: {work['loop_lag_method']}.",
    ]
    lines += ["", "Correctness (exact, against expectations computed from the recording):", ""]
    for name, check in doc["correctness"].items():
        lines.append(f"* {correctness_line(name, check)}")
    return "\n".join(lines) + "\n"


def correctness_line(name: str, check: dict[str, Any]) -> str:
    """One run's correctness: TP/SL, predictions, the daemon's exit and settling."""
    tpsl, pred = check["tpsl"], check["predictions"]
    counts = tpsl["counts"]
    text = (
        f"{name}: TP/SL {tpsl['fired_once']:,}/{tpsl['expected']:,} crossed rules fired exactly "
        f"once; missing {counts['missing']}, duplicates {counts['duplicates']}, unexpected "
        f"{counts['unexpected']}, wrong kind/price {counts['wrong_kind_or_price']}, triggers "
        f"without NOTIFY {counts['without_notify']}; "
    )
    if pred["loaded"]:
        want, ok, lines = pred["expected"], pred["as_expected"], pred["deferral_lines"]
        text += (
            f"predictions: {ok['due_decided']}/{want['due_decided']} due decided as expected, "
            f"{ok['due_deferred']}/{want['due_deferred']} due and deferred as expected (no ask), "
            f"{ok['not_due']}/{want['not_due']} not yet due pending as expected, "
            f"prediction_deferred lines {lines['ok']}/{lines['expected']}, "
            f"{pred['differences']} differences"
        )
    else:
        text += "predictions: none loaded"
    return text + f"; settled {check['settled']}; exit {check['exit_code']}"


def failures(doc: dict[str, Any]) -> list[str]:
    """What makes the benchmark fail: any difference, an unsettled run, a non-zero exit."""
    found = []
    for name, check in doc["correctness"].items():
        if check["tpsl"]["differences"]:
            found.append(f"{name}: TP/SL {check['tpsl']['counts']}")
        if check["predictions"]["differences"]:
            sample = "; ".join(check["predictions"]["difference_sample"][:10])
            found.append(f"{name}: predictions {check['predictions']['counts']}: {sample}")
        if not check["settled"] or check["exit_code"] != 0:
            found.append(f"{name}: settled {check['settled']}, exit {check['exit_code']}")
    return found

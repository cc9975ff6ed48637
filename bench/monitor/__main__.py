"""
``python -m bench.monitor``: the command line; the workload built, the three runs
(``loaded``, ``baseline``, ``paced``) one after another, the results written.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from typing import Any

import trio

from bench.harness import (
    CAPTURE_TAPE,
    add_output_options,
    bench_setup,
    exit_status,
    load_markets,
    log_directory,
    print_hotspots,
    progress,
    write_results,
)
from bench.monitor import __doc__ as DESCRIPTION
from bench.monitor.checks import summarize
from bench.monitor.database import templates
from bench.monitor.recording import AskFacts, Recording
from bench.monitor.report import document, failures, markdown
from bench.monitor.rules import make_rules
from bench.monitor.run import Context, RunSpec, run_daemon
from bench.monitor.sender import Sender


async def run_all(ctx: Context, specs: Sequence[RunSpec]) -> dict[str, dict[str, Any]]:
    """
    Serve the sender and run ``specs`` in order (each within 600 s); returns each run's
    summary.
    """
    runs: dict[str, dict[str, Any]] = {}
    async with trio.open_nursery() as nursery:
        await nursery.start(ctx.sender.serve)
        for spec in specs:
            with trio.fail_after(600):
                runs[spec.name] = run = summarize(await run_daemon(spec, ctx), ctx)
            progress(
                f"{spec.name}: {run['events_per_s']:,.0f} events/s, "
                f"{run['cpu_us_per_event']:.1f} CPU µs/event, trigger latency p50 "
                f"{run['tpsl']['latency_ms']['p50']} ms, PINGs {run['heartbeat']['pings_received']}"
                f", startup {run['startup_s']:.1f} s"
            )
        nursery.cancel_scope.cancel()
    return runs


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.monitor", description=(DESCRIPTION or "").split("\n\n")[0]
    )
    parser.add_argument(
        "--positions", type=int, default=100_000, help="positions with TP and SL (default 100,000)"
    )
    parser.add_argument(
        "--crossed",
        type=int,
        default=1_000,
        help="of which crossed by the recording (default 1,000)",
    )
    parser.add_argument(
        "--predictions", type=int, default=1_000, help="pending predictions (default 1,000)"
    )
    parser.add_argument(
        "--repeat", type=int, default=4, help="repetitions of the capture at max speed (default 4)"
    )
    parser.add_argument(
        "--speed", type=float, default=20.0, help="paced run: x recorded speed (default 20: 45 s)"
    )
    parser.add_argument("--seed", type=int, default=20251211)
    add_output_options(parser, "results-monitor", profile="the loaded max-speed run")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """
    Run the benchmark; writes the results. Returns 1 when any run has a difference (see
    :func:`bench.monitor.report.failures`), else 0.
    """
    args = _parse_args(argv)
    with contextlib.ExitStack() as stack:
        dsn, machine = stack.enter_context(bench_setup())
        recording = Recording.load(CAPTURE_TAPE)
        markets = load_markets()
        book = make_rules(recording, markets, args.positions, args.crossed, args.seed)
        progress(
            f"workload: {len(recording.frames):,} frames/{recording.events:,} events per "
            f"repetition, {len(book.rows):,} positions, {len(book.expected):,} crossed"
        )
        log_dir = log_directory(stack, args.log_dir, "polystream-benchmon-logs-")
        rules_db, plain_db = stack.enter_context(templates(dsn, book, markets))
        facts = AskFacts.of(recording, markets)
        ctx = Context(dsn, recording, facts, markets, Sender(), log_dir, args.profile, args.seed)
        specs = [
            RunSpec("loaded", rules_db, book, args.predictions, args.repeat, None),
            RunSpec("baseline", plain_db, None, 0, args.repeat, None),
            RunSpec("paced", rules_db, book, args.predictions, 1, args.speed),
        ]
        if args.profile is not None:
            specs = specs[:1]
        runs = trio.run(run_all, ctx, specs)
    if args.profile is not None:
        print_hotspots(args.profile, top=25)
        return 0
    doc = document(runs, ctx, book, machine)
    write_results(args.out, "results-monitor", doc, markdown(doc))
    return exit_status(failures(doc))


if __name__ == "__main__":
    sys.exit(main())

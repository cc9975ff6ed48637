"""
Order benchmark: from the frame that crosses a TP/SL to the closing order on
the wire, with ``execute.mode = "clob"`` at 100,000 rules.

Run ``.venv/bin/python -m bench.orders`` (``--help`` for options; part of
``make bench``). It writes ``bench/results-orders.json`` and
``bench/results-orders.md`` and prints the table. About two minutes.

Workload: the monitor benchmark's (``bench.monitor``): 100,000 positions on the
12 assets of ``examples/updown-2025-12-11``, each with a take profit and a
stop loss, 1,000 of them crossed by the recorded best bid at frames computed
from the recording. One paced run (the capture once at ``--speed`` times the
recorded speed, the monitor benchmark's sender, ``feed.ping_interval = 1``) of
``polystream run`` as a child process with ``execute.mode = "clob"``,
``execute.enabled = true`` and a throwaway key, against the fake CLOB
(``polystream.replay.orders.FakeClob``) served by the bench over loopback
HTTP; the fake fills every order. The tape runs ``--speed`` times faster than
it was recorded, and so does the venue's per-signer order bucket
(``execute.orders_per_second`` = 40 x speed): the same limit in tape time.

Latency: the sender stamps each crossing frame with ``time.monotonic()``
when its last byte reached the kernel; the fake stamps each ``POST /order``
when its whole request has arrived (trio's clock, moved onto
``time.monotonic()``). Tick to order is the difference, per crossed rule,
matched through the order id stored on the trigger row. The NOTIFY latency
of the same triggers (``polystream_triggers``) is beside it.

Correctness, each a difference that makes the benchmark exit 1: every
crossed rule has exactly one trigger (the monitor benchmark's checks) and
exactly one order received (in a ``POST /order`` or ``POST /orders``) whose order id is
the trigger's, signed by the
account (recovered from the signature by the fake), SELL of the position's
10 shares at the trigger price minus ``execute.max_slippage`` rounded down to
the tick; no other order; every trigger ``filled`` with 10 shares.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from decimal import ROUND_FLOOR, Decimal
from typing import Any

import trio

from bench.harness import (
    CAPTURE_TAPE,
    add_output_options,
    bench_setup,
    exit_status,
    load_markets,
    log_directory,
    progress,
    write_results,
)
from bench.monitor.checks import percentile, summarize
from bench.monitor.database import templates
from bench.monitor.recording import AskFacts, Recording
from bench.monitor.rules import RuleBook, make_rules
from bench.monitor.run import Context, RunRecord, RunSpec, run_daemon
from bench.monitor.sender import Sender
from polystream.replay.orders import FakeClob
from polystream.venue.orders import throwaway_account

SLIPPAGE = Decimal("0.02")
TICK = Decimal("0.01")  # the capture's markets (orderPriceMinTickSize)
SHARES = Decimal(10)  # bench.monitor.rules: every position holds 10 shares


def _limit(price: Decimal) -> Decimal:
    return max(((price - SLIPPAGE) / TICK).to_integral_value(ROUND_FLOOR) * TICK, TICK)


def _orders_sent(fake: FakeClob) -> dict[str, tuple[float, str, dict[str, Any], int]]:
    """
    Order id -> (arrival, trio s; recovered signer; the order's fields; times it
    was received) of every order in a ``POST /order`` or ``POST /orders``.
    """
    sent: dict[str, tuple[float, str, dict[str, Any], int]] = {}
    for request in fake.requests:
        if request.method != "POST" or request.path not in ("/order", "/orders"):
            continue
        bodies = request.body if isinstance(request.body, list) else [request.body]
        for order_id, signer, body in zip(request.order_ids, request.signers, bodies, strict=False):
            if order_id:
                copies = sent[order_id][3] + 1 if order_id in sent else 1
                sent[order_id] = (request.at, signer, body["order"], copies)
    return sent


def order_figures(
    record: RunRecord, book: RuleBook, fake: FakeClob, address: str, offset: float
) -> dict[str, Any]:
    """
    Tick-to-order latencies (ms) and every difference from the expectation
    (module text). ``offset`` moves the fake's trio times onto ``time.monotonic()``.
    """
    triggers = {int(row[2]): row for row in record.outcome.triggers if row[2] is not None}
    sent = _orders_sent(fake)
    differences: list[str] = []
    latencies: list[float] = []
    sent_at = record.measured.playback.sent_at
    for position_id, crossing in sorted(book.expected.items()):
        row = triggers.get(position_id)
        order = None if row is None else record.outcome.orders.get(int(row[0]))
        if row is None or order is None:
            differences.append(f"position {position_id}: no order")
            continue
        status, order_id, filled = order
        if order_id not in sent:
            differences.append(f"position {position_id}: order {order_id[:12]} never sent")
            continue
        at, signer, body, copies = sent[order_id]
        want = (address, "SELL", str(int(SHARES * 1_000_000)), 1)
        got = (signer, body["side"], body["makerAmount"], copies)
        taker = int(_limit(crossing.price) * SHARES * 1_000_000)
        if got != want or int(body["takerAmount"]) != taker:
            differences.append(f"position {position_id}: order {got} {body['takerAmount']}")
        if (status, filled) != ("filled", SHARES):
            differences.append(f"position {position_id}: trigger {status} {filled}")
        latencies.append((at + offset - sent_at[crossing.frame]) * 1000)
    if len(sent) != len(book.expected):
        differences.append(f"{len(sent)} orders sent for {len(book.expected)} crossed rules")
    latencies.sort()
    return {
        "orders_sent": len(sent),
        "requests": sum(1 for r in fake.requests if r.path in ("/order", "/orders")),
        "expected": len(book.expected),
        "tick_to_order_ms": {
            "p50": percentile(latencies, 0.5),
            "p99": percentile(latencies, 0.99),
            "max": latencies[-1] if latencies else None,
            "n": len(latencies),
        },
        "differences": differences,
    }


async def measure(
    ctx: Context, spec: RunSpec, book: RuleBook, fake: FakeClob, address: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Serve the sender and the fake, run the daemon once; its summary and the order figures."""
    async with trio.open_nursery() as nursery:
        await nursery.start(ctx.sender.serve)
        await nursery.start(fake.serve)
        spec = RunSpec(
            spec.name, spec.template, spec.rules, 0, spec.repeat, spec.speed,
            settings={**spec.settings, "execute__clob_url": fake.url},
        )  # fmt: skip
        offset = time.monotonic() - trio.current_time()
        with trio.fail_after(600):
            record = await run_daemon(spec, ctx)
        nursery.cancel_scope.cancel()
    return summarize(record, ctx), order_figures(record, book, fake, address, offset)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.orders", description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=100_000, help="rules (default 100,000)")
    parser.add_argument(
        "--crossed",
        default="100,1000",
        help="crossed rules of each run, comma-separated (default 100,1000: at most 6, then "
        "65 crossings in one frame)",
    )
    parser.add_argument("--speed", type=float, default=20.0, help="x recorded speed (default 20)")
    parser.add_argument("--seed", type=int, default=20251211)
    add_output_options(parser, "results-orders")
    return parser.parse_args(argv)


def markdown(doc: dict[str, Any]) -> str:
    """The results table and the correctness lines."""
    work = doc["workload"]
    lines = [
        f"Orders: {work['positions']:,} TP/SL rules, capture at {work['speed']}x, "
        "execute.mode clob (enabled) against the fake CLOB, "
        f"{doc['machine']['cpu_count']} CPUs, {doc['machine']['date']}.",
        "",
        "| Run | Crossed rules (most in one frame) | Measurement | p50 | p99 | max | Unit |",
        "| --- | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for run in doc["runs"]:
        tick, notify = run["orders"]["tick_to_order_ms"], run["notify_latency_ms"]
        head = f"| {run['name']} | {run['crossed']:,} ({run['largest_burst']})"
        lines += [
            f"{head} | **crossing frame -> order arrived at the CLOB** | {tick['p50']:.1f} | "
            f"{tick['p99']:.1f} | {tick['max']:.1f} | ms |",
            f"{head} | crossing frame -> NOTIFY polystream_triggers | {_ms(notify['p50'])} | "
            f"{_ms(notify['p99'])} | {_ms(notify['max'])} | ms |",
        ]
    lines.append("")
    for run in doc["runs"]:
        orders = run["orders"]
        lines.append(
            f"Correctness ({run['name']}, exact): {orders['orders_sent']:,} orders sent "
            f"({orders['requests']:,} requests) for {orders['expected']:,} crossed rules, each "
            "the trigger's stored order id, received once, signed by the account, SELL 10 "
            "shares at the trigger price - 0.02 down to the tick, filled; "
            f"{len(run['differences'])} differences"
        )
    return "\n".join(lines) + "\n"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _one_run(
    args: argparse.Namespace,
    dsn: str,
    recording: Recording,
    crossed: int,
    log_dir: Any,
) -> dict[str, Any]:
    """One paced run with ``crossed`` crossed rules; its figures and differences."""
    markets = load_markets()
    book = make_rules(recording, markets, args.positions, crossed, args.seed)
    largest = max(Counter(c.frame for c in book.expected.values()).values())
    progress(f"run: {len(book.rows):,} positions, {crossed:,} crossed, at most {largest} a frame")
    with templates(dsn, book, markets) as (rules_db, _plain):
        account, environ = throwaway_account()
        os.environ.update(environ)  # the daemon child inherits them; never logged
        fake = FakeClob.for_account(account.credentials, account.address)
        ctx = Context(
            dsn, recording, AskFacts.of(recording, markets), markets, Sender(), log_dir, None,
            args.seed,
        )  # fmt: skip
        settings: dict[str, object] = {
            "execute__mode": "clob",
            "execute__enabled": "true",
            "execute__max_daily_notional": "1000000000",
            # The tape runs --speed times faster than it was recorded; so does the
            # venue's per-signer order bucket (40/s): the same bucket in tape time.
            "execute__orders_per_second": str(40 * args.speed),
        }
        spec = RunSpec(f"orders-{crossed}", rules_db, book, 0, 1, args.speed, settings=settings)
        run, orders = trio.run(measure, ctx, spec, book, fake, account.address)
    differences = orders["differences"] + [
        f"tpsl: {k} {v}" for k, v in run["tpsl"]["counts"].items() if v
    ]
    tick = orders["tick_to_order_ms"]
    progress(f"crossed {crossed}: tick -> order p50 {tick['p50']:.1f} ms, p99 {tick['p99']:.1f} ms")
    return {
        "name": "sparse" if largest <= 10 else "bursts",
        "crossed": crossed,
        "largest_burst": largest,
        "orders": orders,
        "notify_latency_ms": {
            k: v for k, v in run["tpsl"]["latency_ms"].items() if k in ("p50", "p99", "max")
        },
        "cpu_us_per_event": run["cpu_us_per_event"],
        "differences": differences,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; writes the results; 1 on any difference."""
    args = _parse_args(argv)
    with contextlib.ExitStack() as stack:
        dsn, machine = stack.enter_context(bench_setup())
        recording = Recording.load(CAPTURE_TAPE)
        log_dir = log_directory(stack, args.log_dir, "polystream-benchorders-logs-")
        runs = [
            _one_run(args, dsn, recording, int(n), log_dir) for n in str(args.crossed).split(",")
        ]
    differences: list[str] = [d for run in runs for d in run["differences"]]
    doc = {
        "machine": machine,
        "workload": {"positions": args.positions, "speed": args.speed},
        "runs": runs,
        "differences": differences,
    }
    write_results(args.out, "results-orders", doc, markdown(doc))
    return exit_status(differences)


if __name__ == "__main__":
    sys.exit(main())

"""
New position -> priced: how long after another service inserts (or re-opens)
a position its ``current_price`` is set, on a market that does not move.

Run ``.venv/bin/python -m bench.pricing`` (``--help`` for options). It writes
``bench/results-pricing.json`` and ``bench/results-pricing.md`` and prints the
table. About two minutes.

Set-up: ``examples/updown-2025-12-11`` markets imported; the bench's replay
server (``polystream.replay``, in this process) plays the capture at maximum
speed and holds the tape for good after ``--pause-at`` frames, so no market
moves again; ``polystream run`` (a child process, default configuration but
the feed URL and the health port) subscribes one position per market first
(warm-up). Then, one sample every ``--gap`` seconds (longer than
``pipeline.debounce``, so samples do not share a debounce window), a plain SQL
connection (another service) commits one of:

* ``token``: a position naming its ``token_id`` on a subscribed, quiet market;
* ``outcome``: a position naming only its ``outcome`` (the daemon fills in the token);
* ``reopen``: a closed position, its price wiped, set ``active`` again
  within ``feed.unsubscribe_grace``.

The latency is from the commit returning to the first poll (every 2 ms, a
second connection) that sees ``current_price`` set. The bound the daemon
promises is ``pipeline.debounce`` + 100 ms after the token is known.

Correctness, checked independently of polystream's book code: every sample's
price equals the display price (midpoint when the spread is at most 0.10,
else the last trade) computed here from the replay server's own book of that
asset (its tape, a separate implementation); a sample never priced within
10 s, or priced wrong, makes the bench exit 1.

Times are ``time.monotonic()`` in this process. The machine is shared and
noisy: compare figures within one run only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import trio

from bench.harness import (
    CAPTURE,
    CAPTURE_MARKETS,
    CAPTURE_TAPE,
    ROOT,
    BenchError,
    Market,
    add_output_options,
    bench_setup,
    exit_status,
    load_markets,
    log_directory,
    progress,
    quantile,
    throwaway_database,
    write_results,
)
from polystream.errors import PolystreamError
from polystream.ops.daemon import open_daemon
from polystream.replay import Capture, ReplayServer, ScheduledFault, Tape
from polystream.store.markets import import_markets_file

DEBOUNCE_S = 1.0  # pipeline.debounce, the daemon's default
BOUND_S = DEBOUNCE_S + 0.1
PATHS = ("token", "outcome", "reopen")


def display(book: dict[str, Any]) -> Decimal | None:
    """Polymarket's displayed price of a ``book`` event, computed here from its levels."""
    bids = [Decimal(level["price"]) for level in book["bids"] if Decimal(level["size"]) > 0]
    asks = [Decimal(level["price"]) for level in book["asks"] if Decimal(level["size"]) > 0]
    bid, ask = max(bids, default=None), min(asks, default=None)
    last = Decimal(book["last_trade_price"]) if book.get("last_trade_price") else None
    if bid is not None and ask is not None and (ask - bid <= Decimal("0.10") or last is None):
        return (bid + ask) / 2
    return last


def _insert(
    conn: psycopg.Connection[Any], market: str, token: str | None, outcome: str | None
) -> int:
    row = conn.execute(
        "INSERT INTO positions (user_id, market_id, outcome, token_id, size, entry_price)"
        " VALUES ('bench', %s, %s, %s, 10, 0.5) RETURNING id",
        (market, outcome, token),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _wait_priced(
    conn: psycopg.Connection[Any], position_id: int, since: float, limit: float = 10.0
) -> tuple[float, str | None, Decimal | None]:
    """Poll every 2 ms: (seconds from ``since`` to the price, token, price); price None on timeout."""
    while True:
        row = conn.execute(
            "SELECT token_id, current_price FROM positions WHERE id = %s", (position_id,)
        ).fetchone()
        now = time.monotonic()
        if row is not None and row[1] is not None:
            return now - since, row[0], row[1]
        if now - since > limit:
            return now - since, None, None
        time.sleep(0.002)


def _sample(
    writer: psycopg.Connection[Any],
    reader: psycopg.Connection[Any],
    path: str,
    market: Market,
    rng: random.Random,
) -> tuple[float, str | None, Decimal | None]:
    """One insert (or re-open) committed by another service, and its pricing."""
    market_id, outcomes, tokens = market.id, market.outcomes, market.tokens
    index = rng.randrange(len(tokens))
    if path == "reopen":
        position_id = _insert(writer, market_id, tokens[index], None)
        _wait_priced(reader, position_id, time.monotonic())
        writer.execute("UPDATE positions SET status = 'closed' WHERE id = %s", (position_id,))
        writer.execute(
            "UPDATE positions SET current_price = NULL, pnl_amount = NULL WHERE id = %s",
            (position_id,),
        )
        writer.execute("UPDATE positions SET status = 'active' WHERE id = %s", (position_id,))
    elif path == "outcome":
        position_id = _insert(writer, market_id, None, outcomes[index])
    else:
        position_id = _insert(writer, market_id, tokens[index], None)
    return _wait_priced(reader, position_id, time.monotonic())


async def run_bench(admin_dsn: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """The capture's markets in a throwaway database, then :func:`_measure`."""
    with throwaway_database(admin_dsn, f"polystream_benchprice_{os.getpid()}") as dsn:
        with psycopg.connect(dsn) as conn:
            import_markets_file(conn, CAPTURE_MARKETS)
        return await _measure(dsn, args, logs)


async def _measure(dsn: str, args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    markets = load_markets()
    server = ReplayServer(
        tape=Tape(Capture.load([CAPTURE_TAPE])),
        max_speed=True,
        start_when_subscribed=False,
        faults=(ScheduledFault("pause", after=args.pause_at),),
    )
    rng = random.Random(args.seed)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        while not server.paused:  # noqa: ASYNC110 (the replay server has no pause event)
            await trio.sleep(0.01)
        expected = {}
        for market in markets:
            for token in market.tokens:
                book = server.tape.snapshot(token)
                expected[token] = None if book is None else display(book)
        async with open_daemon(dsn, server.url, logs / "daemon.log", cwd=ROOT) as daemon:
            with trio.fail_after(60):
                await daemon.wait_ready()
            samples = await trio.to_thread.run_sync(_samples, dsn, markets, args, rng)
            code = await daemon.stop()
        frames_after = server.tape.frames_played
        nursery.cancel_scope.cancel()
    wrong = [
        s for s in samples if s["price"] is None or Decimal(s["price"]) != expected[s["token"]]
    ]
    if frames_after != args.pause_at:
        raise BenchError(f"the tape moved: {frames_after} frames played, expected {args.pause_at}")
    return {"samples": samples, "wrong": wrong, "exit_code": code}


def _samples(
    dsn: str,
    markets: list[Market],
    args: argparse.Namespace,
    rng: random.Random,
) -> list[dict[str, Any]]:
    samples = []
    with (
        psycopg.connect(dsn, autocommit=True) as writer,
        psycopg.connect(dsn, autocommit=True) as reader,
    ):
        for market in markets:  # warm-up: every market subscribed and its book known
            position_id = _insert(writer, market.id, market.tokens[0], None)
            if _wait_priced(reader, position_id, time.monotonic(), limit=30)[2] is None:
                raise BenchError(f"warm-up position on market {market.id} never priced")
        for number in range(args.samples * len(PATHS)):
            path = PATHS[number % len(PATHS)]
            market = markets[rng.randrange(len(markets))]
            seconds, token, price = _sample(writer, reader, path, market, rng)
            samples.append(
                {
                    "path": path,
                    "market": market.id,
                    "token": token,
                    "price": None if price is None else str(price),
                    "latency_ms": round(seconds * 1000, 2),
                }
            )
            time.sleep(args.gap)
    return samples


def _spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values)
    p50 = round(statistics.median(ordered), 2)
    return {"p50": p50, "p99": quantile(ordered, 0.99), "max": ordered[-1], "n": len(ordered)}


def report(
    result: dict[str, Any], args: argparse.Namespace, machine: dict[str, Any]
) -> tuple[dict[str, Any], str]:
    samples = result["samples"]
    by_path = {p: _spread([s["latency_ms"] for s in samples if s["path"] == p]) for p in PATHS}
    overall = _spread([s["latency_ms"] for s in samples])
    within = sum(1 for s in samples if s["latency_ms"] <= BOUND_S * 1000)
    document = {
        "pricing": {
            "new_position_priced_ms": overall,
            "by_path_ms": by_path,
            "bound_ms": BOUND_S * 1000,
            "within_bound": within,
            "samples": len(samples),
            "wrong": result["wrong"],
        },
        "config": {"pause_at": args.pause_at, "gap_s": args.gap, "debounce_s": DEBOUNCE_S},
        "machine": machine,
        "samples": samples,
    }
    lines = [
        f"New position -> priced: `{CAPTURE.name}` markets, tape held after {args.pause_at}"
        f" frames (no market moves); default daemon configuration (pipeline.debounce"
        f" {DEBOUNCE_S:g} s); {len(samples)} samples, one every {args.gap:g} s; latency from"
        " the inserting service's commit to current_price set (polled every 2 ms).",
        "",
        "| Path | p50 ms | p99 ms | max ms | samples |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for path in PATHS:
        spread = by_path[path]
        lines.append(
            f"| {path} | {spread['p50']} | {spread['p99']} | {spread['max']} | {spread['n']} |"
        )
    lines.append(
        f"| **all** | {overall['p50']} | {overall['p99']} | {overall['max']} | {overall['n']} |"
    )
    lines += [
        "",
        f"Bound (pipeline.debounce + 100 ms): {BOUND_S * 1000:g} ms; within it: {within}/{len(samples)}.",
        "",
        f"Correctness: {len(samples) - len(result['wrong'])}/{len(samples)} priced at the display"
        " price computed from the replay server's book; wrong or unpriced: "
        f"{len(result['wrong'])}.",
        "",
    ]
    return document, "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--samples", type=int, default=20, help="samples per path")
    parser.add_argument("--gap", type=float, default=1.5, help="seconds between samples")
    parser.add_argument("--pause-at", type=int, default=3000, help="frames before the tape holds")
    parser.add_argument("--seed", type=int, default=7)
    add_output_options(parser, "results-pricing")
    parser.add_argument("--logs", dest="log_dir", type=Path, help=argparse.SUPPRESS)  # old name
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        logs = log_directory(stack, args.log_dir, "polystream-bench-pricing-")
        admin_dsn, machine = stack.enter_context(bench_setup())
        try:
            result = trio.run(run_bench, admin_dsn, args, logs)
        except (BenchError, PolystreamError) as exc:
            progress(f"bench.pricing: {exc}")
            return 1
        document, table = report(result, args, machine)
        write_results(args.out, "results-pricing", document, table)
    return exit_status([f"sample wrong or unpriced: {sample}" for sample in result["wrong"]])


if __name__ == "__main__":
    sys.exit(main())

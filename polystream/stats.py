"""
Counters and per-shard state of one running daemon.

One :class:`Stats` is built in :func:`polystream.app.run` and passed to the
parts that count; nothing here is module-level. ``/health`` renders
:meth:`Stats.health` as JSON, and ``/metrics`` exposes the same numbers in
Prometheus format through :class:`StatsCollector` (prometheus_client).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["HEALTH_SCHEMA", "ShardStats", "Stats", "StatsCollector"]

HEALTH_SCHEMA = 1

BOOK_HASHES = ("verified", "mismatched", "unverifiable")
"""Outcomes of a ``book`` hash check (:data:`polystream.protocol.Integrity`)."""


@attrs.define
class ShardStats:
    """
    Live state of one shard (one WebSocket connection). Times are
    ``time.monotonic()`` seconds; None until the first occurrence.
    """

    index: int
    state: str = "starting"  # starting | connecting | connected | backoff | closed
    assets: int = 0
    frames: int = 0
    reconnects: int = 0
    stale_checks: int = 0
    connected_at: float | None = None
    last_frame_at: float | None = None
    last_data_at: float | None = None
    last_pong_at: float | None = None
    ping_rtt: float | None = None
    last_error: str | None = None
    seen_assets: set[str] = attrs.field(factory=set)
    subscribed_at: dict[str, float] = attrs.field(factory=dict)
    book_hashes: Counter[str] = attrs.field(factory=lambda: Counter(dict.fromkeys(BOOK_HASHES, 0)))

    def silent(self, now: float, after: float) -> list[str]:
        """Assets subscribed for more than ``after`` s that delivered no event since."""
        return sorted(
            asset
            for asset, since in self.subscribed_at.items()
            if asset not in self.seen_assets and now - since > after
        )

    def snapshot(self, now: float, silent_after: float = 60.0) -> dict[str, Any]:
        """The shard's part of ``/health``: ages in seconds."""
        silent = self.silent(now, silent_after) if self.state == "connected" else []
        return {
            "index": self.index,
            "state": self.state,
            "assets": self.assets,
            "assets_with_data": len(self.seen_assets),
            "coverage": len(self.seen_assets) / self.assets if self.assets else None,
            "silent_assets": len(silent),
            "silent_sample": silent[:5],
            "frames": self.frames,
            "reconnects": self.reconnects,
            "connected_for_s": None if self.connected_at is None else now - self.connected_at,
            "last_frame_age_s": None if self.last_frame_at is None else now - self.last_frame_at,
            "ping_rtt_s": self.ping_rtt,
            "last_error": self.last_error,
            "book_hashes": dict(self.book_hashes),
        }


@attrs.define
class Stats:
    """
    Everything counted by one daemon; mutated only from trio tasks.

    Attributes:
        frames: text frames received, all shards.
        events: events received by ``event_type``.
        parse_errors: skipped frames/events by kind (``invalid_json``, ...).
        control: non-JSON control frames by text (``PONG``, ...).
        foreign_events: events dropped because their asset is not in the shard.
        ignored_events: events of types the market channel does not define
            (``settlement_preview``...), by type: normal input, not used.
        rows_written: rows updated by table (``markets``, ``positions``).
        db_errors: failed database round trips.
        shards: per-shard state, by index.
    """

    started_at: float = attrs.field(factory=time.monotonic)
    started_wall: float = attrs.field(factory=time.time)
    frames: int = 0
    events: Counter[str] = attrs.field(factory=Counter)
    parse_errors: Counter[str] = attrs.field(factory=Counter)
    control: Counter[str] = attrs.field(factory=Counter)
    foreign_events: int = 0
    ignored_events: Counter[str] = attrs.field(factory=Counter)
    rows_written: Counter[str] = attrs.field(factory=Counter)
    db_errors: int = 0
    db_connected: bool = False
    last_write_at: float | None = None
    last_db_error: str | None = None
    desired_assets: int = 0
    pending_markets: int = 0
    pending_positions: int = 0
    shards: dict[int, ShardStats] = attrs.field(factory=dict)
    silent_after: float = 60.0
    monitor_rules: int = 0
    monitor_predictions: int = 0
    next_decision_at: float | None = None
    triggers: Counter[str] = attrs.field(factory=Counter)
    triggers_written: int = 0
    triggers_duplicate: int = 0
    # Predictions due but not decided (their asset has no ask): how many now,
    # and every deferral (first and each later look) by reason.
    predictions_deferred: int = 0
    prediction_deferrals: Counter[str] = attrs.field(factory=lambda: Counter(no_price=0))
    poll_snapshot: Callable[[float], dict[str, Any]] | None = None
    resync_snapshot: Callable[[], dict[str, Any]] | None = None
    queue_depth: Callable[[], int] | None = None
    executor_pending: Callable[[], int] | None = None
    registry: CollectorRegistry = attrs.field(init=False)
    db_seconds: Histogram = attrs.field(init=False)
    db_batch_rows: Histogram = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        # One registry per daemon (never prometheus_client's global one).
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(StatsCollector(self))
        self.db_seconds = Histogram(
            "polystream_db_call_seconds",
            "Database round trips (one batch each), by owner",
            ["link"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.db_batch_rows = Histogram(
            "polystream_db_batch_rows",
            "Items per database round trip, by owner",
            ["link"],
            registry=self.registry,
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
        )

    def shard(self, index: int) -> ShardStats:
        """The stats of shard ``index``, created on first use."""
        stats = self.shards.get(index)
        if stats is None:
            stats = self.shards[index] = ShardStats(index)
        return stats

    def book_hashes(self) -> Counter[str]:
        """``book`` hash checks of all shards, by outcome (``verified``, ...)."""
        total: Counter[str] = Counter(dict.fromkeys(BOOK_HASHES, 0))
        for shard in self.shards.values():
            total.update(shard.book_hashes)
        return total

    def problems(self) -> list[str]:
        """Why the daemon is unhealthy; empty when healthy."""
        problems = []
        if not self.db_connected:
            problems.append("database not connected")
        for shard in self.shards.values():
            if shard.state != "connected":
                problems.append(f"shard {shard.index} {shard.state}")
        return problems

    def health(self) -> dict[str, Any]:
        """The ``/health`` document (JSON-ready; ages in seconds)."""
        now = time.monotonic()
        problems = self.problems()
        return {
            "schema": HEALTH_SCHEMA,
            "status": "ok" if not problems else "unhealthy",
            "problems": problems,
            "uptime_s": now - self.started_at,
            "started_at": self.started_wall,
            "subscribed_assets": sum(s.assets for s in self.shards.values()),
            "desired_assets": self.desired_assets,
            "frames": self.frames,
            "events": dict(self.events),
            "parse_errors": dict(self.parse_errors),
            "control_frames": dict(self.control),
            "foreign_events": self.foreign_events,
            "ignored_events": dict(self.ignored_events),
            "book_hashes": dict(self.book_hashes()),
            "rows_written": dict(self.rows_written),
            "pending": {
                "markets": self.pending_markets,
                "positions": self.pending_positions,
                "triggers": 0 if self.executor_pending is None else self.executor_pending(),
                "router_queue": 0 if self.queue_depth is None else self.queue_depth(),
            },
            "database": {
                "connected": self.db_connected,
                "errors": self.db_errors,
                "last_error": self.last_db_error,
                "last_write_age_s": None
                if self.last_write_at is None
                else now - self.last_write_at,
            },
            "monitor": {
                "rules": self.monitor_rules,
                "predictions": self.monitor_predictions,
                "next_decision_in_s": None
                if self.next_decision_at is None
                else self.next_decision_at - time.time(),
                "triggers": dict(self.triggers),
                "triggers_written": self.triggers_written,
                "triggers_duplicate": self.triggers_duplicate,
                "predictions_deferred": self.predictions_deferred,
                "prediction_deferrals": dict(self.prediction_deferrals),
            },
            "poll": None if self.poll_snapshot is None else self.poll_snapshot(now),
            "resync": None if self.resync_snapshot is None else self.resync_snapshot(),
            "silent_after_s": self.silent_after,
            "shards": [s.snapshot(now, self.silent_after) for _, s in sorted(self.shards.items())],
        }


class StatsCollector(Collector):
    """prometheus_client collector reading a :class:`Stats` at scrape time."""

    def __init__(self, stats: Stats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (names prefixed ``polystream_``)."""
        stats = self._stats
        now = time.monotonic()
        frames = CounterMetricFamily("polystream_frames", "Text frames received", labels=["shard"])
        for shard in stats.shards.values():
            frames.add_metric([str(shard.index)], shard.frames)
        yield frames
        events = CounterMetricFamily("polystream_events", "Events received", labels=["type"])
        for kind, count in stats.events.items():
            events.add_metric([kind], count)
        yield events
        errors = CounterMetricFamily(
            "polystream_parse_errors", "Frames or events skipped", labels=["kind"]
        )
        for kind, count in stats.parse_errors.items():
            errors.add_metric([kind], count)
        yield errors
        rows = CounterMetricFamily("polystream_rows_written", "Rows updated", labels=["table"])
        for table, count in stats.rows_written.items():
            rows.add_metric([table], count)
        yield rows
        yield CounterMetricFamily(
            "polystream_reconnects",
            "Shard reconnects",
            value=sum(s.reconnects for s in stats.shards.values()),
        )
        yield CounterMetricFamily(
            "polystream_foreign_events",
            "Events for unsubscribed assets dropped",
            value=stats.foreign_events,
        )
        fired = CounterMetricFamily("polystream_triggers", "Rules fired", labels=["kind"])
        for kind, count in stats.triggers.items():
            fired.add_metric([kind], count)
        yield fired
        yield GaugeMetricFamily(
            "polystream_predictions_deferred",
            "Predictions due but not decided: their asset has no ask yet",
            value=stats.predictions_deferred,
        )
        deferrals = CounterMetricFamily(
            "polystream_prediction_deferrals",
            "Times a due prediction was deferred (first and each later look), by reason",
            labels=["reason"],
        )
        for reason, count in stats.prediction_deferrals.items():
            deferrals.add_metric([reason], count)
        yield deferrals
        poll = stats.poll_snapshot(now) if stats.poll_snapshot is not None else None
        if poll is not None:
            yield CounterMetricFamily("polystream_polls", "Fallback polls", value=poll["polls"])
            yield CounterMetricFamily(
                "polystream_poll_errors", "Failed fallback poll batches", value=poll["errors"]
            )
            yield GaugeMetricFamily(
                "polystream_polling_assets", "Assets polled over REST", value=poll["assets"]
            )
        yield GaugeMetricFamily(
            "polystream_monitor_rules", "TP/SL rules watched", value=stats.monitor_rules
        )
        yield CounterMetricFamily(
            "polystream_db_errors", "Failed database round trips", value=stats.db_errors
        )
        assets = GaugeMetricFamily("polystream_subscribed_assets", "Assets", labels=["shard"])
        covered = GaugeMetricFamily(
            "polystream_covered_assets",
            "Subscribed assets that delivered an event since subscription",
            labels=["shard"],
        )
        age = GaugeMetricFamily(
            "polystream_last_frame_age_seconds", "Seconds since last frame", labels=["shard"]
        )
        for shard in stats.shards.values():
            assets.add_metric([str(shard.index)], shard.assets)
            covered.add_metric([str(shard.index)], len(shard.seen_assets))
            if shard.last_frame_at is not None:
                age.add_metric([str(shard.index)], now - shard.last_frame_at)
        rtt = GaugeMetricFamily(
            "polystream_ping_rtt_seconds", "Last PING/PONG round trip", labels=["shard"]
        )
        reconnects = CounterMetricFamily(
            "polystream_shard_reconnects", "Reconnects per shard", labels=["shard"]
        )
        for shard in stats.shards.values():
            if shard.ping_rtt is not None:
                rtt.add_metric([str(shard.index)], shard.ping_rtt)
            reconnects.add_metric([str(shard.index)], shard.reconnects)
        yield assets
        yield covered
        yield age
        yield rtt
        yield reconnects
        hashes = CounterMetricFamily(
            "polystream_book_hashes",
            "book snapshots by hash check (verified, mismatched, unverifiable)",
            labels=["shard", "result"],
        )
        for shard in stats.shards.values():
            for result in BOOK_HASHES:
                hashes.add_metric([str(shard.index), result], shard.book_hashes[result])
        yield hashes
        ignored = CounterMetricFamily(
            "polystream_ignored_events", "Events of types the channel does not define", labels=["type"]
        )
        for kind, count in stats.ignored_events.items():
            ignored.add_metric([kind], count)
        yield ignored
        resync = stats.resync_snapshot() if stats.resync_snapshot is not None else None
        if resync is not None:
            resyncs = CounterMetricFamily(
                "polystream_book_resyncs", "REST book resyncs requested", labels=["reason"]
            )
            for reason in ("tick_size_change", "hash_mismatch"):
                resyncs.add_metric([reason], resync["requested"].get(reason, 0))
            yield resyncs
            yield CounterMetricFamily(
                "polystream_book_resync_fetched", "REST books applied", value=resync["fetched"]
            )
            yield GaugeMetricFamily(
                "polystream_book_resync_pending", "Books waiting for a REST copy", value=resync["pending"]
            )
        depth = GaugeMetricFamily("polystream_queue_depth", "Items waiting", labels=["queue"])
        depth.add_metric(["router"], 0 if stats.queue_depth is None else stats.queue_depth())
        depth.add_metric(["markets"], stats.pending_markets)
        depth.add_metric(["positions"], stats.pending_positions)
        depth.add_metric(
            ["triggers"], 0 if stats.executor_pending is None else stats.executor_pending()
        )
        yield depth
        yield GaugeMetricFamily(
            "polystream_database_connected",
            "1 when the writers' connection works",
            value=1.0 if stats.db_connected else 0.0,
        )

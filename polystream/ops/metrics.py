"""
``/metrics``: one daemon's counters as Prometheus metric families, read at
scrape time from :class:`~polystream.stats.Stats` (prometheus_client's custom
collector API), plus its database histograms, in a registry of its own (never
prometheus_client's global one).

The families are one table (:data:`FAMILIES`): name, help, type, labels and
how to read the samples. Every labelled counter is exported for each label
value it knows (the bad-input catalogue, the event types, the decision kinds,
the deferral reasons, the tables written, ...) at 0 before it first fires, so
dashboards and ``rate()`` alerts see it; so are the database histograms, for
every link (:data:`polystream.app.LINKS`). Families whose labels cannot be
known ahead (``ignored_events``: types the channel does not define; the
per-shard ones before the first shard) have no samples until then.

Beside them, the registry holds prometheus_client's standard collectors:
``process_*`` (resident and virtual memory, CPU seconds, open and maximum file
descriptors, start time: Linux ``/proc``), ``python_info`` and ``python_gc_*``;
and ``polystream_build_info{version, python}`` = 1.
"""

from __future__ import annotations

import platform
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import attrs
from prometheus_client import GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

import polystream
from polystream.errors import BAD_INPUT_KINDS
from polystream.feed.protocol import KNOWN_EVENT_TYPES
from polystream.monitor.engine import DEFERRAL_REASONS
from polystream.monitor.orders import ORDER_OUTCOMES
from polystream.monitor.rules import DECISION_KINDS
from polystream.stats import BOOK_HASHES, CacheStats, ShardStats, Stats

__all__ = ["FAMILIES", "Family", "StatsCollector", "registry_of"]

Sample = tuple[tuple[str, ...], float]
Read = Callable[[Stats, float], Iterable[Sample]]
"""``read(stats, now)``: the samples, ``(label values, value)``; ``now`` is ``time.monotonic()``."""

RESYNC_REASONS = ("tick_size_change", "hash_mismatch")
TABLES_WRITTEN = ("markets", "positions")
"""Labels of ``rows_written`` (the writers' tables)."""


@attrs.frozen
class Family:
    """One metric family of the table: ``polystream_<name>``."""

    name: str
    help: str
    kind: Literal["counter", "gauge"]
    labels: tuple[str, ...]
    read: Read


def _one(value: Callable[[Stats], float]) -> Read:
    return lambda stats, _now: [((), value(stats))]


def _by_label(counter: Callable[[Stats], Counter[str]], known: Iterable[str] = ()) -> Read:
    """A labelled counter: every ``known`` label at 0 at least, then what was counted."""

    def read(stats: Stats, _now: float) -> Iterable[Sample]:
        counts = counter(stats)
        labels = dict.fromkeys(known) | dict.fromkeys(counts)
        return [((label,), counts.get(label, 0)) for label in labels]

    return read


def _per_shard(value: Callable[[ShardStats, float], float | None]) -> Read:
    def read(stats: Stats, now: float) -> Iterable[Sample]:
        samples = ((str(s.index), value(s, now)) for s in stats.shards.values())
        return [((index,), v) for index, v in samples if v is not None]

    return read


def _cache(value: Callable[[CacheStats], float]) -> Read:
    """A value of the Redis invalidation's stats; nothing when ``cache.redis_url`` is off."""
    return lambda stats, _now: [] if stats.cache is None else [((), value(stats.cache))]


def _book_hashes(stats: Stats, _now: float) -> Iterable[Sample]:
    return [
        ((str(shard.index), result), shard.book_hashes[result])
        for shard in stats.shards.values()
        for result in BOOK_HASHES
    ]


def _snapshot(key: str, of: Literal["poll", "resync"]) -> Read:
    """A value of the poller's or the resync's ``/health`` part; nothing when it is off."""

    def read(stats: Stats, now: float) -> Iterable[Sample]:
        if of == "poll":
            part = None if stats.poll_snapshot is None else stats.poll_snapshot(now)
        else:
            part = None if stats.resync_snapshot is None else stats.resync_snapshot()
        return [] if part is None else [((), part[key])]

    return read


def _resyncs(stats: Stats, _now: float) -> Iterable[Sample]:
    if stats.resync_snapshot is None:
        return []
    requested = stats.resync_snapshot()["requested"]
    return [((reason,), requested.get(reason, 0)) for reason in RESYNC_REASONS]


def _queues(stats: Stats, _now: float) -> Iterable[Sample]:
    executor = 0 if stats.executor_pending is None else stats.executor_pending()
    return [
        (("router",), stats.queue_depth_now()),
        (("markets",), stats.pending_markets),
        (("positions",), stats.pending_positions),
        (("triggers",), executor),
    ]


def _age(at: float | None, now: float) -> float | None:
    return None if at is None else now - at


def _build_info(_stats: Stats, _now: float) -> Iterable[Sample]:
    return [((polystream.__version__, platform.python_version()), 1.0)]


FAMILIES: tuple[Family, ...] = (
    Family(
        "build_info",
        "polystream's version and the Python running it (always 1)",
        "gauge",
        ("version", "python"),
        _build_info,
    ),
    Family(
        "frames", "Text frames received", "counter", ("shard",), _per_shard(lambda s, _: s.frames)
    ),
    Family(
        "events",
        "Events received",
        "counter",
        ("type",),
        _by_label(lambda s: s.events, KNOWN_EVENT_TYPES),
    ),
    Family(
        "parse_errors",
        "Frames, events or entries refused or repaired",
        "counter",
        ("kind",),
        _by_label(lambda s: s.parse_errors, BAD_INPUT_KINDS),
    ),
    Family(
        "ignored_events",
        "Events of types the channel does not define",
        "counter",
        ("type",),
        _by_label(lambda s: s.ignored_events),
    ),
    Family(
        "rows_written",
        "Rows updated",
        "counter",
        ("table",),
        _by_label(lambda s: s.rows_written, TABLES_WRITTEN),
    ),
    Family(
        "reconnects",
        "Shard reconnects",
        "counter",
        (),
        _one(lambda s: sum(x.reconnects for x in s.shards.values())),
    ),
    Family(
        "foreign_events",
        "Events for unsubscribed assets dropped",
        "counter",
        (),
        _one(lambda s: s.foreign_events),
    ),
    Family(
        "triggers",
        "Rules fired",
        "counter",
        ("kind",),
        _by_label(lambda s: s.triggers, DECISION_KINDS),
    ),
    Family(
        "predictions_deferred",
        "Predictions due but not decided: their asset has no ask yet",
        "gauge",
        (),
        _one(lambda s: s.predictions_deferred),
    ),
    Family(
        "prediction_deferrals",
        "Times a due prediction was deferred (first and each later look), by reason",
        "counter",
        ("reason",),
        _by_label(lambda s: s.prediction_deferrals, DEFERRAL_REASONS),
    ),
    Family("polls", "Fallback polls", "counter", (), _snapshot("polls", "poll")),
    Family(
        "poll_errors", "Failed fallback poll batches", "counter", (), _snapshot("errors", "poll")
    ),
    Family("polling_assets", "Assets polled over REST", "gauge", (), _snapshot("assets", "poll")),
    Family("monitor_rules", "TP/SL rules watched", "gauge", (), _one(lambda s: s.monitor_rules)),
    Family(
        "cluster_partitions_owned",
        "Partitions of the markets served by this daemon (feed.cluster; absent when off)",
        "gauge",
        (),
        lambda s, _now: [] if s.cluster_member is None else [((), s.cluster_partitions)],
    ),
    Family(
        "cluster_members",
        "Live daemons of the cluster, as this one last counted (absent when off)",
        "gauge",
        (),
        lambda s, _now: [] if s.cluster_member is None else [((), s.cluster_members)],
    ),
    Family(
        "cache_up",
        "1 when the last Redis invalidation round trip worked (cache.redis_url; absent when off)",
        "gauge",
        (),
        _cache(lambda c: 1.0 if c.up else 0.0),
    ),
    Family(
        "cache_invalidated_keys",
        "Redis keys invalidated after committed flushes",
        "counter",
        (),
        _cache(lambda c: c.keys),
    ),
    Family(
        "cache_errors",
        "Failed Redis invalidation round trips (retried with the same keys)",
        "counter",
        (),
        _cache(lambda c: c.errors),
    ),
    Family(
        "cache_pending_keys",
        "Redis keys waiting to be invalidated",
        "gauge",
        (),
        _cache(lambda c: c.pending),
    ),
    Family(
        "orders",
        "CLOB orders by outcome (execute.mode = clob; absent otherwise): signed, placed, "
        "filled, canceled, rejected, failed, refused, dry_run, retried, recovered, "
        "rate_limited, heartbeats, heartbeat_failed",
        "counter",
        ("outcome",),
        lambda s, _now: (
            []
            if s.orders is None
            else [((k,), s.orders.get(k, 0)) for k in dict.fromkeys([*ORDER_OUTCOMES, *s.orders])]
        ),
    ),
    Family(
        "orders_pending",
        "Triggers whose order is queued or being worked on",
        "gauge",
        (),
        lambda s, _now: [] if s.orders_pending is None else [((), s.orders_pending())],
    ),
    Family("db_errors", "Failed database round trips", "counter", (), _one(lambda s: s.db_errors)),
    Family("subscribed_assets", "Assets", "gauge", ("shard",), _per_shard(lambda s, _: s.assets)),
    Family(
        "covered_assets",
        "Subscribed assets that delivered a book or trade since subscription",
        "gauge",
        ("shard",),
        _per_shard(lambda s, _: len(s.seen_assets)),
    ),
    Family(
        "last_frame_age_seconds",
        "Seconds since last frame",
        "gauge",
        ("shard",),
        _per_shard(lambda s, now: _age(s.last_frame_at, now)),
    ),
    Family(
        "ping_rtt_seconds",
        "Last PING/PONG round trip",
        "gauge",
        ("shard",),
        _per_shard(lambda s, _: s.ping_rtt),
    ),
    Family(
        "shard_reconnects",
        "Reconnects per shard",
        "counter",
        ("shard",),
        _per_shard(lambda s, _: s.reconnects),
    ),
    Family(
        "book_hashes",
        "book snapshots by hash check (verified, mismatched, unverifiable)",
        "counter",
        ("shard", "result"),
        _book_hashes,
    ),
    Family("book_resyncs", "REST book resyncs requested", "counter", ("reason",), _resyncs),
    Family(
        "book_resync_fetched", "REST books applied", "counter", (), _snapshot("fetched", "resync")
    ),
    Family(
        "book_resync_pending",
        "Books waiting for a REST copy",
        "gauge",
        (),
        _snapshot("pending", "resync"),
    ),
    Family("queue_depth", "Items waiting", "gauge", ("queue",), _queues),
    Family(
        "database_connected",
        "1 when the writers' connection works",
        "gauge",
        (),
        _one(lambda s: 1.0 if s.db_connected else 0.0),
    ),
)


def registry_of(stats: Stats) -> CollectorRegistry:
    """
    A Prometheus registry of one daemon (never prometheus_client's global
    one): a :class:`StatsCollector` over ``stats``, its database histograms
    (every link of :data:`polystream.app.LINKS` at 0 from the start), the
    loop-lag histogram (``polystream_loop_lag_seconds``), and
    prometheus_client's process (``process_*``: memory in bytes, CPU in
    seconds, file descriptors; Linux), platform (``python_info``) and
    garbage-collector (``python_gc_*``) collectors.
    """
    from polystream.app import LINKS  # here: polystream.app imports this module

    registry = CollectorRegistry(auto_describe=True)
    registry.register(StatsCollector(stats))
    for link in LINKS:
        stats.db_seconds.labels(link)
        stats.db_batch_rows.labels(link)
    registry.register(stats.db_seconds)
    registry.register(stats.db_batch_rows)
    registry.register(stats.loop_lag)
    if stats.cache is not None:
        registry.register(stats.cache.delay)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class StatsCollector(Collector):
    """prometheus_client collector reading a :class:`Stats` at scrape time, by :data:`FAMILIES`."""

    def __init__(self, stats: Stats) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (names prefixed ``polystream_``)."""
        now = time.monotonic()
        for family in FAMILIES:
            samples = list(family.read(self._stats, now))
            if not samples and not family.labels:
                continue  # an optional part that is off (the poller, the resync)
            cls = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
            metric = cls(f"polystream_{family.name}", family.help, labels=list(family.labels))
            for labels, value in samples:
                metric.add_metric(list(labels), value)
            yield metric

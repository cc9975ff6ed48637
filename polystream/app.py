"""
``run(config, dsn)``: the one place where polystream's parts are built and
wired, in one nursery (docs/architecture.md, "The shape"). Nothing is created
at import time.

:func:`build` makes every part, with no I/O; :func:`run` opens the REST
clients, starts the parts in order and waits for :meth:`App.stop`::

    subscriptions --set_assets--> FeedPool --events--> Router --touch--> MarketWriter
        ^  (LISTEN wakes it)         ^                   |                 PositionWriter
        |                   fallback / resync (REST)     '--on_book--> Monitor --> Executor
        '------------------- PostgreSQL <-----------------------------------------'

Shutdown (:meth:`App.stop`, SIGTERM/SIGINT in the CLI) is ordered: intake
stops first (feed, subscriptions, LISTEN, REST), the router applies what the
readers had already received (at most :data:`DRAIN_SECONDS`), then the
writers, the executor and the health server are cancelled and flush the
coalesced state in their ``finally`` blocks, within a bound.
"""

from __future__ import annotations

import gc
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from functools import partial

import attrs
import structlog
import trio

from polystream.book import Books
from polystream.cache import CacheInvalidator, invalidator_of
from polystream.catalog import Catalog
from polystream.cluster import Cluster, Fence, Member, new_member_id
from polystream.config import Config
from polystream.feed.pool import FeedPool
from polystream.feed.protocol import FeedEvent, FrameParser
from polystream.memory import release_free_memory
from polystream.monitor.engine import Monitor
from polystream.monitor.executor import TRIGGER_STATEMENTS, Executor, write_decisions_direct
from polystream.monitor.loader import RuleLoader
from polystream.monitor.orders import OrderPlacer, OrderSigner
from polystream.ops.health import run_lag_probe, serve_health
from polystream.pipeline.fallback import ShardWatch, run_poller
from polystream.pipeline.metadata import MetadataFiller, run_metadata_filler
from polystream.pipeline.resync import BookResync
from polystream.pipeline.router import Router
from polystream.pipeline.subscriptions import Reconciler
from polystream.pipeline.writers import (
    MarketWriter,
    PositionWriter,
    write_markets,
    write_positions_in_chunks,
)
from polystream.stats import Stats
from polystream.store.direct import DirectLink
from polystream.store.link import DbLink
from polystream.store.listen import Notes, run_listener
from polystream.venue.clob import ClobClient, open_clob_client, prices_moved
from polystream.venue.gamma import GammaClient, open_gamma_client
from polystream.venue.http import open_http

__all__ = ["ASYNC_COMMIT_LINKS", "DRAIN_SECONDS", "LINKS", "App", "build", "run"]

logger = structlog.get_logger(__name__)

DRAIN_SECONDS = 5.0
"""Longest wait, at shutdown, for the router to apply what was already received."""

LINKS = ("markets", "positions", "reconciler", "subscribe", "gamma", "rules")
"""
The database connections through worker threads, one per owner
(docs/architecture.md, "No threads but database calls"); the decisions'
``triggers`` connection runs on the loop itself (:class:`DirectLink`).
"""


ASYNC_COMMIT_LINKS = ("markets", "positions")
"""
The links whose commits do not wait for the WAL flush (``synchronous_commit``
off): price rows are the latest state, written again on the next move and at
start-up, so a server crash losing their last 200 ms loses nothing that
matters. Their flushes then no longer queue before the fsync of a trigger's
commit, which stays synchronous (a decision must survive a crash).
"""


@attrs.define(eq=False, kw_only=True)
class App:
    """
    Every part of one daemon, built by :func:`build` and started by
    :func:`run`, which hands it to ``task_status.started`` (tests and the demo
    use the handles; production only stops it).

    Attributes:
        cluster: this daemon's membership when ``feed.cluster`` is on, else None.
        cache: the Redis invalidation when ``cache.redis_url`` is set, else None.
        placer: the CLOB order placer when ``execute.mode = "clob"``, once started.
        events: the feed readers' end of the router's channel (frames of events).
        frames: the router's end.
        filler: the Gamma metadata filler, once started.
        health_urls: where ``/health`` and ``/metrics`` listen, once started.
        intake: the cancel scope of everything that stops first at shutdown.
    """

    config: Config
    dsn: str
    stats: Stats
    books: Books
    catalog: Catalog
    links: dict[str, DbLink]
    triggers: DirectLink
    markets: MarketWriter
    positions: PositionWriter
    executor: Executor
    monitor: Monitor
    loader: RuleLoader
    router: Router
    pool: FeedPool
    reconciler: Reconciler
    events: trio.MemorySendChannel[list[FeedEvent]]
    frames: trio.MemoryReceiveChannel[list[FeedEvent]]
    cluster: Cluster | None = None
    cache: CacheInvalidator | None = None
    placer: OrderPlacer | None = None
    filler: MetadataFiller | None = None
    health_urls: list[str] = attrs.Factory(list)
    cluster_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    intake: trio.CancelScope = attrs.Factory(trio.CancelScope)
    stopping: trio.Event = attrs.Factory(trio.Event)
    routed: trio.Event = attrs.Factory(trio.Event)

    def stop(self) -> None:
        """Stop intake, let the router drain, flush the writers; ``run`` then returns."""
        self.stopping.set()

    def top_pair(self, asset_id: str) -> tuple[Decimal | None, Decimal | None] | None:
        """
        Our best bid and ask of ``asset_id`` for the feed's stale check, or None
        when we know no book, or while frames wait for the router: our books
        then lag the feed and a REST comparison would prove nothing.
        """
        book = self.books.get(asset_id)
        if book is None or not book.has_book or self.stats.queue_depth_now():
            return None
        return book.best_bid, book.best_ask

    def on_rows_changed(self, notes: Notes) -> None:
        """LISTEN's callback: positions or predictions changed (None: reconnected)."""
        self.reconciler.notify(notes)
        self.loader.notify(notes)
        if self.filler is not None:
            self.filler.wake()


def _cluster(config: Config, dsn: str, stats: Stats) -> Cluster | None:
    """The daemon's cluster membership (its own connection), or None when ``feed.cluster`` is off."""
    feed = config.feed
    if not feed.cluster:
        return None
    member = Member(
        member_id=new_member_id(),
        host=socket.gethostname(),
        pid=os.getpid(),
        partitions=feed.cluster_partitions,
        ttl=feed.cluster_lease_ttl,
    )
    stats.cluster_member = member.member_id
    # Its statements are short; a stuck one must end well before the leases do.
    timeout = min(config.database.statement_timeout, feed.cluster_lease_ttl / 3)
    link = DbLink(dsn=dsn, name="cluster", stats=stats, statement_timeout=timeout)
    return Cluster(member=member, link=link, stats=stats)


def _writers(
    config: Config,
    books: Books,
    catalog: Catalog,
    stats: Stats,
    links: dict[str, DbLink],
    fence: Fence | None,
) -> tuple[MarketWriter, PositionWriter]:
    pipeline, retry_max = config.pipeline, config.database.retry_max
    markets = MarketWriter(
        books=books,
        catalog=catalog,
        stats=stats,
        sink=partial(
            links["markets"].call, partial(write_markets, fence=fence, notify=pipeline.notify)
        ),
        interval=pipeline.market_flush_interval,
        retry_max=retry_max,
    )
    positions = PositionWriter(
        books=books,
        catalog=catalog,
        stats=stats,
        sink=partial(
            links["positions"].call_in_transactions,
            partial(write_positions_in_chunks, fence=fence, notify=pipeline.notify),
        ),
        price_choice=config.positions.mark,
        debounce=pipeline.debounce,
        rate=pipeline.positions_per_second,
        retry_max=retry_max,
    )
    return markets, positions


def _monitor(
    config: Config, stats: Stats, links: dict[str, DbLink], triggers: DirectLink
) -> tuple[Executor, Monitor, RuleLoader]:
    executor = Executor(
        mode=config.execute.mode,
        sink=partial(write_decisions_direct, triggers),
        stats=stats,
        link=triggers,
    )
    monitor = Monitor(
        decide=executor.submit, stats=stats, price_choice=config.monitor.trigger_price
    )
    loader = RuleLoader(
        link=links["rules"], monitor=monitor, interval=config.monitor.reload_interval
    )
    return executor, monitor, loader


def _subscriptions(
    config: Config,
    pool: FeedPool,
    catalog: Catalog,
    stats: Stats,
    links: dict[str, DbLink],
    positions: PositionWriter,
) -> Reconciler:
    feed = config.feed
    return Reconciler(
        link=links["reconciler"],
        pool=pool,
        catalog=catalog,
        stats=stats,
        watch=feed.watch,
        interval=feed.reconcile_interval,
        grace=feed.unsubscribe_grace,
        fast_link=links["subscribe"],
        price_now=positions.price_now,
    )


def build(config: Config, dsn: str) -> App:
    """Make every part of a daemon for ``config`` on database ``dsn``; no I/O, nothing started."""
    stats = Stats(silent_after=config.feed.silent_after)
    books, catalog = Books(), Catalog()
    timeout = config.database.statement_timeout
    links = {
        name: DbLink(
            dsn=dsn,
            name=name,
            stats=stats,
            statement_timeout=timeout,
            synchronous_commit=name not in ASYNC_COMMIT_LINKS,
        )
        for name in LINKS
    }
    cluster = _cluster(config, dsn, stats)
    fence = None if cluster is None else cluster.fence(catalog.key_of)
    markets, positions = _writers(config, books, catalog, stats, links, fence)
    cache = invalidator_of(config.cache, catalog, stats)
    if cache is not None:
        markets.after_write = cache.markets_written
        positions.after_write = cache.positions_priced
    triggers = DirectLink(dsn=dsn, name="triggers", stats=stats, statement_timeout=timeout)
    executor, monitor, loader = _monitor(config, stats, links, triggers)
    events, frames = trio.open_memory_channel[list[FeedEvent]](config.pipeline.queue_size)
    pool = FeedPool(config=config.feed, events=events, stats=stats)
    stats.queue_depth = lambda: frames.statistics().current_buffer_used
    stats.executor_pending = lambda: executor.pending
    reconciler = _subscriptions(config, pool, catalog, stats, links, positions)
    if cluster is not None:
        reconciler.owns = cluster.owns
        monitor.serves = lambda asset_id: cluster.owns(catalog.key_of(asset_id))

        def changed() -> None:
            reconciler.wake()
            monitor.ownership_changed()

        cluster.changed = changed
    return App(
        config=config,
        dsn=dsn,
        stats=stats,
        books=books,
        catalog=catalog,
        links=links,
        triggers=triggers,
        markets=markets,
        positions=positions,
        executor=executor,
        monitor=monitor,
        loader=loader,
        router=Router(
            books=books,
            catalog=catalog,
            markets=markets,
            positions=positions,
            listeners=[monitor.on_book],
            after_frame=executor.pump,
        ),
        pool=pool,
        reconciler=reconciler,
        cluster=cluster,
        cache=cache,
        events=events,
        frames=frames,
    )


@asynccontextmanager
async def _venue_clients(config: Config) -> AsyncIterator[tuple[ClobClient, GammaClient]]:
    """The CLOB and Gamma REST clients, closed on exit."""
    async with (
        open_clob_client(
            config.poll.url,
            batch_size=config.poll.batch_size,
            request_timeout=config.poll.request_timeout,
            attempts=config.poll.attempts,
        ) as clob,
        open_gamma_client(
            config.gamma.url,
            request_timeout=config.gamma.request_timeout,
            attempts=config.gamma.attempts,
        ) as gamma,
    ):
        yield clob, gamma


async def _route(app: App) -> None:
    """The router's task; ``app.routed`` says it has applied the last frame."""
    try:
        await app.router.run(app.frames)
    finally:
        app.routed.set()


async def _start_outputs(app: App, nursery: trio.Nursery) -> None:
    """Writers, executor, orders, rules and the router: they outlive intake, to flush at shutdown."""
    for part in (app.markets, app.positions, app.executor, app.loader, app.monitor):
        await nursery.start(part.run)
    if app.placer is not None:
        await nursery.start(app.placer.run)
    nursery.start_soon(_route, app)


@asynccontextmanager
async def _order_placer(app: App, account: OrderSigner | None) -> AsyncIterator[OrderPlacer | None]:
    """The order placer of ``execute.mode = "clob"`` (its HTTP client and link closed on exit)."""
    execute = app.config.execute
    if execute.mode != "clob" or account is None:
        yield None
        return
    link = DbLink(
        dsn=app.dsn,
        name="orders",
        stats=app.stats,
        statement_timeout=app.config.database.statement_timeout,
    )
    try:
        async with open_http(execute.clob_url, execute.request_timeout) as http:
            placer = OrderPlacer(
                config=execute,
                link=link,
                http=http,
                signer=account,
                stats=app.stats,
                member=app.stats.cluster_member or f"{socket.gethostname()}:{os.getpid()}",
            )
            app.executor.on_written = placer.written
            yield placer
    finally:
        link.close()


async def _start_resync(app: App, clob: ClobClient, nursery: trio.Nursery) -> None:
    config = app.config
    if not config.resync.enabled:
        return
    resync: BookResync = await nursery.start(
        BookResync(
            fetch=partial(clob.books, parser=FrameParser()),
            deliver=app.router.apply_rest_book,
            min_interval=config.resync.min_interval,
            asset_interval=config.resync.asset_interval,
            retry_max=config.database.retry_max,
        ).run
    )
    app.router.resync = resync.request
    app.stats.resync_snapshot = resync.snapshot


async def _start_fallback(app: App, clob: ClobClient, nursery: trio.Nursery) -> None:
    poll = app.config.poll
    if not poll.enabled:
        return
    watch = ShardWatch(grace=poll.grace)
    poller = await nursery.start(
        partial(
            run_poller,
            clob,
            lambda: watch.assets(app.pool.shards.values(), trio.current_time()),
            app.router.apply_quote,
            interval=poll.interval,
            check_interval=poll.check_interval,
        )
    )
    app.stats.poll_snapshot = poller.snapshot


async def _start_metadata(app: App, gamma: GammaClient, nursery: trio.Nursery) -> None:
    gamma_config = app.config.gamma
    app.filler = await nursery.start(
        partial(
            run_metadata_filler,
            app.links["gamma"],
            gamma,
            app.reconciler.wake,
            interval=gamma_config.fill_interval,
            retry_initial=gamma_config.retry_initial,
            retry_max=gamma_config.retry_max,
        )
    )


async def _run_intake(
    app: App,
    clob: ClobClient,
    gamma: GammaClient,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Feed, subscriptions, LISTEN, metadata and REST: what stops first (``app.intake``)."""
    app.pool.stale_check = partial(prices_moved, clob, app.top_pair)
    with app.intake:
        async with trio.open_nursery() as nursery:
            await _start_resync(app, clob, nursery)
            await nursery.start(app.pool.run)
            await nursery.start(app.reconciler.run)
            await _start_fallback(app, clob, nursery)
            await _start_metadata(app, gamma, nursery)
            await nursery.start(
                partial(
                    run_listener,
                    app.dsn,
                    app.on_rows_changed,
                    retry_max=app.config.database.retry_max,
                )
            )
            task_status.started()


async def _run_cluster(
    app: App, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """The membership cycles (the first before ``started``), until ``cluster_scope`` ends."""
    assert app.cluster is not None
    app.cluster.member = attrs.evolve(app.cluster.member, health=next(iter(app.health_urls), None))
    with app.cluster_scope:
        await app.cluster.run(task_status=task_status)


async def _shut_down(app: App, nursery: trio.Nursery) -> None:
    """
    A cluster member hands its partitions to its peers first, while its
    sockets are still open; then intake stops; the router drains what was
    received; then the writers flush (what they hold of handed-over markets
    is fenced out: their new owner writes them).
    """
    logger.info("daemon_stopping", frames=app.stats.frames)
    if app.cluster is not None:
        app.cluster_scope.cancel()
        with trio.CancelScope(shield=True), trio.move_on_after(DRAIN_SECONDS):
            await app.cluster.leave()
    app.intake.cancel()  # readers close their channel: the router drains and ends
    with trio.move_on_after(DRAIN_SECONDS):
        await app.routed.wait()
    nursery.cancel_scope.cancel()  # writers flush in their `finally`


def _log_started(app: App) -> None:
    logger.info(
        "daemon_started",
        feed_url=app.config.feed.url,
        health=app.health_urls,
        assets=app.stats.desired_assets,
        rules=app.monitor.rule_count,
        mark=app.config.positions.mark,
    )


def _log_stopped(app: App) -> None:
    stats = app.stats
    logger.info(
        "daemon_stopped",
        frames=stats.frames,
        frames_applied=app.router.frames_applied,
        rows_markets=stats.rows_written["markets"],
        rows_positions=stats.rows_written["positions"],
        triggers=stats.triggers_written,
    )


async def run(
    config: Config,
    dsn: str,
    *,
    account: OrderSigner | None = None,
    task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Run the daemon until :meth:`App.stop` or cancellation.

    Args:
        config: the validated configuration.
        dsn: the database to use (``database.dsn`` or the embedded server's).
        account: what signs orders in ``execute.mode = "clob"`` (tests, the
            demo); by default the ``POLYMARKET_*`` environment variables.
        task_status: receives the :class:`App` once every part has started
            and the first reconcile has run.

    Raises:
        OSError: ``health.listen`` cannot be bound.
        ConfigError: ``execute.mode = "clob"`` without ``account`` and without
            the credentials in the environment (docs/execution.md).
    """
    if config.execute.mode == "clob" and account is None:
        from polystream.venue.orders import TradingAccount  # the signing library: only here

        account = TradingAccount.from_environment(dict(os.environ), config.execute.signature_type)
    app = build(config, dsn)
    try:
        async with (
            _venue_clients(config) as (clob, gamma),
            _order_placer(app, account) as app.placer,
            trio.open_nursery() as last,
        ):
            if app.cache is not None:  # stops after the writers' last flush: it sends its keys
                await last.start(app.cache.run)
            try:
                await _run_parts(app, clob, gamma, task_status)
            finally:
                last.cancel_scope.cancel()
    finally:
        for link in app.links.values():
            link.close()
        if app.cluster is not None:
            app.cluster.link.close()
        app.triggers.close()
        _log_stopped(app)


async def _run_parts(
    app: App, clob: ClobClient, gamma: GammaClient, task_status: trio.TaskStatus[App]
) -> None:
    """Every part but the cache invalidation, from start-up to shutdown (:func:`run`)."""
    config = app.config
    async with trio.open_nursery() as nursery:
        # The health port first: a second daemon on the same port fails here,
        # before it subscribes or writes a row.
        app.health_urls = await nursery.start(serve_health, app.stats, config.health.listen)
        await nursery.start(run_lag_probe, app.stats)
        if app.cluster is not None:  # its share first: the first reconcile subscribes it
            await nursery.start(_run_cluster, app)
        await _start_outputs(app, nursery)
        # The first trigger waits for no connect and goes out at once (prepared).
        nursery.start_soon(app.triggers.warm_up, TRIGGER_STATEMENTS)
        await nursery.start(_run_intake, app, clob, gamma)
        _log_started(app)
        task_status.started(app)
        # Everything loaded at start-up (100,000s of rules, the books) lives as
        # long as the process: keep it out of the cyclic collector's full passes,
        # which otherwise stall the event loop (and the heartbeat) for a second.
        gc.freeze()
        await release_free_memory()  # the load's temporaries: pages back before the dump
        await app.stopping.wait()
        await _shut_down(app, nursery)

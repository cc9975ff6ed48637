"""
``run(config, dsn)``: the one place where polystream's parts are built and
wired, in one nursery. Nothing is created at import time.

::

    Reconciler --set_assets--> FeedPool --events--> Router --touch--> MarketWriter
        ^  (LISTEN wakes it)      ^                   |                 PositionWriter
        |                  Poller (HTTP fallback)     |   '--on_price--> Monitor --> Executor
        '----------------- PostgreSQL <---------------'-------------------------------'

Shutdown (:meth:`App.stop`, SIGTERM/SIGINT in the CLI) is ordered: intake
stops first (feed, reconciler, LISTEN, poller), the router applies what the
readers had already received, then the writers, the monitor's executor and
the health server are cancelled and flush the coalesced state in their
``finally`` blocks, within a bound.
"""

from __future__ import annotations

import gc
import time
from decimal import Decimal
from functools import partial

import attrs
import structlog
import trio

from polystream.book import Books
from polystream.config import Config
from polystream.feed import FeedPool
from polystream.gamma import GammaClient, MetadataFiller, open_gamma_client, run_metadata_filler
from polystream.health import serve_health
from polystream.monitor import Executor, Monitor, RuleLoader, write_decisions
from polystream.pipeline import (
    Catalog,
    MarketWriter,
    PositionWriter,
    Router,
    write_markets,
    write_positions,
)
from polystream.poller import ClobClient, ShardWatch, open_clob_client, prices_moved, run_poller
from polystream.protocol import FeedEvent, FrameParser
from polystream.reconciler import DbLink, Notes, Reconciler, run_listener
from polystream.resync import BookResync
from polystream.stats import Stats

__all__ = ["App", "run"]

logger = structlog.get_logger(__name__)

DRAIN_SECONDS = 5.0
"""Longest wait, at shutdown, for the router to apply what was already received."""


@attrs.define(eq=False)
class App:
    """
    Handles on a running daemon, given to ``task_status.started`` (tests and
    the demo use them; production only stops it).
    """

    stats: Stats
    books: Books
    catalog: Catalog
    pool: FeedPool
    reconciler: Reconciler
    markets: MarketWriter
    positions: PositionWriter
    monitor: Monitor
    executor: Executor
    health_urls: list[str]
    cancel_scope: trio.CancelScope
    stopping: trio.Event = attrs.field(factory=trio.Event)

    def stop(self) -> None:
        """Stop intake, let the router drain, flush the writers; ``run`` then returns."""
        self.stopping.set()


@attrs.define(eq=False)
class _Parts:
    """Everything :func:`run` builds before starting it."""

    config: Config
    dsn: str
    stats: Stats
    books: Books
    catalog: Catalog
    links: dict[str, DbLink]
    markets: MarketWriter
    positions: PositionWriter
    executor: Executor
    monitor: Monitor
    loader: RuleLoader
    router: Router


def _build(config: Config, dsn: str) -> _Parts:
    stats = Stats(silent_after=config.feed.silent_after)
    books = Books()
    catalog = Catalog()
    timeout = config.database.statement_timeout
    names = ("markets", "positions", "reconciler", "subscribe", "gamma", "rules", "triggers")
    links = {name: DbLink(dsn, name, stats, timeout) for name in names}
    pipeline = config.pipeline
    markets = MarketWriter(
        books,
        catalog,
        stats,
        sink=lambda rows: links["markets"].call(write_markets, rows),
        interval=pipeline.market_flush_interval,
        retry_max=config.database.retry_max,
    )
    positions = PositionWriter(
        books,
        catalog,
        stats,
        sink=lambda prices: links["positions"].call(write_positions, prices),
        mark=config.positions.mark,
        debounce=pipeline.debounce,
        rate=pipeline.positions_per_second,
        retry_max=config.database.retry_max,
    )
    executor = Executor(
        config.execute.mode,
        sink=lambda decisions: links["triggers"].call(write_decisions, decisions),
        stats=stats,
    )
    monitor = Monitor(executor.submit, stats, trigger_price=config.monitor.trigger_price)
    loader = RuleLoader(links["rules"], monitor, config.monitor.reload_interval)
    router = Router(books, catalog, markets, positions, listeners=[monitor.on_book])
    return _Parts(
        config,
        dsn,
        stats,
        books,
        catalog,
        links,
        markets,
        positions,
        executor,
        monitor,
        loader,
        router,
    )


async def _run_intake(
    parts: _Parts,
    pool: FeedPool,
    reconciler: Reconciler,
    clob: ClobClient,
    gamma: GammaClient,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Feed, subscriptions, LISTEN, metadata and the HTTP fallback: what stops first."""
    config = parts.config
    async with trio.open_nursery() as nursery:
        if config.resync.enabled:
            parser = FrameParser()
            resync: BookResync = await nursery.start(
                BookResync(
                    fetch=partial(clob.books, parser=parser),
                    deliver=parts.router.apply_rest_book,
                    min_interval=config.resync.min_interval,
                    asset_interval=config.resync.asset_interval,
                    retry_max=config.database.retry_max,
                ).run
            )
            parts.router.resync = resync.request
            parts.stats.resync_snapshot = resync.snapshot
        await nursery.start(pool.run)
        await nursery.start(reconciler.run)
        if config.poll.enabled:
            watch = ShardWatch(grace=config.poll.grace)
            poller = await nursery.start(
                partial(
                    run_poller,
                    clob,
                    lambda: watch.assets(pool.shards.values(), time.monotonic()),
                    parts.router.apply_quote,
                    interval=config.poll.interval,
                    check_interval=config.poll.check_interval,
                    midpoints=config.poll.midpoints,
                )
            )
            parts.stats.poll_snapshot = poller.snapshot
        filler: MetadataFiller = await nursery.start(
            partial(
                run_metadata_filler,
                parts.links["gamma"],
                gamma,
                reconciler.wake,
                interval=config.gamma.fill_interval,
                retry_initial=config.gamma.retry_initial,
                retry_max=config.gamma.retry_max,
            )
        )

        def on_positions_changed(notes: Notes) -> None:
            reconciler.notify(notes)
            filler.wake()
            parts.loader.notify(notes)

        await nursery.start(
            partial(
                run_listener, parts.dsn, on_positions_changed, retry_max=config.database.retry_max
            )
        )
        task_status.started()


async def run(
    config: Config,
    dsn: str,
    *,
    task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Run the daemon until :meth:`App.stop` or cancellation.

    Args:
        config: the validated configuration.
        dsn: the database to use (``database.dsn`` or the embedded server's).
        task_status: receives the :class:`App` once every part has started
            and the first reconcile has run.

    Raises:
        OSError: ``health.listen`` cannot be bound.
    """
    parts = _build(config, dsn)
    stats = parts.stats
    send, receive = trio.open_memory_channel[list[FeedEvent]](config.pipeline.queue_size)
    stats.queue_depth = lambda: receive.statistics().current_buffer_used
    stats.executor_pending = lambda: parts.executor.pending
    try:
        with trio.CancelScope() as scope:
            async with (
                open_gamma_client(
                    config.gamma.url,
                    request_timeout=config.gamma.request_timeout,
                    attempts=config.gamma.attempts,
                ) as gamma,
                open_clob_client(
                    config.poll.url,
                    batch_size=config.poll.batch_size,
                    request_timeout=config.poll.request_timeout,
                    attempts=config.poll.attempts,
                ) as clob,
                trio.open_nursery() as nursery,
            ):
                books = parts.books

                def top_pair(asset_id: str) -> tuple[Decimal | None, Decimal | None] | None:
                    book = books.get(asset_id)
                    if book is None or not book.has_book:
                        return None
                    return book.best_bid, book.best_ask

                async with send:
                    pool = FeedPool(
                        config.feed,
                        send.clone(),
                        stats,
                        stale_check=partial(prices_moved, clob, top_pair),
                    )
                reconciler = Reconciler(
                    parts.links["reconciler"],
                    pool,
                    parts.catalog,
                    stats,
                    config.feed.watch,
                    config.feed.reconcile_interval,
                    grace=config.feed.unsubscribe_grace,
                    fast_link=parts.links["subscribe"],
                    price_now=parts.positions.price_now,
                )
                # Writers and the monitor first: they outlive intake, to flush at shutdown.
                await nursery.start(parts.markets.run)
                await nursery.start(parts.positions.run)
                await nursery.start(parts.executor.run)
                await nursery.start(parts.loader.run)
                await nursery.start(parts.monitor.run)
                router_done = trio.Event()

                async def route() -> None:
                    try:
                        await parts.router.run(receive)
                    finally:
                        router_done.set()

                nursery.start_soon(route)
                intake = trio.CancelScope()

                async def run_intake(task_status: trio.TaskStatus[None]) -> None:
                    with intake:
                        await _run_intake(
                            parts, pool, reconciler, clob, gamma, task_status=task_status
                        )

                await nursery.start(run_intake)
                urls: list[str] = await nursery.start(serve_health, stats, config.health.listen)
                app = App(
                    stats,
                    books,
                    parts.catalog,
                    pool,
                    reconciler,
                    parts.markets,
                    parts.positions,
                    parts.monitor,
                    parts.executor,
                    urls,
                    scope,
                )
                logger.info(
                    "daemon_started",
                    feed_url=config.feed.url,
                    health=urls,
                    assets=stats.desired_assets,
                    rules=parts.monitor.rule_count,
                    mark=config.positions.mark,
                )
                task_status.started(app)
                # Everything loaded at start-up (100,000s of rules, the books) lives
                # as long as the process: keep it out of the cyclic collector's full
                # passes, which otherwise stall the event loop (and the heartbeat)
                # for a second or more.
                gc.freeze()
                await app.stopping.wait()
                logger.info("daemon_stopping", frames=stats.frames)
                intake.cancel()  # readers close their channel: the router drains and ends
                with trio.move_on_after(DRAIN_SECONDS):
                    await router_done.wait()
                nursery.cancel_scope.cancel()  # writers flush in their `finally`
    finally:
        for link in parts.links.values():
            link.close()
        logger.info(
            "daemon_stopped",
            frames=stats.frames,
            frames_applied=parts.router.frames_applied,
            rows_markets=stats.rows_written["markets"],
            rows_positions=stats.rows_written["positions"],
            triggers=stats.triggers_written,
        )

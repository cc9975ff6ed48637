"""
``run(config, dsn)``: the one place where polystream's parts are built and
wired, in one nursery. Nothing is created at import time.

::

    Reconciler --set_assets--> FeedPool --events--> Router --touch--> MarketWriter
        ^  (LISTEN wakes it)                          |                PositionWriter
        '----------------- PostgreSQL <---------------'----------------'

Cancelling the nursery (SIGTERM/SIGINT in the CLI) stops intake; the writers'
``finally`` blocks flush the coalesced state within a bound.
"""

from __future__ import annotations

import time
from decimal import Decimal
from functools import partial

import attrs
import structlog
import trio

from polystream.book import AssetBook
from polystream.config import Config
from polystream.feed import FeedPool
from polystream.gamma import MetadataFiller, open_gamma_client, run_metadata_filler
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
from polystream.poller import Poller, ShardWatch, open_clob_client, prices_moved, run_poller
from polystream.protocol import FeedEvent
from polystream.reconciler import DbLink, Reconciler, run_listener
from polystream.stats import Stats

__all__ = ["App", "run"]

logger = structlog.get_logger(__name__)


@attrs.define(eq=False)
class App:
    """
    Handles on a running daemon, given to ``task_status.started`` (tests and
    the demo use them; production only cancels).
    """

    stats: Stats
    books: dict[str, AssetBook]
    catalog: Catalog
    pool: FeedPool
    reconciler: Reconciler
    markets: MarketWriter
    positions: PositionWriter
    monitor: Monitor
    executor: Executor
    health_urls: list[str]
    cancel_scope: trio.CancelScope

    def stop(self) -> None:
        """Stop the daemon: intake ends, writers flush, ``run`` returns."""
        self.cancel_scope.cancel()


async def run(
    config: Config,
    dsn: str,
    *,
    task_status: trio.TaskStatus[App] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Run the daemon until cancelled.

    Args:
        config: the validated configuration.
        dsn: the database to use (``database.dsn`` or the embedded server's).
        task_status: receives the :class:`App` once every part has started
            and the first reconcile has run.

    Raises:
        OSError: ``health.listen`` cannot be bound.
    """
    stats = Stats(silent_after=config.feed.silent_after)
    books: dict[str, AssetBook] = {}
    catalog = Catalog()
    pipeline = config.pipeline
    timeout = config.database.statement_timeout
    market_link = DbLink(dsn, "markets", stats, timeout)
    position_link = DbLink(dsn, "positions", stats, timeout)
    reconcile_link = DbLink(dsn, "reconciler", stats, timeout)
    gamma_link = DbLink(dsn, "gamma", stats, timeout)
    rules_link = DbLink(dsn, "rules", stats, timeout)
    triggers_link = DbLink(dsn, "triggers", stats, timeout)
    send, receive = trio.open_memory_channel[list[FeedEvent]](pipeline.queue_size)
    markets = MarketWriter(
        books,
        catalog,
        stats,
        sink=lambda rows: market_link.call(write_markets, rows),
        interval=pipeline.market_flush_interval,
        retry_max=config.database.retry_max,
    )
    positions = PositionWriter(
        books,
        catalog,
        stats,
        sink=lambda prices: position_link.call(write_positions, prices),
        mark=config.positions.mark,
        debounce=pipeline.debounce,
        rate=pipeline.positions_per_second,
        retry_max=config.database.retry_max,
    )
    executor = Executor(
        config.execute.mode,
        sink=lambda decisions: triggers_link.call(write_decisions, decisions),
        stats=stats,
    )
    monitor = Monitor(executor.submit, stats, trigger_price=config.monitor.trigger_price)
    loader = RuleLoader(rules_link, monitor, config.monitor.reload_interval)
    router = Router(books, catalog, markets, positions, listeners=[monitor.on_price])
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

                def top_pair(asset_id: str) -> tuple[Decimal | None, Decimal | None] | None:
                    book = books.get(asset_id)
                    return (
                        None
                        if book is None or not book.has_book
                        else (
                            book.best_bid,
                            book.best_ask,
                        )
                    )

                async with send:
                    pool = FeedPool(
                        config.feed,
                        send.clone(),
                        stats,
                        stale_check=partial(prices_moved, clob, top_pair),
                    )
                reconciler = Reconciler(
                    reconcile_link,
                    pool,
                    catalog,
                    stats,
                    config.feed.watch,
                    config.feed.reconcile_interval,
                    grace=config.feed.unsubscribe_grace,
                )
                # Writers first: they must outlive intake to flush at shutdown.
                await nursery.start(markets.run)
                await nursery.start(positions.run)
                await nursery.start(executor.run)
                await nursery.start(loader.run)
                await nursery.start(monitor.run)
                nursery.start_soon(router.run, receive)
                await nursery.start(pool.run)
                await nursery.start(reconciler.run)
                poller: Poller | None = None
                if config.poll.enabled:
                    watch = ShardWatch(grace=config.poll.grace)
                    poller = await nursery.start(
                        partial(
                            run_poller,
                            clob,
                            lambda: watch.assets(pool.shards.values(), time.monotonic()),
                            router.apply_quote,
                            interval=config.poll.interval,
                            check_interval=config.poll.check_interval,
                            midpoints=config.poll.midpoints,
                        )
                    )
                    stats.poll_snapshot = poller.snapshot
                filler: MetadataFiller = await nursery.start(
                    partial(
                        run_metadata_filler,
                        gamma_link,
                        gamma,
                        reconciler.wake,
                        interval=config.gamma.fill_interval,
                        retry_initial=config.gamma.retry_initial,
                        retry_max=config.gamma.retry_max,
                    )
                )

                def on_positions_changed() -> None:
                    reconciler.wake()
                    filler.wake()
                    loader.wake()

                await nursery.start(
                    partial(
                        run_listener, dsn, on_positions_changed, retry_max=config.database.retry_max
                    )
                )
                urls: list[str] = await nursery.start(serve_health, stats, config.health.listen)
                logger.info(
                    "daemon_started",
                    feed_url=config.feed.url,
                    health=urls,
                    assets=stats.desired_assets,
                    mark=config.positions.mark,
                )
                task_status.started(
                    App(
                        stats,
                        books,
                        catalog,
                        pool,
                        reconciler,
                        markets,
                        positions,
                        monitor,
                        executor,
                        urls,
                        scope,
                    )
                )
    finally:
        for link in (
            market_link,
            position_link,
            reconcile_link,
            gamma_link,
            rules_link,
            triggers_link,
        ):
            link.close()
        logger.info(
            "daemon_stopped",
            frames=stats.frames,
            rows_markets=stats.rows_written["markets"],
            rows_positions=stats.rows_written["positions"],
        )

"""
The trio side of ``polystream record``: the feed's tap, the writer task, the wiring.

::

    FeedPool --tap(message, received_ms)--> bounded channel --> Recorder.run
       | parsed events (dropped)                                   | a batch per thread hop
       v                                                           v
    _release                                          RecordSink.write_batch (thread)

The shards of a :class:`~polystream.feed.pool.FeedPool` (sharding, PING,
reconnects, subscribe frames: the daemon's own) hand every message to
:meth:`Recorder.tap` before parsing it. The tap puts it on a bounded channel
of ``queue_frames`` messages; when the channel is full the shard waits
(backpressure, counted in :attr:`RecordStats.backpressure_waits`) and the
venue's data waits in the socket. :meth:`Recorder.run` takes whatever is
queued as one batch and writes it in a worker thread (compress, write), so
the batches grow when the disk is slow. Every ``fsync_seconds`` it
sync-flushes and fsyncs the files; at each multiple of ``rotate_seconds``
of the wall clock (UTC: hourly files start on the hour) it completes them.

The subscription set is the command line's assets, or the database's desired
set, read and followed exactly as the daemon's reconciler does
(:class:`~polystream.pipeline.subscriptions.Reconciler`: at start, every
``feed.reconcile_interval`` s and on ``LISTEN`` notifications).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection
from functools import partial
from pathlib import Path
from typing import Protocol

import attrs
import structlog
import trio

from polystream.catalog import Catalog
from polystream.config import Config
from polystream.feed.pool import FeedPool, FrameEvents
from polystream.feed.protocol import FeedEvent
from polystream.feed.transport import Message
from polystream.pipeline.subscriptions import Reconciler
from polystream.record.files import FileSet, leftover_parts
from polystream.record.sink import Received, RecordSink, RecordStats
from polystream.stats import Stats
from polystream.store.link import DbLink
from polystream.store.listen import run_listener

__all__ = [
    "CAPTURE_SUFFIX",
    "MIB",
    "RAW_SUFFIX",
    "BatchSink",
    "RecordOptions",
    "Recorder",
    "Recording",
    "run_record",
]

logger = structlog.get_logger(__name__)

MIB = 1024 * 1024
CAPTURE_SUFFIX = ".jsonl.gz"
RAW_SUFFIX = ".raw.jsonl.gz"
_CLOSE_SECONDS = 30.0  # a final batch and the renames, after cancellation


@attrs.frozen
class RecordOptions:
    """
    How ``polystream record`` writes.

    Attributes:
        directory: capture files go here; raw files (``raw``) in ``directory/raw``.
        prefix: file names start ``<prefix>-``.
        rotate_seconds: a new file at each multiple of this many seconds of
            the wall clock (UTC), > 0.
        rotate_bytes: a new file before this many uncompressed bytes, > 0.
        fsync_seconds: sync-flush and fsync at most this long after a write, > 0.
        raw: also write every message exactly as received (:func:`~polystream.record.sink.raw_line`).
        queue_frames: messages queued for the writer before a shard waits, >= 1.
    """

    directory: Path
    prefix: str = "market"
    rotate_seconds: float = 3600.0
    rotate_bytes: int = 256 * MIB
    fsync_seconds: float = 1.0
    raw: bool = False
    queue_frames: int = 1000


class BatchSink(Protocol):
    """What :class:`Recorder` writes batches to (:class:`RecordSink`)."""

    def write_batch(self, batch: list[Received], *, sync: bool, finish: bool) -> None:
        """Write ``batch``; then complete the files (``finish``) or sync them (``sync``)."""


async def _in_worker_thread(fn: Callable[[], None]) -> None:
    await trio.to_thread.run_sync(fn)


@attrs.define(eq=False)
class Recorder:
    """
    The feed's tap and the writer task (see the module docstring).

    Build it with :meth:`from_options`; :meth:`tap` is the pool's
    :data:`~polystream.feed.pool.FrameTap`; :meth:`run` writes until
    :meth:`close_intake` was called and the queue is drained, then completes
    the files.

    Attributes:
        sink: where batches go, in a worker thread (:class:`RecordSink`).
        options: intervals and the queue size.
        stats: the counters.
        wall_clock: unix seconds, for the rotation times.
        run_sync: runs one ``sink`` call (default: in a worker thread).
    """

    sink: BatchSink
    options: RecordOptions
    stats: RecordStats
    wall_clock: Callable[[], float] = time.time
    run_sync: Callable[[Callable[[], None]], Awaitable[None]] = _in_worker_thread
    _send: trio.MemorySendChannel[Received] = attrs.field(init=False)
    _receive: trio.MemoryReceiveChannel[Received] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Received](self.options.queue_frames)

    @classmethod
    def from_options(cls, options: RecordOptions, stats: RecordStats | None = None) -> Recorder:
        """A recorder writing capture (and raw) files as ``options`` say; opens nothing yet."""
        stats = stats or RecordStats()
        frames = FileSet(options.directory, options.prefix, CAPTURE_SUFFIX, options.rotate_bytes)
        raw = None
        if options.raw:
            raw = FileSet(
                options.directory / "raw", options.prefix, RAW_SUFFIX, options.rotate_bytes
            )
        sink = RecordSink(frames, raw, stats)
        for files in (frames, raw):
            if files is not None:
                files.on_finished = sink.on_finished
        return cls(sink, options, stats)

    async def tap(self, message: Message, received_ms: int) -> None:
        """Queue one message (the pool's tap); waits while the queue is full."""
        self.stats.frames_received += 1
        try:
            self._send.send_nowait((message, received_ms))
        except trio.WouldBlock:
            self.stats.backpressure_waits += 1
            await self._send.send((message, received_ms))

    def close_intake(self) -> None:
        """No more messages: :meth:`run` writes what is queued, completes the files and returns."""
        self._send.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """
        Write batches until :meth:`close_intake` and the queue is drained;
        then, or when cancelled or failing, complete the open files (what is
        still queued is then lost).

        Raises:
            OSError: a file cannot be written, synced or renamed.
        """
        # The receive side stays open: closed, it would fail a waiting tap as
        # if the feed broke, while a failure here cancels the feed anyway.
        try:
            task_status.started()
            await self._write_until_closed()
        finally:
            with trio.move_on_after(_CLOSE_SECONDS, shield=True):
                await self._write([], sync=False, finish=True)

    async def _write_until_closed(self) -> None:
        options = self.options
        next_sync = trio.current_time() + options.fsync_seconds
        next_rotation = self._next_rotation()
        while True:
            batch: list[Received] = []
            with trio.move_on_at(min(next_sync, next_rotation)):
                try:
                    batch.append(await self._receive.receive())
                except trio.EndOfChannel:
                    return
                self._take_queued(batch)
            now = trio.current_time()
            finish, sync = now >= next_rotation, now >= next_sync
            if batch or finish or sync:
                await self._write(batch, sync=sync and not finish, finish=finish)
            if finish:
                next_rotation = self._next_rotation(rotated=True)
            if finish or sync:
                next_sync = now + options.fsync_seconds

    def _take_queued(self, batch: list[Received]) -> None:
        """Add what is queued now to ``batch`` (at most the queue's size)."""
        receive = self._receive
        for _ in range(self.options.queue_frames):
            try:
                batch.append(receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                return

    def _next_rotation(self, *, rotated: bool = False) -> float:
        """
        The trio time of the next multiple of ``rotate_seconds`` of the wall
        clock. Just after a rotation that the trio clock (monotonic) timed a
        little before the wall clock's multiple (the two drift apart: NTP
        slews up to 0.05 %), the one after it, not one a moment later.
        """
        period = self.options.rotate_seconds
        remaining = period - self.wall_clock() % period
        if rotated and remaining < period / 2:
            remaining += period
        return trio.current_time() + remaining

    async def _write(self, batch: list[Received], *, sync: bool, finish: bool) -> None:
        self.stats.batches += 1
        await self.run_sync(partial(self.sink.write_batch, batch, sync=sync, finish=finish))


@attrs.define(eq=False)
class Recording:
    """
    A running recording (:func:`run_record`): :meth:`stop` ends it cleanly.

    Attributes:
        recorder: the tap and writer.
        pool: the feed.
        stats: the feed's counters (frames, reconnects, parse errors).
        stopping: set by :meth:`stop`.
        intake: the scope of the feed (and the database's reconciler), which
            :meth:`stop` cancels.
    """

    recorder: Recorder
    pool: FeedPool
    stats: Stats
    stopping: trio.Event = attrs.field(factory=trio.Event)
    intake: trio.CancelScope = attrs.field(factory=trio.CancelScope)

    def stop(self) -> None:
        """Close the feed; what was received is written, the files completed, then :func:`run_record` returns."""
        self.stopping.set()
        self.intake.cancel()


async def run_record(
    config: Config,
    options: RecordOptions,
    *,
    assets: Collection[str] = (),
    dsn: str | None = None,
    task_status: trio.TaskStatus[Recording] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Record the market channel of ``config.feed`` to files (``options``)
    until :meth:`Recording.stop` (or cancellation, which loses what is queued).

    Subscribes ``assets``, or with ``dsn`` the database's desired set,
    followed as the daemon's reconciler does (see the module docstring).
    ``task_status.started(recording)`` once the feed and the writer run.
    Logs ``record_started``, ``record_file_closed`` per file, ``record_stopped``.

    Raises:
        OSError: a file cannot be written, synced or renamed.
    """
    feed_stats = Stats(silent_after=config.feed.silent_after)
    events, parsed = trio.open_memory_channel[list[FeedEvent]](config.pipeline.queue_size)
    recorder = Recorder.from_options(options)
    pool = FeedPool(config=config.feed, events=events, stats=feed_stats, tap=recorder.tap)
    recording = Recording(recorder, pool, feed_stats)
    _warn_leftovers(options)
    link = None
    if dsn is not None:
        timeout = config.database.statement_timeout
        link = DbLink(dsn=dsn, name="record", stats=feed_stats, statement_timeout=timeout)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(recorder.run)
            try:
                with recording.intake:
                    async with trio.open_nursery() as intake:
                        intake.start_soon(_release, parsed)
                        await intake.start(pool.run)
                        if link is None:
                            pool.set_assets(set(assets))
                        else:
                            await _follow_database(config, pool, link, intake)
                        _log_started(options, assets, link)
                        task_status.started(recording)
            finally:
                recorder.close_intake()
    finally:
        if link is not None:
            link.close()
        _log_stopped(recording)


async def _follow_database(
    config: Config, pool: FeedPool, link: DbLink, nursery: trio.Nursery
) -> None:
    """Start a reconciler (and its ``LISTEN``) keeping ``pool`` on the database's desired set."""
    feed = config.feed
    reconciler = Reconciler(
        link=link,
        pool=pool,
        catalog=Catalog(),
        stats=pool.stats,
        watch=feed.watch,
        interval=feed.reconcile_interval,
        grace=feed.unsubscribe_grace,
    )
    await nursery.start(reconciler.run)
    await nursery.start(
        partial(run_listener, link.dsn, reconciler.notify, retry_max=config.database.retry_max)
    )


async def _release(parsed: trio.MemoryReceiveChannel[list[FeedEvent]]) -> None:
    """Drop the pool's parsed events (the messages were tapped); release big frames at once."""
    with parsed:
        async for events in parsed:
            if isinstance(events, FrameEvents):
                events.applied.set()


def _warn_leftovers(options: RecordOptions) -> None:
    """Log the ``.part`` files a run that died left (kept: replay reads them; rename to keep)."""
    for directory in (options.directory, options.directory / "raw"):
        for path in leftover_parts(directory, options.prefix):
            logger.warning("record_leftover_part", path=str(path))


def _log_started(options: RecordOptions, assets: Collection[str], link: DbLink | None) -> None:
    logger.info(
        "record_started",
        directory=str(options.directory),
        assets="database" if link is not None else len(assets),
        raw=options.raw,
        rotate_seconds=options.rotate_seconds,
        rotate_bytes=options.rotate_bytes,
        fsync_seconds=options.fsync_seconds,
    )


def _log_stopped(recording: Recording) -> None:
    stats = recording.recorder.stats
    logger.info(
        "record_stopped",
        frames_received=stats.frames_received,
        frames_recorded=stats.frames_recorded,
        bytes_recorded=stats.bytes_recorded,
        raw_frames=stats.raw_frames,
        control_frames=stats.control_frames,
        bad_frames=dict(stats.bad_frames),
        backpressure_waits=stats.backpressure_waits,
        files=stats.files,
        reconnects=sum(shard.reconnects for shard in recording.stats.shards.values()),
    )

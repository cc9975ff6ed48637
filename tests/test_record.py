"""
``polystream record``: the market channel (the replay server on recorded
frames, over a real loopback WebSocket) to rotating gzip files that
``polystream replay`` reads back.

* the recording holds the source's frames, in order, after the server's
  answer to the subscribe (its book dump);
* replayed into a real daemon on real PostgreSQL it leaves the database
  exactly as the original capture does;
* rotation (by size; by the wall clock under a mock clock), the fsync
  interval, backpressure, ``--raw``, SIGTERM on a real process, a file cut
  short by a crash, and the envelope line of the capture format.
"""

from __future__ import annotations

import base64
import gzip
import signal
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import orjson
import psycopg
import pytest
import structlog
import trio
import trio.testing
from cli_process import clean_env, run_polystream
from expected import (
    AAIMEK,
    ROOT,
    UPDOWN,
    expected_assets,
    hold_every_updown_token,
    insert_position,
    mismatches,
)

from polystream.app import App, run
from polystream.config import Config, FeedConfig, HealthConfig, PipelineConfig
from polystream.errors import ReplayError
from polystream.record import (
    FileSet,
    Received,
    Recorder,
    Recording,
    RecordOptions,
    RecordStats,
    run_record,
)
from polystream.replay import Capture, ReplayServer, serve_replay
from polystream.replay.capture import envelope_line
from polystream.store.markets import import_markets_file, parse_gamma_payload

ENRICO = ROOT / "tests" / "data" / "replay" / "enricobignozzi-2026-09-24.jsonl"
SOURCES = {
    "updown": Path(f"{UPDOWN}.jsonl.gz"),
    "aaimek": Path(f"{AAIMEK}.jsonl.gz"),
    "enricobignozzi": ENRICO,
}


def _captures(directory: Path) -> list[Path]:
    """The completed capture files of a recording, in name (= time) order."""
    return sorted(directory.glob("*.jsonl.gz"))


def _feed(url: str, **changes: Any) -> Config:
    """A configuration whose feed is the replay server at ``url``."""
    return Config(feed=FeedConfig(url=url, custom_feature_enabled=True, **changes))


async def _wait_until(condition: Any) -> None:
    """Poll ``condition()`` until true (the callers hold a ``fail_after``)."""
    while not condition():
        await trio.sleep(0.02)


async def _record(
    source: Sequence[Path],
    options: RecordOptions,
    *,
    done: Any = None,
    **feed: Any,
) -> tuple[Recording, ReplayServer]:
    """
    Record ``source`` played at maximum speed, all its assets subscribed,
    until ``done(recording, server)`` (default: every frame of the tape and
    the subscribe's answer are written); then stop the recording cleanly.
    """
    capture = Capture.load(list(source))
    wanted = len(capture.frames) + 1

    def written(recording: Recording, _server: ReplayServer) -> bool:
        return recording.recorder.stats.frames_recorded >= wanted

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server: ReplayServer = await nursery.start(
                partial(serve_replay, list(source), max_speed=True)
            )
            config = _feed(server.url, **feed)
            recording, finished = await _start(
                nursery, partial(run_record, config, options, assets=capture.markets)
            )
            await _wait_until(lambda: (done or written)(recording, server))
            recording.stop()
            await finished.wait()
            nursery.cancel_scope.cancel()
    return recording, server


async def _start(nursery: trio.Nursery, record: Any) -> tuple[Recording, trio.Event]:
    """Start ``record`` (a :func:`run_record`); the recording and an event set once it returned."""
    finished = trio.Event()

    async def recording(task_status: trio.TaskStatus[Recording]) -> None:
        try:
            await record(task_status=task_status)
        finally:
            finished.set()

    return await nursery.start(recording), finished


def _parts(directory: Path) -> list[Path]:
    return sorted(directory.glob("**/*.part"))


# ------------------------------------------------------------------ the recording


@pytest.mark.parametrize("name", SOURCES)
async def test_recording_holds_the_source_frames_in_order(name: str, tmp_path: Path) -> None:
    source = Capture.load([SOURCES[name]])
    recording, _server = await _record([SOURCES[name]], RecordOptions(tmp_path))
    (path,) = _captures(tmp_path)
    gzip.decompress(path.read_bytes())  # complete: trailer and CRC
    loaded = Capture.load([path])
    dump, *frames = loaded.frames
    # The server's answer to the subscribe: one array of a book per asset.
    assert dump.is_array and {e["event_type"] for e in dump.events} == {"book"}
    assert dump.asset_ids == frozenset(source.markets)
    assert [f.events for f in frames] == [f.events for f in source.frames]
    # Frames of subscribed assets only are sent byte for byte, as recorded.
    assert [f.text for f in frames if f.plain] == [f.text for f in source.frames if f.plain]
    stamps = [f.received_ms for f in loaded.frames]
    assert all(isinstance(ms, int) and ms > 1_700_000_000_000 for ms in stamps)
    assert [f.time_ms for f in loaded.frames] == sorted(f.time_ms for f in loaded.frames)
    stats = recording.recorder.stats
    assert (stats.frames_recorded, stats.bad_frames, stats.files) == (len(frames) + 1, {}, 1)


async def test_rotation_by_size_gives_files_that_load_as_one(tmp_path: Path) -> None:
    source = Capture.load([SOURCES["updown"]])
    limit = 512 * 1024
    recording, _server = await _record(
        [SOURCES["updown"]], RecordOptions(tmp_path, rotate_bytes=limit)
    )
    paths = _captures(tmp_path)
    assert len(paths) >= 10, paths
    assert recording.recorder.stats.files == len(paths)
    assert not _parts(tmp_path)
    sizes = [len(gzip.decompress(p.read_bytes())) for p in paths]
    assert all(0 < size <= limit for size in sizes)
    assert sum(sizes) == recording.recorder.stats.bytes_recorded
    # Names sort by time: the order the files were written in, which is also
    # the order of their receive times.
    firsts = [Capture.load([p]).frames[0].time_ms for p in paths]  # = received_ms
    assert firsts == sorted(firsts)
    whole = Capture.load(paths)
    assert [f.events for f in whole.frames[1:]] == [f.events for f in source.frames]


# ------------------------------------------------------------------ record -> replay


def _table_state(dsn: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    with psycopg.connect(dsn) as conn:
        markets = conn.execute(
            "SELECT id, outcome_prices, best_bid, best_ask, last_mid_price, last_trade_price,"
            " tick_size, source FROM markets ORDER BY id"
        ).fetchall()
        positions = conn.execute(
            "SELECT token_id, status, current_price, pnl_amount, pnl_percentage"
            " FROM positions ORDER BY token_id"
        ).fetchall()
    return markets, positions


async def _daemon_on(paths: list[Path], dsn: str) -> tuple[list[Any], list[Any]]:
    """Replay ``paths`` at maximum speed into a daemon holding every updown token; the tables."""
    hold_every_updown_token(dsn)
    expected = expected_assets(UPDOWN)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            server: ReplayServer = await nursery.start(partial(serve_replay, paths, max_speed=True))
            config = Config(
                feed=FeedConfig(url=server.url, reconcile_interval=30.0),
                pipeline=PipelineConfig(market_flush_interval=0.05, debounce=0.2),
                health=HealthConfig(listen="127.0.0.1:0"),
            )
            app: App = await nursery.start(run, config, dsn)
            await server.finished.wait()
            with trio.move_on_after(60):
                while await trio.to_thread.run_sync(mismatches, dsn, expected):
                    await trio.sleep(0.1)
            assert await trio.to_thread.run_sync(mismatches, dsn, expected) == []
            assert app.stats.parse_errors == {}
            app.stop()
            nursery.cancel_scope.cancel()
    return _table_state(dsn)


async def test_replaying_the_recording_leaves_the_database_as_the_original(
    db_dsn: str, other_db_dsn: str, tmp_path: Path
) -> None:
    await _record([SOURCES["updown"]], RecordOptions(tmp_path, rotate_bytes=2 * 1024 * 1024))
    paths = _captures(tmp_path)
    assert len(paths) > 1
    from_recording = await _daemon_on(paths, db_dsn)
    from_original = await _daemon_on([SOURCES["updown"]], other_db_dsn)
    assert from_recording == from_original
    markets, positions = from_recording
    assert len(markets) == 6 and len(positions) == 12
    assert all(row[-1] == "ws" for row in markets)


# ------------------------------------------------------------------ following the database


def _tokens(market_id: str) -> set[str]:
    markets = parse_gamma_payload(Path(f"{UPDOWN}.markets.json").read_bytes())
    (market,) = (m for m in markets if m.id == market_id)
    return set(market.clob_token_ids)


async def test_without_assets_it_follows_the_database(db_dsn: str, tmp_path: Path) -> None:
    with psycopg.connect(db_dsn) as conn:
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
        insert_position(conn, "900003", "Up", "10", "0.5")
    first, later = _tokens("900003"), _tokens("900005")
    options = RecordOptions(tmp_path)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server: ReplayServer = await nursery.start(
                partial(serve_replay, [SOURCES["updown"]], speed=1.0)
            )
            config = _feed(server.url, reconcile_interval=30.0)
            recording, finished = await _start(
                nursery, partial(run_record, config, options, dsn=db_dsn)
            )
            assert set(recording.pool.asset_shard) == first  # read before started
            with psycopg.connect(db_dsn) as other:  # NOTIFY: subscribed at once
                insert_position(other, "900005", "Down", "10", "0.5")
            await _wait_until(lambda: set(recording.pool.asset_shard) == first | later)
            shards = recording.stats.shards.values()
            await _wait_until(lambda: later <= set().union(*(s.seen_assets for s in shards)))
            recording.stop()
            await finished.wait()
            nursery.cancel_scope.cancel()
    frames = Capture.load(_captures(tmp_path)).frames
    dumps = [f.asset_ids for f in frames if {e["event_type"] for e in f.events} == {"book"}]
    assert dumps[0] == first and later in dumps
    assert all(f.asset_ids <= first | later for f in frames)


# ------------------------------------------------------------------ --raw


async def test_raw_keeps_every_text_exactly(tmp_path: Path) -> None:
    injected: list[str | bytes] = ["hello", '{"no_event_type": 1}', b"\x00\x01binary"]
    sent = False

    def done(recording: Recording, server: ReplayServer) -> bool:
        nonlocal sent
        stats = recording.recorder.stats
        if server.finished.is_set() and not sent:
            sent = bool(server.inject(injected))
        return sum(stats.bad_frames.values()) == 3 and stats.control_frames >= 2

    options = RecordOptions(tmp_path, raw=True)
    recording, _server = await _record([ENRICO], options, done=done, ping_interval=0.05)
    stats = recording.recorder.stats
    assert stats.bad_frames == {"not_a_frame": 2, "binary_frame": 1}
    (raw_path,) = sorted((tmp_path / "raw").glob("*.raw.jsonl.gz"))
    assert raw_path.name.startswith("market-")
    raw = [orjson.loads(line) for line in gzip.decompress(raw_path.read_bytes()).splitlines()]
    assert len(raw) == stats.raw_frames == stats.frames_received
    texts = [line.get("text") for line in raw]
    assert "PONG" in texts and "hello" in texts and '{"no_event_type": 1}' in texts
    (binary,) = [line for line in raw if "base64" in line]
    assert binary["binary"] is True and base64.b64decode(binary["base64"]) == b"\x00\x01binary"
    # The capture files hold exactly the frames among them, same texts, same receive times.
    frames = Capture.load(_captures(tmp_path)).frames
    data = [
        (line["text"], line["received_ms"])
        for line in raw
        if line.get("text", "").startswith(("[", "{")) and line["text"] not in injected
    ]
    assert [(f.text, f.received_ms) for f in frames] == data


# ------------------------------------------------------------------ SIGTERM


async def test_sigterm_completes_the_file_and_exits_0(tmp_path: Path) -> None:
    source = Capture.load([SOURCES["updown"]])
    out = tmp_path / "recordings"
    log_path = tmp_path / "record.log"
    assets = [arg for asset in sorted(source.markets) for arg in ("--asset", asset)]
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            server: ReplayServer = await nursery.start(
                partial(serve_replay, [SOURCES["updown"]], speed=30.0)
            )
            env = clean_env(POLYSTREAM_FEED__URL=server.url)
            with log_path.open("wb") as log:
                process = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "polystream", "record", "--dir", str(out), *assets],
                    env=env,
                    cwd=tmp_path,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                await _wait_until(lambda: server.stats.frames_sent > 300 and _parts(out))
                process.send_signal(signal.SIGTERM)
                code = await process.wait()
            nursery.cancel_scope.cancel()
    lines = [orjson.loads(line) for line in log_path.read_bytes().splitlines() if line]
    assert code == 0, lines[-5:]
    events = [line["event"] for line in lines]
    assert events[-1] == "record_stopped" and "shutdown_requested" in events
    assert not _parts(out)
    (path,) = _captures(out)
    gzip.decompress(path.read_bytes())  # a complete gzip file: no EOFError
    dump, *frames = Capture.load([path]).frames
    assert dump.asset_ids == frozenset(source.markets)
    assert 0 < len(frames) < len(source.frames), "the signal must land mid-replay"
    assert [f.events for f in frames] == [f.events for f in source.frames[: len(frames)]]
    assert lines[-1]["frames_recorded"] == len(frames) + 1


# ------------------------------------------------------------------ a crash


def _lines(count: int) -> list[bytes]:
    frames = Capture.load([SOURCES["updown"]]).frames[:count]
    return [envelope_line(f, 1_765_450_000_000 + i) for i, f in enumerate(frames)]


def test_a_file_cut_short_loads_its_complete_lines(tmp_path: Path) -> None:
    lines = _lines(400)
    files = FileSet(tmp_path / "live", "t", ".jsonl.gz", rotate_bytes=1 << 30)
    files.write(lines[:200])
    files.sync()  # all of these survive a crash
    part = files.part_path
    assert part is not None and part.name.endswith(".jsonl.gz.part")
    synced = part.stat().st_size
    files.write(lines[200:])
    crashed = part.read_bytes()  # what a crash now leaves on disk
    assert 200 <= len(Capture.load([part]).frames) <= 400  # the .part itself reads as gzip
    for cut in (len(crashed), len(crashed) - 1, synced, (synced + len(crashed)) // 2):
        copy = tmp_path / f"cut-{cut}.jsonl.gz"
        copy.write_bytes(crashed[:cut])
        with structlog.testing.capture_logs() as logs:
            frames = Capture.load([copy]).frames
        assert len(frames) >= 200
        first_ms = 1_765_450_000_000
        assert [f.received_ms for f in frames] == list(range(first_ms, first_ms + len(frames)))
        (warning,) = [log for log in logs if log["event"] == "capture_truncated"]
        assert warning["log_level"] == "warning" and warning["path"] == str(copy)
    assert files.finish() is not None
    assert len(Capture.load(sorted((tmp_path / "live").glob("*.jsonl.gz"))).frames) == 400


def test_a_corrupt_gzip_stream_still_fails(tmp_path: Path) -> None:
    data = bytearray(gzip.compress(b"".join(_lines(50))))
    data[-6] ^= 0xFF  # the CRC: complete, but not what was written
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(ReplayError, match=r"corrupt\.jsonl\.gz: cannot read capture"):
        Capture.load([path])


# ------------------------------------------------------------------ time logic (mock clock)


WALL_START = 1_765_450_795.0  # 5 s before a multiple of 10 s of UTC


@attrs.define
class _Sink:
    """Records every batch with the trio time it was written at."""

    calls: list[tuple[float, list[Received], bool, bool]] = attrs.Factory(list)
    gate: trio.Event | None = None

    def write_batch(self, batch: list[Received], *, sync: bool, finish: bool) -> None:
        self.calls.append((trio.current_time(), list(batch), sync, finish))


def _recorder(sink: _Sink, *, wall_rate: float = 1.0, **options: Any) -> Recorder:
    start = trio.current_time()

    async def inline(fn: Any) -> None:
        await trio.lowlevel.checkpoint()
        if sink.gate is not None:
            await sink.gate.wait()
        fn()

    return Recorder(
        sink,
        RecordOptions(Path("unused"), **options),
        RecordStats(),
        wall_clock=lambda: WALL_START + (trio.current_time() - start) * wall_rate,
        run_sync=inline,
    )


async def test_fsync_interval_and_rotation_on_the_wall_clock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    sink = _Sink()
    recorder = _recorder(sink, rotate_seconds=10.0, fsync_seconds=1.0)
    start = trio.current_time()
    sent = [(f"frame {i}", i) for i in range(120)]
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        for message, ms in sent:  # one frame every 0.25 s for 30 s
            await trio.sleep_until(start + ms * 0.25)
            await recorder.tap(message, ms)
        await trio.sleep(0.5)
        recorder.close_intake()
    times = [(round(t - start, 6), sync, finish) for t, _, sync, finish in sink.calls]
    finishes = [t for t, _, finish in times if finish]
    assert finishes == [5.0, 15.0, 25.0, 30.25]  # the boundaries of UTC, then the close
    syncs = sorted({t for t, sync, _ in times if sync})
    assert syncs == [t for t in range(1, 31) if t % 10 != 5]  # a rotation syncs too
    assert [item for _, batch, _, _ in sink.calls for item in batch] == sent
    assert recorder.stats.backpressure_waits == 0


@pytest.mark.parametrize("wall_rate", [0.99, 1.01], ids=["wall-slow", "wall-fast"])
async def test_rotation_follows_a_drifting_wall_clock(
    wall_rate: float, autojump_clock: trio.testing.MockClock
) -> None:
    """The trio clock and the wall clock drift apart: still one rotation per period."""
    sink = _Sink()
    recorder = _recorder(sink, wall_rate=wall_rate, rotate_seconds=10.0, fsync_seconds=1000.0)
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)
        for i in range(400):  # a frame every 0.25 s for 100 s
            await trio.sleep_until(start + i * 0.25)
            await recorder.tap(f"frame {i}", i)
        recorder.close_intake()
    finishes = [t - start for t, _, _, finish in sink.calls if finish][:-1]  # not the close
    walls = [WALL_START + t * wall_rate for t in finishes]
    assert len(finishes) == 10
    assert all(abs(wall - round(wall, -1)) < 0.2 for wall in walls), walls


async def test_a_slow_writer_holds_the_feed_back(autojump_clock: trio.testing.MockClock) -> None:
    gate = trio.Event()
    sink = _Sink(gate=gate)
    recorder = _recorder(sink, queue_frames=3, fsync_seconds=1000.0)
    sent = [(f"frame {i}", i) for i in range(10)]
    tapped = 0
    async with trio.open_nursery() as nursery:
        await nursery.start(recorder.run)

        async def feed() -> None:
            nonlocal tapped
            for item in sent:
                await recorder.tap(*item)
                tapped += 1
            recorder.close_intake()

        nursery.start_soon(feed)
        await trio.testing.wait_all_tasks_blocked()
        # A batch in the writer, the queue full: the feed waits for room.
        assert tapped < len(sent) and recorder.stats.backpressure_waits >= 1
        assert sink.calls == []
        gate.set()
    assert [item for _, batch, _, _ in sink.calls for item in batch] == sent
    assert recorder.stats.backpressure_waits >= 1
    assert sink.calls[-1][3] is True  # the files completed at the end


# ------------------------------------------------------------------ the capture format


def test_envelope_lines_load_in_either_layout(tmp_path: Path) -> None:
    event = '{"event_type": "last_trade_price", "asset_id": "7", "market": "0xm", "price": "0.5", "size": "1", "side": "BUY", "timestamp": "1000"}'
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        f'{{"received_ms":2000,"frame":{event}}}\n'  # as recorded: text kept byte for byte
        f'{{"frame": [{event}], "received_ms": 2500}}\n'  # another layout: re-encoded
        f"{event}\n"  # a plain line: its event time (clamped to 2500)
    )
    one, two, three = Capture.load([path]).frames
    assert (one.text, one.received_ms, one.time_ms, one.is_array) == (event, 2000, 2000, False)
    assert two.text == orjson.dumps([orjson.loads(event)]).decode() and two.is_array
    assert (two.received_ms, two.time_ms) == (2500, 2500)
    assert (three.text, three.received_ms, three.time_ms) == (event, None, 2500)


def test_an_envelope_line_is_one_line(tmp_path: Path) -> None:
    pretty = b'[\n  {"event_type": "book", "asset_id": "7", "market": "0xm",\n   "bids": [], "asks": [], "timestamp": "5"}\n]'
    (frame,) = Capture.load([_write(tmp_path / "pretty.jsonl", pretty.replace(b"\n", b""))]).frames
    line = envelope_line(attrs.evolve(frame, text=pretty.decode()), 9)
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    (back,) = Capture.load([_write(tmp_path / "back.jsonl", line)]).frames
    assert back.events == frame.events and back.received_ms == 9


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"received_ms":"1","frame":{"event_type":"book"}}', "bad received_ms '1'"),
        (b'{"frame":{"event_type":"book"}}', "bad received_ms None"),
        (b'{"received_ms":1,"text":"PONG"}', "a line of record --raw"),
        (b'{"received_ms":1,"frame":{"received_ms":1,"frame":{}}}', "not an event object"),
        (b'{"received_ms":1,"frame":[]}', "empty array"),
    ],
    ids=["received-ms-string", "no-received-ms", "raw-line", "nested", "empty"],
)
def test_bad_envelopes_name_the_line(line: bytes, message: str, tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.jsonl", line)
    with pytest.raises(ReplayError, match=f"bad.jsonl:1: .*{message}"):
        Capture.load([path])


def _write(path: Path, line: bytes) -> Path:
    path.write_bytes(line.rstrip(b"\n") + b"\n")
    return path


# ------------------------------------------------------------------ the command line


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--rotate-mb", "0"], "polystream: --rotate-mb 0: expected a number > 0"),
        (["--rotate-seconds", "-1"], "polystream: --rotate-seconds -1: expected a number > 0"),
        (["--fsync-seconds", "nan"], "polystream: --fsync-seconds nan: expected a number > 0"),
        (["--prefix", "a/b"], "polystream: --prefix 'a/b': expected letters, digits"),
        (["--markets-file", "missing.json"], "polystream: --markets-file missing.json: "),
    ],
    ids=["rotate-mb", "rotate-seconds", "fsync-seconds", "prefix", "markets-file"],
)
def test_bad_flags_exit_2_before_anything_starts(
    args: list[str], line: str, tmp_path: Path
) -> None:
    result = run_polystream("record", "--dir", "out", *args, env=clean_env(), cwd=tmp_path)
    assert result.returncode == 2, result
    assert result.stderr.startswith(line), result.stderr
    assert not (tmp_path / "out").exists()

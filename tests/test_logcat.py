"""`polystream logs`: parsing, filtering, rendering and following JSON-lines logs."""

from __future__ import annotations

import io
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import structlog
from typer import Typer
from typer.testing import CliRunner

from polystream.logs import configure_logging
from polystream.ops.logcat import LogFilter, logs_command, matches, parse_line, render, run_logs

NOISE = "Fatal Python error: Aborted (not JSON, interleaved by journald)"


@pytest.fixture
def log_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Iterator[Path]:
    """A log written by the daemon's own logging configuration, plus one non-JSON line."""
    configure_logging("debug", "json")
    try:
        log = structlog.get_logger("polystream.test")
        log.debug("feed_frame", shard=0, asset_id="111")
        log.info("feed_subscribed", shard=0, assets=2, asset_ids=["111", "222"])
        log.info("markets_written", rows=1, market_id=42, condition_id="0xabc")
        log.warning("feed_reconnected", shard=1, attempt=2, backoff_s=1.5)
        log.error("db_write_failed", error="postgresql://u:hunter2@h/db: connection refused")
        try:
            raise ValueError("bad price")
        except ValueError:
            log.exception("monitor_failed", market_id="m-2")
    finally:
        structlog.reset_defaults()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6
    lines.insert(3, NOISE)
    path = tmp_path / "polystream.log"
    path.write_text("\n".join(lines) + "\n")
    yield path


def show(path: Path, log_filter: LogFilter) -> list[str]:
    out = io.StringIO()
    assert run_logs(str(path), False, log_filter, out) == 0
    return out.getvalue().splitlines()


def events(output: list[str]) -> list[str]:
    """The event column of rendered lines (raw lines as they are)."""
    found = []
    for line in output:
        if line.startswith("[") or (" [" in line and "] " in line):
            found.append(line.split("] ", 1)[1].split()[0])
        elif line == NOISE:
            found.append("<noise>")
    return found


ALL = [
    "feed_frame",
    "feed_subscribed",
    "markets_written",
    "<noise>",
    "feed_reconnected",
    "db_write_failed",
    "monitor_failed",
]


def test_parse_line() -> None:
    assert parse_line('{"event": "x", "level": "info"}\n') == {"event": "x", "level": "info"}
    assert parse_line("plain text") is None
    assert parse_line("[1, 2]") is None
    assert parse_line("{not json") is None
    assert parse_line("") is None


def test_everything_rendered(log_file: Path) -> None:
    output = show(log_file, LogFilter())
    assert events(output) == ALL
    subscribed = next(line for line in output if "feed_subscribed" in line)
    assert "[info     ]" in subscribed
    assert "assets=2" in subscribed
    assert "shard=0" in subscribed
    assert subscribed[:4].isdigit()  # the timestamp leads
    assert "hunter2" not in "\n".join(output)
    assert "ValueError: bad price" in output[-1]  # the traceback follows its record
    assert "\x1b[" not in "\n".join(output)  # no colour off a terminal


def test_min_level(log_file: Path) -> None:
    assert events(show(log_file, LogFilter.build(level="warning"))) == [
        "<noise>",  # non-JSON lines are never filtered out
        "feed_reconnected",
        "db_write_failed",
        "monitor_failed",
    ]
    assert events(show(log_file, LogFilter.build(level="ERROR"))) == [
        "<noise>",
        "db_write_failed",
        "monitor_failed",
    ]
    with pytest.raises(ValueError, match="unknown level"):
        LogFilter.build(level="loud")


def test_event_names_and_globs(log_file: Path) -> None:
    assert events(show(log_file, LogFilter.build(events=["feed_subscribed"]))) == [
        "feed_subscribed",
        "<noise>",
    ]
    assert events(show(log_file, LogFilter.build(events=["feed_*"]))) == [
        "feed_frame",
        "feed_subscribed",
        "<noise>",
        "feed_reconnected",
    ]
    assert events(
        show(log_file, LogFilter.build(events=["feed_frame,db_*", "monitor_failed"]))
    ) == [
        "feed_frame",
        "<noise>",
        "db_write_failed",
        "monitor_failed",
    ]
    assert events(show(log_file, LogFilter.build(events=["feed"]))) == ["<noise>"]  # exact


def test_market_ids(log_file: Path) -> None:
    by_asset = LogFilter.build(markets=["111"])
    assert events(show(log_file, by_asset)) == ["feed_frame", "feed_subscribed", "<noise>"]
    assert events(show(log_file, LogFilter.build(markets=["0xabc"]))) == [
        "markets_written",
        "<noise>",
    ]
    assert events(show(log_file, LogFilter.build(markets=["42"]))) == [  # an int in the record
        "markets_written",
        "<noise>",
    ]
    assert events(show(log_file, LogFilter.build(markets=["m-2,222"]))) == [
        "feed_subscribed",
        "<noise>",
        "monitor_failed",
    ]


def test_filters_combine() -> None:
    record = {"level": "warning", "event": "feed_stale", "shard": 1, "assets": ["7", "8"]}
    assert matches(LogFilter.build("info", ["feed_*"], ["8"]), record)
    assert not matches(LogFilter.build("error", ["feed_*"], ["8"]), record)
    assert not matches(LogFilter.build("info", ["db_*"], ["8"]), record)
    assert not matches(LogFilter.build("info", ["feed_*"], ["9"]), record)
    assert not matches(LogFilter.build(markets=["feed_stale"]), record)  # header keys skipped
    assert not matches(LogFilter.build(markets=["1"]), {"event": "x", "flag": True})


def test_render_colour() -> None:
    record = {"timestamp": "2025-06-01T12:00:00Z", "level": "error", "event": "x", "k": "v"}
    assert "\x1b[" in render(record, color=True)
    plain = render(record, color=False)
    assert plain.startswith("2025-06-01T12:00:00Z [error    ] x")
    assert plain.endswith("k=v")


def test_stdin() -> None:
    lines = [
        orjson.dumps({"level": "info", "event": "a", "market_id": "5"}).decode(),
        "not json",
        orjson.dumps({"level": "debug", "event": "b"}).decode(),
    ]
    out = io.StringIO()
    stdin = io.StringIO("\n".join(lines) + "\n")
    assert run_logs("-", True, LogFilter.build(level="info"), out, stdin=stdin) == 0
    assert events(out.getvalue().splitlines()) == ["a"]
    assert "not json" in out.getvalue()


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_logs(str(tmp_path / "nope.log"), False, LogFilter(), io.StringIO()) == 1
    assert "cannot read" in capsys.readouterr().err


def test_cli(log_file: Path) -> None:
    app = Typer()
    app.command()(logs_command)
    runner = CliRunner()
    result = runner.invoke(app, [str(log_file), "--level", "warning", "--event", "feed_*"])
    assert result.exit_code == 0, result.output
    assert events(result.output.splitlines()) == ["<noise>", "feed_reconnected"]
    bad = runner.invoke(app, [str(log_file), "--level", "loud"])
    assert bad.exit_code == 2


# --- follow ------------------------------------------------------------------------


class LineQueue(io.StringIO):
    """An output stream handing each written line to a queue."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: queue.Queue[str] = queue.Queue()

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.lines.put(line)
        return len(text)

    def next(self) -> str:
        return self.lines.get(timeout=5)


class Probe(threading.Event):
    """A stop event that reports each time the follower waits at the end of the file."""

    def __init__(self) -> None:
        super().__init__()
        self.at_eof: queue.Queue[None] = queue.Queue()

    def wait(self, timeout: float | None = None) -> bool:
        self.at_eof.put(None)
        return super().wait(timeout)

    def settled(self) -> None:
        """Return once the follower has read everything written before this call."""
        while not self.at_eof.empty():
            self.at_eof.get_nowait()
        for _ in range(2):  # the second wait began after a read that followed the drain
            self.at_eof.get(timeout=5)


def record(event: str, **context: object) -> str:
    return orjson.dumps({"level": "info", "event": event, **context}).decode() + "\n"


def append(path: Path, text: str) -> None:
    with path.open("a") as handle:
        handle.write(text)


def test_follow_a_growing_file(tmp_path: Path) -> None:
    path = tmp_path / "live.log"
    path.write_text(record("first"))
    out = LineQueue()
    probe = Probe()
    reader = threading.Thread(
        target=run_logs,
        args=(str(path), True, LogFilter.build(events=["keep_*", "first"]), out),
        kwargs={"poll_interval": 0.01, "stop": probe},
        daemon=True,
    )
    reader.start()
    try:
        assert "first" in out.next()

        def writer() -> None:
            for index in range(20):
                append(path, record("drop_me", index=index) + record("keep_me", index=index))

        thread = threading.Thread(target=writer)
        thread.start()
        thread.join(5)
        for index in range(20):
            line = out.next()
            assert "keep_me" in line
            assert f"index={index}" in line

        # a line written in two parts is printed once, whole
        append(path, record("keep_half", n=1)[:15])
        probe.settled()
        append(path, record("keep_half", n=1)[15:])
        line = out.next()
        assert "keep_half" in line
        assert "n=1" in line

        # logrotate copytruncate: the file shrinks, reading starts again at 0
        path.write_text("")
        probe.settled()
        append(path, record("keep_after_truncate"))
        assert "keep_after_truncate" in out.next()

        # rotation by rename: the new file is opened
        os.rename(path, tmp_path / "live.log.1")
        path.write_text(record("keep_after_rotate"))
        assert "keep_after_rotate" in out.next()
    finally:
        probe.set()
        reader.join(5)
    assert not reader.is_alive()
    assert out.lines.empty()

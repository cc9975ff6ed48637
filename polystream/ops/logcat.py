"""
``polystream logs``: read polystream's JSON-lines log readably, and filter it.

The input is what :func:`polystream.logs.configure_logging` writes when stdout
is not a terminal: one JSON object per line with ``timestamp`` (ISO 8601,
UTC), ``level`` (``debug`` ... ``critical``), ``event`` (a fixed snake_case
name) and context keys. It comes from a file or from standard input, e.g.
``journalctl -u polystream -o cat -f | polystream logs -``.

Each record is rendered like structlog's console output (time, level, event,
``key=value``; colours only on a terminal and unless ``$NO_COLOR`` is set).
Lines that are not a JSON object (a traceback on stderr, another program's
output interleaved by journald) are printed unchanged and never filtered out.

Everything here blocks; no trio. :func:`parse_line`, :func:`matches` and
:func:`render` are pure.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, TextIO

import attrs
import orjson
import structlog
import typer

__all__ = [
    "LEVELS",
    "POLL_INTERVAL",
    "LogFilter",
    "logs_command",
    "matches",
    "parse_line",
    "render",
    "run_logs",
]

LEVELS: Mapping[str, int] = {
    "debug": 10,
    "info": 20,
    "warning": 30,
    "warn": 30,
    "error": 40,
    "exception": 40,
    "critical": 50,
}
"""Level names as structlog writes them, ranked like :mod:`logging`."""

_HEADER_KEYS = frozenset({"timestamp", "level", "event"})

POLL_INTERVAL = 0.2
"""Seconds between checks of a followed file for new data (``-f``)."""


@attrs.frozen
class LogFilter:
    """
    Which records :func:`matches` keeps; an empty filter keeps all.

    Attributes:
        min_level: keep records at this level or above (``debug`` ... ``critical``).
        events: keep records whose ``event`` equals one of these or matches it
            as a glob (``feed_*``); empty = any event.
        markets: keep records with any context value (or list element, at any
            depth) equal to one of these ids: a market id, condition id or
            asset id alike; empty = any.

    Raises:
        ValueError: ``min_level`` is not a known level.
    """

    min_level: str | None = attrs.field(default=None)
    events: tuple[str, ...] = ()
    markets: tuple[str, ...] = ()

    @min_level.validator
    def _check_level(self, _attribute: Any, value: str | None) -> None:
        if value is not None and value.lower() not in LEVELS:
            raise ValueError(
                f"unknown level {value!r}: expected one of debug, info, warning, error, critical"
            )

    @classmethod
    def build(
        cls,
        level: str | None = None,
        events: Iterable[str] = (),
        markets: Iterable[str] = (),
    ) -> LogFilter:
        """A filter from CLI values: repeated options and comma lists alike."""
        return cls(
            level.lower() if level else None,
            tuple(_split(events)),
            tuple(_split(markets)),
        )


def _split(values: Iterable[str]) -> Iterator[str]:
    for value in values:
        yield from (part.strip() for part in value.split(",") if part.strip())


def parse_line(line: str) -> dict[str, Any] | None:
    """The record of one log line, or None when the line is not a JSON object."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        record = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _level_rank(record: Mapping[str, Any]) -> int:
    level = record.get("level")
    return LEVELS.get(level.lower(), 20) if isinstance(level, str) else 20


def _values(value: Any) -> Iterator[Any]:
    """``value`` and, for lists and objects, everything inside them."""
    if isinstance(value, list):
        for item in value:
            yield from _values(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _values(item)
    else:
        yield value


def matches(log_filter: LogFilter, record: Mapping[str, Any]) -> bool:
    """True if ``record`` passes every criterion of ``log_filter``."""
    if log_filter.min_level is not None and _level_rank(record) < LEVELS[log_filter.min_level]:
        return False
    if log_filter.events:
        event = str(record.get("event", ""))
        if not any(fnmatchcase(event, pattern) for pattern in log_filter.events):
            return False
    if log_filter.markets:
        wanted = set(log_filter.markets)
        found = any(
            not isinstance(value, bool) and isinstance(value, str | int) and str(value) in wanted
            for key, value in record.items()
            if key not in _HEADER_KEYS
            for value in _values(value)
        )
        if not found:
            return False
    return True


@functools.lru_cache(maxsize=2)
def _renderer(color: bool) -> structlog.dev.ConsoleRenderer:
    return structlog.dev.ConsoleRenderer(
        colors=color,
        force_colors=color,
        exception_formatter=structlog.dev.plain_traceback,
        sort_keys=True,
    )


def render(record: Mapping[str, Any], color: bool) -> str:
    """
    One record as structlog's console renders it (no trailing newline).

    ``2025-06-01T12:00:00.123Z [info     ] feed_subscribed      assets=3 shard=0``;
    a formatted ``exception`` string follows on the next lines.
    """
    event_dict = dict(record)
    method = str(event_dict.get("level", "info"))
    return str(_renderer(color)(None, method, event_dict))


def _emit(line: str, log_filter: LogFilter, color: bool, out: TextIO) -> None:
    record = parse_line(line)
    if record is None:
        if line.strip():
            out.write(line if line.endswith("\n") else line + "\n")
    elif matches(log_filter, record):
        out.write(render(record, color) + "\n")
    out.flush()


def _follow(path: Path, *, poll_interval: float, stop: threading.Event | None) -> Iterator[str]:
    """
    Lines of ``path``, then lines appended to it, until ``stop`` is set.

    Like ``tail -F`` from the start of the file: a partial last line waits for
    its newline; a truncated file (``logrotate copytruncate``) is read again
    from its start; a replaced file (rotation by rename) is reopened.
    """
    handle: TextIO = path.open("r", encoding="utf-8", errors="replace")
    try:
        partial = ""
        while True:
            chunk = handle.readline()
            if chunk:
                partial += chunk
                if partial.endswith("\n"):
                    yield partial
                    partial = ""
                continue
            if stop is not None and stop.is_set():
                return
            handle = _reopened(path, handle)
            if stop is not None:
                stop.wait(poll_interval)
            else:
                time.sleep(poll_interval)
    finally:
        handle.close()


def _reopened(path: Path, handle: TextIO) -> TextIO:
    """``handle``, rewound if the file shrank, or a new handle if it was replaced."""
    try:
        current = path.stat()
    except FileNotFoundError:
        return handle  # between rename and re-creation: keep waiting
    opened = os.fstat(handle.fileno())
    if (current.st_ino, current.st_dev) != (opened.st_ino, opened.st_dev):
        handle.close()
        return path.open("r", encoding="utf-8", errors="replace")
    if current.st_size < handle.tell():
        handle.seek(0)
    return handle


def run_logs(
    source: str | None,
    follow: bool,
    filter: LogFilter,
    out: TextIO,
    *,
    color: bool | None = None,
    stdin: TextIO | None = None,
    poll_interval: float = POLL_INTERVAL,
    stop: threading.Event | None = None,
) -> int:
    """
    Render and filter a log stream until it ends (or, with ``follow``, until
    interrupted or ``stop`` is set). Blocking.

    Args:
        source: a file path, or ``-``/None for standard input (streamed to
            its end; ``follow`` changes nothing there).
        follow: keep reading a file as it grows (``tail -F``).
        filter: which records to print.
        out: where to write.
        color: ANSI colours; None = when ``out`` is a terminal and ``$NO_COLOR``
            is unset.
        stdin: the standard input to read (tests).
        poll_interval: seconds between checks of a followed file.
        stop: ends a follow loop when set (tests, embedding).

    Returns:
        0, or 1 when the file cannot be read (message on stderr).
    """
    if color is None:
        color = _isatty(out) and "NO_COLOR" not in os.environ
    try:
        for line in _lines(source, follow, stdin, poll_interval, stop):
            _emit(line, filter, color, out)
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):  # `polystream logs ... | head`
            return 0
        print(f"polystream: cannot read {source}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def _lines(
    source: str | None,
    follow: bool,
    stdin: TextIO | None,
    poll_interval: float,
    stop: threading.Event | None,
) -> Iterator[str]:
    if source is None or source == "-":
        stream = stdin if stdin is not None else sys.stdin
        yield from iter(stream.readline, "")
        return
    path = Path(source)
    if follow:
        yield from _follow(path, poll_interval=poll_interval, stop=stop)
        return
    with path.open("r", encoding="utf-8", errors="replace") as handle:
        yield from handle


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def logs_command(
    source: Annotated[
        str | None,
        typer.Argument(
            metavar="SOURCE",
            help="A JSON-lines log file, or - for standard input (the default).",
        ),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep reading the file as it grows.")
    ] = False,
    level: Annotated[
        str | None,
        typer.Option(
            metavar="LEVEL", help="Minimum level: debug, info, warning, error or critical."
        ),
    ] = None,
    event: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME", help="Event name or glob (feed_*); repeat or comma-separate."),
    ] = None,
    market: Annotated[
        list[str] | None,
        typer.Option(
            metavar="ID", help="Market, condition or asset id found in any context value."
        ),
    ] = None,
    config_path: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="POLYSTREAM_CONFIG",
            metavar="PATH",
            dir_okay=False,
            help="TOML configuration file, checked as every command checks it "
            "(logs uses none of its keys).",
        ),
    ] = None,
) -> None:
    """
    Show polystream's JSON log lines readably, filtered.

    e.g. journalctl -u polystream -o cat -f | polystream logs - --level warning

    Exit codes: 0 at the end of the input (or on Ctrl-C); 1 the file cannot be
    read; 2 a bad --level or configuration.
    """
    _check_config(config_path)
    try:
        log_filter = LogFilter.build(level, event or (), market or ())
    except ValueError as exc:
        typer.echo(f"polystream: --level: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(run_logs(source, follow, log_filter, sys.stdout))


def _check_config(config_path: Path | None) -> None:
    """Load the configuration as every command does: one line and exit 2 if it is bad."""
    from polystream.config import load_config
    from polystream.errors import ConfigError
    from polystream.logs import redact

    try:
        load_config(config_path)
    except ConfigError as exc:
        typer.echo(f"polystream: configuration error: {redact(str(exc))}", err=True)
        raise typer.Exit(2) from None

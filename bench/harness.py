"""
What every benchmark shares: the recorded capture, the set-up (admin database,
throwaway databases, log directories, machine facts), reading a daemon's log, the
results writer, the WebSocket sender's server side and profiling with py-spy.

The daemon itself runs through :mod:`polystream.ops.daemon`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Generic, TypeVar

import attrs
import orjson
import trio

__all__ = [
    "CAPTURE",
    "CAPTURE_EXPECTED",
    "CAPTURE_MARKETS",
    "CAPTURE_TAPE",
    "OUT_DIR",
    "ROOT",
    "BenchError",
    "DaemonLog",
    "ExpectingServer",
    "Link",
    "Market",
    "Session",
    "accept_client",
    "add_output_options",
    "admin_database",
    "bench_setup",
    "capture_lines",
    "data_frames",
    "exit_status",
    "hotspots",
    "lap_offset_ms",
    "load_markets",
    "log_directory",
    "machine_facts",
    "print_hotspots",
    "profiling",
    "progress",
    "quantile",
    "shift_timestamps",
    "text_frames",
    "throwaway_database",
    "write_results",
]

ROOT = Path(__file__).resolve().parent.parent  # the project
OUT_DIR = ROOT / "bench"  # where results*.json and results*.md go by default
CAPTURE = ROOT / "examples" / "updown-2025-12-11"  # 6 markets, 12 assets, 15 minutes
CAPTURE_TAPE = Path(f"{CAPTURE}.jsonl.gz")
CAPTURE_MARKETS = Path(f"{CAPTURE}.markets.json")
CAPTURE_EXPECTED = Path(f"{CAPTURE}.expected.json")


class BenchError(Exception):
    """The benchmark cannot measure what it set out to (a setup or daemon failure)."""


# --- the capture -----------------------------------------------------------------


@attrs.frozen
class Market:
    """One market of the capture: id, outcomes and their CLOB token ids, in order."""

    id: str
    outcomes: tuple[str, ...]
    tokens: tuple[str, ...]

    @property
    def owners(self) -> list[tuple[str, str, str]]:
        """``(market id, outcome, token)`` per outcome."""
        return [(self.id, o, t) for o, t in zip(self.outcomes, self.tokens, strict=True)]


def load_markets() -> list[Market]:
    """The capture's markets (``updown-2025-12-11.markets.json``)."""
    raw = orjson.loads(CAPTURE_MARKETS.read_bytes())
    return [
        Market(
            str(m["id"]), tuple(orjson.loads(m["outcomes"])), tuple(orjson.loads(m["clobTokenIds"]))
        )
        for m in raw
    ]


def capture_lines(path: Path = CAPTURE_TAPE) -> list[bytes]:
    """The frames of a gzipped JSON-lines capture, one JSON text each, blank lines left out."""
    return [line for line in gzip.decompress(path.read_bytes()).split(b"\n") if line.strip()]


_TIMESTAMP = re.compile(rb'"timestamp":"(\d+)"')


def shift_timestamps(line: bytes, offset_ms: int) -> bytes:
    """The frame with every ``timestamp`` moved ``offset_ms`` later (a later repetition
    must look newer, or the daemon rightly drops its events as stale)."""
    if not offset_ms:
        return line
    return _TIMESTAMP.sub(lambda m: b'"timestamp":"%d"' % (int(m.group(1)) + offset_ms), line)


def lap_offset_ms(lines: Iterable[bytes]) -> int:
    """How far one repetition's timestamps move after the previous one's: the span, plus 1 s."""
    stamps = [int(m) for line in lines for m in _TIMESTAMP.findall(line)]
    return max(stamps) - min(stamps) + 1000


def text_frames(lines: Iterable[bytes]) -> list[bytes]:
    """Each JSON line encoded once as a server-to-client WebSocket text frame."""
    from wsproto.frame_protocol import FrameProtocol

    encoder = FrameProtocol(client=False, extensions=[])
    return [bytes(encoder.send_data(line.decode(), fin=True)) for line in lines]


# --- set-up ----------------------------------------------------------------------


def quiet_logging() -> None:
    """The bench's own use of polystream (migrations, embedded server) logs warnings only."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def machine_facts() -> dict[str, Any]:
    """CPU count, Python, platform, load average (at the start) and date."""
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


@contextlib.contextmanager
def admin_database() -> Iterator[tuple[str, str]]:
    """
    The admin DSN to create throwaway databases on, and where it came from:
    ``POLYSTREAM_BENCH_DSN``, else ``POLYSTREAM_TEST_DSN``, else an embedded
    PostgreSQL started for the run (as the Makefile's ``bench`` target says).
    """
    for variable in ("POLYSTREAM_BENCH_DSN", "POLYSTREAM_TEST_DSN"):
        value = os.environ.get(variable)
        if value:
            yield value, variable
            return
    from polystream.store.embedded import open_embedded_postgres

    with (
        tempfile.TemporaryDirectory(
            prefix="polystream-bench-pg-", ignore_cleanup_errors=True
        ) as tmp,
        open_embedded_postgres(Path(tmp)) as dsn,
    ):
        yield dsn, "embedded"


@contextlib.contextmanager
def bench_setup() -> Iterator[tuple[str, dict[str, Any]]]:
    """
    A benchmark's start: polystream's own logging quiet (:func:`quiet_logging`);
    yields the admin DSN (:func:`admin_database`) and the machine facts
    (:func:`machine_facts`, with ``database``: where the DSN came from).
    """
    quiet_logging()
    machine = machine_facts()
    with admin_database() as (admin_dsn, source):
        machine["database"] = source
        yield admin_dsn, machine


def log_directory(stack: contextlib.ExitStack, given: Path | None, prefix: str) -> Path:
    """``given`` (created if needed), else a temporary directory that ``stack`` removes."""
    path = given or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def throwaway_database(admin_dsn: str, name: str, *, template: str | None = None) -> Iterator[str]:
    """
    A fresh database ``name`` on the server of ``admin_dsn`` (a leftover of that
    name dropped first): migrated, or a copy of database ``template``; dropped
    afterwards. Yields its DSN.

    Raises:
        polystream.errors.DatabaseError: the server refuses.
    """
    from psycopg import sql

    from polystream.store import db

    db.drop_database(admin_dsn, name)
    if template is None:
        db.create_database(admin_dsn, name)
    else:
        with db.connect(admin_dsn, application_name="polystream-bench", autocommit=True) as conn:
            # FILE_COPY (PostgreSQL >= 15; older servers always copy files): the copy
            # does not go through the WAL, whose flushing would then load the disk
            # during the measured run (WAL_LOG, 15's default, logs every page).
            strategy = " STRATEGY FILE_COPY" if conn.info.server_version >= 150000 else ""
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}" + strategy).format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
    try:
        dsn = db.dsn_with_dbname(admin_dsn, name)
        if template is None:
            with db.connect(dsn, application_name="polystream-bench") as conn:
                db.migrate(conn)
        yield dsn
    finally:
        db.drop_database(admin_dsn, name)


def checkpoint(dsn: str) -> bool:
    """
    ``CHECKPOINT`` on the server of ``dsn`` (superuser or ``pg_checkpoint``), so
    that the dirty pages and WAL of earlier runs (other benches of ``make bench``)
    are written before a measured run, not during it. False when refused.
    """
    import psycopg

    from polystream.errors import DatabaseError
    from polystream.store import db

    try:
        with db.connect(dsn, application_name="polystream-bench", autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    except (DatabaseError, psycopg.Error):
        return False
    return True


# --- the daemon's reports ----------------------------------------------------------


def data_frames(health: dict[str, Any]) -> int:
    """Frames the daemon read according to ``/health``, control frames (``PONG``...) left out."""
    control: dict[str, int] = health["control_frames"]
    return int(health["frames"]) - sum(control.values())


@attrs.frozen
class DaemonLog:
    """
    A daemon's JSON log, in order: each line's record, or the line's text (its
    first 200 characters) where it is not a JSON object.
    """

    entries: tuple[dict[str, Any] | str, ...]

    @classmethod
    def read(cls, path: Path) -> DaemonLog:
        """Read the log at ``path``."""
        entries: list[dict[str, Any] | str] = []
        for line in path.read_bytes().splitlines():
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                record = None
            if isinstance(record, dict):
                entries.append(record)
            else:
                entries.append(line.decode(errors="replace")[:200])
        return cls(tuple(entries))

    def problems(self, levels: tuple[str, ...] = ("warning", "error", "critical")) -> list[str]:
        """The events of the records at ``levels``, and every line that is not a record."""
        return [
            entry if isinstance(entry, str) else str(entry.get("event"))
            for entry in self.entries
            if isinstance(entry, str) or entry.get("level") in levels
        ]

    def events(self, name: str) -> list[dict[str, Any]]:
        """The records of event ``name``."""
        return [e for e in self.entries if isinstance(e, dict) and e.get("event") == name]

    def last(self, name: str) -> dict[str, Any]:
        """The last record of event ``name`` (empty if none)."""
        found = self.events(name)
        return found[-1] if found else {}


# --- command line and results -----------------------------------------------------


def add_output_options(
    parser: argparse.ArgumentParser, stem: str, *, profile: str | None = None
) -> None:
    """
    ``--out`` (where ``STEM.json`` and ``STEM.md`` go, default ``bench/``) and
    ``--log-dir`` (the daemon logs; default a temporary directory); with
    ``profile`` (what it records), ``--profile DIR`` for py-spy.
    """
    parser.add_argument(
        "--out", type=Path, default=OUT_DIR, help=f"where {stem}.json/.md go (default bench/)"
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="keep the daemon logs here (default: a temporary directory)",
    )
    if profile is not None:
        parser.add_argument(
            "--profile",
            type=Path,
            default=None,
            help=f"record {profile} with py-spy into this directory "
            "(slows the daemon: results are not written)",
        )


def progress(text: str) -> None:
    """A progress or diagnostic line on stderr, flushed at once."""
    print(text, file=sys.stderr, flush=True)


def print_hotspots(directory: Path, top: int) -> None:
    """:func:`hotspots` of every ``daemon-*.txt`` profile in ``directory``, on stderr."""
    for path in sorted(directory.glob("daemon-*.txt")):
        progress(hotspots(path, top))


def exit_status(failures: Sequence[str]) -> int:
    """Print each failure (``FAILED ...``) on stderr; 1 if there is any, else 0."""
    for failure in failures:
        progress(f"FAILED {failure}")
    return 1 if failures else 0


def quantile(values: Sequence[float], q: float) -> float:
    """
    The value at index ``round(q * (n - 1))`` of ``values`` sorted (``q`` in [0, 1]).

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("quantile of no values")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def write_results(
    out: Path, stem: str, document: Any, table: str, printed: str | None = None
) -> None:
    """
    Write ``out/STEM.json`` (indented, newline-terminated) and ``out/STEM.md``
    (``table``); print ``printed`` (default: the table).
    """
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    (out / f"{stem}.md").write_text(table)
    print(table if printed is None else printed)


# --- the sender's server side ------------------------------------------------------


@attrs.define(eq=False, kw_only=True)
class Session:
    """
    One expected client connection and what the server saw of it: the assets of
    its subscribe message, when the tape's first byte and last byte were written
    (``time.monotonic()``), and why it failed (None: it did not).
    """

    connected: trio.Event = attrs.field(factory=trio.Event)
    closed: trio.Event = attrs.field(factory=trio.Event)
    assets: list[str] = attrs.field(factory=list)
    first_byte_at: float | None = None
    sent_all_at: float | None = None
    error: str | None = None


S = TypeVar("S", bound=Session)


@attrs.frozen(eq=False)
class Link:
    """
    One accepted WebSocket connection (wsproto, server side): writes hold a lock,
    so the sender's bytes and the answers to the client never interleave.
    """

    stream: trio.SocketStream
    ws: Any  # wsproto.WSConnection
    lock: trio.StrictFIFOLock = attrs.field(factory=trio.StrictFIFOLock)

    async def send_bytes(self, data: bytes | memoryview) -> None:
        """Write already encoded frames."""
        async with self.lock:
            await self.stream.send_all(data)

    async def send_event(self, event: Any) -> None:
        """Encode and write one wsproto event."""
        async with self.lock:
            await self.stream.send_all(self.ws.send(event))

    async def send_text(self, text: str) -> None:
        """Write one text message."""
        from wsproto.events import TextMessage

        await self.send_event(TextMessage(data=text))


@attrs.define(eq=False)
class ExpectingServer(Generic[S]):
    """
    A loopback WebSocket server serving one expected session per connection
    (``expect`` before the client connects); a connection nobody expected (a
    reconnect) is counted and closed. Per session: the opening handshake, the
    client's subscribe message (its ``assets_ids``), then :meth:`play` while the
    client's messages go to :meth:`on_text` (close answered, session ended on
    EOF). Subclasses implement :meth:`play`.
    """

    port: int = 0
    unexpected: int = 0
    _next: S | None = None

    def expect(self, session: S) -> S:
        """The next connection is ``session``'s."""
        self._next = session
        return session

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:PORT/ws/market``."""
        return f"ws://127.0.0.1:{self.port}/ws/market"

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen on a free loopback port until cancelled."""
        async with trio.open_nursery() as nursery:
            listeners: list[trio.SocketListener] = await nursery.start(
                partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
            )
            self.port = listeners[0].socket.getsockname()[1]
            task_status.started()

    async def play(self, link: Link, session: S) -> None:
        """Write to the subscribed client (returning leaves the connection open)."""
        raise NotImplementedError

    async def on_text(self, link: Link, session: S, message: str, arrived: float) -> None:
        """A text message from the client, ``arrived`` at ``time.monotonic()``: ignored."""

    async def _handle(self, stream: trio.SocketStream) -> None:
        from wsproto import ConnectionType, WSConnection

        session, self._next = self._next, None
        if session is None:
            self.unexpected += 1
            await stream.aclose()
            return
        try:
            link = Link(stream, WSConnection(ConnectionType.SERVER))
            subscribe = orjson.loads(await accept_client(link))
            session.assets = list(subscribe.get("assets_ids", []))
            session.connected.set()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read, link, session, nursery.cancel_scope)
                await self.play(link, session)
        except (trio.BrokenResourceError, trio.ClosedResourceError, BenchError) as exc:
            session.error = f"{type(exc).__name__}: {exc}"
        finally:
            session.closed.set()
            await stream.aclose()

    async def _read(self, link: Link, session: S, scope: trio.CancelScope) -> None:
        """The client's side: text to :meth:`on_text`; answer pings and its close; EOF ends."""
        from wsproto.events import CloseConnection, Ping, TextMessage

        text = ""
        while True:
            data = await link.stream.receive_some(65536)
            arrived = time.monotonic()
            if not data:
                scope.cancel()
                return
            link.ws.receive_data(data)
            for event in link.ws.events():
                if isinstance(event, TextMessage):
                    text += event.data
                    if event.message_finished:
                        message, text = text, ""
                        await self.on_text(link, session, message, arrived)
                elif isinstance(event, Ping):
                    await link.send_event(event.response())
                elif isinstance(event, CloseConnection):
                    with contextlib.suppress(trio.BrokenResourceError):
                        await link.send_event(event.response())
                    scope.cancel()
                    return


async def accept_client(link: Link) -> str:
    """Do the opening handshake; return the client's first text message."""
    from wsproto.events import AcceptConnection, Request, TextMessage

    text = ""
    while True:
        data = await link.stream.receive_some(65536)
        if not data:
            raise BenchError("client closed before subscribing")
        link.ws.receive_data(data)
        for event in link.ws.events():
            if isinstance(event, Request):
                await link.send_event(AcceptConnection())
            elif isinstance(event, TextMessage):
                text += event.data
                if event.message_finished:
                    return text


# --- profiling -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def profiling(pid: int, output: Path | None) -> AsyncIterator[None]:
    """
    Sample process ``pid`` with py-spy (``pip install py-spy``) into ``output``
    (collapsed stacks, GIL holders only: where the CPU goes) while the block runs;
    nothing when ``output`` is None. py-spy writes its file on SIGINT, at the end.
    """
    if output is None:
        yield
        return
    output.parent.mkdir(parents=True, exist_ok=True)
    exe = Path(sys.executable).with_name("py-spy")
    command = [
        str(exe) if exe.exists() else "py-spy",
        *("record", "--pid", str(pid), "--rate", "250", "--nonblocking"),
        *("--format", "raw", "--threads", "--gil", "--output", str(output)),
    ]
    spy = await trio.lowlevel.open_process(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        await trio.sleep(0.5)  # let it attach before the first frame
        yield
        spy.send_signal(signal.SIGINT)
        with trio.fail_after(30):
            await spy.wait()
    finally:
        if spy.returncode is None:
            spy.kill()
            with trio.CancelScope(shield=True):
                await spy.wait()


def hotspots(path: Path, top: int = 15) -> str:
    """Self and inclusive sample shares by function from a py-spy ``raw`` file."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [f.rsplit(":", 1)[0] for f in stack.split(";")[1:]]  # drop the thread frame
        total += count
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
        for name in set(frames):
            inclusive[name] = inclusive.get(name, 0) + count
    lines = [f"{path.name}: {total} samples"]
    for title, table in (("self", own), ("inclusive", inclusive)):
        lines.append(f"  top {top} by {title} time:")
        for name, count in sorted(table.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {100 * count / max(total, 1):5.1f}%  {name}")
    return "\n".join(lines)

"""
What the benchmarks' WebSocket senders share: a loopback TCP server that hands
each new connection to the session the bench said it expects next, and the
wsproto opening handshake. Sending is the sender's own (frames encoded once,
written with plain socket sends).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import attrs
import orjson
import trio


class BenchError(Exception):
    """The benchmark cannot measure what it set out to (a setup or daemon failure)."""


class SessionLike(Protocol):
    """What the server records on a session."""

    error: str | None
    closed: trio.Event


S = TypeVar("S", bound=SessionLike)


@attrs.define(eq=False)
class ExpectingServer(Generic[S]):
    """
    Serves one expected session per connection (``expect`` before the client
    connects); a connection nobody expected (a reconnect) is counted and closed.
    Subclasses implement :meth:`run_session`.
    """

    port: int = 0
    unexpected: int = 0
    _next: S | None = None

    def expect_session(self, session: S) -> S:
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

    async def _handle(self, stream: trio.SocketStream) -> None:
        session, self._next = self._next, None
        if session is None:
            self.unexpected += 1
            await stream.aclose()
            return
        try:
            await self.run_session(stream, session)
        except (trio.BrokenResourceError, trio.ClosedResourceError, BenchError) as exc:
            session.error = f"{type(exc).__name__}: {exc}"
        finally:
            session.closed.set()
            await stream.aclose()

    async def run_session(self, stream: trio.SocketStream, session: S) -> None:
        """Serve one connection."""
        raise NotImplementedError


async def accept(stream: trio.SocketStream, ws: Any) -> str:
    """Do the opening handshake (wsproto server); return the client's first text message."""
    from wsproto.events import AcceptConnection, Request, TextMessage

    text = ""
    while True:
        data = await stream.receive_some(65536)
        if not data:
            raise BenchError("client closed before subscribing")
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, Request):
                await stream.send_all(ws.send(AcceptConnection()))
            elif isinstance(event, TextMessage):
                text += event.data
                if event.message_finished:
                    return text


def log_directory(stack: contextlib.ExitStack, given: Path | None, prefix: str) -> Path:
    """``given`` (created if needed), else a temporary directory that ``stack`` removes."""
    path = given or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(out: Path, stem: str, document: Any, table: str) -> None:
    """Write ``out/STEM.json`` (indented, newline-terminated) and ``out/STEM.md``; print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    (out / f"{stem}.md").write_text(table)
    print(table)


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
    from polystream.embedded import open_embedded_postgres

    with (
        tempfile.TemporaryDirectory(
            prefix="polystream-bench-pg-", ignore_cleanup_errors=True
        ) as tmp,
        open_embedded_postgres(Path(tmp)) as dsn,
    ):
        yield dsn, "embedded"

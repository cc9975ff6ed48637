"""
The feed's transport: one WebSocket connection to the market channel, behind
a small interface (:class:`Transport`: send a text, receive a message, close
with a reason) with two implementations, chosen by ``feed.transport``:

* ``sansio`` (the default, the faster as measured by ``make bench``):
  the `websockets` library's Sans-I/O client protocol
  (``websockets.client.ClientProtocol``) driven inline over a trio stream
  (``trio.SSLStream`` for ``wss://``): no background task and no message
  queue; the reader's own ``receive`` reads the socket, feeds the protocol,
  writes what it must answer (pongs to protocol pings, the closing handshake)
  and returns whole messages. Text frames are returned as bytes (orjson parses
  UTF-8 bytes directly; the parser reports text that is not UTF-8).
* ``trio-websocket``: python-trio/trio-websocket's ``WebSocketConnection``.

Both apply the same limits (``feed.max_message_size``: a larger message
closes the connection with 1009), the same connect timeout, and translate
every failure into :class:`~polystream.errors.TransportError` with a reason an
operator can act on ("connection refused by host:port", "host not found",
"HTTP 429 from host", "closed by the venue: 1008 ...", "connection lost")
and the close code where there is one. The application-level heartbeat
(text ``PING``; docs/protocol.md, "Heartbeat") is the feed's, not the
transport's.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Protocol
from urllib.parse import urlsplit

import trio
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from polystream.config import TransportKind
from polystream.errors import TransportError, leaves

__all__ = [
    "ABNORMAL_CLOSE",
    "RECEIVE_SLICE_SECONDS",
    "TRANSPORTS",
    "Message",
    "MessageGate",
    "Transport",
    "closed_reason",
    "connect_failure",
    "open_transport",
]

TRANSPORTS: tuple[TransportKind, ...] = ("sansio", "trio-websocket")

Message = str | bytes | bytearray
"""
A received message: a text message as ``str`` (``trio-websocket``) or as its
UTF-8 ``bytes`` (``sansio``: decoded by the parser only if need be); a binary
message as ``bytearray`` (the market channel sends none).
"""

ABNORMAL_CLOSE = 1006
"""RFC 6455 7.1.5: the connection ended without a close frame."""

_RECEIVE_CHUNK = 256 * 1024

RECEIVE_SLICE_SECONDS = 0.0005
"""
How long ``sansio`` hands out messages already read (one socket read brings
hundreds) without a checkpoint: the reader's work on them (parsing, routing)
is one trio step until then, and the loop's other tasks (the trigger path,
the heartbeat) wait for its end.
"""
_CLOSE_TIMEOUT = 2.0


class Transport(Protocol):
    """One open WebSocket connection (see the module docstring)."""

    async def send(self, text: str) -> None:
        """
        Send a text message.

        Raises:
            TransportError: the connection is closed or broke.
        """

    async def receive(self) -> Message:
        """
        The next message (see :data:`Message`: a binary one is a ``bytearray``).

        Raises:
            TransportError: the connection closed (``code`` says how) or broke.
        """

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close with ``code`` and ``reason`` (waits at most 2 s for the peer's answer)."""


def _host(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc or url


def connect_failure(error: BaseException, url: str) -> str:
    """Why connecting to ``url`` failed, in words (trio joins the attempts' errors in a cause)."""
    host = _host(url)
    found = [error, *(leaves(error.__cause__) if error.__cause__ is not None else [])]
    gai = next((e for e in found if isinstance(e, socket.gaierror)), None)
    if gai is not None:
        return f"host not found: {urlsplit(url).hostname} ({gai.strerror})"
    attempts = found[1:] or found
    if all(isinstance(e, ConnectionRefusedError) for e in attempts):
        return f"connection refused by {host}"
    if any(isinstance(e, TimeoutError | trio.TooSlowError) for e in found):
        return f"no answer from {host} within the connect timeout"
    if any(isinstance(e, ssl.SSLError) for e in found):
        return f"TLS failed with {host}: {next(e for e in found if isinstance(e, ssl.SSLError))}"
    causes = sorted({getattr(e, "strerror", None) or type(e).__name__ for e in attempts})
    return f"cannot connect to {host}: {', '.join(causes)}"


def closed_reason(code: int | None, reason: str) -> str:
    """A close, in words: by the venue with its code and reason, or lost."""
    if code is None or code == ABNORMAL_CLOSE:
        return "connection lost (no close frame)"
    return f"closed by the venue: {code}" + (f" {reason}" if reason else "")


class MessageGate:
    """
    One big message in memory at a time, across the connections that share
    the gate (the feed pool's): a ``sansio`` connection that has buffered
    ``threshold`` bytes of one incomplete message enters the gate before it
    reads on, and its owner leaves it once done with that message (parsed
    and applied). The others stop reading while they wait, so their dumps
    wait in the kernel's socket buffers and the venue's, not in this process:
    at 10,000 assets the initial dump is 50 messages of 1.5 MB arriving at
    once, held all together before (75 MB and more of RSS).

    A trio lock with an owner: entered and left by the same task (the
    shard's reader); :meth:`enter` and :meth:`leave` are no-ops for a task
    that already holds it, or does not.
    """

    __slots__ = ("_lock", "threshold")

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self._lock = trio.Lock()

    def held(self) -> bool:
        """Whether the calling task holds the gate."""
        return self._lock.statistics().owner is trio.lowlevel.current_task()

    async def enter(self) -> None:
        """Wait for the gate, unless the calling task holds it already."""
        if not self.held():
            await self._lock.acquire()

    def leave(self) -> None:
        """Let the next connection in, if the calling task holds the gate."""
        if self.held():
            self._lock.release()


# ---------------------------------------------------------------- sansio


class SansIOTransport:
    """
    ``websockets``' Sans-I/O client protocol over a trio stream, driven by
    the caller's ``receive`` (one reader) and ``send`` (serialised by a lock).
    With a ``gate``, a message of ``gate.threshold`` bytes or more is read
    inside it (see :class:`MessageGate`; the caller leaves it).
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        protocol: ClientProtocol,
        url: str,
        gate: MessageGate | None = None,
    ) -> None:
        self._stream = stream
        self._protocol = protocol
        self._url = url
        self._gate = gate
        self._unfinished = 0  # bytes read since a message last completed
        self._slice_end = 0.0  # time.perf_counter() until which receive need not checkpoint
        self._messages: deque[Message] = deque()
        self._parts: list[bytes] = []
        self._binary = False
        self._send_lock = trio.Lock()

    async def _flush(self) -> None:
        """Write what the protocol has to say (our frames, pongs, the closing handshake)."""
        data = self._protocol.data_to_send()
        if not data:
            return
        async with self._send_lock:
            for chunk in data:
                if chunk:
                    await self._stream.send_all(chunk)

    async def handshake(self) -> None:
        """The opening handshake. Raises TransportError (``HTTP 429 from host``...)."""
        protocol = self._protocol
        protocol.send_request(protocol.connect())
        await self._flush()
        while protocol.state is State.CONNECTING:
            data = await self._read()
            protocol.receive_data(data) if data else protocol.receive_eof()
            for event in protocol.events_received():
                if isinstance(event, Response):
                    self._check_handshake(event)
                elif isinstance(event, Frame):
                    self._on_frame(event)
            if not data and protocol.state is State.CONNECTING:
                raise TransportError(f"{_host(self._url)} closed during the handshake")

    def _check_handshake(self, response: Response) -> None:
        error = self._protocol.handshake_exc
        if isinstance(error, InvalidStatus):
            status = error.response.status_code
            raise TransportError(f"HTTP {status} from {_host(self._url)} (handshake refused)")
        if isinstance(error, InvalidHandshake):
            raise TransportError(f"handshake with {_host(self._url)} failed: {error}")

    async def _read(self) -> bytes | bytearray:
        try:
            return await self._stream.receive_some(_RECEIVE_CHUNK)
        except (trio.BrokenResourceError, OSError) as exc:
            raise TransportError("connection lost (the socket broke)", code=ABNORMAL_CLOSE) from exc

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if frame.fin:
                data = frame.data
                self._messages.append(bytes(data) if opcode is Opcode.TEXT else bytearray(data))
                return
            self._binary = opcode is Opcode.BINARY
            self._parts = [bytes(frame.data)]
        elif opcode is Opcode.CONT:
            self._parts.append(bytes(frame.data))
            if frame.fin:
                data = b"".join(self._parts)
                self._parts = []
                self._messages.append(bytearray(data) if self._binary else data)

    def _closed(self) -> TransportError:
        protocol = self._protocol
        received = protocol.close_rcvd
        code = received.code if received is not None else ABNORMAL_CLOSE
        reason = received.reason if received is not None else ""
        sent = protocol.close_sent
        if received is None and sent is not None and sent.code == 1009:
            return TransportError("a message over feed.max_message_size: closed (1009)", code=1009)
        return TransportError(closed_reason(code, reason), code=code)

    async def receive(self) -> Message:
        """The next message (see :class:`Transport`). Raises TransportError."""
        messages = self._messages
        if messages:  # no checkpoint between buffered messages within a slice
            if time.perf_counter() < self._slice_end:
                return messages.popleft()
            await trio.lowlevel.checkpoint()
            self._slice_end = time.perf_counter() + RECEIVE_SLICE_SECONDS
            return messages.popleft()
        protocol = self._protocol
        gate = self._gate
        while not messages:
            if protocol.state is State.CLOSED:
                raise self._closed()
            if gate is not None and self._unfinished >= gate.threshold:
                await gate.enter()  # all these bytes are one message's: a big one
            data = await self._read()
            if data:
                protocol.receive_data(data)
                self._unfinished += len(data)
            else:
                protocol.receive_eof()
            for event in protocol.events_received():
                self._on_frame(event)  # type: ignore[arg-type]
            if messages:
                self._unfinished = 0
            await self._flush()
        self._slice_end = time.perf_counter() + RECEIVE_SLICE_SECONDS
        return messages.popleft()

    async def send(self, text: str) -> None:
        """Send a text message (see :class:`Transport`). Raises TransportError."""
        if self._protocol.state is not State.OPEN:
            raise self._closed()
        self._protocol.send_text(text.encode())
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise TransportError("connection lost (the socket broke)", code=ABNORMAL_CLOSE) from exc

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close with a close frame, wait briefly for the answer, close the stream."""
        with trio.move_on_after(_CLOSE_TIMEOUT):
            try:
                if self._protocol.state is State.OPEN:
                    self._protocol.send_close(code, reason)
                    await self._flush()
                while self._protocol.state is not State.CLOSED:
                    data = await self._stream.receive_some(_RECEIVE_CHUNK)
                    self._protocol.receive_data(data) if data else self._protocol.receive_eof()
                    self._protocol.events_received()
                    await self._flush()
                    if not data:
                        break
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        await trio.aclose_forcefully(self._stream)


async def _open_stream(url: str, receive_buffer: int) -> trio.abc.Stream:
    """TCP (and TLS for ``wss://``) to ``url``'s host; ``receive_buffer``: SO_RCVBUF, 0: the OS's."""
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    host = parts.hostname or ""
    port = parts.port or (443 if secure else 80)
    tcp = await trio.open_tcp_stream(host, port)
    tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if receive_buffer:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    if not secure:
        return tcp
    return trio.SSLStream(  # (as trio.open_ssl_over_tcp_stream: the TLS handshake comes first use)
        tcp, ssl.create_default_context(), server_hostname=host, https_compatible=True
    )


@asynccontextmanager
async def _open_sansio(
    url: str,
    *,
    max_message_size: int,
    connect_timeout: float,
    gate: MessageGate | None,
    receive_buffer: int,
) -> AsyncIterator[Transport]:
    try:
        with trio.fail_after(connect_timeout):
            stream = await _open_stream(url, receive_buffer)
            transport = SansIOTransport(
                stream, ClientProtocol(parse_uri(url), max_size=max_message_size), url, gate
            )
            try:
                await transport.handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
    except trio.TooSlowError:
        raise TransportError(f"no answer from {_host(url)} within the connect timeout") from None
    except OSError as exc:
        raise TransportError(connect_failure(exc, url)) from exc
    try:
        yield transport
    finally:
        with trio.CancelScope(shield=True):
            await transport.aclose()


# ---------------------------------------------------------------- trio-websocket


class TrioWebsocketTransport:
    """python-trio/trio-websocket's connection behind :class:`Transport`."""

    def __init__(self, ws: object) -> None:
        from trio_websocket import WebSocketConnection

        assert isinstance(ws, WebSocketConnection)
        self._ws = ws

    def _closed(self, exc: BaseException) -> TransportError:
        reason = getattr(exc, "reason", None)
        code = getattr(reason, "code", None)
        text = getattr(reason, "reason", None) or ""
        if code == 1009:
            return TransportError("a message over feed.max_message_size: closed (1009)", code=1009)
        return TransportError(closed_reason(code, text), code=code or ABNORMAL_CLOSE)

    async def send(self, text: str) -> None:
        """Send a text message (see :class:`Transport`). Raises TransportError."""
        from trio_websocket import ConnectionClosed

        try:
            await self._ws.send_message(text)
        except ConnectionClosed as exc:
            raise self._closed(exc) from exc
        except (trio.BrokenResourceError, OSError) as exc:
            raise TransportError("connection lost (the socket broke)", code=ABNORMAL_CLOSE) from exc

    async def receive(self) -> Message:
        """The next message (see :class:`Transport`). Raises TransportError."""
        from trio_websocket import ConnectionClosed

        try:
            message = await self._ws.get_message()
        except ConnectionClosed as exc:
            raise self._closed(exc) from exc
        except (trio.BrokenResourceError, OSError) as exc:
            raise TransportError("connection lost (the socket broke)", code=ABNORMAL_CLOSE) from exc
        return message if isinstance(message, str) else bytearray(message)

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Close with a close frame (trio-websocket waits for the answer)."""
        with trio.move_on_after(_CLOSE_TIMEOUT):
            await self._ws.aclose(code, reason)


@asynccontextmanager
async def _open_trio_websocket(
    url: str,
    *,
    max_message_size: int,
    connect_timeout: float,
    gate: MessageGate | None,
    receive_buffer: int,
) -> AsyncIterator[Transport]:
    del gate, receive_buffer  # its reader task buffers whole messages, its socket is its own
    from trio_websocket import (
        ConnectionRejected,
        ConnectionTimeout,
        HandshakeError,
        open_websocket_url,
    )

    opened = False
    try:
        async with open_websocket_url(
            url,
            max_message_size=max_message_size,
            message_queue_size=256,  # frames buffered before trio-websocket stops reading
            connect_timeout=connect_timeout,
            disconnect_timeout=_CLOSE_TIMEOUT,
        ) as ws:
            opened = True
            try:
                yield TrioWebsocketTransport(ws)
            finally:
                # After an abnormal close trio-websocket (0.12) may leave the TCP
                # stream open and unread; close it for sure.
                await trio.aclose_forcefully(ws._stream)
    except ConnectionRejected as exc:
        raise TransportError(
            f"HTTP {exc.status_code} from {_host(url)} (handshake refused)"
        ) from exc
    except ConnectionTimeout as exc:
        raise TransportError(f"no answer from {_host(url)} within the connect timeout") from exc
    except HandshakeError as exc:
        if opened:  # a failure while closing: the connection was already over
            return
        cause = exc.__cause__ if exc.__cause__ is not None else exc
        raise TransportError(connect_failure(cause, url)) from exc


def open_transport(
    kind: TransportKind,
    url: str,
    *,
    max_message_size: int,
    connect_timeout: float = 10.0,
    gate: MessageGate | None = None,
    receive_buffer: int = 0,
) -> AbstractAsyncContextManager[Transport]:
    """
    Connect to the market channel at ``url`` (``ws://`` or ``wss://``) and
    yield the open :class:`Transport`; closed on exit (an async context manager).

    Args:
        kind: ``sansio`` or ``trio-websocket`` (``feed.transport``).
        url: the market channel, ``ws://`` or ``wss://``.
        max_message_size: bytes; a larger message closes the connection (1009).
        connect_timeout: seconds for TCP, TLS and the opening handshake.
        gate: shared by the connections whose big messages should be read
            one at a time (:class:`MessageGate`); ``sansio`` only, the
            ``trio-websocket`` reader buffers whole messages on its own.
        receive_buffer: the socket's SO_RCVBUF, bytes (``feed.receive_buffer``);
            0 leaves it to the OS. ``sansio`` only.

    Raises:
        TransportError: the connection could not be opened, with the cause.
    """
    opener = _open_sansio if kind == "sansio" else _open_trio_websocket
    return opener(
        url,
        max_message_size=max_message_size,
        connect_timeout=connect_timeout,
        gate=gate,
        receive_buffer=receive_buffer,
    )

"""
Raw WebSocket bytes, and ending a connection without a close frame.

Some faults need what wsproto will not do: write a text frame whose payload
is not UTF-8, write half a frame, or close the TCP connection with no close
frame (a FIN, or a RST). trio-websocket 0.12 has no public API for raw
writes, so :func:`write_raw` and :func:`abort_stream` use two of its private
attributes, ``ws._stream`` and ``ws._stream_lock``: the only internals the
replay touches; wsproto's state is never touched. Frames are built per
RFC 6455, section 5.2.
"""

from __future__ import annotations

import socket
import struct
from typing import Literal

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

__all__ = [
    "DROP_MODES",
    "WS_TEXT",
    "DropMode",
    "RawFrame",
    "abort_stream",
    "end_connection",
    "write_raw",
    "ws_frame",
]

DropMode = Literal["tcp", "reset", "close"]
DROP_MODES: tuple[DropMode, ...] = ("tcp", "reset", "close")
"""How a connection is ended abruptly (:func:`end_connection`, :meth:`ReplayServer.drop`)."""

WS_TEXT = 0x1
"""The WebSocket opcode of a text frame (RFC 6455, section 5.2)."""


@attrs.frozen
class RawFrame:
    """
    Bytes written to the socket as they are, bypassing wsproto (an outbox entry).

    Used for what wsproto refuses to send: a text frame whose payload is not
    UTF-8 (:func:`ws_frame`), or part of a frame (:meth:`ReplayServer.stall`).
    """

    data: bytes


def ws_frame(payload: bytes, opcode: int = WS_TEXT) -> bytes:
    """
    One final, unmasked server-to-client WebSocket frame (RFC 6455, section 5.2).

    No extension is ever negotiated by trio-websocket, so a server frame is
    the 2-10 byte header and the payload as is; wsproto keeps no per-message
    state for unextended frames, so writing one beside it is safe.
    """
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x80 | opcode, length)
    elif length < 2**16:
        header = struct.pack("!BBH", 0x80 | opcode, 126, length)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 127, length)
    return header + payload


async def write_raw(ws: WebSocketConnection, data: bytes) -> None:
    """
    Write ``data`` to the connection's byte stream under its send lock.

    trio-websocket's own ``_send`` writes what wsproto produced to
    ``ws._stream`` holding ``ws._stream_lock`` (a ``trio.StrictFIFOLock``);
    taking the same lock keeps a raw write from interleaving with a PONG or
    a close frame sent meanwhile.

    Raises:
        ConnectionClosed: the peer is gone.
    """
    async with ws._stream_lock:
        try:
            await ws._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionClosed(None) from exc


async def abort_stream(ws: WebSocketConnection, *, reset: bool) -> None:
    """
    Close the TCP connection under ``ws`` without a WebSocket close frame:
    a FIN, or with ``reset`` a RST (``SO_LINGER`` 0). trio-websocket's reader
    task then sees the stream closed and ends the connection (code 1006).
    """
    stream = ws._stream
    if reset and isinstance(stream, trio.SocketStream):
        try:
            stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass  # already gone: the close below is all that is left to do
    await stream.aclose()


async def end_connection(ws: WebSocketConnection, how: DropMode, code: int, reason: str) -> None:
    """
    End ``ws`` the way ``how`` says: ``"tcp"`` a FIN and ``"reset"`` a RST
    without a close frame (:func:`abort_stream`); ``"close"`` a close frame
    with ``code`` and ``reason`` first, waiting at most 2 s for the answer.
    """
    if how == "close":
        with trio.move_on_after(2):
            await ws.aclose(code, reason)
    await abort_stream(ws, reset=how == "reset")

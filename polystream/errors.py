"""
The exceptions polystream raises.

The tree::

    PolystreamError
    ├── ConfigError            a configuration value is missing or malformed
    ├── MalformedFrame         a market-channel frame or event cannot be used
    ├── FeedError              a WebSocket shard failed
    │   ├── FeedClosed         we closed the connection (unanswered PING, stale feed)
    │   └── TransportError     the connection closed, broke or could not be opened
    ├── DatabaseError          PostgreSQL is unreachable or a statement failed
    ├── VenueError             a REST API of the venue could not be asked
    │   ├── ClobError          the CLOB (prices, midpoints, books)
    │   └── GammaError         Gamma (market metadata)
    ├── ImportDataError        a Gamma market file cannot be read
    └── ReplayError            a replay capture cannot be loaded

Errors are translated at the boundary (``raise FeedClosed(...) from exc``) so
callers catch these and never a library's own exceptions.
"""

from __future__ import annotations

__all__ = [
    "BAD_INPUT_KINDS",
    "CacheError",
    "ClobError",
    "ConfigError",
    "DatabaseError",
    "FeedClosed",
    "FeedError",
    "GammaError",
    "ImportDataError",
    "MalformedFrame",
    "PolystreamError",
    "ReplayError",
    "TransportError",
    "VenueError",
    "leaves",
]


BAD_INPUT_KINDS = (
    "invalid_json",
    "not_utf8",
    "binary_frame",
    "frame_too_large",
    "not_an_object",
    "missing_field",
    "bad_field",
    "bad_number",
    "price_out_of_range",
    "negative_size",
    "ambiguous_event",
    "crossed_book",
    "stale_event",
)
"""
The bad-input catalogue (README, "Bad input"): every ``parse_errors`` kind
(``MalformedFrame.kind``, a WebSocket close code's, or a book's refusal).
"""


def leaves(exc: BaseException) -> list[BaseException]:
    """
    The plain exceptions inside ``exc``: itself, or every leaf of a (nested)
    exception group, in order. For one-line messages of a failure a nursery
    wrapped (trio raises groups; STYLE.md: never pick ``exceptions[0]``).
    """
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


class PolystreamError(Exception):
    """Root of every error polystream raises on purpose."""


class ConfigError(PolystreamError):
    """
    A configuration value is missing or malformed.

    The message names the key (``feed.ping_interval``), where the value came
    from (file or environment variable) and the expected form.
    """


class MalformedFrame(PolystreamError):
    """
    A frame or one of its events cannot be used.

    ``kind`` is a short snake_case reason, used as a metric label
    (``invalid_json``, ``not_utf8``, ``missing_field``, ...).
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class FeedError(PolystreamError):
    """A WebSocket shard failed; its supervisor reconnects with backoff."""


class FeedClosed(FeedError):
    """The shard's connection closed, or could not be opened."""

    def __init__(self, shard: int, reason: str) -> None:
        super().__init__(f"shard {shard}: {reason}")
        self.shard = shard
        self.reason = reason


class TransportError(FeedError):
    """
    The market-channel connection could not be opened, closed, or broke.

    ``reason`` says why in words an operator can act on ("connection refused
    by host:port", "HTTP 429 from host", "closed by the venue: 1008 ...");
    ``code`` is the WebSocket close code when there is one (1006: no close
    frame, the connection was lost), else None.
    """

    def __init__(self, reason: str, *, code: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class DatabaseError(PolystreamError):
    """PostgreSQL is unreachable, or a statement failed."""


class VenueError(PolystreamError):
    """
    A REST API of the venue could not be asked: transport errors, 429 or 5xx
    after every attempt (docs/protocol.md, "Rate limits"), another 4xx, or an
    answer that is not the expected JSON shape. The message names the method,
    path and cause.
    """


class ClobError(VenueError):
    """The CLOB REST API (``/prices``, ``/midpoints``, ``/books``) failed."""


class GammaError(VenueError):
    """The Gamma API (market metadata) failed."""


class CacheError(PolystreamError):
    """Redis (``cache.redis_url``) refused, timed out or cannot be reached."""


class ImportDataError(PolystreamError):
    """A Gamma market file or object cannot be read into ``markets``."""


class ReplayError(PolystreamError):
    """A replay capture cannot be loaded."""

"""
The exceptions polystream raises.

The tree::

    PolystreamError
    ├── ConfigError            a configuration value is missing or malformed
    ├── MalformedFrame         a market-channel frame or event cannot be used
    ├── FeedError              a WebSocket shard failed
    │   └── FeedClosed         the connection closed or could not be opened
    ├── DatabaseError          PostgreSQL is unreachable or a statement failed
    ├── ImportDataError        a Gamma market file cannot be read
    └── ReplayError            a replay capture cannot be loaded

Errors are translated at the boundary (``raise FeedClosed(...) from exc``) so
callers catch these and never a library's own exceptions.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DatabaseError",
    "FeedClosed",
    "FeedError",
    "ImportDataError",
    "MalformedFrame",
    "PolystreamError",
    "ReplayError",
]


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


class DatabaseError(PolystreamError):
    """PostgreSQL is unreachable, or a statement failed."""


class ImportDataError(PolystreamError):
    """A Gamma market file or object cannot be read into ``markets``."""


class ReplayError(PolystreamError):
    """A replay capture cannot be loaded."""

"""
What the REST clients (Gamma in :mod:`polystream.gamma`, CLOB in
:mod:`polystream.poller`) share: which failures are retried, and batching.

Polymarket's REST APIs are behind Cloudflare throttling: sustained overshoot
answers 429 (https://docs.polymarket.com/api-reference/rate-limits,
../shared/protocol.md section 9), so a 429 is retried after its
``Retry-After``, like transport errors and 5xx; other 4xx are not.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

import httpx

__all__ = ["RETRY_AFTER_MAX", "chunks", "retry_delay"]

RETRY_AFTER_MAX = 60.0
"""Seconds; a larger ``Retry-After`` is clamped to this."""

T = TypeVar("T")


def retry_delay(exc: Exception) -> bool | float:
    """
    Backoff hook for stamina's ``retry(on=...)``: True (retry with backoff)
    for transport errors and 5xx, the ``Retry-After`` seconds (clamped to
    :data:`RETRY_AFTER_MAX`) for 429, False for anything else.
    """
    if isinstance(exc, httpx.TransportError):
        return True
    if not isinstance(exc, httpx.HTTPStatusError):
        return False
    status = exc.response.status_code
    if status == 429:
        after = exc.response.headers.get("retry-after", "")
        try:
            return min(max(float(after), 0.0), RETRY_AFTER_MAX)
        except ValueError:
            return True
    return status >= 500


def chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]

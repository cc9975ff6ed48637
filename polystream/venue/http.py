"""
What the REST clients (Gamma in :mod:`polystream.venue.gamma`, CLOB in
:mod:`polystream.pipeline.fallback`) share: which failures are retried, and batching.

Polymarket's REST APIs are behind Cloudflare throttling: sustained overshoot
answers 429 (https://docs.polymarket.com/api-reference/rate-limits,
docs/protocol.md, "Rate limits"), so a 429 is retried after its
``Retry-After``, like transport errors and 5xx; other 4xx are not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import httpx
import stamina

__all__ = ["RETRY_AFTER_MAX", "chunks", "open_http", "retry_delay", "send_with_retries"]

RETRY_AFTER_MAX = 60.0
"""Seconds; a larger ``Retry-After`` is clamped to this."""

T = TypeVar("T")


def retry_delay(exc: BaseException) -> bool | float:
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


@asynccontextmanager
async def open_http(url: str, request_timeout: float) -> AsyncIterator[httpx.AsyncClient]:
    """
    An HTTP client for the API at ``url`` (JSON, polystream's user agent),
    closed on exit; ``request_timeout`` bounds each attempt (connect, read,
    write, pool), in seconds. httpx runs under trio through anyio.
    """
    async with httpx.AsyncClient(
        base_url=url.rstrip("/"),
        timeout=request_timeout,
        headers={"accept": "application/json", "user-agent": "polystream"},
    ) as http:
        yield http


def chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    """Consecutive slices of ``items`` of at most ``size`` elements."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def send_with_retries(
    send: Callable[[], Awaitable[httpx.Response]],
    *,
    attempts: int,
    wait_initial: float,
    wait_max: float,
    accept: Collection[int] = (),
) -> httpx.Response:
    """
    ``await send()`` with stamina's exponential backoff and jitter, retrying
    what :func:`retry_delay` says (``attempts`` tries; waits in seconds).

    Returns:
        A 2xx response, or one whose status is in ``accept`` (e.g. 404).

    Raises:
        httpx.HTTPStatusError: a status not retried, or still failing at the end.
        httpx.HTTPError: a transport error still failing at the end.
    """
    async for attempt in stamina.retry_context(
        on=retry_delay,
        attempts=attempts,
        timeout=None,
        wait_initial=wait_initial,
        wait_max=wait_max,
        wait_jitter=wait_initial,
    ):
        with attempt:
            response = await send()
            if response.status_code not in accept:
                response.raise_for_status()
            return response
    raise AssertionError("stamina ended without a result")  # pragma: no cover

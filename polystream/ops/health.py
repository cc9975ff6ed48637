"""
The health endpoint: ``/health`` (JSON, read by ``polystream status``) and
``/metrics`` (Prometheus text format, from prometheus_client), served by
hypercorn on ``health.listen`` (loopback by default).

``/health`` answers 200 when healthy and 503 otherwise, with the same JSON
body (:meth:`polystream.stats.Stats.health`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client import make_asgi_app

from polystream.ops.metrics import registry_of
from polystream.stats import Stats

__all__ = [
    "LAG_PROBE_INTERVAL",
    "Receive",
    "Scope",
    "Send",
    "answer_lifespan",
    "health_app",
    "run_lag_probe",
    "serve_asgi",
    "serve_health",
]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def health_app(stats: Stats) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """An ASGI app serving ``/health`` and ``/metrics`` for ``stats``."""
    metrics = make_asgi_app(registry_of(stats))

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["path"] == "/metrics":
            await metrics(scope, receive, send)
            return
        if scope["path"] in ("/health", "/"):
            document = stats.health()
            status = 200 if document["status"] == "ok" else 503
            body = orjson.dumps(document, option=orjson.OPT_INDENT_2)
        else:
            status, body = 404, b'{"error": "not found"}'
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI ``lifespan`` scope: nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def serve_asgi(
    app: Callable[[Scope, Receive, Send], Awaitable[None]],
    listen: str,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Serve an ASGI ``app`` with hypercorn on ``listen`` (``host:port``) until cancelled.

    ``task_status.started`` receives the bound addresses
    (``["http://127.0.0.1:9108"]``); port 0 binds a free port.

    Raises:
        OSError: the address is in use or not available.
    """
    config = HypercornConfig()
    config.bind = [listen]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0.5
    await serve(app, config, task_status=task_status, mode="asgi")  # type: ignore[arg-type]


LAG_PROBE_INTERVAL = 0.01
"""Seconds between two looks of the loop-lag probe."""


async def run_lag_probe(
    stats: Stats, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """
    Measure event-loop stalls until cancelled: every :data:`LAG_PROBE_INTERVAL`
    seconds a timer is set; how late it fires (seconds) is what the loop spent
    on one piece of work without yielding (``polystream_loop_lag_seconds``,
    ``/health`` ``loop_lag_max_s``). Nothing else should hold the loop for
    more than a few milliseconds: the feed's PINGs and reads wait meanwhile.
    """
    task_status.started()
    while True:
        due = trio.current_time() + LAG_PROBE_INTERVAL
        await trio.sleep_until(due)
        lag = max(0.0, trio.current_time() - due)
        stats.loop_lag.observe(lag)
        stats.loop_lag_max = max(stats.loop_lag_max, lag)


async def serve_health(
    stats: Stats,
    listen: str,
    *,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Serve ``/health`` and ``/metrics`` on ``listen`` (``host:port``) until cancelled.

    Raises:
        OSError: the address is in use or not available.
    """
    await serve_asgi(health_app(stats), listen, task_status=task_status)

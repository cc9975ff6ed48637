"""
systemd service notifications (``Type=notify``): readiness, status, watchdog.

The protocol is ``man sd_notify``
(https://www.freedesktop.org/software/systemd/man/sd_notify.html): the service
manager passes ``$NOTIFY_SOCKET``, the path of an ``AF_UNIX``/``SOCK_DGRAM``
socket (a leading ``@`` means the Linux abstract namespace, i.e. a leading NUL
byte); each datagram is newline-separated ``KEY=VALUE`` assignments in UTF-8:

* ``READY=1``: start-up finished (systemd then starts ``ExecStartPost`` and
  units ordered after this one, and arms the watchdog);
* ``STATUS=...``: one line shown by ``systemctl status``;
* ``WATCHDOG=1``: keep-alive; systemd kills the service (``WatchdogSignal=``,
  SIGABRT by default) if none arrives for ``WatchdogSec=``, which it passes as
  ``$WATCHDOG_USEC`` (microseconds). ``man sd_watchdog_enabled``: ping every
  half of it; when ``$WATCHDOG_PID`` is set, only that process may ping;
* ``STOPPING=1``: shutdown has begun.

Written by hand rather than taken from PyPI: ``sdnotify`` (0.3.2, 2017) is
untyped, connects at construction, swallows every error, and does not read
``$WATCHDOG_USEC``/``$WATCHDOG_PID``; the protocol is one ``sendto``.

Every method is a no-op when ``$NOTIFY_SOCKET`` is unset (a foreground run, the
tests). A send never raises: a datagram on a non-blocking socket either goes or
fails at once; a failure is logged (once per reason) and the daemon goes on.

The watchdog must prove that *the trio loop* is alive, so :func:`run_watchdog`
is a trio task: a loop wedged by blocking code stops the pings and systemd
restarts the process.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import time
from collections.abc import Callable, Mapping

import attrs
import structlog
import trio

from polystream.stats import Stats

__all__ = [
    "STATUS_INTERVAL",
    "Notifier",
    "notify_running",
    "run_watchdog",
    "stats_status",
    "status_line",
]

logger = structlog.get_logger(__name__)

STATUS_INTERVAL = 10.0
"""Seconds between ``STATUS=`` updates when systemd asks for no watchdog."""


@attrs.define(eq=False)
class Notifier:
    """
    Sends ``sd_notify`` datagrams to one socket.

    Build it with :meth:`from_environ`. Not thread-safe; call it from the trio
    thread (or before ``trio.run``).

    Attributes:
        address: the socket address as ``sendto`` takes it (abstract names
            start with a NUL byte), or None when notifications are off.
        watchdog_interval: seconds between ``WATCHDOG=1`` pings (half of
            ``$WATCHDOG_USEC``), or None when systemd expects none from us.
    """

    address: str | None = None
    watchdog_interval: float | None = None
    _sock: socket.socket | None = attrs.field(default=None, init=False, repr=False)
    _failures: set[str] = attrs.field(factory=set, init=False, repr=False)

    @classmethod
    def from_environ(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        pid: int | None = None,
        unset_environment: bool = False,
    ) -> Notifier:
        """
        Read ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``.

        Args:
            environ: the environment (default ``os.environ``).
            pid: this process's id (default ``os.getpid()``), compared with
                ``$WATCHDOG_PID``.
            unset_environment: remove the three variables from ``os.environ``
                afterwards, so that child processes (the embedded PostgreSQL)
                do not inherit them, as ``sd_notify(unset_environment=1)`` does.
        """
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        address: str | None = None
        if raw.startswith("@"):
            address = "\0" + raw[1:]
        elif raw.startswith("/"):
            address = raw
        elif raw:
            logger.warning("systemd_notify_socket_unsupported", notify_socket=raw)
        interval = _watchdog_interval(env, os.getpid() if pid is None else pid)
        if unset_environment:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return cls(address, interval if address is not None else None)

    @property
    def enabled(self) -> bool:
        """True when a service manager listens (``$NOTIFY_SOCKET`` was set)."""
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """
        Send ``KEY=VALUE`` assignments in one datagram.

        Returns:
            True if sent; False when disabled or the send failed (logged once
            per error kind; never raises).
        """
        if self.address is None:
            return False
        message = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)
                self._sock = sock
            self._sock.sendto(message, self.address)
        except OSError as exc:
            reason = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            if reason not in self._failures:
                self._failures.add(reason)
                logger.warning("systemd_notify_failed", reason=reason, error=str(exc))
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (and ``STATUS=``): the database is reachable and the feed has started."""
        return self.send("READY=1", *_status(status))

    def status(self, text: str) -> bool:
        """``STATUS=text`` (one line; newlines become spaces)."""
        return self.send(*_status(text))

    def watchdog(self, status: str | None = None) -> bool:
        """``WATCHDOG=1`` (and ``STATUS=``): the event loop is alive."""
        return self.send("WATCHDOG=1", *_status(status))

    def stopping(self, status: str | None = "stopping") -> bool:
        """``STOPPING=1`` (and ``STATUS=``): shutdown has begun."""
        return self.send("STOPPING=1", *_status(status))

    def close(self) -> None:
        """Close the socket (a later send opens a new one)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status(text: str | None) -> tuple[str, ...]:
    if text is None:
        return ()
    return ("STATUS=" + " ".join(text.split()),)


def _watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, unless ``$WATCHDOG_PID`` names another process."""
    owner = env.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:
                return None
        except ValueError:
            return None
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2_000_000


async def run_watchdog(
    notifier: Notifier,
    healthy: Callable[[], bool],
    status: Callable[[], str],
    *,
    grace: float = 0.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    Ping ``WATCHDOG=1`` with a fresh ``STATUS=`` every ``notifier.watchdog_interval`` s.

    The pings come from this trio task, so they stop when the event loop is
    blocked, and systemd restarts a wedged daemon. They also stop once
    ``healthy()`` has been false for more than ``grace`` seconds (0: at once);
    ``STATUS=`` is still sent then, so ``systemctl status`` says why. Without a
    watchdog (``$WATCHDOG_USEC`` unset) only ``STATUS=`` is sent, every
    :data:`STATUS_INTERVAL` s. Returns at once when notifications are off.
    Runs until cancelled.

    Args:
        notifier: where to send.
        healthy: cheap, non-blocking check, e.g. ``lambda: not stats.problems()``.
        status: one-line summary, e.g. :func:`status_line` of the stats.
        grace: seconds of continuous ill health tolerated before pings stop
            (a database or venue outage that a restart would not fix).
        task_status: started at once (nothing to wait for).
    """
    task_status.started()
    if not notifier.enabled:
        return
    interval = notifier.watchdog_interval
    period = STATUS_INTERVAL if interval is None else interval
    unhealthy_since: float | None = None
    while True:
        now = trio.current_time()
        if healthy():
            unhealthy_since = None
        elif unhealthy_since is None:
            unhealthy_since = now
        alive = unhealthy_since is None or now - unhealthy_since < grace
        if interval is not None and alive:
            notifier.watchdog(status())
        else:
            notifier.status(status())
        await trio.sleep(period)


async def notify_running(
    notifier: Notifier,
    stats: Stats,
    stopping: trio.Event,
    *,
    grace: float = 300.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """
    ``READY=1`` now, then :func:`run_watchdog` on a running daemon's stats.

    Start it once :func:`polystream.app.run` has handed over its ``App``
    (the database answered and the feed tasks have started). Healthy means
    ``stats.problems()`` is empty; the status is :func:`stats_status`, or
    ``stopping`` once ``stopping`` is set. Runs until cancelled.

    Args:
        notifier: where to send.
        stats: the daemon's counters (``App.stats``).
        stopping: set when shutdown begins (``App.stopping``).
        grace: seconds of continuous ill health before pings stop.
        task_status: started once ``READY=1`` has been sent.
    """

    def status() -> str:
        return "stopping" if stopping.is_set() else stats_status(stats)

    notifier.ready(status())
    await run_watchdog(
        notifier, lambda: not stats.problems(), status, grace=grace, task_status=task_status
    )


def status_line(
    *,
    assets: int,
    shards: int,
    frames: int,
    last_write_age: float | None,
    problems: list[str] | tuple[str, ...] = (),
) -> str:
    """
    The ``STATUS=`` text, e.g. ``12 assets on 1 shard, 14k frames, last write 0.3s ago``.

    Problems, when any, are appended after ``; `` (``; unhealthy: database not
    connected``). ``last_write_age`` is seconds, None before the first write.
    """
    parts = [
        f"{assets} asset{'' if assets == 1 else 's'} on {shards} shard{'' if shards == 1 else 's'}",
        f"{_compact(frames)} frames",
        "no write yet" if last_write_age is None else f"last write {_age(last_write_age)} ago",
    ]
    text = ", ".join(parts)
    if problems:
        text += "; unhealthy: " + ", ".join(problems)
    return text


def _compact(count: int) -> str:
    """12 -> ``12``, 14_200 -> ``14k``, 3_400_000 -> ``3.4M``."""
    if count < 1000:
        return str(count)
    if count < 1_000_000:
        return f"{count // 1000}k"
    return f"{math.floor(count / 100_000) / 10:g}M"


def _age(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 120:
        return f"{seconds:.0f}s"
    return f"{seconds / 60:.0f}min"


def stats_status(stats: Stats) -> str:
    """:func:`status_line` of a running daemon's :class:`~polystream.stats.Stats`."""
    last = stats.last_write_at
    return status_line(
        assets=sum(shard.assets for shard in stats.shards.values()),
        shards=len(stats.shards),
        frames=stats.frames,
        last_write_age=None if last is None else time.monotonic() - last,
        problems=stats.problems(),
    )

"""
``polystream run`` as a supervised child process: the one way the benchmarks,
``polystream demo`` (and a multi-worker run) start the daemon.

:func:`open_daemon` spawns ``python -m polystream run`` with the configuration in
``POLYSTREAM_<SECTION>__<KEY>`` variables (:func:`daemon_env`), its stdout and
stderr in one log file, ``/health`` on a free loopback port; it yields a
:class:`DaemonProcess` to wait on, measure and stop, and stops it on the way out.

Times are ``time.monotonic()`` seconds; CPU is user + system seconds of all the
child's threads; memory is KiB.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import psutil  # type: ignore[import-untyped]
import trio

from polystream.config import ENV_PREFIX
from polystream.errors import PolystreamError
from polystream.ops.status import EXIT_DOWN, fetch_health

__all__ = [
    "DaemonProcess",
    "daemon_env",
    "free_port",
    "open_daemon",
    "peak_rss_kib",
    "setting_variables",
]

_READY_POLL_S = 0.02  # between /health reads while the daemon starts
_EXITED_POLL_S = 0.05  # between checks that the daemon still runs (wait_for)
_HEALTH_TIMEOUT_S = 2.0  # one /health request
_EXIT_KILL_AFTER_S = 5.0  # open_daemon's own stop, when the block did not stop it
_LOG_TAIL_LINES = 15


def free_port(host: str = "127.0.0.1") -> int:
    """
    A TCP port free on ``host`` now (bound and released: another process may take it
    before the caller binds it, which on loopback does not happen in practice).
    """
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def setting_variables(overrides: Mapping[str, object]) -> dict[str, str]:
    """
    ``{"feed__ping_interval": 1.0}`` as ``{"POLYSTREAM_FEED__PING_INTERVAL": "1.0"}``:
    keys are ``<section>__<key>`` of ``config.toml``; booleans become ``true`` /
    ``false``, other values ``str(value)``.
    """
    variables = {}
    for key, value in overrides.items():
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        variables[f"{ENV_PREFIX}{key.upper()}"] = text
    return variables


def daemon_env(
    dsn: str,
    feed_url: str,
    health_port: int,
    *,
    inherit: bool = False,
    **overrides: object,
) -> dict[str, str]:
    """
    The environment of a ``polystream run`` child: this process's environment
    without its own ``POLYSTREAM_*`` variables (``inherit=True`` keeps them, for a
    child that runs with the operator's settings), JSON logs, the database
    ``dsn``, the market channel ``feed_url``, ``/health`` on
    ``127.0.0.1:health_port``, then ``overrides`` (:func:`setting_variables`).
    """
    env = {k: v for k, v in os.environ.items() if inherit or not k.startswith(ENV_PREFIX)}
    env.update(
        setting_variables(
            {
                "log__format": "json",
                "database__dsn": dsn,
                "feed__url": feed_url,
                "health__listen": f"127.0.0.1:{health_port}",
                **overrides,
            }
        )
    )
    return env


def peak_rss_kib(pid: int) -> int:
    """
    Peak resident memory of process ``pid`` so far, KiB (``VmHWM`` of
    ``/proc/<pid>/status``: Linux; psutil reports no peak there).

    Raises:
        PolystreamError: the process is gone or the kernel reports no ``VmHWM``.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        raise PolystreamError(f"cannot read the memory of process {pid}: {exc}") from exc
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise PolystreamError(f"no VmHWM in /proc/{pid}/status")


@attrs.frozen(eq=False)
class DaemonProcess:
    """
    One running ``polystream run`` child, as :func:`open_daemon` started it.

    Attributes:
        process: the child.
        env: its environment (for ``polystream status`` against it, say).
        log_path: its stdout and stderr, JSON lines.
        health_port: its ``/health`` port on 127.0.0.1.
        spawned_at: ``time.monotonic()`` just before the spawn.
    """

    process: trio.Process
    env: Mapping[str, str]
    log_path: Path
    health_port: int
    spawned_at: float
    _client: httpx.Client = attrs.field(repr=False)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    @property
    def health_url(self) -> str:
        """``http://127.0.0.1:PORT/health``."""
        return f"http://127.0.0.1:{self.health_port}/health"

    @property
    def exit_code(self) -> int | None:
        """The exit code once it has exited (negative: the signal that ended it), else None."""
        return self.process.poll()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the log (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(log {self.log_path} unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    def ensure_running(self) -> None:
        """
        Check that the daemon still runs.

        Raises:
            PolystreamError: the daemon has exited (its code and the log's last lines).
        """
        code = self.process.poll()
        if code is not None:
            raise PolystreamError(f"daemon exited {code} (log {self.log_path}):\n{self.log_tail()}")

    async def wait_for(self, event: trio.Event) -> None:
        """
        Wait until ``event`` is set (by something the daemon does: it connected,
        say), checking every 50 ms that it still runs. The caller bounds the wait.

        Raises:
            PolystreamError: the daemon exited first (:meth:`ensure_running`).
        """
        while not event.is_set():
            self.ensure_running()
            with trio.move_on_after(_EXITED_POLL_S):
                await event.wait()

    async def wait_ready(self) -> dict[str, Any]:
        """
        Wait until ``/health`` answers like polystream (read with
        :func:`polystream.ops.status.fetch_health`; 200 healthy or 503 unhealthy
        alike: the daemon serves it once every part has started); returns that
        first document. The caller bounds the wait (``trio.fail_after``).

        Raises:
            PolystreamError: the daemon exited first.
        """
        while True:
            self.ensure_running()
            code, document, _ = await trio.to_thread.run_sync(
                fetch_health, self.health_url, _HEALTH_TIMEOUT_S
            )
            if code != EXIT_DOWN and document is not None:
                return document
            await trio.sleep(_READY_POLL_S)

    async def try_health(self) -> dict[str, Any] | None:
        """
        The ``/health`` document now (200 and 503 alike), None while it does not
        answer like polystream. One kept-alive connection: about a millisecond a
        read, so it can be polled every few milliseconds (``fetch_health`` builds
        a client, and so an SSL context, per call: some 100 ms and 60 ms of CPU
        here, too slow and too costly for that).

        Raises:
            PolystreamError: the daemon has exited.
        """
        self.ensure_running()
        return await trio.to_thread.run_sync(self._read_health)

    async def health(self) -> dict[str, Any]:
        """
        The ``/health`` document now (200 and 503 alike).

        Raises:
            PolystreamError: the daemon has exited, or ``/health`` does not answer.
        """
        document = await self.try_health()
        if document is None:
            raise PolystreamError(f"daemon /health at {self.health_url} does not answer")
        return document

    def _read_health(self) -> dict[str, Any] | None:
        try:
            response = self._client.get(self.health_url)
            document = orjson.loads(response.content)
        except (httpx.HTTPError, orjson.JSONDecodeError):
            return None
        if not isinstance(document, dict) or "status" not in document:
            return None
        return document

    def cpu_seconds(self) -> float:
        """
        User + system CPU seconds of the daemon so far, all threads (psutil).

        Raises:
            PolystreamError: the process is gone.
        """
        try:
            times = psutil.Process(self.pid).cpu_times()
        except psutil.Error as exc:
            raise PolystreamError(f"cannot read the CPU time of process {self.pid}") from exc
        return float(times.user + times.system)

    def peak_rss_kib(self) -> int:
        """
        Peak resident memory of the daemon so far, KiB (:func:`peak_rss_kib`).

        Raises:
            PolystreamError: the process is gone.
        """
        return peak_rss_kib(self.pid)

    async def stop(self, kill_after: float = 30.0) -> int:
        """
        SIGTERM (the daemon flushes and exits 0), then SIGKILL if it has not exited
        within ``kill_after`` seconds; returns the exit code (negative: the signal
        that ended it). Returns the code at once if it has already exited.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with trio.move_on_after(kill_after):
                await self.process.wait()
        if self.process.poll() is None:
            self.process.kill()
        return await self.process.wait()


@contextlib.asynccontextmanager
async def open_daemon(
    dsn: str,
    feed_url: str,
    log_path: Path,
    *,
    settings: Mapping[str, object] | None = None,
    inherit: bool = False,
    config_path: Path | None = None,
    cwd: Path | None = None,
) -> AsyncIterator[DaemonProcess]:
    """
    Start ``python -m polystream run`` (``--config config_path`` if given) on
    ``dsn`` against the market channel at ``feed_url``, ``/health`` on a free
    loopback port, stdout and stderr to ``log_path`` (truncated); ``settings`` and
    ``inherit`` as in :func:`daemon_env`. Yields at once (wait with
    :meth:`DaemonProcess.wait_ready`); on the way out, if the block did not
    :meth:`~DaemonProcess.stop` it, stops it (SIGTERM, SIGKILL after 5 s;
    shielded from cancellation).

    Raises:
        OSError: the log cannot be written or the interpreter not started.
    """
    health_port = free_port()
    env = daemon_env(dsn, feed_url, health_port, inherit=inherit, **(settings or {}))
    argv = [sys.executable, "-m", "polystream", "run"]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    with httpx.Client(timeout=_HEALTH_TIMEOUT_S) as client:
        with log_path.open("wb") as log:  # the child keeps its own descriptor
            spawned_at = time.monotonic()
            process = await trio.lowlevel.open_process(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=cwd
            )
        daemon = DaemonProcess(process, env, log_path, health_port, spawned_at, client)
        try:
            yield daemon
        finally:
            with trio.CancelScope(shield=True):
                await daemon.stop(kill_after=_EXIT_KILL_AFTER_S)

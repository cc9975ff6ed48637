"""
``polystream run --workers N``: N daemons on one host, as supervised child processes.

The command runs no daemon itself. :func:`plan_workers` describes N children,
each ``python -m polystream run`` (with the same ``--config``) and the environment
of the supervisor plus ``POLYSTREAM_FEED__CLUSTER=true`` (they split the markets
through leases in PostgreSQL, :mod:`polystream.cluster`) and its own ``/health``:
the host of ``health.listen`` and its port + i for worker i (0-based; port 0
stays 0, any free port), pinned to a CPU of its own when there are enough
(:func:`worker_cpus`: one daemon per core). :class:`Supervisor` starts them and
keeps them running:

* a child that exits while no stop was asked for is logged (``worker_exited``)
  and started again after a pause (:func:`restart_delay`: 1 s, doubled per
  exit up to 30 s, back to 1 s once a child ran 60 s);
* SIGTERM, SIGINT or SIGHUP stops them: SIGTERM to every child (each hands its
  partitions over, flushes and exits 0), then SIGKILL to any still running
  after 30 s. A second signal sends SIGTERM again, which makes a daemon exit at
  once (``polystream run``'s forced exit). The supervisor exits 0 if every child
  running at the stop exited 0 (or died of that SIGTERM before it had started
  to serve), else 1.

Children run in their own session (``start_new_session``): a Ctrl-C in a
terminal reaches the supervisor only, which forwards one SIGTERM (a daemon
that also got the terminal's SIGINT would take the forwarded signal as a
second one and exit without its final flush). Under systemd the whole control
group is still killed at the end of ``TimeoutStopSec=``.

Under systemd (``Type=notify``, ``NotifyAccess=main``) the supervisor is the
main process: it sends ``READY=1`` once every child has been started, the
watchdog pings from its event loop and ``STOPPING=1`` at the stop; the
children get no ``$NOTIFY_SOCKET`` (the caller unsets it, see
:meth:`polystream.ops.systemd.Notifier.from_environ`).

:func:`render_template_unit` renders ``deploy/polystream@.service``, the
systemd template that runs one daemon per instance instead.

Times are seconds (``trio.current_time()`` for durations). No state lives at
module level; every child is owned by one :class:`Supervisor`.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import attrs
import structlog
import trio

from polystream.config import ENV_PREFIX
from polystream.ops.service import render_unit
from polystream.ops.systemd import Notifier, run_watchdog

__all__ = [
    "BACKOFF_INITIAL",
    "BACKOFF_MAX",
    "BACKOFF_RESET",
    "MAX_WORKERS",
    "STOP_SIGNALS",
    "STOP_TIMEOUT",
    "TEMPLATE_PORT_PREFIX",
    "Supervisor",
    "Worker",
    "health_listens",
    "plan_workers",
    "render_template_unit",
    "restart_delay",
    "supervise",
    "worker_argv",
    "worker_cpus",
]

logger = structlog.get_logger(__name__)

MAX_WORKERS = 256
"""The most children ``--workers`` accepts."""

BACKOFF_INITIAL = 1.0
"""Seconds before the first restart of a child that exited."""

BACKOFF_MAX = 30.0
"""Most seconds between restarts of a child that keeps exiting."""

BACKOFF_RESET = 60.0
"""Seconds a child must have run for its next restart to wait only :data:`BACKOFF_INITIAL`."""

STOP_TIMEOUT = 30.0
"""Seconds the children get to exit after SIGTERM before SIGKILL (``TimeoutStopSec=30``)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""The signals that stop the supervisor and its children."""

TEMPLATE_PORT_PREFIX = "91"
"""``polystream@NN.service`` listens on ``127.0.0.1:91NN`` (two-digit instances)."""

_CLUSTER_VARIABLE = f"{ENV_PREFIX}FEED__CLUSTER"
_LISTEN_VARIABLE = f"{ENV_PREFIX}HEALTH__LISTEN"
_DSN_VARIABLE = f"{ENV_PREFIX}DATABASE__DSN"
# Read by the supervisor (Notifier.from_environ); a child must not notify systemd.
_SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@attrs.frozen
class Worker:
    """
    One child of a :class:`Supervisor` (a plain record: raises nothing).

    Attributes:
        index: 0-based worker number (``worker`` in the log lines).
        argv: the command, ``[python, -m, polystream, run, ...]``.
        env: its whole environment.
        health_listen: its ``health.listen`` (``host:port``).
        cpu: the CPU it is pinned to (``sched_setaffinity``), or None: the
            system places it.
    """

    index: int
    argv: tuple[str, ...]
    env: Mapping[str, str] = attrs.field(repr=False)
    health_listen: str
    cpu: int | None = None


def health_listens(listen: str, count: int) -> list[str]:
    """
    The ``health.listen`` of each of ``count`` workers: the host of ``listen``
    with its port + i for worker i; port 0 (any free port) stays 0 for all.

    Raises:
        ValueError: ``count`` is not from 1 to :data:`MAX_WORKERS`, ``listen`` is
            not ``host:port``, or the last port would pass 65535 (the message
            names ``health.listen`` and the highest base port that fits).
    """
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"expected from 1 to {MAX_WORKERS} workers, got {count}")
    host, sep, text = listen.rpartition(":")
    if not (sep and host and text.isdigit() and int(text) <= 65535):
        raise ValueError(f"health.listen {listen!r} is not host:port")
    port = int(text)
    if port == 0:
        return [f"{host}:0"] * count
    if port + count - 1 > 65535:
        raise ValueError(
            f"health.listen {listen} + {count - 1} passes port 65535: "
            f"set health.listen to a port up to {65536 - count}, or 0 (any free port)"
        )
    return [f"{host}:{port + i}" for i in range(count)]


def worker_argv(config_path: Path | None) -> tuple[str, ...]:
    """
    The command of every child: this interpreter, ``-m polystream run``, and
    ``--config config_path`` when given (relative paths: the children share the
    supervisor's working directory). ``--workers`` is never passed on. Raises nothing.
    """
    argv = [sys.executable, "-m", "polystream", "run"]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    return tuple(argv)


def plan_workers(
    count: int,
    listen: str,
    config_path: Path | None,
    environ: Mapping[str, str],
    *,
    dsn: str | None = None,
) -> list[Worker]:
    """
    The ``count`` children of ``polystream run --workers count``.

    Each runs :func:`worker_argv` with ``environ`` minus systemd's notification
    variables, plus ``POLYSTREAM_FEED__CLUSTER=true``, its
    ``POLYSTREAM_HEALTH__LISTEN`` (:func:`health_listens` of ``listen``) and, when
    ``dsn`` is given, ``POLYSTREAM_DATABASE__DSN=dsn`` (the embedded server the
    supervisor started, shared by the children).

    Raises:
        ValueError: as :func:`health_listens`.
    """
    base = {k: v for k, v in environ.items() if k not in _SYSTEMD_VARIABLES}
    base[_CLUSTER_VARIABLE] = "true"
    if dsn is not None:
        base[_DSN_VARIABLE] = dsn
    argv = worker_argv(config_path)
    cpus = worker_cpus(count)
    return [
        Worker(index, argv, {**base, _LISTEN_VARIABLE: address}, address, cpus[index])
        for index, address in enumerate(health_listens(listen, count))
    ]


def worker_cpus(count: int) -> list[int | None]:
    """
    The CPU of each of ``count`` workers: one each, in order, among the CPUs
    this process may use, when there are at least ``count`` of them (a worker
    per core: no two daemons trade places on one core, and each keeps its
    cache); else None for all (the system places them). Linux only
    (``os.sched_getaffinity``); None elsewhere.
    """
    if not hasattr(os, "sched_getaffinity"):
        return [None] * count
    cpus = sorted(os.sched_getaffinity(0))
    if count > len(cpus):
        return [None] * count
    return list(cpus[:count])


def _pin(worker: Worker, pid: int) -> None:
    """Pin the child to ``worker.cpu`` (if any); a refusal is logged, never raised."""
    if worker.cpu is None:
        return
    try:
        os.sched_setaffinity(pid, {worker.cpu})
    except OSError as exc:
        logger.warning("worker_not_pinned", worker=worker.index, cpu=worker.cpu, error=str(exc))


def restart_delay(
    previous: float | None,
    ran: float,
    *,
    initial: float = BACKOFF_INITIAL,
    maximum: float = BACKOFF_MAX,
    reset_after: float = BACKOFF_RESET,
) -> float:
    """
    Seconds to wait before starting again a child that exited after running
    ``ran`` seconds: ``initial`` the first time (``previous`` None) or when it ran
    ``reset_after`` seconds or more, else twice ``previous`` (the last wait), at
    most ``maximum``. All in seconds; raises nothing.
    """
    if previous is None or ran >= reset_after:
        return initial
    return min(previous * 2, maximum)


def _clean_stop(code: int) -> bool:
    """A child's exit at a stop is clean: 0, or the forwarded SIGTERM before it served."""
    return code in (0, -signal.SIGTERM)


@attrs.define(eq=False)
class Supervisor:
    """
    Keeps :attr:`workers` running until a stop signal, then stops them (module docstring).

    Attributes:
        workers: the children to run (:func:`plan_workers`).
        notifier: systemd notifications (default: none).
        stop_timeout: seconds between SIGTERM and SIGKILL at the stop.
        backoff_initial, backoff_max, backoff_reset: :func:`restart_delay`'s
            ``initial``, ``maximum`` and ``reset_after``, seconds.

    Construction starts nothing and raises nothing; :meth:`run` does the work.
    """

    workers: Sequence[Worker]
    notifier: Notifier = attrs.Factory(Notifier)
    stop_timeout: float = STOP_TIMEOUT
    backoff_initial: float = BACKOFF_INITIAL
    backoff_max: float = BACKOFF_MAX
    backoff_reset: float = BACKOFF_RESET
    _stopping: trio.Event = attrs.field(factory=trio.Event, init=False)
    _forced: trio.Event = attrs.field(factory=trio.Event, init=False)
    _running: dict[int, trio.Process] = attrs.field(factory=dict, init=False)
    _unclean: dict[int, int] = attrs.field(factory=dict, init=False)

    @property
    def pids(self) -> dict[int, int]:
        """The process id of each running child, by worker index (raises nothing)."""
        return {index: process.pid for index, process in self._running.items()}

    def stop(self) -> None:
        """
        Stop the children (SIGTERM now, SIGKILL after :attr:`stop_timeout` s);
        once stopping, send every running child SIGTERM again (a forced exit).
        What a stop signal does; raises nothing (a failed ``STOPPING=1`` is logged).
        """
        if self._stopping.is_set():
            self._forced.set()
            return
        self.notifier.stopping()
        self._stopping.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """
        Start every child, keep them running until a stop signal (or :meth:`stop`),
        then stop them and return the exit code: 0 when every child running at
        the stop exited cleanly, else 1. ``task_status`` is started once every
        child has been spawned. Must run in the main thread (signal handling).
        Cancelled, it stops the children first (SIGTERM, SIGKILL after
        :attr:`stop_timeout` s; shielded).

        Raises:
            ExceptionGroup: holding the OSError of a child that could not be
                spawned at the start (the ones already started are stopped first). A later restart that fails is logged
                and retried with the backoff.
        """
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._on_signals, signals)
                async with trio.open_nursery() as children:
                    for worker in self.workers:
                        await children.start(self._keep, worker)
                    logger.info("workers_started", workers=len(self.workers))
                    self.notifier.ready(self._status())
                    await outer.start(run_watchdog, self.notifier, lambda: True, self._status)
                    task_status.started()
                outer.cancel_scope.cancel()
        code = 1 if self._unclean else 0
        # JSON logs: string keys only.
        unclean = {str(index): status for index, status in sorted(self._unclean.items())}
        logger.info("workers_stopped", exit_code=code, unclean=unclean or None)
        return code

    def _status(self) -> str:
        if self._stopping.is_set():
            return f"stopping: {len(self._running)} of {len(self.workers)} workers running"
        return f"{len(self._running)} of {len(self.workers)} workers running"

    async def _on_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if self._stopping.is_set():
                logger.warning("shutdown_forced", signal=name, pids=sorted(self.pids.values()))
            else:
                logger.info("shutdown_requested", signal=name, pids=sorted(self.pids.values()))
            self.stop()

    async def _keep(
        self, worker: Worker, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Run ``worker`` again and again until the stop; started once first spawned."""
        delay: float | None = None
        starts = 0
        while not self._stopping.is_set():
            try:
                process = await trio.lowlevel.open_process(
                    worker.argv, env=dict(worker.env), start_new_session=True
                )
            except OSError as exc:
                if starts == 0:
                    raise
                delay = restart_delay(delay, 0.0, **self._backoff())
                logger.error(
                    "worker_spawn_failed", worker=worker.index, error=str(exc), restart_in_s=delay
                )
                await self._pause(delay)
                continue
            started = trio.current_time()
            starts += 1
            self._running[worker.index] = process
            _pin(worker, process.pid)
            logger.info(
                "worker_started",
                worker=worker.index,
                pid=process.pid,
                health=worker.health_listen,
                cpu=worker.cpu,
                restarts=starts - 1,
            )
            if starts == 1:
                task_status.started()
            try:
                code = await self._wait(worker, process)
            finally:
                del self._running[worker.index]
            ran = round(trio.current_time() - started, 3)
            exited: dict[str, object] = {
                "worker": worker.index,
                "pid": process.pid,
                "exit_code": code,
                "ran_s": ran,
            }
            if code < 0:
                exited["signal"] = signal.Signals(-code).name
            if self._stopping.is_set():
                if not _clean_stop(code):
                    self._unclean[worker.index] = code
                    logger.warning("worker_exited", **exited, stopping=True)
                else:
                    logger.info("worker_exited", **exited, stopping=True)
                return
            delay = restart_delay(delay, ran, **self._backoff())
            logger.warning("worker_exited", **exited, restart_in_s=delay)
            await self._pause(delay)
        if starts == 0:  # stopped before its first start
            task_status.started()

    def _backoff(self) -> dict[str, float]:
        return {
            "initial": self.backoff_initial,
            "maximum": self.backoff_max,
            "reset_after": self.backoff_reset,
        }

    async def _pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or until the stop."""
        with trio.move_on_after(seconds):
            await self._stopping.wait()

    async def _wait(self, worker: Worker, process: trio.Process) -> int:
        """
        The exit code of ``process`` (negative: the signal that ended it),
        stopping it when the stop comes; cancelled, it stops it first (shielded).
        """
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_when_asked, worker, process)
                code = await process.wait()
                nursery.cancel_scope.cancel()
            return code
        finally:
            if process.returncode is None:
                with trio.CancelScope(shield=True):
                    process.send_signal(signal.SIGTERM)
                    with trio.move_on_after(self.stop_timeout):
                        await process.wait()
                    if process.returncode is None:
                        process.kill()
                        await process.wait()

    async def _stop_when_asked(self, worker: Worker, process: trio.Process) -> None:
        """At the stop: SIGTERM (again if forced), SIGKILL after :attr:`stop_timeout` s."""
        await self._stopping.wait()
        process.send_signal(signal.SIGTERM)
        deadline = trio.current_time() + self.stop_timeout
        with trio.move_on_at(deadline):
            await self._forced.wait()
            process.send_signal(signal.SIGTERM)
        await trio.sleep_until(deadline)
        logger.warning(
            "worker_killed", worker=worker.index, pid=process.pid, after_s=self.stop_timeout
        )
        process.kill()


async def supervise(workers: Sequence[Worker], notifier: Notifier | None = None) -> int:
    """
    Run :class:`Supervisor` with the default timings (for ``trio.run``); returns
    its exit code.

    Raises:
        ExceptionGroup: as :meth:`Supervisor.run`.
    """
    supervisor = Supervisor(workers, notifier if notifier is not None else Notifier())
    return await supervisor.run()


# ------------------------------------------------------------------ the systemd template

_TEMPLATE_HEADER = (
    "# polystream@.service: one of several polystream daemons sharing one database",
    "# (feed.cluster; docs/cluster.md). The instance name is the worker number, two",
    "# digits: `systemctl enable --now polystream@01 polystream@02 polystream@03`.",
    "# Rendered by polystream.ops.workers.render_template_unit from the same settings",
    "# as polystream.service; local changes: `systemctl edit polystream@.service`.",
)


def render_template_unit(
    *,
    executable: Path,
    config_path: Path,
    user: str | None,
    env_path: Path | None = None,
    host: str = "127.0.0.1",
) -> str:
    """
    The text of ``polystream@.service``: :func:`polystream.ops.service.render_unit`'s
    system unit (same ``ExecStart=``, configuration, ``EnvironmentFile=`` and
    sandbox), plus, per instance ``%i`` (two digits, 00-99; another name fails at
    ``ExecStartPre=``): ``POLYSTREAM_FEED__CLUSTER=true``,
    ``POLYSTREAM_HEALTH__LISTEN=host:91%i`` (ports 9100-9199) and a runtime
    directory of its own (systemd removes it when that instance stops).

    Raises:
        ValueError: as ``render_unit`` (a relative path).
    """
    base = render_unit(
        executable=executable,
        config_path=config_path,
        user=user,
        user_mode=False,
        env_path=env_path,
    ).splitlines()
    instance = (
        "# Per instance: cluster mode, and /health + /metrics on port 91<instance>",
        "# (polystream@01 -> 9101, ..., polystream@99 -> 9199; 9100, @00, is often taken",
        "# by node_exporter). Do not set these two in the EnvironmentFile: its values",
        "# override Environment= and every instance would get the same port. Every",
        "# instance reads the same config, hence the same feed.cluster_partitions and",
        "# feed.cluster_lease_ttl, and must use a shared PostgreSQL (database.dsn set).",
        "ExecStartPre=/bin/sh -c 'case %i in [0-9][0-9]) ;; *) echo polystream@%i: the "
        "instance must be a two-digit worker number, 00-99 >&2; exit 1;; esac'",
        "Environment=POLYSTREAM_FEED__CLUSTER=true",
        f"Environment=POLYSTREAM_HEALTH__LISTEN={host}:{TEMPLATE_PORT_PREFIX}%i",
    )
    lines: list[str] = list(_TEMPLATE_HEADER)
    edits = {
        "Description": [
            "Description=polystream worker %i: Polymarket market channel to PostgreSQL"
        ],
        "RuntimeDirectory": ["RuntimeDirectory=polystream/%i"],
        "Environment=XDG_RUNTIME_DIR": ["Environment=XDG_RUNTIME_DIR=%t/polystream/%i"],
    }
    done: set[str] = set()
    header = True  # the single unit's comment lines: ours are above
    for line in base:
        header = header and line.startswith("#")
        if header:
            continue
        key = line.partition("=")[0]
        if line.startswith("Environment=XDG_RUNTIME_DIR="):
            key = "Environment=XDG_RUNTIME_DIR"
        if key in edits:
            lines += edits[key]
        elif key == "EnvironmentFile":
            lines += [line, *instance]
        else:
            lines.append(line)
            continue
        done.add(key)
    missing = {*edits, "EnvironmentFile"} - done
    if missing:  # render_unit changed shape: fail rather than render half a template
        raise ValueError(f"render_unit's output has no {', '.join(sorted(missing))}")
    return "\n".join(lines) + "\n"

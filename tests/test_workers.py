"""
``polystream run --workers N`` (polystream.ops.workers): N real daemons as
supervised children, each in cluster mode on its own /health port; one killed
is started again on the same port; SIGTERM stops them all and exits 0. And
the ``polystream@.service`` template: the file in deploy/ is the rendering,
and systemd-analyze accepts it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil  # type: ignore[import-untyped]
import pytest
import structlog
import trio
from cli_process import clean_env, free_port, run_polystream
from test_service import CONFIG, EXE, settings

from polystream.ops.workers import (
    Supervisor,
    Worker,
    health_listens,
    plan_workers,
    render_template_unit,
    restart_delay,
    worker_cpus,
)

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------ plans, backoff


def test_health_ports_are_the_configured_one_plus_the_worker_number() -> None:
    assert health_listens("127.0.0.1:9108", 3) == [
        "127.0.0.1:9108",
        "127.0.0.1:9109",
        "127.0.0.1:9110",
    ]
    assert health_listens("[::1]:9108", 2) == ["[::1]:9108", "[::1]:9109"]
    assert health_listens("0.0.0.0:0", 2) == ["0.0.0.0:0", "0.0.0.0:0"]
    assert health_listens("127.0.0.1:65534", 2)[-1] == "127.0.0.1:65535"
    with pytest.raises(ValueError, match="up to 65534"):
        health_listens("127.0.0.1:65535", 2)
    for count in (0, 257):
        with pytest.raises(ValueError, match="from 1 to 256"):
            health_listens("127.0.0.1:9108", count)


def test_each_worker_runs_polystream_run_in_cluster_mode_on_its_port(tmp_path: Path) -> None:
    environ = {"PATH": "/bin", "NOTIFY_SOCKET": "/run/x", "POLYSTREAM_FEED__CLUSTER": "false"}
    config = tmp_path / "config.toml"
    workers = plan_workers(2, "127.0.0.1:7000", config, environ, dsn="postgresql:///x")
    assert [w.index for w in workers] == [0, 1]
    for worker in workers:
        assert worker.argv == (sys.executable, "-m", "polystream", "run", "--config", str(config))
        assert worker.env["POLYSTREAM_FEED__CLUSTER"] == "true"
        assert worker.env["POLYSTREAM_DATABASE__DSN"] == "postgresql:///x"
        assert worker.env["PATH"] == "/bin"
        assert "NOTIFY_SOCKET" not in worker.env  # only the supervisor talks to systemd
        assert worker.env["POLYSTREAM_HEALTH__LISTEN"] == worker.health_listen
    assert [w.health_listen for w in workers] == ["127.0.0.1:7000", "127.0.0.1:7001"]
    (alone,) = plan_workers(1, "h:1", None, {})
    assert alone.argv[-1] == "run" and "POLYSTREAM_DATABASE__DSN" not in alone.env


def test_workers_get_a_cpu_each_when_there_are_enough() -> None:
    available = sorted(os.sched_getaffinity(0))
    assert worker_cpus(len(available)) == available
    assert worker_cpus(1) == available[:1]
    assert worker_cpus(len(available) + 1) == [None] * (len(available) + 1)  # the system places


def test_restart_backoff_doubles_to_30_s_and_resets_after_60_s_of_running() -> None:
    delays, delay = [], None
    for _ in range(8):
        delay = restart_delay(delay, ran=2.0)
        delays.append(delay)
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert restart_delay(30.0, ran=60.0) == 1.0
    assert restart_delay(30.0, ran=59.9) == 30.0


# ------------------------------------------------------------------ the supervisor, in process


def _worker(index: int, code: str) -> Worker:
    return Worker(index, (sys.executable, "-c", code), dict(os.environ), f"127.0.0.1:{index}")


async def _until(check: Any, timeout: float, every: float = 0.05) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(every)


def _started(nursery: trio.Nursery, supervisor: Supervisor) -> list[int]:
    """Run ``supervisor`` in ``nursery``; the list receives its exit status."""
    result: list[int] = []

    async def run() -> None:
        result.append(await supervisor.run())

    nursery.start_soon(run)
    return result


async def test_a_child_that_exits_is_started_again_after_the_backoff(tmp_path: Path) -> None:
    starts = tmp_path / "starts"
    code = f"open({str(starts)!r}, 'a').write('x'); raise SystemExit(3)"
    supervisor = Supervisor([_worker(0, code)], backoff_initial=0.05, backoff_max=0.4)
    with structlog.testing.capture_logs() as logs, trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            result = _started(nursery, supervisor)
            # Stop inside the 0.4 s backoff after the 5th exit: no child is running then
            # (stopping right after the 5th start could catch that child exiting with 3).
            await _until(lambda: sum(e["event"] == "worker_exited" for e in logs) >= 5, 15)
            supervisor.stop()
    exits = [e for e in logs if e["event"] == "worker_exited" and "restart_in_s" in e]
    assert len(starts.read_text()) == 5
    assert [e["exit_code"] for e in exits[:5]] == [3, 3, 3, 3, 3]
    assert [e["restart_in_s"] for e in exits[:5]] == [0.05, 0.1, 0.2, 0.4, 0.4]
    assert result == [0]  # no child was running at the stop


async def test_a_child_that_ignores_sigterm_is_killed_after_the_stop_timeout(
    tmp_path: Path,
) -> None:
    ready = [tmp_path / "ignores", tmp_path / "exits"]
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"open({str(ready[0])!r}, 'w').close(); time.sleep(60)"
    )
    clean = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(0)); "
        f"open({str(ready[1])!r}, 'w').close(); time.sleep(60)"
    )
    supervisor = Supervisor([_worker(0, code), _worker(1, clean)], stop_timeout=0.5)
    with structlog.testing.capture_logs() as logs, trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            result = _started(nursery, supervisor)
            await _until(lambda: all(path.exists() for path in ready), 15)  # handlers set
            pids = supervisor.pids
            supervisor.stop()
    assert result == [1]
    (killed,) = [e for e in logs if e["event"] == "worker_killed"]
    assert killed["worker"] == 0 and killed["pid"] == pids[0]
    stopped = {e["worker"]: e for e in logs if e["event"] == "worker_exited"}
    assert stopped[0]["signal"] == "SIGKILL" and stopped[1]["exit_code"] == 0
    assert not any(psutil.pid_exists(pid) for pid in pids.values())


# ------------------------------------------------------------------ real daemons


def _two_free_ports() -> int:
    """A port P on 127.0.0.1 with P and P + 1 free a moment ago."""
    for _ in range(50):
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port + 1))
            return port
    raise AssertionError("no two consecutive free ports")


def _closed_feed_url() -> str:
    """A market channel URL where nothing listens: the feed reconnects, the daemon runs."""
    return f"ws://127.0.0.1:{free_port()}/ws/market"


async def _health(http: httpx.AsyncClient, port: int) -> dict[str, Any] | None:
    try:
        document: dict[str, Any] = (await http.get(f"http://127.0.0.1:{port}/health")).json()
    except (httpx.TransportError, ValueError):
        return None
    return document


def _member_pid(document: dict[str, Any] | None) -> int | None:
    """The pid in the /health cluster member id (``host:pid:hex``), None without one."""
    if document is None or document.get("cluster") is None:
        return None
    return int(document["cluster"]["member"].split(":")[-2])


async def _pids_when_serving(http: httpx.AsyncClient, base: int, count: int) -> list[int]:
    """The pid answering each worker's /health, with a cluster, once all answer."""
    while True:
        pids = [_member_pid(await _health(http, base + i)) for i in range(count)]
        if None not in pids:
            return [pid for pid in pids if pid is not None]
        await trio.sleep(0.1)


@contextlib.asynccontextmanager
async def _supervisor(
    db_dsn: str, log: Path, base: int, **variables: str
) -> AsyncIterator[trio.Process]:
    """
    ``python -m polystream run --workers 2``, /health on ``base`` and ``base + 1``,
    ``variables`` added to its environment; on the way out anything still
    running (it and its children) is killed.
    """
    env = clean_env(
        POLYSTREAM_DATABASE__DSN=db_dsn,
        POLYSTREAM_FEED__URL=_closed_feed_url(),
        POLYSTREAM_HEALTH__LISTEN=f"127.0.0.1:{base}",
        POLYSTREAM_FEED__CLUSTER_LEASE_TTL="1.5",
        **variables,
    )
    with log.open("ab") as out:  # O_APPEND: the supervisor's and the children's lines whole
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "polystream", "run", "--workers", "2"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    seen: set[int] = set()
    try:
        yield process
    finally:
        with trio.CancelScope(shield=True):
            with contextlib.suppress(psutil.Error):
                seen |= {child.pid for child in psutil.Process(process.pid).children()}
            if process.returncode is None:
                process.kill()
                await process.wait()
            for pid in seen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """
    A systemd notification socket (abstract namespace) that records each
    sender's pid: yields ``($NOTIFY_SOCKET, socket)`` for :func:`_notifications`.
    """
    name = f"polystream-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
        yield "@" + name, sock


def _notifications(sock: socket.socket) -> list[tuple[int, str]]:
    """The datagrams received so far, as (sender pid, text)."""
    received: list[tuple[int, str]] = []
    while True:
        try:
            data, ancillary, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except BlockingIOError:
            return received
        pid = next(
            struct.unpack("3i", cdata)[0]
            for level, kind, cdata in ancillary
            if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS)
        )
        received.append((pid, data.decode()))


def _events(log: Path, name: str) -> list[dict[str, Any]]:
    """The ``name`` records of the shared log (a line still being written is not one yet)."""
    lines = []
    for line in log.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            lines.append(orjson.loads(line))
    return [line for line in lines if isinstance(line, dict) and line.get("event") == name]


async def test_two_workers_serve_in_cluster_mode_and_stop_cleanly_on_sigterm(
    db_dsn: str, tmp_path: Path
) -> None:
    log = tmp_path / "workers.log"
    base = _two_free_ports()
    with _notify_socket() as (notify_socket, notifications), trio.fail_after(30):
        async with (
            _supervisor(db_dsn, log, base, NOTIFY_SOCKET=notify_socket) as supervisor,
            httpx.AsyncClient() as http,
        ):
            pids = await _pids_when_serving(http, base, 2)
            children = {child.pid for child in psutil.Process(supervisor.pid).children()}
            assert set(pids) == children and len(children) == 2
            cpus = worker_cpus(2)
            if cpus[0] is not None:  # one core each (Linux, 2 CPUs or more)
                pinned = [os.sched_getaffinity(pid) for pid in pids]
                assert all(len(p) == 1 for p in pinned) and sorted(min(p) for p in pinned) == cpus
            for i in range(2):
                document = await _health(http, base + i)
                assert document is not None and document["cluster"] is not None
            supervisor.send_signal(signal.SIGTERM)
            code = await supervisor.wait()
        # Only the supervisor notifies systemd: READY=1 once its children run, STOPPING=1.
        sent = _notifications(notifications)
    assert code == 0, log.read_text()[-3000:]
    assert not any(psutil.pid_exists(pid) for pid in pids)
    assert {pid for pid, _ in sent} == {supervisor.pid}, sent
    assert any(text.startswith("READY=1\nSTATUS=2 of 2 workers running") for _, text in sent)
    assert any(text.startswith("STOPPING=1") for _, text in sent), sent
    started = _events(log, "worker_started")
    assert sorted((e["worker"], e["pid"]) for e in started) == sorted(enumerate(pids))
    exited = _events(log, "worker_exited")
    assert sorted(e["pid"] for e in exited) == sorted(pids)
    assert all(e["exit_code"] == 0 and e["stopping"] for e in exited)
    assert len(_events(log, "cluster_left")) == 2  # each handed its partitions over


async def test_a_killed_worker_is_started_again_on_its_port(db_dsn: str, tmp_path: Path) -> None:
    log = tmp_path / "workers.log"
    base = _two_free_ports()
    with trio.fail_after(30):
        async with _supervisor(db_dsn, log, base) as supervisor, httpx.AsyncClient() as http:
            first, victim = await _pids_when_serving(http, base, 2)
            os.kill(victim, signal.SIGKILL)
            with trio.fail_after(10):
                while _member_pid(await _health(http, base + 1)) in (None, victim):
                    await trio.sleep(0.1)
            replacement = _member_pid(await _health(http, base + 1))
            assert replacement in {c.pid for c in psutil.Process(supervisor.pid).children()}
            assert _member_pid(await _health(http, base)) == first
            supervisor.send_signal(signal.SIGTERM)
            code = await supervisor.wait()
    assert code == 0, log.read_text()[-3000:]
    (crash,) = [e for e in _events(log, "worker_exited") if not e.get("stopping")]
    assert crash["worker"] == 1 and crash["pid"] == victim
    assert crash["exit_code"] == -signal.SIGKILL and crash["restart_in_s"] == 1.0
    assert [e["pid"] for e in _events(log, "worker_started") if e["worker"] == 1] == [
        victim,
        replacement,
    ]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "polystream: --workers 0: expected an integer from 1 to 256"),
        ("257", "polystream: --workers 257: expected an integer from 1 to 256"),
        ("two", "Invalid value for '--workers'"),
    ],
)
def test_a_bad_worker_count_is_refused_naming_the_flag(
    tmp_path: Path, value: str, message: str
) -> None:
    env = clean_env(POLYSTREAM_STATE__DIR=str(tmp_path / "state"))
    result = run_polystream("run", "--workers", value, env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "state").exists()  # refused before anything started


def test_health_ports_past_65535_are_refused_before_the_database(tmp_path: Path) -> None:
    env = clean_env(
        POLYSTREAM_HEALTH__LISTEN="127.0.0.1:65535",
        POLYSTREAM_STATE__DIR=str(tmp_path / "state"),
    )
    result = run_polystream("run", "--workers", "2", env=env, cwd=tmp_path)
    assert result.returncode == 2
    assert "--workers 2: health.listen 127.0.0.1:65535" in result.stderr, result.stderr
    assert not (tmp_path / "state").exists()


# ------------------------------------------------------------------ the systemd template


def test_deploy_template_is_the_rendering() -> None:
    rendered = render_template_unit(executable=EXE, config_path=CONFIG, user="polystream")
    assert (REPO / "deploy" / "polystream@.service").read_text() == rendered


def test_template_shares_the_single_units_command_config_and_env_file() -> None:
    template = settings(render_template_unit(executable=EXE, config_path=CONFIG, user="p"))
    single = settings((REPO / "deploy" / "polystream.service").read_text())
    for key in ("ExecStart", "EnvironmentFile", "Type", "KillMode", "WatchdogSec"):
        assert template[key] == single[key], key
    assert "POLYSTREAM_FEED__CLUSTER=true" in template["Environment"]
    assert "POLYSTREAM_HEALTH__LISTEN=127.0.0.1:91%i" in template["Environment"]
    assert template["RuntimeDirectory"] == ["polystream/%i"]  # one stop removes its own only


SYSTEMD_ANALYZE = shutil.which("systemd-analyze")


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_an_instance(tmp_path: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    exe = tmp_path / "bin" / "polystream"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    config = tmp_path / "etc" / "config.toml"
    (units / "polystream@.service").write_text(
        render_template_unit(executable=exe, config_path=config, user="polystream")
    )
    (units / "polystream@01.service").symlink_to("polystream@.service")
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(units / "polystream@01.service")],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stdout.strip(), done.stderr.strip()) == (0, "", "")


@pytest.mark.parametrize("instance", ["01", "1", "123", "ab"])
def test_the_template_refuses_an_instance_that_is_not_two_digits(instance: str) -> None:
    (check,) = settings(render_template_unit(executable=EXE, config_path=CONFIG, user=None))[
        "ExecStartPre"
    ]
    assert check.startswith("/bin/sh -c '") and check.endswith("'")
    script = check.removeprefix("/bin/sh -c '").removesuffix("'").replace("%i", instance)
    done = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True, check=False)
    assert done.returncode == (0 if instance == "01" else 1)
    assert ("two-digit" in done.stderr) == (instance != "01")

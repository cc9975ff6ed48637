"""
The command line's surface, each as a real ``python -m polystream`` subprocess
(issue "The operator's experience", items 4 to 8):

* 4: a zero, negative or NaN ``--watch`` / ``--speed`` exits 2 at once, before
  anything starts (no PostgreSQL, no positions, no listening socket);
* 5: a port outside 0..65535 (``replay --port``, ``--rest-port``) exits 2 at once;
* 6: a ``database.dsn`` that does not parse (TOML, ``POLYSTREAM_DATABASE__DSN``,
  ``demo --database``) is one line with its password masked, exit 2;
* 7: help reads cleanly at 80 columns for every command and subcommand, there is
  ``--version``, and every command takes ``--config`` (``logs``, ``service ...``);
* 8: exit codes: 2 for bad configuration or usage (a bad DSN, ``--fault bogus``,
  ``status --url nonsense``, an unknown option), and ``replay`` on SIGTERM logs
  ``replay_stopped`` and exits 0.

Every failure is one line on stderr, ``polystream: ...``, and never a traceback.
Subprocesses run from a scratch directory, not the checkout, so that
``PYTHONPATH=<other tree>`` runs that tree's code under the same tests.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
import typer
from cli_process import clean_env, free_port, run_polystream

from polystream.cli import app
from polystream.store.db import create_database, drop_database, dsn_with_dbname

ROOT = Path(__file__).resolve().parent.parent
CAPTURE = ROOT / "tests" / "data" / "replay" / "adriancova-2026-09-30.jsonl"
PASSWORD = "hunter2-Xq9"  # must never be printed
# Seconds: a guard against a hang (the fixed code answers within ~1 s), not a timing assertion.
HANG_GUARD = 15.0


# ------------------------------------------------------------------ helpers


@pytest.fixture
def scratch() -> Iterator[Path]:
    """A working directory outside the checkout (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="ps_cli_") as path:
        yield Path(path)


def _env(scratch: Path, **settings: str) -> dict[str, str]:
    """
    A clean environment (:func:`cli_process.clean_env`) with the state
    directory and the health port in the scratch space (nothing that a daemon
    of someone else's answers on), then ``settings``.
    """
    defaults = {
        "POLYSTREAM_STATE__DIR": str(scratch / "state"),
        "POLYSTREAM_HEALTH__LISTEN": f"127.0.0.1:{free_port()}",
    }
    return clean_env(**(defaults | settings))


def _polystream(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = HANG_GUARD
) -> subprocess.CompletedProcess[str]:
    return run_polystream(*args, env=env, cwd=cwd, timeout=timeout)


def _one_line_failure(result: subprocess.CompletedProcess[str], code: int) -> str:
    """Assert exit ``code`` and exactly one ``polystream: ...`` line on stderr; return it."""
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("polystream: "), lines[0]
    assert result.returncode == code, (result.returncode, output)
    return lines[0]


@pytest.fixture
def empty_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A fresh database without a single table, dropped afterwards."""
    name = f"ps_cli_{uuid.uuid4().hex[:12]}"
    create_database(pg_admin_dsn, name)
    try:
        yield dsn_with_dbname(pg_admin_dsn, name)
    finally:
        drop_database(pg_admin_dsn, name)


def _tables(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return [row[0] for row in rows]


def _commands() -> list[tuple[list[str], Any]]:
    """Every command of the app as (argv path, click command), groups included."""
    found: list[tuple[list[str], Any]] = []

    def walk(command: Any, path: list[str]) -> None:
        found.append((path, command))
        for name, sub in sorted(getattr(command, "commands", {}).items()):
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return found


def _is_group(command: Any) -> bool:
    return hasattr(command, "commands")


# ------------------------------------------------------------------ 4: intervals and speeds


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["status", "--watch", "0"], "polystream: --watch 0: expected a number > 0"),
        (["status", "--watch", "-1"], "polystream: --watch -1: expected a number > 0"),
        (["status", "--watch", "nan"], "polystream: --watch nan: expected a number > 0"),
        (["demo", "--speed", "-1"], "polystream: --speed -1: expected a number > 0"),
    ],
    ids=["watch-0", "watch-negative", "watch-nan", "demo-speed-negative"],
)
def test_item4_zero_or_negative_interval_exits_2_at_once(
    args: list[str], line: str, scratch: Path
) -> None:
    """``status --watch 0`` used to spin at 100 % CPU, ``-1`` to end in a traceback."""
    result = _polystream(*args, env=_env(scratch), cwd=scratch)
    assert _one_line_failure(result, 2) == line
    assert "replay_listening" not in result.stdout
    assert not (scratch / "state").exists(), "the embedded PostgreSQL was started"


@pytest.mark.parametrize("how", ["database.dsn", "--database"])
def test_item4_demo_speed_0_starts_nothing(how: str, empty_dsn: str, scratch: Path) -> None:
    """
    ``demo --speed 0`` used to start PostgreSQL and create positions, then fail
    with a traceback: now the flag is refused before any of it, whichever
    database the demo was given.
    """
    if how == "--database":
        env = _env(scratch)
        args = ["demo", "--speed", "0", "--database", empty_dsn]
    else:
        env = _env(scratch, POLYSTREAM_DATABASE__DSN=empty_dsn)
        args = ["demo", "--speed", "0"]
    result = _polystream(*args, env=env, cwd=scratch, timeout=60)
    assert _tables(empty_dsn) == [], "the demo wrote into the database"
    assert not (scratch / "state").exists(), "the embedded PostgreSQL was started"
    assert _one_line_failure(result, 2) == "polystream: --speed 0: expected a number > 0"


# ------------------------------------------------------------------ 5: ports


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--port", "99999"), ("--port", "-1"), ("--rest-port", "70000")],
)
def test_item5_port_out_of_range_exits_2_at_once(flag: str, value: str, scratch: Path) -> None:
    """``replay --port 99999`` used to listen on some random port (and never return)."""
    args = ["replay", str(CAPTURE), "--port", "0", flag, value]
    result = _polystream(*args, env=_env(scratch), cwd=scratch)
    line = _one_line_failure(result, 2)
    assert (
        line == f"polystream: {flag} {value}: expected a port from 0 to 65535 (0 = any free port)"
    )
    assert "replay_listening" not in result.stdout


# ------------------------------------------------------------------ 6: a DSN that does not parse


def _toml_list_dsn(scratch: Path, password: str = PASSWORD) -> Path:
    """A configuration whose database.dsn is a TOML list (a string was meant)."""
    path = scratch / "list-dsn.toml"
    path.write_text(f'[database]\ndsn = ["postgresql://u:{password}@127.0.0.1/db"]\n')
    return path


@pytest.mark.parametrize(
    ("args", "dsn", "origin"),
    [
        (["db", "migrate"], '["postgresql://u:PW@127.0.0.1/db"]', "env"),
        (["run"], "postgresql://u:PW@127.0.0.1:notaport/db", "env"),
        (["status"], "host=127.0.0.1 password='PW and spaces", "env"),
        (["markets", "import", "/dev/null"], "postgresql://u:PW and spaces@127.0.0.1/db", "env"),
        (["db", "migrate"], None, "toml"),
        (["status"], None, "toml"),
        (["logs", "/dev/null"], None, "toml"),
        (["service", "show"], None, "toml"),
        (["logs", "/dev/null"], None, "toml-spaces"),
        (["service", "show"], None, "toml-spaces"),
    ],
    ids=[
        "env-list-db-migrate",
        "env-bad-port-run",
        "env-unterminated-quote-status",
        "env-spaces-markets-import",
        "toml-list-db-migrate",
        "toml-list-status",
        "toml-list-logs",
        "toml-list-service-show",
        "toml-list-spaces-logs",
        "toml-list-spaces-service-show",
    ],
)
def test_item6_unparsable_dsn_is_masked_one_line_exit_2(
    args: list[str], dsn: str | None, origin: str, scratch: Path
) -> None:
    """The DSN is named, where it came from, and its password is never printed."""
    if origin == "env":
        assert dsn is not None
        env = _env(scratch, POLYSTREAM_DATABASE__DSN=dsn.replace("PW", PASSWORD))
        where = "(from $POLYSTREAM_DATABASE__DSN)"
    else:
        spaces = origin == "toml-spaces"  # a password redact() alone cannot see
        config = _toml_list_dsn(scratch, f"{PASSWORD} and spaces" if spaces else PASSWORD)
        env = _env(scratch)
        args = [*args, "--config", str(config)]
        where = f"(from {config})"
    result = _polystream(*args, env=env, cwd=scratch)
    output = result.stdout + result.stderr
    assert PASSWORD.split("-")[0] not in output, output
    line = _one_line_failure(result, 2)
    assert line.startswith("polystream: configuration error: database.dsn = "), line
    assert where in line and "***" in line, line
    assert line.endswith("expected a libpq DSN or postgresql:// URI, or empty"), line


def test_item6_demo_database_that_does_not_parse_is_masked(scratch: Path) -> None:
    dsn = f"postgresql://u:{PASSWORD}@127.0.0.1:99999/db"
    result = _polystream("demo", "--database", dsn, env=_env(scratch), cwd=scratch)
    assert PASSWORD not in result.stdout + result.stderr
    assert _one_line_failure(result, 2) == (
        "polystream: --database 'postgresql://u:***@127.0.0.1:99999/db': expected a libpq "
        "DSN or postgresql:// URI (port '99999' is not a number from 1 to 65535)"
    )
    assert not (scratch / "state").exists()


# ------------------------------------------------------------------ 7: help, --version, --config

TYPE_LABEL = re.compile(r"<[A-Za-z]+(?:\[[^\]]*\])?>")  # typer's <bool>, <path>, <list[Path]>


def test_item7_help_reads_cleanly_at_80_columns(scratch: Path) -> None:
    """
    For every command and group: no line over 80 columns, no type labels
    (``<bool>``), no ``{paths}``, no reST backticks, no cut option names, no
    cut command summaries, ``polystream`` (not ``python -m polystream``) in usage.
    """
    env = _env(scratch, COLUMNS="80", TERM="dumb")
    commands = _commands()
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "polystream", *path, "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=scratch,
        )
        for path, _command in commands
    ]
    problems: list[str] = []
    for (path, command), process in zip(commands, processes, strict=True):
        out, err = process.communicate(timeout=60)
        name = " ".join(["polystream", *path])
        if process.returncode != 0 or err:
            problems.append(f"{name} --help: exit {process.returncode}, stderr {err!r}")
            continue
        if not out.startswith(f"Usage: {name} "):
            problems.append(f"{name} --help: usage line {out.splitlines()[:1]}")
        for line in out.splitlines():
            if len(line) > 80:
                problems.append(f"{name} --help: {len(line)} columns: {line!r}")
            problems += [f"{name} --help: type label {label}" for label in TYPE_LABEL.findall(line)]
            if "{" in line or "`" in line or "\u2026" in line:
                problems.append(f"{name} --help: {line!r}")
        if _is_group(command):
            listing = out.partition("\nCommands:\n")[2].splitlines()
            problems += [
                f"{name} --help: cut summary {row!r}" for row in listing if row.endswith("...")
            ]
        for param in command.params:
            if param.param_type_name != "option" or param.hidden:
                continue
            for opt in [*param.opts, *param.secondary_opts]:
                if not re.search(rf"(?<![\w-]){re.escape(opt)}(?![\w-])", out):
                    problems.append(f"{name} --help: option {opt} missing or cut")
    assert problems == [], "\n".join(problems)
    names = {" ".join(path) for path, _command in commands}
    assert {"db migrate", "markets import", "service install", "service show", "logs"} <= names


def test_item7_version(scratch: Path) -> None:
    result = _polystream("--version", env=_env(scratch), cwd=scratch)
    assert (result.returncode, result.stderr) == (0, "")
    assert result.stdout == f"polystream {metadata.version('polystream')}\n"


def test_item7_every_command_takes_config(scratch: Path) -> None:
    """The README: every command takes --config PATH; logs and service used to refuse it."""
    missing = [
        " ".join(path)
        for path, command in _commands()
        if not _is_group(command) and not any("--config" in p.opts for p in command.params)
    ]
    assert missing == []
    config = scratch / "polystream.toml"
    config.write_text('[log]\nlevel = "warning"\n')
    env = _env(scratch)
    log = scratch / "daemon.log"
    log.write_bytes(orjson.dumps({"event": "feed_connected", "level": "warning"}) + b"\n")

    result = _polystream("logs", "--config", str(config), "--help", env=env, cwd=scratch)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    result = _polystream("logs", "--config", str(config), str(log), env=env, cwd=scratch)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert "feed_connected" in result.stdout

    unit_dir, config_dir = scratch / "units", scratch / "etc"
    result = _polystream(
        "service", "install", "--config", str(config), "--unit-dir", str(unit_dir),
        "--config-dir", str(config_dir), "--executable", sys.executable,
        env=env, cwd=scratch,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    unit = (unit_dir / "polystream.service").read_text()
    assert f"--config {config}" in unit, unit
    assert not (config_dir / "config.toml").exists()  # the given file is used, none written

    result = _polystream("service", "show", "--config", str(config), env=env, cwd=scratch)
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    assert f"--config {config}" in result.stdout


# ------------------------------------------------------------------ 8: exit codes


@pytest.mark.parametrize(
    ("args", "settings", "expected"),
    [
        (
            ["db", "migrate"],
            {"POLYSTREAM_DATABASE__DSN": "host=127.0.0.1 port=99999 dbname=x"},
            "polystream: configuration error: database.dsn = 'host=127.0.0.1 port=99999 "
            "dbname=x' (from $POLYSTREAM_DATABASE__DSN): port '99999' is not a number from 1 "
            "to 65535; expected a libpq DSN or postgresql:// URI, or empty",
        ),
        (
            ["replay", str(CAPTURE), "--port", "0", "--fault", "bogus"],
            {},
            "polystream: --fault 'bogus': action must be one of drop-tcp, drop-reset, "
            "drop-close, half-open, silence, stall, garbage, pause",
        ),
        (
            ["replay", str(CAPTURE), "--port", "0", "--fault", "drop-tcp:after=x"],
            {},
            "polystream: --fault 'drop-tcp:after=x': ",
        ),
        (
            ["status", "--url", "nonsense"],
            {},
            "polystream: --url 'nonsense': expected an http:// or https:// URL, "
            "e.g. http://127.0.0.1:9108/health",
        ),
        (
            ["status", "--watch", "soon"],
            {},
            "polystream: Invalid value for '--watch': ",
        ),
        (
            ["status", "--bogus"],
            {},
            "polystream: No such option: --bogus; try 'polystream status --help'",
        ),
        (["replay"], {}, "polystream: Missing argument 'PATH'; try 'polystream replay --help'"),
    ],
    ids=[
        "bad-dsn",
        "fault-bogus",
        "fault-bad-count",
        "status-url-nonsense",
        "wrong-type",
        "unknown-option",
        "missing-argument",
    ],
)
def test_item8_bad_configuration_or_usage_exits_2(
    args: list[str], settings: dict[str, str], expected: str, scratch: Path
) -> None:
    result = _polystream(*args, env=_env(scratch, **settings), cwd=scratch)
    line = _one_line_failure(result, 2)
    assert line.startswith(expected), line
    assert "replay_listening" not in result.stdout


def test_item8_replay_on_sigterm_logs_replay_stopped_and_exits_0(scratch: Path) -> None:
    """It used to die of the signal (exit 143) without a log line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "polystream", "replay", str(CAPTURE), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(scratch),
        cwd=scratch,
    )
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in process.stdout or ():
            lines.put(line)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "replay did not log replay_listening"
            try:
                line = lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                assert process.poll() is None, "replay exited before listening"
                continue
            if orjson.loads(line)["event"] == "replay_listening":
                break
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=HANG_GUARD)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout=HANG_GUARD)
    assert process.stderr is not None
    with process.stderr:
        stderr = process.stderr.read()
    after = [orjson.loads(lines.get())["event"] for _ in range(lines.qsize())]
    assert "Traceback" not in stderr, stderr
    assert code == 0, (code, stderr)
    assert after == ["replay_stopped"], after

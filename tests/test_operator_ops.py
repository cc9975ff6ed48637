"""
What an operator meets, each as a real ``python -m polystream`` subprocess
against a real PostgreSQL, real HTTP (``/metrics``, a local fake Gamma) and the
replay server (issue "The operator's experience", items 3, 9, 10, 11, 12):

* 3: the demo never writes into a database that holds other data unless told;
* 9: ``markets import``: an unmigrated database, an empty file, a market
  without ``clobTokenIds``, Gamma failures: one line each, naming what matters;
* 10: ``service install`` writes a complete configuration, warns about paths
  the unit's sandbox hides, and ``service`` commands take ``--config``;
* 11: ``/metrics`` has ``process_*``, ``python_info``, ``polystream_build_info``
  and every known label at 0 from the start;
* 12: the demo prints every market live (or says why not), explains its frame
  count, and prints P&L with two decimals; the README imports shipped files only.

Subprocesses run from a scratch directory, not the checkout, so that
``PYTHONPATH=<other tree>`` runs that tree's code under the same tests.
"""

from __future__ import annotations

import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import psycopg
import pytest
import trio
from cli_process import clean_env, free_port, run_polystream
from prometheus_client.parser import text_string_to_metric_families
from test_gamma import FakeGamma, _real_markets

import polystream
from polystream.app import LINKS
from polystream.config import Config, load_config, schema_keys
from polystream.errors import BAD_INPUT_KINDS
from polystream.feed.protocol import KNOWN_EVENT_TYPES
from polystream.monitor.engine import DEFERRAL_REASONS
from polystream.monitor.rules import DECISION_KINDS
from polystream.ops.health import serve_asgi
from polystream.store.db import create_database, drop_database, dsn_with_dbname, load_migrations
from polystream.store.markets import import_markets_file

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_MARKETS = ROOT / "examples" / "updown-2025-12-11.markets.json"
DEMO_SPEED = "200"  # the 15-minute capture in 4.5 s
MIGRATIONS = len(load_migrations())
SCHEMA_LINE = (
    f"polystream: database schema is not up to date ({MIGRATIONS} migration(s) pending): "
    "run `polystream db migrate` first"
)


# ------------------------------------------------------------------ helpers


def _polystream(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return run_polystream(*args, env=env, cwd=cwd, timeout=timeout)


async def _polystream_async(
    *args: str, env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[bytes]:
    """The same, under trio (a fake server runs in this process meanwhile)."""
    return await trio.run_process(
        [sys.executable, "-m", "polystream", *args],
        capture_stdout=True,
        capture_stderr=True,
        env=env,
        cwd=cwd,
        check=False,
    )


def _plain(stdout: str) -> list[str]:
    """stdout without JSON log lines."""
    return [line for line in stdout.splitlines() if not line.startswith("{")]


@pytest.fixture
def empty_dsn(pg_admin_dsn: str) -> Iterator[str]:
    """A fresh database, not migrated, dropped afterwards."""
    name = f"ps_ops_{uuid.uuid4().hex[:12]}"
    create_database(pg_admin_dsn, name)
    try:
        yield dsn_with_dbname(pg_admin_dsn, name)
    finally:
        drop_database(pg_admin_dsn, name)


def _rows(dsn: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(query).fetchall()


def _market(market_id: str) -> dict[str, Any]:
    markets: list[dict[str, Any]] = orjson.loads(EXAMPLE_MARKETS.read_bytes())
    return next(m for m in markets if m["id"] == market_id)


# ------------------------------------------------------------------ 3: the demo's database


@pytest.fixture
def trading_dsn(db_dsn: str) -> str:
    """A team's database: a market of its own and a real position the demo must not price."""
    with psycopg.connect(db_dsn) as conn:
        conn.execute(
            "INSERT INTO markets (id, question, slug, outcomes, clob_token_ids)"
            " VALUES ('1557558', 'a real market', 'real-market', '[\"Yes\", \"No\"]', '[]')"
        )
        conn.execute(
            "INSERT INTO positions (user_id, market_id, outcome, size, entry_price)"
            " VALUES ('alice', '900005', 'Up', 10, 0.5)"
        )
    return db_dsn


def _trading_state(dsn: str) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    return (
        _rows(dsn, "SELECT id, source, outcome_prices FROM markets ORDER BY id"),
        _rows(dsn, "SELECT user_id, market_id, token_id, current_price FROM positions ORDER BY id"),
    )


def test_demo_with_a_dsn_exported_uses_its_own_database(
    trading_dsn: str, embedded_state_dir: Path, tmp_path: Path
) -> None:
    """``POLYSTREAM_DATABASE__DSN`` exported, as "Running it" says: the demo leaves it alone."""
    before = _trading_state(trading_dsn)
    env = clean_env(
        POLYSTREAM_DATABASE__DSN=trading_dsn, POLYSTREAM_STATE__DIR=str(embedded_state_dir)
    )
    result = _polystream("demo", "--speed", DEMO_SPEED, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    first = _plain(result.stdout)[0]
    assert first.startswith(
        f"[demo] database: the demo's own embedded PostgreSQL in {embedded_state_dir / 'demo'}"
    )
    assert f"database.dsn ({trading_dsn}) is not used" in first
    assert _trading_state(trading_dsn) == before  # no demo market, no demo position, no price
    assert _rows(trading_dsn, "SELECT current_price FROM positions") == [(None,)]


@pytest.mark.parametrize("kind", ["positions", "foreign_table"])
def test_demo_refuses_a_database_with_other_data(
    kind: str, trading_dsn: str, empty_dsn: str, tmp_path: Path
) -> None:
    """``--database DSN`` with other data: one line, exit 2, nothing written (not even the schema)."""
    if kind == "positions":
        dsn, expected = trading_dsn, "1 market(s) not the demo's, 1 position(s) of other users"
    else:
        dsn, expected = empty_dsn, "table(s) public.accounts"
        with psycopg.connect(dsn) as conn:
            conn.execute("CREATE TABLE accounts (id int)")
    before = _rows(dsn, "SELECT relname FROM pg_class WHERE relkind = 'r' ORDER BY 1")
    result = _polystream("demo", "--database", dsn, env=clean_env(), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"polystream: the demo will not use {dsn}: it holds data")
    assert expected in lines[0] and "--allow-other-data" in lines[0]
    assert _rows(dsn, "SELECT relname FROM pg_class WHERE relkind = 'r' ORDER BY 1") == before
    if kind == "positions":
        assert _rows(dsn, "SELECT count(*) FROM markets") == [(1,)]
        assert _rows(dsn, "SELECT user_id, current_price FROM positions") == [("alice", None)]


# ------------------------------------------------------------------ 12: what the demo prints


def test_demo_prints_every_market_live_frames_explained_and_cents(
    embedded_state_dir: Path, tmp_path: Path
) -> None:
    env = clean_env(POLYSTREAM_STATE__DIR=str(embedded_state_dir))
    result = _polystream("demo", "--speed", DEMO_SPEED, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    lines = _plain(result.stdout)
    text = "\n".join(lines)

    start = lines.index("markets") + 2
    markets = lines[start : start + 6]
    assert [line.split()[0] for line in markets] == [f"90000{i}" for i in range(1, 7)]
    assert [line.split()[-1] for line in markets] == ["ws"] * 6, text
    assert "note: btc-updown-15m-1765450800, eth-updown-15m-1765450800, " in text
    assert "xrp-updown-15m-1765450800: live ('ws'), but the capture holds only their trades" in text

    (finished,) = [line for line in lines if line.startswith("[demo] replay finished: ")]
    sent, recorded = map(int, re.findall(r"(\d+) of the capture's (\d+) frames sent", finished)[0])
    assert recorded == 14342 and 0 < sent <= recorded
    if sent < recorded:
        why = lines[lines.index(finished) + 1]
        assert why == (
            f"[demo]   the other {recorded - sent} carry only "
            "ethereum-up-or-down-december-11-6am-et events from before its position was added: "
            "the server, like Polymarket, sends a connection only the events of assets it "
            "subscribed to (and sent that market's current book when it was subscribed)"
        )

    start = next(i for i, line in enumerate(lines) if line.startswith("positions (user demo")) + 2
    end = next(i for i, line in enumerate(lines) if line.startswith("total"))
    positions = lines[start:end]
    assert len(positions) == 7
    for line in positions:
        cells = line.split()
        assert all(re.fullmatch(r"-?\d+\.\d\d", cell) for cell in cells[-2:]), line
    assert re.fullmatch(r"total\s+-?\d+\.\d\d", lines[end])


def test_readme_imports_only_shipped_files() -> None:
    """Every ``polystream markets import FILE`` of the README's shell blocks names a shipped file."""
    readme = (ROOT / "README.md").read_text()
    shell = "\n".join(re.findall(r"```sh\n(.*?)```", readme, re.S))
    files = re.findall(r"polystream markets import (?!--)(\S+)", shell)
    assert files, "the README shows no markets import"
    assert [f for f in files if not (ROOT / f).is_file()] == []
    assert "## The first hour" in readme


# ------------------------------------------------------------------ 9: markets import


def test_import_on_an_unmigrated_database_is_one_line(empty_dsn: str, tmp_path: Path) -> None:
    env = clean_env(POLYSTREAM_DATABASE__DSN=empty_dsn)
    result = _polystream("markets", "import", str(EXAMPLE_MARKETS), env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [SCHEMA_LINE]
    assert _rows(empty_dsn, "SELECT to_regclass('markets')") == [(None,)]


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"", "an empty file"), (b"\n  \n", "an empty file"), (b"[]", "no market object in it")],
    ids=["empty", "blank", "empty-array"],
)
def test_import_of_an_empty_file_names_it(
    content: bytes, words: str, db_dsn: str, tmp_path: Path
) -> None:
    path = tmp_path / "markets.json"
    path.write_bytes(content)
    env = clean_env(POLYSTREAM_DATABASE__DSN=db_dsn)
    result = _polystream("markets", "import", str(path), env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"polystream: {path}: nothing to import: {words} (expected Gamma market JSON)"
    ]


def test_market_without_token_ids_is_imported_and_reported(db_dsn: str, tmp_path: Path) -> None:
    bare = {k: v for k, v in _market("900001").items() if k != "clobTokenIds"}
    path = tmp_path / "hydrating.json"
    path.write_bytes(orjson.dumps([bare, _market("900002")]))
    env = clean_env(POLYSTREAM_DATABASE__DSN=db_dsn)
    result = _polystream("markets", "import", str(path), env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        "polystream: warning: market 900001 (btc-updown-15m-1765450800) has no clobTokenIds: "
        "imported, but it cannot be priced until Gamma fills them in (`polystream run` asks "
        "Gamma for them while an active position holds the market)"
    ]
    assert f"{path}: 2 market(s)" in result.stdout
    assert _rows(db_dsn, "SELECT id, clob_token_ids FROM markets ORDER BY id") == [
        ("900001", []),
        ("900002", orjson.loads(_market("900002")["clobTokenIds"])),
    ]

    # the same file over rows that have token ids: they are kept, and it says so
    with psycopg.connect(db_dsn) as conn:
        import_markets_file(conn, EXAMPLE_MARKETS)
    again = _polystream("markets", "import", str(path), env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stderr.strip().splitlines() == [
        "polystream: warning: market 900001 (btc-updown-15m-1765450800) has no clobTokenIds: "
        "the token ids already stored are kept"
    ]
    tokens = orjson.loads(_market("900001")["clobTokenIds"])
    assert _rows(db_dsn, "SELECT clob_token_ids FROM markets WHERE id = '900001'") == [(tokens,)]


@pytest.fixture
async def fake_gamma(nursery: trio.Nursery) -> FakeGamma:
    fake = FakeGamma(_real_markets())
    urls: list[str] = await nursery.start(serve_asgi, fake.app, "127.0.0.1:0")
    fake.url = urls[0]
    return fake


async def test_from_gamma_failures_name_the_host_and_the_cause(
    fake_gamma: FakeGamma, db_dsn: str, tmp_path: Path
) -> None:
    host = fake_gamma.url.removeprefix("http://")
    fake_gamma.fail_next.extend([503] * 10)
    env = clean_env(
        POLYSTREAM_DATABASE__DSN=db_dsn,
        POLYSTREAM_GAMMA__URL=fake_gamma.url,
        POLYSTREAM_GAMMA__ATTEMPTS="2",
    )
    with trio.fail_after(60):
        failed = await _polystream_async(
            "markets", "import", "--from-gamma", "900001", env=env, cwd=tmp_path
        )
    assert failed.returncode == 1
    assert failed.stderr.decode().strip().splitlines() == [
        f"polystream: Gamma: GET /markets: HTTP 503 Service Unavailable from {host} "
        "(gave up after 2 attempts)"
    ]
    assert "stamina" not in failed.stdout.decode() + failed.stderr.decode()
    assert len(fake_gamma.requests) == 2

    refused = free_port()
    env["POLYSTREAM_GAMMA__URL"] = f"http://127.0.0.1:{refused}"
    with trio.fail_after(60):
        down = await _polystream_async(
            "markets", "import", "--from-gamma", "900001", env=env, cwd=tmp_path
        )
    assert down.returncode == 1
    assert down.stderr.decode().strip().splitlines() == [
        f"polystream: Gamma: GET /markets: connection refused by 127.0.0.1:{refused} "
        "(gave up after 2 attempts)"
    ]
    assert "stamina" not in down.stdout.decode()
    assert _rows(db_dsn, "SELECT count(*) FROM markets") == [(0,)]


async def test_from_gamma_checks_the_schema_first_and_reports_markets_without_tokens(
    fake_gamma: FakeGamma, empty_dsn: str, db_dsn: str, tmp_path: Path
) -> None:
    env = clean_env(POLYSTREAM_DATABASE__DSN=empty_dsn, POLYSTREAM_GAMMA__URL=fake_gamma.url)
    with trio.fail_after(60):
        unmigrated = await _polystream_async(
            "markets", "import", "--from-gamma", "900001", env=env, cwd=tmp_path
        )
    assert unmigrated.returncode == 1
    assert unmigrated.stderr.decode().strip().splitlines() == [SCHEMA_LINE]
    assert fake_gamma.requests == []  # Gamma is not asked before the database is ready

    hydrating = {k: v for k, v in _market("900004").items() if k != "clobTokenIds"}
    fake_gamma.markets = [m for m in fake_gamma.markets if str(m["id"]) != "900004"]
    fake_gamma.markets.append(hydrating)
    env["POLYSTREAM_DATABASE__DSN"] = db_dsn
    with trio.fail_after(60):
        done = await _polystream_async(
            "markets",
            "import",
            "--from-gamma",
            "900004",
            "eth-updown-15m-1765450800",
            env=env,
            cwd=tmp_path,
        )
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode().strip().splitlines() == [
        "polystream: warning: market 900004 (xrp-updown-15m-1765450800) has no clobTokenIds: "
        "imported, but it cannot be priced until Gamma fills them in (`polystream run` asks "
        "Gamma for them while an active position holds the market)"
    ]
    assert "imported 2 market(s)" in done.stdout.decode()
    assert _rows(db_dsn, "SELECT id, source FROM markets ORDER BY id") == [
        ("900002", "gamma"),
        ("900004", "gamma"),
    ]


# ------------------------------------------------------------------ 10: service


def _service_install(
    tmp_path: Path, executable: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return _polystream(
        "service",
        "install",
        "--executable",
        executable,
        "--unit-dir",
        str(tmp_path / "units"),
        "--config-dir",
        str(tmp_path / "etc"),
        *extra,
        env=clean_env(),
        cwd=tmp_path,
    )


def _exec_start(unit: str) -> str:
    (line,) = [line for line in unit.splitlines() if line.startswith("ExecStart=")]
    return line


def test_service_install_writes_a_complete_config_and_warns_about_tmp_and_home(
    tmp_path: Path,
) -> None:
    exe = f"/tmp/polystream-{uuid.uuid4().hex[:8]}/venv/bin/polystream"
    result = _service_install(tmp_path, exe)
    assert result.returncode == 0, result.stderr
    config = tmp_path / "etc" / "config.toml"
    assert f"wrote {config}" in result.stdout
    warnings = result.stderr.strip().splitlines()
    assert all(line.startswith("warning: ") for line in warnings), result.stderr
    assert (
        f"warning: the executable {exe} is under /tmp, which the unit's PrivateTmp=yes hides "
        "from the service: it would not start; install polystream outside /tmp (e.g. python3 "
        "-m venv /opt/polystream/venv && /opt/polystream/venv/bin/pip install .) and run that "
        "installation's `polystream service install`"
    ) in warnings

    # complete on its own: every key, each at its default, and nothing pointing at a source tree
    text = config.read_text()
    parsed = tomllib.loads(text)
    keys = {(section, key) for section, table in parsed.items() for key in table}
    assert keys == set(schema_keys())
    assert load_config(config, environ={}) == Config()
    assert "in the polystream source" not in text

    home_exe = f"/home/nobody-{uuid.uuid4().hex[:8]}/venv/bin/polystream"
    home = _service_install(tmp_path, home_exe)
    assert home.returncode == 0, home.stderr
    assert (
        f"warning: {home_exe} is under a home directory: the unit runs with "
        "ProtectHome=read-only instead of yes; a system-wide install (e.g. "
        "/opt/polystream/venv, config in /etc/polystream) keeps homes hidden from the service"
    ) in home.stderr.splitlines()
    assert "ProtectHome=read-only" in (tmp_path / "units" / "polystream.service").read_text()


def test_service_commands_take_config(tmp_path: Path) -> None:
    own = tmp_path / "mine.toml"
    own.write_text('[log]\nlevel = "debug"\n')
    result = _service_install(tmp_path, "/usr/bin/true", "--config", str(own))
    assert result.returncode == 0, result.stderr
    unit = (tmp_path / "units" / "polystream.service").read_text()
    assert _exec_start(unit) == f"ExecStart=/usr/bin/true run --config {own}"
    assert not (tmp_path / "etc" / "config.toml").exists()  # the given file is used as is
    assert (tmp_path / "etc" / "env").exists()
    assert f"the unit runs with {own}" in result.stdout

    shown = _polystream(
        "service",
        "show",
        "--config",
        str(own),
        "--executable",
        "/usr/bin/true",
        env=clean_env(),
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr
    assert _exec_start(shown.stdout) == f"ExecStart=/usr/bin/true run --config {own}"
    by_env = _polystream(
        "service",
        "show",
        "--executable",
        "/usr/bin/true",
        env=clean_env(POLYSTREAM_CONFIG=str(own)),
        cwd=tmp_path,
    )
    assert _exec_start(by_env.stdout) == f"ExecStart=/usr/bin/true run --config {own}"

    bad = tmp_path / "bad.toml"
    bad.write_text("[feed]\nping_interval = -1\n")
    refused = _polystream("service", "show", "--config", str(bad), env=clean_env(), cwd=tmp_path)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("polystream: configuration error: feed.ping_interval = -1")


# ------------------------------------------------------------------ 11: metrics


def _wait_ready(notify: socket.socket, process: subprocess.Popen[str]) -> None:
    """Block until the daemon says READY=1 on its systemd notify socket (bounded)."""
    while True:
        try:
            datagram = notify.recv(4096)
        except TimeoutError:
            process.kill()
            raise AssertionError(
                f"no READY=1 within the timeout: {process.communicate()[0]}"
            ) from None
        if b"READY=1" in datagram.split(b"\n"):
            return


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metrics_have_process_build_info_and_every_known_label(db_dsn: str, tmp_path: Path) -> None:
    listen = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="ps-notify-") as sockets:
        path = str(Path(sockets) / "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(path)
            notify.settimeout(60)
            env = clean_env(
                POLYSTREAM_DATABASE__DSN=db_dsn,
                POLYSTREAM_HEALTH__LISTEN=listen,
                POLYSTREAM_FEED__URL=f"ws://127.0.0.1:{free_port()}/ws/market",
                POLYSTREAM_POLL__ENABLED="false",
                NOTIFY_SOCKET=path,
            )
            process = subprocess.Popen(
                [sys.executable, "-m", "polystream", "run"],
                env=env,
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                _wait_ready(notify, process)
                text = httpx.get(f"http://{listen}/metrics", timeout=10).text
            finally:
                process.send_signal(signal.SIGTERM)
                process.communicate(timeout=30)
    assert process.returncode == 0
    samples = _samples(text)

    for name in (
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ):
        assert samples[(name, ())] > 0, name
    python = platform.python_version()
    assert any(
        name == "python_info" and dict(labels)["version"] == python for name, labels in samples
    )
    build = ("polystream_build_info", (("python", python), ("version", polystream.__version__)))
    assert samples[build] == 1

    known = {
        "polystream_events_total": ("type", KNOWN_EVENT_TYPES),
        "polystream_parse_errors_total": ("kind", BAD_INPUT_KINDS),
        "polystream_triggers_total": ("kind", DECISION_KINDS),
        "polystream_rows_written_total": ("table", ("markets", "positions")),
        "polystream_prediction_deferrals_total": ("reason", DEFERRAL_REASONS),
        "polystream_book_resyncs_total": ("reason", ("tick_size_change", "hash_mismatch")),
        "polystream_db_call_seconds_count": ("link", LINKS),
        "polystream_db_batch_rows_count": ("link", LINKS),
    }
    missing = [
        f"{name}{{{label}={value!r}}}"
        for name, (label, values) in known.items()
        for value in values
        if (name, ((label, value),)) not in samples
    ]
    assert missing == []
    zero = ("polystream_triggers_total", (("kind", "take_profit"),))
    assert samples[zero] == 0

"""
The ``polystream`` command line (typer).

Every command takes ``--config PATH`` (or ``POLYSTREAM_CONFIG``); any key can
be overridden with ``POLYSTREAM_<SECTION>__<KEY>``. Logging is configured
here, once, before ``trio.run``.

Flags and configuration are checked before anything starts (PostgreSQL, the
demo's positions, a listening socket). Every failure is one line on stderr,
``polystream: ...``, with passwords masked (:func:`polystream.logs.redact`);
a traceback only reaches the log, at ``log.level = "debug"``.

Exit codes: 0 success; 1 runtime failure (database unreachable, port in
use, ...); 2 bad configuration or usage (the message names the key or the
flag). ``status`` has its own codes (see :func:`status`).
"""

from __future__ import annotations

import errno
import faulthandler
import importlib
import math
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, NoReturn
from urllib.parse import urlsplit

import structlog
import trio
import typer
from typer.core import TyperCommand

from polystream.config import ENV_PREFIX, Config, load_config
from polystream.errors import ConfigError, PolystreamError, leaves
from polystream.logs import configure_logging, mask_dsn_secrets, masked_dsn, redact
from polystream.ops.logcat import logs_command
from polystream.ops.service import service_app
from polystream.ops.systemd import Notifier
from polystream.ops.workers import MAX_WORKERS

if TYPE_CHECKING:
    from polystream.record import RecordOptions

__all__ = ["app", "main"]

logger = structlog.get_logger(__name__)


class _Command(TyperCommand):
    """
    A command whose help reads like click's: positionals by name in the
    usage line and their section (``PATH...``, ``[SOURCE]``), without the
    ``<list[Path]>`` type labels this typer adds to them.
    """

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        """``[OPTIONS]``, then each positional as :func:`_positional` names it."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                pieces.append(_positional(param, brackets=True))
            else:
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces

    def format_options(self, ctx: Any, formatter: Any) -> None:
        """The Arguments and Options sections, positionals by name only."""
        arguments, options = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                arguments.append((_positional(param, brackets=False), record[1]))
            else:
                options.append(record)
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _positional(param: Any, *, brackets: bool) -> str:
    """``PATH...`` for a required list, ``[SOURCE]`` for an optional value."""
    name = param.metavar or str(param.name).upper()
    if param.nargs != 1:
        name += "..."
    return f"[{name}]" if brackets and not param.required else name


app = typer.Typer(
    name="polystream",
    help="Keep PostgreSQL in step with Polymarket's live market feed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: no type labels on flags, option names never cut at 80 columns.
    rich_markup_mode=None,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
markets_app = typer.Typer(help="Market metadata.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(markets_app, name="markets")
app.add_typer(service_app, name="service")
app.command("logs", cls=_Command)(logs_command)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="POLYSTREAM_CONFIG",
        metavar="PATH",
        help="TOML configuration file.",
        exists=False,
        dir_okay=False,
    ),
]


def _version() -> str:
    """The installed distribution's version (the source tree's when not installed)."""
    try:
        return metadata.version("polystream")
    except metadata.PackageNotFoundError:
        import polystream

        return polystream.__version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"polystream {_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_print_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Keep PostgreSQL in step with Polymarket's live market feed."""


def _fail(message: str, code: int = 1) -> NoReturn:
    """Print ``polystream: message`` on one line of stderr, passwords masked; exit ``code``."""
    typer.echo(f"polystream: {_one_line(redact(message))}", err=True)
    raise typer.Exit(code)


def _usage_error(flag: str, value: object, expected: str) -> NoReturn:
    """A flag's value is wrong: one line naming it and the expected form; exit 2."""
    _fail(f"{flag} {value}: expected {expected}", 2)


def _check_seconds(flag: str, value: float) -> None:
    """Exit 2 unless ``value`` is a finite number of seconds > 0 (a speed, an interval)."""
    if not (value > 0 and math.isfinite(value)):
        _usage_error(flag, f"{value:g}", "a number > 0")


def _check_port(flag: str, value: int | None) -> None:
    """Exit 2 unless ``value`` is None or a TCP port, 0..65535 (0 = any free port)."""
    if value is not None and not 0 <= value <= 65535:
        _usage_error(flag, value, "a port from 0 to 65535 (0 = any free port)")


def _setup(config_path: Path | None, *, database: bool = False) -> Config:
    """
    Load the configuration and configure logging; exit 2 on a bad value.

    With ``database``, ``database.dsn`` must also parse as a libpq DSN or URI.
    """
    try:
        config = load_config(config_path)
        if database:
            _check_dsn(config.database.dsn, config_path)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}", 2)
    configure_logging(config.log.level, config.log.format)
    return config


def _check_dsn(dsn: str, config_path: Path | None) -> None:
    """
    Check ``database.dsn`` (empty: the embedded server) without connecting.

    Raises:
        ConfigError: it does not parse (:func:`_dsn_problem`). The message names
            ``database.dsn`` and where it came from, its password masked
            (:func:`~polystream.logs.masked_dsn`, even when quoting defeats :func:`redact`).
    """
    problem = _dsn_problem(dsn)
    if problem is None:
        return
    env = next((n for n in os.environ if n.upper() == f"{ENV_PREFIX}DATABASE__DSN"), None)
    origin = f"${env}" if env else str(config_path)
    raise ConfigError(
        f"database.dsn = {masked_dsn(dsn)!r} (from {origin}): "
        f"{mask_dsn_secrets(problem, dsn)}; expected {_DSN_FORM}"
    )


_DSN_FORM = "a libpq DSN or postgresql:// URI, or empty"


def _dsn_problem(dsn: str) -> str | None:
    """
    Why ``dsn`` is not a libpq ``key=value`` string or ``postgresql://`` URI
    (the driver's reason, or a port that is not a number from 1 to 65535), or
    None when it parses or is empty. Connects to nothing. The reason may
    quote the DSN, password included: mask it (:func:`~polystream.logs.mask_dsn_secrets`) before
    printing.
    """
    if not dsn:
        return None
    from psycopg import Error
    from psycopg.conninfo import conninfo_to_dict

    try:
        ports = str(conninfo_to_dict(dsn).get("port") or "")
    except Error as exc:
        return str(exc).strip()
    bad = [p for p in ports.split(",") if p and not (p.isdigit() and 1 <= int(p) <= 65535)]
    return f"port {bad[0]!r} is not a number from 1 to 65535" if bad else None


@contextmanager
def _database(config: Config) -> Iterator[str]:
    """The DSN to use: ``database.dsn``, or an embedded server's (started here)."""
    from polystream.store.embedded import database_dsn

    with database_dsn(config.database.dsn, config.state.path()) as dsn:
        yield dsn


def _migrate(dsn: str) -> list[str]:
    from polystream.store import db

    with db.connect(dsn, application_name="polystream-migrate") as conn:
        return db.migrate(conn)


@app.command(cls=_Command, short_help="Run the daemon in the foreground until SIGTERM/SIGINT.")
def run(
    workers: Annotated[
        int,
        typer.Option(
            metavar="N",
            help=f"Run N daemons, 1 to {MAX_WORKERS}, as child processes that split the "
            "markets (feed.cluster), each with /health on the health.listen port + 0..N-1; "
            "one that exits is restarted. 1: this process is the daemon.",
        ),
    ] = 1,
    config_path: ConfigOption = None,
) -> None:
    """
    Run the daemon in the foreground until SIGTERM/SIGINT (a second signal exits at once).

    With --workers N > 1 this process supervises N daemons instead and stops
    them on SIGTERM/SIGINT; it exits 0 when they all did.
    """
    if not 1 <= workers <= MAX_WORKERS:
        _usage_error("--workers", workers, f"an integer from 1 to {MAX_WORKERS}")
    config = _setup(config_path, database=True)
    if workers > 1:
        _run_workers(config, config_path, workers)
    # Read and remove NOTIFY_SOCKET/WATCHDOG_* before the embedded PostgreSQL is spawned.
    notifier = Notifier.from_environ(unset_environment=True)
    if notifier.enabled:
        faulthandler.enable()  # on a watchdog SIGABRT: every thread's traceback in the journal
    notifier.status("starting: database")
    try:
        with _database(config) as dsn:
            if not config.database.dsn:
                _migrate(dsn)
            _check_schema(dsn)
            notifier.status("starting: feed")
            trio.run(_serve_until_signal, config, dsn, notifier)
    except* PolystreamError as group:
        _fail_started(notifier, "; ".join(str(exc) for exc in leaves(group)))
    except* OSError as group:
        _fail_started(notifier, "; ".join(_os_error(exc, config) for exc in leaves(group)))


def _run_workers(config: Config, config_path: Path | None, count: int) -> NoReturn:
    """
    ``run --workers count``: check the database as ``run`` does (starting the
    embedded server, which the children then share, when ``database.dsn`` is
    empty), then supervise ``count`` daemons (:mod:`polystream.ops.workers`) until
    a stop signal. Exits with the supervisor's code (0: every daemon stopped
    cleanly); 2 when the health ports do not fit, 1 when the start fails.
    """
    from polystream.ops.workers import health_listens, plan_workers, supervise

    try:
        health_listens(config.health.listen, count)  # before PostgreSQL starts
    except ValueError as exc:
        _fail(f"--workers {count}: {exc}", 2)
    # Only the supervisor talks to systemd: unset before the children inherit it.
    notifier = Notifier.from_environ(unset_environment=True)
    if notifier.enabled:
        faulthandler.enable()
    notifier.status("starting: database")
    code = 1
    try:
        with _database(config) as dsn:
            if not config.database.dsn:
                _migrate(dsn)
            _check_schema(dsn)
            notifier.status(f"starting: {count} workers")
            plan = plan_workers(
                count,
                config.health.listen,
                config_path,
                os.environ,
                dsn=None if config.database.dsn else dsn,
            )
            code = trio.run(supervise, plan, notifier)
    except* PolystreamError as group:
        _fail_started(notifier, "; ".join(str(exc) for exc in leaves(group)))
    except* OSError as group:
        _fail_started(
            notifier, "; ".join(f"cannot start the workers: {exc}" for exc in leaves(group))
        )
    raise typer.Exit(code)


def _os_error(exc: BaseException, config: Config) -> str:
    """One line for an OSError at start-up (the health port taken, most often)."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return (
            f"cannot start: health.listen {config.health.listen} is already in use "
            "(another polystream run? set health.listen to another port)"
        )
    return f"cannot start: {exc}"


def _fail_started(notifier: Notifier, message: str) -> NoReturn:
    notifier.status(f"failed: {redact(message)}")
    _fail(message)


def _check_schema(dsn: str) -> None:
    from polystream.store import db

    with db.connect(dsn, application_name="polystream-check") as conn:
        pending = db.pending_migrations(conn)
    if pending:
        raise PolystreamError(
            f"database schema is not up to date ({len(pending)} migration(s) pending): "
            "run `polystream db migrate` first"
        )


async def _serve_until_signal(config: Config, dsn: str, notifier: Notifier) -> None:
    from polystream.app import App
    from polystream.app import run as run_daemon
    from polystream.ops.systemd import notify_running

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def daemon(task_status: trio.TaskStatus[App]) -> None:
                try:
                    await run_daemon(config, dsn, task_status=task_status)
                finally:
                    nursery.cancel_scope.cancel()  # also ends the watchdog task

            handle: App = await nursery.start(daemon)
            # Database reachable (_check_schema) and feed tasks started: READY=1, then pings.
            await nursery.start(
                partial(notify_running, grace=config.systemd.unhealthy_grace),
                notifier,
                handle.stats,
                handle.stopping,
            )
            await _stop_on_signals(signals, handle.stopping, notifier.stopping, handle.stop)


async def _stop_on_signals(
    signals: AsyncIterator[int], stopping: trio.Event, *stop: Callable[[], object]
) -> None:
    """
    On the first signal call each of ``stop`` (in order); on a later one,
    once ``stopping`` is set, exit the process at once with code 1.
    """
    async for signum in signals:
        if stopping.is_set():
            logger.warning("shutdown_forced", signal=signal.Signals(signum).name)
            os._exit(1)
        logger.info("shutdown_requested", signal=signal.Signals(signum).name)
        for step in stop:
            step()


@db_app.command("migrate", cls=_Command)
def db_migrate(config_path: ConfigOption = None) -> None:
    """Apply pending schema migrations (safe to run twice)."""
    config = _setup(config_path, database=True)
    try:
        with _database(config) as dsn:
            applied = _migrate(dsn)
    except PolystreamError as exc:
        _fail(str(exc))
    typer.echo(
        f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else "")
    )


@markets_app.command(
    "import", cls=_Command, short_help="Load Gamma market objects into the markets table."
)
def markets_import(
    sources: Annotated[
        list[str],
        typer.Argument(
            metavar="SOURCE",
            help="Files of Gamma market JSON (object, array or JSON lines), or with "
            "--from-gamma: Gamma ids, slugs or condition ids.",
        ),
    ],
    from_gamma: Annotated[
        bool, typer.Option("--from-gamma", help="Fetch the markets from the Gamma API.")
    ] = False,
    config_path: ConfigOption = None,
) -> None:
    """Load Gamma market objects into the markets table (metadata; live prices are kept)."""
    config = _setup(config_path, database=True)
    try:
        with _database(config) as dsn:
            if from_gamma:
                total = trio.run(_import_from_gamma, config, dsn, sources)
            else:
                total = _import_files(dsn, [Path(source) for source in sources])
    except (PolystreamError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"imported {total} market(s)")


def _import_files(dsn: str, paths: list[Path]) -> int:
    from polystream.store import db
    from polystream.store.markets import import_markets_file

    total = 0
    with db.connect(dsn, application_name="polystream-import") as conn:
        for path in paths:
            count = import_markets_file(conn, path)
            conn.commit()
            typer.echo(f"{path}: {count} market(s)")
            total += count
    return total


async def _import_from_gamma(config: Config, dsn: str, refs: list[str]) -> int:
    from polystream.pipeline.metadata import import_from_gamma
    from polystream.venue.gamma import open_gamma_client

    async with open_gamma_client(
        config.gamma.url,
        request_timeout=config.gamma.request_timeout,
        attempts=config.gamma.attempts,
    ) as client:
        return await import_from_gamma(dsn, refs, client)


@app.command(cls=_Command, short_help="Serve recorded frames as Polymarket's market channel.")
def replay(
    paths: Annotated[
        list[Path],
        typer.Argument(metavar="PATH", help="Capture files (.jsonl or .jsonl.gz)."),
    ],
    host: Annotated[str, typer.Option(metavar="HOST", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(metavar="PORT", help="Port to listen on, 0..65535 (0 = any free port).")
    ] = 8765,
    speed: Annotated[
        float, typer.Option(metavar="FACTOR", help="Playback speed, > 0: 2 = twice recorded pace.")
    ] = 1.0,
    max_speed: Annotated[
        bool, typer.Option("--max-speed", help="Send as fast as clients read.")
    ] = False,
    loop: Annotated[bool, typer.Option("--loop", help="Start again at the end.")] = False,
    exit_at_end: Annotated[
        bool, typer.Option("--exit-at-end", help="Stop after the last frame.")
    ] = False,
    synthesize: Annotated[
        int,
        typer.Option(
            metavar="N", help="Extra synthetic assets, copies of recorded ones under new ids."
        ),
    ] = 0,
    synthetic_events: Annotated[
        bool,
        typer.Option(
            "--synthetic-events/--no-synthetic-events",
            show_default=False,
            help="Send the copies' events too, the default (else their snapshots only).",
        ),
    ] = True,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            metavar="SPEC",
            help="Inject a fault: ACTION:after=N or ACTION:every=N (frames); ACTION one of "
            "drop-tcp, drop-reset, drop-close, half-open, silence, stall, garbage, pause "
            "(pause takes ,duration=SECONDS). Repeatable.",
        ),
    ] = None,
    max_subscribe_bytes: Annotated[
        int,
        typer.Option(
            metavar="BYTES", help="Close connections whose subscribe frame is larger (0 = off)."
        ),
    ] = 0,
    max_subscribe_ids: Annotated[
        int,
        typer.Option(metavar="N", help="Close connections subscribing more ids at once (0 = off)."),
    ] = 0,
    oversize_close_delay: Annotated[
        float,
        typer.Option(metavar="SECONDS", help="Seconds before such a close (observed: 0.1-0.2)."),
    ] = 0.15,
    storm_limit: Annotated[
        int,
        typer.Option(
            metavar="N",
            help="Answer HTTP 429 past this many new connections within --storm-window (0 = off).",
        ),
    ] = 0,
    storm_window: Annotated[
        float, typer.Option(metavar="SECONDS", help="The --storm-limit window, seconds > 0.")
    ] = 1.0,
    tick_changes: Annotated[
        bool,
        typer.Option(
            "--tick-changes",
            help="Send tick_size_change (0.01 <-> 0.001) when a book passes 0.96 or 0.04.",
        ),
    ] = False,
    rest_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT",
            help="Also answer CLOB REST (/book, /books, /prices, /midpoints) from the tape "
            "on this port (0 = any free port; the URL is logged as rest_url).",
        ),
    ] = None,
    clob_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT",
            help="Also serve a fake CLOB trading API (orders, heartbeats; signatures checked) "
            "on this port for a throwaway account (0 = any free port; logged as clob_url).",
        ),
    ] = None,
    clob_env: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            dir_okay=False,
            help="With --clob-port: write that account's POLYMARKET_* variables here (0600), "
            "for polystream run in execute.mode clob.",
        ),
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """
    Serve recorded frames as Polymarket's market channel, on ws://HOST:PORT/ws/market.

    SIGTERM or SIGINT (Ctrl-C) stops it: one replay_stopped log line, exit 0.
    """
    from polystream.replay import ReplayOptions, run_replay_cli

    _check_seconds("--speed", speed)
    _check_port("--port", port)
    _check_port("--rest-port", rest_port)
    _check_port("--clob-port", clob_port)
    for flag, count in (
        ("--synthesize", synthesize),
        ("--max-subscribe-bytes", max_subscribe_bytes),
        ("--max-subscribe-ids", max_subscribe_ids),
        ("--storm-limit", storm_limit),
    ):
        if count < 0:
            _usage_error(flag, count, "an integer >= 0")
    if not (oversize_close_delay >= 0 and math.isfinite(oversize_close_delay)):
        _usage_error("--oversize-close-delay", oversize_close_delay, "seconds >= 0")
    _check_seconds("--storm-window", storm_window)
    faults = _parse_faults(fault or ())
    _setup(config_path)
    options = ReplayOptions(
        speed=speed,
        max_speed=max_speed,
        loop=loop,
        synthesize=synthesize,
        synthetic_events=synthetic_events,
        tick_changes=tick_changes,
        faults=faults,
        max_subscribe_bytes=max_subscribe_bytes,
        max_subscribe_ids=max_subscribe_ids,
        oversize_close_delay=oversize_close_delay,
        storm_limit=storm_limit,
        storm_window=storm_window,
    )
    try:
        with _sigterm_as_interrupt():
            run_replay_cli(
                paths,
                options,
                host=host,
                port=port,
                rest_port=rest_port,
                exit_at_end=exit_at_end,
                clob_port=clob_port,
                clob_env=clob_env,
            )
    except KeyboardInterrupt:  # a signal while the captures were still loading
        logger.info("replay_stopped")
    except (PolystreamError, OSError) as exc:
        _fail(str(exc))


@app.command(cls=_Command, short_help="Record the market channel to rotating gzip capture files.")
def record(
    directory: Annotated[
        Path,
        typer.Option(
            "--dir",
            metavar="DIR",
            file_okay=False,
            help="Write the files here (created if need be).",
        ),
    ] = Path("recordings"),
    asset: Annotated[
        list[str] | None,
        typer.Option(
            metavar="ID",
            help="Subscribe this asset (token) id. Repeatable. Without --asset and "
            "--markets-file: the database's desired set, followed as the daemon does.",
        ),
    ] = None,
    markets_file: Annotated[
        list[Path] | None,
        typer.Option(
            metavar="PATH",
            dir_okay=False,
            help="Subscribe every clobTokenIds entry of these Gamma market objects "
            "(JSON object, array or JSON lines, as markets import reads). Repeatable.",
        ),
    ] = None,
    prefix: Annotated[
        str, typer.Option(metavar="NAME", help="File names start NAME- (letters, digits, _ . -).")
    ] = "market",
    rotate_seconds: Annotated[
        float,
        typer.Option(
            metavar="SECONDS", help="A new file at each multiple of SECONDS of UTC time, > 0."
        ),
    ] = 3600.0,
    rotate_mb: Annotated[
        float,
        typer.Option(metavar="MIB", help="A new file before MIB MiB of uncompressed data, > 0."),
    ] = 256.0,
    fsync_seconds: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="Sync-flush and fsync within SECONDS of a write, > 0 (a crash loses at most that).",
        ),
    ] = 1.0,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw",
            help="Also write every message exactly as received (PONG and bad frames "
            "included) to DIR/raw/*.raw.jsonl.gz.",
        ),
    ] = False,
    config_path: ConfigOption = None,
) -> None:
    """
    Record the market channel (feed.url) to rotating gzip files for replay.

    Each frame is written with its receive time (docs/recording.md). SIGTERM or
    SIGINT (Ctrl-C) completes the open files and exits 0.
    """
    from polystream.record import MIB, RecordOptions

    _check_seconds("--rotate-seconds", rotate_seconds)
    _check_seconds("--rotate-mb", rotate_mb)
    _check_seconds("--fsync-seconds", fsync_seconds)
    if not _PREFIX.fullmatch(prefix):
        _usage_error("--prefix", repr(prefix), "letters, digits, '_', '.' or '-', not empty")
    assets = list(dict.fromkeys([*(asset or ()), *_market_file_tokens(markets_file or ())]))
    if (asset or markets_file) and not assets:
        _fail("--asset/--markets-file: no asset ids (the markets have no clobTokenIds)", 2)
    config = _setup(config_path, database=not assets)
    options = RecordOptions(
        directory=directory,
        prefix=prefix,
        rotate_seconds=rotate_seconds,
        rotate_bytes=max(1, int(rotate_mb * MIB)),
        fsync_seconds=fsync_seconds,
        raw=raw,
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _fail(f"--dir {directory}: {exc}")
    _record(config, options, assets)


_PREFIX = re.compile(r"[A-Za-z0-9_.-]+")


def _market_file_tokens(paths: Iterable[Path]) -> list[str]:
    """Every ``clobTokenIds`` entry of the Gamma markets in ``paths``; exit 2 on a bad file."""
    from polystream.store.markets import parse_gamma_payload

    tokens: list[str] = []
    for path in paths:
        try:
            markets = parse_gamma_payload(path.read_bytes())
        except (PolystreamError, OSError) as exc:
            _fail(f"--markets-file {path}: {exc}", 2)
        tokens.extend(token for market in markets for token in market.clob_token_ids)
    return tokens


def _record(config: Config, options: RecordOptions, assets: list[str]) -> None:
    """
    Run ``record``: on ``assets``, or on the database's desired set (the
    embedded server when ``database.dsn`` is empty, as ``run``) when there
    are none. A signal before the recording started exits 0 too.
    """
    try:
        with _sigterm_as_interrupt():
            if assets:
                trio.run(_record_until_signal, config, options, assets, None)
                return
            with _database(config) as dsn:
                if not config.database.dsn:
                    _migrate(dsn)
                _check_schema(dsn)
                trio.run(_record_until_signal, config, options, assets, dsn)
    except* KeyboardInterrupt:
        logger.info("record_stopped")
    except* PolystreamError as group:
        _fail("; ".join(str(exc) for exc in leaves(group)))
    except* OSError as group:
        _fail("; ".join(f"cannot record: {exc}" for exc in leaves(group)))


async def _record_until_signal(
    config: Config, options: RecordOptions, assets: list[str], dsn: str | None
) -> None:
    """Record until SIGTERM/SIGINT, which completes the files (a second one exits at once)."""
    from polystream.record import Recording, run_record

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def recording(task_status: trio.TaskStatus[Recording]) -> None:
                try:
                    await run_record(
                        config, options, assets=assets, dsn=dsn, task_status=task_status
                    )
                finally:
                    nursery.cancel_scope.cancel()

            handle: Recording = await nursery.start(recording)
            await _stop_on_signals(signals, handle.stopping, handle.stop)


def _parse_faults(specs: tuple[str, ...] | list[str]) -> list[Any]:
    """
    The ``--fault`` values as :class:`~polystream.replay.ScheduledFault` s;
    exit 2 with one line naming ``--fault`` and the expected form on a bad one.
    """
    from polystream.replay import ScheduledFault

    faults = []
    for spec in specs:
        try:
            faults.append(ScheduledFault.parse(spec))
        except (PolystreamError, ValueError) as exc:
            reason = str(exc).removeprefix(f"--fault {spec!r}: ")
            reason = reason.removeprefix(f"fault {spec.partition(':')[0]}: ")
            if "expected" not in reason and "must" not in reason:
                reason += "; expected ACTION:after=N or ACTION:every=N, N an integer >= 1"
            _fail(f"--fault {spec!r}: {reason}", 2)
    return faults


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """
    Within the block, SIGTERM stops the process as SIGINT (Ctrl-C) does.

    The SIGTERM handler calls the SIGINT handler: under ``trio.run`` that is
    trio's, which raises ``KeyboardInterrupt`` where it is safe (or at the next
    checkpoint); elsewhere Python's, which raises it at once. SIGINT gets
    Python's handler if it was ignored or default (a background job of a
    shell script), so that trio installs its own. Both are restored on exit.
    """

    def on_sigterm(_signum: int, frame: FrameType | None) -> None:
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int in (signal.SIG_IGN, signal.SIG_DFL):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_term = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_term)
        signal.signal(signal.SIGINT, previous_int)


@app.command(cls=_Command)
def status(
    json_output: Annotated[bool, typer.Option("--json", help="Print the raw health JSON.")] = False,
    url: Annotated[
        str | None,
        typer.Option(
            metavar="URL",
            help="Health URL, http:// or https:// (default: http://<health.listen>/health).",
        ),
    ] = None,
    watch: Annotated[
        float | None,
        typer.Option(metavar="SECONDS", help="Refresh every SECONDS (> 0) until Ctrl-C."),
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """
    Show the running daemon's state, read from its health endpoint.

    Exit codes: 0 healthy; 1 running but unhealthy; 3 not running (endpoint
    unreachable); 2 bad configuration or usage. When the daemon is down and
    database.dsn is set, what the database knows is shown instead.
    """
    import time

    if watch is not None:
        _check_seconds("--watch", watch)
    if url is not None:
        _check_http_url("--url", url)
    config = _setup(config_path, database=True)
    target = url or f"http://{config.health.listen}/health"
    while True:
        code = _status_once(config, target, json_output, clear=watch is not None)
        if watch is None:
            raise typer.Exit(code)
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            raise typer.Exit(code) from None


def _check_http_url(flag: str, value: str) -> None:
    """Exit 2 unless ``value`` is an ``http://`` or ``https://`` URL with a host (and a valid port)."""
    try:
        parts = urlsplit(value)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname)
        parts.port  # noqa: B018 - raises ValueError past 65535 or when not a number
    except ValueError:
        valid = False
    if not valid:
        _usage_error(
            flag, repr(value), "an http:// or https:// URL, e.g. http://127.0.0.1:9108/health"
        )


def _status_once(config: Config, target: str, json_output: bool, *, clear: bool) -> int:
    from polystream.ops.status import database_summary, dumps, fetch_health, render_health

    code, document, error = fetch_health(target)
    if clear:
        typer.echo("\x1b[2J\x1b[H", nl=False)
    if json_output:
        typer.echo(
            dumps(
                document
                if document is not None
                else {"url": redact(target), "reachable": False, "error": redact(error or "")}
            )
        )
        return code
    if document is not None:
        typer.echo(render_health(document))
        _cluster_status(config)
        return code
    typer.echo(_one_line(redact(f"polystream is not running: {target} unreachable ({error})")))
    if config.database.dsn:
        try:
            typer.echo(database_summary(config.database.dsn))
        except PolystreamError as exc:
            typer.echo(_one_line(redact(f"database: {exc}")))
    _cluster_status(config)
    return code


def _cluster_status(config: Config) -> None:
    """With ``feed.cluster`` and a DSN: every daemon of the cluster and the unowned partitions."""
    from polystream.ops.status import cluster_summary

    if not (config.feed.cluster and config.database.dsn):
        return
    try:
        typer.echo("\n" + cluster_summary(config.database.dsn, config.feed.cluster_lease_ttl))
    except PolystreamError as exc:
        typer.echo(_one_line(redact(f"cluster: {exc}")))


@app.command(cls=_Command, short_help="Run the main job on the recorded demo capture.")
def demo(
    speed: Annotated[
        float,
        typer.Option(metavar="FACTOR", help="Replay speed, > 0 (the capture spans 15 minutes)."),
    ] = 30.0,
    database: Annotated[
        str | None,
        typer.Option(
            "--database",
            metavar="DSN",
            help="Run on this PostgreSQL database (DSN) instead of the demo's own embedded "
            "one (database.dsn is never used); refused if it holds other data.",
        ),
    ] = None,
    allow_other_data: Annotated[
        bool,
        typer.Option(
            "--allow-other-data",
            help="With --database: go on although it holds other data (its active "
            "positions get priced from replayed data).",
        ),
    ] = False,
    config_path: ConfigOption = None,
) -> None:
    """Run the main job on the recorded demo capture and print the result."""
    from polystream.demo import DemoDatabaseRefused, run_demo

    _check_seconds("--speed", speed)  # before PostgreSQL starts or positions are made
    problem = None if database is None else _dsn_problem(database)
    if database is not None and problem is not None:
        _usage_error(
            "--database",
            repr(masked_dsn(database)),
            f"a libpq DSN or postgresql:// URI ({mask_dsn_secrets(problem, database)})",
        )
    config = _setup(config_path)
    try:
        code = run_demo(
            config,
            speed=speed,
            config_path=config_path,
            database=database,
            allow_other_data=allow_other_data,
        )
    except DemoDatabaseRefused as exc:
        _fail(str(exc), 2)
    except (PolystreamError, OSError) as exc:
        _fail(str(exc))
    raise typer.Exit(code)


def main() -> None:
    """
    Console-script entry point. Every failure is one line on stderr: a usage
    error (an unknown option, a value of the wrong type, a missing argument)
    names the command's ``--help`` and exits 2; Ctrl-C outside a command's own
    handling exits 130; any other error escaping a command exits 1, its
    traceback logged at debug level (``log.level = "debug"``).
    """
    errors = _click_exceptions()
    try:
        code = app(prog_name="polystream", standalone_mode=False)
    except KeyboardInterrupt:
        sys.exit(130)
    except errors.ClickException as exc:
        sys.exit(_show_click_error(exc, errors))
    except typer.Abort:
        typer.echo("polystream: aborted", err=True)
        sys.exit(1)
    except Exception as exc:  # the CLI's supervisor: one line, never a bare traceback
        if not isinstance(exc, PolystreamError):
            logger.debug("unexpected_error", exc_info=exc)
        reasons = "; ".join(_describe(leaf) for leaf in leaves(exc))
        typer.echo(f"polystream: {_one_line(redact(reasons))}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _click_exceptions() -> Any:
    """The ``exceptions`` module of the click typer runs on: its own copy, or click's."""
    try:
        return importlib.import_module("typer._click.exceptions")
    except ImportError:  # a typer that still runs on click
        return importlib.import_module("click.exceptions")


def _show_click_error(exc: Any, errors: Any) -> int:
    """
    Print click's error ``exc`` on one line of stderr (a bare command group's
    help as click does: in full) and return its exit code (2 for usage).
    """
    no_args_is_help = getattr(errors, "NoArgsIsHelpError", None)
    if no_args_is_help is not None and isinstance(exc, no_args_is_help):
        exc.show()
        return int(exc.exit_code)
    message = exc.format_message().rstrip(".")
    if isinstance(exc, errors.UsageError) and exc.ctx is not None:
        message += f"; try '{exc.ctx.command_path} --help'"
    typer.echo(f"polystream: {_one_line(redact(message))}", err=True)
    return int(exc.exit_code)


def _describe(exc: BaseException) -> str:
    """``exc``'s message, with its type when it is not polystream's."""
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, PolystreamError) else f"{type(exc).__name__}: {text}"


def _one_line(text: str) -> str:
    """``text`` with its line breaks and runs of spaces as single spaces."""
    return " ".join(text.split())

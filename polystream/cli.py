"""
The ``polystream`` command line (typer).

Every command takes ``--config PATH`` (or ``POLYSTREAM_CONFIG``); any key can
be overridden with ``POLYSTREAM_<SECTION>__<KEY>``. Logging is configured
here, once, before ``trio.run``.

Exit codes: 0 success; 1 runtime failure (database unreachable, port in
use, ...); 2 bad configuration or usage. ``status`` has its own codes (see
:func:`status`).
"""

from __future__ import annotations

import errno
import faulthandler
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, NoReturn

import structlog
import trio
import typer

from polystream.config import Config, load_config
from polystream.errors import ConfigError, PolystreamError, leaves
from polystream.logs import configure_logging
from polystream.ops.logcat import logs_command
from polystream.ops.service import service_app
from polystream.ops.systemd import Notifier

__all__ = ["app", "main"]

logger = structlog.get_logger(__name__)

app = typer.Typer(
    name="polystream",
    help="Keep PostgreSQL in step with Polymarket's live market feed.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
markets_app = typer.Typer(help="Market metadata.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(markets_app, name="markets")
app.add_typer(service_app, name="service")
app.command("logs")(logs_command)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="POLYSTREAM_CONFIG",
        help="TOML configuration file.",
        exists=False,
        dir_okay=False,
    ),
]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"polystream: {message}", err=True)
    raise typer.Exit(code)


def _setup(config_path: Path | None) -> Config:
    """Load the configuration and configure logging; exit 2 on a bad value."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(f"configuration error: {exc}", 2)
    configure_logging(config.log.level, config.log.format)
    return config


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


@app.command()
def run(config_path: ConfigOption = None) -> None:
    """Run the daemon in the foreground until SIGTERM/SIGINT (a second signal exits at once)."""
    config = _setup(config_path)
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


def _os_error(exc: BaseException, config: Config) -> str:
    """One line for an OSError at start-up (the health port taken, most often)."""
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return (
            f"cannot start: health.listen {config.health.listen} is already in use "
            "(another polystream run? set health.listen to another port)"
        )
    return f"cannot start: {exc}"


def _fail_started(notifier: Notifier, message: str) -> NoReturn:
    notifier.status(f"failed: {message}")
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
            async for signum in signals:
                if handle.stopping.is_set():
                    logger.warning("shutdown_forced", signal=signal.Signals(signum).name)
                    os._exit(1)
                logger.info("shutdown_requested", signal=signal.Signals(signum).name)
                notifier.stopping()
                handle.stop()


@db_app.command("migrate")
def db_migrate(config_path: ConfigOption = None) -> None:
    """Apply pending schema migrations (safe to run twice)."""
    config = _setup(config_path)
    try:
        with _database(config) as dsn:
            applied = _migrate(dsn)
    except PolystreamError as exc:
        _fail(str(exc))
    typer.echo(
        f"applied {len(applied)} migration(s)" + (": " + ", ".join(applied) if applied else "")
    )


@markets_app.command("import")
def markets_import(
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Files of Gamma market JSON (object, array or JSON lines), or with "
            "--from-gamma: Gamma ids, slugs or condition ids."
        ),
    ],
    from_gamma: Annotated[
        bool, typer.Option("--from-gamma", help="Fetch the markets from the Gamma API.")
    ] = False,
    config_path: ConfigOption = None,
) -> None:
    """Load Gamma market objects into ``markets`` (metadata; live prices are kept)."""
    config = _setup(config_path)
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


@app.command()
def replay(
    paths: Annotated[list[Path], typer.Argument(help="Capture files (.jsonl or .jsonl.gz).")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0 = any free port).")] = 8765,
    speed: Annotated[float, typer.Option(help="Playback speed: 2 = twice recorded pace.")] = 1.0,
    max_speed: Annotated[
        bool, typer.Option("--max-speed", help="Send as fast as clients read.")
    ] = False,
    loop: Annotated[bool, typer.Option("--loop", help="Start again at the end.")] = False,
    exit_at_end: Annotated[
        bool, typer.Option("--exit-at-end", help="Stop after the last frame.")
    ] = False,
    synthesize: Annotated[
        int,
        typer.Option(help="Extra synthetic assets, copies of recorded ones under new ids."),
    ] = 0,
    synthetic_events: Annotated[
        bool,
        typer.Option(
            "--synthetic-events/--no-synthetic-events",
            help="Send the copies' events too (else their snapshots only).",
        ),
    ] = True,
    fault: Annotated[
        list[str] | None,
        typer.Option(
            help="Inject a fault: ACTION:after=N or ACTION:every=N (frames); ACTION one of "
            "drop-tcp, drop-reset, drop-close, half-open, silence, stall, garbage, pause "
            "(repeatable)."
        ),
    ] = None,
    max_subscribe_bytes: Annotated[
        int, typer.Option(help="Close connections whose subscribe frame is larger (0 = off).")
    ] = 0,
    max_subscribe_ids: Annotated[
        int, typer.Option(help="Close connections subscribing more ids at once (0 = off).")
    ] = 0,
    oversize_close_delay: Annotated[
        float, typer.Option(help="Seconds before such a close (observed: 0.1-0.2).")
    ] = 0.15,
    storm_limit: Annotated[
        int, typer.Option(help="Answer HTTP 429 past this many new connections (0 = off).")
    ] = 0,
    storm_window: Annotated[float, typer.Option(help="... within this many seconds.")] = 1.0,
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
            help="Also answer CLOB REST (/book, /books, /prices, /midpoints) from the tape "
            "on this port (0 = any free port; the URL is logged as rest_url)."
        ),
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """Serve recorded frames as Polymarket's market channel, on ws://HOST:PORT/ws/market."""
    from polystream.replay import ReplayOptions, ScheduledFault, run_replay_cli

    _setup(config_path)
    if speed <= 0:
        _fail(f"--speed {speed}: expected a number > 0", 2)
    try:
        options = ReplayOptions(
            speed=speed,
            max_speed=max_speed,
            loop=loop,
            synthesize=synthesize,
            synthetic_events=synthetic_events,
            tick_changes=tick_changes,
            faults=[ScheduledFault.parse(spec) for spec in fault or ()],
            max_subscribe_bytes=max_subscribe_bytes,
            max_subscribe_ids=max_subscribe_ids,
            oversize_close_delay=oversize_close_delay,
            storm_limit=storm_limit,
            storm_window=storm_window,
        )
        run_replay_cli(
            paths, options, host=host, port=port, rest_port=rest_port, exit_at_end=exit_at_end
        )
    except (PolystreamError, OSError) as exc:
        _fail(str(exc))


@app.command()
def status(
    json_output: Annotated[bool, typer.Option("--json", help="Print the raw health JSON.")] = False,
    url: Annotated[
        str | None, typer.Option(help="Health URL (default: from health.listen).")
    ] = None,
    watch: Annotated[
        float | None, typer.Option("--watch", help="Refresh every SECONDS until Ctrl-C.")
    ] = None,
    config_path: ConfigOption = None,
) -> None:
    """
    Show the running daemon's state, read from its health endpoint.

    Exit codes: 0 healthy; 1 running but unhealthy; 3 not running
    (endpoint unreachable); 2 bad configuration. When the daemon is down and
    ``database.dsn`` is set, what the database knows is shown instead.
    """
    import time

    config = _setup(config_path)
    target = url or f"http://{config.health.listen}/health"
    while True:
        code = _status_once(config, target, json_output, clear=watch is not None)
        if watch is None:
            raise typer.Exit(code)
        try:
            time.sleep(watch)
        except KeyboardInterrupt:
            raise typer.Exit(code) from None


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
                else {"url": target, "reachable": False, "error": error}
            )
        )
        return code
    if document is not None:
        typer.echo(render_health(document))
        return code
    typer.echo(f"polystream is not running: {target} unreachable ({error})")
    if config.database.dsn:
        try:
            typer.echo(database_summary(config.database.dsn))
        except PolystreamError as exc:
            typer.echo(f"database: {exc}")
    return code


@app.command()
def demo(
    speed: Annotated[
        float, typer.Option(help="Replay speed (the capture spans 15 minutes).")
    ] = 30.0,
    config_path: ConfigOption = None,
) -> None:
    """Run the main job on the recorded demo capture and print the result."""
    from polystream.demo import run_demo

    config = _setup(config_path)
    try:
        with _database(config) as dsn:
            code = run_demo(config, dsn, speed=speed, config_path=config_path)
    except (PolystreamError, OSError) as exc:
        _fail(str(exc))
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except PolystreamError as exc:
        typer.echo(f"polystream: {exc}", err=True)
        sys.exit(1)

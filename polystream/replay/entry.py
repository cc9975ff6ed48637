"""
The entry points: load captures and serve them, from code or as ``polystream replay``.

Both build one :class:`ReplayServer` from capture files and a
:class:`ReplayOptions`: :func:`serve_replay` runs it in the caller's
nursery (tests, the demo), :func:`run_replay_cli` runs it under its own
``trio.run`` until Ctrl-C (the CLI, which builds the options from its flags).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Unpack

import attrs
import structlog
import trio

from polystream.errors import ReplayError
from polystream.replay.capture import Capture
from polystream.replay.options import ReplayChanges, ReplayOptions
from polystream.replay.server import ReplayServer
from polystream.replay.tape import Tape

__all__ = ["run_replay_cli", "serve_replay"]

logger = structlog.get_logger(__name__)


async def serve_replay(
    paths: Sequence[Path],
    options: ReplayOptions | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    rest_port: int | None = None,
    task_status: trio.TaskStatus[ReplayServer] = trio.TASK_STATUS_IGNORED,
    **changes: Unpack[ReplayChanges],
) -> None:
    """
    Load captures and serve them as Polymarket's market channel until cancelled.

    ``options`` (default :class:`ReplayOptions`), with ``changes`` (its
    fields as keywords: ``max_speed=True``) on top, say how it plays.
    ``task_status.started(server)`` is called once listening; ``server.port`` is
    the bound port and ``server.finished`` is set at the end of the tape.
    ``rest_port`` (0 = a free port) also serves the CLOB REST app
    (``server.rest_url``; :meth:`ReplayServer.serve`).

    Raises:
        ReplayError: a capture cannot be loaded (see :meth:`Capture.load`), or
            ``synthesize`` is negative.
        OSError: an address cannot be bound.
    """
    # Loading blocks the event loop once, before anything else runs in it.
    server = _build_server(paths, attrs.evolve(options or ReplayOptions(), **changes))
    await server.serve(host=host, port=port, rest_port=rest_port, task_status=task_status)


async def _serve_fake_clob(
    host: str,
    port: int,
    env_file: Path | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The fake CLOB for a new throwaway account, its credentials in ``env_file``."""
    import os

    from polystream.replay.orders import FakeClob
    from polystream.venue.orders import throwaway_account

    account, environ = throwaway_account()
    fake = FakeClob.for_account(account.credentials, account.address)
    if env_file is not None:
        descriptor = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            handle.writelines(f"{name}={value}\n" for name, value in environ.items())
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(fake.serve, host=host, port=port))
        logger.info("clob_listening", clob_url=fake.url, address=account.address, env_file=env_file)
        task_status.started()


def run_replay_cli(
    paths: Iterable[Path],
    options: ReplayOptions | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    rest_port: int | None = None,
    exit_at_end: bool = False,
    clob_port: int | None = None,
    clob_env: Path | None = None,
) -> None:
    """
    Run the replay server (``polystream replay PATH...``) until Ctrl-C.

    With ``clob_port`` (0 = a free port) also serve the fake CLOB trading
    API (:class:`~polystream.replay.orders.FakeClob`, logged as ``clob_url``)
    for a throwaway account whose ``POLYMARKET_*`` variables are written to
    ``clob_env`` (mode 0600; an ``EnvironmentFile`` for ``polystream run`` in
    ``execute.mode = "clob"``).

    Logs ``replay_listening`` with the URL (and ``rest_url`` with
    ``rest_port``, 0 = a free port), then ``replay_finished`` with a summary
    at the end of the tape. The server keeps serving the final books
    afterwards unless ``exit_at_end``: then it closes every connection
    (1001) and returns. Configure structlog before calling.

    Raises:
        ReplayError: a capture cannot be loaded, ``synthesize`` is negative,
            or the address cannot be bound.
    """
    server = _build_server(paths, options or ReplayOptions())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(server.serve, host=host, port=port, rest_port=rest_port))
            if clob_port is not None:
                await nursery.start(partial(_serve_fake_clob, host, clob_port, clob_env))
            if exit_at_end:
                await server.finished.wait()
                await server.close_clients()
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except* OSError as group:
        reasons = "; ".join(str(exc) for exc in _leaves(group))
        raise ReplayError(f"cannot serve on {host}:{port}: {reasons}") from group
    except* KeyboardInterrupt:
        logger.info("replay_stopped")


def _build_server(paths: Iterable[Path], options: ReplayOptions) -> ReplayServer:
    """Load the captures and build the server both entry points run."""
    return ReplayServer(Tape(Capture.load(list(paths))), options)


def _leaves(error: BaseException) -> Iterable[BaseException]:
    """The exceptions inside (nested) exception groups."""
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            yield from _leaves(inner)
    else:
        yield error

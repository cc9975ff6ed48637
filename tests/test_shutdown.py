"""
SIGTERM in the middle of a maximum-speed replay: the daemon (a real
``polystream run`` process) stops intake, applies what it had received,
flushes, exits 0, and the database holds the final state of every asset as
of the last frame it applied.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import psycopg
import trio
from cli_process import free_port
from expected import UPDOWN, books_after, hold_every_updown_token

from polystream.replay import ReplayServer, serve_replay


async def test_sigterm_mid_replay_keeps_every_asset_seen(db_dsn: str, tmp_path: Path) -> None:
    hold_every_updown_token(db_dsn)
    log_path = tmp_path / "daemon.log"
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            server: ReplayServer = await nursery.start(
                lambda task_status: serve_replay(
                    [Path(f"{UPDOWN}.jsonl.gz")], max_speed=True, task_status=task_status
                )
            )
            env = {k: v for k, v in os.environ.items() if not k.startswith("POLYSTREAM_")}
            env.update(
                POLYSTREAM_DATABASE__DSN=db_dsn,
                POLYSTREAM_FEED__URL=f"ws://127.0.0.1:{server.port}/ws/market",
                POLYSTREAM_HEALTH__LISTEN=f"127.0.0.1:{free_port()}",
                POLYSTREAM_LOG__FORMAT="json",
                POLYSTREAM_PIPELINE__DEBOUNCE="5",  # positions pending at the signal
            )
            with log_path.open("wb") as log:
                daemon = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "polystream", "run"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
                while server.stats.frames_sent < 4000:
                    await trio.sleep(0.01)
                daemon.send_signal(signal.SIGTERM)
                code = await daemon.wait()
            nursery.cancel_scope.cancel()
    raw = log_path.read_bytes().splitlines()
    assert code == 0, raw[-5:]
    assert all(line.startswith(b"{") for line in raw if line), raw
    lines = [orjson.loads(line) for line in raw if line]
    (stopped,) = [line for line in lines if line["event"] == "daemon_stopped"]
    applied = stopped["frames_applied"]
    # Frame 1 is the replay's answer to the subscribe (books as they stood
    # before the tape started); then the capture's lines, in order.
    seen = applied - 1
    assert 1000 < seen < 14_342, "the signal must land mid-replay"
    books = books_after(UPDOWN, seen)

    with psycopg.connect(db_dsn) as conn:
        positions: list[tuple[Any, ...]] = conn.execute(
            "SELECT token_id, current_price FROM positions"
        ).fetchall()
        markets = conn.execute(
            "SELECT clob_token_ids, outcome_prices, best_bid, best_ask FROM markets"
        ).fetchall()
    for token, price in positions:
        book = books.get(token)
        want = None if book is None else book.top().display
        assert price == want, token
    for tokens, prices, bid, ask in markets:
        first = books.get(tokens[0])
        if first is not None and first.has_book:
            assert (bid, ask) == (first.best_bid, first.best_ask)
        for token, shown in zip(tokens, prices or [], strict=False):
            book = books.get(token)
            if book is not None and book.top().display is not None:
                assert Decimal(shown) == book.top().display, token

"""``/metrics`` parses with prometheus_client's own parser and moves when frames arrive."""

from __future__ import annotations

from pathlib import Path

import httpx
import psycopg
import trio
from expected import UPDOWN, insert_position
from prometheus_client.parser import text_string_to_metric_families

from polystream.app import App, run
from polystream.config import Config, FeedConfig, HealthConfig, PipelineConfig
from polystream.ops.status import render_health
from polystream.replay import ReplayServer, serve_replay
from polystream.store.markets import import_markets_file


def _samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_parse_and_move(db_dsn: str) -> None:
    with psycopg.connect(db_dsn) as conn:
        import_markets_file(conn, Path(f"{UPDOWN}.markets.json"))
        insert_position(conn, "900003", "Up", "10", "0.5")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            server: ReplayServer = await nursery.start(
                lambda task_status: serve_replay(
                    [Path(f"{UPDOWN}.jsonl.gz")], max_speed=True, task_status=task_status
                )
            )
            config = Config(
                feed=FeedConfig(url=f"ws://127.0.0.1:{server.port}/ws/market"),
                pipeline=PipelineConfig(market_flush_interval=0.05, debounce=0.1),
                health=HealthConfig(listen="127.0.0.1:0"),
            )
            app: App = await nursery.start(run, config, db_dsn)
            url = app.health_urls[0] + "/metrics"
            before = await trio.to_thread.run_sync(_samples, url)
            await server.finished.wait()
            while app.stats.rows_written["positions"] == 0:
                await trio.sleep(0.05)
            after = await trio.to_thread.run_sync(_samples, url)
            health = app.stats.health()
            app.stop()
            nursery.cancel_scope.cancel()

    frames = ("polystream_frames_total", (("shard", "0"),))
    assert after[frames] > before.get(frames, 0) > -1
    assert after[frames] == app.stats.frames
    assert after[("polystream_events_total", (("type", "price_change"),))] > 1000
    assert after[("polystream_subscribed_assets", (("shard", "0"),))] == 2
    assert after[("polystream_covered_assets", (("shard", "0"),))] == 2
    assert after[("polystream_rows_written_total", (("table", "markets"),))] > 0
    assert after[("polystream_database_connected", ())] == 1
    calls = ("polystream_db_call_seconds_count", (("link", "markets"),))
    assert after[calls] > before.get(calls, 0)
    assert after[("polystream_queue_depth", (("queue", "router"),))] >= 0

    # Book integrity: the replay's subscribe snapshots carry the venue's hash (verified);
    # the capture's own recorded books carry made-up hashes and no tick size (unverifiable).
    hashes = {
        result: after[("polystream_book_hashes_total", (("result", result), ("shard", "0")))]
        for result in ("verified", "mismatched", "unverifiable")
    }
    assert hashes == {"verified": 2, "mismatched": 0, "unverifiable": 2}
    assert health["book_hashes"] == hashes == health["shards"][0]["book_hashes"]
    assert "2/0/2" in render_health(health)
    assert "book hashes: mismatched 0, unverifiable 2, verified 2" in render_health(health)

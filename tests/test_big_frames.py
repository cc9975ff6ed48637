"""
Big frames (an initial dump: one JSON array of hundreds of books) are parsed
and applied in slices that yield (issue 12): same result as in one go, the
same errors for a malformed frame, and the venue's hashes still verified.
"""

from __future__ import annotations

import contextlib
import hashlib
from decimal import Decimal
from typing import Any

import orjson
import pytest
import trio

from polystream.book import Books
from polystream.errors import MalformedFrame
from polystream.feed.pool import FrameEvents, run_in_slices
from polystream.feed.protocol import BookSnapshot, FrameParser, Level, Levels, book_hash

D = Decimal


def _book(n: int, **extra: Any) -> dict[str, Any]:
    bids = [{"price": f"0.{p:03d}", "size": f"{p + n}.5"} for p in range(100, 400, 7)]
    asks = [{"price": f"0.{p:03d}", "size": str(p)} for p in range(900, 400, -9)]
    obj: dict[str, Any] = {
        "market": f"0x{n:064x}",
        "asset_id": str(10**76 + n),
        "timestamp": "1765450800000",
        "hash": "",
        "bids": bids,
        "asks": asks,
        "tick_size": "0.001",
        "last_trade_price": "0.401",
        "event_type": "book",
    }
    obj["hash"] = book_hash(obj)
    obj.update(extra)
    return obj


def _dump(count: int = 300) -> bytes:
    return orjson.dumps([_book(n) for n in range(count)])


def _sliced(parser: FrameParser, raw: str | bytes) -> tuple[Any, int]:
    steps = parser.parse_in_slices(raw, budget=0.0)  # yield after every piece
    slices = 0
    try:
        while True:
            next(steps)
            slices += 1
    except StopIteration as done:
        return done.value, slices


@pytest.mark.parametrize("as_text", [False, True])
def test_sliced_parse_equals_whole_parse(as_text: bool) -> None:
    raw: str | bytes = _dump().decode() if as_text else _dump()
    whole = FrameParser().parse(raw)
    sliced, slices = _sliced(FrameParser(), raw)
    assert slices >= 299  # one piece a slice: the array was cut, not decoded whole
    assert sliced == whole
    assert all(isinstance(e, BookSnapshot) and e.integrity == "verified" for e in whole.events)


def test_a_cut_inside_a_string_falls_back_to_the_whole_frame() -> None:
    # the separator '},{"market"' inside a string value: the piece before it cannot decode
    tricky = _book(1, note='x"},{"market":"y')
    tricky["note"] = '},{"market":"y'
    raw = orjson.dumps([_book(0, note='},{"market":"'), tricky, _book(2)])
    whole = FrameParser().parse(raw)
    sliced, _ = _sliced(FrameParser(), raw)
    assert sliced == whole and len(whole.events) == 3


def test_a_malformed_big_frame_is_refused_as_a_whole() -> None:
    raw = _dump(50)[:-2] + b"]"  # truncated: the last object is cut short
    with pytest.raises(MalformedFrame) as whole:
        FrameParser().parse(raw)
    with pytest.raises(MalformedFrame) as sliced:
        _sliced(FrameParser(), raw)
    assert (sliced.value.kind, sliced.value.detail) == (whole.value.kind, whole.value.detail)
    assert sliced.value.kind == "invalid_json"


def test_bad_entries_of_a_big_frame_are_reported_with_context() -> None:
    bad = _book(3)
    bad["bids"][2]["price"] = "1.5"
    raw = orjson.dumps([_book(0), bad, {"event_type": "book"}, 7, _book(4)])
    whole = FrameParser().parse(raw)
    sliced, _ = _sliced(FrameParser(), raw)
    assert (sliced.events, sliced.event_types) == (whole.events, whole.event_types)
    assert [(p.kind, p.detail) for p in sliced.problems] == [
        (p.kind, p.detail) for p in whole.problems
    ]
    assert [p.kind for p in whole.problems] == [
        "price_out_of_range",
        "missing_field",
        "not_an_object",
    ]
    assert whole.problems[0].detail.startswith("book: ")


def test_levels_are_made_on_demand() -> None:
    levels = Levels([D("0.1"), D("0.2")], [D(5), D(0)])
    assert len(levels) == 2 and levels[1] == Level(D("0.2"), D(0))
    assert levels == (Level(D("0.1"), D(5)), Level(D("0.2"), D(0)))
    assert levels[:1] == Levels([D("0.1")], [D(5)]) and Levels() == ()
    assert levels + Levels() == tuple(levels)
    assert Levels.of([Level(D("0.3"), D(1))]).prices == (D("0.3"),)
    with pytest.raises(ValueError):
        Levels([D(1)], [])


def test_hash_of_levels_not_in_the_venue_shape() -> None:
    # levels with their keys in the other order: the quick preimage differs, the
    # canonical one (rebuilt {"price", "size"}) is still the venue's hash
    obj = _book(5)
    obj["bids"] = [{"size": lv["size"], "price": lv["price"]} for lv in obj["bids"]]
    (book,) = FrameParser().parse(orjson.dumps(obj)).events
    assert isinstance(book, BookSnapshot) and book.integrity == "verified"
    obj["hash"] = hashlib.sha1(b"other", usedforsecurity=False).hexdigest()
    (book,) = FrameParser().parse(orjson.dumps(obj)).events
    assert isinstance(book, BookSnapshot) and book.integrity == "mismatched"


def test_snapshot_sides_drop_empty_and_unquotable_levels() -> None:
    obj = _book(6)
    obj["bids"] += [{"price": "0", "size": "5"}, {"price": "0.2", "size": "0"}]
    obj["asks"] += [{"price": "1", "size": "5"}, {"price": "0.5", "size": "1"}]
    (snapshot,) = FrameParser().parse(orjson.dumps(obj)).events
    assert isinstance(snapshot, BookSnapshot)
    books = Books()
    books.apply([snapshot])
    book = books[snapshot.asset_id]
    assert D(0) not in book.bids.levels and D(1) not in book.asks.levels
    assert D("0.2") not in book.bids.levels
    assert book.best_bid == D("0.394") and book.best_ask == D("0.405")
    assert list(book.asks.levels) == sorted(book.asks.levels)


async def test_run_in_slices_checkpoints() -> None:
    raw = _dump(40)
    parsed = await run_in_slices(FrameParser().parse_in_slices(raw, budget=0.0))
    assert len(parsed.events) == 40


async def test_router_applies_a_big_frame_in_slices_and_says_so() -> None:
    from polystream.catalog import Catalog
    from polystream.pipeline.router import Router

    events = FrameParser().parse(_dump(64)).events
    applied: list[str] = []

    class _Writer:
        stats: Any = None

        def touch(self, *args: Any) -> None:
            applied.append(str(args[0]))

    books = Books()
    router = Router(books=books, catalog=Catalog(), markets=_Writer(), positions=_Writer())  # type: ignore[arg-type]
    send, receive = trio.open_memory_channel[list[Any]](4)
    frame = FrameEvents(events)
    async with send:
        await send.send(frame)
        await send.send([])
    await router.run(receive)
    assert frame.applied.is_set() and router.frames_applied == 2
    assert len(books) == 64 and len(applied) == 2 * 64


async def test_big_messages_are_read_one_connection_at_a_time() -> None:
    """
    Two ``sansio`` connections sharing a gate, each sent one 1 MB message at
    once (as the venue sends 50 dumps at start-up): while the first reader
    holds the gate (its frame not yet applied), the second reads no further
    than the gate's threshold, so its message is not whole in memory; once the
    first leaves, the second gets its message, intact. Real loopback server.
    """
    from trio_websocket import ConnectionClosed, serve_websocket

    from polystream.feed.transport import MessageGate, open_transport

    payloads = ["[" + ",".join([f'{{"n":{i}}}'] * 90_000) + "]" for i in range(2)]

    async def handler(request: Any) -> None:
        ws = await request.accept()
        await ws.send_message(payloads[int(request.path.rsplit("/", 1)[-1])])
        with contextlib.suppress(ConnectionClosed):
            await ws.get_message()  # until the client closes

    gate = MessageGate(64 * 1024)
    got: dict[int, bytes | str | bytearray] = {}
    first_held, first_done = trio.Event(), trio.Event()

    async def read(transport: Any, number: int) -> None:
        got[number] = await transport.receive()
        if number == 0:
            assert gate.held()  # entered inside receive, by this task
            first_held.set()
            await first_done.wait()
        gate.leave()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        url = f"ws://127.0.0.1:{server.port}/ws/"
        size = 4 * 1024 * 1024
        async with (
            open_transport("sansio", url + "0", max_message_size=size, gate=gate) as first,
            open_transport("sansio", url + "1", max_message_size=size, gate=gate) as second,
        ):
            async with trio.open_nursery() as readers:
                readers.start_soon(read, first, 0)
                with trio.fail_after(10):
                    await first_held.wait()
                readers.start_soon(read, second, 1)
                await trio.sleep(0.3)  # the second message is all sent by now
                assert 1 not in got
                first_done.set()
            assert got == {0: payloads[0].encode(), 1: payloads[1].encode()}
        nursery.cancel_scope.cancel()


async def test_the_gate_belongs_to_the_task_that_entered_it() -> None:
    """Entering twice is one entry, and only the task holding it can leave it."""
    from polystream.feed.transport import MessageGate

    gate = MessageGate(1)
    await gate.enter()
    await gate.enter()  # no second acquire: would deadlock
    assert gate.held()
    entered = trio.Event()

    async def other() -> None:
        gate.leave()  # not the owner: nothing happens
        await gate.enter()
        entered.set()
        gate.leave()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)
        await trio.sleep(0.05)
        assert gate.held() and not entered.is_set()
        gate.leave()
        with trio.fail_after(5):
            await entered.wait()
    assert not gate.held()

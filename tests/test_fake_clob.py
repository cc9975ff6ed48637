"""
The fake CLOB V2 trading API (polystream.replay.orders) and the offline
signing path (polystream.venue.orders): signatures, L2 auth, scripted
outcomes, queries, heartbeats and the dead-man switch, exact amounts.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing
from eth_account import Account
from py_clob_client_v2.order_builder.builder import (  # type: ignore[import-untyped]
    ROUNDING_CONFIG,
    OrderBuilder,
)

from polystream.replay.orders import FakeClob, Outcome
from polystream.venue.orders import (
    ApiCredentials,
    SignedOrder,
    TradingKey,
    batch_text,
    l2_headers,
    order_amounts,
    order_id_of,
    sign_order,
)

TOKEN = "71321045679252212594626385532706912750332728571942532289631379312455583992563"
OTHER = "2"
CONDITION = "0x" + "ab" * 32
TIMEOUT = 30
D = Decimal


def _credentials() -> ApiCredentials:
    secret = base64.urlsafe_b64encode(os.urandom(32)).decode()
    return ApiCredentials(str(uuid.uuid4()), secret, "pass-phrase")


@pytest.fixture
def key() -> TradingKey:
    return TradingKey.create()


@pytest.fixture
def creds() -> ApiCredentials:
    return _credentials()


@pytest.fixture
async def fake(nursery: trio.Nursery, key: TradingKey, creds: ApiCredentials) -> FakeClob:
    clob = FakeClob.for_account(creds, key.address, markets={TOKEN: CONDITION})
    served: FakeClob = await nursery.start(clob.serve)
    return served


@pytest.fixture
async def http(fake: FakeClob) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fake.url, timeout=5) as client:
        yield client


def _order(key: TradingKey, creds: ApiCredentials, **changes: Any) -> SignedOrder:
    args: dict[str, Any] = {
        "token_id": TOKEN,
        "side": "BUY",
        "price": D("0.57"),
        "size": D("10.33"),
        "tick_size": "0.01",
        "neg_risk": False,
    }
    return sign_order(key, creds, **(args | changes))


async def _send(
    http: httpx.AsyncClient,
    key: TradingKey,
    creds: ApiCredentials,
    method: str,
    path: str,
    text: str | None = None,
    **kwargs: Any,
) -> httpx.Response:
    headers = l2_headers(creds, key.address, method, path, text)
    headers["content-type"] = "application/json"
    with trio.fail_after(TIMEOUT):
        return await http.request(method, path, content=text, headers=headers, **kwargs)


# --- signing and placing ---


async def test_signed_buy_and_sell_are_accepted_and_recorded(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    buy = _order(key, creds)
    sell = _order(key, creds, side="SELL", price=D("0.42"), size=D("3"))
    assert buy.body["order"]["makerAmount"] == "5888100"  # 10.33 x 0.57 USDC
    assert buy.body["order"]["takerAmount"] == "10330000"
    assert sell.body["order"]["makerAmount"] == "3000000"
    assert sell.body["order"]["takerAmount"] == "1260000"

    answers = [(await _send(http, key, creds, "POST", "/order", o.text)) for o in (buy, sell)]

    assert [a.status_code for a in answers] == [200, 200]
    first, second = (a.json() for a in answers)
    assert first["orderID"] == buy.order_id and second["orderID"] == sell.order_id
    assert first["success"] is True and first["errorMsg"] == "" and first["status"] == "matched"
    assert (first["makingAmount"], first["takingAmount"]) == ("5.8881", "10.33")
    assert (second["makingAmount"], second["takingAmount"]) == ("3", "1.26")
    assert len(first["tradeIDs"]) == 1 and len(first["transactionsHashes"]) == 1
    records = [r for r in fake.requests if r.path == "/order"]
    assert [(r.signer, r.order_id, r.outcome, r.status) for r in records] == [
        (key.address, buy.order_id, "fill", 200),
        (key.address, sell.order_id, "fill", 200),
    ]
    assert records[0].body == buy.body
    assert fake.orders[buy.order_id].status == "MATCHED"
    assert fake.orders[buy.order_id].price == D("0.57")
    assert [t.order_id for t in fake.trades] == [buy.order_id, sell.order_id]
    assert fake.counts["fill"] == 2


async def test_order_id_is_the_eip712_digest(key: TradingKey, creds: ApiCredentials) -> None:
    signed = _order(key, creds, neg_risk=True)
    assert signed.order_id == order_id_of(signed.body["order"], neg_risk=True)
    assert signed.order_id != order_id_of(signed.body["order"], neg_risk=False)
    assert len(signed.order_id) == 66 and signed.order_id.startswith("0x")
    assert orjson.loads(signed.text) == signed.body
    assert signed.text.startswith('{"order":{"salt":')


async def test_neg_risk_token_needs_the_neg_risk_domain(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    fake.neg_risk[TOKEN] = True
    wrong = _order(key, creds, neg_risk=False)
    right = _order(key, creds, neg_risk=True)

    refused = await _send(http, key, creds, "POST", "/order", wrong.text)
    accepted = await _send(http, key, creds, "POST", "/order", right.text)

    assert (refused.status_code, refused.json()) == (400, {"error": "invalid signature"})
    assert accepted.status_code == 200 and accepted.json()["orderID"] == right.order_id


async def test_proxy_order_names_the_funder_as_maker(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    funder = "0x1111111111111111111111111111111111111111"
    signed = _order(key, creds, signature_type=2, funder=funder)

    answer = await _send(http, key, creds, "POST", "/order", signed.text)

    assert answer.status_code == 200
    assert signed.body["order"]["maker"] == funder
    assert signed.body["order"]["signer"] == key.address
    assert fake.orders[signed.order_id].maker == funder
    assert fake.requests[-1].signer == key.address


@pytest.mark.parametrize(
    ("field", "value"),
    [("makerAmount", "5888101"), ("tokenId", OTHER), ("salt", 1), ("signature", "0x1234")],
)
async def test_tampered_order_is_refused(
    fake: FakeClob,
    http: httpx.AsyncClient,
    key: TradingKey,
    creds: ApiCredentials,
    field: str,
    value: object,
) -> None:
    body = _order(key, creds).body
    body["order"][field] = value
    text = orjson.dumps(body).decode()

    answer = await _send(http, key, creds, "POST", "/order", text)

    assert (answer.status_code, answer.json()) == (400, {"error": "invalid signature"})
    assert fake.orders == {} and fake.trades == []
    assert fake.requests[-1].outcome == "invalid_signature"


async def test_order_signed_by_another_key_is_refused(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    stranger = _order(TradingKey.create(), creds)

    answer = await _send(http, key, creds, "POST", "/order", stranger.text)

    assert answer.status_code == 400
    assert answer.json() == {
        "error": "the order signer address has to be the address of the API KEY"
    }


def _bad_headers(kind: str, creds: ApiCredentials, key: TradingKey, text: str) -> dict[str, str]:
    if kind == "secret":
        return l2_headers(_credentials(), key.address, "POST", "/order", text) | {
            "POLY_API_KEY": creds.api_key,
            "POLY_PASSPHRASE": creds.api_passphrase,
        }
    headers = l2_headers(creds, key.address, "POST", "/order", text)
    if kind == "body":
        return l2_headers(creds, key.address, "POST", "/order", text + " ")
    if kind == "path":
        return l2_headers(creds, key.address, "POST", "/orders", text)
    if kind == "passphrase":
        return headers | {"POLY_PASSPHRASE": "wrong"}
    if kind == "api_key":
        return headers | {"POLY_API_KEY": str(uuid.uuid4())}
    if kind == "address":
        return headers | {"POLY_ADDRESS": TradingKey.create().address}
    if kind == "milliseconds":
        stamp = int(time.time() * 1000)
        return l2_headers(creds, key.address, "POST", "/order", text, timestamp=stamp)
    headers.pop("POLY_SIGNATURE")
    return headers


@pytest.mark.parametrize(
    "kind",
    ["secret", "body", "path", "passphrase", "api_key", "address", "milliseconds", "missing"],
)
async def test_bad_l2_auth_is_401(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials, kind: str
) -> None:
    text = _order(key, creds).text
    headers = _bad_headers(kind, creds, key, text)

    with trio.fail_after(TIMEOUT):
        answer = await http.post("/order", content=text, headers=headers)

    assert (answer.status_code, answer.json()) == (401, {"error": "Unauthorized/Invalid api key"})
    assert fake.orders == {}
    assert fake.counts["unauthorized"] == 1


async def test_duplicate_order_is_refused(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    fake.default = Outcome.live()
    signed = _order(key, creds)

    first = await _send(http, key, creds, "POST", "/order", signed.text)
    again = await _send(http, key, creds, "POST", "/order", signed.text)

    assert first.status_code == 200
    assert again.status_code == 400
    assert again.json() == {"error": f"order {signed.order_id} is invalid. Duplicated."}
    assert fake.counts["duplicate"] == 1 and len(fake.orders) == 1


async def test_price_off_the_market_tick_is_refused(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    fake.tick_sizes[TOKEN] = "0.1"
    signed = _order(key, creds)  # 0.57 on a 0.01 grid

    answer = await _send(http, key, creds, "POST", "/order", signed.text)

    assert answer.status_code == 400
    assert "breaks minimum tick size rule: 0.1" in answer.json()["error"]


# --- scripted outcomes ---


async def test_partial_fill_rests_the_rest(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    fake.script.append(Outcome.partial("0.4"))
    signed = _order(key, creds, size=D("10"))

    answer = (await _send(http, key, creds, "POST", "/order", signed.text)).json()

    assert answer["status"] == "matched"
    assert (answer["makingAmount"], answer["takingAmount"]) == ("2.28", "4")
    kept = fake.orders[signed.order_id]
    assert (kept.status, kept.size_matched, kept.remaining) == ("LIVE", D(4), D(6))
    page = (await _send(http, key, creds, "GET", "/data/orders")).json()
    assert page["next_cursor"] == "LTE=" and page["count"] == 1
    (row,) = page["data"]
    assert (row["id"], row["original_size"], row["size_matched"], row["price"]) == (
        signed.order_id,
        "10",
        "4",
        "0.57",
    )
    assert fake.counts["partial"] == 1


async def test_live_order_rests_unmatched(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    fake.script.append(Outcome.live())
    signed = _order(key, creds)

    answer = (await _send(http, key, creds, "POST", "/order", signed.text)).json()

    assert answer["status"] == "live" and answer["tradeIDs"] == []
    assert (answer["makingAmount"], answer["takingAmount"]) == ("", "")
    assert [o.order_id for o in fake.open_orders()] == [signed.order_id]
    assert fake.trades == []


async def test_reject_is_400_and_not_kept(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    fake.script.append(Outcome.reject())
    signed = _order(key, creds)

    refused = await _send(http, key, creds, "POST", "/order", signed.text)
    retried = await _send(http, key, creds, "POST", "/order", signed.text)

    assert (refused.status_code, refused.json()) == (
        400,
        {"error": "not enough balance / allowance"},
    )
    assert retried.status_code == 200  # a refused order is not indexed
    assert [r.outcome for r in fake.requests] == ["reject", "fill"]


@pytest.mark.parametrize(
    ("outcome", "status", "error"),
    [
        (Outcome.rate_limited(2), 429, "Too Many Requests"),
        (
            Outcome.unavailable(),
            503,
            "Trading is currently disabled. Check polymarket.com for updates",
        ),
    ],
)
async def test_request_level_refusals_keep_nothing(
    fake: FakeClob,
    http: httpx.AsyncClient,
    key: TradingKey,
    creds: ApiCredentials,
    outcome: Outcome,
    status: int,
    error: str,
) -> None:
    fake.script.append(outcome)
    signed = _order(key, creds)

    refused = await _send(http, key, creds, "POST", "/order", signed.text)
    retried = await _send(http, key, creds, "POST", "/order", signed.text)

    assert (refused.status_code, refused.json()) == (status, {"error": error})
    if status == 429:
        assert refused.headers["retry-after"] == "2"
    assert retried.status_code == 200
    assert fake.counts[outcome.kind] == 1 and fake.counts["fill"] == 1


async def test_timeout_holds_the_request_and_keeps_nothing(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    fake.script.append(Outcome.timeout())
    signed = _order(key, creds)

    with pytest.raises(httpx.ReadTimeout):
        await _send(http, key, creds, "POST", "/order", signed.text, timeout=0.3)
    retried = await _send(http, key, creds, "POST", "/order", signed.text)

    assert retried.status_code == 200 and retried.json()["orderID"] == signed.order_id
    assert [(r.outcome, r.status) for r in fake.requests] == [("timeout", 0), ("fill", 200)]


@pytest.mark.parametrize("close", [False, True])
async def test_accept_then_drop_keeps_the_order_unanswered(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials, close: bool
) -> None:
    fake.script.append(Outcome.accept_then_drop(close=close))
    signed = _order(key, creds)

    expected = httpx.RemoteProtocolError if close else httpx.ReadTimeout
    with pytest.raises(expected):
        await _send(http, key, creds, "POST", "/order", signed.text, timeout=0.3)
    again = await _send(http, key, creds, "POST", "/order", signed.text)
    found = await _send(http, key, creds, "GET", f"/data/order/{signed.order_id}")

    assert fake.orders[signed.order_id].status == "MATCHED"
    assert [t.order_id for t in fake.trades] == [signed.order_id]
    assert again.json() == {"error": f"order {signed.order_id} is invalid. Duplicated."}
    assert found.json()["status"] == "MATCHED"
    assert fake.requests[0].outcome == "accept_then_drop" and fake.requests[0].status == 0


@pytest.mark.parametrize(
    ("order_type", "outcome", "status", "kept_status"),
    [
        ("FOK", Outcome.partial("0.5"), 400, "CANCELED"),
        ("FOK", Outcome.fill(), 200, "MATCHED"),
        ("FAK", Outcome.live(), 400, "CANCELED"),
        ("FAK", Outcome.partial("0.5"), 200, "CANCELED"),
    ],
)
async def test_fill_or_kill_and_fill_and_kill(
    fake: FakeClob,
    http: httpx.AsyncClient,
    key: TradingKey,
    creds: ApiCredentials,
    order_type: str,
    outcome: Outcome,
    status: int,
    kept_status: str,
) -> None:
    fake.script.append(outcome)
    signed = _order(key, creds, order_type=order_type, size=D("10"))

    answer = await _send(http, key, creds, "POST", "/order", signed.text)

    assert answer.status_code == status
    kept = fake.orders[signed.order_id]
    assert kept.status == kept_status
    if status == 400:
        assert "killed" in answer.json()["error"] and kept.size_matched == 0
    elif order_type == "FAK":
        assert answer.json()["takingAmount"] == "5" and kept.size_matched == 5


async def test_post_only_order_that_would_cross_is_refused(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    signed = _order(key, creds, post_only=True)

    answer = await _send(http, key, creds, "POST", "/order", signed.text)

    assert answer.json() == {"error": "invalid post-only order: order crosses book"}
    assert fake.orders == {}


async def test_batch_answers_per_order(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    fake.script.extend([Outcome.fill(), Outcome.reject("invalid expiration"), Outcome.live()])
    orders = [_order(key, creds, size=D(n)) for n in ("6", "7", "8")]

    answer = await _send(http, key, creds, "POST", "/orders", batch_text(orders))
    too_many = await _send(http, key, creds, "POST", "/orders", orjson.dumps([{}] * 16).decode())

    assert answer.status_code == 200
    items = answer.json()
    assert [(i["success"], i["status"], i["errorMsg"]) for i in items] == [
        (True, "matched", ""),
        (False, "", "invalid expiration"),
        (True, "live", ""),
    ]
    assert [i["orderID"] for i in items] == [o.order_id for o in orders]
    assert fake.requests[0].outcomes == ("fill", "reject", "live")
    assert fake.requests[0].signers == (key.address,) * 3
    assert too_many.json() == {"error": "Too many orders in payload: 16, max allowed: 15"}


async def test_minimum_order_size(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    fake.min_order_size = D(5)
    small = _order(key, creds, size=D("4.99"))
    taker = _order(key, creds, size=D("4.99"), order_type="FAK")

    refused = await _send(http, key, creds, "POST", "/order", small.text)
    accepted = await _send(http, key, creds, "POST", "/order", taker.text)

    assert refused.json()["error"] == (
        f"order {small.order_id} is invalid. Size (4.99) lower than the minimum: 5"
    )
    assert accepted.status_code == 200


# --- queries and cancels ---


async def test_order_and_trade_queries(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    fake.script.extend([Outcome.live(), Outcome.live(), Outcome.fill()])
    resting = _order(key, creds)
    other = _order(key, creds, token_id=OTHER)
    filled = _order(key, creds, side="SELL", price=D("0.6"))
    for signed in (resting, other, filled):
        await _send(http, key, creds, "POST", "/order", signed.text)

    async def get(path: str, **params: str) -> Any:
        answer = await _send(http, key, creds, "GET", path, params=params)
        assert answer.status_code == 200
        return answer.json()

    assert (await get(f"/data/order/{resting.order_id}"))["status"] == "LIVE"
    assert (await get(f"/order/{filled.order_id}"))["status"] == "MATCHED"
    assert await get("/data/order/0x" + "00" * 32) is None
    assert [o["id"] for o in (await get("/data/orders"))["data"]] == [
        resting.order_id,
        other.order_id,
    ]
    assert [o["id"] for o in (await get("/data/orders", asset_id=OTHER))["data"]] == [
        other.order_id
    ]
    assert [o["id"] for o in (await get("/data/orders", market=CONDITION))["data"]] == [
        resting.order_id
    ]
    assert (await get("/data/orders", id=filled.order_id))["data"] == []
    (trade,) = (await get("/data/trades", maker_address=key.address.lower()))["data"]
    assert trade["taker_order_id"] == filled.order_id and trade["trader_side"] == "TAKER"
    assert (trade["size"], trade["price"], trade["status"]) == ("10.33", "0.6", "MINED")
    assert (await get("/data/trades", asset_id=OTHER))["data"] == []
    assert (await get("/data/trades", after=str(int(time.time()) + 60)))["data"] == []
    assert (await get("/data/trades", id=trade["id"]))["count"] == 1

    fake.terminal_orders_visible = False
    assert await get(f"/data/order/{filled.order_id}") is None


async def test_cancels(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    fake.default = Outcome.live()
    a, b, c, d = (_order(key, creds, size=D(n)) for n in ("5", "6", "7", "8"))
    e = _order(key, creds, token_id=OTHER)
    for signed in (a, b, c, d, e):
        await _send(http, key, creds, "POST", "/order", signed.text)

    async def delete(path: str, body: object = None) -> Any:
        text = None if body is None else orjson.dumps(body).decode()
        return (await _send(http, key, creds, "DELETE", path, text)).json()

    one = await delete("/order", {"orderID": a.order_id})
    again = await delete("/order", {"orderID": a.order_id})
    many = await delete("/orders", [b.order_id, "0xnope"])
    market = await delete("/cancel-market-orders", {"asset_id": OTHER})
    rest = await delete("/cancel-all")

    assert one == {"canceled": [a.order_id], "not_canceled": {}}
    assert again["canceled"] == [] and list(again["not_canceled"]) == [a.order_id]
    assert many["canceled"] == [b.order_id] and list(many["not_canceled"]) == ["0xnope"]
    assert market == {"canceled": [e.order_id], "not_canceled": {}}
    assert rest == {"canceled": [c.order_id, d.order_id], "not_canceled": {}}
    assert fake.open_orders() == []


async def test_match_a_resting_order_later(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    fake.default = Outcome.live()
    signed = _order(key, creds, size=D("10"))
    await _send(http, key, creds, "POST", "/order", signed.text)

    fake.match(signed.order_id, D(3))
    fake.match(signed.order_id)

    kept = fake.orders[signed.order_id]
    assert (kept.status, kept.size_matched) == ("MATCHED", D(10))
    trades = (await _send(http, key, creds, "GET", "/data/trades")).json()["data"]
    assert [(t["size"], t["trader_side"]) for t in trades] == [("3", "MAKER"), ("7", "MAKER")]
    assert trades[0]["maker_orders"][0]["order_id"] == signed.order_id


async def test_public_routes(fake: FakeClob, http: httpx.AsyncClient) -> None:
    fake.tick_sizes[OTHER] = "0.0025"
    fake.neg_risk[OTHER] = True

    async def get(path: str) -> Any:
        return (await http.get(path)).json()

    assert await get("/version") == {"version": 2}
    assert abs(await get("/time") - time.time()) < 5
    assert await get(f"/tick-size?token_id={TOKEN}") == {"minimum_tick_size": 0.01}
    assert str((await get(f"/tick-size?token_id={OTHER}"))["minimum_tick_size"]) == "0.0025"
    assert await get(f"/neg-risk?token_id={OTHER}") == {"neg_risk": True}
    assert (await http.get("/nowhere")).status_code == 404


# --- heartbeats and the dead-man switch ---


async def _heartbeat(
    http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials, heartbeat_id: str
) -> httpx.Response:
    text = orjson.dumps({"heartbeat_id": heartbeat_id}).decode()
    return await _send(http, key, creds, "POST", "/v1/heartbeats", text)


async def test_heartbeat_ids_chain(
    fake: FakeClob, http: httpx.AsyncClient, key: TradingKey, creds: ApiCredentials
) -> None:
    first = (await _heartbeat(http, key, creds, "")).json()
    second = (await _heartbeat(http, key, creds, first["heartbeat_id"])).json()
    stale = await _heartbeat(http, key, creds, first["heartbeat_id"])
    empty = await _heartbeat(http, key, creds, "")
    third = await _heartbeat(http, key, creds, stale.json()["heartbeat_id"])

    assert first["status"] == "ok" and second["status"] == "ok"
    assert first["heartbeat_id"] != second["heartbeat_id"]
    assert stale.status_code == 400 and empty.status_code == 400
    assert stale.json() == {
        "error": "Invalid Heartbeat ID",
        "error_msg": "Invalid Heartbeat ID",
        "heartbeat_id": second["heartbeat_id"],
    }
    assert third.status_code == 200
    assert fake.counts["heartbeat"] == 3


async def test_dead_man_cancels_open_orders_after_10_s(
    autojump_clock: trio.testing.MockClock, key: TradingKey, creds: ApiCredentials
) -> None:
    fake = FakeClob.for_account(creds, key.address, default=Outcome.live())
    stranger_key, stranger_creds = TradingKey.create(), _credentials()
    fake.add_account(stranger_creds, stranger_key.address)
    transport = httpx.ASGITransport(app=fake.app)  # type: ignore[arg-type]  # dict vs MutableMapping
    async with (
        trio.open_nursery() as nursery,
        httpx.AsyncClient(transport=transport, base_url="http://clob") as http,
    ):
        await nursery.start(fake.run_dead_man)
        mine = _order(key, creds)
        theirs = _order(stranger_key, stranger_creds)
        await _send(http, key, creds, "POST", "/order", mine.text)
        await _send(http, stranger_key, stranger_creds, "POST", "/order", theirs.text)
        await trio.sleep(60)  # not armed: nothing happens
        assert len(fake.open_orders()) == 2

        armed_at = trio.current_time()
        beat = (await _heartbeat(http, key, creds, "")).json()["heartbeat_id"]
        await trio.sleep(9)
        await _heartbeat(http, key, creds, beat)  # refreshed at +9 s
        await trio.sleep(9.9)
        assert fake.orders[mine.order_id].status == "LIVE"
        await trio.sleep(0.2)

        assert fake.orders[mine.order_id].status == "CANCELED"
        assert fake.orders[theirs.order_id].status == "LIVE"  # another API key's
        (firing,) = fake.dead_man_log
        assert firing.at == pytest.approx(armed_at + 19)
        assert (firing.api_key, firing.order_ids) == (creds.api_key, (mine.order_id,))
        expired = await _heartbeat(http, key, creds, beat)
        assert expired.json()["heartbeat_id"] == ""
        assert (await _heartbeat(http, key, creds, "")).status_code == 200  # re-armed
        nursery.cancel_scope.cancel()


# --- with Polymarket's own client ---


async def test_official_client_against_the_fake(fake: FakeClob) -> None:
    """py-clob-client-v2 (sync, so in a worker thread) signs, posts, queries and cancels."""
    from py_clob_client_v2 import (  # type: ignore[import-untyped]
        ApiCreds,
        ClobClient,
        OpenOrderParams,
        OrderArgs,
        OrderPayload,
        PartialCreateOrderOptions,
    )

    account = Account.create()
    api = _credentials()
    fake.add_account(api, account.address)
    fake.script.append(Outcome.live())
    client = ClobClient(
        fake.url,
        137,
        key=account.key.hex(),
        creds=ApiCreds(api.api_key, api.api_secret, api.api_passphrase),
    )

    def session() -> tuple[Any, ...]:
        signed = client.create_order(
            OrderArgs(token_id=TOKEN, price=0.57, size=10, side="BUY"),
            PartialCreateOrderOptions(tick_size="0.01", neg_risk=False),
        )
        posted = client.post_order(signed)
        orders = client.get_open_orders(OpenOrderParams(asset_id=TOKEN))
        canceled = client.cancel_order(OrderPayload(orderID=posted["orderID"]))
        beat = client.post_heartbeat("")
        return posted, orders, canceled, beat

    with trio.fail_after(TIMEOUT):
        posted, orders, canceled, beat = await trio.to_thread.run_sync(session)

    assert posted["success"] is True and posted["status"] == "live"
    assert [o["id"] for o in orders] == [posted["orderID"]]
    assert canceled["canceled"] == [posted["orderID"]]
    assert beat["status"] == "ok"
    placed = next(r for r in fake.requests if r.path == "/order")
    assert placed.signer == account.address and placed.order_id == posted["orderID"]
    paths = {r.path for r in fake.requests}
    assert {"/tick-size", "/version", "/data/orders", "/v1/heartbeats"} <= paths


# --- amounts, arguments and secrets (pure) ---

PRICES = {
    "0.1": ["0.1", "0.5", "0.9"],
    "0.01": ["0.01", "0.07", "0.29", "0.57", "0.99"],
    "0.005": ["0.005", "0.575"],
    "0.0025": ["0.0025", "0.9975"],
    "0.001": ["0.123", "0.999"],
    "0.0001": ["0.0071", "0.9999"],
}


def test_amounts_are_exact_for_every_two_decimal_size() -> None:
    sizes = [D(n).scaleb(-2) for n in range(1, 10_001)]
    for tick, prices in PRICES.items():
        for text in prices:
            price = D(text)
            for size in sizes:
                buy = order_amounts("BUY", price, size, tick)
                sell = order_amounts("SELL", price, size, tick)
                assert buy.taker_amount == sell.maker_amount == size * 1_000_000
                assert buy.maker_amount == sell.taker_amount == size * price * 1_000_000
                assert buy.size_shares == size and buy.price == price


def test_library_float_rounding_loses_a_cent_of_size_where_ours_does_not() -> None:
    library = OrderBuilder(None, funder="0x0")
    config = ROUNDING_CONFIG["0.01"]
    lost = []
    for n in range(1, 10_001):
        size = D(n).scaleb(-2)
        ours = order_amounts("BUY", D("0.57"), size, "0.01")
        _, maker, taker = library.get_order_amounts("BUY", float(size), 0.57, config)
        if (maker, taker) != (ours.maker_amount, ours.taker_amount):
            assert taker == ours.taker_amount - 10_000  # the float round_down, nothing else
            lost.append(size)
    assert D("0.57") in lost and len(lost) > 100


def test_size_is_rounded_down_to_a_cent() -> None:
    amounts = order_amounts("SELL", D("0.5"), D("10.339"), D("0.010"))
    assert (amounts.size_shares, amounts.maker_amount, amounts.taker_amount) == (
        D("10.33"),
        10_330_000,
        5_165_000,
    )


@pytest.mark.parametrize(
    ("price", "size", "tick", "error"),
    [
        (D("0.575"), D(1), "0.01", ValueError),
        (D("0"), D(1), "0.01", ValueError),
        (D("1"), D(1), "0.01", ValueError),
        (D("0.5"), D("0.009"), "0.01", ValueError),
        (D("0.5"), D(1), "0.02", ValueError),
        (D("NaN"), D(1), "0.01", ValueError),
        (0.5, D(1), "0.01", TypeError),
    ],
)
def test_bad_amounts_are_refused(price: Any, size: Decimal, tick: str, error: type) -> None:
    with pytest.raises(error):
        order_amounts("BUY", price, size, tick)


@pytest.mark.parametrize(
    "changes",
    [
        {"order_type": "GTD"},
        {"expiration": 1_900_000_000},
        {"order_type": "FOK", "post_only": True},
        {"signature_type": 2},
        {"signature_type": 0, "funder": "0x1111111111111111111111111111111111111111"},
        {"signature_type": 7, "funder": "0x1111111111111111111111111111111111111111"},
        {"order_type": "IOC"},
        {"side": "HOLD"},
    ],
)
def test_bad_order_options_are_refused(
    key: TradingKey, creds: ApiCredentials, changes: dict[str, Any]
) -> None:
    with pytest.raises(ValueError):
        _order(key, creds, **changes)


def test_gtd_order_carries_its_expiration(key: TradingKey, creds: ApiCredentials) -> None:
    signed = _order(key, creds, order_type="GTD", expiration=1_900_000_000)
    assert signed.body["orderType"] == "GTD"
    assert signed.body["order"]["expiration"] == "1900000000"


def test_secrets_stay_out_of_reprs_and_errors(creds: ApiCredentials) -> None:
    account = Account.create()
    hex_key = account.key.hex()
    key = TradingKey.from_hex(hex_key)
    assert key.address == account.address
    assert hex_key.removeprefix("0x") not in repr(key)
    assert creds.api_secret not in repr(creds) and creds.api_passphrase not in repr(creds)
    signed = _order(key, creds)
    assert creds.api_secret not in repr(signed) and hex_key.removeprefix("0x") not in repr(signed)
    bad = "0x" + "zz" * 32
    with pytest.raises(ValueError) as caught:
        TradingKey.from_hex(bad)
    assert "zz" not in str(caught.value) and caught.value.__context__ is None
    assert caught.value.__cause__ is None


def test_l2_headers_sign_the_path_without_query(creds: ApiCredentials, key: TradingKey) -> None:
    with_query = l2_headers(creds, key.address, "get", "/data/orders?asset_id=1", timestamp=1)
    without = l2_headers(creds, key.address, "GET", "/data/orders", timestamp=1)
    assert with_query == without
    assert set(without) == {
        "POLY_ADDRESS",
        "POLY_SIGNATURE",
        "POLY_TIMESTAMP",
        "POLY_API_KEY",
        "POLY_PASSPHRASE",
    }
    with pytest.raises(ValueError):
        l2_headers(creds, key.address, "POST", "/order", '{"a":"it\'s"}')

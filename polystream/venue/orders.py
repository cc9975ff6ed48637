"""
Signing CLOB V2 orders and authenticating trading requests, offline.

Polymarket's official ``py-clob-client-v2`` (1.2.1) does the cryptography:
its ``OrderBuilder.build_order(..., version=2)`` builds and EIP-712-signs the
order, its ``ExchangeOrderBuilderV2.build_order_hash`` gives the order id and
its ``build_hmac_signature`` the L2 ``POLY_SIGNATURE``. Nothing here touches
the network: tick size and neg-risk come from polystream's own market data
(the client's ``create_order`` would ask ``GET /tick-size`` and
``GET /version`` first). Sending is the caller's, with its own
``httpx.AsyncClient`` under trio (the library's client is synchronous).

Units: a price is a probability in [0, 1] (USDC per share), a size is in
outcome shares, and the signed ``makerAmount`` / ``takerAmount`` are integers
in 1e-6 units (USDC and shares both have 6 decimals). Amounts are computed
here with ``Decimal``: the library's float ``round_down(size, 2)`` drops
0.01 share for 573 of the 10 000 two-decimal sizes in 0.01..100.00 (e.g.
0.29, 0.57, 1.13); polystream's amounts equal exact decimal arithmetic for
every size.

The key and the API secret and passphrase never appear in a repr, a log
line or an error message raised here (:class:`TradingKey`,
:class:`ApiCredentials`); this module logs nothing.

Sources: https://docs.polymarket.com/v2-migration (order fields, EIP-712
domain version "2", contracts); docs.polymarket.com "Error Codes";
the library's source (``order_builder/builder.py``, ``headers/headers.py``);
docs/execution.md.
"""

from __future__ import annotations

import base64
import os
import time
import uuid
from decimal import ROUND_DOWN, Decimal
from typing import Any, Final, Literal, get_args
from urllib.parse import urlsplit

import attrs
import orjson
from eth_account import Account
from py_clob_client_v2.clob_types import (  # type: ignore[import-untyped]
    CreateOrderOptions,
    OrderArgsV2,
)
from py_clob_client_v2.config import get_contract_config  # type: ignore[import-untyped]
from py_clob_client_v2.order_builder.builder import (  # type: ignore[import-untyped]
    ROUNDING_CONFIG,
    OrderBuilder,
)
from py_clob_client_v2.order_utils import (  # type: ignore[import-untyped]
    ExchangeOrderBuilderV2,
    Side,
    SignatureTypeV2,
)
from py_clob_client_v2.order_utils.model.order_data_v2 import (  # type: ignore[import-untyped]
    OrderV2,
    order_to_json_v2,
)
from py_clob_client_v2.signer import Signer  # type: ignore[import-untyped]
from py_clob_client_v2.signing.hmac import build_hmac_signature  # type: ignore[import-untyped]

from polystream.errors import ConfigError

__all__ = [
    "ENV_KEYS",
    "MAX_BATCH_ORDERS",
    "ORDER_TYPES",
    "POLYGON",
    "SIGNATURE_TYPES",
    "TICK_SIZES",
    "ApiCredentials",
    "OrderAmounts",
    "OrderSide",
    "OrderType",
    "SignedOrder",
    "TradingAccount",
    "TradingKey",
    "batch_text",
    "exchange_address",
    "l2_headers",
    "order_amounts",
    "order_id_of",
    "order_typed_data",
    "sign_order",
    "throwaway_account",
    "tick_text",
]

POLYGON: Final = 137
"""Polygon's chain id, the CLOB's chain (``get_contract_config(137)``)."""

TICK_SIZES: Final = ("0.1", "0.01", "0.005", "0.0025", "0.001", "0.0001")
"""The tick sizes the CLOB uses, as the exact strings the library keys its rounding by."""

MAX_BATCH_ORDERS: Final = 15
"""Most orders in one ``POST /orders`` body (docs/execution.md)."""

OrderSide = Literal["BUY", "SELL"]
"""BUY pays USDC for shares; SELL gives shares for USDC."""

OrderType = Literal["GTC", "GTD", "FOK", "FAK"]
"""Good-til-cancelled, good-til-date (needs ``expiration``), fill-or-kill, fill-and-kill."""

ORDER_TYPES: Final[tuple[str, ...]] = get_args(OrderType)

_SIGNATURE_TYPES: Final = frozenset(int(t) for t in SignatureTypeV2)
_MICRO: Final = Decimal(1_000_000)


@attrs.frozen
class ApiCredentials:
    """
    The L2 API credentials of one address (``POST /auth/api-key`` or
    ``GET /auth/derive-api-key`` gives them; docs/execution.md).

    Attributes:
        api_key: a UUID, sent as ``POLY_API_KEY`` and as the order body's ``owner``.
        api_secret: URL-safe base64, the HMAC key; never sent, never in a repr.
        api_passphrase: sent as ``POLY_PASSPHRASE``; never in a repr.
    """

    api_key: str
    api_secret: str = attrs.field(repr=False)
    api_passphrase: str = attrs.field(repr=False)


@attrs.frozen(repr=False)
class TradingKey:
    """
    An EOA private key able to sign orders, held inside the library's signer.

    Build it once (deriving the address costs ~2 ms) with :meth:`from_hex` or
    :meth:`create`; its repr shows only the address, so the key cannot leak
    through a log line or a traceback's locals.

    Attributes:
        address: the key's checksummed address (``POLY_ADDRESS``, the order's ``signer``).
        chain_id: the chain the orders are signed for (:data:`POLYGON`).
    """

    address: str
    chain_id: int
    _signer: Any = attrs.field(alias="signer")

    @classmethod
    def from_hex(cls, private_key: str, *, chain_id: int = POLYGON) -> TradingKey:
        """
        The key whose 32 bytes are ``private_key`` (hex, with or without ``0x``).

        Raises:
            ValueError: not a valid secp256k1 private key (the message omits it).
        """
        signer = _signer_or_none(private_key, chain_id)
        if signer is None:  # raised outside any handler: no __context__ leading to the key
            raise ValueError("not a valid private key")
        return cls(address=str(signer.address()), chain_id=chain_id, signer=signer)

    @classmethod
    def create(cls, *, chain_id: int = POLYGON) -> TradingKey:
        """A new random key (``os.urandom``), for tests and the demo."""
        return cls.from_hex(Account.create().key.hex(), chain_id=chain_id)

    def __repr__(self) -> str:
        """``TradingKey(address='0x…')``: never the key."""
        return f"TradingKey(address={self.address!r})"


def _signer_or_none(private_key: str, chain_id: int) -> Any:
    """The library's ``Signer`` of ``private_key``, or None when it is not a valid key."""
    try:
        return Signer(private_key, chain_id)
    except Exception:  # a boundary: the error, its message and frames may quote the key
        return None


@attrs.frozen
class OrderAmounts:
    """
    A limit order's signed amounts, exact.

    Attributes:
        maker_amount: what the maker gives, in 1e-6 units: USDC for a BUY,
            shares for a SELL.
        taker_amount: what the maker gets, in 1e-6 units: shares for a BUY,
            USDC for a SELL.
        price: USDC per share, on the tick grid.
        size_shares: the size signed: the size asked rounded down to 0.01 share.
    """

    maker_amount: int
    taker_amount: int
    price: Decimal
    size_shares: Decimal


@attrs.frozen
class SignedOrder:
    """
    One signed order, ready to ``POST /order``.

    Store ``(order_id, text)`` durably before sending: re-sending the same
    text is idempotent (the venue refuses a duplicate ``order_id``:
    ``order {id} is invalid. Duplicated.``), re-signing is not (a new salt
    and timestamp make a new order).

    Attributes:
        order_id: ``0x`` + 64 hex digits, the EIP-712 digest of the signed
            order: the ``orderID`` the venue answers and indexes.
        body: the ``POST /order`` body: ``{"order": {salt, maker, signer,
            tokenId, makerAmount, takerAmount, side, expiration, signatureType,
            timestamp (ms), metadata, builder, signature}, "owner" (API key),
            "orderType", "deferExec": false, "postOnly"}``.
        text: ``body`` as compact JSON: the exact text to send and to HMAC-sign.
        amounts: the amounts signed (:class:`OrderAmounts`).
    """

    order_id: str
    body: dict[str, Any]
    text: str
    amounts: OrderAmounts


def tick_text(tick_size: str | Decimal) -> str:
    """
    ``tick_size`` as the library's key in :data:`TICK_SIZES` (``Decimal("0.010")``
    and ``"0.01"`` both give ``"0.01"``).

    Raises:
        ValueError: not one of the CLOB's tick sizes.
    """
    try:
        tick = Decimal(tick_size)
    except ArithmeticError:
        tick = Decimal(0)
    for known in TICK_SIZES:
        if tick == Decimal(known):
            return known
    raise ValueError(f"tick_size must be one of {TICK_SIZES}, got {tick_size!r}")


def order_amounts(
    side: OrderSide, price: Decimal, size: Decimal, tick_size: str | Decimal
) -> OrderAmounts:
    """
    The exact maker and taker amounts of a limit order (the library's rules
    in ``OrderBuilder.get_order_amounts``, in ``Decimal``).

    ``size`` (shares) is rounded down to 0.01 share (the library's size
    precision for every tick); ``price`` (a probability) must lie on the tick
    grid within [tick, 1 - tick]. Then the USDC amount ``size * price`` has at
    most ``price decimals + 2`` decimals, which is the library's amount
    precision for each tick, so no rounding is left: a BUY signs
    ``makerAmount = size * price * 1e6`` and ``takerAmount = size * 1e6``, a
    SELL the other way round.

    Raises:
        ValueError: an unknown ``side`` or ``tick_size``, a price off the grid
            or outside [tick, 1 - tick], a size below 0.01 share.
        TypeError: ``price`` or ``size`` is not a ``Decimal``.
    """
    if side not in ("BUY", "SELL"):
        raise ValueError(f"side must be BUY or SELL, got {side!r}")
    tick_size = tick_text(tick_size)
    if not isinstance(price, Decimal) or not isinstance(size, Decimal):
        raise TypeError("price and size must be Decimal")
    tick = Decimal(tick_size)
    if not price.is_finite() or price % tick != 0 or not tick <= price <= 1 - tick:
        raise ValueError(f"price {price} is not a multiple of {tick_size} in [tick, 1 - tick]")
    config = ROUNDING_CONFIG[tick_size]
    if not size.is_finite():
        raise ValueError(f"size {size} is not a number")
    shares = size.quantize(Decimal(1).scaleb(-int(config.size)), rounding=ROUND_DOWN)
    if shares <= 0:
        raise ValueError(f"size {size} is below 0.01 share")
    usdc = shares * price
    shares_units, usdc_units = shares * _MICRO, usdc * _MICRO
    if shares_units != shares_units.to_integral_value() or usdc != usdc.quantize(
        Decimal(1).scaleb(-int(config.amount))
    ):
        raise AssertionError(f"inexact amounts for {price} x {shares}")  # pragma: no cover
    maker, taker = (usdc_units, shares_units) if side == "BUY" else (shares_units, usdc_units)
    return OrderAmounts(int(maker), int(taker), price, shares)


class _ExactOrderBuilder(OrderBuilder):  # type: ignore[misc]
    """The library's builder signing amounts from :func:`order_amounts`, not its float arithmetic."""

    def __init__(
        self, signer: Any, signature_type: int, funder: str | None, amounts: OrderAmounts
    ) -> None:
        super().__init__(signer, SignatureTypeV2(signature_type), funder)
        self._amounts = amounts

    def get_order_amounts(
        self, side: str, size: object, price: object, round_config: object
    ) -> tuple[Any, int, int]:
        """``(Side, makerAmount, takerAmount)`` of the exact amounts given at construction."""
        library_side = Side.BUY if side == "BUY" else Side.SELL
        return library_side, self._amounts.maker_amount, self._amounts.taker_amount


def sign_order(
    key: TradingKey,
    credentials: ApiCredentials,
    *,
    token_id: str,
    side: OrderSide,
    price: Decimal,
    size: Decimal,
    tick_size: str | Decimal,
    neg_risk: bool,
    order_type: OrderType = "GTC",
    signature_type: int = 0,
    funder: str | None = None,
    expiration: int = 0,
    post_only: bool = False,
) -> SignedOrder:
    """
    Build and sign a CLOB V2 limit order with ``py-clob-client-v2``, offline.

    ``price`` is a probability on the ``tick_size`` grid (a :data:`TICK_SIZES`
    text or the same ``Decimal``), ``size`` in shares
    (rounded down to 0.01, :func:`order_amounts`). ``neg_risk`` picks the
    exchange the EIP-712 domain names (the neg-risk exchange V2 or the
    standard one). ``signature_type`` is ``SignatureTypeV2``: 0 EOA (maker =
    the key's address), 1 POLY_PROXY or 2 POLY_GNOSIS_SAFE (maker =
    ``funder``, the proxy or safe; signer = the key), 3 POLY_1271 (maker =
    signer = ``funder``, the deposit wallet, with an ERC-7739-wrapped
    signature). ``expiration`` is unix seconds for GTD (0 otherwise); the
    venue wants it at least 60 s ahead, and it is sent but not signed.
    ``post_only`` (GTC/GTD only) makes the venue refuse an order that would
    cross the book.

    The order id is the library's EIP-712 digest, computed before any send.

    Raises:
        ValueError: a bad argument (see :func:`order_amounts`; an unknown
            order or signature type; a funder missing for types 1-3 or
            given for EOA; a GTD without expiration or another type with
            one; ``post_only`` with FOK/FAK).
        RuntimeError: the library failed to sign (its message, which could
            hold key material, is dropped).
    """
    _check_order_options(order_type, signature_type, funder, expiration, post_only, key.address)
    tick_size = tick_text(tick_size)
    amounts = order_amounts(side, price, size, tick_size)
    signed, order_id, failure = None, "", ""
    try:
        signed, order_id = _library_sign(
            key, amounts, token_id, side, tick_size, neg_risk, signature_type, funder, expiration
        )
    except Exception as exc:  # a boundary: the library's message and frames may hold the key
        failure = type(exc).__name__
    if signed is None:  # raised outside the handler: no __context__ to the key
        raise RuntimeError(f"order signing failed: {failure}")
    body: dict[str, Any] = order_to_json_v2(
        signed, credentials.api_key, order_type, post_only=post_only
    )
    return SignedOrder(order_id, body, _json_text(body), amounts)


def _library_sign(
    key: TradingKey,
    amounts: OrderAmounts,
    token_id: str,
    side: str,
    tick_size: str,
    neg_risk: bool,
    signature_type: int,
    funder: str | None,
    expiration: int,
) -> tuple[Any, str]:
    """The library's ``SignedOrderV2`` of a checked order, and its id (the EIP-712 digest)."""
    builder = _ExactOrderBuilder(key._signer, signature_type, funder, amounts)
    signed = builder.build_order(
        OrderArgsV2(
            token_id=token_id,
            price=amounts.price,
            size=amounts.size_shares,
            side=side,
            expiration=expiration,
        ),
        CreateOrderOptions(tick_size=tick_size, neg_risk=neg_risk),
        version=2,
    )
    hasher = ExchangeOrderBuilderV2(exchange_address(neg_risk, key.chain_id), key.chain_id, None)
    return signed, str(hasher.build_order_hash(hasher.build_order_typed_data(signed)))


def _check_order_options(
    order_type: str,
    signature_type: int,
    funder: str | None,
    expiration: int,
    post_only: bool,
    address: str,
) -> None:
    """Refuse order options the venue or the library would refuse (see :func:`sign_order`)."""
    if order_type not in ORDER_TYPES:
        raise ValueError(f"order_type must be one of {ORDER_TYPES}, got {order_type!r}")
    if signature_type not in _SIGNATURE_TYPES:
        raise ValueError(f"signature_type must be 0-3, got {signature_type!r}")
    if signature_type == 0 and funder is not None and funder.lower() != address.lower():
        raise ValueError("an EOA order (signature_type 0) has no separate funder")
    if signature_type != 0 and not funder:
        raise ValueError(f"signature_type {signature_type} needs the funder address")
    if (order_type == "GTD") != (expiration > 0) or expiration < 0:
        raise ValueError("expiration (unix s) is required for GTD and only for GTD")
    if post_only and order_type in ("FOK", "FAK"):
        raise ValueError("post_only is for GTC and GTD orders")


def exchange_address(neg_risk: bool, chain_id: int = POLYGON) -> str:
    """
    The V2 exchange contract an order's EIP-712 domain names: the neg-risk
    exchange for neg-risk markets, else the standard one (the library's
    ``get_contract_config``; on Polygon ``0xe2222d27…0F59`` and ``0xE1111800…996B``).
    """
    config = get_contract_config(chain_id)
    return str(config.neg_risk_exchange_v2 if neg_risk else config.exchange_v2)


def order_typed_data(
    order: dict[str, Any], *, neg_risk: bool, chain_id: int = POLYGON
) -> dict[str, Any]:
    """
    The EIP-712 typed data the ``order`` object of a ``POST /order`` body
    was signed over, built by the library's ``ExchangeOrderBuilderV2``:
    domain ``{"Polymarket CTF Exchange", "2", chain_id, exchange_address(neg_risk)}``,
    message of the 11 signed fields (``expiration`` is not one of them).

    Raises:
        KeyError, ValueError, TypeError: ``order`` lacks a field or holds a bad value.
    """
    side = {"BUY": Side.BUY, "SELL": Side.SELL}[order["side"]]
    unsigned = OrderV2(
        salt=str(int(order["salt"])),
        maker=str(order["maker"]),
        signer=str(order["signer"]),
        tokenId=str(int(order["tokenId"])),
        makerAmount=str(int(order["makerAmount"])),
        takerAmount=str(int(order["takerAmount"])),
        side=side,
        signatureType=SignatureTypeV2(int(order["signatureType"])),
        timestamp=str(int(order["timestamp"])),
        metadata=str(order["metadata"]),
        builder=str(order["builder"]),
    )
    builder = ExchangeOrderBuilderV2(exchange_address(neg_risk, chain_id), chain_id, None)
    typed: dict[str, Any] = builder.build_order_typed_data(unsigned)
    return typed


def order_id_of(order: dict[str, Any], *, neg_risk: bool, chain_id: int = POLYGON) -> str:
    """
    The order id (``0x`` + 64 hex digits) of the ``order`` object of a stored
    ``POST /order`` body: the library's ``build_order_hash``, the EIP-712
    digest of :func:`order_typed_data`. Equals :attr:`SignedOrder.order_id`.

    Raises:
        KeyError, ValueError, TypeError: as :func:`order_typed_data`.
    """
    builder = ExchangeOrderBuilderV2(exchange_address(neg_risk, chain_id), chain_id, None)
    return str(
        builder.build_order_hash(order_typed_data(order, neg_risk=neg_risk, chain_id=chain_id))
    )


def _json_text(body: object) -> str:
    """``body`` as compact JSON (no spaces; keys in order), like the library's ``post_order``."""
    return orjson.dumps(body).decode()


def batch_text(orders: list[SignedOrder]) -> str:
    """
    The ``POST /orders`` body of ``orders`` (at most :data:`MAX_BATCH_ORDERS`):
    a JSON array of their bodies, as compact JSON.

    Raises:
        ValueError: no orders, or more than :data:`MAX_BATCH_ORDERS`.
    """
    if not 0 < len(orders) <= MAX_BATCH_ORDERS:
        raise ValueError(f"a batch holds 1 to {MAX_BATCH_ORDERS} orders, got {len(orders)}")
    return "[" + ",".join(order.text for order in orders) + "]"


def l2_headers(
    credentials: ApiCredentials,
    address: str,
    method: str,
    path: str,
    body_text: str | None = None,
    *,
    timestamp: int | None = None,
) -> dict[str, str]:
    """
    The L2 authentication headers of one trading request.

    ``POLY_SIGNATURE`` is the library's ``build_hmac_signature``: URL-safe
    base64 of HMAC-SHA256, keyed by the base64-decoded secret, over
    ``timestamp + METHOD + path + body_text``. ``path`` is signed without
    its query string (``/data/orders?asset_id=1`` signs ``/data/orders``);
    ``body_text`` must be the exact text sent. ``address`` is the signing
    EOA (``TradingKey.address``) even when orders are funded by a proxy.
    ``timestamp`` is unix seconds, now by default.

    Returns:
        ``{"POLY_ADDRESS", "POLY_SIGNATURE", "POLY_TIMESTAMP", "POLY_API_KEY",
        "POLY_PASSPHRASE"}``, all strings.

    Raises:
        ValueError: ``body_text`` holds an apostrophe (the library signs it
            with ``'`` replaced by ``"``, which would not match the body sent).
    """
    if body_text and "'" in body_text:
        raise ValueError("body_text holds an apostrophe: its HMAC would not match")
    method = method.upper()
    signed_path = urlsplit(path).path
    if timestamp is None:
        timestamp = int(time.time())
    signature = build_hmac_signature(
        credentials.api_secret, timestamp, method, signed_path, body_text or None
    )
    return {
        "POLY_ADDRESS": address,
        "POLY_SIGNATURE": str(signature),
        "POLY_TIMESTAMP": str(timestamp),
        "POLY_API_KEY": credentials.api_key,
        "POLY_PASSPHRASE": credentials.api_passphrase,
    }


SIGNATURE_TYPES: Final = {"eoa": 0, "poly_proxy": 1, "gnosis_safe": 2}
"""``execute.signature_type`` -> the library's ``SignatureTypeV2``."""

ENV_KEYS: Final = (
    "POLYMARKET_PRIVATE_KEY",
    "POLYMARKET_API_KEY",
    "POLYMARKET_API_SECRET",
    "POLYMARKET_API_PASSPHRASE",
)
"""The environment variables a trading account needs (``POLYMARKET_FUNDER`` besides, for proxies)."""


@attrs.frozen(repr=False)
class TradingAccount:
    """
    What polystream signs and authenticates with: a key, its L2 API
    credentials and how it signs (``signature_type`` 0 EOA, 1 POLY_PROXY, 2
    POLY_GNOSIS_SAFE with ``funder``). Its repr shows only the address.
    """

    key: TradingKey
    credentials: ApiCredentials
    signature_type: int = 0
    funder: str | None = None

    @classmethod
    def from_environment(cls, environ: dict[str, str], signature_type: str) -> TradingAccount:
        """
        The account of :data:`ENV_KEYS` (and ``POLYMARKET_FUNDER``) in ``environ``.

        Raises:
            ConfigError: a variable is missing or empty, the key is not a
                key, or the funder is missing for a proxy (messages name the
                variable, never its value).
        """
        missing = [name for name in ENV_KEYS if not environ.get(name, "").strip()]
        kind = SIGNATURE_TYPES[signature_type]
        funder = environ.get("POLYMARKET_FUNDER", "").strip() or None
        if kind and funder is None:
            missing.append("POLYMARKET_FUNDER")
        if missing:
            raise ConfigError(
                f'execute.mode = "clob" needs the environment variable(s) {", ".join(missing)}'
                " (docs/execution.md)"
            )
        try:
            key = TradingKey.from_hex(environ["POLYMARKET_PRIVATE_KEY"].strip())
        except ValueError:
            raise ConfigError("POLYMARKET_PRIVATE_KEY is not a secp256k1 private key") from None
        credentials = ApiCredentials(
            environ["POLYMARKET_API_KEY"].strip(),
            environ["POLYMARKET_API_SECRET"].strip(),
            environ["POLYMARKET_API_PASSPHRASE"].strip(),
        )
        return cls(key, credentials, kind, funder if kind else None)

    @property
    def owner(self) -> str:
        """The API key: every order body's ``owner``."""
        return self.credentials.api_key

    @property
    def address(self) -> str:
        """The signing key's address (``POLY_ADDRESS``)."""
        return self.key.address

    @property
    def max_batch(self) -> int:
        """Most orders in one ``POST /orders``: :data:`MAX_BATCH_ORDERS`."""
        return MAX_BATCH_ORDERS

    def sign(
        self,
        *,
        token_id: str,
        side: OrderSide,
        price: Decimal,
        size: Decimal,
        tick: Decimal,
        neg_risk: bool,
        order_type: OrderType,
    ) -> SignedOrder:
        """:func:`sign_order` with this account (blocking CPU, a few ms: call it from a thread)."""
        return sign_order(
            self.key,
            self.credentials,
            token_id=token_id,
            side=side,
            price=price,
            size=size,
            tick_size=tick,
            neg_risk=neg_risk,
            order_type=order_type,
            signature_type=self.signature_type,
            funder=self.funder,
        )

    def headers(self, method: str, path: str, body: str) -> dict[str, str]:
        """:func:`l2_headers` of one request with this account."""
        return l2_headers(self.credentials, self.key.address, method, path, body or None)

    def __repr__(self) -> str:
        """``TradingAccount(address='0x…')``: never a secret."""
        return f"TradingAccount(address={self.key.address!r})"


def throwaway_account() -> tuple[TradingAccount, dict[str, str]]:
    """
    A new random key with made-up API credentials, for the fake CLOB of the
    tests, the demo (``polystream replay --clob-port``) and the benches, and
    the :data:`ENV_KEYS` environment that gives a daemon the same account
    (:meth:`TradingAccount.from_environment`). Never an account of the venue.
    """
    secret = base64.urlsafe_b64encode(os.urandom(32)).decode()
    values = (os.urandom(32).hex(), str(uuid.uuid4()), secret, uuid.uuid4().hex)
    environ = dict(zip(ENV_KEYS, values, strict=True))
    return TradingAccount.from_environment(environ, "eoa"), environ

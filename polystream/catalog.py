"""
What the database says about the subscribed markets, for the router and the
writers: each market's token ids in outcome order, which market a token
belongs to, and how many active positions a market holds.

A **market key** is a ``markets.id`` (Gamma's id), or, for a position whose
market row is unknown, the position's token id (docs/architecture.md, "Names").
The reconciler replaces the contents whole on each full read and adds markets
one by one from its NOTIFY fast path.
"""

from __future__ import annotations

import attrs

__all__ = ["Catalog", "MarketKey"]


MarketKey = str
"""A ``markets.id``, or the token id of a position whose market row is unknown."""


@attrs.define
class Catalog:
    """
    What the database says about the subscribed markets; replaced whole by
    the reconciler, read by the router and the writers.

    Attributes:
        tokens: market key -> its ``clob_token_ids`` in outcome order.
        keys: asset (token) id -> the market key it belongs to.
        positions: market key -> active positions (what a repricing costs).
    """

    tokens: dict[MarketKey, tuple[str, ...]] = attrs.field(factory=dict)
    keys: dict[str, MarketKey] = attrs.field(factory=dict)
    positions: dict[MarketKey, int] = attrs.field(factory=dict)

    def add_market(self, market_id: str, tokens: tuple[str, ...]) -> None:
        """Know ``markets.id`` ``market_id``'s token ids (``clob_token_ids``, outcome order)."""
        self.tokens[market_id] = tokens
        for token in tokens:
            self.keys[token] = market_id

    def key_of(self, asset_id: str) -> MarketKey:
        """The market key of ``asset_id``: its market's id, or the asset id itself when unknown."""
        return self.keys.get(asset_id, asset_id)

    def tokens_of(self, key: MarketKey) -> tuple[str, ...]:
        """The token ids of market ``key`` (``(key,)`` for a bare token)."""
        return self.tokens.get(key, (key,))

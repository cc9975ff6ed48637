"""
Synthetic assets: re-labelled copies of recorded ones, for scale tests and benchmarks.

With ``synthesize=N`` a replay server also knows N extra asset ids. Synthetic
asset *k* copies recorded asset ``k mod n`` (the n recorded assets ordered
by condition id, then asset id, so the copies of one recorded market form
one synthetic market, "copy" ``k // n``). Its id is a 77-digit decimal
derived from *k* and the original id, its condition id a ``0x`` + 64-hex
string derived from the copy number and the original condition id;
:meth:`Synthetic.gamma_markets` gives Gamma-like market objects for them
(docs/protocol.md, "Gamma").

The cost model, as the server uses them:

* the tape keeps books of the recorded assets only; a synthetic snapshot is
  the original's current book with ``asset_id``, ``market`` and ``hash``
  replaced, its levels and the hash preimage after the labels built once
  per original and tape position (a copy costs one SHA-1 of that preimage);
* a frame costs nothing extra for a client without synthetic subscriptions
  (one truth test), and for a client with some, one set intersection unless
  the frame names an original it holds copies of;
* with ``synthetic_events`` (the default) the events of such a frame are
  re-encoded once per copy held by that client, ids rewritten in the JSON
  text (:meth:`Synthetic.relabel`), and all copies go out as ONE array
  frame. This is a real fan-out (10,000 copies of 12 recorded assets turn
  one event into ~830), so paced replays suit it better than
  ``max_speed``. Without it synthetic assets get their snapshots only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import attrs
import orjson

from polystream.errors import ReplayError
from polystream.replay.books import Event

__all__ = ["Synthetic", "SyntheticAsset", "synthetic_asset_id"]

_SYNTHETIC_ID_BASE = 10**76
_SYNTHETIC_ID_SPAN = 9 * 10**76
_SYNTHETIC_GAMMA_ID_BASE = 8_000_000_000


def synthetic_asset_id(index: int, original: str) -> str:
    """The id of synthetic asset ``index`` copying ``original``: 77 decimal digits."""
    digest = int(hashlib.sha256(f"synthetic/{index}/{original}".encode()).hexdigest(), 16)
    return str(_SYNTHETIC_ID_BASE + digest % _SYNTHETIC_ID_SPAN)


def _synthetic_market_id(copy: int, original_market: str) -> str:
    """A condition-id-like market id (``0x`` + 64 hex) for one copy of a recorded market."""
    return "0x" + hashlib.sha256(f"synthetic-market/{copy}/{original_market}".encode()).hexdigest()


@attrs.frozen
class SyntheticAsset:
    """
    One synthetic asset: a re-labelled copy of a recorded one.

    Attributes:
        asset_id: its own id (77 decimal digits, see :func:`synthetic_asset_id`).
        index: *k*, its position among the synthetic assets.
        copy: ``k // n`` (n = recorded assets); copies of one market share it.
        original: the recorded asset it copies (``k mod n`` in recorded order).
        market: its synthetic condition id.
        original_market: the recorded asset's condition id.
    """

    asset_id: str
    index: int
    copy: int
    original: str
    market: str
    original_market: str


@attrs.frozen
class Synthetic:
    """
    The synthetic assets of a server, built from a capture's assets.

    Attributes:
        assets: synthetic asset id -> :class:`SyntheticAsset`.
        ordered: the same, by index *k*.
        by_copy: (copy, original asset id) -> :class:`SyntheticAsset`.
    """

    assets: dict[str, SyntheticAsset]
    ordered: tuple[SyntheticAsset, ...]
    by_copy: dict[tuple[int, str], SyntheticAsset]

    @classmethod
    def build(cls, markets: dict[str, str], count: int) -> Synthetic:
        """
        ``count`` synthetic assets copying the assets of ``markets`` (asset id ->
        condition id, as :attr:`Capture.markets`), ordered by (condition id, asset id).

        Raises:
            ReplayError: ``count`` > 0 but there is no recorded asset, or ``count`` < 0.
        """
        if count < 0:
            raise ReplayError(f"synthesize: expected a count >= 0, got {count}")
        originals = sorted(markets, key=lambda asset: (markets[asset], asset))
        if count and not originals:
            raise ReplayError("synthesize: the capture names no asset to copy")
        ordered = _copies(markets, originals, count)
        assets = {asset.asset_id: asset for asset in ordered}
        if len(assets) != len(ordered):  # a sha256 collision mod 9e76: not expected, ever
            raise ReplayError("synthesize: two synthetic ids collide")
        by_copy = {(asset.copy, asset.original): asset for asset in ordered}
        return cls(assets=assets, ordered=tuple(ordered), by_copy=by_copy)

    @property
    def asset_ids(self) -> list[str]:
        """Synthetic asset ids, by index *k*."""
        return [asset.asset_id for asset in self.ordered]

    def relabel(self, text: str, copy: int, originals: Iterable[str]) -> str:
        """
        ``text`` (JSON of events of ``originals``, recorded assets) with each
        original's asset id and condition id, as quoted strings, replaced by
        those of its copy number ``copy``.
        """
        markets: set[str] = set()
        for original in originals:
            label = self.by_copy[copy, original]
            text = text.replace(f'"{original}"', f'"{label.asset_id}"')
            if label.original_market not in markets:
                markets.add(label.original_market)
                text = text.replace(f'"{label.original_market}"', f'"{label.market}"')
        return text

    def gamma_markets(self) -> list[Event]:
        """
        Gamma-like market objects for the synthetic markets, in order of first asset.

        One object per synthetic condition id: ``id`` a decimal string from
        8,000,000,000 up, ``conditionId``, ``question``, ``slug``, and
        ``outcomes`` / ``clobTokenIds`` as JSON-encoded strings (Gamma's shape;
        ``polystream.store.markets.GammaMarket.from_gamma`` reads them). Outcomes are
        ``["Yes", "No"]`` for two tokens (two tokens per market whenever the
        recorded markets are binary and the count is a multiple of the recorded
        assets), else ``Outcome 1..m``.
        """
        tokens: dict[str, list[SyntheticAsset]] = {}
        for asset in self.ordered:
            tokens.setdefault(asset.market, []).append(asset)
        return [_gamma_market(number, members) for number, members in enumerate(tokens.values())]


def _copies(markets: dict[str, str], originals: Sequence[str], count: int) -> list[SyntheticAsset]:
    """Synthetic assets 0 .. ``count`` - 1 copying ``originals`` in turn."""
    ordered = []
    market_ids: dict[tuple[int, str], str] = {}
    for index in range(count):
        copy, position = divmod(index, len(originals))
        original = originals[position]
        original_market = markets[original]
        market = market_ids.get((copy, original_market))
        if market is None:
            market = market_ids[copy, original_market] = _synthetic_market_id(copy, original_market)
        ordered.append(
            SyntheticAsset(
                asset_id=synthetic_asset_id(index, original),
                index=index,
                copy=copy,
                original=original,
                market=market,
                original_market=original_market,
            )
        )
    return ordered


def _gamma_market(number: int, members: Sequence[SyntheticAsset]) -> Event:
    """The Gamma object of synthetic market ``number`` whose tokens are ``members``."""
    first = members[0]
    outcomes = (
        ["Yes", "No"] if len(members) == 2 else [f"Outcome {i}" for i in range(1, len(members) + 1)]
    )
    return {
        "id": str(_SYNTHETIC_GAMMA_ID_BASE + number),
        "conditionId": first.market,
        "question": f"Synthetic copy {first.copy} of {first.original_market}",
        "slug": f"synthetic-{first.copy}-{first.original_market[:18]}",
        "outcomes": orjson.dumps(outcomes).decode(),
        "clobTokenIds": orjson.dumps([m.asset_id for m in members]).decode(),
        "active": True,
        "closed": False,
    }

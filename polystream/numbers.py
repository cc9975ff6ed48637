"""
Numbers as the venue writes them: decimal strings (``".48"``), sometimes JSON
numbers; prices are probabilities in [0, 1] kept as ``Decimal``, never binary
floats (a JSON float goes through ``str`` first). A best bid <= 0 and a best
ask >= 1 spell an empty side, never a quote (docs/protocol.md, "Empty sides").

The one place these rules live: the frame parser, the REST clients and the
Gamma import each translate :class:`NotANumber` / :class:`OutOfRange` into
their own error.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

__all__ = [
    "NotANumber",
    "OutOfRange",
    "ask_or_none",
    "bid_or_none",
    "finite_decimal",
    "probability",
]

_ZERO = Decimal(0)
_ONE = Decimal(1)


class NotANumber(ValueError):
    """Not a finite number: NaN, Infinity, text, a boolean, ``null``, a list."""


class OutOfRange(ValueError):
    """A number that is not a probability in [0, 1]."""


def finite_decimal(value: object) -> Decimal:
    """
    ``value`` (a decimal string or a JSON number) as a finite ``Decimal``.

    Raises:
        NotANumber: anything else.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise NotANumber(repr(value))
    try:
        number = Decimal(value) if isinstance(value, str) else Decimal(str(value))
    except InvalidOperation:
        raise NotANumber(repr(value)) from None
    if not number.is_finite():
        raise NotANumber(repr(value))
    return number


def probability(value: object) -> Decimal:
    """
    ``value`` as a probability in [0, 1] (``Decimal``).

    Raises:
        NotANumber: not a finite number.
        OutOfRange: outside [0, 1].
    """
    number = finite_decimal(value)
    if not _ZERO <= number <= _ONE:
        raise OutOfRange(repr(value))
    return number


def bid_or_none(price: Decimal | None) -> Decimal | None:
    """A best bid, or None when unknown or the side is empty (<= 0)."""
    return None if price is None or price <= _ZERO else price


def ask_or_none(price: Decimal | None) -> Decimal | None:
    """A best ask, or None when unknown or the side is empty (>= 1)."""
    return None if price is None or price >= _ONE else price

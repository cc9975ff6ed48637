"""
Logging: structlog, JSON lines when stdout is not a terminal, readable
console output on a terminal. Configured once by the CLI before ``trio.run``.

No secret reaches a line: :func:`redact_secrets` masks DSN passwords
(``postgresql://u:***@h/db``, ``password=***``) in every string value.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import orjson
import structlog

__all__ = [
    "RateLimitedLog",
    "configure_logging",
    "mask_dsn_secrets",
    "masked_dsn",
    "redact",
    "redact_secrets",
]

# scheme://user:SECRET@host: the secret runs to the last "@" of the authority (one
# that is followed by a host, then the path, the query, a quote, a space or the end).
_URI_PASSWORD = re.compile(
    r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s\"']*:)(?P<secret>[^\s\"']*?)"
    r"(?=@[^@/\s\"']*(?:[/?\s\"'\]]|$))",
    re.I,
)
_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<secret>[^&#\s\"']*)", re.I)
_KV_PASSWORD = re.compile(
    r"(?<![?&])(?P<head>\b(?:password|passwd|pwd)\s*=\s*)(?P<secret>'(?:[^'\\]|\\.)*'?|\S+)",
    re.I,
)


def redact(text: str) -> str:
    """
    Return ``text`` with every password replaced by ``***``: in URIs
    (``postgresql://u:***@h/db``, ``?password=***``), in libpq ``key=value``
    strings (``password=***``), and in text that merely contains such a DSN
    (an error message, a TOML list that failed to parse). Idempotent.
    """
    text = _URI_PASSWORD.sub(r"\g<head>***", text)
    text = _QUERY_PASSWORD.sub(r"\g<head>***", text)
    return _KV_PASSWORD.sub(r"\g<head>***", text)


# In a DSN known to be one (not text that may contain one), ?password= runs to the
# next parameter: spaces and quotes included.
_DSN_QUERY_PASSWORD = re.compile(r"(?P<head>[?&]password=)(?P<secret>[^&#]*)", re.I)


def _dsn_secrets(dsn: str) -> list[str]:
    """
    The passwords in ``dsn`` as written, longest first, found even when it
    does not parse: a URI's ``user:SECRET@`` (to the last ``@``, spaces and
    quotes included) and ``?password=SECRET``; a ``key=value`` string's
    ``password=SECRET`` (quoted or not; its quotes stripped too).
    """
    found: list[str] = []
    _scheme, uri, rest = dsn.partition("://")
    if uri:
        userinfo = rest.rpartition("@")[0]
        found.append(userinfo.partition(":")[2])
        found += [m["secret"] for m in _DSN_QUERY_PASSWORD.finditer(rest)]
    else:
        for m in _KV_PASSWORD.finditer(dsn):
            found += [m["secret"], m["secret"].strip("'")]
    return sorted({secret for secret in found if secret}, key=len, reverse=True)


def mask_dsn_secrets(text: str, dsn: str) -> str:
    """
    ``text`` (a message that may quote ``dsn``) with every password of ``dsn``
    as ``***``, also where :func:`redact` cannot see it (a password with
    spaces or quotes, a DSN that does not parse).
    """
    for secret in _dsn_secrets(dsn):
        text = text.replace(secret, "***")
    return text


def masked_dsn(dsn: str) -> str:
    """
    ``dsn`` with its passwords as ``***``: ``postgresql://u:***@h/db``,
    ``?password=***``, ``password='***'`` (quoted, so that :func:`redact`
    of a message quoting it stops at its end).
    """
    _scheme, uri, rest = dsn.partition("://")
    if not uri:
        return _KV_PASSWORD.sub(r"\g<head>'***'", dsn)
    userinfo, at, hostpart = rest.rpartition("@")
    if at and ":" in userinfo:
        dsn = f"{_scheme}://{userinfo.partition(':')[0]}:***@{hostpart}"
    return _DSN_QUERY_PASSWORD.sub(r"\g<head>***", dsn)


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Structlog processor: redact passwords in every string value."""
    for key, value in event_dict.items():
        if isinstance(value, str) and ("@" in value or "=" in value):
            event_dict[key] = redact(value)
    return event_dict


def _dumps(obj: Any, **_kw: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """
    Configure structlog for the process.

    Args:
        level: ``debug``, ``info``, ``warning`` or ``error``.
        fmt: ``auto`` (console when stdout is a terminal, else JSON),
            ``json`` or ``console``.
    """
    console = fmt == "console" or (fmt == "auto" and sys.stdout.isatty())
    renderer: Any = (
        structlog.dev.ConsoleRenderer()
        if console
        else structlog.processors.JSONRenderer(serializer=_dumps)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


class RateLimitedLog:
    """
    Allows one log line per ``key`` per ``interval`` seconds and counts the rest.

    Used so that a flood of bad frames logs once with context, not once per
    frame. ``allow`` returns the number suppressed since the last allowed
    line, or None when this one should be suppressed too.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, key: str, now: float) -> int | None:
        """Return the suppressed count if a line for ``key`` may be logged at ``now``."""
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return None
        self._last[key] = now
        return self._suppressed.pop(key, 0)

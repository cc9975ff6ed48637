"""Log redaction, the rate-limited log helper, and the JSON log output."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest
import structlog

from polystream.logs import RateLimitedLog, configure_logging, redact, redact_secrets


@pytest.fixture
def reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "postgresql://user:hunter2@db.example:5432/app",
            "postgresql://user:***@db.example:5432/app",
        ),
        ("postgres://u:p%40ss@h/db?sslmode=require", "postgres://u:***@h/db?sslmode=require"),
        ("postgresql://:only-pass@h/db", "postgresql://:***@h/db"),
        ("postgresql://u:a:b/c@h/db", "postgresql://u:***@h/db"),
        (
            "connect to POSTGRESQL://Admin:hunter2!@10.0.0.1/x failed",
            "connect to POSTGRESQL://Admin:***@10.0.0.1/x failed",
        ),
        ("host=h user=u password=hunter2 dbname=d", "host=h user=u password=*** dbname=d"),
        ("host=h password = hunter2 port=5432", "host=h password = *** port=5432"),
        ("host=h password='hunter 2' dbname=d", "host=h password=*** dbname=d"),
        ("PASSWORD=hunter2", "PASSWORD=***"),
        ("pwd=hunter2;server=x", "pwd=***"),
        ("postgresql://u@h/db?password=hunter2", "postgresql://u@h/db?password=***"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert "hunter" not in redact(text)


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://user@host/db",
        "host=h user=u dbname=d",
        "wss://ws-subscriptions-clob.polymarket.com/ws/market",
        "price=0.5 size=10",
        "",
    ],
)
def test_redact_leaves_text_without_secrets(text: str) -> None:
    assert redact(text) == text


def test_redact_is_idempotent() -> None:
    once = redact("postgresql://u:pw@h/db host=h password=pw")
    assert redact(once) == once
    assert "pw@" not in once and "password=pw" not in once


def test_redact_secrets_processor() -> None:
    event = {
        "event": "db_connect",
        "dsn": "postgresql://u:pw@h/db",
        "conninfo": "host=h password=pw",
        "count": 3,
        "plain": "nothing here",
    }
    out = redact_secrets(None, "info", event)
    assert out["dsn"] == "postgresql://u:***@h/db"
    assert out["conninfo"] == "host=h password=***"
    assert out["count"] == 3
    assert out["plain"] == "nothing here"


def test_rate_limited_log() -> None:
    limiter = RateLimitedLog(interval=10.0)
    assert limiter.allow("invalid_json", 0.0) == 0
    assert limiter.allow("invalid_json", 1.0) is None
    assert limiter.allow("invalid_json", 9.99) is None
    assert limiter.allow("other", 5.0) == 0  # keys are independent
    assert limiter.allow("invalid_json", 10.0) == 2  # two suppressed since the last line
    assert limiter.allow("invalid_json", 10.5) is None
    assert limiter.allow("invalid_json", 25.0) == 1
    assert limiter.allow("invalid_json", 40.0) == 0


def test_rate_limited_log_flood() -> None:
    limiter = RateLimitedLog(interval=1.0)
    allowed = [
        (k / 1000, n) for k in range(5000) if (n := limiter.allow("k", k / 1000)) is not None
    ]
    assert [at for at, _ in allowed] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert [n for _, n in allowed] == [0, 999, 999, 999, 999]


def _json_lines(out: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in out.splitlines() if line.strip()]


def test_json_logging_redacts_passwords(
    capsys: pytest.CaptureFixture[str], reset_structlog: None
) -> None:
    configure_logging(level="info", fmt="json")
    log = structlog.get_logger("polystream.test")
    log.info("db_connect", dsn="postgresql://polystream:hunter2@127.0.0.1:5432/app")
    log.warning("db_failed", error="connection to host=h password=hunter2 dbname=d refused")
    out = capsys.readouterr().out
    assert "hunter2" not in out
    first, second = _json_lines(out)
    assert first["event"] == "db_connect"
    assert first["level"] == "info"
    assert first["dsn"] == "postgresql://polystream:***@127.0.0.1:5432/app"
    assert "timestamp" in first
    assert second["level"] == "warning"
    assert second["error"] == "connection to host=h password=*** dbname=d refused"


def test_json_logging_redacts_exceptions(
    capsys: pytest.CaptureFixture[str], reset_structlog: None
) -> None:
    configure_logging(level="info", fmt="json")
    log = structlog.get_logger("polystream.test")
    try:
        raise RuntimeError("could not connect: postgresql://u:hunter2@h/db")
    except RuntimeError:
        log.exception("db_crash")
    out = capsys.readouterr().out
    assert "hunter2" not in out
    (line,) = _json_lines(out)
    assert line["event"] == "db_crash"
    assert "postgresql://u:***@h/db" in str(line["exception"])


def test_json_logging_level_filter(
    capsys: pytest.CaptureFixture[str], reset_structlog: None
) -> None:
    configure_logging(level="warning", fmt="json")
    log = structlog.get_logger("polystream.test")
    log.info("hidden")
    log.debug("hidden too")
    log.error("shown", n=1)
    lines = _json_lines(capsys.readouterr().out)
    assert [(line["event"], line["level"], line["n"]) for line in lines] == [("shown", "error", 1)]


def test_console_logging_redacts_too(
    capsys: pytest.CaptureFixture[str], reset_structlog: None
) -> None:
    configure_logging(level="info", fmt="console")
    structlog.get_logger("polystream.test").info("db", dsn="postgresql://u:hunter2@h/db")
    out = capsys.readouterr().out
    assert "hunter2" not in out
    assert "postgresql://u:***@h/db" in out


def test_redact_quoted_password_with_escaped_quote() -> None:
    redacted = redact("host=h password='se\\'cret' dbname=d")
    assert redacted == "host=h password=*** dbname=d"

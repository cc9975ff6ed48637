"""load_config: defaults, file values, environment overrides, and error messages."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

from polystream.config import (
    DEFAULT_FEED_URL,
    Config,
    load_config,
    render_config_table,
    render_config_toml,
    schema_keys,
)
from polystream.errors import ConfigError

REPO_CONFIG = Path(__file__).parent.parent / "config.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults() -> None:
    config = load_config(None, environ={})
    assert config == Config()
    assert config.database.dsn == ""
    assert config.database.statement_timeout == 30.0
    assert config.feed.url == DEFAULT_FEED_URL
    assert DEFAULT_FEED_URL == "wss://ws-subscriptions-clob.polymarket.com/ws/market"
    assert config.feed.ping_interval == 10.0
    assert config.feed.max_assets_per_connection == 200
    assert config.feed.max_subscribe_bytes == 40 * 1024
    assert config.feed.watch == ()
    assert config.feed.custom_feature_enabled is False
    assert config.pipeline.debounce == 1.0
    assert config.pipeline.market_flush_interval == 0.25
    assert config.pipeline.positions_per_second == 500.0
    assert config.positions.mark == "display"
    assert config.health.listen == "127.0.0.1:9108"
    assert config.log.level == "info"
    assert config.log.format == "auto"


def test_empty_file_is_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, ""), environ={}) == Config()


def test_file_values(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
[database]
dsn = "postgresql://u@h/db"
retry_max = 5

[feed]
url = "ws://127.0.0.1:8765/ws/market"
ping_interval = 2.5
max_assets_per_connection = 500
watch = ["111", "222"]
custom_feature_enabled = true

[pipeline]
debounce = 0
positions_per_second = 20
queue_size = 7

[positions]
mark = "best_bid"

[health]
listen = "0.0.0.0:0"

[state]
dir = "/var/lib/polystream"

[log]
level = "debug"
format = "json"
""",
    )
    config = load_config(path, environ={})
    assert config.database.dsn == "postgresql://u@h/db"
    assert config.database.retry_max == 5.0 and isinstance(config.database.retry_max, float)
    assert config.feed.url == "ws://127.0.0.1:8765/ws/market"
    assert config.feed.ping_interval == 2.5
    assert config.feed.max_assets_per_connection == 500
    assert config.feed.watch == ("111", "222")
    assert config.feed.custom_feature_enabled is True
    assert config.pipeline.debounce == 0.0
    assert config.pipeline.positions_per_second == 20.0
    assert config.pipeline.queue_size == 7
    assert config.positions.mark == "best_bid"
    assert config.health.listen == "0.0.0.0:0"
    assert config.state.dir == "/var/lib/polystream"
    assert (config.log.level, config.log.format) == ("debug", "json")
    # untouched keys keep their defaults
    assert config.feed.backoff_max == 30.0
    assert config.feed.stale_after == 120.0
    assert config.feed.pong_timeout == 30.0


def test_env_overrides_file(tmp_path: Path) -> None:
    path = _write(tmp_path, '[feed]\nurl = "wss://file.example/ws"\nwatch = ["f"]\n')
    config = load_config(
        path,
        environ={
            "POLYSTREAM_FEED__URL": "ws://127.0.0.1:8765/ws/market",
            "POLYSTREAM_PIPELINE__DEBOUNCE": "0.5",
        },
    )
    assert config.feed.url == "ws://127.0.0.1:8765/ws/market"
    assert config.feed.watch == ("f",)
    assert config.pipeline.debounce == 0.5


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a,b", ("a", "b")),
        (" a , b ,", ("a", "b")),
        ('["a","b"]', ("a", "b")),
        ('[ "a", "b" ]', ("a", "b")),
        ("single", ("single",)),
        ("", ()),
    ],
)
def test_env_watch_forms(text: str, expected: tuple[str, ...]) -> None:
    config = load_config(None, environ={"POLYSTREAM_FEED__WATCH": text})
    assert config.feed.watch == expected


@pytest.mark.parametrize(
    ("name", "text", "attribute", "expected"),
    [
        ("POLYSTREAM_FEED__MAX_ASSETS_PER_CONNECTION", "450", "max_assets_per_connection", 450),
        ("POLYSTREAM_FEED__PING_INTERVAL", "3", "ping_interval", 3.0),
        ("POLYSTREAM_FEED__CUSTOM_FEATURE_ENABLED", "true", "custom_feature_enabled", True),
        ("POLYSTREAM_FEED__CUSTOM_FEATURE_ENABLED", "0", "custom_feature_enabled", False),
        ("polystream_feed__url".upper(), "wss://x.example/ws", "url", "wss://x.example/ws"),
    ],
)
def test_env_typed_values(name: str, text: str, attribute: str, expected: object) -> None:
    config = load_config(None, environ={name: text})
    value = getattr(config.feed, attribute)
    assert value == expected
    assert type(value) is type(expected)


def test_unrelated_environment_is_ignored() -> None:
    config = load_config(
        None,
        environ={
            "POLYSTREAM_TEST_DSN": "postgresql://postgres@127.0.0.1/postgres",
            "PATH": "/usr/bin",
            "FEED__URL": "http://nope",
        },
    )
    assert config == Config()


def _error(tmp_path: Path, file_text: str | None, environ: dict[str, str]) -> str:
    path = None if file_text is None else _write(tmp_path, file_text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=environ)
    return str(info.value)


@pytest.mark.parametrize(
    ("file_text", "key", "expected"),
    [
        ("[feed]\nmax_assets_per_connection = 501", "feed.max_assets_per_connection", "1 to 500"),
        ("[feed]\nmax_assets_per_connection = 0", "feed.max_assets_per_connection", "1 to 500"),
        ("[feed]\nmax_assets_per_connection = 2.5", "feed.max_assets_per_connection", "integer"),
        ('[feed]\nurl = "http://x"', "feed.url", "ws:// or wss://"),
        ('[feed]\nurl = "wss://"', "feed.url", "ws:// or wss://"),
        ('[feed]\nwatch = "abc"', "feed.watch", "list of asset id strings"),
        ("[feed]\nwatch = [1, 2]", "feed.watch", "list of asset id strings"),
        ('[feed]\ncustom_feature_enabled = "yes"', "feed.custom_feature_enabled", "true or false"),
        ("[feed]\nping_interval = 0", "feed.ping_interval", "seconds > 0"),
        ('[feed]\nping_interval = "10"', "feed.ping_interval", "seconds > 0"),
        ("[feed]\nmax_subscribe_bytes = 100", "feed.max_subscribe_bytes", ">= 1024"),
        ("[feed]\nconnect_stagger = -1", "feed.connect_stagger", "seconds >= 0"),
        ("[pipeline]\ndebounce = -0.5", "pipeline.debounce", "seconds >= 0"),
        ("[pipeline]\npositions_per_second = 0", "pipeline.positions_per_second", "> 0"),
        ("[pipeline]\nqueue_size = true", "pipeline.queue_size", "integer >= 1"),
        ('[positions]\nmark = "last"', "positions.mark", '"display", "midpoint", "best_bid"'),
        ('[health]\nlisten = "nope"', "health.listen", "host:port"),
        ('[health]\nlisten = "127.0.0.1:99999"', "health.listen", "host:port"),
        ('[health]\nlisten = ":9108"', "health.listen", "host:port"),
        ('[log]\nlevel = "verbose"', "log.level", '"debug", "info", "warning", "error"'),
        ('[log]\nformat = "xml"', "log.format", '"auto", "json", "console"'),
        ("[database]\ndsn = 5", "database.dsn", "DSN"),
    ],
)
def test_bad_file_value_names_key_and_form(
    tmp_path: Path, file_text: str, key: str, expected: str
) -> None:
    message = _error(tmp_path, file_text, {})
    assert message.startswith(f"{key} = ")
    assert "expected" in message and expected in message
    assert str(tmp_path / "config.toml") in message  # where it came from


@pytest.mark.parametrize(
    ("name", "text", "key", "expected"),
    [
        (
            "POLYSTREAM_FEED__MAX_ASSETS_PER_CONNECTION",
            "501",
            "feed.max_assets_per_connection",
            "1 to 500",
        ),
        (
            "POLYSTREAM_FEED__MAX_ASSETS_PER_CONNECTION",
            "many",
            "feed.max_assets_per_connection",
            "1 to 500",
        ),
        ("POLYSTREAM_FEED__URL", "http://x", "feed.url", "ws:// or wss://"),
        ("POLYSTREAM_FEED__WATCH", "[1, 2]", "feed.watch", "list of asset id strings"),
        ("POLYSTREAM_FEED__WATCH", '["a", ', "feed.watch", "list of asset id strings"),
        (
            "POLYSTREAM_FEED__CUSTOM_FEATURE_ENABLED",
            "maybe",
            "feed.custom_feature_enabled",
            "true or false",
        ),
        ("POLYSTREAM_PIPELINE__DEBOUNCE", "soon", "pipeline.debounce", "seconds >= 0"),
        ("POLYSTREAM_PIPELINE__DEBOUNCE", "-1", "pipeline.debounce", "seconds >= 0"),
        ("POLYSTREAM_POSITIONS__MARK", "last", "positions.mark", '"display"'),
        ("POLYSTREAM_HEALTH__LISTEN", "nope", "health.listen", "host:port"),
    ],
)
def test_bad_env_value_names_key_variable_and_form(
    tmp_path: Path, name: str, text: str, key: str, expected: str
) -> None:
    message = _error(tmp_path, None, {name: text})
    assert message.startswith(f"{key} = ")
    assert f"${name}" in message
    assert "expected" in message and expected in message


def test_env_error_wins_over_good_file(tmp_path: Path) -> None:
    message = _error(tmp_path, '[feed]\nurl = "wss://ok.example/ws"', {"POLYSTREAM_FEED__URL": "x"})
    assert message.startswith("feed.url = 'x'")


def test_unknown_section_in_file(tmp_path: Path) -> None:
    message = _error(tmp_path, "[feeds]\nurl = 1", {})
    assert "[feeds]" in message and "unknown section" in message


def test_unknown_key_in_file(tmp_path: Path) -> None:
    message = _error(tmp_path, '[feed]\nuri = "wss://x/ws"', {})
    assert "feed.uri" in message and "unknown key" in message


def test_top_level_key_in_file(tmp_path: Path) -> None:
    message = _error(tmp_path, 'url = "wss://x/ws"', {})
    assert "url" in message and "unknown" in message


@pytest.mark.parametrize(
    ("name", "key"),
    [("POLYSTREAM_FEED__URI", "feed.uri"), ("POLYSTREAM_FEEDS__URL", "feeds.url")],
)
def test_unknown_key_in_env(tmp_path: Path, name: str, key: str) -> None:
    message = _error(tmp_path, None, {name: "x"})
    assert name in message and key in message and "unknown key" in message


def test_backoff_max_below_initial(tmp_path: Path) -> None:
    message = _error(tmp_path, "[feed]\nbackoff_initial = 5\nbackoff_max = 1", {})
    assert "feed.backoff_max" in message and "feed.backoff_initial" in message


def test_not_toml_file(tmp_path: Path) -> None:
    message = _error(tmp_path, "[feed\nurl = ", {})
    assert "not valid TOML" in message
    assert str(tmp_path / "config.toml") in message


def test_not_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"\xff\xfe[feed]\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, environ={})


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_config(tmp_path, environ={})


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(missing, environ={})
    message = str(info.value)
    assert str(missing) in message and "not found" in message


def test_schema_keys_cover_every_field() -> None:
    keys = schema_keys()
    assert len(keys) == len(set(keys))
    config = Config()
    expected = {
        (section.name, field.name)
        for section in attrs.fields(Config)
        for field in attrs.fields(type(getattr(config, section.name)))
    }
    assert set(keys) == expected


def test_repo_config_toml_documents_every_key() -> None:
    if not REPO_CONFIG.exists():
        pytest.skip(f"{REPO_CONFIG} not written yet")
    text = REPO_CONFIG.read_text(encoding="utf-8")
    config = load_config(REPO_CONFIG, environ={})
    assert isinstance(config, Config)
    missing = []
    for section, key in schema_keys():
        # the key is documented when it appears as an assignment, commented out or not
        if not re.search(rf"^[#\s]*{re.escape(key)}\s*=", text, re.MULTILINE):
            missing.append(f"{section}.{key}")
        if f"[{section}]" not in text:
            missing.append(f"[{section}]")
    assert missing == []


def test_repo_config_toml_is_the_declaration_rendered() -> None:
    """config.toml is generated from polystream/config.py: `python -m polystream.config`."""
    assert REPO_CONFIG.read_text(encoding="utf-8") == render_config_toml()


def test_readme_configuration_table_is_the_declaration_rendered() -> None:
    """README's table is generated too: `python -m polystream.config --readme`."""
    text = (REPO_CONFIG.parent / "README.md").read_text(encoding="utf-8")
    begin = text.index("<!-- config-table")
    table = text[text.index("\n", begin) + 1 : text.index("<!-- /config-table -->")]
    assert table == render_config_table()

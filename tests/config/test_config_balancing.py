"""The issue 10 keys of the schema: upstream entries (table and quick form),
``balance``, ``[proxy.NAME.health]``, ``retries``, ``allow``/``deny`` and
``max_connections_per_source``: what they accept and how a mistake is named."""

from __future__ import annotations

import tomllib

import pytest

from midway.cli import build_parser, config_from_args
from midway.config.load import config_from_dict, health_settings
from midway.config.schema import ProxyConfig
from midway.errors import ConfigError


def load(text: str) -> ProxyConfig:
    return config_from_dict(tomllib.loads(text)).proxies[-1]


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(tomllib.loads(text))
    return str(info.value)


ONE = '[proxy.redis]\nlisten = ":6380"\n'


def test_entries_as_address_table_and_quick_form_mean_the_same() -> None:
    table = load(ONE + 'upstreams = ["a:1", {address = "b:1", weight = 3}, '
                       '{address = "c:1", backup = true}]\n')
    quick = load(ONE + 'upstreams = ["a:1", "b:1,weight=3", "c:1, backup"]\n')
    assert table.upstreams == quick.upstreams
    assert [(u.weight, u.backup) for u in table.upstreams] == [(1, False), (3, False), (1, True)]
    assert [str(u) for u in table.upstreams] == ["a:1", "b:1,weight=3", "c:1,backup"]
    assert load(ONE + 'upstreams = "a:1,weight=0"\n').upstreams[0].weight == 0  # drained


@pytest.mark.parametrize(("entries", "message"), [
    ('["a:1", "b:1", {address = "c:1", weight = 300}]',
     "proxy.redis.upstreams[2].weight: must be 0-256 (0 = drained), got 300"),
    ('["a:1", "b:1,weight=-1"]', "proxy.redis.upstreams[1].weight: must be 0-256"),
    ('["a:1,weight=x"]', "proxy.redis.upstreams[0].weight: expected a whole number, got 'x'"),
    ('["a:1,heavy"]', "proxy.redis.upstreams[0]: 'heavy' is not an upstream option"),
    ('[{address = "a:1", wieght = 2}]',
     "proxy.redis.upstreams[0].wieght: unknown key; did you mean 'weight'?"),
    ('[{weight = 2}]', "proxy.redis.upstreams[0].address: missing (required)"),
    ('[{address = "a:1", backup = "yes"}]',
     "proxy.redis.upstreams[0].backup: expected true or false"),
    ('["a:1", "a:1,weight=2"]', "proxy.redis.upstreams[1]: a:1 is listed twice"),
])
def test_a_bad_entry_is_named_by_its_index_and_key(entries: str, message: str) -> None:
    assert error(ONE + f"upstreams = {entries}\n").startswith(message)


def test_health_table_inherits_from_defaults_key_by_key() -> None:
    proxy = load('[defaults.health]\ninterval_s = 2\nfall = 5\n' + ONE +
                 'upstreams = "a:1"\n[proxy.redis.health]\nfall = 2\nsend = "PING\\r\\n"\n')
    assert (proxy.health.interval_s, proxy.health.fall, proxy.health.rise) == (2, 2, 2)
    assert proxy.health.send == "PING\r\n"  # the TOML escape is decoded
    default = load(ONE + 'upstreams = "a:1"\n').health
    assert (default.interval_s, default.eject_after, default.eject_s) == (0, 3, 10)


@pytest.mark.parametrize(("table", "message"), [
    ("timeout_s = 0", "proxy.redis.health.timeout_s: must be more than 0"),
    ("rise = 0", "proxy.redis.health.rise: must be at least 1"),
    ("interval = 2", "proxy.redis.health.interval: unknown key; did you mean 'interval_s'?"),
    (f'expect = "{"x" * 16385}"', "proxy.redis.health.expect: must be at most 16384 bytes"),
])
def test_a_bad_health_key_is_named(table: str, message: str) -> None:
    assert error(ONE + f'upstreams = "a:1"\n[proxy.redis.health]\n{table}\n').startswith(message)


SSL_REQUEST = b"\x00\x00\x00\x08\x04\xd2\x16\x2f"


def test_hex_keys_give_binary_bytes_and_replace_the_defaults_text_keys() -> None:
    proxy = load(ONE + 'upstreams = "a:1"\n[proxy.redis.health]\ninterval_s = 2\n'
                       'send_hex = "00 00 00 08 04 D2 16 2f"\nexpect_hex = "4e"\n')
    assert health_settings(proxy.health).send == SSL_REQUEST
    assert health_settings(proxy.health).expect == b"N"
    # One setting written two ways: the proxy's hex key replaces the defaults'
    # text key (and the other way round) instead of clashing with it.
    inherited = load('[defaults.health]\ninterval_s = 2\nsend = "PING"\nexpect_hex = "2b"\n' + ONE +
                     'upstreams = "a:1"\n[proxy.redis.health]\nsend_hex = "ff"\n'
                     'expect = "+PONG"\n')
    settings = health_settings(inherited.health)
    assert (settings.send, settings.expect) == (b"\xff", b"+PONG")
    kept = load('[defaults.health]\ninterval_s = 2\nexpect_hex = "2b"\n' + ONE +
                'upstreams = "a:1"\n')
    assert health_settings(kept.health).expect == b"+"


@pytest.mark.parametrize(("where", "table", "message"), [
    ("proxy.redis.health", 'send = "x"\nsend_hex = "00"',
     "proxy.redis.health.send_hex: give send (text) or send_hex (bytes in hex), not both"),
    ("defaults.health", 'expect = "x"\nexpect_hex = "00"',
     "defaults.health.expect_hex: give expect (text) or expect_hex (bytes in hex), not both"),
    ("proxy.redis.health", 'send_hex = "04 d2 1"',
     "proxy.redis.health.send_hex: '04 d2 1': the last byte has one digit, '1'"),
    ("proxy.redis.health", 'expect_hex = "0x4e"',
     "proxy.redis.health.expect_hex: '0x4e': 'x' at character 2 is not a hex digit"),
    ("proxy.redis.health", f'expect_hex = "{"00" * 16385}"',
     "proxy.redis.health.expect_hex: must be at most 16384 bytes"),
], ids=["send-both", "expect-both-in-defaults", "one-digit", "0x", "too-long"])
def test_a_bad_hex_key_is_named_with_its_text(where: str, table: str, message: str) -> None:
    text = f"[{where}]\n{table}\n" + ONE + 'upstreams = "a:1"\n'
    if where != "defaults.health":
        text = ONE + f'upstreams = "a:1"\n[{where}]\n{table}\n'
    assert error(text).startswith(message)


def test_access_rules_retries_and_the_per_source_limit() -> None:
    proxy = load('[defaults]\ndeny = ["192.0.2.0/24"]\nretries = 1\n' + ONE +
                 'upstreams = "a:1"\nallow = ["10.0.0.0/8", "::1"]\n'
                 'max_connections_per_source = 20\n')
    assert proxy.deny == ("192.0.2.0/24",) and proxy.allow == ("10.0.0.0/8", "::1")
    assert proxy.retries == 1 and proxy.max_connections_per_source == 20
    assert load(ONE + 'upstreams = "a:1"\nretries = "all"\n').retries == -1
    assert error(ONE + 'upstreams = "a:1"\ndeny = ["10.0.0.0/8", "10.0.0.300"]\n').startswith(
        "proxy.redis.deny[1]: '10.0.0.300' is not an IPv4 or IPv6 network")
    assert error('[defaults]\nallow = ["10.0.0.1/24"]\n').startswith(
        "defaults.allow[0]: '10.0.0.1/24' has host bits set; did you mean '10.0.0.0/24'?")


def test_a_malformed_access_rule_is_named_once_with_its_flag_or_key() -> None:
    # The text was repeated: "... network ('10.0.0.0/33' does not appear to be an
    # IPv4 or IPv6 network)".
    assert cli_error(":1", "a:1", "--allow", "10.0.0.0/33") == (
        "--allow: '10.0.0.0/33' is not an IPv4 or IPv6 network: an IPv4 prefix length is 0-32")
    assert cli_error(":1", "a:1", "--deny", "::/8", "--deny", "2001:db8::/129") == (
        "--deny: '2001:db8::/129' is not an IPv4 or IPv6 network: an IPv6 prefix length "
        "is 0-128")
    assert error(ONE + 'upstreams = "a:1"\ndeny = ["10.0.0.0/8", "10.0.0.300"]\n') == (
        "proxy.redis.deny[1]: '10.0.0.300' is not an IPv4 or IPv6 network")


def test_an_unknown_balance_lists_the_registry_names() -> None:
    assert error(ONE + 'upstreams = "a:1"\nbalance = "leastconn"\n') == (
        "proxy.redis.balance: 'leastconn' is not one of: hash_source, least_connections, "
        "random_two, round_robin")


def cli(*argv: str) -> ProxyConfig:
    return config_from_args(build_parser().parse_args(list(argv))).proxies[0]


def cli_error(*argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        cli(*argv)
    return str(info.value)


def test_the_health_flags_decode_toml_escapes() -> None:
    proxy = cli(":1", "a:1", "--health-interval-s", "2", "--health-send", r"PING\r\n\u00e9",
                "--health-expect", "+PONG")
    assert proxy.health.send == "PING\r\né" and proxy.health.expect == "+PONG"
    assert cli_error(":1", "a:1", "--health-send", r"\q").startswith(
        "--health-send: '\\\\q': unknown escape \\q")


def test_the_hex_health_flags_take_hex_and_name_themselves() -> None:
    proxy = cli(":1", "a:1", "--health-interval-s", "2", "--health-send-hex",
                "00 00 00 08 04 d2 16 2f", "--health-expect-hex", "4E")
    assert health_settings(proxy.health).send == SSL_REQUEST
    assert health_settings(proxy.health).expect == b"N"
    assert cli_error(":1", "a:1", "--health-send-hex", "0g") == (
        "--health-send-hex: '0g': 'g' at character 2 is not a hex digit (two digits a byte, "
        "e.g. '00 00 00 08 04 d2 16 2f')")
    assert cli_error(":1", "a:1", "--health-expect-hex", r"4e\n").startswith(
        "--health-expect-hex: '4e\\\\n': '\\\\' at character 3")  # no TOML escapes in hex
    assert cli_error(":1", "a:1", "--health-send", "PING", "--health-send-hex", "00") == (
        "--health-send-hex: give --health-send (text) or --health-send-hex (bytes in hex), "
        "not both")


@pytest.mark.parametrize("key", ["timeout_s", "rise", "fall", "send", "expect", "send_hex",
                                 "expect_hex"])
def test_a_check_key_is_refused_while_checks_are_off(key: str) -> None:
    """``--health-send PING`` without ``--health-interval-s`` was accepted, and
    no check ever ran (as unix_mode without a unix listener)."""
    value = {"timeout_s": "1", "rise": "2", "fall": "2"}.get(key, "50")
    flag = "--health-" + key.replace("_", "-")
    assert cli_error(":1", "a:1", flag, value) == (
        f"{flag}: needs interval_s: active checks are off in this proxy without it, so "
        "this key would do nothing")
    text = f"{key} = {value}" if key in ("timeout_s", "rise", "fall") else f'{key} = "{value}"'
    assert error(ONE + f'upstreams = "a:1"\n[proxy.redis.health]\n{text}\n').startswith(
        f"proxy.redis.health.{key}: needs interval_s")
    assert error(ONE + f'upstreams = "a:1"\n[proxy.redis.health]\ninterval_s = 0\n{text}\n'
                 ).startswith(f"proxy.redis.health.{key}: needs interval_s")
    checked = cli(":1", "a:1", "--health-interval-s", "2", flag, value).health
    assert str(getattr(checked, key)) in (value, f"{value}.0")  # taken with checks on


def test_a_check_key_in_defaults_needs_one_proxy_that_checks() -> None:
    other = '[proxy.b]\nlisten = ":2"\nupstreams = "a:1"\n'
    checked = ONE + 'upstreams = "a:1"\n[proxy.redis.health]\ninterval_s = 2\n'
    # b inherits a send it does not use (its checks are off): that is fine.
    assert load('[defaults.health]\nsend = "PING"\n' + other + checked).health.send == "PING"
    assert error('[defaults.health]\nsend = "PING"\n' + other) == (
        "defaults.health.send: needs interval_s: active checks are off in every proxy "
        "without it, so this key would do nothing")


@pytest.mark.parametrize("escape", [r"\U00110000", r"\ud800", r"\uDFFF"])
def test_a_health_flag_escape_that_is_no_character_is_refused_as_toml_refuses_it(
        escape: str) -> None:
    # Past U+10FFFF (chr() refused it in its own words) or a surrogate (the start
    # failed encoding it as UTF-8, with a garbled flag name).
    assert cli_error(":1", "a:1", "--health-send", f"x{escape}") == (
        f"--health-send: 'x\\\\{escape[1:]}': {escape} is not a Unicode scalar value")


@pytest.mark.parametrize("key", ["send", "expect"])
def test_health_text_that_is_no_utf_8_from_a_dictionary_names_its_key(key: str) -> None:
    """TOML cannot hold a lone surrogate; a dictionary (the Python API) can."""
    with pytest.raises(ConfigError) as info:
        config_from_dict({"proxy": {"redis": {"listen": ":6380", "upstreams": "a:1",
                                              "health": {key: "PING\ud800"}}}})
    assert str(info.value) == (f"proxy.redis.health.{key}: 'PING\\ud800' cannot be sent as "
                               "UTF-8 (a lone surrogate at position 4)")


def test_a_number_out_of_range_is_quoted_as_written() -> None:
    # Whole seconds were shown converted: "got -1.0" for a typed -1.
    assert cli_error(":1", "a:1", "--connect-timeout-s", "-1") == (
        "--connect-timeout-s: must be at least 0, got -1")
    assert cli_error(":1", "a:1", "--drain-timeout-s", "-0.5") == (
        "--drain-timeout-s: must be at least 0, got -0.5")
    assert error(ONE + 'upstreams = "a:1"\nidle_timeout_s = -5\n') == (
        "proxy.redis.idle_timeout_s: must be at least 0, got -5")
    assert cli(":1", "a:1", "--connect-timeout-s", "2").connect_timeout_s == 2.0


def test_a_number_flag_is_quoted_as_typed_in_any_notation() -> None:
    # An exponent, a sign or a digit separator was shown converted:
    # "got 10000000000.0" for a typed 1e10.
    assert cli_error(":1", "a:1", "--tcp-keepalive-s", "1e10") == (
        "--tcp-keepalive-s: must be at most 32767, got 1e10")
    assert cli_error(":1", "a:1", "--tcp-keepalive-probes", "1_000") == (
        "--tcp-keepalive-probes: must be at most 127, got 1_000")
    assert cli_error(":1", "a:1", "--connect-timeout-s", "Infinity") == (
        "--connect-timeout-s: expected a finite number, got Infinity")
    proxy = cli(":1", "a:1", "--tcp-keepalive-s", "1e1", "--max-connections", "+5")
    assert (repr(proxy.tcp_keepalive_s), repr(proxy.max_connections)) == ("10.0", "5")


def test_unix_mode_is_refused_where_no_listener_is_a_unix_socket() -> None:
    # It was accepted, and did nothing, on a TCP listener.
    assert cli_error(":1", "a:1", "--unix-mode", "660") == (
        "--unix-mode: applies to unix: listeners only (this proxy listens on TCP alone)")
    assert error(ONE + 'upstreams = "a:1"\nunix_mode = "660"\n') == (
        "proxy.redis.unix_mode: applies to unix: listeners only (this proxy listens on "
        "TCP alone)")
    tcp_and_unix = '[proxy.b]\nlisten = [":1", "unix:/tmp/b.sock"]\nupstreams = "a:1"\n'
    assert load(tcp_and_unix + 'unix_mode = "660"\n').unix_mode == "660"
    # From [defaults], one proxy with a unix listener is enough.
    assert load('[defaults]\nunix_mode = "660"\n' + tcp_and_unix + ONE +
                'upstreams = "a:1"\n').unix_mode == "660"
    assert error('[defaults]\nunix_mode = "660"\n' + ONE + 'upstreams = "a:1"\n') == (
        "defaults.unix_mode: applies to unix: listeners only (every proxy listens on "
        "TCP alone)")


@pytest.mark.parametrize("admin", ["localhost", "127.0.0.1"])
def test_a_bad_admin_address_lists_only_the_forms_the_admin_api_takes(admin: str) -> None:
    # unix:/path was listed, and then refused: the admin API listens on TCP.
    forms = "expected host:port, [ipv6]:port or :port"
    assert cli_error("--admin", admin) == f"--admin: {admin!r}: {forms}"
    assert error(f'[server]\nadmin = "{admin}"\n') == f"server.admin: {admin!r}: {forms}"
    assert cli_error("--admin", "unix:/tmp/a.sock") == (
        "--admin: the admin API listens on TCP: give host:port")


def test_command_line_errors_name_the_flag_or_the_upstream() -> None:
    # A message that names the address already does not get it twice.
    assert cli_error("unix:/tmp/m.sock", "a:1", "--workers", "2") == (
        "LISTEN unix:/tmp/m.sock: unix-socket listeners need workers = 1")
    assert cli_error(":1", "a:1", "b:1,weight=999") == (
        "UPSTREAM 'b:1,weight=999': weight: must be 0-256 (0 = drained), got 999")
    assert cli_error(":1", "a:1", "--health-rise", "0") == (
        "--health-rise: must be at least 1, got 0")
    assert cli_error(":1", "a:1", "--deny", "nonsense").startswith("--deny: 'nonsense' is not")

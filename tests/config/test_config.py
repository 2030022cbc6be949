"""load_config over real TOML files: what a valid file becomes, and for each kind of
mistake, a ConfigError whose text names the key path a user has to fix."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from midway.config.addresses import Address
from midway.config.load import load_config
from midway.config.schema import Config, ProxyConfig, ServerConfig, UpstreamConfig
from midway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "midway.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def load_error(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return info.value


def proxy(config: Config, name: str) -> ProxyConfig:
    (found,) = [p for p in config.proxies if p.name == name]
    return found


# --- valid files ----------------------------------------------------------------


def test_several_proxies_in_file_order(tmp_path: Path) -> None:
    config = load(tmp_path, """
[proxy.redis]
listen = "127.0.0.1:6380"
upstreams = ["10.0.0.5:6379", "10.0.0.6:6379"]

[proxy.web]
listen = ":8080"
upstreams = ["[::1]:8000"]
""")
    assert [p.name for p in config.proxies] == ["redis", "web"]
    redis = proxy(config, "redis")
    assert redis.listen == (Address("127.0.0.1", 6380),)
    assert redis.upstreams == (UpstreamConfig(Address("10.0.0.5", 6379)),
                               UpstreamConfig(Address("10.0.0.6", 6379)))
    assert proxy(config, "web").listen == (Address("", 8080),)
    assert proxy(config, "web").upstreams == (UpstreamConfig(Address("::1", 8000)),)


def test_defaults_are_inherited_and_a_proxy_can_override_them(tmp_path: Path) -> None:
    config = load(tmp_path, """
[defaults]
connect_timeout_s = 3
idle_timeout_s = 600
tcp_nodelay = false

[proxy.a]
listen = "127.0.0.1:7001"
upstreams = "127.0.0.1:9001"

[proxy.b]
listen = "127.0.0.1:7002"
upstreams = "127.0.0.1:9002"
idle_timeout_s = 0
tcp_nodelay = true
""")
    a, b = proxy(config, "a"), proxy(config, "b")
    assert (a.connect_timeout_s, a.idle_timeout_s, a.tcp_nodelay) == (3.0, 600.0, False)
    assert (b.connect_timeout_s, b.idle_timeout_s, b.tcp_nodelay) == (3.0, 0.0, True)
    # Neither [defaults] nor the proxy set it: the schema default applies.
    assert a.half_close_timeout_s == b.half_close_timeout_s == ProxyConfig().half_close_timeout_s


def test_whole_seconds_are_read_as_float(tmp_path: Path) -> None:
    config = load(tmp_path, """
[proxy.a]
listen = ":0"
upstreams = "127.0.0.1:1"
connect_timeout_s = 2
half_close_timeout_s = 0.25
""")
    a = proxy(config, "a")
    assert a.connect_timeout_s == 2.0 and isinstance(a.connect_timeout_s, float)
    assert a.half_close_timeout_s == 0.25


def test_listen_as_string_or_list(tmp_path: Path) -> None:
    config = load(tmp_path, """
[proxy.one]
listen = "127.0.0.1:7001"
upstreams = "127.0.0.1:9001"

[proxy.many]
listen = ["127.0.0.1:7002", "[::1]:7002", "unix:/tmp/midway-test.sock"]
upstreams = ["127.0.0.1:9002"]
""")
    assert proxy(config, "one").listen == (Address("127.0.0.1", 7001),)
    assert proxy(config, "many").listen == (
        Address("127.0.0.1", 7002), Address("::1", 7002), Address(path="/tmp/midway-test.sock"),
    )


def test_server_table(tmp_path: Path) -> None:
    config = load(tmp_path, """
[server]
max_connections = 1000
drain_timeout_s = 5
access_log = "-"
log_level = "debug"
""")
    assert config.server == ServerConfig(max_connections=1000, drain_timeout_s=5.0,
                                         access_log="-", log_level="debug")
    assert config.proxies == ()


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    assert load(tmp_path, "") == Config()


@pytest.mark.parametrize(
    "pair",
    [
        ("127.0.0.1:6380", "127.0.0.1:6381"),   # other port
        ("127.0.0.1:6380", "127.0.0.2:6380"),   # other host
        ("127.0.0.1:0", "127.0.0.1:0"),         # port 0: the kernel picks two ports
        ("unix:/tmp/a.sock", "unix:/tmp/b.sock"),
    ],
)
def test_listeners_that_do_not_conflict(tmp_path: Path, pair: tuple[str, str]) -> None:
    config = load(tmp_path, f"""
[proxy.a]
listen = "{pair[0]}"
upstreams = "127.0.0.1:1"
[proxy.b]
listen = "{pair[1]}"
upstreams = "127.0.0.1:1"
""")
    assert len(config.proxies) == 2


# --- errors: each one names the key path ------------------------------------------

_ONE_PROXY = """
[proxy.a]
listen = "127.0.0.1:7001"
upstreams = "127.0.0.1:9001"
"""


def test_unknown_top_level_key(tmp_path: Path) -> None:
    err = load_error(tmp_path, "[proxies.a]\nlisten = ':1'\n")
    assert err.path == "proxies"
    assert str(err).startswith("proxies: unknown key")
    assert "did you mean 'proxy'?" in str(err)


def test_unknown_proxy_key_suggests_the_closest(tmp_path: Path) -> None:
    err = load_error(tmp_path, _ONE_PROXY + "idel_timeout_s = 5\n")
    assert err.path == "proxy.a.idel_timeout_s"
    assert str(err) == "proxy.a.idel_timeout_s: unknown key; did you mean 'idle_timeout_s'?"


def test_misspelt_required_key_suggests_it(tmp_path: Path) -> None:
    err = load_error(tmp_path, '[proxy.a]\nlisten = ":1"\nupstream = "127.0.0.1:1"\n')
    assert "proxy.a.upstream: unknown key; did you mean 'upstreams'?" in str(err)


def test_unknown_key_with_nothing_close_has_no_suggestion(tmp_path: Path) -> None:
    err = load_error(tmp_path, _ONE_PROXY + "colour = 'blue'\n")
    assert str(err) == "proxy.a.colour: unknown key"


@pytest.mark.parametrize(
    ("table", "key", "suggestion"),
    [("server", "drain_timeout", "drain_timeout_s"), ("defaults", "conect_timeout_s",
                                                       "connect_timeout_s")],
)
def test_unknown_key_in_server_and_defaults(
    tmp_path: Path, table: str, key: str, suggestion: str
) -> None:
    err = load_error(tmp_path, f"[{table}]\n{key} = 1\n")
    assert str(err) == f"{table}.{key}: unknown key; did you mean {suggestion!r}?"


@pytest.mark.parametrize("where", ["proxy", "defaults"])
@pytest.mark.parametrize("line", ["drain_timeout_s = 5", "workers = 2", "admin = ':1'"])
def test_a_server_option_in_a_proxy_or_defaults_is_said_to_be_one(
        tmp_path: Path, where: str, line: str) -> None:
    """Not 'unknown key; did you mean idle_timeout_s?' for drain_timeout_s."""
    text = _ONE_PROXY + line + "\n" if where == "proxy" else f"[defaults]\n{line}\n"
    err = load_error(tmp_path, text)
    key = line.split(" ")[0]
    assert err.path == ("proxy.a." if where == "proxy" else "defaults.") + key
    assert err.message == "a [server] key (the whole midway process's), not a proxy's"


@pytest.mark.parametrize(
    ("line", "path", "words"),
    [
        ('connect_timeout_s = "5"', "proxy.a.connect_timeout_s",
         'expected a number, got the string "5"'),
        ("idle_timeout_s = true", "proxy.a.idle_timeout_s", "expected a number, got true"),
        # TOML's other types are named in words, never as Python reprs.
        ("idle_timeout_s = 1979-05-27T07:32:00", "proxy.a.idle_timeout_s",
         "expected a number, got a date-time (1979-05-27T07:32:00)"),
        ("idle_timeout_s = 1979-05-27", "proxy.a.idle_timeout_s",
         "expected a number, got a date (1979-05-27)"),
        ("dump_file = 07:32:00", "proxy.a.dump_file",
         "expected a string, got a time of day (07:32:00)"),
        ("pcap = {path = 'x'}", "proxy.a.pcap", "expected a string, got a table"),
        ("backlog = [1, 2]", "proxy.a.backlog", "expected a whole number, got an array"),
        ("hooks = [1]", "proxy.a.hooks[0]", "expected a non-empty string, got 1"),

        ("max_connections = true", "proxy.a.max_connections", "expected a whole number"),
        ("backlog = 128.5", "proxy.a.backlog", "expected a whole number, got 128.5"),
        ("backlog = 128.0", "proxy.a.backlog", "expected a whole number"),
        ('backlog = "128"', "proxy.a.backlog", "expected a whole number"),
        ('tcp_nodelay = "yes"', "proxy.a.tcp_nodelay", "expected true or false"),
        ("tcp_nodelay = 1", "proxy.a.tcp_nodelay", "expected true or false"),
        ("balance = 1", "proxy.a.balance", "expected a string"),
        ("idle_timeout_s = inf", "proxy.a.idle_timeout_s", "expected a finite number"),
        ("idle_timeout_s = nan", "proxy.a.idle_timeout_s", "expected a finite number"),
        # An option that takes a word too names it.
        ('retries = "some"', "proxy.a.retries",
         "expected a whole number or 'all', got the string \"some\""),
    ],
)
def test_wrong_type(tmp_path: Path, line: str, path: str, words: str) -> None:
    err = load_error(tmp_path, _ONE_PROXY + line + "\n")
    assert err.path == path
    assert words in str(err)


def test_an_address_of_the_wrong_type_is_named_in_words(tmp_path: Path) -> None:
    err = load_error(tmp_path, '[proxy.a]\nlisten = ":1"\nupstreams = ["h:1", 1979-05-27]\n')
    assert str(err) == ("proxy.a.upstreams[1]: expected an address string or a table, "
                        "got a date (1979-05-27)")
    err = load_error(tmp_path, '[proxy.a]\nlisten = {}\nupstreams = "h:1"\n')
    assert str(err) == ("proxy.a.listen: expected an address or a non-empty list of "
                        "addresses, got a table")
    err = load_error(tmp_path, '[proxy.a]\nlisten = ":1"\nupstreams = []\n')
    assert str(err) == ("proxy.a.upstreams: expected an address or a non-empty list of "
                        "addresses, got an empty array")
    err = load_error(tmp_path, 'server = 1979-05-27T07:32:00Z\n')
    assert str(err) == "server: expected a table, got a date-time (1979-05-27T07:32:00+00:00)"


@pytest.mark.parametrize(
    "key", ["connect_timeout_s", "idle_timeout_s", "half_close_timeout_s"]
)
def test_negative_timeout(tmp_path: Path, key: str) -> None:
    err = load_error(tmp_path, _ONE_PROXY + f"{key} = -1\n")
    assert str(err) == f"proxy.a.{key}: must be at least 0, got -1"  # as written


def test_negative_timeout_in_defaults_names_defaults(tmp_path: Path) -> None:
    err = load_error(tmp_path, "[defaults]\nidle_timeout_s = -0.5\n" + _ONE_PROXY)
    assert err.path == "defaults.idle_timeout_s"
    assert "must be at least 0" in str(err)


def test_negative_server_timeout(tmp_path: Path) -> None:
    err = load_error(tmp_path, "[server]\ndrain_timeout_s = -3\n")
    assert str(err) == "server.drain_timeout_s: must be at least 0, got -3"  # as written


@pytest.mark.parametrize(
    ("line", "path", "words"),
    [("backlog = 0", "proxy.a.backlog", "must be at least 1"),
     ("backlog = 65536", "proxy.a.backlog", "must be at most 65535"),
     ("max_connections = -1", "proxy.a.max_connections", "must be at least 0"),
     # retries' all is -1 inside: the user is told of 0 and the word, not of -1.
     ("retries = -3", "proxy.a.retries", "must be at least 0 or 'all', got -3")],
)
def test_out_of_range(tmp_path: Path, line: str, path: str, words: str) -> None:
    err = load_error(tmp_path, _ONE_PROXY + line + "\n")
    assert err.path == path and words in str(err)


def test_bad_choice_lists_the_valid_ones(tmp_path: Path) -> None:
    err = load_error(tmp_path, _ONE_PROXY + 'balance = "random"\n')
    assert str(err) == ("proxy.a.balance: 'random' is not one of: hash_source, "
                        "least_connections, random_two, round_robin")
    err = load_error(tmp_path, '[server]\nlog_level = "verbose"\n')
    assert str(err) == "server.log_level: 'verbose' is not one of: debug, info, warning, error"


@pytest.mark.parametrize("missing", ["listen", "upstreams"])
def test_missing_required_key(tmp_path: Path, missing: str) -> None:
    lines = {"listen": 'listen = "127.0.0.1:7001"', "upstreams": 'upstreams = "127.0.0.1:1"'}
    del lines[missing]
    err = load_error(tmp_path, "[proxy.a]\n" + "\n".join(lines.values()) + "\n")
    assert str(err) == f"proxy.a.{missing}: missing (required)"


@pytest.mark.parametrize("value", ["[]", "5"])
def test_upstreams_must_be_an_address_or_a_non_empty_list(tmp_path: Path, value: str) -> None:
    err = load_error(tmp_path, f'[proxy.a]\nlisten = ":1"\nupstreams = {value}\n')
    assert err.path == "proxy.a.upstreams"
    assert "non-empty list of addresses" in str(err)


def test_bad_address_is_named_by_its_index(tmp_path: Path) -> None:
    err = load_error(tmp_path, """
[proxy.redis]
listen = "127.0.0.1:6380"
upstreams = ["10.0.0.5:6379", "10.0.0.6"]
""")
    assert err.path == "proxy.redis.upstreams[1]"
    assert str(err).startswith("proxy.redis.upstreams[1]: '10.0.0.6': expected host:port")


def test_bad_address_given_as_a_string_is_named_without_index(tmp_path: Path) -> None:
    err = load_error(tmp_path, '[proxy.a]\nlisten = "127.0.0.1:70000"\nupstreams = "h:1"\n')
    assert err.path == "proxy.a.listen"
    assert "port must be between 0 and 65535" in str(err)


def test_upstream_port_zero_and_listen_only_forms(tmp_path: Path) -> None:
    err = load_error(tmp_path, '[proxy.a]\nlisten = ":1"\nupstreams = ["h:1", ":6379"]\n')
    assert err.path == "proxy.a.upstreams[1]" and "an upstream needs a host" in str(err)
    err = load_error(tmp_path, '[proxy.a]\nlisten = ":1"\nupstreams = ["h:0"]\n')
    assert err.path == "proxy.a.upstreams[0]" and "between 1 and 65535" in str(err)


def test_non_string_address_in_list(tmp_path: Path) -> None:
    err = load_error(tmp_path, '[proxy.a]\nlisten = [":1", 6380]\nupstreams = "h:1"\n')
    assert err.path == "proxy.a.listen[1]"
    assert "expected an address string" in str(err)


@pytest.mark.parametrize(
    ("first", "second", "conflict"),
    [
        ("127.0.0.1:6380", "127.0.0.1:6380", "127.0.0.1:6380 conflicts with 127.0.0.1:6380"),
        (":6380", "127.0.0.1:6380", "127.0.0.1:6380 conflicts with :6380"),
        ("127.0.0.1:6380", ":6380", ":6380 conflicts with 127.0.0.1:6380"),
        ("0.0.0.0:6380", "127.0.0.1:6380", "conflicts with 0.0.0.0:6380"),
        ("[::]:6380", "[::1]:6380", "conflicts with [::]:6380"),
        ("unix:/tmp/x.sock", "unix:/tmp/x.sock", "conflicts with unix:/tmp/x.sock"),
    ],
)
def test_conflicting_listeners_across_proxies(
    tmp_path: Path, first: str, second: str, conflict: str
) -> None:
    err = load_error(tmp_path, f"""
[proxy.a]
listen = "{first}"
upstreams = "127.0.0.1:1"

[proxy.b]
listen = ["127.0.0.1:7777", "{second}"]
upstreams = "127.0.0.1:1"
""")
    assert err.path == "proxy.b.listen[1]"
    assert conflict in str(err)
    assert "already used by proxy.a" in str(err)


def test_same_listener_twice_in_one_proxy(tmp_path: Path) -> None:
    err = load_error(tmp_path, '[proxy.a]\nlisten = [":7001", ":7001"]\nupstreams = "h:1"\n')
    assert err.path == "proxy.a.listen[1]"
    assert "already used by proxy.a" in str(err)


@pytest.mark.parametrize("name", ["bad name", "-leading", "x" * 65, "", "ünïcode"])
def test_invalid_proxy_name(tmp_path: Path, name: str) -> None:
    err = load_error(tmp_path, f'[proxy."{name}"]\nlisten = ":1"\nupstreams = "h:1"\n')
    assert err.path == f"proxy.{name}"
    assert "a proxy name is 1-64 letters, digits" in str(err)


@pytest.mark.parametrize("name", ["a", "redis-main", "api.v2", "A_1", "x" * 64])
def test_valid_proxy_names(tmp_path: Path, name: str) -> None:
    config = load(tmp_path, f'[proxy."{name}"]\nlisten = ":0"\nupstreams = "h:1"\n')
    assert config.proxies[0].name == name


@pytest.mark.parametrize("key", ["listen", "upstreams"])
def test_listen_and_upstreams_do_not_belong_in_defaults(tmp_path: Path, key: str) -> None:
    err = load_error(tmp_path, f'[defaults]\n{key} = "127.0.0.1:1"\n' + _ONE_PROXY)
    assert str(err) == f"defaults.{key}: belongs in each [proxy.NAME] table"


@pytest.mark.parametrize(
    ("text", "path"),
    [("server = 5\n", "server"), ("defaults = 'x'\n", "defaults"), ("proxy = []\n", "proxy"),
     ("[proxy]\na = 1\n", "proxy.a")],
)
def test_a_table_key_given_a_value(tmp_path: Path, text: str, path: str) -> None:
    err = load_error(tmp_path, text)
    assert err.path == path
    assert "expected a table" in str(err)


# --- errors about the file itself ----------------------------------------------


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[proxy.a]\nlisten = \n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "is not valid TOML" in str(info.value)
    assert "line 2" in str(info.value)


def test_duplicate_proxy_table_is_invalid_toml(tmp_path: Path) -> None:
    path = write(tmp_path, _ONE_PROXY + _ONE_PROXY)
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(path)


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


@pytest.mark.timeout(20)
def test_an_endless_file_is_refused_not_read_forever() -> None:
    """``--config /dev/zero`` (or a FIFO that never ends): refused once past
    the size no configuration reaches, naming the path."""
    with pytest.raises(ConfigError) as info:
        load_config("/dev/zero")
    assert str(info.value) == "/dev/zero is larger than 16 MiB: not a configuration file"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"cannot read {path}: No such file or directory"
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"cannot read {re.escape(str(tmp_path))}: "):
        load_config(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="needs a user other than root (root reads files whatever their mode)")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, _ONE_PROXY)
    path.chmod(0)
    try:
        with pytest.raises(ConfigError, match="Permission denied"):
            load_config(path)
    finally:
        path.chmod(0o600)


def test_a_program_importing_the_loader_alone_can_load_toxics(tmp_path: Path) -> None:
    """``midway.config.load`` imported on its own (no ``midway.NAME`` used, so
    nothing imported the chain) still checks a proxy's toxics: their parser's
    module is imported when first needed."""
    path = write(tmp_path, '[proxy.web]\nlisten = ["127.0.0.1:0"]\nupstreams = ["127.0.0.1:9"]\n'
                   '[[proxy.web.toxics]]\ntype = "latency"\nattributes = { latency = 5 }\n')
    program = ("import sys; from midway.config.load import load_config\n"
               "assert 'midway.chain.toxics.config' not in sys.modules\n"
               f"print(load_config({str(path)!r}).proxies[0].toxics[0])\n")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert "latency" in done.stdout

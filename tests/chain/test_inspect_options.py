"""The dump, pcap and hook options: one declaration each in the schema, read from
TOML and from the command line, checked before anything starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from midway.chain.registry import build_elements, check_elements
from midway.cli import build_parser, config_from_args
from midway.config.load import config_from_dict
from midway.config.schema import ProxyConfig
from midway.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def proxy(**options: object) -> ProxyConfig:
    table = {"listen": "127.0.0.1:0", "upstreams": "127.0.0.1:1", **options}
    return config_from_dict({"proxy": {"p": table}}).proxies[0]


def from_cli(*args: str) -> ProxyConfig:
    parsed = build_parser().parse_args(["127.0.0.1:0", "127.0.0.1:1", *args])
    return config_from_args(parsed).proxies[0]


def test_defaults_turn_everything_off_and_build_no_element() -> None:
    config = proxy()
    assert (config.dump, config.dump_file, config.pcap, config.hooks) == ("off", "", "", ())
    assert build_elements(config) == []


def test_hooks_in_toml_are_a_string_or_a_list() -> None:
    assert proxy(hooks="a:B").hooks == ("a:B",)
    assert proxy(hooks=["a:B", "c.d:E"]).hooks == ("a:B", "c.d:E")
    assert proxy(hooks=[]).hooks == ()


@pytest.mark.parametrize(("value", "path", "message"), [
    (3, "proxy.p.hooks", "expected a string or a list of strings"),
    (["a:B", 4], "proxy.p.hooks[1]", "expected a non-empty string, got 4"),
    (["a:B", ""], "proxy.p.hooks[1]", "expected a non-empty string"),
])
def test_bad_hooks_in_toml_name_the_item(value: object, path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        proxy(hooks=value)
    assert caught.value.path == path and message in caught.value.message


def test_hooks_in_defaults_are_inherited() -> None:
    config = config_from_dict({"defaults": {"hooks": ["x:Y"], "dump": "hex"},
                               "proxy": {"a": {"listen": ":0", "upstreams": "h:1"}}})
    assert config.proxies[0].hooks == ("x:Y",) and config.proxies[0].dump == "hex"


def test_hook_flag_repeats_and_keeps_order() -> None:
    assert from_cli("--hook", "a:B", "--hook", "c:D").hooks == ("a:B", "c:D")


@pytest.mark.parametrize(("args", "mode"), [
    ((), "off"), (("--dump",), "auto"), (("--dump", "hex"), "hex"),
    (("--dump", "text", "--dump-max-bytes", "0"), "text"),
])
def test_dump_flag_alone_means_auto(args: tuple[str, ...], mode: str) -> None:
    assert from_cli(*args).dump == mode


def test_a_bad_dump_mode_is_refused_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"--dump: 'loud' is not one of: off, text, hex, auto"):
        from_cli("--dump", "loud")


def test_dump_file_alone_turns_the_dump_on(tmp_path: Path) -> None:
    elements = build_elements(proxy(dump_file=str(tmp_path / "d.txt")))
    try:
        assert [e.name for e in elements] == ["dump"]
    finally:
        for element in elements:
            element.close()


def test_chain_order_is_capture_hooks_dump_capture(tmp_path: Path) -> None:
    elements = build_elements(proxy(pcap=str(tmp_path / "c.pcap"), dump="text",
                                    dump_file=str(tmp_path / "d"),
                                    hooks=["examples.rewrite:rewrite"] * 2))
    try:
        assert [e.name for e in elements] == [
            "pcap", "hook:examples.rewrite:rewrite", "hook:examples.rewrite:rewrite#2",
            "dump", "pcap (tail)"]
        assert elements[-1].keep_last
    finally:
        for element in elements:
            element.close()


@pytest.mark.parametrize(("options", "path", "message"), [
    ({"pcap": "/no/such/dir/x.pcap"}, "proxy.p.pcap", "no directory /no/such/dir"),
    ({"pcap": "x.pcap", "pcap_max_bytes": 39}, "proxy.p.pcap_max_bytes",
     "must be 0 (no rotation) or at least 40"),
    ({"dump_file": "/no/such/dir/d.txt"}, "proxy.p.dump_file", "no directory"),
    ({"hooks": ["examples.rewrite:nope"]}, "proxy.p.hooks[0]",
     "'examples.rewrite' has no attribute 'nope'"),
])
def test_checks_before_start(options: dict[str, object], path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_elements(proxy(**options))
    assert caught.value.path == path and message in caught.value.message


@pytest.mark.parametrize(("key", "value", "words"), [
    ("pcap_max_bytes", 1000, "needs pcap (a capture file)"),
    ("pcap_keep", 2, "needs pcap (a capture file)"),
    ("dump_max_bytes", 64, "needs dump (or dump_file)"),
])
def test_a_limit_of_an_output_the_proxy_does_not_write_is_refused(
        key: str, value: int, words: str) -> None:
    """It was accepted, and limited nothing: no capture or dump was written (as
    a phase's timeout without the phase, the key is refused in the proxy's
    table or as a flag, and in [defaults] only when no proxy writes the output)."""
    with pytest.raises(ConfigError) as caught:
        proxy(**{key: value})
    assert caught.value.path == f"proxy.p.{key}" and words in caught.value.message
    flag = "--" + key.replace("_", "-")
    with pytest.raises(ConfigError) as caught:
        from_cli(flag, str(value))
    assert str(caught.value).startswith(f"{flag}: {words}"), caught.value
    output = {"dump": "hex"} if key.startswith("dump") else {"pcap": "x.pcap"}
    assert getattr(proxy(**output, **{key: value}), key) == value

    def load(**first: object) -> object:
        return config_from_dict({
            "defaults": {key: value},
            "proxy": {"a": {"listen": "127.0.0.1:0", "upstreams": "127.0.0.1:1", **first},
                      "b": {"listen": "127.0.0.1:0", "upstreams": "127.0.0.1:1"}}})

    load(**output)  # b inherits a limit it does not use: that is fine
    with pytest.raises(ConfigError) as caught:
        load()
    assert caught.value.path == f"defaults.{key}" and "every proxy" in caught.value.message


def test_with_workers_each_writes_a_capture_of_its_own() -> None:
    from midway.config.schema import Config
    from midway.control.agent import localize

    config = Config(proxies=(proxy(pcap="/tmp/cap.pcap"), proxy(pcap="/tmp/raw")))
    assert localize(config, 1, 1) is config  # one process: the path as given
    second = localize(config, 2, 3)
    assert [p.pcap for p in second.proxies] == ["/tmp/cap.w2.pcap", "/tmp/raw.w2"]


def midway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "midway", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=20)


def test_check_imports_hooks_and_names_the_flag_or_key(tmp_path: Path) -> None:
    result = midway_cli("127.0.0.1:0", "127.0.0.1:1", "--hook", "examples.rewrite:nope", "--check")
    assert result.returncode == 2
    assert result.stderr == ("midway: --hook: hook 'examples.rewrite:nope': 'examples.rewrite' "
                             "has no attribute 'nope'\n")
    config = tmp_path / "m.toml"
    config.write_text('[proxy.r]\nlisten = ":0"\nupstreams = "h:1"\n'
                      'hooks = ["examples.rewrite:rewrite", "examples.nope:X"]\n')
    result = midway_cli("--config", str(config), "--check")
    assert result.returncode == 2
    assert result.stderr.startswith("midway: proxy.r.hooks[1]: hook 'examples.nope:X': "
                                    "no module named 'examples.nope'")
    config.write_text('[proxy.r]\nlisten = ":0"\nupstreams = "h:1"\n'
                      'hooks = ["examples.rewrite:rewrite"]\npcap = "x.pcap"\n')
    result = midway_cli("--config", str(config), "--check")
    assert (result.returncode, result.stderr) == (0, "")


def test_a_hook_file_that_exits_while_importing_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "quits.py").write_text("import sys\nsys.exit(3)\n")
    result = midway_cli("127.0.0.1:0", "127.0.0.1:1", "--hook", f"{tmp_path}/quits.py:H",
                        "--check")
    assert result.returncode == 2
    assert result.stderr == (f"midway: --hook: hook '{tmp_path}/quits.py:H': importing "
                             f"'{tmp_path}/quits.py' failed: SystemExit: 3 "
                             f"({tmp_path}/quits.py:2)\n")


@pytest.mark.parametrize("name", ["./examples", "examples/rewrite.txt"])
def test_a_hook_path_that_is_no_python_file_says_so(name: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_elements(proxy(hooks=[f"{name}:X"]))
    assert caught.value.message == (f"hook '{name}:X': {name!r} is neither a module name "
                                    "nor a file ending in .py")

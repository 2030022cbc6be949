"""``python -m midway`` as a user runs it: exit codes (0 clean, 1 could not start,
2 bad command line or configuration) and one-line messages without tracebacks."""

from __future__ import annotations

import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest

import midway

from .helpers import needs, wait_until

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 20
EXIT_OK, EXIT_START_FAILED, EXIT_USAGE = 0, 1, 2


def midway_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "midway", *args]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(midway_cmd(*args), cwd=REPO, capture_output=True, text=True,
                          timeout=TIMEOUT_S)


def assert_one_clean_line(stderr: str) -> str:
    """The user sees exactly one line, and no Python internals."""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


GOOD_TOML = """
[proxy.redis]
listen = "127.0.0.1:0"
upstreams = ["127.0.0.1:6379"]

[proxy.web]
listen = "127.0.0.1:0"
upstreams = "127.0.0.1:8000"
"""


@pytest.fixture
def good_config(tmp_path: Path) -> Path:
    path = tmp_path / "good.toml"
    path.write_text(GOOD_TOML)
    return path


def unused_port() -> int:
    """A loopback port nothing listens on (free when this returns)."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        return int(unused.getsockname()[1])


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port some other socket is already listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --- exit 2: bad command line or configuration --------------------------------


def test_no_arguments_says_what_is_needed() -> None:
    result = run()
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert "need a LISTEN address and at least one UPSTREAM" in line
    assert "--config FILE" in line


def test_listen_without_upstream() -> None:
    result = run("127.0.0.1:0")
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert "no UPSTREAM after LISTEN '127.0.0.1:0'" in line and "at least one UPSTREAM" in line


@pytest.mark.parametrize(
    ("upstreams", "bad", "words"),
    [
        (["127.0.0.1:80", "nohost"], "nohost", "expected host:port"),
        (["127.0.0.1:0"], "127.0.0.1:0", "port must be between 1 and 65535"),
        (["10.0.0.1:80", "10.0.0.2:80", ":80"], ":80", "an upstream needs a host"),
    ],
)
def test_bad_upstream_is_named(upstreams: list[str], bad: str, words: str) -> None:
    result = run("127.0.0.1:0", *upstreams)
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert f"UPSTREAM {bad!r}" in line
    assert words in line


def test_bad_listen_is_named() -> None:
    result = run("127.0.0.1:http", "127.0.0.1:80")
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert "LISTEN '127.0.0.1:http'" in line and "is not a number" in line


@pytest.mark.parametrize("listen", ["a..b:0", "x" * 64 + ".example:0"])
def test_a_listen_host_no_lookup_can_take_is_a_usage_error(listen: str) -> None:
    # It was a traceback (UnicodeError from the IDNA codec inside getaddrinfo), exit 1.
    result = run(listen, "127.0.0.1:80")
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert f"LISTEN {listen!r}" in line and "is not a host name" in line


def test_a_unix_path_with_a_nul_is_a_usage_error(tmp_path: Path) -> None:
    # TOML's \\u0000 escape: it was a ValueError traceback at start (--check passed).
    config = tmp_path / "nul.toml"
    config.write_text('[proxy.a]\nlisten = "unix:/tmp/a\\u0000b"\nupstreams = "127.0.0.1:1"\n')
    for check in ((), ("--check",)):
        result = run("--config", str(config), *check)
        assert result.returncode == EXIT_USAGE
        line = assert_one_clean_line(result.stderr)
        assert "proxy.a.listen" in line and "cannot hold a NUL character" in line


def test_an_upstream_host_no_lookup_can_take_is_refused_by_check() -> None:
    # --check passed it; every connection then waited out connect_timeout_s.
    result = run("127.0.0.1:0", "a..b:6379", "--check")
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert "UPSTREAM 'a..b:6379'" in line and "label empty or too long" in line


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--idle-timeout-s", "-1", "must be at least 0"),
        ("--connect-timeout-s", "nan", "expected a finite number"),
        ("--backlog", "0", "must be at least 1"),
        ("--balance", "random",
             "'random' is not one of: hash_source, least_connections, random_two, round_robin"),
        ("--drain-timeout-s", "-5", "must be at least 0"),
        ("--log-level", "loud", "is not one of: debug, info, warning, error"),
    ],
)
def test_bad_flag_value_names_the_flag(flag: str, value: str, words: str) -> None:
    result = run(flag, value, "127.0.0.1:0", "127.0.0.1:80")
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert line.startswith(f"midway: {flag}: ")
    assert words in line


def test_flag_value_of_the_wrong_type_is_a_usage_error() -> None:
    result = run("--idle-timeout-s", "soon", "127.0.0.1:0", "127.0.0.1:80")
    assert result.returncode == EXIT_USAGE
    assert "Traceback" not in result.stderr
    assert "--idle-timeout-s" in result.stderr and "'soon'" in result.stderr


def test_config_typo_names_key_path_and_suggestion(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text('[proxy.redis]\nlisten = ":0"\nupstreams = "h:1"\nidel_timeout_s = 5\n')
    result = run("--config", str(path))
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert "proxy.redis.idel_timeout_s" in line
    assert "did you mean 'idle_timeout_s'?" in line


def test_config_with_a_proxy_flag_is_refused(good_config: Path) -> None:
    result = run("--config", str(good_config), "--idle-timeout-s", "5")
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert "--idle-timeout-s" in line and "[defaults]" in line


def test_config_with_addresses_is_refused(good_config: Path) -> None:
    result = run("--config", str(good_config), "127.0.0.1:0", "127.0.0.1:80")
    assert result.returncode == EXIT_USAGE
    assert "not both" in assert_one_clean_line(result.stderr)


def test_config_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    result = run("--config", str(path))
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert str(path) in line and "No such file or directory" in line


@pytest.mark.parametrize(
    ("flag", "value"), [("--drain-timeout-s", "-1"), ("--log-level", "loud")]
)
def test_config_with_a_bad_server_flag_is_refused(
    good_config: Path, flag: str, value: str
) -> None:
    result = run("--config", str(good_config), flag, value, "--check")
    assert result.returncode == EXIT_USAGE
    assert flag in assert_one_clean_line(result.stderr)


# --- --check ------------------------------------------------------------------------


def test_check_good_config(good_config: Path) -> None:
    result = run("--check", "--config", str(good_config))
    assert result.returncode == EXIT_OK
    assert "configuration OK" in result.stdout
    assert "redis" in result.stdout and "web" in result.stdout
    assert result.stderr == ""


def test_check_quick_form() -> None:
    result = run("--check", "127.0.0.1:0", "127.0.0.1:80", "--idle-timeout-s", "0")
    assert result.returncode == EXIT_OK
    assert "configuration OK" in result.stdout


def test_check_does_not_bind(busy_port: int) -> None:
    # The port is taken, but --check only validates: it must still say OK.
    result = run("--check", f"127.0.0.1:{busy_port}", "127.0.0.1:80")
    assert result.returncode == EXIT_OK


def readme_example_toml() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Configuration file")
    return text[text.index("```toml\n", start) + 8:text.index("```\n", text.index("```toml\n", start) + 8)]


def test_check_fails_on_the_readme_example_whose_log_directory_is_missing(tmp_path: Path) -> None:
    """The README's own example logs to /var/log/midway/access.log: where that
    directory does not exist, a start would fail, so --check must too."""
    example = readme_example_toml()
    assert 'access_log = "/var/log/midway/access.log"' in example
    assert not Path("/var/log/midway").exists()  # what this test is about
    path = tmp_path / "midway.toml"
    path.write_text(example)
    result = run("--check", "--config", str(path))
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert line == ("midway: server.access_log: cannot write /var/log/midway/access.log: "
                    "no directory /var/log/midway")
    assert "configuration OK" not in result.stdout
    # With the log somewhere that exists, the same example passes.
    path.write_text(example.replace("/var/log/midway/access.log", str(tmp_path / "a.log")))
    result = run("--check", "--config", str(path))
    assert result.returncode == EXIT_OK, result.stderr
    assert not (tmp_path / "a.log").exists()  # --check creates nothing


@pytest.mark.parametrize("form", ["quick", "config"])
def test_check_names_the_access_log_flag_the_user_typed(form: str, good_config: Path,
                                                        tmp_path: Path) -> None:
    where = ["--config", str(good_config)] if form == "config" else ["127.0.0.1:0", "h:1"]
    result = run("--check", *where, "--access-log", str(tmp_path / "no" / "a.log"))
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert line.startswith("midway: --access-log: cannot write "), line
    assert "server.access_log" not in line


def test_check_refuses_an_access_log_that_is_a_directory(tmp_path: Path) -> None:
    result = run("--check", "127.0.0.1:0", "h:1", "--access-log", str(tmp_path))
    assert result.returncode == EXIT_USAGE
    assert "it is a directory" in assert_one_clean_line(result.stderr)


def test_check_refuses_a_unix_listener_it_could_not_create(tmp_path: Path) -> None:
    """What would stop the start is said by --check: a socket file in a directory that
    does not exist, or where a file that is not a socket is."""
    missing = tmp_path / "no" / "such" / "m.sock"
    result = run("--check", f"unix:{missing}", "127.0.0.1:80")
    assert result.returncode == EXIT_USAGE
    assert f"no directory {missing.parent}" in assert_one_clean_line(result.stderr)
    (tmp_path / "notes.txt").write_text("keep me\n")
    config = tmp_path / "m.toml"
    config.write_text(f'[proxy.p]\nlisten = ["unix:{tmp_path / "notes.txt"}"]\n'
                      'upstreams = ["127.0.0.1:80"]\n')
    result = run("--check", "--config", str(config))
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert "proxy.p.listen" in line and "exists and is not a socket" in line
    assert (tmp_path / "notes.txt").read_text() == "keep me\n"


@pytest.mark.parametrize(("flag", "key"), [("--pcap", "pcap"), ("--dump-file", "dump_file")])
def test_check_names_output_flags_on_the_command_line_and_keys_in_a_file(
        flag: str, key: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "no" / "out")
    result = run("--check", "127.0.0.1:0", "h:1", flag, missing)
    assert result.returncode == EXIT_USAGE
    assert assert_one_clean_line(result.stderr).startswith(f"midway: {flag}: cannot write ")
    path = tmp_path / "m.toml"
    path.write_text(f'[proxy.p]\nlisten = ":0"\nupstreams = "h:1"\n{key} = "{missing}"\n')
    result = run("--check", "--config", str(path))
    assert result.returncode == EXIT_USAGE
    assert assert_one_clean_line(result.stderr).startswith(f"midway: proxy.p.{key}: cannot write ")


def test_check_fails_on_a_hook_that_cannot_be_imported(tmp_path: Path) -> None:
    result = run("--check", "127.0.0.1:0", "h:1", "--hook", "no_such_module_here:Hook")
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert line.startswith("midway: --hook: ") and "no_such_module_here" in line
    path = tmp_path / "m.toml"
    path.write_text('[proxy.p]\nlisten = ":0"\nupstreams = "h:1"\n'
                    'hooks = ["examples.rewrite:rewrite", "no_such_module_here:Hook"]\n')
    result = run("--check", "--config", str(path))
    assert result.returncode == EXIT_USAGE
    assert assert_one_clean_line(result.stderr).startswith("midway: proxy.p.hooks[1]: ")


@pytest.mark.parametrize("check", [("--check",), ()], ids=["check", "start"])
def test_bad_health_hex_is_refused_naming_the_key_and_the_text(check: tuple[str, ...],
                                                                tmp_path: Path) -> None:
    """At --check as at a start, on the command line as in a file."""
    result = run(*check, "127.0.0.1:0", "h:1", "--health-send-hex", "00 00 00 8")
    assert result.returncode == EXIT_USAGE
    assert assert_one_clean_line(result.stderr) == (
        "midway: --health-send-hex: '00 00 00 8': the last byte has one digit, '8' (two "
        "digits a byte, e.g. '00 00 00 08 04 d2 16 2f')")
    path = tmp_path / "m.toml"
    path.write_text('[proxy.pg]\nlisten = ":0"\nupstreams = "h:1"\n[proxy.pg.health]\n'
                    'expect = "N"\nexpect_hex = "4e"\n')
    result = run(*check, "--config", str(path))
    assert result.returncode == EXIT_USAGE
    assert assert_one_clean_line(result.stderr).startswith(
        "midway: proxy.pg.health.expect_hex: give expect (text) or expect_hex (bytes in hex), "
        "not both")


def test_check_says_proxy_or_proxies() -> None:
    result = run("--check", "127.0.0.1:0", "h:1")
    assert result.stdout.strip() == "midway: configuration OK (1 proxy: default)"


def test_check_conflicting_config(tmp_path: Path) -> None:
    path = tmp_path / "conflict.toml"
    path.write_text('[proxy.a]\nlisten = ":6380"\nupstreams = "h:1"\n'
                    '[proxy.b]\nlisten = "127.0.0.1:6380"\nupstreams = "h:1"\n')
    result = run("--check", "--config", str(path))
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert "proxy.b.listen[0]" in line and "conflicts with :6380" in line
    assert "configuration OK" not in result.stdout


@pytest.mark.parametrize("form", ["quick", "config"])
def test_check_refuses_trusted_networks_without_proxy_protocol_in(form: str,
                                                                  tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[proxy.web]\nlisten = ":0"\nupstreams = "h:1"\n'
                    'proxy_protocol_trusted = ["10.0.0.0/8"]\n')
    where = ["--config", str(path)] if form == "config" else [
        "127.0.0.1:0", "h:1", "--proxy-protocol-trusted", "10.0.0.0/8"]
    result = run("--check", *where)
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    start = "proxy.web.proxy_protocol_trusted" if form == "config" else "--proxy-protocol-trusted"
    assert line.startswith(f"midway: {start}: set, but proxy_protocol_in is off"), line
    assert "configuration OK" not in result.stdout


@pytest.mark.parametrize(("flag", "words"), [
    ("--proxy-protocol-timeout-s", "needs proxy_protocol_in (v1, v2 or any)"),
    ("--tls-handshake-timeout-s", "needs tls_cert (termination) or upstream_tls = true"),
])
def test_check_refuses_a_timeout_of_a_phase_the_proxy_does_not_have(flag: str,
                                                                      words: str) -> None:
    result = run("--check", "127.0.0.1:0", "h:1", flag, "2")
    assert result.returncode == EXIT_USAGE
    assert assert_one_clean_line(result.stderr).startswith(f"midway: {flag}: {words}")
    assert "configuration OK" not in result.stdout


@pytest.mark.parametrize("value", ["2", "abc"])
def test_a_file_only_option_typed_as_a_flag_says_where_it_goes(value: str) -> None:
    """sni_peek_timeout_s bounds the peek of SNI routes, which only a file
    declares: the quick form offers no flag (it could only ever be refused),
    and one typed anyway, whatever its value, says where the option goes."""
    assert "--sni-peek-timeout-s" not in run("--help").stdout
    result = run("--check", "127.0.0.1:0", "h:1", "--sni-peek-timeout-s", value)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.splitlines()[-1] == (
        "midway: error: --sni-peek-timeout-s: not a flag of the quick form; set "
        "sni_peek_timeout_s in a configuration file (--config FILE, docs/configuration.md)")
    assert "Traceback" not in result.stderr


def test_the_sni_peek_timeout_of_a_file_with_routes_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text('[proxy.tls]\nlisten = "127.0.0.1:0"\nsni_peek_timeout_s = 2\n'
                    '[[proxy.tls.routes]]\nsni = "a.example.com"\nupstreams = "127.0.0.1:2"\n')
    result = run("--check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


# --- exit 1: serving could not start ----------------------------------------------


@pytest.mark.parametrize("form", ["quick", "config"])
def test_a_capture_that_cannot_be_written_at_start_names_what_was_typed(
        form: str, tmp_path: Path) -> None:
    """--check passes (the directory may be written), the start fails writing the
    capture's header: the one line names --pcap when the flag gave it, the key
    when the file did, as --check's errors do."""
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    path = tmp_path / "m.toml"
    path.write_text('[proxy.web]\nlisten = "127.0.0.1:0"\nupstreams = "127.0.0.1:1"\n'
                    'pcap = "/dev/full"\n')
    where = ["--config", str(path)] if form == "config" else [
        "127.0.0.1:0", "127.0.0.1:1", "--pcap", "/dev/full"]
    result = run(*where)
    assert result.returncode == EXIT_START_FAILED
    line = assert_one_clean_line(result.stderr)
    start = "proxy.web.pcap" if form == "config" else "--pcap"
    assert line.endswith(f"{start}: cannot open /dev/full: No space left on device"), line


def test_listen_address_in_use(busy_port: int) -> None:
    result = run(f"127.0.0.1:{busy_port}", "127.0.0.1:80")
    assert result.returncode == EXIT_START_FAILED
    line = assert_one_clean_line(result.stderr)
    assert f"127.0.0.1:{busy_port}" in line
    assert "address already in use" in line


def test_listen_address_in_use_from_config_file(tmp_path: Path, busy_port: int) -> None:
    path = tmp_path / "busy.toml"
    path.write_text(f'[proxy.a]\nlisten = ["127.0.0.1:0", "127.0.0.1:{busy_port}"]\n'
                    'upstreams = "127.0.0.1:80"\n')
    result = run("--config", str(path))
    assert result.returncode == EXIT_START_FAILED
    line = assert_one_clean_line(result.stderr)
    assert f"127.0.0.1:{busy_port}" in line and "address already in use" in line
    assert "proxy a" in line  # which of the file's proxies could not start


def test_a_unix_listener_on_a_file_that_is_not_a_socket_says_so(tmp_path: Path) -> None:
    """A stale socket is replaced, a live one is "in use"; a regular file is left
    alone, and the message says what it is rather than "address already in use".
    It is known before binding, so it is refused as a configuration mistake."""
    path = tmp_path / "notes.txt"
    path.write_text("keep me\n")
    result = run(f"unix:{path}", "127.0.0.1:80")
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert line.endswith(f"cannot listen on unix:{path}: {path} exists and is not a "
                         "socket (midway replaces only a stale socket)"), line
    assert path.read_text() == "keep me\n"


def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
    """midway run as user nobody, who may not bind a privileged port."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip(needs("root and setpriv, to run midway as nobody", apt="util-linux"))
    return subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                           "--inh-caps=-all", *midway_cmd(*args)], cwd=REPO,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize("check", [["--check"], []])
@pytest.mark.parametrize("where", ["LISTEN", "--admin"])
def test_a_privileged_port_as_an_unprivileged_user_says_so_at_check_and_start(
        where: str, check: list[str]) -> None:
    start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if start < 2:
        pytest.skip(needs("privileged ports (sysctl net.ipv4.ip_unprivileged_port_start > 1)"))
    low = f"127.0.0.1:{start - 1}"
    args = [low, "127.0.0.1:80"] if where == "LISTEN" else ["127.0.0.1:0", "127.0.0.1:80",
                                                            "--admin", low]
    result = _as_nobody(*check, *args)
    assert result.returncode == EXIT_USAGE, result
    line = assert_one_clean_line(result.stderr)
    flag = "--admin: " if where == "--admin" else ""
    assert line == (f"midway: {flag}cannot listen on {low}: a port below {start} needs root "
                    "or CAP_NET_BIND_SERVICE"), line


@pytest.mark.parametrize("check", [["--check"], []])
@pytest.mark.parametrize("mode", [0o755, 0o700])
def test_a_file_in_a_directory_the_user_may_not_write_is_refused_at_check_and_start(
        mode: int, check: list[str]) -> None:
    """As nobody: a unix listener (and an access log) in a directory of root's it
    may read only (0o755), or not even look into (0o700, the directory under it)."""
    with tempfile.TemporaryDirectory(dir="/tmp") as top:
        os.chmod(top, 0o755)
        locked = Path(top, "locked")
        locked.mkdir(mode=mode)
        folder = locked if mode == 0o755 else locked / "sub"
        if mode == 0o700:
            folder.mkdir()
        sock = f"unix:{folder}/m.sock"
        result = _as_nobody(*check, sock, "127.0.0.1:80")
        log = _as_nobody("--check", "127.0.0.1:0", "127.0.0.1:80", "--access-log",
                         f"{folder}/access.log")
    assert result.returncode == EXIT_USAGE, result
    assert assert_one_clean_line(result.stderr) == f"midway: cannot listen on {sock}: permission denied"
    assert log.returncode == EXIT_USAGE, log
    assert assert_one_clean_line(log.stderr) == (f"midway: --access-log: cannot write "
                                                 f"{folder}/access.log: permission denied")


@pytest.mark.parametrize("check", [["--check"], []])
@pytest.mark.parametrize(("where", "args", "flag"), [
    ("LISTEN", ["no-such-host.invalid:0", "127.0.0.1:80"], ""),
    ("--admin", ["127.0.0.1:0", "127.0.0.1:80", "--admin-allow-remote",
                 "--admin", "no-such-host.invalid:0"], "--admin: "),
])
def test_an_unresolvable_listen_host_is_refused_alike_at_check_and_start(
        where: str, args: list[str], flag: str, check: list[str]) -> None:
    result = run(*check, *args)
    assert result.returncode == EXIT_USAGE, result
    line = assert_one_clean_line(result.stderr)
    assert line.startswith(f"midway: {flag}cannot listen on no-such-host.invalid:0: cannot "
                           "resolve 'no-such-host.invalid' ("), line


def localhost_bound(port: int) -> tuple[str, str]:
    """What localhost binds here (127.0.0.1, or ::1 first on some systems):
    the host and the address as written."""
    host = socket.getaddrinfo("localhost", port, type=socket.SOCK_STREAM,
                              flags=socket.AI_PASSIVE)[0][4][0]
    return host, f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def refused_config(check: list[str], path: Path, text: str) -> str:
    """The one line midway refuses the configuration ``text`` with (exit 2)."""
    path.write_text(text)
    result = run(*check, "--config", str(path))
    assert result.returncode == EXIT_USAGE, result
    return assert_one_clean_line(result.stderr)


@pytest.mark.parametrize("check", [["--check"], []])
def test_listeners_whose_names_resolve_to_one_address_conflict_at_check_and_start(
        check: list[str], tmp_path: Path) -> None:
    port = unused_port()
    host, same = localhost_bound(port)
    line = refused_config(check, tmp_path / "midway.toml",
                          f'[proxy.a]\nlisten = "localhost:{port}"\nupstreams = ["127.0.0.1:80"]\n'
                          f'[proxy.b]\nlisten = "{same}"\nupstreams = ["127.0.0.1:80"]\n')
    assert line == (f"midway: proxy.b.listen[0]: {same} conflicts with localhost:{port} already "
                    f"used by proxy.a (both are {host})")


@pytest.mark.parametrize("check", [["--check"], []])
@pytest.mark.parametrize("listen", ["{same}", ":{port}", "localhost:{port}"])
def test_an_admin_address_a_proxy_listens_on_is_refused_at_check_and_start(
        check: list[str], listen: str, tmp_path: Path) -> None:
    port = unused_port()
    _, same = localhost_bound(port)
    listen = listen.format(port=port, same=same)
    line = refused_config(check, tmp_path / "midway.toml",
                          f'[server]\nadmin = "{same}"\n[proxy.web]\n'
                          f'listen = ["127.0.0.1:0", "{listen}"]\nupstreams = ["127.0.0.1:80"]\n')
    assert line == (f"midway: server.admin: {same} conflicts with {listen}, the listen address "
                    "of proxy web (proxy.web.listen[1]): give the admin API a port of its own")


def test_an_admin_flag_on_the_listen_address_names_the_flag() -> None:
    port = unused_port()
    result = run("--check", f"127.0.0.1:{port}", "127.0.0.1:80", "--admin", f"127.0.0.1:{port}")
    assert result.returncode == EXIT_USAGE, result
    assert assert_one_clean_line(result.stderr).startswith(
        f"midway: --admin: 127.0.0.1:{port} conflicts with 127.0.0.1:{port}, the listen address "
        "of proxy default")


def test_an_unresolvable_listen_host_in_a_file_is_named_by_its_key(tmp_path: Path) -> None:
    path = tmp_path / "midway.toml"
    path.write_text('[proxy.web]\nlisten = ["127.0.0.1:0", "no-such-host.invalid:0"]\n'
                    'upstreams = ["127.0.0.1:80"]\n')
    result = run("--check", "--config", str(path))
    assert result.returncode == EXIT_USAGE, result
    assert assert_one_clean_line(result.stderr).startswith(
        "midway: proxy.web.listen: cannot listen on no-such-host.invalid:0: cannot resolve ")


# --- exit 0 ------------------------------------------------------------------------


def test_version_says_how_plain_connections_are_relayed() -> None:
    result = run("--version")
    assert result.returncode == EXIT_OK
    from midway.core import accel
    kind = "compiled relay" if accel.AVAILABLE else "pure Python"
    assert result.stdout.startswith(f"midway {midway.__version__} ({kind}")


def test_help_lists_usage_and_exits_0() -> None:
    result = run("--help")
    assert result.returncode == EXIT_OK
    assert "midway LISTEN UPSTREAM" in result.stdout
    assert "--config FILE" in result.stdout


def _string_options() -> list[tuple[str, str, str]]:
    """(flag, key, what empty means) of every free-text string option."""
    import typing

    from midway.cli import _flag
    from midway.config.schema import ProxyConfig, ServerConfig, options_of

    out = []
    for cls in (ProxyConfig, ServerConfig):
        hints = typing.get_type_hints(cls)
        for field, info in options_of(cls):
            if hints[field.name] is str and info.cli and not info.choices:
                out.append((_flag(field.name), field.name, info.zero))
    return out


def _help_of(flag: str) -> str:
    """The help text of ``flag`` in ``midway --help``, on one line."""
    text = run("--help").stdout
    start = text.index(f"\n  {flag} ") + 1
    # Up to the next option, or to the blank line before the epilog (the last one).
    end = min(i for i in (text.find("\n  -", start + 1), text.find("\n\n", start)) if i > 0)
    return " ".join(text[start:end].split())


def test_the_admin_token_help_says_what_a_flag_user_can_set() -> None:
    # "Empty: the token is admin_token", "set admin_token too": a key with no flag,
    # named as if --help's reader could set it.
    assert _help_of("--admin-token-file").endswith(
        "Empty ('', the default): the token is admin_token of the configuration file's "
        "[server] table; without one, no token is needed.")
    assert "set a token too (admin_token_file, --admin-token-file; or admin_token in " \
        "the file)" in _help_of("--admin-allow-remote,")


@pytest.mark.parametrize("columns", ["60", "80", "120"])
def test_help_breaks_lines_at_spaces_only(monkeypatch: pytest.MonkeyPatch, columns: str) -> None:
    """A line of --help broke inside a word at its hyphen ("srwxr-" / "xr-x",
    "send-" / "proxy"): a flag or a mode cut in two is misread and cannot be copied."""
    from midway.cli import build_parser
    monkeypatch.setenv("COLUMNS", columns)
    lines = build_parser().format_help().splitlines()
    assert [line for line in lines if line[-2:-1].isalnum() and line.endswith("-")] == []


@pytest.mark.parametrize(("flag", "key", "zero"), _string_options())
def test_help_of_a_string_option_says_what_empty_means(flag: str, key: str, zero: str) -> None:
    """'0:' means nothing for a path (--pcap 0 writes a file named 0): the help
    says what the empty string means, as docs/configuration.md does."""
    assert zero.startswith("(empty) "), f"{key}: the schema must say what empty means"
    text = _help_of(flag)
    assert " 0:" not in text
    assert f"Empty ('', the default): {zero.removeprefix('(empty) ')}." in text


def test_every_string_option_is_checked_for_its_help() -> None:
    flags = {flag for flag, _, _ in _string_options()}
    assert {"--pcap", "--dump-file", "--access-log", "--admin"} <= flags


def test_help_of_a_number_option_still_says_what_0_means() -> None:
    assert "0: never close an idle connection." in _help_of("--idle-timeout-s")


def test_help_names_a_default_that_is_a_word_by_its_word() -> None:
    """--retries' default is 'all' (stored as -1): the help says all, as
    docs/configuration.md does, not a -1 that --retries would refuse."""
    text = _help_of("--retries")
    assert "Default: all." in text
    assert "-1" not in text


@pytest.mark.parametrize(("typo", "meant"), [("--idel-timeout-s", "--idle-timeout-s"),
                                              ("--acess-log", "--access-log"),
                                              ("--no-splcie", "--no-splice")])
def test_a_mistyped_flag_is_named_with_the_closest_one(typo: str, meant: str) -> None:
    """As a mistyped key of the file is (README, "Configuration file")."""
    result = run(typo, "5", "127.0.0.1:0", "127.0.0.1:1")
    assert result.returncode == EXIT_USAGE
    assert f"midway: error: unrecognized arguments: {typo}" in result.stderr
    assert f"did you mean '{meant}'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_word_option_given_neither_a_number_nor_its_word_says_both() -> None:
    result = run("--workers", "two", "127.0.0.1:0", "h:1")
    assert result.returncode == EXIT_USAGE
    assert "argument --workers: expected a whole number or 'auto', got 'two'" in result.stderr
    assert "invalid int value" not in result.stderr


# --- the subcommands: listed in --help, each with its own, and their mistakes -----


def test_help_lists_each_subcommand_with_where_to_read_more() -> None:
    text = run("--help").stdout
    assert "midway SUBCOMMAND --help" in text
    for name, what in (("replay", "serve a --pcap capture as a fake upstream"),
                       ("connections", "list a running midway's open connections"),
                       ("top", "watch a running midway in the terminal")):
        assert any(line.lstrip().startswith(f"midway {name} ") and line.endswith(what)
                   for line in text.splitlines()), (name, text)


def test_help_prints_the_shell_example_as_typed() -> None:
    """The multi-line example keeps its backslashes and its literal PING\\r\\n."""
    text = run("--help").stdout
    assert "\r" not in text
    assert "10.0.0.7:6379,backup \\\n" in text
    assert "--health-send 'PING\\r\\n' --health-expect +PONG" in text


@pytest.mark.parametrize("name", ["replay", "connections", "top"])
def test_each_subcommand_has_its_own_help(name: str) -> None:
    result = run(name, "--help")
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.startswith(f"usage: midway {name} ")


@pytest.mark.parametrize("name", ["", "replay", "connections", "top"])
def test_every_flag_of_every_parser_has_a_help_text(name: str) -> None:
    import importlib
    parser = importlib.import_module(f"midway.{name or 'cli'}").build_parser()
    undocumented = [action.option_strings[0] for action in parser._actions
                    if action.option_strings and not action.help]
    assert undocumented == []


def test_replay_log_level_help_says_its_default() -> None:
    from midway.replay import build_parser
    (action,) = [a for a in build_parser()._actions if "--log-level" in a.option_strings]
    assert action.help is not None and "Default: info" in action.help


@pytest.mark.parametrize(("args", "words"), [
    (["tpo"], "unknown subcommand 'tpo'; did you mean 'midway top'?"),
    (["conections", "--admin", "127.0.0.1:1"],
     "unknown subcommand 'conections'; did you mean 'midway connections'?"),
    (["notanaddress", "x"], "'notanaddress' is neither a subcommand (replay, connections, top) "
                            "nor a LISTEN address"),
    (["help"], "midway --help shows the usage"),
])
def test_a_word_that_is_no_subcommand_nor_address_says_so(args: list[str], words: str) -> None:
    result = run(*args)
    assert result.returncode == EXIT_USAGE
    assert words in assert_one_clean_line(result.stderr)


def _pcap(path: Path) -> Path:
    """A capture of one PING/PONG connection, as midway replay reads it."""
    import random

    from midway.chain.pcapfile import PcapWriter, TcpConversation

    with path.open("wb") as file:
        conv = TcpConversation(PcapWriter(file), ("127.0.0.1", 40000), ("127.0.0.1", 6379),
                               rng=random.Random(0))
        conv.open(1.0)
        conv.data(True, b"PING\r\n", 1.1)
        conv.data(False, b"+PONG\r\n", 1.2)
        conv.fin(True, 1.3)
        conv.fin(False, 1.3)
    return path


def test_replay_of_a_missing_capture_says_so_without_python_internals(tmp_path: Path) -> None:
    result = run("replay", str(tmp_path / "none.pcap"))
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    assert line == f"midway replay: cannot read {tmp_path / 'none.pcap'}: no such file or directory"


def test_replay_names_a_bad_listen_as_the_flag(tmp_path: Path) -> None:
    for capture in (_pcap(tmp_path / "one.pcap"), tmp_path / "none.pcap"):  # whatever the file
        result = run("replay", str(capture), "--listen", "nonsense")
        assert result.returncode == EXIT_USAGE
        assert assert_one_clean_line(result.stderr).startswith(
            "midway replay: --listen: 'nonsense': expected host:port")


@pytest.mark.parametrize("value", ["-1", "0", "nan", "soon"])
def test_replay_refuses_a_wait_that_is_not_a_positive_number(tmp_path: Path, value: str) -> None:
    result = run("replay", str(_pcap(tmp_path / "one.pcap")), "--wait-s", value)
    assert result.returncode == EXIT_USAGE
    assert "Traceback" not in result.stderr
    assert (f"argument --wait-s: expected a number of seconds above 0, got {value!r}"
            in result.stderr)


def test_replay_on_a_busy_port_says_address_in_use(tmp_path: Path, busy_port: int) -> None:
    result = run("replay", str(_pcap(tmp_path / "one.pcap")), "--listen", f"127.0.0.1:{busy_port}")
    assert result.returncode == EXIT_START_FAILED
    line = assert_one_clean_line(result.stderr)
    assert line.endswith(f"replay: cannot listen on 127.0.0.1:{busy_port}: address already in use")


def test_replay_listens_on_an_ipv4_mapped_ipv6_address(tmp_path: Path) -> None:
    proc = subprocess.Popen(midway_cmd("replay", str(_pcap(tmp_path / "one.pcap")),
                                       "--listen", "[::ffff:127.0.0.1]:0"),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    stderr = _LineReader(proc.stderr)
    try:
        line = stderr.wait_for("listening on", time.monotonic() + TIMEOUT_S)
        port = int(line.rsplit("listening on 127.0.0.1:", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as client:
            client.sendall(b"PING\r\n")
            assert client.recv(16) == b"+PONG\r\n"
    finally:
        _stop(proc)


@pytest.mark.parametrize("name", ["top", "connections"])
@pytest.mark.parametrize(("admin", "words"), [
    ("nonsense", "expected HOST:PORT (e.g. 127.0.0.1:8474), got 'nonsense'"),
    ("127.0.0.1:99999", "'127.0.0.1:99999': port must be between 1 and 65535"),
    ("::1:8474", "'::1:8474': write IPv6 addresses in brackets, e.g. [::1]:8474"),
])
def test_a_bad_admin_address_is_a_usage_error(name: str, admin: str, words: str) -> None:
    result = run(name, "--admin", admin)
    assert result.returncode == EXIT_USAGE
    assert "Traceback" not in result.stderr
    assert f"midway {name}: error: --admin: {words}" in result.stderr


@pytest.mark.parametrize("name", ["top", "connections"])
@pytest.mark.parametrize(("kind", "words"), [
    ("missing", "cannot read {path}: No such file or directory"),
    ("directory", "cannot read {path}: Is a directory"),
    ("empty", "{path}: the first line is empty (expected the token)"),
])
def test_an_admin_token_file_it_cannot_use_is_a_usage_error(name: str, kind: str, words: str,
                                                            tmp_path: Path) -> None:
    """Checked before the admin API is asked: the address here answers nothing."""
    path = tmp_path / kind
    if kind == "directory":
        path.mkdir()
    elif kind == "empty":
        path.write_text("\n")
    result = run(name, "--admin", "127.0.0.1:9", "--admin-token-file", str(path))
    assert result.returncode == EXIT_USAGE, result
    assert "Traceback" not in result.stderr
    assert (f"midway {name}: error: --admin-token-file: {words.format(path=path)}"
            in result.stderr.splitlines())


@pytest.mark.parametrize("name", ["top", "connections"])
def test_an_admin_client_refuses_a_token_as_a_flag_without_echoing_it(name: str) -> None:
    # argparse took --admin-token for an abbreviation of --admin-token-file and
    # printed the secret as a path it could not read.
    result = run(name, "--admin", "127.0.0.1:9", "--admin-token", "s3cret")
    assert result.returncode == EXIT_USAGE
    assert "s3cret" not in result.stderr
    assert (f"midway {name}: error: --admin-token: not a flag (other users could read it in "
            "the process list); use --admin-token-file PATH or $MIDWAY_ADMIN_TOKEN"
            in result.stderr.splitlines())


@pytest.mark.parametrize(("name", "words"), [
    ("top", "midway top: midway at 127.0.0.1:{port} does not answer: connection refused"),
    ("connections", "midway connections: cannot reach the admin API at 127.0.0.1:{port}: "
                    "connection refused"),
])
def test_an_admin_api_that_does_not_answer_is_said_plainly(name: str, words: str) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        result = run(name, "--admin", f"127.0.0.1:{port}")
    assert result.returncode == EXIT_START_FAILED
    assert assert_one_clean_line(result.stderr) == words.format(port=port)


class _LineReader:
    """Collects a pipe's lines on a thread, so waiting for one can have a timeout."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        with stream:  # closed once the child has closed its end
            for line in stream:
                self.lines.put(line)

    def wait_for(self, text: str, deadline: float) -> str:
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} before the deadline; got {self.seen!r}")

    def rest(self, timeout: float) -> str:
        """Everything after the lines already seen, once the pipe has closed."""
        self._thread.join(timeout)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)


@pytest.fixture
def upstream() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.settimeout(TIMEOUT_S)
        yield sock


def _start(*args: str) -> tuple[subprocess.Popen[str], _LineReader, int]:
    """Start midway; return it, its stderr lines and the port it announced."""
    proc = subprocess.Popen(midway_cmd(*args), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    stderr = _LineReader(proc.stderr)
    try:
        listening = stderr.wait_for("listening on 127.0.0.1:", time.monotonic() + TIMEOUT_S)
    except BaseException:
        _stop(proc)
        raise
    return proc, stderr, int(listening.split("listening on 127.0.0.1:", 1)[1].split(",", 1)[0])


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=TIMEOUT_S)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_relays_then_stops_cleanly_on_signal(signame: str, upstream: socket.socket) -> None:
    up_port = upstream.getsockname()[1]
    proc, stderr, port = _start("127.0.0.1:0", f"127.0.0.1:{up_port}", "--drain-timeout-s", "1")
    try:
        assert port != 0  # the log shows the port the kernel picked
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as client:
            client.sendall(b"ping")
            conn, _ = upstream.accept()
            with conn:
                conn.settimeout(TIMEOUT_S)
                assert conn.recv(16) == b"ping"
                conn.sendall(b"pong")
                assert client.recv(16) == b"pong"
        # Bytes went through, so the event loop is serving (and its signal handlers
        # are installed): the signal must now lead to a clean stop.
        proc.send_signal(getattr(signal, signame))
        proc.wait(timeout=TIMEOUT_S)
    finally:
        _stop(proc)
    log = stderr.rest(timeout=TIMEOUT_S)
    assert proc.returncode == EXIT_OK
    assert "Traceback" not in log
    assert f"{signame}: stopping" in log
    assert log.rstrip().endswith("stopped")


def test_an_ipv4_mapped_ipv6_listen_address_serves_ipv4_clients(upstream: socket.socket) -> None:
    # [::ffff:127.0.0.1] is 127.0.0.1 written as IPv6: it used to fail with
    # "invalid argument" (Linux refuses it on an IPv6-only socket).
    up_port = upstream.getsockname()[1]
    proc, stderr, port = _start("[::ffff:127.0.0.1]:0", f"127.0.0.1:{up_port}")
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as client:
            client.sendall(b"ping")
            conn, _ = upstream.accept()
            with conn:
                conn.settimeout(TIMEOUT_S)
                assert conn.recv(16) == b"ping"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT_S)
    finally:
        _stop(proc)
    assert proc.returncode == EXIT_OK, stderr.rest(timeout=TIMEOUT_S)


def test_sigterm_right_after_listening_still_stops_cleanly() -> None:
    proc, stderr, _ = _start("127.0.0.1:0", "127.0.0.1:9")
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT_S)
    finally:
        _stop(proc)
    assert proc.returncode == EXIT_OK
    assert stderr.rest(timeout=TIMEOUT_S).rstrip().endswith("stopped")


SLOW_HOOK = """
import pathlib, sys, time

if sys.argv[0].endswith("worker.py"):  # a worker, not the supervisor's check of it
    pathlib.Path(__file__).with_suffix(".started").touch()
    time.sleep(3)


class Pass:
    def on_connect(self, ctx):
        pass
"""


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_the_workers_start_stops_them_without_a_traceback(
        signame: str, tmp_path: Path) -> None:
    (tmp_path / "slowhook.py").write_text(SLOW_HOOK)
    proc = subprocess.Popen(midway_cmd("127.0.0.1:0", "127.0.0.1:9", "--workers", "2",
                                       "--hook", "slowhook:Pass"),
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=f"{REPO}:{tmp_path}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # A worker is starting (importing the hook) when the supervisor is told to stop.
        assert wait_until((tmp_path / "slowhook.started").exists, timeout=TIMEOUT_S)
        proc.send_signal(getattr(signal, signame))
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        _stop(proc)
    assert "Traceback" not in stderr
    assert proc.returncode == EXIT_OK, stderr


EXIT_INTERRUPTED = 130
"""128 + SIGINT, as a shell reports a command Ctrl-C stopped."""

SLOW_IMPORT_HOOK = """
import pathlib, time

pathlib.Path(__file__).with_suffix(".started").touch()
time.sleep(10)


class Pass:
    def on_connect(self, ctx):
        pass
"""


def _interrupt(proc: subprocess.Popen[str], ready: Callable[[], object]) -> None:
    """Ctrl-C to ``proc`` once ``ready()`` has returned: it exits 130, no traceback."""
    try:
        ready()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=TIMEOUT_S)
    finally:
        _stop(proc)
    assert "Traceback" not in stderr
    assert proc.returncode == EXIT_INTERRUPTED, stderr


@pytest.mark.parametrize("check", [["--check"], []])
def test_ctrl_c_while_the_configuration_is_checked_exits_130_without_a_traceback(
        check: list[str], tmp_path: Path) -> None:
    """Before serving (here: while a hook imports) Ctrl-C stops midway at once."""
    (tmp_path / "slowimport.py").write_text(SLOW_IMPORT_HOOK)
    proc = subprocess.Popen(midway_cmd(*check, "127.0.0.1:0", "127.0.0.1:9", "--hook",
                                       "slowimport:Pass"),
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=f"{REPO}:{tmp_path}"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _interrupt(proc, lambda: wait_until((tmp_path / "slowimport.started").exists,
                                        timeout=TIMEOUT_S))


SLOW_LIBRARY = """
import importlib.abc, pathlib, sys, time


class Slow(importlib.abc.MetaPathFinder):  # holds the import of midway.config.load
    def find_spec(self, name, path, target=None):
        if name == "midway.config.load":
            sys.meta_path.remove(self)
            pathlib.Path(__file__).with_suffix(".started").touch()
            time.sleep(10)
        return None


sys.meta_path.insert(0, Slow())
"""

CONSOLE_SCRIPT = """
import sys
from midway.__main__ import main
if __name__ == "__main__":
    sys.exit(main())
"""
"""What pip writes for ``[project.scripts] midway = "midway.__main__:main"``."""


@pytest.mark.parametrize("how", ["python -m midway", "console script"])
def test_ctrl_c_while_midway_itself_imports_exits_130_without_a_traceback(
        how: str, tmp_path: Path) -> None:
    """The first fraction of a second of ``midway ...`` is Python importing the
    library (here held there by a sitecustomize): Ctrl-C then exits 130 too."""
    (tmp_path / "sitecustomize.py").write_text(SLOW_LIBRARY)
    (tmp_path / "midway-script").write_text(CONSOLE_SCRIPT)
    command = midway_cmd("--version") if how == "python -m midway" else [
        sys.executable, str(tmp_path / "midway-script"), "--version"]
    proc = subprocess.Popen(command, cwd=REPO, env=dict(os.environ, PYTHONPATH=f"{tmp_path}:{REPO}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _interrupt(proc, lambda: wait_until((tmp_path / "sitecustomize.started").exists,
                                        timeout=TIMEOUT_S))


@pytest.mark.parametrize("name", ["connections", "top"])
def test_ctrl_c_while_an_admin_client_waits_for_the_api_exits_130_without_a_traceback(
        name: str, upstream: socket.socket) -> None:
    """``upstream`` here is an admin API that accepts and never answers."""
    proc = subprocess.Popen(midway_cmd(name, "--admin", f"127.0.0.1:{upstream.getsockname()[1]}"),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    accepted: list[socket.socket] = []

    def asked() -> None:  # once its request is read, the client waits for the answer
        accepted.append(upstream.accept()[0])
        accepted[0].settimeout(TIMEOUT_S)
        assert accepted[0].recv(4096).startswith(b"GET ")

    try:
        _interrupt(proc, asked)
    finally:
        for conn in accepted:
            conn.close()


def test_the_hook_example_of_the_error_message_exists_and_loads() -> None:
    result = run("--check", "127.0.0.1:0", "h:1", "--hook", "nocolon")
    assert result.returncode == EXIT_USAGE
    line = assert_one_clean_line(result.stderr)
    example = line.split("e.g. '", 1)[1].split("'", 1)[0]
    result = run("--check", "127.0.0.1:0", "h:1", "--hook", example)
    assert result.returncode == EXIT_OK, result.stderr
    hooks_doc = (REPO / "midway" / "chain" / "hooks.py").read_text().split('"""', 2)[1]
    assert f"--hook {example}" in hooks_doc


@pytest.mark.parametrize(("line", "key", "words"), [
    ("tcp_keepalive_interval_s = 5", "tcp_keepalive_interval_s", "needs tcp_keepalive_s"),
    ("tcp_keepalive_probes = 5", "tcp_keepalive_probes", "needs tcp_keepalive_s"),
    *[(f'unix_mode = "{bad}"', "unix_mode",
       f'expected an octal mode such as "660", got {bad!r}') for bad in ("999", "rw", "66",
                                                                      "07777777")],
])
def test_a_socket_option_check_refuses_names_the_key(tmp_path: Path, line: str, key: str,
                                                     words: str) -> None:
    """``tcp_keepalive_*`` without the idle time, a ``unix_mode`` that is not octal
    (tests/e2e/test_keepalive.py and test_unix_mode.py show what the good ones do)."""
    path = tmp_path / "midway.toml"
    path.write_text(f'[proxy.p]\nlisten = "unix:{tmp_path}/s"\nupstreams = ["127.0.0.1:1"]\n'
                    f"{line}\n")
    result = run("--check", "--config", str(path))
    assert result.returncode == EXIT_USAGE, result
    assert assert_one_clean_line(result.stderr).startswith(f"midway: proxy.p.{key}: {words}")

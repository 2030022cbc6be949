"""parse_address: every accepted form, the listen-only forms, and the messages a user
gets for a bad address."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from midway.config.addresses import Address, parse_address
from midway.errors import AddressError

# --- accepted forms -----------------------------------------------------------


@pytest.mark.parametrize("listen", [True, False])
@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("redis.internal:6379", "redis.internal", 6379),
        ("localhost:1", "localhost", 1),
        ("10.0.0.5:65535", "10.0.0.5", 65535),
        ("[::1]:6380", "::1", 6380),
        ("[::]:80", "::", 80),
        ("[2001:db8::5]:443", "2001:db8::5", 443),
        ("[fe80::1%eth0]:22", "fe80::1%eth0", 22),
        ("  127.0.0.1:8080\n", "127.0.0.1", 8080),
        ("bücher.example:80", "bücher.example", 80),
        ("example.com.:80", "example.com.", 80),
        ("redis_1:6379", "redis_1", 6379),
    ],
)
def test_host_and_port(text: str, host: str, port: int, listen: bool) -> None:
    addr = parse_address(text, listen=listen)
    assert addr == Address(host=host, port=port)
    assert not addr.is_unix


@pytest.mark.parametrize("listen", [True, False])
@pytest.mark.parametrize("text", ["unix:/run/midway.sock", "unix:relative.sock", "unix:@x y",
                                  "unix:/" + "s" * 106])
def test_unix_path(text: str, listen: bool) -> None:
    addr = parse_address(text, listen=listen)
    assert addr.is_unix
    assert addr.path == text[len("unix:"):]


def test_empty_host_means_every_interface_for_a_listener() -> None:
    assert parse_address(":6380", listen=True) == Address(host="", port=6380)


@pytest.mark.parametrize("text", ["127.0.0.1:0", ":0", "[::1]:0"])
def test_port_zero_picks_a_free_port_for_a_listener(text: str) -> None:
    assert parse_address(text, listen=True).port == 0


@pytest.mark.parametrize(
    ("text", "ip_literal"),
    [("127.0.0.1:1", True), ("[::1]:1", True), ("example.com:1", False), (":1", False)],
)
def test_is_ip_literal_tells_whether_a_lookup_is_needed(text: str, ip_literal: bool) -> None:
    assert parse_address(text, listen=True).is_ip_literal is ip_literal


# --- rejected forms, and what the user is told --------------------------------


@pytest.mark.parametrize(
    ("text", "listen", "words"),
    [
        # upstream-only rules
        (":6380", False, "an upstream needs a host"),
        ("127.0.0.1:0", False, "port must be between 1 and 65535"),
        ("[::1]:0", False, "port must be between 1 and 65535"),
        # port range and syntax
        ("127.0.0.1:65536", True, "port must be between 0 and 65535"),
        ("127.0.0.1:99999999999999999999", True, "port must be between 0 and 65535"),
        ("127.0.0.1:http", True, "port 'http' is not a number"),
        ("127.0.0.1:-1", True, "port '-1' is not a number"),
        ("127.0.0.1:+80", True, "port '+80' is not a number"),
        ("127.0.0.1:", True, "port '' is not a number"),
        ("127.0.0.1: 80", True, "is not a number"),
        # missing parts
        ("127.0.0.1", True, "expected host:port, [ipv6]:port, :port or unix:/path"),
        ("", True, "expected host:port"),
        ("unix:", True, "unix: address needs a path"),
        # IPv6 spelling
        ("::1:80", True, "write IPv6 addresses in brackets, e.g. [::1]:80"),
        ("[::1]", True, "expected [ipv6-address]:port"),
        ("[::1]80", True, "expected [ipv6-address]:port"),
        ("[::1:80", True, "expected [ipv6-address]:port"),
        ("[127.0.0.1]:80", True, "'127.0.0.1' is not an IPv6 address"),
        ("[nothost]:80", True, "'nothost' is not an IPv6 address"),
        # host names no lookup can take (getaddrinfo raised UnicodeError at bind or dial)
        ("a..b:80", False, "host 'a..b' is not a host name (label empty or too long)"),
        ("a..b:80", True, "host 'a..b' is not a host name (label empty or too long)"),
        ("x" * 64 + ".example:80", False, "is not a host name (label empty or too long)"),
        (".example:80", False, "is not a host name (label empty or too long)"),
        ("\udc80:80", True, "is not a host name (it holds whitespace or an unprintable"),
        ("redis internal:80", False, "host 'redis internal' is not a host name"),
        ("10.0.0.\x005:80", False, "is not a host name"),
        # unix paths no bind or connect can take (a NUL was a ValueError traceback at
        # start; a long path passed --check)
        ("unix:/run/a\x00b.sock", True, "a unix socket path cannot hold a NUL character"),
        ("unix:/" + "s" * 107, False, "a unix socket path is at most 107 bytes (sockaddr_un), "
                                      "this one has 108"),
        ("unix:/run/\ud800", True, "the path is not a file name this system can encode"),
    ],
)
def test_bad_address_says_what_is_wrong(text: str, listen: bool, words: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_address(text, listen=listen)
    assert words in str(info.value)


@pytest.mark.parametrize("text", ["nohost", "10.0.0.1:99999", "[::1]"])
def test_message_quotes_the_address(text: str) -> None:
    with pytest.raises(AddressError, match=re.escape(repr(text))):
        parse_address(text, listen=False)


@pytest.mark.parametrize("value", [6380, None, b"127.0.0.1:80", ["127.0.0.1:80"]])
def test_non_string_is_an_address_error_not_a_crash(value: object) -> None:
    with pytest.raises(AddressError, match="expected an address string"):
        parse_address(value, listen=True)  # type: ignore[arg-type]


def test_address_error_is_a_value_error() -> None:
    # Callers that only know the stdlib contract can still catch it.
    with pytest.raises(ValueError):
        parse_address("nonsense", listen=True)


@pytest.mark.parametrize("text", ["127.0.0.1:²", "127.0.0.1:١٢"])
def test_non_ascii_digits_are_not_a_port(text: str) -> None:
    with pytest.raises(AddressError, match="is not a number"):
        parse_address(text, listen=True)


# --- str() round trip -----------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:8080",
        "redis.internal:6379",
        ":6380",
        "127.0.0.1:0",
        "[::1]:6380",
        "[::]:0",
        "[2001:db8::5]:443",
        "[fe80::1%eth0]:22",
        "unix:/run/midway.sock",
    ],
)
def test_str_round_trips(text: str) -> None:
    addr = parse_address(text, listen=True)
    assert str(addr) == text
    assert parse_address(str(addr), listen=True) == addr


# --- any text -------------------------------------------------------------------


_hosts = st.text(st.sampled_from("ab.-_ü:[]% \x00\udc80") | st.characters(), max_size=70)
_texts = (st.text(max_size=80) | st.builds("{}:{}".format, _hosts, st.integers(0, 70000))
          | st.builds("unix:{}".format, st.text(st.sampled_from("/a\x00\udc80\ud800")
                                                | st.characters(), max_size=120)))


@given(_texts, st.booleans())
def test_any_text_is_an_address_or_an_address_error(text: str, listen: bool) -> None:
    """What is accepted can be handed to getaddrinfo, which encodes a name with IDNA
    (a host it could not encode raised UnicodeError at bind or dial time), or to a
    unix socket's bind or connect."""
    try:
        addr = parse_address(text, listen=listen)
    except AddressError as exc:
        assert str(exc)
        return
    if addr.path is not None:
        assert "\0" not in addr.path and len(os.fsencode(addr.path)) <= 107
    else:
        addr.host.split("%", 1)[0].encode("idna")

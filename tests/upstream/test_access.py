"""CIDR allow/deny for IPv4, IPv6 and IPv4-mapped clients, malformed rules, and the
per-source live-connection limit."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from midway.upstream.access import AccessList, SourceLimiter, client_ip, parse_network


def test_no_rules_allow_everyone() -> None:
    acl = AccessList.parse()
    assert acl.empty and acl.allows("203.0.113.7") and acl.allows("2001:db8::1")


def test_allow_list_admits_only_its_networks() -> None:
    acl = AccessList.parse(allow=["10.0.0.0/8", "192.168.1.7"])
    assert acl.allows("10.200.3.4") and acl.allows("192.168.1.7")
    assert not acl.allows("192.168.1.8") and not acl.allows("11.0.0.1")
    assert not acl.allows("2001:db8::1")  # an IPv4-only allow list shuts IPv6 out


def test_deny_wins_whatever_the_order() -> None:
    acl = AccessList.parse(allow=["10.0.0.0/8"], deny=["10.1.0.0/16"])
    assert acl.allows("10.2.0.1") and not acl.allows("10.1.2.3")
    acl = AccessList.parse(allow=["10.1.2.3"], deny=["0.0.0.0/0"])
    assert not acl.allows("10.1.2.3")


def test_deny_alone_admits_the_rest() -> None:
    acl = AccessList.parse(deny=["127.0.0.2", "fe80::/10"])
    assert acl.allows("127.0.0.1") and not acl.allows("127.0.0.2")
    assert not acl.allows("fe80::1%eth0") and acl.allows("::1")


def test_ipv6_rules() -> None:
    acl = AccessList.parse(allow=["2001:db8::/32", "::1"], deny=["2001:db8:dead::/48"])
    assert acl.allows("2001:db8:1::5") and acl.allows("::1")
    assert not acl.allows("2001:db8:dead::1") and not acl.allows("2001:db9::1")
    assert not acl.allows("10.0.0.1")


def test_mapped_clients_match_ipv4_rules() -> None:
    # What a dual-stack [::] listener reports for an IPv4 client.
    acl = AccessList.parse(allow=["127.0.0.0/8"], deny=["127.0.0.9"])
    assert acl.allows("::ffff:127.0.0.5")
    assert not acl.allows("::ffff:127.0.0.9")
    assert not acl.allows("::ffff:10.0.0.1")


def test_rules_written_in_mapped_form_mean_ipv4() -> None:
    assert parse_network("::ffff:10.0.0.0/104") == ipaddress.IPv4Network("10.0.0.0/8")
    acl = AccessList.parse(deny=["::ffff:10.0.0.1"])
    assert not acl.allows("10.0.0.1") and not acl.allows("::ffff:10.0.0.1")


def test_client_ip_normalises() -> None:
    assert client_ip("::ffff:1.2.3.4") == ipaddress.IPv4Address("1.2.3.4")
    assert client_ip("fe80::1%eth0") == ipaddress.IPv6Address("fe80::1")
    assert client_ip(ipaddress.IPv6Address("::ffff:1.2.3.4")) == ipaddress.IPv4Address("1.2.3.4")
    with pytest.raises(ValueError):
        client_ip("not-an-ip")


@pytest.mark.parametrize("rule, message", [
    ("10.0.0.300", r"'10.0.0.300' is not an IPv4 or IPv6 network"),
    ("10.0.0.0/33", r"'10.0.0.0/33' is not an IPv4 or IPv6 network"),
    ("2001:db8::/129", r"is not an IPv4 or IPv6 network"),
    ("example.com", r"is not an IPv4 or IPv6 network"),
    ("", r"is not an IPv4 or IPv6 network"),
    ("10.0.0.1/24", r"'10.0.0.1/24' has host bits set; did you mean '10.0.0.0/24'\?"),
    ("2001:db8::1/32", r"did you mean '2001:db8::/32'\?"),
])
def test_malformed_rules_are_refused_clearly(rule: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_network(rule)


def test_the_error_names_the_list_and_index() -> None:
    with pytest.raises(ValueError, match=r"^deny\[1\]: '10\.0\.0\.300' is not"):
        AccessList.parse(allow=["10.0.0.0/8"], deny=["10.0.0.1", "10.0.0.300"])
    with pytest.raises(ValueError, match=r"^allow\[0\]: expected a CIDR string"):
        AccessList.parse(allow=[8])  # type: ignore[list-item]


nets4 = st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)).map(
    lambda t: ipaddress.IPv4Network((t[0] >> (32 - t[1]) << (32 - t[1]) if t[1] else 0, t[1])))
nets6 = st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)).map(
    lambda t: ipaddress.IPv6Network((t[0] >> (128 - t[1]) << (128 - t[1]) if t[1] else 0, t[1])))
nets = st.lists(st.one_of(nets4, nets6), max_size=5)


@given(allow=nets, deny=nets, ip=st.ip_addresses())
def test_fuzz_agrees_with_a_rule_by_rule_check(allow: list, deny: list, ip: object) -> None:
    acl = AccessList(allow, deny)
    norm = client_ip(ip)  # type: ignore[arg-type]
    expected = not any(norm in n for n in deny if n.version == norm.version) and (
        not allow or any(norm in n for n in allow if n.version == norm.version))
    assert acl.allows(str(ip)) == expected


# -- per-source limit ----------------------------------------------------------


def test_the_limit_refuses_past_the_count_per_source() -> None:
    lim = SourceLimiter(2)
    a, b = lim.acquire("127.0.0.2"), lim.acquire("127.0.0.2")
    assert a and b
    assert lim.acquire("127.0.0.2") is None  # the third from that IP
    assert lim.acquire("127.0.0.3") is not None  # another source is not affected
    a.release()
    assert lim.acquire("127.0.0.2") is not None


def test_release_twice_is_harmless_and_memory_follows_live_connections() -> None:
    lim = SourceLimiter(1)
    lease = lim.acquire("10.0.0.1")
    assert lease is not None and len(lim) == 1
    lease.release()
    lease.release()
    assert len(lim) == 0 and lim.live("10.0.0.1") == 0


def test_mapped_and_plain_ipv4_are_one_source() -> None:
    lim = SourceLimiter(1)
    assert lim.acquire("::ffff:10.0.0.1") is not None
    assert lim.acquire("10.0.0.1") is None


def test_zero_is_off_but_still_counts() -> None:
    lim = SourceLimiter(0)
    leases = [lim.acquire("10.0.0.1") for _ in range(100)]
    assert all(leases) and lim.live("10.0.0.1") == 100
    lim.limit = 50  # a reconfigure turning it on sees what is open
    assert lim.acquire("10.0.0.1") is None


def test_negative_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="max_connections_per_source: must be 0"):
        SourceLimiter(-1)

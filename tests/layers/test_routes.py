"""SNI routes: exact and one-label wildcard patterns, case-insensitive, the most
specific wins whatever the order; bad patterns are refused with a reason."""

from __future__ import annotations

import pytest

from midway.layers.routes import RoutePatternError, SniRoutes, normalize_pattern


def routes(*patterns: str) -> SniRoutes[str]:
    return SniRoutes((p, p) for p in patterns)


def test_exact_and_wildcard_for_exactly_one_label() -> None:
    r = routes("api.example.com", "*.example.com")
    assert r.match("api.example.com") == "api.example.com"
    assert r.match("www.example.com") == "*.example.com"
    assert r.match("example.com") is None  # the wildcard needs a label
    assert r.match("a.b.example.com") is None  # ... and only one
    assert r.match("api.example.org") is None
    assert r.match(None) is None and r.match("") is None
    assert r.match(".example.com") is None
    assert len(r) == 2


def test_most_specific_wins_whatever_the_order() -> None:
    for order in (("*.example.com", "api.example.com"), ("api.example.com", "*.example.com")):
        r = routes(*order)
        assert r.match("api.example.com") == "api.example.com"
        assert r.match("other.example.com") == "*.example.com"
    nested = routes("*.example.com", "*.eu.example.com")
    assert nested.match("shop.eu.example.com") == "*.eu.example.com"
    assert nested.match("eu.example.com") == "*.example.com"


def test_case_insensitive_and_trailing_dot() -> None:
    r = routes("API.Example.COM.", "*.Shop.Example")
    assert r.match("api.example.com") == "API.Example.COM."
    assert r.match("Api.Example.Com.") == "API.Example.COM."
    assert r.match("CART.shop.example") == "*.Shop.Example"


def test_unicode_patterns_match_the_a_label_clients_send() -> None:
    assert normalize_pattern("*.Bücher.example") == "*.xn--bcher-kva.example"
    r = SniRoutes([("bücher.example", 1)])
    assert r.match("xn--bcher-kva.example") == 1


def test_falsy_targets_are_still_found() -> None:
    r = SniRoutes([("zero.example", 0), ("*.example", "")])
    assert r.match("zero.example") == 0
    assert r.match("x.example") == ""


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "1 to 253"),
        ("*", "'*' may only be the whole first label"),
        ("*.", "'*' may only be the whole first label"),
        ("a.*.example.com", "'*' may only be the whole first label"),
        ("*foo.example.com", "'*' may only be the whole first label"),
        ("**.example.com", "'*' may only be the whole first label"),
        ("a..example.com", "invalid label ''"),
        ("-a.example.com", "invalid label '-a'"),
        ("a b.example.com", "invalid label 'a b'"),
        ("a" * 64 + ".example", "invalid label"),
        ("a." * 127 + "ab", "1 to 253"),
        ("10.0.0.1:443", "invalid label"),
    ],
)
def test_bad_patterns_are_refused(pattern: str, message: str) -> None:
    with pytest.raises(RoutePatternError, match=message.replace("*", r"\*")):
        normalize_pattern(pattern)


def test_duplicate_patterns_are_refused() -> None:
    with pytest.raises(RoutePatternError, match="two SNI routes for 'a.example'"):
        routes("a.example", "A.Example.")
    with pytest.raises(RoutePatternError, match=r"two SNI routes for '\*.example'"):
        routes("*.example", "*.EXAMPLE")

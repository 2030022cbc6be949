"""The PROXY protocol and SNI route keys: what the loader accepts, the errors that
name the key, and the layers a configuration turns into (in order)."""

from __future__ import annotations

from typing import Any

import pytest

from midway.config.load import config_from_dict
from midway.config.schema import ProxyConfig
from midway.errors import ConfigError
from midway.layers.proxy_in import ProxyProtocolIn
from midway.layers.proxy_out import ProxyProtocolOut
from midway.layers.registry import build_layers
from midway.layers.sni import SniPeek


def proxy(**table: Any) -> ProxyConfig:
    table.setdefault("listen", "127.0.0.1:0")
    return config_from_dict({"proxy": {"p": table}}).proxies[0]


def error(**table: Any) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        proxy(**table)
    return caught.value


def test_routes_are_loaded_in_canonical_form_with_the_proxy_s_balance() -> None:
    config = proxy(upstreams="127.0.0.1:9", routes=[
        {"sni": ["API.Example.com.", "*.api.example.com"], "upstreams": ["127.0.0.1:1"]},
        {"name": "shop", "sni": "shop.example.com", "upstreams": "127.0.0.1:2"},
    ])
    first, second = config.routes
    assert (first.name, first.sni, first.balance) == (
        "api.example.com", ("api.example.com", "*.api.example.com"), "round_robin")
    assert (second.name, str(second.upstreams[0])) == ("shop", "127.0.0.1:2")


def test_with_routes_the_proxy_s_own_upstreams_are_optional() -> None:
    config = proxy(routes=[{"sni": "a.example.com", "upstreams": "127.0.0.1:1"}])
    assert config.upstreams == ()
    assert error().path == "proxy.p.upstreams"  # without routes still required


@pytest.mark.parametrize(("table", "path", "words"), [
    ({"routes": []}, "proxy.p.routes", "non-empty list"),
    ({"routes": [{"upstreams": "127.0.0.1:1"}]}, "proxy.p.routes[0].sni", "missing"),
    ({"routes": [{"sni": "a.com"}]}, "proxy.p.routes[0].upstreams", "missing"),
    ({"routes": [{"sni": "a.com", "upstreams": "127.0.0.1:1", "weight": 2}]},
     "proxy.p.routes[0].weight", "unknown key"),
    ({"routes": [{"sni": "a.*.com", "upstreams": "127.0.0.1:1"}]},
     "proxy.p.routes[0].sni", "first label"),
    ({"routes": [{"sni": ["a.com", 3], "upstreams": "127.0.0.1:1"}]},
     "proxy.p.routes[0].sni[1]", "host name pattern"),
    ({"routes": [{"sni": "a.com", "upstreams": "127.0.0.1:1"},
                 {"sni": "A.COM", "upstreams": "127.0.0.1:2"}]},
     "proxy.p.routes[1].sni", "already routed by proxy.p.routes[0]"),
    ({"routes": [{"sni": "a.com", "upstreams": "127.0.0.1:1", "balance": "fastest"}]},
     "proxy.p.routes[0].balance", "not one of"),
    ({"routes": [{"sni": "a.com", "upstreams": "nowhere"}]},
     "proxy.p.routes[0].upstreams", ""),
    ({"upstreams": "127.0.0.1:1", "proxy_protocol_in": "v2"},
     "proxy.p.proxy_protocol_trusted", "required when proxy_protocol_in is on"),
    ({"upstreams": "127.0.0.1:1", "proxy_protocol_in": "v3"},
     "proxy.p.proxy_protocol_in", "not one of"),
    ({"upstreams": "127.0.0.1:1", "proxy_protocol_trusted": ["10.0.0.1/8"]},
     "proxy.p.proxy_protocol_trusted[0]", "did you mean '10.0.0.0/8'"),
    ({"upstreams": "127.0.0.1:1", "proxy_protocol_out": "any"},
     "proxy.p.proxy_protocol_out", "not one of"),
    ({"upstreams": "127.0.0.1:1", "proxy_protocol_timeout_s": 0},
     "proxy.p.proxy_protocol_timeout_s", "at least"),
])
def test_mistakes_are_errors_naming_the_key(table: dict[str, Any], path: str, words: str) -> None:
    exc = error(**table)
    assert exc.path.startswith(path), exc
    assert words in exc.message


@pytest.mark.parametrize("proxy_protocol_in", [None, "off"])
def test_trusted_networks_without_proxy_protocol_in_are_an_error(
        proxy_protocol_in: str | None) -> None:
    """The list would do nothing: no header is read, any peer connects."""
    table: dict[str, Any] = {"upstreams": "127.0.0.1:1", "proxy_protocol_trusted": ["10.0.0.0/8"]}
    if proxy_protocol_in is not None:
        table["proxy_protocol_in"] = proxy_protocol_in
    exc = error(**table)
    assert str(exc).startswith("proxy.p.proxy_protocol_trusted: set, but proxy_protocol_in "
                               "is off"), exc


def test_trusted_networks_in_defaults_need_one_proxy_that_reads_a_header() -> None:
    def load(first_in: str) -> Any:
        return config_from_dict({
            "defaults": {"proxy_protocol_trusted": ["10.0.0.0/8"]},
            "proxy": {"a": {"listen": "127.0.0.1:0", "upstreams": "127.0.0.1:1",
                            "proxy_protocol_in": first_in},
                      "b": {"listen": "127.0.0.1:0", "upstreams": "127.0.0.1:1"}}})

    a, b = load("v2").proxies  # b inherits a list it does not use: that is fine
    assert (a.proxy_protocol_trusted, b.proxy_protocol_in) == (("10.0.0.0/8",), "off")
    with pytest.raises(ConfigError) as caught:
        load("off")
    assert caught.value.path == "defaults.proxy_protocol_trusted"
    assert "proxy_protocol_in is off in every proxy" in caught.value.message


ROUTE = [{"sni": "a.example.com", "upstreams": "127.0.0.1:2"}]


@pytest.mark.parametrize(("key", "table", "words"), [
    ("proxy_protocol_timeout_s", {}, "needs proxy_protocol_in (v1, v2 or any)"),
    ("proxy_protocol_timeout_s", {"proxy_protocol_in": "off"}, "needs proxy_protocol_in"),
    ("sni_peek_timeout_s", {}, "needs SNI routes ([[proxy.NAME.routes]]"),
    ("sni_peek_timeout_s", {"routes": ROUTE, "tls_cert": "cert.pem"},
     "this proxy peeks at none (with tls_cert, routes take the handshake's server name"),
    ("tls_handshake_timeout_s", {}, "needs tls_cert (termination) or upstream_tls = true"),
])
def test_a_timeout_of_a_phase_the_proxy_does_not_have_is_refused(
        key: str, table: dict[str, Any], words: str) -> None:
    """It was accepted, and bounded nothing: no header read, no ClientHello
    peeked, no handshake made (as unix_mode without a unix listener)."""
    exc = error(upstreams="127.0.0.1:1", **table, **{key: 2})
    assert exc.path == f"proxy.p.{key}" and words in exc.message, exc


def test_a_timeout_of_a_phase_the_proxy_has_is_taken() -> None:
    config = proxy(upstreams="127.0.0.1:1", proxy_protocol_in="v1",
                   proxy_protocol_trusted=["10.0.0.0/8"], proxy_protocol_timeout_s=2,
                   routes=ROUTE, sni_peek_timeout_s=3, upstream_tls=True,
                   tls_handshake_timeout_s=4)
    assert (config.proxy_protocol_timeout_s, config.sni_peek_timeout_s,
            config.tls_handshake_timeout_s) == (2, 3, 4)


@pytest.mark.parametrize(("key", "phase"), [
    ("proxy_protocol_timeout_s", {"proxy_protocol_in": "v2",
                                  "proxy_protocol_trusted": ["10.0.0.0/8"]}),
    ("sni_peek_timeout_s", {"routes": ROUTE}),
    ("tls_handshake_timeout_s", {"upstream_tls": True}),
])
def test_a_phase_timeout_in_defaults_needs_one_proxy_with_the_phase(
        key: str, phase: dict[str, Any]) -> None:
    def load(**first: Any) -> Any:
        return config_from_dict({
            "defaults": {key: 2},
            "proxy": {"a": {"listen": "127.0.0.1:0", "upstreams": "127.0.0.1:1", **first},
                      "b": {"listen": "127.0.0.1:0", "upstreams": "127.0.0.1:1"}}})

    a, b = load(**phase).proxies  # b inherits a timeout it does not use: that is fine
    assert getattr(a, key) == getattr(b, key) == 2
    with pytest.raises(ConfigError) as caught:
        load()
    assert caught.value.path == f"defaults.{key}"
    assert "every proxy" in caught.value.message, caught.value


def test_routes_do_not_belong_in_defaults() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_dict({"defaults": {"routes": []}})
    assert caught.value.path == "defaults.routes"


def test_a_unix_only_proxy_needs_no_trusted_networks() -> None:
    config = proxy(listen="unix:/tmp/midway-pp.sock", upstreams="127.0.0.1:1",
                   proxy_protocol_in="any")
    inbound, _ = build_layers(config)
    assert isinstance(inbound[0], ProxyProtocolIn) and inbound[0].trusted is None


def test_the_layers_come_from_the_configuration_in_order() -> None:
    assert build_layers(proxy(upstreams="127.0.0.1:1")) == ((), ())
    config = proxy(upstreams="127.0.0.1:1", proxy_protocol_in="v2",
                   proxy_protocol_trusted=["10.0.0.0/8"], proxy_protocol_timeout_s=2,
                   proxy_protocol_out="v1", sni_peek_timeout_s=3,
                   routes=[{"sni": "a.example.com", "upstreams": "127.0.0.1:2"}])
    inbound, outbound = build_layers(config)
    assert [type(layer) for layer in inbound] == [ProxyProtocolIn, SniPeek]
    proxy_in, sni = inbound
    assert isinstance(proxy_in, ProxyProtocolIn) and isinstance(sni, SniPeek)
    assert (proxy_in.mode, proxy_in.timeout_s, sni.timeout_s) == ("v2", 2, 3)
    assert proxy_in.trusts("10.1.2.3") and not proxy_in.trusts("192.0.2.1")
    assert [type(layer) for layer in outbound] == [ProxyProtocolOut]
    assert isinstance(outbound[0], ProxyProtocolOut) and outbound[0].version == 1


def test_the_command_line_takes_the_proxy_protocol_flags() -> None:
    from midway.cli import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["127.0.0.1:0", "127.0.0.1:1", "--proxy-protocol-in", "any",
                         "--proxy-protocol-trusted", "10.0.0.0/8",
                         "--proxy-protocol-trusted", "127.0.0.1",
                         "--proxy-protocol-out", "v2"]))
    p = config.proxies[0]
    assert (p.proxy_protocol_in, p.proxy_protocol_trusted, p.proxy_protocol_out) == (
        "any", ("10.0.0.0/8", "127.0.0.1"), "v2")

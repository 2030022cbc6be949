"""Fuzz the wire parsers: ``python -m midway.layers.fuzz [--count N] [--seed S]``.

Each input is either a real header or ClientHello mutated (bytes flipped,
inserted, deleted, duplicated, truncated, spliced, length-looking fields set
to extremes), a freshly built one with random addresses and TLVs, or pure
random bytes.  It is fed, split at random points, to the PROXY protocol parser
(in a random mode) and to the ClientHello parser, and the server name found (or
a random one) goes through the SNI routes.  The only exceptions allowed are each
parser's own error type; after every feed a parser must hold no more than its
cap, and a result must account for every byte (header length + rest = bytes fed;
a ClientHello no longer than the bytes fed or the cap).  The first violation is
printed with the input in hex and the command exits 1.

Seeds: the headers and ClientHellos captured from HAProxy, openssl and curl in
``tests/layers/data`` when run from a checkout (``--corpus DIR`` elsewhere),
plus ClientHellos made here by the ``ssl`` module through memory BIOs (no
socket) and headers made by this package's builders.
"""

from __future__ import annotations

import argparse
import ipaddress
import random
import ssl
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from midway.layers.clienthello import ClientHello, ClientHelloError, ClientHelloParser, NotTLS
from midway.layers.proxy_protocol import (
    Mode,
    ProxyProtocolError,
    ProxyProtocolParser,
    build_v1,
    build_v2,
    build_v2_local,
)
from midway.layers.routes import RoutePatternError, SniRoutes, normalize_pattern

__all__ = ["FuzzFailure", "load_corpus", "main", "run"]

DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "tests" / "layers" / "data"
_MODES: tuple[Mode, ...] = ("v1", "v2", "any")
_ROUTES: SniRoutes[str] = SniRoutes([
    ("www.example.com", "www"), ("*.example.com", "wild"), ("api.example.test", "api"),
    ("*.test", "test"), ("split.example.net", "split"),
])


class FuzzFailure(AssertionError):
    """A parser broke its contract on one input."""

    def __init__(self, what: str, data: bytes, splits: list[int]) -> None:
        super().__init__(f"{what}\n  input ({len(data)} bytes, split at {splits}): {data.hex()}")
        self.data = data


def read_hex(path: Path) -> bytes:
    """A fixture: hex lines, ``#`` comment lines ignored."""
    lines = path.read_text().splitlines()
    return bytes.fromhex("".join(line for line in lines if not line.startswith("#")))


def load_corpus(directory: Path | None = DEFAULT_CORPUS) -> list[bytes]:
    seeds = []
    if directory is not None and directory.is_dir():
        seeds = [read_hex(p) for p in sorted(directory.glob("*.hex"))]
    return seeds + _generated_hellos()


def _generated_hellos() -> list[bytes]:
    """ClientHellos from this Python's OpenSSL, written to a memory BIO."""
    out = []
    for name, alpn in (("gen.example.org", ["h2", "http/1.1"]), (None, []),
                       ("x." * 60 + "example", ["a" * 200, "b"])):
        ctx = ssl.create_default_context()
        if alpn:
            ctx.set_alpn_protocols(alpn)
        wire = ssl.MemoryBIO()
        obj = ctx.wrap_bio(ssl.MemoryBIO(), wire, server_hostname=name)
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        out.append(wire.read())
    return out


def _random_ip(rng: random.Random, v6: bool) -> str:
    if v6:
        return str(ipaddress.IPv6Address(rng.getrandbits(128)))
    return str(ipaddress.IPv4Address(rng.getrandbits(32)))


def _built_header(rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    v6 = rng.random() < 0.5
    src = (_random_ip(rng, v6), rng.randrange(65536))
    dst = (_random_ip(rng, v6 if rng.random() < 0.9 else not v6), rng.randrange(65536))
    if kind == 0:
        return build_v1(src, dst)
    if kind == 1:
        return build_v2_local(crc=rng.random() < 0.5)
    tlvs = [(rng.randrange(256), rng.randbytes(rng.randrange(40))) for _ in range(rng.randrange(4))]
    if kind == 2:
        return build_v2("/run/a.sock", "\0abstract", tlvs=tlvs, crc=rng.random() < 0.5)
    return build_v2(src, dst, alpn=rng.choice([None, b"h2", b"http/1.1"]),
                    authority=rng.choice([None, "a.example.com", "\u00e9.example"]),
                    unique_id=rng.choice([None, rng.randbytes(16)]), tlvs=tlvs,
                    crc=rng.random() < 0.5)


_EXTREMES = (b"\x00", b"\xff", b"\x00\x00", b"\xff\xff", b"\x40\x00", b"\x00\x01", b"\x7f\xff")


def _mutate(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(7)
        at = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(at, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[at:at] = rng.randbytes(rng.randrange(1, 8))
        elif op == 2:
            del buf[at : at + rng.randrange(1, 16)]
        elif op == 3:
            end = min(len(buf), at + rng.randrange(1, 64))
            buf[at:at] = buf[at:end]
        elif op == 4:
            del buf[at:]
        elif op == 5:
            ext = rng.choice(_EXTREMES)
            buf[at : at + len(ext)] = ext
        else:
            other = rng.choice(seeds)
            buf[at:] = other[rng.randrange(len(other) + 1) :]
    return bytes(buf)


def _input(rng: random.Random, seeds: list[bytes]) -> bytes:
    pick = rng.random()
    if pick < 0.45:
        return _mutate(rng, rng.choice(seeds), seeds)
    if pick < 0.6:
        return rng.choice(seeds) + rng.randbytes(rng.randrange(8))
    if pick < 0.8:
        built = _built_header(rng)
        return _mutate(rng, built, seeds) if rng.random() < 0.7 else built
    prefix = rng.choice([b"", b"\x16\x03\x01", b"PROXY ", b"\r\n\r\n\x00\r\nQUIT\n\x21"])
    return prefix + rng.randbytes(rng.randrange(64))


def _splits(rng: random.Random, size: int) -> list[int]:
    if size <= 1 or rng.random() < 0.4:
        return []
    if size < 80 and rng.random() < 0.1:
        return list(range(1, size))  # one byte at a time
    return sorted(rng.sample(range(1, size), min(size - 1, rng.randrange(1, 4))))


def _pieces(data: bytes, splits: list[int]) -> list[bytes]:
    edges = [0, *splits, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def check_proxy(data: bytes, splits: list[int], mode: Mode) -> str:
    parser = ProxyProtocolParser(mode)
    fed = 0
    try:
        for piece in _pieces(data, splits):
            fed += len(piece)
            header = parser.feed(piece)
            if parser.buffered > parser.cap:
                raise FuzzFailure(f"PROXY parser holds {parser.buffered} > cap", data, splits)
            if header is not None:
                if header.length > parser.cap or header.length + len(parser.rest) != fed:
                    raise FuzzFailure(f"PROXY header length {header.length}, rest "
                                      f"{len(parser.rest)}, fed {fed}", data, splits)
                if parser.rest != data[header.length : fed]:
                    raise FuzzFailure("PROXY parser changed the bytes after the header",
                                      data, splits)
                return f"header v{header.version}"
    except ProxyProtocolError:
        return "error"
    return "need more"


def check_clienthello(data: bytes, splits: list[int]) -> tuple[str, str | None]:
    parser = ClientHelloParser()
    fed = 0
    try:
        for piece in _pieces(data, splits):
            fed += len(piece)
            verdict = parser.feed(piece)
            if parser.buffered > parser.cap:
                raise FuzzFailure(f"ClientHello parser holds {parser.buffered} > cap",
                                  data, splits)
            if isinstance(verdict, ClientHello):
                if verdict.length > min(fed, parser.cap):
                    raise FuzzFailure(f"ClientHello length {verdict.length} > fed {fed}",
                                      data, splits)
                return "hello", verdict.server_name
            if isinstance(verdict, NotTLS):
                return "not TLS", None
    except ClientHelloError:
        return "error", None
    return "need more", None


def check_routes(rng: random.Random, name: str | None, data: bytes) -> None:
    _ROUTES.match(name)
    junk = data[: rng.randrange(64)].decode("latin-1")
    _ROUTES.match(junk)
    try:
        normalize_pattern(rng.choice(["*.", "", "x."]) + junk)
    except RoutePatternError:
        pass


def run(count: int, seed: int, corpus: Path | None = DEFAULT_CORPUS,
        progress: Callable[[int], None] | None = None) -> Counter[str]:
    """Fuzz ``count`` inputs; the tally of outcomes.  Raises FuzzFailure."""
    rng = random.Random(seed)
    seeds = load_corpus(corpus)
    tally: Counter[str] = Counter()
    for i in range(count):
        data = _input(rng, seeds)
        splits = _splits(rng, len(data))
        try:
            tally["proxy " + check_proxy(data, splits, rng.choice(_MODES))] += 1
            outcome, name = check_clienthello(data, splits)
            tally["tls " + outcome] += 1
            check_routes(rng, name, data)
        except FuzzFailure:
            raise
        except Exception as exc:  # the contract under test: nothing else may escape
            raise FuzzFailure(f"unexpected {type(exc).__name__}: {exc}", data, splits) from exc
        if progress is not None and i and i % 100_000 == 0:
            progress(i)
    return tally


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m midway.layers.fuzz", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=100_000, help="inputs to try (default 100000)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from time)")
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                    help="directory of .hex seeds (default: tests/layers/data of the checkout)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else time.time_ns() % 2**32
    started = time.perf_counter()
    try:
        tally = run(args.count, seed, args.corpus,
                    progress=lambda i: print(f"  {i} inputs, {time.perf_counter() - started:.1f} s",
                                             file=sys.stderr))
    except FuzzFailure as exc:
        print(f"FAIL (seed {seed}): {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    print(f"{args.count} inputs in {elapsed:.1f} s ({args.count / elapsed:,.0f}/s), seed {seed}, "
          f"no contract violated")
    for outcome, n in sorted(tally.items()):
        print(f"  {outcome:18} {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Layers a connection passes through before the relay, as sans-I/O state machines.

- :mod:`midway.layers.base`: the contracts of an inbound and an outbound layer (the
  phases that run them are :mod:`midway.service`'s)
- :mod:`midway.layers.proxy_protocol`: the PROXY protocol v1/v2 (parse, build)
- :mod:`midway.layers.clienthello`: the TLS ClientHello peek (SNI, ALPN)
- :mod:`midway.layers.routes`: SNI route matching
- :mod:`midway.layers.crc32c`: CRC-32C for the PROXY v2 checksum TLV
- :mod:`midway.layers.fuzz`: ``python -m midway.layers.fuzz`` fuzzes the parsers

None of them touches a socket; the connection phases feed them bytes.
"""

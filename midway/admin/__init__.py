"""The admin HTTP API: Toxiproxy 2.x's endpoints over a running midway.

Off by default; ``midway --admin 127.0.0.1:8474`` (or ``[server] admin``) turns it
on.  Only :mod:`midway.runtime` imports this package.  See docs/faults.md.
"""

"""The admin HTTP API: Toxiproxy 2.x's endpoints over a running midway.

Off by default; ``midway --admin 127.0.0.1:8474`` (or ``[server] admin``) turns it
on.  Only the control plane (:mod:`midway.control`) imports this package; the
routes reach the proxies through :mod:`midway.admin.host`.  See docs/faults.md.
"""

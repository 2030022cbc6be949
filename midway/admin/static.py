"""The dashboard's files (``midway/admin/ui/``), served by the admin server at
``/ui/``, and ``/`` sending a browser there.

The page is plain HTML, CSS and JavaScript shipped in the package: nothing is
built, nothing fetched from elsewhere (the Content-Security-Policy below forbids
it).  Its data comes from the documented admin routes, as a script's would; the
files themselves hold no data, so they are served without the admin token (the
page asks for it when the API answers 401) and to browsers (the API itself
answers a browser only when the request says it comes from this page: see
:data:`UI_HEADER`).
"""

from __future__ import annotations

from importlib import resources

from .routes import Response

__all__ = ["serve", "UI_PREFIX"]

UI_PREFIX = "/ui/"

CONTENT_TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "png": "image/png",
    "svg": "image/svg+xml",
}

HEADERS = (
    # Same origin only: the page fetches nothing from the internet, and no other
    # site may frame it (its buttons kill connections).
    ("Content-Security-Policy",
     "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Cache-Control", "no-cache"),
)

_ROOT_BODY = (b'<!doctype html><meta charset="utf-8"><title>midway</title>'
              b'<p>midway admin API: the dashboard is at <a href="/ui/">/ui/</a>.</p>\n')


def serve(method: str, path: str) -> Response | None:
    """The answer for a dashboard path (``/``, ``/ui``, ``/ui/FILE``), or None
    for any other path (the admin API's)."""
    if method not in ("GET", "HEAD"):
        return None
    path = path.split("?", 1)[0]
    if path == "/":
        return Response(302, _ROOT_BODY, CONTENT_TYPES["html"],
                        (("Location", UI_PREFIX), *HEADERS))
    if path == "/ui":
        return Response(301, b"", CONTENT_TYPES["html"], (("Location", UI_PREFIX),))
    if not path.startswith(UI_PREFIX):
        return None
    name = path[len(UI_PREFIX):] or "index.html"
    kind = name.rpartition(".")[2]
    # A flat directory: a name with a slash (or ..) is not one of its files.
    if "/" in name or name.startswith(".") or kind not in CONTENT_TYPES:
        return Response(404, b"404 page not found\n", "text/plain; charset=utf-8")
    file = resources.files(__package__).joinpath("ui", name)
    if not file.is_file():
        return Response(404, b"404 page not found\n", "text/plain; charset=utf-8")
    return Response(200, file.read_bytes(), CONTENT_TYPES[kind], HEADERS)

"""A bounded HTTP server on 127.0.0.1 that imitates the file hosts the zoo downloads from.

Each route serves bytes with a chosen behaviour: plain, ``Range`` support, a transfer cut
short after N bytes for the first K requests, a Google-Drive-like HTML interstitial, or an
HTML error page. Every request is logged (path, query, ``Range`` header) so tests can
assert on resumption.
"""

from __future__ import annotations

import hashlib
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["Route", "LoopbackServer", "DRIVE_INTERSTITIAL_TEMPLATE", "sha256_hex"]

# Shape of the page Google Drive serves for files it cannot virus-scan (2024 layout).
DRIVE_INTERSTITIAL_TEMPLATE = """<!DOCTYPE html><html><head><title>Google Drive - Virus scan warning</title></head>
<body><div class="uc-main"><p class="uc-warning-caption">Google Drive can't scan this file for viruses.</p>
<p class="uc-warning-subcaption">{name} is too large for Google to scan for viruses.
Would you still like to download this file?</p>
<form id="download-form" action="{action}" method="get">
<input type="submit" id="uc-download-link" class="goog-inline-block jfk-button" value="Download anyway"/>
<input type="hidden" name="id" value="{file_id}"><input type="hidden" name="export" value="download">
<input type="hidden" name="confirm" value="t"><input type="hidden" name="uuid" value="0d5c-11ef">
</form></div></body></html>"""


@dataclass
class Route:
    """What one path serves.

    Attributes:
        data: the file bytes.
        content_type: ``Content-Type`` of the file answer.
        support_range: honour ``Range: bytes=N-`` with a 206 answer.
        truncate_at: cut the body after this many bytes (of the full file) ...
        truncate_times: ... for this many requests, then serve normally.
        html: serve this HTML page instead (status 200), unless the query confirms.
        confirm_param: query parameter/value that makes a Drive-like route serve ``data``.
        etag: ``ETag`` header, when set.
        send_length: send ``Content-Length`` (False: the body ends when the connection closes).
        redirect_to: answer 302 with this ``Location`` instead of serving anything.
    """

    data: bytes = b""
    content_type: str = "application/octet-stream"
    support_range: bool = True
    truncate_at: int | None = None
    truncate_times: int = 0
    html: str | None = None
    confirm_param: tuple[str, str] | None = None
    etag: str | None = None
    send_length: bool = True
    redirect_to: str | None = None
    hits: int = field(default=0)


class LoopbackServer:
    """Threaded HTTP server on an ephemeral loopback port; use as a context manager."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[dict] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # bounded: a stuck client cannot hold a handler forever

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                parts = urllib.parse.urlparse(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                server.requests.append({"path": parts.path, "query": query, "range": self.headers.get("Range")})
                route = server.routes.get(parts.path)
                if route is None:
                    self.send_error(404)
                    return
                route.hits += 1
                if route.redirect_to is not None:
                    self.send_response(302)
                    self.send_header("Location", route.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                confirmed = route.confirm_param is not None and query.get(route.confirm_param[0]) == route.confirm_param[1]
                if route.html is not None and not confirmed:
                    body = route.html.encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self._send_file(route)

            def _send_file(self, route: Route) -> None:
                data, start = route.data, 0
                rng = self.headers.get("Range")
                if rng and route.support_range and rng.startswith("bytes=") and rng.endswith("-"):
                    start = int(rng[len("bytes="):-1])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", route.content_type)
                if route.send_length:
                    self.send_header("Content-Length", str(len(data) - start))
                else:
                    self.close_connection = True
                if route.etag:
                    self.send_header("ETag", route.etag)
                self.end_headers()
                end = len(data)
                if route.truncate_at is not None and route.truncate_times > 0:
                    route.truncate_times -= 1
                    end = max(start, min(end, route.truncate_at))
                self.wfile.write(data[start:end])
                if end < len(data):
                    self.wfile.flush()
                    self.close_connection = True

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def add(self, path: str, route: Route) -> str:
        """Serve ``route`` at ``path``; returns the full URL."""
        self.routes[path] = route
        return self.url(path)

    def requests_to(self, path: str) -> list[dict]:
        return [r for r in self.requests if r["path"] == path]

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

"""A tiny image host for the fetch tests: an HTTP(S) server on 127.0.0.1 in a thread.

Paths:
  /shot.png, /shot.jpg      the images given (image/png, image/jpeg)
  /text                     a text body (not an image)
  /missing                  404
  /slow-head?s=SECONDS      waits before answering
  /slow-body                a PNG's head at once, then its body a few bytes every 0.1 s
  /huge-declared            Content-Length of 1 GB, then nothing but a few bytes
  /huge-stream              no Content-Length, zeros until the client goes away
  /gzip                     a PNG sent with Content-Encoding: gzip
  /redirect?to=URL          302 to URL (relative or absolute)
  /chain/N                  N redirects (relative) ending at /shot.png
  /loop                     302 to itself
  /no-location              302 without a Location header
Every request's path and Host header are recorded in `requests`; for /huge-stream, the bytes
written before the client went away in `streamed`.
"""

from __future__ import annotations

import gzip
import http.server
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlparse

CHUNK = 64 * 1024


class ImageHost:
    """Start with `ImageHost(png, jpeg)`; `url(path)` names a path on it; `stop()` ends it.
    With `tls` (a certificate file and its key file) it speaks HTTPS."""

    def __init__(self, png: bytes, jpeg: bytes, tls: tuple[Path, Path] | None = None) -> None:
        self.png, self.jpeg = png, jpeg
        self.requests: list[tuple[str, str]] = []  # (path, Host header)
        self.streamed = 0
        self.stream_done = threading.Event()
        self._stopping = threading.Event()
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802
                host.requests.append((self.path, self.headers.get("Host", "")))
                try:
                    host._answer(self)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(tls[0]), str(tls[1]))
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def paths(self) -> list[str]:
        return [p for p, _ in self.requests]

    def stop(self) -> None:
        self._stopping.set()
        self.server.shutdown()
        self.server.server_close()

    def _answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        parsed = urlparse(h.path)
        path, query = parsed.path, parse_qs(parsed.query)
        if path == "/shot.png":
            self._send(h, 200, self.png, "image/png")
        elif path == "/shot.jpg":
            self._send(h, 200, self.jpeg, "image/jpeg")
        elif path == "/text":
            self._send(h, 200, b"hello, this is text", "text/plain")
        elif path == "/slow-head":
            self._stopping.wait(float(query.get("s", ["30"])[0]))
            self._send(h, 200, self.png, "image/png")
        elif path == "/slow-body":
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", str(len(self.png)))
            h.end_headers()
            for i in range(0, len(self.png), 16):
                if self._stopping.wait(0.1):
                    return
                h.wfile.write(self.png[i:i + 16])
                h.wfile.flush()
        elif path == "/huge-declared":
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Length", str(10**9))
            h.end_headers()
            h.wfile.write(self.png[:100])
            h.wfile.flush()
            self._stopping.wait(30)
        elif path == "/huge-stream":
            h.send_response(200)
            h.send_header("Content-Type", "image/png")
            h.end_headers()  # no length: the body ends when the connection does
            chunk = b"\0" * CHUNK
            try:
                while not self._stopping.is_set() and self.streamed < 2 * 10**9:
                    h.wfile.write(chunk)
                    h.wfile.flush()
                    self.streamed += CHUNK
            finally:
                self.stream_done.set()
        elif path == "/gzip":
            h.send_response(200)
            body = gzip.compress(self.png)
            h.send_header("Content-Type", "image/png")
            h.send_header("Content-Encoding", "gzip")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            h.wfile.write(body)
        elif path == "/redirect":
            self._redirect(h, query["to"][0])
        elif path.startswith("/chain/"):
            n = int(path.rsplit("/", 1)[1])
            self._redirect(h, f"/chain/{n - 1}" if n > 1 else "/shot.png")
        elif path == "/loop":
            self._redirect(h, "/loop")
        elif path == "/no-location":
            h.send_response(302)
            h.send_header("Content-Length", "0")
            h.end_headers()
        else:
            self._send(h, 404, b"not found", "text/plain")

    @staticmethod
    def _send(h: http.server.BaseHTTPRequestHandler, status: int, body: bytes,
              content_type: str) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    @staticmethod
    def _redirect(h: http.server.BaseHTTPRequestHandler, location: str) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Whether `predicate()` became true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False

"""A fault-injecting XYZ tile server for tests: ThreadingHTTPServer on 127.0.0.1, port 0, background thread.

Tiles ``/{z}/{x}/{y}.png`` are flat-coloured PNGs whose colour encodes (z, x, y) (:func:`tile_colour`), so a
test can check which tile a mosaic pixel came from. Faults are queued per tile and consumed one per
request, then the tile is served normally:

* ``"500"`` / ``"503"`` / ``"429"`` / ``"403"``: that HTTP status;
* ``"404"``: not found (``missing`` makes a tile 404 for ever);
* ``"slow"``: sleep ``slow_s`` before answering (beyond a client's timeout), then serve the tile;
* ``"truncate"``: announce the full Content-Length, send half the body, close (IncompleteRead);
* ``"corrupt"``: a consistent Content-Length but only the first half of the PNG (decode fails).

``fail_first`` applies a list of faults to *every* tile's first requests. Every request is counted.
"""

from __future__ import annotations

import io
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image


def tile_colour(z: int, x: int, y: int) -> tuple[int, int, int]:
    """The flat RGB colour of tile (z, x, y)."""
    return (x * 53 + 7) % 256, (y * 97 + 11) % 256, (z * 10 + 3) % 256


def tile_png(z: int, x: int, y: int, size: int = 256, transparent: bool = False) -> bytes:
    """PNG bytes of tile (z, x, y); ``transparent``: RGBA with its east half transparent (edge of coverage)."""
    img = np.empty((size, size, 4 if transparent else 3), dtype=np.uint8)
    img[..., :3] = tile_colour(z, x, y)
    if transparent:
        img[..., 3] = 255
        img[:, size // 2 :, 3] = 0
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class TileServer:
    """The server; use as a context manager or call :meth:`start` / :meth:`stop`."""

    def __init__(self, tile_size: int = 256, slow_s: float = 1.0) -> None:
        self.tile_size = tile_size
        self.slow_s = slow_s
        self.faults: dict[tuple[int, int, int], list[str]] = defaultdict(list)
        self.fail_first: list[str] = []
        self.missing: set[tuple[int, int, int]] = set()
        self.transparent: set[tuple[int, int, int]] = set()  # served as RGBA, east half transparent
        self.requests: Counter[tuple[int, int, int]] = Counter()
        self._seen: Counter[tuple[int, int, int]] = Counter()
        self.required_query: str | None = None  # e.g. "key=abc": requests without it get 403, like a keyed service
        self.required_headers: dict[str, str] = {}  # likewise for headers (e.g. Authorization)
        self.active = 0  # "slow" requests being held now
        self.max_active = 0  # the most held at once (checks a client's concurrency limit)
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- control --------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    @property
    def url_template(self) -> str:
        return f"http://127.0.0.1:{self.port}/{{z}}/{{x}}/{{y}}.png"

    @property
    def total_requests(self) -> int:
        with self._lock:
            return sum(self.requests.values())

    def inject(self, z: int, x: int, y: int, *faults: str) -> None:
        """Queue faults for the next requests of one tile."""
        with self._lock:
            self.faults[(z, x, y)].extend(faults)

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()

    def _next_fault(self, key: tuple[int, int, int]) -> str | None:
        with self._lock:
            self.requests[key] += 1
            seen = self._seen[key]
            self._seen[key] += 1
            if key in self.missing:
                return "404"
            if seen < len(self.fail_first):
                return self.fail_first[seen]
            queue = self.faults.get(key)
            return queue.pop(0) if queue else None

    def start(self) -> TileServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                parts = self.path.split("?")[0].strip("/").split("/")
                try:
                    z, x = int(parts[0]), int(parts[1])
                    y = int(parts[2].split(".")[0])
                except (IndexError, ValueError):
                    self.send_error(400)
                    return
                query = self.path.partition("?")[2].split("&")
                keyed = server.required_query is None or server.required_query in query
                if not keyed or any(self.headers.get(k) != v for k, v in server.required_headers.items()):
                    self.send_response(403)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                fault = server._next_fault((z, x, y))
                if fault in ("500", "503", "429", "403", "404"):
                    self.send_response(int(fault))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "slow":
                    # Counted while waiting, before any byte is sent: a client cannot have finished this
                    # request yet, so `max_active` is the true number of requests it had open at once.
                    with server._lock:
                        server.active += 1
                        server.max_active = max(server.max_active, server.active)
                    time.sleep(server.slow_s)
                    with server._lock:
                        server.active -= 1
                body = tile_png(z, x, y, server.tile_size, transparent=(z, x, y) in server.transparent)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    if fault == "corrupt":
                        body = body[: len(body) // 2]
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    if fault == "truncate":
                        self.wfile.write(body[: len(body) // 2])
                        self.wfile.flush()
                        self.close_connection = True
                        return
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> TileServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

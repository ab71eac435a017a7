"""An XYZ (slippy-map) tile client: web-mercator zoom choice, fetch with retries, on-disk cache, mosaics.

:class:`TileClient` fetches ``{z}/{x}/{y}`` tiles from a URL template with the standard library only
(``urllib``), and is safe to call from many threads:

* **timeouts** per request; **retries** with exponential backoff and jitter for timeouts, connection
  errors, HTTP 5xx/429 and bodies that do not decode (truncated or corrupt images);
* HTTP **404/410/204 mean "no imagery"** (the tile is recorded as missing, not retried); other 4xx fail
  at once (a wrong URL or key does not improve with retries);
* a **concurrency limit** (a semaphore around the network I/O, whatever the number of calling threads);
* an **on-disk cache** ``CACHE/<sha1(template)[:12]>/z/x/y.<ext>`` written atomically (temp file +
  ``os.replace``), plus ``y.missing`` markers for 404s, so a rerun makes no requests for what it has
  (resume); a cached file that no longer decodes is deleted and fetched again;
* an in-memory LRU of decoded tiles and de-duplication of concurrent requests for the same tile, since
  neighbouring map points share most of their tiles;
* **secrets from the environment**: ``{env:NAME}`` in the URL template or a header value is replaced by the
  environment variable ``NAME`` when a request is made. Everything written down (index.json, problem
  records, error messages, the cache folder's key) keeps the placeholder, so a key never lands in a file
  and a rotated key keeps the cache.

:func:`read_footprint` picks the web-mercator zoom whose ground resolution at the point's latitude is
closest (in log scale) to the wanted GSD, mosaics the tiles under the ground square of
``size_px × gsd_m`` metres centred on the point and resamples it to ``size_px`` (box filter when
shrinking, bilinear when enlarging). Web mercator is conformal, so over one footprint a ground square is a
square of ``metres / resolution(lat)`` pixels. Tiles that are missing or failed leave their part of the
returned validity mask False.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import math
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from psm.atomic import write_bytes_atomic
from psm.data.errors import DataProblem

WEB_MERCATOR_RADIUS_M = 6_378_137.0
MAX_MERCATOR_LAT = 85.05112877980659  # the square world of web mercator ends here
MISSING_STATUSES = frozenset({204, 404, 410})  # "no tile here": no imagery, not an error
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


ENV_PLACEHOLDER = re.compile(r"\{env:([A-Za-z_][A-Za-z0-9_]*)\}")


class TileFetchError(RuntimeError):
    """A tile that could not be fetched after every retry (or with a non-retryable HTTP error)."""


def expand_env(text: str, what: str) -> str:
    """``text`` with each ``{env:NAME}`` replaced by the environment variable NAME (a clear error if unset)."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ValueError(f"{what} uses {{env:{name}}} but the environment variable {name} is not set")
        return os.environ[name]

    return ENV_PLACEHOLDER.sub(value, text)


def fill_tile_template(template: str, z: int, x: int, y: int) -> str:
    """``template`` with ``{z}``, ``{x}`` and ``{y}`` filled in (other text, ``{env:...}`` too, left as is)."""
    return template.replace("{z}", str(z)).replace("{x}", str(x)).replace("{y}", str(y))


def mercator_resolution(zoom: int, lat: float, tile_size: int = 256) -> float:
    """Ground metres per pixel of web-mercator zoom ``zoom`` at latitude ``lat``."""
    return 2.0 * math.pi * WEB_MERCATOR_RADIUS_M * math.cos(math.radians(lat)) / (tile_size * 2.0**zoom)


def choose_zoom(gsd_m: float, lat: float, *, min_zoom: int = 0, max_zoom: int = 19, tile_size: int = 256) -> int:
    """The web-mercator zoom whose resolution at ``lat`` is closest to ``gsd_m`` (log scale), clamped."""
    z = math.log2(2.0 * math.pi * WEB_MERCATOR_RADIUS_M * math.cos(math.radians(lat)) / (tile_size * gsd_m))
    return int(min(max_zoom, max(min_zoom, round(z))))


def lonlat_to_pixel(lon: float, lat: float, zoom: int, tile_size: int = 256) -> tuple[float, float]:
    """Global pixel coordinates (x east, y south) of a point at web-mercator zoom ``zoom``."""
    world = tile_size * 2.0**zoom
    x = (lon + 180.0) / 360.0 * world
    phi = math.radians(lat)
    y = (1.0 - math.log(math.tan(phi) + 1.0 / math.cos(phi)) / math.pi) / 2.0 * world
    return x, y


@dataclass
class TileStats:
    """Counters of one client (all threads): what came from the network, the caches, and what failed."""

    requests: int = 0  # HTTP requests sent (each retry counts)
    retries: int = 0
    downloaded: int = 0  # tiles fetched and decoded
    disk_hits: int = 0
    memory_hits: int = 0
    missing: int = 0  # 404 / 410 / 204 answers (and cached missing markers)
    failures: int = 0  # tiles given up on
    bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        """Plain dict of the counters."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


_NOT_FOUND = object()  # memory-cache value of a tile the server does not have


class TileClient:
    """Thread-safe XYZ tile fetcher with retries, a concurrency limit, an on-disk and an in-memory cache."""

    def __init__(
        self,
        url_template: str,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        timeout_s: float = 10.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        concurrency: int = 8,
        memory_tiles: int = 256,
        tile_size: int = 256,
        headers: dict[str, str] | None = None,
        on_problem: Callable[[DataProblem], None] | None = None,
        seed: int | None = None,
    ) -> None:
        if not all(k in url_template for k in ("{z}", "{x}", "{y}")):
            raise ValueError(f"tile URL template needs {{z}}, {{x}} and {{y}}: {url_template!r}")
        self.url_template = url_template  # as given: {env:...} placeholders stay (it is written down)
        self._request_template = expand_env(url_template, "the tile URL template")  # checked now, not per tile
        # Secret values back to their placeholders in any message (an error text may quote the URL).
        used = set(ENV_PLACEHOLDER.findall(url_template + "".join((headers or {}).values())))
        self._secrets = {os.environ[n]: f"{{env:{n}}}" for n in sorted(used) if os.environ.get(n)}
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.tile_size = int(tile_size)
        self.memory_tiles = int(memory_tiles)
        self.on_problem = on_problem
        from psm import __version__

        given = {k: expand_env(v, f"tile header {k!r}") for k, v in (headers or {}).items()}
        self.headers = {"User-Agent": f"psm/{__version__} (soundscape maps)"} | given
        self.cache_dir: Path | None = None
        if cache_dir is not None:
            # One sub-folder per template: two tile layers never share a cache by accident.
            key = hashlib.sha1(url_template.encode()).hexdigest()[:12]
            self.cache_dir = Path(cache_dir) / key
        suffix = Path(url_template.split("?")[0]).suffix.lower()
        self.ext = suffix if suffix in (".png", ".jpg", ".jpeg", ".webp") else ".tile"
        self.stats = TileStats()
        self._lock = threading.Lock()
        self._net = threading.BoundedSemaphore(max(1, int(concurrency)))
        self._memory: OrderedDict[tuple[int, int, int], object] = OrderedDict()
        self._inflight: dict[tuple[int, int, int], threading.Event] = {}
        self._failed: dict[tuple[int, int, int], str] = {}  # last failure, for threads that waited on it
        self._rng = random.Random(seed)

    # --- helpers ----------------------------------------------------------------------------------------
    def url(self, z: int, x: int, y: int) -> str:
        """The tile's URL as written down: any ``{env:NAME}`` stays a placeholder."""
        return fill_tile_template(self.url_template, z, x, y)

    def request_url(self, z: int, x: int, y: int) -> str:
        """The URL requested, with ``{env:NAME}`` filled in (never logged or stored)."""
        return fill_tile_template(self._request_template, z, x, y)

    def cache_path(self, z: int, x: int, y: int) -> Path | None:
        """Where the tile is cached on disk (None without a cache)."""
        return None if self.cache_dir is None else self.cache_dir / str(z) / str(x) / f"{y}{self.ext}"

    def _count(self, **inc: int) -> None:
        with self._lock:
            for k, v in inc.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def _remember(self, key: tuple[int, int, int], value: object) -> None:
        with self._lock:
            self._memory[key] = value
            self._memory.move_to_end(key)
            while len(self._memory) > self.memory_tiles:
                self._memory.popitem(last=False)

    def redact(self, text: str) -> str:
        """``text`` with the values of the template's and headers' environment variables put back as
        ``{env:NAME}`` (what goes into problem records and errors)."""
        for secret, placeholder in self._secrets.items():
            text = text.replace(secret, placeholder)
        return text

    def _problem(self, reason: str, z: int, x: int, y: int) -> None:
        if self.on_problem is not None:
            self.on_problem(DataProblem(self.redact(reason), file=self.url(z, x, y), key=f"{z}/{x}/{y}"))

    def _decode(self, data: bytes) -> np.ndarray:
        """Decode a tile fully (so truncation shows now) to uint8 of ``tile_size``²: RGB, or RGBA when some of
        it is transparent (a layer's edge of coverage: no imagery there, not black imagery)."""
        if not data:
            raise ValueError("empty body")
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
            tile = img.convert("RGBA" if alpha else "RGB")
        if tile.size != (self.tile_size, self.tile_size):
            # e.g. 512 px "retina" tiles: bring them to the grid the mosaic is built on.
            tile = tile.resize((self.tile_size, self.tile_size), Image.Resampling.BOX)
        out = np.asarray(tile)
        return out[..., :3] if alpha and out[..., 3].min() == 255 else out

    def _sleep_backoff(self, attempt: int, retry_after: float | None = None) -> None:
        delay = min(self.max_backoff_s, self.backoff_s * 2.0**attempt)
        delay *= 0.5 + self._rng.random()  # jitter: many threads retrying together would hammer in step
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff_s))
        self._count(retries=1)
        time.sleep(delay)

    # --- disk cache -------------------------------------------------------------------------------------
    def _from_disk(self, z: int, x: int, y: int) -> object | None:
        path = self.cache_path(z, x, y)
        if path is None:
            return None
        if path.with_suffix(".missing").exists():
            return _NOT_FOUND
        if not path.exists():
            return None
        try:
            return self._decode(path.read_bytes())
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            path.unlink(missing_ok=True)  # a torn or corrupt cache file: fetch it again
            return None

    def _to_disk(self, z: int, x: int, y: int, data: bytes | None) -> None:
        path = self.cache_path(z, x, y)
        if path is None:
            return
        target = path if data is not None else path.with_suffix(".missing")
        # Atomic: a reader sees the old state or the whole tile. Not flushed to disk one by one (thousands of
        # small files): a tile torn by a crash fails to decode and is fetched again.
        write_bytes_atomic(target, data or b"", durable=False)

    # --- network ----------------------------------------------------------------------------------------
    def _download(self, z: int, x: int, y: int) -> tuple[np.ndarray | None, bytes | None]:
        """(decoded tile, raw bytes), or (None, None) when the server has no such tile."""
        url = self.url(z, x, y)
        last = "no attempt"
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                with self._net:
                    self._count(requests=1)
                    req = urllib.request.Request(self.request_url(z, x, y), headers=self.headers)
                    with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                        status = resp.status
                        data = resp.read()
                if status in MISSING_STATUSES:
                    return None, None
                tile = self._decode(data)
                self._count(downloaded=1, bytes=len(data))
                return tile, data
            except urllib.error.HTTPError as e:
                if e.code in MISSING_STATUSES:
                    return None, None
                last = f"HTTP {e.code}"
                if e.code not in RETRY_STATUSES:
                    break
                ra = e.headers.get("Retry-After") if e.headers else None
                retry_after = float(ra) if ra and ra.strip().isdigit() else None
            except TimeoutError as e:
                last = f"timeout after {self.timeout_s:g} s ({e})"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError) as e:
                # IncompleteRead (a body shorter than Content-Length) lands here: retried like a reset.
                last = f"{type(e).__name__}: {e}"
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
                last = f"undecodable image ({type(e).__name__}: {e})"
            if attempt < self.retries:
                self._sleep_backoff(attempt, retry_after)
        self._count(failures=1)
        raise TileFetchError(self.redact(f"{url}: giving up after {attempt + 1} attempt(s): {last}"))

    # --- public -----------------------------------------------------------------------------------------
    def get(self, z: int, x: int, y: int) -> np.ndarray | None:
        """Tile (z, x, y) as uint8 ``tile_size``² RGB (RGBA where partly transparent), None if the server has
        none; TileFetchError if it fails."""
        key = (int(z), int(x), int(y))
        waited = False
        while True:
            with self._lock:
                if key in self._memory:
                    self._memory.move_to_end(key)
                    value = self._memory[key]
                    self.stats.memory_hits += 1
                    return None if value is _NOT_FOUND else value  # type: ignore[return-value]
                if waited and key in self._failed:
                    # The fetch we waited for failed: do not hammer the server again from every waiter.
                    raise TileFetchError(self._failed[key])
                event = self._inflight.get(key)
                owner = event is None
                if owner:
                    event = self._inflight[key] = threading.Event()
            if owner:
                break
            event.wait()  # another thread is fetching this tile; then look again
            waited = True
        try:
            cached = self._from_disk(*key)
            if cached is not None:
                self._count(disk_hits=1, missing=int(cached is _NOT_FOUND))
                self._remember(key, cached)
                return None if cached is _NOT_FOUND else cached  # type: ignore[return-value]
            try:
                tile, data = self._download(*key)
            except TileFetchError as e:
                self._problem(str(e), *key)
                with self._lock:
                    self._failed[key] = str(e)
                    while len(self._failed) > 4096:
                        self._failed.pop(next(iter(self._failed)))
                raise
            if tile is None:
                self._count(missing=1)
            self._to_disk(*key, data)
            self._remember(key, _NOT_FOUND if tile is None else tile)
            with self._lock:
                self._failed.pop(key, None)
            return tile
        finally:
            with self._lock:
                self._inflight.pop(key, None)
            event.set()


def read_footprint(
    client: TileClient,
    lat: float,
    lon: float,
    size_px: int,
    gsd_m: float,
    *,
    min_zoom: int = 0,
    max_zoom: int = 19,
) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Mosaic the ground square of ``size_px × gsd_m`` m around (lat, lon) → (HWC uint8, valid mask | None).

    The mask is None when every tile was there; None overall when no tile of the footprint exists (or the
    point is beyond web mercator's ±85.05°). Failed tiles count as missing here (the client records why).
    """
    if abs(lat) >= MAX_MERCATOR_LAT:
        return None
    ts = client.tile_size
    z = choose_zoom(gsd_m, lat, min_zoom=min_zoom, max_zoom=max_zoom, tile_size=ts)
    res = mercator_resolution(z, lat, ts)
    px, py = lonlat_to_pixel(lon, lat, z, ts)
    half = 0.5 * size_px * gsd_m / res  # half the footprint in zoom-z pixels
    x0, x1, y0, y1 = px - half, px + half, py - half, py + half
    tx0, tx1 = math.floor(x0 / ts), math.floor((x1 - 1e-9) / ts)
    ty0, ty1 = math.floor(y0 / ts), math.floor((y1 - 1e-9) / ts)
    n = 2**z
    canvas = np.zeros(((ty1 - ty0 + 1) * ts, (tx1 - tx0 + 1) * ts, 3), dtype=np.uint8)
    valid = np.zeros(canvas.shape[:2], dtype=bool)
    any_tile = False
    for ty in range(ty0, ty1 + 1):
        if not 0 <= ty < n:
            continue  # beyond the poles of web mercator
        for tx in range(tx0, tx1 + 1):
            try:
                tile = client.get(z, tx % n, ty)  # x wraps round the antimeridian
            except TileFetchError:
                tile = None
            if tile is None:
                continue
            r, c = (ty - ty0) * ts, (tx - tx0) * ts
            canvas[r : r + ts, c : c + ts] = tile[..., :3]
            # Transparent pixels (alpha 0) are where the layer has no imagery, as GDAL reads an alpha band.
            covered = True if tile.shape[-1] == 3 else tile[..., 3] > 0
            valid[r : r + ts, c : c + ts] = covered
            any_tile = any_tile or bool(np.any(covered))
    if not any_tile:
        return None
    box = (x0 - tx0 * ts, y0 - ty0 * ts, x1 - tx0 * ts, y1 - ty0 * ts)
    shrink = 2 * half > size_px
    method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
    image = np.asarray(Image.fromarray(canvas).resize((size_px, size_px), method, box=box))
    if valid.all():
        return image, None
    # A footprint pixel is valid only if everything it was resampled from was (mean of 1s is 255).
    mask_img = Image.fromarray(valid.astype(np.uint8) * 255).resize((size_px, size_px), method, box=box)
    mask = np.asarray(mask_img) >= 255
    out = image.copy()
    out[~mask] = 0
    return out, mask

"""``psm serve``: one map index and one model behind a small HTTP server, for a browser or a script.

The model, the index and the tokenizer are loaded once; each request is one text or audio query with one
metadata setting, answered with the same files ``psm map query`` writes (HTML viewer, PNG, COG) or with the
top places as JSON. Conditioned embeddings are cached per metadata setting on disk (as for the CLI), so a
new month or hour costs one fusion pass and every later query with it one matrix–vector product.

Standard library only (``http.server``): the server binds to 127.0.0.1 by default and is meant for one
researcher or a small team behind their own proxy, not for the open internet.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import socket
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger(__name__)

MAX_AUDIO_BYTES = 64 * 1024 * 1024  # a 10-minute 48 kHz stereo WAV is ~110 MB; CLAP reads 10 s of it anyway
MAX_TEXTS = 32
MAX_TOP_K = 10_000
MAP_FORMATS = {"html": "text/html; charset=utf-8", "png": "image/png", "tif": "image/tiff"}
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".m4a", ".aac")
TILE_SIZE = 256
MAX_TILE_ZOOM = 22
WEB_MERCATOR_HALF = 20_037_508.342789244  # half the side of the EPSG:3857 world square, metres
RASTER_CACHE_SIZE = 4  # scored rasters kept for tile requests (each H×W float32: 40 MB for 10 million points)
REQUEST_TIMEOUT_S = 60.0  # a connection silent this long is dropped: a stalled client must not hold a thread forever
WRITE_CHUNK = 1 << 18  # answers go out in pieces of this: a slow reader must take each within the timeout
MAX_DRAIN_BYTES = 4 * MAX_AUDIO_BYTES  # an oversized body up to this is read and discarded so its 413 arrives
TILE_COORD = re.compile(r"[0-9]{1,8}")  # ASCII digits only (int() also takes "²"-like digits and huge strings)


class RequestError(ValueError):
    """A problem with a request's parameters or body: answered with HTTP 400 and the message."""


@dataclass
class QueryRequest:
    """One request's query, metadata setting and map options, parsed and range-checked."""

    texts: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    setting: Any = None  # psm.maps.query.MetadataSetting
    zoom: int | None = None
    scale: str = "raw"
    cmap: str = "viridis"
    width: int = 1000
    title: str | None = None
    k: int = 20


def _one(params: Mapping[str, list[str]], name: str) -> str | None:
    values = params.get(name)
    if not values:
        return None
    if len(values) > 1:
        raise RequestError(f"parameter {name!r} given {len(values)} times; it takes one value")
    value = values[0].strip()
    return value or None


def _number(params: Mapping[str, list[str]], name: str, kind: type = float) -> Any:
    value = _one(params, name)
    if value is None:
        return None
    try:
        number = kind(value)
    except ValueError:
        raise RequestError(f"parameter {name!r} must be a number, got {value!r}") from None
    if not math.isfinite(number):  # range checks pass NaN, and NaN would reach the cache and the JSON answer
        raise RequestError(f"parameter {name!r} must be a finite number, got {value!r}")
    return number


def _flag(params: Mapping[str, list[str]], name: str) -> bool | None:
    value = _one(params, name)
    if value is None:
        return None
    if value.lower() in ("1", "true", "on", "yes"):
        return True
    if value.lower() in ("0", "false", "off", "no"):
        return False
    raise RequestError(f"parameter {name!r} must be true or false, got {value!r}")


def parse_query_request(params: Mapping[str, list[str]]) -> QueryRequest:
    """Read a request's parameters (``text`` repeatable, ``template`` repeatable, ``prompt_ensemble``,
    ``month``, ``hour``, ``audio_source``, ``caption_source``, ``location``, ``zoom``, ``scale``, ``cmap``,
    ``width``, ``title``, ``k``); unknown names are refused so a typo is not silently ignored."""
    from psm.maps.query import PROMPT_TEMPLATES, MetadataSetting, ScaleSpec

    known = {
        "text", "template", "prompt_ensemble", "month", "hour", "audio_source", "caption_source", "location",
        "zoom", "scale", "cmap", "width", "title", "k", "filename",
    }  # fmt: skip
    unknown = sorted(set(params) - known)
    if unknown:
        raise RequestError(f"unknown parameters {unknown}; known: {sorted(known)}")
    texts = [t.strip() for t in params.get("text", []) if t.strip()]
    if len(texts) > MAX_TEXTS:
        raise RequestError(f"at most {MAX_TEXTS} texts per query, got {len(texts)}")
    templates = [*(PROMPT_TEMPLATES if _flag(params, "prompt_ensemble") else ()), *params.get("template", [])]
    req = QueryRequest(
        texts=texts,
        templates=list(dict.fromkeys(templates)),
        setting=MetadataSetting(
            month=_number(params, "month"),
            hour=_number(params, "hour"),
            audio_source=_one(params, "audio_source"),
            caption_source=_one(params, "caption_source"),
            location=_flag(params, "location"),
        ),
        zoom=_number(params, "zoom", int),
        scale=_one(params, "scale") or "raw",
        cmap=_one(params, "cmap") or "viridis",
        title=_one(params, "title"),
    )
    for name in ("width", "k"):  # (0 is a value to refuse, not "left out")
        value = _number(params, name, int)
        if value is not None:
            setattr(req, name, value)
    try:
        spec = ScaleSpec.parse(req.scale)
    except ValueError as e:
        raise RequestError(str(e)) from None
    if spec.mode == "shared":  # a shared scale is a file on the server: not something a request may name
        raise RequestError("scale 'shared' is not available here: use raw or percentile[:LO,HI]")
    if not 200 <= req.width <= 4000:
        raise RequestError(f"width must be 200..4000 pixels, got {req.width}")
    if not 1 <= req.k <= MAX_TOP_K:
        raise RequestError(f"k must be 1..{MAX_TOP_K}, got {req.k}")
    try:
        import matplotlib

        matplotlib.colormaps[req.cmap]
    except KeyError:
        raise RequestError(f"unknown colormap {req.cmap!r}") from None
    return req


class MapService:
    """The loaded model, index and tokenizer, and the queries a server answers with them (thread-safe)."""

    def __init__(
        self,
        index: str | Path,
        checkpoint: str | Path,
        *,
        tokenizer: str | Path | None = None,
        device: str = "cpu",
        cache_dir: str | Path | None = None,
        basemap: str | None = None,
        allow_incomplete: bool = False,
    ) -> None:
        from psm.data.text import load_tokenizer
        from psm.maps.query import MapIndex, check_model_matches_index
        from psm.models.checkpoint import load_checkpoint

        self.index = MapIndex(index)
        self.model, _ = load_checkpoint(checkpoint, device=device)
        self.model.eval()
        check_model_matches_index(self.model, self.index)  # refuse at start, not at the first request
        folder = Path(tokenizer) if tokenizer else Path(checkpoint) / "tokenizer"
        self.tokenizer = load_tokenizer(folder) if folder.is_dir() else None
        self.cache_dir = cache_dir
        self.basemap = basemap
        self.allow_incomplete = allow_incomplete
        # One query at a time: torch already uses every core for one, and the conditioned-embedding cache
        # of a new setting is then computed once, not by two requests racing for it.
        self._lock = threading.Lock()
        self._rasters: dict[str, tuple[Any, float, float]] = {}
        # Server paths that library messages quote (e.g. a zoom not in the index), longest first: a client is
        # told the folder's name, not where it lies on the server's disk.
        paths = [Path(p) for p in (index, checkpoint, folder, cache_dir) if p]
        named = {str(q): q.name for p in paths for q in (p, p.resolve())}
        self._paths = sorted(((k, v) for k, v in named.items() if os.sep in k), key=lambda kv: -len(kv[0]))

    def redact(self, message: str) -> str:
        """``message`` with the server's index, checkpoint, tokenizer and cache paths cut to their folder names."""
        for path, name in self._paths:
            message = message.replace(path, name)
        return message

    def info(self) -> dict[str, Any]:
        """What a client needs to build a query: metadata the model uses and their vocabularies, zooms, area."""
        spec = self.model.config.metadata
        grid = self.index.grid
        return {
            "model": str(self.index.model_name(self.model)),
            "probabilistic": bool(self.model.config.probabilistic),
            "text_queries": self.model.text is not None and self.tokenizer is not None,
            "metadata_types": list(spec.types),
            "audio_sources": list(spec.audio_sources),
            "caption_sources": list(spec.caption_sources),
            "zoom_levels": [int(z) for z in self.index.zooms],
            "num_points": int(self.index.num_points),
            "bounds_wgs84": list(grid.bounds_wgs84()),
        }

    def _query(self, req: QueryRequest, audio: bytes | None, filename: str | None) -> Any:
        from psm.data.audio import AudioDecodeError
        from psm.maps.query import MapQueryError, embed_audio_query, embed_text_query

        if audio is not None:
            if req.texts or req.templates:
                raise RequestError("give either text or an audio body, not both")
            suffix = Path(filename or "query.wav").suffix.lower()
            if suffix not in AUDIO_SUFFIXES:
                raise RequestError(f"audio file name must end in one of {', '.join(AUDIO_SUFFIXES)}, got {filename!r}")
            name = Path(filename).name if filename else f"query{suffix}"
            with tempfile.TemporaryDirectory(prefix="psm-serve-") as tmp:
                path = Path(tmp) / f"query{suffix}"
                path.write_bytes(audio)
                try:
                    q = embed_audio_query(self.model, path)
                except AudioDecodeError as e:  # name the client's file, not the server's temporary path
                    raise AudioDecodeError(str(e).replace(str(path), name)) from None
            return replace(q, label=name)
        if not req.texts:
            raise RequestError("a query needs text=... or an audio file in the request body")
        if self.tokenizer is None:
            raise MapQueryError("this checkpoint has no tokenizer folder: start psm serve with --tokenizer")
        return embed_text_query(self.model, self.tokenizer, req.texts, templates=req.templates or ("{}",))

    def render(self, req: QueryRequest, fmt: str, audio: bytes | None = None, filename: str | None = None) -> bytes:
        """One map as ``html``, ``png`` or ``tif`` bytes: the files ``psm map query`` would write."""
        from psm.maps.query import ScaleSpec, query_map

        with self._lock, tempfile.TemporaryDirectory(prefix="psm-serve-") as tmp:
            q = self._query(req, audio, filename)
            out = query_map(
                self.index,
                self.model,
                q,
                Path(tmp) / "map",
                zoom=req.zoom,
                setting=req.setting,
                scale=ScaleSpec.parse(req.scale),
                cmap=req.cmap,
                basemap=self.basemap,
                width_px=req.width,
                title=req.title,
                formats=(fmt,),
                cache_dir=self.cache_dir,
                allow_incomplete=self.allow_incomplete,
            )
            return Path(getattr(out, fmt)).read_bytes()

    def tile(self, req: QueryRequest, z: int, x: int, y: int) -> bytes:
        """One 256 px web-mercator PNG tile of a text query's map, on the whole map's colour scale, for web maps
        and GIS (an XYZ layer); places without a score are transparent."""
        import numpy as np
        from rasterio.transform import from_bounds
        from rasterio.warp import Resampling, reproject

        from psm.maps.render import _png_bytes, colorize

        bounds = tile_bounds(z, x, y)
        raster, vmin, vmax = self._scored_raster(req)
        grid = self.index.grid
        out = np.full((TILE_SIZE, TILE_SIZE), np.nan, dtype=np.float32)
        # Nearest neighbour: each tile pixel shows one grid point's score, never a blend with nodata.
        reproject(
            raster,
            out,
            src_transform=grid.affine(),
            src_crs=grid.rasterio_crs(),
            src_nodata=np.nan,
            dst_transform=from_bounds(*bounds, TILE_SIZE, TILE_SIZE),
            dst_crs="EPSG:3857",
            dst_nodata=np.nan,
            resampling=Resampling.nearest,
        )
        return _png_bytes(colorize(out, vmin, vmax, req.cmap))

    def _scored_raster(self, req: QueryRequest) -> tuple[Any, float, float]:
        """(scores on the index grid, vmin, vmax) of a text query, kept for the next tiles of the same map."""
        from psm.maps.query import ScaleSpec, query_raster

        if not req.texts:
            raise RequestError("map tiles take a text query (an audio clip cannot travel in a tile URL)")
        key = json.dumps([req.texts, req.templates, req.setting.to_dict(), req.zoom, req.scale], sort_keys=True)
        with self._lock:
            if key in self._rasters:
                self._rasters[key] = self._rasters.pop(key)  # most recently used last
                return self._rasters[key]
            q = self._query(req, None, None)
            raster, scale, _ = query_raster(
                self.index,
                self.model,
                q,
                zoom=req.zoom,
                setting=req.setting,
                scale=ScaleSpec.parse(req.scale),
                cache_dir=self.cache_dir,
                allow_incomplete=self.allow_incomplete,
            )
            vmin, vmax = scale.display_range()
            self._rasters[key] = (raster, vmin, vmax)
            while len(self._rasters) > RASTER_CACHE_SIZE:
                self._rasters.pop(next(iter(self._rasters)))
            return self._rasters[key]

    def top(self, req: QueryRequest, audio: bytes | None = None, filename: str | None = None) -> dict[str, Any]:
        """The ``k`` most likely places for a query, as ``psm map top`` lists them."""
        from psm.maps.query import condition, default_zoom, score_label, top_k

        with self._lock:
            q = self._query(req, audio, filename)
            zoom = default_zoom(self.index, req.zoom)
            cond = condition(
                self.index,
                self.model,
                zoom,
                req.setting,
                cache_dir=self.cache_dir,
                allow_incomplete=self.allow_incomplete,
            )
            ids, scores = top_k(cond, q, req.k)
        pts = self.index.points.iloc[ids]
        places = [
            {"rank": i + 1, "latitude": float(lat), "longitude": float(lon), "score": float(s), "point_id": int(p)}
            for i, (lat, lon, s, p) in enumerate(zip(pts["latitude"], pts["longitude"], scores, ids, strict=True))
        ]
        return {
            "query": q.describe(),
            "zoom": zoom,
            "setting": cond.setting.to_dict(),
            "score": score_label(cond.probabilistic),
            "places": places,
        }


def tile_bounds(z: int, x: int, y: int) -> tuple[float, float, float, float]:
    """EPSG:3857 bounds (west, south, east, north) of XYZ tile z/x/y (the OSM / Google scheme, y down)."""
    if not 0 <= z <= MAX_TILE_ZOOM or not (0 <= x < 2**z and 0 <= y < 2**z):
        raise RequestError(f"no tile {z}/{x}/{y}: zoom must be 0..{MAX_TILE_ZOOM} and x, y in 0..2^zoom−1")
    span = 2 * WEB_MERCATOR_HALF / 2**z
    west, north = -WEB_MERCATOR_HALF + x * span, WEB_MERCATOR_HALF - y * span
    return west, north - span, west + span, north


def _page() -> bytes:
    return resources.files("psm.serving").joinpath("page.html").read_bytes()


class MapRequestHandler(BaseHTTPRequestHandler):
    """Routes: ``/`` (the query page), ``/api/info``, ``/map.{html,png,tif}``, ``/tiles/Z/X/Y.png``, ``/api/top``,
    ``/health``.

    Map and top requests take their query in the URL; POST adds an audio clip as the raw request body
    (``filename=`` names its format).
    """

    service: MapService  # set on the subclass make_server builds
    server_version = "psm-serve"
    timeout = REQUEST_TIMEOUT_S  # per socket read/write: a half-sent request (slowloris) ends, not waits forever

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._dispatch(body=None)

    def do_HEAD(self) -> None:
        """GET's status and headers without the body (health checks, ``curl -I``); _send leaves the body out."""
        self._dispatch(body=None)

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length")
        if length is None:
            self._error(HTTPStatus.LENGTH_REQUIRED, "POST needs a Content-Length (the audio clip's size)")
            return
        # Digits only: int() also takes "-1" (read(-1) then waits for the client to close) and "1_0".
        if not (length.strip().isascii() and length.strip().isdigit()):
            self._error(HTTPStatus.BAD_REQUEST, f"bad Content-Length {length!r}")
            return
        n = int(length)
        if n > MAX_AUDIO_BYTES:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"audio body over {MAX_AUDIO_BYTES // 2**20} MiB")
            if n <= MAX_DRAIN_BYTES:  # closing on unread data resets the connection: the client never sees the 413
                self._discard(n)
            return
        try:
            body = self.rfile.read(n)
        except TimeoutError:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_TIMEOUT, f"no part of the body came for {self.timeout:g} s")
            return
        if len(body) != n:
            self._error(HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {n} bytes")
            return
        self._dispatch(body=body)

    def _dispatch(self, body: bytes | None) -> None:
        from psm.data.audio import AudioDecodeError
        from psm.data.metadata import MetadataError
        from psm.maps.query import MapQueryError

        url = urlsplit(self.path)
        params = parse_qs(url.query, keep_blank_values=False)
        route = url.path.rstrip("/") or "/"
        try:
            if route == "/" and body is None:
                self._send(HTTPStatus.OK, "text/html; charset=utf-8", _page())
            elif route == "/favicon.ico" and body is None:  # browsers ask for one; answer "none" without an error
                self._send(HTTPStatus.NO_CONTENT, "image/x-icon", b"")
            elif route == "/health" and body is None:
                self._send(HTTPStatus.OK, "text/plain; charset=utf-8", b"ok\n")
            elif route == "/api/info" and body is None:
                self._json(self.service.info())
            elif route.startswith("/map.") and route[len("/map.") :] in MAP_FORMATS:
                fmt = route[len("/map.") :]
                req = parse_query_request(params)
                data = self.service.render(req, fmt, audio=body, filename=_one(params, "filename"))
                self._send(HTTPStatus.OK, MAP_FORMATS[fmt], data, download=f"psm-map.{fmt}" if fmt == "tif" else None)
            elif route.startswith("/tiles/") and route.endswith(".png") and body is None:
                parts = route[len("/tiles/") : -len(".png")].split("/")
                if len(parts) != 3 or not all(TILE_COORD.fullmatch(p) for p in parts):
                    raise RequestError(f"a tile is /tiles/Z/X/Y.png, got {url.path}")
                z, x, y = (int(p) for p in parts)
                tile = self.service.tile(parse_query_request(params), z, x, y)
                # Any origin may read tiles: web maps that fetch them (MapLibre, OpenLayers with crossOrigin) need it.
                self._send(HTTPStatus.OK, "image/png", tile, cors=True)
            elif route == "/api/top":
                req = parse_query_request(params)
                self._json(self.service.top(req, audio=body, filename=_one(params, "filename")))
            else:
                self._error(HTTPStatus.NOT_FOUND, f"no route {self.command} {url.path}")
        except (RequestError, MapQueryError, MetadataError, AudioDecodeError) as e:
            self._error(HTTPStatus.BAD_REQUEST, self.service.redact(str(e)))
        except Exception as e:
            log.exception("request %s failed", self.path)
            # The text of an unexpected error may quote server paths: it goes to the log, the type to the client.
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(e).__name__}); see the server log")

    def _discard(self, n: int) -> None:
        """Read and drop up to ``n`` body bytes, until the client stops sending or goes quiet."""
        try:
            while n > 0:
                chunk = self.rfile.read1(min(n, 1 << 20))
                if not chunk:
                    break
                n -= len(chunk)
        except (TimeoutError, ConnectionError):
            pass

    def _send(
        self, status: HTTPStatus, ctype: str, data: bytes, download: str | None = None, cors: bool = False
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if download:
            self.send_header("Content-Disposition", f'attachment; filename="{download}"')
        if cors:
            self.send_header("Access-Control-Allow-Origin", "*")
        try:
            self.end_headers()
            if self.command != "HEAD":
                view = memoryview(data)
                for start in range(0, len(data), WRITE_CHUNK):  # the timeout bounds one sendall, not the answer
                    self.wfile.write(view[start : start + WRITE_CHUNK])
        except (ConnectionError, TimeoutError):  # the client left (a web map drops tiles it no longer shows)
            self.close_connection = True
            log.info("%s left before the answer to %s", self.address_string(), self.path)

    def _json(self, obj: Any, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(status, "application/json", json.dumps(obj, indent=1).encode())

    def _error(self, status: HTTPStatus, message: str) -> None:
        self._json({"error": message, "status": int(status)}, status)


def make_server(service: MapService, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """An HTTP server for ``service`` (port 0 picks a free port: see ``server.server_address``)."""
    handler = type("BoundMapRequestHandler", (MapRequestHandler,), {"service": service})
    # The socket family of the host: ThreadingHTTPServer alone is IPv4 and fails on "::" or "::1" ("" stays IPv4).
    family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    server_class = type("MapHTTPServer", (ThreadingHTTPServer,), {"address_family": family})
    server = server_class((host, port), handler)
    server.daemon_threads = True
    return server


def serve(service: MapService, host: str = "127.0.0.1", port: int = 8000, announce: Sequence[str] = ()) -> None:
    """Serve until interrupted (Ctrl-C)."""
    server = make_server(service, host, port)
    host, port = server.server_address[:2]
    address = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
    for line in (*announce, f"psm serve: {address}  (Ctrl-C stops)"):
        print(line, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()

"""Map outputs: Cloud-Optimized GeoTIFF, PNG with legend, a self-contained HTML viewer, GIF/MP4 and a report page.

Every writer is atomic (a temporary file in the target folder, renamed into place), so an interrupted run
never leaves a half-written map that looks finished. The HTML pages work offline: the map is embedded as a
base64 PNG (reprojected to Web Mercator) over a lat/lon graticule drawn by a few lines of plain JavaScript;
an optional XYZ basemap URL template (online use) loads tiles under the overlay.
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from psm.atomic import atomic_path as _atomic_path
from psm.maps.query import GridSpec

log = logging.getLogger(__name__)

NODATA = float("nan")
MERCATOR_MAX_LAT = 85.05112878  # Web Mercator's latitude limit
_MERCATOR_HALF = math.pi * 6378137.0
NODATA_COLOUR = "#d9d9d9"


@dataclass
class MapLegend:
    """What a map shows: title, the query, the metadata setting and the value's meaning (for PNG/HTML/tags)."""

    title: str
    query: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    value_label: str = "score"
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """Legend lines below the title."""
        out = []
        if self.query:
            out.append(f"query: {self.query}")
        if self.metadata:
            out.append("  ·  ".join(f"{k}: {v}" for k, v in self.metadata.items()))
        out.extend(self.notes)
        return out


@dataclass
class MapOutputs:
    """Paths of one rendered map (any may be None when that format was not written)."""

    title: str
    tif: Path | None = None
    png: Path | None = None
    html: Path | None = None
    legend: MapLegend | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------


def atomic_path(path: str | Path, suffix: str = "") -> contextlib.AbstractContextManager[Path]:
    """A temporary path next to ``path`` with its suffix (GDAL and matplotlib choose the format by it), renamed
    onto ``path`` when the block succeeds (:func:`psm.atomic.atomic_path`)."""
    return _atomic_path(path, suffix=suffix or Path(path).suffix)


def points_to_raster(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scatter per-point values into an (H, W) float32 raster; pixels without a point are NaN (nodata)."""
    raster = np.full((height, width), np.nan, dtype=np.float32)
    raster[np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)] = values
    return raster


def colormap_lut(name: str = "viridis") -> np.ndarray:
    """(256, 4) uint8 RGBA lookup table of a matplotlib colormap."""
    import matplotlib

    cmap = matplotlib.colormaps[name]
    return cmap(np.linspace(0.0, 1.0, 256), bytes=True)


def colorize(values: np.ndarray, vmin: float, vmax: float, cmap: str = "viridis") -> np.ndarray:
    """RGBA uint8 image of ``values`` on [vmin, vmax]; NaN is fully transparent."""
    lut = colormap_lut(cmap)
    span = vmax - vmin if vmax > vmin else 1.0
    finite = np.isfinite(values)
    idx = np.clip((np.where(finite, values, vmin) - vmin) / span * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgba = lut[idx]
    rgba[~finite] = 0
    return rgba


def _png_bytes(rgba: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _fmt_deg(lat: float, lon: float) -> str:
    return f"{abs(lat):.4f}°{'N' if lat >= 0 else 'S'}, {abs(lon):.4f}°{'E' if lon >= 0 else 'W'}"


def bounds_text(grid: GridSpec) -> str:
    """``bounds (WGS84): S … N, W … E`` for legends."""
    w, s, e, n = grid.bounds_wgs84()
    return f"bounds (WGS84): {_fmt_deg(s, w)} to {_fmt_deg(n, e)}"


# --------------------------------------------------------------------------------------------------------
# Cloud-Optimized GeoTIFF
# --------------------------------------------------------------------------------------------------------


def write_cog(
    raster: np.ndarray,
    grid: GridSpec,
    path: str | Path,
    *,
    tags: Mapping[str, Any] | None = None,
    blocksize: int = 256,
    compress: str = "deflate",
) -> Path:
    """Write a float32 single-band Cloud-Optimized GeoTIFF on the index grid, nodata = NaN, atomically.

    Uses GDAL's COG driver (internal tiling, overviews, IFDs first); without it, a tiled GTiff with
    overviews. The result is validated before it is renamed into place.
    """
    import rasterio

    path = Path(path)
    data = np.asarray(raster, dtype=np.float32)
    if data.shape != (grid.height, grid.width):
        raise ValueError(f"raster shape {data.shape} does not match the grid {grid.height}×{grid.width}")
    profile = dict(
        width=grid.width,
        height=grid.height,
        count=1,
        dtype="float32",
        crs=grid.rasterio_crs(),
        transform=grid.affine(),
        nodata=NODATA,
    )
    str_tags = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (tags or {}).items()}
    with rasterio.Env() as env:
        has_cog = "COG" in env.drivers()
    with atomic_path(path) as tmp:
        if has_cog:
            with rasterio.open(
                tmp,
                "w",
                driver="COG",
                compress=compress,
                predictor="YES",
                blocksize=blocksize,
                overview_resampling="average",
                **profile,
            ) as dst:
                dst.write(data, 1)
                dst.update_tags(**str_tags)
        else:  # older GDAL: tiled GTiff + overviews (valid COG layout apart from the IFD order hint)
            with rasterio.open(
                tmp,
                "w",
                driver="GTiff",
                tiled=True,
                blockxsize=blocksize,
                blockysize=blocksize,
                compress=compress,
                **profile,
            ) as dst:
                dst.write(data, 1)
                dst.update_tags(**str_tags)
                factors = _overview_factors(grid.width, grid.height, blocksize)
                if factors:
                    dst.build_overviews(factors, rasterio.enums.Resampling.average)
        problems = validate_cog(tmp, blocksize=blocksize, require_layout=has_cog)
        if problems:
            raise RuntimeError(f"{path}: the written GeoTIFF is not a valid COG: {'; '.join(problems)}")
    return path


def _overview_factors(width: int, height: int, blocksize: int) -> list[int]:
    factors, f = [], 2
    while max(width, height) / f >= blocksize / 2 and max(width, height) > blocksize:
        factors.append(f)
        f *= 2
    return factors


def validate_cog(path: str | Path, *, blocksize: int | None = None, require_layout: bool = True) -> list[str]:
    """Problems that keep ``path`` from being a usable COG (empty list = fine).

    Checks GDAL's ``LAYOUT=COG`` structure tag, internal tiling, overviews for rasters larger than one block,
    a CRS, a transform and a nodata value.
    """
    import rasterio

    problems = []
    with rasterio.open(path) as ds:
        layout = ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT")
        if require_layout and layout != "COG":
            problems.append(f"IMAGE_STRUCTURE LAYOUT is {layout!r}, not 'COG'")
        bh, bw = ds.block_shapes[0]
        if not ds.profile.get("tiled") and max(ds.width, ds.height) > (blocksize or 256):
            problems.append(f"not internally tiled (blocks {bh}×{bw})")
        if max(ds.width, ds.height) > 2 * (blocksize or 256) and not ds.overviews(1):
            problems.append("no overviews")
        if ds.crs is None:
            problems.append("no CRS")
        if ds.transform.is_identity:
            problems.append("no geotransform")
        if ds.nodata is None:
            problems.append("no nodata value")
    return problems


# --------------------------------------------------------------------------------------------------------
# PNG
# --------------------------------------------------------------------------------------------------------


def write_png(
    raster: np.ndarray,
    path: str | Path,
    *,
    grid: GridSpec,
    legend: MapLegend,
    vmin: float,
    vmax: float,
    cmap: str = "viridis",
    width_px: int = 1000,
    dpi: int = 100,
) -> Path:
    """A PNG of the map with title, colour bar and the query/metadata legend, ``width_px`` wide (Agg backend).

    Nodata is drawn light grey and said so in the legend.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    path = Path(path)
    a, _, _, _, e, _ = grid.transform
    # Aspect of the map in CRS units (pixels need not be square), kept within readable limits.
    aspect = min(3.0, max(0.25, (abs(e) * grid.height) / max(1e-12, abs(a) * grid.width)))
    width_in = width_px / dpi
    margin = 0.25
    map_w = width_in - 2 * margin
    map_h = map_w * aspect
    wrap = max(40, int(width_px / 7.5))
    lines = []
    for line in [*legend.lines(), bounds_text(grid), "grey: no imagery / outside the region"]:
        lines.extend(textwrap.wrap(line, wrap) or [""])
    title_h, cbar_h, cbar_gap, line_h = 0.55, 0.18, 0.55, 0.2
    text_h = line_h * len(lines) + 0.1
    height_in = title_h + map_h + cbar_gap + cbar_h + 0.6 + text_h
    height_px = round(height_in * dpi)
    height_in = height_px / dpi

    fig = Figure(figsize=(width_in, height_in), dpi=dpi, facecolor="white")
    y_top = height_in - title_h
    ax = fig.add_axes((margin / width_in, (y_top - map_h) / height_in, map_w / width_in, map_h / height_in))
    cm = matplotlib.colormaps[cmap].with_extremes(bad=NODATA_COLOUR)
    left, bottom, right, top = grid.bounds()
    ax.imshow(
        np.ma.masked_invalid(raster),
        cmap=cm,
        vmin=vmin,
        vmax=vmax,
        extent=(left, right, bottom, top),
        origin="upper",
        # Pixels larger than screen pixels stay crisp; a grid wider than the figure is antialiased, not aliased.
        interpolation="nearest" if grid.width <= width_px else "antialiased",
        aspect="auto",
    )
    ax.set_xticks([])
    ax.set_yticks([])
    title = textwrap.shorten(legend.title, width=max(30, int(width_px / 11)), placeholder=" …")
    # parse_math=False: user text ("$5 cash register") is shown as typed, never parsed as mathtext (which
    # drops the dollars or fails on the whole map for "$x^$").
    fig.text(
        0.5, (height_in - 0.32) / height_in, title, ha="center", va="center", fontsize=14, weight="bold",
        parse_math=False,
    )  # fmt: skip
    cax_y = y_top - map_h - cbar_gap
    cax = fig.add_axes((0.15, cax_y / height_in, 0.7, cbar_h / height_in))
    bar = fig.colorbar(
        ScalarMappable(Normalize(vmin, vmax), matplotlib.colormaps[cmap]), cax=cax, orientation="horizontal"
    )
    bar.set_label(legend.value_label, fontsize=9, parse_math=False)
    bar.ax.tick_params(labelsize=8)
    y = cax_y - 0.6
    for line in lines:
        fig.text(margin / width_in, y / height_in, line, ha="left", va="top", fontsize=9, parse_math=False)
        y -= line_h
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", facecolor="white")
    return path


# --------------------------------------------------------------------------------------------------------
# HTML viewer
# --------------------------------------------------------------------------------------------------------


def _mercator_overlay(raster: np.ndarray, grid: GridSpec, max_px: int) -> tuple[np.ndarray, list[float], list[float]]:
    """The raster reprojected to Web Mercator (nearest neighbour) with its Mercator and WGS84 bounds."""
    from rasterio.transform import from_bounds
    from rasterio.warp import Resampling, reproject, transform_bounds

    west, south, east, north = grid.bounds_wgs84()
    if west > east:  # crosses the antimeridian: show the whole longitude range rather than a wrong box
        log.warning("the map crosses the antimeridian; the HTML view spans all longitudes")
        west, east = -180.0, 180.0
    south = max(south, -MERCATOR_MAX_LAT)
    north = min(north, MERCATOR_MAX_LAT)
    if south >= north:
        raise ValueError("the map lies entirely beyond Web Mercator's latitude limit (±85.05°)")
    mx0, my0, mx1, my1 = transform_bounds("EPSG:4326", "EPSG:3857", west, south, east, north)
    aspect = (mx1 - mx0) / max(1e-9, my1 - my0)
    long_side = int(min(max_px, max(grid.width, grid.height, 64)))
    if aspect >= 1:
        w, h = long_side, max(1, round(long_side / aspect))
    else:
        w, h = max(1, round(long_side * aspect)), long_side
    dst = np.full((h, w), np.nan, dtype=np.float32)
    reproject(
        source=np.asarray(raster, dtype=np.float32),
        destination=dst,
        src_transform=grid.affine(),
        src_crs=grid.rasterio_crs(),
        src_nodata=np.nan,
        dst_transform=from_bounds(mx0, my0, mx1, my1, w, h),
        dst_crs="EPSG:3857",
        dst_nodata=np.nan,
        # Nearest keeps exact values (and the hover readout) where pixels are shown one to one or enlarged;
        # averaging avoids aliasing when a big grid is shrunk to the overlay size (nodata is ignored by it).
        resampling=Resampling.average if max(grid.width, grid.height) > 2 * long_side else Resampling.nearest,
    )
    return dst, [mx0, my0, mx1, my1], [west, south, east, north]


def _quantize(values: np.ndarray) -> tuple[str, float, float]:
    """Base64 little-endian uint16 of ``values`` on their own finite range (65535 = nodata), for the readout."""
    finite = np.isfinite(values)
    lo = float(values[finite].min()) if finite.any() else 0.0
    hi = float(values[finite].max()) if finite.any() else 1.0
    span = hi - lo if hi > lo else 1.0
    q = np.where(finite, np.round((np.where(finite, values, lo) - lo) / span * 65534.0), 65535).astype("<u2")
    return base64.b64encode(q.tobytes()).decode("ascii"), lo, hi


def _gradient_css(cmap: str, stops: int = 11) -> str:
    lut = colormap_lut(cmap)
    parts = [
        f"rgb({lut[i][0]},{lut[i][1]},{lut[i][2]}) {100 * k / (stops - 1):.0f}%"
        for k, i in enumerate(np.linspace(0, 255, stops).round().astype(int))
    ]
    return "linear-gradient(to right, " + ", ".join(parts) + ")"


_HTML_STYLE = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d2327;display:flex;height:100vh}
#map{flex:1;position:relative;overflow:hidden;background:#e8eef2;cursor:grab;touch-action:none}
#map.drag{cursor:grabbing}
#cv{position:absolute;left:0;top:0}
#ctl{position:absolute;top:10px;left:10px;display:flex;flex-direction:column;gap:4px}
#ctl button{width:30px;height:30px;font-size:17px;border:1px solid #999;border-radius:4px;background:#fff;
 cursor:pointer}
#readout{position:absolute;bottom:8px;left:8px;background:rgba(255,255,255,.88);padding:3px 8px;border-radius:4px;
 font:12px ui-monospace,Menlo,Consolas,monospace;min-width:260px}
#side{width:340px;padding:14px 18px;overflow:auto;border-left:1px solid #c8d0d6;background:#fafbfc}
h1{font-size:17px;margin:0 0 10px}
table.lg{border-collapse:collapse;width:100%;font-size:13px;margin:8px 0}
table.lg td{padding:2px 4px;vertical-align:top;border-bottom:1px solid #eceff1}
table.lg td:first-child{color:#5f6b73;white-space:nowrap}
.bar{height:14px;border:1px solid #777;border-radius:2px;margin-top:6px}
.ticks{display:flex;justify-content:space-between;font-size:12px}
.nod{display:inline-block;width:14px;height:14px;border:1px solid #777;vertical-align:middle;margin-right:6px}
.small{font-size:12px;color:#5f6b73}
"""

_HTML_SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("psm-data").textContent);
const HALF = Math.PI * 6378137, R = 6378137;
const box = document.getElementById("map"), cv = document.getElementById("cv"), ctx = cv.getContext("2d");
const out = document.getElementById("readout");
const img = new Image();
let W = 1, H = 1, opacity = D.opacity, view = {cx: 0, cy: 0, res: 1};
const tiles = new Map();
const raw = atob(D.values), vals = new Uint16Array(raw.length / 2);
for (let i = 0; i < vals.length; i++) vals[i] = raw.charCodeAt(2 * i) | (raw.charCodeAt(2 * i + 1) << 8);
function merc2ll(x, y) {
  return [x / R * 180 / Math.PI, (2 * Math.atan(Math.exp(y / R)) - Math.PI / 2) * 180 / Math.PI];
}
function ll2merc(lon, lat) {
  const l = Math.max(-85.0511, Math.min(85.0511, lat)) * Math.PI / 180;
  return [lon * Math.PI / 180 * R, R * Math.log(Math.tan(Math.PI / 4 + l / 2))];
}
function toScreen(x, y) { return [(x - view.cx) / view.res + W / 2, (view.cy - y) / view.res + H / 2]; }
function toMerc(px, py) { return [view.cx + (px - W / 2) * view.res, view.cy - (py - H / 2) * view.res]; }
function fit() {
  const b = D.bounds;
  view.cx = (b[0] + b[2]) / 2; view.cy = (b[1] + b[3]) / 2;
  view.res = Math.max((b[2] - b[0]) / W, (b[3] - b[1]) / H) * 1.08;
  draw();
}
function resize() {
  const dpr = window.devicePixelRatio || 1;
  W = box.clientWidth; H = box.clientHeight;
  cv.width = Math.round(W * dpr); cv.height = Math.round(H * dpr);
  cv.style.width = W + "px"; cv.style.height = H + "px";
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  draw();
}
function tileUrl(z, x, y) {
  return D.basemap.replace("{z}", z).replace("{x}", x).replace("{y}", y).replace("{s}", "abc"[(x + y) % 3]);
}
function drawTiles() {
  if (!D.basemap) return;
  const z = Math.max(0, Math.min(D.maxzoom, Math.round(Math.log2(2 * HALF / 256 / view.res))));
  const n = 2 ** z, size = 2 * HALF / n;
  const [x0, y1] = toMerc(0, 0), [x1, y0] = toMerc(W, H);
  const i0 = Math.floor((x0 + HALF) / size), i1 = Math.floor((x1 + HALF) / size);
  const j0 = Math.max(0, Math.floor((HALF - y1) / size)), j1 = Math.min(n - 1, Math.floor((HALF - y0) / size));
  for (let i = i0; i <= i1; i++) for (let j = j0; j <= j1; j++) {
    const x = ((i % n) + n) % n, key = z + "/" + x + "/" + j;
    let t = tiles.get(key);
    if (!t) {
      // No crossOrigin: a CORS request fails on the many tile servers that send no CORS headers, and the
      // canvas is never read back, so a tainted canvas costs nothing.
      t = new Image(); t.onload = draw; t.src = tileUrl(z, x, j); tiles.set(key, t);
    }
    if (t.complete && t.naturalWidth) {
      const [sx, sy] = toScreen(i * size - HALF, HALF - j * size);
      ctx.drawImage(t, sx, sy, size / view.res + 0.5, size / view.res + 0.5);
    }
  }
}
function niceStep(span) {
  const steps = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 45,
    90];
  for (const s of steps) if (span / s <= 8) return s;
  return 90;
}
function label(v, step) { const d = Math.max(0, -Math.floor(Math.log10(step) + 1e-9)); return v.toFixed(d) + "°"; }
function drawGraticule() {
  const [lonA, latB] = merc2ll(...toMerc(0, H)), [lonB, latA] = merc2ll(...toMerc(W, 0));
  const step = niceStep(Math.max(lonB - lonA, latA - latB));
  ctx.strokeStyle = "rgba(40,50,60,0.45)"; ctx.lineWidth = 1; ctx.fillStyle = "#22303a";
  ctx.font = "11px system-ui, sans-serif";
  for (let lon = Math.ceil(lonA / step) * step; lon <= lonB; lon += step) {
    const [sx] = toScreen(ll2merc(lon, 0)[0], 0);
    ctx.beginPath(); ctx.moveTo(sx, 0); ctx.lineTo(sx, H); ctx.stroke();
    ctx.fillText(label(lon, step), sx + 3, H - 26);
  }
  for (let lat = Math.ceil(latB / step) * step; lat <= latA; lat += step) {
    const [, sy] = toScreen(0, ll2merc(0, lat)[1]);
    ctx.beginPath(); ctx.moveTo(0, sy); ctx.lineTo(W, sy); ctx.stroke();
    ctx.fillText(label(lat, step), 44, sy - 3);
  }
}
function draw() {
  ctx.clearRect(0, 0, W, H);
  drawTiles();
  const b = D.bounds, [sx0, sy0] = toScreen(b[0], b[3]), [sx1, sy1] = toScreen(b[2], b[1]);
  if (img.complete && img.naturalWidth) {
    ctx.imageSmoothingEnabled = false; ctx.globalAlpha = opacity;
    ctx.drawImage(img, sx0, sy0, sx1 - sx0, sy1 - sy0); ctx.globalAlpha = 1;
  }
  ctx.strokeStyle = "#333"; ctx.setLineDash([4, 3]);
  ctx.strokeRect(sx0, sy0, sx1 - sx0, sy1 - sy0); ctx.setLineDash([]);
  drawGraticule();
}
function readout(px, py) {
  const [mx, my] = toMerc(px, py), [lon, lat] = merc2ll(mx, my), b = D.bounds;
  let v = "outside the map";
  const c = Math.floor((mx - b[0]) / (b[2] - b[0]) * D.vw), r = Math.floor((b[3] - my) / (b[3] - b[1]) * D.vh);
  if (c >= 0 && c < D.vw && r >= 0 && r < D.vh) {
    const q = vals[r * D.vw + c];
    v = q === 65535 ? "no data" : (D.vlo + q / 65534 * (D.vhi - D.vlo)).toPrecision(5);
  }
  out.textContent = "lat " + lat.toFixed(5) + "  lon " + lon.toFixed(5) + "  value " + v;
}
let drag = null;
box.addEventListener("pointerdown", e => {
  // Not on the zoom buttons: capturing the pointer there would retarget their click to the map.
  if (e.target.closest("#ctl")) return;
  drag = [e.clientX, e.clientY]; box.classList.add("drag"); box.setPointerCapture(e.pointerId);
});
box.addEventListener("pointerup", e => { drag = null; box.classList.remove("drag"); });
box.addEventListener("pointermove", e => {
  const rect = box.getBoundingClientRect();
  if (drag) {
    view.cx -= (e.clientX - drag[0]) * view.res; view.cy += (e.clientY - drag[1]) * view.res;
    drag = [e.clientX, e.clientY]; draw();
  }
  readout(e.clientX - rect.left, e.clientY - rect.top);
});
function zoomAt(px, py, f) {
  const [mx, my] = toMerc(px, py);
  view.res = Math.min(2 * HALF / 256, Math.max(0.05, view.res * f));
  view.cx = mx - (px - W / 2) * view.res; view.cy = my + (py - H / 2) * view.res; draw();
}
box.addEventListener("wheel", e => {
  e.preventDefault(); const rect = box.getBoundingClientRect();
  zoomAt(e.clientX - rect.left, e.clientY - rect.top, Math.exp(e.deltaY * 0.0015));
}, {passive: false});
box.addEventListener("dblclick", e => {
  const rect = box.getBoundingClientRect(); zoomAt(e.clientX - rect.left, e.clientY - rect.top, 0.5);
});
document.getElementById("zin").onclick = () => zoomAt(W / 2, H / 2, 0.5);
document.getElementById("zout").onclick = () => zoomAt(W / 2, H / 2, 2);
document.getElementById("zfit").onclick = fit;
document.getElementById("opacity").oninput = e => { opacity = e.target.value / 100; draw(); };
window.addEventListener("keydown", e => {
  if (e.key === "+") zoomAt(W / 2, H / 2, 0.5);
  if (e.key === "-") zoomAt(W / 2, H / 2, 2);
});
window.addEventListener("resize", resize);
img.onload = draw;
img.src = "data:image/png;base64," + D.overlay;
resize(); fit();
"""


def _legend_rows(legend: MapLegend) -> str:
    rows = []
    if legend.query:
        rows.append(("query", legend.query))
    rows.extend(legend.metadata.items())
    return "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in rows)


def write_html(
    raster: np.ndarray,
    path: str | Path,
    *,
    grid: GridSpec,
    legend: MapLegend,
    vmin: float,
    vmax: float,
    cmap: str = "viridis",
    basemap: str | None = None,
    basemap_maxzoom: int = 19,
    max_overlay_px: int = 1024,
    opacity: float = 0.85,
) -> Path:
    """A self-contained HTML map viewer: pan/zoom, lat/lon graticule, hover readout, legend and colour bar.

    Works offline (no external scripts, styles or fonts; the map is a base64 PNG). ``basemap`` is an XYZ
    URL template such as ``.../{z}/{x}/{y}.png`` drawn under the map when online; it is the only URL in
    the page.
    """
    path = Path(path)
    if basemap is not None and not all(k in basemap for k in ("{z}", "{x}", "{y}")):
        raise ValueError(f"basemap must be an XYZ URL template with {{z}}, {{x}} and {{y}}, got {basemap!r}")
    merc, mbounds, wgs = _mercator_overlay(raster, grid, max_overlay_px)
    overlay = base64.b64encode(_png_bytes(colorize(merc, vmin, vmax, cmap))).decode("ascii")
    qvals, vlo, vhi = _quantize(merc)
    data = {
        "bounds": mbounds,
        "overlay": overlay,
        "values": qvals,
        "vw": int(merc.shape[1]),
        "vh": int(merc.shape[0]),
        "vlo": vlo,
        "vhi": vhi,
        "basemap": basemap,
        "maxzoom": int(basemap_maxzoom),
        "opacity": float(opacity),
    }
    # Inside <script>, "<!--" and "<script" change how the browser finds the element's end, not only "</":
    # every <, > and & becomes a JSON escape (the same strings once parsed).
    payload = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    w, s, e, n = wgs
    notes = "".join(f"<p class='small'>{html.escape(t)}</p>" for t in legend.notes)
    base_note = (
        f"<p class='small'>basemap tiles: {html.escape(basemap)}</p>"
        if basemap
        else "<p class='small'>offline view: graticule only (pass a basemap URL template for map tiles)</p>"
    )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(legend.title)}</title>
<style>{_HTML_STYLE}</style>
</head>
<body>
<div id="map"><canvas id="cv"></canvas>
<div id="ctl"><button id="zin" title="zoom in">+</button><button id="zout" title="zoom out">&minus;</button>
<button id="zfit" title="fit the map">&#9633;</button></div>
<div id="readout">move the pointer over the map</div></div>
<div id="side">
<h1>{html.escape(legend.title)}</h1>
<table class="lg">{_legend_rows(legend)}</table>
<div><b>{html.escape(legend.value_label)}</b></div>
<div class="bar" style="background:{_gradient_css(cmap)}"></div>
<div class="ticks"><span>{vmin:.4g}</span><span>{(vmin + vmax) / 2:.4g}</span><span>{vmax:.4g}</span></div>
<p><span class="nod" style="background:transparent"></span>no imagery / outside the region (transparent)</p>
<p>opacity <input id="opacity" type="range" min="0" max="100" value="{round(100 * opacity)}"></p>
<p class="small">bounds (WGS84): {s:.5f}&deg; to {n:.5f}&deg; latitude, {w:.5f}&deg; to {e:.5f}&deg; longitude<br>
grid: {grid.width}&times;{grid.height} pixels; shown in Web Mercator</p>
{notes}{base_note}
<p class="small">drag to pan, wheel or double-click to zoom; the readout shows the value under the pointer.</p>
</div>
<script type="application/json" id="psm-data">{payload}</script>
<script>{_HTML_SCRIPT}</script>
</body>
</html>
"""
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------------
# one map = COG + PNG + HTML
# --------------------------------------------------------------------------------------------------------


def render_map(
    raster: np.ndarray,
    grid: GridSpec,
    prefix: str | Path,
    *,
    legend: MapLegend,
    vmin: float,
    vmax: float,
    cmap: str = "viridis",
    basemap: str | None = None,
    tags: Mapping[str, Any] | None = None,
    width_px: int = 1000,
    formats: Sequence[str] = ("tif", "png", "html"),
) -> MapOutputs:
    """Write PREFIX.tif (COG), PREFIX.png and PREFIX.html for one map raster and return their paths."""
    prefix = Path(prefix)
    unknown = set(formats) - {"tif", "png", "html"}
    if unknown:
        raise ValueError(f"unknown output formats {sorted(unknown)}")
    out = MapOutputs(title=legend.title, legend=legend)
    if "tif" in formats:
        out.tif = write_cog(raster, grid, prefix.with_name(prefix.name + ".tif"), tags=tags)
    if "png" in formats:
        out.png = write_png(
            raster,
            prefix.with_name(prefix.name + ".png"),
            grid=grid,
            legend=legend,
            vmin=vmin,
            vmax=vmax,
            cmap=cmap,
            width_px=width_px,
        )
    if "html" in formats:
        out.html = write_html(
            raster,
            prefix.with_name(prefix.name + ".html"),
            grid=grid,
            legend=legend,
            vmin=vmin,
            vmax=vmax,
            cmap=cmap,
            basemap=basemap,
        )
    return out


# --------------------------------------------------------------------------------------------------------
# animations
# --------------------------------------------------------------------------------------------------------


def write_gif(frames: Sequence[str | Path], path: str | Path, *, duration_ms: int = 900) -> Path:
    """An endlessly looping animated GIF of PNG frames (one GIF frame per input; all frames the same size)."""
    from PIL import Image

    if not frames:
        raise ValueError("no frames for the GIF")
    images = []
    for f in frames:
        with Image.open(f) as im:
            images.append(im.convert("RGB").quantize(colors=255, method=Image.Quantize.MEDIANCUT))
    if len({im.size for im in images}) != 1:
        raise ValueError("GIF frames must all have the same size")
    with atomic_path(path) as tmp:
        images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0, disposal=1
        )
    return Path(path)


def find_ffmpeg() -> str | None:
    """An ffmpeg executable (PATH, or imageio-ffmpeg's bundled one when installed), else None."""
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    try:
        import imageio_ffmpeg  # type: ignore[import-not-found]

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:
        return None


def write_mp4(frames: Sequence[str | Path], path: str | Path, *, fps: float = 1.0) -> Path | None:
    """An H.264 MP4 of PNG frames through ffmpeg; None (and a log line) when no ffmpeg is available."""
    exe = find_ffmpeg()
    if exe is None:
        log.info("no ffmpeg found: MP4 skipped (the GIF has the same frames)")
        return None
    path = Path(path)
    with tempfile.TemporaryDirectory(dir=path.parent if path.parent.exists() else None) as d:
        for i, f in enumerate(frames):
            shutil.copyfile(f, Path(d) / f"f{i:05d}.png")
        with atomic_path(path) as tmp:
            cmd = [
                exe, "-y", "-loglevel", "error", "-framerate", str(fps), "-i", str(Path(d) / "f%05d.png"),
                "-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-f", "mp4", str(tmp),
            ]  # fmt: skip
            subprocess.run(cmd, check=True, capture_output=True)
    return path


# --------------------------------------------------------------------------------------------------------
# report page
# --------------------------------------------------------------------------------------------------------


def _markdown_to_html(md: str) -> str:
    """Pipe tables become HTML tables; other non-empty lines become paragraphs (enough for metric tables)."""
    out: list[str] = []
    lines = md.strip().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                block.append(lines[i].strip())
                i += 1
            cells = [[c.strip() for c in row.strip("|").split("|")] for row in block]
            is_sep = [all(set(c) <= set(":- ") and c for c in row) for row in cells]
            head = cells[0] if len(cells) > 1 and is_sep[1] else None
            body = [r for r, s in zip(cells, is_sep, strict=True) if not s and r is not head]
            t = ["<table class='res'>"]
            if head:
                t.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
            t += ["<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in body]
            out.append("".join(t) + "</table>")
            continue
        if line.startswith("#"):
            level = min(4, len(line) - len(line.lstrip("#")) + 1)
            out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
        elif line:
            out.append(f"<p>{html.escape(line)}</p>")
        i += 1
    return "\n".join(out)


def _thumbnail_b64(png: Path, width: int = 480) -> str | None:
    from PIL import Image

    try:
        with Image.open(png) as im:
            im = im.convert("RGB")
            if im.width > width:
                im = im.resize((width, max(1, round(im.height * width / im.width))), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
    except OSError:
        return None
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _map_entry(m: MapOutputs | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(m, MapOutputs):
        return {"title": m.title, "png": m.png, "html": m.html, "tif": m.tif, "description": ""}
    d = dict(m)
    return {k: d.get(k) for k in ("title", "png", "html", "tif", "description")} | {"title": d.get("title") or "map"}


def write_report(
    maps: Sequence[MapOutputs | Mapping[str, Any]],
    table_markdown: str | None,
    out: str | Path,
    *,
    title: str = "psm soundscape maps",
    intro: str | None = None,
) -> Path:
    """An HTML report page: a thumbnail per map linking its HTML viewer, PNG and COG, plus a retrieval table.

    ``maps`` holds :class:`MapOutputs` or mappings with ``title``, ``png``, ``html``, ``tif`` (and an optional
    ``description``); links are relative to the report, thumbnails are embedded so the page reads alone.
    ``table_markdown`` is a Markdown (pipe) table, e.g. the evaluation report's.
    """
    out = Path(out)
    base = out.parent.resolve()

    def rel(p: Any) -> str | None:
        if not p:
            return None
        return html.escape(os.path.relpath(Path(p).resolve(), base).replace(os.sep, "/"))

    cards = []
    for m in map(_map_entry, maps):
        thumb = _thumbnail_b64(Path(m["png"])) if m["png"] else None
        img = f"<img alt='{html.escape(m['title'])}' src='data:image/png;base64,{thumb}'>" if thumb else ""
        target = rel(m["html"]) or rel(m["png"])
        if target and img:
            img = f"<a href='{target}'>{img}</a>"
        links = " · ".join(
            f"<a href='{rel(m[k])}'>{label}</a>"
            for k, label in (("html", "interactive map"), ("png", "PNG"), ("tif", "GeoTIFF (COG)"))
            if m[k]
        )
        desc = f"<p>{html.escape(m['description'])}</p>" if m.get("description") else ""
        cards.append(
            f"<div class='card'><h3>{html.escape(m['title'])}</h3>{img}{desc}<p class='links'>{links}</p></div>"
        )
    table = (
        f"<h2>Retrieval</h2>\n{_markdown_to_html(table_markdown)}" if table_markdown and table_markdown.strip() else ""
    )
    intro_html = f"<p>{html.escape(intro)}</p>" if intro else ""
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>
body{{margin:0 auto;max-width:1200px;padding:16px 24px;font:15px/1.5 system-ui,sans-serif;color:#1d2327}}
.grid{{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:16px}}
.card{{border:1px solid #d5dbe0;border-radius:6px;padding:10px 12px;background:#fafbfc}}
.card img{{width:100%;height:auto;border:1px solid #e3e7ea}}
.card h3{{font-size:15px;margin:0 0 8px}}
.links{{font-size:13px}}
table.res{{border-collapse:collapse;margin:8px 0}}
table.res td,table.res th{{border:1px solid #ccd3d8;padding:3px 8px;text-align:left}}
table.res th{{background:#eef2f5}}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{intro_html}
<div class="grid">
{"".join(cards)}
</div>
{table}
</body>
</html>
"""
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out

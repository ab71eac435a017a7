"""Regions and map grids: which points a map covers, generated lazily in chunks, as pixels of one raster.

A *region* is a lon/lat bounding box or a GeoJSON (multi)polygon. A *grid* is a regular raster — a CRS,
an affine transform, a width and a height — whose pixel centres are the map's points; an output map is
that raster with one value per point, so no resampling sits between the index and the GeoTIFF.

Grid choice (:func:`grid_for_region`): unless a CRS is given, the grid lives in a **Lambert azimuthal
equal-area** projection centred on the region (``+proj=laea`` at the centre of its lon/lat bounds):

* equal-area everywhere, so every point stands for exactly ``spacing²`` of ground (area statistics hold);
* true to scale at the centre and within 1 % up to ~1,600 km from it (2 % at ~2,500 km), so neighbour
  distances are the requested spacing at any latitude (a global cylindrical grid such as EPSG:6933 is
  equal-area too, but its cells are 0.58 × 1.73 spacing at 60° latitude, not squares);
* centred on the region, so a region crossing the antimeridian is one contiguous raster.

Points are the pixel centres inside the region (a polygon — a bbox is the polygon of its edges, which
are straight in lon/lat — rasterised onto the grid with ``rasterio.features.rasterize``, pixel-centre
rule). The grid can also be the pixels of an existing raster (:func:`grid_like_raster`), optionally
masked by a region. Point ``i`` is the ``i``-th inside pixel in row-major order; the mask is kept as
packed bits (1 bit per pixel), so even 200 M-pixel grids cost 25 MB and any chunk of points is generated
directly from its id range (:meth:`Grid.points`) without walking the ones before it.

Antimeridian: a bbox with ``west > east`` crosses it (e.g. ``170, -10, -170, 10``) and is handled; a
GeoJSON polygon split at ±180° (RFC 7946) is re-joined by unwrapping longitudes around the region's
smallest enclosing arc. Regions wider than 180° of longitude, latitudes outside [-90, 90], longitudes
outside [-180, 180], empty regions and grids above ``max_points`` (200 M unless ``force``) are refused
with a :class:`RegionError` saying what to change.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from affine import Affine

# Mean Earth radius (IUGG); only used for haversine distances in checks and tests.
EARTH_RADIUS_M = 6_371_008.8
# Grids above this many pixels are refused unless forced: 200 M points is ~40 h of ViT-B on one H100.
MAX_POINTS = 200_000_000
# Longest polygon edge (degrees) projected as a straight segment; edges are straight in lon/lat (GeoJSON).
DENSIFY_DEG = 0.1
# Rows rasterised at once when building the mask: bounds the temporary uint8 block to ~16 MB.
MASK_BLOCK_PIXELS = 16_000_000
# Longest region (degrees of longitude) the automatic equal-area grid accepts.
MAX_LON_SPAN_DEG = 180.0
_WGS84 = "EPSG:4326"


class RegionError(ValueError):
    """A region or grid that cannot be mapped (out of range, empty, too large, unreadable)."""


def haversine_m(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Great-circle distance in metres between points given in degrees (vectorised)."""
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp = p2 - p1
    dl = np.radians(np.asarray(lon2) - np.asarray(lon1))
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


# --------------------------------------------------------------------------------------------------------
# Regions
# --------------------------------------------------------------------------------------------------------


def _check_lat(lat: np.ndarray | float, what: str) -> None:
    arr = np.asarray(lat, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < -90.0) or np.any(arr > 90.0):
        bad = arr[~((arr >= -90.0) & (arr <= 90.0))]
        raise RegionError(f"{what}: latitude {bad.flat[0] if bad.size else arr} is outside [-90, 90]")


def _check_lon(lon: np.ndarray | float, what: str) -> None:
    arr = np.asarray(lon, dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr < -180.0) or np.any(arr > 180.0):
        bad = arr[~((arr >= -180.0) & (arr <= 180.0))]
        raise RegionError(
            f"{what}: longitude {bad.flat[0] if bad.size else arr} is outside [-180, 180] "
            f"(for a region crossing the antimeridian give west > east, e.g. west=170, east=-170)"
        )


def _enclosing_arc(lons: np.ndarray) -> tuple[float, float]:
    """Smallest longitude arc ``(start, end)`` containing every value; ``end`` may exceed 180 (crossing)."""
    u = np.unique(np.mod(np.asarray(lons, dtype=np.float64) + 180.0, 360.0) - 180.0)
    if u.size == 1:
        return float(u[0]), float(u[0])
    gaps = np.diff(u)
    wrap_gap = u[0] + 360.0 - u[-1]
    i = int(np.argmax(gaps))
    if wrap_gap >= gaps[i]:
        return float(u[0]), float(u[-1])
    # The largest empty gap is inside [-180, 180]: the region goes the other way round, across ±180.
    return float(u[i + 1]), float(u[i] + 360.0)


@dataclass(frozen=True)
class Region:
    """A bbox or polygon region in lon/lat. Rings are (n, 2) lon/lat arrays, longitudes unwrapped.

    ``west``/``east`` follow the bbox convention: ``west > east`` means the region crosses ±180°.
    """

    kind: str  # "bbox" or "polygon"
    polygons: tuple[tuple[np.ndarray, ...], ...]  # polygons → rings (exterior first) → (n, 2) lon, lat
    west: float
    south: float
    east: float
    north: float
    name: str | None = None

    # --- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_bbox(cls, west: float, south: float, east: float, north: float) -> Region:
        """A lon/lat box; ``west > east`` crosses the antimeridian (e.g. ``170, -10, -170, 10``)."""
        west, south, east, north = (float(v) for v in (west, south, east, north))
        _check_lat([south, north], "bbox")
        _check_lon([west, east], "bbox")
        if not north > south:
            raise RegionError(f"bbox is empty: south ({south}) must be below north ({north})")
        if west == east:
            raise RegionError(f"bbox is empty: west and east are both {west}")
        east_u = east + 360.0 if west > east else east  # unwrapped, so the ring is contiguous
        if east_u - west > MAX_LON_SPAN_DEG:
            raise RegionError(
                f"bbox spans {east_u - west:g}° of longitude; at most {MAX_LON_SPAN_DEG:g}° per region "
                f"(split it, or check the order: W S E N, west > east means crossing the antimeridian)"
            )
        ring = np.array([[west, south], [east_u, south], [east_u, north], [west, north], [west, south]])
        return cls("bbox", ((ring,),), west, south, east, north)

    @classmethod
    def from_geojson(cls, source: str | os.PathLike[str] | Mapping[str, Any]) -> Region:
        """A Polygon/MultiPolygon from a GeoJSON file or mapping (Feature/FeatureCollection accepted)."""
        name = None
        if isinstance(source, Mapping):
            obj: Any = source
        else:
            path = Path(source)
            name = path.name
            try:
                obj = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError as e:
                raise RegionError(f"GeoJSON file not found: {path}") from e
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RegionError(f"{path}: not valid JSON: {e}") from e
        polys_raw = _geojson_polygons(obj, name or "GeoJSON")
        if not polys_raw:
            raise RegionError(f"{name or 'GeoJSON'}: no Polygon or MultiPolygon geometry found")
        polygons = []
        for poly in polys_raw:
            rings = []
            for ring in poly:
                arr = np.asarray(ring, dtype=np.float64)
                if arr.ndim != 2 or arr.shape[0] < 3 or arr.shape[1] < 2:
                    raise RegionError(f"{name or 'GeoJSON'}: a polygon ring needs at least 3 [lon, lat] positions")
                arr = arr[:, :2]
                _check_lon(arr[:, 0], name or "GeoJSON")
                _check_lat(arr[:, 1], name or "GeoJSON")
                rings.append(arr)
            polygons.append(rings)
        all_lon = np.concatenate([r[:, 0] for p in polygons for r in p])
        all_lat = np.concatenate([r[:, 1] for p in polygons for r in p])
        start, end = _enclosing_arc(all_lon)
        if end - start > MAX_LON_SPAN_DEG:
            raise RegionError(
                f"{name or 'GeoJSON'}: the region spans {end - start:g}° of longitude; at most "
                f"{MAX_LON_SPAN_DEG:g}° per region (split it)"
            )
        # Unwrap: longitudes west of the arc start belong east of +180 (a polygon split at the antimeridian).
        unwrapped = tuple(
            tuple(np.column_stack([np.where(r[:, 0] < start - 1e-9, r[:, 0] + 360.0, r[:, 0]), r[:, 1]]) for r in p)
            for p in polygons
        )
        south, north = float(all_lat.min()), float(all_lat.max())
        if not north > south or not end > start:
            raise RegionError(f"{name or 'GeoJSON'}: the polygon has no area")
        west = start
        east = end - 360.0 if end > 180.0 else end
        return cls("polygon", unwrapped, west, south, east, north, name)

    # --- properties -------------------------------------------------------------------------------------
    @property
    def crosses_antimeridian(self) -> bool:
        """True when the region spans ±180° of longitude."""
        return self.west > self.east

    @property
    def centre(self) -> tuple[float, float]:
        """(lat, lon) of the centre of the lon/lat bounds (lon normalised to [-180, 180))."""
        east_u = self.east + 360.0 if self.crosses_antimeridian else self.east
        lon = 0.5 * (self.west + east_u)
        return 0.5 * (self.south + self.north), ((lon + 180.0) % 360.0) - 180.0

    def densified(self, max_deg: float = DENSIFY_DEG) -> list[list[np.ndarray]]:
        """Rings with extra vertices so no edge is longer than ``max_deg`` (edges are straight in lon/lat)."""
        return [[_densify_ring(r, max_deg) for r in p] for p in self.polygons]

    def fingerprint(self) -> str:
        """Short sha256 of the geometry: tells two regions apart in index.json without storing them."""
        h = hashlib.sha256()
        for p in self.polygons:
            for r in p:
                h.update(np.ascontiguousarray(np.round(r, 9)).tobytes())
                h.update(b"|")
            h.update(b"#")
        return h.hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe description (bbox or polygon bounds + fingerprint; never an absolute path)."""
        bounds = [self.west, self.south, self.east, self.north]
        if self.kind == "bbox":
            return {"type": "bbox", "bbox": bounds}
        return {
            "type": "polygon",
            "bounds": bounds,
            "polygons": len(self.polygons),
            "vertices": int(sum(len(r) for p in self.polygons for r in p)),
            "sha256": self.fingerprint(),
            "name": self.name,
        }


def _geojson_polygons(obj: Any, where: str) -> list[list[Any]]:
    """All polygons (lists of rings) of a GeoJSON object, recursing into features and collections."""
    if not isinstance(obj, Mapping):
        raise RegionError(f"{where}: expected a GeoJSON object")
    kind = obj.get("type")
    if kind == "FeatureCollection":
        return [p for f in obj.get("features") or [] for p in _geojson_polygons(f, where)]
    if kind == "Feature":
        geom = obj.get("geometry")
        return [] if geom is None else _geojson_polygons(geom, where)
    if kind == "GeometryCollection":
        return [p for g in obj.get("geometries") or [] for p in _geojson_polygons(g, where)]
    if kind == "Polygon":
        return [obj.get("coordinates") or []]
    if kind == "MultiPolygon":
        return list(obj.get("coordinates") or [])
    if kind in ("Point", "MultiPoint", "LineString", "MultiLineString"):
        return []  # not an area; ignored (an all-points file ends in "no polygon found")
    raise RegionError(f"{where}: unsupported GeoJSON type {kind!r}")


def _densify_ring(ring: np.ndarray, max_deg: float) -> np.ndarray:
    """Insert vertices along each edge (vectorised) so none is longer than ``max_deg``."""
    a, b = ring[:-1], ring[1:]
    seg = np.hypot(b[:, 0] - a[:, 0], b[:, 1] - a[:, 1])
    n = np.maximum(1, np.ceil(seg / max_deg).astype(np.int64))
    idx = np.repeat(np.arange(len(a)), n)
    # fraction of the way along each edge for each inserted vertex: 0, 1/n, ..., (n-1)/n
    t = (np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)) / np.repeat(n, n)
    pts = a[idx] + (b[idx] - a[idx]) * t[:, None]
    return np.vstack([pts, ring[-1:]])


def equal_area_crs(region: Region) -> str:
    """WKT of the Lambert azimuthal equal-area projection centred on the region (see module docstring)."""
    from rasterio.crs import CRS

    lat, lon = region.centre
    proj4 = f"+proj=laea +lat_0={lat:.6f} +lon_0={lon:.6f} +x_0=0 +y_0=0 +datum=WGS84 +units=m +no_defs"
    return CRS.from_proj4(proj4).to_wkt()


def _crs_string(crs: Any) -> str:
    """``EPSG:n`` when the CRS has an EPSG code, else its WKT (what index.json stores)."""
    from rasterio.crs import CRS

    c = crs if isinstance(crs, CRS) else CRS.from_user_input(crs)
    code = c.to_epsg()
    return f"EPSG:{code}" if code is not None else c.to_wkt()


def _project_rings(region: Region, crs: str) -> list[list[np.ndarray]]:
    """The region's densified rings in ``crs`` coordinates.

    A ring that crosses the CRS's own antimeridian (``lon_0 ± 180°``, e.g. a region across ±180° in
    EPSG:3857 or EPSG:6933) would come out wrapped to the far side of the world, and the rasterised
    polygon would be everything *but* the region: such a region is refused. In a geographic CRS the
    longitudes are unwrapped instead (the caller masks copies of them shifted by ±360°).
    """
    from rasterio.crs import CRS
    from rasterio.warp import transform

    geographic = CRS.from_user_input(crs).is_geographic
    out = []
    for poly in region.densified():
        rings = []
        for r in poly:
            n = len(r)
            # Each edge's midpoint too: projected, it lies halfway along a real edge, not across a wrap.
            mid = 0.5 * (r[:-1] + r[1:])
            xs, ys = transform("EPSG:4326", crs, np.r_[r[:, 0], mid[:, 0]].tolist(), np.r_[r[:, 1], mid[:, 1]].tolist())
            pts = np.column_stack([np.asarray(xs), np.asarray(ys)])
            if not np.all(np.isfinite(pts)):
                raise RegionError(f"the region cannot be projected to the grid CRS ({crs[:60]}…)")
            xy, mxy = pts[:n], pts[n:]
            if geographic:
                xy[:, 0] = np.unwrap(xy[:, 0], period=360.0)
            else:
                seg = np.hypot(*(xy[1:] - xy[:-1]).T)
                off = np.hypot(*(mxy - 0.5 * (xy[1:] + xy[:-1])).T)
                if np.any(off > 0.25 * seg + 1e-9 * np.abs(xy).max()):
                    raise RegionError(
                        f"the region crosses the edge (antimeridian) of the grid CRS {crs[:60]!r}: leave --crs "
                        "out (an equal-area grid centred on the region) or use a CRS centred on it, e.g. its UTM zone"
                    )
            rings.append(xy)
        out.append(rings)
    return out


# --------------------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------------------


@dataclass
class PointChunk:
    """A run of consecutive grid points: ids, lat/lon of pixel centres and their raster row/col."""

    point_id: np.ndarray  # int64
    latitude: np.ndarray  # float64
    longitude: np.ndarray  # float64
    row: np.ndarray  # int32
    col: np.ndarray  # int32

    def __len__(self) -> int:
        return len(self.point_id)

    def __iter__(self) -> Iterator[np.ndarray]:
        # Unpacks as the tuple (point_ids, lat, lon, row, col).
        return iter((self.point_id, self.latitude, self.longitude, self.row, self.col))


class Grid:
    """A raster (CRS, transform, width, height) whose pixel centres inside an optional mask are the points.

    Nothing per point is stored: ``mask_bits`` packs the inside pixels 8 to a byte and ``row_start``
    counts points before each row, so :meth:`points` makes any id range directly.
    """

    def __init__(
        self,
        crs: str,
        transform: Affine,
        width: int,
        height: int,
        mask_bits: np.ndarray | None = None,
        region: dict[str, Any] | None = None,
    ) -> None:
        if width < 1 or height < 1:
            raise RegionError(f"grid must have at least one pixel, got {width}×{height}")
        from rasterio.crs import CRS

        self.crs = _crs_string(crs)
        self._crs_obj = CRS.from_user_input(self.crs)  # parsed once: points() projects every chunk
        self.transform = transform
        self.width = int(width)
        self.height = int(height)
        self.mask_bits = mask_bits
        self.region = region or {}
        if mask_bits is None:
            self.row_start = np.arange(self.height + 1, dtype=np.int64) * self.width
        else:
            if mask_bits.shape != (self.height, (self.width + 7) // 8):
                raise ValueError(f"mask_bits shape {mask_bits.shape} does not fit a {self.width}×{self.height} grid")
            counts = _popcount_rows(mask_bits)
            self.row_start = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self.num_points == 0:
            raise RegionError(
                "the region is empty: no grid point falls inside it (use a smaller spacing or a larger region)"
            )

    # --- size -----------------------------------------------------------------------------------------
    @property
    def num_points(self) -> int:
        """Number of points (inside pixels)."""
        return int(self.row_start[-1])

    def __len__(self) -> int:
        return self.num_points

    @property
    def shape(self) -> tuple[int, int]:
        """(height, width) of the output raster."""
        return self.height, self.width

    def num_chunks(self, chunk_size: int) -> int:
        """How many chunks of ``chunk_size`` points cover the grid (the last may be short)."""
        return -(-self.num_points // int(chunk_size))

    def to_dict(self) -> dict[str, Any]:
        """The ``grid`` entry of index.json: CRS (EPSG string or WKT), affine [a..f], width, height."""
        t = self.transform
        return {
            "crs": self.crs,
            "transform": [t.a, t.b, t.c, t.d, t.e, t.f],
            "width": self.width,
            "height": self.height,
        }

    # --- points ---------------------------------------------------------------------------------------
    def mask_rows(self, row0: int, row1: int) -> np.ndarray:
        """Inside-mask of rows ``row0:row1`` as bool (rows, width)."""
        if self.mask_bits is None:
            return np.ones((row1 - row0, self.width), dtype=bool)
        return np.unpackbits(self.mask_bits[row0:row1], axis=1, count=self.width).astype(bool)

    def rows_cols(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Raster (row, col) of points ``start:stop`` (int64)."""
        start, stop = max(0, int(start)), min(self.num_points, int(stop))
        if stop <= start:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        if self.mask_bits is None:
            ids = np.arange(start, stop, dtype=np.int64)
            return ids // self.width, ids % self.width
        r0 = int(np.searchsorted(self.row_start, start, side="right")) - 1
        r1 = int(np.searchsorted(self.row_start, stop - 1, side="right"))  # exclusive
        rr, cc = np.nonzero(self.mask_rows(r0, r1))
        skip = start - int(self.row_start[r0])
        sl = slice(skip, skip + (stop - start))
        return rr[sl].astype(np.int64) + r0, cc[sl].astype(np.int64)

    def xy(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Grid-CRS coordinates of the centres of pixels (rows, cols)."""
        t = self.transform
        c = cols + 0.5
        r = rows + 0.5
        return t.a * c + t.b * r + t.c, t.d * c + t.e * r + t.f

    def points(self, start: int, stop: int) -> PointChunk:
        """Points ``start:stop`` (ids, lat, lon, row, col), computed on demand."""
        from rasterio.warp import transform

        rows, cols = self.rows_cols(start, stop)
        ids = np.arange(max(0, start), max(0, start) + len(rows), dtype=np.int64)
        if len(rows) == 0:
            empty = np.empty(0, np.float64)
            return PointChunk(ids, empty, empty.copy(), rows.astype(np.int32), cols.astype(np.int32))
        x, y = self.xy(rows, cols)
        lon, lat = transform(self._crs_obj, _WGS84, x.tolist(), y.tolist())
        lon = np.asarray(lon, dtype=np.float64)
        lon = ((lon + 180.0) % 360.0) - 180.0
        return PointChunk(ids, np.asarray(lat, dtype=np.float64), lon, rows.astype(np.int32), cols.astype(np.int32))

    def chunk(self, k: int, chunk_size: int) -> PointChunk:
        """Chunk ``k``: point ids ``[k·C, (k+1)·C)``."""
        return self.points(k * chunk_size, (k + 1) * chunk_size)

    def iter_chunks(self, chunk_size: int) -> Iterator[PointChunk]:
        """Every chunk in order; each unpacks as ``(point_ids, lat, lon, row, col)`` numpy arrays."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        for k in range(self.num_chunks(chunk_size)):
            yield self.chunk(k, chunk_size)

    def __repr__(self) -> str:
        crs = self.crs if len(self.crs) < 40 else self.crs[:37] + "…"
        return f"Grid({self.width}×{self.height} px, {self.num_points} points, crs={crs})"


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.int64)


def _popcount_rows(bits: np.ndarray) -> np.ndarray:
    """Number of set bits per row of a packed mask (padding bits are zero by construction)."""
    return _POPCOUNT[bits].sum(axis=1)


def _rasterize_mask(rings: list[list[np.ndarray]], transform: Affine, width: int, height: int) -> np.ndarray:
    """Pack the polygon mask (pixel centre inside) into bits, rasterising ``MASK_BLOCK_PIXELS`` at a time."""
    from rasterio.features import rasterize

    geom = {"type": "MultiPolygon", "coordinates": [[r.tolist() for r in poly] for poly in rings]}
    bits = np.zeros((height, (width + 7) // 8), dtype=np.uint8)
    block = max(1, MASK_BLOCK_PIXELS // width)
    for r0 in range(0, height, block):
        r1 = min(height, r0 + block)
        out = rasterize(
            [(geom, 1)],
            out_shape=(r1 - r0, width),
            transform=transform @ Affine.translation(0, r0),
            fill=0,
            all_touched=False,
            dtype="uint8",
        )
        bits[r0:r1] = np.packbits(out.astype(bool), axis=1)
    return bits


def _check_size(pixels: int, max_points: int | None, force: bool, what: str) -> None:
    limit = MAX_POINTS if max_points is None else max_points
    if pixels > limit and not force:
        raise RegionError(
            f"{what} would have up to {pixels:,} points, above the limit of {limit:,}; "
            f"use a larger spacing or a smaller region, or force it (--force / force=True)"
        )


MAX_CELL_AREA_ERROR = 0.05  # a user CRS whose cells differ more than this from spacing² of ground is refused


def _check_ground_metres(
    grid_crs: str, name: Any, s: float, minx: float, miny: float, maxx: float, maxy: float
) -> None:
    """Refuse a grid CRS whose ``s × s`` cells do not cover ``s²`` of ground across the region (e.g. Web Mercator
    away from the equator: 0.37 s² at 52°), so an index never records a spacing its points do not have.
    Equal-area CRSs pass even where their cells are not squares (EPSG:6933), as do metric ones (UTM)."""
    from rasterio.warp import transform

    xs = np.array([minx, (minx + maxx) / 2, maxx])
    x, y = (v.ravel() for v in np.meshgrid(xs, [miny, (miny + maxy) / 2, maxy]))
    lon, lat = (np.asarray(v) for v in transform(grid_crs, "EPSG:4326", np.r_[x, x + s, x], np.r_[y, y, y + s]))
    n = len(x)
    dx = haversine_m(lat[:n], lon[:n], lat[n : 2 * n], lon[n : 2 * n])
    dy = haversine_m(lat[:n], lon[:n], lat[2 * n :], lon[2 * n :])
    ratio = dx * dy / (s * s)  # (cells of these CRSs are rectangles on the ground to well under 1 %)
    if np.abs(ratio - 1).max() > MAX_CELL_AREA_ERROR:
        raise RegionError(
            f"in the grid CRS {name!r} a {s:g} × {s:g} cell covers {ratio.min():.2f}–{ratio.max():.2f} times "
            f"{s:g}² m² of ground over this region (its units are not ground metres here): leave --crs out (an "
            "equal-area grid centred on the region) or use a metric CRS such as the region's UTM zone"
        )


def grid_for_region(
    region: Region,
    spacing_m: float,
    *,
    crs: str | None = None,
    max_points: int | None = None,
    force: bool = False,
) -> Grid:
    """Points every ``spacing_m`` metres inside ``region``: an equal-area raster centred on it (or ``crs``).

    The raster is aligned to multiples of the spacing from the projection's origin (the region centre) and
    covers the region's projected bounds; only pixel centres inside the region are points.
    """
    if not (isinstance(spacing_m, int | float) and math.isfinite(spacing_m) and spacing_m > 0):
        raise RegionError(f"spacing_m must be a positive number of metres, got {spacing_m!r}")
    grid_crs = _crs_string(crs) if crs is not None else equal_area_crs(region)
    from rasterio.crs import CRS

    if crs is not None and CRS.from_user_input(grid_crs).is_geographic:
        raise RegionError(f"grid CRS {crs!r} is geographic (degrees); a metre spacing needs a projected CRS")
    rings = _project_rings(region, grid_crs)
    allxy = np.vstack([r for p in rings for r in p])
    minx, miny = allxy.min(axis=0)
    maxx, maxy = allxy.max(axis=0)
    s = float(spacing_m)
    if crs is not None:
        _check_ground_metres(grid_crs, crs, s, minx, miny, maxx, maxy)
    x0, x1 = math.floor(minx / s) * s, math.ceil(maxx / s) * s
    y0, y1 = math.floor(miny / s) * s, math.ceil(maxy / s) * s
    width, height = max(1, round((x1 - x0) / s)), max(1, round((y1 - y0) / s))
    _check_size(width * height, max_points, force, f"a {spacing_m:g} m grid over this region")
    transform = Affine(s, 0.0, x0, 0.0, -s, y1)
    bits = _rasterize_mask(rings, transform, width, height)
    desc = region.to_dict() | {"spacing_m": s}
    return Grid(grid_crs, transform, width, height, bits, desc)


def grid_like_raster(
    path: str | os.PathLike[str],
    region: Region | None = None,
    *,
    max_points: int | None = None,
    force: bool = False,
) -> Grid:
    """The pixels of an existing raster (its CRS, transform and shape), optionally only those in ``region``."""
    import rasterio
    from rasterio.errors import RasterioError

    try:
        with rasterio.open(path) as src:
            crs, transform, width, height = src.crs, src.transform, src.width, src.height
    except RasterioError as e:
        raise RegionError(f"cannot open target raster {os.fspath(path)}: {e}") from e
    if crs is None:
        raise RegionError(f"target raster {os.fspath(path)} has no CRS")
    _check_size(width * height, max_points, force, f"the pixel grid of {Path(path).name}")
    desc: dict[str, Any] = {"type": "raster", "name": Path(path).name}
    bits = None
    if region is not None:
        rings = _project_rings(region, _crs_string(crs))
        if crs.is_geographic:
            # Degrees: the raster may use [-180, 180] or [0, 360] and the region's longitudes are unwrapped
            # past +180 when it crosses the antimeridian, so mask its copies one turn west and east too.
            rings = [[r + np.array([shift, 0.0]) for r in p] for shift in (-360.0, 0.0, 360.0) for p in rings]
        bits = _rasterize_mask(rings, transform, width, height)
        desc |= {"mask": region.to_dict()}
    return Grid(_crs_string(crs), transform, width, height, bits, desc)


def parse_bbox(values: Sequence[float | str]) -> Region:
    """A :class:`Region` from ``[W, S, E, N]`` (strings accepted, as from a command line)."""
    if len(values) != 4:
        raise RegionError(f"a bbox needs 4 numbers W S E N, got {len(values)}")
    try:
        w, s, e, n = (float(v) for v in values)
    except ValueError as err:
        raise RegionError(f"bbox values must be numbers: {err}") from err
    return Region.from_bbox(w, s, e, n)

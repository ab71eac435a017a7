"""Where the world lies: a square region in the local UTM zone, its 10 m raster grid and the truth grids.

The *region* is the square (``extent_km`` on a side, centred on ``centre``) in which samples are placed.
The rasters cover the region plus a margin on every side, so that the zoom-5 footprint of Sentinel-2
(5 × 256 px × 10 m = 12.8 km, i.e. 6.4 km either side of the sample) lies inside the imagery for every
sample, and a map drawn over the whole region can read its zoom-5 tiles too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from affine import Affine

GSD_M = 10.0  # Sentinel-2's base ground-sample distance (psm.data.imagery_sources)
MARGIN_M = 6_500.0  # >= 6.4 km (half the zoom-5 footprint) + one 100 m truth cell
TRUTH_CELL_M = 100.0  # grid of the spatial truth fields (truth/spatial.tif)
LAYER_CELL_M = 200.0  # grid of the per-(month, hour) truth layers (truth/mMM_hHH.tif)


def utm_epsg(latitude: float, longitude: float) -> int:
    """EPSG code of the WGS 84 / UTM zone that contains the point (326xx north, 327xx south)."""
    if not -80.0 <= latitude <= 84.0:
        raise ValueError(f"latitude {latitude} is outside the UTM range [-80, 84]")
    zone = math.floor((longitude + 180.0) / 6.0) % 60 + 1
    return (32600 if latitude >= 0 else 32700) + zone


@dataclass(frozen=True)
class WorldGrid:
    """The region and its grids. Coordinates: ``x`` east, ``y`` north in metres of ``epsg``."""

    centre_lat: float
    centre_lon: float
    extent_m: float
    epsg: int
    cx: float  # projected centre, snapped to the truth grid
    cy: float
    margin_m: float = MARGIN_M
    gsd_m: float = GSD_M
    truth_cell_m: float = TRUTH_CELL_M
    layer_cell_m: float = LAYER_CELL_M

    @classmethod
    def create(cls, centre_lat: float, centre_lon: float, extent_km: float, margin_m: float = MARGIN_M) -> WorldGrid:
        """Grid of a region of ``extent_km`` × ``extent_km`` centred on (lat, lon), in its UTM zone."""
        from rasterio.warp import transform

        if not extent_km > 0:
            raise ValueError(f"extent_km must be positive, got {extent_km}")
        # Whole layer cells, so every grid (10 m, 100 m, 200 m) tiles the raster exactly.
        extent_m = max(1, round(extent_km * 1000.0 / LAYER_CELL_M)) * LAYER_CELL_M
        margin_m = math.ceil(margin_m / LAYER_CELL_M) * LAYER_CELL_M
        epsg = utm_epsg(centre_lat, centre_lon)
        xs, ys = transform("EPSG:4326", f"EPSG:{epsg}", [centre_lon], [centre_lat])
        cx = round(xs[0] / LAYER_CELL_M) * LAYER_CELL_M
        cy = round(ys[0] / LAYER_CELL_M) * LAYER_CELL_M
        return cls(float(centre_lat), float(centre_lon), float(extent_m), epsg, float(cx), float(cy), margin_m)

    # --- extents -------------------------------------------------------------------------------------
    @property
    def crs(self) -> str:
        return f"EPSG:{self.epsg}"

    @property
    def total_m(self) -> float:
        """Side of the rasters (region + two margins) in metres."""
        return self.extent_m + 2.0 * self.margin_m

    @property
    def size_px(self) -> int:
        """Side of the 10 m rasters in pixels."""
        return round(self.total_m / self.gsd_m)

    @property
    def raster_bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) of the rasters in metres."""
        h = self.total_m / 2.0
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    @property
    def region_bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) of the sampling region in metres."""
        h = self.extent_m / 2.0
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)

    def transform(self, cell_m: float | None = None) -> Affine:
        """Affine transform of a north-up grid with ``cell_m`` pixels over the raster extent."""
        cell = self.gsd_m if cell_m is None else cell_m
        left, _, _, top = self.raster_bounds
        return Affine(cell, 0.0, left, 0.0, -cell, top)

    def shape(self, cell_m: float | None = None) -> tuple[int, int]:
        """(rows, cols) of a grid with ``cell_m`` pixels over the raster extent."""
        cell = self.gsd_m if cell_m is None else cell_m
        n = round(self.total_m / cell)
        return (n, n)

    # --- coordinates ---------------------------------------------------------------------------------
    def to_xy(self, lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """WGS 84 degrees → projected metres (vectorised)."""
        from rasterio.warp import transform

        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        shape = np.broadcast_shapes(lat.shape, lon.shape)
        lat, lon = np.broadcast_to(lat, shape).ravel(), np.broadcast_to(lon, shape).ravel()
        if lat.size == 0:
            return np.zeros(shape), np.zeros(shape)
        xs, ys = transform("EPSG:4326", self.crs, lon.tolist(), lat.tolist())
        return np.asarray(xs, dtype=np.float64).reshape(shape), np.asarray(ys, dtype=np.float64).reshape(shape)

    def to_lonlat(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Projected metres → (lon, lat) WGS 84 degrees (vectorised)."""
        from rasterio.warp import transform

        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        shape = np.broadcast_shapes(x.shape, y.shape)
        x, y = np.broadcast_to(x, shape).ravel(), np.broadcast_to(y, shape).ravel()
        if x.size == 0:
            return np.zeros(shape), np.zeros(shape)
        lons, lats = transform(self.crs, "EPSG:4326", x.tolist(), y.tolist())
        return np.asarray(lons, dtype=np.float64).reshape(shape), np.asarray(lats, dtype=np.float64).reshape(shape)

    def grid_index(self, x: np.ndarray, y: np.ndarray, cell_m: float) -> tuple[np.ndarray, np.ndarray]:
        """Fractional (row, col) of points on a ``cell_m`` grid, with cell centres at integers."""
        left, _, _, top = self.raster_bounds
        col = (np.asarray(x, dtype=np.float64) - left) / cell_m - 0.5
        row = (top - np.asarray(y, dtype=np.float64)) / cell_m - 0.5
        return row, col

    def region_lonlat_bounds(self) -> tuple[float, float, float, float]:
        """(west, south, east, north) of the sampling region in degrees."""
        from rasterio.warp import transform_bounds

        return tuple(transform_bounds(self.crs, "EPSG:4326", *self.region_bounds))  # type: ignore[return-value]

    def in_region(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Whether projected points lie in the sampling region."""
        left, bottom, right, top = self.region_bounds
        x, y = np.asarray(x), np.asarray(y)
        return (x >= left) & (x <= right) & (y >= bottom) & (y <= top)

    def to_dict(self) -> dict:
        """JSON form (world.json ``grid``)."""
        return {
            "centre_lat": self.centre_lat,
            "centre_lon": self.centre_lon,
            "extent_m": self.extent_m,
            "epsg": self.epsg,
            "crs": self.crs,
            "cx": self.cx,
            "cy": self.cy,
            "margin_m": self.margin_m,
            "gsd_m": self.gsd_m,
            "truth_cell_m": self.truth_cell_m,
            "layer_cell_m": self.layer_cell_m,
            "raster_size_px": self.size_px,
            "raster_bounds": list(self.raster_bounds),
            "region_bounds": list(self.region_bounds),
        }

    @classmethod
    def from_dict(cls, d: dict) -> WorldGrid:
        """Inverse of :meth:`to_dict`."""
        return cls(
            centre_lat=float(d["centre_lat"]),
            centre_lon=float(d["centre_lon"]),
            extent_m=float(d["extent_m"]),
            epsg=int(d["epsg"]),
            cx=float(d["cx"]),
            cy=float(d["cy"]),
            margin_m=float(d["margin_m"]),
            gsd_m=float(d["gsd_m"]),
            truth_cell_m=float(d["truth_cell_m"]),
            layer_cell_m=float(d["layer_cell_m"]),
        )


def bilinear(grid: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``grid[..., H, W]`` at fractional (row, col) (cell centres at integers).

    Points outside are clamped to the edge cells. ``grid`` may carry leading band axes; the result has
    shape ``grid.shape[:-2] + row.shape``.
    """
    h, w = grid.shape[-2:]
    row = np.clip(np.asarray(row, dtype=np.float64), 0.0, h - 1.0)
    col = np.clip(np.asarray(col, dtype=np.float64), 0.0, w - 1.0)
    r0 = np.minimum(np.floor(row).astype(np.int64), h - 2) if h > 1 else np.zeros(row.shape, np.int64)
    c0 = np.minimum(np.floor(col).astype(np.int64), w - 2) if w > 1 else np.zeros(col.shape, np.int64)
    fr = row - r0
    fc = col - c0
    r1 = np.minimum(r0 + 1, h - 1)
    c1 = np.minimum(c0 + 1, w - 1)
    g = grid.astype(np.float64, copy=False)
    top = g[..., r0, c0] * (1.0 - fc) + g[..., r0, c1] * fc
    bottom = g[..., r1, c0] * (1.0 - fc) + g[..., r1, c1] * fc
    return top * (1.0 - fr) + bottom * fr

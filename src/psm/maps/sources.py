"""Imagery providers: the raw footprint of a map point from local rasters, an XYZ tile server or a folder.

One interface, :class:`ImageryProvider`: ``read(lat, lon, size_px, gsd_m)`` returns the ground square of
``size_px × gsd_m`` metres centred on the point as HWC uint8, or **None when there is no imagery** (the
point becomes nodata in every output map, never a zero score). ``read_masked`` also returns a per-pixel
validity mask (None = all valid) so the indexer can read the largest zoom footprint once and decide
validity per zoom on its central crops. ``read_blocks`` reads many points' footprints in the calling thread
(a raster reads overlapping neighbours as one window); ``read_many`` reads a batch with a thread pool.

Errors that concern one point (a corrupt file, a tile server giving up) are recorded as
:class:`~psm.data.errors.DataProblem` in ``provider.problems`` (and the optional :class:`SkipLog`) and
the point reads as None; programming errors propagate.

Providers:

* :class:`RasterProvider` — one or many GeoTIFF/COG/VRT files in any CRS. A simple bounds index (lat/lon
  bounds of each file, no R-tree) picks the files containing the point, deepest first; the window is
  read with :func:`psm.data.imagery.read_raster_window` (reprojection/resampling by its WarpedVRT path;
  boundless with a validity mask near edges or where the file has nodata, a plain read deep inside
  files without nodata). Each thread keeps its own open datasets
  (GDAL handles are not thread-safe). A footprint straddling two files takes the file that covers most
  of it; give a VRT (``gdalbuildvrt``) for a seamless mosaic.
* :class:`XYZProvider` — an XYZ tile layer (:mod:`psm.maps.tiles`).
* :class:`FolderProvider` — a folder of images with a CSV of their lat/lon (the official layout): the
  image nearest to the point within ``tolerance_m``, centre-cropped (padded with an invalid margin when
  too small) to the footprint.
"""

from __future__ import annotations

import glob
import math
import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from psm.data.errors import DataProblem, SkipLog

Masked = tuple[np.ndarray, np.ndarray | None]
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
DEG_LAT_M = 111_320.0  # metres per degree of latitude (for coarse degree margins only)


def check_footprint(size_px: int, gsd_m: float) -> None:
    """A footprint of ``size_px`` pixels of ``gsd_m`` metres must have both positive."""
    if size_px < 1 or not gsd_m > 0:
        raise ValueError(f"size_px must be ≥ 1 and gsd_m > 0, got {size_px}, {gsd_m}")


@dataclass(frozen=True)
class FootprintBlock:
    """Pixels read at once that hold the footprints of one or more points.

    ``image`` is (3, H, W) uint8 (a view of pixel-interleaved memory unless read channels first), ``mask``
    an (H, W) validity mask or None (all valid), ``members`` the (point index, top row, left column) of each
    footprint in it. A block of one member at (0, 0) is that point's footprint as its provider read it.
    """

    image: np.ndarray
    mask: np.ndarray | None
    members: tuple[tuple[int, int, int], ...]

    @classmethod
    def of_point(cls, k: int, got: Masked | None) -> FootprintBlock | None:
        """Point ``k``'s own read (HWC, as :meth:`ImageryProvider.read_masked` gives it) as a block; None stays None."""
        return None if got is None else cls(got[0].transpose(2, 0, 1), got[1], ((k, 0, 0),))

    def footprint(self, j: int, size_px: int) -> Masked:
        """Member ``j``'s footprint as ((3, size, size) view, mask view or None)."""
        if len(self.members) == 1:
            return self.image, self.mask
        _, r, c = self.members[j]
        box = (slice(r, r + size_px), slice(c, c + size_px))
        return self.image[(slice(None), *box)], None if self.mask is None else self.mask[box]


def group_windows(col0: np.ndarray, row0: np.ndarray, size_px: int) -> list[np.ndarray]:
    """Split square windows, in the given order, into runs that are cheaper to read as one bounding box.

    A run grows while its bounding box has no more pixels than its windows together: one read of the box
    then moves less data than a read of each (neighbouring map points' zoom-5 footprints overlap ~10×), and
    holds no more memory. Returns the positions of each run's windows.
    """
    runs: list[np.ndarray] = []
    start = 0
    c_lo = c_hi = r_lo = r_hi = 0
    for k in range(len(col0)):
        c, r = int(col0[k]), int(row0[k])
        if k > start:
            lo_c, hi_c, lo_r, hi_r = min(c_lo, c), max(c_hi, c + size_px), min(r_lo, r), max(r_hi, r + size_px)
            if (hi_c - lo_c) * (hi_r - lo_r) <= (k - start + 1) * size_px * size_px:
                c_lo, c_hi, r_lo, r_hi = lo_c, hi_c, lo_r, hi_r
                continue
            runs.append(np.arange(start, k))
            start = k
        c_lo, c_hi, r_lo, r_hi = c, c + size_px, r, r + size_px
    if len(col0):
        runs.append(np.arange(start, len(col0)))
    return runs


class ImageryProvider(ABC):
    """Where the pixels of a map point come from; see the module docstring for the contract."""

    kind: str = "provider"

    def __init__(self, *, workers: int = 8, skip_log: SkipLog | None = None) -> None:
        self.workers = max(1, int(workers))
        self.skip_log = skip_log if skip_log is not None else SkipLog()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    # --- to implement -----------------------------------------------------------------------------------
    @abstractmethod
    def _read(self, lat: float, lon: float, size_px: int, gsd_m: float) -> Masked | None:
        """Read the footprint; None = no imagery. May raise for a bad input (recorded by the caller)."""

    def describe(self) -> dict[str, Any]:
        """JSON-safe description for index.json (no absolute paths)."""
        return {"type": self.kind}

    # --- public ---------------------------------------------------------------------------------------
    @property
    def problems(self) -> list[DataProblem]:
        """Problems recorded so far (corrupt files, failed tiles, ...)."""
        return self.skip_log.problems

    def record(self, problem: DataProblem) -> None:
        """Record one problem (thread-safe enough: list.append and line-buffered file appends)."""
        self.skip_log.record(problem)

    def read_masked(self, lat: float, lon: float, size_px: int, gsd_m: float) -> Masked | None:
        """(HWC uint8 image, bool validity mask or None if all valid), or None when there is no imagery."""
        from rasterio.errors import RasterioError

        from psm.data.imagery import ImageryError
        from psm.maps.tiles import TileFetchError

        check_footprint(size_px, gsd_m)
        try:
            return self._read(float(lat), float(lon), int(size_px), float(gsd_m))
        except (ImageryError, RasterioError, TileFetchError, OSError) as e:
            self.record(DataProblem(f"{type(e).__name__}: {e}", key=f"{lat:.6f},{lon:.6f}"))
            return None

    def read_blocks(
        self,
        lats: Sequence[float] | np.ndarray,
        lons: Sequence[float] | np.ndarray,
        size_px: int,
        gsd_m: float,
        *,
        channels_first: bool = False,
    ) -> list[FootprintBlock]:
        """The footprints of many points in the calling thread: every point with imagery is a member of one
        block, points without are in none. Here each point is read on its own (:meth:`read_masked`);
        providers may read overlapping footprints at once. ``channels_first`` asks for blocks stored
        channels first (the layout GPU transforms take), else pixel-interleaved (CPU transforms)."""
        blocks = []
        for k, (la, lo) in enumerate(zip(lats, lons, strict=True)):
            if (block := FootprintBlock.of_point(k, self.read_masked(la, lo, size_px, gsd_m))) is not None:
                blocks.append(block)
        return blocks

    def read_masked_batch(
        self,
        lats: Sequence[float] | np.ndarray,
        lons: Sequence[float] | np.ndarray,
        size_px: int,
        gsd_m: float,
        *,
        channels_first: bool = False,
    ) -> list[Masked | None]:
        """:meth:`read_masked` of many points, in order, through :meth:`read_blocks` (images may be views).

        ``channels_first``: images as (3, H, W) instead of (H, W, 3).
        """
        out: list[Masked | None] = [None] * len(lats)
        for block in self.read_blocks(lats, lons, size_px, gsd_m, channels_first=channels_first):
            for j, (k, _, _) in enumerate(block.members):
                image, mask = block.footprint(j, size_px)
                out[k] = (image if channels_first else image.transpose(1, 2, 0), mask)
        return out

    def read(self, lat: float, lon: float, size_px: int, gsd_m: float, *, min_valid: float = 1.0) -> np.ndarray | None:
        """The footprint as HWC uint8, or None without imagery (or with less than ``min_valid`` of it)."""
        out = self.read_masked(lat, lon, size_px, gsd_m)
        if out is None:
            return None
        image, valid = out
        if valid is not None and float(valid.mean()) < min_valid:
            return None
        return image

    def read_many(
        self,
        lats: Sequence[float] | np.ndarray,
        lons: Sequence[float] | np.ndarray,
        size_px: int,
        gsd_m: float,
        *,
        min_valid: float = 1.0,
    ) -> list[np.ndarray | None]:
        """:meth:`read` for many points on the provider's thread pool (``workers`` threads), in order."""
        pool = self._executor()
        futures = [
            pool.submit(self.read, la, lo, size_px, gsd_m, min_valid=min_valid)
            for la, lo in zip(lats, lons, strict=True)
        ]
        return [f.result() for f in futures]

    def _executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=f"psm-{self.kind}")
            return self._pool

    def close(self) -> None:
        """Stop the thread pool and release files."""
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None

    def __enter__(self) -> ImageryProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------------
# Local rasters
# --------------------------------------------------------------------------------------------------------


def expand_paths(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Paths with shell globs expanded (``tiles/*.tif``); GDAL paths such as ``/vsicurl/...`` pass as is."""
    out: list[str] = []
    for p in paths:
        s = os.fspath(p)
        if any(ch in s for ch in "*?[") and not s.startswith("/vsi"):
            matched = sorted(glob.glob(s))
            if not matched:
                raise FileNotFoundError(f"no raster matches {s!r}")
            out.extend(matched)
        else:
            out.append(s)
    return out


class RasterProvider(ImageryProvider):
    """Windows of local georeferenced rasters (GeoTIFF/COG/VRT, any CRS); see the module docstring."""

    kind = "raster"

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]] | str | os.PathLike[str],
        *,
        bands: Sequence[int] = (1, 2, 3),
        scale: tuple[float, float] | None = None,
        workers: int = 8,
        skip_log: SkipLog | None = None,
    ) -> None:
        import rasterio
        from rasterio.enums import MaskFlags
        from rasterio.errors import RasterioError
        from rasterio.warp import transform_bounds

        from psm.data.imagery import ImageryError, ground_pixel_m, native_gsd_m

        super().__init__(workers=workers, skip_log=skip_log)
        if isinstance(paths, str | os.PathLike):
            paths = [paths]
        self.paths = expand_paths(list(paths))
        if not self.paths:
            raise ValueError("RasterProvider needs at least one raster")
        self.bands = tuple(int(b) for b in bands)
        self.scale = scale
        bounds, crss, transforms, shapes, res_m, fast = [], [], [], [], [], []
        for p in self.paths:
            try:
                with rasterio.open(p) as src:
                    if src.crs is None:
                        raise ImageryError(f"raster {p} has no CRS")
                    # Fail now, not once per point: bands and value range are the same for every read.
                    if any(not 1 <= b <= src.count for b in self.bands):
                        raise ImageryError(f"raster {p} has {src.count} band(s); asked for bands {list(self.bands)}")
                    dtypes = {src.dtypes[b - 1] for b in self.bands}
                    if scale is None and dtypes != {"uint8"}:
                        raise ImageryError(
                            f"raster {p} has dtype {'/'.join(sorted(dtypes))}; give scale=(lo, hi) "
                            f"(--scale LO HI) to map its values to 0-255"
                        )
                    bounds.append(transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21))
                    crss.append(src.crs)
                    transforms.append(src.transform)
                    shapes.append((src.height, src.width))
                    # No nodata and no mask on the bands, read in place (projected in ground metres, north-up):
                    # reads deep inside need no mask. Others (degrees, Web Mercator, flipped) are warped per point.
                    flags = [src.mask_flag_enums[b - 1] for b in self.bands]
                    native = native_gsd_m(src)  # None unless read in place
                    fast.append(native is not None and all(MaskFlags.all_valid in f for f in flags))
                    # (for warped rasters, depths from the edge are estimates; each read checks its footprint)
                    res_m.append(native if native is not None else ground_pixel_m(src))
            except RasterioError as e:
                raise ImageryError(f"cannot open raster {p}: {e}") from e
        # The "index": lat/lon bounds of every file as arrays, filtered with one vectorised comparison.
        self._bounds = np.asarray(bounds, dtype=np.float64).reshape(-1, 4)  # west, south, east, north
        self._crs = crss
        self._transforms = transforms
        self._shapes = shapes
        self._res_m = res_m
        self._fast = fast
        self._local = threading.local()
        self._opened: list[Any] = []
        self._opened_lock = threading.Lock()

    def describe(self) -> dict[str, Any]:
        """File names (not paths), bands and value scaling."""
        return {
            "type": self.kind,
            "files": [Path(p).name for p in self.paths],
            "bands": list(self.bands),
            "scale": list(self.scale) if self.scale else None,
        }

    def _dataset(self, i: int) -> Any:
        """File ``i`` opened once per thread (GDAL dataset handles must not be shared between threads)."""
        import rasterio

        cache = getattr(self._local, "datasets", None)
        if cache is None:
            cache = self._local.datasets = {}
        ds = cache.get(i)
        if ds is None:
            ds = cache[i] = rasterio.open(self.paths[i])
            with self._opened_lock:
                self._opened.append(ds)
        return ds

    def _placements(self, lats: np.ndarray, lons: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where points fall in every file: (depth, col, row), each (files, points).

        ``depth`` is metres from the nearest edge (−inf where the file's pixels do not contain the point);
        col/row are the fractional pixel coordinates. One coordinate transform per file for all points.
        """
        from rasterio.warp import transform

        n = len(lats)
        depth = np.full((len(self.paths), n), -np.inf)
        col, row = np.zeros_like(depth), np.zeros_like(depth)
        b = self._bounds
        for i in range(len(self.paths)):
            # west > east: the file crosses the antimeridian (transform_bounds says so), so either side is in.
            in_lon = (
                (b[i, 0] <= lons) & (lons <= b[i, 2]) if b[i, 0] <= b[i, 2] else (b[i, 0] <= lons) | (lons <= b[i, 2])
            )
            hit = np.nonzero(in_lon & (b[i, 1] <= lats) & (lats <= b[i, 3]))[0]
            if not len(hit):
                continue
            xs, ys = transform("EPSG:4326", self._crs[i], lons[hit].tolist(), lats[hit].tolist())
            c, r = ~self._transforms[i] @ (np.asarray(xs), np.asarray(ys))
            h, w = self._shapes[i]
            # Inside the lat/lon bounds is not inside the (rotated/curved) raster itself.
            inside = (c >= 0) & (c < w) & (r >= 0) & (r < h)
            d = np.minimum.reduce([c, w - c, r, h - r]) * self._res_m[i]
            depth[i, hit] = np.where(inside, d, -np.inf)
            col[i, hit], row[i, hit] = c, r
        return depth, col, row

    def candidates(self, lat: float, lon: float) -> list[tuple[int, float]]:
        """Files whose pixels contain the point, as (index, metres from the nearest edge), deepest first."""
        depth = self._placements(np.array([lat], dtype=np.float64), np.array([lon], dtype=np.float64))[0][:, 0]
        out = [(i, float(d)) for i, d in enumerate(depth) if np.isfinite(d)]
        out.sort(key=lambda t: -t[1])  # stable: files of equal depth keep their order
        return out

    def read_blocks(
        self,
        lats: Sequence[float] | np.ndarray,
        lons: Sequence[float] | np.ndarray,
        size_px: int,
        gsd_m: float,
        *,
        channels_first: bool = False,
    ) -> list[FootprintBlock]:
        """:meth:`ImageryProvider.read_blocks` with the common case batched: the same values as per point.

        Points whose deepest file has no nodata, is projected, holds the whole footprint and is read at its
        native resolution are placed with one coordinate transform per file, and runs of neighbours whose
        footprints overlap are read as one window (:func:`group_windows`). Per-point Python and per-footprint
        reads (GDAL's block cache is shared by all threads) held 16 decode threads to ~930, then ~1,240
        footprints/s on an H100 machine. Every other point goes through :meth:`read_masked`.
        """
        from rasterio.errors import RasterioError

        from psm.data.imagery import ImageryError, read_pixel_window

        lats = np.asarray(lats, dtype=np.float64).reshape(-1)
        lons = np.asarray(lons, dtype=np.float64).reshape(-1)
        n = len(lats)
        check_footprint(size_px, gsd_m)
        # The deepest file of each point, as candidates() ranks them (argmax: ties keep the earlier file).
        depth, col, row = self._placements(lats, lons)
        best_file = depth.argmax(axis=0)  # (a provider has at least one file)
        pts = np.arange(n)
        col0 = np.floor(col[best_file, pts]).astype(np.int64) - size_px // 2
        row0 = np.floor(row[best_file, pts]).astype(np.int64) - size_px // 2
        heights = np.array([h for h, _ in self._shapes], dtype=np.int64)[best_file]
        widths = np.array([w for _, w in self._shapes], dtype=np.int64)[best_file]
        # Files read directly at this GSD: no nodata or mask, projected, native resolution.
        native = np.array(
            [f and math.isclose(gsd_m, r, rel_tol=1e-6) for f, r in zip(self._fast, self._res_m, strict=True)]
        )
        fast = (  # (a point in no file has depth −inf, never ≥ half the footprint)
            (depth[best_file, pts] >= 0.5 * size_px * gsd_m)
            & native[best_file]
            & (col0 >= 0)
            & (row0 >= 0)
            & (col0 + size_px <= widths)
            & (row0 + size_px <= heights)
        )
        blocks: list[FootprintBlock] = []
        slow = list(np.nonzero(~fast)[0])
        for i in np.unique(best_file[fast]):
            members = np.nonzero(fast & (best_file == i))[0]
            for run in group_windows(col0[members], row0[members], size_px):
                ks = members[run]
                c_lo, r_lo = int(col0[ks].min()), int(row0[ks].min())
                width, height = int(col0[ks].max()) + size_px - c_lo, int(row0[ks].max()) + size_px - r_lo
                try:
                    image = read_pixel_window(
                        self._dataset(int(i)), c_lo, r_lo, width, height, self.bands, self.scale,
                        channels_first=channels_first,
                    )  # fmt: skip
                except (ImageryError, RasterioError, OSError):
                    slow.extend(ks)  # read_masked below records the problem with each point's key
                    continue
                if not channels_first:
                    image = image.transpose(2, 0, 1)
                placed = tuple((int(k), int(row0[k]) - r_lo, int(col0[k]) - c_lo) for k in ks)
                blocks.append(FootprintBlock(image, None, placed))
        for k in sorted(slow):
            block = FootprintBlock.of_point(int(k), self.read_masked(lats[k], lons[k], size_px, gsd_m))
            if block is not None:
                blocks.append(block)
        return blocks

    def _read(self, lat: float, lon: float, size_px: int, gsd_m: float) -> Masked | None:
        from psm.data.imagery import ImageryError, read_raster_window

        best: Masked | None = None
        best_frac = 0.0
        half_m = 0.5 * size_px * gsd_m
        for i, depth_m in self.candidates(lat, lon):
            if self._fast[i] and depth_m >= half_m:
                # Probably inside a raster without nodata: a plain read needs no mask (2.5× faster). The
                # reader checks the footprint exactly and refuses one that sticks out (e.g. rotated).
                try:
                    image = read_raster_window(self._dataset(i), lat, lon, size_px, gsd_m, self.bands, scale=self.scale)
                    return image, None
                except ImageryError:
                    pass  # partly outside after all: read it with its mask below
            image, valid = read_raster_window(
                self._dataset(i), lat, lon, size_px, gsd_m, self.bands, boundless=True, scale=self.scale
            )
            frac = float(valid.mean())
            if frac >= 1.0:
                return image, None
            if frac > best_frac:
                best, best_frac = (image, valid), frac
        return best

    def close(self) -> None:
        """Close every dataset opened by any thread."""
        super().close()
        with self._opened_lock:
            for ds in self._opened:
                ds.close()
            self._opened.clear()
        self._local = threading.local()


# --------------------------------------------------------------------------------------------------------
# XYZ tile servers
# --------------------------------------------------------------------------------------------------------


class XYZProvider(ImageryProvider):
    """Footprints mosaicked from an XYZ tile layer (``https://host/{z}/{x}/{y}.png``); see psm.maps.tiles."""

    kind = "xyz"

    def __init__(
        self,
        url_template: str,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        timeout_s: float = 10.0,
        retries: int = 4,
        backoff_s: float = 0.5,
        concurrency: int = 8,
        min_zoom: int = 0,
        max_zoom: int = 19,
        tile_size: int = 256,
        memory_tiles: int = 256,
        headers: dict[str, str] | None = None,
        workers: int = 8,
        skip_log: SkipLog | None = None,
    ) -> None:
        """Options as :class:`~psm.maps.tiles.TileClient`'s; ``{env:NAME}`` in the URL or a header value
        takes a key from the environment (index.json keeps the placeholder)."""
        from psm.maps.tiles import TileClient

        super().__init__(workers=workers, skip_log=skip_log)
        self.min_zoom, self.max_zoom = int(min_zoom), int(max_zoom)
        self.client = TileClient(
            url_template,
            cache_dir=cache_dir,
            timeout_s=timeout_s,
            retries=retries,
            backoff_s=backoff_s,
            concurrency=concurrency,
            memory_tiles=memory_tiles,
            tile_size=tile_size,
            headers=headers,
            on_problem=self.record,
        )

    def describe(self) -> dict[str, Any]:
        """The URL template and zoom range (the cache location is not part of the index)."""
        return {
            "type": self.kind,
            "url": self.client.url_template,
            "tile_size": self.client.tile_size,
            "zoom_range": [self.min_zoom, self.max_zoom],
        }

    def _read(self, lat: float, lon: float, size_px: int, gsd_m: float) -> Masked | None:
        from psm.maps.tiles import read_footprint

        return read_footprint(self.client, lat, lon, size_px, gsd_m, min_zoom=self.min_zoom, max_zoom=self.max_zoom)


# --------------------------------------------------------------------------------------------------------
# A folder of images with a CSV of their locations
# --------------------------------------------------------------------------------------------------------

_ID_COLUMNS = ("id", "key", "image_id", "name")
_LAT_COLUMNS = ("latitude", "lat", "y")
_LON_COLUMNS = ("longitude", "lon", "lng", "x")
_PATH_COLUMNS = ("path", "file", "filename", "image", "image_path")


def _pick_column(columns: dict[str, str], names: Sequence[str]) -> str | None:
    for n in names:
        if n in columns:
            return columns[n]
    return None


class FolderProvider(ImageryProvider):
    """The image nearest to the point (within ``tolerance_m``) from a folder + CSV of lat/lon.

    CSV columns (case-insensitive): an id (``id``/``key``), ``latitude``/``lat`` or ``Y`` and
    ``longitude``/``lon`` or ``X``, and optionally ``path`` (relative to the folder). Without a path column
    a row's file is ``<id>_<lat>_<lon>.<ext>`` (the official layout; matched on the id, so the number
    format does not matter) or ``<id>.<ext>``. Images are taken to be centred on their row's point at
    ``image_gsd_m`` per pixel (default: the GSD asked for); the footprint is their centre crop, resampled
    when the GSDs differ, with an invalid margin when the image is smaller than the footprint.
    """

    kind = "folder"

    def __init__(
        self,
        folder: str | os.PathLike[str],
        csv: str | os.PathLike[str],
        *,
        tolerance_m: float = 1000.0,
        image_gsd_m: float | None = None,
        cache_images: int = 32,
        workers: int = 8,
        skip_log: SkipLog | None = None,
    ) -> None:
        import pandas as pd

        super().__init__(workers=workers, skip_log=skip_log)
        self.folder = Path(folder)
        self.csv = Path(csv)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.folder}")
        table = pd.read_csv(self.csv, dtype=str)  # ids stay text ("00123" is not 123)
        cols = {c.strip().lower(): c for c in table.columns}
        lat_c, lon_c = _pick_column(cols, _LAT_COLUMNS), _pick_column(cols, _LON_COLUMNS)
        id_c, path_c = _pick_column(cols, _ID_COLUMNS), _pick_column(cols, _PATH_COLUMNS)
        if lat_c is None or lon_c is None:
            raise ValueError(f"{self.csv}: needs latitude/longitude (or Y/X) columns, has {list(table.columns)}")
        if id_c is None and path_c is None:
            raise ValueError(f"{self.csv}: needs an id (or key) column or a path column")
        lat = pd.to_numeric(table[lat_c], errors="coerce").to_numpy(np.float64)
        lon = pd.to_numeric(table[lon_c], errors="coerce").to_numpy(np.float64)
        if path_c is not None:
            files = [str(p) for p in table[path_c]]
        else:
            by_id = self._scan_folder()
            files = [by_id.get(str(i)) for i in table[id_c]]
        keep = np.array([f is not None for f in files], dtype=bool) & np.isfinite(lat) & np.isfinite(lon)
        keep &= np.abs(np.nan_to_num(lat)) <= 90
        for row in np.nonzero(~keep)[0][:100].tolist():
            self.record(DataProblem("no image file or bad lat/lon", file=self.csv.name, row=int(row)))
        # Sorted by latitude: a query looks only at the band of rows within the tolerance.
        order = np.argsort(lat[keep], kind="stable")
        self._lat = lat[keep][order]
        self._lon = lon[keep][order]
        kept_files = [f for f, k in zip(files, keep, strict=True) if k]
        self._files = [kept_files[i] for i in order.tolist()]
        if not self._files:
            raise ValueError(f"{self.csv}: no row has both a readable location and an image file in {self.folder}")
        self.tolerance_m = float(tolerance_m)
        self.image_gsd_m = image_gsd_m
        self._cache: OrderedDict[int, Masked] = OrderedDict()
        self._cache_size = int(cache_images)
        self._cache_lock = threading.Lock()

    def _scan_folder(self) -> dict[str, str]:
        """id → file name for ``<id>_<lat>_<lon>.<ext>`` and ``<id>.<ext>`` files (one directory scan)."""
        out: dict[str, str] = {}
        with os.scandir(self.folder) as it:
            for entry in it:
                stem, ext = os.path.splitext(entry.name)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    continue
                out.setdefault(stem, entry.name)
                parts = stem.rsplit("_", 2)
                if len(parts) == 3:
                    out.setdefault(parts[0], entry.name)
        return out

    def describe(self) -> dict[str, Any]:
        """CSV name, image count, tolerance."""
        return {
            "type": self.kind,
            "csv": self.csv.name,
            "images": len(self._files),
            "tolerance_m": self.tolerance_m,
            "image_gsd_m": self.image_gsd_m,
        }

    def nearest(self, lat: float, lon: float) -> tuple[int, float] | None:
        """(row, distance in m) of the nearest image within the tolerance, else None."""
        from psm.maps.grid import haversine_m

        dlat = self.tolerance_m / DEG_LAT_M * 1.01
        lo = int(np.searchsorted(self._lat, lat - dlat, side="left"))
        hi = int(np.searchsorted(self._lat, lat + dlat, side="right"))
        if hi <= lo:
            return None
        d = haversine_m(lat, lon, self._lat[lo:hi], self._lon[lo:hi])
        j = int(np.argmin(d))
        return (lo + j, float(d[j])) if d[j] <= self.tolerance_m else None

    def _image(self, i: int) -> Masked:
        """Image ``i`` as RGB and its opaque pixels (None: no alpha). Transparent pixels are no imagery, not
        the black that dropping the alpha channel leaves."""
        from psm.data.imagery import load_image

        with self._cache_lock:
            if i in self._cache:
                self._cache.move_to_end(i)
                return self._cache[i]
        path = self.folder / self._files[i]
        rgb = load_image(path)  # missing and corrupt files raise here, with the usual errors
        opaque = None
        with Image.open(path) as im:  # (only the header, unless there is an alpha channel to decode)
            if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
                opaque = np.asarray(im.convert("RGBA").getchannel("A")) > 0
        img: Masked = (rgb, opaque)
        with self._cache_lock:
            self._cache[i] = img
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return img

    def _read(self, lat: float, lon: float, size_px: int, gsd_m: float) -> Masked | None:
        hit = self.nearest(lat, lon)
        if hit is None:
            return None
        img, opaque = self._image(hit[0])
        native = self.image_gsd_m or gsd_m
        need = max(1, round(size_px * gsd_m / native))  # image pixels covering the footprint
        h, w = img.shape[:2]
        # Centre crop with the torchvision rounding (so it matches CenterCrop), padding outside the image.
        top, left = round((h - need) / 2.0), round((w - need) / 2.0)
        canvas = np.zeros((need, need, 3), dtype=np.uint8)
        valid = np.zeros((need, need), dtype=bool)
        r0, r1 = max(top, 0), min(top + need, h)
        c0, c1 = max(left, 0), min(left + need, w)
        canvas[r0 - top : r1 - top, c0 - left : c1 - left] = img[r0:r1, c0:c1]
        valid[r0 - top : r1 - top, c0 - left : c1 - left] = True if opaque is None else opaque[r0:r1, c0:c1]
        if need != size_px:
            method = Image.Resampling.BOX if need > size_px else Image.Resampling.BILINEAR
            canvas = np.asarray(Image.fromarray(canvas).resize((size_px, size_px), method))
            valid = np.asarray(Image.fromarray(valid.astype(np.uint8) * 255).resize((size_px, size_px), method)) >= 255
        return (canvas, None) if valid.all() else (canvas, valid)


def parse_source(spec: str, **kwargs: Any) -> ImageryProvider:
    """A provider from a CLI spec: ``raster:PATH[,PATH...]``, ``xyz:URL_TEMPLATE`` or ``folder:DIR,CSV``.

    ``kwargs`` go to the provider's constructor where it takes them (e.g. ``workers``, ``cache_dir``).
    """
    import inspect

    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(f"imagery source {spec!r}: expected raster:PATH[,PATH...], xyz:URL or folder:DIR,CSV")
    kind = kind.lower()
    classes: dict[str, type[ImageryProvider]] = {
        "raster": RasterProvider,
        "xyz": XYZProvider,
        "folder": FolderProvider,
    }
    if kind not in classes:
        raise ValueError(f"imagery source {spec!r}: unknown kind {kind!r} (raster, xyz or folder)")
    cls = classes[kind]
    accepted = set(inspect.signature(cls.__init__).parameters)
    kw = {k: v for k, v in kwargs.items() if k in accepted and v is not None}
    if kind == "raster":
        return RasterProvider([p for p in rest.split(",") if p], **kw)
    if kind == "xyz":
        return XYZProvider(rest, **kw)
    parts = rest.split(",")
    if len(parts) != 2:
        raise ValueError(f"imagery source {spec!r}: folder needs DIR,CSV")
    return FolderProvider(parts[0], parts[1], **kw)

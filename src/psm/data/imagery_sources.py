"""Imagery sources: base ground-sample distance and raw tile size, the one table the whole package reads.

The GSD position embedding uses ``zoom × base_gsd_m`` (PSM §3, official ``image_gsd``) and the zoom crop
takes ``zoom × tile_size`` raw pixels before resizing back to ``tile_size`` (official ``zoom_transform``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ImagerySource:
    """A kind of overhead imagery: its name here, its name in the official code, GSD and tile size."""

    name: str
    official_name: str
    base_gsd_m: float
    tile_size: int
    zoom_levels: tuple[int, ...] = (1, 3, 5)


IMAGERY_SOURCES: dict[str, ImagerySource] = {
    s.name: s
    for s in (
        ImagerySource("sentinel2", "sentinel", base_gsd_m=10.0, tile_size=256),
        ImagerySource("bing", "bingmap", base_gsd_m=0.6, tile_size=300),
        # SoundingEarth's Google Earth tiles are only ever used at zoom 1 by the official code.
        ImagerySource("google_earth", "googleEarth", base_gsd_m=0.2, tile_size=256, zoom_levels=(1,)),
    )
}

_BY_OFFICIAL = {s.official_name: s for s in IMAGERY_SOURCES.values()}


def get_imagery_source(name: str) -> ImagerySource:
    """Look up an imagery source by our name or the official one (``sentinel``, ``bingmap``, ``googleEarth``)."""
    if name in IMAGERY_SOURCES:
        return IMAGERY_SOURCES[name]
    if name in _BY_OFFICIAL:
        return _BY_OFFICIAL[name]
    known = sorted(IMAGERY_SOURCES) + sorted(_BY_OFFICIAL)
    raise ValueError(f"unknown imagery source {name!r}; known: {', '.join(known)}")


def add_raster_arguments(parser: Any) -> None:
    """``--bands R G B`` and ``--scale LO HI``: how georeferenced rasters become RGB tiles (one definition for
    every command that reads them; :class:`psm.data.imagery.RasterBands`)."""
    parser.add_argument("--bands", type=int, nargs=3, default=[1, 2, 3], help="raster bands as R G B (1-based)")
    parser.add_argument(
        "--scale",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="map non-uint8 raster values LO..HI to 0..255, e.g. 0 3000 for Sentinel-2 L2A reflectance x 10000",
    )

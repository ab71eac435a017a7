"""Regions and map grids: metric spacing at any latitude, polygon masks, raster grids, lazy chunks, errors."""

from __future__ import annotations

import json
import time
import tracemalloc
import types

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_transform

from psm.maps.grid import (
    MAX_POINTS,
    Grid,
    Region,
    RegionError,
    grid_for_region,
    grid_like_raster,
    haversine_m,
    parse_bbox,
)


def _all_points(grid: Grid):
    return grid.points(0, len(grid))


def _neighbour_distances(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """Distances (m) from every point to its east and south neighbour (where both are points)."""
    c = _all_points(grid)
    lookup = np.full((grid.height, grid.width), -1, dtype=np.int64)
    lookup[c.row, c.col] = c.point_id
    east = lookup[c.row, np.minimum(c.col + 1, grid.width - 1)]
    south = lookup[np.minimum(c.row + 1, grid.height - 1), c.col]
    ok_e = (east >= 0) & (c.col + 1 < grid.width)
    ok_s = (south >= 0) & (c.row + 1 < grid.height)
    de = haversine_m(c.latitude[ok_e], c.longitude[ok_e], c.latitude[east[ok_e]], c.longitude[east[ok_e]])
    ds = haversine_m(c.latitude[ok_s], c.longitude[ok_s], c.latitude[south[ok_s]], c.longitude[south[ok_s]])
    return de, ds


@pytest.mark.parametrize("lat", [0.0, 60.0])
def test_spacing_is_metric_at_any_latitude(lat):
    # ~50 km box: neighbours are `spacing` apart east-west and north-south, at the equator and at 60°.
    grid = grid_for_region(Region.from_bbox(10.0, lat - 0.25, 10.0 + 0.5 / np.cos(np.radians(lat)), lat + 0.25), 1000)
    de, ds = _neighbour_distances(grid)
    assert len(de) > 1000 and len(ds) > 1000
    # Haversine uses a sphere; the grid is on the WGS 84 ellipsoid: they differ by < 0.7 %.
    for d in (de, ds):
        assert np.all(np.abs(d / 1000.0 - 1.0) < 0.01), (d.min(), d.max())
    # Rows of the raster run east-west: the latitude falls from top to bottom.
    c = _all_points(grid)
    top, bottom = c.latitude[c.row == 0].mean(), c.latitude[c.row == grid.height - 1].mean()
    assert top > bottom


def test_grid_is_a_raster_with_points_at_pixel_centres():
    grid = grid_for_region(Region.from_bbox(5.0, 45.0, 5.2, 45.1), 500)
    d = grid.to_dict()
    assert set(d) == {"crs", "transform", "width", "height"}
    a, b, c0, dd, e, f = d["transform"]
    assert a == 500 and e == -500 and b == 0 and dd == 0
    pts = grid.points(0, 5)
    x, y = warp_transform("EPSG:4326", grid.crs, pts.longitude.tolist(), pts.latitude.tolist())
    # back-projected, each point sits at the centre of its pixel (row, col)
    np.testing.assert_allclose(x, c0 + (pts.col + 0.5) * a, atol=1e-3)
    np.testing.assert_allclose(y, f + (pts.row + 0.5) * e, atol=1e-3)
    assert pts.point_id.dtype == np.int64 and pts.row.dtype == np.int32 and pts.latitude.dtype == np.float64


def test_polygon_mask_matches_point_in_polygon():
    # Triangle lon > 0, lat > 0, lon + lat < 1 (edges straight in lon/lat, as GeoJSON means them).
    tri = {"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 1], [0, 0]]]}
    grid = grid_for_region(Region.from_geojson(tri), 2000)
    c = _all_points(grid)
    inside = (c.longitude > 0) & (c.latitude > 0) & (c.longitude + c.latitude < 1)
    assert inside.mean() > 0.995
    # ... and nearly every pixel centre of the raster that is inside is a point (only edge pixels may differ)
    rows, cols = np.mgrid[0 : grid.height, 0 : grid.width]
    x, y = grid.xy(rows.ravel(), cols.ravel())
    lon, lat = (np.asarray(v) for v in warp_transform(grid.crs, "EPSG:4326", x.tolist(), y.tolist()))
    truth = (lon > 0) & (lat > 0) & (lon + lat < 1)
    assert abs(int(truth.sum()) - len(grid)) <= 0.01 * len(grid)
    # equal-area grid: number of points × spacing² ≈ the triangle's area (~6,150 km²)
    area_km2 = 0.5 * 111.32 * 110.6 * np.cos(np.radians(0.33))
    assert abs(len(grid) * 4.0 - area_km2) / area_km2 < 0.03


def test_geojson_file_feature_collection_and_holes(tmp_path):
    outer = [[10, 50], [10.6, 50], [10.6, 50.4], [10, 50.4], [10, 50]]
    hole = [[10.2, 50.1], [10.4, 50.1], [10.4, 50.3], [10.2, 50.3], [10.2, 50.1]]
    fc = {
        "type": "FeatureCollection",
        "features": [
            {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [outer, hole]}},
            {"type": "Feature", "properties": {}, "geometry": {"type": "Point", "coordinates": [0, 0]}},
        ],
    }
    path = tmp_path / "region.geojson"
    path.write_text(json.dumps(fc))
    region = Region.from_geojson(path)
    assert region.kind == "polygon" and region.name == "region.geojson"
    grid = grid_for_region(region, 1000)
    c = _all_points(grid)
    in_hole = (c.longitude > 10.21) & (c.longitude < 10.39) & (c.latitude > 50.11) & (c.latitude < 50.29)
    assert not in_hole.any()
    full = grid_for_region(Region.from_geojson({"type": "Polygon", "coordinates": [outer]}), 1000)
    assert len(full) > len(grid)
    desc = grid.region
    assert desc["type"] == "polygon" and len(desc["sha256"]) == 16 and "/" not in (desc["name"] or "")


def test_grid_like_raster_and_masked_raster(tmp_path):
    path = tmp_path / "target.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=40, height=30, count=1, dtype="uint8",
        crs="EPSG:32633", transform=from_origin(500000, 5800000, 250, 250),
    ) as dst:  # fmt: skip
        dst.write(np.zeros((1, 30, 40), np.uint8))
    grid = grid_like_raster(path)
    assert (grid.width, grid.height, grid.crs) == (40, 30, "EPSG:32633")
    assert grid.to_dict()["transform"] == [250.0, 0.0, 500000.0, 0.0, -250.0, 5800000.0]
    assert len(grid) == 1200
    c = _all_points(grid)
    assert c.row[41] == 1 and c.col[41] == 1
    x, y = warp_transform("EPSG:4326", "EPSG:32633", c.longitude[:3].tolist(), c.latitude[:3].tolist())
    np.testing.assert_allclose(x, [500125, 500375, 500625], atol=1e-3)
    np.testing.assert_allclose(y, [5799875] * 3, atol=1e-3)
    # masked by a bbox covering the western half
    lon_mid = float(np.median(c.longitude))
    half = grid_like_raster(path, Region.from_bbox(c.longitude.min() - 1, 51, lon_mid, 53))
    hc = _all_points(half)
    assert 0.3 * len(grid) < len(half) < 0.7 * len(grid)
    assert hc.longitude.max() <= lon_mid
    assert half.to_dict() == grid.to_dict()  # same raster, fewer points


def test_chunks_are_lazy_and_consistent():
    grid = grid_for_region(
        Region.from_geojson({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 1], [0, 0]]]}), 3000
    )
    gen = grid.iter_chunks(97)
    assert isinstance(gen, types.GeneratorType)
    chunks = list(gen)
    assert len(chunks) == grid.num_chunks(97)
    ids = np.concatenate([c.point_id for c in chunks])
    np.testing.assert_array_equal(ids, np.arange(len(grid)))
    whole = _all_points(grid)
    k = 3
    ck = grid.chunk(k, 97)
    np.testing.assert_array_equal(ck.row, whole.row[k * 97 : (k + 1) * 97])
    np.testing.assert_array_equal(ck.col, whole.col[k * 97 : (k + 1) * 97])
    np.testing.assert_allclose(ck.latitude, whole.latitude[k * 97 : (k + 1) * 97])
    point_ids, lat, lon, row, col = ck  # unpacks as a tuple of arrays
    assert len(point_ids) == len(lat) == len(lon) == len(row) == len(col) == 97
    # row-major, unique pixels
    flat = whole.row.astype(np.int64) * grid.width + whole.col
    assert np.all(np.diff(flat) > 0)


def test_country_sized_grid_without_materialising():
    # Contiguous USA bbox at 1 km: ~14 M points; building it and taking a late chunk stays small and fast.
    tracemalloc.start()
    t0 = time.perf_counter()
    grid = grid_for_region(Region.from_bbox(-125.0, 24.5, -66.9, 49.4), 1000)
    k = grid.num_chunks(4096) - 5
    chunk = grid.chunk(k, 4096)
    elapsed = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert 10_000_000 < len(grid) < 20_000_000
    assert len(chunk) == 4096 and chunk.point_id[0] == k * 4096
    assert peak < 80 * 2**20, f"peak {peak / 2**20:.1f} MB"
    assert elapsed < 10
    assert np.all((chunk.latitude > 24) & (chunk.latitude < 50))


def test_antimeridian_bbox_is_one_contiguous_grid():
    cross = grid_for_region(Region.from_bbox(170, -10, -170, 10), 20_000)
    ref = grid_for_region(Region.from_bbox(-10, -10, 10, 10), 20_000)
    assert abs(len(cross) - len(ref)) <= 0.01 * len(ref)
    assert abs(cross.width - ref.width) <= 1 and abs(cross.height - ref.height) <= 1
    c = _all_points(cross)
    assert np.all((c.longitude >= 170) | (c.longitude <= -170))
    assert (c.longitude > 175).any() and (c.longitude < -175).any()
    # neighbours across ±180° are still 20 km apart
    de, _ = _neighbour_distances(cross)
    assert np.all(np.abs(de / 20_000 - 1) < 0.01)
    # the same region as a GeoJSON MultiPolygon split at the antimeridian (RFC 7946) gives the same grid size
    split = {
        "type": "MultiPolygon",
        "coordinates": [
            [[[170, -10], [180, -10], [180, 10], [170, 10], [170, -10]]],
            [[[-180, -10], [-170, -10], [-170, 10], [-180, 10], [-180, -10]]],
        ],
    }
    region = Region.from_geojson(split)
    assert region.crosses_antimeridian
    assert abs(len(grid_for_region(region, 20_000)) - len(cross)) <= 0.01 * len(cross)


def test_polar_region():
    grid = grid_for_region(Region.from_bbox(0, 85, 90, 90), 20_000)
    c = _all_points(grid)
    assert np.all(c.latitude <= 90) and np.all(c.latitude >= 85 - 0.01)


@pytest.mark.parametrize(
    "bbox, message",
    [
        ((0, -95, 10, 10), "outside \\[-90, 90\\]"),
        ((0, 0, 10, 91), "outside \\[-90, 90\\]"),
        ((0, 10, 10, 10), "empty"),
        ((0, 20, 10, 10), "empty"),
        ((5, 0, 5, 10), "empty"),
        ((190, 0, 200, 10), "outside \\[-180, 180\\]"),
        ((-170, 0, 170, 10), "spans 340"),
    ],
)
def test_bad_bbox_is_refused(bbox, message):
    with pytest.raises(RegionError, match=message):
        Region.from_bbox(*bbox)


def test_other_errors():
    with pytest.raises(RegionError, match="4 numbers"):
        parse_bbox(["1", "2", "3"])
    with pytest.raises(RegionError, match="no Polygon"):
        Region.from_geojson({"type": "Point", "coordinates": [0, 0]})
    with pytest.raises(RegionError, match="outside \\[-90, 90\\]"):
        Region.from_geojson({"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [0, 100], [0, 0]]]})
    with pytest.raises(RegionError, match="not found"):
        Region.from_geojson("/nonexistent/region.geojson")
    region = Region.from_bbox(0, 0, 0.001, 0.001)  # ~110 m square
    with pytest.raises(RegionError, match="empty"):
        grid_for_region(region, 50_000)  # no pixel centre falls inside
    with pytest.raises(RegionError, match="spacing_m"):
        grid_for_region(region, -1)
    # the whole 180° band at 10 m: billions of points, refused before anything is allocated
    with pytest.raises(RegionError, match=f"{MAX_POINTS:,}"):
        grid_for_region(Region.from_bbox(-90, -60, 90, 60), 10)
    with pytest.raises(RegionError, match="geographic"):
        grid_for_region(region, 10, crs="EPSG:4326")
    small = grid_for_region(Region.from_bbox(0, 0, 0.1, 0.1), 1000, max_points=50, force=True)
    assert len(small) > 50
    with pytest.raises(RegionError, match="limit of 50"):
        grid_for_region(Region.from_bbox(0, 0, 0.1, 0.1), 1000, max_points=50)


def test_explicit_crs_grid():
    grid = grid_for_region(Region.from_bbox(5, 45, 5.5, 45.3), 1000, crs="EPSG:6933")
    assert grid.crs == "EPSG:6933"
    # EPSG:6933 is cylindrical: a lon/lat box is a rectangle, so every pixel is a point
    assert len(grid) >= 0.95 * grid.width * grid.height


def test_a_grid_crs_whose_units_are_not_ground_metres_is_refused():
    # Web Mercator at 52° N: a "1,000 m" cell is 0.61 × 0.61 km on the ground; the index would record 1,000 m.
    region = Region.from_bbox(12.0, 52.0, 12.5, 52.3)
    with pytest.raises(RegionError, match=r"0\.3[5-9]–0\.3[5-9] times"):
        grid_for_region(region, 1000, crs="EPSG:3857")
    assert len(grid_for_region(region, 1000, crs="EPSG:32633")) > 0  # UTM: metres
    assert len(grid_for_region(Region.from_bbox(5, 0, 5.5, 0.3), 1000, crs="EPSG:3857")) > 0  # at the equator


@pytest.mark.parametrize("crs", ["EPSG:6933", "EPSG:3857"])
def test_a_region_across_the_grid_crs_antimeridian_is_refused_not_inverted(crs):
    # Both CRSs pass the ground-metre check at the equator, but their x wraps at ±180°: the projected box would
    # be the rest of the world (a 40,000 km wide grid of every point *outside* the region).
    region = Region.from_bbox(170, -10, -170, 10)
    with pytest.raises(RegionError, match="crosses the edge"):
        grid_for_region(region, 20_000, crs=crs)
    grid = grid_for_region(region, 20_000, crs="EPSG:32660")  # a CRS centred near 180°: fine
    c = _all_points(grid)
    assert np.all((c.longitude >= 170) | (c.longitude <= -170))


@pytest.mark.parametrize("x0, lon0", [(-180.0, -180.0), (0.0, 350.0)])
def test_a_geographic_target_raster_is_masked_on_either_side_of_the_antimeridian(tmp_path, x0, lon0):
    # A degree raster covering -180…-170 (or 350…360 of a 0…360 raster) and a region given on the other
    # side of ±180° (or as -10…10 of longitude): the part of the region in the raster is masked in.
    path = tmp_path / "geo.tif"
    width = round((lon0 + 10 - x0) / 0.1)
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=200, count=1, dtype="uint8",
        crs="EPSG:4326", transform=from_origin(x0, 10, 0.1, 0.1),
    ) as dst:  # fmt: skip
        dst.write(np.zeros((1, 200, width), np.uint8))
    region = Region.from_bbox(170, -10, -170, 10) if x0 < 0 else Region.from_bbox(-10, -10, 10, 10)
    grid = grid_like_raster(path, region)
    c = _all_points(grid)
    assert len(grid) == (100 if x0 < 0 else 200) * 200
    assert np.all((c.longitude >= 170) | (c.longitude <= -170)) if x0 < 0 else np.all(np.abs(c.longitude) <= 10)

"""Imagery providers for map points: local rasters, the XYZ tile client (against a faulty server), folders."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pandas as pd
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_transform

from psm.maps.sources import FolderProvider, RasterProvider, XYZProvider, group_windows, parse_source
from psm.maps.tiles import (
    TileClient,
    TileFetchError,
    choose_zoom,
    lonlat_to_pixel,
    mercator_resolution,
    read_footprint,
)
from tile_server import TileServer, tile_colour

# --------------------------------------------------------------------------------------------------------
# Local rasters
# --------------------------------------------------------------------------------------------------------


def write_pattern_raster(path, width=400, height=300, x0=330000.0, y0=5830000.0, res=10.0, crs="EPSG:32633"):
    """A raster whose pixel (row, col) is (col % 256, row % 256, 7): reads show where they came from."""
    rows, cols = np.mgrid[0:height, 0:width]
    data = np.stack([cols % 256, rows % 256, np.full_like(rows, 7)]).astype(np.uint8)
    with rasterio.open(
        path, "w", driver="GTiff", width=width, height=height, count=3, dtype="uint8",
        crs=crs, transform=from_origin(x0, y0, res, res), tiled=True, blockxsize=128, blockysize=128,
    ) as dst:  # fmt: skip
        dst.write(data)
    return path


def lonlat_of_pixel(row, col, x0=330000.0, y0=5830000.0, res=10.0, crs="EPSG:32633"):
    lon, lat = warp_transform(crs, "EPSG:4326", [x0 + (col + 0.5) * res], [y0 - (row + 0.5) * res])
    return lat[0], lon[0]


def test_raster_provider_is_centred_and_none_outside(tmp_path):
    path = write_pattern_raster(tmp_path / "a.tif")
    with RasterProvider([path], workers=2) as prov:
        lat, lon = lonlat_of_pixel(150, 200)
        img = prov.read(lat, lon, 64, 10.0)
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert tuple(img[32, 32]) == (200, 150, 7)  # the point's own pixel sits at size // 2
        assert tuple(img[0, 0]) == (200 - 32, 150 - 32, 7)
        # far away: no imagery, and that is not a problem
        assert prov.read(10.0, 10.0, 64, 10.0) is None
        # near the edge: the footprint is partial → None by default, the mask says which part
        lat_e, lon_e = lonlat_of_pixel(150, 5)
        assert prov.read(lat_e, lon_e, 64, 10.0) is None
        _, valid = prov.read_masked(lat_e, lon_e, 64, 10.0)
        assert valid is not None and 0.5 < valid.mean() < 1.0 and not valid[:, :20].any()
        assert prov.read(lat_e, lon_e, 64, 10.0, min_valid=0.5) is not None
        # resampled read (20 m): still centred on the point
        img20 = prov.read(lat, lon, 32, 20.0)
        assert img20.shape == (32, 32, 3) and abs(int(img20[16, 16, 0]) - 200) <= 2
        assert prov.problems == []
        assert prov.describe() == {"type": "raster", "files": ["a.tif"], "bands": [1, 2, 3], "scale": None}


def test_raster_provider_nodata_inside_is_masked(tmp_path):
    path = tmp_path / "nd.tif"
    data = np.full((3, 200, 200), 100, np.uint8)
    data[:, 90:110, 90:110] = 0  # a hole of nodata in the middle
    with rasterio.open(
        path, "w", driver="GTiff", width=200, height=200, count=3, dtype="uint8", nodata=0,
        crs="EPSG:32633", transform=from_origin(330000.0, 5830000.0, 10.0, 10.0),
    ) as dst:  # fmt: skip
        dst.write(data)
    with RasterProvider([path]) as prov:
        lat, lon = lonlat_of_pixel(100, 100)
        assert prov.read(lat, lon, 64, 10.0) is None  # deep inside, but 10 % of it is nodata
        _, valid = prov.read_masked(lat, lon, 64, 10.0)
        assert valid[32, 32] == 0 and valid.mean() == pytest.approx(1 - 400 / 4096)
        lat, lon = lonlat_of_pixel(40, 40)
        assert prov.read(lat, lon, 32, 10.0) is not None


def test_raster_provider_many_files_and_crs(tmp_path):
    # two adjacent UTM rasters and one in EPSG:4326 elsewhere
    a = write_pattern_raster(tmp_path / "a.tif")
    b = write_pattern_raster(tmp_path / "b.tif", x0=334000.0)
    rows, cols = np.mgrid[0:200, 0:200]
    with rasterio.open(
        tmp_path / "geo.tif", "w", driver="GTiff", width=200, height=200, count=3, dtype="uint8",
        crs="EPSG:4326", transform=from_origin(20.0, 40.0, 0.0001, 0.0001),
    ) as dst:  # fmt: skip
        dst.write(np.stack([cols % 256, rows % 256, np.full_like(rows, 9)]).astype(np.uint8))
    with RasterProvider([a, b, tmp_path / "geo.tif"], workers=3) as prov:
        lat, lon = lonlat_of_pixel(150, 100, x0=334000.0)  # column 100 of raster b
        assert [i for i, _ in prov.candidates(lat, lon)] == [1]
        assert tuple(prov.read(lat, lon, 32, 10.0)[16, 16]) == (100, 150, 7)
        # the geographic raster is warped to a local metric grid around the point
        geo = prov.read(39.99, 20.01, 32, 5.0)
        assert geo is not None and geo.shape == (32, 32, 3) and np.all(geo[..., 2] == 9)
        # read_many on the thread pool equals one-by-one reads
        pts = [lonlat_of_pixel(100 + 10 * i, 100 + 20 * i) for i in range(8)] + [(0.0, 0.0)]
        many = prov.read_many([p[0] for p in pts], [p[1] for p in pts], 48, 10.0)
        assert many[-1] is None
        for (la, lo), img in zip(pts[:-1], many[:-1], strict=True):
            np.testing.assert_array_equal(img, prov.read(la, lo, 48, 10.0))


def assert_same_reads(want, hwc, chw) -> set[str]:
    """Batch reads (HWC and CHW) equal the point reads ``want``, masks included; returns the kinds seen."""
    kinds = set()
    for w, h, c in zip(want, hwc, chw, strict=True):
        assert (w is None) == (h is None) == (c is None)
        if w is None:
            kinds.add("none")
            continue
        np.testing.assert_array_equal(h[0], w[0])
        np.testing.assert_array_equal(c[0], w[0].transpose(2, 0, 1))
        assert (h[1] is None) == (w[1] is None) == (c[1] is None)
        if w[1] is not None:
            np.testing.assert_array_equal(h[1], w[1])
            np.testing.assert_array_equal(c[1], w[1])
        kinds.add("masked" if w[1] is not None else "full")
    return kinds


def test_raster_batch_reads_equal_point_reads(tmp_path):
    """read_masked_batch (one transform per file, bare reads) gives exactly what read_masked gives per point:
    deep points of two overlapping files (the deeper file wins), edges (masked), nodata, outside, 20 m."""
    a = write_pattern_raster(tmp_path / "a.tif", width=500)
    b = write_pattern_raster(tmp_path / "b.tif", x0=333000.0, width=500)  # overlaps a's right 200 columns
    nd = tmp_path / "nd.tif"
    data = np.full((3, 200, 200), 100, np.uint8)
    data[:, 90:110, 90:110] = 0
    with rasterio.open(
        nd, "w", driver="GTiff", width=200, height=200, count=3, dtype="uint8", nodata=0,
        crs="EPSG:32633", transform=from_origin(340000.0, 5830000.0, 10.0, 10.0),
    ) as dst:  # fmt: skip
        dst.write(data)
    pts = [lonlat_of_pixel(r, c) for r in (40, 150, 260) for c in (40, 250, 330, 420, 495)]
    pts += [lonlat_of_pixel(100, 100, x0=340000.0), lonlat_of_pixel(30, 30, x0=340000.0), (0.0, 0.0)]
    lats, lons = [p[0] for p in pts], [p[1] for p in pts]
    with RasterProvider([a, b, nd], workers=1) as prov:
        point_reads = []
        per_point = prov.read_masked
        prov.read_masked = lambda *args: point_reads.append(args) or per_point(*args)
        for size, gsd in ((48, 10.0), (64, 10.0), (32, 20.0)):
            point_reads.clear()
            batch = prov.read_masked_batch(lats, lons, size, gsd)
            # Native resolution: only the points not deep inside a nodata-free file take the per-point path.
            assert len(point_reads) < len(pts) if gsd == 10.0 else len(point_reads) == len(pts)
            one_by_one = [per_point(la, lo, size, gsd) for la, lo in pts]
            planar = prov.read_masked_batch(lats, lons, size, gsd, channels_first=True)
            assert assert_same_reads(one_by_one, batch, planar) == {"none", "masked", "full"}
        # In the overlap the deeper file wins: (row 150, col 420) of a is 80 px from a's edge and column 120
        # of b, 120 px from b's; at col 330 a is deeper (150 px against 30).
        img, _ = prov.read_masked_batch([pts[8][0]], [pts[8][1]], 48, 10.0)[0]
        assert tuple(img[24, 24]) == (120, 150, 7)
        img, _ = prov.read_masked_batch([pts[7][0]], [pts[7][1]], 48, 10.0)[0]
        assert tuple(img[24, 24]) == (330 % 256, 150, 7)
        assert prov.problems == []


def test_raster_across_the_antimeridian_is_found_on_both_sides(tmp_path):
    # A UTM zone 60 raster straddling ±180°: its lat/lon bounds come back with west > east, and points on
    # either side of the antimeridian must still find it (not read as "no imagery").
    kw = dict(x0=832000.0, y0=50000.0, crs="EPSG:32660")
    path = write_pattern_raster(tmp_path / "am.tif", **kw)
    west = lonlat_of_pixel(150, 50, **kw)
    east = lonlat_of_pixel(150, 350, **kw)
    assert west[1] > 179.9 and east[1] < -179.9
    with RasterProvider([path], workers=1) as prov:
        for (lat, lon), col in ((west, 50), (east, 350)):
            assert [i for i, _ in prov.candidates(lat, lon)] == [0]
            assert tuple(prov.read(lat, lon, 32, 10.0)[16, 16]) == (col % 256, 150, 7)
        batch = prov.read_masked_batch([west[0], east[0]], [west[1], east[1]], 32, 10.0)
        assert [tuple(img[16, 16]) for img, _ in batch] == [(50, 150, 7), (350 % 256, 150, 7)]
        assert prov.problems == []


def test_group_windows_reads_a_box_only_when_it_is_no_larger_than_its_windows():
    assert group_windows(np.array([], dtype=int), np.array([], dtype=int), 10) == []
    runs = group_windows(np.array([0, 2, 4, 100, 0]), np.array([0, 0, 0, 0, 40]), 10)
    # 0/2/4 on a row: a 14 × 10 box ≤ 3 windows; 100 is too far (a 110-wide box), and so is the next row.
    assert [r.tolist() for r in runs] == [[0, 1, 2], [3], [4]]
    # Exactly as large as its windows together still groups (2 × 10 × 10 = a 20 × 10 box).
    assert [r.tolist() for r in group_windows(np.array([0, 10]), np.array([0, 0]), 10)] == [[0, 1]]
    assert [r.tolist() for r in group_windows(np.array([0, 11]), np.array([0, 0]), 10)] == [[0], [1]]


def test_raster_blocks_read_overlapping_footprints_once(tmp_path, monkeypatch):
    """Neighbouring points of a map grid: one read per run of overlapping footprints, the same pixels as
    point reads in both layouts, with edge points (masked) and an outside point mixed in, in point order."""
    import psm.data.imagery as imagery

    path = write_pattern_raster(tmp_path / "a.tif", width=500)
    pts = [lonlat_of_pixel(r, c) for r in (60, 70) for c in range(40, 200, 10)]
    pts += [lonlat_of_pixel(5, 250), (0.0, 0.0), lonlat_of_pixel(150, 450)]
    lats, lons = [p[0] for p in pts], [p[1] for p in pts]
    reads = []
    plain = imagery.read_pixel_window
    monkeypatch.setattr(imagery, "read_pixel_window", lambda *a, **k: reads.append(a[1:5]) or plain(*a, **k))
    with RasterProvider([path], workers=1) as prov:
        want = [prov.read_masked(la, lo, 48, 10.0) for la, lo in pts]
        blocks = prov.read_blocks(lats, lons, 48, 10.0, channels_first=True)
        assert sorted(k for b in blocks for k, _, _ in b.members) == [k for k, w in enumerate(want) if w is not None]
        assert len(reads) < len(pts) // 4 and max(len(b.members) for b in blocks) > 4
        hwc = prov.read_masked_batch(lats, lons, 48, 10.0)
        chw = prov.read_masked_batch(lats, lons, 48, 10.0, channels_first=True)
        assert prov.read_blocks([], [], 48, 10.0) == [] and prov.read_masked_batch([], [], 48, 10.0) == []
    assert assert_same_reads(want, hwc, chw) == {"none", "full", "masked"}


def test_raster_batch_reads_of_scaled_uint16_bands(tmp_path):
    """Reflectance-like uint16 bands with a scale (and a band order): batch reads, both layouts, as point reads."""
    rng = np.random.default_rng(3)
    data = rng.integers(0, 4000, (4, 300, 300), dtype=np.uint16)
    path = tmp_path / "u16.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=300, height=300, count=4, dtype="uint16",
        crs="EPSG:32633", transform=from_origin(330000.0, 5830000.0, 10.0, 10.0),
    ) as dst:  # fmt: skip
        dst.write(data)
    pts = [lonlat_of_pixel(r, c) for r, c in ((150, 150), (100, 200), (10, 150))]
    lats, lons = [p[0] for p in pts], [p[1] for p in pts]
    with RasterProvider([path], bands=(4, 3, 2), scale=(0, 3000), workers=1) as prov:
        want = [prov.read_masked(la, lo, 64, 10.0) for la, lo in pts]
        hwc = prov.read_masked_batch(lats, lons, 64, 10.0)
        chw = prov.read_masked_batch(lats, lons, 64, 10.0, channels_first=True)
    assert want[2][1] is not None  # the edge point is masked (per-point path), the others are full
    for w, h, c in zip(want, hwc, chw, strict=True):
        assert w[0].dtype == h[0].dtype == c[0].dtype == np.uint8
        np.testing.assert_array_equal(h[0], w[0])
        np.testing.assert_array_equal(c[0], w[0].transpose(2, 0, 1))
    window = data[3, 150 - 32 : 150 + 32, 150 - 32 : 150 + 32].astype(np.float32)
    expected = np.rint(np.clip(window * np.float32(255 / 3000), 0, 255))  # the reader's float32 arithmetic
    np.testing.assert_array_equal(chw[0][0][0], expected.astype(np.uint8))  # band 4 first, scaled and clipped


def test_raster_provider_bad_files(tmp_path):
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(ValueError, match="cannot open raster"):
        RasterProvider([tmp_path / "bad.tif"])
    with pytest.raises(FileNotFoundError):
        RasterProvider([str(tmp_path / "*.jp2")])
    with rasterio.open(
        tmp_path / "u16.tif", "w", driver="GTiff", width=8, height=8, count=3, dtype="uint16",
        crs="EPSG:32633", transform=from_origin(0, 0, 10, 10),
    ) as dst:  # fmt: skip
        dst.write(np.full((3, 8, 8), 3000, np.uint16))
    with pytest.raises(ValueError, match="scale"):
        RasterProvider([tmp_path / "u16.tif"])
    with pytest.raises(ValueError, match="band"):
        RasterProvider([tmp_path / "u16.tif"], bands=(4,), scale=(0, 3000))
    assert RasterProvider([tmp_path / "u16.tif"], scale=(0, 3000)).describe()["scale"] == [0, 3000]
    with pytest.raises(ValueError, match="unknown kind"):
        parse_source("wms:http://x")


def test_raster_provider_reads_flipped_rotated_and_web_mercator_rasters_on_the_ground(tmp_path):
    """South-up, rotated and Web Mercator rasters are warped per footprint: the footprint is centred on the
    point, north-up and gsd_m metres per pixel on the ground (read as stored, the first came out upside down
    and the last, where 1,000 CRS units are ~610 m at 52° N, 0.61 times too small)."""
    from affine import Affine
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    from psm.data.imagery import ground_scale_error, reads_in_place

    write_pattern_raster(tmp_path / "north.tif")
    with rasterio.open(tmp_path / "north.tif") as src:
        data, profile = src.read(), src.profile
        assert reads_in_place(src) and ground_scale_error(src) < 0.002  # UTM
    t = profile["transform"]
    south_up = Affine(t.a, 0.0, t.c, 0.0, -t.e, t.f + t.e * profile["height"])
    with rasterio.open(tmp_path / "south_up.tif", "w", **(profile | {"transform": south_up})) as dst:
        dst.write(np.ascontiguousarray(data[:, ::-1]))
    bounds = rasterio.transform.array_bounds(profile["height"], profile["width"], t)  # west, south, east, north
    # ~16.4 Web Mercator units per pixel: ~10 m on the ground at 52.6° N
    merc_t, w, h = calculate_default_transform(
        profile["crs"], "EPSG:3857", profile["width"], profile["height"], *bounds, resolution=16.4
    )
    merc = np.zeros((3, h, w), dtype=np.uint8)
    reproject(data, merc, src_transform=t, src_crs=profile["crs"], dst_transform=merc_t, dst_crs="EPSG:3857",
              resampling=Resampling.nearest)  # fmt: skip
    merc_profile = profile | {"crs": "EPSG:3857", "transform": merc_t, "width": w, "height": h}
    with rasterio.open(tmp_path / "merc.tif", "w", **merc_profile) as dst:
        dst.write(merc)
    with rasterio.open(tmp_path / "merc.tif") as src:
        assert not reads_in_place(src) and ground_scale_error(src) > 0.35  # 1 − cos(52.6°)
    lat, lon = lonlat_of_pixel(150, 200)
    with RasterProvider([tmp_path / "north.tif"]) as prov:
        reference = prov.read(lat, lon, 64, 10.0).astype(int)
    for name in ("south_up.tif", "merc.tif"):
        with RasterProvider([tmp_path / name]) as prov:
            img = prov.read(lat, lon, 64, 10.0)
            assert img is not None and prov.problems == [], name
            # the point's own pixel in the middle, and the footprint's corners 32 px (320 m) away on the ground
            assert np.abs(img[32, 32, :2].astype(int) - (200, 150)).max() <= 2, name
            for r, c in ((2, 2), (2, 61), (61, 2), (61, 61)):
                assert np.abs(img[r, c, :2].astype(int) - reference[r, c, :2]).max() <= 2, (name, r, c)


# --------------------------------------------------------------------------------------------------------
# XYZ tiles against the fault-injecting server
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def tile_server():
    with TileServer(slow_s=1.0) as server:
        yield server


def tile_centre(z, tx, ty):
    """(lat, lon) of the centre of tile (z, tx, ty); fractional tx/ty give other points of the tile."""
    n = 2.0**z
    lon = (tx + 0.5) / n * 360.0 - 180.0
    lat = math.degrees(math.atan(math.sinh(math.pi * (1 - 2 * (ty + 0.5) / n))))
    return lat, lon


def fast_client(server, **kw):
    kw = {"timeout_s": 0.3, "retries": 3, "backoff_s": 0.01, "seed": 0} | kw
    return TileClient(server.url_template, **kw)


def test_mercator_zoom_choice():
    assert choose_zoom(10.0, 0.0) == 14  # 9.55 m at the equator
    assert choose_zoom(10.0, 60.0) == 13  # 9.55 m at 60°: cos halves the resolution
    assert choose_zoom(0.01, 0.0, max_zoom=19) == 19
    assert mercator_resolution(0, 0.0) == pytest.approx(156543.03, rel=1e-6)
    assert lonlat_to_pixel(0.0, 0.0, 1) == pytest.approx((256.0, 256.0))


def test_tile_mosaic_is_centred(tile_server):
    client = fast_client(tile_server)
    lat, lon = tile_centre(13, 4400, 2700)
    image, valid = read_footprint(client, lat, lon, 64, 10.0)
    assert valid is None and image.shape == (64, 64, 3)
    assert tuple(image[32, 32]) == tile_colour(13, 4400, 2700)
    # a footprint of ~3 tiles mosaics the neighbours around it in the right places
    big, _ = read_footprint(client, lat, lon, 96, 60.0)  # 5.8 km ≈ 2.4 tiles of z11 at this latitude
    z = choose_zoom(60.0, lat)
    px, py = lonlat_to_pixel(lon, lat, z)
    assert tuple(big[48, 48]) == tile_colour(z, int(px // 256), int(py // 256))
    assert tile_server.total_requests == client.stats.requests


def test_retries_after_server_errors(tile_server):
    tile_server.fail_first = ["500", "503"]
    client = fast_client(tile_server)
    lat, lon = tile_centre(13, 4400, 2700)
    _, valid = read_footprint(client, lat, lon, 64, 10.0)
    assert valid is None
    assert all(n == 3 for n in tile_server.requests.values())
    assert client.stats.retries == 2 * len(tile_server.requests)
    assert client.stats.failures == 0


def test_slow_answers_time_out_and_are_retried(tile_server):
    tile_server.fail_first = ["slow"]
    client = fast_client(tile_server, timeout_s=0.25)
    t0 = time.perf_counter()
    tile = client.get(13, 4400, 2700)
    assert time.perf_counter() - t0 < 0.9  # did not wait for the 1 s answer
    assert tile[0, 0].tolist() == list(tile_colour(13, 4400, 2700))
    assert tile_server.requests[(13, 4400, 2700)] == 2 and client.stats.retries == 1


@pytest.mark.parametrize("fault", ["truncate", "corrupt"])
def test_truncated_bodies_are_detected_and_retried(tile_server, fault):
    tile_server.inject(13, 1, 2, fault, fault)
    client = fast_client(tile_server)
    tile = client.get(13, 1, 2)
    assert tile.shape == (256, 256, 3) and tile_server.requests[(13, 1, 2)] == 3


def test_giving_up_records_a_problem_and_reads_none(tile_server, tmp_path):
    lat, lon = tile_centre(13, 4400, 2700)
    prov = XYZProvider(tile_server.url_template, timeout_s=0.3, retries=2, backoff_s=0.01, cache_dir=tmp_path)
    z = choose_zoom(10.0, lat)
    px, py = lonlat_to_pixel(lon, lat, z)
    key = (z, int(px // 256), int(py // 256))
    tile_server.inject(*key, "corrupt", "corrupt", "corrupt")
    with pytest.raises(TileFetchError, match="undecodable"):
        prov.client.get(*key)
    tile_server.inject(*key, "corrupt", "corrupt", "corrupt")
    assert prov.read(lat, lon, 64, 10.0) is None  # the only tile under the footprint failed
    assert len(prov.problems) == 2 and "giving up after 3 attempt(s)" in prov.problems[0].reason
    assert not list(tmp_path.rglob("*.png"))  # nothing bad was cached
    # a non-retryable status fails at once
    tile_server.inject(13, 5, 5, "403")
    with pytest.raises(TileFetchError, match="HTTP 403"):
        prov.client.get(13, 5, 5)
    assert tile_server.requests[(13, 5, 5)] == 1


def test_tile_keys_come_from_the_environment_and_are_never_written(tile_server, tmp_path, monkeypatch):
    """A keyed layer ({env:NAME} in the URL and a header): requests carry the keys; describe(), the cache
    folder, problem records and errors keep the placeholders."""
    monkeypatch.setenv("TILE_KEY", "s3cr3t-key")
    monkeypatch.setenv("TILE_TOKEN", "t0ken-value")
    tile_server.required_query = "key=s3cr3t-key"
    tile_server.required_headers = {"Authorization": "Bearer t0ken-value"}
    template = tile_server.url_template + "?key={env:TILE_KEY}"
    headers = {"Authorization": "Bearer {env:TILE_TOKEN}"}
    lat, lon = tile_centre(13, 4400, 2700)
    with XYZProvider(template, headers=headers, cache_dir=tmp_path, backoff_s=0.01, retries=1) as prov:
        image, valid = prov.read_masked(lat, lon, 64, 10.0)
        assert valid is None and tuple(image[32, 32]) == tile_colour(13, 4400, 2700)
        assert prov.describe()["url"] == template
        tile_server.inject(13, 4401, 2700, "500", "500")  # a neighbour the server fails twice: given up
        with pytest.raises(TileFetchError) as error:
            prov.client.get(13, 4401, 2700)
    assert "key={env:TILE_KEY}: giving up" in str(error.value) and "s3cr3t" not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] and not [p for p in tmp_path.rglob("*") if "s3cr3t" in str(p)]
    # Without the header the keyed server refuses (403: no retries); the record names the URL, not the key.
    with XYZProvider(template, backoff_s=0.01, retries=1) as prov:
        assert prov.read_masked(lat, lon, 64, 10.0) is None
        assert "HTTP 403" in repr(prov.problems) and "{env:TILE_KEY}" in repr(prov.problems)
        assert "s3cr3t" not in repr(prov.problems)
    monkeypatch.delenv("TILE_KEY")
    with pytest.raises(ValueError, match="environment variable TILE_KEY is not set"):
        XYZProvider(template)


def test_404_is_no_imagery_not_an_error(tile_server):
    tile_server.fail_first = ["404"] * 10
    prov = XYZProvider(tile_server.url_template, timeout_s=0.3, retries=3, backoff_s=0.01)
    lat, lon = tile_centre(13, 4400, 2700)
    assert prov.read(lat, lon, 64, 10.0) is None
    assert all(n == 1 for n in tile_server.requests.values())  # no retries for a 404
    assert prov.problems == [] and prov.client.stats.missing == len(tile_server.requests)


def test_partly_missing_tiles_give_a_mask(tile_server):
    lat, lon = tile_centre(13, 4400.4, 2700)  # 90 % of the way east through tile x = 4400
    client = fast_client(tile_server)
    # the footprint (64 px at 10 m ≈ 55 tile px) reaches into the east neighbour: make that one 404
    tile_server.missing.add((13, 4401, 2700))
    image, valid = read_footprint(client, lat, lon, 64, 10.0)
    assert valid is not None and not valid[32, -1] and valid[32, 32]
    assert 0.9 < valid.mean() < 1.0  # the footprint ends ~2 tile px into the missing tile
    assert np.all(image[~valid] == 0)


def test_transparent_tile_pixels_are_no_imagery(tile_server, tmp_path):
    # A layer's edge of coverage comes as transparent pixels: they were scored as black imagery.
    lat, lon = tile_centre(13, 4400, 2700)  # the footprint spans the tile's middle
    tile_server.transparent.add((13, 4400, 2700))  # east half transparent
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # fresh, then from the disk cache
        client = fast_client(tile_server, cache_dir=cache)
        image, valid = read_footprint(client, lat, lon, 64, 10.0)
        assert valid is not None and valid[32, 5] and not valid[32, -5]
        assert np.all(image[~valid] == 0) and image[32, 5].tolist() == list(tile_colour(13, 4400, 2700))
    opaque = fast_client(tile_server).get(13, 4401, 2700)
    assert opaque.shape[-1] == 3  # an opaque tile stays RGB


def test_cache_is_reused_on_rerun(tile_server, tmp_path):
    lat, lon = tile_centre(13, 4400.4, 2700)
    tile_server.missing.add((13, 4401, 2700))
    kw = {"timeout_s": 0.3, "retries": 1, "backoff_s": 0.01, "cache_dir": tmp_path / "cache"}
    first = XYZProvider(tile_server.url_template, **kw).read_masked(lat, lon, 64, 10.0)
    assert first[1] is not None  # one tile was missing
    assert tile_server.total_requests > 0
    tile_server.reset_counts()
    second_prov = XYZProvider(tile_server.url_template, **kw)
    second = second_prov.read_masked(lat, lon, 64, 10.0)
    assert tile_server.total_requests == 0  # every tile (and the 404) came from the disk cache
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert second_prov.client.stats.requests == 0 and second_prov.client.stats.disk_hits > 0
    # a torn cache file is detected, deleted and fetched again
    path = second_prov.client.cache_path(13, 4400, 2700)
    path.write_bytes(path.read_bytes()[:50])
    third = XYZProvider(tile_server.url_template, **kw)
    assert third.client.get(13, 4400, 2700) is not None
    assert tile_server.total_requests == 1


def test_concurrency_limit(tile_server):
    tile_server.slow_s = 0.15
    tile_server.fail_first = ["slow"]  # every tile answers after 0.15 s (within the timeout)
    client = fast_client(tile_server, timeout_s=3.0, concurrency=2)
    threads = [threading.Thread(target=client.get, args=(13, i, 7)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tile_server.total_requests == 8
    assert tile_server.max_active == 2  # concurrent, but never more than the limit


def test_same_tile_from_many_threads_is_fetched_once(tile_server):
    tile_server.slow_s = 0.1
    tile_server.fail_first = ["slow"]
    client = fast_client(tile_server, timeout_s=3.0)
    out = []
    threads = [threading.Thread(target=lambda: out.append(client.get(13, 3, 3))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tile_server.requests[(13, 3, 3)] == 1 and len(out) == 6 and all(o is not None for o in out)


def test_footprint_across_the_antimeridian(tile_server):
    client = fast_client(tile_server)
    _, valid = read_footprint(client, 0.0, 179.999, 64, 10.0)
    z = choose_zoom(10.0, 0.0)
    xs = {x for (zz, x, _) in tile_server.requests if zz == z}
    assert {0, 2**z - 1} <= xs and valid is None
    assert read_footprint(client, 89.0, 0.0, 64, 10.0) is None  # beyond web mercator


# --------------------------------------------------------------------------------------------------------
# A folder of images with a CSV
# --------------------------------------------------------------------------------------------------------


def _folder(tmp_path, size=100):
    folder = tmp_path / "images"
    folder.mkdir()
    rows = []
    for i, (lat, lon) in enumerate([(52.0, 13.0), (52.01, 13.0), (40.0, -3.0)]):
        img = np.zeros((size, size, 3), np.uint8)
        img[:] = (40 * (i + 1), 10, 200)
        img[size // 2, size // 2] = (255, 255, 255)
        Image.fromarray(img).save(folder / f"k{i}_{lat}_{lon}.png")
        rows.append({"id": f"k{i}", "latitude": lat, "longitude": lon})
    return folder, rows


def test_folder_provider_nearest_within_tolerance(tmp_path):
    folder, rows = _folder(tmp_path)
    pd.DataFrame(rows).to_csv(tmp_path / "points.csv", index=False)
    prov = FolderProvider(folder, tmp_path / "points.csv", tolerance_m=500)
    img = prov.read(52.0, 13.0, 64, 10.0)
    assert img.shape == (64, 64, 3) and tuple(img[0, 0]) == (40, 10, 200)
    assert tuple(img[32, 32]) == (255, 255, 255)  # centre crop keeps the image centre at size // 2
    assert tuple(prov.read(52.0095, 13.001, 64, 10.0)[0, 0]) == (80, 10, 200)  # nearest is the second
    assert prov.read(52.005, 13.02, 64, 10.0) is None  # ~1.5 km from both: beyond the tolerance
    assert prov.read(-40.0, 100.0, 64, 10.0) is None
    # a footprint larger than the image: partial mask → None unless allowed
    assert prov.read(52.0, 13.0, 200, 10.0) is None
    image, valid = prov.read_masked(52.0, 13.0, 200, 10.0)
    assert valid.mean() == pytest.approx(0.25, abs=0.01)
    # a different GSD is resampled: 64 px at 20 m = 128 image px at 10 m (partly outside the 100 px image)
    prov10 = FolderProvider(folder, tmp_path / "points.csv", image_gsd_m=10.0, tolerance_m=500)
    image, valid = prov10.read_masked(52.0, 13.0, 64, 20.0)
    assert image.shape == (64, 64, 3) and valid is not None and 0.5 < valid.mean() < 0.7
    assert prov.describe()["csv"] == "points.csv"


def test_folder_provider_xy_and_path_columns(tmp_path):
    folder, rows = _folder(tmp_path)
    names = sorted(p.name for p in folder.iterdir())
    pd.DataFrame(
        {"key": [r["id"] for r in rows], "X": [r["longitude"] for r in rows], "Y": [r["latitude"] for r in rows]}
    ).to_csv(tmp_path / "xy.csv", index=False)
    prov = FolderProvider(folder, tmp_path / "xy.csv")
    assert tuple(prov.read(40.0, -3.0, 32, 10.0)[0, 0]) == (120, 10, 200)
    pd.DataFrame({"path": names, "lat": [52.0, 52.01, 40.0], "lon": [13.0, 13.0, -3.0]}).to_csv(
        tmp_path / "p.csv", index=False
    )
    prov = parse_source(f"folder:{folder},{tmp_path / 'p.csv'}", tolerance_m=100)
    assert prov.read(40.0, -3.0, 32, 10.0) is not None
    # a row whose image is missing is reported, not fatal
    pd.DataFrame({"id": ["k0", "nope"], "latitude": [52.0, 1.0], "longitude": [13.0, 1.0]}).to_csv(
        tmp_path / "m.csv", index=False
    )
    prov = FolderProvider(folder, tmp_path / "m.csv")
    assert len(prov.problems) == 1 and prov.problems[0].row == 1
    # numeric-looking ids keep their leading zeros
    Image.fromarray(np.full((40, 40, 3), 5, np.uint8)).save(folder / "007_1.0_2.0.png")
    pd.DataFrame({"id": ["007"], "latitude": [1.0], "longitude": [2.0]}).to_csv(tmp_path / "z.csv", index=False)
    assert FolderProvider(folder, tmp_path / "z.csv").read(1.0, 2.0, 16, 10.0)[0, 0].tolist() == [5, 5, 5]


def test_folder_provider_transparent_pixels_are_no_imagery(tmp_path):
    # A PNG exported with an alpha channel (transparent outside the scene): its transparent pixels are no
    # imagery, never the black RGB underneath scored as a real place.
    folder = tmp_path / "images"
    folder.mkdir()
    rgba = np.zeros((100, 100, 4), np.uint8)
    rgba[:, 50:] = (90, 120, 60, 255)  # the eastern half is the scene, the western half transparent black
    Image.fromarray(rgba, "RGBA").save(folder / "a.png")
    Image.fromarray(np.full((100, 100, 4), 200, np.uint8), "RGBA").save(folder / "b.png")  # opaque: all valid
    pd.DataFrame({"path": ["a.png", "b.png"], "lat": [52.0, 40.0], "lon": [13.0, -3.0]}).to_csv(
        tmp_path / "p.csv", index=False
    )
    prov = FolderProvider(folder, tmp_path / "p.csv", tolerance_m=100)
    assert prov.read(52.0, 13.0, 64, 10.0) is None
    _, valid = prov.read_masked(52.0, 13.0, 64, 10.0)
    assert not valid[:, :32].any() and valid[:, 32:].all()  # image columns 18…81 of which 50… are the scene
    assert prov.read(52.0, 13.0, 64, 10.0, min_valid=0.5) is not None
    assert prov.read_masked(40.0, -3.0, 64, 10.0)[1] is None

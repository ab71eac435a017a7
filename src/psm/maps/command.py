"""``psm map index``: the command line of the embedding index (psm.cli wires the ``map`` group).

Heavy imports (torch, rasterio, zarr) happen inside the handler so ``psm --help`` stays fast. Also runs
alone: ``python -m psm.maps.command index ...``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from psm.arguments import non_negative_int, positive_float, positive_int
from psm.data.imagery_sources import add_raster_arguments


class _UsageError(Exception):
    """A problem with the command's inputs: reported on stderr with exit code 2."""


def add_index_parser(map_subparsers: Any) -> argparse.ArgumentParser:
    """Register ``index`` under the ``map`` sub-command group (an argparse ``_SubParsersAction``)."""
    p = map_subparsers.add_parser(
        "index",
        help="embed every point of a region's grid at chosen zoom levels into a resumable Zarr index",
        description=(
            "Compute pre-fusion image features for every grid point (per zoom) into INDEX/features.zarr "
            "with INDEX/points.parquet and INDEX/index.json. Rerun the same command to resume; run it "
            "once per rank (--rank/--world-size or torchrun/SLURM env) to shard the work."
        ),
    )
    m = p.add_mutually_exclusive_group(required=True)
    m.add_argument("--checkpoint", help="psm checkpoint folder (model.safetensors + config.yaml)")
    m.add_argument("--model", help="architecture name or YAML with random weights (e.g. psm-tiny; tests, demos)")
    p.add_argument("--seed", type=int, default=0, help="weight seed for --model (so a rerun can resume)")

    r = p.add_argument_group("region and grid")
    r.add_argument("--bbox", nargs=4, metavar=("W", "S", "E", "N"), help="lon/lat box; W > E crosses ±180°")
    r.add_argument("--geojson", help="GeoJSON (Multi)Polygon file: only points inside it")
    r.add_argument("--like-raster", help="use this raster's pixel grid (CRS, transform, shape) as the points")
    r.add_argument("--spacing-m", type=positive_float, help="point spacing in metres (with --bbox / --geojson)")
    r.add_argument("--crs", help="grid CRS for --spacing-m (default: equal-area centred on the region)")
    r.add_argument("--max-points", type=positive_int, help="refuse larger grids (default 200 M)")
    r.add_argument("--force", action="store_true", help="allow grids above --max-points")

    s = p.add_argument_group("imagery")
    s.add_argument(
        "--source",
        required=True,
        help="raster:PATH[,PATH...] (GeoTIFF/COG/VRT, globs ok) | xyz:URL_TEMPLATE ({z}/{x}/{y}) | folder:DIR,CSV",
    )
    s.add_argument("--imagery-source", help="imagery kind (sentinel2, bing, ...; default: the model's)")
    s.add_argument("--zoom", type=int, nargs="+", help="zoom levels (default: all of the model's)")
    s.add_argument("--min-valid", type=float, default=1.0, help="fraction of a footprint that must have imagery")
    add_raster_arguments(s)
    s.add_argument("--cache", help="XYZ tile cache folder (reruns reuse it)")
    s.add_argument("--timeout", type=positive_float, default=10.0, help="XYZ request timeout in seconds")
    s.add_argument("--retries", type=non_negative_int, default=4, help="XYZ retries per tile")
    s.add_argument("--tile-concurrency", type=positive_int, default=8, help="simultaneous XYZ requests")
    s.add_argument("--max-tile-zoom", type=non_negative_int, default=19, help="highest web-mercator zoom the layer has")
    s.add_argument(
        "--tile-header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="an HTTP header for every XYZ request (repeatable); keys from the environment as {env:NAME}, "
        "also in the URL template, e.g. 'Authorization: Bearer {env:TILE_TOKEN}'",
    )
    s.add_argument("--tolerance-m", type=positive_float, default=1000.0, help="folder source: max distance to an image")

    o = p.add_argument_group("run")
    o.add_argument("--out", required=True, help="index folder (created; rerun to resume)")
    o.add_argument("--chunk-size", type=positive_int, help="points per chunk (default 4096, or the existing index's)")
    o.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    o.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    o.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    o.add_argument("--workers", type=positive_int, default=8, help="image reading/decoding threads")
    o.add_argument("--prefetch", type=non_negative_int, default=2, help="batches decoded ahead of the model")
    o.add_argument(
        "--transform-on",
        choices=("auto", "workers", "device"),
        default="auto",
        help="where tiles are cropped, resized and normalised: the reading threads' CPU or the model's device "
        "(auto: the device when it is a GPU)",
    )
    o.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=None,
        metavar="MODE",
        help="torch.compile the image encoder; MODE: a torch.compile mode, e.g. reduce-overhead (CUDA graphs). "
        "Default: on a GPU when at least 100,000 tiles are left (~3x the tiles/s after ~30 s of compiling)",
    )
    o.add_argument("--no-compile", dest="compile", action="store_false", help="never compile the image encoder")
    o.add_argument("--rank", type=non_negative_int, help="this process's rank (default: RANK / SLURM_PROCID or 0)")
    o.add_argument("--world-size", type=positive_int, help="number of ranks (default: WORLD_SIZE / SLURM_NTASKS or 1)")
    o.add_argument(
        "--max-chunks", type=non_negative_int, help="stop after computing this many chunks (rerun to continue)"
    )
    o.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar")
    p.set_defaults(func=_cmd_index)
    return p


def _make_grid(args: argparse.Namespace) -> Any:
    from psm.maps.grid import Region, grid_for_region, grid_like_raster, parse_bbox

    if args.bbox and args.geojson:
        raise _UsageError("give --bbox or --geojson, not both")
    region = parse_bbox(args.bbox) if args.bbox else Region.from_geojson(args.geojson) if args.geojson else None
    if args.like_raster:
        if args.spacing_m is not None:
            raise _UsageError("--spacing-m does not apply to --like-raster (the raster's pixels are the grid)")
        return grid_like_raster(args.like_raster, region, max_points=args.max_points, force=args.force)
    if region is None:
        raise _UsageError("give a region: --bbox W S E N, --geojson FILE or --like-raster FILE")
    if args.spacing_m is None:
        raise _UsageError("--spacing-m is required with --bbox / --geojson")
    return grid_for_region(region, args.spacing_m, crs=args.crs, max_points=args.max_points, force=args.force)


def _load_model(args: argparse.Namespace) -> tuple[Any, str]:
    from psm.models.checkpoint import CheckpointError
    from psm.models.config import ConfigError
    from psm.models.factory import create_model

    try:
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
            if not ckpt.is_dir():
                raise _UsageError(f"checkpoint folder not found: {ckpt}")
            return create_model(ckpt), ckpt.resolve().name
        return create_model(args.model, seed=args.seed), f"{Path(args.model).stem}(seed={args.seed})"
    except (CheckpointError, ConfigError) as e:
        raise _UsageError(str(e)) from e


def parse_headers(specs: list[str]) -> dict[str, str] | None:
    """``["Name: value", ...]`` as a dict (None for none); a spec without a colon is an error."""
    headers = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"--tile-header {spec!r}: expected 'NAME: VALUE'")
        headers[name.strip()] = value.strip()
    return headers or None


def _cmd_index(args: argparse.Namespace) -> int:
    from psm.maps.index import build_index
    from psm.maps.query_command import _device
    from psm.maps.sources import parse_source

    try:
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise _UsageError(f"--out {args.out}: exists and is not a folder")
        _device(args.device)  # a device torch does not know: an error now, not a traceback after the grid
        grid = _make_grid(args)
        model, name = _load_model(args)
        source_name = args.imagery_source or model.config.image.imagery_source
        provider = parse_source(
            args.source,
            workers=args.workers,
            bands=args.bands,
            scale=tuple(args.scale) if args.scale else None,
            cache_dir=args.cache,
            timeout_s=args.timeout,
            retries=args.retries,
            concurrency=args.tile_concurrency,
            max_zoom=args.max_tile_zoom,
            headers=parse_headers(args.tile_header),
            tolerance_m=args.tolerance_m,
        )
        print(f"psm map index: {grid!r}; model {name}; source {args.source.split(':', 1)[0]}", file=sys.stderr)
        with provider:
            report = build_index(
                model,
                grid,
                provider,
                args.out,
                zooms=args.zoom,
                imagery_source=source_name,
                model_name=name,
                chunk_size=args.chunk_size,
                batch_size=args.batch_size,
                device=args.device,
                precision=args.precision,
                rank=args.rank,
                world_size=args.world_size,
                workers=args.workers,
                prefetch=args.prefetch,
                min_valid=args.min_valid,
                max_chunks=args.max_chunks,
                progress=args.progress,
                transform_on=args.transform_on,
                compile=args.compile,
            )
    # RegionError, IndexMismatchError and ImageryError are ValueErrors, as are bad zooms, ranks or specs.
    except (_UsageError, ValueError, FileNotFoundError, TimeoutError) as e:
        print(f"psm map index: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    if report.problems:
        print(f"problems: {args.out}/problems/rank{report.rank}.*.jsonl", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry: ``python -m psm.maps.command index ...`` (same as ``psm map index ...``)."""
    parser = argparse.ArgumentParser(prog="psm map")
    sub = parser.add_subparsers(dest="map_command", required=True)
    add_index_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

"""``psm world ...`` sub-commands (registered by psm.cli; heavy imports happen inside the handlers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from psm.arguments import positive_int


def _centre(text: str) -> tuple[float, float]:
    try:
        lat, lon = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--centre must be LAT,LON (e.g. 52.45,12.6), got {text!r}") from None
    return lat, lon


def _months(text: str) -> tuple[int, ...]:
    try:
        months = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seasons must be months such as 1,4,7,10, got {text!r}") from None
    if any(not 1 <= m <= 12 for m in months):
        raise argparse.ArgumentTypeError(f"--seasons months must be 1..12, got {text!r}")
    return months


def _cmd_generate(args: argparse.Namespace) -> int:
    from psm.data.world.generate import generate_world

    def progress(stage: str, done: int, total: int) -> None:
        if args.verbose_progress:
            print(f"  {stage} {done}/{total}", file=sys.stderr, flush=True)

    try:
        info = generate_world(
            args.out,
            size=args.size,
            seed=args.seed,
            centre=args.centre,
            extent_km=args.extent_km,
            samples=args.samples,
            stream=args.stream,
            seasons=args.seasons,
            overwrite=args.overwrite,
            workers=args.workers,
            progress=progress,
        )
    except (FileExistsError, ValueError) as e:
        print(f"psm world generate: {e}", file=sys.stderr)
        return 2
    print(info.summary())
    if not info.stream:
        print(f"  check it: psm data validate {info.path / 'manifest.parquet'}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from psm.data.world.world import WorldError, load_world

    try:
        w = load_world(args.world)
    except WorldError as e:
        print(f"psm world info: {e}", file=sys.stderr)
        return 2
    i = w.info
    west, south, east, north = i["region_lonlat_bounds"]
    print(f"{w.path}: psm world '{w.size}', seed {w.seed}, generator {i['generator_version']}")
    print(
        f"  region {i['grid']['extent_m'] / 1000:g} km, {i['crs']}, lat {south:.4f}..{north:.4f}, "
        f"lon {west:.4f}..{east:.4f}"
    )
    print(
        f"  samples {i['samples']} ({'streamed' if w.streamed else 'audio files'}), "
        f"{i['counts']['audio_seconds'] / 3600:.2f} h of audio"
    )
    print("  splits " + ", ".join(f"{k} {v}" for k, v in i["split"]["samples"].items()))
    print("  events " + ", ".join(f"{k} {v:.2f}" for k, v in i["counts"]["event_rates"].items()))
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    import json

    from psm.data.world.baseline import run_on_files, run_on_plan
    from psm.data.world.world import WorldError, load_world

    try:
        w = load_world(args.world)
    except WorldError as e:
        print(f"psm world baseline: {e}", file=sys.stderr)
        return 2
    if w.streamed or args.fresh:
        result = run_on_plan(w, samples=args.limit or 1500, seed=args.seed)
    else:
        result = run_on_files(w, limit=args.limit)
    print(result.format())
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    return 0


def _cmd_pack(args: argparse.Namespace) -> int:
    from psm.data.shards import ShardWriteError, pack_records
    from psm.data.world.stream import iter_shard_records
    from psm.data.world.world import WorldError, load_world

    try:
        if Path(args.out_dir).exists() and not Path(args.out_dir).is_dir():
            raise ValueError(f"{args.out_dir} exists and is not a folder")
        w = load_world(args.world)
        records = iter_shard_records(w, split=args.split, stop=args.limit, image_format=args.image_format)
        report = pack_records(
            records,
            args.out_dir,
            prefix=args.prefix or (args.split or "train"),
            samples_per_shard=args.samples_per_shard,
            overwrite=args.overwrite,
        )
    except (WorldError, ShardWriteError, ValueError) as e:
        print(f"psm world pack: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


def _cmd_picture(args: argparse.Namespace) -> int:
    from psm.data.world.picture import draw_picture
    from psm.data.world.world import WorldError, load_world

    out = Path(args.out)
    try:
        if out.suffix.lower() != ".png":
            raise ValueError(f"{out}: the picture is a PNG; give a file name ending in .png")
        w = load_world(args.world)
        if args.event not in w.events:
            raise ValueError(f"unknown event {args.event!r}; the world's events: {', '.join(w.events)}")
        path = draw_picture(w, out, event=args.event, month=args.month, hours=tuple(args.hours))
    except (WorldError, ValueError, KeyError, OSError) as e:  # OSError: an unwritable output
        print(f"psm world picture: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``world`` command group."""
    world = sub.add_parser("world", help="the embedded offline world: generate, inspect, baseline, pack")
    wsub = world.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", required=True)

    p = wsub.add_parser(
        "generate",
        help="write a world: imagery, land cover, truth, audio, captions, manifest",
        description="Write a procedurally generated soundscape world with known ground truth. Sizes: tiny "
        "(200 samples, 16 km region, seconds), demo (3,000 samples, 50 km, ~1-2 min, ~0.4 GB), large "
        "(50,000 samples, 50 km; use --stream to write everything but the audio, which is then rendered on "
        "the fly by `psm world pack` or psm.data.world.stream).",
    )
    p.add_argument("--out", required=True, help="folder to create (must not hold a world unless --overwrite)")
    p.add_argument("--size", choices=("tiny", "demo", "large"), default="tiny")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--centre",
        type=_centre,
        default=(52.45, 12.6),
        metavar="LAT,LON",
        help="centre of the region (default 52.45,12.6: Havelland, Brandenburg)",
    )
    p.add_argument("--extent-km", type=float, help="side of the square region (default: 16 tiny, 50 demo/large)")
    p.add_argument("--samples", type=positive_int, help="number of samples (default: the size's)")
    p.add_argument("--stream", action="store_true", help="plan the samples but do not write their audio")
    p.add_argument(
        "--seasons",
        type=_months,
        default=(),
        metavar="M,M,...",
        help="also write a mosaic for each of these months (imagery/mosaic_mMM.tif)",
    )
    p.add_argument("--workers", type=positive_int, help="audio processes (default: up to 2); the bytes do not change")
    p.add_argument("--overwrite", action="store_true", help="replace an existing world")
    p.add_argument("--progress", dest="verbose_progress", action="store_true", help="print audio progress")
    p.set_defaults(func=_cmd_generate)

    p = wsub.add_parser("info", help="describe a generated world")
    p.add_argument("world")
    p.set_defaults(func=_cmd_info)

    p = wsub.add_parser("baseline", help="log-mel logistic-regression baseline: is the world learnable?")
    p.add_argument("world")
    p.add_argument("--limit", type=positive_int, help="use only the first N samples (or N fresh ones with --fresh)")
    p.add_argument("--fresh", action="store_true", help="render fresh samples in memory instead of the files")
    p.add_argument("--seed", type=int, default=1, help="seed of the fresh samples")
    p.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    p.set_defaults(func=_cmd_baseline)

    p = wsub.add_parser("pack", help="stream a world's samples into WebDataset shards (audio rendered on the fly)")
    p.add_argument("world")
    p.add_argument("out_dir")
    p.add_argument("--split", choices=("train", "val", "test"), help="only this split")
    p.add_argument("--limit", type=positive_int, help="only samples before this index")
    p.add_argument("--prefix", help="shard name prefix (default: the split, or 'train')")
    p.add_argument("--samples-per-shard", type=positive_int, default=1000)
    p.add_argument("--image-format", choices=("png", "jpg"), default="png")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_pack)

    p = wsub.add_parser("picture", help="draw the overview picture (land cover, imagery, a truth layer)")
    p.add_argument("world")
    p.add_argument("out")
    p.add_argument("--event", default="traffic")
    p.add_argument("--month", type=int, default=5)
    p.add_argument("--hours", type=int, nargs=2, default=(8, 22), metavar=("H1", "H2"))
    p.set_defaults(func=_cmd_picture)

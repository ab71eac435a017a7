"""The ``psm`` command line. Each sub-command imports what it needs when it runs (fast ``--help``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence

from psm.arguments import positive_float, positive_int

INTERRUPTED = 130  # the shell's code for a process stopped by Ctrl-C (128 + SIGINT)
BROKEN_PIPE = 141  # 128 + SIGPIPE: the reader of stdout went away (`psm ... | head`)


def _cmd_models(args: argparse.Namespace) -> int:
    from psm.models.config import list_model_configs, load_model_config

    for name in list_model_configs():
        cfg = load_model_config(name)
        kind = "PCME++ (Gaussian)" if cfg.probabilistic else "InfoNCE (deterministic)"
        meta = ", ".join(cfg.metadata.types) or "no metadata"
        print(f"{name:22s} embed {cfg.embed_dim:4d}  ViT {cfg.image.width}x{cfg.image.depth}  {kind}; {meta}")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from psm.models.convert import ConversionError, convert_official_checkpoint

    try:
        report = convert_official_checkpoint(
            args.checkpoint,
            args.out_dir,
            base_config=args.base_config,
            allow_partial=args.allow_partial,
            overwrite=args.overwrite,
        )
    except (ConversionError, FileNotFoundError, FileExistsError) as e:
        print(f"psm convert-checkpoint: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    print(f"wrote {args.out_dir}")
    return 0


def _cmd_data_split(args: argparse.Namespace) -> int:
    from psm.data.split import format_summary, write_split

    kwargs = {"cell": args.cell, "seed": args.seed, "on_error": args.on_error}
    if args.holdout_fraction is not None:
        kwargs["holdout_fraction"] = args.holdout_fraction
    if args.val_size is not None:
        kwargs["val_size"] = args.val_size
    if args.test_size is not None:
        kwargs["test_size"] = args.test_size
    try:
        summary = write_split(args.manifest, args.out or args.manifest, **kwargs)
    except (ValueError, OSError) as e:  # OSError: a folder, an unreadable file, an unwritable --out
        print(f"psm data split: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


def _raster_bands(args: argparse.Namespace, command: str) -> object | None:
    """The --bands / --scale of a data command, or None (after an error message) when they are invalid."""
    from psm.data.imagery import RasterBands

    try:
        return RasterBands(args.bands, args.scale)
    except ValueError as e:
        print(f"psm data {command}: {e}", file=sys.stderr)
        return None


def _cmd_data_validate(args: argparse.Namespace) -> int:
    from psm.data.manifest import ManifestError, validate_manifest
    from psm.data.metadata import MetadataSpec

    raster = _raster_bands(args, "validate")
    if raster is None:
        return 2
    spec = MetadataSpec()
    try:
        if args.model:
            from psm.models.config import load_model_config

            spec = load_model_config(args.model).metadata
        report = validate_manifest(args.manifest, spec=spec, decode=not args.no_decode, raster=raster)
    except (ManifestError, ValueError) as e:  # ValueError: ConfigError of --model
        print(f"psm data validate: {e}", file=sys.stderr)
        return 2
    print(report.format())
    if report.ok:
        return 0
    return 1 if args.on_error == "raise" else 0


def _cmd_data_pack(args: argparse.Namespace) -> int:
    from psm.data.errors import SkipLog
    from psm.data.manifest import ManifestError, manifest_records
    from psm.data.shards import ShardWriteError, pack_records

    raster = _raster_bands(args, "pack")
    if raster is None:
        return 2
    problem = _pack_problem(args)
    if problem:
        print(f"psm data pack: {problem}", file=sys.stderr)
        return 2
    log = SkipLog(args.report or f"{args.out_dir}/skipped")
    records = manifest_records(
        args.manifest, args.imagery_source, split=args.split, on_error=args.on_error, skip_log=log, raster=raster
    )
    try:
        report = pack_records(
            records,
            args.out_dir,
            prefix=args.prefix or (args.split or "train"),
            samples_per_shard=args.samples_per_shard,
            overwrite=args.overwrite,
        )
    except (ManifestError, ShardWriteError, ValueError) as e:
        print(f"psm data pack: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    if len(log):
        print(f"skipped {len(log)} bad rows; report: {log.path}.*.jsonl")
        for p in log.problems[:20]:
            print(f"  {p}")
    return 0


def _pack_problem(args: argparse.Namespace) -> str | None:
    """Why ``psm data pack`` cannot start (an output that is a file, a split without rows), or None.

    Checked up front: once packing starts it writes OUT_DIR and its shard index, even for zero samples.
    """
    from psm.data.manifest import ManifestError, read_manifest

    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        return f"{args.out_dir} exists and is not a folder"
    if args.split is None:
        return None
    try:
        df = read_manifest(args.manifest)
    except ManifestError as e:
        return str(e)
    splits = sorted(df["split"].dropna().astype(str).unique()) if "split" in df.columns else []
    if args.split not in splits:
        return f"{args.manifest}: no rows in split {args.split!r} (its splits: {', '.join(splits) or 'none'})"
    return None


def _cmd_train(args: argparse.Namespace) -> int:
    from psm.training.train import run_training

    return run_training(args.lightning_args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from psm.demo import run_demo

    return run_demo(seed=args.seed, out=args.out, size=args.size, steps=args.steps, minutes=args.minutes)


def _cmd_serve(args: argparse.Namespace) -> int:
    from psm.maps.query import MapQueryError
    from psm.maps.query_command import _device, _UsageError
    from psm.models.checkpoint import CheckpointError
    from psm.serving.server import MapService, serve

    if args.basemap is not None and not all(k in args.basemap for k in ("{z}", "{x}", "{y}")):
        print("psm serve: error: --basemap must be an XYZ URL template with {z}, {x}, {y}", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"psm serve: error: --port must be 0..65535 (0 picks a free one), got {args.port}", file=sys.stderr)
        return 2
    if args.tokenizer is not None and not os.path.isdir(args.tokenizer):
        # MapService would start without text queries: refuse a folder given by name that is not there.
        print(f"psm serve: error: --tokenizer {args.tokenizer}: not a folder", file=sys.stderr)
        return 2
    try:
        service = MapService(
            args.index,
            args.checkpoint,
            tokenizer=args.tokenizer,
            device=_device(args.device),
            cache_dir=args.cache_dir,
            basemap=args.basemap,
            allow_incomplete=args.allow_incomplete,
        )
    except (MapQueryError, CheckpointError, FileNotFoundError, _UsageError) as e:
        print(f"psm serve: error: {e}", file=sys.stderr)
        return 2
    info = service.info()
    note = f"{info['model']}: {info['num_points']:,} places, zoom levels {info['zoom_levels']}"
    try:
        serve(service, args.host, args.port, announce=[note])
    except OSError as e:  # binding: the port is in use, the host unknown or not this machine's, no permission
        reason = e.strerror or str(e)
        print(f"psm serve: error: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``psm``."""
    parser = argparse.ArgumentParser(prog="psm", description="Probabilistic soundscape mapping (PSM) toolkit.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("demo", help="run the main job end to end on the embedded offline default")
    p.add_argument("--seed", type=int, default=0, help="seed of the world and of the model (default 0)")
    p.add_argument(
        "--out", help="where every step writes (default outputs/demo, outputs/demo-tiny); a rerun keeps the world"
    )
    p.add_argument(
        "--size",
        default="demo",
        choices=("demo", "tiny"),
        help="offline world: demo (3,000 clips, ~11 minutes in all on 2 CPU cores) or tiny (200 clips, ~1 minute, "
        "too small to learn much)",
    )
    p.add_argument("--steps", type=positive_int, help="training steps (default: demo 1000, tiny 120)")
    p.add_argument("--minutes", type=positive_float, help="training time limit (default: demo 8, tiny none)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("models", help="list the shipped model architectures")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser(
        "convert-checkpoint",
        help="convert an official PSM Lightning checkpoint to psm's safetensors + YAML format",
    )
    p.add_argument("checkpoint", help="the official .ckpt file")
    p.add_argument("out_dir", help="folder to write (model.safetensors + config.yaml)")
    p.add_argument("--base-config", default="psm-paper", help="architecture the official run used")
    p.add_argument("--allow-partial", action="store_true", help="write even if some keys cannot be mapped")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR (default: refuse)")
    p.set_defaults(func=_cmd_convert)

    p = sub.add_parser(
        "train",
        help="train with a YAML config (LightningCLI: psm train --config FILE.yaml [--trainer.max_steps N] ...)",
        add_help=False,
    )
    p.add_argument("lightning_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_train)

    from psm.data.world import command as world_command
    from psm.evaluation import command as evaluation_command

    world_command.add_parser(sub)
    evaluation_command.add_parser(sub)

    from psm.maps import command as map_index_command
    from psm.maps import query_command as map_query_command

    maps = sub.add_parser("map", help="soundscape maps: index a region, query it, render COG/PNG/HTML")
    map_sub = maps.add_subparsers(dest="map_command", required=True)
    map_index_command.add_index_parser(map_sub)
    map_query_command.add_query_parsers(map_sub)

    p = sub.add_parser(
        "serve",
        help="answer map queries over HTTP: a query page for the browser, maps (HTML/PNG/COG) and top places",
        description="Load a map index and its model once and serve queries: / is a page to type a text query "
        "(or upload a clip) and see the map; /map.html|png|tif and /api/top answer scripts (see README).",
    )
    p.add_argument("--index", required=True, help="index folder written by `psm map index`")
    p.add_argument("--checkpoint", required=True, help="psm checkpoint folder (the model that built the index)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: CHECKPOINT/tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--cache-dir", help="conditioned-embedding cache (default INDEX/conditioned)")
    p.add_argument("--basemap", help="XYZ tile URL template under the maps (the browser fetches it)")
    p.add_argument("--allow-incomplete", action="store_true", help="serve an unfinished index (missing = nodata)")
    p.set_defaults(func=_cmd_serve)

    from psm.data.imagery_sources import add_raster_arguments

    data = sub.add_parser("data", help="dataset tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("validate", help="check a manifest: schema, value ranges, every file exists and decodes")
    p.add_argument("manifest")
    p.add_argument("--model", help="architecture or YAML whose metadata vocabularies to check against")
    p.add_argument("--no-decode", action="store_true", help="only check that files exist (faster)")
    add_raster_arguments(p)
    p.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="raise",
        help="raise (default): exit 1 when any row is bad; skip: report and exit 0",
    )
    p.set_defaults(func=_cmd_data_validate)

    p = data.add_parser("pack", help="write a manifest split to WebDataset tar shards (resumable)")
    p.add_argument("manifest")
    p.add_argument("out_dir")
    p.add_argument("--imagery-source", default="sentinel2")
    p.add_argument("--split", help="only rows of this split (the manifest's split column)")
    p.add_argument("--prefix", help="shard name prefix (default: the split, or 'train')")
    p.add_argument("--samples-per-shard", type=positive_int, default=1000)
    add_raster_arguments(p)
    p.add_argument("--on-error", choices=("raise", "skip"), default="skip")
    p.add_argument("--report", help="path stem of the skipped-rows report (default OUT_DIR/skipped)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_cmd_data_pack)

    p = data.add_parser("split", help="the paper's geographic train/val/test split of a manifest")
    p.add_argument("manifest")
    p.add_argument("--out", help="output table (default: rewrite the manifest)")
    p.add_argument("--cell", default="1deg", help="'1deg' (GeoSound) or a metric size such as '10km'")
    p.add_argument("--holdout-fraction", type=float)
    p.add_argument("--val-size", type=int)
    p.add_argument("--test-size", type=int)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise")
    p.set_defaults(func=_cmd_data_split)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``psm`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _run(argv)
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback, and the code shells expect
        print("\npsm: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # Python's recipe: point stdout at /dev/null so the flush at exit does not fail a second time.
        with contextlib.suppress(OSError, ValueError):  # no real stdout (tests): nothing to redirect
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE


def _run(argv: list[str]) -> int:
    """Parse ``argv`` and run its command."""
    flags = 0
    while argv[flags : flags + 1] in (["-v"], ["--verbose"]):
        flags += 1
    if argv[flags : flags + 1] == ["train"]:  # LightningCLI parses its own options (argparse would reject them)
        level = logging.INFO if flags else logging.WARNING
        logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
        return _cmd_train(argparse.Namespace(lightning_args=argv[flags + 1 :]))
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

"""``psm evaluate`` and ``psm embed`` (registered by psm.cli; heavy imports happen inside the handlers)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from psm.data.imagery_sources import add_raster_arguments

TOKENIZER_DIR = "tokenizer"  # the trainer saves the tokenizer it used here, inside the checkpoint folder


class _UsageError(Exception):
    """A problem with the command's inputs: reported on stderr with exit code 2."""


def _resolve_tokenizer(checkpoint: Path, tokenizer: str | None, needs_text: bool, no_text: bool) -> Any | None:
    """``--tokenizer``, else ``CHECKPOINT/tokenizer``; an error when the model has text and neither exists."""
    if not needs_text or no_text:
        return None
    from psm.data.text import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    inside = checkpoint / TOKENIZER_DIR
    if inside.is_dir():
        return load_tokenizer(inside)
    raise _UsageError(
        f"the model has a text tower but no tokenizer was found: pass --tokenizer DIR (or save one in "
        f"{inside}), or --no-text to evaluate without captions"
    )


def _check_out(path: Path, folder: bool) -> None:
    """Refuse an output path that cannot be written before the (long) run, not with a traceback after it."""
    if path.exists() and path.is_dir() != folder:
        raise _UsageError(f"--out {path}: exists and is {'not ' if folder else ''}a folder")
    parent = path.parent
    while not parent.exists():  # the folders still to create go into the first one that exists
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise _UsageError(f"--out {path}: cannot create it in {parent} (not a writable folder)")


def _load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from psm.devices import resolve_device
    from psm.models.checkpoint import CheckpointError, load_checkpoint

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise _UsageError(str(e)) from None
    ckpt = Path(args.checkpoint)
    try:
        model, _ = load_checkpoint(ckpt, device=device)
    except (CheckpointError, FileNotFoundError) as e:
        raise _UsageError(str(e)) from e
    model.eval()
    tokenizer = _resolve_tokenizer(ckpt, args.tokenizer, model.text is not None, args.no_text)
    return model, tokenizer, device


def _percentage(text: str) -> float:
    """argparse type of ``--recall-pct``: the library's own check, as a usage error."""
    from psm.evaluation.retrieval import check_recall_pct

    try:
        return check_recall_pct(float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from psm.data.errors import DataError
    from psm.data.manifest import ManifestError
    from psm.evaluation.evaluate import evaluate_manifest
    from psm.evaluation.report import markdown_report, write_metrics

    # resolve(): "--checkpoint ." must name the folder, not a hidden ".-eval-…" inside it
    ckpt = Path(args.checkpoint).resolve()
    out = Path(args.out) if args.out else ckpt.with_name(f"{ckpt.name}-eval-{args.split or 'all'}")
    try:
        _check_out(out, folder=True)
        model, tokenizer, device = _load(args)
        result = evaluate_manifest(
            model,
            args.manifest,
            args.split,
            zooms=args.zoom,
            tokenizer=tokenizer,
            metadata=args.metadata,
            imagery_source=args.imagery_source,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            on_error=args.on_error,
            recall_pct=args.recall_pct,
            device=device,
            info={"checkpoint": str(args.checkpoint)},
            progress=None if args.quiet else _progress,
            raster=_raster(args),
        )
    except (_UsageError, ManifestError, DataError, ValueError, FileNotFoundError) as e:
        print(f"psm evaluate: {e}", file=sys.stderr)
        return 2
    try:
        js, md = write_metrics(result, out)
    except OSError as e:
        print(f"psm evaluate: cannot write the metrics to {out}: {e}", file=sys.stderr)
        return 1
    print(markdown_report(result))
    print(f"wrote {js} and {md}")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from psm.data.errors import DataError, SkipLog
    from psm.data.manifest import ManifestError
    from psm.evaluation.embed import (
        NothingLoadedError,
        embed_split,
        embeddings_table,
        nothing_loaded_message,
        write_parquet_atomic,
    )
    from psm.evaluation.evaluate import count_split_rows, manifest_loaders, source_zoom_levels

    try:
        _check_out(Path(args.out), folder=False)
        model, tokenizer, device = _load(args)
        source = args.imagery_source or model.config.image.imagery_source
        zooms = tuple(args.zoom) if args.zoom else source_zoom_levels(source)
        expected = count_split_rows(args.manifest, args.split)
        if expected == 0:
            raise _UsageError(f"{args.manifest}: no rows in split {args.split!r}")
        log = SkipLog()  # in memory: complete with --num-workers 0; the per-zoom counts are always complete
        ds, batches = manifest_loaders(
            model,
            args.manifest,
            args.split,
            imagery_source=source,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            on_error=args.on_error,
            skip_log=log,
            raster=_raster(args),
        )
        try:
            emb = embed_split(
                model, batches, zooms, tokenizer=tokenizer, device=device, progress=None if args.quiet else _progress
            )
        except NothingLoadedError as e:  # say why, with the file and row of a skipped sample
            raise NothingLoadedError(nothing_loaded_message(args.manifest, args.split, log.problems)) from e
    except (_UsageError, ManifestError, DataError, ValueError, FileNotFoundError) as e:
        print(f"psm embed: {e}", file=sys.stderr)
        return 2
    info = {r.key: {"split": r.split, **r.metadata, "caption": r.caption} for r in ds.rows}
    loaded = {str(z): len(zf.index) for z, zf in emb.zooms.items()}
    table = embeddings_table(
        model,
        emb,
        row_info=info,
        device=device,
        file_metadata={
            "checkpoint": str(args.checkpoint),
            "split": args.split,
            "imagery_source": source,
            "split_rows": expected,
            "loaded_per_zoom": loaded,
        },
    )
    try:
        path = write_parquet_atomic(table, args.out)
    except OSError as e:
        print(f"psm embed: cannot write {args.out}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(emb)} samples × {table.num_columns} columns to {path}")
    skipped = {z: expected - n for z, n in loaded.items()}
    if any(skipped.values()):
        print(f"split rows: {expected}; skipped per zoom: {skipped}", file=sys.stderr)
        for p in list(dict.fromkeys(str(p) for p in log.problems))[:20]:
            print(f"  {p}", file=sys.stderr)
    return 0


def _raster(args: argparse.Namespace) -> Any:
    from psm.data.imagery import RasterBands

    try:
        return RasterBands(args.bands, args.scale)
    except ValueError as e:
        raise _UsageError(str(e)) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="psm checkpoint folder (model.safetensors + config.yaml)")
    p.add_argument("--manifest", required=True, help="manifest table (CSV or Parquet)")
    p.add_argument("--split", default="test", help="rows of this split (the manifest's split column)")
    p.add_argument("--zoom", type=int, nargs="+", help="zoom levels (default: every level of the imagery source)")
    p.add_argument("--tokenizer", help="tokenizer folder (default: CHECKPOINT/tokenizer)")
    p.add_argument("--no-text", action="store_true", help="ignore captions (no tokenizer needed)")
    p.add_argument("--imagery-source", help="imagery column to read (default: the model's)")
    add_raster_arguments(p)  # rasters named in the manifest
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="skip", help="bad samples: skip (counted) or raise")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register the ``evaluate``, ``embed`` and ``ceiling`` commands."""
    p = sub.add_parser(
        "evaluate",
        help="the paper's retrieval tables (R@10%%, median rank) for a checkpoint on a manifest split",
        description="I2S and S2I retrieval per zoom level × metadata setting × with/without caption, ranked by "
        "−CSD (PCME++) or cosine (InfoNCE), with the official metric definitions. Prints the Markdown table "
        "and writes metrics.json and metrics.md.",
    )
    _common(p)
    p.add_argument("--out", help="output folder (default: CHECKPOINT-eval-SPLIT next to the checkpoint)")
    p.add_argument(
        "--metadata",
        nargs="+",
        help="metadata settings to evaluate: all, none and/or single types (default: all of them)",
    )
    p.add_argument(
        "--recall-pct", type=_percentage, default=10.0, help="k of R@k as a percentage of N, in (0, 100] (default 10)"
    )
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "embed",
        help="μ and log σ² of every modality for a manifest split, to Parquet",
        description="Writes one row per sample: key, metadata, audio/text μ (unit and raw) and log σ², and per "
        "zoom the pre-fusion image features and the image embedding fused with all metadata.",
    )
    _common(p)
    p.add_argument("--out", required=True, help="Parquet file to write (atomically)")
    p.set_defaults(func=_cmd_embed)

    p = sub.add_parser(
        "ceiling",
        help="retrieval ceilings of an offline world: oracle rankings from its truth and labels",
        description="Image→audio R@10% and median rank of rankings by the world's truth (what a perfect listener "
        "could reach on the split), with and without metadata and the background ambience.",
    )
    p.add_argument("--world", required=True, help="world folder written by `psm world generate`")
    p.add_argument("--split", default="test")
    p.add_argument("--out", help="also write the Markdown table to this file")
    p.add_argument(
        "--embeddings",
        nargs=2,
        metavar=("TRAIN", "TEST"),
        help="`psm embed` tables of the train and the evaluated split: also probe which tower holds the model back",
    )
    p.add_argument("--zoom", type=int, default=1, help="zoom level of the image embeddings to probe (default 1)")
    p.set_defaults(func=_cmd_ceiling)


def _cmd_ceiling(args: argparse.Namespace) -> int:
    from psm.atomic import write_text_atomic
    from psm.data.world import load_world
    from psm.evaluation.ceiling import format_ceilings, format_probes, model_probes, retrieval_ceilings

    try:  # WorldError (not a world) and too-small splits are ValueErrors with a message naming the folder
        if args.out:
            _check_out(Path(args.out), folder=False)
        world = load_world(args.world)
        ceilings = retrieval_ceilings(world, args.split)
        probes = None
        if args.embeddings:
            import pandas as pd

            tables = []
            for path in args.embeddings:
                try:
                    tables.append(pd.read_parquet(path))
                except (OSError, ValueError) as e:
                    raise ValueError(f"{path}: not a readable embeddings table ({e})") from e
            probes = model_probes(world, *tables, zoom=args.zoom)
    except (_UsageError, ValueError) as e:
        print(f"psm ceiling: error: {e}", file=sys.stderr)
        return 2
    table = format_ceilings(ceilings, world.info["split"]["samples"].get(args.split))
    if probes is not None:
        table += "\n\n" + format_probes(probes)
    print(table)
    if args.out:
        write_text_atomic(args.out, table + "\n")
    return 0

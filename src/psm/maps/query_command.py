"""``psm map query | top | temporal | uncertainty``: the command line of query maps (psm.cli wires ``map``).

Heavy imports (torch, rasterio, matplotlib) happen inside the handlers so ``psm --help`` stays fast. Input
problems (a zoom the index lacks, metadata the model does not use, an unfinished index, a bad scale) are
reported on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from psm.arguments import positive_int

TOKENIZER_DIR = "tokenizer"  # where training saves the tokenizer inside a checkpoint folder


class _UsageError(ValueError):
    """A problem with the command's inputs: reported on stderr with exit code 2 (a ValueError, so callers that
    report ValueErrors, such as ``psm map index``, report it too)."""


def _common(p: argparse.ArgumentParser, *, query: bool = True, metadata: bool = True) -> None:
    p.add_argument("--index", required=True, help="index folder written by `psm map index`")
    p.add_argument("--checkpoint", required=True, help="psm checkpoint folder (the model that built the index)")
    if query:
        q = p.add_mutually_exclusive_group(required=True)
        q.add_argument(
            "--text",
            action="append",
            help="text query, e.g. 'birds chirping in a forest'; repeat it for one map of several phrasings",
        )
        q.add_argument(
            "--audio",
            action="append",
            help="audio file query (decoded to 48 kHz, deterministic CLAP chunks); repeat it for several clips",
        )
        p.add_argument(
            "--template",
            action="append",
            help="prompt template with {} for the text, e.g. 'the sound of {}' (repeatable; each text in each)",
        )
        p.add_argument(
            "--prompt-ensemble",
            action="store_true",
            help="the text in psm's five prompt templates ('{}', 'the sound of {}', ...): steadier maps",
        )
        p.add_argument("--tokenizer", help="tokenizer folder (default: CHECKPOINT/tokenizer)")
    if metadata:
        m = p.add_argument_group("metadata (left out = masked in the fusion)")
        m.add_argument("--month", type=float, help="month 1..12 for every point")
        m.add_argument("--hour", type=float, help="hour 0..23 for every point")
        m.add_argument("--audio-source", help="audio platform, e.g. iNat, yfcc, aporee, freesound")
        m.add_argument("--caption-source", help="caption source, e.g. meta, qwen, pengi")
        m.add_argument(
            "--location",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="per-point lat/lon (default: on when the model uses location; off for uncertainty)",
        )
    r = p.add_argument_group("run")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    r.add_argument("--batch-size", type=positive_int, default=4096, help="points per fusion forward pass")
    r.add_argument("--precision", choices=("float32", "bfloat16"), default="float32", help="fusion precision")
    r.add_argument("--cache-dir", help="conditioned-embedding cache (default INDEX/conditioned)")
    if query:
        r.add_argument(
            "--scorer",
            choices=("blocks", "compiled"),
            help="scoring kernel: blocks (default, or $PSM_SCORER) or compiled (fused torch.compile loop, ~2x "
            "faster per query after a one-off compile of seconds; needs a C++ compiler)",
        )
    r.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="map an unfinished index: points of chunks not yet computed become nodata (default: refuse)",
    )


def _outputs(p: argparse.ArgumentParser, *, scale_default: str, cmap: str) -> None:
    o = p.add_argument_group("outputs")
    o.add_argument("--out", required=True, help="output prefix: PREFIX.tif (COG), PREFIX.png, PREFIX.html")
    o.add_argument(
        "--scale",
        default=scale_default,
        help="raw (−CSD) | percentile[:LO,HI] (per map, to [0,1]) | shared[:FILE.json] (one scale for a set of "
        f"maps; FILE is read if present, else written) (default {scale_default})",
    )
    o.add_argument("--cmap", default=cmap, help=f"matplotlib colormap (default {cmap})")
    o.add_argument("--basemap", help="XYZ tile URL template for the HTML page (online only), e.g. .../{z}/{x}/{y}.png")
    o.add_argument("--width", type=int, default=1000, help="PNG width in pixels")


def add_query_parsers(map_subparsers: Any) -> None:
    """Register ``query``, ``top``, ``temporal`` and ``uncertainty`` under the ``map`` sub-command group."""
    p = map_subparsers.add_parser(
        "query",
        help="map where a text or audio query would be heard (COG + PNG + HTML)",
        description="Score every point of an index by −CSD against a text or audio query, for one metadata "
        "setting, and write PREFIX.tif (Cloud-Optimized GeoTIFF), PREFIX.png and PREFIX.html.",
    )
    _common(p)
    p.add_argument("--zoom", type=int, help="zoom level (default: the index's first)")
    p.add_argument("--title", help="map title")
    _outputs(p, scale_default="raw", cmap="viridis")
    p.set_defaults(func=_cmd_query)

    p = map_subparsers.add_parser("top", help="the k most likely places (lat, lon, score) for a query")
    _common(p)
    p.add_argument("--zoom", type=int, help="zoom level (default: the index's first)")
    p.add_argument("-k", type=int, default=20, help="number of places (default 20)")
    p.add_argument("--csv", nargs="?", const="-", help="write CSV to this file (or to stdout without a file)")
    p.set_defaults(func=_cmd_top)

    p = map_subparsers.add_parser(
        "temporal",
        help="one query over hours or months on one shared scale: frames + animated GIF",
    )
    _common(p)
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--hours", type=float, nargs="+", help="hours of the frames, e.g. 0 6 12 18")
    t.add_argument("--months", type=float, nargs="+", help="months of the frames, e.g. 1 4 7 10")
    p.add_argument("--zoom", type=int, help="zoom level (default: the index's first)")
    p.add_argument("--duration-ms", type=positive_int, default=900, help="GIF frame duration")
    p.add_argument("--mp4", action="store_true", help="also write PREFIX.mp4 (needs ffmpeg; skipped otherwise)")
    p.add_argument("--html", action="store_true", help="also write an HTML page per frame")
    _outputs(p, scale_default="shared", cmap="viridis")
    p.set_defaults(func=_cmd_temporal)

    p = map_subparsers.add_parser(
        "uncertainty",
        help="‖σ‖₁ of the image embeddings per zoom level (COG + PNG + HTML)",
        description="Uncertainty maps (the paper's Figure 7): image-only by default; metadata options "
        "condition them on a setting.",
    )
    _common(p, query=False)
    p.add_argument("--zoom", type=int, nargs="+", help="zoom levels (default: all of the index's)")
    o = p.add_argument_group("outputs")
    o.add_argument("--out", required=True, help="output prefix: PREFIX_zZ.tif/.png/.html per zoom")
    o.add_argument("--cmap", default="magma")
    o.add_argument("--basemap", help="XYZ tile URL template for the HTML pages (online only)")
    o.add_argument("--width", type=int, default=1000, help="PNG width in pixels")
    p.set_defaults(func=_cmd_uncertainty)

    p = map_subparsers.add_parser(
        "agreement",
        help="Spearman ρ of each event's text-query map against an offline world's truth, the hour effect, "
        "and ‖σ‖₁ against the truth's soundscape diversity",
    )
    _common(p, query=False, metadata=False)
    p.add_argument("--world", required=True, help="world folder written by `psm world generate`")
    p.add_argument("--tokenizer", help="tokenizer folder (default: CHECKPOINT/tokenizer)")
    p.add_argument("--month", type=int, required=True, help="month 1..12 of the maps and the truth")
    p.add_argument("--hours", type=int, nargs="+", required=True, help="hours of the maps, e.g. 6 14")
    p.add_argument("--zoom", type=int, help="zoom level (default: the index's first)")
    p.add_argument("--audio-source", help="platform for the maps and the truth (default: left out / any)")
    p.add_argument("--events", nargs="+", help="event classes (default: all of the world's)")
    p.add_argument(
        "--single-word",
        action="store_true",
        help="query each event by its first caption word alone (default: its words in the prompt templates)",
    )
    p.add_argument("--out", help="write OUT.json and OUT.md")
    p.set_defaults(func=_cmd_agreement)


# --------------------------------------------------------------------------------------------------------
# handlers
# --------------------------------------------------------------------------------------------------------


def _device(name: str) -> str:
    """The torch device ``--device`` names (:func:`psm.devices.resolve_device`), as a usage error."""
    from psm.devices import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise _UsageError(str(e)) from None


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from psm.maps.query import MapIndex
    from psm.models.checkpoint import load_checkpoint

    index = MapIndex(args.index)
    ckpt = Path(args.checkpoint)
    model, _ = load_checkpoint(ckpt, device=_device(args.device))
    model.eval()
    return index, model


def _query(args: argparse.Namespace, model: Any) -> Any:
    from psm.maps.query import PROMPT_TEMPLATES, embed_audio_query, embed_text_query

    templates = [*(PROMPT_TEMPLATES if args.prompt_ensemble else ()), *(args.template or ())]
    if args.audio is not None:
        if templates:
            raise _UsageError("--template and --prompt-ensemble go with --text")
        return embed_audio_query(model, args.audio)
    return embed_text_query(model, _tokenizer(args), args.text, templates=list(dict.fromkeys(templates)) or ("{}",))


def _tokenizer(args: argparse.Namespace) -> Any:
    """The tokenizer for text queries: ``--tokenizer DIR``, else the one saved in the checkpoint folder."""
    from psm.data.text import load_tokenizer

    folder = Path(args.tokenizer) if args.tokenizer else Path(args.checkpoint) / TOKENIZER_DIR
    if not folder.is_dir():
        raise _UsageError(f"text queries need a tokenizer: none at {folder} (pass --tokenizer DIR)")
    return load_tokenizer(folder)


def _setting(args: argparse.Namespace, location_default: bool | None = None) -> Any:
    from psm.maps.query import MetadataSetting

    return MetadataSetting(
        month=args.month,
        hour=args.hour,
        audio_source=args.audio_source,
        caption_source=args.caption_source,
        location=location_default if args.location is None else args.location,
    )


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse bad output options before any work is done."""
    basemap = getattr(args, "basemap", None)
    if basemap is not None and not all(k in basemap for k in ("{z}", "{x}", "{y}")):
        raise _UsageError(f"--basemap must be an XYZ URL template with {{z}}, {{x}} and {{y}}, got {basemap!r}")
    if getattr(args, "width", 1000) < 200:
        raise _UsageError("--width must be at least 200 pixels")
    if args.batch_size < 1:
        raise _UsageError("--batch-size must be positive")
    cmap = getattr(args, "cmap", None)
    if cmap is not None:
        import matplotlib

        if cmap not in matplotlib.colormaps:
            raise _UsageError(f"--cmap {cmap!r}: not a matplotlib colormap (e.g. viridis, magma, inferno)")
    out = getattr(args, "out", None)
    if out is not None:
        if out.endswith(("/", os.sep)) or Path(out).is_dir():
            raise _UsageError(f"--out {out}: a folder; --out is a file prefix, e.g. {Path(out) / 'map'}")
        _check_folder("--out", Path(out).parent)
    csv = getattr(args, "csv", None)
    if csv not in (None, "-"):
        if Path(csv).is_dir():
            raise _UsageError(f"--csv {csv}: a folder, not a file")
        _check_folder("--csv", Path(csv).parent)


def _check_folder(option: str, folder: Path) -> None:
    """Refuse an output whose folder is a file, or exists but cannot be written (before any work is done)."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise _UsageError(f"{option}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise _UsageError(f"{option}: cannot write in {existing}")


def _run_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        cache_dir=args.cache_dir,
        allow_incomplete=args.allow_incomplete,
        batch_size=args.batch_size,
        precision=args.precision,
    )


def _guard(name: str, fn: Any, args: argparse.Namespace) -> int:
    """Run a handler; input problems become one line on stderr and exit code 2."""
    import warnings

    from psm.data.audio import AudioDecodeError
    from psm.data.metadata import MetadataError
    from psm.data.world.world import WorldError
    from psm.maps.query import MapQueryError
    from psm.models.checkpoint import CheckpointError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", RuntimeWarning)
            warnings.showwarning = lambda msg, *a, **k: print(f"psm map {name}: warning: {msg}", file=sys.stderr)
            return fn(args)
    except (_UsageError, MapQueryError, MetadataError, CheckpointError, AudioDecodeError, WorldError, OSError) as e:
        # OSError: an input that cannot be read or an output that cannot be written (named in the message)
        print(f"psm map {name}: error: {e}", file=sys.stderr)
        return 2


def _cmd_query(args: argparse.Namespace) -> int:
    return _guard("query", _do_query, args)


def _do_query(args: argparse.Namespace) -> int:
    from psm.maps.query import ScaleSpec, query_map

    _check_outputs(args)
    scale = ScaleSpec.parse(args.scale)
    if scale.mode == "shared" and scale.file is None:
        raise _UsageError("--scale shared needs a file for a single map: shared:FILE.json")
    index, model = _load(args)
    q = _query(args, model)
    out = query_map(
        index,
        model,
        q,
        args.out,
        zoom=args.zoom,
        setting=_setting(args),
        scale=scale,
        cmap=args.cmap,
        basemap=args.basemap,
        width_px=args.width,
        title=args.title,
        scorer=args.scorer,
        **_run_kwargs(args),
    )
    s = out.extra["scale"]
    print(f"{out.extra['valid_points']:,} points scored at zoom {out.extra['zoom']} ({out.extra['setting'].label()})")
    print(f"scale: {s.mode}, raw range {s.vmin:.5g} .. {s.vmax:.5g}")
    for p in (out.tif, out.png, out.html):
        if p is not None:
            print(p)
    return 0


def _cmd_top(args: argparse.Namespace) -> int:
    return _guard("top", _do_top, args)


def _do_top(args: argparse.Namespace) -> int:
    import pandas as pd

    from psm.maps.query import condition, default_zoom, score_label, top_k

    _check_outputs(args)
    index, model = _load(args)
    q = _query(args, model)
    zoom = default_zoom(index, args.zoom)
    cond = condition(index, model, zoom, _setting(args), **_run_kwargs(args))
    ids, scores = top_k(cond, q, args.k, scorer=args.scorer)
    if not len(ids):
        raise _UsageError(f"no point of the index has imagery at zoom {zoom} ({cond.setting.label()}): nothing to rank")
    pts = index.points.iloc[ids]
    label = score_label(cond.probabilistic)
    table = pd.DataFrame(
        {
            "rank": range(1, len(ids) + 1),
            "latitude": pts["latitude"].to_numpy(),
            "longitude": pts["longitude"].to_numpy(),
            "score": scores,
            "point_id": ids,
            "row": pts["row"].to_numpy(),
            "col": pts["col"].to_numpy(),
        }
    )
    if args.csv == "-":
        table.to_csv(sys.stdout, index=False, float_format="%.6f")
        return 0
    print(f"top {len(ids)} places for {q.describe()} (zoom {zoom}, {cond.setting.label()}; score = {label})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.6f}"))
    if args.csv:
        Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False, float_format="%.6f")
        print(args.csv)
    return 0


def _cmd_temporal(args: argparse.Namespace) -> int:
    return _guard("temporal", _do_temporal, args)


def _do_temporal(args: argparse.Namespace) -> int:
    from psm.maps.query import ScaleSpec
    from psm.maps.temporal import temporal_maps

    _check_outputs(args)
    if args.hours is not None and args.hour is not None:
        raise _UsageError("--hour fixes the hour; with --hours each frame has its own hour")
    if args.months is not None and args.month is not None:
        raise _UsageError("--month fixes the month; with --months each frame has its own month")
    scale = ScaleSpec.parse(args.scale)
    index, model = _load(args)
    q = _query(args, model)
    res = temporal_maps(
        index,
        model,
        q,
        args.out,
        hours=args.hours,
        months=args.months,
        zoom=args.zoom,
        base=_setting(args),
        scale=scale,
        cmap=args.cmap,
        basemap=args.basemap,
        width_px=args.width,
        formats=("tif", "png", "html") if args.html else ("tif", "png"),
        mp4=args.mp4,
        duration_ms=args.duration_ms,
        scorer=args.scorer,
        **_run_kwargs(args),
    )
    s = res.scale
    print(f"{len(res.frames)} frames over {res.dimension}s; shared scale {s.mode}: {s.vmin:.5g} .. {s.vmax:.5g}")
    for f in res.frames:
        print(f.tif or "", f.png or "")
    if res.gif:
        print(res.gif)
    if args.mp4 and res.mp4 is None:
        print("MP4 skipped: no ffmpeg found (the GIF has the same frames)", file=sys.stderr)
    elif res.mp4:
        print(res.mp4)
    return 0


def _cmd_uncertainty(args: argparse.Namespace) -> int:
    return _guard("uncertainty", _do_uncertainty, args)


def _do_uncertainty(args: argparse.Namespace) -> int:
    from psm.maps.uncertainty import uncertainty_maps

    _check_outputs(args)
    index, model = _load(args)
    outs = uncertainty_maps(
        index,
        model,
        args.out,
        zooms=args.zoom,
        setting=_setting(args, location_default=False),
        cmap=args.cmap,
        basemap=args.basemap,
        width_px=args.width,
        **_run_kwargs(args),
    )
    for o in outs:
        print(f"zoom {o.extra['zoom']}: {o.tif} {o.png} {o.html}")
    return 0


def _cmd_agreement(args: argparse.Namespace) -> int:
    return _guard("agreement", _do_agreement, args)


def _do_agreement(args: argparse.Namespace) -> int:
    import json

    from psm.atomic import write_text_atomic
    from psm.data.world import load_world
    from psm.maps.agreement import truth_agreement
    from psm.maps.query import default_zoom

    if args.out:
        _check_folder("--out", Path(args.out).parent)
    index, model = _load(args)
    result = truth_agreement(
        index,
        model,
        _tokenizer(args),
        load_world(args.world),
        month=args.month,
        hours=args.hours,
        zoom=default_zoom(index, args.zoom),
        events=args.events,
        audio_source=args.audio_source,
        cache_dir=args.cache_dir,
        device=_device(args.device),
        prompt_ensemble=not args.single_word,
    )
    table = result.markdown()
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out.with_suffix(".json"), json.dumps(result.to_dict(), indent=1))
        write_text_atomic(out.with_suffix(".md"), table + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run these sub-commands alone: ``python -m psm.maps.query_command query ...``."""
    parser = argparse.ArgumentParser(prog="psm map")
    add_query_parsers(parser.add_subparsers(dest="map_command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

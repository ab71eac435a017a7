"""``generate_world``: write a complete world (imagery, land cover, truth, audio, manifest, labels).

Everything is written into a hidden staging folder next to ``out`` and renamed into place at the end, so
a killed run leaves no half-written world (and the next run clears its leftovers); an existing world is
replaced only with ``overwrite=True``. The same seed gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from psm.data.world import rules
from psm.data.world.grid import WorldGrid
from psm.data.world.landcover import CLASSES, N_CODES, LandCoverModel
from psm.data.world.plan import Plan, make_plan
from psm.data.world.render import REFERENCE_MONTH, Renderer
from psm.data.world.truth import (
    DOMINANT_RADIUS_M,
    Truth,
    dominant_classes,
    fractions_from_counts,
    source_band_names,
    spatial_fields,
)

FORMAT = "psm-world"
GENERATOR_VERSION = "1.0"
DEFAULT_CENTRE = (52.45, 12.6)  # Havelland, Brandenburg: lakes, pine and oak woods, farmland, small towns
LAYER_MONTHS = (1, 5, 8)
LAYER_HOURS = (0, 6, 8, 14, 20)
IMAGE_COLUMN = "image_sentinel2"
MOSAIC = "imagery/mosaic.tif"
LANDCOVER = "imagery/landcover.tif"
SPATIAL = "truth/spatial.tif"
FRACTIONS = "truth/fractions.tif"
STRIP_ROWS = 100  # rows of the 10 m rasters made at a time (a multiple of the 10 px truth cell)


@dataclass(frozen=True)
class SizeSpec:
    """A size preset: samples, region side, and the geographic split's parameters."""

    samples: int
    extent_km: float
    split_cell_km: float
    min_cell_count: int
    holdout_fraction: float
    max_short_s: float = 10.0  # short clips last 3..max_short_s s (density ∝ 1/d²)
    long_share_scale: float = 1.0  # × the platforms' shares of clips over 10 s


SIZES: dict[str, SizeSpec] = {
    # tiny: a smaller region (16 km) and shorter clips (3-6 s, 7 % over 10 s) keep it fast enough for tests.
    "tiny": SizeSpec(
        samples=200,
        extent_km=16.0,
        split_cell_km=2.0,
        min_cell_count=3,
        holdout_fraction=0.3,
        max_short_s=6.0,
        long_share_scale=0.5,
    ),
    "demo": SizeSpec(
        samples=3000,
        extent_km=50.0,
        split_cell_km=5.0,
        min_cell_count=10,
        holdout_fraction=0.25,
        max_short_s=7.0,
        long_share_scale=0.6,
    ),
    "large": SizeSpec(
        samples=50000,
        extent_km=50.0,
        split_cell_km=5.0,
        min_cell_count=25,
        holdout_fraction=0.2,
        max_short_s=7.0,
        long_share_scale=0.6,
    ),
}


@dataclass
class WorldInfo:
    """What :func:`generate_world` wrote."""

    path: Path
    size: str
    seed: int
    samples: int
    stream: bool
    crs: str
    centre: tuple[float, float]
    extent_km: float
    raster_px: int
    region_lonlat_bounds: tuple[float, float, float, float]
    splits: dict[str, int]
    platforms: dict[str, int]
    event_rates: dict[str, float]
    seconds: dict[str, float] = field(default_factory=dict)
    bytes_by_folder: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes_by_folder.values())

    def summary(self) -> str:
        """Human-readable summary (printed by ``psm world generate``)."""
        w, s, e, n = self.region_lonlat_bounds
        mb = {k: v / 1e6 for k, v in self.bytes_by_folder.items()}
        lines = [
            f"world {self.size} (seed {self.seed}) → {self.path}",
            f"  region {self.extent_km:g} km × {self.extent_km:g} km centred on {self.centre[0]:.4f} N, "
            f"{self.centre[1]:.4f} E ({self.crs}); lat {s:.4f}..{n:.4f}, lon {w:.4f}..{e:.4f}",
            f"  rasters {self.raster_px} × {self.raster_px} px at 10 m (region + 6.6 km margin)",
            f"  samples {self.samples}" + (" (planned; audio is streamed, not written)" if self.stream else ""),
            "  splits " + ", ".join(f"{k} {v}" for k, v in self.splits.items()),
            "  platforms " + ", ".join(f"{k} {v}" for k, v in self.platforms.items()),
            "  events per clip "
            + f"{sum(self.event_rates.values()):.2f}; most common: "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.event_rates.items(), key=lambda kv: -kv[1])[:5]),
            "  disk "
            + ", ".join(f"{k} {v:.1f} MB" for k, v in mb.items())
            + f"; total {self.total_bytes / 1e6:.1f} MB",
            "  time " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()),
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# rasters


def _geotiff_profile(grid: WorldGrid, cell_m: float | None, count: int, dtype: str, **extra) -> dict:
    rows, cols = grid.shape(cell_m)
    profile = {
        "driver": "GTiff",
        "width": cols,
        "height": rows,
        "count": count,
        "dtype": dtype,
        "crs": grid.crs,
        "transform": grid.transform(cell_m),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "interleave": "pixel" if count > 1 and dtype == "uint8" else "band",
    }
    profile.update(extra)
    return profile


def _write_stack(
    path: Path,
    grid: WorldGrid,
    cell_m: float,
    data: np.ndarray,
    names: list[str],
    tags: dict,
    scale: float | None = None,
) -> None:
    """A multi-band GeoTIFF on a coarse grid; float32, or integers with a GDAL scale factor (value × scale)."""
    import rasterio

    if data.dtype == np.float32:
        profile = _geotiff_profile(grid, cell_m, data.shape[0], "float32", predictor=3, zlevel=6)
    else:
        profile = _geotiff_profile(grid, cell_m, data.shape[0], str(data.dtype), predictor=2, zlevel=6)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, name in enumerate(names, start=1):
            dst.set_band_description(i, name)
        if scale is not None:
            dst.scales = (scale,) * data.shape[0]
            dst.offsets = (0.0,) * data.shape[0]
        dst.update_tags(**tags)


def quantise_mantissa(a: np.ndarray, drop_bits: int = 12) -> np.ndarray:
    """float32 with the lowest ``drop_bits`` mantissa bits cleared (relative error < 2^(drop_bits − 23)).

    The spatial truth is stored and used in this form, so the file is small and the function exact."""
    v = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32) & np.uint32((0xFFFFFFFF << drop_bits) & 0xFFFFFFFF)
    return v.view(np.float32)


LAYER_SCALE = 1e-4  # truth layers are uint16 probabilities × 10,000


def _make_rasters(
    stage: Path, grid: WorldGrid, model: LandCoverModel, renderer: Renderer, seasons: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Write land cover and mosaic(s) strip by strip; return the full class array and per-cell counts."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.windows import Window

    n = grid.size_px
    k = round(grid.truth_cell_m / grid.gsd_m)
    nt = n // k
    lc_tmp = stage / "imagery" / ".landcover.gtiff"
    lc_profile = _geotiff_profile(grid, None, 1, "uint8", nodata=0, blockxsize=512, blockysize=512)
    rgb_profile = _geotiff_profile(grid, None, 3, "uint8", photometric="RGB", predictor=2, zlevel=3)
    mosaics = {REFERENCE_MONTH: stage / MOSAIC}
    for m in seasons:
        if m != REFERENCE_MONTH:
            mosaics[m] = stage / f"imagery/mosaic_m{m:02d}.tif"
    classes = np.zeros((n, n), dtype=np.uint8)
    counts = np.zeros((nt, nt, N_CODES), dtype=np.int64)
    col_cell = np.arange(n) // k
    with rasterio.open(lc_tmp, "w", **lc_profile) as lc_dst:
        rgb_dsts = {m: rasterio.open(p, "w", **rgb_profile) for m, p in mosaics.items()}
        try:
            for r0 in range(0, n, STRIP_ROWS):
                r1 = min(n, r0 + STRIP_ROWS)
                lw = model.window(r0, r1, 0, n)
                classes[r0:r1] = lw.classes
                lc_dst.write(lw.classes, 1, window=Window(0, r0, n, r1 - r0))
                idx = ((np.arange(r0, r1) // k)[:, None] * nt + col_cell[None, :]) * N_CODES + lw.classes
                counts += np.bincount(idx.ravel(), minlength=counts.size).reshape(counts.shape)
                for m, dst in rgb_dsts.items():
                    dst.write(renderer.render(lw, r0, 0, month=m), window=Window(0, r0, n, r1 - r0))
        finally:
            for dst in rgb_dsts.values():
                dst.close()
        cmap = {c.code: (*c.colour, 255) for c in CLASSES}
        lc_dst.write_colormap(1, cmap)
        lc_dst.set_band_description(1, "landcover")
        lc_dst.update_tags(**{f"class_{c.code}": c.name for c in CLASSES})
    for m, p in mosaics.items():
        with rasterio.open(p, "r+") as dst:
            dst.build_overviews([4, 16], Resampling.average)  # quick looks; +7 % of the file
            dst.update_tags(month=str(m), source="psm world render (Sentinel-2-like true colour, 10 m)")
            dst.set_band_description(1, "red")
            dst.set_band_description(2, "green")
            dst.set_band_description(3, "blue")
    # The land cover as a Cloud-Optimised GeoTIFF (overviews by mode, ahead of the data).
    from rasterio.shutil import copy as rio_copy

    rio_copy(lc_tmp, stage / LANDCOVER, driver="COG", compress="DEFLATE", overview_resampling="mode", blocksize=512)
    lc_tmp.unlink()
    return classes, counts.transpose(2, 0, 1)


# ---------------------------------------------------------------------------------------------------------
# audio


def _render_one(args: tuple) -> tuple[int, int]:
    """Worker: render, encode and write one clip; returns (index, bytes)."""
    from psm.data.world.mixing import encode, render_clip

    seed, index, duration, rate, fmt, snr, peak, ambience, path, key = args
    audio = render_clip(seed, index, duration, rate, snr, peak, ambience)
    data = encode(audio, rate, fmt, serial=zlib.crc32(key.encode()))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return index, len(data)


def ambience_of(table: pd.DataFrame, i: int) -> tuple[float, float, float]:
    """The (urban, foliage, water) ambience of row ``i`` of a plan or events table."""
    return (float(table.at[i, "amb_urban"]), float(table.at[i, "amb_foliage"]), float(table.at[i, "amb_water"]))


def _clip_args(plan: Plan, seed: int, root: Path, indices) -> list[tuple]:
    t = plan.table
    return [
        (
            seed,
            int(i),
            float(t.at[i, "duration_s"]),
            int(t.at[i, "sample_rate"]),
            str(t.at[i, "format"]),
            plan.snr_db[i],
            float(t.at[i, "peak_dbfs"]),
            ambience_of(t, i),
            root / t.at[i, "audio_path"],
            str(t.at[i, "key"]),
        )
        for i in indices
    ]


def _write_audio(stage: Path, plan: Plan, seed: int, workers: int, progress: Callable | None) -> int:
    for folder in sorted({str(Path(p).parent) for p in plan.table["audio_path"]}):
        (stage / folder).mkdir(parents=True, exist_ok=True)
    args = _clip_args(plan, seed, stage, range(len(plan)))
    total = 0
    if workers > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for done, (_, nbytes) in enumerate(pool.map(_render_one, args, chunksize=16), start=1):
                total += nbytes
                if progress and done % 250 == 0:
                    progress("audio", done, len(args))
    else:
        for done, a in enumerate(args, start=1):
            total += _render_one(a)[1]
            if progress and done % 250 == 0:
                progress("audio", done, len(args))
    return total


# ---------------------------------------------------------------------------------------------------------
# tables


def manifest_table(plan: Plan) -> pd.DataFrame:
    """The manifest (psm.data.manifest format) of a plan."""
    t = plan.table
    cols = [
        "key",
        "audio_path",
        "latitude",
        "longitude",
        "audio_source",
        "caption",
        "caption_source",
        "date",
        "month",
        "hour",
        "split",
        "split_cell",
    ]
    out = t[cols].copy()
    out[IMAGE_COLUMN] = MOSAIC
    return out


def events_table(plan: Plan) -> pd.DataFrame:
    """Per-sample truth: labels, probabilities and levels of every event, with place/time/format details."""
    t = plan.table
    base = t[
        [
            "key",
            "split",
            "audio_source",
            "latitude",
            "longitude",
            "x",
            "y",
            "month",
            "true_hour",
            "landcover",
            "dominant_landcover",
            "duration_s",
            "sample_rate",
            "format",
            "peak_dbfs",
            "amb_urban",
            "amb_foliage",
            "amb_water",
        ]
    ].copy()
    base = base.rename(columns={"month": "true_month"})
    base["true_month"] = base["true_month"].astype("int64")
    names = rules.EVENT_NAMES
    base["events"] = [[names[e] for e in np.flatnonzero(row)] for row in plan.labels]
    base["n_events"] = plan.labels.sum(axis=1).astype("int64")
    extra = {}
    for j, e in enumerate(names):
        extra[e] = plan.labels[:, j]
    for j, e in enumerate(names):
        extra[f"p_{e}"] = plan.probs[:, j]
    for j, e in enumerate(names):
        extra[f"snr_{e}"] = plan.snr_db[:, j]
    return pd.concat([base, pd.DataFrame(extra, index=base.index)], axis=1)


def assign_split(plan: Plan, params: dict, seed: int) -> dict:
    """Add ``split`` / ``split_cell`` to a plan: psm.data.split.geographic_split with metric cells."""
    from psm.data.split import geographic_split

    result = geographic_split(
        plan.table,
        cell=float(params["cell_km"]),
        min_cell_count=int(params["min_cell_count"]),
        holdout_fraction=float(params["holdout_fraction"]),
        val_fraction_of_holdout=float(params["val_fraction_of_holdout"]),
        seed=int(seed),
    )
    plan.table["split"] = result.labels.astype(str).to_numpy()
    plan.table["split_cell"] = result.cells
    return result.summary


def _write_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    df.to_parquet(tmp, index=False, compression="zstd")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# the world


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder")
        if any(out.iterdir()):
            what = "a complete world" if (out / "world.json").is_file() else "a non-empty folder"
            if not overwrite:
                raise FileExistsError(f"{out} is already {what}; pass overwrite=True (--overwrite) to replace it")
            if not (out / "world.json").is_file() and not (out / "manifest.parquet").exists():
                raise FileExistsError(f"{out} is a non-empty folder that is not a world; refusing to replace it")


def generate_world(
    out: str | os.PathLike[str],
    size: str = "tiny",
    seed: int = 0,
    *,
    centre: tuple[float, float] = DEFAULT_CENTRE,
    extent_km: float | None = None,
    samples: int | None = None,
    stream: bool = False,
    seasons: tuple[int, ...] = (),
    overwrite: bool = False,
    workers: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> WorldInfo:
    """Write a world of ``size`` (tiny/demo/large) to ``out`` and return what was written.

    ``extent_km`` / ``samples`` override the preset; ``stream=True`` writes everything but the audio and
    the manifest (use :func:`psm.data.world.stream.iter_samples`); ``seasons`` adds a mosaic per month
    listed (``imagery/mosaic_mMM.tif``) to the reference (June) one; ``workers > 1`` renders audio in
    that many processes (default: up to 2, as CPUs allow; the bytes are the same either way).
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    spec = SIZES[size]
    extent = float(extent_km if extent_km is not None else spec.extent_km)
    if not 4.0 <= extent <= 150.0:
        raise ValueError(f"extent_km must be in [4, 150], got {extent}")
    n_samples = int(samples if samples is not None else spec.samples)
    if n_samples < 1:
        raise ValueError(f"samples must be >= 1, got {n_samples}")
    lat, lon = (float(v) for v in centre)
    if not (-70.0 <= lat <= 70.0 and -180.0 <= lon <= 180.0):
        raise ValueError(f"centre must be within latitude ±70 and longitude ±180, got {centre}")
    bad = [m for m in seasons if not 1 <= int(m) <= 12]
    if bad:
        raise ValueError(f"seasons must be months 1..12, got {bad}")

    out = Path(out)
    _check_out(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)  # leftovers of a killed run
    for sub in ("imagery", "truth"):
        (stage / sub).mkdir(parents=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        grid = WorldGrid.create(lat, lon, extent)
        model = LandCoverModel(grid, int(seed))
        renderer = Renderer(int(seed), grid.size_px)
        seconds["setup"] = time.perf_counter() - t0

        t = time.perf_counter()
        classes, counts = _make_rasters(stage, grid, model, renderer, tuple(int(m) for m in seasons))
        seconds["rasters"] = time.perf_counter() - t

        t = time.perf_counter()
        cell = grid.truth_cell_m
        fractions = fractions_from_counts(counts)
        spatial = quantise_mantissa(spatial_fields(fractions, cell))
        truth = Truth(grid, spatial)
        dominant = dominant_classes(fractions, cell)
        tags = {"generator": f"psm world {GENERATOR_VERSION}", "seed": str(seed)}
        _write_stack(
            stage / SPATIAL,
            grid,
            cell,
            spatial,
            source_band_names(),
            {**tags, "content": "spatial factor S_s of each event source (see world.json rules)"},
        )
        _write_stack(
            stage / FRACTIONS,
            grid,
            cell,
            counts[1:].astype(np.uint8),
            [c.name for c in CLASSES],
            {**tags, "content": "land-cover class share of each 100 m cell, percent"},
            scale=0.01,
        )
        layer_files = {}
        for m in LAYER_MONTHS:
            for h in LAYER_HOURS:
                name = f"truth/m{m:02d}_h{h:02d}.tif"
                layer = np.rint(truth.layer(m, h) / LAYER_SCALE).astype(np.uint16)
                _write_stack(
                    stage / name,
                    grid,
                    grid.layer_cell_m,
                    layer,
                    list(rules.EVENT_NAMES),
                    {
                        **tags,
                        "month": str(m),
                        "hour": str(h),
                        "content": "P(event audible) × 10000 for a neutral recorder at the cell centre",
                    },
                    scale=LAYER_SCALE,
                )
                layer_files[f"m{m:02d}_h{h:02d}"] = name
        seconds["truth"] = time.perf_counter() - t

        t = time.perf_counter()
        n = grid.size_px
        left, _, _, top = grid.raster_bounds

        def landcover_at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
            c = np.clip(((x - left) / grid.gsd_m).astype(int), 0, n - 1)
            r = np.clip(((top - y) / grid.gsd_m).astype(int), 0, n - 1)
            return classes[r, c]

        plan = make_plan(
            n_samples,
            int(seed),
            grid,
            truth,
            fractions,
            dominant,
            landcover_at,
            key_prefix=f"w{seed}_",
            max_short_s=spec.max_short_s,
            long_share_scale=spec.long_share_scale,
        )
        split_params = {
            "cell_km": spec.split_cell_km,
            "min_cell_count": spec.min_cell_count,
            "holdout_fraction": spec.holdout_fraction,
            "val_fraction_of_holdout": 0.5,
        }
        split_summary = assign_split(plan, split_params, int(seed))
        seconds["plan"] = time.perf_counter() - t

        t = time.perf_counter()
        if not stream:
            n_workers = min(2, os.cpu_count() or 1) if workers is None else max(1, int(workers))
            _write_audio(stage, plan, int(seed), n_workers, progress)
            _write_parquet(manifest_table(plan), stage / "manifest.parquet")
        else:
            _write_parquet(manifest_table(plan), stage / "plan.parquet")
        _write_parquet(events_table(plan), stage / "events.parquet")
        seconds["audio" if not stream else "tables"] = time.perf_counter() - t

        info_json = _world_json(
            size,
            int(seed),
            n_samples,
            stream,
            grid,
            model,
            plan,
            split_summary,
            spec,
            tuple(sorted({REFERENCE_MONTH, *(int(m) for m in seasons)})),
            layer_files,
        )
        (stage / "world.json").write_text(json.dumps(info_json, indent=1) + "\n", encoding="utf-8")

        # Swap the finished world into place.
        if out.exists():
            trash = out.parent / f".{out.name}.old"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(out, trash)
            os.replace(stage, out)
            shutil.rmtree(trash)
        else:
            os.replace(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    seconds["total"] = time.perf_counter() - t0

    sizes: dict[str, int] = {}
    for p in sorted(out.rglob("*")):
        if p.is_file():
            top_name = p.relative_to(out).parts[0]
            key = top_name if (out / top_name).is_dir() else "tables"
            sizes[key] = sizes.get(key, 0) + p.stat().st_size
    t = plan.table
    return WorldInfo(
        path=out,
        size=size,
        seed=int(seed),
        samples=n_samples,
        stream=stream,
        crs=grid.crs,
        centre=(lat, lon),
        extent_km=grid.extent_m / 1000.0,
        raster_px=grid.size_px,
        region_lonlat_bounds=grid.region_lonlat_bounds(),
        splits={k: int(v) for k, v in t["split"].value_counts().sort_index().items()},
        platforms={k: int(v) for k, v in t["audio_source"].value_counts().sort_index().items()},
        event_rates={e: float(plan.labels[:, j].mean()) for j, e in enumerate(rules.EVENT_NAMES)},
        seconds={k: round(v, 2) for k, v in seconds.items()},
        bytes_by_folder=sizes,
    )


def _world_json(size, seed, n_samples, stream, grid, model, plan, split_summary, spec, months, layer_files) -> dict:
    t = plan.table
    return {
        "format": FORMAT,
        "generator_version": GENERATOR_VERSION,
        "size": size,
        "seed": seed,
        "samples": n_samples,
        "audio": "stream" if stream else "files",
        "centre": [grid.centre_lat, grid.centre_lon],
        "crs": grid.crs,
        "grid": grid.to_dict(),
        "region_lonlat_bounds": list(grid.region_lonlat_bounds()),
        "classes": [
            {"code": c.code, "name": c.name, "colour": list(c.colour), "description": c.description} for c in CLASSES
        ],
        "structures": model.describe(),
        "events": list(rules.EVENT_NAMES),
        "platforms": list(rules.PLATFORMS),
        "caption_sources": list(rules.CAPTION_SOURCES),
        "imagery": {
            "source": "sentinel2",
            "gsd_m": grid.gsd_m,
            "mosaic": MOSAIC,
            "reference_month": REFERENCE_MONTH,
            "mosaics": {str(m): (MOSAIC if m == REFERENCE_MONTH else f"imagery/mosaic_m{m:02d}.tif") for m in months},
            "landcover": LANDCOVER,
        },
        "truth": {
            "spatial": SPATIAL,
            "spatial_bands": source_band_names(),
            "fractions": FRACTIONS,
            "cell_m": grid.truth_cell_m,
            "layers": {
                "months": list(LAYER_MONTHS),
                "hours": list(LAYER_HOURS),
                "cell_m": grid.layer_cell_m,
                "dtype": "uint16",
                "scale": LAYER_SCALE,
                "files": layer_files,
            },
            "dominant_radius_m": DOMINANT_RADIUS_M,
        },
        "rules": rules.describe(),
        "split": {
            "cell_km": spec.split_cell_km,
            "min_cell_count": spec.min_cell_count,
            "holdout_fraction": spec.holdout_fraction,
            "val_fraction_of_holdout": 0.5,
            "samples": split_summary["samples"],
            "cells": split_summary["cells"],
        },
        "files": {
            "manifest": None if stream else "manifest.parquet",
            "plan": "plan.parquet" if stream else None,
            "events": "events.parquet",
        },
        "counts": {
            "platforms": {k: int(v) for k, v in t["audio_source"].value_counts().sort_index().items()},
            "caption_sources": {k: int(v) for k, v in t["caption_source"].value_counts().sort_index().items()},
            "formats": {k: int(v) for k, v in t["format"].value_counts().sort_index().items()},
            "sample_rates": {str(k): int(v) for k, v in t["sample_rate"].value_counts().sort_index().items()},
            "event_rates": {e: round(float(plan.labels[:, j].mean()), 4) for j, e in enumerate(rules.EVENT_NAMES)},
            "audio_seconds": round(float(t["duration_s"].sum()), 2),
        },
    }

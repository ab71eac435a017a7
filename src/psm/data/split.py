"""Geographic train/val/test split of a sample manifest (PSM §5.3, official ``data_prep/data_split.py``).

Samples are binned into geographic cells; whole cells are held out so that no location leaks between
splits. GeoSound uses 1°×1° cells; the SoundingEarth variant uses ~10 km × 10 km metric cells.

Algorithm (official, see ``shared/reference/official-code-notes.md`` §5.3):

1. cell id per sample (``"1deg"``: ``int(lat + 90) · 360 + int(lon + 180)``);
2. cells with ≥ ``min_cell_count`` (25) samples are *selected*; every other cell goes to train;
3. selected cells are split into count terciles with the 0.33 / 0.66 quantiles of their counts
   (low ≤ q1 < medium ≤ q2 < high);
4. per group, in the order low, medium, high, ``int(holdout_fraction · M)`` cells are held out with
   ``RandomState.choice(replace=False)``; the first ``int(val_fraction_of_holdout · held)`` of them go to
   val, the rest to test; samples follow their cell;
5. optionally val / test are sub-sampled to ``val_size`` / ``test_size`` samples matching the *train*
   source mix: ``n_s = min(int(N · p_s_train), available_s)``, the shortfall added to the largest
   train source (official: iNat), each drawn with ``DataFrame.sample(n_s, random_state=seed)``.

Labels: ``train`` / ``val`` / ``test``; rows of held-out cells that re-sampling leaves out are
``val_unused`` / ``test_unused`` (they must not go to train: their cells are held out); rows with bad
coordinates are ``invalid`` when ``on_error="skip"``. Nothing is dropped silently: every row gets a label
and every label is counted in the summary.

Fidelity to the official implementation (which we cannot run):

* bit-identical: degree cell ids (except ``lon == 180`` exactly, see below), cell counts, the
  selection threshold, the tercile thresholds (linear-interpolated quantiles, as pandas/numpy), the
  held-out counts ``int(0.10·M)`` / ``int(0.40·held)``, the RNG (legacy ``RandomState(seed)`` as the
  official global ``np.random.seed(42)``, one ``choice`` call per group in the order low, medium, high,
  also when a group holds out 0 cells), the shuffle of the whole table with
  ``sample(frac=1, random_state=seed)`` before sub-sampling, and the per-source ``sample(n,
  random_state=seed)`` calls on the shuffled val / test rows;
* not guaranteed: the order in which the official code lists a group's cells before ``choice`` is not
  recorded; we list them by ascending cell id, so the chosen cells match only if theirs did too. The
  official script shuffles ``merged_metadata_final.csv`` *before* dropping rows that fail the sanity
  check, so the re-sampled val/test rows match only when this function gets that same unfiltered table
  in the same row order (mark failing rows invalid rather than dropping them beforehand).
* deliberate differences: ``lon == 180`` is wrapped to ``-180`` (same meridian) because the official
  ``int(180 + 180) = 360`` spills into the next latitude row's id; metric cells use the band-centre
  latitude for the longitude step and a collision-free id unless ``official_cell_ids=True``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from psm.atomic import atomic_path, write_text_atomic

__all__ = [
    "SplitResult",
    "cell_ids",
    "format_summary",
    "geographic_split",
    "write_split",
]

KM_PER_DEGREE = 111.0  # the official code's constant for both axes
INVALID = "invalid"
GROUPS = ("low", "medium", "high")
_MISSING_SOURCE = "<missing>"
# A band-centre cosine below this would give a longitude step beyond 360°, i.e. one cell per band;
# clamping only avoids the division by zero at the poles.
_MIN_COS = 1e-12


@dataclass
class SplitResult:
    """Per-row split labels and cell ids (aligned to the input's index) plus a JSON-ready summary."""

    labels: pd.Series
    cells: pd.Series
    summary: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# cells


def _parse_cell(cell: str | float) -> float | None:
    """Return the metric cell size in km, or None for the official 1° cells."""
    if isinstance(cell, str):
        text = cell.strip().lower()
        if text in {"1deg", "1°", "degree", "deg"}:
            return None
        if text.endswith("km"):
            text = text[:-2]
        try:
            size = float(text)
        except ValueError:
            raise ValueError(f"cell must be '1deg' or a size in km (e.g. 10 or '10km'), got {cell!r}") from None
    else:
        size = float(cell)
    if not math.isfinite(size) or size <= 0:
        raise ValueError(f"metric cell size must be a positive number of km, got {cell!r}")
    return size


def _degree_cells(lat: np.ndarray, lon: np.ndarray, official: bool) -> np.ndarray:
    lat_bin = np.floor(lat + 90.0).astype(np.int64)  # == int() since lat + 90 >= 0
    lon_shift = lon + 180.0
    if not official:
        # lon = 180 is lon = -180; the official int(360) would land in the next latitude row's id.
        lon_shift = np.where(lon_shift >= 360.0, lon_shift - 360.0, lon_shift)
    lon_bin = np.floor(lon_shift).astype(np.int64)
    return lat_bin * 360 + lon_bin


def _metric_bins(lat: np.ndarray, lon: np.ndarray, size_km: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Latitude-band and longitude bins of ~size_km cells; also the longest possible band (bin count)."""
    lat_step = size_km / KM_PER_DEGREE
    n_lat = max(1, math.ceil(180.0 / lat_step))
    # lat = 90 (or float round-up) would open a band of its own; fold it into the last band.
    lat_bin = np.clip(np.floor((lat + 90.0) / lat_step).astype(np.int64), 0, n_lat - 1)
    centre = np.clip(-90.0 + (lat_bin + 0.5) * lat_step, -90.0, 90.0)
    cos_c = np.maximum(np.cos(np.radians(centre)), _MIN_COS)
    lon_step = size_km / (KM_PER_DEGREE * cos_c)
    n_lon = np.maximum(1, np.ceil(360.0 / lon_step)).astype(np.int64)
    lon_shift = np.where(lon >= 180.0, lon - 360.0, lon) + 180.0  # wrap 180 → -180 (same meridian)
    # The band's last bin is narrower (360° is rarely a multiple of the step); clip guards round-off.
    lon_bin = np.clip(np.floor(lon_shift / lon_step).astype(np.int64), 0, n_lon - 1)
    max_lon_bins = max(1, math.ceil(360.0 * KM_PER_DEGREE / size_km))  # equator, cos = 1
    return lat_bin, lon_bin, max_lon_bins


def cell_ids(
    latitude: Sequence[float] | np.ndarray,
    longitude: Sequence[float] | np.ndarray,
    cell: str | float = "1deg",
    *,
    official_cell_ids: bool = False,
) -> np.ndarray:
    """Integer cell id per (valid) coordinate: official 1° ids, or collision-free metric-cell ids.

    Metric ids are ``lat_bin · 10^k + lon_bin`` with ``10^k`` above the longest band's bin count, so they
    are unique and readable. ``official_cell_ids=True`` instead reproduces SoundingEarth's official
    ``lat_bin · 360 + lon_bin``, which collides because a 10-km band has up to ~4,000 lon bins: use it
    only to reproduce the official SoundingEarth split.
    """
    lat = np.asarray(latitude, dtype=float)
    lon = np.asarray(longitude, dtype=float)
    size_km = _parse_cell(cell)
    if size_km is None:
        return _degree_cells(lat, lon, official_cell_ids)
    lat_bin, lon_bin, max_lon_bins = _metric_bins(lat, lon, size_km)
    if official_cell_ids:
        return lat_bin * 360 + lon_bin  # the official bug, on purpose
    mult = 10 ** len(str(max_lon_bins))
    n_lat = math.ceil(180.0 / (size_km / KM_PER_DEGREE))
    if n_lat * mult >= 2**63:
        raise ValueError(f"metric cell size {size_km} km is too small for int64 cell ids")
    return lat_bin * mult + lon_bin


# --------------------------------------------------------------------------------------------------
# coordinates


def _coerce(col: pd.Series) -> np.ndarray:
    if col.dtype == object or pd.api.types.is_string_dtype(col):
        col = col.astype(str).str.strip()
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=float)


def _coordinates(
    df: pd.DataFrame, lat_col: str, lon_col: str, on_error: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Numeric lat/lon and a validity mask; raise naming the bad rows unless on_error == 'skip'."""
    missing = [c for c in (lat_col, lon_col) if c not in df.columns]
    if missing:
        raise ValueError(f"manifest lacks coordinate column(s) {missing}; columns: {list(df.columns)}")
    lat = _coerce(df[lat_col])
    lon = _coerce(df[lon_col])
    with np.errstate(invalid="ignore"):
        valid = np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90.0) & (np.abs(lon) <= 180.0)
    n_bad = int((~valid).sum())
    if n_bad and on_error != "skip":
        bad = np.flatnonzero(~valid)
        shown = "; ".join(
            f"row {p} (index {df.index[p]!r}): {lat_col}={df[lat_col].iloc[p]!r}, {lon_col}={df[lon_col].iloc[p]!r}"
            for p in bad[:5]
        )
        more = f" (and {n_bad - 5} more)" if n_bad > 5 else ""
        raise ValueError(
            f"{n_bad} of {len(df)} rows have missing or out-of-range coordinates (need |lat| <= 90, "
            f"|lon| <= 180): {shown}{more}. Fix them or pass on_error='skip' to label them "
            f"{INVALID!r}."
        )
    return lat, lon, valid


# --------------------------------------------------------------------------------------------------
# re-sampling


def _allocate(
    train_counts: dict[str, int], available: dict[str, int], target: int, largest: str | None
) -> tuple[dict[str, int], str | None]:
    """Per-source sample counts for one split: min(int(N·p_train), available), shortfall to the largest."""
    n_train = sum(train_counts.values())
    sources = sorted(set(train_counts) | set(available) | ({largest} if largest is not None else set()))
    alloc = {
        s: min(int(target * (train_counts.get(s, 0) / n_train)) if n_train else 0, available.get(s, 0)) for s in sources
    }
    # Official: the whole shortfall goes to iNat (the largest source). If that source runs out we
    # continue down the train ranking rather than silently return fewer samples than asked for.
    ranking = sorted(train_counts, key=lambda s: (-train_counts[s], s))
    if largest is not None:
        ranking = [largest] + [s for s in ranking if s != largest]
    ranking += [s for s in sources if s not in ranking]
    for s in ranking:
        short = target - sum(alloc.values())
        if short <= 0:
            break
        alloc[s] += min(short, available.get(s, 0) - alloc[s])
    return {s: n for s, n in alloc.items() if n or available.get(s, 0)}, (ranking[0] if ranking else None)


# --------------------------------------------------------------------------------------------------
# main entry point


def geographic_split(
    df: pd.DataFrame,
    *,
    cell: str | float = "1deg",
    min_cell_count: int = 25,
    holdout_fraction: float = 0.10,
    val_fraction_of_holdout: float = 0.40,
    val_size: int | None = None,
    test_size: int | None = None,
    source_column: str = "audio_source",
    largest_source: str | None = None,
    seed: int = 42,
    official_cell_ids: bool = False,
    on_error: Literal["raise", "skip"] = "raise",
    latitude_column: str = "latitude",
    longitude_column: str = "longitude",
) -> SplitResult:
    """Split rows into train/val/test by holding out whole geographic cells (PSM / GeoSound protocol).

    ``cell="1deg"`` gives the GeoSound split; ``cell=10, holdout_fraction=0.35`` the SoundingEarth one
    (add ``official_cell_ids=True`` to reproduce its colliding ids). ``val_size`` / ``test_size`` turn
    on source-matched sub-sampling, which needs ``source_column``; ``largest_source`` overrides which
    source absorbs the shortfall (default: the largest in train).
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if min_cell_count < 1:
        raise ValueError(f"min_cell_count must be >= 1, got {min_cell_count}")
    for name, frac in (
        ("holdout_fraction", holdout_fraction),
        ("val_fraction_of_holdout", val_fraction_of_holdout),
    ):
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {frac}")
    for name, size in (("val_size", val_size), ("test_size", test_size)):
        if size is not None and size < 0:
            raise ValueError(f"{name} must be >= 0, got {size}")
    resample = val_size is not None or test_size is not None
    if resample and source_column not in df.columns:
        raise ValueError(
            f"val_size/test_size re-sample by source but column {source_column!r} is missing; "
            f"columns: {list(df.columns)}"
        )
    size_km = _parse_cell(cell)

    n = len(df)
    lat, lon, valid = _coordinates(df, latitude_column, longitude_column, on_error)
    vpos = np.flatnonzero(valid)
    cells = np.full(n, -1, dtype=np.int64)
    cells[vpos] = cell_ids(
        lat[vpos], lon[vpos], "1deg" if size_km is None else size_km, official_cell_ids=official_cell_ids
    )

    # Cells in ascending id order: deterministic and independent of the table's row order.
    uniq, counts = np.unique(cells[vpos], return_counts=True)
    selected = counts >= min_cell_count
    sel_counts = counts[selected]
    if sel_counts.size:
        q1, q2 = (float(q) for q in np.quantile(sel_counts, [0.33, 0.66]))
    else:
        q1 = q2 = float("nan")
    group_masks = {
        "low": selected & (counts <= q1),
        "medium": selected & (counts > q1) & (counts <= q2),
        "high": selected & (counts > q2),
    }

    # Legacy RandomState: the official code seeds the global legacy generator with np.random.seed(42).
    rs = np.random.RandomState(seed)
    val_cells: list[int] = []
    test_cells: list[int] = []
    groups_summary: dict[str, dict[str, int]] = {}
    for g in GROUPS:
        ids = uniq[group_masks[g]]
        n_held = int(holdout_fraction * len(ids))
        # Called even when n_held == 0: the official loop does, and choice still advances the RNG.
        held = rs.choice(ids, n_held, replace=False) if len(ids) else ids[:0]
        n_val = int(val_fraction_of_holdout * len(held))
        val_cells += [int(c) for c in held[:n_val]]
        test_cells += [int(c) for c in held[n_val:]]
        groups_summary[g] = {
            "cells": len(ids),
            "samples": int(counts[group_masks[g]].sum()),
            "held_out": int(n_held),
            "val": n_val,
            "test": int(n_held - n_val),
        }

    labels = np.full(n, INVALID, dtype=object)
    labels[vpos] = "train"
    labels[valid & np.isin(cells, val_cells)] = "val"
    labels[valid & np.isin(cells, test_cells)] = "test"
    before = {s: int((labels == s).sum()) for s in ("train", "val", "test")}

    sources: np.ndarray | None = None
    if source_column in df.columns:
        sources = df[source_column].astype(object).where(df[source_column].notna(), _MISSING_SOURCE)
        sources = sources.astype(str).to_numpy()

    resampling: dict[str, Any] = {}
    if resample:
        assert sources is not None
        # The official script shuffles the whole table (random_state=42) and later samples from the
        # val/test rows in that shuffled order, so the same row order is needed for the same draw.
        shuffled = pd.Series(np.arange(n)).sample(frac=1, random_state=seed).to_numpy()
        train_src = pd.Series(sources[labels == "train"]).value_counts()
        train_counts = {str(k): int(v) for k, v in train_src.items()}
        for split, target in (("val", val_size), ("test", test_size)):
            if target is None:
                continue
            pool = shuffled[labels[shuffled] == split]  # positions, in shuffled order
            pool_src = sources[pool]
            avail = {str(k): int(v) for k, v in pd.Series(pool_src).value_counts().items()}
            alloc, largest = _allocate(train_counts, avail, int(target), largest_source)
            keep: list[np.ndarray] = []
            for s, k in alloc.items():
                rows = pd.Series(pool[pool_src == s])
                keep.append(rows.sample(k, random_state=seed).to_numpy())
            kept = np.concatenate(keep) if keep else np.empty(0, dtype=np.int64)
            drop = np.setdiff1d(pool, kept)
            labels[drop] = f"{split}_unused"
            resampling[split] = {
                "target": int(target),
                "selected": len(kept),
                "available": len(pool),
                "per_source": dict(sorted(alloc.items())),
                "shortfall_source": largest,
                "target_met": len(kept) == int(target),
            }

    summary = _summarise(
        labels=labels,
        cells=cells,
        valid=valid,
        sources=sources,
        uniq=uniq,
        selected=selected,
        val_cells=val_cells,
        test_cells=test_cells,
        q=(q1, q2),
        groups=groups_summary,
        before=before,
        resampling=resampling,
        params={
            "cell": "1deg" if size_km is None else f"{size_km:g}km",
            "official_cell_ids": bool(official_cell_ids),
            "min_cell_count": int(min_cell_count),
            "holdout_fraction": float(holdout_fraction),
            "val_fraction_of_holdout": float(val_fraction_of_holdout),
            "val_size": val_size,
            "test_size": test_size,
            "source_column": source_column if sources is not None else None,
            "seed": int(seed),
            "on_error": on_error,
        },
    )
    cell_arr = pd.array(cells, dtype="Int64")
    cell_arr[~valid] = pd.NA
    cell_series = pd.Series(cell_arr, index=df.index, name="split_cell")
    return SplitResult(
        labels=pd.Series(labels, index=df.index, name="split", dtype=object),
        cells=cell_series,
        summary=summary,
    )


def _summarise(
    *,
    labels: np.ndarray,
    cells: np.ndarray,
    valid: np.ndarray,
    sources: np.ndarray | None,
    uniq: np.ndarray,
    selected: np.ndarray,
    val_cells: list[int],
    test_cells: list[int],
    q: tuple[float, float],
    groups: dict[str, dict[str, int]],
    before: dict[str, int],
    resampling: dict[str, Any],
    params: dict[str, Any],
) -> dict[str, Any]:
    """JSON-ready counts: cells and samples per split, per split × source, terciles, re-sampling."""
    order = ["train", "val", "test", "val_unused", "test_unused", INVALID]
    present = set(labels.tolist())
    samples = {s: int((labels == s).sum()) for s in order if s in present or s in ("train", "val", "test")}
    n_held = len(val_cells) + len(test_cells)
    summary: dict[str, Any] = {
        "params": params,
        "rows": len(labels),
        "valid_rows": int(valid.sum()),
        "invalid_rows": int((~valid).sum()),
        "cells_occupied": len(uniq),
        "cells_selected": int(selected.sum()),
        "cells": {"train": len(uniq) - n_held, "val": len(val_cells), "test": len(test_cells)},
        "samples": samples,
        "samples_before_resampling": before,
        "terciles": {
            "q1": None if math.isnan(q[0]) else q[0],
            "q2": None if math.isnan(q[1]) else q[1],
            "groups": groups,
        },
    }
    if sources is not None:
        summary["by_source"] = {
            s: {str(k): int(v) for k, v in pd.Series(sources[labels == s]).value_counts().sort_index().items()}
            for s in samples
        }
    if resampling:
        summary["resampling"] = resampling
    return summary


# --------------------------------------------------------------------------------------------------
# files


def _rebase_paths(df: pd.DataFrame, src_dir: Path, out_dir: Path) -> pd.DataFrame:
    """Relative ``audio_path`` / ``image_*`` cells re-expressed from ``out_dir``, so they name the same files."""
    out_dir = out_dir.resolve()
    src_dir = src_dir.resolve()

    def rebase(value: Any) -> Any:
        if not isinstance(value, str) or not value or "://" in value or os.path.isabs(value):
            return value
        return os.path.relpath(src_dir / value, out_dir)

    columns = [c for c in df.columns if c == "audio_path" or str(c).startswith("image_")]
    return df.assign(**{c: df[c].map(rebase) for c in columns})


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() in {".parquet", ".pq"}


def summary_path(out_path: str | os.PathLike[str]) -> Path:
    """Where write_split puts the summary JSON: ``<out>.split-summary.json`` next to the output."""
    out = Path(out_path)
    return out.with_name(out.name + ".split-summary.json")


def write_split(
    manifest_path: str | os.PathLike[str], out_path: str | os.PathLike[str], **kwargs: Any
) -> dict[str, Any]:
    """Add ``split`` / ``split_cell`` columns to a CSV or Parquet manifest; write it and a summary JSON.

    CSV cells are read and written back as text, so other columns (and bad coordinates such as "-") are
    preserved verbatim. ``kwargs`` go to :func:`geographic_split`. Returns the summary.
    """
    src, out = Path(manifest_path), Path(out_path)
    if _is_parquet(src):
        df = pd.read_parquet(src)
    else:
        df = pd.read_csv(src, dtype=str, keep_default_na=False, na_filter=False)
    if df.empty:
        raise ValueError(f"{src}: no rows to split")
    result = geographic_split(df, **kwargs)
    df = df.assign(split=result.labels, split_cell=result.cells)
    summary = {"manifest": str(src), "output": str(out), **result.summary}
    if out.parent.resolve() != src.parent.resolve():
        df = _rebase_paths(df, src.parent, out.parent)  # a manifest's file paths are relative to its folder

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        if _is_parquet(out):
            df.to_parquet(tmp, index=False)
        else:
            df.to_csv(tmp, index=False)
    write_text_atomic(summary_path(out), json.dumps(summary, indent=2, sort_keys=False) + "\n")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Human-readable table of a split summary, for ``psm data split`` to print."""
    p = summary["params"]
    lines = [
        f"cells: {p['cell']}{' (official colliding ids)' if p['official_cell_ids'] else ''}, "
        f"seed {p['seed']}, hold out {p['holdout_fraction']:g} of selected cells, "
        f"{p['val_fraction_of_holdout']:g} of those to val",
        f"rows {summary['rows']}: valid {summary['valid_rows']}, invalid {summary['invalid_rows']}",
        f"cells occupied {summary['cells_occupied']}, selected (>= {p['min_cell_count']} samples) "
        f"{summary['cells_selected']}",
    ]
    t = summary["terciles"]
    if t["q1"] is not None:
        lines.append(f"tercile thresholds q1 = {t['q1']:g}, q2 = {t['q2']:g} samples per cell")
        lines.append(f"  {'group':<8}{'cells':>8}{'samples':>10}{'held':>7}{'val':>6}{'test':>6}")
        for g, d in t["groups"].items():
            lines.append(f"  {g:<8}{d['cells']:>8}{d['samples']:>10}{d['held_out']:>7}{d['val']:>6}{d['test']:>6}")
    before = summary["samples_before_resampling"]
    lines.append(f"  {'split':<12}{'cells':>8}{'samples':>10}{'before re-sampling':>20}")
    for s, k in summary["samples"].items():
        c = summary["cells"].get(s, "")
        b = before.get(s, "") if "resampling" in summary else ""
        lines.append(f"  {s:<12}{c!s:>8}{k:>10}{b!s:>20}")
    for s, counts in summary.get("by_source", {}).items():
        total = sum(counts.values()) or 1
        top = sorted(counts.items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{k} {v} ({100 * v / total:.1f}%)" for k, v in top[:8])
        extra = f", … {len(top) - 8} more" if len(top) > 8 else ""
        lines.append(f"  {s} sources: {shown}{extra}")
    for s, r in summary.get("resampling", {}).items():
        flag = "" if r["target_met"] else f" (target {r['target']} not met)"
        lines.append(
            f"  {s} re-sampled {r['selected']} of {r['available']}{flag}, shortfall to {r['shortfall_source']}"
        )
    return "\n".join(lines)

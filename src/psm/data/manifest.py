"""The manifest: one table (CSV or Parquet) that describes a dataset, and its validation.

Columns: ``key, audio_path, latitude, longitude, audio_source, caption, caption_source``; optional
``date`` (free text → month/hour), ``month``, ``hour``, ``split``, and one ``image_<source>`` column per
imagery source (e.g. ``image_sentinel2``). Paths are relative to the manifest's folder. An image cell is
either a tile centred on the recording (JPEG/PNG, at least 5 × tile size) or a georeferenced raster
(.tif/.tiff/.vrt/.jp2) from which a window around the recording is read.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from psm.data.dates import parse_date
from psm.data.errors import DataProblem
from psm.data.imagery_sources import IMAGERY_SOURCES, get_imagery_source
from psm.data.metadata import MetadataSpec

if TYPE_CHECKING:  # (imagery imports rasterio and torch: only when a file is read)
    from psm.data.imagery import RasterBands

REQUIRED_COLUMNS: tuple[str, ...] = (
    "key",
    "audio_path",
    "latitude",
    "longitude",
    "audio_source",
    "caption",
    "caption_source",
)
IMAGE_COLUMN_PREFIX = "image_"
RASTER_SUFFIXES = (".tif", ".tiff", ".vrt", ".jp2")


class ManifestError(ValueError):
    """A manifest that cannot be read at all (missing file, missing columns, no image column)."""


def image_columns(df: pd.DataFrame) -> dict[str, str]:
    """Map imagery-source name → column for every ``image_<source>`` column."""
    out = {}
    for col in df.columns:
        if col.startswith(IMAGE_COLUMN_PREFIX):
            source = col[len(IMAGE_COLUMN_PREFIX) :]
            get_imagery_source(source)  # unknown source → clear error
            out[get_imagery_source(source).name] = col
    return out


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a CSV or Parquet manifest; checks the required columns and that some image column exists."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        else:
            # Keep text as text: keys like "007" and messy numbers are checked row by row below.
            df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except Exception as e:
        raise ManifestError(f"{path}: cannot read the table: {e}") from e
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(f"{path}: missing required columns {missing}; found {list(df.columns)}")
    try:
        cols = image_columns(df)
    except ValueError as e:
        raise ManifestError(f"{path}: {e}") from e
    if not cols:
        known = ", ".join(IMAGE_COLUMN_PREFIX + s for s in IMAGERY_SOURCES)
        raise ManifestError(f"{path}: no image column; add one of {known}")
    return df.reset_index(drop=True)


@dataclass
class ManifestRow:
    """One validated row: resolved paths and parsed metadata ready for a sample."""

    row: int
    key: str
    audio_path: Path
    images: dict[str, Path]
    metadata: dict[str, object]
    caption: str | None
    split: str | None = None


def _number(value: object) -> float | None:
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def parse_row(
    df: pd.DataFrame,
    i: int,
    root: Path,
    spec: MetadataSpec,
    file: str,
    time_missing_means_midnight: bool = True,
) -> tuple[ManifestRow | None, list[DataProblem]]:
    """Check one row's values (not its files) and return it parsed, with every problem found."""
    r = df.iloc[i]
    key = str(r["key"])
    problems: list[DataProblem] = []

    def bad(column: str, reason: str, severity: str = "error") -> None:
        problems.append(DataProblem(reason, file=file, row=i, key=key, column=column, severity=severity))

    if pd.isna(r["key"]) or not key.strip():
        bad("key", "empty key")
    lat, lon = _number(r["latitude"]), _number(r["longitude"])
    if lat is None:
        bad("latitude", f"not a number: {r['latitude']!r}")
    elif not -90 <= lat <= 90:
        bad("latitude", f"{lat} outside [-90, 90]")
    if lon is None:
        bad("longitude", f"not a number: {r['longitude']!r}")
    elif not -180 <= lon <= 180:
        bad("longitude", f"{lon} outside [-180, 180]")

    month = hour = None
    if "date" in df.columns:
        parsed = parse_date(r["date"], time_missing_means_midnight=time_missing_means_midnight)
        month, hour = parsed.month, parsed.hour
        if r["audio_source"] == "freesound":
            hour = None  # Freesound dates carry no time of day (official rule, as the shard decoders apply)
        if parsed.month is None and isinstance(r["date"], str) and r["date"].strip():
            unknown = "month unknown" if hour is not None else "month and hour unknown"
            bad("date", f"no month in date {r['date']!r}: {unknown}", "warning")
    for name, lo, hi in (("month", 1, 12), ("hour", 0, 23)):
        if name in df.columns and not pd.isna(r[name]):
            v = _number(r[name])
            # Range first: int() of an infinite value raises.
            if v is None or not lo <= v <= hi or v != int(v):
                bad(name, f"{r[name]!r} is not an integer in {lo}..{hi}")
                v = None
            if name == "month":
                month = v if v is not None else month
            else:
                hour = v if v is not None else hour

    sources = {}
    for name, vocab in (("audio_source", spec.audio_sources), ("caption_source", spec.caption_sources)):
        value = r[name]
        if pd.isna(value):
            sources[name] = None
        elif str(value) not in vocab:
            bad(name, f"unknown {name} {value!r}; known: {', '.join(vocab)}")
        else:
            sources[name] = str(value)

    caption = None if pd.isna(r["caption"]) else str(r["caption"])
    if caption is not None and not caption.strip():
        caption = None
    audio = r["audio_path"]
    if pd.isna(audio) or not str(audio).strip():
        bad("audio_path", "empty audio path")
    images = {}
    for source, col in image_columns(df).items():
        if not pd.isna(r[col]) and str(r[col]).strip():
            images[source] = root / str(r[col])
    if not images:
        bad("image_*", "no image path in any image column")
    if any(p.severity == "error" for p in problems):
        return None, problems
    metadata = {
        "latitude": lat,
        "longitude": lon,
        "month": month,
        "hour": hour,
        "audio_source": sources.get("audio_source"),
        "caption_source": sources.get("caption_source"),
    }
    split = None if "split" not in df.columns or pd.isna(r["split"]) else str(r["split"])
    return ManifestRow(i, key, root / str(audio), images, metadata, caption, split), problems


@dataclass
class ValidationReport:
    """Every problem found in a manifest, with totals; ``ok`` when there is no error."""

    manifest: str
    rows: int
    problems: list[DataProblem] = field(default_factory=list)

    @property
    def errors(self) -> list[DataProblem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def bad_rows(self) -> set[int]:
        return {p.row for p in self.errors if p.row is not None}

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self) -> str:
        """Human-readable per-row report with totals."""
        lines = [f"{p.severity.upper():7s} {p}" for p in self.problems]
        by_column = Counter(p.column or "-" for p in self.errors)
        lines.append(
            f"{self.manifest}: {self.rows} rows, {len(self.bad_rows)} bad rows, "
            f"{len(self.errors)} errors, {len(self.problems) - len(self.errors)} warnings"
            + (f" (errors by column: {dict(by_column)})" if by_column else "")
        )
        return "\n".join(lines)


def check_files(
    row: ManifestRow,
    file: str,
    decode: bool = True,
    zoom_levels: dict[str, tuple[int, ...]] | None = None,
    raster: RasterBands | None = None,
) -> list[DataProblem]:
    """Check that the row's audio and images exist and decode, and that images are large enough; rasters are
    read with ``raster`` (:class:`psm.data.imagery.RasterBands`: bands and value scale, default RGB uint8)."""
    from psm.data.audio import AudioDecodeError, load_audio
    from psm.data.imagery import ImageryError, RasterBands, load_image, read_raster_window, read_tile_for_zoom

    read_kwargs = (raster or RasterBands()).read_kwargs()
    problems = []

    def bad(column: str, path: Path, reason: str) -> None:
        problems.append(DataProblem(f"{path}: {reason}", file=file, row=row.row, key=row.key, column=column))

    if not row.audio_path.is_file():
        bad("audio_path", row.audio_path, "file not found")
    elif decode:
        try:
            load_audio(row.audio_path)
        except AudioDecodeError as e:
            bad("audio_path", row.audio_path, str(e))
    for source_name, path in row.images.items():
        column = IMAGE_COLUMN_PREFIX + source_name
        source = get_imagery_source(source_name)
        if not path.is_file():
            bad(column, path, "file not found")
            continue
        if not decode:
            continue
        zoom = max((zoom_levels or {}).get(source_name, source.zoom_levels))
        try:
            if path.suffix.lower() in RASTER_SUFFIXES:
                lat, lon = row.metadata["latitude"], row.metadata["longitude"]
                read_tile_for_zoom(path, lat, lon, source, zoom, **read_kwargs)
                # ManifestDataset reads this footprint resampled to one tile and centred on the point itself,
                # not on its pixel: within a pixel of the right or bottom edge it leaves the raster when the
                # pixel-aligned window above does not.
                read_raster_window(
                    path, lat, lon, size_px=source.tile_size, gsd_m=zoom * source.base_gsd_m, **read_kwargs
                )
            else:
                img = load_image(path)
                need = zoom * source.tile_size
                if img.shape[0] < need or img.shape[1] < need:
                    bad(
                        column,
                        path,
                        f"image is {img.shape[1]}×{img.shape[0]} px but zoom {zoom} needs {need}×{need} px",
                    )
        except (ImageryError, OSError) as e:
            bad(column, path, str(e))
    return problems


def validate_manifest(
    path: str | Path,
    spec: MetadataSpec | None = None,
    decode: bool = True,
    time_missing_means_midnight: bool = True,
    raster: RasterBands | None = None,
) -> ValidationReport:
    """Check schema, value ranges, duplicate keys and that every file exists and decodes (rasters read with
    ``raster``, a :class:`psm.data.imagery.RasterBands`)."""
    path = Path(path)
    df = read_manifest(path)
    spec = spec or MetadataSpec()
    report = ValidationReport(manifest=str(path), rows=len(df))
    for key, count in df["key"].astype(str).value_counts().items():
        if count > 1:
            rows = df.index[df["key"].astype(str) == key].tolist()
            for r in rows[1:]:
                report.problems.append(
                    DataProblem(f"duplicate key (first at row {rows[0]})", file=str(path), row=r, key=key, column="key")
                )
    for row, problems in iter_rows(df, path, spec, time_missing_means_midnight):
        report.problems.extend(problems)
        if row is not None:
            report.problems.extend(check_files(row, str(path), decode=decode, raster=raster))
            shard_key_problem = _shard_key_problem(row, str(path), "warning")
            if shard_key_problem is not None:
                report.problems.append(shard_key_problem)
    report.problems.sort(key=lambda p: (p.row if p.row is not None else -1, p.column or ""))
    return report


def _shard_key_problem(row: ManifestRow, file: str, severity: str) -> DataProblem | None:
    """Why the row's key cannot name a sample in tar shards (``psm data pack``), or None when it can."""
    from psm.data.shards import ShardWriteError, validate_key

    try:
        validate_key(row.key)
    except ShardWriteError as e:
        return DataProblem(
            f"cannot be packed: {e}", file=file, row=row.row, key=row.key, column="key", severity=severity
        )
    return None


def iter_rows(
    df: pd.DataFrame,
    path: Path,
    spec: MetadataSpec,
    time_missing_means_midnight: bool = True,
    split: str | None = None,
) -> Iterator[tuple[ManifestRow | None, list[DataProblem]]]:
    """Parse every row of a manifest read from ``path`` (only those of ``split`` when given).

    Rows of other splits are passed over before parsing: their problems belong to the runs that read them
    (an evaluation of the test split neither reports nor stops on a bad training row).
    """
    root = path.parent
    splits = df["split"] if split is not None and "split" in df.columns else None
    for i in range(len(df)):
        if split is not None:
            value = None if splits is None or pd.isna(splits.iloc[i]) else str(splits.iloc[i])
            if value != split:
                continue
        yield parse_row(df, i, root, spec, str(path), time_missing_means_midnight)


def manifest_records(
    path: str | Path,
    imagery_source: str,
    *,
    split: str | None = None,
    spec: MetadataSpec | None = None,
    on_error: str = "skip",
    skip_log=None,
    raster: RasterBands | None = None,
) -> Iterator:
    """Shard records for :func:`psm.data.shards.pack_records` from a manifest, in row order.

    Images are stored as their file's bytes, or for a raster as a PNG of the window the largest zoom needs;
    audio as the file's encoded bytes (decoded and featurised at training time). Bad rows follow
    ``on_error`` (skip: recorded in ``skip_log`` and counted, never silent).
    """
    import io

    from PIL import Image

    from psm.data.audio import AudioDecodeError
    from psm.data.errors import DataError, SkipLog
    from psm.data.imagery import ImageryError, RasterBands, read_raster_window
    from psm.data.shards import ShardRecord

    path = Path(path)
    spec = spec or MetadataSpec()
    source = get_imagery_source(imagery_source)
    log = skip_log if skip_log is not None else SkipLog()
    df = read_manifest(path)

    def problem(p: DataProblem) -> None:
        if on_error == "raise":
            raise DataError(p)
        log.record(p)

    first_row: dict[str, int] = {}  # key → row that packed it
    for row, problems in iter_rows(df, path, spec, split=split):
        errors = [p for p in problems if p.severity == "error"]
        if row is None or errors:
            problem(errors[0])
            continue
        # pack_records refuses such keys and duplicates by stopping the whole pack; a bad row is skipped.
        key_problem = _shard_key_problem(row, str(path), "error")
        if key_problem is not None:
            problem(key_problem)
            continue
        if row.key in first_row:
            problem(
                DataProblem(
                    f"duplicate key (first at row {first_row[row.key]})",
                    file=str(path),
                    row=row.row,
                    key=row.key,
                    column="key",
                )
            )
            continue
        image_path = row.images.get(source.name)
        if image_path is None:
            problem(DataProblem(f"no {source.name} image", file=str(path), row=row.row, key=row.key))
            continue
        # Decode once, with the same checks as `psm data validate`, so bad files are caught here and not
        # mid-training.
        file_problems = check_files(row, str(path), decode=True, raster=raster)
        if file_problems:
            problem(file_problems[0])
            continue
        try:
            audio = row.audio_path.read_bytes()
            if image_path.suffix.lower() in RASTER_SUFFIXES:
                size = max(source.zoom_levels) * source.tile_size
                window = read_raster_window(
                    image_path,
                    row.metadata["latitude"],
                    row.metadata["longitude"],
                    size_px=size,
                    gsd_m=source.base_gsd_m,
                    **(raster or RasterBands()).read_kwargs(),
                )
                buf = io.BytesIO()
                Image.fromarray(window).save(buf, format="PNG")
                image, image_ext = buf.getvalue(), "png"
            else:
                image, image_ext = image_path.read_bytes(), image_path.suffix.lower().lstrip(".")
        except (AudioDecodeError, ImageryError, OSError) as e:
            problem(DataProblem(str(e), file=str(path), row=row.row, key=row.key))
            continue
        meta = {**row.metadata, "caption": row.caption, "split": row.split}
        first_row[row.key] = row.row
        yield ShardRecord(
            key=row.key,
            meta=meta,
            image=image,
            image_ext="jpg" if image_ext == "jpeg" else image_ext,
            audio=audio,
            audio_ext=row.audio_path.suffix.lower().lstrip("."),
        )

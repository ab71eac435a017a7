"""Metadata-conditioned soundscape maps: fuse metadata into an index's cached image features, score by −CSD.

An index (written by ``psm map index``) holds pre-fusion image features per zoom. A map for a query is

1. *conditioning*: the model's metadata fusion + heads over every point for one metadata setting → per point
   a unit μ (float16, N×D) and the constant Σσ²; cached on disk per (index, zoom, setting, model weights) in
   ``INDEX/conditioned/<hash>/`` and reused;
2. *scoring*: −CSD(q, p) = 2 μ_q·μ_p − Σσ²_p − (2 + Σσ²_q): one float16 matrix–vector product plus a
   per-point constant, streamed in cache-sized float32 blocks (the cosine μ_q·μ_p for deterministic models);
   ``scorer="compiled"`` fuses it into one torch.compile loop for repeated queries.

Invalid points (no imagery, unfinished index chunks) carry NaN through every step, so they are nodata in the
outputs and never a score.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from psm.atomic import make_shared_dir, write_text_atomic
from psm.data.metadata import CATEGORICAL_TYPES, Metadata, MetadataError, MetadataSpec

log = logging.getLogger(__name__)

INDEX_FORMAT = "psm-map-index/1"
CONDITIONED_FORMAT = "psm-conditioned/1"
SCALE_FORMAT = "psm-map-scale/1"
CONDITIONED_DIR = "conditioned"
DEFAULT_PERCENTILES = (2.0, 98.0)
# Rows per float32 work block of the scorer: 2**18 floats = 1 MiB per thread, well inside a core's L2, so the
# float16→float32 copy is still in cache when the matrix–vector product reads it (measured best of 64..1024 rows).
_BLOCK_FLOATS = 1 << 18
# Scoring kernel: "blocks" (torch ops, no compiler needed) or "compiled" (one fused torch.compile loop: float16
# load, float32 multiply-add, per-point constant; ~2x faster, but needs a C++ compiler and seconds to compile).
SCORERS = ("blocks", "compiled")
# Rows read from a file-backed cache at once when streaming (bounds RAM for 10^7-point indexes).
_STREAM_BYTES = 64 << 20


class MapQueryError(ValueError):
    """A map request that cannot be served: bad index, zoom, metadata, query or scale."""


# --------------------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GridSpec:
    """The output raster of an index: CRS (WKT or EPSG string), affine transform (rasterio order), size."""

    crs: str
    transform: tuple[float, float, float, float, float, float]
    width: int
    height: int

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GridSpec:
        """Read the ``grid`` block of index.json."""
        try:
            t = tuple(float(v) for v in d["transform"])
            if len(t) < 6:
                raise ValueError("transform needs 6 numbers")
            return cls(str(d["crs"]), t[:6], int(d["width"]), int(d["height"]))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError) as e:
            raise MapQueryError(f"index grid is malformed ({e}): {dict(d)}") from None

    def affine(self) -> Any:
        """The rasterio ``Affine`` of the grid."""
        from rasterio.transform import Affine

        return Affine(*self.transform)

    def rasterio_crs(self) -> Any:
        """The grid's CRS as a rasterio ``CRS``."""
        from rasterio.crs import CRS

        return CRS.from_user_input(self.crs)

    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in the grid's CRS."""
        from rasterio.transform import array_bounds

        west, south, east, north = array_bounds(self.height, self.width, self.affine())
        return west, south, east, north

    def bounds_wgs84(self) -> tuple[float, float, float, float]:
        """(west, south, east, north) in degrees, densified so curved edges are covered."""
        from rasterio.warp import transform_bounds

        return tuple(transform_bounds(self.rasterio_crs(), "EPSG:4326", *self.bounds(), densify_pts=21))


class MapIndex:
    """A ``psm map index`` folder: index.json, points.parquet and features.zarr (read-only access)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "index.json"
        if not meta_path.is_file():
            raise MapQueryError(f"{self.path}: not a map index (no index.json)")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise MapQueryError(f"{meta_path}: invalid JSON ({e})") from None
        if self.meta.get("format") != INDEX_FORMAT:
            raise MapQueryError(f"{meta_path}: format {self.meta.get('format')!r}, expected {INDEX_FORMAT!r}")
        for key in ("zooms", "embed_dim", "num_points", "chunk_size", "grid"):
            if key not in self.meta:
                raise MapQueryError(f"{meta_path}: missing {key!r}")
        self.zooms: tuple[int, ...] = tuple(int(z) for z in self.meta["zooms"])
        self.embed_dim = int(self.meta["embed_dim"])
        self.num_points = int(self.meta["num_points"])
        self.chunk_size = int(self.meta["chunk_size"])
        self.grid = GridSpec.from_dict(self.meta["grid"])
        self._meta_bytes = meta_path.read_bytes()

    @property
    def model_info(self) -> dict[str, Any]:
        """The ``model`` block: {"name", "config"} of the model that computed the features."""
        return dict(self.meta.get("model") or {})

    @property
    def num_chunks(self) -> int:
        """Number of index chunks (the unit of ``done_z*``)."""
        return math.ceil(self.num_points / self.chunk_size)

    @cached_property
    def _group(self) -> Any:
        import zarr

        store = self.path / "features.zarr"
        if not store.exists():
            raise MapQueryError(f"{self.path}: no features.zarr")
        return zarr.open_group(str(store), mode="r")

    @cached_property
    def points(self) -> Any:
        """points.parquet as a DataFrame ordered by point_id (0..N-1), columns lat/lon/row/col."""
        import pandas as pd

        path = self.path / "points.parquet"
        if not path.is_file():
            raise MapQueryError(f"{self.path}: no points.parquet")
        df = pd.read_parquet(path, columns=["point_id", "latitude", "longitude", "row", "col"])
        if len(df) != self.num_points:
            raise MapQueryError(f"{path}: {len(df)} points, index.json says {self.num_points}")
        ids = df["point_id"].to_numpy()
        if not np.array_equal(ids, np.arange(len(df))):
            df = df.sort_values("point_id", kind="stable").reset_index(drop=True)
            if not np.array_equal(df["point_id"].to_numpy(), np.arange(len(df))):
                raise MapQueryError(f"{path}: point_id must be 0..{len(df) - 1} without gaps")
        rows, cols = df["row"].to_numpy(), df["col"].to_numpy()
        if len(df) and (
            rows.min() < 0 or cols.min() < 0 or rows.max() >= self.grid.height or cols.max() >= self.grid.width
        ):
            raise MapQueryError(f"{path}: row/col outside the {self.grid.height}×{self.grid.width} grid")
        return df

    def raster(self, values: np.ndarray) -> np.ndarray:
        """Per-point ``values`` (N,) placed on the index's grid: a (height, width) float32 raster, NaN elsewhere."""
        from psm.maps.render import points_to_raster

        pts = self.points
        return points_to_raster(values, pts["row"].to_numpy(), pts["col"].to_numpy(), self.grid.height, self.grid.width)

    def model_name(self, model: Any) -> str:
        """The model's name for legends and tags: the one the index recorded, else the model config's."""
        return str(self.model_info.get("name") or model.config.name)

    def check_zoom(self, zoom: int) -> int:
        """``zoom`` if the index has it, else a :class:`MapQueryError` listing the zooms it has."""
        if int(zoom) not in self.zooms:
            raise MapQueryError(f"zoom {zoom} is not in the index {self.path} (it has zooms {list(self.zooms)})")
        return int(zoom)

    def features(self, zoom: int) -> Any:
        """The (N, D) float16 zarr array of pre-fusion features at ``zoom``."""
        self.check_zoom(zoom)
        try:
            arr = self._group[f"z{zoom}"]
        except KeyError:
            raise MapQueryError(f"{self.path}: features.zarr has no array z{zoom}") from None
        if tuple(arr.shape) != (self.num_points, self.embed_dim):
            raise MapQueryError(
                f"{self.path}: z{zoom} has shape {arr.shape}, expected ({self.num_points}, {self.embed_dim})"
            )
        return arr

    def _array(self, name: str) -> np.ndarray:
        try:
            return np.asarray(self._group[name][:])
        except KeyError:
            raise MapQueryError(f"{self.path}: features.zarr has no array {name}") from None

    def done_chunks(self, zoom: int) -> np.ndarray:
        """(num_chunks,) bool: chunks of ``zoom`` that the indexer finished."""
        self.check_zoom(zoom)
        done = self._array(f"done_z{zoom}").astype(bool).reshape(-1)
        if len(done) != self.num_chunks:
            raise MapQueryError(f"{self.path}: done_z{zoom} has {len(done)} entries for {self.num_chunks} chunks")
        return done

    def valid(self, zoom: int, allow_incomplete: bool = False) -> np.ndarray:
        """(N,) bool: points with imagery in finished chunks. Unfinished chunks are an error unless allowed."""
        valid = self._array(f"valid_z{zoom}").astype(bool).reshape(-1)
        if len(valid) != self.num_points:
            raise MapQueryError(f"{self.path}: valid_z{zoom} has {len(valid)} entries for {self.num_points} points")
        done = self.done_chunks(zoom)
        if not done.all():
            missing = int((~done).sum())
            msg = (
                f"index {self.path} is incomplete at zoom {zoom}: {missing} of {len(done)} chunks are not done "
                "(rerun `psm map index` to finish it"
            )
            if not allow_incomplete:
                raise MapQueryError(msg + ", or pass --allow-incomplete to map them as nodata)")
            warnings.warn(msg + "); their points are nodata", RuntimeWarning, stacklevel=2)
            valid = valid & np.repeat(done, self.chunk_size)[: self.num_points]
        return valid

    def fingerprint(self, zoom: int, valid: np.ndarray) -> str:
        """Hash of what a conditioned cache depends on in the index: index.json and the validity of ``zoom``."""
        h = hashlib.sha256(self._meta_bytes)
        h.update(f"zoom={zoom}".encode())
        h.update(np.packbits(valid).tobytes())
        return h.hexdigest()


# --------------------------------------------------------------------------------------------------------
# Metadata settings
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetadataSetting:
    """One metadata setting of a map: fixed month/hour/sources for all points, per-point location on/off.

    ``None`` leaves a type out (masked in fusion). ``location=None`` means "on when the model uses location".
    """

    month: float | None = None
    hour: float | None = None
    audio_source: str | None = None
    caption_source: str | None = None
    location: bool | None = None

    def resolve(self, spec: MetadataSpec) -> MetadataSetting:
        """Check the setting against the model's metadata types and vocabularies; location made explicit."""
        used = set(spec.types)
        given = {k: v for k, v in (("month", self.month), ("hour", self.hour)) if v is not None}
        given.update({k: getattr(self, k) for k in CATEGORICAL_TYPES if getattr(self, k) is not None})
        if self.location:
            given["location"] = True
        unused = [k for k in given if k not in used]
        if unused:
            raise MapQueryError(
                f"this model does not use metadata {', '.join(unused)} (it uses: {', '.join(spec.types) or 'none'})"
            )
        for name, value in (("month", self.month), ("hour", self.hour)):
            # The encoding reads NaN as "unknown": a map query leaves the field out for that instead.
            if value is not None and not math.isfinite(float(value)):
                raise MapQueryError(f"{name} must be a finite number (leave it out for unknown), got {value!r}")
        try:  # range and vocabulary checks by the single definition of the encodings
            spec.encode(
                month=None if self.month is None else [float(self.month)],
                hour=None if self.hour is None else [float(self.hour)],
                audio_source=None if self.audio_source is None else [self.audio_source],
                caption_source=None if self.caption_source is None else [self.caption_source],
                batch_size=1,
            )
        except MetadataError as e:
            raise MapQueryError(str(e).replace("row 0: ", "")) from None
        location = ("location" in used) if self.location is None else bool(self.location)
        # Numbers as floats, so that the same setting from the CLI (floats) and from Python (ints) shares a cache.
        return replace(
            self,
            month=None if self.month is None else float(self.month),
            hour=None if self.hour is None else float(self.hour),
            location=location,
        )

    def keep(self) -> tuple[str, ...]:
        """Names of the metadata types this setting uses (the fusion's ``keep_metadata``)."""
        names = [k for k in ("audio_source", "caption_source") if getattr(self, k) is not None]
        if self.location:
            names.append("location")
        names += [k for k in ("month", "hour") if getattr(self, k) is not None]
        return tuple(names)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (also the cache key's part)."""
        return asdict(self)

    def describe(self) -> dict[str, str]:
        """Human-readable entries for legends: every type, "—" when left out."""

        def fmt(v: Any) -> str:
            if v is None:
                return "—"
            return f"{v:g}" if isinstance(v, float) else str(v)

        return {
            "month": fmt(self.month),
            "hour": fmt(self.hour),
            "audio source": fmt(self.audio_source),
            "caption source": fmt(self.caption_source),
            "location": "on" if self.location else "off",
        }

    def label(self) -> str:
        """Short one-line label, e.g. ``month 5 · hour 20 · location on``."""
        parts = [f"{k} {v}" for k, v in self.describe().items() if k != "location" and v != "—"]
        parts.append(f"location {'on' if self.location else 'off'}")
        return " · ".join(parts)


# --------------------------------------------------------------------------------------------------------
# Conditioning
# --------------------------------------------------------------------------------------------------------


@dataclass
class ConditionedEmbeddings:
    """Per-point fused image embeddings of one (index, zoom, setting): what scoring reads.

    ``mean`` (N, D) float16 unit μ (zeros where invalid; a memmap when opened from the cache), ``const``
    (N,) float32 = Σσ²_p (0 for deterministic models) and NaN where invalid, ``sigma_l1`` (N,) float32
    ‖σ‖₁ (None for deterministic models), ``valid`` (N,) bool.
    """

    mean: np.ndarray
    const: np.ndarray
    sigma_l1: np.ndarray | None
    valid: np.ndarray
    probabilistic: bool
    zoom: int
    setting: MetadataSetting
    path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def open(cls, path: str | Path) -> ConditionedEmbeddings:
        """Open a cache folder (μ memory-mapped, the per-point vectors read)."""
        path = Path(path)
        meta = json.loads((path / "setting.json").read_text())
        if meta.get("format") != CONDITIONED_FORMAT:
            raise MapQueryError(f"{path}: not a conditioned-embedding cache")
        sigma = path / "sigma_l1.npy"
        return cls(
            mean=np.load(path / "mean.npy", mmap_mode="r"),
            const=np.load(path / "const.npy"),
            sigma_l1=np.load(sigma) if sigma.exists() else None,
            valid=np.load(path / "valid.npy"),
            probabilistic=bool(meta["probabilistic"]),
            zoom=int(meta["zoom"]),
            setting=MetadataSetting(**meta["setting"]),
            path=path,
            info=meta,
        )

    def load(self) -> ConditionedEmbeddings:
        """A copy with μ in RAM (for many queries on one setting, e.g. benchmarks)."""
        return replace(self, mean=np.ascontiguousarray(self.mean))

    def __len__(self) -> int:
        return len(self.const)


def _tensor_digest(h: Any, module: torch.nn.Module | None, prefix: str) -> None:
    if module is None:
        h.update(f"{prefix}:none".encode())
        return
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{prefix}.{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: Any) -> str:
    """Hash of everything conditioning depends on in the model: fusion + head weights and the metadata spec."""
    h = hashlib.sha256()
    cfg = model.config
    h.update(json.dumps(cfg.metadata.to_dict(), sort_keys=True).encode())
    h.update(f"probabilistic={cfg.probabilistic};dim={cfg.embed_dim}".encode())
    _tensor_digest(h, getattr(model.image, "fusion", None), "fusion")
    _tensor_digest(h, getattr(model.image, "head", None), "head")
    return h.hexdigest()


def check_model_matches_index(model: Any, index: MapIndex) -> None:
    """Refuse a model whose embedding width differs from the index; warn when its image tower config differs."""
    cfg = model.config
    if cfg.embed_dim != index.embed_dim:
        raise MapQueryError(
            f"the model's embed_dim is {cfg.embed_dim} but the index {index.path} holds {index.embed_dim}-d features "
            f"(made with model {index.model_info.get('name')!r})"
        )
    fp = index.model_info.get("fingerprint")
    if fp:
        try:  # the indexer's own definition of its encoder fingerprint
            from psm.maps.index import model_fingerprint as encoder_fingerprint
        except ImportError:  # pragma: no cover - the indexer ships with psm
            encoder_fingerprint = None
        if encoder_fingerprint is not None and encoder_fingerprint(model) != fp:
            raise MapQueryError(
                f"the checkpoint's image encoder is not the one that built the index {index.path} (encoder "
                f"fingerprint {encoder_fingerprint(model)} vs {fp}): its cached features belong to another model"
            )
    index_cfg = index.model_info.get("config") or {}
    if isinstance(index_cfg, Mapping) and "image" in index_cfg:
        ours = cfg.to_dict()["image"]
        theirs = dict(index_cfg["image"])
        if "zoom_levels" in theirs:
            theirs["zoom_levels"] = list(theirs["zoom_levels"])
        if ours != theirs:
            warnings.warn(
                f"the checkpoint's image tower config differs from the one that built the index ({index.path}); "
                "the cached features may not belong to this model",
                RuntimeWarning,
                stacklevel=2,
            )


def _condition_key(
    index: MapIndex, zoom: int, setting: MetadataSetting, model_fp: str, valid: np.ndarray, precision: str
) -> dict:
    return {
        "format": CONDITIONED_FORMAT,
        "index": index.fingerprint(zoom, valid),
        "zoom": zoom,
        "setting": setting.to_dict(),
        "model": model_fp,
        "precision": precision,
    }


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "float32":
        return contextlib.nullcontext()
    if precision == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise MapQueryError(f"unknown fusion precision {precision!r} (float32 or bfloat16)")


def condition(
    index: MapIndex,
    model: Any,
    zoom: int,
    setting: MetadataSetting = MetadataSetting(),
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    allow_incomplete: bool = False,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
    precision: str = "float32",
    progress: Callable[[int, int], None] | None = None,
) -> ConditionedEmbeddings:
    """Fuse ``setting`` into the index's features at ``zoom`` and apply the heads; cached and reused on disk.

    The cache lives in ``cache_dir`` (default ``INDEX/conditioned``), one folder per hash of (index.json and
    validity, zoom, setting, fusion/head weights, precision); it is written under a temporary name and
    renamed into place, so a crash never leaves a half cache that a later query would trust.
    """
    zoom = index.check_zoom(zoom)
    check_model_matches_index(model, index)
    spec: MetadataSpec = model.config.metadata
    setting = setting.resolve(spec)
    valid = index.valid(zoom, allow_incomplete)
    key = _condition_key(index, zoom, setting, model_fingerprint(model), valid, precision)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    root = Path(cache_dir) if cache_dir is not None else index.path / CONDITIONED_DIR
    final = root / digest
    if use_cache and (final / "setting.json").is_file():
        log.info("conditioned embeddings reused from %s", final)
        return ConditionedEmbeddings.open(final)

    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    root.mkdir(parents=True, exist_ok=True)
    tmp = make_shared_dir(root, prefix=f".{digest}.")  # other users reuse the cache of a shared index
    try:
        probabilistic, n_valid = _compute_conditioned(
            index, model, zoom, setting, valid, tmp, batch_size, device, precision, progress
        )
        meta = dict(key, probabilistic=probabilistic, num_points=index.num_points, valid_points=n_valid)
        (tmp / "setting.json").write_text(json.dumps(meta, indent=1))
        _publish_dir(tmp, final, replace_existing=not use_cache)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConditionedEmbeddings.open(final)


def _publish_dir(tmp: Path, final: Path, replace_existing: bool) -> None:
    """Rename a finished temporary folder into place (a rename is atomic: readers see all or nothing)."""
    if final.exists() and replace_existing:
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not (final / "setting.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same cache first


def _constant_metadata(spec: MetadataSpec, setting: MetadataSetting) -> Metadata:
    """The map-wide metadata (month, hour, sources) encoded once, as one row, by MetadataSpec."""
    return spec.encode(
        month=None if setting.month is None else [float(setting.month)],
        hour=None if setting.hour is None else [float(setting.hour)],
        audio_source=None if setting.audio_source is None else [setting.audio_source],
        caption_source=None if setting.caption_source is None else [setting.caption_source],
        batch_size=1,
    )


def _batch_metadata(
    spec: MetadataSpec, constant: Metadata, lat: np.ndarray | None, lon: np.ndarray | None, m: int
) -> Metadata:
    """Metadata of a batch of ``m`` points: the constant row repeated, plus per-point location if on.

    Location is encoded per point by MetadataSpec from the same rows as the features (the official script
    sliced lat/lon wrongly here); the constant fields are encoded once and broadcast, since encoding a
    repeated source name row by row costs more than the fusion of a tiny model.
    """
    values = {k: v.expand(m, *v.shape[1:]) for k, v in constant.values.items()}
    valid = {k: v.expand(m) for k, v in constant.valid.items()}
    if lat is not None and lon is not None:
        loc = spec.encode(latitude=lat, longitude=lon, batch_size=m)
        values["location"] = loc.values["location"]
        valid["location"] = loc.valid["location"]
    return Metadata(values=values, valid=valid)


@torch.inference_mode()
def _compute_conditioned(
    index: MapIndex,
    model: Any,
    zoom: int,
    setting: MetadataSetting,
    valid: np.ndarray,
    out: Path,
    batch_size: int,
    device: torch.device,
    precision: str,
    progress: Callable[[int, int], None] | None,
) -> tuple[bool, int]:
    spec: MetadataSpec = model.config.metadata
    probabilistic = bool(model.config.probabilistic)
    n, d = index.num_points, index.embed_dim
    was_training = model.training
    model.eval()  # no dropout, no metadata dropout
    feats = index.features(zoom)
    mean = np.lib.format.open_memmap(out / "mean.npy", mode="w+", dtype=np.float16, shape=(n, d))
    const = np.full(n, np.nan, dtype=np.float32)
    sigma = np.full(n, np.nan, dtype=np.float32) if probabilistic else None
    valid = valid.copy()
    lat_all = lon_all = None
    if setting.location:
        lat_all = index.points["latitude"].to_numpy(np.float64)
        lon_all = index.points["longitude"].to_numpy(np.float64)
    keep = setting.keep()
    constant = _constant_metadata(spec, setting)
    bad = 0
    # Read whole blocks of index chunks (one batch's worth) on a thread, one block ahead of the model: the
    # chunk decompression then overlaps the fusion, and a GPU gets batches large enough to keep it busy.
    block = index.chunk_size * max(1, batch_size // index.chunk_size)

    def read(start: int) -> tuple[int, int, np.ndarray, np.ndarray]:
        stop = min(n, start + block)
        rows = np.flatnonzero(valid[start:stop])
        if len(rows) == stop - start:
            return start, stop, rows, np.asarray(feats[start:stop])
        return start, stop, rows, (np.asarray(feats[start:stop])[rows] if len(rows) else np.empty((0, d)))

    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="psm-condition-read") as pool:
            pending = pool.submit(read, 0) if n else None
            while pending is not None:
                start, stop, rows, chunk = pending.result()
                pending = pool.submit(read, stop) if stop < n else None
                for b in range(0, len(rows), batch_size):
                    sel = rows[b : b + batch_size]
                    m = len(sel)
                    # float16 over the bus and converted on the device: half the bytes of a float32 copy.
                    x = torch.from_numpy(chunk[b : b + batch_size]).to(device).float()
                    md = _batch_metadata(
                        spec,
                        constant,
                        lat_all[start + sel] if setting.location else None,
                        lon_all[start + sel] if setting.location else None,
                        m,
                    ).to(device)
                    with _autocast(device, precision):
                        emb = model.embed_image_features(x, md, keep_metadata=keep)
                    mu = emb.mean.float()
                    mu = mu / mu.norm(dim=-1, keepdim=True)  # re-normalise in float32 after autocast
                    ok = torch.isfinite(mu).all(-1)
                    if emb.logvar is not None:
                        lv = emb.logvar.float()
                        ok &= torch.isfinite(lv).all(-1)
                        per_point = torch.stack([lv.exp().sum(-1), (lv / 2).exp().sum(-1)], -1)
                    else:
                        per_point = torch.zeros(m, 2, device=mu.device)
                    mu = torch.where(ok[:, None], mu, 0.0)
                    # Two copies back per batch (μ in float16, the per-point terms with the finite flag).
                    mu_np = mu.half().cpu().numpy()
                    small = torch.cat([per_point, ok[:, None].float()], -1).cpu().numpy()
                    gidx = start + sel
                    contiguous = m == 0 or int(sel[-1]) - int(sel[0]) == m - 1
                    where = slice(int(gidx[0]), int(gidx[-1]) + 1) if m and contiguous else gidx
                    mean[where] = mu_np
                    const[where] = small[:, 0]
                    if sigma is not None:
                        sigma[where] = small[:, 1]
                    ok_np = small[:, 2] > 0.5
                    if not ok_np.all():
                        bad += int((~ok_np).sum())
                        valid[gidx[~ok_np]] = False
                if progress is not None:
                    progress(stop, n)
    finally:
        model.train(was_training)
    if bad:
        warnings.warn(f"{bad} points gave non-finite embeddings and are nodata", RuntimeWarning, stacklevel=3)
    const[~valid] = np.nan
    if sigma is not None:
        sigma[~valid] = np.nan
    mean.flush()
    del mean
    np.save(out / "const.npy", const)
    np.save(out / "valid.npy", valid)
    if sigma is not None:
        np.save(out / "sigma_l1.npy", sigma)
    return probabilistic, int(valid.sum())


# --------------------------------------------------------------------------------------------------------
# Queries
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryEmbedding:
    """A query's Gaussian: unit μ (D,) float32 and log σ² (None for deterministic models) plus its label."""

    mean: np.ndarray
    logvar: np.ndarray | None
    kind: str
    label: str

    @property
    def sigma_sq_sum(self) -> float:
        """Σσ²_q (0 for deterministic models)."""
        return 0.0 if self.logvar is None else float(np.exp(self.logvar.astype(np.float64)).sum())

    def describe(self) -> str:
        """``text: "…"`` or ``audio: file.wav`` for legends."""
        return f'text: "{self.label}"' if self.kind == "text" else f"{self.kind}: {self.label}"


# Prompt templates for a text query's ensemble (``{}`` is the query). Averaging the embeddings of a few
# phrasings is CLIP's prompt ensembling. On the offline world, at zoom 1, it lifted the mean map-vs-truth ρ of
# the events' one-word queries for three models: 0.188 → 0.226 and 0.219 → 0.232 (PCME++, 8 minutes), and
# 0.325 → 0.380 (InfoNCE, 24 minutes) (docs/world.md).
PROMPT_TEMPLATES = ("{}", "the sound of {}", "{} in the distance", "recording of {}", "{} nearby")


def _query_from(emb: Any, kind: str, label: str, row: int = 0) -> QueryEmbedding:
    mu = emb.unnormalized_mean[row].double()
    mu = (mu / mu.norm()).float().cpu().numpy()
    lv = None if emb.logvar is None else emb.logvar[row].float().cpu().numpy()
    return QueryEmbedding(mean=mu, logvar=lv, kind=kind, label=label)


def combine_queries(queries: Sequence[QueryEmbedding], label: str | None = None) -> QueryEmbedding:
    """One query from several (phrasings of a text, several clips): the Gaussian with the first two moments of
    their equal mixture, its mean direction renormalised to unit length. One query is returned as it is."""
    if not queries:
        raise MapQueryError("no queries to combine")
    if len(queries) == 1:
        return queries[0]
    kinds = {q.kind for q in queries}
    if len(kinds) != 1 or len({q.logvar is None for q in queries}) != 1:
        raise MapQueryError("combined queries must be of one kind, all with or all without σ")
    means = np.stack([q.mean.astype(np.float64) for q in queries])
    centre = means.mean(axis=0)
    logvar = None
    if queries[0].logvar is not None:
        # Mixture variance per dimension: the mean σ² plus the spread of the means around their centre.
        var = np.stack([np.exp(q.logvar.astype(np.float64)) for q in queries]).mean(axis=0)
        var += ((means - centre) ** 2).mean(axis=0)
        logvar = np.log(var).astype(np.float32)
    norm = np.linalg.norm(centre)
    if not norm > 0:
        raise MapQueryError("the combined queries cancel out (their mean direction is zero)")
    label = label if label is not None else " | ".join(dict.fromkeys(q.label for q in queries))
    return QueryEmbedding(mean=(centre / norm).astype(np.float32), logvar=logvar, kind=kinds.pop(), label=label)


def expand_templates(texts: str | Sequence[str], templates: Sequence[str] = ("{}",)) -> list[str]:
    """Every text in every template (``{}`` marks the text), in order, without repeats."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or any(not t or not t.strip() for t in texts):
        raise MapQueryError("the text query is empty")
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise MapQueryError(f"a prompt template needs {{}} where the text goes, got {bad or list(templates)}")
    return list(dict.fromkeys(t.replace("{}", text.strip()) for text in texts for t in templates))


@torch.inference_mode()
def embed_text_query(
    model: Any,
    tokenizer: Any,
    text: str | Sequence[str],
    max_length: int = 128,
    templates: Sequence[str] = ("{}",),
) -> QueryEmbedding:
    """Embed ``text`` with the model's text tower: one text, or the ensemble of several texts and prompt
    ``templates`` (e.g. :data:`PROMPT_TEMPLATES`), combined by :func:`combine_queries`."""
    phrases = expand_templates(text, templates)
    if model.text is None:
        raise MapQueryError("this model has no text tower; query with --audio")
    if tokenizer is None:
        raise MapQueryError("a text query needs a tokenizer (CHECKPOINT/tokenizer or --tokenizer)")
    device = next(model.parameters()).device
    tok = tokenizer(phrases, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    model.eval()
    emb = model.encode_text(tok["input_ids"].to(device), tok["attention_mask"].to(device))
    texts = [text] if isinstance(text, str) else list(text)
    label = " | ".join(t.strip() for t in texts) + (f" (×{len(templates)} prompts)" if len(templates) > 1 else "")
    return combine_queries([_query_from(emb, "text", p, row=i) for i, p in enumerate(phrases)], label=label)


@torch.inference_mode()
def embed_audio_query(model: Any, path: str | Path | Sequence[str | Path]) -> QueryEmbedding:
    """Decode each clip at 48 kHz, compute CLAP fusion features with the fixed (middle) chunks and embed it;
    several clips are combined by :func:`combine_queries`."""
    from psm.data.audio import clap_fusion_features, load_audio

    paths = [path] if isinstance(path, str | Path) else list(path)
    if not paths:
        raise MapQueryError("no audio query given")
    device = next(model.parameters()).device
    model.eval()
    queries = []
    for p in paths:
        wave = torch.from_numpy(load_audio(p, 48_000)).to(device)
        # No generator and no chunk starts: the deterministic middle-chunk choice, so a query is reproducible.
        feats, is_longer = clap_fusion_features(wave)
        queries.append(_query_from(model.encode_audio(feats, is_longer), "audio", Path(p).name))
    return combine_queries(queries)


# --------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------


def _query_vector(cond: ConditionedEmbeddings, query: QueryEmbedding) -> tuple[torch.Tensor, float]:
    """(α·μ_q as float32, k) so that score = (α μ_q)·μ_p − const_p − k."""
    if query.mean.shape != (cond.mean.shape[1],):
        raise MapQueryError(f"query has dimension {query.mean.shape}, the map {cond.mean.shape[1]}")
    if cond.probabilistic != (query.logvar is not None):
        raise MapQueryError("the query and the map must both be probabilistic or both deterministic")
    if cond.probabilistic:
        # −CSD = −(2 − 2 μ_q·μ_p + Σσ²_q + Σσ²_p): the 2 goes into the vector, the rest is subtracted.
        return torch.from_numpy(2.0 * query.mean.astype(np.float32)), 2.0 + query.sigma_sq_sum
    return torch.from_numpy(query.mean.astype(np.float32)), 0.0


def _block_rows(d: int) -> int:
    return max(64, _BLOCK_FLOATS // max(1, d))


@contextlib.contextmanager
def _torch_single_threaded() -> Iterator[None]:
    """torch ops run inline in the calling thread (no intra-op pool) inside the block; restored after."""
    old = torch.get_num_threads()
    if old > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if old > 1:
            torch.set_num_threads(old)


_SCORE_LOCK = threading.Lock()
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="psm-score")
    return _POOL


def _score_range(
    m: torch.Tensor, c: torch.Tensor, o: torch.Tensor, qvec: torch.Tensor, rows: int, lo: int, hi: int
) -> None:
    work = torch.empty(min(rows, hi - lo), m.shape[1], dtype=torch.float32)  # this thread's L2-sized block
    for i in range(lo, hi, rows):
        j = min(hi, i + rows)
        w = work[: j - i]
        w.copy_(m[i:j])
        torch.addmv(c[i:j], w, qvec, beta=-1.0, out=o[i:j])


_COMPILED: Any = None
_COMPILED_FAILED = False


def _fused_kernel(a: torch.Tensor, q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return (a.float() * q).sum(-1) - c


def _compiled_kernel() -> Any:
    """The fused kernel compiled once per process (dynamic row count), or None when compilation fails."""
    global _COMPILED, _COMPILED_FAILED
    if _COMPILED is None and not _COMPILED_FAILED:
        # Inductor's C++ backend says "No CUDA runtime is found" on CPU-only machines: true and irrelevant here.
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        _COMPILED = torch.compile(_fused_kernel, dynamic=True)
    return _COMPILED


def resolve_scorer(scorer: str | None) -> str:
    """``scorer`` or the ``PSM_SCORER`` environment variable, default ``blocks``; checked."""
    name = scorer or os.environ.get("PSM_SCORER") or "blocks"
    if name not in SCORERS:
        raise MapQueryError(f"unknown scorer {name!r}; use one of {', '.join(SCORERS)}")
    return name


def _score_compiled(m: torch.Tensor, c: torch.Tensor, o: torch.Tensor, qvec: torch.Tensor) -> bool:
    global _COMPILED_FAILED
    kernel = _compiled_kernel()
    if kernel is None:
        return False
    try:
        o.copy_(kernel(m, qvec, c))
        return True
    except Exception as e:  # no compiler, unsupported platform...: fall back to the block kernel for good
        _COMPILED_FAILED = True
        warnings.warn(
            f"compiled scorer unavailable ({type(e).__name__}: {e}); using the block kernel",
            RuntimeWarning,
            stacklevel=3,
        )
        return False


def score_arrays(
    mean: np.ndarray,
    const: np.ndarray,
    qvec: torch.Tensor,
    k: float,
    out: np.ndarray,
    block_rows: int | None = None,
    threads: int | None = None,
    scorer: str | None = None,
) -> np.ndarray:
    """out = mean·qvec − const − k for float16 ``mean`` rows, in float32 blocks (the scoring kernel).

    Each block is converted to float32 into a reused L2-sized buffer and multiplied there: a float16
    matrix–vector product at close to memory bandwidth with float32 results (float16 outputs would tie
    thousands of points on a 10^6-point map). NaN in ``const`` makes the score NaN. The rows are split
    between ``threads`` (default: torch's thread count) Python threads, each running single-threaded torch
    ops: thousands of small intra-op parallel regions would each wait at a barrier for the slowest thread,
    which on a shared, busy machine costs 10-100× (measured), while independent threads just slow down.
    ``scorer="compiled"`` uses one fused torch.compile loop instead (see ``SCORERS``).
    """
    n, d = mean.shape
    rows = block_rows or _block_rows(d)
    threads = max(1, threads or torch.get_num_threads())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only memmaps: torch only reads them here
        m = torch.from_numpy(mean)
        c = torch.from_numpy(const)
    o = torch.from_numpy(out)
    if resolve_scorer(scorer) == "compiled" and _score_compiled(m, c, o, qvec):
        if k:
            o.sub_(k)
        return out
    blocks = math.ceil(n / rows)
    parts = max(1, min(threads, blocks))
    edges = [min(n, rows * (blocks * t // parts)) for t in range(parts + 1)]
    with _SCORE_LOCK, _torch_single_threaded():
        if parts == 1:
            _score_range(m, c, o, qvec, rows, 0, n)
        else:
            jobs = [_pool().submit(_score_range, m, c, o, qvec, rows, a, b) for a, b in itertools.pairwise(edges)]
            for job in jobs:
                job.result()
        if k:
            o.sub_(k)
    return out


def iter_scores(
    cond: ConditionedEmbeddings, query: QueryEmbedding, *, block_rows: int | None = None, scorer: str | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Scores in consecutive pieces ``(start, scores)`` (the array is reused: copy what you keep).

    A memory-mapped cache is read piece by piece into one buffer, so RAM stays bounded for any N.
    """
    n, d = cond.mean.shape
    qvec, k = _query_vector(cond, query)
    rows = block_rows or _block_rows(d)
    scorer = resolve_scorer(scorer)
    piece = max(rows, (_STREAM_BYTES // (2 * d)) // rows * rows)
    out = np.empty(min(piece, max(n, 1)), dtype=np.float32)
    mean = cond.mean
    if isinstance(mean, np.memmap) and mean.filename is not None and mean.flags.c_contiguous:
        # Read into one buffer instead of slicing the memmap: slicing would map every page of a 10 GB cache
        # into this process (its RSS); a read keeps one piece resident.
        buf = np.empty((min(piece, max(n, 1)), d), dtype=np.float16)
        with open(mean.filename, "rb", buffering=0) as f:
            for start in range(0, n, piece):
                stop = min(n, start + piece)
                view = buf[: stop - start]
                _read_exact(f, mean.offset + start * d * 2, memoryview(view).cast("B"))
                score_arrays(view, cond.const[start:stop], qvec, k, out[: stop - start], rows, scorer=scorer)
                yield start, out[: stop - start]
        return
    for start in range(0, n, piece):
        stop = min(n, start + piece)
        score_arrays(mean[start:stop], cond.const[start:stop], qvec, k, out[: stop - start], rows, scorer=scorer)
        yield start, out[: stop - start]


def _read_exact(f: Any, offset: int, out: memoryview) -> None:
    """Fill ``out`` from byte ``offset`` of ``f`` (a raw file may return short reads)."""
    f.seek(offset)
    got = 0
    while got < len(out):
        n = f.readinto(out[got:])
        if not n:
            raise MapQueryError(f"{f.name}: the conditioned cache is truncated")
        got += n


def score(
    cond: ConditionedEmbeddings, query: QueryEmbedding, *, block_rows: int | None = None, scorer: str | None = None
) -> np.ndarray:
    """(N,) float32 scores: −CSD (probabilistic) or cosine (deterministic); NaN for invalid points."""
    out = np.empty(len(cond), dtype=np.float32)
    for start, part in iter_scores(cond, query, block_rows=block_rows, scorer=scorer):
        out[start : start + len(part)] = part
    return out


def top_k(
    cond: ConditionedEmbeddings, query: QueryEmbedding, k: int, *, scorer: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(point ids, scores) of the ``k`` highest-scoring valid points, best first, from the streamed scores.

    A running top-k is kept per piece with ``np.argpartition``, so no full score vector is needed.
    """
    if k < 1:
        raise MapQueryError(f"k must be ≥ 1, got {k}")
    best_ids = np.empty(0, dtype=np.int64)
    best = np.empty(0, dtype=np.float32)
    for start, part in iter_scores(cond, query, scorer=scorer):
        s = np.where(np.isnan(part), -np.inf, part)
        ids = np.arange(start, start + len(s), dtype=np.int64)
        if len(s) > k:
            sel = np.argpartition(-s, k - 1)[:k]
            s, ids = s[sel], ids[sel]
        best = np.concatenate([best, s])
        best_ids = np.concatenate([best_ids, ids])
        if len(best) > k:
            sel = np.argpartition(-best, k - 1)[:k]
            best, best_ids = best[sel], best_ids[sel]
    keep = np.isfinite(best)
    best, best_ids = best[keep], best_ids[keep]
    order = np.lexsort((best_ids, -best))  # best first; ties by point id, as a stable argsort would
    return best_ids[order], best[order]


# --------------------------------------------------------------------------------------------------------
# Scaling
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleSpec:
    """How scores are written: ``raw`` −CSD, per-map ``percentile`` to [0, 1], or a ``shared`` scale."""

    mode: str = "raw"
    file: Path | None = None
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES

    @classmethod
    def parse(cls, text: str) -> ScaleSpec:
        """``raw`` | ``percentile`` | ``percentile:LO,HI`` | ``shared`` | ``shared:FILE.json``."""
        mode, _, arg = text.partition(":")
        if mode == "raw" and not arg:
            return cls("raw")
        if mode == "percentile":
            if not arg:
                return cls("percentile")
            try:
                lo, hi = (float(v) for v in arg.split(","))
            except ValueError:
                raise MapQueryError(
                    f"bad percentile scale {text!r}; use percentile:LO,HI e.g. percentile:2,98"
                ) from None
            if not 0 <= lo < hi <= 100:
                raise MapQueryError(f"percentiles must satisfy 0 ≤ LO < HI ≤ 100, got {lo}, {hi}")
            return cls("percentile", percentiles=(lo, hi))
        if mode == "shared":
            return cls("shared", Path(arg) if arg else None)
        raise MapQueryError(f"unknown scale {text!r}; use raw, percentile[:LO,HI] or shared[:FILE.json]")


@dataclass(frozen=True)
class Scale:
    """A resolved scale: the raw-score range [vmin, vmax] mapped to [0, 1] (``raw`` keeps values as they are)."""

    mode: str
    vmin: float
    vmax: float
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Scaled values (NaN stays NaN): unchanged for raw, else (v − vmin)/(vmax − vmin) clipped to [0, 1]."""
        if self.mode == "raw":
            return values.astype(np.float32, copy=False)
        span = self.vmax - self.vmin
        out = (values.astype(np.float32) - np.float32(self.vmin)) / np.float32(span if span > 0 else 1.0)
        return np.clip(out, 0.0, 1.0)

    def display_range(self) -> tuple[float, float]:
        """Colour-bar range of the scaled values."""
        return (self.vmin, self.vmax) if self.mode == "raw" else (0.0, 1.0)

    def value_label(self, raw_label: str) -> str:
        """Colour-bar label."""
        if self.mode == "raw":
            return raw_label
        lo, hi = self.percentiles
        what = "per-map" if self.mode == "percentile" else "shared"
        return f"{raw_label}, {what} scale: 0 = {self.vmin:.4g} (p{lo:g}), 1 = {self.vmax:.4g} (p{hi:g})"

    def to_json(self, raw_label: str = "-CSD") -> dict[str, Any]:
        """The shared-scale file content."""
        return {
            "format": SCALE_FORMAT,
            "vmin": self.vmin,
            "vmax": self.vmax,
            "percentiles": list(self.percentiles),
            "units": raw_label,
        }


def finite_percentiles(values: np.ndarray | Sequence[np.ndarray], lo: float, hi: float) -> tuple[float, float]:
    """(p_lo, p_hi) of the finite values of one array or of several arrays together."""
    arrays = [values] if isinstance(values, np.ndarray) else list(values)
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.empty(0)
    if finite.size == 0:
        raise MapQueryError("the map has no valid points: nothing to scale")
    p = np.percentile(finite, [lo, hi])
    return float(p[0]), float(p[1])


def read_scale_file(path: str | Path) -> Scale:
    """Read a shared-scale JSON file."""
    try:
        d = json.loads(Path(path).read_text())
        if d.get("format") != SCALE_FORMAT:
            raise ValueError(f"format {d.get('format')!r}")
        return Scale("shared", float(d["vmin"]), float(d["vmax"]), tuple(d.get("percentiles", DEFAULT_PERCENTILES)))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MapQueryError(f"{path}: not a psm scale file ({e})") from None


def write_scale_file(scale: Scale, path: str | Path, raw_label: str = "-CSD") -> Path:
    """Write a shared-scale JSON file atomically."""
    return write_text_atomic(path, json.dumps(scale.to_json(raw_label), indent=1))


def resolve_scale(spec: ScaleSpec, values: np.ndarray | Sequence[np.ndarray], raw_label: str = "-CSD") -> Scale:
    """Turn a scale request into numbers for these maps' raw values.

    ``shared:FILE`` reads FILE when it exists, else computes the percentiles of these maps and writes FILE so
    the next maps of the set reuse it; ``shared`` without a file is the joint percentiles of ``values``.
    """
    lo, hi = spec.percentiles
    if spec.mode == "shared" and spec.file is not None and spec.file.exists():
        return read_scale_file(spec.file)
    if spec.mode == "raw":
        vmin, vmax = finite_percentiles(values, 0.0, 100.0)
        return Scale("raw", vmin, vmax, (0.0, 100.0))
    vmin, vmax = finite_percentiles(values, lo, hi)
    scale = Scale(spec.mode, vmin, vmax, (lo, hi))
    if spec.mode == "shared" and spec.file is not None:
        write_scale_file(scale, spec.file, raw_label)
        log.info("shared scale written to %s", spec.file)
    return scale


# --------------------------------------------------------------------------------------------------------
# One query map, end to end
# --------------------------------------------------------------------------------------------------------


def default_zoom(index: MapIndex, zoom: int | None = None) -> int:
    """``zoom`` checked against the index, or the index's first zoom when None."""
    return index.check_zoom(zoom) if zoom is not None else index.zooms[0]


def score_label(probabilistic: bool) -> str:
    """What a raw score is: −CSD for PCME++ models, the cosine for deterministic ones."""
    return "−CSD" if probabilistic else "cosine similarity"


def map_tags(
    setting: MetadataSetting,
    zoom: int,
    model_name: str,
    value: str,
    *,
    query: QueryEmbedding | None = None,
    scale: Any = None,
    shared_scale: bool = False,
) -> dict[str, Any]:
    """The PSM_* GeoTIFF tags every map carries: what was asked, under which metadata, zoom, model and scale."""
    tags: dict[str, Any] = {}
    if query is not None:
        tags["PSM_QUERY"] = query.describe()
    tags |= {"PSM_METADATA": setting.to_dict(), "PSM_ZOOM": str(zoom), "PSM_MODEL": model_name, "PSM_VALUE": value}
    if scale is not None:
        tags["PSM_SCALE"] = {"mode": scale.mode, "vmin": scale.vmin, "vmax": scale.vmax} | (
            {"shared": True} if shared_scale else {}
        )
    return tags


def query_raster(
    index: MapIndex,
    model: Any,
    query: QueryEmbedding,
    *,
    zoom: int | None = None,
    setting: MetadataSetting = MetadataSetting(),
    scale: ScaleSpec = ScaleSpec(),
    cache_dir: str | Path | None = None,
    allow_incomplete: bool = False,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
    precision: str = "float32",
    scorer: str | None = None,
) -> tuple[np.ndarray, Scale, ConditionedEmbeddings]:
    """A query's scaled scores on the index's grid (NaN = no point or no imagery), its scale and the
    conditioned embeddings it was scored against: what a map file or a map tile is drawn from."""
    cond = condition(
        index,
        model,
        default_zoom(index, zoom),
        setting,
        cache_dir=cache_dir,
        allow_incomplete=allow_incomplete,
        batch_size=batch_size,
        device=device,
        precision=precision,
    )
    raw = score(cond, query, scorer=scorer)
    resolved = resolve_scale(scale, raw, score_label(cond.probabilistic))
    return index.raster(resolved.apply(raw)), resolved, cond


def query_map(
    index: MapIndex,
    model: Any,
    query: QueryEmbedding,
    prefix: str | Path,
    *,
    zoom: int | None = None,
    setting: MetadataSetting = MetadataSetting(),
    scale: ScaleSpec = ScaleSpec(),
    cmap: str = "viridis",
    basemap: str | None = None,
    width_px: int = 1000,
    title: str | None = None,
    formats: Sequence[str] = ("tif", "png", "html"),
    cache_dir: str | Path | None = None,
    allow_incomplete: bool = False,
    batch_size: int = 4096,
    device: str | torch.device | None = None,
    precision: str = "float32",
    scorer: str | None = None,
) -> Any:
    """Condition, score and write PREFIX.tif (COG), PREFIX.png and PREFIX.html for one query.

    Returns the :class:`psm.maps.render.MapOutputs` with ``extra`` holding the resolved scale, the
    metadata setting and the number of valid points.
    """
    from psm.maps.render import MapLegend, render_map

    zoom = default_zoom(index, zoom)
    raster, resolved, cond = query_raster(
        index,
        model,
        query,
        zoom=zoom,
        setting=setting,
        scale=scale,
        cache_dir=cache_dir,
        allow_incomplete=allow_incomplete,
        batch_size=batch_size,
        device=device,
        precision=precision,
        scorer=scorer,
    )
    label = score_label(cond.probabilistic)
    model_name = index.model_name(model)
    n_valid = int(cond.valid.sum())
    legend = MapLegend(
        title=title or f"Where would I hear this? ({query.kind} query)",
        query=query.describe(),
        metadata={**cond.setting.describe(), "zoom": str(zoom), "model": str(model_name)},
        value_label=resolved.value_label(label),
        notes=[f"{n_valid:,} of {index.num_points:,} points have imagery at zoom {zoom}"],
    )
    vmin, vmax = resolved.display_range()
    tags = map_tags(cond.setting, zoom, model_name, label, query=query, scale=resolved)
    out = render_map(
        raster,
        index.grid,
        prefix,
        legend=legend,
        vmin=vmin,
        vmax=vmax,
        cmap=cmap,
        basemap=basemap,
        tags=tags,
        width_px=width_px,
        formats=formats,
    )
    out.extra.update(scale=resolved, setting=cond.setting, valid_points=n_valid, zoom=zoom)
    return out

"""``psm map index``: pre-fusion image features of every grid point, per zoom, in a resumable chunked store.

For each chosen zoom level the raw footprint of a point is ``zoom × tile_size`` pixels at the imagery
source's base GSD (the official zoom crop), centred on the point; it goes through the eval transform
(:func:`psm.data.imagery.prepare_image`, ImageNet normalisation, the model's ``img_size``) and
:meth:`PSM.image_features` gives the (D,) pre-fusion feature. Metadata fusion and the heads are applied
later, per query (``psm map query``), on these cached features.

FORMAT ``psm-map-index/1`` (a folder INDEX; the query side relies on exactly this):

``INDEX/index.json``
    ``{"format": "psm-map-index/1",
    "model": {"name": checkpoint folder name or architecture, "fingerprint": sha256[:16] of the image
    encoder's weights, "config": the model's config dict},
    "imagery_source": name (psm.data.imagery_sources), "zooms": [..], "embed_dim": D,
    "num_points": N, "chunk_size": C,
    "grid": {"crs": "EPSG:n" or WKT, "transform": [a, b, c, d, e, f] (affine, pixel corner → CRS),
    "width": W, "height": H},
    "region": {"type": "bbox", "bbox": [W, S, E, N], "spacing_m": s}
    | {"type": "polygon", "bounds": [W, S, E, N], "polygons": k, "vertices": v, "sha256": .., "name": file
    name or null, "spacing_m": s} | {"type": "raster", "name": file name, "mask": <a bbox/polygon entry>
    (only when masked)} (W > E: the region crosses ±180°),
    "min_valid_fraction": f, "footprints": {"<zoom>": {"size_px": .., "gsd_m": ..}},
    "provider": {"type": "raster" | "xyz" | "folder", ...},
    "created_by": "psm <version>"}``. Never an absolute path. Written last by rank 0 (atomically): its
    presence means points.parquet and the Zarr arrays exist.
``INDEX/points.parquet``
    columns ``point_id`` int64 (0..N-1; chunk k holds ids [k·C, (k+1)·C)), ``latitude``, ``longitude``
    float64 (pixel centres, WGS 84, longitude in [-180, 180)), ``row``, ``col`` int32 (the pixel of the
    output raster: ``transform * (col + 0.5, row + 0.5)`` is the point in the grid CRS). Row-major order,
    only the pixels inside the region; one row group per chunk.
``INDEX/features.zarr`` (Zarr format 3 group)
    ``z{zoom}`` float16 (N, D), chunks (C, D), uncompressed, fill NaN (rows without imagery stay NaN);
    ``valid_z{zoom}`` bool (N,), chunks (C,), fill False — False = no imagery → nodata in every output;
    ``done_z{zoom}`` uint8 (num_chunks,), chunks (1,) — set to 1 only after chunk k's features and
    validity are written (the resume marker; one file per chunk, so ranks never share a chunk file).
    The index is complete when every ``done_z{zoom}`` is all 1 (:func:`index_progress`).
``INDEX/problems/rank{r}.{pid}.jsonl``
    unreadable files / failed tiles (one :class:`~psm.data.errors.DataProblem` per line), if any.

Imagery: the largest zoom's footprint is read once per point and the smaller zooms are its central crops
(the same pixels a separate read would give). A zoom is valid for a point only if at least
``min_valid_fraction`` (default 1.0: all) of its footprint has imagery — a zero-padded footprint would give
a different embedding, so partial footprints (at raster edges, missing tiles) are nodata, not guesses. For
example the real Sentinel-2 test raster (1536 × 768 px at 10 m) has valid zoom-1 footprints (256 px) in
its interior and no valid zoom-5 footprint (1280 px > 768 rows): zoom 5 is all nodata there, never wrong.

Resume: rerunning with the same arguments skips every chunk whose ``done`` flag is set, for each zoom;
a run with another model (weights), grid, region, zooms, chunk size or imagery source is refused
(:class:`IndexMismatchError`). Ranks: chunk k belongs to rank ``k % world_size`` (``--rank/--world-size``
or torchrun's / SLURM's environment); rank 0 writes index.json and points.parquet, the others wait for
index.json; each rank writes only its own chunks.

Throughput: footprints are read on a thread pool (``workers``) a few batches ahead of the model
(prefetch), so decode overlaps the forward passes; CUDA runs under bf16 (or fp16) autocast. On a GPU the
threads only read (:meth:`~psm.maps.sources.ImageryProvider.read_blocks`: overlapping footprints of
neighbouring points as one window) and hand the raw uint8 blocks to the GPU, where each footprint is cut
out and every zoom's crop, resize and normalisation run as batches
(``transform_on``); ``compile`` puts the encoder through ``torch.compile``.
Memory: one chunk's features plus the prefetched batches; nothing grows with the grid.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from psm.atomic import atomic_path, write_text_atomic
from psm.data.errors import DataProblem, SkipLog
from psm.data.imagery import ImageryError, prepare_eval_batch, prepare_image
from psm.data.imagery_sources import ImagerySource, get_imagery_source
from psm.maps.grid import Grid
from psm.maps.sources import ImageryProvider

FORMAT = "psm-map-index/1"
INDEX_JSON = "index.json"
POINTS_FILE = "points.parquet"
FEATURES_DIR = "features.zarr"
DEFAULT_CHUNK_SIZE = 4096
# Where tiles are cropped, resized and normalised (build_index's transform_on).
TRANSFORM_PLACES = ("auto", "workers", "device")
# Tiles left to compute from which build_index(compile=None) compiles the encoder on a GPU (auto_compile).
AUTO_COMPILE_TILES = 100_000
# What must match for a rerun to resume into an existing index (provider paths may move; these may not).
COMPARED_KEYS = (
    "format",
    "model",
    "imagery_source",
    "zooms",
    "embed_dim",
    "num_points",
    "chunk_size",
    "grid",
    "region",
    "min_valid_fraction",
    "footprints",
)

# What of the provider must match too: how its pixels are made (bands, value scaling, the tile layer). File
# names, folders and caches may change between runs.
COMPARED_PROVIDER_KEYS = ("type", "bands", "scale", "url", "tile_size", "zoom_range", "image_gsd_m")


class IndexMismatchError(ValueError):
    """An existing index was built with other settings; resuming into it would mix two indexes."""


# --------------------------------------------------------------------------------------------------------
# Reading imagery for a batch of points
# --------------------------------------------------------------------------------------------------------


@dataclass
class DecodedBatch:
    """Model inputs of a run of points: per zoom the images of the valid points and the validity."""

    images: dict[int, Tensor]  # zoom → (n_valid, 3, S, S) float32, normalised, in point order
    valid: dict[int, np.ndarray]  # zoom → (n,) bool

    @staticmethod
    def concat(parts: Sequence[DecodedBatch]) -> DecodedBatch:
        """Join consecutive runs of points.

        GPU parts were made on decode threads' own streams: each is marked as used by this thread's stream,
        so that its memory is not handed back to a decode thread while the joining copy may still read it.
        """
        zooms = parts[0].valid.keys()
        for part in parts:
            for t in part.images.values():
                if t.is_cuda:
                    t.record_stream(torch.cuda.current_stream(t.device))
        return DecodedBatch(
            {z: torch.cat([p.images[z] for p in parts]) for z in zooms},
            {z: np.concatenate([p.valid[z] for p in parts]) for z in zooms},
        )


def center_offset(size: int, crop: int) -> int:
    """Top/left offset of a centred crop, rounded like torchvision's ``center_crop``."""
    return round((size - crop) / 2.0)


class TileDecoder:
    """Reads the largest footprint once per point and prepares every zoom's model input from it.

    ``transform_device=None`` transforms each tile on the calling (decode) thread's CPU. With a device,
    the thread only reads: the raw uint8 footprints go to the device in one pinned copy (on the thread's
    own CUDA stream, overlapping the model) and every zoom's crop, bicubic resize and normalisation run there
    as batched kernels (:func:`~psm.data.imagery.prepare_eval_batch`, the same operations). On a GPU this
    takes the zoom-5 resize, the most expensive step of a tile, off the CPU.
    """

    def __init__(
        self,
        provider: ImageryProvider,
        source: ImagerySource,
        input_size: int,
        min_valid: float = 1.0,
        skip_log: SkipLog | None = None,
        transform_device: torch.device | None = None,
    ) -> None:
        self.provider = provider
        self.source = source
        self.input_size = int(input_size)
        self.min_valid = float(min_valid)
        self.skip_log = skip_log if skip_log is not None else provider.skip_log
        self.transform_device = transform_device
        self._local = threading.local()

    def footprint(self, zoom: int) -> tuple[int, float]:
        """(size_px, gsd_m) of a zoom level's raw footprint."""
        return zoom * self.source.tile_size, self.source.base_gsd_m

    def _central(self, raw: int, zoom: int) -> slice:
        """Rows (and columns) of a zoom's central crop within the largest zoom's ``raw`` px footprint."""
        need = zoom * self.source.tile_size
        top = center_offset(raw, need)
        return slice(top, top + need)

    def _usable_zooms(self, mask: np.ndarray | None, zooms: Sequence[int], raw: int) -> list[int]:
        """The zooms whose central crop of a ``raw`` px footprint has at least ``min_valid`` valid pixels."""
        if mask is None:
            return list(zooms)
        boxes = {z: self._central(raw, z) for z in zooms}
        return [z for z, box in boxes.items() if float(mask[box, box].mean()) >= self.min_valid]

    def _read(self, lats: np.ndarray, lons: np.ndarray, zooms: Sequence[int]):
        """Yield (i, raw uint8 HWC footprint, zooms valid there) for every point with a usable read."""
        raw, gsd = self.footprint(max(zooms))
        for i, got in enumerate(self.provider.read_masked_batch(lats, lons, raw, gsd)):
            if got is not None and (ok := self._usable_zooms(got[1], zooms, raw)):
                yield i, got[0], ok

    def __call__(self, lats: np.ndarray, lons: np.ndarray, zooms: Sequence[int]) -> DecodedBatch:
        """Model inputs for points (lats, lons) at ``zooms``; points without imagery are marked invalid."""
        if self.transform_device is not None:
            return self._on_device(lats, lons, zooms, self.transform_device)
        n = len(lats)
        raw = self.footprint(max(zooms))[0]
        images: dict[int, list[Tensor]] = {z: [] for z in zooms}
        valid = {z: np.zeros(n, dtype=bool) for z in zooms}
        for i, image, ok in self._read(lats, lons, zooms):
            for z in ok:
                box = self._central(raw, z)
                # Crop the uint8 first: converting the whole zoom-5 footprint to float is 40× slower.
                crop = image[box, box]
                try:
                    t = prepare_image(crop, self.source, z, train=False, input_size=self.input_size)
                except ImageryError as e:
                    self.skip_log.record(DataProblem(str(e), key=f"{lats[i]:.6f},{lons[i]:.6f}"))
                    continue
                images[z].append(t)
                valid[z][i] = True
        s = self.input_size
        return DecodedBatch(
            {z: torch.stack(v) if v else torch.empty(0, 3, s, s) for z, v in images.items()},
            valid,
        )

    def _on_device(self, lats: np.ndarray, lons: np.ndarray, zooms: Sequence[int], dev: torch.device) -> DecodedBatch:
        n = len(lats)
        raw, gsd = self.footprint(max(zooms))
        # Channels first: the reads skip the interleaving, and (B, 3, H, W) is what the transforms take. Blocks
        # of overlapping footprints travel once and are cropped on the device (less to read and to copy).
        blocks = self.provider.read_blocks(lats, lons, raw, gsd, channels_first=True)
        entries: list[tuple[int, int, int, list[int]]] = []  # (point, block, member, usable zooms)
        for b, block in enumerate(blocks):
            for j, (i, _, _) in enumerate(block.members):
                image, mask = block.footprint(j, raw)
                if image.shape != (3, raw, raw) or image.dtype != np.uint8:
                    problem = f"footprint is {image.dtype} {image.shape}, expected uint8 (3, {raw}, {raw})"
                    self.skip_log.record(DataProblem(problem, key=f"{lats[i]:.6f},{lons[i]:.6f}"))
                elif ok := self._usable_zooms(mask, zooms, raw):
                    entries.append((i, b, j, ok))
        entries.sort()  # the model's rows follow the points' order
        valid = {z: np.zeros(n, dtype=bool) for z in zooms}
        s = self.input_size
        if not entries:
            return DecodedBatch({z: torch.empty(0, 3, s, s, device=dev) for z in zooms}, valid)
        used = sorted({b for _, b, _, _ in entries})
        cuda = dev.type == "cuda"
        stream = self._stream(dev) if cuda else None
        with torch.cuda.stream(stream) if cuda else nullcontext():
            # One pinned buffer, one copy: every used block back to back.
            host = torch.empty(sum(blocks[b].image.size for b in used), dtype=torch.uint8, pin_memory=cuda)
            flat, spans, offset = host.numpy(), {}, 0
            for b in used:
                image = blocks[b].image
                flat[offset : offset + image.size].reshape(image.shape)[...] = image
                spans[b] = slice(offset, offset + image.size)
                offset += image.size
            on_dev = host.to(dev, non_blocking=True)
            views = {b: on_dev[span].view(blocks[b].image.shape) for b, span in spans.items()}
            crops = []
            for _, b, j, _ in entries:
                _, r, c = blocks[b].members[j]
                crops.append(views[b][:, r : r + raw, c : c + raw])
            footprints = torch.stack(crops)
            rows = [i for i, _, _, _ in entries]
            usable = [ok for _, _, _, ok in entries]
            images = {}
            for z in zooms:
                keep = [k for k, ok in enumerate(usable) if z in ok]
                if not keep:
                    images[z] = torch.empty(0, 3, s, s, device=dev)
                    continue
                valid[z][[rows[k] for k in keep]] = True
                box = self._central(raw, z)
                crop = footprints[:, :, box, box]
                if len(keep) < len(rows):
                    crop = crop[torch.as_tensor(keep, dtype=torch.long, device=dev)]
                images[z] = prepare_eval_batch(crop, self.source, z, input_size=s)
        if stream is not None:
            # The model runs on another stream: hand over finished tensors only.
            stream.synchronize()
        return DecodedBatch(images, valid)

    def _stream(self, dev: torch.device) -> Any:
        """This decode thread's own CUDA stream (copies and transforms overlap the model's stream)."""
        stream = getattr(self._local, "stream", None)
        if stream is None:
            stream = self._local.stream = torch.cuda.Stream(dev)
        return stream


# --------------------------------------------------------------------------------------------------------
# Metadata, ranks, devices
# --------------------------------------------------------------------------------------------------------


def resolve_rank(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size) from the arguments, else torchrun's RANK/WORLD_SIZE, else SLURM's, else (0, 1)."""
    env = os.environ
    if rank is None:
        rank = int(env.get("RANK", env.get("SLURM_PROCID", 0)))
    if world_size is None:
        world_size = int(env.get("WORLD_SIZE", env.get("SLURM_NTASKS", 1)))
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cuda`` (this rank's LOCAL_RANK GPU) when available or asked for, else ``cpu``."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return dev


def autocast_context(device: torch.device, precision: str = "auto") -> Any:
    """bf16 (or fp16 where bf16 is unsupported) autocast on CUDA by default; fp32 elsewhere."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return nullcontext()
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    return torch.autocast(device.type, dtype=dtype)


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256[:16] of the image encoder's weights: the features depend on nothing else of the model."""
    encoder = model.image.encoder if hasattr(model, "image") else model
    h = hashlib.sha256()
    for name, t in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)  # numpy has no bfloat16; hash the bits
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def _jsonable(obj: Any) -> Any:
    """The object as it reads back from JSON (tuples → lists, int keys → str), for comparisons."""
    return json.loads(json.dumps(obj, sort_keys=True))


def index_meta(
    model: torch.nn.Module,
    model_name: str,
    grid: Grid,
    provider: ImageryProvider,
    source: ImagerySource,
    zooms: Sequence[int],
    chunk_size: int,
    min_valid: float,
) -> dict[str, Any]:
    """The index.json document for these settings."""
    from psm import __version__

    cfg = model.config
    return _jsonable(
        {
            "format": FORMAT,
            "model": {"name": model_name, "fingerprint": model_fingerprint(model), "config": cfg.to_dict()},
            "imagery_source": source.name,
            "zooms": [int(z) for z in zooms],
            "embed_dim": int(cfg.embed_dim),
            "num_points": grid.num_points,
            "chunk_size": int(chunk_size),
            "grid": grid.to_dict(),
            "region": grid.region,
            "min_valid_fraction": float(min_valid),
            "footprints": {str(z): {"size_px": z * source.tile_size, "gsd_m": source.base_gsd_m} for z in zooms},
            "provider": provider.describe(),
            "created_by": f"psm {__version__}",
        }
    )


def read_index_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The index.json of an index folder (raises FileNotFoundError / ValueError)."""
    meta = json.loads((Path(path) / INDEX_JSON).read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} index (format {meta.get('format')!r})")
    return meta


def check_compatible(existing: Mapping[str, Any], wanted: Mapping[str, Any], where: str) -> None:
    """Raise :class:`IndexMismatchError` naming what differs between an index and this run."""
    differ = [k for k in COMPARED_KEYS if _jsonable(existing.get(k)) != _jsonable(wanted.get(k))]
    # Other bands or another scaling resumed into an index would mix two imageries' features in one map.
    old_p, new_p = (m.get("provider") or {} for m in (existing, wanted))
    differ += [
        f"provider {k}"
        for k in COMPARED_PROVIDER_KEYS
        if (k in old_p or k in new_p) and _jsonable(old_p.get(k)) != _jsonable(new_p.get(k))
    ]
    if differ:
        details = []
        for k in differ:
            if k.startswith("provider "):
                old, new = old_p.get(k[9:]), new_p.get(k[9:])
            else:
                old, new = existing.get(k), wanted.get(k)
            if k == "model" and isinstance(old, Mapping) and isinstance(new, Mapping):
                sub = [s for s in ("name", "fingerprint", "config") if _jsonable(old.get(s)) != _jsonable(new.get(s))]
                details.append(f"model ({', '.join(sub)})")
            elif isinstance(old, int | float | str | list) and len(json.dumps(old)) < 80:
                details.append(f"{k} ({json.dumps(old)} there, {json.dumps(new)} now)")
            else:
                details.append(k)
        raise IndexMismatchError(
            f"{where} was built with a different {', '.join(details)}; refusing to resume into it "
            f"(choose another --out, or delete it to start over)"
        )


def index_progress(path: str | os.PathLike[str]) -> dict[int, tuple[int, int]]:
    """zoom → (chunks done, chunks in total) of an index; complete when they are equal for every zoom."""
    import zarr

    meta = read_index_meta(path)
    group = zarr.open_group(str(Path(path) / FEATURES_DIR), mode="r")
    return {
        int(z): (int(np.asarray(group[f"done_z{z}"][:]).sum()), group[f"done_z{z}"].shape[0]) for z in meta["zooms"]
    }


# --------------------------------------------------------------------------------------------------------
# Creating the store
# --------------------------------------------------------------------------------------------------------


def write_points(grid: Grid, path: Path, chunk_size: int) -> None:
    """Stream the grid's points into a Parquet file (one row group per chunk), atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("point_id", pa.int64()),
            ("latitude", pa.float64()),
            ("longitude", pa.float64()),
            ("row", pa.int32()),
            ("col", pa.int32()),
        ]
    )
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for c in grid.iter_chunks(chunk_size):
            writer.write_table(
                pa.table([c.point_id, c.latitude, c.longitude, c.row, c.col], schema=schema),
                row_group_size=chunk_size,
            )


def _create_store(out: Path, meta: Mapping[str, Any], grid: Grid) -> None:
    """points.parquet, the empty Zarr arrays, then index.json (last: it marks the store as ready)."""
    import zarr

    n, c, d = meta["num_points"], meta["chunk_size"], meta["embed_dim"]
    write_points(grid, out / POINTS_FILE, c)
    group = zarr.open_group(str(out / FEATURES_DIR), mode="w", zarr_format=3)
    for z in meta["zooms"]:
        # Features stay uncompressed: float16 embeddings barely compress and queries read them all.
        group.create_array(f"z{z}", shape=(n, d), chunks=(c, d), dtype="float16", fill_value=np.nan, compressors=None)
        group.create_array(f"valid_z{z}", shape=(n,), chunks=(c,), dtype="bool", fill_value=False)
        group.create_array(f"done_z{z}", shape=(math.ceil(n / c),), chunks=(1,), dtype="uint8", fill_value=0)
    group.attrs.update({"format": FORMAT})
    write_text_atomic(out / INDEX_JSON, json.dumps(meta, indent=1, sort_keys=False) + "\n")


def _wait_for_index(out: Path, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while not (out / INDEX_JSON).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{out / INDEX_JSON} did not appear within {timeout_s:g} s; rank 0 creates it: is rank 0 running?"
            )
        time.sleep(0.2)
    return read_index_meta(out)


# --------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------


@dataclass
class IndexReport:
    """What one call of :func:`build_index` did."""

    out: Path
    rank: int
    world_size: int
    num_points: int
    num_chunks: int
    my_chunks: int
    computed: list[int] = field(default_factory=list)  # chunks computed now
    skipped: list[int] = field(default_factory=list)  # chunks of this rank already done
    tiles: int = 0  # (point, zoom) pairs read and embedded or found without imagery
    embedded: int = 0  # images that went through the model
    valid: dict[int, int] = field(default_factory=dict)  # zoom → valid points in the computed chunks
    valid_in_index: dict[int, int] = field(default_factory=dict)  # zoom → valid points in all done chunks
    seconds: float = 0.0
    problems: int = 0
    complete: bool = False  # every chunk of every rank done
    device: str = "cpu"  # where the encoder ran
    transforms_on: str = "workers"  # "workers" (the reading threads' CPU), "device", or "custom decoder"
    compiled: bool = False  # the encoder ran through torch.compile (False after a failed compile)

    @property
    def tiles_per_s(self) -> float:
        """Throughput including imagery reading and decoding."""
        return self.tiles / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One paragraph for the command line."""
        valid = ", ".join(f"z{z}: {v}" for z, v in sorted(self.valid_in_index.items()))
        if self.skipped or self.world_size > 1:  # then this run's chunks are not the whole index
            valid += "; computed now: " + ", ".join(f"z{z}: {v}" for z, v in sorted(self.valid.items()))
        state = "complete" if self.complete else "incomplete (other ranks' or remaining chunks missing)"
        return (
            f"rank {self.rank}/{self.world_size}: computed {len(self.computed)} chunk(s), skipped "
            f"{len(self.skipped)} already done, of {self.my_chunks} ({self.num_chunks} in all, "
            f"{self.num_points} points); {self.tiles} tiles in {self.seconds:.1f} s = {self.tiles_per_s:.1f} tiles/s; "
            f"valid points per zoom in the index [{valid}]; {self.problems} problem(s); index {state}; encoder on "
            f"{self.device}{' (compiled)' if self.compiled else ''}, tile transforms on {self.transforms_on}"
        )


Decoder = Callable[[np.ndarray, np.ndarray, Sequence[int]], DecodedBatch]


def _progress_bar(total: int, enabled: bool | None) -> Any:
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, unit="pt", disable=not enabled, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


@torch.inference_mode()
def build_index(
    model: torch.nn.Module,
    grid: Grid,
    provider: ImageryProvider,
    out: str | os.PathLike[str],
    *,
    zooms: Sequence[int] | None = None,
    imagery_source: str | ImagerySource | None = None,
    model_name: str | None = None,
    chunk_size: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    precision: str = "auto",
    rank: int | None = None,
    world_size: int | None = None,
    workers: int = 8,
    prefetch: int = 2,
    min_valid: float = 1.0,
    max_chunks: int | None = None,
    progress: bool | None = None,
    decoder: Decoder | None = None,
    on_chunk_done: Callable[[int], None] | None = None,
    wait_timeout_s: float = 3600.0,
    transform_on: str = "auto",
    compile: bool | str | None = None,
) -> IndexReport:
    """Compute (or finish) the index of ``grid`` at ``zooms`` into folder ``out``; see the module docstring.

    ``max_chunks`` stops after that many chunks (time-boxing, tests); ``decoder`` replaces the imagery
    reading (benchmarks); ``on_chunk_done(k)`` runs after chunk k is committed. ``transform_on``: where
    tiles are cropped, resized and normalised — ``"workers"`` (the decode threads' CPU), ``"device"`` (the
    model's device, see :class:`TileDecoder`) or ``"auto"`` (the device when it is a GPU). ``compile``
    runs the image encoder through ``torch.compile`` (batches padded to ``batch_size``: one graph); a
    string is the compile mode (``"reduce-overhead"``: CUDA graphs, the fewest host launches); ``None``
    compiles on a GPU when at least :data:`AUTO_COMPILE_TILES` tiles are left (:func:`auto_compile`).
    """
    import zarr

    cfg = model.config
    source = (
        imagery_source
        if isinstance(imagery_source, ImagerySource)
        else get_imagery_source(imagery_source or cfg.image.imagery_source)
    )
    if source.name != get_imagery_source(cfg.image.imagery_source).name:
        # The GSD embedding would be told the wrong metres per pixel.
        raise ValueError(f"the model was built for {cfg.image.imagery_source!r} imagery, not {source.name!r}")
    zooms = tuple(int(z) for z in (zooms or cfg.image.zoom_levels))
    bad = [z for z in zooms if z not in source.zoom_levels]
    if bad or not zooms or len(set(zooms)) != len(zooms):
        raise ValueError(f"zooms {list(zooms)}: must be distinct levels of {source.name!r} {list(source.zoom_levels)}")
    if batch_size < 1 or workers < 1:
        raise ValueError("batch_size and workers must be positive")
    if transform_on not in TRANSFORM_PLACES:
        raise ValueError(f"transform_on must be one of {', '.join(TRANSFORM_PLACES)}, got {transform_on!r}")
    if not 0.0 < min_valid <= 1.0:
        raise ValueError(f"min_valid must be in (0, 1], got {min_valid}")
    rank, world_size = resolve_rank(rank, world_size)
    dev = resolve_device(device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if chunk_size is None:
        chunk_size = read_index_meta(out)["chunk_size"] if (out / INDEX_JSON).exists() else DEFAULT_CHUNK_SIZE
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    name = model_name or getattr(cfg, "name", "psm")
    meta = index_meta(model, name, grid, provider, source, zooms, chunk_size, min_valid)
    if (out / INDEX_JSON).exists():
        check_compatible(read_index_meta(out), meta, str(out))
    elif rank == 0:
        _create_store(out, meta, grid)
    else:
        check_compatible(_wait_for_index(out, wait_timeout_s), meta, str(out))

    group = zarr.open_group(str(out / FEATURES_DIR), mode="r+")
    feats = {z: group[f"z{z}"] for z in zooms}
    valids = {z: group[f"valid_z{z}"] for z in zooms}
    dones = {z: group[f"done_z{z}"] for z in zooms}
    n_chunks = grid.num_chunks(chunk_size)
    done = {z: np.asarray(dones[z][:]).astype(bool) for z in zooms}
    mine = list(range(rank, n_chunks, world_size))
    todo = [(k, tuple(z for z in zooms if not done[z][k])) for k in mine]
    report = IndexReport(out, rank, world_size, grid.num_points, n_chunks, len(mine))
    report.skipped = [k for k, zs in todo if not zs]
    todo = [(k, zs) for k, zs in todo if zs]
    if max_chunks is not None:
        todo = todo[: max(0, int(max_chunks))]

    if compile is None:
        compile = auto_compile(dev, sum(min(chunk_size, grid.num_points - k * chunk_size) * len(zs) for k, zs in todo))
    skip_log = SkipLog(out / "problems" / f"rank{rank}")
    report.device, report.transforms_on = str(dev), "custom decoder"
    if decoder is None:
        provider.skip_log = skip_log  # problems land next to the index, one file per process
        on_device = transform_on == "device" or (transform_on == "auto" and dev.type == "cuda")
        decoder = TileDecoder(provider, source, cfg.image.img_size, min_valid, skip_log, dev if on_device else None)
        report.transforms_on = str(dev) if on_device else "workers"
    model = model.to(dev).eval()
    encode = ImageEncoder(model, dev, precision, compile=compile, pad_to=batch_size if compile else None)
    dim = int(cfg.embed_dim)
    report.valid = {z: 0 for z in zooms}

    # Work items: batches of points in chunk order; each is split into parts for the decode threads.
    def batches():
        for k, zs in todo:
            pts = grid.chunk(k, chunk_size)
            n = len(pts)
            for b0 in range(0, n, batch_size):
                b1 = min(n, b0 + batch_size)
                yield k, zs, n, b0, b1, pts.latitude[b0:b1], pts.longitude[b0:b1]

    part = max(1, math.ceil(batch_size / workers))
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="psm-map-decode", initializer=_decode_thread_init)
    pending: deque[tuple[tuple, list[Future]]] = deque()
    work = batches()

    def submit_next() -> bool:
        item = next(work, None)
        if item is None:
            return False
        _, zs, _, _, _, lats, lons = item
        futs = [pool.submit(decoder, lats[i : i + part], lons[i : i + part], zs) for i in range(0, len(lats), part)]
        pending.append((item, futs))
        return True

    bar = _progress_bar(sum(min(chunk_size, grid.num_points - k * chunk_size) for k, _ in todo), progress)
    start = time.perf_counter()
    current: dict[str, Any] | None = None
    try:
        for _ in range(prefetch + 1):
            if not submit_next():
                break
        while pending:
            (k, zs, n, b0, b1, lats, lons), futs = pending.popleft()
            submit_next()  # keep the decode threads `prefetch` batches ahead of the model
            decoded = DecodedBatch.concat([f.result() for f in futs])
            if current is None:
                current = {
                    "k": k,
                    "feats": {z: np.full((n, dim), np.nan, dtype=np.float16) for z in zs},
                    "valid": {z: np.zeros(n, dtype=bool) for z in zs},
                }
            for z in zs:
                v = decoded.valid[z].copy()
                if v.any():
                    f = encode(decoded.images[z], z)
                    report.embedded += len(f)
                    # A feature beyond float16's ±65,504 (or a NaN from the model) would be stored as inf/NaN
                    # with the point marked valid: it is nodata instead, and recorded as a problem.
                    finite = np.isfinite(f).all(axis=1)
                    if not finite.all():
                        for i in np.flatnonzero(v)[~finite]:
                            problem = f"zoom {z}: the image feature is not finite in float16 (overflow or NaN)"
                            skip_log.record(DataProblem(problem, key=f"{lats[i]:.6f},{lons[i]:.6f}"))
                        v[np.flatnonzero(v)[~finite]] = False
                        f = f[finite]
                    current["feats"][z][b0:b1][v] = f
                current["valid"][z][b0:b1] = v
            report.tiles += (b1 - b0) * len(zs)
            bar.update(b1 - b0)
            elapsed = time.perf_counter() - start
            if elapsed > 0:
                bar.set_postfix_str(f"{report.tiles / elapsed:.1f} tiles/s", refresh=False)
            if b1 == n:  # the chunk is complete: commit features and validity, then the done flags
                lo = k * chunk_size
                for z in zs:
                    feats[z][lo : lo + n] = current["feats"][z]
                    valids[z][lo : lo + n] = current["valid"][z]
                    report.valid[z] += int(current["valid"][z].sum())
                for z in zs:
                    dones[z][k] = 1
                report.computed.append(k)
                current = None
                if on_chunk_done is not None:
                    on_chunk_done(k)
    finally:
        for _, futs in pending:
            for f in futs:
                f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    report.seconds = time.perf_counter() - start
    report.compiled = encode.compiled
    report.problems = len(skip_log)
    report.complete = all(int(np.asarray(dones[z][:]).sum()) == n_chunks for z in zooms)
    # A rerun that resumes (or skips everything) still reports what the index holds, not only its own share.
    report.valid_in_index = {z: int(np.count_nonzero(valids[z][:])) for z in zooms}
    return report


def _decode_thread_init() -> None:
    """Decode threads run torch ops single-threaded (the setting is per thread; the model keeps its own).

    Parallelism comes from the pool; nested intra-op threads per decode thread oversubscribe the cores and
    made the zoom crop ~20× slower on a busy 2-core machine.
    """
    torch.set_num_threads(1)


def auto_compile(device: torch.device, tiles: int) -> bool:
    """Whether ``build_index(compile=None)`` compiles the encoder: on a GPU, for enough tiles to pay back.

    Measured on an H100 (docs/benchmarks.md): compiling costs ~30 s once and lifts the paper-size pipeline
    from ~800 to ~2,250 tiles/s, so it pays from some 37,000 tiles; below a few times that it is not worth
    the wait (nor the risk of a compiler problem on a small job).
    """
    return device.type == "cuda" and tiles >= AUTO_COMPILE_TILES


class ImageEncoder:
    """Pre-fusion features of one zoom's images as float16 numpy, optionally through ``torch.compile``.

    ``pad_to``: run every batch padded to this many images (the padding's features are dropped), so that
    a compiled encoder keeps one graph for every batch (a chunk's last batch and valid subsets vary). If
    compiling fails (no compiler, an unsupported platform), the encoder warns and runs eagerly: the index
    is the same, only slower.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        device: torch.device,
        precision: str = "auto",
        *,
        compile: bool | str = False,
        pad_to: int | None = None,
    ) -> None:
        self.device = device
        self.precision = precision
        self.pad_to = pad_to
        self.eager = model.image_features
        self.features = self.eager
        self.compiled = bool(compile)
        if compile:
            mode = compile if isinstance(compile, str) else None
            self.features = torch.compile(model.image_features, dynamic=False, mode=mode)

    def __call__(self, images: Tensor, zoom: int) -> np.ndarray:
        x = images.to(self.device, non_blocking=True)
        n = len(x)
        out = []
        step = self.pad_to or n
        for b0 in range(0, n, step):
            part = x[b0 : b0 + step]
            if self.pad_to and len(part) < self.pad_to:
                part = torch.cat([part, part.new_zeros((self.pad_to - len(part), *part.shape[1:]))])
            zt = torch.full((len(part),), zoom, dtype=torch.long, device=self.device)
            with torch.inference_mode(), autocast_context(self.device, self.precision):
                f = self._features(part, zt)
            out.append(f[: min(step, n - b0)].float().cpu().numpy().astype(np.float16))
        return np.concatenate(out)

    def _features(self, images: Tensor, zoom: Tensor) -> Tensor:
        if not self.compiled:
            return self.features(images, zoom)
        try:
            return self.features(images, zoom)
        except Exception as e:  # a compiler or backend failure: the eager encoder computes the same features
            warnings.warn(
                f"torch.compile of the image encoder failed ({type(e).__name__}: {e}); running it eagerly",
                RuntimeWarning,
                stacklevel=3,
            )
            self.features, self.compiled = self.eager, False
            return self.features(images, zoom)

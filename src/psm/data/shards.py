"""Tar shards (WebDataset layout): a deterministic, resumable writer and a DDP/worker-exact reader.

Our layout, written by :func:`pack_records` (a sample = consecutive members sharing a ``<key>.`` prefix)::

    <key>.audio.<flac|ogg|wav|mp3>   encoded audio, and/or
    <key>.features.npy               precomputed CLAP fusion features, float16/float32 (.npy, never pickle)
    <key>.image.<jpg|png|tif>        raw overhead tile bytes
    <key>.is_longer.json             optional ``true`` / ``false``
    <key>.meta.json                  latitude, longitude, month, hour, audio_source, caption_source, caption, …

The authors' GeoSound/SoundingEarth shards (``meta.json``, ``image.jpg``, ``audio_mel1..5.pyd``) are read
as they are by :func:`official_sample_decoder` / :class:`OfficialShardDataset`; their ``.pyd`` members are
pickles, so reading them needs an explicit ``allow_pickle=True``.

Reader guarantees (:class:`ShardDataset`): for a given ``(seed, epoch)`` there is one global sample order
(shard order shuffled by a seeded RNG, samples in shard order); the order is cut into contiguous,
near-equal blocks, first per rank and then per DataLoader worker, so every sample is produced exactly
once per epoch whatever the number of shards, ranks and workers (``even=None``), or each rank yields the
same number of samples (``even="pad"``/``"drop"``), which DDP needs to avoid a collective hanging.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import pickle
import random
import re
import tarfile
import warnings
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from psm.data.batch import RAW_METADATA_FIELDS, Sample
from psm.data.dates import parse_date
from psm.data.imagery import ImageryError, SatelliteView, pil_to_rgb
from psm.data.imagery_sources import ImagerySource

__all__ = [
    "AUDIO_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "OfficialDecoder",
    "OfficialShardDataset",
    "PackReport",
    "PickleNotAllowedError",
    "ShardDataset",
    "ShardDecodeError",
    "ShardDecoder",
    "ShardError",
    "ShardReadError",
    "ShardRecord",
    "ShardWriteError",
    "decode_audio_bytes",
    "iter_shard",
    "official_sample_decoder",
    "pack_records",
    "read_error_logs",
    "read_index",
    "shard_sample_count",
    "slot_range",
    "validate_key",
]

log = logging.getLogger(__name__)
# Problems a shard reader logs one by one before it only records them (per worker).
WARN_FIRST_PROBLEMS = 10

IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "tif", "tiff")
AUDIO_EXTENSIONS: tuple[str, ...] = ("flac", "ogg", "wav", "mp3")
FEATURE_DTYPES: tuple[str, ...] = ("float16", "float32")
CLAP_FEATURE_SHAPE: tuple[int, int, int] = (4, 1001, 64)

INDEX_FORMAT = "psm-shards"
INDEX_VERSION = 1
# Fixed tar header fields: identical input must give byte-identical shards (no clock, no user ids).
_TAR_MTIME = 0
_TAR_MODE = 0o644
_SHARD_NAME = re.compile(r"^(?P<prefix>.+)-(?P<num>\d{6})\.tar$")
_MAX_KEY_BYTES = 200

Even = Literal["pad", "drop"] | None
OnError = Literal["raise", "skip"]
# What a decode function receives: tar members by suffix (``"meta.json"`` → bytes, …) plus ``__key__``,
# ``__shard__`` (path), ``__epoch__`` and ``__generator__`` (a torch.Generator seeded per sample).
MemberDict = dict[str, Any]


class ShardWriteError(ValueError):
    """A record cannot be packed (bad key, duplicate key, unserialisable metadata) or a resume check failed."""


class ShardReadError(OSError):
    """A shard is unreadable or does not hold the samples its index says it does."""


class ShardDecodeError(RuntimeError):
    """A sample failed to decode under ``on_error="raise"``; names the shard and the key."""


class PickleNotAllowedError(ValueError):
    """Reading a pickled (``.pyd``) member was not opted into with ``allow_pickle=True``."""


def _derive_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``; stable across processes and runs (unlike ``hash()``)."""
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------------


@dataclass
class ShardRecord:
    """One sample to pack: key, JSON metadata, raw image bytes and audio (encoded bytes and/or features)."""

    key: str
    meta: dict[str, Any]
    image: bytes
    image_ext: str = "jpg"
    audio: bytes | None = None
    audio_ext: str | None = None
    audio_features: np.ndarray | None = None  # float16/float32, usually (4, 1001, 64)
    is_longer: bool | None = None


@dataclass
class PackReport:
    """What :func:`pack_records` did: every shard of the set, which were written, skipped or removed."""

    out_dir: Path
    prefix: str
    index_path: Path
    shards: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    num_samples: int = 0

    def summary(self) -> str:
        """One line for the pack commands: samples, shards written and already complete, and where."""
        return (
            f"{self.num_samples} samples in {len(self.shards)} shards ({len(self.written)} written, "
            f"{len(self.skipped)} already complete) → {self.out_dir}"
        )


def validate_key(key: object) -> str:
    """Check that a sample key is tar-safe: non-empty, ≤ 200 bytes, no ".", "/", "\\", whitespace or controls.

    Keys are not escaped: WebDataset splits a member name at the first "." of its basename and treats "/"
    as a folder, so such keys would silently change meaning; rejecting them is clearer.
    """
    if not isinstance(key, str) or not key:
        raise ShardWriteError(f"sample key must be a non-empty string, got {key!r}")
    bad = sorted({c for c in key if c in "./\\" or c.isspace() or not c.isprintable()})
    if bad:
        raise ShardWriteError(
            f"sample key {key!r} contains {bad!r}; keys may not contain '.', '/', '\\', "
            f"whitespace or control characters (replace them, e.g. with '_')"
        )
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        raise ShardWriteError(f"sample key {key[:40]!r}… is longer than {_MAX_KEY_BYTES} bytes")
    return key


def _encode_record(rec: ShardRecord) -> list[tuple[str, bytes]]:
    """Validate a record and return its tar members ``(suffix, bytes)`` sorted by suffix."""
    key = validate_key(rec.key)
    if not isinstance(rec.meta, Mapping):
        raise ShardWriteError(f"{key}: meta must be a dict, got {type(rec.meta).__name__}")
    try:
        # sort_keys + fixed separators → identical bytes for identical metadata; NaN is not JSON.
        meta = json.dumps(rec.meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ShardWriteError(f"{key}: meta is not JSON-serialisable ({exc}); use None for unknown values") from exc
    members = [("meta.json", meta.encode("utf-8"))]

    image_ext = str(rec.image_ext).lower().lstrip(".")
    if image_ext not in IMAGE_EXTENSIONS:
        raise ShardWriteError(f"{key}: image_ext {rec.image_ext!r} not one of {IMAGE_EXTENSIONS}")
    if not isinstance(rec.image, bytes | bytearray | memoryview) or len(rec.image) == 0:
        raise ShardWriteError(f"{key}: image must be non-empty encoded bytes")
    members.append((f"image.{image_ext}", bytes(rec.image)))

    if rec.audio is None and rec.audio_features is None:
        raise ShardWriteError(f"{key}: a record needs audio bytes or audio_features")
    if rec.audio is not None:
        audio_ext = str(rec.audio_ext or "").lower().lstrip(".")
        if audio_ext not in AUDIO_EXTENSIONS:
            raise ShardWriteError(f"{key}: audio_ext {rec.audio_ext!r} not one of {AUDIO_EXTENSIONS}")
        if len(rec.audio) == 0:
            raise ShardWriteError(f"{key}: audio bytes are empty")
        members.append((f"audio.{audio_ext}", bytes(rec.audio)))
    if rec.audio_features is not None:
        feats = np.asarray(rec.audio_features)
        if feats.dtype.name not in FEATURE_DTYPES:
            raise ShardWriteError(f"{key}: audio_features dtype {feats.dtype} not one of {FEATURE_DTYPES}")
        if not np.isfinite(feats).all():
            raise ShardWriteError(f"{key}: audio_features contain NaN/inf")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(feats), allow_pickle=False)
        members.append(("features.npy", buf.getvalue()))
    if rec.is_longer is not None:
        members.append(("is_longer.json", json.dumps(bool(rec.is_longer)).encode()))
    return sorted(members)


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile writes (tarfile needs ``write`` and ``tell``)."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = _TAR_MTIME
    info.mode = _TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, where os.replace must do.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _index_path(out_dir: Path, prefix: str) -> Path:
    return out_dir / f"{prefix}-index.json"


def read_index(out_dir: str | os.PathLike[str], prefix: str = "train") -> dict[str, Any] | None:
    """Load ``<prefix>-index.json`` written by :func:`pack_records`, or ``None`` when there is none."""
    path = _index_path(Path(out_dir), prefix)
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        index = json.load(f)
    if index.get("format") != INDEX_FORMAT:
        raise ShardReadError(f"{path} is not a psm shard index (format {index.get('format')!r})")
    return index


def _write_index(path: Path, prefix: str, samples_per_shard: int, entries: dict[int, dict], complete: bool) -> None:
    shards = [entries[i] for i in sorted(entries)]
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "prefix": prefix,
        "samples_per_shard": samples_per_shard,
        "complete": complete,
        "num_samples": sum(e["count"] for e in shards) if complete else None,
        "shards": shards,
    }
    _atomic_write_bytes(path, (json.dumps(index, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def pack_records(
    records: Iterable[ShardRecord],
    out_dir: str | os.PathLike[str],
    *,
    prefix: str = "train",
    samples_per_shard: int = 1000,
    overwrite: bool = False,
    verify_existing: bool = False,
) -> PackReport:
    """Write ``records`` (in order) to ``<prefix>-000000.tar``, … plus ``<prefix>-index.json``; resumable.

    Shard ``i`` always holds records ``i·n … i·n+n-1`` (``n = samples_per_shard``), samples in record order,
    members sorted within a sample, fixed tar headers: the same input gives byte-identical shards. Each
    shard is written to ``<name>.tmp-<pid>`` in ``out_dir`` and ``os.replace``d when complete, then the
    index is replaced atomically, so a crash never leaves a half-written shard under a final name.

    Re-running after an interruption skips every full shard whose file exists with the size, sample count
    and key checksum the index recorded (its records are still consumed, to keep the chunking, but not
    re-encoded); ``verify_existing`` also re-hashes the file. A final partial shard is always rewritten.
    If the keys of a recorded shard changed, a :class:`ShardWriteError` asks for ``overwrite=True``.
    On completion, shard files of this prefix numbered past the end (a longer earlier run) are deleted.
    Do not run two packers on the same ``out_dir`` and prefix at once.
    """
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be a positive integer, got {samples_per_shard!r}")
    if not prefix or any(c in prefix for c in "/\\") or prefix.startswith("."):
        raise ValueError(f"prefix must be a plain file-name prefix, got {prefix!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index_path = _index_path(out, prefix)
    report = PackReport(out_dir=out, prefix=prefix, index_path=index_path)

    # Temp files of an earlier run killed without cleanup (SIGKILL, power loss) are ours by exact name
    # (not those of another prefix such as "train-extra", which may be packing right now).
    ours = re.compile(rf"^{re.escape(prefix)}-(\d{{6}}\.tar|index\.json)\.tmp-\d+$")
    for stale in out.glob(f"{_glob_escape(prefix)}-*.tmp-*"):
        if ours.match(stale.name):
            stale.unlink(missing_ok=True)

    old = None if overwrite else read_index(out, prefix)
    if old is not None and (old.get("samples_per_shard") != samples_per_shard or old.get("prefix") != prefix):
        old = None  # chunked differently: no earlier shard can be reused, all are rewritten
    old_entries = {
        int(_SHARD_NAME.match(e["name"])["num"]): e
        for e in (old or {}).get("shards", [])
        if _SHARD_NAME.match(e["name"])
    }
    entries: dict[int, dict] = dict(old_entries)
    seen: set[str] = set()
    it = iter(records)
    end = object()
    shard_no = 0
    while True:
        first = next(it, end)
        if first is end:
            break
        name = f"{prefix}-{shard_no:06d}.tar"
        path = out / name
        entry = old_entries.get(shard_no)
        if (
            entry is not None
            and entry["count"] == samples_per_shard
            and _existing_shard_ok(path, entry, verify_existing)
        ):
            _consume_and_check(first, it, samples_per_shard, seen, entry, path)
            report.skipped.append(name)
        else:
            entries[shard_no] = _write_shard(first, it, samples_per_shard, seen, path)
            report.written.append(name)
            _write_index(index_path, prefix, samples_per_shard, entries, complete=False)
        report.shards.append(name)
        shard_no += 1

    # Anything numbered past the end belongs to an earlier, longer run of this prefix: remove it, so a
    # directory glob never picks up stale samples.
    for i in [i for i in entries if i >= shard_no]:
        del entries[i]
    for p in sorted(out.glob(f"{_glob_escape(prefix)}-*.tar")):
        m = _SHARD_NAME.match(p.name)
        if m and m["prefix"] == prefix and int(m["num"]) >= shard_no:
            p.unlink()
            report.removed.append(p.name)
    _write_index(index_path, prefix, samples_per_shard, entries, complete=True)
    _fsync_dir(out)
    report.num_samples = sum(e["count"] for e in entries.values())
    return report


def _glob_escape(text: str) -> str:
    # Shard prefixes are literal text, not patterns.
    return re.sub(r"([*?\[\]])", r"[\1]", text)


def _existing_shard_ok(path: Path, entry: Mapping[str, Any], verify: bool) -> bool:
    if not path.is_file() or path.stat().st_size != entry.get("bytes"):
        return False
    if verify:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest() == entry.get("sha256")
    return True


def _take(first: ShardRecord, it: Iterator[ShardRecord], n: int) -> Iterator[ShardRecord]:
    yield first
    for _ in range(n - 1):
        try:
            yield next(it)
        except StopIteration:
            return


def _check_new_key(key: str, seen: set[str]) -> None:
    validate_key(key)
    if key in seen:
        raise ShardWriteError(f"duplicate sample key {key!r}; keys must be unique across the whole shard set")
    seen.add(key)


def _consume_and_check(
    first: ShardRecord, it: Iterator[ShardRecord], n: int, seen: set[str], entry: Mapping[str, Any], path: Path
) -> None:
    keys = hashlib.sha256()
    count = 0
    for rec in _take(first, it, n):
        _check_new_key(rec.key, seen)
        keys.update(rec.key.encode("utf-8") + b"\n")
        count += 1
    if count != entry["count"] or keys.hexdigest() != entry["keys_sha256"]:
        raise ShardWriteError(
            f"{path.name} exists but was written from different records (keys or count differ from the "
            f"index); the input changed since that run — pass overwrite=True to rewrite the shard set"
        )


def _write_shard(first: ShardRecord, it: Iterator[ShardRecord], n: int, seen: set[str], path: Path) -> dict:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    keys = hashlib.sha256()
    count = 0
    first_key = last_key = None
    try:
        with open(tmp, "wb") as raw:
            writer = _HashingWriter(raw)
            with tarfile.open(fileobj=writer, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for rec in _take(first, it, n):
                    _check_new_key(rec.key, seen)
                    for suffix, data in _encode_record(rec):
                        tar.addfile(_tar_info(f"{rec.key}.{suffix}", len(data)), io.BytesIO(data))
                    keys.update(rec.key.encode("utf-8") + b"\n")
                    first_key = first_key or rec.key
                    last_key = rec.key
                    count += 1
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException:
        # The record iterator or a bad record failed mid-shard: leave no partial file behind.
        tmp.unlink(missing_ok=True)
        raise
    return {
        "name": path.name,
        "count": count,
        "bytes": writer.size,
        "sha256": writer.sha256.hexdigest(),
        "keys_sha256": keys.hexdigest(),
        "first_key": first_key,
        "last_key": last_key,
    }


# --------------------------------------------------------------------------------------------------------
# Reading tar shards
# --------------------------------------------------------------------------------------------------------


def _split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/key.suffix.ext`` → (``dir/key``, ``suffix.ext``), WebDataset's rule (first dot of the basename)."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not stem or not dot or not suffix:
        return None  # no key or no suffix: not a sample member (e.g. a README in the tar)
    return (f"{folder}/{stem}" if folder else stem), suffix


def _walk_samples(
    path: Path, start: int = 0, stop: int | None = None
) -> Iterator[tuple[int, str, dict[str, tuple[int, int]]]]:
    """Yield ``(index, key, {suffix: (data_offset, size)})`` for samples ``start ≤ index < stop`` of a shard.

    Reads tar headers only: data of members is skipped by seeking, and read later by offset. Raises
    :class:`ShardReadError` if the shard holds fewer than ``stop`` samples.
    """
    index = -1
    key: str | None = None
    members: dict[str, tuple[int, int]] = {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            while True:
                info = tar.next()
                if info is None:
                    break
                # Iterating without keeping every header: official shards hold ~350k members each.
                tar.members.clear()
                if not info.isreg():
                    continue
                parts = _split_member_name(info.name)
                if parts is None:
                    continue
                k, suffix = parts
                if k != key:
                    if key is not None and index >= start:
                        yield index, key, members
                    index += 1
                    if stop is not None and index >= stop:
                        return
                    key, members = k, {}
                if suffix in members:
                    raise ShardReadError(f"{path}: sample {key!r} has two members named {suffix!r}")
                if index >= start:
                    members[suffix] = (info.offset_data, info.size)
    except tarfile.TarError as exc:
        raise ShardReadError(f"cannot read shard {path}: {exc}") from exc
    if key is not None and index >= start:
        yield index, key, members
    if stop is not None and index + 1 < stop:
        raise ShardReadError(
            f"{path} holds {index + 1} samples but {stop} were expected (shard changed after it was indexed?)"
        )


def shard_sample_count(path: str | os.PathLike[str]) -> int:
    """Number of samples in a shard, by reading its tar headers (fast: member data is skipped)."""
    return sum(1 for _ in _walk_samples(Path(path)))


def iter_shard(path: str | os.PathLike[str]) -> Iterator[MemberDict]:
    """Yield every sample of one shard as ``{"__key__": key, "__shard__": path, suffix: bytes, …}`` in order."""
    path = Path(path)
    with open(path, "rb") as f:
        for _, key, members in _walk_samples(path):
            out: MemberDict = {"__key__": key, "__shard__": str(path)}
            for suffix, (offset, size) in members.items():
                f.seek(offset)
                out[suffix] = f.read(size)
            yield out


def _index_counts(paths: Sequence[Path]) -> list[int | None]:
    """Sample counts from our ``<prefix>-index.json`` files where they list the shard at its current size."""
    cache: dict[tuple[Path, str], dict[str, Mapping] | None] = {}
    counts: list[int | None] = []
    for p in paths:
        m = _SHARD_NAME.match(p.name)
        count = None
        if m:
            slot = (p.parent, m["prefix"])
            if slot not in cache:
                try:
                    index = read_index(p.parent, m["prefix"])
                except (OSError, ValueError):
                    index = None
                cache[slot] = {e["name"]: e for e in index["shards"]} if index else None
            entry = (cache[slot] or {}).get(p.name)
            if entry is not None and p.is_file() and p.stat().st_size == entry.get("bytes"):
                count = int(entry["count"])
        counts.append(count)
    return counts


class _OpenFiles:
    """A few open shard files for reading members by offset (the shuffle buffer holds references only)."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.files: OrderedDict[str, BinaryIO] = OrderedDict()

    def read(self, path: str, offset: int, size: int) -> bytes:
        f = self.files.pop(path, None)
        if f is None:
            while len(self.files) >= self.limit:
                self.files.popitem(last=False)[1].close()
            f = open(path, "rb")  # noqa: SIM115 — kept open across calls, closed by close()
        self.files[path] = f
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise ShardReadError(f"{path}: member at byte {offset} is truncated ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        while self.files:
            self.files.popitem()[1].close()


# --------------------------------------------------------------------------------------------------------
# Rank / worker assignment
# --------------------------------------------------------------------------------------------------------


def _split(total: int, parts: int, i: int) -> tuple[int, int]:
    """Contiguous near-equal split of ``range(total)`` into ``parts``; the first ``total % parts`` get one more."""
    base, rem = divmod(total, parts)
    start = i * base + min(i, rem)
    return start, start + base + (1 if i < rem else 0)


def slot_range(
    num_samples: int, world_size: int, rank: int, num_workers: int, worker_id: int, even: Even = "pad"
) -> tuple[int, int]:
    """Positions ``[start, stop)`` of the epoch's global sample order read by one (rank, worker) slot.

    Ranks get contiguous blocks, then each rank's block is split among its workers the same way. With
    ``even=None`` rank blocks differ by at most one sample and cover every sample exactly once. With
    ``"pad"`` every rank gets ``ceil(N / world)`` positions and positions ≥ N wrap to the start (at most
    ``world - 1`` samples repeated); with ``"drop"`` every rank gets ``floor(N / world)`` and the last
    ``N mod world`` samples of the (reshuffled each epoch) order are left out. Equal rank counts give equal
    per-worker counts, hence the same number of DataLoader batches on every rank.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if not 0 <= worker_id < num_workers:
        raise ValueError(f"worker_id {worker_id} out of range for num_workers {num_workers}")
    if even is None:
        a, b = _split(num_samples, world_size, rank)
    elif even == "pad":
        per = math.ceil(num_samples / world_size)
        a, b = rank * per, (rank + 1) * per
    elif even == "drop":
        per = num_samples // world_size
        a, b = rank * per, (rank + 1) * per
    else:
        raise ValueError(f"even must be 'pad', 'drop' or None, got {even!r}")
    s, e = _split(b - a, num_workers, worker_id)
    return a + s, a + e


@dataclass(frozen=True)
class _Ref:
    """A sample located in a shard, read only when it leaves the shuffle buffer."""

    shard: str
    key: str
    members: dict[str, tuple[int, int]]
    wrap: int  # how many times the padded order wrapped before this position (0 for a first occurrence)


@dataclass(frozen=True)
class ShardError:
    """One sample (or shard part) left out under ``on_error="skip"``, or a top-up, with where and why."""

    shard: str
    key: str | None
    reason: str
    epoch: int
    rank: int
    worker: int
    kind: Literal["error", "filtered", "fill"] = "error"

    def to_json(self) -> str:
        """One JSON line for the error log."""
        return json.dumps(asdict(self), sort_keys=True, ensure_ascii=False)


def _error_log_path(error_log: Path, rank: int, worker: int) -> Path:
    return error_log.with_name(f"{error_log.stem}.rank{rank}.worker{worker}{error_log.suffix or '.jsonl'}")


def read_error_logs(error_log: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Gather the JSON lines that every (rank, worker) appended for ``error_log`` (one file per slot)."""
    base = Path(error_log)
    out: list[dict[str, Any]] = []
    pattern = f"{_glob_escape(base.stem)}.rank*.worker*{base.suffix or '.jsonl'}"
    for p in sorted(base.parent.glob(pattern)):
        with open(p, encoding="utf-8") as f:
            out.extend(json.loads(line) for line in f if line.strip())
    return out


def _buffered_shuffle(items: Iterator[_Ref], size: int, rng: random.Random) -> Iterator[_Ref]:
    buf: list[_Ref] = []
    for item in items:
        buf.append(item)
        if len(buf) >= size:
            j = rng.randrange(len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def _resolve_shards(shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], prefix: str) -> list[Path]:
    if isinstance(shards, str | os.PathLike):
        root = Path(shards)
        if root.is_dir():
            # Sorted by name: the pre-shuffle order, and so the epoch order, must not depend on the filesystem.
            paths = sorted(p for p in root.glob("*.tar") if p.name.startswith(prefix) and p.is_file())
            if not paths:
                raise FileNotFoundError(f"no shards {prefix}*.tar in {root}")
            return paths
        return [root]
    paths = [Path(p) for p in shards]
    if not paths:
        raise ValueError("no shard paths given")
    return paths


class ShardDataset(IterableDataset):
    """Tar shards as an iterable dataset of :class:`Sample`, exact under DDP with any number of workers.

    Order: for each ``(seed, epoch)`` the shard list is shuffled with a seeded RNG (``shuffle=True``) and
    the samples concatenated; :func:`slot_range` gives each (rank, worker) a contiguous block of that
    order, so several slots may share one shard and no slot is starved when shards < ranks × workers.
    Each slot walks only the tar headers it needs (member data is skipped), then a shuffle buffer of
    references seeded by ``(seed, epoch, rank, worker)`` mixes its block; members are read and decoded as
    they leave the buffer. ``decode(members) -> Sample | None`` gets the member bytes by suffix plus
    ``__key__``, ``__shard__``, ``__epoch__`` and ``__generator__``, a torch.Generator seeded by
    ``(seed, epoch, key)``, so augmentations do not depend on the world size or worker count.

    ``even`` (default ``"pad"``) makes every rank yield the same number of samples (see
    :func:`slot_range`); ``None`` yields each sample exactly once but rank counts may differ by one, which
    can hang DDP training; for evaluation pass ``even=None`` (or de-duplicate gathered results by key,
    as pad repeats up to ``world - 1`` samples).

    Decode errors: ``on_error="raise"`` raises :class:`ShardDecodeError`; ``"skip"`` records a
    :class:`ShardError` in ``errors``, counts it, logs a warning and, with ``error_log``, appends a JSON
    line to ``<stem>.rank<r>.worker<w><suffix>`` (one file per slot; see :func:`read_error_logs`). A
    ``None`` from ``decode`` is recorded the same way (kind ``"filtered"``). With ``even`` set, a slot that
    lost samples tops up with repeats of its last good sample (kind ``"fill"``) so rank counts stay equal.
    :class:`PickleNotAllowedError` always propagates (a configuration error, not a bad sample).

    Call :meth:`set_epoch` before each epoch. DataLoader workers get a copy of the dataset when iteration
    starts, so use ``persistent_workers=False`` (or recreate the loader) for the new epoch to reach them.
    Rank and world size default to ``torch.distributed`` when initialised (also resolved when the dataset
    is pickled to spawned workers), else 0 and 1.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        decode: Callable[[MemberDict], Sample | None],
        *,
        prefix: str = "",
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
        even: Even = "pad",
        on_error: OnError = "raise",
        error_log: str | os.PathLike[str] | None = None,
        counts: Sequence[int] | None = None,
        max_open_files: int = 8,
    ) -> None:
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if even not in ("pad", "drop", None):
            raise ValueError(f"even must be 'pad', 'drop' or None, got {even!r}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be ≥ 1, got {shuffle_buffer}")
        self.paths = _resolve_shards(shards, prefix)
        self.decode = decode
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.shuffle_buffer = int(shuffle_buffer)
        self.rank = rank
        self.world_size = world_size
        self.even = even
        self.on_error = on_error
        self.error_log = Path(error_log) if error_log is not None else None
        self.max_open_files = max_open_files
        self.errors: list[ShardError] = []
        self.num_errors = 0
        self.num_filled = 0
        if counts is not None:
            if len(counts) != len(self.paths):
                raise ValueError(f"{len(counts)} counts for {len(self.paths)} shards")
            self.counts = [int(c) for c in counts]
        else:
            # Our index when it describes the file as it is now, else one header scan (done once, here).
            self.counts = [
                c if c is not None else self._scan_count(p)
                for p, c in zip(self.paths, _index_counts(self.paths), strict=True)
            ]
        self.num_samples = sum(self.counts)
        if rank is not None or world_size is not None:
            self._dist()  # validate early

    def _scan_count(self, path: Path) -> int:
        """Samples of a shard by a header scan. Under ``skip`` a damaged shard (e.g. a copy cut short) keeps the
        samples before the damage, which are complete (each is known only once the next one's header is read),
        and the damage is recorded once (by rank 0), instead of stopping the whole run."""
        count = 0
        try:
            for _ in _walk_samples(path):
                count += 1
        except ShardReadError as exc:
            if self.on_error == "raise":
                raise
            rank, _ = self._dist()
            if rank == 0:
                reason = f"{exc}; the {count} sample(s) before the damage are used"
                self._record(ShardError(str(path), None, reason, self.epoch, rank, 0))
        return count

    # --- distribution ---------------------------------------------------------------------------------
    def _dist(self) -> tuple[int, int]:
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
            d_rank, d_world = (
                (torch.distributed.get_rank(), torch.distributed.get_world_size()) if initialised else (0, 1)
            )
            rank = d_rank if rank is None else rank
            world = d_world if world is None else world
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} out of range for world_size {world}")
        return rank, world

    def __getstate__(self) -> dict[str, Any]:
        # Pickled for spawned workers in the main process, where torch.distributed is initialised; the
        # workers are not, so bake rank and world size in now.
        state = self.__dict__.copy()
        state["rank"], state["world_size"] = self._dist()
        return state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: it seeds the shard order, the shuffle buffers and the per-sample generators."""
        self.epoch = int(epoch)

    def samples_per_rank(self, epoch: int | None = None, rank: int | None = None) -> int:
        """Samples this rank (or ``rank``) yields per epoch, top-ups included; the same for every epoch."""
        del epoch  # counts depend only on N, the world size and ``even``; kept for a stable signature
        own_rank, world = self._dist()
        start, stop = slot_range(self.num_samples, world, own_rank if rank is None else rank, 1, 0, self.even)
        return stop - start

    def __len__(self) -> int:
        return self.samples_per_rank()

    def num_batches(self, batch_size: int, num_workers: int = 0, drop_last: bool = False) -> int:
        """DataLoader batches this rank produces per epoch (workers batch separately, so partial ones add up)."""
        rank, world = self._dist()
        total = 0
        for w in range(max(1, num_workers)):
            a, b = slot_range(self.num_samples, world, rank, max(1, num_workers), w, self.even)
            total += (b - a) // batch_size if drop_last else math.ceil((b - a) / batch_size)
        return total

    def shard_order(self, epoch: int | None = None) -> list[int]:
        """Indices into ``paths`` in the epoch's order (shuffled with a seeded RNG when ``shuffle``)."""
        order = list(range(len(self.paths)))
        if self.shuffle:
            random.Random(_derive_seed(self.seed, "shards", self.epoch if epoch is None else epoch)).shuffle(order)
        return order

    # --- iteration ------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.iter_worker(worker_id, num_workers)

    def _segments(self, epoch: int, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """Cover positions [start, stop) as ``(shard, first, end, wrap)`` pieces of the epoch's order."""
        n = self.num_samples
        order = [i for i in self.shard_order(epoch) if self.counts[i] > 0]
        starts = np.cumsum([0] + [self.counts[i] for i in order[:-1]]).tolist()
        out = []
        p = start
        while p < stop:
            wrap, q = divmod(p, n)
            j = bisect_right(starts, q) - 1
            shard = order[j]
            local = q - starts[j]
            take = min(self.counts[shard] - local, stop - p)
            out.append((shard, local, local + take, wrap))
            p += take
        return out

    def _record(self, err: ShardError, filled: int = 0) -> None:
        self.errors.append(err)
        self.num_filled += filled
        self.num_errors += err.kind != "fill"
        # A damaged shard set would flood the console: the first few are logged, then one notice. The
        # complete record is `errors`, the JSON-lines error log and the training run's end summary.
        n = len(self.errors)
        if n <= WARN_FIRST_PROBLEMS:
            log.warning("shard sample %s: %s %s (%s)", err.kind, err.shard, err.key, err.reason)
        elif n == WARN_FIRST_PROBLEMS + 1:
            where = f"the error log {self.error_log}" if self.error_log is not None else "ShardDataset.errors"
            log.warning("more shard sample problems in this worker: no longer logged one by one; see %s", where)
        if self.error_log is not None:
            path = _error_log_path(self.error_log, err.rank, err.worker)
            path.parent.mkdir(parents=True, exist_ok=True)
            # One small O_APPEND write per line, flushed at once: survives a crash of the worker later on.
            with open(path, "a", encoding="utf-8") as f:
                f.write(err.to_json() + "\n")

    def _refs(self, segments: list[tuple[int, int, int, int]], rank: int, worker: int, epoch: int) -> Iterator[_Ref]:
        for shard, first, end, wrap in segments:
            path = self.paths[shard]
            try:
                for _, key, members in _walk_samples(path, first, end):
                    yield _Ref(str(path), key, members, wrap)
            except (ShardReadError, OSError) as exc:
                if self.on_error == "raise":
                    raise
                self._record(ShardError(str(path), None, f"{type(exc).__name__}: {exc}", epoch, rank, worker))

    def iter_worker(self, worker_id: int = 0, num_workers: int = 1) -> Iterator[Sample]:
        """Samples of one (this rank, ``worker_id``) slot; ``__iter__`` calls it with the DataLoader's worker."""
        rank, world = self._dist()
        epoch = self.epoch
        start, stop = slot_range(self.num_samples, world, rank, num_workers, worker_id, self.even)
        if stop <= start:
            return
        refs: Iterator[_Ref] = self._refs(self._segments(epoch, start, stop), rank, worker_id, epoch)
        if self.shuffle:
            rng = random.Random(_derive_seed(self.seed, "buffer", epoch, rank, worker_id))
            refs = _buffered_shuffle(refs, self.shuffle_buffer, rng)
        files = _OpenFiles(self.max_open_files)
        yielded = 0
        last_good: Sample | None = None
        try:
            for ref in refs:
                members: MemberDict = {
                    "__key__": ref.key,
                    "__shard__": ref.shard,
                    "__epoch__": epoch,
                    "__generator__": torch.Generator().manual_seed(
                        _derive_seed(self.seed, "sample", epoch, ref.key, ref.wrap)
                    ),
                }
                try:
                    for suffix, (offset, size) in ref.members.items():
                        members[suffix] = files.read(ref.shard, offset, size)
                    sample = self.decode(members)
                except PickleNotAllowedError:
                    raise  # a configuration error, not a bad sample: skipping would drop every sample
                except Exception as exc:  # any per-sample failure is either raised or recorded, never lost
                    if self.on_error == "raise":
                        raise ShardDecodeError(f"cannot decode sample {ref.key!r} of {ref.shard}: {exc}") from exc
                    self._record(ShardError(ref.shard, ref.key, f"{type(exc).__name__}: {exc}", epoch, rank, worker_id))
                    continue
                if sample is None:
                    self._record(
                        ShardError(ref.shard, ref.key, "decode returned None", epoch, rank, worker_id, "filtered")
                    )
                    continue
                yielded += 1
                last_good = sample
                yield sample
        finally:
            files.close()
        missing = (stop - start) - yielded
        if missing > 0 and self.even is not None:
            if last_good is None:
                reason = f"every sample of this slot failed: it yields {missing} fewer than the other ranks"
                self._record(ShardError("", None, reason, epoch, rank, worker_id, "fill"))
                return
            # Keep every rank's count equal (a DDP collective would otherwise wait forever).
            reason = f"{missing} repeat(s) of the last good sample replace lost ones"
            self._record(ShardError("", last_good.key, reason, epoch, rank, worker_id, "fill"), filled=missing)
            for _ in range(missing):
                yield last_good


# --------------------------------------------------------------------------------------------------------
# Decoding: images, audio, metadata
# --------------------------------------------------------------------------------------------------------


def _decode_image(data: bytes, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return pil_to_rgb(img, name)  # forces the full decode: truncation fails here
    except ImageryError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageryError(f"cannot decode image {name}: {exc}") from exc


def decode_audio_bytes(data: bytes, target_sr: int = 48_000, *, name: str = "audio") -> np.ndarray:
    """Decode encoded audio bytes (FLAC/OGG/WAV/MP3) to float32 mono at ``target_sr`` (soundfile + soxr).

    In-memory twin of :func:`psm.data.audio.load_audio` (same mono mean, soxr HQ, checks) for tar members.
    """
    import soundfile as sf
    import soxr

    from psm.data.audio import AudioDecodeError

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, declared = int(f.samplerate), int(f.frames)
            audio = f.read(dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise AudioDecodeError(f"cannot decode {name}: {type(exc).__name__}: {exc}") from exc
    if audio.shape[0] == 0:
        raise AudioDecodeError(f"cannot decode {name}: no audio samples")
    if declared > 0 and audio.shape[0] < declared:
        raise AudioDecodeError(f"cannot decode {name}: truncated, read {audio.shape[0]} of {declared} frames")
    if not np.isfinite(audio).all():
        raise AudioDecodeError(f"cannot decode {name}: non-finite samples")
    mono = audio.mean(axis=1, dtype=np.float32) if audio.shape[1] > 1 else audio[:, 0]
    if sr != target_sr:
        mono = soxr.resample(mono, sr, target_sr, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _float_or_none(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _int_or_none(value: object) -> int | None:
    v = _float_or_none(value)
    return int(v) if v is not None else None


def _find_member(members: Mapping[str, Any], stem: str, extensions: Sequence[str]) -> str | None:
    for ext in extensions:
        if f"{stem}.{ext}" in members:
            return f"{stem}.{ext}"
    return None


def _metadata_from_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Our meta.json → ``Sample.metadata`` (RAW_METADATA_FIELDS); month/hour from ``date`` if not given."""
    out: dict[str, Any] = {name: None for name in RAW_METADATA_FIELDS}
    out["latitude"] = _float_or_none(meta.get("latitude"))
    out["longitude"] = _float_or_none(meta.get("longitude"))
    if out["latitude"] is None or out["longitude"] is None:
        out["latitude"] = out["longitude"] = None  # the location token needs both
    out["audio_source"] = meta.get("audio_source")
    out["caption_source"] = meta.get("caption_source")
    if "month" in meta or "hour" in meta:
        out["month"], out["hour"] = _int_or_none(meta.get("month")), _int_or_none(meta.get("hour"))
    elif meta.get("date") is not None:
        parsed = parse_date(meta["date"])
        out["month"], out["hour"] = parsed.month, parsed.hour
        if out["audio_source"] == "freesound":
            out["hour"] = None  # Freesound dates carry no time of day (official rule)
    return out


ImageView = Callable[..., tuple[Tensor, int]]


@dataclass
class ShardDecoder:
    """Default decoder of our layout → :class:`Sample`: image via a :class:`SatelliteView`, audio, metadata.

    ``view(image_hwc_uint8, generator)`` returns ``(image, zoom)``: a ``SatelliteView`` of the imagery
    source (train → random zoom and augmentation, eval → fixed zoom) or any callable like it. Audio: the
    ``features.npy`` member (``prefer="features"``, the default) or the decoded waveform at ``target_sr``;
    features without an ``is_longer`` member get ``is_longer=True``, as the official training forced it.
    """

    view: ImageView
    target_sr: int = 48_000
    prefer: Literal["features", "waveform"] = "features"
    feature_shape: tuple[int, ...] | None = CLAP_FEATURE_SHAPE

    @classmethod
    def for_source(
        cls, source: ImagerySource | str, *, train: bool, zoom: int | None = None, input_size: int = 224, **kwargs: Any
    ) -> ShardDecoder:
        """Decoder whose images go through ``SatelliteView(source, train, zoom, input_size)``."""
        return cls(view=SatelliteView(source, train=train, zoom=zoom, input_size=input_size), **kwargs)

    def __call__(self, members: MemberDict) -> Sample:
        """Decode one sample's members (see :data:`MemberDict`)."""
        key = members["__key__"]
        gen = members.get("__generator__")
        meta = json.loads(members["meta.json"]) if "meta.json" in members else {}
        image_name = _find_member(members, "image", IMAGE_EXTENSIONS)
        if image_name is None:
            raise ImageryError(f"sample {key!r} has no image member")
        image, zoom = self.view(_decode_image(members[image_name], f"{key}.{image_name}"), gen)

        features = waveform = None
        audio_name = _find_member(members, "audio", AUDIO_EXTENSIONS)
        use_features = "features.npy" in members and (self.prefer == "features" or audio_name is None)
        if use_features:
            arr = np.load(io.BytesIO(members["features.npy"]), allow_pickle=False)
            features = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
            if self.feature_shape is not None and tuple(features.shape) != tuple(self.feature_shape):
                raise ValueError(
                    f"sample {key!r}: features of shape {tuple(features.shape)}, expected {tuple(self.feature_shape)}"
                )
        elif audio_name is not None:
            waveform = torch.from_numpy(
                decode_audio_bytes(members[audio_name], self.target_sr, name=f"{key}.{audio_name}")
            )
        else:
            raise ValueError(f"sample {key!r} has no audio member")
        is_longer = json.loads(members["is_longer.json"]) if "is_longer.json" in members else None
        if features is not None and is_longer is None:
            is_longer = True
        caption = meta.get("caption")
        return Sample(
            key=key,
            image=image,
            zoom=int(zoom),
            metadata=_metadata_from_meta(meta),
            caption=caption if isinstance(caption, str) else None,
            waveform=waveform,
            audio_features=features,
            is_longer=None if is_longer is None else bool(is_longer),
        )


# --------------------------------------------------------------------------------------------------------
# The authors' GeoSound / SoundingEarth shards
# --------------------------------------------------------------------------------------------------------

_PICKLE_HELP = (
    "The official GeoSound/SoundingEarth shards store their audio features as pickles (audio_mel1..5.pyd). "
    "Unpickling can run arbitrary code embedded in the file, and even torch.load(weights_only=True) is an "
    "unpickler (a restricted one), so psm reads .pyd members only when you opt in: pass allow_pickle=True "
    "(official_sample_decoder(..., allow_pickle=True) or OfficialShardDataset(..., allow_pickle=True)) for "
    "shards from a source you trust, or repack them once with pack_records (features as .npy)."
)
_SOUNDINGEARTH_CAPTION_CUT = "The location of the sound is"
OFFICIAL_MELS: tuple[str, ...] = tuple(f"audio_mel{i}.pyd" for i in range(1, 6))
CLAP_MAX_SECONDS = 10.0  # CLAP's max_length_s: longer clips are "longer" (fusion of global + 3 chunks)


def _load_pickled_tensor(data: bytes, name: str, allow_pickle: bool) -> Tensor:
    """A tensor from a ``.pyd`` member: torch.load with weights_only=True first, then pickle.loads (opted in only)."""
    if not allow_pickle:
        raise PickleNotAllowedError(f"{name}: {_PICKLE_HELP}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about the pickle protocol before failing
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:
        # WebDataset's .pyd encoder is plain pickle.dumps, which weights_only cannot read; the caller
        # has opted in with allow_pickle=True, i.e. trusts these files.
        obj = pickle.loads(data)
    if isinstance(obj, np.ndarray):
        obj = torch.from_numpy(obj)
    if not isinstance(obj, Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(obj).__name__}")
    if obj.ndim == 4 and obj.shape[0] == 1:
        obj = obj[0]  # the processor's [1, 4, 1001, 64]
    return obj.detach().to(torch.float32).contiguous()


@dataclass
class OfficialDecoder:
    """Decoder of the authors' shards (``meta.json``, ``image.jpg``, ``audio_mel1..5.pyd``) → :class:`Sample`.

    ``dataset``: ``"GeoSound"``, ``"SoundingEarth"`` or ``"auto"`` (SoundingEarth when meta.json has
    ``date_recorded``/``long_key``). Keys: SoundingEarth keys get the official ``aporee-`` prefix; audio
    source = key prefix before "-" (GeoSound) or ``aporee``. Caption: GeoSound ``meta["text"]``,
    SoundingEarth ``meta["caption"]`` cut before "The location of the sound is" + "."; caption source
    ``meta``. Mel: one of the five drawn from the sample generator when ``train``, ``mel_index`` otherwise
    (the official evaluation wanted this but never wired it). ``official_is_longer=True`` forces
    ``is_longer=True`` like the official training; ``False`` uses SoundingEarth's ``mp3seconds`` > 10 s
    when present and ``True`` when the duration is unknown (GeoSound meta has no duration).
    """

    view: ImageView
    dataset: Literal["auto", "GeoSound", "SoundingEarth"] = "auto"
    train: bool = False
    mel_index: int = 0
    allow_pickle: bool = False
    official_is_longer: bool = True

    def __post_init__(self) -> None:
        if self.dataset not in ("auto", "GeoSound", "SoundingEarth"):
            raise ValueError(f"dataset must be 'auto', 'GeoSound' or 'SoundingEarth', got {self.dataset!r}")
        if not 0 <= self.mel_index < len(OFFICIAL_MELS):
            raise ValueError(f"mel_index must be 0..{len(OFFICIAL_MELS) - 1}, got {self.mel_index}")

    def __call__(self, members: MemberDict) -> Sample:
        """Decode one official sample; raises :class:`PickleNotAllowedError` unless ``allow_pickle``."""
        if not self.allow_pickle:
            raise PickleNotAllowedError(_PICKLE_HELP)
        raw_key = members["__key__"]
        gen = members.get("__generator__")
        meta = json.loads(members["meta.json"])
        dataset = self.dataset
        if dataset == "auto":
            dataset = "SoundingEarth" if ("date_recorded" in meta or "long_key" in meta) else "GeoSound"
        if dataset == "SoundingEarth":
            key, source, date = f"aporee-{raw_key}", "aporee", meta.get("date_recorded")
            text = meta.get("caption")
            caption = text.split(_SOUNDINGEARTH_CAPTION_CUT)[0] + "." if isinstance(text, str) else None
        else:
            key, source, date = raw_key, raw_key.split("-")[0], meta.get("date")
            caption = meta.get("text") if isinstance(meta.get("text"), str) else None

        image_name = _find_member(members, "image", IMAGE_EXTENSIONS)
        if image_name is None:
            raise ImageryError(f"sample {raw_key!r} has no image member")
        image, zoom = self.view(_decode_image(members[image_name], f"{raw_key}.{image_name}"), gen)

        index = int(torch.randint(len(OFFICIAL_MELS), (1,), generator=gen).item()) if self.train else self.mel_index
        mel_name = OFFICIAL_MELS[index]
        if mel_name not in members:
            raise ValueError(f"sample {raw_key!r} has no {mel_name} member")
        features = _load_pickled_tensor(members[mel_name], f"{raw_key}.{mel_name}", self.allow_pickle)

        parsed = parse_date(date)
        lat, lon = _float_or_none(meta.get("latitude")), _float_or_none(meta.get("longitude"))
        if lat is None or lon is None:
            lat = lon = None
        metadata = {
            "latitude": lat,
            "longitude": lon,
            "month": parsed.month,
            # Official: Freesound dates have no time of day, so their hour is never valid.
            "hour": None if source == "freesound" else parsed.hour,
            "audio_source": source,
            "caption_source": "meta",
        }
        if self.official_is_longer:
            is_longer = True
        else:
            seconds = _float_or_none(meta.get("mp3seconds"))
            is_longer = True if seconds is None else seconds > CLAP_MAX_SECONDS
        return Sample(
            key=key,
            image=image,
            zoom=int(zoom),
            metadata=metadata,
            caption=caption,
            audio_features=features,
            is_longer=is_longer,
        )


def official_sample_decoder(
    view: ImageView,
    *,
    dataset: Literal["auto", "GeoSound", "SoundingEarth"] = "auto",
    train: bool = False,
    mel_index: int = 0,
    allow_pickle: bool = False,
    official_is_longer: bool = True,
) -> OfficialDecoder:
    """Decoder for the authors' shards; refuses (:class:`PickleNotAllowedError`) unless ``allow_pickle=True``.

    The gate is here, before any shard is opened, because every official sample's audio is a pickle.
    """
    if not allow_pickle:
        raise PickleNotAllowedError(_PICKLE_HELP)
    return OfficialDecoder(
        view=view,
        dataset=dataset,
        train=train,
        mel_index=mel_index,
        allow_pickle=allow_pickle,
        official_is_longer=official_is_longer,
    )


class OfficialShardDataset(ShardDataset):
    """:class:`ShardDataset` over the authors' GeoSound/SoundingEarth shards with :class:`OfficialDecoder`.

    Without ``allow_pickle=True`` construction raises :class:`PickleNotAllowedError` (see there for why).
    ``shuffle`` defaults to ``train``; other keyword arguments go to :class:`ShardDataset`.
    """

    def __init__(
        self,
        shards: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        view: ImageView,
        *,
        dataset: Literal["auto", "GeoSound", "SoundingEarth"] = "auto",
        train: bool = False,
        mel_index: int = 0,
        allow_pickle: bool = False,
        official_is_longer: bool = True,
        **kwargs: Any,
    ) -> None:
        decode = official_sample_decoder(
            view,
            dataset=dataset,
            train=train,
            mel_index=mel_index,
            allow_pickle=allow_pickle,
            official_is_longer=official_is_longer,
        )
        kwargs.setdefault("shuffle", train)
        super().__init__(shards, decode, **kwargs)

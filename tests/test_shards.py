"""Tests of psm.data.shards: deterministic resumable packing, exact DDP/worker reading, official shards."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch
from PIL import Image
from torch.utils.data import DataLoader

from psm.data.batch import Sample
from psm.data.imagery import ImageryError, SatelliteView
from psm.data.imagery_sources import ImagerySource
from psm.data.shards import (
    OfficialDecoder,
    OfficialShardDataset,
    PickleNotAllowedError,
    ShardDataset,
    ShardDecodeError,
    ShardDecoder,
    ShardReadError,
    ShardRecord,
    ShardWriteError,
    iter_shard,
    official_sample_decoder,
    pack_records,
    read_error_logs,
    read_index,
    shard_sample_count,
    slot_range,
)

# A tiny imagery source (not in the registry): 12 px tiles, so zoom 5 needs 60 px of a 64 px test image.
TINY = ImagerySource("tiny", "tiny", base_gsd_m=10.0, tile_size=12)
EVAL_VIEW = SatelliteView(TINY, train=False, zoom=1, input_size=16)
TRAIN_VIEW = SatelliteView(TINY, train=True, input_size=16)
FEATURE_SHAPE = (4, 1001, 64)


def png_bytes(i: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def clip(i: int, sr: int = 16_000, seconds: float = 0.1) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (0.3 * np.sin(2 * np.pi * (220 + 40 * i) * t)).astype(np.float32)


def audio_bytes(i: int, fmt: str = "FLAC") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, clip(i), 16_000, format=fmt, subtype="PCM_16")
    return buf.getvalue()


def features(i: int) -> np.ndarray:
    return np.full(FEATURE_SHAPE, i / 8, dtype=np.float16)


def make_record(i: int, kind: str | None = None) -> ShardRecord:
    kind = kind or ("features" if i % 2 == 0 else ("wav" if i % 3 == 0 else "flac"))
    meta = {
        "latitude": -30.0 + i,
        "longitude": 100.0 - i,
        "month": 1 + i % 12,
        "hour": i % 24,
        "audio_source": ("yfcc", "iNat", "aporee", "freesound")[i % 4],
        "caption_source": "meta",
        "caption": f"caption {i}",
        "date": "2020-01-01",
        "split": "train",
    }
    rec = ShardRecord(key=f"rec-{i:03d}", meta=meta, image=png_bytes(i), image_ext="png")
    if kind == "features":
        rec.audio_features, rec.is_longer = features(i), i % 4 == 0
    else:
        rec.audio, rec.audio_ext = audio_bytes(i, kind.upper()), kind
    return rec


def key_sample(members: dict) -> Sample:
    """Cheap decode for the order/assignment tests: only the key matters."""
    return Sample(key=members["__key__"], image=torch.zeros(1), zoom=1)


def collate_keys(samples: list[Sample]) -> list[str]:
    return [s.key for s in samples]


@pytest.fixture(scope="module")
def records() -> list[ShardRecord]:
    return [make_record(i) for i in range(7)]


@pytest.fixture(scope="module")
def packed(tmp_path_factory, records) -> Path:
    out = tmp_path_factory.mktemp("packed")
    pack_records(records, out, prefix="train", samples_per_shard=3)
    return out


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory) -> Path:
    """Two shards (5 + 4 samples) with tiny images only: shards < ranks × workers in most cases."""
    out = tmp_path_factory.mktemp("small")
    recs = [
        ShardRecord(f"s{i:02d}", {"i": i}, png_bytes(0), "png", audio_features=np.zeros(2, np.float16))
        for i in range(9)
    ]
    pack_records(recs, out, prefix="train", samples_per_shard=5)
    return out


# --------------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------------


def test_pack_and_read_back_exactly(packed, records):
    index = read_index(packed, "train")
    assert index["complete"] and index["num_samples"] == 7
    assert [(e["name"], e["count"]) for e in index["shards"]] == [
        ("train-000000.tar", 3),
        ("train-000001.tar", 3),
        ("train-000002.tar", 1),
    ]
    shards = sorted(packed.glob("train-*.tar"))
    assert [shard_sample_count(p) for p in shards] == [3, 3, 1]

    raw = [m for p in shards for m in iter_shard(p)]
    assert [m["__key__"] for m in raw] == [r.key for r in records]
    for m, r in zip(raw, records, strict=True):
        assert json.loads(m["meta.json"]) == r.meta
        assert m["image.png"] == r.image
        if r.audio_features is not None:
            np.testing.assert_array_equal(np.load(io.BytesIO(m["features.npy"])), r.audio_features)
            assert json.loads(m["is_longer.json"]) == r.is_longer
        else:
            assert m[f"audio.{r.audio_ext}"] == r.audio

    ds = ShardDataset(packed, ShardDecoder(EVAL_VIEW), prefix="train", even=None)
    samples = list(ds)
    assert [s.key for s in samples] == [r.key for r in records]
    for s, r in zip(samples, records, strict=True):
        assert s.image.shape == (3, 16, 16) and s.zoom == 1
        assert s.caption == r.meta["caption"]
        assert {k: s.metadata[k] for k in ("latitude", "longitude", "month", "hour", "audio_source")} == {
            k: r.meta[k] for k in ("latitude", "longitude", "month", "hour", "audio_source")
        }
        if r.audio_features is not None:
            assert torch.equal(s.audio_features, torch.from_numpy(r.audio_features.astype(np.float32)))
            assert s.is_longer == r.is_longer and s.waveform is None
        else:
            i = int(r.key.split("-")[1])
            expected = soxr.resample(clip(i), 16_000, 48_000, quality="HQ")
            assert s.waveform.shape == expected.shape and s.audio_features is None
            np.testing.assert_allclose(s.waveform.numpy(), expected, atol=2e-3)  # 16-bit PCM quantisation


def test_pack_is_byte_identical(tmp_path, records):
    a, b = tmp_path / "a", tmp_path / "b"
    pack_records(records, a, samples_per_shard=3)
    pack_records(iter(records), b, samples_per_shard=3)
    names = sorted(p.name for p in a.iterdir())
    assert (
        names
        == sorted(p.name for p in b.iterdir())
        == ["train-000000.tar", "train-000001.tar", "train-000002.tar", "train-index.json"]
    )
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes()
    with tarfile.open(a / "train-000000.tar") as tar:
        infos = tar.getmembers()
    assert {(i.mtime, i.uid, i.gid, i.mode, i.uname) for i in infos} == {(0, 0, 0, 0o644, "")}
    assert [i.name for i in infos[:4]] == [
        "rec-000.features.npy",
        "rec-000.image.png",
        "rec-000.is_longer.json",
        "rec-000.meta.json",
    ]


def _failing(records, fail_at: int):
    for i, rec in enumerate(records):
        if i == fail_at:
            raise RuntimeError("simulated kill")
        yield rec


def test_resume_after_kill_writes_only_missing_shards(tmp_path):
    recs = [make_record(i, "features") for i in range(8)]
    ref, out = tmp_path / "ref", tmp_path / "out"
    pack_records(recs, ref, samples_per_shard=2)

    with pytest.raises(RuntimeError, match="simulated kill"):
        pack_records(_failing(recs, 5), out, samples_per_shard=2)  # dies while writing shard 2
    assert sorted(p.name for p in out.iterdir()) == ["train-000000.tar", "train-000001.tar", "train-index.json"]
    index = read_index(out)
    assert not index["complete"] and [e["count"] for e in index["shards"]] == [2, 2]
    for p in out.glob("*.tar"):
        os.utime(p, ns=(10**15, 10**15))  # mark: a rewrite would change it
    (out / "train-000002.tar.tmp-99999").write_bytes(b"left by a SIGKILLed run")  # no cleanup ran there
    (out / "train-extra-000000.tar.tmp-99999").write_bytes(b"another prefix: not ours")

    report = pack_records(recs, out, samples_per_shard=2)
    assert report.skipped == ["train-000000.tar", "train-000001.tar"]
    assert report.written == ["train-000002.tar", "train-000003.tar"]
    assert report.num_samples == 8
    for name in report.skipped:
        assert (out / name).stat().st_mtime_ns == 10**15
    (out / "train-extra-000000.tar.tmp-99999").unlink()  # untouched, as it should be
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for p in ref.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name

    again = pack_records(recs, out, samples_per_shard=2)  # a complete set: nothing to write
    assert again.written == [] and len(again.skipped) == 4


def test_resume_refuses_changed_input_and_removes_stale_shards(tmp_path):
    recs = [make_record(i, "features") for i in range(8)]
    pack_records(recs, tmp_path, samples_per_shard=2)
    changed = [make_record(i + 100, "features") for i in range(8)]
    with pytest.raises(ShardWriteError, match="overwrite=True"):
        pack_records(changed, tmp_path, samples_per_shard=2)
    report = pack_records(changed[:4], tmp_path, samples_per_shard=2, overwrite=True)
    assert report.written == ["train-000000.tar", "train-000001.tar"]
    assert report.removed == ["train-000002.tar", "train-000003.tar"]
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == report.written
    assert [m["__key__"] for p in sorted(tmp_path.glob("*.tar")) for m in iter_shard(p)] == [r.key for r in changed[:4]]


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (dict(key="a.b"), "may not contain"),
        (dict(key="a/b"), "may not contain"),
        (dict(key="rec-000"), "duplicate"),
        (dict(meta={"latitude": float("nan")}), "JSON"),
        (dict(image_ext="gif"), "image_ext"),
        (dict(audio=None, audio_features=None), "needs audio"),
    ],
)
def test_bad_records_raise_and_leave_no_temp_files(tmp_path, bad, match):
    recs = [make_record(i, "features") for i in range(3)]
    base = make_record(5, "features")
    recs.append(ShardRecord(**{**base.__dict__, **bad}))
    with pytest.raises(ShardWriteError, match=match):
        pack_records(recs, tmp_path, samples_per_shard=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["train-000000.tar", "train-index.json"]  # shard 1 (holding the bad record) never appears


# --------------------------------------------------------------------------------------------------------
# Reader: assignment, determinism
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 1, 2])
def test_every_sample_once_across_ranks_and_workers(small_shards, world, workers):
    all_keys = [f"s{i:02d}" for i in range(9)]
    n_workers = max(1, workers)
    per_rank: dict[str, dict[int, list[str]]] = {}
    for even in (None, "pad", "drop"):
        per_rank[str(even)] = {}
        for rank in range(world):
            ds = ShardDataset(
                small_shards, key_sample, shuffle=True, seed=1, shuffle_buffer=3, rank=rank, world_size=world, even=even
            )
            slots = [[s.key for s in ds.iter_worker(w, n_workers)] for w in range(n_workers)]
            assert all(slots), f"an empty slot: {slots}"  # 9 samples ≥ 6 slots, though only 2 shards
            keys = [k for slot in slots for k in slot]
            assert len(keys) == ds.samples_per_rank() == len(ds)
            assert ds.num_batches(2, workers) == sum(math.ceil(len(s) / 2) for s in slots)
            per_rank[str(even)][rank] = keys

    exact = [k for keys in per_rank["None"].values() for k in keys]
    assert sorted(exact) == all_keys  # exactly once
    assert max(map(len, per_rank["None"].values())) - min(map(len, per_rank["None"].values())) <= 1

    padded = [k for keys in per_rank["pad"].values() for k in keys]
    assert {len(v) for v in per_rank["pad"].values()} == {math.ceil(9 / world)}
    assert set(padded) == set(all_keys) and len(padded) - 9 == world * math.ceil(9 / world) - 9

    dropped = [k for keys in per_rank["drop"].values() for k in keys]
    assert {len(v) for v in per_rank["drop"].values()} == {9 // world}
    assert len(set(dropped)) == len(dropped) == 9 // world * world


def test_fewer_samples_than_slots_does_not_starve_ranks():
    for world, workers, n in [(3, 2, 2), (4, 2, 1)]:
        rank_counts = []
        for rank in range(world):
            sizes = [slot_range(n, world, rank, workers, w, "pad") for w in range(workers)]
            rank_counts.append(sum(b - a for a, b in sizes))
        assert rank_counts == [1] * world  # every rank yields one sample: same step count everywhere


def test_real_dataloader_with_two_workers(small_shards, tmp_path):
    ds = ShardDataset(small_shards, key_sample, shuffle=True, seed=5, shuffle_buffer=2, even=None)
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_keys)
    keys = [k for batch in loader for k in batch]
    assert sorted(keys) == [f"s{i:02d}" for i in range(9)]
    simulated = [s.key for w in range(2) for s in ds.iter_worker(w, 2)]
    assert Counter(simulated) == Counter(keys)
    assert len(loader) == math.ceil(9 / 2)


def test_pickled_dataset_keeps_rank_and_decoder(small_shards):
    ds = ShardDataset(small_shards, key_sample, rank=1, world_size=2, even=None)
    clone = pickle.loads(pickle.dumps(ds))  # what spawned DataLoader workers receive
    assert (clone.rank, clone.world_size) == (1, 2)
    assert [s.key for s in clone] == [s.key for s in ds] == [f"s{i:02d}" for i in range(5, 9)]
    decoder = ShardDecoder.for_source("sentinel2", train=False, zoom=3)
    assert pickle.loads(pickle.dumps(decoder)).view.zoom == 3


def test_order_is_deterministic_per_seed_and_epoch(tmp_path):
    recs = [
        ShardRecord(f"k{i:02d}", {}, png_bytes(i), "png", audio_features=np.zeros(2, np.float16)) for i in range(20)
    ]
    pack_records(recs, tmp_path, samples_per_shard=5)

    def decode(members: dict) -> Sample:
        image, zoom = TRAIN_VIEW(np.asarray(Image.open(io.BytesIO(members["image.png"]))), members["__generator__"])
        return Sample(key=members["__key__"], image=image, zoom=zoom)

    def run(epoch: int, world: int = 1, seed: int = 3) -> list[tuple[str, int, float]]:
        out = []
        for rank in range(world):
            ds = ShardDataset(
                tmp_path, decode, shuffle=True, seed=seed, shuffle_buffer=4, rank=rank, world_size=world, even=None
            )
            ds.set_epoch(epoch)
            out += [(s.key, s.zoom, round(float(s.image.sum()), 4)) for s in ds]
        return out

    first = run(0)
    assert first == run(0)
    assert [k for k, _, _ in first] != [k for k, _, _ in run(1)]
    assert [k for k, _, _ in first] != [k for k, _, _ in run(0, seed=4)]
    # Augmentations are seeded per (seed, epoch, key): the same whatever the world size.
    assert sorted(run(0, world=2)) == sorted(first)
    assert sorted(run(1)) != sorted(first)


# --------------------------------------------------------------------------------------------------------
# Reader: errors
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def corrupt_shards(tmp_path) -> Path:
    recs = [make_record(i, "flac") for i in range(4)]
    recs[2].audio = b"this is not a flac file"
    pack_records(recs, tmp_path / "shards", samples_per_shard=2)
    return tmp_path / "shards"


def test_decode_error_raises_with_key(corrupt_shards):
    ds = ShardDataset(corrupt_shards, ShardDecoder(EVAL_VIEW))
    with pytest.raises(ShardDecodeError, match="rec-002") as info:
        list(ds)
    assert "train-000001.tar" in str(info.value)


def test_skip_policy_records_bad_sample(corrupt_shards, tmp_path):
    log_path = tmp_path / "logs" / "errors.jsonl"
    ds = ShardDataset(corrupt_shards, ShardDecoder(EVAL_VIEW), on_error="skip", error_log=log_path, even=None)
    keys = [s.key for s in ds]
    assert keys == ["rec-000", "rec-001", "rec-003"]
    assert ds.num_errors == 1 and ds.errors[0].key == "rec-002"
    assert ds.errors[0].shard.endswith("train-000001.tar") and "AudioDecodeError" in ds.errors[0].reason
    (entry,) = read_error_logs(log_path)
    assert entry["key"] == "rec-002" and entry["shard"].endswith("train-000001.tar") and entry["kind"] == "error"

    # even="pad": the lost sample is replaced so that the rank still yields its planned count.
    padded = ShardDataset(corrupt_shards, ShardDecoder(EVAL_VIEW), on_error="skip", even="pad")
    assert len([s.key for s in padded]) == len(padded) == 4 and padded.num_filled == 1


def test_sixteen_bit_image_member_is_an_error_not_a_clipped_image(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64), 4000, dtype=np.uint16)).save(buf, format="PNG")
    rec = make_record(0, "flac")
    rec.image = buf.getvalue()
    pack_records([rec], tmp_path, samples_per_shard=1)
    ds = ShardDataset(tmp_path, ShardDecoder(EVAL_VIEW), on_error="skip", even=None)
    assert list(ds) == [] and ds.num_errors == 1
    assert "rec-000.image.png" in ds.errors[0].reason and "would clip" in ds.errors[0].reason


def test_many_skipped_samples_are_all_recorded_but_logged_only_at_first(tmp_path, caplog):
    """A damaged shard set does not flood the console; every problem is still in errors and the error log."""
    from psm.data.shards import WARN_FIRST_PROBLEMS

    n = WARN_FIRST_PROBLEMS + 15
    features = np.zeros(2, np.float16)
    recs = [ShardRecord(f"s{i:02d}", {"i": i}, png_bytes(0), "png", audio_features=features) for i in range(n)]
    pack_records(recs, tmp_path / "shards", prefix="train", samples_per_shard=8)
    log_path = tmp_path / "errors.jsonl"
    ds = ShardDataset(tmp_path / "shards", lambda members: None, on_error="skip", error_log=log_path, even=None)
    with caplog.at_level("WARNING", logger="psm.data.shards"):
        assert list(ds) == []
    assert ds.num_errors == n and len(read_error_logs(log_path)) == n
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == WARN_FIRST_PROBLEMS + 1 and "no longer logged one by one" in lines[-1]
    assert str(log_path) in lines[-1]


def test_skip_policy_in_dataloader_workers_logs_per_worker(corrupt_shards, tmp_path):
    log_path = tmp_path / "errors.jsonl"
    ds = ShardDataset(corrupt_shards, ShardDecoder(EVAL_VIEW), on_error="skip", error_log=log_path, even=None)
    keys = [k for batch in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_keys) for k in batch]
    assert sorted(keys) == ["rec-000", "rec-001", "rec-003"]
    entries = read_error_logs(log_path)  # written by the worker processes, not lost with them
    assert [(e["key"], e["worker"]) for e in entries] == [("rec-002", 1)]
    assert (tmp_path / "errors.rank0.worker1.jsonl").is_file()


# --------------------------------------------------------------------------------------------------------
# Official layout
# --------------------------------------------------------------------------------------------------------

GEOSOUND = [
    (
        "iNat-123",
        {
            "sample_id": "iNat-123",
            "date": "2021/10/31 3:11 PM EDT",
            "latitude": 38.6,
            "longitude": -90.2,
            "text": "A cardinal sings.",
            "original_sampling_rate": 44100,
        },
        "torch",
    ),
    (
        "freesound-77",
        {
            "sample_id": "freesound-77",
            "date": "June 26th, 2010",
            "latitude": 51.5,
            "longitude": -0.1,
            "text": "Rain on a roof.",
            "original_sampling_rate": 48000,
        },
        "pickle",
    ),
]
SOUNDINGEARTH = [
    (
        "a1b2c3_rec",
        {
            "long_key": "a1b2c3_rec",
            "key": "rec",
            "latitude": 52.5,
            "longitude": 13.4,
            "date_recorded": "1/29/09 10:28",
            "mp3seconds": 5.0,
            "caption": "Birds near a lake The location of the sound is Berlin, Germany.",
        },
        "torch",
    ),
]


def write_official_shard(path: Path, samples) -> None:
    with tarfile.open(path, "w") as tar:
        for n, (key, meta, how) in enumerate(samples):
            members = {"meta.json": json.dumps(meta).encode(), "image.jpg": png_bytes(n, "JPEG")}
            for m in range(5):
                mel = torch.full(FEATURE_SHAPE, float(10 * n + m))
                if how == "torch":
                    buf = io.BytesIO()
                    torch.save(mel, buf)
                    members[f"audio_mel{m + 1}.pyd"] = buf.getvalue()
                else:  # webdataset's .pyd encoder: plain pickle
                    members[f"audio_mel{m + 1}.pyd"] = pickle.dumps(mel)
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def official_shards(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("official")
    write_official_shard(root / "test_sentinel.tar", GEOSOUND)
    write_official_shard(root / "test.tar", SOUNDINGEARTH)
    return {"GeoSound": root / "test_sentinel.tar", "SoundingEarth": root / "test.tar"}


def test_official_shards_need_allow_pickle(official_shards):
    with pytest.raises(PickleNotAllowedError, match="allow_pickle=True"):
        OfficialShardDataset(official_shards["GeoSound"], EVAL_VIEW)
    with pytest.raises(PickleNotAllowedError, match="allow_pickle=True"):
        official_sample_decoder(EVAL_VIEW)
    # The gate also holds at decode time, and is never swallowed by the skip policy.
    ds = ShardDataset(official_shards["GeoSound"], OfficialDecoder(EVAL_VIEW), on_error="skip")
    with pytest.raises(PickleNotAllowedError, match="allow_pickle=True"):
        list(ds)


def test_official_geosound_and_soundingearth(official_shards):
    gs = {
        s.key: s
        for s in OfficialShardDataset(official_shards["GeoSound"], EVAL_VIEW, allow_pickle=True, mel_index=2, even=None)
    }
    assert list(gs) == ["iNat-123", "freesound-77"]
    inat, fs = gs["iNat-123"], gs["freesound-77"]
    assert inat.metadata == {
        "latitude": 38.6,
        "longitude": -90.2,
        "month": 10,
        "hour": 15,
        "audio_source": "iNat",
        "caption_source": "meta",
    }
    assert fs.metadata["audio_source"] == "freesound" and fs.metadata["month"] == 6 and fs.metadata["hour"] is None
    assert inat.caption == "A cardinal sings." and fs.caption == "Rain on a roof."
    for n, s in enumerate((inat, fs)):  # torch.save and plain-pickle variants
        assert s.audio_features.shape == FEATURE_SHAPE and s.audio_features.dtype == torch.float32
        assert float(s.audio_features[0, 0, 0]) == 10 * n + 2  # mel_index 2 = audio_mel3.pyd
        assert s.is_longer is True and s.image.shape == (3, 16, 16) and s.zoom == 1
        assert s.waveform is None

    (se,) = OfficialShardDataset(official_shards["SoundingEarth"], EVAL_VIEW, allow_pickle=True, even=None)
    assert se.key == "aporee-a1b2c3_rec" and se.caption == "Birds near a lake ."
    assert se.metadata["audio_source"] == "aporee" and (se.metadata["month"], se.metadata["hour"]) == (1, 10)
    assert float(se.audio_features[0, 0, 0]) == 0.0 and se.is_longer is True

    (short,) = OfficialShardDataset(
        official_shards["SoundingEarth"], EVAL_VIEW, allow_pickle=True, official_is_longer=False, even=None
    )
    assert short.is_longer is False  # mp3seconds 5 ≤ 10 s


def test_reads_shards_written_by_webdataset_shardwriter(tmp_path):
    # The authors' writer: webdataset encodes .json with json and .pyd with plain pickle (here [1, 4, 1001, 64]).
    wds = pytest.importorskip("webdataset")
    with wds.ShardWriter(str(tmp_path / "train_sentinel_%d.tar"), maxcount=2, verbose=0) as writer:
        for i in range(3):
            sample = {
                "__key__": f"yfcc-{i}",
                "meta.json": {"date": "2011-07-26 12:46:19.0", "latitude": 1.0 + i, "longitude": 2.0, "text": "x"},
                "image.jpg": png_bytes(i, "JPEG"),
            }
            sample.update({f"audio_mel{m}.pyd": torch.full((1, *FEATURE_SHAPE), float(m)) for m in range(1, 6)})
            writer.write(sample)
    ds = OfficialShardDataset(tmp_path, EVAL_VIEW, prefix="train", allow_pickle=True, mel_index=4, even=None)
    assert ds.counts == [2, 1]  # no index: counted from the tar headers
    samples = list(ds)
    assert [s.key for s in samples] == ["yfcc-0", "yfcc-1", "yfcc-2"]
    assert all(s.audio_features.shape == FEATURE_SHAPE and float(s.audio_features.max()) == 5.0 for s in samples)
    assert samples[2].metadata == {
        "latitude": 3.0,
        "longitude": 2.0,
        "month": 7,
        "hour": 12,
        "audio_source": "yfcc",
        "caption_source": "meta",
    }


def test_official_training_draws_mel_from_sample_generator(official_shards):
    def mels(epoch: int) -> list[float]:
        ds = OfficialShardDataset(
            official_shards["GeoSound"], TRAIN_VIEW, allow_pickle=True, train=True, seed=0, even=None
        )
        ds.set_epoch(epoch)
        return sorted(float(s.audio_features[0, 0, 0]) for s in ds)

    first = mels(0)
    assert first == mels(0)
    assert all(v in range(5) for v in first[:1]) and all(v in range(10, 15) for v in first[1:])
    assert {tuple(mels(e)) for e in range(6)} != {tuple(first)}  # the draw changes with the epoch


# --------------------------------------------------------------------------------------------------------
# Dates
# --------------------------------------------------------------------------------------------------------


def test_validation_from_shards_draws_a_zoom_per_sample_the_same_way_each_time(packed):
    # Shard validation used one fixed zoom (5); the official in-training validation, and psm's manifest
    # validation, draw 1, 3 or 5 per sample. The draw comes from the sample's generator: the same every epoch.
    view = SatelliteView(TINY, train=False, input_size=16, draw_zoom=True)
    first = [(s.key, s.zoom) for s in ShardDataset(packed, ShardDecoder(view), prefix="train", even=None)]
    again = [(s.key, s.zoom) for s in ShardDataset(packed, ShardDecoder(view), prefix="train", even=None)]
    assert first == again and len({z for _, z in first}) > 1
    with pytest.raises(ImageryError, match="needs a fixed zoom"):
        SatelliteView(TINY, train=False, input_size=16)
    with pytest.raises(ImageryError, match="needs each sample's generator"):
        view(np.zeros((64, 64, 3), dtype=np.uint8))


def test_a_shard_cut_short_keeps_its_complete_samples_under_skip(tmp_path):
    # A copy interrupted mid-file stopped a whole run at construction, even with on_error="skip".
    recs = [make_record(i, "flac") for i in range(6)]
    pack_records(recs, tmp_path, prefix="train", samples_per_shard=3)
    cut = tmp_path / "train-000001.tar"
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # no longer what the index describes: counted by a header scan
    with pytest.raises(ShardReadError):
        ShardDataset(tmp_path, ShardDecoder(EVAL_VIEW), prefix="train", on_error="raise", even=None)
    log_path = tmp_path / "logs" / "errors.jsonl"
    ds = ShardDataset(tmp_path, ShardDecoder(EVAL_VIEW), prefix="train", on_error="skip", error_log=log_path, even=None)
    keys = [s.key for s in ds]
    assert keys[:3] == ["rec-000", "rec-001", "rec-002"] and 3 <= len(keys) < 6  # what precedes the cut
    assert set(keys[3:]) <= {"rec-003", "rec-004"} and len(ds) == len(keys)
    (entry,) = read_error_logs(log_path)
    assert entry["shard"].endswith("train-000001.tar") and "before the damage are used" in entry["reason"]

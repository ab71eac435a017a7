"""Manifest validation and the map-style dataset: every planted fault is reported with its row, and
training with ``skip`` loses exactly those rows and says so."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from PIL import Image

from psm.cli import main as cli_main
from psm.data.dataset import ManifestDataset, make_collate
from psm.data.dates import parse_date
from psm.data.errors import DataError, SkipLog
from psm.data.manifest import ManifestError, validate_manifest
from psm.data.metadata import MetadataSpec

TILE = 256 * 5  # a Sentinel-2 tile big enough for zoom 5


def _write_good_files(root, n):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        wav = root / f"clip{i}.wav"
        sf.write(wav, (0.1 * rng.standard_normal(16000 + 800 * i)).astype("float32"), 16000)
        img = root / f"tile{i}.png"
        Image.fromarray(rng.integers(0, 255, (TILE, TILE, 3), dtype=np.uint8)).save(img)
        rows.append(
            dict(
                key=f"s{i}",
                audio_path=wav.name,
                latitude=40.0 + i,
                longitude=-74.0,
                audio_source="iNat",
                caption=f"birds singing {i}",
                caption_source="meta",
                date="2021/05/31 6:11 AM EDT",
                image_sentinel2=img.name,
            )
        )
    return rows


@pytest.fixture
def faulty_manifest(tmp_path):
    rows = _write_good_files(tmp_path, 4)
    # one of each planted fault, each in its own row
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype="float32"), 16000)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (300, 300)).save(tmp_path / "small.png")
    base = dict(rows[0])
    faults = {
        "corrupt_audio": {"audio_path": "corrupt.wav"},
        "empty_audio": {"audio_path": "empty.wav"},
        "unreadable_image": {"image_sentinel2": "broken.png"},
        "small_image": {"image_sentinel2": "small.png"},
        "nan_coordinates": {"latitude": "nan"},
        "month_13": {"month": "13"},
        "unknown_source": {"audio_source": "tiktok"},
        "missing_file": {"audio_path": "nowhere.wav"},
    }
    for name, change in faults.items():
        rows.append({**base, "key": name, **change})
    df = pd.DataFrame(rows)
    path = tmp_path / "manifest.csv"
    df.to_csv(path, index=False)
    return path, {name: 4 + i for i, name in enumerate(faults)}


def test_validate_reports_every_planted_fault_with_its_row(faulty_manifest):
    path, fault_rows = faulty_manifest
    report = validate_manifest(path)
    assert not report.ok
    assert report.bad_rows == set(fault_rows.values())
    by_row = {p.row: p for p in report.errors}
    expectations = {
        "corrupt_audio": "corrupt.wav",
        "empty_audio": "empty.wav",
        "unreadable_image": "broken.png",
        "small_image": "zoom 5 needs 1280×1280",
        "nan_coordinates": "latitude",
        "month_13": "not an integer in 1..12",
        "unknown_source": "unknown audio_source 'tiktok'",
        "missing_file": "nowhere.wav: file not found",
    }
    for name, fragment in expectations.items():
        problem = by_row[fault_rows[name]]
        assert fragment in str(problem), (name, str(problem))
        assert problem.key == name and str(path) in str(problem)
    assert "12 rows, 8 bad rows" in report.format()


def test_validate_cli_exits_non_zero_and_prints_rows(faulty_manifest, capsys):
    path, fault_rows = faulty_manifest
    assert cli_main(["data", "validate", str(path)]) == 1
    out = capsys.readouterr().out
    for row in fault_rows.values():
        assert f"row {row}" in out
    assert cli_main(["data", "validate", str(path), "--on-error", "skip"]) == 0


def test_validate_passes_on_a_clean_manifest(tmp_path, capsys):
    pd.DataFrame(_write_good_files(tmp_path, 2)).to_parquet(tmp_path / "m.parquet")
    assert validate_manifest(tmp_path / "m.parquet").ok
    assert cli_main(["data", "validate", str(tmp_path / "m.parquet")]) == 0


def test_manifest_schema_errors(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found"):
        validate_manifest(tmp_path / "nope.csv")
    pd.DataFrame({"key": ["a"]}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ManifestError, match="missing required columns"):
        validate_manifest(tmp_path / "m.csv")
    rows = _write_good_files(tmp_path, 1)
    pd.DataFrame(rows).rename(columns={"image_sentinel2": "image_planet"}).to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ManifestError, match="unknown imagery source 'planet'"):
        validate_manifest(tmp_path / "m.csv")


def test_training_with_skip_loses_exactly_the_bad_rows_and_says_so(faulty_manifest, tmp_path):
    path, fault_rows = faulty_manifest
    log = SkipLog(tmp_path / "reports" / "skipped")
    ds = ManifestDataset(path, imagery_source="sentinel2", train=True, input_size=64, on_error="skip", skip_log=log)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=make_collate(MetadataSpec()))
    keys = [k for batch in loader if batch is not None for k in batch.keys]
    assert keys == ["s0", "s1", "s2", "s3"]
    assert sorted(p.key for p in SkipLog.read_all(tmp_path / "reports" / "skipped")) == sorted(fault_rows)
    assert len(log) == len(fault_rows)


def test_training_with_raise_stops_at_the_first_bad_row(faulty_manifest):
    path, _ = faulty_manifest
    with pytest.raises(DataError, match=r"row 8.*latitude"):
        ManifestDataset(path, imagery_source="sentinel2", train=True, on_error="raise")


def test_dataset_samples_are_reproducible_per_seed_and_epoch(tmp_path):
    pd.DataFrame(_write_good_files(tmp_path, 2)).to_csv(tmp_path / "m.csv", index=False)
    ds = ManifestDataset(tmp_path / "m.csv", imagery_source="sentinel2", train=True, input_size=64, seed=3)
    a = ds[0]
    assert torch.equal(a.image, ds[0].image) and a.zoom == ds[0].zoom
    assert a.waveform.shape == (48000,)  # 1 s at 16 kHz, resampled to 48 kHz
    assert a.metadata["month"] == 5 and a.metadata["hour"] == 6
    ds.set_epoch(1)
    assert not torch.equal(a.image, ds[0].image)
    batch = make_collate(MetadataSpec())([ds[0], ds[1]])
    assert batch.waveforms.shape == (2, 50400) and batch.waveform_lengths.tolist() == [48000, 50400]
    assert batch.metadata.valid["hour"].all()


@pytest.mark.parametrize(
    ("text", "month", "hour"),
    [
        ("2021/10/31 3:11 PM EDT", 10, 15),  # iNat: cut after "pm"
        ("2011-07-26 12:46:19.0", 7, 12),  # yfcc
        ("1/29/09 10:28", 1, 10),  # aporee, 24-hour clock
        ("June 26th, 2010", 6, 0),  # no time of day: hour 0, valid (official semantics)
        ("Tue, 05 Mar 2019 18:20:00 GMT", 3, 18),  # cut before "gmt"
        ("2010", None, 0),  # no month: unknown (dateutil would fill in today's)
        ("2010-06-26 3 PM", 6, 15),  # an hour without minutes is still a time of day
        ("June 2 2010 at 7 am", 6, 7),
        ("Feb 29", 2, 0),  # no year: a leap day must not fail the parse
        ("not a date", None, None),
        ("", None, None),
        (None, None, None),
        (float("nan"), None, None),
    ],
)
def test_parse_date_as_the_official_loader(text, month, hour):
    parsed = parse_date(text)
    assert (parsed.month, parsed.hour) == (month, hour)
    assert parsed.month_valid == (month is not None) and parsed.hour_valid == (hour is not None)


def test_date_without_time_can_be_marked_unknown():
    assert parse_date("June 26th, 2010", time_missing_means_midnight=False).hour is None


def test_pack_cli_writes_shards_skips_bad_rows_and_resumes(faulty_manifest, tmp_path, capsys):
    from psm.data.shards import ShardDataset, ShardDecoder, read_index

    path, fault_rows = faulty_manifest
    out = tmp_path / "shards"
    assert cli_main(["data", "pack", str(path), str(out), "--samples-per-shard", "2"]) == 0
    printed = capsys.readouterr().out
    assert "4 samples in 2 shards" in printed and f"skipped {len(fault_rows)} bad rows" in printed
    index = read_index(out, "train")
    assert sum(s["count"] for s in index["shards"]) == 4
    # a re-run finds every shard complete
    assert cli_main(["data", "pack", str(path), str(out), "--samples-per-shard", "2"]) == 0
    assert "(0 written, 2 already complete)" in capsys.readouterr().out
    ds = ShardDataset(out, ShardDecoder.for_source("sentinel2", train=False, zoom=1, input_size=64), prefix="train")
    samples = list(ds)
    assert sorted(s.key for s in samples) == ["s0", "s1", "s2", "s3"]
    assert samples[0].caption.startswith("birds singing") and samples[0].metadata["hour"] == 6


def test_dataset_can_compute_clap_features_per_sample(tmp_path):
    from psm.data.audio import clap_fusion_features

    pd.DataFrame(_write_good_files(tmp_path, 2)).to_csv(tmp_path / "m.csv", index=False)
    ds = ManifestDataset(
        tmp_path / "m.csv", imagery_source="sentinel2", train=False, zoom=1, input_size=64, audio_features=True
    )
    sample = ds[0]
    assert sample.waveform is None and sample.audio_features.shape == (4, 1001, 64) and sample.is_longer is False
    plain = ManifestDataset(tmp_path / "m.csv", imagery_source="sentinel2", train=False, zoom=1, input_size=64)[0]
    features, _ = clap_fusion_features([plain.waveform])
    assert torch.equal(features[0], sample.audio_features)
    batch = make_collate(MetadataSpec())([sample, ds[1]])
    assert batch.audio_features.shape == (2, 4, 1001, 64) and batch.waveforms is None


def test_validate_reports_an_empty_key_and_an_infinite_month_hour_by_row(tmp_path):
    rows = _write_good_files(tmp_path, 3)
    rows[1]["key"] = ""
    rows[2]["month"], rows[2]["hour"] = "inf", "-inf"
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    report = validate_manifest(tmp_path / "m.csv", decode=False)  # must not raise on int(inf)
    got = {(p.row, p.column): p.reason for p in report.errors}
    assert got == {
        (1, "key"): "empty key",
        (2, "month"): "'inf' is not an integer in 1..12",
        (2, "hour"): "'-inf' is not an integer in 0..23",
    }


def test_freesound_hour_from_a_date_is_unknown_as_in_the_shard_decoders(tmp_path):
    from psm.data.manifest import iter_rows, read_manifest

    rows = _write_good_files(tmp_path, 3)
    rows[0]["audio_source"] = rows[1]["audio_source"] = "freesound"
    rows[0]["date"] = "June 26th, 2010"
    rows[1]["hour"] = 14  # an explicit hour is kept
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    df = read_manifest(tmp_path / "m.csv")
    parsed = [row.metadata for row, _ in iter_rows(df, tmp_path / "m.csv", MetadataSpec())]
    assert [(m["month"], m["hour"]) for m in parsed] == [(6, None), (5, 14), (5, 6)]


def test_pack_skips_duplicate_and_unpackable_keys_naming_their_rows(tmp_path, capsys):
    from psm.data.shards import read_index

    rows = _write_good_files(tmp_path, 4)
    rows[2]["key"] = "s0"  # duplicate of row 0
    rows[3]["key"] = "site.3"  # a "." would split the tar member name
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    report = validate_manifest(tmp_path / "m.csv", decode=False)
    assert [(p.row, p.severity) for p in report.problems if p.column == "key"] == [(2, "error"), (3, "warning")]
    out = tmp_path / "shards"
    assert cli_main(["data", "pack", str(tmp_path / "m.csv"), str(out), "--report", str(tmp_path / "skip")]) == 0
    assert "2 samples in 1 shards" in capsys.readouterr().out
    assert [s["first_key"] for s in read_index(out, "train")["shards"]] == ["s0"]
    skipped = {p.row: p.reason for p in SkipLog.read_all(tmp_path / "skip")}
    assert skipped.keys() == {2, 3}
    assert skipped[2] == "duplicate key (first at row 0)" and "'site.3' contains ['.']" in skipped[3]


def test_validate_catches_a_raster_window_the_dataset_cannot_read_at_the_edge(tmp_path):
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.warp import transform

    size, left, top = 1400, 400_000.0, 5_800_000.0  # 10 m pixels: a zoom-5 window (1280 px) just fits
    profile = dict(driver="GTiff", height=size, width=size, count=3, dtype="uint8", crs="EPSG:32633")
    with rasterio.open(tmp_path / "r.tif", "w", transform=from_origin(left, top, 10, 10), **profile) as dst:
        dst.write(np.full((3, size, size), 100, dtype=np.uint8))
    rows = _write_good_files(tmp_path, 2)
    # Pixel (col, row) positions: the middle, and 0.7 px inside the last column that a window centred on
    # the point's pixel still reaches, but a window centred on the point itself does not.
    for r, (col, row) in zip(rows, [(700.5, 700.5), (size - 640 + 0.7, 700.5)], strict=True):
        (lon,), (lat,) = transform("EPSG:32633", "EPSG:4326", [left + 10 * col], [top - 10 * row])
        r.update(latitude=lat, longitude=lon, image_sentinel2="r.tif")
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    ds = ManifestDataset(tmp_path / "m.csv", imagery_source="sentinel2", train=False, zoom=5, input_size=32)
    assert ds[0] is not None and ds[1] is None  # the dataset cannot read row 1 at zoom 5 ...
    report = validate_manifest(tmp_path / "m.csv")  # ... so validation must say so
    assert report.bad_rows == {1}
    assert "partly outside the raster" in report.errors[0].reason


def test_sixteen_bit_multiband_rasters_train_validate_and_pack_with_bands_and_scale(tmp_path, capsys):
    """A Sentinel-2 L2A-like GeoTIFF (uint16 reflectance × 10,000, bands blue, green, red, NIR) is usable from a
    manifest: --bands 3 2 1 --scale 0 3000 in validate and pack, RasterBands in the dataset. Without them it
    is refused by name (before, nothing in the manifest path could pass them)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.warp import transform

    from psm.data.imagery import RasterBands
    from psm.training.datamodule import PSMDataModule

    size, left, top = 1400, 400_000.0, 5_800_000.0
    values = np.stack([np.full((size, size), v, dtype=np.uint16) for v in (300, 1500, 3000, 6000)])  # B G R NIR
    profile = dict(driver="GTiff", height=size, width=size, count=4, dtype="uint16", crs="EPSG:32633")
    with rasterio.open(tmp_path / "s2.tif", "w", transform=from_origin(left, top, 10, 10), **profile) as dst:
        dst.write(values)
    rows = _write_good_files(tmp_path, 2)
    for r in rows:
        (lon,), (lat,) = transform("EPSG:32633", "EPSG:4326", [left + 10 * 700.5], [top - 10 * 700.5])
        r.update(latitude=lat, longitude=lon, image_sentinel2="s2.tif")
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    manifest = str(tmp_path / "m.csv")

    report = validate_manifest(manifest)
    assert report.bad_rows == {0, 1} and "scale" in report.errors[0].reason and "s2.tif" in report.errors[0].reason
    s2 = RasterBands((3, 2, 1), (0, 3000))
    assert validate_manifest(manifest, raster=s2).ok
    assert cli_main(["data", "validate", manifest]) == 1
    assert cli_main(["data", "validate", manifest, "--bands", "3", "2", "1", "--scale", "0", "3000"]) == 0
    assert cli_main(["data", "validate", manifest, "--scale", "3000", "0"]) == 2  # a bad scale is a usage error

    ds = ManifestDataset(manifest, imagery_source="sentinel2", train=False, zoom=1, input_size=32, raster=s2)
    image = ds[0].image  # ImageNet-normalised RGB: red 3000 → 255, green 1500 → 128, blue 300 → 26
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    rgb = (image.mean(dim=(1, 2)) * std + mean) * 255
    assert torch.allclose(rgb, torch.tensor([255.0, 128.0, 26.0]), atol=1.5)

    out = tmp_path / "shards"
    argv = ["data", "pack", manifest, str(out), "--bands", "3", "2", "1", "--scale", "0", "3000"]
    assert cli_main(argv) == 0 and "2 samples" in capsys.readouterr().out.replace(",", "")
    with pytest.raises(ValueError, match="3 bands"):
        PSMDataModule(manifest=manifest, raster_bands=(1, 2))


def test_a_date_without_a_month_warns_about_what_is_unknown(tmp_path):
    # "10:28" carries the hour but no month: the warning says the month is unknown, not both.
    rows = _write_good_files(tmp_path, 2)
    rows[0]["date"], rows[1]["date"] = "10:28", "sometime"
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    warnings = {p.row: p.reason for p in validate_manifest(tmp_path / "m.csv", decode=False).problems}
    assert warnings[0].endswith(": month unknown") and warnings[1].endswith(": month and hour unknown")


def test_a_bad_row_of_another_split_is_neither_reported_nor_fatal(tmp_path):
    # `psm evaluate --split test` used to stop (raise) or report (skip) on a bad *training* row.
    from psm.data.manifest import manifest_records

    rows = _write_good_files(tmp_path, 3)
    rows[0]["latitude"] = "nan"  # bad, but in train
    for row, split in zip(rows, ["train", "test", "test"], strict=True):
        row["split"] = split
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    ds = ManifestDataset(tmp_path / "m.csv", imagery_source="sentinel2", train=False, split="test", on_error="raise")
    assert [r.key for r in ds.rows] == ["s1", "s2"]
    log = SkipLog()
    records = list(manifest_records(tmp_path / "m.csv", "sentinel2", split="test", on_error="raise", skip_log=log))
    assert [r.key for r in records] == ["s1", "s2"] and len(log) == 0
    with pytest.raises(DataError, match=r"row 0.*latitude"):  # the split it belongs to still stops on it
        ManifestDataset(tmp_path / "m.csv", imagery_source="sentinel2", train=True, split="train", on_error="raise")

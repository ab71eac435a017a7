"""Geographic split (PSM §5.3): held-out cells, terciles, re-sampling, metric cells, atomic writing.

Expectations are recomputed here from the coordinates with plain numpy/pandas, not from the module.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import psm.data.split as split_mod
from psm.data.split import cell_ids, format_summary, geographic_split, summary_path, write_split

METADATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "metadata"
BIRDCLEF = METADATA / "birdclef2022_train_metadata.csv"
GEOCLIP = METADATA / "geoclip_coordinates_100K.csv"
SOURCES = ["inat", "yfcc", "aporee", "freesound"]
POOL = {"train": "train", "val": "val", "test": "test", "val_unused": "val", "test_unused": "test"}


def _need(path: Path) -> None:
    if not path.exists():
        pytest.skip(f"shared data file absent: {path}")


@pytest.fixture(scope="module")
def geoclip() -> pd.DataFrame:
    _need(GEOCLIP)
    df = pd.read_csv(GEOCLIP).rename(columns={"LAT": "latitude", "LON": "longitude"})
    rng = np.random.default_rng(7)
    df["audio_source"] = rng.choice(SOURCES, size=len(df), p=[0.4, 0.3, 0.17, 0.13])
    return df


@pytest.fixture(scope="module")
def birdclef() -> pd.DataFrame:
    _need(BIRDCLEF)
    # Coordinates as text: 42 rows hold "-" and must be reported, not parsed away silently.
    return pd.read_csv(BIRDCLEF, dtype={"latitude": str, "longitude": str})


def _official_degree_cells(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    return np.array([int(a + 90) * 360 + int(o + 180) for a, o in zip(lat, lon, strict=True)], dtype=np.int64)


def _check_invariants(
    labels: pd.Series,
    cells: pd.Series,
    *,
    min_count: int = 25,
    holdout: float = 0.10,
    val_frac: float = 0.40,
) -> None:
    """Recompute the official per-tercile held-out counts and check cells are never shared by splits."""
    ok = labels != "invalid"
    pool = labels[ok].map(POOL)
    cell = cells[ok].astype("int64")
    # No cell in two splits; samples follow their cell.
    per_cell = pool.groupby(cell).nunique()
    assert (per_cell == 1).all()
    cell_split = pool.groupby(cell).first()
    counts = cell.value_counts()
    sel = counts[counts >= min_count]
    # Unselected cells always train.
    assert (cell_split[counts[counts < min_count].index] == "train").all()
    q1, q2 = sel.quantile(0.33), sel.quantile(0.66)
    groups = {
        "low": sel[sel <= q1].index,
        "medium": sel[(sel > q1) & (sel <= q2)].index,
        "high": sel[sel > q2].index,
    }
    assert sum(len(g) for g in groups.values()) == len(sel)
    for idx in groups.values():
        m = len(idx)
        held = int(holdout * m)
        got = cell_split[idx]
        assert (got != "train").sum() == held
        assert (got == "val").sum() == int(val_frac * held)


# ---------------------------------------------------------------------------------------------------
# synthetic data (no shared files needed)


def _synthetic(n_cells: int = 60, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_cells):
        lat0, lon0 = -60 + 2 * (i % 50), -170 + 6 * (i // 50)
        k = int(rng.integers(1, 120))
        rows.append(np.c_[lat0 + rng.random(k) * 0.99, lon0 + rng.random(k) * 0.99])
    xy = np.concatenate(rows)
    return pd.DataFrame({"latitude": xy[:, 0], "longitude": xy[:, 1], "audio_source": rng.choice(SOURCES, len(xy))})


def test_synthetic_split_invariants_and_summary() -> None:
    df = _synthetic()
    res = geographic_split(df)
    assert res.labels.index.equals(df.index) and res.cells.index.equals(df.index)
    assert set(res.labels) <= {"train", "val", "test"}
    np.testing.assert_array_equal(res.cells.to_numpy(dtype=np.int64), _official_degree_cells(df.latitude, df.longitude))
    _check_invariants(res.labels, res.cells)
    s = res.summary
    assert sum(s["samples"].values()) == len(df)
    assert s["cells_occupied"] == df.groupby(res.cells).ngroups
    assert sum(s["cells"].values()) == s["cells_occupied"]
    assert s["terciles"]["q1"] <= s["terciles"]["q2"]
    json.dumps(s)  # JSON-ready
    text = format_summary(s)
    assert "tercile" in text and str(s["samples"]["train"]) in text


def test_invalid_coordinates_raise_or_skip() -> None:
    df = _synthetic(10)
    df.loc[3, "latitude"] = np.nan
    df.loc[5, "longitude"] = 181.0
    df.loc[7, "latitude"] = -90.5
    with pytest.raises(ValueError, match=r"3 of \d+ rows") as exc:
        geographic_split(df)
    msg = str(exc.value)
    assert "row 3 " in msg and "row 5 " in msg and "181.0" in msg and "row 7 " in msg
    res = geographic_split(df, on_error="skip")
    assert (res.labels == "invalid").sum() == 3
    assert list(res.labels.index[res.labels == "invalid"]) == [3, 5, 7]
    assert res.cells[[3, 5, 7]].isna().all()
    assert res.summary["invalid_rows"] == 3 and res.summary["samples"]["invalid"] == 3


def test_metric_cells_poles_and_antimeridian() -> None:
    lat = np.array([90.0, -90.0, 89.9999, -89.99, 0.0, 0.0, 45.0, 45.0, 60.0])
    lon = np.array([0.0, 180.0, -180.0, 179.99, 180.0, -180.0, 179.9999, -179.9999, 180.0])
    for size in (0.5, 10.0, 250.0, 5000.0):
        ids = cell_ids(lat, lon, size)
        assert ids.dtype == np.int64 and (ids >= 0).all()
        assert ids[4] == ids[5]  # lon 180 is lon -180
    assert cell_ids([0.0], [180.0])[0] == cell_ids([0.0], [-180.0])[0]
    res = geographic_split(pd.DataFrame({"latitude": lat, "longitude": lon}), cell=10.0)
    assert set(res.labels) == {"train"}


def test_official_metric_ids_collide_on_constructed_example() -> None:
    """SoundingEarth's official lat_bin·360 + lon_bin: a 10-km band has ~4,000 lon bins, so ids collide."""
    size = 10.0
    step = size / 111.0
    b = int(90 / step)  # band at the equator

    def lon_in_bin(band: int, lon_bin: int) -> float:
        centre = -90 + (band + 0.5) * step
        lon_step = size / (111 * math.cos(math.radians(centre)))
        return -180 + (lon_bin + 0.5) * lon_step

    # Band b, lon bin 400 and band b + 1, lon bin 40: official ids b·360 + 400 == (b + 1)·360 + 40.
    lat = np.array([-90 + (b + 0.5) * step, -90 + (b + 1.5) * step])
    lon = np.array([lon_in_bin(b, 400), lon_in_bin(b + 1, 40)])
    assert (lon[0] - lon[1]) * 111 > 3000  # over 3,000 km apart
    official = cell_ids(lat, lon, size, official_cell_ids=True)
    assert official[0] == official[1] == b * 360 + 400
    ours = cell_ids(lat, lon, size)
    assert ours[0] != ours[1]
    # In a split the two far-apart places then share a cell, hence a split.
    df = pd.DataFrame({"latitude": np.repeat(lat, 30), "longitude": np.repeat(lon, 30)})
    res = geographic_split(df, cell=size, official_cell_ids=True, holdout_fraction=1.0)
    assert res.cells.nunique() == 1 and res.summary["cells_occupied"] == 1


# ---------------------------------------------------------------------------------------------------
# real coordinates


@pytest.mark.shared
def test_birdclef_bad_rows_reported(birdclef: pd.DataFrame) -> None:
    lat = pd.to_numeric(birdclef.latitude, errors="coerce")
    lon = pd.to_numeric(birdclef.longitude, errors="coerce")
    bad = np.flatnonzero(lat.isna() | lon.isna())
    assert len(bad) == 42
    with pytest.raises(ValueError, match=r"^42 of 14894 rows") as exc:
        geographic_split(birdclef)
    assert f"row {bad[0]} " in str(exc.value) and "'-'" in str(exc.value)

    res = geographic_split(birdclef, on_error="skip", source_column="primary_label")
    assert len(res.labels) == len(birdclef)
    assert list(np.flatnonzero(res.labels == "invalid")) == list(bad)
    assert res.summary["invalid_rows"] == 42
    assert sum(res.summary["by_source"]["invalid"].values()) == 42
    _check_invariants(res.labels, res.cells)
    ok = res.labels != "invalid"
    np.testing.assert_array_equal(res.cells[ok].to_numpy(dtype=np.int64), _official_degree_cells(lat[ok], lon[ok]))


@pytest.mark.shared
def test_geoclip_degree_split(geoclip: pd.DataFrame) -> None:
    res = geographic_split(geoclip)
    np.testing.assert_array_equal(
        res.cells.to_numpy(dtype=np.int64),
        _official_degree_cells(geoclip.latitude.to_numpy(), geoclip.longitude.to_numpy()),
    )
    _check_invariants(res.labels, res.cells)
    s = res.summary
    assert s["cells_occupied"] == res.cells.nunique()
    assert s["cells_selected"] == int((res.cells.value_counts() >= 25).sum())
    for split in ("train", "val", "test"):
        assert s["samples"][split] == (res.labels == split).sum()
        assert s["cells"][split] == res.cells[res.labels == split].nunique()

    same = geographic_split(geoclip, seed=42)
    pd.testing.assert_series_equal(res.labels, same.labels)
    other = geographic_split(geoclip, seed=43)
    assert not res.labels.equals(other.labels)
    _check_invariants(other.labels, other.cells)


def _expected_allocation(train: pd.Series, avail: pd.Series, n: int) -> dict[str, int]:
    """Official rule: min(int(N·p_train), available) per source, the rest to the largest train source."""
    p = train.value_counts(normalize=True)
    largest = p.idxmax()
    out = {s: min(int(n * p[s]), int(avail.get(s, 0))) for s in p.index if s != largest}
    out[largest] = n - sum(out.values())
    assert out[largest] <= avail[largest]
    return out


@pytest.mark.shared
def test_geoclip_resampling_sizes_and_sources(geoclip: pd.DataFrame) -> None:
    df = geoclip.copy()
    base = geographic_split(df)
    # Leave only 5 freesound rows in the val pool so availability binds and iNat takes the shortfall;
    # sources do not influence which cells are held out.
    val_fs = df.index[(base.labels == "val") & (df.audio_source == "freesound")]
    df.loc[val_fs[5:], "audio_source"] = "inat"
    res = geographic_split(df, val_size=1000, test_size=2000)
    pd.testing.assert_series_equal(res.cells, base.cells)
    pool = res.labels.map(POOL)
    assert (pool == base.labels).all()  # sub-sampling never moves a row to another split
    train_src = df.audio_source[res.labels == "train"]
    for split, n in (("val", 1000), ("test", 2000)):
        got = df.audio_source[res.labels == split].value_counts().to_dict()
        avail = df.audio_source[pool == split].value_counts()
        assert sum(got.values()) == n
        assert got == _expected_allocation(train_src, avail, n)
        assert res.summary["resampling"][split]["per_source"] == got
        assert res.summary["samples_before_resampling"][split] == int(avail.sum())
    assert res.summary["resampling"]["val"]["per_source"]["freesound"] == 5
    assert res.summary["resampling"]["val"]["shortfall_source"] == "inat"

    # Faithful to the official order: shuffle the table, then DataFrame.sample per source.
    shuffled = df.sample(frac=1, random_state=42)
    val_pool = shuffled[pool[shuffled.index] == "val"]
    yfcc = val_pool[val_pool.audio_source == "yfcc"]
    want = set(yfcc.sample(got_n := int((res.labels[yfcc.index] == "val").sum()), random_state=42).index)
    assert got_n > 0 and want == set(yfcc.index[res.labels[yfcc.index] == "val"])

    again = geographic_split(df, val_size=1000, test_size=2000)
    pd.testing.assert_series_equal(res.labels, again.labels)


@pytest.mark.shared
def test_geoclip_metric_10km_cells(geoclip: pd.DataFrame) -> None:
    lat = geoclip.latitude.to_numpy()
    lon = geoclip.longitude.to_numpy()
    res = geographic_split(geoclip, cell=10.0, holdout_fraction=0.35)
    _check_invariants(res.labels, res.cells, holdout=0.35)
    # Independent bins: lat bands of 10/111°, lon bins of 10/(111·cos(band centre))°.
    step = 10 / 111
    lat_bin = np.floor((lat + 90) / step).astype(np.int64)
    centre = -90 + (lat_bin + 0.5) * step
    lon_step = 10 / (111 * np.cos(np.radians(centre)))
    lon_bin = np.floor((lon + 180) / lon_step).astype(np.int64)
    pairs = pd.DataFrame({"lat_bin": lat_bin, "lon_bin": lon_bin, "id": res.cells.to_numpy(dtype=np.int64)})
    # One id per (lat_bin, lon_bin) and one (lat_bin, lon_bin) per id: no collisions.
    assert (pairs.groupby(["lat_bin", "lon_bin"])["id"].nunique() == 1).all()
    assert (pairs.groupby("id")[["lat_bin", "lon_bin"]].nunique() == 1).all().all()
    # Every cell is small: no far-apart samples share an id.
    ext = pd.DataFrame({"lat": lat, "lon": lon, "id": pairs.id}).groupby("id").agg(["min", "max"])
    assert ((ext["lat"]["max"] - ext["lat"]["min"]) <= step + 1e-9).all()
    assert ((ext["lon"]["max"] - ext["lon"]["min"]) * 111 * np.cos(np.radians(80)) <= 10 + 1e-6).all()
    # The official ids do collide on this real data.
    official = cell_ids(lat, lon, 10.0, official_cell_ids=True)
    assert pd.Series(official).nunique() < res.cells.nunique()


@pytest.mark.shared
def test_write_split_csv_atomic(birdclef: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "manifest.csv"
    birdclef.iloc[::3].to_csv(src, index=False)  # includes the "-" rows at the end
    out = tmp_path / "out" / "split.csv"
    summary = write_split(src, out, on_error="skip", source_column="primary_label", val_size=100)
    back = pd.read_csv(out, dtype=str, keep_default_na=False)
    orig = pd.read_csv(src, dtype=str, keep_default_na=False)
    assert list(back.columns) == [*orig.columns, "split", "split_cell"]
    pd.testing.assert_frame_equal(back[orig.columns], orig)  # other columns verbatim, "-" kept
    assert (back.split == "invalid").sum() == summary["invalid_rows"] == (orig.latitude == "-").sum()
    assert (back.split_cell[back.split == "invalid"] == "").all()
    assert json.loads(summary_path(out).read_text()) == summary
    assert summary_path(out).name == "split.csv.split-summary.json"
    assert sorted(p.name for p in out.parent.iterdir()) == ["split.csv", "split.csv.split-summary.json"]
    assert "val re-sampled" in format_summary(summary)

    # A failed replace leaves the previous output intact and no temp file behind.
    out.write_text("previous\n")
    summary_path(out).unlink()

    def boom(*_: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(split_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_split(src, out, on_error="skip")
    assert out.read_text() == "previous\n"
    assert [p.name for p in out.parent.iterdir()] == ["split.csv"]


def test_write_split_parquet(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    df = _synthetic(20)
    src = tmp_path / "m.parquet"
    df.to_parquet(src, index=False)
    summary = write_split(src, tmp_path / "o.parquet", seed=1)
    back = pd.read_parquet(tmp_path / "o.parquet")
    assert len(back) == len(df) and {"split", "split_cell"} <= set(back.columns)
    assert back.split.value_counts().to_dict() == {k: v for k, v in summary["samples"].items() if v}
    assert (tmp_path / "o.parquet.split-summary.json").exists()


def test_write_split_elsewhere_keeps_the_file_paths_pointing_at_the_same_files(tmp_path: Path) -> None:
    # Paths in a manifest are relative to its folder: copied verbatim into another folder, they named nothing.
    df = _synthetic(20)
    df["audio_path"] = [f"audio/{i}.wav" for i in range(len(df))]
    df["image_sentinel2"] = ["imagery/mosaic.tif"] * len(df)
    df.loc[0, "image_sentinel2"] = "https://example.org/tile.png"
    (tmp_path / "data").mkdir()
    src = tmp_path / "data" / "m.csv"
    df.to_csv(src, index=False)
    write_split(src, tmp_path / "splits" / "m.csv", seed=1)
    back = pd.read_csv(tmp_path / "splits" / "m.csv", dtype=str, keep_default_na=False)
    for column in ("audio_path", "image_sentinel2"):
        moved = [(tmp_path / "splits" / v).resolve() for v in back[column][1:]]
        assert moved == [(tmp_path / "data" / v).resolve() for v in df[column][1:]]
    assert back.loc[0, "image_sentinel2"] == "https://example.org/tile.png"
    write_split(src, tmp_path / "data" / "same.csv", seed=1)  # the same folder: verbatim
    assert pd.read_csv(tmp_path / "data" / "same.csv", dtype=str).audio_path.tolist() == df.audio_path.tolist()


def test_a_manifest_without_rows_is_refused(tmp_path: Path) -> None:
    # A header-only manifest gave an empty "split" and exit 0.
    from psm.cli import main

    (tmp_path / "m.csv").write_text("key,latitude,longitude\n")
    with pytest.raises(ValueError, match="no rows to split"):
        write_split(tmp_path / "m.csv", tmp_path / "o.csv")
    assert main(["data", "split", str(tmp_path / "m.csv")]) == 2
    assert not (tmp_path / "o.csv").exists()

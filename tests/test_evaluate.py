"""``evaluate_model`` / ``psm evaluate`` / ``psm embed`` end to end on a small GeoTIFF + WAV manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import soundfile as sf
import torch
from affine import Affine
from rasterio.warp import transform as warp_transform

from conftest import tiny_batch
from psm.cli import main as cli_main
from psm.data.audio import clap_fusion_features
from psm.data.batch import Batch
from psm.data.dataset import ManifestDataset
from psm.data.text import build_bpe_tokenizer
from psm.evaluation.embed import embed_split
from psm.evaluation.evaluate import evaluate_manifest, evaluate_model, metadata_settings
from psm.evaluation.report import markdown_report
from psm.models.factory import create_model

RASTER_PX = 2000  # 20 km of 10 m pixels: room for zoom 5's 1280-px window around the central samples
ORIGIN = (500_000.0, 5_000_000.0)  # UTM 33N, near 45° N 15° E
WORDS = ["birds", "rain", "traffic", "wind", "river", "voices", "dogs", "bells", "waves", "insects", "engine", "frogs"]


def _lat_lon(col: float, row: float) -> tuple[float, float]:
    xs, ys = warp_transform("EPSG:32633", "EPSG:4326", [ORIGIN[0] + 10 * col], [ORIGIN[1] - 10 * row])
    return ys[0], xs[0]


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> dict:
    """13 test rows (one with a corrupt WAV, one too close to the raster edge for zoom 5, one without a
    caption), 2 train rows; one 3-band uint8 GeoTIFF that every row points at."""
    root = tmp_path_factory.mktemp("world")
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(3, 50, 50), dtype=np.uint8)
    pixels = np.kron(blocks, np.ones((1, 40, 40), dtype=np.uint8))  # 40-px blocks: a texture that compresses
    with rasterio.open(
        root / "s2.tif",
        "w",
        driver="GTiff",
        width=RASTER_PX,
        height=RASTER_PX,
        count=3,
        dtype="uint8",
        crs="EPSG:32633",
        transform=Affine(10.0, 0.0, ORIGIN[0], 0.0, -10.0, ORIGIN[1]),
        tiled=True,
        compress="deflate",
    ) as dst:
        dst.write(pixels)
    (root / "audio").mkdir()
    rows = []
    sources = ["yfcc", "iNat", "aporee", "freesound"]
    for i in range(15):
        key = f"s{i:02d}"
        col, row = 700 + 50 * i, 1300 - 40 * i
        if i == 1:
            col = 500  # zoom 1 and 3 windows fit; zoom 5's 640-px half-width does not
        lat, lon = _lat_lon(col, row)
        seconds = 1 + (i % 12)  # 1 … 12 s: short (repeat-padded) and long (> 10 s, fused chunks) clips
        wav = root / "audio" / f"{key}.wav"
        if i == 2:
            wav.write_bytes(b"this is not a wav file")
        else:
            t = np.arange(48_000 * seconds) / 48_000
            sf.write(wav, 0.3 * np.sin(2 * np.pi * (200 + 80 * i) * t).astype(np.float32), 48_000)
        rows.append(
            {
                "key": key,
                "audio_path": f"audio/{key}.wav",
                "latitude": lat,
                "longitude": lon,
                "audio_source": sources[i % 4],
                "caption": "" if i == 3 else f"the sound of {WORDS[i % 12]} and {WORDS[(i * 5) % 12]}",
                "caption_source": ["meta", "qwen", "pengi"][i % 3],
                "month": 1 + i % 12,
                "hour": (3 * i) % 24,
                "split": "train" if i >= 13 else "test",
                "image_sentinel2": "s2.tif",
            }
        )
    manifest = root / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    captions = [r["caption"] for r in rows if r["caption"]]
    tokenizer = build_bpe_tokenizer(captions * 3, vocab_size=300)
    return {"root": root, "manifest": manifest, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def model():
    return create_model("psm-tiny", seed=0).eval()


@pytest.fixture(scope="module")
def result(model, small_world) -> dict:
    return evaluate_manifest(
        model, small_world["manifest"], "test", zooms=(1, 3, 5), tokenizer=small_world["tokenizer"], batch_size=5
    )


def test_evaluate_covers_every_zoom_setting_and_text_choice(result):
    settings = ["all", "none", "audio_source", "caption_source", "location", "month", "hour"]
    assert result["metadata_settings"] == settings and result["score"] == "-csd"
    assert len(result["results"]) == 3 * 7 * 2
    combos = {(r["zoom"], r["metadata"], r["add_text"]) for r in result["results"]}
    assert combos == {(z, m, t) for z in (1, 3, 5) for m in settings for t in (False, True)}
    for r in result["results"]:
        for direction in ("i2s", "s2i"):
            m = r[direction]
            assert set(m) == {"recall_at_10pct", "median_rank"}
            assert 0 <= m["recall_at_10pct"] <= 1 and 1 <= m["median_rank"] <= r["n"]
    # mean ‖σ‖₁ per modality and zoom (log σ² ≈ -4 at init: σ ≈ 0.135 per dimension, 32 dimensions)
    unc = {(u["zoom"], u["modality"], u["metadata"]): u["sigma_l1"] for u in result["uncertainty"]}
    for z in (1, 3, 5):
        assert 2.0 < unc[(z, "audio", None)] < 6.0 and 2.0 < unc[(z, "image", "all")] < 6.0
        assert (z, "text", None) in unc and (z, "image+text", "none") in unc and (z, "audio+text", None) in unc


def test_skipped_samples_are_counted_not_lost(result):
    s = result["samples"]
    assert s["expected"] == 13  # test rows of the manifest
    # s02's WAV is corrupt (every zoom); s01 is too close to the raster edge for zoom 5's window
    assert s["evaluated"] == {"1": 12, "3": 12, "5": 11}
    assert s["skipped"] == {"1": 1, "3": 1, "5": 2}
    assert s["with_caption"] == 11  # s03 has none: its text-added queries are its plain queries
    assert any("key s02" in p for p in s["problems"]) and any("key s01" in p for p in s["problems"])
    assert {r["n"] for r in result["results"] if r["zoom"] == 5} == {11}


def _reference_metrics(scores: np.ndarray) -> dict:
    """Straightforward official computation: pandas rank of each row's diagonal entry."""
    n = len(scores)
    ranks = np.array([pd.Series(scores[i]).rank(ascending=False).iloc[i] for i in range(n)])
    return {"recall_at_10pct": float(np.mean(ranks < 10 / 100 * n)), "median_rank": float(pd.Series(ranks).median())}


def test_evaluation_equals_a_straightforward_reference(model, small_world, result):
    # Embed zoom 3 sample by sample, without caching or batching, and score with plain numpy + pandas.
    ds = ManifestDataset(
        small_world["manifest"],
        imagery_source="sentinel2",
        train=False,
        zoom=3,
        split="test",
        spec=model.config.metadata,
        input_size=model.config.image.img_size,
    )
    samples = [s for s in (ds[i] for i in range(len(ds))) if s is not None]
    assert len(samples) == 12
    tok = small_world["tokenizer"]
    img, aud, txt = [], [], []
    with torch.no_grad():
        for s in samples:
            meta = model.config.metadata.encode(
                latitude=[s.metadata["latitude"]],
                longitude=[s.metadata["longitude"]],
                month=[float(s.metadata["month"])],
                hour=[float(s.metadata["hour"])],
                audio_source=[s.metadata["audio_source"]],
                caption_source=[s.metadata["caption_source"]],
            )
            img.append(model.encode_image(s.image[None], torch.tensor([3]), meta, keep_metadata=["location"]))
            feats, longer = clap_fusion_features(s.waveform)
            aud.append(model.encode_audio(feats, longer))
            t = tok([s.caption], return_tensors="pt") if s.caption else None
            txt.append(model.encode_text(t["input_ids"], t["attention_mask"]) if t else None)

    def arrays(embs):
        return (
            np.concatenate([e.unnormalized_mean.double().numpy() for e in embs]),
            np.concatenate([e.logvar.double().numpy() for e in embs]),
        )

    def neg_csd(q, g):
        qm = q[0] / np.linalg.norm(q[0], axis=1, keepdims=True)
        gm = g[0] / np.linalg.norm(g[0], axis=1, keepdims=True)
        return -(2 - 2 * qm @ gm.T + np.exp(q[1]).sum(1)[:, None] + np.exp(g[1]).sum(1)[None, :])

    image, audio = arrays(img), arrays(aud)
    # added text: raw means summed, log-variances summed; no caption → the plain query
    text_raw = np.stack([np.zeros(32) if t is None else t.unnormalized_mean[0].double().numpy() for t in txt])
    text_lv = np.stack([np.zeros(32) if t is None else t.logvar[0].double().numpy() for t in txt])
    image_t, audio_t = (image[0] + text_raw, image[1] + text_lv), (audio[0] + text_raw, audio[1] + text_lv)
    rows = {(r["metadata"], r["add_text"]): r for r in result["results"] if r["zoom"] == 3}
    for add_text, (iq, sq) in {False: (image, audio), True: (image_t, audio_t)}.items():
        row = rows[("location", add_text)]
        assert row["i2s"] == _reference_metrics(neg_csd(iq, audio)), add_text
        assert row["s2i"] == _reference_metrics(neg_csd(sq, image)), add_text


def test_markdown_table_has_every_row(result):
    md = markdown_report(result)
    assert "| Metadata | Text | z1 I2S R@10% | z1 I2S MedR | z1 S2I R@10% | z1 S2I MedR | z3 I2S R@10%" in md
    for name in result["metadata_settings"]:
        assert f"| {name} | – |" in md and f"| {name} | + text |" in md
    assert "skipped by the data error policy: zoom 1: 1, zoom 3: 1, zoom 5: 2" in md
    assert "### Uncertainty" in md


def test_deterministic_model_on_precomputed_features_and_token_ids():
    # The InfoNCE baseline ranks by cosine; batches may carry CLAP features and token ids directly.
    model = create_model("psm-tiny", overrides={"probabilistic": False}, seed=1).eval()
    raw = tiny_batch(model, batch_size=6, seed=3, zooms=(1,))

    def batches(zoom):
        for part in (slice(0, 4), slice(4, 6)):
            yield Batch(
                keys=[f"k{i}" for i in range(6)][part],
                images=raw["images"][part],
                zoom=torch.full((len(range(6)[part]),), zoom),
                metadata=raw["metadata"].select(part),
                input_ids=raw["input_ids"][part],
                attention_mask=raw["attention_mask"][part],
                audio_features=raw["audio_features"][part],
                is_longer=raw["is_longer"][part],
            )
        yield None  # a batch whose samples were all skipped

    out = evaluate_model(model, batches, zooms=(1,), metadata=["all", "location"])
    assert out["score"] == "cosine" and out["uncertainty"] == []
    assert [(r["metadata"], r["add_text"]) for r in out["results"]] == [
        ("all", False),
        ("all", True),
        ("location", False),
        ("location", True),
    ]
    assert out["samples"]["evaluated"] == {"1": 6}
    with pytest.raises(ValueError, match="unknown metadata"):
        metadata_settings(model, ["weather"])
    no_meta = create_model("psm-tiny", overrides={"metadata": {"types": []}}, seed=0)
    assert metadata_settings(no_meta) == [("none", ())]


def test_embed_split_caches_audio_and_text_once(model, small_world):
    calls = {"audio": 0}
    original = model.encode_audio

    def counting(*args):
        calls["audio"] += args[0].shape[0]
        return original(*args)

    ds = ManifestDataset(
        small_world["manifest"],
        imagery_source="sentinel2",
        train=False,
        zoom=1,
        split="test",
        spec=model.config.metadata,
        input_size=model.config.image.img_size,
    )
    subset = [ds[i] for i in (0, 4, 5)]
    from psm.evaluation.embed import eval_collate

    collate = eval_collate(model.config.metadata)
    model.encode_audio = counting
    try:
        emb = embed_split(model, lambda z: [collate(subset)], (1, 3), tokenizer=small_world["tokenizer"])
    finally:
        del model.encode_audio
    assert calls["audio"] == 3  # once per sample, not once per zoom
    assert emb.keys == ["s00", "s04", "s05"] and set(emb.zooms) == {1, 3}


# --- the command line on a converted official checkpoint -------------------------------------------------


@pytest.fixture(scope="module")
def converted_checkpoint(tmp_path_factory, small_world) -> Path:
    from test_checkpoints import OFFICIAL_HPARAMS, _official_replica, _write_official_ckpt

    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    replica = _official_replica(create_model("psm-tiny").config)
    ckpt = root / "epoch=3-I2S_Recall=0.5.ckpt"
    _write_official_ckpt(ckpt, replica, OFFICIAL_HPARAMS)
    out = root / "converted"
    assert cli_main(["convert-checkpoint", str(ckpt), str(out), "--base-config", "psm-tiny"]) == 0
    small_world["tokenizer"].save_pretrained(out / "tokenizer")
    return out


def test_psm_evaluate_on_a_converted_official_checkpoint(converted_checkpoint, small_world, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["evaluate", "--checkpoint", str(converted_checkpoint), "--manifest", str(small_world["manifest"])]
    rc = cli_main([*argv, "--split", "test", "--zoom", "1", "3", "5", "--out", str(out), "--batch-size", "8", "-q"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "metrics.md"]  # no temporary files left
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["results"]) == 42 and metrics["samples"]["evaluated"] == {"1": 12, "3": 12, "5": 11}
    assert metrics["checkpoint"] == str(converted_checkpoint)
    md = (out / "metrics.md").read_text()
    # header + 7 settings × 2 text choices; header + one row per (modality, setting) of the σ table
    assert md.count("\n| ") == 1 + 14 + 1 + len({(u["modality"], u["metadata"]) for u in metrics["uncertainty"]})
    assert "| hour | + text |" in printed and f"wrote {out / 'metrics.json'}" in printed
    # without a tokenizer, a text model is refused with a clear message
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.yaml", "model.safetensors"):
        (bare / f).symlink_to(converted_checkpoint / f)
    assert cli_main([*argv[:1], "--checkpoint", str(bare), *argv[3:], "--zoom", "1", "-q"]) == 2
    assert "no tokenizer was found" in capsys.readouterr().err


def test_psm_embed_writes_parquet(converted_checkpoint, small_world, tmp_path):
    path = tmp_path / "emb" / "test.parquet"
    argv = ["embed", "--checkpoint", str(converted_checkpoint), "--manifest", str(small_world["manifest"])]
    assert cli_main([*argv, "--split", "test", "--out", str(path), "--zoom", "1", "5", "-q"]) == 0
    table = pq.read_table(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["test.parquet"]
    assert table.num_rows == 12  # s02 (corrupt audio) never loaded
    cols = set(table.column_names)
    expected = {"key", "split", "latitude", "longitude", "month", "hour", "audio_source", "caption_source", "caption"}
    expected |= {f"{m}_{v}" for m in ("audio", "text") for v in ("mean", "mean_raw", "logvar")}
    expected |= {f"image_{v}_z{z}" for v in ("features", "mean", "mean_raw", "logvar") for z in (1, 5)}
    assert expected <= cols
    vec = table.schema.field("audio_mean").type
    assert pa.types.is_fixed_size_list(vec) and vec.list_size == 32 and vec.value_type == pa.float32()
    df = table.to_pandas()
    row1 = df.set_index("key").loc["s01"]
    assert row1["image_mean_z5"] is None and row1["image_mean_z1"] is not None  # zoom 5 window off the raster
    assert df.set_index("key").loc["s03", "text_mean"] is None  # no caption
    norms = np.linalg.norm(np.stack(df["audio_mean"].to_numpy()), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    meta = json.loads(table.schema.metadata[b"psm"])
    assert meta["zooms"] == [1, 5] and meta["probabilistic"] is True
    assert meta["split_rows"] == 13 and meta["loaded_per_zoom"] == {"1": 12, "5": 11}


def test_unwritable_out_is_refused_before_the_run(converted_checkpoint, small_world, tmp_path, capsys, monkeypatch):
    """An --out that cannot be written ended a finished evaluation (or embedding) with a traceback."""
    import psm.evaluation.evaluate as evaluate_module

    def no_run(*args, **kwargs):
        raise AssertionError("the run started although its output cannot be written")

    monkeypatch.setattr(evaluate_module, "evaluate_manifest", no_run)
    monkeypatch.setattr(evaluate_module, "manifest_loaders", no_run)
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    common = ["--checkpoint", str(converted_checkpoint), "--manifest", str(small_world["manifest"]), "-q"]
    for command, out, message in [
        ("evaluate", a_file, "exists and is not a folder"),
        ("evaluate", a_file / "sub" / "eval", "not a writable folder"),
        ("embed", tmp_path, "exists and is a folder"),
        ("embed", a_file / "e.parquet", "not a writable folder"),
    ]:
        assert cli_main([command, *common, "--out", str(out)]) == 2, (command, out)
        assert message in capsys.readouterr().err
    assert a_file.read_text() == ""


def test_model_probes_leave_out_samples_that_did_not_load_at_the_zoom():
    """`psm embed` writes null image columns where a sample did not load; the probes failed on them with
    numpy's "all input arrays must have the same shape"."""
    from types import SimpleNamespace

    from psm.evaluation.ceiling import AMBIENCE_COLUMNS, model_probes

    rng = np.random.default_rng(0)
    n, names = 40, ["birds", "rain"]
    events = pd.DataFrame({"key": [f"k{i}" for i in range(n)]})
    for e in names:
        events[e] = rng.integers(0, 2, n).astype(float)
        events[f"p_{e}"] = rng.uniform(size=n)
    for c in AMBIENCE_COLUMNS:
        events[c] = rng.uniform(size=n)
    world = SimpleNamespace(events_table=lambda: events, events=names, path="fake-world")

    def table(keys: list[str]) -> pd.DataFrame:
        t = pd.DataFrame({"key": keys})
        for column in ("image_features_z5", "image_mean_z5", "audio_mean"):
            t[column] = list(rng.normal(size=(len(keys), 4)).astype(np.float32))
        return t

    train, test = table(list(events["key"][:30])), table(list(events["key"][30:]))
    test.loc[2, "image_features_z5"] = test.loc[2, "image_mean_z5"] = None
    probes = model_probes(world, train, test, zoom=5)
    assert len(probes) == 6 and all(0 <= m["recall_at_10pct"] <= 1 for m in probes.values())


def test_markdown_report_explains_the_recall_it_shows(result):
    """With --recall-pct 5 the columns said R@5% but the note still defined R@10% as rank < N/10."""

    def at5(metrics: dict) -> dict:
        return {k.replace("10pct", "5pct"): v for k, v in metrics.items()}

    rows = [{**r, "i2s": at5(r["i2s"]), "s2i": at5(r["s2i"])} for r in result["results"]]
    md = markdown_report({**result, "recall_pct": 5.0, "results": rows})
    assert "| z1 I2S R@5% |" in md and "R@5% = share of queries whose" in md and "< 5/100 · N" in md
    assert "R@10%" not in md


def test_atomic_outputs_get_the_usual_file_mode(tmp_path):
    """metrics.json/metrics.md and the Parquet came out 0600 (mkstemp's mode), unlike any other written file."""
    import os

    from psm.atomic import write_text_atomic
    from psm.evaluation.embed import write_parquet_atomic

    old = os.umask(0o022)
    try:
        text = write_text_atomic(tmp_path / "m.json", "{}\n")
        table = write_parquet_atomic(pa.table({"key": ["a"]}), tmp_path / "e.parquet")
    finally:
        os.umask(old)
    assert oct(text.stat().st_mode & 0o777) == oct(table.stat().st_mode & 0o777) == oct(0o644)
    assert text.read_text() == "{}\n" and pq.read_table(table).column("key").to_pylist() == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.parquet", "m.json"]  # no temporary left


def test_a_split_where_nothing_loads_names_the_manifest_and_a_problem(
    model, small_world, converted_checkpoint, tmp_path, capsys
):
    """When every sample was skipped the error said only "no sample could be loaded": no file, row or reason."""
    df = pd.read_csv(small_world["manifest"])
    df["audio_path"] = "audio/missing.wav"
    df["image_sentinel2"] = str(small_world["root"] / "s2.tif")
    manifest = tmp_path / "nothing-loads.csv"
    df.to_csv(manifest, index=False)
    with pytest.raises(ValueError) as err:
        evaluate_manifest(model, manifest, "test", zooms=(1,), tokenizer=small_world["tokenizer"], batch_size=8)
    message = str(err.value)
    assert str(manifest) in message and "split 'test'" in message
    assert "13 problems" in message and "row 0, key s00" in message and "missing.wav" in message
    with pytest.raises(ValueError, match=r"no rows in split 'tst'"):
        evaluate_manifest(model, manifest, "tst", zooms=(1,))
    argv = ["embed", "--checkpoint", str(converted_checkpoint), "--manifest", str(manifest), "--zoom", "1", "-q"]
    assert cli_main([*argv, "--out", str(tmp_path / "e.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"psm embed: {manifest}: no sample of split 'test'") and "row 0, key s00" in err
    assert not (tmp_path / "e.parquet").exists()


def test_parquet_vectors_of_present_rows_are_written_as_they_are(model):
    """Null-masked columns ran np.nan_to_num over every row: a present row's NaN became 0 and inf 3.4e38."""
    from psm.evaluation.embed import SplitEmbeddings, embeddings_table
    from psm.models.heads import GaussianEmbedding

    d = model.config.embed_dim
    audio = GaussianEmbedding.from_raw(torch.ones(3, d), torch.zeros(3, d))
    raw = torch.ones(3, d)
    raw[2] = 0.0  # no caption
    logvar = torch.zeros(3, d)
    logvar[0, 0], logvar[1, 0] = float("inf"), float("nan")  # broken, but present: must stay visible
    text = GaussianEmbedding(raw / raw.norm(dim=-1, keepdim=True), logvar, raw)
    text.mean[2] = float("nan")
    emb = SplitEmbeddings(["a", "b", "c"], audio, text, torch.tensor([True, True, False]))
    column = embeddings_table(model, emb).column("text_logvar").to_pylist()
    assert column[0][0] == float("inf") and np.isnan(column[1][0]) and column[2] is None
    assert column[0][1:] == [0.0] * (d - 1)


def test_default_evaluate_out_is_next_to_the_checkpoint_folder(tmp_path, monkeypatch):
    """``--checkpoint .`` wrote to a hidden ``.-eval-test`` folder inside the checkpoint, not next to it."""
    import psm.evaluation.command as command

    seen = []

    def stop(path, folder):
        seen.append(path)
        raise command._UsageError("stopped before the run")

    monkeypatch.setattr(command, "_check_out", stop)
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path / "ckpt")
    for checkpoint in (".", str(tmp_path / "ckpt") + "/"):
        assert cli_main(["evaluate", "--checkpoint", checkpoint, "--manifest", "m.csv", "-q"]) == 2
    assert [p.resolve() for p in seen] == [tmp_path / "ckpt-eval-test"] * 2

"""psm map query / top / temporal / uncertainty on small indexes written directly in the index format."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from psm.evaluation.retrieval import cosine_scores, csd_scores
from psm.maps.query import (
    PROMPT_TEMPLATES,
    ConditionedEmbeddings,
    MapIndex,
    MapQueryError,
    MetadataSetting,
    QueryEmbedding,
    ScaleSpec,
    combine_queries,
    condition,
    embed_audio_query,
    embed_text_query,
    expand_templates,
    query_map,
    read_scale_file,
    resolve_scale,
    score,
    top_k,
)

CAPTIONS = [
    "birds chirping in a forest at dawn",
    "waves crashing on a sandy beach",
    "traffic noise in a busy city street",
    "wind through the trees and a distant dog",
]


# --------------------------------------------------------------------------------------------------------
# helpers: a tiny checkpoint with a tokenizer, and an index in the psm-map-index/1 format
# --------------------------------------------------------------------------------------------------------


def make_checkpoint(root: Path, name: str = "ckpt", *, seed: int = 0, overrides: dict | None = None) -> Path:
    """Save psm-tiny (random weights) with a small offline BPE tokenizer in CKPT/tokenizer."""
    from psm.data.text import build_bpe_tokenizer
    from psm.models.checkpoint import save_checkpoint
    from psm.models.factory import create_model

    model = create_model("psm-tiny", seed=seed, overrides=overrides)
    ckpt = save_checkpoint(model, root / name)
    build_bpe_tokenizer(CAPTIONS * 5, vocab_size=300).save_pretrained(str(ckpt / "tokenizer"))
    return ckpt


def write_test_index(
    root: Path,
    model,
    *,
    width: int = 60,
    height: int = 40,
    crs: str = "EPSG:32633",
    zooms: tuple[int, ...] = (1, 3),
    chunk_size: int = 512,
    polygon: bool = True,
    invalid_fraction: float = 0.1,
    seed: int = 0,
    done: dict[int, list[int]] | None = None,
) -> Path:
    """An index folder with random pre-fusion features for a W×H grid (an ellipse of it when ``polygon``)."""
    import pandas as pd
    import zarr
    from rasterio.transform import from_origin, xy
    from rasterio.warp import transform as warp

    rng = np.random.default_rng(seed)
    # EPSG:32633: a 100 m UTM grid near Berlin; EPSG:6933 (equal-area cylindrical): a 1 km grid near lon 13, lat 52
    utm = crs == "EPSG:32633"
    tr = from_origin(330_000, 5_830_000, 100, 100) if utm else from_origin(1_250_000, 5_950_000, 1000, 1000)
    rr, cc = np.mgrid[0:height, 0:width]
    keep = np.ones_like(rr, dtype=bool)
    if polygon:  # points cover only part of the raster, as for a polygon region
        keep = ((rr - height / 2) / (height / 2)) ** 2 + ((cc - width / 2) / (width / 2)) ** 2 <= 1.0
    rows, cols = rr[keep].astype(np.int32), cc[keep].astype(np.int32)
    xs, ys = xy(tr, rows, cols, offset="center")
    lon, lat = warp(crs, "EPSG:4326", list(xs), list(ys))
    n, d = len(rows), model.config.embed_dim
    root.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "point_id": np.arange(n, dtype=np.int64),
            "latitude": np.asarray(lat, dtype=np.float64),
            "longitude": np.asarray(lon, dtype=np.float64),
            "row": rows,
            "col": cols,
        }
    ).to_parquet(root / "points.parquet")
    group = zarr.open_group(str(root / "features.zarr"), mode="w")
    n_chunks = math.ceil(n / chunk_size)
    for z in zooms:
        feats = rng.standard_normal((n, d)).astype(np.float16)
        valid = rng.random(n) >= invalid_fraction
        feats[~valid] = np.nan  # the indexer leaves rows without imagery as NaN
        group.create_array(f"z{z}", data=feats, chunks=(chunk_size, d))
        group.create_array(f"valid_z{z}", data=valid, chunks=(chunk_size,))
        flags = np.ones(n_chunks, dtype=np.uint8)
        for k in (done or {}).get(z, []):
            flags[k] = 0
        group.create_array(f"done_z{z}", data=flags, chunks=(1,))
    meta = {
        "format": "psm-map-index/1",
        "model": {"name": model.config.name, "config": model.config.to_dict()},
        "imagery_source": "sentinel2",
        "zooms": list(zooms),
        "embed_dim": d,
        "num_points": n,
        "chunk_size": chunk_size,
        "grid": {"crs": crs, "transform": list(tr)[:6], "width": width, "height": height},
        "region": {"type": "polygon" if polygon else "bbox"},
        "created_by": "psm tests",
    }
    (root / "index.json").write_text(json.dumps(meta))
    return root


def direct_embeddings(index: MapIndex, model, zoom: int, setting: MetadataSetting):
    """Fused embeddings of every valid point computed in one go, the obvious way (the reference)."""
    spec = model.config.metadata
    s = setting.resolve(spec)
    valid = index.valid(zoom)
    ids = np.flatnonzero(valid)
    feats = torch.from_numpy(np.asarray(index.features(zoom)[:])[ids].astype(np.float32))
    m = len(ids)
    pts = index.points
    md = spec.encode(
        latitude=pts["latitude"].to_numpy()[ids] if s.location else None,
        longitude=pts["longitude"].to_numpy()[ids] if s.location else None,
        month=None if s.month is None else [s.month] * m,
        hour=None if s.hour is None else [s.hour] * m,
        audio_source=None if s.audio_source is None else [s.audio_source] * m,
        caption_source=None if s.caption_source is None else [s.caption_source] * m,
        batch_size=m,
    )
    model.eval()
    with torch.no_grad():
        emb = model.embed_image_features(feats, md, keep_metadata=s.keep())
    return ids, emb


# --------------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from psm.data.text import load_tokenizer
    from psm.models.factory import create_model

    root = tmp_path_factory.mktemp("mapq")
    ckpt = make_checkpoint(root)
    model = create_model(ckpt).eval()
    index = MapIndex(write_test_index(root / "index", model))
    tok = load_tokenizer(ckpt / "tokenizer")
    query = embed_text_query(model, tok, "birds chirping in a forest")
    return {"root": root, "ckpt": ckpt, "model": model, "index": index, "tok": tok, "query": query}


SETTING = MetadataSetting(month=5, hour=20, audio_source="iNat")


# --------------------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------------------


def test_scores_equal_direct_csd(env, tmp_path):
    index, model, q = env["index"], env["model"], env["query"]
    cond = condition(index, model, 1, SETTING, cache_dir=tmp_path)
    s = score(cond, q)
    ids, emb = direct_embeddings(index, model, 1, SETTING)
    ref = csd_scores(
        torch.from_numpy(q.mean)[None], torch.from_numpy(q.logvar)[None], emb.unnormalized_mean, emb.logvar
    )[0].numpy()
    assert s.dtype == np.float32 and s.shape == (index.num_points,)
    np.testing.assert_allclose(s[ids], ref, atol=3e-3, rtol=0)  # float16 μ
    assert np.isnan(s[~index.valid(1)]).all()
    assert np.isfinite(s[ids]).all()
    # Σσ² per point is the head's, and unit μ rows of valid points.
    np.testing.assert_allclose(cond.const[ids], emb.logvar.exp().sum(-1).numpy(), rtol=1e-5)
    norms = np.linalg.norm(np.asarray(cond.mean[ids], dtype=np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)


def test_streaming_from_cache_equals_in_memory(env, tmp_path):
    cond = condition(env["index"], env["model"], 1, SETTING, cache_dir=tmp_path)
    assert isinstance(cond.mean, np.memmap)
    a = score(cond, env["query"], block_rows=64)
    b = score(cond.load(), env["query"])
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, atol=1e-5, equal_nan=True)


def test_top_k_equals_argsort_of_full_scores(env, tmp_path):
    cond = condition(env["index"], env["model"], 1, SETTING, cache_dir=tmp_path)
    full = score(cond, env["query"])
    ids, vals = top_k(cond, env["query"], 20)
    ref = np.argsort(-np.where(np.isnan(full), -np.inf, full), kind="stable")[:20]
    np.testing.assert_array_equal(ids, ref)
    np.testing.assert_array_equal(vals, full[ref])
    assert env["index"].valid(1)[ids].all()
    # k larger than the number of valid points: only valid ones come back
    ids_all, _ = top_k(cond, env["query"], env["index"].num_points + 5)
    assert len(ids_all) == int(cond.valid.sum())


def test_conditioning_cache_is_reused(env, tmp_path):
    index, model = env["index"], env["model"]
    calls = {"n": 0}
    original = model.embed_image_features

    def counting(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    model.embed_image_features = counting
    try:
        c1 = condition(index, model, 1, SETTING, cache_dir=tmp_path, batch_size=256)
        first = calls["n"]
        c2 = condition(index, model, 1, SETTING, cache_dir=tmp_path, batch_size=256)
        assert first > 0 and calls["n"] == first  # second call: no fusion at all
        assert c1.path == c2.path and (c1.path / "setting.json").is_file()
        condition(index, model, 1, MetadataSetting(month=6, hour=20, audio_source="iNat"), cache_dir=tmp_path)
        assert calls["n"] > first  # another setting is another cache
    finally:
        del model.embed_image_features
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    meta = json.loads((c1.path / "setting.json").read_text())
    assert meta["setting"]["month"] == 5 and meta["zoom"] == 1


def test_conditioned_cache_folder_is_readable_by_others_under_the_umask(env, tmp_path):
    """The cache folder of a shared index follows the umask (mkdtemp's 0700 locked other users out of it)."""
    old = os.umask(0o022)
    try:
        cond = condition(env["index"], env["model"], 1, SETTING, cache_dir=tmp_path)
    finally:
        os.umask(old)
    assert cond.path.stat().st_mode & 0o777 == 0o755


def test_metadata_changes_the_map(env, tmp_path):
    index, model, q = env["index"], env["model"], env["query"]
    s6 = score(condition(index, model, 1, MetadataSetting(hour=6), cache_dir=tmp_path), q)
    s14 = score(condition(index, model, 1, MetadataSetting(hour=14), cache_dir=tmp_path), q)
    ok = np.isfinite(s6)
    assert np.abs(s6[ok] - s14[ok]).max() > 1e-3
    on = score(condition(index, model, 1, MetadataSetting(location=True), cache_dir=tmp_path), q)
    off = score(condition(index, model, 1, MetadataSetting(location=False), cache_dir=tmp_path), q)
    assert np.abs(on[ok] - off[ok]).max() > 1e-3
    # location defaults to on when the model uses it
    auto = condition(index, model, 1, MetadataSetting(), cache_dir=tmp_path)
    assert auto.setting.location is True


def test_deterministic_model_scores_are_cosines(tmp_path):
    from psm.models.factory import create_model

    model = create_model("psm-tiny", seed=1, overrides={"probabilistic": False}).eval()
    index = MapIndex(write_test_index(tmp_path / "idx", model, zooms=(1,), polygon=False))
    from psm.data.text import build_bpe_tokenizer

    q = embed_text_query(model, build_bpe_tokenizer(CAPTIONS, vocab_size=300), "waves on a beach")
    assert q.logvar is None
    setting = MetadataSetting(hour=8)
    cond = condition(index, model, 1, setting)
    assert cond.sigma_l1 is None
    s = score(cond, q)
    ids, emb = direct_embeddings(index, model, 1, setting)
    ref = cosine_scores(torch.from_numpy(q.mean)[None], emb.unnormalized_mean)[0].numpy()
    np.testing.assert_allclose(s[ids], ref, atol=2e-3)
    with pytest.raises(MapQueryError, match="deterministic"):
        from psm.maps.uncertainty import uncertainty_maps

        uncertainty_maps(index, model, tmp_path / "u")


def test_audio_query(env, tmp_path):
    import soundfile as sf

    wav = tmp_path / "clip.wav"
    t = np.arange(16000 * 2) / 16000
    sf.write(wav, (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    q = embed_audio_query(env["model"], wav)
    assert q.kind == "audio" and q.mean.shape == (env["model"].config.embed_dim,)
    np.testing.assert_allclose(np.linalg.norm(q.mean), 1.0, atol=1e-5)
    q2 = embed_audio_query(env["model"], wav)
    np.testing.assert_array_equal(q.mean, q2.mean)  # deterministic chunks


# --------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------


def test_errors(env, tmp_path):
    from psm.models.factory import create_model

    index, model = env["index"], env["model"]
    with pytest.raises(MapQueryError, match=r"zoom 7 is not in the index .*\[1, 3\]"):
        condition(index, model, 7, MetadataSetting(), cache_dir=tmp_path)
    with pytest.raises(MapQueryError, match="month out of range"):
        condition(index, model, 1, MetadataSetting(month=13), cache_dir=tmp_path)
    for bad in (MetadataSetting(month=float("nan")), MetadataSetting(hour=float("inf"))):  # NaN reads as unknown
        with pytest.raises(MapQueryError, match="must be a finite number"):
            condition(index, model, 1, bad, cache_dir=tmp_path)
    with pytest.raises(MapQueryError, match="unknown audio_source"):
        condition(index, model, 1, MetadataSetting(audio_source="radio"), cache_dir=tmp_path)
    small = create_model("psm-tiny", seed=0, overrides={"metadata": {"types": ["location", "month"]}}).eval()
    with pytest.raises(MapQueryError, match="does not use metadata hour"):
        condition(index, small, 1, MetadataSetting(hour=5), cache_dir=tmp_path)
    none = create_model("psm-tiny", seed=0, overrides={"metadata": {"types": []}}).eval()
    with pytest.raises(MapQueryError, match="does not use metadata location"):
        condition(index, none, 1, MetadataSetting(location=True), cache_dir=tmp_path)
    wide = create_model("psm-tiny", seed=0, overrides={"embed_dim": 16, "fusion": {"heads": 2}}).eval()
    with pytest.raises(MapQueryError, match="embed_dim"):
        condition(index, wide, 1, MetadataSetting(), cache_dir=tmp_path)
    with pytest.raises(MapQueryError, match="not a map index"):
        MapIndex(tmp_path)


def test_incomplete_index_refused_or_nodata(env, tmp_path):
    model = env["model"]
    index = MapIndex(write_test_index(tmp_path / "idx", model, zooms=(1,), chunk_size=256, done={1: [1]}))
    with pytest.raises(MapQueryError, match=r"incomplete at zoom 1: 1 of \d+ chunks"):
        condition(index, model, 1, MetadataSetting())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cond = condition(index, model, 1, MetadataSetting(), allow_incomplete=True)
    assert any("incomplete" in str(x.message) for x in w)
    s = score(cond, env["query"])
    assert np.isnan(s[256:512]).all()
    assert np.isfinite(s[:256][cond.valid[:256]]).all() and cond.valid[:256].sum() > 200


def test_encoder_fingerprint_mismatch_is_refused(env, tmp_path):
    pytest.importorskip("psm.maps.index")
    root = write_test_index(tmp_path / "idx", env["model"], zooms=(1,))
    meta = json.loads((root / "index.json").read_text())
    meta["model"]["fingerprint"] = "0123456789abcdef"
    (root / "index.json").write_text(json.dumps(meta))
    with pytest.raises(MapQueryError, match="not the one that built the index"):
        condition(MapIndex(root), env["model"], 1, MetadataSetting())


# --------------------------------------------------------------------------------------------------------
# scales
# --------------------------------------------------------------------------------------------------------


def test_scales(tmp_path):
    v = np.concatenate([np.linspace(-3, -1, 1000), [np.nan] * 10]).astype(np.float32)
    raw = resolve_scale(ScaleSpec.parse("raw"), v)
    np.testing.assert_array_equal(raw.apply(v), v)
    pct = resolve_scale(ScaleSpec.parse("percentile"), v)
    out = pct.apply(v)
    assert np.nanmin(out) == 0.0 and np.nanmax(out) == 1.0 and np.isnan(out[-10:]).all()
    assert pct.vmin == pytest.approx(np.percentile(v[:1000], 2), abs=1e-4)
    f = tmp_path / "scale.json"
    first = resolve_scale(ScaleSpec.parse(f"shared:{f}"), v)
    assert f.is_file() and read_scale_file(f) == first
    again = resolve_scale(ScaleSpec.parse(f"shared:{f}"), v * 2)  # read, not recomputed
    assert (again.vmin, again.vmax) == (first.vmin, first.vmax)
    assert ScaleSpec.parse("percentile:5,95").percentiles == (5.0, 95.0)
    for bad in ("log", "percentile:9,1", "percentile:x", "raw:3"):
        with pytest.raises(MapQueryError):
            ScaleSpec.parse(bad)


# --------------------------------------------------------------------------------------------------------
# end to end: query map, temporal, uncertainty, CLI
# --------------------------------------------------------------------------------------------------------


def test_query_map_outputs(env, tmp_path):
    import rasterio

    index, model, q = env["index"], env["model"], env["query"]
    out = query_map(index, model, q, tmp_path / "m", zoom=1, setting=SETTING, cache_dir=tmp_path / "c")
    with rasterio.open(out.tif) as ds:
        band = ds.read(1)
        assert ds.tags()["PSM_QUERY"] == q.describe()
    pts = index.points
    cond = condition(index, model, 1, SETTING, cache_dir=tmp_path / "c")
    s = score(cond, q)
    got = band[pts["row"], pts["col"]]
    np.testing.assert_allclose(got, s, atol=1e-6, equal_nan=True)
    assert out.png.is_file() and out.html.is_file()


def test_temporal_shared_scale_and_gif(env, tmp_path):
    import rasterio
    from PIL import Image

    from psm.maps.temporal import temporal_maps

    index, model, q = env["index"], env["model"], env["query"]
    hours = [0, 6, 12, 18]
    res = temporal_maps(index, model, q, tmp_path / "t", hours=hours, zoom=1, cache_dir=tmp_path / "c")
    assert [f.tif.name for f in res.frames] == ["t_h00.tif", "t_h06.tif", "t_h12.tif", "t_h18.tif"]
    raws = res.extra["raw_scores"]
    joint = np.concatenate([r[np.isfinite(r)] for r in raws])
    assert res.scale.vmin == pytest.approx(np.percentile(joint, 2), rel=1e-5)
    assert res.scale.vmax == pytest.approx(np.percentile(joint, 98), rel=1e-5)
    pts = index.points
    for f, r in zip(res.frames, raws, strict=True):
        with rasterio.open(f.tif) as ds:
            scale = json.loads(ds.tags()["PSM_SCALE"])
            assert (scale["vmin"], scale["vmax"]) == (res.scale.vmin, res.scale.vmax)
            band = ds.read(1)
        np.testing.assert_allclose(band[pts["row"], pts["col"]], res.scale.apply(r), equal_nan=True)
    with Image.open(res.gif) as gif:
        assert gif.n_frames == len(hours)
    assert not np.allclose(raws[0], raws[2], equal_nan=True)  # the hour matters with a non-trivial fusion
    assert res.mp4 is None


def test_uncertainty_matches_sigma_l1(env, tmp_path):
    import rasterio

    from psm.maps.uncertainty import IMAGE_ONLY, uncertainty_maps

    index, model = env["index"], env["model"]
    outs = uncertainty_maps(index, model, tmp_path / "u", cache_dir=tmp_path / "c", formats=("tif", "png"))
    assert [o.tif.name for o in outs] == ["u_z1.tif", "u_z3.tif"]
    pts = index.points
    for o, z in zip(outs, (1, 3), strict=True):
        ids, emb = direct_embeddings(index, model, z, IMAGE_ONLY)
        ref = (emb.logvar / 2).exp().sum(-1).numpy()
        with rasterio.open(o.tif) as ds:
            band = ds.read(1)
        got = band[pts["row"].to_numpy()[ids], pts["col"].to_numpy()[ids]]
        np.testing.assert_allclose(got, ref, rtol=1e-5)
        assert np.isnan(band[pts["row"][~index.valid(z)], pts["col"][~index.valid(z)]]).all()
        assert o.png.is_file()


def test_combine_queries_is_the_mixtures_moment_matched_gaussian():
    e1, e2 = np.eye(3, dtype=np.float32)[:2]
    a = QueryEmbedding(mean=e1, logvar=np.log(np.full(3, 0.1, np.float32)), kind="text", label="a")
    b = QueryEmbedding(mean=e2, logvar=np.log(np.full(3, 0.3, np.float32)), kind="text", label="b")
    ab = combine_queries([a, b])
    np.testing.assert_allclose(ab.mean, [2**-0.5, 2**-0.5, 0.0], rtol=1e-6)  # the mean direction, unit length
    # mean σ² (0.2) plus the spread of the means about their centre (0.5, 0.5, 0) → 0.25 in the first two dims
    np.testing.assert_allclose(np.exp(ab.logvar), [0.45, 0.45, 0.2], rtol=1e-6)
    assert ab.label == "a | b" and ab.kind == "text"
    assert combine_queries([a]) is a  # one query is itself: single-text maps are unchanged
    with pytest.raises(MapQueryError, match="cancel out"):
        combine_queries([a, QueryEmbedding(mean=-e1, logvar=a.logvar, kind="text", label="-a")])
    with pytest.raises(MapQueryError, match="one kind"):
        combine_queries([a, QueryEmbedding(mean=e2, logvar=None, kind="text", label="c")])


def test_expand_templates_and_text_ensembles(env):
    assert expand_templates(["owl", "owl"], ("{}", "the sound of {}")) == ["owl", "the sound of owl"]
    with pytest.raises(MapQueryError, match=r"needs \{\}"):
        expand_templates("owl", ("the sound of it",))
    with pytest.raises(MapQueryError, match="empty"):
        expand_templates(["owl", " "])
    model, tok = env["model"], env["tok"]
    texts = ["birds chirping", "dawn chorus"]
    ensemble = embed_text_query(model, tok, texts, templates=PROMPT_TEMPLATES)
    one_by_one = [embed_text_query(model, tok, p) for p in expand_templates(texts, PROMPT_TEMPLATES)]
    expected = combine_queries(one_by_one)
    np.testing.assert_allclose(ensemble.mean, expected.mean, atol=1e-5)
    np.testing.assert_allclose(ensemble.logvar, expected.logvar, atol=1e-4)
    assert ensemble.label == "birds chirping | dawn chorus (×5 prompts)"
    assert not np.allclose(ensemble.mean, one_by_one[0].mean, atol=1e-3)


def test_cli_query_top_and_errors(env, tmp_path, capsys):
    import rasterio

    from psm.maps.query_command import main

    common = ["--index", str(env["index"].path), "--checkpoint", str(env["ckpt"]), "--device", "cpu"]
    rc = main(["query", *common, "--text", "birds chirping", "--hour", "6", "--month", "5", "--zoom", "3",
               "--scale", "percentile", "--out", str(tmp_path / "q")])  # fmt: skip
    assert rc == 0
    for ext in ("tif", "png", "html"):
        assert (tmp_path / f"q.{ext}").is_file()
    with rasterio.open(tmp_path / "q.tif") as ds:
        v = ds.read(1)
        assert np.nanmin(v) == 0.0 and np.nanmax(v) == 1.0
        assert json.loads(ds.tags()["PSM_METADATA"])["hour"] == 6

    rc = main(["top", *common, "--text", "birds chirping", "-k", "5", "--csv", str(tmp_path / "top.csv")])
    assert rc == 0
    import pandas as pd

    top = pd.read_csv(tmp_path / "top.csv")
    assert list(top.columns[:4]) == ["rank", "latitude", "longitude", "score"] and len(top) == 5
    assert (np.diff(top["score"]) <= 0).all()

    capsys.readouterr()
    assert main(["query", *common, "--text", "x", "--zoom", "7", "--out", str(tmp_path / "e")]) == 2
    assert "zoom 7 is not in the index" in capsys.readouterr().err
    assert main(["query", *common, "--text", "x", "--scale", "shared", "--out", str(tmp_path / "e")]) == 2
    assert "shared:FILE" in capsys.readouterr().err
    assert main(["query", *common, "--text", "x", "--hour", "25", "--out", str(tmp_path / "e")]) == 2
    assert "hour out of range" in capsys.readouterr().err
    assert main(["query", *common, "--text", "x", "--basemap", "tiles.png", "--out", str(tmp_path / "e")]) == 2
    assert "XYZ URL template" in capsys.readouterr().err
    assert main(["query", *common, "--audio", "a.wav", "--prompt-ensemble", "--out", str(tmp_path / "e")]) == 2
    assert "go with --text" in capsys.readouterr().err
    # Several phrasings in prompt templates: one map, the ensemble named in its legend and tags.
    rc = main(["query", *common, "--text", "birds chirping", "--text", "dawn chorus", "--prompt-ensemble",
               "--template", "a field recording of {}", "--zoom", "1", "--out", str(tmp_path / "ens")])  # fmt: skip
    assert rc == 0
    with rasterio.open(tmp_path / "ens.tif") as ds:
        assert "birds chirping | dawn chorus (×6 prompts)" in json.dumps(ds.tags(), ensure_ascii=False)
    assert not (tmp_path / "e.tif").exists()
    # An index whose points have no imagery: a clear message, not an empty table
    empty = write_test_index(tmp_path / "empty", env["model"], invalid_fraction=1.0)
    rc = main(["top", "--index", str(empty), "--checkpoint", str(env["ckpt"]), "--device", "cpu", "--text", "x"])
    assert rc == 2 and "no point of the index has imagery at zoom 1" in capsys.readouterr().err


def test_cli_temporal_and_uncertainty(env, tmp_path):
    from psm.maps.query_command import main

    common = ["--index", str(env["index"].path), "--checkpoint", str(env["ckpt"]), "--device", "cpu"]
    rc = main(["temporal", *common, "--text", "dawn chorus", "--hours", "6", "14", "--month", "5",
               "--scale", f"shared:{tmp_path / 'scale.json'}", "--out", str(tmp_path / "t")])  # fmt: skip
    assert rc == 0 and (tmp_path / "t.gif").is_file() and (tmp_path / "scale.json").is_file()
    assert (tmp_path / "t_h06.png").is_file() and (tmp_path / "t_h14.tif").is_file()
    rc = main(["uncertainty", "--index", str(env["index"].path), "--checkpoint", str(env["ckpt"]),
               "--device", "cpu", "--zoom", "3", "--out", str(tmp_path / "u")])  # fmt: skip
    assert rc == 0 and (tmp_path / "u_z3.tif").is_file() and not (tmp_path / "u_z1.tif").exists()


def test_conditioned_cache_opens_alone(env, tmp_path):
    cond = condition(env["index"], env["model"], 3, MetadataSetting(hour=3), cache_dir=tmp_path)
    again = ConditionedEmbeddings.open(cond.path)
    assert again.setting == cond.setting and again.zoom == 3
    np.testing.assert_array_equal(again.valid, cond.valid)


def test_score_kernel_threads_and_block_edges():
    from psm.maps.query import score_arrays

    rng = np.random.default_rng(3)
    n, d = 1031, 48  # not a multiple of the block rows
    mean = rng.standard_normal((n, d)).astype(np.float16)
    const = rng.random(n).astype(np.float32)
    const[::97] = np.nan
    q = torch.from_numpy(rng.standard_normal(d).astype(np.float32))
    ref = mean.astype(np.float64) @ q.double().numpy() - const - 0.5
    for threads, rows in ((1, 64), (2, 64), (3, 100), (2, 4096)):
        out = score_arrays(mean, const, q, 0.5, np.empty(n, np.float32), block_rows=rows, threads=threads)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4, equal_nan=True)
    assert torch.get_num_threads() == 2  # the caller's thread setting is restored


@pytest.mark.slow
def test_compiled_scorer_matches_blocks(env, tmp_path):
    """The optional fused torch.compile kernel (compiles once, ~20 s cold) gives the block kernel's scores."""
    cond = condition(env["index"], env["model"], 1, SETTING, cache_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a silent fallback would make this test meaningless
        fused = score(cond, env["query"], scorer="compiled")
    blocks = score(cond, env["query"], scorer="blocks")
    np.testing.assert_allclose(fused, blocks, atol=1e-5, equal_nan=True)
    ids, _ = top_k(cond, env["query"], 10, scorer="compiled")
    np.testing.assert_array_equal(ids, top_k(cond, env["query"], 10)[0])
    with pytest.raises(MapQueryError, match="unknown scorer"):
        score(cond, env["query"], scorer="gpu")


def test_agreement_over_an_index_without_imagery_is_a_clear_error(env, tmp_path):
    """An index whose points all lack imagery is refused by name, not with numpy's IndexError on the deciles."""
    from psm.maps.agreement import truth_agreement

    class FlatWorld:  # the two things truth_agreement asks of a world
        events = ("traffic",)

        def probabilities(self, lat, lon, hour, month, audio_source=None):
            return np.full((len(lat), 1), 0.5)

    index = MapIndex(write_test_index(tmp_path / "idx", env["model"], zooms=(1,), invalid_fraction=1.0))
    with pytest.raises(MapQueryError, match="no point with imagery at zoom 1"):
        truth_agreement(
            index, env["model"], env["tok"], FlatWorld(), month=5, hours=[6], zoom=1, events=["traffic"],
            cache_dir=tmp_path / "cache",
        )  # fmt: skip

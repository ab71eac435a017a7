"""Every shipped training config parses (types and keys checked by jsonargparse) and composes as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"


def _print_config(capsys, *files: str, extra: tuple[str, ...] = ()) -> dict:
    from psm.training.datamodule import PSMDataModule
    from psm.training.module import PSMTrainingModule
    from psm.training.train import PSMCLI, trainer_defaults

    args = [a for f in files for a in ("--config", str(CONFIGS / f))] + list(extra) + ["--print_config"]
    with pytest.raises(SystemExit) as done:
        PSMCLI(PSMTrainingModule, PSMDataModule, args=args, run=False, trainer_defaults=trainer_defaults())
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize(
    "files",
    [
        ("paper.yaml", "geosound-sentinel2.yaml"),
        ("paper.yaml", "geosound-bing.yaml", "infonce.yaml"),
        ("paper.yaml", "soundingearth.yaml", "no-metadata.yaml"),
    ],
)
def test_paper_configs_compose(capsys, files):
    cfg = _print_config(capsys, *files)
    assert cfg["model"]["lr"] == 5e-5 and cfg["model"]["schedule"] == "official"
    assert cfg["trainer"]["precision"] == "16-mixed" and cfg["data"]["batch_size"] == 128
    assert "imagery_source" not in cfg["model"]  # linked from data.imagery_source: one source of truth
    assert cfg["data"]["imagery_source"] in ("sentinel2", "bing", "google_earth")
    if "infonce.yaml" in files:
        assert cfg["model"]["loss"] == "infonce"
    if "no-metadata.yaml" in files:
        assert cfg["model"]["metadata_types"] == []


def test_command_line_overrides_the_yaml(capsys):
    cfg = _print_config(capsys, "paper.yaml", "geosound-sentinel2.yaml", extra=("--trainer.max_steps", "7"))
    assert cfg["trainer"]["max_steps"] == 7


def test_a_typo_in_a_config_is_an_error(tmp_path, capsys):
    from psm.training.datamodule import PSMDataModule
    from psm.training.module import PSMTrainingModule
    from psm.training.train import PSMCLI, trainer_defaults

    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  lerning_rate: 1.0\n")
    args = ["--config", str(CONFIGS / "paper.yaml"), "--config", str(bad), "--print_config"]
    with pytest.raises(SystemExit) as done:
        PSMCLI(PSMTrainingModule, PSMDataModule, args=args, run=False, trainer_defaults=trainer_defaults())
    assert done.value.code == 2
    assert "does not accept option 'lerning_rate'" in capsys.readouterr().err


# --- the paper architecture against the real one -------------------------------------------------------------
#
# Numbers below are facts about the released models, not read from psm:
# * SatMAE ViT-B/16 (mvrl/PSM geoclap/models/SATMAE.py ``vit_base_patch16``): width 768, depth 12, 12 heads,
#   MLP ratio 4, qkv bias, 16-px patches on 224-px inputs; ``pos_embed``, ``cls_token``, ``norm`` and ``head``
#   deleted, a fresh ``fc_norm`` added (``global_pool=True``). Projector Linear(768→512)→GELU→Linear(512→512).
# * ``laion/clap-htsat-fused`` config.json: written by transformers' CLAP conversion script, which sets only the
#   HTSAT patch width 96, depths [2, 2, 6, 2] and hidden size 768 (audio), hidden size 768 (text) and
#   enable_fusion, everything else being ClapAudioConfig/ClapTextConfig defaults; cross-checked against a
#   manifest of the released config.json (revision 365dea6e) which also counts 266 ``audio_model.*`` tensors.
# * Metadata fusion (mvrl/PSM geoclap/models/metadata_encoder.py, MLP.py): 3 post-LN layers, d 512, 8 heads,
#   FFN 2048 (torch default), 4 audio sources, 3 caption sources, metaNet in→64→512 for lat/lon (4), month (2),
#   hour (2); heads Linear(512→512)→GELU→Linear(512→512), μ and σ (PCME++) or one head (InfoNCE, audio/text).

CLAP_HTSAT_FUSED_AUDIO = {
    "spec_size": 256,
    "num_mel_bins": 64,
    "patch_size": 4,
    "patch_stride": [4, 4],
    "patch_embed_input_channels": 1,
    "patch_embeds_hidden_size": 96,
    "enable_patch_layer_norm": True,
    "flatten_patch_embeds": True,
    "depths": [2, 2, 6, 2],
    "num_attention_heads": [4, 8, 16, 32],
    "window_size": 8,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "hidden_size": 768,
    "projection_dim": 512,
    "projection_hidden_act": "relu",
    "enable_fusion": True,
    "fusion_type": None,
    "aff_block_r": 4,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-5,
}
CLAP_HTSAT_FUSED_TEXT = {
    "vocab_size": 50265,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "pad_token_id": 1,
    "hidden_act": "gelu",
    "projection_dim": 512,
    "projection_hidden_act": "relu",
}


def _meta_model(cfg):
    """The model with shapes only (no memory, no initialisation cost): the paper size builds in a second."""
    import torch

    from psm.models.psm import PSM

    with torch.device("meta"):
        return PSM(cfg)


def _linear(prefix: str, n_out: int, n_in: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (n_out, n_in), f"{prefix}.bias": (n_out,)}


def _norm(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,)}


def _batch_norm(prefix: str, n: int) -> dict[str, tuple[int, ...]]:
    return {**_norm(prefix, n), f"{prefix}.running_mean": (n,), f"{prefix}.running_var": (n,),
            f"{prefix}.num_batches_tracked": ()}  # fmt: skip


def _mlp_head(prefix: str, d: int = 512) -> dict[str, tuple[int, ...]]:
    return {**_linear(f"{prefix}.linear1", d, d), **_linear(f"{prefix}.linear2", d, d)}


def official_state_shapes(probabilistic: bool = True, metadata: bool = True) -> dict[str, tuple[int, ...]]:
    """Key → shape of an official PSM Lightning checkpoint (transformers 4.28.1 names), from the numbers above."""
    s: dict[str, tuple[int, ...]] = {}
    # image tower
    vit, d = "sat_encoder.encoder.backbone", 512
    s[f"{vit}.patch_embed.proj.weight"], s[f"{vit}.patch_embed.proj.bias"] = (768, 3, 16, 16), (768,)
    for i in range(12):
        b = f"{vit}.blocks.{i}"
        s |= _norm(f"{b}.norm1", 768) | _linear(f"{b}.attn.qkv", 3 * 768, 768) | _linear(f"{b}.attn.proj", 768, 768)
        s |= _norm(f"{b}.norm2", 768) | _linear(f"{b}.mlp.fc1", 4 * 768, 768) | _linear(f"{b}.mlp.fc2", 768, 4 * 768)
    s |= _norm(f"{vit}.fc_norm", 768)
    proj = "sat_encoder.encoder.projector"
    s |= _linear(f"{proj}.linear1", d, 768) | _linear(f"{proj}.linear2", d, d)
    if metadata:
        fuser = "sat_encoder.encoder.meta_fuser"
        s[f"{fuser}.cls_token"] = (1, 1, d)
        for i in range(3):
            layer = f"{fuser}.transformer_encoder.layers.{i}"
            s[f"{layer}.self_attn.in_proj_weight"], s[f"{layer}.self_attn.in_proj_bias"] = (3 * d, d), (3 * d,)
            s |= _linear(f"{layer}.self_attn.out_proj", d, d)
            s |= _linear(f"{layer}.linear1", 2048, d) | _linear(f"{layer}.linear2", d, 2048)
            s |= _norm(f"{layer}.norm1", d) | _norm(f"{layer}.norm2", d)
        s[f"{fuser}.meta_embed.audio_source_fc.source_embed.weight"] = (4, d)
        s[f"{fuser}.meta_embed.caption_source_fc.source_embed.weight"] = (3, d)
        for name, n_in in (("location_fc", 4), ("month_fc", 2), ("time_fc", 2)):
            s |= _linear(f"{fuser}.meta_embed.{name}.fc1", 64, n_in) | _linear(f"{fuser}.meta_embed.{name}.fc2", d, 64)
    if probabilistic:
        s |= _mlp_head("sat_encoder.encoder.mean_head") | _mlp_head("sat_encoder.encoder.std_head")
    # audio tower: HTSAT-fused
    a = CLAP_HTSAT_FUSED_AUDIO
    enc = "audio_encoder.model.model.audio_model.audio_encoder"
    c0, k = a["patch_embeds_hidden_size"], a["patch_size"]
    r = c0 // a["aff_block_r"]
    s[f"{enc}.patch_embed.proj.weight"], s[f"{enc}.patch_embed.proj.bias"] = (c0, 1, k, k), (c0,)
    s[f"{enc}.patch_embed.mel_conv2d.weight"], s[f"{enc}.patch_embed.mel_conv2d.bias"] = (c0, 1, k, 3 * k), (c0,)
    s |= _norm(f"{enc}.patch_embed.norm", c0)
    for branch, (down, bn1, up, bn2) in (("local_att", (0, 1, 3, 4)), ("global_att", (1, 2, 4, 5))):
        aff = f"{enc}.patch_embed.fusion_model.{branch}"
        s[f"{aff}.{down}.weight"], s[f"{aff}.{down}.bias"] = (r, c0, 1, 1), (r,)
        s[f"{aff}.{up}.weight"], s[f"{aff}.{up}.bias"] = (c0, r, 1, 1), (c0,)
        s |= _batch_norm(f"{aff}.{bn1}", r) | _batch_norm(f"{aff}.{bn2}", c0)
    window = a["window_size"]
    for i, (depth, heads) in enumerate(zip(a["depths"], a["num_attention_heads"], strict=True)):
        dim = c0 * 2**i
        for j in range(depth):
            b = f"{enc}.layers.{i}.blocks.{j}"
            s |= _norm(f"{b}.layernorm_before", dim) | _norm(f"{b}.layernorm_after", dim)
            s[f"{b}.attention.self.relative_position_bias_table"] = ((2 * window - 1) ** 2, heads)
            s[f"{b}.attention.self.relative_position_index"] = (window**2, window**2)
            for name in ("query", "key", "value"):
                s |= _linear(f"{b}.attention.self.{name}", dim, dim)
            s |= _linear(f"{b}.attention.output.dense", dim, dim)
            s |= _linear(f"{b}.intermediate.dense", 4 * dim, dim) | _linear(f"{b}.output.dense", dim, 4 * dim)
        if i < len(a["depths"]) - 1:
            s[f"{enc}.layers.{i}.downsample.reduction.weight"] = (2 * dim, 4 * dim)
            s |= _norm(f"{enc}.layers.{i}.downsample.norm", 4 * dim)
    s |= _batch_norm(f"{enc}.batch_norm", a["num_mel_bins"]) | _norm(f"{enc}.norm", a["hidden_size"])
    proj = "audio_encoder.model.model.audio_projection"
    s |= _linear(f"{proj}.linear1", d, a["hidden_size"]) | _linear(f"{proj}.linear2", d, d)
    # text tower: RoBERTa-base
    t, h = CLAP_HTSAT_FUSED_TEXT, CLAP_HTSAT_FUSED_TEXT["hidden_size"]
    emb = "text_encoder.model.model.text_model.embeddings"
    s[f"{emb}.position_ids"] = (1, t["max_position_embeddings"])  # a persistent buffer in transformers 4.28
    s[f"{emb}.word_embeddings.weight"] = (t["vocab_size"], h)
    s[f"{emb}.position_embeddings.weight"] = (t["max_position_embeddings"], h)
    s[f"{emb}.token_type_embeddings.weight"] = (t["type_vocab_size"], h)
    s |= _norm(f"{emb}.LayerNorm", h)
    for i in range(t["num_hidden_layers"]):
        b = f"text_encoder.model.model.text_model.encoder.layer.{i}"
        for name in ("query", "key", "value"):
            s |= _linear(f"{b}.attention.self.{name}", h, h)
        s |= _linear(f"{b}.attention.output.dense", h, h) | _norm(f"{b}.attention.output.LayerNorm", h)
        s |= _linear(f"{b}.intermediate.dense", t["intermediate_size"], h)
        s |= _linear(f"{b}.output.dense", h, t["intermediate_size"]) | _norm(f"{b}.output.LayerNorm", h)
    s |= _linear("text_encoder.model.model.text_model.pooler.dense", h, h)
    proj = "text_encoder.model.model.text_projection"
    s |= _linear(f"{proj}.linear1", d, h) | _linear(f"{proj}.linear2", d, d)
    for tower in ("audio_encoder", "text_encoder"):
        heads = ("mean_head", "std_head") if probabilistic else ("head",)
        for head in heads:
            s |= _mlp_head(f"{tower}.{head}")
    return s


def test_official_shape_table_counts_the_released_clap_tensors():
    table = official_state_shapes()
    assert sum(k.startswith("audio_encoder.model.model.audio_model.") for k in table) == 266


@pytest.mark.parametrize("name", ["psm-paper", "psm-paper-infonce"])
def test_paper_clap_towers_are_clap_htsat_fused(name):
    from psm.models.config import load_model_config

    model = _meta_model(load_model_config(name))
    audio, text = model.audio.tower.clap.config, model.text.tower.clap.config

    def fields(config, names):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(config, k)) for k in names)}

    assert fields(audio, CLAP_HTSAT_FUSED_AUDIO) == CLAP_HTSAT_FUSED_AUDIO
    assert fields(text, CLAP_HTSAT_FUSED_TEXT) == CLAP_HTSAT_FUSED_TEXT
    image = model.config.image
    assert (image.img_size, image.patch_size, image.width, image.depth, image.heads, image.mlp_ratio) == (
        224, 16, 768, 12, 12, 4.0,
    )  # fmt: skip
    assert model.config.embed_dim == 512


@pytest.mark.parametrize(
    ("hparams", "probabilistic", "metadata"),
    [
        ({"probabilistic": True, "metadata_type": "latlong_month_time_asource_tsource"}, True, True),
        ({"probabilistic": False, "loss_type": "infonce", "metadata_type": "latlong_month_time_asource_tsource"},
         False, True),
        ({"probabilistic": True, "metadata_type": "none", "dataset_type": "SoundingEarth"}, True, False),
    ],
)  # fmt: skip
def test_a_released_paper_checkpoint_converts_with_every_key_and_shape(hparams, probabilistic, metadata):
    """An official checkpoint with the real architecture's keys and shapes maps completely onto psm-paper."""
    import torch

    from psm.models.convert import config_from_official_hparams, convert_official_state_dict

    table = official_state_shapes(probabilistic=probabilistic, metadata=metadata)
    state = {k: torch.empty(shape, device="meta") for k, shape in table.items()}
    model = _meta_model(config_from_official_hparams({"sat_type": "sentinel", "fc_dim": 512, **hparams}))
    ours, _, report = convert_official_state_dict(state, model)
    assert report.shape_mismatches == []
    assert report.unmapped == [] and report.missing_in_file == []
    # the only state psm adds is the index buffer transformers 4.28 did not save
    assert report.recreated_buffers == ["text.tower.clap.text_model.embeddings.token_type_ids"]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected
    assert sum(v.numel() for v in ours.values()) == sum(v.numel() for v in model.state_dict().values())


# The official training recipe (mvrl/PSM geoclap/train.py defaults and the README's command: --num_workers 8;
# engine.py configure_optimizers; criterions/loss_configs.py; dataloader.py with_epoch), as psm's options.
OFFICIAL_RECIPE = {
    ("seed_everything",): 56,
    ("trainer", "precision"): "16-mixed",  # Trainer(precision=16)
    # max_epochs 30 × with_epoch(train_epoch_length 10,000) batches per loader worker × 8 workers
    ("trainer", "max_steps"): 30 * 10_000 * 8,
    ("trainer", "val_check_interval"): 500,
    ("trainer", "limit_val_batches"): 30,
    ("trainer", "num_sanity_val_steps"): 0,
    ("trainer", "gradient_clip_val"): None,
    ("trainer", "accumulate_grad_batches"): 1,
    ("model", "model"): "psm-paper",
    ("model", "lr"): 5e-5,
    ("model", "weight_decay"): 0.2,
    ("model", "betas"): [0.9, 0.98],
    ("model", "eps"): 1e-6,
    ("model", "decay_loss_scalars"): True,  # one AdamW group over self.parameters()
    ("model", "schedule"): "official",  # CosineAnnealingWarmRestarts(T_0=warm_up_iterations), per step
    ("model", "restart_steps"): 5000,
    ("model", "alpha"): 0.1,  # pseudo_match_alpha
    ("model", "beta"): 1e-4,  # vib_beta
    ("model", "init_shift"): 5.0,
    ("model", "init_negative_scale"): 5.0,
    ("model", "pair_weights"): {"image_audio": 0.5, "image_text": 0.5, "audio_text": 0.5},
    ("model", "seed"): 56,
    ("data", "batch_size"): 128,
    ("data", "num_workers"): 8,
    ("data", "max_length"): 128,
}
# Per dataset: imagery source (GSD in m/px of the raw tile, tile size, zoom levels), from SATMAE.py image_gsd and
# SatImage_transform.py tile_size; SoundingEarth forces googleEarth at zoom 1.
OFFICIAL_SOURCES = {
    "geosound-sentinel2.yaml": ("sentinel", 10.0, 256, (1, 3, 5)),
    "geosound-bing.yaml": ("bingmap", 0.6, 300, (1, 3, 5)),
    "soundingearth.yaml": ("googleEarth", 0.2, 256, (1,)),
}


@pytest.mark.parametrize("dataset", sorted(OFFICIAL_SOURCES))
def test_paper_configs_are_the_official_recipe(capsys, dataset):
    from psm.data.imagery_sources import get_imagery_source
    from psm.losses.trimodal import DEFAULT_PAIR_WEIGHTS

    cfg = _print_config(capsys, "paper.yaml", dataset)
    got = {}
    for path in OFFICIAL_RECIPE:
        value = cfg
        for key in path:
            value = value[key]
        got[path] = value
    if got["model", "pair_weights"] is None:  # the loss's default
        got["model", "pair_weights"] = dict(DEFAULT_PAIR_WEIGHTS)
    assert got == OFFICIAL_RECIPE
    assert cfg["model"].get("metadata_types") is None  # all five types, as the psm-paper architecture lists
    source = get_imagery_source(cfg["data"]["imagery_source"])
    official, gsd, tile, zooms = OFFICIAL_SOURCES[dataset]
    assert source == get_imagery_source(official)
    assert (source.base_gsd_m, source.tile_size, source.zoom_levels) == (gsd, tile, zooms)

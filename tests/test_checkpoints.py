"""Our safetensors checkpoints, the SatMAE loader and the import of official PSM checkpoints."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import (
    ClapAudioConfig,
    ClapAudioModelWithProjection,
    ClapTextConfig,
    ClapTextModelWithProjection,
)

from conftest import tiny_batch
from psm.cli import main as cli_main
from psm.losses import TriModalLoss
from psm.models.checkpoint import CheckpointError, load_checkpoint, read_checkpoint_config, save_checkpoint
from psm.models.convert import ConversionError, convert_official_checkpoint
from psm.models.factory import create_model
from psm.models.satellite import load_satmae_pretrained


def _embed(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch)


def test_save_load_round_trip_gives_identical_outputs(tiny_model, tmp_path):
    batch = tiny_batch(tiny_model)
    before = _embed(tiny_model, batch)
    out = save_checkpoint(tiny_model, tmp_path / "ckpt", extra_tensors={"loss.shift": torch.tensor([5.0])})
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "model.safetensors"]
    loaded, extra = load_checkpoint(out)
    after = _embed(loaded, batch)
    for k in before:
        assert torch.equal(before[k].mean, after[k].mean) and torch.equal(before[k].logvar, after[k].logvar)
    assert torch.equal(extra["loss.shift"], torch.tensor([5.0]))
    # the factory accepts a checkpoint folder too
    assert torch.equal(_embed(create_model(out), batch)["image"].mean, before["image"].mean)


def test_checkpoint_holds_no_absolute_paths(tiny_model, tmp_path):
    out = save_checkpoint(tiny_model, tmp_path / "ckpt")
    assert str(tmp_path) not in (out / "config.yaml").read_text()
    # a model started from a local CLAP folder does not record that folder (its weights are in the file)
    tiny_model.config.audio.pretrained = str(tmp_path / "clap-htsat-fused")
    tiny_model.config.text.pretrained = str(tmp_path / "clap-htsat-fused")
    try:
        out = save_checkpoint(tiny_model, tmp_path / "ckpt2")
        assert tiny_model.config.audio.pretrained is not None  # the model's own config is left alone
    finally:
        tiny_model.config.audio.pretrained = tiny_model.config.text.pretrained = None
    assert str(tmp_path) not in (out / "config.yaml").read_text()
    load_checkpoint(out)


def test_save_is_atomic_and_refuses_to_overwrite(tiny_model, tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    save_checkpoint(tiny_model, target)
    with pytest.raises(FileExistsError):
        save_checkpoint(tiny_model, target)

    import psm.models.checkpoint as ckpt_mod

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no half-written folder left behind


def test_loading_a_checkpoint_with_missing_or_unexpected_keys_fails_clearly(tiny_model, tmp_path):
    out = save_checkpoint(tiny_model, tmp_path / "ckpt")
    weights = load_file(str(out / "model.safetensors"))
    broken = dict(weights)
    del broken["image.encoder.projector.linear1.weight"]
    broken["image.encoder.surprise"] = torch.zeros(1)
    save_file(broken, str(out / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing keys: \['image.encoder.projector.linear1.weight'\]"):
        load_checkpoint(out)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_checkpoint(out)
    with pytest.raises(CheckpointError, match="not a psm checkpoint"):
        read_checkpoint_config(tmp_path)


def test_satmae_loader_reports_missing_and_unexpected_keys(tiny_model, tmp_path, caplog):
    # A SatMAE-style pre-training file: MAE encoder with CLS token, learned pos_embed, final norm, decoder.
    cfg = tiny_model.config.image
    mae = VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        num_classes=0,
    )
    state = dict(mae.state_dict())
    state["decoder_embed.weight"] = torch.zeros(8, cfg.width)
    state["mask_token"] = torch.zeros(1, 1, 8)
    path = tmp_path / "pretrain-vit-base-e199.pth"
    torch.save({"model": state, "epoch": 199}, path)
    with caplog.at_level(logging.INFO):
        report = load_satmae_pretrained(tiny_model.image.encoder, path)
    assert report.missing == ["fc_norm.bias", "fc_norm.weight"]
    assert {"cls_token", "pos_embed", "norm.weight", "decoder_embed.weight", "mask_token"} <= set(report.unexpected)
    assert torch.equal(tiny_model.image.encoder.backbone.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])
    assert "unexpected key mismatch" not in caplog.text  # every mismatch was an expected one


def test_satmae_loader_rejects_wrong_shapes(tiny_model, tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(3, 3, 3, 3)}}, path)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_satmae_pretrained(tiny_model.image.encoder, path)


# --- a replica of the official module tree (attribute names as in mvrl/PSM), with tiny shapes ----------


class _Projector(nn.Module):
    def __init__(self, d_in, d):
        super().__init__()
        self.linear1, self.linear2, self.gelu = nn.Linear(d_in, d), nn.Linear(d, d), nn.GELU()


class _SourceEncoding(nn.Module):
    def __init__(self, n, d):
        super().__init__()
        self.source_embed = nn.Embedding(n, d)


class _MetaNet(nn.Module):
    def __init__(self, d_in, d):
        super().__init__()
        self.fc1, self.fc2, self.gelu = nn.Linear(d_in, 16), nn.Linear(16, d), nn.GELU()


def _official_replica(cfg, with_metadata=True, probabilistic=True):
    d = cfg.embed_dim
    vit = VisionTransformer(
        img_size=cfg.image.img_size,
        patch_size=cfg.image.patch_size,
        embed_dim=cfg.image.width,
        depth=cfg.image.depth,
        num_heads=cfg.image.heads,
        mlp_ratio=cfg.image.mlp_ratio,
        norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
    )
    # What the official VisionTransformer subclass does with global_pool=True:
    vit.fc_norm = nn.LayerNorm(cfg.image.width, eps=1e-6)
    del vit.norm, vit.cls_token, vit.pos_embed, vit.head
    sat = nn.Module()
    sat.encoder = nn.Module()
    sat.encoder.backbone, sat.encoder.projector = vit, _Projector(cfg.image.width, d)
    if with_metadata:
        fuser = nn.Module()
        fuser.transformer_encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(d, cfg.fusion.heads, cfg.fusion.ffn, batch_first=True, activation="gelu"),
            num_layers=cfg.fusion.layers,
        )
        fuser.cls_token = nn.Parameter(torch.randn(1, 1, d))
        fuser.meta_embed = nn.Module()
        fuser.meta_embed.audio_source_fc = _SourceEncoding(4, d)
        fuser.meta_embed.caption_source_fc = _SourceEncoding(3, d)
        fuser.meta_embed.location_fc, fuser.meta_embed.month_fc = _MetaNet(4, d), _MetaNet(2, d)
        fuser.meta_embed.time_fc = _MetaNet(2, d)
        sat.encoder.meta_fuser = fuser
    root = nn.Module()
    root.sat_encoder = sat
    for name, model_cls, cfg_cls, tower in (
        ("audio_encoder", ClapAudioModelWithProjection, ClapAudioConfig, cfg.audio),
        ("text_encoder", ClapTextModelWithProjection, ClapTextConfig, cfg.text),
    ):
        enc = nn.Module()
        enc.model = nn.Module()
        enc.model.model = model_cls(cfg_cls(projection_dim=d, **tower.hf_config))
        if probabilistic:
            enc.mean_head, enc.std_head = _Projector(d, d), _Projector(d, d)
        else:
            enc.head = _Projector(d, d)
        setattr(root, name, enc)
    if probabilistic:
        sat.encoder.mean_head, sat.encoder.std_head = _Projector(d, d), _Projector(d, d)
    root.criterion = nn.Module()
    if probabilistic:
        root.criterion.shift = nn.Parameter(torch.tensor([4.5]))
        root.criterion.negative_scale = nn.Parameter(torch.tensor([5.5]))
    else:
        root.criterion.tau = nn.Parameter(torch.tensor([1.5]))
    return root


def _tiny_meta_training_fusion(cfg):
    # The replica's metaNet hidden width is 16; the tiny config's is 16 too (checked here, not assumed).
    assert cfg.fusion.token_hidden == 16


def _write_official_ckpt(path: Path, replica, hparams, extra_state=None):
    state = dict(replica.state_dict())
    # transformers versions differ in which index buffers they save; the conversion recreates/drops them
    state.pop("text_encoder.model.model.text_model.embeddings.token_type_ids", None)
    state["audio_encoder.model.model.audio_model.embeddings.position_ids"] = torch.arange(4)[None]
    state.update(extra_state or {})
    torch.save(
        {
            "epoch": 0,
            "global_step": 1500,
            "pytorch-lightning_version": "2.0.2",
            "state_dict": state,
            "hyper_parameters": hparams,
        },
        path,
    )
    return state


OFFICIAL_HPARAMS = {
    "fc_dim": 32,
    "metadata_type": "latlong_month_time_asource_tsource",
    "meta_droprate": 0.5,
    "sat_type": "sentinel",
    "probabilistic": True,
    "loss_type": "pcmepp",
    "modality_type": "sat_audio_text",
    "dataset_type": "GeoSound",
    "freeze": "false",
    "pretrained_model_path": "/storage1/fs1/somebody/checkpoints/SATMAE/pretrain-vit-base-e199.pth",
}


def test_official_checkpoint_conversion_maps_every_key(tmp_path):
    tiny = create_model("psm-tiny").config
    _tiny_meta_training_fusion(tiny)
    replica = _official_replica(tiny)
    ckpt = tmp_path / "epoch=0-I2S_Recall=0.666.ckpt"
    state = _write_official_ckpt(ckpt, replica, OFFICIAL_HPARAMS)
    report = convert_official_checkpoint(ckpt, tmp_path / "converted", base_config="psm-tiny")
    assert report.complete, report.summary()
    assert report.recreated_buffers == ["text.tower.clap.text_model.embeddings.token_type_ids"]
    assert report.dropped_buffers == ["audio.tower.clap.audio_model.embeddings.position_ids"]
    assert len(report.mapped) == len(state) - 1
    model, extra = load_checkpoint(tmp_path / "converted")
    ours = model.state_dict()
    for official_key, our_key in report.mapped.items():
        target = extra[our_key] if our_key.startswith("loss.") else ours[our_key]
        assert torch.equal(target, state[official_key]), official_key
    assert extra["loss.criterion.shift"].item() == pytest.approx(4.5)
    assert extra["loss.criterion.negative_scale"].item() == pytest.approx(5.5)
    # Same layout as a trained run's export: the scalars load straight into the tri-modal loss.
    loss = TriModalLoss("pcmepp")
    loss.load_state_dict({k.removeprefix("loss."): v for k, v in extra.items()})
    assert loss.criterion.shift.item() == pytest.approx(4.5)
    text = (tmp_path / "converted" / "config.yaml").read_text()
    assert "/storage1" not in text and str(tmp_path) not in text  # no absolute paths carried over
    assert model.config.metadata.types == ("audio_source", "caption_source", "location", "month", "hour")
    assert model.config.image.imagery_source == "sentinel2"


def test_conversion_refuses_a_partial_map_unless_asked(tmp_path):
    tiny = create_model("psm-tiny").config
    replica = _official_replica(tiny)
    ckpt = tmp_path / "official.ckpt"
    state = _write_official_ckpt(
        ckpt, replica, OFFICIAL_HPARAMS, extra_state={"sat_encoder.gpo.weight": torch.zeros(2)}
    )
    with pytest.raises(ConversionError, match=r"unmapped keys in the file: 1\n  sat_encoder.gpo.weight"):
        convert_official_checkpoint(ckpt, tmp_path / "out", base_config="psm-tiny")
    assert not (tmp_path / "out").exists()
    report = convert_official_checkpoint(ckpt, tmp_path / "out", base_config="psm-tiny", allow_partial=True)
    assert report.unmapped == ["sat_encoder.gpo.weight"]
    # a file lacking a tensor the model needs is also refused
    del state["sat_encoder.encoder.projector.linear1.weight"]
    torch.save({"state_dict": state, "hyper_parameters": OFFICIAL_HPARAMS}, ckpt)
    with pytest.raises(ConversionError, match="model keys the file lacks: 1"):
        convert_official_checkpoint(ckpt, tmp_path / "out2", base_config="psm-tiny")


def test_conversion_of_the_infonce_baseline_without_metadata(tmp_path):
    tiny = create_model("psm-tiny").config
    replica = _official_replica(tiny, with_metadata=False, probabilistic=False)
    hp = {**OFFICIAL_HPARAMS, "metadata_type": "none", "probabilistic": "false", "loss_type": "infonce"}
    ckpt = tmp_path / "infonce.ckpt"
    _write_official_ckpt(ckpt, replica, hp)
    assert cli_main(["convert-checkpoint", str(ckpt), str(tmp_path / "out"), "--base-config", "psm-tiny"]) == 0
    model, extra = load_checkpoint(tmp_path / "out")
    assert not model.config.probabilistic and model.image.fusion is None
    loss = TriModalLoss("infonce")
    loss.load_state_dict({k.removeprefix("loss."): v for k, v in extra.items()})
    assert loss.criterion.tau.item() == pytest.approx(1.5)


def test_conversion_cli_reports_unreadable_files(tmp_path, capsys):
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"not a checkpoint")
    assert cli_main(["convert-checkpoint", str(bad), str(tmp_path / "out")]) == 2
    assert "garbage.ckpt: cannot be read safely" in capsys.readouterr().err


def test_conversion_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"x": Evil()}}, ckpt)
    with pytest.raises(ConversionError, match="cannot be read safely"):
        convert_official_checkpoint(ckpt, tmp_path / "out", base_config="psm-tiny")

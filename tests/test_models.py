"""The PSM model: GSD embedding, towers, metadata fusion and masking by name, bad-input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_batch
from psm.data.metadata import MetadataError
from psm.models.factory import create_model
from psm.models.fusion import exact_count_dropout
from psm.models.gsd_pos_embed import gsd_pos_embed


def _official_style_gsd_embed(res: float, grid: int, dim: int) -> np.ndarray:
    """Independent NumPy reading of Scale-MAE's formula: meshgrid(w, h) ("xy"), then [emb(w), emb(h)]."""
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="xy")

    def emb1d(pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
        out = np.outer(pos.reshape(-1) * res, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([emb1d(gw), emb1d(gh)], axis=1)


@pytest.mark.parametrize("res", [10.0, 30.0, 0.6, 3.0])
def test_gsd_embedding_formula(res):
    ours = gsd_pos_embed(torch.tensor([res]), grid_size=14, dim=768)[0].double().numpy()
    assert ours.shape == (196, 768)
    np.testing.assert_allclose(ours, _official_style_gsd_embed(res, 14, 768), atol=2e-4)


def test_gsd_embedding_is_per_sample_and_scales_with_resolution():
    pe = gsd_pos_embed(torch.tensor([10.0, 20.0]), grid_size=4, dim=16)
    # token (row 0, col 2) at res 10 sees position 20, like token (row 0, col 1) at res 20
    assert torch.allclose(pe[0, 2], pe[1, 1], atol=1e-6)
    # first half encodes the column: tokens in one column share it, across rows
    assert torch.allclose(pe[0, 1, :8], pe[0, 5, :8]) and not torch.allclose(pe[0, 1, 8:], pe[0, 5, 8:])


def test_tiny_model_embeds_all_modalities_with_mixed_zooms(tiny_model):
    tiny_model.eval()
    with torch.no_grad():
        out = tiny_model(**tiny_batch(tiny_model))
    for name in ("image", "audio", "text"):
        emb = out[name]
        assert emb.mean.shape == emb.logvar.shape == (4, 32)
        assert torch.allclose(emb.mean.norm(dim=-1), torch.ones(4), atol=1e-5)
        assert torch.allclose(emb.mean, emb.unnormalized_mean / emb.unnormalized_mean.norm(dim=-1, keepdim=True))
        # σ-head biases at −4 give log σ² ≈ −4 at init
        assert abs(emb.logvar.mean().item() + 4) < 0.5


@pytest.mark.slow
def test_paper_size_model_forward_on_cpu():
    model = create_model("psm-paper", seed=0).eval()
    assert model.image.encoder.backbone.embed_dim == 768
    assert len(model.image.encoder.backbone.blocks) == 12
    md = model.config.metadata.encode(
        latitude=[40.0, -33.9, 51.5],
        longitude=[-74.0, 151.2, -0.1],
        month=[5, 1, 12],
        hour=[8, 20, 0],
        audio_source=["iNat", "yfcc", "aporee"],
        caption_source=["meta", "qwen", "pengi"],
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        out = model(
            torch.randn(3, 3, 224, 224, generator=g),
            torch.tensor([1, 3, 5]),
            torch.randn(3, 4, 1001, 64, generator=g),
            torch.tensor([True, False, True]),
            torch.randint(0, 50265, (3, 16), generator=g),
            torch.ones(3, 16, dtype=torch.long),
            metadata=md,
        )
    for name in ("image", "audio", "text"):
        assert out[name].mean.shape == (3, 512) and out[name].logvar.shape == (3, 512)
        assert torch.isfinite(out[name].logvar).all()


def test_zoom_changes_the_image_embedding_through_gsd(tiny_model):
    tiny_model.eval()
    img = torch.randn(1, 3, 64, 64).repeat(3, 1, 1, 1)
    with torch.no_grad():
        feats = tiny_model.image_features(img, torch.tensor([1, 3, 5]))
    assert not torch.allclose(feats[0], feats[1]) and not torch.allclose(feats[1], feats[2])


def test_gsd_embedding_keeps_the_residual_stream_float32_under_autocast(tiny_model):
    """Under AMP the float32 GSD embedding promotes the tokens to float32 (official, timm); a bf16 model stays bf16."""
    tiny_model.eval()
    encoder = tiny_model.image.encoder
    seen: list[torch.dtype] = []
    hook = encoder.backbone.blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    img, zoom = torch.randn(2, 3, 64, 64), torch.tensor([1, 5])
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            encoder(img, zoom)
        assert seen == [torch.float32]
        half = create_model("psm-tiny", seed=0).image.encoder.to(torch.bfloat16).eval()
        with torch.no_grad():
            assert half(img.to(torch.bfloat16), zoom).dtype == torch.bfloat16
    finally:
        hook.remove()


def test_fusion_sequence_is_float32_under_autocast():
    """The official float32 CLS promotes the fusion input to float32 under AMP; a bf16 model stays bf16."""
    model = create_model("psm-tiny", overrides={"metadata": {"types": ["month", "hour"]}}, seed=0).eval()
    fusion = model.image.fusion
    seen: list[torch.dtype] = []
    fusion.transformer.layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    feats = torch.randn(2, 32).to(torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fusion(feats, None)
    assert seen == [torch.float32]
    with torch.no_grad():
        assert fusion.to(torch.bfloat16)(feats, None).dtype == torch.bfloat16


def test_metadata_masked_by_name_ignores_the_masked_values(tiny_model):
    tiny_model.eval()
    batch = tiny_batch(tiny_model)
    spec = tiny_model.config.metadata
    feats = tiny_model.image_features(batch["images"], batch["zoom"]).detach()
    other = spec.encode(
        latitude=[1.0, 2.0, 3.0, 4.0],
        longitude=[5.0, 6.0, 7.0, 8.0],
        month=batch_month(batch, spec),
        hour=[5.0, 6.0, 7.0, 8.0],
        audio_source=["freesound"] * 4,
        caption_source=["pengi"] * 4,
    )
    with torch.no_grad():
        a = tiny_model.embed_image_features(feats, batch["metadata"], keep_metadata=["month"])
        b = tiny_model.embed_image_features(feats, other, keep_metadata=["month"])
        c = tiny_model.embed_image_features(feats, other, keep_metadata=["month", "hour"])
        none = tiny_model.embed_image_features(feats, batch["metadata"], keep_metadata=[])
        nothing_given = tiny_model.embed_image_features(feats, None)
    assert torch.allclose(a.mean, b.mean, atol=1e-6)  # only the (equal) month is used
    assert not torch.allclose(b.mean, c.mean)  # the hour now counts
    assert torch.allclose(none.mean, nothing_given.mean, atol=1e-6)


def batch_month(batch, spec):
    # recover the months of the batch from their encoding: the angle of (sin, cos) × 12 / 2π
    enc = batch["metadata"].values["month"].double()
    months = torch.remainder(torch.atan2(enc[:, 0], enc[:, 1]) * 12 / (2 * np.pi), 12)
    months[months < 0.5] = 12
    return months.round().tolist()


def test_masking_by_name_works_for_models_trained_with_a_subset():
    # The official ablation mask used fixed columns {asource:0, ..., time:4}; with only
    # (location, month, hour) configured, "keep hour" must still mean the hour token.
    model = create_model("psm-tiny", overrides={"metadata": {"types": ["location", "month", "hour"]}}, seed=0).eval()
    spec = model.config.metadata
    feats = torch.randn(2, 32)
    base = spec.encode(latitude=[10.0, 20.0], longitude=[0.0, 0.0], month=[1, 2], hour=[3, 4])
    moved = spec.encode(latitude=[-60.0, 70.0], longitude=[100.0, -100.0], month=[7, 9], hour=[3, 4])
    new_hour = spec.encode(latitude=[10.0, 20.0], longitude=[0.0, 0.0], month=[1, 2], hour=[15, 16])
    with torch.no_grad():
        ref = model.embed_image_features(feats, base, keep_metadata=["hour"]).mean
        assert torch.allclose(ref, model.embed_image_features(feats, moved, keep_metadata=["hour"]).mean, atol=1e-6)
        assert not torch.allclose(ref, model.embed_image_features(feats, new_hour, keep_metadata=["hour"]).mean)


def test_unknown_or_unconfigured_metadata_names_raise(tiny_model):
    feats = torch.randn(2, 32)
    with pytest.raises(MetadataError, match="unknown metadata type 'weather'"):
        tiny_model.embed_image_features(feats, None, keep_metadata=["weather"])
    subset = create_model("psm-tiny", overrides={"metadata": {"types": ["month"]}}, seed=0)
    with pytest.raises(MetadataError, match="unknown metadata type 'hour'"):
        subset.embed_image_features(feats, None, keep_metadata=["hour"])


def test_exact_count_metadata_dropout():
    valid = torch.ones(10, dtype=torch.bool)
    out = exact_count_dropout(valid, 0.5, torch.Generator().manual_seed(0))
    assert int((~out).sum()) == 5
    partly = torch.tensor([False, False, False] + [True] * 7)
    out = exact_count_dropout(partly, 0.5, torch.Generator().manual_seed(0))
    assert int((~out).sum()) == 5 and not out[:3].any()  # already-invalid rows count toward the quota
    mostly = torch.tensor([False] * 6 + [True] * 4)
    assert torch.equal(exact_count_dropout(mostly, 0.5), mostly)
    again = exact_count_dropout(valid, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(again, exact_count_dropout(valid, 0.5, torch.Generator().manual_seed(0)))


def test_metadata_dropout_only_in_training(tiny_model):
    batch = tiny_batch(tiny_model, batch_size=8, zooms=(1,))
    feats = torch.randn(8, 32)
    tiny_model.eval()
    with torch.no_grad():
        e1 = tiny_model.embed_image_features(feats, batch["metadata"]).mean
        e2 = tiny_model.embed_image_features(feats, batch["metadata"]).mean
    assert torch.equal(e1, e2)
    tiny_model.train()
    tiny_model.image.fusion.transformer.eval()  # isolate metadata dropout from nn.Dropout
    with torch.no_grad():
        t1 = tiny_model.embed_image_features(feats, batch["metadata"], generator=torch.Generator().manual_seed(1)).mean
        t2 = tiny_model.embed_image_features(feats, batch["metadata"], generator=torch.Generator().manual_seed(1)).mean
    assert torch.equal(t1, t2) and not torch.allclose(t1, e1)


def test_bad_inputs_give_clear_errors(tiny_model):
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 64, 64\)"):
        tiny_model.image_features(torch.randn(2, 3, 32, 32), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"zoom level\(s\) \[2.0\] not in this model's config \[1, 3, 5\]"):
        tiny_model.image_features(torch.randn(2, 3, 64, 64), torch.tensor([1, 2]))
    # a fractional zoom is not truncated to a configured level (it would silently give 15 m instead of 10 m)
    with pytest.raises(ValueError, match=r"zoom level\(s\) \[1.5\] not in this model's config"):
        tiny_model.image_features(torch.randn(2, 3, 64, 64), torch.tensor([1.5, 3.0]))
    with pytest.raises(ValueError, match="audio input_features must have shape"):
        tiny_model.encode_audio(torch.randn(2, 1001, 64), torch.tensor([True, False]))
    with pytest.raises(ValueError, match="out of the vocabulary range"):
        tiny_model.encode_text(torch.full((1, 4), 10_000), torch.ones(1, 4, dtype=torch.long))


def test_deterministic_baseline_has_no_sigma():
    model = create_model("psm-tiny", overrides={"probabilistic": False}, seed=0).eval()
    with torch.no_grad():
        out = model(**tiny_batch(model))
    assert all(out[k].logvar is None for k in out)
    assert torch.allclose(out["image"].mean.norm(dim=-1), torch.ones(4), atol=1e-5)
    assert not any("logvar_head" in k for k in model.state_dict())


def test_clap_towers_load_from_a_local_folder(tmp_path, tiny_model):
    # A saved CLAP tower (as a user would keep a local copy of laion/clap-htsat-fused) is loaded offline.
    tiny_model.audio.tower.clap.save_pretrained(tmp_path / "clap-audio")
    tiny_model.text.tower.clap.save_pretrained(tmp_path / "clap-text")
    model = create_model(
        "psm-tiny",
        overrides={
            "audio": {"pretrained": str(tmp_path / "clap-audio")},
            "text": {"pretrained": str(tmp_path / "clap-text")},
        },
        seed=1,
    )
    for ours, theirs in (
        (model.audio.tower.clap, tiny_model.audio.tower.clap),
        (model.text.tower.clap, tiny_model.text.tower.clap),
    ):
        for (name, a), (_, b) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
            assert torch.equal(a, b), name
    # transformers' from_pretrained returns a model in eval mode, and Lightning (>= 2.2) keeps each module's
    # mode: a loaded tower would then train with its dropout off and its BatchNorms frozen.
    assert model.training and all(m.training for m in model.modules())


def test_is_longer_is_forced_by_default_and_per_clip_on_request():
    forced = create_model("psm-tiny", seed=0).eval()
    feats = torch.randn(3, 4, 1001, 64)
    with torch.no_grad():
        a = forced.encode_audio(feats, torch.tensor([True, False, False])).mean
        b = forced.encode_audio(feats, torch.tensor([False, False, False])).mean
    assert torch.equal(a, b)  # official: every clip takes the fusion path whatever its flag
    per_clip = create_model("psm-tiny", overrides={"audio": {"force_is_longer": False}}, seed=0)
    with torch.no_grad():
        per_clip.eval()
        c = per_clip.encode_audio(feats, torch.tensor([True, False, False])).mean
        d = per_clip.encode_audio(feats, torch.tensor([False, False, False])).mean
        assert not torch.allclose(c[0], d[0]) and torch.allclose(c[1:], d[1:], atol=1e-6)
        # training with a single long clip in the batch (fusion BatchNorm over one sample) works
        per_clip.train()
        per_clip.encode_audio(feats, torch.tensor([True, False, False]))
    assert all(bn.training for bn in per_clip.audio.tower._fusion_norms)


def test_logvar_hidden_bias_init_lets_sigma_train():
    """Official σ-head init (both biases −4) leaves the hidden GELU flat; a hidden bias of 0 lets σ learn."""
    from psm.models.heads import GaussianHeads

    torch.manual_seed(0)
    x = torch.randn(64, 32)
    grads = {}
    for name, hidden in (("official", None), ("active", 0.0)):
        torch.manual_seed(1)
        head = GaussianHeads(32, -4.0, hidden)
        assert head.logvar_head.linear2.bias.eq(-4.0).all()
        assert head.logvar_head.linear1.bias.eq(-4.0 if hidden is None else 0.0).all()
        logvar = head(x).logvar
        assert abs(float(logvar.mean()) + 4.0) < 0.5  # both start near log σ² = −4
        logvar.std(0).sum().backward()  # any objective that wants σ to differ between samples
        grads[name] = float(head.logvar_head.linear1.weight.grad.norm())
    assert grads["active"] > 10 * grads["official"]  # 20× here; in output space the GELU slope differs ~100×


@pytest.mark.parametrize("training", [True, False])
def test_deferred_mel_norm_affine_equals_hf_htsat(training):
    """psm's HTSAT input norm (affine after the time interpolation, repeated channels stretched once) gives
    HF's outputs, gradients and running statistics; fails if the swap is removed or either step is wrong."""
    from transformers.models.clap.modeling_clap import ClapAudioEncoder

    from psm.models.clap import _ClapAudioEncoderDeferredNorm, _MelNormDeferredAffine, hf_audio_model

    ours = create_model("psm-tiny", seed=0).audio.tower.clap
    encoder = ours.audio_model.audio_encoder
    assert isinstance(encoder, _ClapAudioEncoderDeferredNorm)
    assert isinstance(encoder.batch_norm, _MelNormDeferredAffine)
    reference = hf_audio_model(ours)
    ref_encoder = reference.audio_model.audio_encoder
    assert type(ref_encoder) is ClapAudioEncoder and type(ref_encoder.patch_embed.proj) is torch.nn.Conv2d
    plain = ref_encoder.batch_norm
    assert list(ours.state_dict()) == list(reference.state_dict())  # same checkpoint keys
    # The tiny config's full-band patches take the affine into the patch convs: the image needs no gradient.
    image_needs_grad = []
    encoder.patch_embed.register_forward_pre_hook(lambda m, args: image_needs_grad.append(args[0].requires_grad))
    with torch.no_grad():  # a non-trivial affine, so a wrong order would show
        for m in (encoder.batch_norm, plain):
            m.weight.copy_(torch.linspace(0.5, 2.0, m.num_features))
            m.bias.copy_(torch.linspace(-1.0, 1.0, m.num_features))
    ours.train(training), reference.train(training)
    feats = torch.randn(3, 4, 1001, 64) * 2 + 1
    feats[1:] = feats[1:, :1]  # clips up to 10 s: four copies of one mel (stretched once, psm.models.clap)
    longer = torch.tensor([[True], [True], [True]])
    torch.manual_seed(0)  # the same dropout draws in both
    out = ours(input_features=feats, is_longer=longer).audio_embeds
    torch.manual_seed(0)
    ref = reference(input_features=feats, is_longer=longer).audio_embeds
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert image_needs_grad == [False]
    (out * torch.arange(out.shape[1])).sum().backward()
    (ref * torch.arange(ref.shape[1])).sum().backward()
    for (name, a), (_, b) in zip(ours.named_parameters(), reference.named_parameters(), strict=True):
        if b.grad is not None:
            # float32 sums over ~10⁶ values in another order: compare against the gradient's own scale
            scale = max(1.0, float(b.grad.abs().max()))
            assert torch.allclose(a.grad, b.grad, atol=1e-4 * scale, rtol=1e-3), name
    for key, value in reference.state_dict().items():  # running statistics updated alike
        assert torch.allclose(ours.state_dict()[key].float(), value.float(), atol=1e-6), key
    # An input that needs its gradient (saliency) takes the plain path and gets the same gradient.
    x1, x2 = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    torch.manual_seed(1)
    ours(input_features=x1, is_longer=longer).audio_embeds.sum().backward()
    torch.manual_seed(1)
    reference(input_features=x2, is_longer=longer).audio_embeds.sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6, rtol=1e-3)


def test_row_affine_folding_only_where_kernels_cover_one_mel_segment():
    """The paper's 4×4 patches see a different mel bin per kernel row at each stride: no folding there."""
    from psm.models.clap import _folds_row_affine
    from psm.models.config import load_model_config

    embed = create_model("psm-tiny", seed=0).audio.tower.clap.audio_model.audio_encoder.patch_embed
    assert _folds_row_affine(embed.proj, 64) and _folds_row_affine(embed.mel_conv2d, 64)
    from transformers import ClapAudioConfig

    paper = ClapAudioConfig(**load_model_config("psm-paper").audio.hf_config)
    conv = torch.nn.Conv2d(1, 8, paper.patch_size, stride=paper.patch_stride)
    assert not _folds_row_affine(conv, 64)


def test_stretch_frames_is_hf_bicubic_bit_for_bit():
    """The frame stretch gives torch's bicubic resize exactly, for clips with repeated channels, distinct
    ones, a mix of both, and single-channel input."""
    from torch.nn import functional as F

    from psm.models.clap import stretch_frames

    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(3, 4, 101, 8, generator=g)
    repeated = torch.randn(3, 1, 101, 8, generator=g).expand(-1, 4, -1, -1)
    for x in (distinct, repeated, torch.cat([repeated, distinct]), distinct[:, :1]):
        expected = F.interpolate(x, (128, 8), mode="bicubic", align_corners=True)
        assert torch.equal(stretch_frames(x, 128), expected)


def test_compile_encoders_marks_the_three_encoders_and_keeps_parameter_names():
    """Compiling (lazily, in place) leaves the state-dict keys alone, so checkpoints are the same files."""
    model = create_model("psm-tiny", seed=0)
    before = list(model.state_dict())
    encoders = (model.image.encoder, model.audio.tower.clap, model.text.tower.clap)
    assert all(m._compiled_call_impl is None for m in encoders)
    assert model.compile_encoders() is model
    assert all(m._compiled_call_impl is not None for m in encoders)
    assert model.image.fusion._compiled_call_impl is None  # heads and fusion stay eager
    assert list(model.state_dict()) == before

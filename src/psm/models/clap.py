"""CLAP audio and text towers from transformers (``laion/clap-htsat-fused``), built offline when asked.

A tower is built from ``pretrained`` (a local folder, or a hub id when the user is online) or from an
``hf_config`` mapping with random weights: the tiny configs used by tests and the offline demo.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import (
    ClapAudioConfig,
    ClapAudioModelWithProjection,
    ClapTextConfig,
    ClapTextModelWithProjection,
)
from transformers.models.clap.modeling_clap import ClapAudioEncoder, ClapAudioPatchEmbed

from psm.models.config import ClapTowerConfig


def _build(model_cls, config_cls, cfg: ClapTowerConfig, projection_dim: int) -> nn.Module:
    if cfg.pretrained:
        # from_pretrained returns the model in eval mode; a new module trains, and Lightning keeps modes as
        # it finds them, so a loaded tower would fine-tune with dropout off and frozen BatchNorm statistics.
        model = model_cls.from_pretrained(cfg.pretrained).train()
    else:
        hf: dict[str, Any] = {"projection_dim": projection_dim, **cfg.hf_config}
        model = model_cls(config_cls(**hf))
    if model.config.projection_dim != projection_dim:
        raise ValueError(f"CLAP projection_dim {model.config.projection_dim} != model embed_dim {projection_dim}")
    if cfg.freeze:
        model.requires_grad_(False)
    return model


def _bicubic(x: Tensor, n_out: int) -> Tensor:
    return F.interpolate(x, (n_out, x.shape[3]), mode="bicubic", align_corners=True)


@torch.no_grad()
def stretch_frames(x: Tensor, n_out: int) -> Tensor:
    """HF's ``F.interpolate(x, (n_out, F), mode="bicubic", align_corners=True)`` of (B, C, T, F) mel input.

    HTSAT stretches 1,001 frames to 1,024, the largest single cost of the tiny model's CPU step; for every
    clip up to 10 s the four channels are four copies of one mel. Each such clip is stretched once and
    repeated (the same kernel on the same values: bit-identical), the others as HF does. No gradient.
    On a GPU the stretch is cheap and finding the repeats would stall the launch queue twice per step
    (host reads of device flags, and graph breaks under ``torch.compile``): all channels are stretched there.
    """
    if x.shape[1] == 1 or x.device.type != "cpu":
        return _bicubic(x, n_out)
    repeats = (x[:, 1:] == x[:, :1]).flatten(1).all(1)
    all_repeat, any_repeat = repeats.all().item(), repeats.any().item()
    if all_repeat:
        return _bicubic(x[:, :1], n_out).expand(-1, x.shape[1], -1, -1)
    if not any_repeat:
        return _bicubic(x, n_out)
    out = x.new_empty(x.shape[0], x.shape[1], n_out, x.shape[3])
    out[repeats] = _bicubic(x[repeats, :1], n_out)  # broadcast over the channels
    out[~repeats] = _bicubic(x[~repeats], n_out)
    return out


class _MelNormDeferredAffine(nn.BatchNorm2d):
    """HTSAT's per-mel-bin input BatchNorm, whose affine part can wait until after the time interpolation.

    HTSAT normalises the (B, 4, 1001, 64) mel input per bin, then stretches it to 1,024 frames by bicubic
    interpolation. Both act per bin and the interpolation's weights sum to one, so
    interp(γ·x̂ + β) = γ·interp(x̂) + β exactly. Since the input carries no gradient, x̂ and its interpolation
    need no autograd at all, and the backward pass of the interpolation — half of a tiny model's CPU step,
    and slow atomics on a GPU — disappears; γ and β get the same gradients. Same parameters and buffers as
    the BatchNorm it replaces (checkpoints are unaffected); it falls back to the plain path when the input
    requires a gradient.
    """

    pending_affine: bool = False

    def forward(self, x: Tensor) -> Tensor:
        self.pending_affine = not x.requires_grad and self.affine
        if not self.pending_affine:
            return super().forward(x)
        # torch's _BatchNorm.forward with the affine left out (same running-statistics update).
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        # HTSAT hands over a transposed view (B, mel, T, C) of contiguous (B, C, T, mel) features: per-bin
        # statistics over the (B·C·T, mel) rows are the same numbers, and the contiguous 2-D kernel is ~5×
        # faster on a CPU than the strided 4-D one (float32 sums in another order: rounding only).
        rows = x.transpose(1, 3) if x.dim() == 4 else x
        flat = x.dim() == 4 and rows.is_contiguous()
        with torch.no_grad():
            out = F.batch_norm(
                rows.reshape(-1, x.shape[1]) if flat else x,
                self.running_mean if keep_running else None,
                self.running_var if keep_running else None,
                None,
                None,
                use_batch_stats,
                factor,
                self.eps,
            )
        return out.view(rows.shape).transpose(1, 3) if flat else out


class _RowAffineConv2d(nn.Conv2d):
    """A patch-embedding conv that can take the input norm's per-mel-bin affine into its weights for one call.

    When each kernel covers exactly one stacked 64-bin segment of HTSAT's mel image (kernel rows = stride rows =
    mel bins, no row padding), kernel row i always sees mel bin i, so
    conv(γ·x̂ + β) = conv_{W·γ}(x̂) + (b + Σ W·β) exactly. The image then carries no gradient: the backward
    pass no longer builds gradients of the whole (B, 4, 256, 256) image (index, slice and conv-input
    backward: half of the tiny audio tower's CPU step) just to reach γ and β. Same parameters as the Conv2d
    it replaces.
    """

    folded_affine: tuple[Tensor, Tensor] | None = None  # (γ, β) per kernel row, set by the patch embedding

    def forward(self, x: Tensor) -> Tensor:
        if self.folded_affine is None:
            return super().forward(x)
        gamma, beta = (v.view(1, 1, -1, 1) for v in self.folded_affine)
        bias = (self.weight * beta).sum((1, 2, 3))
        return self._conv_forward(x, self.weight * gamma, bias if self.bias is None else bias + self.bias)


def _patch_convs(embed: nn.Module) -> list[nn.Conv2d]:
    """HTSAT's patch-embedding convs: ``proj``, and ``mel_conv2d`` with fusion."""
    return [c for c in (embed.proj, getattr(embed, "mel_conv2d", None)) if c is not None]


class _ClapAudioPatchEmbedFoldedNorm(ClapAudioPatchEmbed):
    """HF's patch embedding whose two convs apply a pending input affine (see :class:`_RowAffineConv2d`)."""

    pending_affine: tuple[Tensor, Tensor] | None = None

    def forward(self, hidden_states: Tensor, is_longer_idx: Tensor | None = None) -> Tensor:
        affine, self.pending_affine = self.pending_affine, None
        convs = [c for c in _patch_convs(self) if isinstance(c, _RowAffineConv2d)]
        for conv in convs:
            conv.folded_affine = affine
        try:
            return super().forward(hidden_states, is_longer_idx)
        finally:
            for conv in convs:
                conv.folded_affine = None


def _folds_row_affine(conv: nn.Conv2d, n_mels: int) -> bool:
    """Whether every application of ``conv`` covers exactly the rows of one mel segment, bin i at kernel row i."""
    return conv.kernel_size[0] == conv.stride[0] == n_mels and conv.padding[0] == 0 and conv.dilation[0] == 1


class _ClapAudioEncoderDeferredNorm(ClapAudioEncoder):
    """HF's CLAP audio encoder whose mel2img step applies the input norm's deferred affine (see above)."""

    def reshape_mel2img(self, normalized_input_features: Tensor) -> Tensor:
        norm = self.batch_norm
        self.patch_embed.pending_affine = None
        if not getattr(norm, "pending_affine", False):
            return super().reshape_mel2img(normalized_input_features)
        norm.pending_affine = False
        x = normalized_input_features  # (B, C, T, F) normalised without the affine, no gradient
        _, _, time_length, freq_length = x.shape
        spec_width = int(self.spec_size * self.freq_ratio)
        if freq_length == self.spec_size // self.freq_ratio and time_length < spec_width:
            x = stretch_frames(x, spec_width)  # HF's bicubic call, outside autograd and without repeats
        embed = self.patch_embed
        if freq_length == self.spec_size // self.freq_ratio and all(
            isinstance(c, _RowAffineConv2d) and _folds_row_affine(c, freq_length) for c in _patch_convs(embed)
        ):
            embed.pending_affine = (norm.weight, norm.bias)  # the convs apply it: the image needs no gradient
            return super().reshape_mel2img(x)
        # (A frequency interpolation would mix bins with different γ: then the affine goes first.)
        return super().reshape_mel2img(x * norm.weight + norm.bias)


def _defer_mel_norm_affine(encoder: nn.Module) -> None:
    """Swap HTSAT's input BatchNorm, encoder, patch embedding and its convs for the equivalents above, in place."""
    old = encoder.batch_norm
    new = _MelNormDeferredAffine(old.num_features, old.eps, old.momentum, old.affine, old.track_running_stats)
    new.load_state_dict(old.state_dict())
    new.train(old.training)
    new.requires_grad_(any(p.requires_grad for p in old.parameters()))
    encoder.batch_norm = new
    encoder.__class__ = _ClapAudioEncoderDeferredNorm
    # The patch embedding's convs may fold that affine into their weights (same parameters, same keys).
    encoder.patch_embed.__class__ = _ClapAudioPatchEmbedFoldedNorm
    for conv in _patch_convs(encoder.patch_embed):
        conv.__class__ = _RowAffineConv2d


def hf_audio_model(clap: nn.Module) -> nn.Module:
    """A copy of a psm CLAP audio model in HF's own classes (plain input BatchNorm, encoder, patch embedding
    and convs): the same weights and outputs, the baseline for psm's equivalence tests and benchmarks."""
    import copy

    plain = copy.deepcopy(clap)
    encoder = plain.audio_model.audio_encoder
    norm = nn.BatchNorm2d(encoder.batch_norm.num_features, encoder.batch_norm.eps, encoder.batch_norm.momentum)
    norm.load_state_dict(encoder.batch_norm.state_dict())
    norm.train(encoder.batch_norm.training)
    encoder.batch_norm, encoder.__class__ = norm, ClapAudioEncoder
    encoder.patch_embed.__class__ = ClapAudioPatchEmbed
    for conv in _patch_convs(encoder.patch_embed):
        conv.__class__ = nn.Conv2d
    return plain


class AudioTower(nn.Module):
    """CLAP HTSAT audio encoder + CLAP projection → (B, embed_dim), not normalised (as HF returns it)."""

    def __init__(self, cfg: ClapTowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.clap = _build(ClapAudioModelWithProjection, ClapAudioConfig, cfg, embed_dim)
        _defer_mel_norm_affine(self.clap.audio_model.audio_encoder)
        self.frozen = cfg.freeze
        self.fusion = bool(self.clap.config.enable_fusion)
        self.force_is_longer = cfg.force_is_longer
        # BatchNorms inside the fusion block see only the "longer" clips of a batch (see forward).
        self._fusion_norms = [
            m for name, m in self.clap.named_modules() if "fusion_model" in name and isinstance(m, nn.BatchNorm2d)
        ]

    def train(self, mode: bool = True) -> AudioTower:
        super().train(mode)
        if self.frozen:  # the official freeze also puts the frozen tower in eval mode
            self.clap.eval()
        return self

    def forward(self, input_features: Tensor, is_longer: Tensor) -> Tensor:
        channels = 4 if self.fusion else 1
        if input_features.ndim != 4 or input_features.shape[1] != channels:
            raise ValueError(
                f"audio input_features must have shape (B, {channels}, frames, mel_bins), "
                f"got {tuple(input_features.shape)}"
            )
        if is_longer.numel() != input_features.shape[0]:
            raise ValueError(
                f"is_longer must give one flag per clip ({input_features.shape[0]}), got {tuple(is_longer.shape)}"
            )
        # is_longer is always passed per sample: HF's feature extractor would otherwise flip a random clip
        # to "longer" when none is. The official loader forced it to True for every clip (the default here).
        flags = is_longer.reshape(-1, 1).bool()
        if self.force_is_longer:
            flags = torch.ones_like(flags)
        # With per-clip flags a training batch can hold a single long clip; the fusion block's BatchNorm
        # cannot take batch statistics of one sample, so it uses its running statistics for that batch.
        # (Forced flags are all True: their count is the batch size, with no host read of a device tensor.)
        n_longer = flags.shape[0] if self.force_is_longer else int(flags.sum())
        single = self.training and self.fusion and n_longer == 1
        if single:
            for bn in self._fusion_norms:
                bn.eval()
        try:
            out = self.clap(input_features=input_features, is_longer=flags)
        finally:
            if single:
                for bn in self._fusion_norms:
                    bn.train(not self.frozen)
        return out.audio_embeds


class TextTower(nn.Module):
    """CLAP RoBERTa text encoder + CLAP projection → (B, embed_dim), not normalised."""

    def __init__(self, cfg: ClapTowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.clap = _build(ClapTextModelWithProjection, ClapTextConfig, cfg, embed_dim)
        self.frozen = cfg.freeze

    def train(self, mode: bool = True) -> TextTower:
        super().train(mode)
        if self.frozen:
            self.clap.eval()
        return self

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                "text input_ids and attention_mask must both have shape (B, L), got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        vocab = self.clap.config.vocab_size
        # One host read of a device flag (not two: each stalls a GPU's launch queue).
        if input_ids.numel() and bool(((input_ids >= vocab) | (input_ids < 0)).any()):
            raise ValueError(f"text input_ids out of the vocabulary range [0, {vocab})")
        return self.clap(input_ids=input_ids, attention_mask=attention_mask).text_embeds


def is_longer_dtype() -> torch.dtype:
    """The dtype the towers expect for ``is_longer`` flags."""
    return torch.bool

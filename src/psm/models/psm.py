"""The PSM model: three towers mapping satellite images, audio and text to Gaussian embeddings.

    image ─ SatMAE ViT(+GSD pos) ─ mean ─ fc_norm ─ projector ─┬─ [metadata fusion] ─ μ / log σ² heads
    audio ─ CLAP HTSAT (fused) ─ CLAP projection ──────────────┴─ μ / log σ² heads
    text  ─ CLAP RoBERTa ─ CLAP projection ──────────────────────  μ / log σ² heads

Plain ``nn.Module`` (no Lightning here): training owns the losses and optimisation. The image path is split
in two (:meth:`PSM.image_features` then :meth:`PSM.embed_image_features`) so maps can cache pre-fusion
features once and condition them on any metadata later.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from psm.data.metadata import Metadata
from psm.models.clap import AudioTower, TextTower
from psm.models.config import PSMConfig
from psm.models.fusion import MetadataFusion
from psm.models.heads import GaussianEmbedding, make_head
from psm.models.satellite import SatelliteEncoder


class ImageTower(nn.Module):
    """Satellite encoder, optional metadata fusion and heads (the official ``sat_encoder``)."""

    def __init__(self, cfg: PSMConfig) -> None:
        super().__init__()
        self.encoder = SatelliteEncoder(cfg.image, cfg.embed_dim)
        self.fusion = MetadataFusion(cfg.metadata, cfg.fusion, cfg.embed_dim) if cfg.metadata.types else None
        # The deterministic image branch has no extra head: the (fused) projector output is the embedding.
        self.head = make_head(cfg.embed_dim, cfg.probabilistic, cfg.logvar_bias_init, True, cfg.logvar_hidden_bias_init)

    def embed_features(
        self,
        features: Tensor,
        metadata: Metadata | None = None,
        keep_metadata: Iterable[str] | None = None,
        generator: torch.Generator | None = None,
        metadata_dropout: bool | None = None,
    ) -> GaussianEmbedding:
        if self.fusion is not None:
            features = self.fusion(
                features, metadata, keep=keep_metadata, generator=generator, metadata_dropout=metadata_dropout
            )
        elif keep_metadata:
            raise ValueError(f"this model uses no metadata, but keep_metadata={list(keep_metadata)} was given")
        return self.head(features)


class ClapBranch(nn.Module):
    """A CLAP tower followed by its head."""

    def __init__(self, tower: nn.Module, cfg: PSMConfig) -> None:
        super().__init__()
        self.tower = tower
        self.head = make_head(
            cfg.embed_dim, cfg.probabilistic, cfg.logvar_bias_init, False, cfg.logvar_hidden_bias_init
        )

    def forward(self, *inputs: Tensor) -> GaussianEmbedding:
        return self.head(self.tower(*inputs))


class PSM(nn.Module):
    """Tri-modal probabilistic embedding model (or its deterministic InfoNCE baseline)."""

    def __init__(self, cfg: PSMConfig) -> None:
        super().__init__()
        self.config = cfg
        self.image = ImageTower(cfg)
        self.audio = ClapBranch(AudioTower(cfg.audio, cfg.embed_dim), cfg)
        self.text = ClapBranch(TextTower(cfg.text, cfg.embed_dim), cfg) if cfg.text is not None else None

    # --- image --------------------------------------------------------------------------------------
    def image_features(self, images: Tensor, zoom: Tensor) -> Tensor:
        """Pre-fusion image features (B, embed_dim); ``zoom`` (B,) may mix zoom levels."""
        return self.image.encoder(images, zoom)

    def embed_image_features(
        self,
        features: Tensor,
        metadata: Metadata | None = None,
        keep_metadata: Iterable[str] | None = None,
        generator: torch.Generator | None = None,
        metadata_dropout: bool | None = None,
    ) -> GaussianEmbedding:
        """Fuse metadata (those named in ``keep_metadata``; None = all) into features and apply the heads."""
        return self.image.embed_features(features, metadata, keep_metadata, generator, metadata_dropout)

    def encode_image(
        self,
        images: Tensor,
        zoom: Tensor,
        metadata: Metadata | None = None,
        keep_metadata: Iterable[str] | None = None,
        generator: torch.Generator | None = None,
        metadata_dropout: bool | None = None,
    ) -> GaussianEmbedding:
        """Image (+ metadata) → Gaussian embedding."""
        features = self.image_features(images, zoom)
        return self.embed_image_features(features, metadata, keep_metadata, generator, metadata_dropout)

    # --- audio and text -----------------------------------------------------------------------------
    def encode_audio(self, input_features: Tensor, is_longer: Tensor) -> GaussianEmbedding:
        """CLAP fusion features (B, 4, 1001, 64) and per-clip ``is_longer`` (B,) → Gaussian embedding."""
        return self.audio(input_features, is_longer)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> GaussianEmbedding:
        """Tokenised captions (B, L) → Gaussian embedding."""
        if self.text is None:
            raise ValueError("this model was built without a text tower")
        return self.text(input_ids, attention_mask)

    def forward(
        self,
        images: Tensor,
        zoom: Tensor,
        audio_features: Tensor,
        is_longer: Tensor,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        metadata: Metadata | None = None,
        keep_metadata: Iterable[str] | None = None,
        generator: torch.Generator | None = None,
        metadata_dropout: bool | None = None,
    ) -> dict[str, GaussianEmbedding]:
        """Embeddings of every modality given; keys ``image``, ``audio`` and (with captions) ``text``."""
        out = {
            "image": self.encode_image(images, zoom, metadata, keep_metadata, generator, metadata_dropout),
            "audio": self.encode_audio(audio_features, is_longer),
        }
        if input_ids is not None and self.text is not None:
            out["text"] = self.encode_text(input_ids, attention_mask)
        return out

    def compile_encoders(self, **compile_kwargs: Any) -> PSM:
        """``torch.compile`` the three encoders (ViT, HTSAT, RoBERTa) in place; heads and fusion stay eager.

        Each encoder is compiled on its own, so a graph break in one (HTSAT's data-dependent fusion
        indexing) does not split the others; ``nn.Module.compile`` keeps the parameter names, so
        checkpoints of a compiled model are the same files.
        """
        encoders = [self.image.encoder, self.audio.tower.clap]
        if self.text is not None:
            encoders.append(self.text.tower.clap)
        for module in encoders:
            module.compile(**compile_kwargs)
        return self

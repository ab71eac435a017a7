"""Metadata fusion: a small transformer over [CLS, image, metadata tokens...] whose CLS output is the image.

Any subset of metadata can be left out at inference: a left-out or invalid token is zeroed and masked
from attention, by *name* (the official ablation masked by fixed column position, which was only right
for models trained with all five types).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from psm.data.metadata import ENCODING_WIDTH, Metadata, MetadataSpec, check_metadata_names
from psm.models.config import FusionConfig


class TokenMLP(nn.Module):
    """Linear(in → hidden) → GELU → Linear(hidden → d): the official ``metaNet`` for lat/lon, month, hour."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)
        self.gelu = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.gelu(self.fc1(x)))


def exact_count_dropout(valid: Tensor, rate: float, generator: torch.Generator | None = None) -> Tensor:
    """Official metadata dropout: mask exactly ⌊rate·B⌋ samples of a batch, counting already-invalid ones.

    Returns the new validity mask. Only valid samples are candidates; if at least ⌊rate·B⌋ are already
    invalid nothing more is masked.
    """
    n_target = int(rate * valid.shape[0])
    n_more = n_target - int((~valid).sum())
    if n_more <= 0:
        return valid
    candidates = valid.nonzero().flatten()
    order = torch.randperm(len(candidates), generator=generator, device="cpu").to(candidates.device)
    out = valid.clone()
    out[candidates[order[:n_more]]] = False
    return out


class MetadataFusion(nn.Module):
    """Fuses encoded metadata into the image feature; the output replaces the image feature before the heads."""

    def __init__(self, spec: MetadataSpec, cfg: FusionConfig, dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.dropout_rate = cfg.metadata_dropout
        self.tokens = nn.ModuleDict()
        for name in spec.types:
            if name == "audio_source":
                self.tokens[name] = nn.Embedding(len(spec.audio_sources), dim)
            elif name == "caption_source":
                self.tokens[name] = nn.Embedding(len(spec.caption_sources), dim)
            else:
                self.tokens[name] = TokenMLP(ENCODING_WIDTH[name], cfg.token_hidden, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        layer = nn.TransformerEncoderLayer(
            d_model=dim,
            nhead=cfg.heads,
            dim_feedforward=cfg.ffn,
            dropout=cfg.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=False,  # post-LN, as the official model
        )
        # No positional or type embedding: token identity is carried by content alone (official design).
        self.transformer = nn.TransformerEncoder(layer, num_layers=cfg.layers, enable_nested_tensor=False)

    def forward(
        self,
        image_feature: Tensor,
        metadata: Metadata | None,
        keep: Iterable[str] | None = None,
        generator: torch.Generator | None = None,
        metadata_dropout: bool | None = None,
    ) -> Tensor:
        """Fused feature (B, dim). ``keep`` names the metadata types to use (None: all configured ones).

        Metadata dropout is applied in training mode only (``metadata_dropout=None``); ``True`` forces it,
        e.g. to reproduce the official in-training validation (docs/faithfulness.md).
        """
        drop = self.training if metadata_dropout is None else metadata_dropout
        B = image_feature.shape[0]
        keep_set = set(self.spec.types if keep is None else check_metadata_names(keep, self.spec.types))
        dropped = drop and self.dropout_rate > 0
        host_valid = self._host_validity(metadata, keep_set) if dropped else {}
        tokens, masks = [], []
        for name, net in self.tokens.items():
            values = None if metadata is None else metadata.values.get(name)
            if values is None:
                values = (
                    torch.zeros(B, dtype=torch.long, device=image_feature.device)
                    if isinstance(net, nn.Embedding)
                    else image_feature.new_zeros(B, ENCODING_WIDTH[name])
                )
                valid = torch.zeros(B, dtype=torch.bool, device=image_feature.device)
            else:
                valid = metadata.valid[name].to(image_feature.device).bool()
                if values.shape[0] != B:
                    raise ValueError(f"metadata {name!r} has {values.shape[0]} rows for a batch of {B}")
            if name not in keep_set:
                valid = torch.zeros_like(valid)
            elif dropped and name in host_valid:  # (an absent type is all invalid: nothing to drop, no draw)
                valid = exact_count_dropout(host_valid[name], self.dropout_rate, generator)
                valid = valid.to(image_feature.device, non_blocking=True)
            emb = net(values.to(image_feature.device) if isinstance(net, nn.Embedding) else values.to(image_feature))
            tokens.append(emb * valid.unsqueeze(1).to(emb.dtype))  # masked tokens are also zeroed, as official
            masks.append(valid)
        # Under autocast the float32 CLS keeps the sequence float32, as the official torch.cat promotion does.
        cls = self.cls_token.expand(B, -1, -1).to(torch.promote_types(image_feature.dtype, self.cls_token.dtype))
        seq = torch.cat([cls, image_feature[:, None]] + [t[:, None] for t in tokens], dim=1)
        always = torch.ones(B, 2, dtype=torch.bool, device=image_feature.device)  # CLS and image
        key_padding_mask = ~torch.cat([always, torch.stack(masks, dim=1)], dim=1) if masks else ~always
        return self.transformer(seq, src_key_padding_mask=key_padding_mask)[:, 0]

    def _host_validity(self, metadata: Metadata | None, keep: set[str]) -> dict[str, Tensor]:
        """Every kept type's validity on the host, in one device→host copy.

        The exact-count dropout needs host values (counts, candidates); read per type on a GPU that was four
        reads, each stalling the launch queue (20 per step with five types). The draws are unchanged.
        """
        if metadata is None:
            return {}
        names = [n for n in self.tokens if n in keep and metadata.values.get(n) is not None]
        flags = [metadata.valid[n].reshape(-1).bool() for n in names]
        if not flags:
            return {}
        flat = torch.cat(flags).cpu()
        return dict(zip(names, flat.split([len(f) for f in flags]), strict=True))

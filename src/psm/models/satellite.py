"""Satellite image tower: SatMAE ViT with a per-sample GSD position embedding, mean-pooled, projected."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from psm.data.imagery_sources import get_imagery_source
from psm.models.config import ImageTowerConfig
from psm.models.gsd_pos_embed import gsd_pos_embed
from psm.models.heads import Projector

log = logging.getLogger(__name__)


def build_vit(cfg: ImageTowerConfig) -> VisionTransformer:
    """timm ViT without class token, learned position embedding or classifier; pooled by mean + fc_norm.

    The official code deletes ``pos_embed``, ``cls_token``, ``norm`` and ``head`` from a SatMAE ViT and adds a
    fresh ``fc_norm``; these timm options give the same modules and the same state-dict keys.
    """
    return VisionTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        class_token=False,
        pos_embed="none",
        global_pool="avg",
        fc_norm=True,
        num_classes=0,
    )


class SatelliteEncoder(nn.Module):
    """Image → pre-fusion feature (B, embed_dim): ViT(+GSD embedding) → mean → fc_norm → projector."""

    def __init__(self, cfg: ImageTowerConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.base_gsd_m = get_imagery_source(cfg.imagery_source).base_gsd_m
        self.backbone = build_vit(cfg)
        self.grid_size = cfg.img_size // cfg.patch_size
        self.projector = Projector(cfg.width, embed_dim)

    def resolution(self, zoom: Tensor) -> Tensor:
        """Metres per raw pixel of each sample's crop: zoom × base GSD (the official proxy, see faithfulness)."""
        return zoom.to(torch.float32) * self.base_gsd_m

    def check_inputs(self, images: Tensor, zoom: Tensor) -> None:
        """Clear errors for a wrong image shape or a zoom level this model was not configured for."""
        size = self.cfg.img_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-2:] != (size, size):
            raise ValueError(f"images must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        if zoom.ndim != 1 or zoom.shape[0] != images.shape[0]:
            raise ValueError(f"zoom must have shape ({images.shape[0]},), got {tuple(zoom.shape)}")
        # Compared as floats: casting a fractional zoom to the integer levels would truncate 1.5 to 1 and pass.
        allowed = torch.tensor(self.cfg.zoom_levels, dtype=torch.float64, device=zoom.device)
        bad = ~torch.isin(zoom.to(torch.float64), allowed)
        if bad.any():
            levels = sorted({float(z) for z in zoom[bad].tolist()})
            raise ValueError(f"zoom level(s) {levels} not in this model's config {list(self.cfg.zoom_levels)}")

    def forward(self, images: Tensor, zoom: Tensor) -> Tensor:
        zoom = torch.as_tensor(zoom, device=images.device)
        self.check_inputs(images, zoom)
        vit = self.backbone
        x = vit.patch_embed(images)
        # Under autocast the conv gives fp16/bf16 but the float32 embedding promotes the residual stream to
        # float32, as in the official code (and timm's learned pos_embed); a half-precision model stays half.
        pos_dtype = torch.promote_types(x.dtype, vit.patch_embed.proj.weight.dtype)
        pos = gsd_pos_embed(self.resolution(zoom), self.grid_size, x.shape[-1]).to(pos_dtype)
        x = vit.pos_drop(x + pos)
        x = vit.norm_pre(vit.patch_drop(x))
        x = vit.blocks(x)
        x = vit.fc_norm(x.mean(dim=1))  # global average pool without a class token
        return self.projector(x)


@dataclass
class LoadReport:
    """What a weight import matched: keys loaded, keys the model wanted but the file lacked, and extras."""

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}: {self.missing[:8]}; "
            f"unexpected {len(self.unexpected)}: {self.unexpected[:8]}"
        )


# Keys of a SatMAE pre-training file that PSM deliberately drops (MAE decoder, learned pos_embed, CLS, norm).
_SATMAE_DROPPED_PREFIXES = ("decoder", "mask_token", "pos_embed", "cls_token", "norm.", "head.")


def load_satmae_pretrained(encoder: SatelliteEncoder, path: str | Path) -> LoadReport:
    """Load SatMAE pre-training weights (``pretrain-vit-base-e199.pth``, key ``model``) into the ViT.

    Like the official ``strict=False`` load, but the report names every missing and unexpected key; the
    expected ones (MAE decoder, learned position embedding, CLS token, final norm; fresh ``fc_norm``) are
    logged at INFO, anything else at WARNING. Loaded with ``weights_only=True``: no code is unpickled.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SatMAE checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or non-torch file
        raise ValueError(f"{path}: cannot read as a torch checkpoint: {e}") from e
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict with key 'model' holding a state dict")
    target = encoder.backbone.state_dict()
    shape_errors = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    if shape_errors:
        raise ValueError(f"{path}: shape mismatch for {len(shape_errors)} tensors: {shape_errors[:5]}")
    result = encoder.backbone.load_state_dict(state, strict=False)
    report = LoadReport(
        loaded=sorted(k for k in state if k in target),
        missing=sorted(result.missing_keys),
        unexpected=sorted(result.unexpected_keys),
    )
    surprising_missing = [k for k in report.missing if not k.startswith("fc_norm")]
    surprising_extra = [k for k in report.unexpected if not k.startswith(_SATMAE_DROPPED_PREFIXES)]
    log.info("SatMAE import from %s: %s", path, report.summary())
    if surprising_missing or surprising_extra:
        log.warning(
            "SatMAE import from %s: unexpected key mismatch: missing %s, unexpected %s",
            path,
            surprising_missing,
            surprising_extra,
        )
    return report
